//! An LVM pool for real: this machine's kernel has no device-mapper, the
//! test guest's Debian kernel has it as a module (`dm-mod`). So the guest
//! runs the whole scenario, with the real lvm2 and the real `keel` binary
//! that `tests/guest/build-lvm-extra.sh` packs into an extra initramfs
//! archive, appended to the guest's own (the kernel unpacks both):
//! a volume group on the guest's 512 MiB virtio disk, `keel pool create
//! --lvm` of 64 MiB, 32 MiB written over the kernel's NBD client, `keel
//! pool grow` to 256 MiB (the logical volume and the store, online), 100
//! MiB more written past what 64 MiB could hold, all of it read back, a
//! restart of keel with the data still there, then the volume and the pool
//! removed and the logical volume gone. The guest's `/extra/run.sh` prints
//! a `KEEL-LVM ...` line per step, `KEEL-LVM FAIL <why>` (and the tail of
//! keel's log) on the first failure and `KEEL-LVM OK` at the end.
//!
//! It needs lvm2 on this machine (the guest gets this machine's lvm binary
//! and libraries): without it the test fails, it never skips;
//! `scripts/install-deps.sh` installs it.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use keel_tests::data::scratch;
use keel_tests::guest::{self, BootArgs, Output};

/// The lines `/extra/run.sh` prints, in order, one per step.
const STEPS: [&str; 12] = [
    "KEEL-LVM DM ",
    "KEEL-LVM LO up",
    "KEEL-LVM VG vg0 ",
    "KEEL-LVM KEEL up",
    "KEEL-LVM POOL lv1 online ",
    "KEEL-LVM NBD v1 connected ",
    "KEEL-LVM WROTE 32 MiB ",
    "KEEL-LVM GROWN ",
    "KEEL-LVM WROTE 132 MiB ",
    "KEEL-LVM RESTARTED pool lv1 online ",
    "KEEL-LVM REMOVED ",
    "KEEL-LVM OK",
];

/// A whole run takes about 2.5 minutes under TCG on an idle machine; leave
/// room for a busy one.
const TIMEOUT: Duration = Duration::from_secs(1200);

/// Boot QEMU with `args` for a guest whose `vmlinuz` and
/// `initramfs.cpio.gz` are in `dir`, as `guest::boot` does for the guest's
/// own directory: wait at most `args.timeout`, collect the console.
fn boot_in(dir: &Path, args: &BootArgs) -> Output {
    let qemu = std::env::var("KEEL_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".to_string());
    let command = args.qemu_command_line(dir);
    let echo = std::env::var_os("KEEL_GUEST_ECHO").is_some_and(|v| !v.is_empty() && v != "0");
    let start = Instant::now();
    let mut child = Command::new(&qemu)
        .args(&command)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {qemu} (scripts/install-deps.sh installs it): {e}"));
    let collect = |mut r: Box<dyn Read + Send>, buf: Arc<Mutex<Vec<u8>>>| {
        thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            while let Ok(n @ 1..) = r.read(&mut chunk) {
                if echo {
                    use std::io::Write;
                    let _ = std::io::stderr().write_all(&chunk[..n]);
                }
                buf.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(&chunk[..n]);
            }
        })
    };
    let console = Arc::new(Mutex::new(Vec::new()));
    let stderr = Arc::new(Mutex::new(Vec::new()));
    let readers = [
        collect(Box::new(child.stdout.take().expect("piped stdout")), console.clone()),
        collect(Box::new(child.stderr.take().expect("piped stderr")), stderr.clone()),
    ];
    let deadline = start + args.timeout;
    let (status, timed_out) = loop {
        match child.try_wait().expect("waiting for QEMU") {
            Some(s) => break (Some(s), false),
            None if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break (None, true);
            }
            None => thread::sleep(Duration::from_millis(100)),
        }
    };
    let elapsed = start.elapsed();
    for r in readers {
        let _ = r.join();
    }
    let text = |b: &Mutex<Vec<u8>>| String::from_utf8_lossy(&b.lock().unwrap_or_else(|e| e.into_inner())).into_owned();
    Output { console: text(&console), stderr: text(&stderr), status, timed_out, elapsed, command }
}

/// The `md5=` word of the first console line starting with `step`.
fn md5_of(console: &str, step: &str) -> Option<String> {
    let line = console.lines().map(str::trim).find(|l| l.starts_with(step))?;
    line.split_whitespace().find_map(|w| w.strip_prefix("md5=")).map(str::to_string)
}

#[test]
fn lvm_pool_created_written_grown_restarted_and_removed_in_a_guest() {
    assert!(
        ["/sbin/lvm", "/usr/sbin/lvm"].iter().any(|p| Path::new(p).exists()),
        "lvm2 is not installed on this machine (no /sbin/lvm): the LVM guest test copies it into the guest; run \
         scripts/install-deps.sh (or apt-get install lvm2)"
    );
    let guest_dir = guest::ensure_guest();
    let tmp = tempfile::Builder::new().prefix("keel-lvm-pool-").tempdir_in(scratch()).expect("tempdir");

    // The extra archive: keel, lvm2, dm-mod, /extra/run.sh.
    let extra = tmp.path().join("lvm-extra.cpio.gz");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/guest/build-lvm-extra.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg(&extra)
        .arg(env!("CARGO_BIN_EXE_keel"))
        .arg(&guest_dir)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "{} failed ({}); scripts/install-deps.sh installs what it needs:\n{}{}",
        script.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // A guest directory of our own: the guest's kernel, and as its
    // initramfs the guest's followed by the extra archive.
    let boot_dir = tmp.path().join("guest");
    std::fs::create_dir(&boot_dir).unwrap();
    std::os::unix::fs::symlink(guest_dir.join("vmlinuz"), boot_dir.join("vmlinuz")).unwrap();
    let mut initrd = std::fs::read(guest_dir.join("initramfs.cpio.gz")).expect("the guest's initramfs");
    initrd.extend(std::fs::read(&extra).expect("the extra archive"));
    std::fs::write(boot_dir.join("initramfs.cpio.gz"), initrd).unwrap();

    // The volume group's disk.
    let disk = tmp.path().join("vg0.raw");
    std::fs::File::create(&disk).unwrap().set_len(512 << 20).unwrap();

    let args = BootArgs::new("script")
        .memory_mib(1024)
        .timeout(TIMEOUT)
        .drive(&format!("file={},format=raw,if=virtio", disk.display()));
    let out = boot_in(&boot_dir, &args);
    eprintln!("the LVM guest ran {:.1} s", out.elapsed.as_secs_f64());

    let failed: Vec<&str> = out.console.lines().map(str::trim).filter(|l| l.starts_with("KEEL-LVM FAIL")).collect();
    assert!(failed.is_empty(), "the guest reported {failed:?}:\n{out}");
    for step in STEPS {
        assert!(
            out.console.lines().any(|l| l.trim().starts_with(step)),
            "the guest never printed {step:?} (timed out: {}):\n{out}",
            out.timed_out
        );
    }
    assert!(!out.timed_out && out.status.is_some_and(|s| s.success()), "QEMU did not power off cleanly:\n{out}");
    // The data read back after the restart is what was written.
    let written = md5_of(&out.console, "KEEL-LVM WROTE 132 MiB ");
    assert!(written.is_some(), "no md5 on the WROTE 132 MiB line:\n{out}");
    assert_eq!(written, md5_of(&out.console, "KEEL-LVM RESTARTED "), "{out}");
}
