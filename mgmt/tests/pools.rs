//! Storage groups: pools on files and on block devices (loop devices here),
//! as a user makes and uses them through the CLI and the API: volumes in
//! them written over NBD and read over iSCSI, a restart, growing a pool
//! online under its volumes, the refusals (a device or file holding a file
//! system, a path that is a pool already, a pool that holds volumes, a
//! power user), and a device missing at start.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use serde_json::{Value, json};

fn cli_json(d: &Daemon, args: &[&str]) -> Value {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    serde_json::from_str(&cli_ok(d, &a)).unwrap_or_else(|e| panic!("keel {args:?}: {e}"))
}

fn pool(d: &Daemon, name: &str) -> Value {
    let (st, v) = d.call("GET", &format!("/api/v1/pools/{name}"), None);
    assert_eq!(st, 200, "{v}");
    v
}

/// Write `pattern` over NBD at `off`, read it back over iSCSI.
#[track_caller]
fn write_nbd_read_iscsi(v: &Value, pattern: u8, off: &str, len: &str) {
    let nbd = v["nbd_url"].as_str().unwrap();
    let out = qemu_io(nbd, &format!("write -P {pattern:#x} {off} {len}"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_reads(v["iscsi_url"].as_str().unwrap(), pattern, off, len);
    assert_reads(nbd, pattern, off, len);
}

#[test]
fn file_pools_hold_volumes_across_a_restart_and_refuse_what_is_not_theirs() {
    let dir = data_dir();
    let mut d = Daemon::start(dir.path());
    let file = dir.path().join("fast.img");
    let fs = file.to_str().unwrap();

    let p = cli_json(&d, &["pool", "create", "fast", "--file", fs, "--size", "256M", "--tier", "fast"]);
    assert_eq!(
        (p["kind"].as_str(), p["tier"].as_str(), p["state"].as_str()),
        (Some("file"), Some("fast"), Some("online"))
    );
    let total = p["total_bytes"].as_u64().unwrap();
    assert!(total > 200 << 20 && total < 256 << 20, "{p}");
    assert_eq!(p["path"].as_str(), Some(fs), "a manager sees where the pool is");
    let listed = cli_json(&d, &["pool", "list"]);
    let names: Vec<&str> = listed.as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["default", "fast"]);
    assert!(listed[0].get("path").is_none(), "the default pool's file is in the data directory: {listed}");

    // A volume in it, written over NBD, read over iSCSI; the space is the
    // pool's, not the default's.
    let v = cli_json(&d, &["volume", "create", "v1", "--size", "64M", "--pool", "fast"]);
    assert_eq!(v["pool"], "fast");
    let default_before = pool(&d, "default")["allocated_bytes"].as_u64().unwrap();
    write_nbd_read_iscsi(&v, 0xab, "0", "8M");
    cli_ok(&d, &["volume", "show", "v1"]);
    assert!(pool(&d, "fast")["allocated_bytes"].as_u64().unwrap() >= 8 << 20);
    assert_eq!(pool(&d, "default")["allocated_bytes"].as_u64().unwrap(), default_before);
    let table = cli_ok(&d, &["volume", "list"]);
    assert!(table.lines().any(|l| l.starts_with("v1") && l.contains("fast")), "{table}");

    // Refusals, each with its reason.
    let ext4 = dir.path().join("ext4.img");
    run_ok(Command::new("truncate").args(["-s", "64M"]).arg(&ext4));
    run_ok(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(&ext4));
    let e = assert_error(d.call("POST", "/api/v1/pools", Some(json!({"name": "e", "file": ext4}))), 409);
    assert!(e.contains("ext2/3/4 file system") && e.contains("force"), "{e}");
    let e = assert_error(d.call("POST", "/api/v1/pools", Some(json!({"name": "again", "file": fs}))), 409);
    assert!(e.contains("already pool fast"), "{e}");
    let other = dir.path().join("other.img");
    let e =
        assert_error(d.call("POST", "/api/v1/pools", Some(json!({"name": "fast", "file": other, "size": "32M"}))), 409);
    assert!(e.contains("already exists"), "{e}");
    assert!(!other.exists(), "a refused pool leaves no file behind");
    let e = assert_error(d.call("POST", "/api/v1/pools", Some(json!({"name": "x", "file": other}))), 400);
    assert!(e.contains("size"), "{e}");
    let e = assert_error(
        d.call("POST", "/api/v1/pools", Some(json!({"name": "x", "file": "rel.img", "size": "32M"}))),
        400,
    );
    assert!(e.contains("absolute"), "{e}");
    let e = assert_error(
        d.call("POST", "/api/v1/pools", Some(json!({"name": "x", "file": other, "device": "/dev/null"}))),
        400,
    );
    assert!(e.contains("exactly one"), "{e}");
    let e = assert_error(d.call("POST", "/api/v1/pools/fast/grow", Some(json!({"size": "128M"}))), 409);
    assert!(e.contains("shrinking"), "{e}");
    let e = assert_error(d.call("DELETE", "/api/v1/pools/fast", None), 409);
    assert!(e.contains("v1"), "{e}");
    assert_error(d.call("DELETE", "/api/v1/pools/default", None), 409);
    assert_error(d.call("POST", "/api/v1/volumes", Some(json!({"name": "v2", "size": "1M", "pool": "nope"}))), 404);
    // A name is one namespace across pools.
    let e = assert_error(d.call("POST", "/api/v1/volumes", Some(json!({"name": "v1", "size": "1M"}))), 409);
    assert!(e.contains("v1"), "{e}");
    // A power user sees the pools (to choose one), without host paths, and
    // makes none.
    let (st, _) = d.call(
        "POST",
        "/api/v1/users",
        Some(json!({"name": "pu", "role": "power", "password": "password-pu", "quota": {"storage": "1G"}})),
    );
    assert_eq!(st, 201);
    let pu = d.login("pu", "password-pu");
    let (st, seen) = d.call_as(&pu, "GET", "/api/v1/pools", None);
    assert_eq!(st, 200);
    assert!(seen.as_array().unwrap().iter().all(|p| p.get("path").is_none()), "{seen}");
    let e = assert_error(
        d.call_as(&pu, "POST", "/api/v1/pools", Some(json!({"name": "mine", "file": other, "size": "32M"}))),
        403,
    );
    assert!(e.contains("manager"), "{e}");
    let (st, pv) =
        d.call_as(&pu, "POST", "/api/v1/volumes", Some(json!({"name": "puv", "size": "16M", "pool": "fast"})));
    assert_eq!(st, 201, "a power user picks the pool of its volumes: {pv}");
    assert_eq!(pv["pool"], "fast");

    // A restart opens the pool again, with its data.
    d.restart();
    assert!(d.output().contains("opened pool fast on"), "{}", d.output());
    let v = cli_json(&d, &["volume", "show", "v1"]);
    assert_eq!((v["pool"].as_str(), v["state"].as_str()), (Some("fast"), Some("online")));
    assert_reads(v["nbd_url"].as_str().unwrap(), 0xab, "0", "8M");

    // Removing it: refused while it holds volumes, then the file goes.
    cli_ok(&d, &["volume", "delete", "v1"]);
    cli_ok(&d, &["volume", "delete", "puv"]);
    cli_ok(&d, &["pool", "remove", "fast"]);
    assert!(!file.exists(), "the file Keel made goes with the pool");
    assert_error(d.call("GET", "/api/v1/pools/fast", None), 404);
    d.restart();
    assert!(!d.output().contains("pool fast"), "{}", d.output());
}

/// A loop device over a file: detached on drop.
struct Loop {
    dev: PathBuf,
    file: PathBuf,
}

impl Loop {
    fn new(file: &Path, size: &str) -> Loop {
        run_ok(Command::new("truncate").args(["-s", size]).arg(file));
        let dev = run_ok(Command::new("losetup").args(["--find", "--show"]).arg(file));
        Loop { dev: PathBuf::from(dev.trim()), file: file.to_path_buf() }
    }

    fn detach(&self) {
        run_ok(Command::new("losetup").arg("-d").arg(&self.dev));
    }

    fn attach_again(&self) {
        run_ok(Command::new("losetup").arg(&self.dev).arg(&self.file));
    }

    fn path(&self) -> &str {
        self.dev.to_str().unwrap()
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).output();
    }
}

#[test]
fn device_pools_on_loop_devices_grow_online_and_go_offline_when_pulled() {
    let dir = data_dir();
    let mut d = Daemon::start(dir.path());
    let disk = Loop::new(&dir.path().join("disk.img"), "256M");
    let used = Loop::new(&dir.path().join("used.img"), "64M");
    run_ok(Command::new("mkfs.ext4").args(["-q", "-F", used.path()]));

    // A device holding a file system is refused, unless forced.
    let e = assert_error(d.call("POST", "/api/v1/pools", Some(json!({"name": "used", "device": used.path()}))), 409);
    assert!(e.contains("ext2/3/4 file system"), "{e}");
    let e = assert_error(
        d.call("POST", "/api/v1/pools", Some(json!({"name": "f", "device": dir.path().join("disk.img")}))),
        409,
    );
    assert!(e.contains("not a block device"), "{e}");

    let p = cli_json(&d, &["pool", "create", "disk", "--device", disk.path()]);
    assert_eq!((p["kind"].as_str(), p["path"].as_str()), (Some("device"), Some(disk.path())));
    let before = p["total_bytes"].as_u64().unwrap();
    // The daemon holds the device exclusively: mkfs cannot take it.
    let mkfs = Command::new("mkfs.ext4").args(["-q", "-F", disk.path()]).output().unwrap();
    assert!(!mkfs.status.success(), "mkfs.ext4 took a device a pool holds");

    let v = cli_json(&d, &["volume", "create", "d1", "--size", "128M", "--pool", "disk"]);
    write_nbd_read_iscsi(&v, 0x5a, "1M", "16M");
    let keep = cli_json(&d, &["volume", "create", "keep", "--size", "16M"]);
    write_nbd_read_iscsi(&keep, 0x77, "0", "1M");

    // The device grows underneath (the loop file, then the loop device's
    // size); the pool takes it online, with the volume's data in place.
    run_ok(Command::new("truncate").args(["-s", "512M"]).arg(&disk.file));
    run_ok(Command::new("losetup").args(["-c", disk.path()]));
    let e = assert_error(d.call("POST", "/api/v1/pools/disk/grow", Some(json!({"size": "1G"}))), 400);
    assert!(e.contains("grows with its device"), "{e}");
    let g = cli_json(&d, &["pool", "grow", "disk"]);
    let after = g["total_bytes"].as_u64().unwrap();
    assert!(after > before + (200 << 20), "grown from {before} to {after}");
    assert_reads(v["nbd_url"].as_str().unwrap(), 0x5a, "1M", "16M");
    // The new space is usable: more than the old size fits now.
    let big = cli_json(&d, &["volume", "create", "big", "--size", "400M", "--pool", "disk"]);
    let out = qemu_io(big["nbd_url"].as_str().unwrap(), "write -P 0x31 0 300M");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_reads(big["nbd_url"].as_str().unwrap(), 0x31, "0", "300M");

    // Grown underneath again, with no call: the daemon notices (it looks
    // every few seconds) and grows the pool by itself.
    run_ok(Command::new("truncate").args(["-s", "768M"]).arg(&disk.file));
    run_ok(Command::new("losetup").args(["-c", disk.path()]));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let after = loop {
        let t = pool(&d, "disk")["total_bytes"].as_u64().unwrap();
        if t > after + (200 << 20) {
            break t;
        }
        assert!(std::time::Instant::now() < deadline, "the pool did not grow with its device: {t}");
        std::thread::sleep(std::time::Duration::from_millis(250));
    };
    let (_, ev) = d.call("GET", "/api/v1/events", None);
    assert!(ev.to_string().contains("underneath"), "{ev}");

    // Restart: the pool comes back at its grown size with its data.
    d.restart();
    assert_eq!(pool(&d, "disk")["total_bytes"].as_u64().unwrap(), after);
    assert_reads(v["nbd_url"].as_str().unwrap(), 0x5a, "1M", "16M");

    // The disk is pulled while the daemon is down: the node starts, the
    // pool is offline with the reason, its volumes unavailable (not gone),
    // everything else works.
    d.stop();
    disk.detach();
    d.restart();
    let p = pool(&d, "disk");
    assert_eq!(p["state"], "offline", "{p}");
    assert!(p["reason"].as_str().unwrap().contains("missing"), "{p}");
    let v1 = cli_json(&d, &["volume", "show", "d1"]);
    assert_eq!(v1["state"], "unavailable", "{v1}");
    assert!(v1["reason"].as_str().unwrap().contains("offline"), "{v1}");
    let listed = cli_json(&d, &["volume", "list"]);
    assert!(listed.as_array().unwrap().iter().any(|x| x["name"] == "d1" && x["state"] == "unavailable"), "{listed}");
    let e = assert_error(d.call("PATCH", "/api/v1/volumes/d1", Some(json!({"size": "256M"}))), 503);
    assert!(e.contains("offline"), "{e}");
    assert_error(d.call("POST", "/api/v1/volumes", Some(json!({"name": "n", "size": "1M", "pool": "disk"}))), 503);
    assert_reads(keep["nbd_url"].as_str().unwrap(), 0x77, "0", "1M");
    cli_ok(&d, &["volume", "create", "fresh", "--size", "1M"]);
    let e = assert_error(d.call("DELETE", "/api/v1/pools/disk", None), 409);
    assert!(e.contains("offline") && e.contains("d1"), "{e}");

    // The disk is back: the next start has the pool and its data again.
    d.stop();
    disk.attach_again();
    d.restart();
    assert_eq!(pool(&d, "disk")["state"], "online");
    assert_reads(v["nbd_url"].as_str().unwrap(), 0x5a, "1M", "16M");
    assert_reads(big["nbd_url"].as_str().unwrap(), 0x31, "0", "300M");
    d.stop();
}
