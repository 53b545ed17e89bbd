//! QEMU processes: start one daemonized, find it again, end it.
//!
//! QEMU runs with `-daemonize`: the process we start exits once the VM is
//! set up (status 0) or failed to be (non-zero, with QEMU's reason on
//! stderr), and the VM lives on in a process reparented to init. So a VM
//! outlives a restart of the Keel daemon, and Keel finds it again through
//! its QMP socket and pid file ([`VmConfig::qmp_socket`],
//! [`VmConfig::pid_file`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::VmConfig;

/// Why QEMU did not start.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// No QEMU binary.
    #[error(
        "QEMU ({0}) is not installed or not executable: install qemu-system-x86 (scripts/install-deps.sh does), or set `qemu` in the config to its path"
    )]
    NoQemu(String),
    /// The run directory could not be prepared.
    #[error("cannot prepare {path}: {source}")]
    RunDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A UNIX socket path would be longer than the kernel allows.
    #[error("the path {0} is too long for a UNIX socket (108 bytes at most): use a shorter data directory")]
    PathTooLong(PathBuf),
    /// QEMU refused the configuration or failed to set the VM up.
    #[error("QEMU failed to start the VM: {0}")]
    Failed(String),
}

/// Find `qemu` (a path, or a name looked up in `PATH`).
pub fn find_qemu(qemu: &str) -> Result<PathBuf, LaunchError> {
    let executable = |p: &Path| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if qemu.contains('/') {
        let p = PathBuf::from(qemu);
        return if executable(&p) { Ok(p) } else { Err(LaunchError::NoQemu(qemu.to_string())) };
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    std::env::split_paths(&path)
        .map(|d| d.join(qemu))
        .find(|p| executable(p))
        .ok_or_else(|| LaunchError::NoQemu(qemu.to_string()))
}

/// Start `cfg` with `qemu`; returns the VM's pid once QEMU daemonized. The
/// run directory is created and cleared of a previous run's sockets and
/// pid file (the console log is kept: it is appended to).
pub async fn launch(qemu: &Path, cfg: &VmConfig) -> Result<i32, LaunchError> {
    let dir = &cfg.run_dir;
    let rd = |source| LaunchError::RunDir { path: dir.clone(), source };
    std::fs::create_dir_all(dir).map_err(rd)?;
    for sock in [cfg.qmp_socket(), cfg.agent_socket()] {
        if sock.as_os_str().len() >= 108 {
            return Err(LaunchError::PathTooLong(sock));
        }
        let _ = std::fs::remove_file(&sock);
    }
    let _ = std::fs::remove_file(cfg.pid_file());
    let out = tokio::process::Command::new(qemu)
        .args(cfg.argv())
        .stdin(std::process::Stdio::null())
        .kill_on_drop(false)
        .output()
        .await
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied => {
                LaunchError::NoQemu(qemu.display().to_string())
            }
            _ => LaunchError::Failed(e.to_string()),
        })?;
    if !out.status.success() {
        let msg = String::from_utf8_lossy(&out.stderr);
        let msg: Vec<&str> = msg.lines().map(|l| l.strip_prefix("qemu-system-x86_64: ").unwrap_or(l)).collect();
        let msg = if msg.is_empty() { format!("QEMU exited with {}", out.status) } else { msg.join("; ") };
        // The daemonized child may linger if the parent died oddly.
        if let Some(pid) = read_pid(&cfg.pid_file()) {
            kill_if_ours(pid, &cfg.qmp_socket());
        }
        return Err(LaunchError::Failed(msg));
    }
    read_pid(&cfg.pid_file())
        .ok_or_else(|| LaunchError::Failed(format!("QEMU started but wrote no pid to {}", cfg.pid_file().display())))
}

/// The pid in a pid file.
pub fn read_pid(pid_file: &Path) -> Option<i32> {
    std::fs::read_to_string(pid_file).ok()?.trim().parse().ok().filter(|p| *p > 0)
}

/// Whether `pid` is alive and is the QEMU serving `qmp_socket` (a pid
/// reused by another process after QEMU died is not).
pub fn is_ours(pid: i32, qmp_socket: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { return false };
    let sock = qmp_socket.display().to_string().replace(',', ",,");
    let needle = format!("path={sock},");
    cmdline.split(|b| *b == 0).any(|arg| String::from_utf8_lossy(arg).contains(&needle))
}

/// SIGKILL `pid` if it is the QEMU of `qmp_socket`; true when it was.
pub fn kill_if_ours(pid: i32, qmp_socket: &Path) -> bool {
    if !is_ours(pid, qmp_socket) {
        return false;
    }
    // SAFETY: kill(2) has no memory effects; the pid was just checked to be
    // the QEMU of this VM.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    true
}

/// Wait until `pid` is no longer the QEMU of `qmp_socket`, at most `limit`.
pub async fn wait_gone(pid: i32, qmp_socket: &Path, limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if !is_ours(pid, qmp_socket) || is_zombie(pid) {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(')').map(|(_, rest)| rest.trim_start().starts_with('Z')))
        .unwrap_or(true)
}

/// Total memory of the host, from `/proc/meminfo`.
pub fn host_memory_bytes() -> Option<u64> {
    let m = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: u64 =
        m.lines().find_map(|l| l.strip_prefix("MemTotal:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_qemu_or_says_how_to_get_it() {
        assert!(find_qemu("sh").is_ok());
        let e = find_qemu("/nonexistent/qemu-system-x86_64").unwrap_err();
        assert!(e.to_string().contains("not installed"), "{e}");
        assert!(find_qemu("keel-no-such-qemu").is_err());
    }

    #[test]
    fn host_memory_is_known() {
        assert!(host_memory_bytes().unwrap() > 64 << 20);
    }

    #[test]
    fn a_foreign_pid_is_not_ours() {
        let me = std::process::id() as i32;
        assert!(!is_ours(me, Path::new("/tmp/no.sock")));
        assert!(!kill_if_ours(me, Path::new("/tmp/no.sock")));
    }
}
