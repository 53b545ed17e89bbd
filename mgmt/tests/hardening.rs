//! Small hardening checks: the CLI never turns a name into another path,
//! and the data directory is its owner's alone even when it existed before.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::*;

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
