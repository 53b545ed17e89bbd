//! The running server against its OpenAPI document: every documented path
//! and method exists and answers with a documented status, every secured
//! one answers 401 without a token, and every error status the document
//! promises is produced by some bad request, with a JSON message. Bad input
//! of every request field is refused with 400.

mod common;

use std::collections::BTreeSet;

use common::*;
use serde_json::{Value, json};

/// Wait for job `id` to finish; panics if it fails.
fn wait_job(d: &Daemon, id: u64) -> Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let (_, j) = d.call("GET", &format!("/api/v1/jobs/{id}"), None);
        match j["state"].as_str() {
            Some("done") => return j,
            Some("running") => assert!(std::time::Instant::now() < deadline, "{j}"),
            _ => panic!("job {id}: {j}"),
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

fn documented(doc: &Value, path: &str, method: &str) -> BTreeSet<u16> {
    doc["paths"][path][method]["responses"].as_object().unwrap().keys().map(|k| k.parse().unwrap()).collect()
}

#[test]
fn every_documented_operation_answers_with_a_documented_status() {
    let dir = data_dir();
    let d = Daemon::start(dir.path());
    let (st, doc) = d.call_as("", "GET", "/api/v1/openapi.json", None);
    assert_eq!(st, 200);
    assert_eq!(doc["openapi"], "3.0.3");

    // Fixtures the happy paths use.
    assert_eq!(d.call("POST", "/api/v1/volumes", Some(json!({"name": "fx", "size": "16M"}))).0, 201);
    assert_eq!(d.call("POST", "/api/v1/volumes/fx/snapshots", Some(json!({"name": "s1"}))).0, 201);
    assert_eq!(
        d.call("POST", "/api/v1/users", Some(json!({"name": "u1", "role": "regular", "password": "password-1"}))).0,
        201
    );
    let iso_up = ureq::put(&format!("{}/api/v1/isos/first", d.url()))
        .set("Authorization", &format!("Bearer {}", d.token))
        .send_bytes(b"an iso")
        .unwrap();
    assert_eq!(iso_up.status(), 201);
    // A VM with an empty disk: the firmware finds nothing to boot and
    // waits, which is all the power operations need. Kept stopped between
    // operations that need it stopped.
    let vm = json!({"name": "fx", "blank_disk": "16M", "memory": "64M", "nics": []});
    assert_eq!(d.call("POST", "/api/v1/vms", Some(vm)).0, 201);
    assert_eq!(d.call("POST", "/api/v1/volumes", Some(json!({"name": "fx-spare", "size": "16M"}))).0, 201);
    // An appliance "fx", backed up from VM fx.
    let (st, job) = d.call("POST", "/api/v1/vms/fx/backups", Some(json!({"appliance": "fx"})));
    assert_eq!(st, 202, "{job}");
    wait_job(&d, job["id"].as_u64().unwrap());

    let mut checked = 0;
    let mut ova: Vec<u8> = Vec::new();
    let paths = doc["paths"].as_object().unwrap();
    for (path, ops) in paths {
        for (method, op) in ops.as_object().unwrap() {
            let m = method.to_uppercase();
            let concrete = path
                .replace(
                    "{name}",
                    if path.starts_with("/api/v1/users") {
                        "u1"
                    } else if path.starts_with("/api/v1/pools") {
                        "default"
                    } else if path.starts_with("/api/v1/isos") {
                        "second"
                    } else {
                        "fx"
                    },
                )
                .replace("{snap}", "s1")
                .replace("{volume}", "fx-spare")
                .replace("/nics/{id}", "/nics/nic0")
                .replace("{id}", "1");
            let body = match (m.as_str(), path.as_str()) {
                ("POST", "/api/v1/tokens") => {
                    let text = std::fs::read_to_string(dir.path().join("credentials")).unwrap();
                    let pw = text
                        .lines()
                        .find(|l| l.starts_with("password"))
                        .unwrap()
                        .split('"')
                        .nth(1)
                        .unwrap()
                        .to_string();
                    Some(json!({"user": "admin", "password": pw}))
                }
                ("POST", "/api/v1/volumes") => Some(json!({"name": "fx2", "size": 1048576})),
                ("POST", "/api/v1/pools") => {
                    Some(json!({"name": "extra", "file": dir.path().join("extra.img"), "size": "64M", "tier": "fast"}))
                }
                ("POST", "/api/v1/volumes/{name}/move") => Some(json!({"pool": "extra"})),
                ("PATCH", _) => Some(json!({"size": "32M"})),
                ("POST", "/api/v1/volumes/{name}/snapshots") => Some(json!({"name": "s2"})),
                ("POST", "/api/v1/volumes/{name}/snapshots/{snap}/clones") => Some(json!({"name": "fx-clone"})),
                ("PUT", "/api/v1/volumes/{name}/export") => Some(
                    json!({"initiators": ["iqn.1993-08.org.debian:01:abc"], "chap_user": "host", "chap_secret": "0123456789abcd"}),
                ),
                ("POST", "/api/v1/vms") => Some(json!({"name": "fx2", "blank_disk": "1M", "memory": "64M"})),
                ("PUT", "/api/v1/vms/{name}/cdrom") => Some(json!({"iso": "second"})),
                ("POST", "/api/v1/vms/{name}/disks") => Some(json!({"volume": "fx-spare"})),
                ("POST", "/api/v1/vms/{name}/nics") => Some(json!({"network": "user"})),
                ("POST", "/api/v1/vms/{name}/clones") => Some(json!({"name": "fx-copy"})),
                ("POST", "/api/v1/vms/{name}/backups") => Some(json!({"appliance": "fx-b"})),
                ("POST", "/api/v1/vms/{name}/restore") => Some(json!({"appliance": "fx"})),
                ("POST", "/api/v1/appliances") => Some(json!({"name": "fx-copyback", "vm": "fx"})),
                ("POST", "/api/v1/users") => {
                    Some(json!({"name": "u2", "role": "power", "password": "password-2", "quota": {"storage": "1G"}}))
                }
                _ => None,
            };
            let (st, v) = if path == "/api/v1/appliances/{name}/ova" && m == "GET" {
                let r = ureq::get(&format!("{}{concrete}", d.url()))
                    .set("Authorization", &format!("Bearer {}", d.token))
                    .call()
                    .unwrap();
                let st = r.status();
                use std::io::Read;
                r.into_reader().read_to_end(&mut ova).unwrap();
                assert_eq!(&ova[257..262], b"ustar", "a tar archive");
                (st, Value::Null)
            } else if path == "/api/v1/appliances/{name}/ova" && m == "PUT" {
                assert!(!ova.is_empty(), "GET comes before PUT");
                let r = ureq::put(&format!("{}/api/v1/appliances/fx-imported/ova", d.url()))
                    .set("Authorization", &format!("Bearer {}", d.token))
                    .send_bytes(&ova)
                    .unwrap();
                (r.status(), r.into_json::<Value>().unwrap())
            } else if path == "/api/v1/isos/{name}" && m == "PUT" {
                let r = ureq::put(&format!("{}{concrete}", d.url()))
                    .set("Authorization", &format!("Bearer {}", d.token))
                    .send_bytes(&[7u8; 4096])
                    .unwrap();
                (r.status(), r.into_json::<Value>().unwrap())
            } else if path == "/api/v1/users/{name}" && m == "DELETE" {
                // Delete a throwaway user, not the fixture others use.
                d.call(
                    "POST",
                    "/api/v1/users",
                    Some(json!({"name": "u3", "role": "regular", "password": "password-3"})),
                );
                d.call("DELETE", "/api/v1/users/u3", None)
            } else if path == "/api/v1/pools/{name}" && m == "DELETE" {
                let file = dir.path().join("doomed.img");
                let made =
                    d.call("POST", "/api/v1/pools", Some(json!({"name": "doomed", "file": file, "size": "32M"})));
                assert_eq!(made.0, 201, "{}", made.1);
                let r = d.call("DELETE", "/api/v1/pools/doomed", None);
                assert!(!file.exists(), "the pool file Keel made goes with the pool");
                r
            } else if path == "/api/v1/volumes/{name}" && m == "DELETE" {
                d.call("POST", "/api/v1/volumes", Some(json!({"name": "gone", "size": "1M"})));
                d.call("DELETE", "/api/v1/volumes/gone", None)
            } else if path == "/api/v1/volumes/{name}/snapshots/{snap}" && m == "DELETE" {
                d.call("POST", "/api/v1/volumes/fx/snapshots", Some(json!({"name": "tmp"})));
                d.call("DELETE", "/api/v1/volumes/fx/snapshots/tmp", None)
            } else if path == "/api/v1/tokens/current" {
                // Revoke a fresh token, not the one the test uses; it stops working.
                let text = std::fs::read_to_string(dir.path().join("credentials")).unwrap();
                let pw =
                    text.lines().find(|l| l.starts_with("password")).unwrap().split('"').nth(1).unwrap().to_string();
                let t = d.login("admin", &pw);
                let r = d.call_as(&t, "DELETE", &concrete, None);
                assert_error(d.call_as(&t, "GET", "/api/v1/whoami", None), 401);
                r
            } else if path == "/api/v1/appliances/{name}" && m == "DELETE" {
                let (_, job) = d.call("POST", "/api/v1/appliances", Some(json!({"name": "doomed", "vm": "fx"})));
                wait_job(&d, job["id"].as_u64().unwrap());
                d.call("DELETE", "/api/v1/appliances/doomed", None)
            } else if path == "/api/v1/vms/{name}" && m == "DELETE" {
                d.call("POST", "/api/v1/vms", Some(json!({"name": "gone", "blank_disk": "1M", "memory": "64M"})));
                d.call("DELETE", "/api/v1/vms/gone?disks=delete", None)
            } else if path == "/api/v1/vms/{name}/reset" {
                let started = d.call("POST", "/api/v1/vms/fx/start", None);
                assert_eq!(started.0, 200, "{}", started.1);
                let r = d.call("POST", &concrete, None);
                assert_eq!(d.call("POST", "/api/v1/vms/fx/stop?force=true", None).0, 200);
                r
            } else if path == "/api/v1/vms/{name}/stop" {
                if d.call("GET", "/api/v1/vms/fx", None).1["state"] != "running" {
                    assert_eq!(d.call("POST", "/api/v1/vms/fx/start", None).0, 200);
                }
                d.call("POST", "/api/v1/vms/fx/stop?force=true", None)
            } else if path == "/api/v1/isos/{name}" && m == "DELETE" {
                d.call("DELETE", "/api/v1/isos/first", None)
            } else {
                d.call(&m, &concrete, body)
            };
            let allowed = documented(&doc, path, method);
            assert!(allowed.contains(&st), "{m} {concrete}: {st} is not documented ({allowed:?}): {v}");
            assert!(st < 300, "{m} {concrete}: the happy path failed with {st}: {v}");
            // The document's success schema names required fields; check them.
            let code = st.to_string();
            if let Some(schema) = op["responses"][&code]["content"]["application/json"]["schema"].as_object() {
                let resolve = |s: &Value| -> Value {
                    match s["$ref"].as_str() {
                        Some(r) => doc["components"]["schemas"][r.rsplit('/').next().unwrap()].clone(),
                        None => s.clone(),
                    }
                };
                let s = Value::Object(schema.clone());
                let (obj, items) =
                    if s["type"] == "array" { (resolve(&s["items"]), true) } else { (resolve(&s), false) };
                let samples: Vec<&Value> = if items { v.as_array().unwrap().iter().collect() } else { vec![&v] };
                for sample in samples {
                    for req in obj["required"].as_array().into_iter().flatten() {
                        let k = req.as_str().unwrap();
                        assert!(sample.get(k).is_some(), "{m} {concrete}: field {k} missing in {sample}");
                    }
                }
            }
            // Without a token a secured operation is 401, and documents it.
            if op.get("security").is_none() {
                assert!(allowed.contains(&401), "{m} {path} does not document 401");
                assert_error(d.call_as("", &m, &concrete, None), 401);
                assert_error(d.call_as("keel_bogus", &m, &concrete, None), 401);
            }
            checked += 1;
        }
    }
    assert!(checked >= 25, "only {checked} operations documented");

    // Every status an operation documents is one the server gives somewhere:
    // the error statuses are exercised below and in tenants.rs.
    let mut all = BTreeSet::new();
    for ops in paths.values() {
        for op in ops.as_object().unwrap().values() {
            all.extend(op["responses"].as_object().unwrap().keys().map(|k| k.parse::<u16>().unwrap()));
        }
    }
    let mut seen = BTreeSet::new();
    let mut see = |got: (u16, Value), status: u16| {
        assert_error(got, status);
        seen.insert(status);
    };
    see(d.call("POST", "/api/v1/volumes", Some(json!({"name": "Bad Name", "size": "1G"}))), 400);
    see(d.call_as("", "GET", "/api/v1/volumes", None), 401);
    let u1 = d.login("u1", "password-1");
    see(d.call_as(&u1, "GET", "/api/v1/volumes", None), 403);
    see(d.call("GET", "/api/v1/volumes/nope", None), 404);
    see(d.call("POST", "/api/v1/volumes", Some(json!({"name": "fx", "size": "1G"}))), 409);
    let p = d.login("u2", "password-2");
    see(d.call_as(&p, "POST", "/api/v1/volumes", Some(json!({"name": "huge", "size": "2G"}))), 507);
    // QEMU refusing a VM: a VM whose kernel file vanished after it was
    // created. The VM's state, not the appliance's fault: 409.
    let kernel = dir.path().join("vanishing-kernel");
    std::fs::write(&kernel, b"not a kernel").unwrap();
    let vm = json!({"name": "broken", "memory": "64M", "kernel": {"kernel": kernel}});
    assert_eq!(d.call("POST", "/api/v1/vms", Some(vm)).0, 201);
    std::fs::remove_file(&kernel).unwrap();
    let got = d.call("POST", "/api/v1/vms/broken/start", None);
    let msg = got.1["error"].as_str().unwrap_or_default().to_string();
    see(got, 409);
    assert!(msg.contains("kernel") && !msg.contains(dir.path().to_str().unwrap()), "{msg}");
    assert_eq!(d.call("GET", "/api/v1/vms/broken", None).1["state"], "stopped", "a failed start leaves it stopped");
    // The appliance failing: the ISO store's directory is a file.
    let isos = d.data.join("isos");
    let _ = std::fs::remove_dir_all(&isos);
    std::fs::write(&isos, b"not a directory").unwrap();
    let r = ureq::put(&format!("{}/api/v1/isos/boot", d.url()))
        .set("Authorization", &format!("Bearer {}", d.token))
        .send_bytes(b"an iso");
    let got = match r {
        Err(ureq::Error::Status(s, r)) => (s, r.into_json().unwrap()),
        other => panic!("{other:?}"),
    };
    see(got, 500);
    std::fs::remove_file(&isos).unwrap();
    let success: BTreeSet<u16> = all.iter().copied().filter(|s| *s < 300).collect();
    let errors: BTreeSet<u16> = all.difference(&success).copied().collect();
    // Unknown endpoints and methods answer JSON too.
    see(d.call("GET", "/api/v1/nothing", None), 404);
    see(post_oversized(&d), 413);
    // Failed logins: three free, the fourth answered, then locked.
    for _ in 0..4 {
        assert_error(d.call_as("", "POST", "/api/v1/tokens", Some(json!({"user": "u1", "password": "wrong"}))), 401);
    }
    see(d.call_as("", "POST", "/api/v1/tokens", Some(json!({"user": "u1", "password": "wrong"}))), 429);
    // 503 (POST /tokens with 64 password checks already queued) takes a
    // storm to produce; throttle.rs's the_hashing_queue_is_bounded makes it
    // through the same Hasher the endpoint uses.
    seen.insert(503);
    assert_eq!(errors, seen, "documented error statuses vs. those produced");
    let (st, v) = d.call("PUT", "/api/v1/volumes", None);
    assert_eq!(st, 405);
    assert!(v["error"].is_string());
}

#[test]
fn bad_input_of_every_field_is_refused_with_400() {
    let dir = data_dir();
    let d = Daemon::start(dir.path());
    assert_eq!(d.call("POST", "/api/v1/volumes", Some(json!({"name": "v", "size": "16M"}))).0, 201);
    let m0 = json!({"name": "m0", "memory": "64M", "kernel": {"kernel": "/proc/self/exe"}, "nics": []});
    assert_eq!(d.call("POST", "/api/v1/vms", Some(m0)).0, 201);
    let cases: Vec<(&str, &str, Option<Value>)> = vec![
        // POST /volumes
        ("POST", "/api/v1/volumes", None),
        ("POST", "/api/v1/volumes", Some(json!("not an object"))),
        ("POST", "/api/v1/volumes", Some(json!({"size": "1G"}))),
        ("POST", "/api/v1/volumes", Some(json!({"name": "a"}))),
        ("POST", "/api/v1/volumes", Some(json!({"name": "", "size": "1G"}))),
        ("POST", "/api/v1/volumes", Some(json!({"name": "UPPER", "size": "1G"}))),
        ("POST", "/api/v1/volumes", Some(json!({"name": "a/b", "size": "1G"}))),
        ("POST", "/api/v1/volumes", Some(json!({"name": "a@b", "size": "1G"}))),
        ("POST", "/api/v1/volumes", Some(json!({"name": "x".repeat(64), "size": "1G"}))),
        ("POST", "/api/v1/volumes", Some(json!({"name": 7, "size": "1G"}))),
        ("POST", "/api/v1/volumes", Some(json!({"name": "a", "size": "1Q"}))),
        ("POST", "/api/v1/volumes", Some(json!({"name": "a", "size": "lots"}))),
        ("POST", "/api/v1/volumes", Some(json!({"name": "a", "size": 0}))),
        ("POST", "/api/v1/volumes", Some(json!({"name": "a", "size": 1000}))),
        ("POST", "/api/v1/volumes", Some(json!({"name": "a", "size": -5}))),
        ("POST", "/api/v1/volumes", Some(json!({"name": "a", "size": "99999999999T"}))),
        ("POST", "/api/v1/volumes", Some(json!({"name": "a", "size": "2048T"}))),
        ("POST", "/api/v1/volumes", Some(json!({"name": "a", "size": "1G", "colour": "red"}))),
        ("POST", "/api/v1/volumes", Some(json!({"name": "a", "size": "1G", "owner": 5}))),
        // PATCH /volumes/{name}
        ("PATCH", "/api/v1/volumes/v", Some(json!({}))),
        ("PATCH", "/api/v1/volumes/v", Some(json!({"size": "big"}))),
        ("PATCH", "/api/v1/volumes/v", Some(json!({"size": 513}))),
        ("PATCH", "/api/v1/volumes/v", Some(json!({"size": "32M", "force": true}))),
        // DELETE query
        ("DELETE", "/api/v1/volumes/v?recursive=maybe", None),
        ("DELETE", "/api/v1/volumes/v?force=true", None),
        // snapshots and clones
        ("POST", "/api/v1/volumes/v/snapshots", Some(json!({}))),
        ("POST", "/api/v1/volumes/v/snapshots", Some(json!({"name": "Bad"}))),
        ("POST", "/api/v1/volumes/v/snapshots", Some(json!({"name": "s", "owner": "admin"}))),
        // export
        ("PUT", "/api/v1/volumes/v/export", Some(json!({"initiators": ["not-an-iqn"]}))),
        ("PUT", "/api/v1/volumes/v/export", Some(json!({"initiators": "iqn.x"}))),
        ("PUT", "/api/v1/volumes/v/export", Some(json!({"chap_user": "u"}))),
        ("PUT", "/api/v1/volumes/v/export", Some(json!({"chap_user": "u", "chap_secret": "short"}))),
        ("PUT", "/api/v1/volumes/v/export", Some(json!({"chap_user": "", "chap_secret": "0123456789abc"}))),
        ("PUT", "/api/v1/volumes/v/export", Some(json!({"acl": []}))),
        // users
        ("POST", "/api/v1/users", Some(json!({"name": "a1", "role": "god", "password": "password-1"}))),
        ("POST", "/api/v1/users", Some(json!({"name": "a1", "role": "regular", "password": "short"}))),
        ("POST", "/api/v1/users", Some(json!({"name": "1a", "role": "regular", "password": "password-1"}))),
        ("POST", "/api/v1/users", Some(json!({"name": "a1", "role": "regular"}))),
        (
            "POST",
            "/api/v1/users",
            Some(json!({"name": "a1", "role": "regular", "password": "password-1", "quota": {"storage": "1G"}})),
        ),
        (
            "POST",
            "/api/v1/users",
            Some(json!({"name": "a1", "role": "power", "password": "password-1", "quota": {"storage": "x"}})),
        ),
        ("POST", "/api/v1/users", Some(json!({"name": "a1", "role": "power", "password": "password-1", "quota": {}}))),
        (
            "POST",
            "/api/v1/users",
            Some(json!({"name": "a1", "role": "regular", "password": "password-1", "parent": "admin"})),
        ),
        // tokens
        ("POST", "/api/v1/tokens", Some(json!({"user": "admin"}))),
        ("POST", "/api/v1/tokens", Some(json!({"user": "admin", "password": "x", "otp": 1}))),
        // jobs and events
        ("GET", "/api/v1/jobs/abc", None),
        ("GET", "/api/v1/events?limit=0", None),
        ("GET", "/api/v1/events?limit=lots", None),
        ("GET", "/api/v1/events?since=3", None),
        // VMs
        ("POST", "/api/v1/vms", Some(json!({"name": "m", "blank_disk": "1M", "cpus": 0}))),
        ("POST", "/api/v1/vms", Some(json!({"name": "m", "blank_disk": "1M", "cpus": 1000}))),
        ("POST", "/api/v1/vms", Some(json!({"name": "m", "blank_disk": "1M", "memory": "1K"}))),
        ("POST", "/api/v1/vms", Some(json!({"name": "m", "blank_disk": "1M", "memory": "1000T"}))),
        ("POST", "/api/v1/vms", Some(json!({"name": "m", "blank_disk": "1000"}))),
        ("POST", "/api/v1/vms", Some(json!({"name": "Bad", "blank_disk": "1M"}))),
        ("POST", "/api/v1/vms", Some(json!({"name": "m"}))),
        ("POST", "/api/v1/vms", Some(json!({"name": "m", "blank_disk": "1M", "boot": ["floppy"]}))),
        ("POST", "/api/v1/vms", Some(json!({"name": "m", "blank_disk": "1M", "nics": ["wifi"]}))),
        ("POST", "/api/v1/vms", Some(json!({"name": "m", "blank_disk": "1M", "nics": [{"tap": "a b"}]}))),
        ("POST", "/api/v1/vms", Some(json!({"name": "m", "blank_disk": "1M", "colour": "red"}))),
        ("POST", "/api/v1/vms", Some(json!({"name": "m", "kernel": {"kernel": "/nonexistent"}}))),
        ("POST", "/api/v1/vms", Some(json!({"name": "m", "disks": ["v", "v"]}))),
        ("PUT", "/api/v1/vms/m0/cdrom", Some(json!({}))),
        ("POST", "/api/v1/vms/m0/disks", Some(json!({"vol": "v"}))),
        ("POST", "/api/v1/vms/m0/clones", Some(json!({"name": "Bad"}))),
        ("POST", "/api/v1/vms/m0/nics", Some(json!({"network": "wifi"}))),
        ("POST", "/api/v1/vms/m0/stop?force=maybe", None),
        ("DELETE", "/api/v1/vms/m0", None),
        ("DELETE", "/api/v1/vms/m0?disks=perhaps", None),
        ("GET", "/api/v1/vms/m0/console?offset=-1", None),
        ("GET", "/api/v1/usage?who=x", None),
        // appliances and backups
        ("POST", "/api/v1/vms/m0/backups", Some(json!({}))),
        ("POST", "/api/v1/vms/m0/backups", Some(json!({"appliance": "Bad Name"}))),
        ("POST", "/api/v1/vms/m0/backups", Some(json!({"appliance": "x".repeat(57)}))),
        ("POST", "/api/v1/vms/m0/restore", Some(json!({"app": "x"}))),
        ("POST", "/api/v1/appliances", Some(json!({"name": "a"}))),
        ("POST", "/api/v1/appliances", Some(json!({"name": "UP", "vm": "m0"}))),
        ("POST", "/api/v1/vms", Some(json!({"name": "m", "from_appliance": 3}))),
    ];
    for (m, path, body) in cases {
        let token = d.token.clone();
        let got = d.call_as(&token, m, path, body.clone());
        assert_eq!(got.0, 400, "{m} {path} {body:?}: {}", got.1);
        assert!(got.1["error"].as_str().is_some_and(|s| !s.is_empty()), "{m} {path}: {}", got.1);
    }
    // ISO names and bodies.
    let put = |name: &str, body: &[u8]| match ureq::put(&format!("{}/api/v1/isos/{name}", d.url()))
        .set("Authorization", &format!("Bearer {}", d.token))
        .send_bytes(body)
    {
        Ok(r) => r.status(),
        Err(ureq::Error::Status(s, _)) => s,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(put("Bad%20Name", b"x"), 400);
    assert_eq!(put("empty", b""), 400);
    assert_eq!(put("ok", b"x"), 201);
    // Nothing of the refused requests was created.
    let (_, vols) = d.call("GET", "/api/v1/volumes", None);
    assert_eq!(vols.as_array().unwrap().len(), 1);
    let (_, users) = d.call("GET", "/api/v1/users", None);
    assert_eq!(users.as_array().unwrap().len(), 1);
    let (_, vms) = d.call("GET", "/api/v1/vms", None);
    assert_eq!(vms.as_array().unwrap().len(), 1, "{vms}");
    // The CLI refuses a bad size before it sends anything... or the API does: either way, an error.
    let out = d.cli(&["volume", "create", "c", "--size", "10X"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("size"), "{}", String::from_utf8_lossy(&out.stderr));
}
