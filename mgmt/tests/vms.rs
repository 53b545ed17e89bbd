//! VMs end to end, with the real daemon, the real CLI, QEMU under TCG and
//! Keel's tiny test guest (`keel.action=vm`: it writes a marker to its
//! disk, or reports the one it finds, then reports its disks, CD and NICs
//! whenever they change, and powers off on the ACPI power button).

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

/// The guest's console so far.
fn console(d: &Daemon, token: &str, vm: &str) -> String {
    let (st, v) = d.call_as(token, "GET", &format!("/api/v1/vms/{vm}/console"), None);
    assert_eq!(st, 200, "{v}");
    v["text"].as_str().unwrap().replace('\r', "")
}

/// The console text after the last boot (Keel writes a separator line at
/// every start).
fn this_boot(text: &str) -> &str {
    text.rsplit_once("--- keel: ").map_or(text, |(_, b)| b)
}

/// Wait until the current boot's console has a line satisfying `pred`;
/// returns that line.
#[track_caller]
fn wait_line(d: &Daemon, vm: &str, limit: Duration, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + limit;
    loop {
        let text = console(d, &d.token, vm);
        if let Some(l) = this_boot(&text).lines().rev().find(|l| pred(l.trim())) {
            return l.trim().to_string();
        }
        assert!(Instant::now() < deadline, "VM {vm}: the awaited line never came; console:\n{text}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The last line of the current boot starting with `prefix`, waiting until
/// it equals `want`.
#[track_caller]
fn wait_last(d: &Daemon, vm: &str, prefix: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = console(d, &d.token, vm);
        let last = this_boot(&text).lines().rev().map(str::trim).find(|l| l.starts_with(prefix)).map(str::to_string);
        if last.as_deref() == Some(want) {
            return;
        }
        assert!(Instant::now() < deadline, "VM {vm}: expected {want:?}, last is {last:?}; console:\n{text}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn state(d: &Daemon, vm: &str) -> Value {
    let (st, v) = d.call("GET", &format!("/api/v1/vms/{vm}"), None);
    assert_eq!(st, 200, "{v}");
    v
}

#[track_caller]
fn wait_state(d: &Daemon, vm: &str, want: &str, limit: Duration) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let v = state(d, vm);
        if v["state"] == want {
            return v;
        }
        assert!(Instant::now() < deadline, "VM {vm} never became {want}: {v}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Create a VM booting the test guest's kernel with `keel.action=vm`.
fn guest_vm(d: &Daemon, name: &str, disks: &[&str], extra: Value) -> Value {
    let g = keel_tests::guest::ensure_guest();
    let mut body = json!({
        "name": name,
        "memory": "256M",
        "disks": disks,
        "kernel": {
            "kernel": g.join("vmlinuz"),
            "initrd": g.join("initramfs.cpio.gz"),
            "append": "console=ttyS0 panic=-1 quiet keel.action=vm",
        },
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    let (st, v) = d.call("POST", "/api/v1/vms", Some(body));
    assert_eq!(st, 201, "{v}");
    v
}

const BOOT: Duration = Duration::from_secs(90);

#[test]
fn a_vm_boots_from_a_volume_is_cloned_running_changes_cd_hotplugs_and_stops() {
    let dir = data_dir();
    let d = Daemon::start(dir.path());
    // A 10 GiB thin disk: the clone must not care about its size.
    cli_ok(&d, &["volume", "create", "boot", "--size", "10G"]);
    cli_ok(&d, &["volume", "create", "extra", "--size", "16M"]);
    for label in ["KEELCD-A", "KEELCD-B"] {
        let f = common::iso_with_label(dir.path(), label);
        let name = label.to_lowercase();
        cli_ok(&d, &["iso", "upload", f.to_str().unwrap(), "--name", &name]);
    }
    let g = keel_tests::guest::ensure_guest();
    let (k, i) = (g.join("vmlinuz"), g.join("initramfs.cpio.gz"));
    let out = cli_ok(
        &d,
        &[
            "vm",
            "create",
            "src",
            "--memory",
            "256M",
            "--disk",
            "boot",
            "--iso",
            "keelcd-a",
            "--kernel",
            k.to_str().unwrap(),
            "--initrd",
            i.to_str().unwrap(),
            "--append",
            "console=ttyS0 panic=-1 quiet keel.action=vm",
            "--start",
        ],
    );
    assert!(out.contains("VM src created: running"), "{out}");
    let src = state(&d, "src");
    let src_pid = src["pid"].as_i64().unwrap();

    // The guest writes its marker to the Keel volume and reports its CD.
    let wrote = wait_line(&d, "src", BOOT, |l| l.starts_with("KEEL-GUEST WROTE "));
    let marker = wrote.strip_prefix("KEEL-GUEST WROTE ").unwrap().to_string();
    wait_line(&d, "src", BOOT, |l| l == "KEEL-GUEST-READY");
    wait_last(&d, "src", "KEEL-GUEST CD ", "KEEL-GUEST CD KEELCD-A");
    let src_mac = wait_line(&d, "src", BOOT, |l| l.starts_with("KEEL-GUEST MAC "));

    // Clone it while it runs.
    wait_line(&d, "src", BOOT, |l| l == "KEEL-GUEST AGENT up");
    let out = cli_ok(&d, &["vm", "clone", "src", "dst"]);
    assert!(out.contains("cloned src to VM dst (running)"), "{out}");
    // The guest agent froze the guest's file systems around the snapshot.
    assert!(out.contains("(fs-frozen)"), "{out}");
    let events = keel_tests::guest::fsfreeze_events(&console(&d, &d.token, "src"));
    assert_eq!(events, ["freeze", "thaw"], "the agent's freeze hook ran once each way");
    let dst = state(&d, "dst");
    assert_eq!(dst["disks"][0]["volume"], "dst-disk0");
    assert_ne!(dst["nics"][0]["mac"], src["nics"][0]["mac"], "the clone has its own MAC");
    // The clone boots from its own disk and finds the source's marker.
    let saw = wait_line(&d, "dst", BOOT, |l| l.starts_with("KEEL-GUEST SAW "));
    assert_eq!(saw.strip_prefix("KEEL-GUEST SAW ").unwrap(), marker);
    let dst_mac = wait_line(&d, "dst", BOOT, |l| l.starts_with("KEEL-GUEST MAC "));
    assert_ne!(src_mac, dst_mac);
    // The source never stopped: same QEMU, still running, still answering.
    let now = state(&d, "src");
    assert_eq!(now["state"], "running");
    assert_eq!(now["pid"].as_i64().unwrap(), src_pid);

    // Change the source's CD, then eject it.
    cli_ok(&d, &["vm", "cd", "src", "keelcd-b"]);
    wait_last(&d, "src", "KEEL-GUEST CD ", "KEEL-GUEST CD KEELCD-B");
    assert_error(d.call("DELETE", "/api/v1/isos/keelcd-b", None), 409);
    cli_ok(&d, &["vm", "cd", "src", "--eject"]);
    wait_last(&d, "src", "KEEL-GUEST CD ", "KEEL-GUEST CD none");
    assert_eq!(state(&d, "src")["cdrom"], Value::Null);

    // Hot-plug a disk and unplug it.
    cli_ok(&d, &["vm", "disk", "attach", "src", "extra"]);
    wait_last(&d, "src", "KEEL-GUEST DISKS ", "KEEL-GUEST DISKS vda vdb");
    assert_error(d.call("DELETE", "/api/v1/volumes/extra", None), 409);
    cli_ok(&d, &["vm", "disk", "detach", "src", "extra"]);
    wait_last(&d, "src", "KEEL-GUEST DISKS ", "KEEL-GUEST DISKS vda");
    // And a NIC.
    cli_ok(&d, &["vm", "nic", "add", "src"]);
    wait_last(&d, "src", "KEEL-GUEST NICS ", "KEEL-GUEST NICS eth0 eth1");
    assert_eq!(state(&d, "src")["nics"].as_array().unwrap().len(), 2);
    cli_ok(&d, &["vm", "nic", "remove", "src", "nic1"]);
    wait_last(&d, "src", "KEEL-GUEST NICS ", "KEEL-GUEST NICS eth0");

    // A graceful stop goes through the guest (ACPI power button).
    let out = cli_ok(&d, &["vm", "stop", "src"]);
    assert!(out.contains("stopped"), "{out}");
    assert_eq!(state(&d, "src")["state"], "stopped");
    assert!(console(&d, &d.token, "src").contains("KEEL-GUEST ACPI-POWEROFF"));
    cli_ok(&d, &["vm", "stop", "dst", "--force"]);

    // Running time was metered for both.
    let usage: Value = serde_json::from_str(&cli_ok(&d, &["usage", "--json"])).unwrap();
    for vm in ["src", "dst"] {
        let secs: u64 =
            usage.as_array().unwrap().iter().filter(|r| r["vm"] == vm).map(|r| r["seconds"].as_u64().unwrap()).sum();
        assert!(secs >= 1, "{vm} ran but usage says {usage}");
    }

    // Delete: one keeps its disk, the other takes it along.
    cli_ok(&d, &["vm", "delete", "src", "--keep-disks"]);
    let out = d.cli_as(&d.token.clone(), &["vm", "delete", "dst"], Some("y\n"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (_, vols) = d.call("GET", "/api/v1/volumes", None);
    let mut names: Vec<&str> = vols.as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["boot", "extra"]);
    assert_eq!(kill_vms(dir.path()), 0, "no QEMU is left running");
}

#[test]
fn a_blank_vm_boots_from_an_iso_in_the_store_and_installs_to_its_disk() {
    let dir = data_dir();
    let d = Daemon::start(dir.path());
    let iso = keel_tests::guest::iso_path();
    cli_ok(&d, &["iso", "upload", iso.to_str().unwrap(), "--name", "installer"]);
    let out = cli_ok(
        &d,
        &[
            "vm",
            "create",
            "fresh",
            "--memory",
            "256M",
            "--blank-disk",
            "1G",
            "--iso",
            "installer",
            "--boot",
            "cdrom,disk",
            "--start",
        ],
    );
    assert!(out.contains("running"), "{out}");
    // Firmware, then isolinux from the CD, then the guest, which finds a
    // blank disk and writes to it.
    wait_line(&d, "fresh", BOOT, |l| l.starts_with("KEEL-GUEST WROTE "));
    wait_line(&d, "fresh", BOOT, |l| l == "KEEL-GUEST-READY");
    wait_last(&d, "fresh", "KEEL-GUEST CD ", "KEEL-GUEST CD KEEL-GUEST");
    let log = console(&d, &d.token, "fresh");
    assert!(log.contains("ISOLINUX"), "booted through the CD's boot loader:\n{log}");
    let v = d.call("GET", "/api/v1/volumes/fresh-disk0", None).1;
    assert!(v["allocated_bytes"].as_u64().unwrap() > 0, "the guest wrote to its blank disk: {v}");
    // The ISO is in use; any number of VMs may share it.
    assert_error(d.call("DELETE", "/api/v1/isos/installer", None), 409);
    cli_ok(&d, &["vm", "stop", "fresh"]);
    cli_ok(&d, &["vm", "delete", "fresh", "--disks"]);
    cli_ok(&d, &["iso", "delete", "installer"]);
    assert_eq!(kill_vms(dir.path()), 0);
}

/// Removes a tap device when dropped.
struct Tap(String);

impl Drop for Tap {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip").args(["tuntap", "del", "dev", &self.0, "mode", "tap"]).status();
    }
}

#[test]
fn a_vm_nic_joins_a_tap_device() {
    // SAFETY: geteuid has no side effects.
    let root = unsafe { libc::geteuid() } == 0;
    assert!(root, "this test creates a tap device: run the suite as root, as scripts/test.sh on the appliance does");
    let tap = Tap(format!("keeltap{}", std::process::id() % 100_000));
    run_ok(std::process::Command::new("ip").args(["tuntap", "add", "dev", &tap.0, "mode", "tap"]));
    run_ok(std::process::Command::new("ip").args(["link", "set", &tap.0, "up"]));
    let dir = data_dir();
    let d = Daemon::start(dir.path());
    assert_eq!(d.call("POST", "/api/v1/volumes", Some(json!({"name": "t", "size": "16M"}))).0, 201);
    guest_vm(&d, "tapped", &["t"], json!({"start": true, "nics": [{"tap": tap.0}]}));
    wait_last(&d, "tapped", "KEEL-GUEST NICS ", "KEEL-GUEST NICS eth0");
    // QEMU holds the tap: the host side has a carrier.
    let carrier = std::fs::read_to_string(format!("/sys/class/net/{}/carrier", tap.0)).unwrap_or_default();
    assert_eq!(carrier.trim(), "1", "QEMU attached to {}", tap.0);
    let v = state(&d, "tapped");
    assert_eq!(v["nics"][0]["network"]["tap"], tap.0.as_str(), "{v}");
    cli_ok(&d, &["vm", "stop", "tapped", "--force"]);
    // A bridge QEMU may not join: QEMU's own message, the VM stays stopped.
    guest_vm(&d, "nowhere", &[], json!({"nics": [{"bridge": "keelnobr0"}]}));
    let (st, v) = d.call("POST", "/api/v1/vms/nowhere/start", None);
    assert_eq!(st, 409, "the VM's configuration, not a fault of the appliance: {v}");
    assert!(v["error"].as_str().unwrap().contains("bridge"), "{v}");
    assert_eq!(state(&d, "nowhere")["state"], "stopped");
    assert_eq!(kill_vms(dir.path()), 0);
}

#[test]
fn the_daemon_restarts_under_running_vms_and_reports_dead_qemus() {
    let dir = data_dir();
    let mut d = Daemon::start(dir.path());
    for v in ["da", "db"] {
        assert_eq!(d.call("POST", "/api/v1/volumes", Some(json!({"name": v, "size": "64M"}))).0, 201);
    }
    guest_vm(&d, "a", &["da"], json!({"start": true, "nics": []}));
    guest_vm(&d, "b", &["db"], json!({"start": true, "nics": []}));
    wait_line(&d, "a", BOOT, |l| l == "KEEL-GUEST-READY");
    let (pa, pb) = (state(&d, "a")["pid"].as_i64().unwrap(), state(&d, "b")["pid"].as_i64().unwrap());

    // A clean restart: both are found again.
    d.restart();
    assert!(d.output().contains("VM a: QEMU (pid"), "{}", d.output());
    for (vm, pid) in [("a", pa), ("b", pb)] {
        let v = state(&d, vm);
        assert_eq!(v["state"], "running", "{v}");
        assert_eq!(v["pid"].as_i64().unwrap(), pid);
    }
    // The adopted VM is still driven through QMP.
    cli_ok(&d, &["vm", "reset", "a"]);
    wait_line(&d, "a", BOOT, |l| l.starts_with("KEEL-GUEST SAW "));

    // QEMU killed under a running VM: crashed, with a reason.
    // SAFETY: kill(2) on the pid of the test's own VM.
    unsafe { libc::kill(pb as i32, libc::SIGKILL) };
    let v = wait_state(&d, "b", "crashed", Duration::from_secs(20));
    assert!(v["error"].as_str().unwrap().contains("unexpectedly"), "{v}");
    assert_eq!(v["pid"], Value::Null);

    // The daemon killed, a QEMU dying while it is down: reported at start.
    d.kill9();
    // SAFETY: as above.
    unsafe { libc::kill(pa as i32, libc::SIGKILL) };
    std::thread::sleep(Duration::from_millis(300));
    let mut d = Daemon::start_with(dir.path(), &[], (d.api, d.nbd, d.iscsi));
    assert!(d.output().contains("VM a: QEMU exited while keel was not running"), "{}", d.output());
    let v = state(&d, "a");
    assert_eq!(v["state"], "crashed", "{v}");

    // A crashed VM starts again.
    cli_ok(&d, &["vm", "start", "b"]);
    wait_line(&d, "b", BOOT, |l| l == "KEEL-GUEST-READY");
    let out = cli_ok(&d, &["vm", "list"]);
    assert!(out.lines().any(|l| l.starts_with("b ") && l.contains("running")), "{out}");
    cli_ok(&d, &["vm", "stop", "b", "--force"]);
    assert_eq!(kill_vms(dir.path()), 0);
    d.stop();
}

#[test]
fn a_regular_user_powers_only_its_own_vm() {
    let dir = data_dir();
    let d = Daemon::start(dir.path());
    let power = json!({"name": "p", "role": "power", "password": "password-p",
        "quota": {"storage": "1G", "cpus": 2, "memory": "512M"}});
    assert_eq!(d.call("POST", "/api/v1/users", Some(power)).0, 201);
    let p = d.login("p", "password-p");
    for r in ["r1", "r2"] {
        let u = json!({"name": r, "role": "regular", "password": format!("password-{r}")});
        assert_eq!(d.call_as(&p, "POST", "/api/v1/users", Some(u)).0, 201);
    }
    let r1 = d.login("r1", "password-r1");
    // The manager gives each regular user a VM (direct kernel boot is a
    // manager's right).
    guest_vm(&d, "v1", &[], json!({"owner": "r1", "nics": [], "cpus": 1}));
    guest_vm(&d, "v2", &[], json!({"owner": "r2", "nics": [], "cpus": 1}));
    // A regular user owns exactly one VM.
    let e = assert_error(
        d.call("POST", "/api/v1/vms", Some(json!({"name": "v3", "blank_disk": "1M", "owner": "r1", "memory": "64M"}))),
        409,
    );
    assert!(e.contains("exactly one VM"), "{e}");
    // The tenant's CPU quota (2) is used up by v1 and v2.
    let e = assert_error(
        d.call_as(&p, "POST", "/api/v1/vms", Some(json!({"name": "v4", "blank_disk": "1M", "memory": "64M"}))),
        507,
    );
    assert!(e.contains("CPU quota"), "{e}");

    // r1 sees only v1 ...
    let (_, list) = d.call_as(&r1, "GET", "/api/v1/vms", None);
    let names: Vec<&str> = list.as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["v1"]);
    // ... powers it on and off, sees its console ...
    let (st, v) = d.call_as(&r1, "POST", "/api/v1/vms/v1/start", None);
    assert_eq!(st, 200, "{v}");
    let deadline = Instant::now() + BOOT;
    while !console(&d, &r1, "v1").contains("KEEL-GUEST ACTION vm") {
        assert!(Instant::now() < deadline, "{}", console(&d, &r1, "v1"));
        std::thread::sleep(Duration::from_millis(200));
    }
    let (st, v) = d.call_as(&r1, "POST", "/api/v1/vms/v1/stop?force=true", None);
    assert_eq!((st, v["state"].as_str()), (200, Some("stopped")), "{v}");
    // ... and nothing else.
    for (m, path, body) in [
        ("GET", "/api/v1/vms/v2", None),
        ("POST", "/api/v1/vms/v2/start", None),
        ("POST", "/api/v1/vms/v2/stop", None),
        ("GET", "/api/v1/vms/v2/console", None),
        ("PUT", "/api/v1/vms/v2/cdrom", Some(json!({"iso": null}))),
    ] {
        assert_error(d.call_as(&r1, m, path, body), 404);
    }
    for (m, path, body) in [
        ("POST", "/api/v1/vms", Some(json!({"name": "mine", "blank_disk": "1M"}))),
        ("DELETE", "/api/v1/vms/v1?disks=keep", None),
        ("POST", "/api/v1/vms/v1/clones", Some(json!({"name": "v1b"}))),
        ("POST", "/api/v1/vms/v1/disks", Some(json!({"volume": "x"}))),
        ("POST", "/api/v1/vms/v1/nics", Some(json!({}))),
    ] {
        assert_error(d.call_as(&r1, m, path, body), 403);
    }
    // Usage: r1 sees its own rows only; the power user sees its tenant's.
    let (_, rows) = d.call_as(&r1, "GET", "/api/v1/usage", None);
    assert!(rows.as_array().unwrap().iter().all(|r| r["user"] == "r1"), "{rows}");
    assert!(!rows.as_array().unwrap().is_empty(), "v1 ran: {rows}");
    assert_error(d.call_as(&r1, "GET", "/api/v1/usage?user=r2", None), 404);
    let (st, _) = d.call_as(&p, "GET", "/api/v1/usage?user=r1", None);
    assert_eq!(st, 200);
    // A user who owns a VM cannot be deleted from under it.
    let e = assert_error(d.call_as(&p, "DELETE", "/api/v1/users/r1", None), 409);
    assert!(e.contains("v1"), "{e}");
    assert_eq!(kill_vms(dir.path()), 0);
}

#[test]
fn bad_vm_requests_get_clear_errors_and_leave_nothing_behind() {
    let dir = data_dir();
    let d = Daemon::start_with(
        dir.path(),
        &[("KEEL_QEMU", "/nonexistent/qemu-system-x86_64")],
        (free_port(), free_port(), free_port()),
    );
    assert_eq!(d.call("POST", "/api/v1/volumes", Some(json!({"name": "disk", "size": "16M"}))).0, 201);
    // More memory than the host has.
    let e = assert_error(
        d.call("POST", "/api/v1/vms", Some(json!({"name": "big", "disks": ["disk"], "memory": "64T"}))),
        400,
    );
    assert!(e.contains("this host has"), "{e}");
    // A missing ISO.
    let e =
        assert_error(d.call("POST", "/api/v1/vms", Some(json!({"name": "cd", "disks": ["disk"], "iso": "nope"}))), 404);
    assert!(e.contains("ISO nope"), "{e}");
    // A volume another VM already has.
    assert_eq!(d.call("POST", "/api/v1/vms", Some(json!({"name": "one", "disks": ["disk"]}))).0, 201);
    let e = assert_error(d.call("POST", "/api/v1/vms", Some(json!({"name": "two", "disks": ["disk"]}))), 409);
    assert!(e.contains("already attached") && e.contains("one"), "{e}");
    // A blank disk is not left behind by a refused VM.
    let e = assert_error(d.call("POST", "/api/v1/vms", Some(json!({"name": "one", "blank_disk": "1M"}))), 409);
    assert!(e.contains("already exists"), "{e}");
    // QEMU not installed: a clear message, the VM stays stopped.
    let out = d.cli(&["vm", "start", "one"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not installed"), "{err}");
    assert_eq!(state(&d, "one")["state"], "stopped");
    // Deleting a VM without saying what happens to its disks is refused.
    let out = d.cli_as(&d.token.clone(), &["vm", "delete", "one"], None);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--keep-disks"));
    assert_eq!(state(&d, "one")["state"], "stopped");
    // Only what was asked for exists.
    let (_, vms) = d.call("GET", "/api/v1/vms", None);
    assert_eq!(vms.as_array().unwrap().len(), 1, "{vms}");
    let (_, vols) = d.call("GET", "/api/v1/volumes", None);
    assert_eq!(vols.as_array().unwrap().len(), 1, "{vols}");
}
