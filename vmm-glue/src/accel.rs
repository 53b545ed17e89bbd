//! Choosing an accelerator that really runs guests.
//!
//! `/dev/kvm` existing is not enough: on some hosts (nested virtualization
//! with a partial CPU model, for one) KVM starts a VM whose kernel then
//! hangs. So [`Accel::Auto`] boots a real kernel under KVM as a probe: the
//! host's own `/boot/vmlinuz-*` with no root file system, which must reach
//! its "VFS: Unable to mount root fs" panic and exit (`panic=-1` and
//! `-no-reboot`) in a few seconds. When it does, KVM it is; when it hangs
//! or fails, TCG. Without a readable kernel the probe falls back to a
//! 16-bit firmware stub that writes to `isa-debug-exit` (a weaker test: it
//! catches a KVM that cannot run anything, not one that hangs later).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// An accelerator setting.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Accel {
    /// Linux KVM.
    Kvm,
    /// QEMU's binary translator: slow, works everywhere.
    Tcg,
    /// Probe, and use KVM if it really runs a guest, else TCG.
    Auto,
}

impl Accel {
    /// Parse `kvm`, `tcg` or `auto`.
    pub fn parse(s: &str) -> Option<Accel> {
        match s {
            "kvm" => Some(Accel::Kvm),
            "tcg" => Some(Accel::Tcg),
            "auto" => Some(Accel::Auto),
            _ => None,
        }
    }

    /// The setting's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
            Accel::Auto => "auto",
        }
    }
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What [`resolve`] chose, and why.
#[derive(Clone, Debug)]
pub struct Choice {
    /// [`Accel::Kvm`] or [`Accel::Tcg`].
    pub accel: Accel,
    /// A sentence for the log.
    pub reason: String,
}

/// How long the KVM probe may take before KVM is declared hung.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(8);

/// Resolve `setting` on this host. `kvm` and `tcg` are taken as given;
/// `auto` probes (blocking, up to [`PROBE_TIMEOUT`]).
pub fn resolve(qemu: &Path, setting: Accel) -> Choice {
    match setting {
        Accel::Kvm | Accel::Tcg => Choice { accel: setting, reason: format!("configured as {setting}") },
        Accel::Auto => {
            if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open("/dev/kvm") {
                return Choice { accel: Accel::Tcg, reason: format!("/dev/kvm is not usable ({e}): TCG") };
            }
            match probe(qemu, Accel::Kvm, PROBE_TIMEOUT) {
                Ok(t) => Choice {
                    accel: Accel::Kvm,
                    reason: format!("KVM booted a probe kernel in {:.1} s", t.as_secs_f64()),
                },
                Err(e) => Choice { accel: Accel::Tcg, reason: format!("KVM failed the probe ({e}): TCG") },
            }
        }
    }
}

/// The newest readable `/boot/vmlinuz-*`.
pub fn probe_kernel() -> Option<PathBuf> {
    let mut k: Vec<PathBuf> = std::fs::read_dir("/boot")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("vmlinuz-")))
        .filter(|p| std::fs::File::open(p).is_ok())
        .collect();
    k.sort();
    k.pop()
}

/// Boot a probe guest under `accel`; Ok with the time it took when the
/// guest ran to its end.
pub fn probe(qemu: &Path, accel: Accel, timeout: Duration) -> Result<Duration, String> {
    let dir = std::env::temp_dir().join(format!("keel-accel-probe-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let r = probe_in(&dir, qemu, accel, timeout);
    let _ = std::fs::remove_dir_all(&dir);
    r
}

fn probe_in(dir: &Path, qemu: &Path, accel: Accel, timeout: Duration) -> Result<Duration, String> {
    let mut cmd = Command::new(qemu);
    cmd.args(["-accel", accel.as_str(), "-machine", "pc", "-m", "128", "-nodefaults", "-display", "none"]);
    cmd.args(["-no-user-config", "-no-reboot"]);
    let kernel = probe_kernel();
    let expect: &[u8] = match &kernel {
        Some(k) => {
            cmd.args(["-serial", "stdio", "-kernel"]).arg(k);
            cmd.args(["-append", "console=ttyS0 panic=-1 loglevel=3 root=/dev/keel-probe-none"]);
            b"Kernel panic"
        }
        None => {
            // At the reset vector: mov al, 0x2a; out 0xf4, al; hlt.
            let mut bios = vec![0xf4u8; 65536];
            bios[65536 - 16..65536 - 16 + 5].copy_from_slice(&[0xb0, 0x2a, 0xe6, 0xf4, 0xf4]);
            let path = dir.join("probe.bin");
            std::fs::write(&path, &bios).map_err(|e| format!("{}: {e}", path.display()))?;
            cmd.arg("-bios").arg(&path).args(["-device", "isa-debug-exit,iobase=0xf4,iosize=1"]);
            b""
        }
    };
    // The probe must not outlive us: a KVM guest that hangs (the case the
    // probe exists for) would spin forever once a killed daemon orphaned it.
    // This thread waits for the child below, so the death signal (sent when
    // the forking thread ends) comes no earlier than we want.
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: between fork and exec the closure calls only async-signal-safe
    // functions (prctl, getppid) and allocates nothing (its errors are raw
    // OS errors).
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                // The parent is gone already (no allocation here: after a
                // fork in a threaded process, malloc may deadlock).
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", qemu.display()))?;
    let mut out = child.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = out.read_to_end(&mut buf);
        buf
    });
    let status = loop {
        if let Some(s) = child.try_wait().map_err(|e| e.to_string())? {
            break s;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            let _ = reader.join();
            return Err(format!("the probe guest did not finish in {} s", timeout.as_secs()));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let console = reader.join().unwrap_or_default();
    let took = start.elapsed();
    if kernel.is_none() {
        // isa-debug-exit: status (0x2a << 1) | 1.
        return match status.code() {
            Some(85) => Ok(took),
            other => Err(format!("the probe firmware did not run (exit {other:?})")),
        };
    }
    if console.windows(expect.len()).any(|w| w == expect) {
        Ok(took)
    } else {
        Err(format!("the probe kernel exited ({status}) without reaching its expected panic"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_name() {
        for a in [Accel::Kvm, Accel::Tcg, Accel::Auto] {
            assert_eq!(Accel::parse(a.as_str()), Some(a));
        }
        assert_eq!(Accel::parse("hvf"), None);
    }

    #[test]
    fn explicit_settings_are_not_probed() {
        let c = resolve(Path::new("/nonexistent/qemu"), Accel::Kvm);
        assert_eq!(c.accel, Accel::Kvm);
        let c = resolve(Path::new("/nonexistent/qemu"), Accel::Tcg);
        assert_eq!(c.accel, Accel::Tcg);
    }

    /// A probe guest that hangs dies with the process that probes: this
    /// test re-runs itself as the prober (with a "QEMU" that sleeps), kills
    /// that process with SIGKILL, and expects the sleeper to be gone.
    #[test]
    fn a_hanging_probe_dies_with_its_prober() {
        if let Ok(dir) = std::env::var("KEEL_PROBER_DIR") {
            let qemu = Path::new(&dir).join("qemu");
            let _ = probe(&qemu, Accel::Kvm, Duration::from_secs(600));
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let qemu = dir.path().join("qemu");
        let pid_file = dir.path().join("pid");
        std::fs::write(&qemu, format!("#!/bin/sh\necho $$ > {}\nexec sleep 600\n", pid_file.display())).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&qemu, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut prober = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "accel::tests::a_hanging_probe_dies_with_its_prober", "--nocapture"])
            .env("KEEL_PROBER_DIR", dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let sleeper: i32 = loop {
            if let Some(p) = std::fs::read_to_string(&pid_file).ok().and_then(|s| s.trim().parse().ok()) {
                break p;
            }
            assert!(Instant::now() < deadline, "the probe never started");
            std::thread::sleep(Duration::from_millis(50));
        };
        // SAFETY: kill(2) with signal 0 only checks that the process exists.
        let alive = |pid: i32| unsafe { libc::kill(pid, 0) } == 0;
        assert!(alive(sleeper));
        prober.kill().unwrap();
        prober.wait().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while alive(sleeper) {
            // The sleeper is reparented and reaped by init once it dies.
            assert!(Instant::now() < deadline, "the probe guest outlived the killed prober");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    #[test]
    fn a_missing_qemu_fails_the_probe() {
        let e = probe(Path::new("/nonexistent/qemu"), Accel::Tcg, Duration::from_secs(5)).unwrap_err();
        assert!(e.contains("cannot run"), "{e}");
    }
}
