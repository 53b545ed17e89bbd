//! Live backups into the appliance library, end to end: the test guest
//! writes its marker, is backed up while it runs, its disk changes, it is
//! backed up again (incrementally), each backup becomes new VMs whose disks
//! are read back over NBD, an older backup is deleted, a damaged chunk is
//! found and refused, and a backup killed halfway leaves nothing behind.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

const MIB: u64 = 1 << 20;

fn cli_json(d: &Daemon, args: &[&str]) -> Value {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    serde_json::from_str(&cli_ok(d, &a)).unwrap()
}

fn console(d: &Daemon, vm: &str) -> String {
    d.call("GET", &format!("/api/v1/vms/{vm}/console"), None).1["text"].as_str().unwrap_or("").replace('\r', "")
}

#[track_caller]
fn wait_marker(d: &Daemon, vm: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let text = console(d, vm);
        if let Some(m) = text.lines().find_map(|l| l.trim().strip_prefix("KEEL-GUEST WROTE ")) {
            return m.to_string();
        }
        assert!(Instant::now() < deadline, "no marker from {vm}:\n{text}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The marker at sector 2048 of a volume, read over NBD.
fn marker_of(d: &Daemon, volume: &str) -> String {
    let out = tempfile::NamedTempFile::new().unwrap();
    let url = d.nbd_url(volume);
    run_ok(
        Command::new("qemu-img")
            .args(["dd", "-f", "raw", "-O", "raw", "bs=512", "count=2049"])
            .arg(format!("if={url}"))
            .arg(format!("of={}", out.path().display())),
    );
    let bytes = std::fs::read(out.path()).unwrap();
    let sector = &bytes[2048 * 512..2049 * 512];
    String::from_utf8_lossy(sector).trim_end_matches('\0').to_string()
}

fn pattern(d: &Daemon, volume: &str, byte: u8) -> bool {
    let url = d.nbd_url(volume);
    let out = Command::new("qemu-io")
        .args(["-r", "-f", "raw", "-c", &format!("read -P {byte:#x} 64M 1M"), &url])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    out.status.success() && !text.contains("Pattern verification failed")
}

fn guest_vm(d: &Daemon, name: &str, disk: &str) {
    let g = keel_tests::guest::ensure_guest();
    let body = json!({
        "name": name, "memory": "256M", "disks": [disk], "nics": [], "start": true,
        "kernel": {"kernel": g.join("vmlinuz"), "initrd": g.join("initramfs.cpio.gz"),
                   "append": "console=ttyS0 panic=-1 quiet keel.action=vm"},
    });
    let (st, v) = d.call("POST", "/api/v1/vms", Some(body));
    assert_eq!(st, 201, "{v}");
}

#[test]
fn live_backups_restore_every_point_in_time() {
    let dir = data_dir();
    let d = Daemon::start(dir.path());
    cli_ok(&d, &["volume", "create", "boot", "--size", "256M"]);
    guest_vm(&d, "src", "boot");
    let m1 = wait_marker(&d, "src");
    let deadline = Instant::now() + Duration::from_secs(90);
    while !console(&d, "src").contains("KEEL-GUEST AGENT up") {
        assert!(Instant::now() < deadline, "{}", console(&d, "src"));
        std::thread::sleep(Duration::from_millis(200));
    }

    // A full backup of the running VM.
    let j = cli_json(&d, &["vm", "backup", "src", "--appliance", "b1"]);
    assert_eq!(j["state"], "done", "{j}");
    let r1 = &j["result"];
    assert!(r1["new_chunks"].as_u64().unwrap() >= 1, "{j}");
    assert_eq!(r1["consistency"], "fs-frozen", "the guest agent froze the guest: {j}");
    assert_eq!(d.call("GET", "/api/v1/vms/src", None).1["state"], "running", "the VM ran on");

    // Change the disk (over NBD, while the VM runs), back up again: only
    // the changed range is read.
    run_ok(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0xab 64M 1M"]).arg(d.nbd_url("boot")));
    let j = cli_json(&d, &["vm", "backup", "src", "--appliance", "b2"]);
    let r2 = &j["result"];
    assert!(r2["read_bytes"].as_u64().unwrap() <= 2 * MIB, "incremental: {j}");
    assert!(r2["new_chunks"].as_u64().unwrap() >= 1, "{j}");
    // Nothing changed: the next backup reads nothing and stores nothing.
    let j = cli_json(&d, &["vm", "backup", "src", "--appliance", "b2-again"]);
    assert_eq!(j["result"]["read_bytes"], 0, "{j}");
    assert_eq!(j["result"]["new_bytes"], 0, "{j}");

    // Each backup is a point in time: VMs made from them hold it.
    cli_ok(&d, &["vm", "create", "r1", "--from-appliance", "b1"]);
    cli_ok(&d, &["vm", "create", "r2", "--from-appliance", "b2"]);
    assert_eq!(marker_of(&d, "r1-disk0"), m1);
    assert_eq!(marker_of(&d, "r2-disk0"), m1);
    assert!(pattern(&d, "r1-disk0", 0), "b1 predates the change");
    assert!(pattern(&d, "r2-disk0", 0xab), "b2 has it");
    let r1 = d.call("GET", "/api/v1/vms/r1", None).1;
    assert_eq!(r1["memory_bytes"], 256 * MIB, "the appliance's shape: {r1}");
    // A second VM from the same appliance is a clone of its base.
    cli_ok(&d, &["vm", "create", "r1b", "--from-appliance", "b1"]);
    let v = d.call("GET", "/api/v1/volumes/r1b-disk0", None).1;
    assert_eq!(v["origin"], "_a:b1:0@base", "{v}");
    assert!(pattern(&d, "r1b-disk0", 0));
    // A VM made from a backup boots and finds the marker.
    let (st, v) = d.call("POST", "/api/v1/vms/r2/disks", Some(json!({"volume": "boot"})));
    assert_eq!(st, 409, "boot is src's: {v}");

    // Restore over the original VM (stopped).
    cli_ok(&d, &["vm", "stop", "src", "--force"]);
    cli_ok(&d, &["vm", "restore", "src", "--appliance", "b1"]);
    assert!(pattern(&d, "boot", 0), "b1 restored over src");
    assert_eq!(marker_of(&d, "boot"), m1);

    // Copy-back of identical data: almost nothing new.
    let before: u64 = d.call("GET", "/api/v1/appliances/b2", None).1["stored_bytes"].as_u64().unwrap();
    let j = cli_json(&d, &["appliance", "create", "b3", "--from-vm", "r2"]);
    let new = j["result"]["new_bytes"].as_u64().unwrap();
    assert!(new * 100 <= before, "a second full backup of the same data adds {new} bytes over {before}");
    let list = cli_json(&d, &["appliance", "list"]);
    assert_eq!(list.as_array().unwrap().len(), 4, "{list}");

    // Deleting the older backup leaves the newer intact.
    cli_ok(&d, &["appliance", "delete", "b1"]);
    cli_ok(&d, &["appliance", "verify", "b2"]);
    cli_ok(&d, &["vm", "restore", "src", "--appliance", "b2"]);
    assert!(pattern(&d, "boot", 0xab));
    assert_eq!(marker_of(&d, "r1b-disk0"), m1, "VMs made from a deleted appliance keep their disks");

    // A damaged chunk: verify says so, a restore refuses it.
    let b2 = d.call("GET", "/api/v1/appliances/b2", None).1;
    assert!(b2["stored_bytes"].as_u64().unwrap() > 0);
    let chunks = dir.path().join("library/chunks");
    let victim = std::fs::read_dir(&chunks)
        .unwrap()
        .flatten()
        .flat_map(|sub| std::fs::read_dir(sub.path()).unwrap().flatten())
        .map(|e| e.path())
        .next()
        .unwrap();
    let mut bytes = std::fs::read(&victim).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x10;
    std::fs::write(&victim, bytes).unwrap();
    let out = d.cli(&["appliance", "verify", "b2"]);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let bad_b2 = !out.status.success();
    let out3 = d.cli(&["appliance", "verify", "b3"]);
    assert!(bad_b2 || !out3.status.success(), "verify found no damage: {text}");
    let damaged = if bad_b2 { "b2" } else { "b3" };
    let (st, v) = d.call("POST", "/api/v1/vms/src/restore", Some(json!({"appliance": damaged})));
    assert_eq!(st, 500, "{v}");
    assert!(v["error"].as_str().unwrap().contains("damaged"), "{v}");
    assert_eq!(kill_vms(dir.path()), 0);
}

#[test]
fn a_backup_killed_halfway_leaves_no_appliance_and_no_snapshot() {
    let dir = data_dir();
    let mut d = Daemon::start(dir.path());
    cli_ok(&d, &["volume", "create", "big", "--size", "1G"]);
    // Random data, so the backup has work to do.
    let url = d.nbd_url("big");
    run_ok(Command::new("fio").args([
        "--name=fill",
        "--ioengine=nbd",
        &format!("--uri={url}"),
        "--rw=write",
        "--bs=1M",
        "--size=1G",
        "--iodepth=8",
        "--refill_buffers=1",
    ]));
    let (st, v) = d.call("POST", "/api/v1/vms", Some(json!({"name": "vm", "disks": ["big"], "memory": "64M"})));
    assert_eq!(st, 201, "{v}");
    let (st, job) = d.call("POST", "/api/v1/vms/vm/backups", Some(json!({"appliance": "half"})));
    assert_eq!(st, 202, "{job}");
    d.kill9();
    let d = Daemon::start_with(dir.path(), &[], (d.api, d.nbd, d.iscsi));
    assert!(d.output().contains("left by an interrupted clone or backup"), "{}", d.output());
    assert_eq!(d.call("GET", "/api/v1/appliances/half", None).0, 404);
    let (_, snaps) = d.call("GET", "/api/v1/volumes/big/snapshots", None);
    assert_eq!(snaps.as_array().unwrap().len(), 0, "{snaps}");
    // The library holds nothing (chunks of the half backup are collected).
    let stored: u64 = walk_size(&dir.path().join("library/chunks"));
    assert_eq!(stored, 0, "chunks left behind");
    // And a backup now completes.
    let (st, job) = d.call("POST", "/api/v1/vms/vm/backups", Some(json!({"appliance": "whole"})));
    assert_eq!(st, 202, "{job}");
    let id = job["id"].as_u64().unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let j = d.call("GET", &format!("/api/v1/jobs/{id}"), None).1;
        if j["state"] == "done" {
            assert_eq!(j["result"]["logical_bytes"], 1u64 << 30);
            break;
        }
        assert_ne!(j["state"], "failed", "{j}");
        assert!(Instant::now() < deadline, "{j}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn walk_size(p: &std::path::Path) -> u64 {
    std::fs::read_dir(p)
        .map(|rd| {
            rd.flatten()
                .map(
                    |e| {
                        if e.path().is_dir() {
                            walk_size(&e.path())
                        } else {
                            e.metadata().map(|m| m.len()).unwrap_or(0)
                        }
                    },
                )
                .sum()
        })
        .unwrap_or(0)
}

#[test]
fn disk_images_import_and_export_in_qemu_img_formats() {
    let dir = data_dir();
    let d = Daemon::start(dir.path());
    let src = dir.path().join("src.qcow2");
    run_ok(Command::new("qemu-img").args(["create", "-f", "qcow2"]).arg(&src).arg("48M"));
    run_ok(
        Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", "write -P 0x5c 1M 2M", "-c", "write -P 0x17 40M 64k"])
            .arg(&src),
    );
    let out = cli_ok(&d, &["volume", "import", src.to_str().unwrap(), "--name", "imp"]);
    assert!(out.contains("imported") && out.contains("(qcow2)"), "{out}");
    let v = d.call("GET", "/api/v1/volumes/imp", None).1;
    assert_eq!(v["size_bytes"], 48 * MIB);
    let url = v["nbd_url"].as_str().unwrap().to_string();
    assert_reads(&url, 0x5c, "1M", "2M");
    assert_reads(&url, 0x17, "40M", "64k");
    assert_reads(&url, 0, "8M", "8M");
    // Thin: only what the image held was written.
    assert!(v["allocated_bytes"].as_u64().unwrap() < 8 * MIB, "{v}");

    for (fmt, file) in [("qcow2", "out.qcow2"), ("vmdk", "out.vmdk"), ("raw", "out.raw")] {
        let out_path = dir.path().join(file);
        cli_ok(&d, &["volume", "export", "imp", out_path.to_str().unwrap(), "--format", fmt]);
        let info = run_ok(Command::new("qemu-img").args(["info", "--output=json"]).arg(&out_path));
        let info: Value = serde_json::from_str(&info).unwrap();
        assert_eq!(info["format"], fmt, "{info}");
        run_ok(Command::new("qemu-img").args(["compare"]).arg(&src).arg(&out_path));
    }
    // A point in time: the snapshot, not the volume's later writes.
    cli_ok(&d, &["snapshot", "create", "imp", "s"]);
    run_ok(Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x99 1M 4k", &url]));
    let snap = dir.path().join("snap.raw");
    cli_ok(&d, &["volume", "export", "imp@s", snap.to_str().unwrap()]);
    run_ok(Command::new("qemu-img").args(["compare"]).arg(&src).arg(&snap));
    // Not an image: a clear error, no volume left.
    let junk = dir.path().join("junk.img");
    std::fs::write(&junk, b"").unwrap();
    let out = d.cli(&["volume", "import", junk.to_str().unwrap(), "--name", "junk"]);
    assert!(!out.status.success());
    assert_eq!(d.call("GET", "/api/v1/volumes/junk", None).0, 404);
}

#[test]
fn an_appliance_travels_as_an_ova_and_boots_again() {
    let dir = data_dir();
    let d = Daemon::start(dir.path());
    cli_ok(&d, &["volume", "create", "boot", "--size", "64M"]);
    guest_vm(&d, "src", "boot");
    let m = wait_marker(&d, "src");
    cli_json(&d, &["vm", "backup", "src", "--appliance", "gold"]);

    let ova = dir.path().join("gold.ova");
    cli_ok(&d, &["appliance", "export", "gold", ova.to_str().unwrap()]);
    // A standard OVA: a tar with the OVF descriptor first, then the disk.
    let list = run_ok(Command::new("tar").arg("-tf").arg(&ova));
    assert_eq!(list.lines().collect::<Vec<_>>(), ["gold.ovf", "gold-disk0.vmdk"], "{list}");
    let x = dir.path().join("x");
    std::fs::create_dir_all(&x).unwrap();
    run_ok(Command::new("tar").arg("-xf").arg(&ova).arg("-C").arg(&x));
    let info: Value = serde_json::from_str(&run_ok(
        Command::new("qemu-img").args(["info", "--output=json"]).arg(x.join("gold-disk0.vmdk")),
    ))
    .unwrap();
    assert_eq!(info["format"], "vmdk", "{info}");
    assert_eq!(info["virtual-size"], 64 * MIB);
    assert_eq!(info["format-specific"]["data"]["create-type"], "streamOptimized", "{info}");
    let ovf = std::fs::read_to_string(x.join("gold.ovf")).unwrap();
    assert!(ovf.contains("ovf:capacity=\"67108864\"") && ovf.contains("streamOptimized"), "{ovf}");

    // Import it back under another name and boot a VM from it.
    let out = cli_ok(&d, &["appliance", "import", ova.to_str().unwrap(), "--name", "gold2"]);
    assert!(out.contains("imported") && out.contains("1 disk(s)"), "{out}");
    let a = d.call("GET", "/api/v1/appliances/gold2", None).1;
    assert_eq!(a["memory_bytes"], 256 * MIB, "the OVF's memory: {a}");
    let g = keel_tests::guest::ensure_guest();
    let body = json!({
        "name": "again", "from_appliance": "gold2", "nics": [], "start": true,
        "kernel": {"kernel": g.join("vmlinuz"), "initrd": g.join("initramfs.cpio.gz"),
                   "append": "console=ttyS0 panic=-1 quiet keel.action=vm"},
    });
    let (st, v) = d.call("POST", "/api/v1/vms", Some(body));
    assert_eq!(st, 201, "{v}");
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let text = console(&d, "again");
        if let Some(saw) = text.lines().find_map(|l| l.trim().strip_prefix("KEEL-GUEST SAW ")) {
            assert_eq!(saw, m, "the VM from the imported OVA has the original's data");
            break;
        }
        assert!(Instant::now() < deadline, "{text}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // Not an OVA: a clear 400, nothing left.
    let junk = dir.path().join("junk.ova");
    std::fs::write(&junk, vec![7u8; 4096]).unwrap();
    let out = d.cli(&["appliance", "import", junk.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not an OVA"), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(d.call("GET", "/api/v1/appliances/junk", None).0, 404);
    for vm in ["src", "again"] {
        cli_ok(&d, &["vm", "stop", vm, "--force"]);
    }
    assert_eq!(kill_vms(dir.path()), 0);
}
