//! `kill -9` at any moment leaves metadata and the block store consistent
//! after a restart: at the worst moments inside an operation (crash points:
//! the process aborts between the intent, the store change and the
//! metadata commit), and at random moments under load.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::*;
use serde_json::json;

/// Volume names the API lists.
fn api_volumes(d: &Daemon) -> Vec<String> {
    let (st, v) = d.call("GET", "/api/v1/volumes", None);
    assert_eq!(st, 200, "{v}");
    let mut n: Vec<String> = v.as_array().unwrap().iter().map(|x| x["name"].as_str().unwrap().to_string()).collect();
    n.sort();
    n
}

/// Restarted daemon's metadata equals the store, and every volume serves
/// over NBD.
fn assert_consistent(d: &mut Daemon) -> Vec<String> {
    let api = api_volumes(d);
    let (_, pool) = d.call("GET", "/api/v1/pools/default", None);
    assert_eq!(pool["volumes"].as_u64().unwrap() as usize, api.len(), "store and metadata disagree: {pool} vs {api:?}");
    for name in &api {
        let (_, v) = d.call("GET", &format!("/api/v1/volumes/{name}"), None);
        let url = v["nbd_url"].as_str().unwrap();
        let out = std::process::Command::new("qemu-img").args(["info", url]).output().unwrap();
        assert!(out.status.success(), "{name}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let data = d.data.clone();
    let ports = (d.api, d.nbd, d.iscsi);
    d.stop();
    assert_eq!(store_volumes(&data), api, "the store's volumes differ from the API's");
    *d = Daemon::start_with(&data, &[], ports);
    api
}

fn crash_at(point: &str, op: impl FnOnce(&Daemon), expect_present: bool, expect_said: &str) {
    let dir = data_dir();
    let mut d = Daemon::start(dir.path());
    assert_eq!(d.call("POST", "/api/v1/volumes", Some(json!({"name": "keep", "size": "16M"}))).0, 201);
    assert_eq!(d.call("POST", "/api/v1/volumes", Some(json!({"name": "victim", "size": "16M"}))).0, 201);
    let ports = (d.api, d.nbd, d.iscsi);
    d.stop();
    let mut d = Daemon::start_with(dir.path(), &[("KEEL_CRASH_POINT", point)], ports);
    op(&d);
    let st = d.wait_exit();
    assert!(!st.success(), "the daemon should have aborted at {point}");
    let mut d = Daemon::start_with(dir.path(), &[], ports);
    let out = d.output();
    assert!(out.contains(expect_said), "{point}: restart did not say {expect_said:?}:\n{out}");
    let vols = assert_consistent(&mut d);
    let target = if point.starts_with("create") { "new" } else { "victim" };
    assert_eq!(vols.contains(&target.to_string()), expect_present, "{point}: {vols:?}");
    assert!(vols.contains(&"keep".to_string()));
    if expect_present && target == "new" {
        let (_, v) = d.call("GET", "/api/v1/volumes/new", None);
        assert_eq!(v["owner"], "admin", "the intended owner is kept");
    }
}

fn create_new(d: &Daemon) {
    let _ = ureq::post(&format!("{}/api/v1/volumes", d.url()))
        .set("Authorization", &format!("Bearer {}", d.token))
        .send_json(json!({"name": "new", "size": "16M"}));
}

fn delete_victim(d: &Daemon) {
    let _ = ureq::delete(&format!("{}/api/v1/volumes/victim", d.url()))
        .set("Authorization", &format!("Bearer {}", d.token))
        .call();
}

#[test]
fn crash_after_create_intent_rolls_back() {
    crash_at("create:after-intent", create_new, false, "rolled back creating volume new");
}

#[test]
fn crash_after_create_in_store_adopts_with_owner() {
    crash_at("create:after-store", create_new, true, "finished creating volume new (owner admin)");
}

#[test]
fn crash_after_delete_intent_finishes_the_delete() {
    crash_at("delete:after-intent", delete_victim, false, "finished deleting volume victim");
}

#[test]
fn crash_after_delete_in_store_drops_the_record() {
    crash_at("delete:after-store", delete_victim, false, "finished deleting volume victim");
}

#[test]
fn kill9_under_load_then_restart_is_consistent() {
    let dir = data_dir();
    let mut d = Daemon::start(dir.path());
    let base = d.url();
    let token = d.token.clone();
    for round in 0..3 {
        let stop = Arc::new(AtomicBool::new(false));
        let workers: Vec<_> = (0..2)
            .map(|w| {
                let (base, token, stop) = (base.clone(), token.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut done = 0u32;
                    let mut i = 0u32;
                    while !stop.load(Ordering::Relaxed) {
                        let name = format!("r{round}w{w}v{}", i % 6);
                        i += 1;
                        let path = format!("/api/v1/volumes/{name}");
                        // Errors are expected once the daemon is killed.
                        let r = std::panic::catch_unwind(|| {
                            let (st, _) = call(
                                &base,
                                &token,
                                "POST",
                                "/api/v1/volumes",
                                Some(json!({"name": name, "size": "8M"})),
                            );
                            if st == 201 {
                                call(&base, &token, "POST", &format!("{path}/snapshots"), Some(json!({"name": "s"})));
                                if !i.is_multiple_of(3) {
                                    call(&base, &token, "DELETE", &format!("{path}?recursive=true"), None);
                                }
                            }
                        });
                        if r.is_err() {
                            break;
                        }
                        done += 1;
                    }
                    done
                })
            })
            .collect();
        // Let some operations complete, then kill -9 in the middle of the next ones.
        let mut seen = BTreeSet::new();
        while seen.len() < 3 + round {
            let (_, ev) = call(&base, &token, "GET", "/api/v1/events?limit=10000", None);
            for e in ev.as_array().unwrap() {
                if e["action"] == "volume.create" && e["target"].as_str().unwrap().starts_with(&format!("r{round}")) {
                    seen.insert(e["target"].as_str().unwrap().to_string());
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        d.kill9();
        stop.store(true, Ordering::Relaxed);
        let done: u32 = workers.into_iter().map(|w| w.join().unwrap()).sum();
        assert!(done > 0);
        d = Daemon::start_with(dir.path(), &[], (d.api, d.nbd, d.iscsi));
        assert!(d.output().contains("reconciled:"), "{}", d.output());
        assert_consistent(&mut d);
        // Usable after recovery: names freed by rollbacks can be reused.
        let (st, v) = d.call("POST", "/api/v1/volumes", Some(json!({"name": format!("after{round}"), "size": "8M"})));
        assert_eq!(st, 201, "{v}");
    }
}

#[test]
fn iso_store_leftovers_are_cleaned_on_start() {
    let dir = data_dir();
    let mut d = Daemon::start(dir.path());
    let put = |name: &str| {
        ureq::put(&format!("{}/api/v1/isos/{name}", d.url()))
            .set("Authorization", &format!("Bearer {}", d.token))
            .send_bytes(b"iso bytes")
            .unwrap()
            .status()
    };
    assert_eq!(put("kept"), 201);
    assert_eq!(put("lost"), 201);
    let ports = (d.api, d.nbd, d.iscsi);
    d.kill9();
    // What a crash can leave: a half upload, a stored file never recorded,
    // a record whose file a delete had removed.
    let isos = dir.path().join("isos");
    std::fs::write(isos.join(".half.upload-0123456789abcdef"), b"par").unwrap();
    std::fs::write(isos.join("unrecorded.iso"), b"whole").unwrap();
    std::fs::remove_file(isos.join("lost.iso")).unwrap();
    let d = Daemon::start_with(dir.path(), &[], ports);
    let out = d.output();
    assert!(out.contains("removed .half.upload-0123456789abcdef"), "{out}");
    assert!(out.contains("removed unrecorded.iso"), "{out}");
    assert!(out.contains("dropped the record of ISO lost"), "{out}");
    let (_, list) = d.call("GET", "/api/v1/isos", None);
    let names: Vec<&str> = list.as_array().unwrap().iter().map(|i| i["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["kept"]);
    let mut files: Vec<String> =
        std::fs::read_dir(&isos).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    files.sort();
    assert_eq!(files, ["kept.iso"]);
}

#[test]
fn jobs_outlive_the_daemon_and_one_cut_short_shows_failed() {
    let dir = data_dir();
    let mut d = Daemon::start(dir.path());
    let up = ureq::put(&format!("{}/api/v1/isos/first", d.url()))
        .set("Authorization", &format!("Bearer {}", d.token))
        .send_bytes(b"iso bytes")
        .unwrap();
    assert_eq!(up.status(), 201);
    // An upload that stops halfway: the job runs until the daemon dies.
    let s = start_stalled_upload(&d, "second");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let (_, jobs) = d.call("GET", "/api/v1/jobs", None);
        if jobs.as_array().unwrap().iter().any(|j| j["target"] == "second" && j["state"] == "running") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the upload never showed as a running job: {jobs}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let ports = (d.api, d.nbd, d.iscsi);
    d.kill9();
    drop(s);
    let d = Daemon::start_with(dir.path(), &[], ports);
    assert!(d.output().contains("job 2 (iso.upload second) was cut short"), "{}", d.output());
    let (_, jobs) = d.call("GET", "/api/v1/jobs", None);
    let jobs = jobs.as_array().unwrap().clone();
    assert_eq!(jobs.len(), 2, "{jobs:?}");
    assert_eq!((jobs[0]["id"].as_u64(), jobs[0]["state"].as_str()), (Some(1), Some("done")), "{jobs:?}");
    assert_eq!((jobs[1]["id"].as_u64(), jobs[1]["state"].as_str()), (Some(2), Some("failed")), "{jobs:?}");
    assert!(jobs[1]["error"].as_str().unwrap().contains("interrupted"), "{jobs:?}");
    // Ids go on after the recorded ones.
    let up = ureq::put(&format!("{}/api/v1/isos/third", d.url()))
        .set("Authorization", &format!("Bearer {}", d.token))
        .send_bytes(b"iso bytes")
        .unwrap();
    let v: serde_json::Value = up.into_json().unwrap();
    assert_eq!(v["job"], 3, "{v}");
}

/// Writes that no client flushed survive a `kill -9` once the commit
/// interval (5 s by default; 0.5 s here, from the config file) has passed.
/// With background commits off (`commit_interval = 0`), the same writes
/// are lost, as the durability contract allows for unflushed writes: that
/// case shows the test can tell the two apart.
#[test]
fn unflushed_writes_survive_kill9_after_the_commit_interval() {
    let scratch = data_dir();
    let src = scratch.path().join("pattern.bin");
    std::fs::write(&src, vec![0x5cu8; 1 << 20]).unwrap();
    let config = |name: &str, secs: &str| {
        let p = scratch.path().join(name);
        std::fs::write(&p, format!("commit_interval = {secs}\n")).unwrap();
        p
    };
    let (fast, off) = (config("fast.toml", "0.5"), config("off.toml", "0"));
    for (config, kept) in [(&fast, true), (&off, false)] {
        let dir = data_dir();
        let env = [("KEEL_CONFIG", config.to_str().unwrap())];
        let mut d = Daemon::start_with(dir.path(), &env, (free_port(), free_port(), free_port()));
        let said = if kept { "unflushed writes committed every 0.500 s" } else { "background commits off" };
        assert!(d.output().contains(said), "{}", d.output());
        assert_eq!(d.call("POST", "/api/v1/volumes", Some(json!({"name": "v", "size": "16M"}))).0, 201);
        let url = d.nbd_url("v");
        // nbdcopy sends no flush unless asked to (--flush).
        let out = std::process::Command::new("nbdcopy").arg(&src).arg(&url).output().unwrap();
        assert!(out.status.success(), "nbdcopy: {}", String::from_utf8_lossy(&out.stderr));
        std::thread::sleep(std::time::Duration::from_secs(2));
        d.kill9();
        // Restarted without the config file: the default interval.
        let d = Daemon::start_with(dir.path(), &[], (d.api, d.nbd, d.iscsi));
        assert!(d.output().contains("unflushed writes committed every 5.000 s"), "{}", d.output());
        assert_reads(&url, if kept { 0x5c } else { 0 }, "0", "1M");
    }
}
