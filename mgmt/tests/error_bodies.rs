//! What an error tells a client: what failed and what to do, with a request
//! id; never a host path or an internal error's text. The detail goes to the
//! daemon's log under that id.

mod common;

use common::*;
use serde_json::json;

#[test]
fn an_internal_failure_is_a_500_with_a_request_id_and_no_host_path() {
    let dir = data_dir();
    let d = Daemon::start(dir.path());
    // The ISO store cannot be made: its directory's name is taken by a file.
    let isos = d.data.join("isos");
    let _ = std::fs::remove_dir_all(&isos);
    std::fs::write(&isos, b"not a directory").unwrap();
    let r = ureq::put(&format!("{}/api/v1/isos/boot", d.url()))
        .set("Authorization", &format!("Bearer {}", d.token))
        .send_bytes(&[1u8; 4096]);
    let resp = match r {
        Err(ureq::Error::Status(_, r)) => r,
        other => panic!("expected an error status, got {other:?}"),
    };
    assert_eq!(resp.status(), 500);
    let header_id = resp.header("x-request-id").expect("x-request-id header").to_string();
    let v: serde_json::Value = serde_json::from_reader(resp.into_reader()).unwrap();
    let id = v["request_id"].as_str().expect("request_id in the body");
    assert_eq!(id, header_id);
    let msg = v["error"].as_str().unwrap();
    assert!(msg.contains("storing the ISO") && msg.contains(id), "{msg}");
    assert!(!msg.contains(d.data.to_str().unwrap()) && !msg.contains("os error"), "{msg}");
    // The log has the id with the full detail.
    let log = d.output();
    let line = log.lines().find(|l| l.contains(id) && l.contains("ERROR")).unwrap_or_else(|| panic!("{log}"));
    assert!(line.contains(isos.to_str().unwrap()) || line.contains("File exists"), "{line}");
}

#[test]
fn every_error_carries_a_request_id() {
    let dir = data_dir();
    let d = Daemon::start(dir.path());
    for (method, path, body, status) in [
        ("GET", "/api/v1/volumes/nope", None, 404),
        ("GET", "/api/v1/no-such-endpoint", None, 404),
        ("PATCH", "/api/v1/whoami", None, 405),
        ("POST", "/api/v1/volumes", Some(json!({"name": "x"})), 400),
        ("GET", "/api/v1/volumes/a%FFb", None, 400),
    ] {
        let (st, v) = d.call(method, path, body);
        assert_eq!(st, status, "{method} {path}: {v}");
        let id = v["request_id"].as_str().unwrap_or_else(|| panic!("{method} {path}: {v}"));
        assert_eq!(id.len(), 16, "{v}");
        assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
    }
    let (st, v) = call(&d.url(), "", "GET", "/api/v1/volumes", None);
    assert_eq!(st, 401);
    assert!(v["request_id"].is_string(), "{v}");
}

/// Inputs a fuzzer found to break the daemon: an event cursor at u64::MAX
/// (an overflow panic), and volumes of hundreds of terabytes on a 2 GiB pool
/// (thin, so allowed, until a backup of one built a manifest of a billion
/// entries: 12 GiB of memory).
#[test]
fn extreme_numbers_get_answers_not_panics_or_huge_allocations() {
    let dir = data_dir();
    let d = Daemon::start(dir.path());
    let (st, v) = d.call("GET", &format!("/api/v1/events?after={}", u64::MAX), None);
    assert_eq!(st, 200, "{v}");
    assert_eq!(v, json!([]));
    for size in [json!(818_455_410_376_704u64), json!("17T"), json!(u64::MAX - 511)] {
        let e = assert_error(d.call("POST", "/api/v1/volumes", Some(json!({"name": "huge", "size": size}))), 400);
        assert!(e.contains("16 TiB"), "{e}");
    }
    assert_eq!(d.call("POST", "/api/v1/volumes", Some(json!({"name": "big", "size": "16T"}))).0, 201);
    let e = assert_error(d.call("PATCH", "/api/v1/volumes/big", Some(json!({"size": "17T"}))), 400);
    assert!(e.contains("16 TiB"), "{e}");
    let vm = json!({"name": "vm", "blank_disk": "100T", "nics": []});
    let e = assert_error(d.call("POST", "/api/v1/vms", Some(vm)), 400);
    assert!(e.contains("16 TiB"), "{e}");
}
