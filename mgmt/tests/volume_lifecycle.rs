//! A volume's life through the CLI, with qemu writing and reading it over
//! the NBD URL the API hands out; snapshots, clones, in-use refusal,
//! restart persistence.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::*;
use serde_json::{Value, json};

fn cli_json(d: &Daemon, args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.push("--json");
    let out = d.cli(&a);
    assert!(out.status.success(), "keel {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn volume_written_over_nbd_survives_snapshot_clone_and_restart() {
    let dir = data_dir();
    let mut d = Daemon::start(dir.path());
    assert!(d.output().contains(&format!("HTTP API on http://127.0.0.1:{}", d.api)));
    assert!(d.output().contains("credentials"));
    let mode = std::fs::metadata(dir.path().join("credentials")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(mode.permissions().mode() & 0o777, 0o600);

    let v = cli_json(&d, &["volume", "create", "disk1", "--size", "64M"]);
    assert_eq!(v["name"], "disk1");
    assert_eq!(v["size_bytes"], 64 << 20);
    let show = cli_json(&d, &["volume", "show", "disk1"]);
    let nbd_url = show["nbd_url"].as_str().unwrap().to_string();
    // The export name carries the volume's access key, and so does the iSCSI
    // URL, as the CHAP secret of user disk1.
    let key = nbd_url.strip_prefix(&format!("nbd://127.0.0.1:{}/disk1:", d.nbd)).expect("nbd_url").to_string();
    assert!(key.len() == 16 && key.bytes().all(|b| b.is_ascii_alphanumeric()), "{nbd_url}");
    assert_eq!(show["iscsi_url"], format!("iscsi://disk1%{key}@127.0.0.1:{}/iqn.2026-11.io.keel:disk1/0", d.iscsi));
    assert_eq!(show["allocated_bytes"], 0);

    // qemu writes through the URL the API gave, and reads it back.
    let out = qemu_io(&nbd_url, "write -P 0xab 0 1M");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_reads(&nbd_url, 0xab, "0", "1M");
    let info = run_ok(Command::new("qemu-img").args(["info", "--output=json", &nbd_url]));
    let info: Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["virtual-size"], 64 << 20);
    let show = cli_json(&d, &["volume", "show", "disk1"]);
    assert!(show["allocated_bytes"].as_u64().unwrap() >= 1 << 20);

    // Snapshot, overwrite the volume, clone the snapshot: the clone has the old data.
    cli_json(&d, &["snapshot", "create", "disk1", "before"]);
    assert!(qemu_io(&nbd_url, "write -P 0xcd 0 1M").status.success());
    let c = cli_json(&d, &["volume", "clone", "disk1@before", "disk1-copy"]);
    assert_eq!(c["origin"], "disk1@before");
    let clone_url = c["nbd_url"].as_str().unwrap();
    assert_reads(clone_url, 0xab, "0", "1M");
    assert!(qemu_io(clone_url, "write -P 0x11 0 4k").status.success(), "clones are writable");
    let snaps = cli_json(&d, &["snapshot", "list", "disk1"]);
    assert_eq!(snaps[0]["name"], "before");
    let snap_url = snaps[0]["nbd_url"].as_str().unwrap();
    assert_reads(snap_url, 0xab, "0", "1M");

    // Grow.
    let r = cli_json(&d, &["volume", "resize", "disk1", "--size", "128M"]);
    assert_eq!(r["size_bytes"], 128 << 20);

    // Human table lists both volumes.
    let out = d.cli(&["volume", "list"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.starts_with("NAME") && table.contains("disk1-copy") && table.contains("128.0 MiB"), "{table}");

    // In use: an open NBD connection refuses delete with 409.
    let mut holder = Command::new("qemu-io")
        .args(["-f", "raw", &nbd_url])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the daemon counts the session (qemu-io connects at start).
    let mut seen = false;
    for _ in 0..600 {
        let (_, v) = d.call("GET", "/api/v1/volumes/disk1", None);
        if v["nbd_sessions"].as_u64() == Some(1) {
            seen = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(seen, "the NBD session was never counted");
    let metrics = ureq::get(&format!("{}/metrics", d.url()))
        .set("Authorization", &format!("Bearer {}", d.token))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    assert!(metrics.contains("keel_nbd_export_sessions{export=\"disk1\"} 1"), "{metrics}");
    assert!(metrics.contains("keel_volume_size_bytes{volume=\"disk1\"} 134217728"));
    let written = metrics
        .lines()
        .find_map(|l| l.strip_prefix("keel_nbd_written_bytes_total{export=\"disk1\"} "))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(written >= 2 << 20, "two 1 MiB writes were counted: {metrics}");
    // The clone and the snapshot read the same blocks as disk1's read of
    // 0xab, and found them in the data cache (on by default; the write put
    // them there).
    let metric = |name: &str| {
        metrics.lines().find_map(|l| l.strip_prefix(&format!("{name} "))).and_then(|v| v.parse::<u64>().ok())
    };
    assert!(metric("keel_data_cache_bytes") > Some(0), "{metrics}");
    assert!(metric("keel_data_cache_hits_total") >= Some(2 * 256), "{metrics}");
    assert_eq!(metric("keel_data_cache_stale_total"), Some(0), "{metrics}");
    let msg = assert_error(d.call("DELETE", "/api/v1/volumes/disk1?recursive=true", None), 409);
    assert!(msg.contains("in use"), "{msg}");
    let out = d.cli(&["volume", "delete", "disk1", "--recursive"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("HTTP 409"));
    holder.stdin.take().unwrap().write_all(b"quit\n").unwrap();
    holder.wait().unwrap();

    // The CLI finds its token in DATA/credentials when KEEL_TOKEN is unset,
    // and says what to do when it has none.
    let out = Command::new(KEEL)
        .args(["volume", "list"])
        .env("KEEL_API", d.url())
        .env_remove("KEEL_TOKEN")
        .env("KEEL_DATA", dir.path())
        .output()
        .unwrap();
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("disk1-copy"), "{out:?}");
    let out = Command::new(KEEL)
        .args(["volume", "list"])
        .env("KEEL_API", d.url())
        .env_remove("KEEL_TOKEN")
        .env("KEEL_DATA", "/nonexistent")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("HTTP 401") && err.contains("KEEL_TOKEN"), "{err}");

    // Restart: everything is still there, data included.
    d.restart();
    let list = cli_json(&d, &["volume", "list"]);
    let names: Vec<&str> = list.as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["disk1", "disk1-copy"]);
    assert_reads(&nbd_url, 0xcd, "0", "1M");
    let show = cli_json(&d, &["volume", "show", "disk1"]);
    assert_eq!(show["size_bytes"], 128 << 20);
    assert_eq!(show["snapshots"], json!(["before"]));

    // Delete needs --recursive while snapshots exist; then it goes.
    assert_error(d.call("DELETE", "/api/v1/volumes/disk1", None), 409);
    let out = d.cli(&["snapshot", "delete", "disk1", "before"]);
    assert!(out.status.success());
    let out = d.cli(&["volume", "delete", "disk1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_error(d.call("GET", "/api/v1/volumes/disk1", None), 404);
    // The clone lives on with its data.
    assert_reads(clone_url, 0x11, "0", "4k");

    // The event log recorded what was done.
    let (st, ev) = d.call("GET", "/api/v1/events?limit=1000", None);
    assert_eq!(st, 200);
    let actions: Vec<&str> = ev.as_array().unwrap().iter().map(|e| e["action"].as_str().unwrap()).collect();
    for a in ["volume.create", "snapshot.create", "volume.clone", "volume.resize", "snapshot.delete", "volume.delete"] {
        assert!(actions.contains(&a), "{a} missing from {actions:?}");
    }
    d.stop();
    assert_eq!(store_volumes(dir.path()), ["disk1-copy"]);
}

#[test]
fn iso_store_streams_uploads_keeps_them_read_only_and_once() {
    let dir = data_dir();
    let d = Daemon::start(dir.path());
    let src = dir.path().join("Debian-Netinst.iso");
    let data: Vec<u8> = (0..(3 << 20) + 123).map(|i: u32| (i % 251) as u8).collect();
    std::fs::write(&src, &data).unwrap();
    let out = d.cli(&["iso", "upload", src.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("uploaded ISO debian-netinst"));
    let stored = dir.path().join("isos/debian-netinst.iso");
    assert_eq!(std::fs::read(&stored).unwrap(), data);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&stored).unwrap().permissions().mode() & 0o777, 0o444);
    // No temporary file is left.
    let n = std::fs::read_dir(dir.path().join("isos")).unwrap().count();
    assert_eq!(n, 1);

    let out = d.cli(&["iso", "upload", src.to_str().unwrap(), "--name", "debian-netinst"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("already exists"));
    // The API itself answers 409 (a small body, read before the answer).
    let r = ureq::put(&format!("{}/api/v1/isos/debian-netinst", d.url()))
        .set("Authorization", &format!("Bearer {}", d.token))
        .send_bytes(b"again");
    assert!(matches!(r, Err(ureq::Error::Status(409, _))), "{r:?}");

    let out = d.cli(&["iso", "list", "--json"]);
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list[0]["name"], "debian-netinst");
    assert_eq!(list[0]["size_bytes"], data.len());

    // The upload was a job with its progress.
    let (_, jobs) = d.call("GET", "/api/v1/jobs", None);
    let j = &jobs[0];
    assert_eq!((j["kind"].as_str(), j["state"].as_str()), (Some("iso.upload"), Some("done")));
    assert_eq!(j["done_bytes"], data.len());
    assert_eq!(j["progress_percent"], 100.0);
    let (st, _) = d.call("GET", &format!("/api/v1/jobs/{}", j["id"]), None);
    assert_eq!(st, 200);

    let out = d.cli(&["iso", "delete", "debian-netinst"]);
    assert!(out.status.success());
    assert!(!stored.exists());
    assert_error(d.call("DELETE", "/api/v1/isos/debian-netinst", None), 404);
}

#[test]
fn config_file_sets_addresses_and_flags_win() {
    let dir = data_dir();
    let (api, nbd, iscsi) = (free_port(), free_port(), free_port());
    let cfg = dir.path().join("keel.toml");
    std::fs::write(
        &cfg,
        format!(
            "data = \"{}\"\napi = \"127.0.0.1:{api}\"\nnbd = \"127.0.0.1:{nbd}\"\niscsi = \"127.0.0.1:{iscsi}\"\npool_size = \"1G\"\n",
            dir.path().join("d").display()
        ),
    )
    .unwrap();
    let log = dir.path().join("log");
    let flag_iscsi = free_port();
    let mut child = Command::new(KEEL)
        .args(["serve", "--config"])
        .arg(&cfg)
        .args(["--iscsi", &format!("127.0.0.1:{flag_iscsi}")])
        .env_remove("KEEL_DATA")
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut up = false;
    for _ in 0..2400 {
        if std::fs::read_to_string(&log).unwrap().contains("keel is up") {
            up = true;
            break;
        }
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = std::fs::read_to_string(&log).unwrap();
    let token = if up { read_token(&dir.path().join("d")) } else { String::new() };
    let _ = child.kill();
    let _ = child.wait();
    assert!(up, "{out}");
    assert!(out.contains(&format!("http://127.0.0.1:{api}/api/v1")), "{out}");
    assert!(out.contains(&format!("nbd://127.0.0.1:{nbd}/")), "{out}");
    assert!(out.contains(&format!("iSCSI on iscsi://127.0.0.1:{flag_iscsi}/")), "the flag wins over the file: {out}");
    assert!(out.contains("1.0 GiB"), "{out}");
    assert!(token.starts_with("keel_"));

    // A config file with an unknown key is refused with its name.
    std::fs::write(&cfg, "colour = \"blue\"\n").unwrap();
    let out = Command::new(KEEL).args(["serve", "--config"]).arg(&cfg).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("colour"));
}

#[test]
fn iscsi_export_settings_jobs_and_events_through_the_cli() {
    let dir = data_dir();
    let d = Daemon::start(dir.path());
    assert!(d.cli(&["volume", "create", "lun", "--size", "8M"]).status.success());
    let out = d.cli_as(
        &d.token,
        &[
            "export",
            "set",
            "lun",
            "--initiator",
            "iqn.1993-08.org.debian:01:host1",
            "--initiator",
            "iqn.1993-08.org.debian:01:host2",
            "--chap-user",
            "host",
            "--chap-secret-stdin",
            "--json",
        ],
        Some("secret-12345\n"),
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["chap_user"], "host");
    assert_eq!(v["initiators"].as_array().unwrap().len(), 2);
    assert!(!String::from_utf8_lossy(&out.stdout).contains("secret-12345"), "the secret is never sent back");
    let out = d.cli(&["export", "show", "lun"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("iqn.2026-11.io.keel:lun") && text.contains("host2"), "{text}");
    // A too-short secret is refused by the API.
    let out = d.cli_as(&d.token, &["export", "set", "lun", "--chap-user", "h", "--chap-secret-stdin"], Some("short\n"));
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("HTTP 400"));
    // The event log and job list print as tables.
    let out = d.cli(&["event", "list"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("ID") && text.contains("export.set") && text.contains("volume.create"), "{text}");
    let out = d.cli(&["job", "list"]);
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).starts_with("ID"));
}
