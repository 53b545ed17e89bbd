//! A pool on a temporary file, served over iSCSI on a free loopback port,
//! and helpers to run real initiators (libiscsi's tools, QEMU) against it.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use keel_blockstore::{AnyBackend, Pool};
use keel_iscsi_target::{IQN_PREFIX, PoolTargets, Server, ServerConfig};

pub mod wire;

pub const MIB: u64 = 1 << 20;

pub struct Harness {
    pub dir: tempfile::TempDir,
    pub pool: Pool<AnyBackend>,
    pub targets: Arc<PoolTargets<AnyBackend>>,
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Harness {
    pub async fn new(pool_bytes: u64) -> Harness {
        Harness::with_config(pool_bytes, ServerConfig::default()).await
    }

    pub async fn with_config(pool_bytes: u64, config: ServerConfig) -> Harness {
        let (dir, pool) = keel_tests::data::temp_pool("keel-iscsi", pool_bytes).await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let targets = Arc::new(PoolTargets::new(pool.clone()));
        let server = Server::new(targets.clone(), config);
        let task = tokio::spawn(async move {
            let _ = server.serve(listener).await;
        });
        Harness { dir, pool, targets, addr, task }
    }

    /// `iscsi://HOST:PORT/IQN/0` of a volume.
    pub fn url(&self, volume: &str) -> String {
        format!("iscsi://{}/{}{}/0", self.addr, IQN_PREFIX, volume)
    }

    pub fn iqn(&self, volume: &str) -> String {
        format!("{IQN_PREFIX}{volume}")
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

/// Run a command off the async runtime (the server runs on it) and return
/// its output; panics if it cannot start.
pub async fn run(cmd: &[&str], env: &[(&str, &str)]) -> Output {
    let cmd: Vec<String> = cmd.iter().map(|s| s.to_string()).collect();
    let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    tokio::task::spawn_blocking(move || {
        Command::new(&cmd[0])
            .args(&cmd[1..])
            .envs(env)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {:?}: {e} (scripts/install-deps.sh installs it)", cmd[0]))
    })
    .await
    .unwrap()
}

pub fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

pub fn write_random(path: &Path, bytes: usize, seed: u64) -> Vec<u8> {
    let data = keel_tests::data::pseudo_random(seed, bytes);
    std::fs::write(path, &data).unwrap();
    data
}
