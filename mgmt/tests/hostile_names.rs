//! Names from outside never reach a path unchecked: every kind of name the
//! API takes (in a URL path or a JSON body) is refused with a 400 when it
//! holds `..`, `/`, NUL, control characters, non-UTF-8 bytes or is too long,
//! before anything is looked up; and an uploaded OVA cannot make the daemon
//! read another host file through its disk image.

mod common;

use std::path::Path;

use common::*;
use serde_json::{Value, json};

/// Percent-encode every byte outside `a-z A-Z 0-9 - . _ ~` (so `/`, `.` runs
/// and NUL travel inside one path segment).
fn enc(raw: &[u8]) -> String {
    raw.iter()
        .map(|&b| {
            if b.is_ascii_alphanumeric() || b"-_~".contains(&b) { (b as char).to_string() } else { format!("%{b:02X}") }
        })
        .collect()
}

/// Names no kind takes. `%FF` is not UTF-8.
fn hostile(evil_rel: &str) -> Vec<Vec<u8>> {
    vec![
        evil_rel.as_bytes().to_vec(),
        b"..".to_vec(),
        b"a/b".to_vec(),
        b"/etc/passwd".to_vec(),
        b".hidden".to_vec(),
        b"a\0b".to_vec(),
        b"a\nb".to_vec(),
        b"a\x1b[31m".to_vec(),
        b"a\xffb".to_vec(),
        vec![b'x'; 300],
        vec![b'x'; 20_000],
    ]
}

/// The answer is a 400 with a JSON error that names no host path and quotes
/// nothing of the file the name points at.
#[track_caller]
fn assert_refused(what: &str, got: (u16, Value), data: &Path) {
    let (st, v) = &got;
    assert_eq!(*st, 400, "{what}: expected 400, got {st} {v}");
    let msg = v["error"].as_str().unwrap_or_else(|| panic!("{what}: no error in {v}"));
    let text = v.to_string();
    assert!(!msg.is_empty(), "{what}");
    assert!(!text.contains(data.to_str().unwrap()), "{what}: the data directory shows in {text}");
    // The name itself may be echoed (escaped, cut short); the file it
    // resolves to may not.
    assert!(!text.contains("evil.json"), "{what}: the resolved path shows in {text}");
    assert!(!text.contains("keel-evil-marker"), "{what}: the outside file's content shows in {text}");
    assert!(text.len() < 2000, "{what}: the error echoes too much ({} bytes)", text.len());
}

#[test]
fn appliance_names_cannot_leave_the_library() {
    let dir = data_dir();
    let d = Daemon::start(dir.path());
    // A descriptor-shaped JSON file outside the data directory, and the
    // relative name that would reach it from DATA/library/appliances/.
    let outside = tempfile::tempdir_in("/tmp").unwrap();
    let evil = outside.path().join("evil.json");
    let descriptor = json!({
        "name": "keel-evil-marker", "owner": "admin", "created": 0, "source_vm": null,
        "cpus": 1, "memory_bytes": 1 << 24, "boot": ["disk"], "disks": [],
    });
    std::fs::write(&evil, descriptor.to_string()).unwrap();
    let rel = format!("../../../../../../../../..{}", outside.path().join("evil").display());
    let e = enc(rel.as_bytes());
    cli_ok(&d, &["volume", "create", "disk", "--size", "8M"]);
    let (st, v) = d.call("POST", "/api/v1/vms", Some(json!({"name": "vm", "disks": ["disk"], "nics": []})));
    assert_eq!(st, 201, "{v}");

    assert_refused("GET appliance", d.call("GET", &format!("/api/v1/appliances/{e}"), None), &d.data);
    assert_refused("GET ova", d.call("GET", &format!("/api/v1/appliances/{e}/ova"), None), &d.data);
    assert_refused("verify", d.call("POST", &format!("/api/v1/appliances/{e}/verify"), None), &d.data);
    assert_refused("DELETE appliance", d.call("DELETE", &format!("/api/v1/appliances/{e}"), None), &d.data);
    let restore = |name: &str| d.call("POST", "/api/v1/vms/vm/restore", Some(json!({"appliance": name})));
    assert_refused("restore", restore(&rel), &d.data);
    assert_refused("restore NUL", restore("a\u{1}\u{0}b\u{7f}"), &d.data);
    let backup = d.call("POST", "/api/v1/vms/vm/backups", Some(json!({"appliance": rel})));
    assert_refused("backup", backup, &d.data);
    let from = d.call("POST", "/api/v1/vms", Some(json!({"name": "vm2", "from_appliance": rel, "nics": []})));
    assert_refused("from_appliance", from, &d.data);
    assert!(evil.exists(), "the file outside the data directory is still there");
    assert_eq!(d.call("GET", "/api/v1/vms/vm2", None).0, 404);
}

#[test]
fn every_kind_of_name_is_checked_where_it_comes_in() {
    let dir = data_dir();
    let d = Daemon::start(dir.path());
    cli_ok(&d, &["volume", "create", "vol", "--size", "8M"]);
    cli_ok(&d, &["snapshot", "create", "vol", "snap"]);
    let (st, v) = d.call("POST", "/api/v1/vms", Some(json!({"name": "vm", "disks": ["vol"], "nics": []})));
    assert_eq!(st, 201, "{v}");
    for raw in hostile("../../../../tmp/evil") {
        let n = enc(&raw);
        let show = String::from_utf8_lossy(&raw).chars().take(40).collect::<String>();
        // A whole `..` segment (even as %2E%2E) is resolved by the client's
        // URL parser before it is sent; it goes in bodies below.
        let paths = if raw == b".." {
            vec![]
        } else {
            vec![
                ("GET", format!("/api/v1/volumes/{n}")),
                ("DELETE", format!("/api/v1/volumes/{n}")),
                ("GET", format!("/api/v1/volumes/{n}/snapshots")),
                ("DELETE", format!("/api/v1/volumes/vol/snapshots/{n}")),
                ("GET", format!("/api/v1/volumes/{n}/export")),
                ("GET", format!("/api/v1/pools/{n}")),
                ("GET", format!("/api/v1/users/{n}")),
                ("DELETE", format!("/api/v1/users/{n}")),
                ("DELETE", format!("/api/v1/isos/{n}")),
                ("GET", format!("/api/v1/vms/{n}")),
                ("GET", format!("/api/v1/vms/{n}/console")),
                ("POST", format!("/api/v1/vms/{n}/start")),
                ("DELETE", format!("/api/v1/vms/vm/disks/{n}")),
                ("DELETE", format!("/api/v1/vms/vm/nics/{n}")),
                ("GET", format!("/api/v1/appliances/{n}")),
            ]
        };
        for (method, path) in paths {
            assert_refused(&format!("{method} {path:.80} ({show:?})"), d.call(method, &path, None), &d.data);
        }
        // Bodies: every name field. Non-UTF-8 cannot be sent in JSON; the
        // lossy text stands for it.
        let s = String::from_utf8_lossy(&raw).into_owned();
        for (path, body) in [
            ("/api/v1/volumes", json!({"name": s, "size": "8M"})),
            ("/api/v1/volumes", json!({"name": "ok", "size": "8M", "owner": s})),
            ("/api/v1/volumes/vol/snapshots", json!({"name": s})),
            ("/api/v1/volumes/vol/snapshots/snap/clones", json!({"name": s})),
            ("/api/v1/users", json!({"name": s, "role": "regular", "password": "a long password"})),
            ("/api/v1/vms", json!({"name": s, "disks": ["vol"]})),
            ("/api/v1/vms", json!({"name": "vm3", "disks": [s]})),
            ("/api/v1/vms", json!({"name": "vm3", "iso": s, "boot": ["cdrom"]})),
            ("/api/v1/vms/vm/disks", json!({"volume": s})),
            ("/api/v1/vms/vm/clones", json!({"name": s})),
            ("/api/v1/appliances", json!({"name": s, "vm": "vm"})),
            ("/api/v1/appliances", json!({"name": "ok", "vm": s})),
            ("/api/v1/tokens", json!({"user": s, "password": "x"})),
        ] {
            assert_refused(&format!("POST {path} {show:?}"), d.call("POST", path, Some(body)), &d.data);
        }
        let cd = d.call("PUT", "/api/v1/vms/vm/cdrom", Some(json!({"iso": s})));
        assert_refused(&format!("cdrom {show:?}"), cd, &d.data);
    }
    // The objects are all still there.
    assert_eq!(d.call("GET", "/api/v1/volumes/vol", None).0, 200);
    assert_eq!(d.call("GET", "/api/v1/vms/vm", None).0, 200);
    assert_eq!(d.call("GET", "/api/v1/volumes/vol/snapshots", None).1.as_array().map(Vec::len), Some(1));
}

/// An OVA whose disk is a VMDK text descriptor naming a host file as its
/// extent: qemu-img would read that file into the appliance. Refused.
#[test]
fn an_ova_cannot_import_a_host_file() {
    let dir = data_dir();
    let d = Daemon::start(dir.path());
    let secret = dir.path().join("host-secret");
    std::fs::write(&secret, "keel-evil-marker\n".repeat(64 * 1024)).unwrap();
    let disk = dir.path().join("evil-disk0.vmdk");
    let desc = format!(
        "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n\
         RW 2048 FLAT \"{}\" 0\n{}",
        secret.display(),
        "#\n".repeat(300)
    );
    std::fs::write(&disk, desc).unwrap();
    let sys = keel_images::ova::OvfSystem {
        name: "evil".into(),
        cpus: 1,
        memory_bytes: 64 << 20,
        disks: vec![keel_images::ova::OvfDisk {
            file: "evil-disk0.vmdk".into(),
            capacity_bytes: 1 << 20,
            file_bytes: 0,
        }],
    };
    let ova = dir.path().join("evil.ova");
    keel_images::ova::write_ova(
        &ova,
        "evil.ovf",
        &keel_images::ova::ovf_xml(&sys),
        &[("evil-disk0.vmdk".into(), disk.clone())],
    )
    .unwrap();
    let out = d.cli(&["appliance", "import", ova.to_str().unwrap(), "--name", "evil"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the OVA was imported");
    assert!(err.contains("not a sparse VMDK"), "{err}");
    assert!(!err.contains(dir.path().to_str().unwrap()), "a host path in {err}");
    assert_eq!(d.call("GET", "/api/v1/appliances/evil", None).0, 404);
    assert!(
        !store_volumes(&d.data).iter().any(|v| v.contains("evil")),
        "no base volume is left behind: {:?}",
        store_volumes(&d.data)
    );
}
