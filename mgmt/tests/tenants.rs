//! Role enforcement: a tenant sees and touches only its own. Rule: 403 for
//! what a role may never do, 404 for anything outside the caller's tenant.

mod common;

use common::*;
use serde_json::json;

#[test]
fn tenants_cannot_see_or_touch_each_other() {
    let dir = data_dir();
    let d = Daemon::start(dir.path());

    // Manager creates two power users with quotas; p1 creates a regular user.
    for p in ["p1", "p2"] {
        let (st, v) = d.call(
            "POST",
            "/api/v1/users",
            Some(json!({"name": p, "role": "power", "password": "password-1", "quota": {"storage": "3G", "cpus": 4, "memory": "8G"}})),
        );
        assert_eq!(st, 201, "{v}");
        assert_eq!(v["quota"]["storage_bytes"], 3u64 << 30);
    }
    let p1 = d.login("p1", "password-1");
    let p2 = d.login("p2", "password-1");
    let out = d.cli_as(&p1, &["user", "create", "r1", "--role", "regular", "--password-stdin"], Some("password-r1\n"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r1 = d.login("r1", "password-r1");
    let (_, v) = d.call_as(&r1, "GET", "/api/v1/whoami", None);
    assert_eq!((v["name"].as_str(), v["parent"].as_str()), (Some("r1"), Some("p1")));
    assert_error(d.call_as("", "POST", "/api/v1/tokens", Some(json!({"user": "r1", "password": "wrong-pass"}))), 401);

    // p1 owns a volume, through the CLI.
    let out = d.cli_as(&p1, &["volume", "create", "p1-disk", "--size", "1G"], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let (_, v) = d.call_as(&p1, "GET", "/api/v1/volumes/p1-disk", None);
    assert_eq!(v["owner"], "p1");
    assert_eq!(d.call_as(&p1, "POST", "/api/v1/volumes/p1-disk/snapshots", Some(json!({"name": "s"}))).0, 201);

    // p2 sees nothing of it: 404 everywhere, not in its list.
    for (m, path, body) in [
        ("GET", "/api/v1/volumes/p1-disk", None),
        ("PATCH", "/api/v1/volumes/p1-disk", Some(json!({"size": "2G"}))),
        ("DELETE", "/api/v1/volumes/p1-disk", None),
        ("GET", "/api/v1/volumes/p1-disk/snapshots", None),
        ("POST", "/api/v1/volumes/p1-disk/snapshots", Some(json!({"name": "x"}))),
        ("DELETE", "/api/v1/volumes/p1-disk/snapshots/s", None),
        ("POST", "/api/v1/volumes/p1-disk/snapshots/s/clones", Some(json!({"name": "stolen"}))),
        ("GET", "/api/v1/volumes/p1-disk/export", None),
        ("PUT", "/api/v1/volumes/p1-disk/export", Some(json!({"initiators": []}))),
        ("GET", "/api/v1/users/p1", None),
        ("GET", "/api/v1/users/r1", None),
        ("DELETE", "/api/v1/users/r1", None),
    ] {
        let got = d.call_as(&p2, m, path, body);
        assert_eq!(got.0, 404, "p2 {m} {path}: {}", got.1);
    }
    let (_, list) = d.call_as(&p2, "GET", "/api/v1/volumes", None);
    assert_eq!(list, json!([]));
    let out = d.cli_as(&p2, &["volume", "list", "--json"], None);
    assert_eq!(serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap(), json!([]));
    let (_, users) = d.call_as(&p2, "GET", "/api/v1/users", None);
    let names: Vec<&str> = users.as_array().unwrap().iter().map(|u| u["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["p2"]);
    // p2 cannot give a volume to p1's user either.
    assert_error(
        d.call_as(&p2, "POST", "/api/v1/volumes", Some(json!({"name": "gift", "size": "1M", "owner": "r1"}))),
        404,
    );
    // The event log of p2 holds nothing of p1's tenant.
    let (_, ev) = d.call_as(&p2, "GET", "/api/v1/events", None);
    assert!(ev.as_array().unwrap().iter().all(|e| e["user"] == "p2"), "{ev}");

    // r1, a regular user, may use no volume endpoint at all (403), sees only itself.
    for (m, path, body) in [
        ("GET", "/api/v1/volumes", None),
        ("POST", "/api/v1/volumes", Some(json!({"name": "mine", "size": "1G"}))),
        ("GET", "/api/v1/volumes/p1-disk", None),
        ("DELETE", "/api/v1/volumes/p1-disk", None),
        ("GET", "/api/v1/pools", None),
        ("POST", "/api/v1/users", Some(json!({"name": "x1", "role": "regular", "password": "password-x"}))),
        ("DELETE", "/api/v1/users/r1", None),
        ("PUT", "/api/v1/isos/x", None),
        ("DELETE", "/api/v1/isos/x", None),
    ] {
        let got = d.call_as(&r1, m, path, body);
        assert_eq!(got.0, 403, "r1 {m} {path}: {}", got.1);
    }
    let (_, users) = d.call_as(&r1, "GET", "/api/v1/users", None);
    assert_eq!(users.as_array().unwrap().len(), 1);
    assert_eq!(users[0]["name"], "r1");
    assert_error(d.call_as(&r1, "GET", "/api/v1/users/p1", None), 404);
    assert_error(d.call_as(&r1, "GET", "/api/v1/users/admin", None), 404);
    let out = d.cli_as(&r1, &["volume", "list"], None);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("HTTP 403"));

    // p1 sees its tenant, may not create power users or managers (403).
    let (_, users) = d.call_as(&p1, "GET", "/api/v1/users", None);
    let mut names: Vec<&str> = users.as_array().unwrap().iter().map(|u| u["name"].as_str().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["p1", "r1"]);
    for role in ["power", "manager"] {
        assert_error(
            d.call_as(
                &p1,
                "POST",
                "/api/v1/users",
                Some(json!({"name": "x2", "role": role, "password": "password-x"})),
            ),
            403,
        );
    }
    // p1 may give a volume to its own user.
    let (st, v) =
        d.call_as(&p1, "POST", "/api/v1/volumes", Some(json!({"name": "r1-disk", "size": "1G", "owner": "r1"})));
    assert_eq!(st, 201, "{v}");
    assert_eq!(v["owner"], "r1");

    // Quota: p1 has 3G; 2G are provisioned; 2G more is 507, growing past it too.
    let msg = assert_error(d.call_as(&p1, "POST", "/api/v1/volumes", Some(json!({"name": "big", "size": "2G"}))), 507);
    assert!(msg.contains("quota"), "{msg}");
    assert_error(d.call_as(&p1, "PATCH", "/api/v1/volumes/p1-disk", Some(json!({"size": "3G"}))), 507);
    // A 1G clone fits exactly; a second does not.
    let clone =
        |name: &str| d.call_as(&p1, "POST", "/api/v1/volumes/p1-disk/snapshots/s/clones", Some(json!({"name": name})));
    assert_eq!(clone("c2").0, 201);
    assert_error(clone("c3"), 507);
    let (_, me) = d.call_as(&p1, "GET", "/api/v1/users/p1", None);
    assert_eq!(me["storage_used_bytes"], 3u64 << 30);

    // A deleted user's token stops working.
    assert_error(d.call_as(&p1, "DELETE", "/api/v1/users/r1", None), 409); // owns r1-disk
    assert_eq!(d.call_as(&p1, "DELETE", "/api/v1/volumes/r1-disk", None).0, 204);
    assert_eq!(d.call_as(&p1, "DELETE", "/api/v1/users/r1", None).0, 204);
    assert_error(d.call_as(&r1, "GET", "/api/v1/whoami", None), 401);

    // Logging out revokes only that token.
    let p1b = d.login("p1", "password-1");
    let out = d.cli_as(&p1b, &["user", "logout"], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_error(d.call_as(&p1b, "GET", "/api/v1/whoami", None), 401);
    assert_eq!(d.call_as(&p1, "GET", "/api/v1/whoami", None).0, 200);

    // The manager sees everything.
    let (_, list) = d.call("GET", "/api/v1/volumes", None);
    assert_eq!(list.as_array().unwrap().len(), 2);
    assert_eq!(d.call("GET", "/api/v1/volumes/p1-disk", None).0, 200);
}
