//! vmm-glue against the real QEMU: a VM launched from a `VmConfig`, driven
//! over QMP, found by its pid file, stopped through the guest; and the
//! accelerator probe.

use std::time::{Duration, Instant};

use keel_vmm_glue::accel::{self, Accel};
use keel_vmm_glue::{DirectBoot, DiskSource, Qmp, VmConfig, VmDisk, process};
use serde_json::{Value, json};

fn qemu() -> std::path::PathBuf {
    process::find_qemu(keel_vmm_glue::DEFAULT_QEMU).expect("scripts/install-deps.sh installs QEMU")
}

async fn wait_console(cfg: &VmConfig, line: &str, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    loop {
        let text = std::fs::read_to_string(cfg.console_log()).unwrap_or_default();
        if text.lines().any(|l| l.trim() == line) {
            return text;
        }
        assert!(Instant::now() < deadline, "no {line:?} on the console:\n{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_launched_vm_answers_qmp_and_powers_off_through_acpi() {
    let guest = keel_tests::guest::ensure_guest();
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.raw");
    std::fs::File::create(&disk).unwrap().set_len(64 << 20).unwrap();
    let cfg = VmConfig {
        name: "glue".into(),
        cpus: 1,
        memory_mib: 256,
        accel: Accel::Tcg,
        disks: vec![VmDisk { id: "disk0".into(), source: DiskSource::File(disk), read_only: false }],
        cdrom: None,
        nics: vec![],
        boot: vec![],
        direct: Some(DirectBoot {
            kernel: guest.join("vmlinuz"),
            initrd: Some(guest.join("initramfs.cpio.gz")),
            append: "console=ttyS0 panic=-1 quiet keel.action=vm".into(),
        }),
        run_dir: dir.path().join("run"),
    };
    let pid = process::launch(&qemu(), &cfg).await.unwrap();
    assert_eq!(process::read_pid(&cfg.pid_file()), Some(pid));
    assert!(process::is_ours(pid, &cfg.qmp_socket()));
    let qmp = Qmp::connect(&cfg.qmp_socket(), Duration::from_secs(10)).await.unwrap();
    let st = qmp.execute("query-status", Value::Null).await.unwrap();
    assert_eq!(st["status"], "running", "{st}");
    // The disk is the blockdev given, under its node name.
    let nodes = qmp.execute("query-named-block-nodes", json!({"flat": true})).await.unwrap();
    assert!(nodes.as_array().unwrap().iter().any(|n| n["node-name"] == "drive-disk0"), "{nodes}");
    wait_console(&cfg, "KEEL-GUEST-READY", Duration::from_secs(90)).await;

    // The ACPI power button: the guest shuts down, QEMU exits, QMP closes.
    let mut events = qmp.events();
    qmp.execute("system_powerdown", Value::Null).await.unwrap();
    tokio::time::timeout(Duration::from_secs(30), qmp.closed()).await.expect("QEMU exits after the guest powers off");
    let e = keel_vmm_glue::qmp::wait_event(&mut events, "SHUTDOWN", Duration::from_secs(1), |_| true).await;
    assert_eq!(e.expect("a SHUTDOWN event").data["guest"], true);
    assert!(process::wait_gone(pid, &cfg.qmp_socket(), Duration::from_secs(10)).await);
    assert!(!process::kill_if_ours(pid, &cfg.qmp_socket()), "nothing left to kill");
}

#[tokio::test]
async fn a_bad_configuration_is_qemus_message() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = VmConfig {
        name: "bad".into(),
        cpus: 1,
        memory_mib: 64,
        accel: Accel::Tcg,
        disks: vec![VmDisk {
            id: "disk0".into(),
            source: DiskSource::Nbd { host: "127.0.0.1".into(), port: 1, export: "nothing".into() },
            read_only: false,
        }],
        cdrom: None,
        nics: vec![],
        boot: vec![],
        direct: None,
        run_dir: dir.path().join("run"),
    };
    let e = process::launch(&qemu(), &cfg).await.unwrap_err().to_string();
    assert!(e.contains("Failed to connect") || e.contains("Connection refused"), "{e}");
    assert!(process::read_pid(&cfg.pid_file()).is_none(), "no VM process is left");
    let e = process::launch(std::path::Path::new("/nonexistent/qemu"), &cfg).await.unwrap_err();
    assert!(e.to_string().contains("not installed"), "{e}");
}

/// `auto` must pick an accelerator that really boots a kernel here (on
/// this machine /dev/kvm exists but hangs guests: the probe must notice).
#[test]
fn auto_picks_an_accelerator_that_boots_a_kernel() {
    let q = qemu();
    let choice = accel::resolve(&q, Accel::Auto);
    assert_ne!(choice.accel, Accel::Auto);
    let took = accel::probe(&q, choice.accel, Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("auto chose {} ({}), which does not boot: {e}", choice.accel, choice.reason));
    eprintln!("auto: {} ({}); the probe kernel booted in {:.1} s", choice.accel, choice.reason, took.as_secs_f64());
}
