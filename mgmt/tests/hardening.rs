//! Small hardening checks: the CLI never turns a name into another path,
//! the data directory is its owner's alone even when it existed before,
//! /metrics is for managers, API tokens expire.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::*;
use serde_json::json;

#[test]
fn cli_refuses_names_that_would_change_the_request_path() {
    let dir = data_dir();
    let d = Daemon::start(dir.path());
    assert!(d.cli(&["volume", "create", "vol", "--size", "8M"]).status.success());
    assert!(d.cli(&["volume", "create", "other", "--size", "8M"]).status.success());
    for args in [
        &["snapshot", "delete", "vol", "../../other"][..],
        &["volume", "delete", "other?recursive=true"][..],
        &["volume", "delete", ".."][..],
        &["iso", "delete", "../users/admin"][..],
    ] {
        let out = d.cli(args);
        assert!(!out.status.success(), "keel {args:?} was sent");
        assert!(String::from_utf8_lossy(&out.stderr).contains("not a valid name"), "keel {args:?}");
    }
    let (st, v) = d.call("GET", "/api/v1/volumes/other", None);
    assert_eq!(st, 200, "volume other must still exist: {v}");
}

#[test]
fn an_existing_data_directory_is_restricted_to_its_owner() {
    let dir = data_dir();
    let data = dir.path().join("open");
    std::fs::create_dir(&data).unwrap();
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).unwrap();
    let _d = Daemon::start(&data);
    let mode = std::fs::metadata(&data).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "data directory left at {mode:o}");
}

#[test]
fn snapshots_count_against_the_storage_quota() {
    let dir = data_dir();
    let d = Daemon::start(dir.path());
    let (st, v) = d.call(
        "POST",
        "/api/v1/users",
        Some(serde_json::json!({"name": "p", "role": "power", "password": "password-1", "quota": {"storage": "64M"}})),
    );
    assert_eq!(st, 201, "{v}");
    // A power user without a quota would be unlimited: refused.
    let msg = assert_error(
        d.call(
            "POST",
            "/api/v1/users",
            Some(serde_json::json!({"name": "q", "role": "power", "password": "password-1"})),
        ),
        400,
    );
    assert!(msg.contains("quota"), "{msg}");
    let p = d.login("p", "password-1");
    let (st, v) = d.call_as(&p, "POST", "/api/v1/volumes", Some(serde_json::json!({"name": "pv", "size": "32M"})));
    assert_eq!(st, 201, "{v}");
    let url = v["nbd_url"].as_str().unwrap().to_string();
    assert!(qemu_io(&url, "write -P 0x1 0 20M").status.success());
    // 32M provisioned + 20M the snapshot will hold: fits in 64M.
    let snap =
        |name: &str| d.call_as(&p, "POST", "/api/v1/volumes/pv/snapshots", Some(serde_json::json!({ "name": name })));
    assert_eq!(snap("s1").0, 201);
    // Another 20M held by a second snapshot would not.
    assert!(qemu_io(&url, "write -P 0x2 0 20M").status.success());
    let msg = assert_error(snap("s2"), 507);
    assert!(msg.contains("quota"), "{msg}");
}

#[test]
fn metrics_are_for_managers_only() {
    let dir = data_dir();
    let d = Daemon::start(dir.path());
    assert_eq!(d.call("POST", "/api/v1/volumes", Some(json!({"name": "secret-project", "size": "1M"}))).0, 201);
    let get = |token: &str| {
        let mut r = ureq::get(&format!("{}/metrics", d.url()));
        if !token.is_empty() {
            r = r.set("Authorization", &format!("Bearer {token}"));
        }
        match r.call() {
            Ok(r) => (r.status(), r.into_string().unwrap()),
            Err(ureq::Error::Status(s, r)) => (s, r.into_string().unwrap()),
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(get("").0, 401);
    let power = json!({"name": "p", "role": "power", "password": "password-p", "quota": {"storage": "1G"}});
    assert_eq!(d.call("POST", "/api/v1/users", Some(power)).0, 201);
    let (st, body) = get(&d.login("p", "password-p"));
    assert_eq!(st, 403, "{body}");
    assert!(!body.contains("secret-project"));
    let (st, body) = get(&d.token);
    assert_eq!(st, 200);
    assert!(body.contains("keel_volume_size_bytes{volume=\"secret-project\"}"), "{body}");
}

#[test]
fn api_tokens_expire() {
    let dir = data_dir();
    let d = Daemon::start_with(dir.path(), &[("KEEL_TOKEN_TTL", "2")], (free_port(), free_port(), free_port()));
    let user = json!({"name": "u", "role": "regular", "password": "password-u"});
    assert_eq!(d.call("POST", "/api/v1/users", Some(user)).0, 201);
    let (st, v) = d.call_as("", "POST", "/api/v1/tokens", Some(json!({"user": "u", "password": "password-u"})));
    assert_eq!(st, 201, "{v}");
    let token = v["token"].as_str().unwrap().to_string();
    let expires = v["expires"].as_u64().unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    assert!(expires > now && expires <= now + 3, "expires {expires}, now {now}");
    assert_eq!(d.call_as(&token, "GET", "/api/v1/whoami", None).0, 200);
    std::thread::sleep(std::time::Duration::from_millis(3100));
    let msg = assert_error(d.call_as(&token, "GET", "/api/v1/whoami", None), 401);
    assert!(msg.contains("expired"), "{msg}");
    // The first manager's token (in DATA/credentials) does not expire.
    assert_eq!(d.call("GET", "/api/v1/whoami", None).0, 200);
}

#[test]
fn iso_uploads_count_against_the_storage_quota() {
    let dir = data_dir();
    let d = Daemon::start(dir.path());
    let power = json!({"name": "p", "role": "power", "password": "password-p", "quota": {"storage": "1M"}});
    assert_eq!(d.call("POST", "/api/v1/users", Some(power)).0, 201);
    let p = d.login("p", "password-p");
    let put = |name: &str, bytes: usize| match ureq::put(&format!("{}/api/v1/isos/{name}", d.url()))
        .set("Authorization", &format!("Bearer {p}"))
        .send_bytes(&vec![1u8; bytes])
    {
        Ok(r) => r.status(),
        Err(ureq::Error::Status(s, _)) => s,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(put("big", 2 << 20), 507, "over the quota");
    assert_eq!(put("small", 768 << 10), 201);
    // The ISO's bytes are the tenant's: a 512 KiB volume no longer fits.
    let e = assert_error(d.call_as(&p, "POST", "/api/v1/volumes", Some(json!({"name": "v", "size": "512K"}))), 507);
    assert!(e.contains("quota"), "{e}");
    let (_, isos) = d.call("GET", "/api/v1/isos", None);
    assert_eq!(isos.as_array().unwrap().len(), 1, "the refused upload left nothing: {isos}");
}

#[test]
fn the_iso_store_shows_uploaders_only_within_their_tenant() {
    let dir = data_dir();
    let d = Daemon::start(dir.path());
    for (name, pw) in [("p", "password-p"), ("q", "password-q")] {
        let u = json!({"name": name, "role": "power", "password": pw, "quota": {"storage": "1G"}});
        assert_eq!(d.call("POST", "/api/v1/users", Some(u)).0, 201);
    }
    let p = d.login("p", "password-p");
    let q = d.login("q", "password-q");
    let up = ureq::put(&format!("{}/api/v1/isos/installer", d.url()))
        .set("Authorization", &format!("Bearer {p}"))
        .send_bytes(b"an iso")
        .unwrap();
    assert_eq!(up.status(), 201);
    let owner_seen_by = |token: &str| {
        let (st, isos) = d.call_as(token, "GET", "/api/v1/isos", None);
        assert_eq!(st, 200, "{isos}");
        let isos = isos.as_array().unwrap().clone();
        assert_eq!(isos.len(), 1, "every tenant sees the shared store: {isos:?}");
        assert_eq!(isos[0]["name"], "installer");
        isos[0]["owner"].as_str().map(str::to_string)
    };
    assert_eq!(owner_seen_by(&p).as_deref(), Some("p"));
    assert_eq!(owner_seen_by(&d.token).as_deref(), Some("p"), "managers see everyone");
    assert_eq!(owner_seen_by(&q), None, "another tenant learns no user names");
}

#[test]
fn a_reused_user_name_does_not_inherit_events_or_jobs() {
    let dir = data_dir();
    let d = Daemon::start(dir.path());
    let power = json!({"name": "p", "role": "power", "password": "password-p", "quota": {"storage": "1G"}});
    assert_eq!(d.call("POST", "/api/v1/users", Some(power.clone())).0, 201);
    let p = d.login("p", "password-p");
    assert_eq!(d.call_as(&p, "POST", "/api/v1/volumes", Some(json!({"name": "old-secret", "size": "1M"}))).0, 201);
    let up = ureq::put(&format!("{}/api/v1/isos/old-iso", d.url()))
        .set("Authorization", &format!("Bearer {p}"))
        .send_bytes(b"an iso")
        .unwrap();
    assert_eq!(up.status(), 201);
    let (_, ev) = d.call_as(&p, "GET", "/api/v1/events", None);
    assert!(ev.to_string().contains("old-secret"), "the first p sees its own events: {ev}");
    assert_eq!(d.call_as(&p, "GET", "/api/v1/jobs", None).1.as_array().unwrap().len(), 1);
    assert!(d.call("DELETE", "/api/v1/volumes/old-secret", None).0 < 300);
    assert!(d.call("DELETE", "/api/v1/users/p", None).0 < 300);
    std::thread::sleep(std::time::Duration::from_millis(1100));
    assert_eq!(d.call("POST", "/api/v1/users", Some(power)).0, 201);
    let p2 = d.login("p", "password-p");
    let (_, ev) = d.call_as(&p2, "GET", "/api/v1/events", None);
    assert!(!ev.to_string().contains("old-secret"), "the new p sees the old p's events: {ev}");
    let (_, jobs) = d.call_as(&p2, "GET", "/api/v1/jobs", None);
    assert_eq!(jobs.as_array().unwrap().len(), 0, "the new p sees the old p's jobs: {jobs}");
    let (_, all) = d.call("GET", "/api/v1/events", None);
    assert!(all.to_string().contains("old-secret"), "managers still see the history: {all}");
}

#[test]
fn errors_axum_answers_itself_are_json_too() {
    let dir = data_dir();
    let d = Daemon::start(dir.path());
    let (st, v) = post_oversized(&d);
    assert_eq!(st, 413, "{v}");
    assert!(v["error"].as_str().unwrap().contains("too large"), "{v}");
}

#[test]
fn an_upload_whose_client_goes_away_ends_its_job_as_failed() {
    let dir = data_dir();
    let d = Daemon::start(dir.path());
    let s = start_stalled_upload(&d, "cut");
    let job_state = || {
        let (_, jobs) = d.call("GET", "/api/v1/jobs", None);
        jobs.as_array().unwrap().iter().find(|j| j["target"] == "cut").cloned()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while job_state().is_none_or(|j| j["state"] != "running") {
        assert!(std::time::Instant::now() < deadline, "the upload never showed as running");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    drop(s);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let j = job_state().unwrap();
        if j["state"] == "failed" {
            assert!(!j["error"].as_str().unwrap().is_empty(), "{j}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the job stayed {j} after its client left");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let (_, isos) = d.call("GET", "/api/v1/isos", None);
    assert_eq!(isos.as_array().unwrap().len(), 0, "the cut upload left an ISO: {isos}");
}
