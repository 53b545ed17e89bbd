//! `keel volume move`: a volume and its snapshots copied to another pool,
//! sharing kept there, the source's space returned; and the same under a
//! running VM's writes, whose every durable record reads back afterwards.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

fn cli_json(d: &Daemon, args: &[&str]) -> Value {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    serde_json::from_str(&cli_ok(d, &a)).unwrap_or_else(|e| panic!("keel {args:?}: {e}"))
}

fn allocated(d: &Daemon, pool: &str) -> u64 {
    let (st, v) = d.call("GET", &format!("/api/v1/pools/{pool}"), None);
    assert_eq!(st, 200, "{v}");
    v["allocated_bytes"].as_u64().unwrap()
}

fn snapshot_url(d: &Daemon, vol: &str, snap: &str) -> String {
    let (st, v) = d.call("GET", &format!("/api/v1/volumes/{vol}/snapshots"), None);
    assert_eq!(st, 200, "{v}");
    let s = v.as_array().unwrap().iter().find(|s| s["name"] == snap).unwrap_or_else(|| panic!("no {snap}: {v}"));
    s["nbd_url"].as_str().unwrap().to_string()
}

#[track_caller]
fn io(url: &str, cmd: &str) {
    let out = qemu_io(url, cmd);
    assert!(out.status.success(), "{cmd}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Volume `src` in the default pool with snapshots s1 and s2 and writes
/// after them, as [`check_contents`] reads it; returns its NBD URL.
fn make_src(d: &Daemon) -> String {
    let v = cli_json(d, &["volume", "create", "src", "--size", "64M"]);
    let url = v["nbd_url"].as_str().unwrap().to_string();
    io(&url, "write -P 0x11 0 8M");
    cli_ok(d, &["snapshot", "create", "src", "s1"]);
    io(&url, "write -P 0x22 4M 8M");
    cli_ok(d, &["snapshot", "create", "src", "s2"]);
    io(&url, "write -P 0x33 20M 1M");
    io(&url, "discard 0 1M");
    url
}

/// What each device of volume `src` must read (the snapshots first).
fn check_contents(d: &Daemon, url: &str) {
    let s1 = snapshot_url(d, "src", "s1");
    assert_reads(&s1, 0x11, "0", "8M");
    assert_reads(&s1, 0, "8M", "56M");
    let s2 = snapshot_url(d, "src", "s2");
    assert_reads(&s2, 0x11, "0", "4M");
    assert_reads(&s2, 0x22, "4M", "8M");
    assert_reads(&s2, 0, "12M", "52M");
    assert_reads(url, 0, "0", "1M");
    assert_reads(url, 0x11, "1M", "3M");
    assert_reads(url, 0x22, "4M", "8M");
    assert_reads(url, 0, "12M", "8M");
    assert_reads(url, 0x33, "20M", "1M");
    assert_reads(url, 0, "21M", "43M");
}

#[test]
fn a_volume_moves_with_its_snapshots_keeps_sharing_and_frees_the_source() {
    let dir = data_dir();
    let mut d = Daemon::start(dir.path());
    let file = dir.path().join("fast.img");
    cli_ok(&d, &["pool", "create", "fast", "--file", file.to_str().unwrap(), "--size", "512M"]);
    let empty = allocated(&d, "default");
    let url = make_src(&d);
    // s1 maps 8 MiB, s2 shares half of it and adds 8, the volume shares
    // s2's and adds 1: 17 MiB of data in the pool (34 MiB if unshared).
    let before = allocated(&d, "default");
    assert!(before >= empty + (17 << 20), "{empty} -> {before}");

    // Refusals first.
    let e = assert_error(d.call("POST", "/api/v1/volumes/src/move", Some(json!({"pool": "default"}))), 409);
    assert!(e.contains("already"), "{e}");
    assert_error(d.call("POST", "/api/v1/volumes/src/move", Some(json!({"pool": "nope"}))), 404);
    assert_error(d.call("POST", "/api/v1/volumes/nope/move", Some(json!({"pool": "fast"}))), 404);

    let moved = cli_json(&d, &["volume", "move", "src", "--pool", "fast"]);
    assert_eq!(moved["pool"], "fast", "{moved}");
    assert_eq!(moved["nbd_url"].as_str(), Some(url.as_str()), "the volume keeps its URL");
    let snaps = moved["snapshots"].as_array().unwrap();
    assert_eq!(snaps.len(), 2, "only s1 and s2, no temporary snapshot left: {moved}");
    check_contents(&d, &url);

    // Sharing kept: the target holds what the source held, not the 34 MiB
    // of three unshared copies.
    let fast = allocated(&d, "fast");
    let held = before - empty;
    assert!(fast >= 17 << 20 && fast <= held + (1 << 20), "the target pool holds {fast} bytes, the source {held}");
    // The source's space came back (after the store's commit grace).
    let deadline = Instant::now() + Duration::from_secs(20);
    while allocated(&d, "default") > empty + (1 << 20) {
        assert!(Instant::now() < deadline, "default still holds {} (empty: {empty})", allocated(&d, "default"));
        std::thread::sleep(Duration::from_millis(200));
    }
    let (_, ev) = d.call("GET", "/api/v1/events", None);
    assert!(ev.to_string().contains("volume.move"), "{ev}");
    // A job recorded it, done.
    let (_, jobs) = d.call("GET", "/api/v1/jobs", None);
    let job = jobs.as_array().unwrap().iter().find(|j| j["kind"] == "volume.move").unwrap_or_else(|| panic!("{jobs}"));
    assert_eq!(job["state"], "done", "{job}");

    // It works there as any volume: a snapshot, a write, a restart.
    cli_ok(&d, &["snapshot", "create", "src", "s3"]);
    d.restart();
    let v = cli_json(&d, &["volume", "show", "src"]);
    assert_eq!(v["pool"], "fast");
    check_contents(&d, &url);
    // And back again.
    cli_ok(&d, &["volume", "move", "src", "--pool", "default"]);
    check_contents(&d, &url);
    assert_reads(&snapshot_url(&d, "src", "s3"), 0x33, "20M", "1M");
}

fn console(d: &Daemon, vm: &str) -> String {
    let (st, v) = d.call("GET", &format!("/api/v1/vms/{vm}/console"), None);
    assert_eq!(st, 200, "{v}");
    let t = v["text"].as_str().unwrap().replace('\r', "");
    t.rsplit_once("--- keel: ").map_or(t.clone(), |(_, b)| b.to_string())
}

/// The highest `KEEL-GUEST REC <n>` of the console.
fn records(text: &str) -> u64 {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("KEEL-GUEST REC "))
        .filter_map(|n| n.parse().ok())
        .max()
        .unwrap_or(0)
}

#[track_caller]
fn wait_console(d: &Daemon, vm: &str, limit: Duration, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + limit;
    loop {
        let text = console(d, vm);
        assert!(!text.contains("KEEL-GUEST FAIL"), "the guest failed:\n{text}");
        if pred(&text) {
            return text;
        }
        assert!(Instant::now() < deadline, "VM {vm}: never got there; console:\n{text}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn a_running_vms_disk_moves_under_its_writes_and_loses_no_durable_record() {
    let dir = data_dir();
    let d = Daemon::start(dir.path());
    let file = dir.path().join("fast.img");
    cli_ok(&d, &["pool", "create", "fast", "--file", file.to_str().unwrap(), "--size", "512M", "--tier", "fast"]);
    let empty = allocated(&d, "default");
    let g = keel_tests::guest::ensure_guest();
    let vm = json!({
        "name": "mover",
        "memory": "256M",
        "blank_disk": "64M",
        "kernel": {
            "kernel": g.join("vmlinuz"),
            "initrd": g.join("initramfs.cpio.gz"),
            "append": "console=ttyS0 panic=-1 quiet keel.action=vm keel.writer=12000",
        },
    });
    let (st, v) = d.call("POST", "/api/v1/vms", Some(vm));
    assert_eq!(st, 201, "{v}");
    let disk = "mover-disk0";
    assert_eq!(d.call("POST", "/api/v1/vms/mover/start", None).0, 200);
    wait_console(&d, "mover", Duration::from_secs(120), |t| records(t) >= 50);

    let started = Instant::now();
    let moved = cli_json(&d, &["volume", "move", disk, "--pool", "fast"]);
    let took = started.elapsed();
    assert_eq!(moved["pool"], "fast", "{moved}");
    let at_switch = records(&console(&d, "mover"));
    println!(
        "moved {disk} in {:.2} s with the guest writing; {at_switch} records durable at the end",
        took.as_secs_f64()
    );
    // The guest goes on writing against the new pool, with no I/O error.
    let running = wait_console(&d, "mover", Duration::from_secs(120), |t| records(t) >= at_switch + 100);
    assert!(!running.contains("I/O error"), "the guest saw an I/O error:\n{running}");
    assert_eq!(d.call("POST", "/api/v1/vms/mover/stop", None).0, 200);
    // (At power off the guest's writer may still have writes in its page
    // cache, which `poweroff -f` drops with an I/O error: not counted.)
    let text = console(&d, "mover");
    let durable = records(&text);

    // Every record the guest had made durable is on the disk, in the new
    // pool; so is the marker the guest wrote at boot.
    let raw = dir.path().join("disk.raw");
    let url = moved["nbd_url"].as_str().unwrap();
    run_ok(Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "raw", url]).arg(&raw));
    let bytes = std::fs::read(&raw).unwrap();
    let marker = &bytes[2048 * 512..2049 * 512];
    assert!(marker.starts_with(b"KEEL-GUEST-MARKER "), "marker: {:?}", String::from_utf8_lossy(&marker[..40]));
    for n in 0..durable {
        let at = (4 << 20) + n as usize * 4096;
        let want = format!("KEEL-REC {n}\n");
        assert_eq!(
            &bytes[at..at + want.len()],
            want.as_bytes(),
            "record {n} of {durable} (moved at {at_switch}): {:?}",
            String::from_utf8_lossy(&bytes[at..at + 16])
        );
    }
    // The source pool has its space back.
    let deadline = Instant::now() + Duration::from_secs(20);
    while allocated(&d, "default") > empty + (1 << 20) {
        assert!(Instant::now() < deadline, "default still holds {} (empty: {empty})", allocated(&d, "default"));
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(allocated(&d, "fast") >= durable * 4096);
}

/// A move cut by `kill -9` at `point`: after the restart the volume is in
/// `pool`, whole, in one copy, and the other pool holds nothing of it.
fn killed_move(point: &str, pool: &str, said: &str) {
    let dir = data_dir();
    let mut d = Daemon::start(dir.path());
    let file = dir.path().join("fast.img");
    cli_ok(&d, &["pool", "create", "fast", "--file", file.to_str().unwrap(), "--size", "256M"]);
    let url = make_src(&d);
    let ports = (d.api, d.nbd, d.iscsi);
    d.stop();
    let mut d = Daemon::start_with(dir.path(), &[("KEEL_CRASH_POINT", point)], ports);
    let _ = ureq::post(&format!("{}/api/v1/volumes/src/move", d.url()))
        .set("Authorization", &format!("Bearer {}", d.token))
        .send_json(json!({"pool": "fast"}));
    assert!(!d.wait_exit().success(), "the daemon should have died at {point}");
    let d = Daemon::start_with(dir.path(), &[], ports);
    assert!(d.output().contains(said), "{point}: the restart did not say {said:?}:\n{}", d.output());
    let v = cli_json(&d, &["volume", "show", "src"]);
    assert_eq!(v["pool"], pool, "{v}");
    assert_eq!(v["snapshots"].as_array().unwrap().len(), 2, "{v}");
    check_contents(&d, &url);
    let other = if pool == "fast" { "default" } else { "fast" };
    let (_, p) = d.call("GET", &format!("/api/v1/pools/{other}"), None);
    assert_eq!(p["devices"], 0, "pool {other} still holds a copy: {p}");
}

#[test]
fn a_move_killed_before_the_switch_stays_in_the_source() {
    killed_move("move:copied", "default", "rolled back moving volume src from pool default to fast");
}

#[test]
fn a_move_killed_after_the_switch_ends_in_the_target() {
    killed_move("move:switched", "fast", "finished moving volume src from pool default to fast");
}
