//! Tenants' volumes on the data plane: NBD and iSCSI clients get in only
//! with the access key that the volume's URLs carry, and only users who may
//! see the volume get those URLs. Real clients throughout: qemu-img,
//! qemu-io, nbdinfo, libiscsi's iscsi-inq and iscsi-ls.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

fn output(cmd: &mut Command) -> (bool, String) {
    let o = cmd.output().unwrap();
    (o.status.success(), format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)))
}

fn qemu_img_info(url: &str) -> (bool, String) {
    output(Command::new("qemu-img").args(["info", "-f", "raw", url]))
}

/// The key in an `nbd_url` (after the last ':').
fn key_of(nbd_url: &str) -> String {
    nbd_url.rsplit_once(':').unwrap().1.to_string()
}

#[test]
fn volumes_open_only_with_their_access_key() {
    let dir = data_dir();
    let mut d = Daemon::start(dir.path());
    let out = d.output();
    assert!(out.contains("access key"), "the banner says how NBD and iSCSI clients get in: {out}");

    // Two tenants, a volume each.
    for (name, pw) in [("alice", "password-a"), ("bob", "password-b")] {
        let u = json!({"name": name, "role": "power", "password": pw, "quota": {"storage": "1G"}});
        assert_eq!(d.call("POST", "/api/v1/users", Some(u)).0, 201);
    }
    let alice = d.login("alice", "password-a");
    let bob = d.login("bob", "password-b");
    let (st, a) = d.call_as(&alice, "POST", "/api/v1/volumes", Some(json!({"name": "a-vol", "size": "64M"})));
    assert_eq!(st, 201, "{a}");
    let (st, b) = d.call_as(&bob, "POST", "/api/v1/volumes", Some(json!({"name": "b-vol", "size": "64M"})));
    assert_eq!(st, 201, "{b}");
    let a_url = a["nbd_url"].as_str().unwrap().to_string();
    let a_iscsi = a["iscsi_url"].as_str().unwrap().to_string();
    let b_url = b["nbd_url"].as_str().unwrap().to_string();
    assert_ne!(key_of(&a_url), key_of(&b_url), "every volume has its own key");

    // Bob cannot learn alice's URL through the API.
    assert_error(d.call_as(&bob, "GET", "/api/v1/volumes/a-vol", None), 404);
    assert_error(d.call_as(&bob, "GET", "/api/v1/volumes/a-vol/export", None), 404);

    // Alice's URL works as it is, for writing and reading.
    assert!(qemu_io(&a_url, "write -P 0x5a 0 1M").status.success());
    assert_reads(&a_url, 0x5a, "0", "1M");

    // The bare name, a made-up key, bob's key, are all refused over NBD, and
    // the refusal says where the key comes from.
    let bare = format!("nbd://127.0.0.1:{}/a-vol", d.nbd);
    let (ok, msg) = qemu_img_info(&bare);
    assert!(!ok && msg.contains("access key"), "the bare name opened: {msg}");
    let (ok, msg) = qemu_img_info(&format!("{bare}:AAAAAAAAAAAAAAAA"));
    assert!(!ok, "a made-up key opened alice's volume: {msg}");
    let (ok, msg) = qemu_img_info(&format!("{bare}:{}", key_of(&b_url)));
    assert!(!ok, "bob's key opened alice's volume: {msg}");
    assert!(!msg.contains(&key_of(&a_url)), "an error showed alice's key: {msg}");
    // Nor can bob enumerate exports.
    let (ok, msg) = output(Command::new("nbdinfo").args(["--list", &format!("nbd://127.0.0.1:{}", d.nbd)]));
    assert!(!ok || !msg.contains("a-vol"), "the export list shows alice's volume: {msg}");
    assert!(!msg.contains(&key_of(&a_url)), "{msg}");

    // Snapshots: read-only under the volume's key, refused without it.
    let (st, snap) = d.call_as(&alice, "POST", "/api/v1/volumes/a-vol/snapshots", Some(json!({"name": "monday"})));
    assert_eq!(st, 201, "{snap}");
    let snap_url = snap["nbd_url"].as_str().unwrap().to_string();
    assert_eq!(snap_url, a_url.replace("/a-vol:", "/a-vol@monday:"));
    assert_reads(&snap_url, 0x5a, "0", "1M");
    let (ok, msg) = qemu_img_info(&format!("nbd://127.0.0.1:{}/a-vol@monday", d.nbd));
    assert!(!ok, "the snapshot opened without a key: {msg}");

    // iSCSI: the URL's CHAP credentials are the way in.
    let (ok, msg) = output(Command::new("iscsi-inq").arg(&a_iscsi));
    assert!(ok && msg.contains("Vendor:KEEL"), "{msg}");
    let plain = format!("iscsi://127.0.0.1:{}/iqn.2026-11.io.keel:a-vol/0", d.iscsi);
    let (ok, msg) = output(Command::new("iscsi-inq").arg(&plain));
    assert!(!ok, "logged in to alice's target without CHAP: {msg}");
    let bobs = plain.replace("iscsi://", &format!("iscsi://a-vol%{}@", key_of(&b_url)));
    let (ok, msg) = output(Command::new("iscsi-inq").arg(&bobs));
    assert!(!ok, "bob's key logged in to alice's target: {msg}");
    let (ok, msg) = output(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw", &a_iscsi, &a_url]));
    assert!(ok && msg.contains("identical"), "QEMU reads the iSCSI URL as it is: {msg}");
    // A login to a target that does not exist fails like one without the
    // right secret: logins do not reveal which volume names exist.
    let ghost = format!("iscsi://127.0.0.1:{}/iqn.2026-11.io.keel:no-such-vol/0", d.iscsi);
    let (ok, ghost_msg) = output(Command::new("iscsi-inq").arg(&ghost));
    assert!(!ok, "{ghost_msg}");
    let (_, real_msg) = output(Command::new("iscsi-inq").arg(&plain));
    let strip = |m: &str| m.replace("no-such-vol", "X").replace("a-vol", "X");
    assert_eq!(strip(&ghost_msg), strip(&real_msg), "a missing target answers differently from a locked one");
    // The daemon's own clients (QEMU, qemu-img) use its private socket,
    // owner-only, with plain names: nothing secret on their command lines.
    let sock = dir.path().join("nbd.sock");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777, 0o600);
    let (ok, msg) = qemu_img_info(&format!("nbd+unix:///a-vol?socket={}", sock.display()));
    assert!(ok, "the private socket serves plain names: {msg}");
    // Discovery names no volumes.
    let (_, msg) = output(Command::new("iscsi-ls").arg(format!("iscsi://127.0.0.1:{}", d.iscsi)));
    assert!(!msg.contains("a-vol") && !msg.contains("b-vol"), "discovery lists tenants' volumes: {msg}");

    // Keys survive a restart.
    d.restart();
    let again = d.call_as(&alice, "GET", "/api/v1/volumes/a-vol", None).1;
    assert_eq!(again["nbd_url"], a_url.as_str());
    assert_reads(&a_url, 0x5a, "0", "1M");

    // Rotation: refused while a client is connected, then the old URLs stop
    // working and the new ones work.
    let mut holder = Command::new("qemu-io")
        .args(["-f", "raw", &a_url])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while d.call_as(&alice, "GET", "/api/v1/volumes/a-vol", None).1["nbd_sessions"] != 1 {
        assert!(Instant::now() < deadline, "qemu-io never connected");
        std::thread::sleep(Duration::from_millis(100));
    }
    let msg = assert_error(d.call_as(&alice, "POST", "/api/v1/volumes/a-vol/export/key", None), 409);
    assert!(msg.contains("disconnect"), "{msg}");
    drop(holder.stdin.take());
    holder.wait().unwrap();
    assert_error(d.call_as(&bob, "POST", "/api/v1/volumes/a-vol/export/key", None), 404);
    let out = d.cli_as(&alice, &["export", "rotate-key", "a-vol", "--json"], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let rotated: Value = serde_json::from_slice(&out.stdout).unwrap();
    let new_url = rotated["nbd_url"].as_str().unwrap().to_string();
    assert_ne!(new_url, a_url);
    let (ok, msg) = qemu_img_info(&a_url);
    assert!(!ok, "the old key still opens the volume: {msg}");
    let (ok, msg) = qemu_img_info(&snap_url);
    assert!(!ok, "the old key still opens the snapshot: {msg}");
    let (ok, msg) = output(Command::new("iscsi-inq").arg(&a_iscsi));
    assert!(!ok, "the old iSCSI URL still logs in: {msg}");
    assert_reads(&new_url, 0x5a, "0", "1M");
    let (ok, msg) = output(Command::new("iscsi-inq").arg(rotated["iscsi_url"].as_str().unwrap()));
    assert!(ok, "{msg}");

    // A volume made under a deleted one's name gets a new key.
    assert!(d.call_as(&bob, "DELETE", "/api/v1/volumes/b-vol", None).0 < 300);
    let (_, b2) = d.call_as(&bob, "POST", "/api/v1/volumes", Some(json!({"name": "b-vol", "size": "64M"})));
    assert_ne!(b2["nbd_url"], b_url.as_str());
    let (ok, msg) = qemu_img_info(&b_url);
    assert!(!ok, "the deleted volume's URL opens its successor: {msg}");

    // With keys turned off, names open plainly and the URLs carry none.
    let ports = (d.api, d.nbd, d.iscsi);
    d.stop();
    let d = Daemon::start_with(dir.path(), &[("KEEL_EXPORT_AUTH", "none")], ports);
    let v = d.call("GET", "/api/v1/volumes/a-vol", None).1;
    assert_eq!(v["nbd_url"], bare.as_str());
    assert_eq!(v["iscsi_url"], plain.as_str());
    assert_reads(&bare, 0x5a, "0", "1M");
    let (ok, msg) = output(Command::new("iscsi-inq").arg(&plain));
    assert!(ok, "{msg}");
}
