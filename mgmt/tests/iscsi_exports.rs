//! Volumes over the `iscsi_url` the API hands out: QEMU's iSCSI client
//! writes and compares through it, libiscsi's tools discover and inquire,
//! the export's initiator ACL and CHAP secret (set through the CLI) are
//! enforced, and a volume with a logged-in initiator cannot be deleted.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;

fn cli_json(d: &Daemon, args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.push("--json");
    let out = d.cli(&a);
    assert!(out.status.success(), "keel {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn output(cmd: &mut Command) -> (bool, String) {
    let o = cmd.output().unwrap();
    (o.status.success(), format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)))
}

#[test]
fn volumes_serve_over_their_iscsi_url_with_acl_chap_and_in_use_refusal() {
    let dir = data_dir();
    let d = Daemon::start(dir.path());
    assert!(d.output().contains(&format!("iSCSI on iscsi://127.0.0.1:{}/", d.iscsi)), "{}", d.output());
    let v = cli_json(&d, &["volume", "create", "lun1", "--size", "64M"]);
    let iscsi_url = v["iscsi_url"].as_str().unwrap().to_string();
    let nbd_url = v["nbd_url"].as_str().unwrap().to_string();

    // QEMU copies a file in over iSCSI; the same bytes read back over iSCSI
    // and over NBD.
    let src = dir.path().join("src.raw");
    let data = keel_tests::data::pseudo_random(7, 8 << 20);
    std::fs::write(&src, &data).unwrap();
    let src = src.to_str().unwrap();
    run_ok(Command::new("qemu-img").args(["convert", "-n", "-f", "raw", "-O", "raw", src, &iscsi_url]));
    for url in [&iscsi_url, &nbd_url] {
        let (ok, out) = output(Command::new("qemu-img").args(["compare", "-f", "raw", src, url]));
        assert!(ok && out.contains("Images are identical"), "{url}: {out}");
    }

    // The writes show in /metrics, per volume.
    let auth = format!("Authorization: Bearer {}", d.token);
    let metrics = run_ok(Command::new("curl").args(["-sf", "-H", &auth, &format!("{}/metrics", d.url())]));
    let written: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("keel_iscsi_written_bytes_total{volume=\"lun1\"} "))
        .unwrap_or_else(|| panic!("no iSCSI write counter for lun1:\n{metrics}"))
        .parse()
        .unwrap();
    assert!(written >= data.len() as u64, "{written} bytes counted, {} written", data.len());

    // INQUIRY answers over the URL; discovery does not list the target (its
    // name is a volume name, tenants' data; see data_plane_access.rs).
    let (ok, out) = output(Command::new("iscsi-inq").arg(&iscsi_url));
    assert!(ok && out.contains("Vendor:KEEL"), "{out}");

    // A volume with a logged-in initiator is in use (but its snapshots,
    // which iSCSI does not serve, can still go).
    cli_json(&d, &["snapshot", "create", "lun1", "s1"]);
    let mut busy = Command::new("iscsi-perf")
        .args(["-t", "8", &iscsi_url])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(2000));
    let (status, body) = d.call("DELETE", "/api/v1/volumes/lun1", None);
    assert_eq!(status, 409, "deleting a volume with an iSCSI session: {body}");
    let out = d.cli(&["snapshot", "delete", "lun1", "s1"]);
    assert!(out.status.success(), "snapshot delete refused: {}", String::from_utf8_lossy(&out.stderr));
    busy.wait().unwrap();

    // CHAP values travel as iSCSI text keys: '=' or spaces are refused.
    let out = d.cli_as(
        &d.token,
        &["export", "set", "lun1", "--chap-user", "al=ice", "--chap-secret-stdin"],
        Some("alice-secret-12\n"),
    );
    assert!(!out.status.success(), "a CHAP user with '=' was accepted");

    // ACL and CHAP set through the CLI are enforced at login.
    let out = d.cli_as(
        &d.token,
        &[
            "export",
            "set",
            "lun1",
            "--initiator",
            "iqn.2026-11.test:good",
            "--chap-user",
            "alice",
            "--chap-secret-stdin",
        ],
        Some("alice-secret-12\n"),
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // With CHAP of its own the URL carries no credentials: the admin knows them.
    let plain = cli_json(&d, &["export", "show", "lun1"])["iscsi_url"].as_str().unwrap().to_string();
    assert_eq!(plain, format!("iscsi://127.0.0.1:{}/iqn.2026-11.io.keel:lun1/0", d.iscsi));
    let with = |secret: &str| plain.replace("iscsi://", &format!("iscsi://alice%{secret}@"));
    let (ok, out) = output(Command::new("iscsi-inq").args(["-i", "iqn.2026-11.test:good", &with("alice-secret-12")]));
    assert!(ok, "right initiator and secret refused: {out}");
    let (ok, out) = output(Command::new("iscsi-inq").args(["-i", "iqn.2026-11.test:good", &with("wrong-secret-99")]));
    assert!(!ok, "wrong secret accepted: {out}");
    let (ok, out) = output(Command::new("iscsi-inq").args(["-i", "iqn.2026-11.test:bad", &with("alice-secret-12")]));
    assert!(!ok, "initiator off the ACL accepted: {out}");
    let (ok, out) = output(Command::new("iscsi-inq").args(["-i", "iqn.2026-11.test:good", &plain]));
    assert!(!ok, "login without CHAP accepted: {out}");
    let (ok, out) = output(Command::new("iscsi-inq").args(["-i", "iqn.2026-11.test:good", &iscsi_url]));
    assert!(!ok, "the access key's CHAP still accepted after CHAP of the volume's own was set: {out}");

    // No session left: the delete goes through, and the target is gone.
    let (status, body) = d.call("DELETE", "/api/v1/volumes/lun1", None);
    assert!(status == 200 || status == 204, "delete: {status} {body}");
    let (ok, out) = output(Command::new("iscsi-inq").arg(&iscsi_url));
    assert!(!ok, "deleted volume still served: {out}");
}
