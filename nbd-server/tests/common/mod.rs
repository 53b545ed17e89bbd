//! A small harness: a pool on a temporary file, served over NBD on a free
//! loopback port, and helpers to run real clients against it.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;

use keel_blockstore::{AnyBackend, Pool, PoolOptions};
use keel_nbd_server::{PoolExports, ServerConfig, serve};

pub const MIB: u64 = 1 << 20;

pub struct Harness {
    pub dir: tempfile::TempDir,
    pub pool: Pool<AnyBackend>,
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Harness {
    pub async fn new(pool_bytes: u64) -> Harness {
        Harness::with_config(pool_bytes, ServerConfig::default()).await
    }

    pub async fn with_config(pool_bytes: u64, config: ServerConfig) -> Harness {
        Harness::with_options(pool_bytes, config, PoolOptions::default()).await
    }

    pub async fn with_options(pool_bytes: u64, config: ServerConfig, opts: PoolOptions) -> Harness {
        let (dir, pool) = keel_tests::data::temp_pool_with("keel-nbd", pool_bytes, opts).await;
        Harness::serving(dir, pool, config).await
    }

    /// Serve a pool made by the caller, whose file lives in `dir`.
    pub async fn serving(dir: tempfile::TempDir, pool: Pool<AnyBackend>, config: ServerConfig) -> Harness {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let exports = Arc::new(PoolExports::new(pool.clone()));
        let task = tokio::spawn(async move {
            let _ = serve(listener, exports, Arc::new(config)).await;
        });
        Harness { dir, pool, addr, task }
    }

    pub fn url(&self, export: &str) -> String {
        format!("nbd://{}/{}", self.addr, export)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Run a client program to completion; panics with its output when it
/// fails (unless `allow_fail`).
pub async fn run(prog: &str, args: &[&str]) -> Output {
    let out = tokio::process::Command::new(prog)
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run {prog} (scripts/install-deps.sh installs it): {e}"));
    if !out.status.success() {
        panic!(
            "{prog} {args:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// Run a client that is expected to fail.
pub async fn run_failing(prog: &str, args: &[&str]) -> Output {
    let out = tokio::process::Command::new(prog).args(args).kill_on_drop(true).output().await.unwrap();
    assert!(!out.status.success(), "{prog} {args:?} should have failed: {}", String::from_utf8_lossy(&out.stdout));
    out
}

pub fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// A file of `len` bytes: pseudo-random data in every other MiB, holes in
/// between.
pub fn patterned_file(path: &Path, len: u64, seed: u64) {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::File::create(path).unwrap();
    f.set_len(len).unwrap();
    for mib in (0..len / MIB).step_by(2) {
        let buf = keel_tests::data::pseudo_random(seed ^ mib, MIB as usize);
        f.seek(SeekFrom::Start(mib * MIB)).unwrap();
        f.write_all(&buf).unwrap();
    }
}
