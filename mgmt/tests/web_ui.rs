//! The web UI in a real browser: headless Chromium (Debian's `chromium`,
//! driven by `playwright-core` from npm; scripts/install-deps.sh installs
//! both) against a real daemon and the test guest. Each test sets up what
//! its scenario needs through the API, then runs `mgmt/tests/ui/ui.test.mjs
//! SCENARIO`, which fails with the check that did not hold. Screenshots of
//! the main pages land in `target/ui-artifacts/SCENARIO/`.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{Daemon, data_dir};
use serde_json::{Value, json};

fn ui_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/ui")
}

fn artifacts(scenario: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("ui-artifacts").join(scenario)
}

/// Run one scenario of the browser tests; panics with its output if it fails.
fn browse(scenario: &str, facts: Value) {
    let dir = ui_dir();
    assert!(
        dir.join("node_modules/playwright-core").is_dir() && dir.join("node_modules/axe-core").is_dir(),
        "no browser test tools in {}/node_modules: run scripts/install-deps.sh (npm ci there)",
        dir.display()
    );
    assert!(std::path::Path::new("/usr/bin/chromium").exists(), "no /usr/bin/chromium: run scripts/install-deps.sh");
    let mut facts = facts;
    facts["artifacts"] = artifacts(scenario).display().to_string().into();
    // Steps go to stderr as they start (the test's own stderr: shown when
    // it fails or hangs); checks and failures to stdout.
    let out = Command::new("node")
        .arg("ui.test.mjs")
        .arg(scenario)
        .current_dir(&dir)
        .env("KEEL_UI", facts.to_string())
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("cannot run node: run scripts/install-deps.sh");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "browser scenario {scenario} failed:\n{text}");
    assert!(text.contains("all checks passed"), "{text}");
    println!("{text}");
}

fn ok(got: (u16, Value), want: u16) -> Value {
    assert_eq!(got.0, want, "{}", got.1);
    got.1
}

fn user(d: &Daemon, name: &str, role: &str, extra: Value) -> Value {
    let mut body = json!({ "name": name, "role": role, "password": format!("{name}-password") });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    ok(d.call("POST", "/api/v1/users", Some(body)), 201);
    json!({ "name": name, "password": format!("{name}-password") })
}

fn manager(d: &Daemon) -> Value {
    let creds = std::fs::read_to_string(d.data.join("credentials")).unwrap();
    let password = creds.lines().find_map(|l| l.strip_prefix("password = ")).unwrap().trim_matches('"').to_string();
    json!({ "name": "admin", "password": password })
}

#[test]
fn each_role_sees_only_its_own_and_changes_need_the_csrf_token() {
    let dir = data_dir();
    let d = Daemon::start(dir.path());
    let quota = json!({ "quota": { "cpus": 4, "memory": "2G", "storage": "4G" } });
    let pa = user(&d, "tenant-a", "power", quota.clone());
    let pb = user(&d, "tenant-b", "power", quota);
    let ta = d.login("tenant-a", "tenant-a-password");
    let tb = d.login("tenant-b", "tenant-b-password");
    ok(d.call_as(&ta, "POST", "/api/v1/volumes", Some(json!({"name": "a-vol", "size": "1G"}))), 201);
    ok(d.call_as(&ta, "POST", "/api/v1/volumes", Some(json!({"name": "a-scratch", "size": "1G"}))), 201);
    ok(d.call_as(&tb, "POST", "/api/v1/volumes", Some(json!({"name": "b-vol", "size": "1G"}))), 201);
    ok(d.call_as(&ta, "POST", "/api/v1/volumes/a-vol/snapshots", Some(json!({"name": "s1"}))), 201);
    browse(
        "roles",
        json!({
            "url": d.url(),
            "users": { "manager": manager(&d), "power": pa, "other": pb },
            "a_volume": "a-vol", "a_scratch": "a-scratch", "b_volume": "b-vol",
        }),
    );
    // What the browser did went through the API's operations: the deletion
    // it confirmed happened, the refused forms left nothing.
    ok(d.call("GET", "/api/v1/volumes/a-scratch", None), 404);
    ok(d.call("GET", "/api/v1/volumes/csrf-probe", None), 404);
    ok(d.call("GET", "/api/v1/volumes/too-big", None), 404);
    ok(d.call("GET", "/api/v1/volumes/a-vol", None), 200);
}

#[test]
fn a_manager_builds_a_vm_from_an_iso_watches_its_console_clones_and_backs_it_up() {
    let dir = data_dir();
    let d = Daemon::start(dir.path());
    let iso = keel_tests::guest::iso_path();
    browse(
        "manager",
        json!({
            "url": d.url(),
            "token": d.token,
            "users": { "manager": manager(&d) },
            "iso": iso,
            "backup_bytes": 128u64 << 20,
        }),
    );
    let vms = ok(d.call("GET", "/api/v1/vms", None), 200);
    let names: Vec<&str> = vms.as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap()).collect();
    assert!(names.contains(&"web") && names.contains(&"web2"), "{vms}");
    let a = ok(d.call("GET", "/api/v1/appliances/web-backup", None), 200);
    assert!(a["logical_bytes"].as_u64().unwrap() >= 1 << 30, "{a}");
    for vm in ["web", "web2"] {
        ok(d.call("POST", &format!("/api/v1/vms/{vm}/stop?force=true"), None), 200);
    }
}

#[test]
fn a_regular_user_powers_its_vm_changes_its_cd_and_opens_its_consoles() {
    let dir = data_dir();
    let d = Daemon::start_env(dir.path(), &[("KEEL_CONSOLE_TICKET_TTL", "2")]);
    user(&d, "boss", "power", json!({ "quota": { "cpus": 4, "memory": "2G", "storage": "8G" } }));
    let tboss = d.login("boss", "boss-password");
    let reg = user(&d, "clerk", "regular", json!({ "parent": "boss" }));
    ok(
        d.call_as(
            &tboss,
            "POST",
            "/api/v1/users",
            Some(json!({"name": "other-clerk", "role": "regular", "password": "other-clerk-pw"})),
        ),
        201,
    );
    // ISOs in the store: one with a known volume label for the CD change.
    let label = "KEELCD-UI";
    let iso = common::iso_with_label(dir.path(), label);
    common::cli_ok(&d, &["iso", "upload", iso.to_str().unwrap(), "--name", "tools"]);
    let g = keel_tests::guest::ensure_guest();
    for (vm, owner) in [("desk", "clerk"), ("desk2", "other-clerk")] {
        ok(
            d.call_as(
                &tboss,
                "POST",
                "/api/v1/volumes",
                Some(json!({"name": format!("{vm}-disk"), "size": "64M", "owner": owner})),
            ),
            201,
        );
        let body = json!({
            "name": vm,
            "memory": "256M",
            "owner": owner,
            "disks": [format!("{vm}-disk")],
            "kernel": {
                "kernel": g.join("vmlinuz"),
                "initrd": g.join("initramfs.cpio.gz"),
                // The kernel's messages on the screen too, for the graphical console.
                "append": "console=tty0 console=ttyS0 panic=-1 keel.action=vm",
            },
            "start": vm == "desk",
        });
        ok(d.call("POST", "/api/v1/vms", Some(body)), 201);
    }
    browse(
        "regular",
        json!({
            "url": d.url(),
            "token": d.token,
            "users": { "regular": reg },
            "vm": "desk", "other_vm": "desk2",
            "iso_name": "tools", "iso_label": label,
            "ticket_ttl": 2,
        }),
    );
    let v = ok(d.call("GET", "/api/v1/vms/desk", None), 200);
    assert_eq!(v["cdrom"], "tools", "{v}");
    assert_eq!(v["state"], "running", "{v}");
    ok(d.call("POST", "/api/v1/vms/desk/stop?force=true", None), 200);
}
