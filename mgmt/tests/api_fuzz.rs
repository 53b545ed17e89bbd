//! The HTTP API under schemathesis, a fuzzer that generates requests from
//! the OpenAPI document the daemon serves (`/api/v1/openapi.json`): valid
//! ones, which must be taken, and invalid ones, which must be refused, one
//! by one and in chains that reuse what earlier answers returned. Every
//! check schemathesis has is on (`--checks all`): no 5xx (507, the
//! document's "out of space", aside), statuses, content types, headers and
//! bodies as documented, valid data accepted and invalid data refused,
//! authentication enforced, 404 after a delete, and more; plus Keel's own,
//! in `tests/fuzz/hooks.py`: no answer names a host path, and the power
//! user's answers never name the manager's objects.
//!
//! schemathesis comes from PyPI, pinned by `tests/fuzz/requirements.txt`,
//! in the venv `scripts/install-deps.sh` makes (`/opt/keel-test-venv`, or
//! `KEEL_TEST_VENV`). Without it the test fails and says how to get it.
//!
//! Bounds: each run (the power user's, then the manager's) gets a time
//! budget, 40 s by default; `KEEL_FUZZ_SECONDS` sets it, `KEEL_FUZZ_LONG=1`
//! makes it 600 s, `KEEL_FUZZ_EXAMPLES` caps the test cases per operation
//! and phase, `KEEL_FUZZ_SEED` picks the seed (printed either way, with
//! the command line that repeats a run).

mod common;

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use common::*;
use serde_json::{Value, json};

/// The schemathesis version `tests/fuzz/requirements.txt` pins.
const SCHEMATHESIS_VERSION: &str = "4.32.5";

/// The seed when `KEEL_FUZZ_SEED` does not say.
const DEFAULT_SEED: u64 = 7450;

/// Seconds per run when neither `KEEL_FUZZ_SECONDS` nor `KEEL_FUZZ_LONG` says.
const DEFAULT_SECONDS: u64 = 40;

/// The manager's objects, which the power user must never see named.
const MANAGER_OBJECTS: [&str; 5] =
    ["mgr-secret-vol", "mgr-secret-snap", "mgr-secret-user", "mgr-secret-vm", "mgr-secret-vm-disk0"];

/// Operations left out of the fuzzing, each because it would destroy the
/// credentials the fuzzer runs with (the rest of the run would then see
/// only 401s and test nothing):
/// - `DELETE /api/v1/tokens/current` revokes the very token the request
///   carries. api_contract.rs checks it (a revoked token gets 401).
///
/// Nothing else can: a user cannot delete itself (409), and no operation
/// changes a password or a role. The manager's run may delete the power
/// user, so the power user's run goes first.
const EXCLUDED_PATHS: [&str; 1] = ["/api/v1/tokens/current"];

/// Operations left out because they act on the host at places the fuzzer
/// would choose: `POST /api/v1/pools` makes a pool file at any absolute
/// path a manager gives, or takes a block device or an LVM volume group.
/// mgmt/tests/pools.rs tests it (files, loop devices, refusals).
const EXCLUDED_NAMES: [&str; 1] = ["POST /api/v1/pools"];

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz")
}

/// The `st` of the test venv, checked to be the pinned version.
fn schemathesis() -> PathBuf {
    let venv = std::env::var("KEEL_TEST_VENV").unwrap_or_else(|_| "/opt/keel-test-venv".into());
    let st = Path::new(&venv).join("bin/st");
    let how = format!(
        "run scripts/install-deps.sh: it installs schemathesis=={SCHEMATHESIS_VERSION} into {venv} \
         (KEEL_TEST_VENV picks another place)"
    );
    let out = Command::new(&st)
        .arg("--version")
        .output()
        .unwrap_or_else(|e| panic!("schemathesis is not installed ({}: {e}): {how}", st.display()));
    let version = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && version.contains(SCHEMATHESIS_VERSION),
        "{} is not schemathesis {SCHEMATHESIS_VERSION} ({}{}): {how}",
        st.display(),
        version.trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    st
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(v.trim().parse().unwrap_or_else(|_| panic!("{name}={v:?} is not a number")))
}

/// How the runs are bounded.
struct Bounds {
    seconds: u64,
    examples: Option<u64>,
    seed: u64,
}

impl Bounds {
    fn from_env() -> Bounds {
        let long = std::env::var("KEEL_FUZZ_LONG").is_ok_and(|v| v == "1");
        Bounds {
            seconds: env_u64("KEEL_FUZZ_SECONDS").unwrap_or(if long { 600 } else { DEFAULT_SECONDS }),
            examples: env_u64("KEEL_FUZZ_EXAMPLES"),
            seed: env_u64("KEEL_FUZZ_SEED").unwrap_or(DEFAULT_SEED),
        }
    }
}

/// What one run found.
struct Run {
    who: &'static str,
    ok: bool,
    seconds: f64,
    summary: String,
}

/// Run schemathesis once against the daemon with `token`.
fn fuzz(st: &Path, d: &Daemon, who: &'static str, token: &str, forbidden: &[&str], b: &Bounds) -> Run {
    let reports = tempfile::tempdir().unwrap();
    let schema = format!("{}/api/v1/openapi.json", d.url());
    let mut args: Vec<String> = vec![
        "--config-file".into(),
        fuzz_dir().join("schemathesis.toml").display().to_string(),
        "run".into(),
        schema,
        "--checks".into(),
        "all".into(),
        "--seed".into(),
        b.seed.to_string(),
        "--max-time".into(),
        b.seconds.to_string(),
        // One request at a time: two cores, and the daemon needs one.
        "--workers".into(),
        "1".into(),
        "--request-timeout".into(),
        "60".into(),
        "--no-color".into(),
        "--report".into(),
        "json,ndjson".into(),
        "--report-dir".into(),
        reports.path().display().to_string(),
    ];
    if let Some(n) = b.examples {
        args.extend(["--max-examples".into(), n.to_string()]);
    }
    for p in EXCLUDED_PATHS {
        args.extend(["--exclude-path".into(), p.into()]);
    }
    for n in EXCLUDED_NAMES {
        args.extend(["--exclude-name".into(), n.into()]);
    }
    let shown = format!("st {}", args.join(" "));
    println!("\n===== schemathesis as the {who} =====\n$ {shown} -H 'Authorization: Bearer ...'");
    args.extend(["-H".into(), format!("Authorization: Bearer {token}")]);
    let started = Instant::now();
    let out = Command::new(st)
        .args(&args)
        .env("SCHEMATHESIS_HOOKS", fuzz_dir().join("hooks.py"))
        .env("KEEL_FUZZ_DATA_DIR", &d.data)
        .env("KEEL_FUZZ_FORBIDDEN_NAMES", forbidden.join(","))
        .env("NO_COLOR", "1")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .current_dir(reports.path())
        .output()
        .unwrap();
    let seconds = started.elapsed().as_secs_f64();
    println!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    let summary = summarize(reports.path(), who, b.seed, seconds);
    println!("{summary}");
    Run { who, ok: out.status.success(), seconds, summary }
}

/// Seed, operations, test cases and each check's passes and failures, from
/// the run's JSON and NDJSON reports.
fn summarize(dir: &Path, who: &str, seed: u64, seconds: f64) -> String {
    let find = |ext: &str| {
        std::fs::read_dir(dir).unwrap().flatten().map(|e| e.path()).find(|p| p.extension().is_some_and(|e| e == ext))
    };
    let mut s = format!("schemathesis ({who}): seed {seed}, {seconds:.0} s\n");
    match find("json").map(|p| serde_json::from_str::<Value>(&std::fs::read_to_string(p).unwrap()).unwrap()) {
        Some(r) => {
            let o = &r["operations"];
            let t = &r["test_cases"];
            s += &format!(
                "  operations: {} selected of {}, {} tested\n  test cases: {} generated, {} with failures ({} unique), {} errored\n",
                o["selected"],
                o["total"],
                o["tested"],
                t["generated"],
                t["with_failures"],
                t["unique_failures"],
                t["errored"]
            );
            for f in r["failures"].as_array().into_iter().flatten() {
                s += &format!("  failure {} {}: {} in {}\n", f["code"], f["title"], f["count"], f["operations"]);
            }
            for e in r["errors"].as_array().into_iter().flatten() {
                s += &format!("  error: {e}\n");
            }
        }
        None => s += "  (no JSON report: schemathesis stopped before it ran)\n",
    }
    // Every check's outcome on every test case.
    let mut checks: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    if let Some(p) = find("ndjson") {
        for line in std::io::BufReader::new(std::fs::File::open(p).unwrap()).lines() {
            let Ok(v) = serde_json::from_str::<Value>(&line.unwrap()) else { continue };
            let cases = &v["ScenarioFinished"]["recorder"]["checks"];
            for results in cases.as_object().into_iter().flat_map(|m| m.values()) {
                for c in results.as_array().into_iter().flatten() {
                    let e = checks.entry(c["name"].as_str().unwrap_or("?").to_string()).or_default();
                    if c["status"] == "success" {
                        e.0 += 1;
                    } else {
                        e.1 += 1;
                    }
                }
            }
        }
    }
    s += "  checks (passed / failed):\n";
    for (name, (passed, failed)) in &checks {
        s += &format!("    {name:<30} {passed:>7} / {failed}\n");
    }
    s
}

/// Make the objects the runs start from, and return the power user's token.
fn fixtures(d: &Daemon) -> String {
    let ok = |m: &str, path: &str, body: Value| {
        let (st, v) = d.call(m, path, Some(body));
        assert!(st < 300, "{m} {path}: {st} {v}");
    };
    // The manager's own, with names the power user must never see.
    ok("POST", "/api/v1/volumes", json!({"name": "mgr-secret-vol", "size": "64M"}));
    ok("POST", "/api/v1/volumes/mgr-secret-vol/snapshots", json!({"name": "mgr-secret-snap"}));
    ok("POST", "/api/v1/users", json!({"name": "mgr-secret-user", "role": "regular", "password": "mgr-secret-pw"}));
    ok("POST", "/api/v1/vms", json!({"name": "mgr-secret-vm", "blank_disk": "16M", "memory": "64M", "nics": []}));
    // A power user with a quota, its volume and a regular user under it.
    ok(
        "POST",
        "/api/v1/users",
        json!({"name": "fuzzpower", "role": "power", "password": "fuzzpower-pw",
               "quota": {"cpus": 2, "memory": "1G", "storage": "512M"}}),
    );
    ok("POST", "/api/v1/volumes", json!({"name": "fuzzpower-vol", "size": "32M", "owner": "fuzzpower"}));
    ok(
        "POST",
        "/api/v1/users",
        json!({"name": "fuzzregular", "role": "regular", "password": "fuzzregular-pw", "parent": "fuzzpower"}),
    );
    let token = d.login("fuzzpower", "fuzzpower-pw");
    // The power user sees its own, not the manager's.
    let (st, v) = d.call_as(&token, "GET", "/api/v1/volumes", None);
    assert_eq!(st, 200, "{v}");
    assert!(v.to_string().contains("fuzzpower-vol") && !v.to_string().contains("mgr-secret"), "{v}");
    token
}

#[test]
fn schemathesis_finds_nothing_as_power_user_and_manager() {
    let st = schemathesis();
    let bounds = Bounds::from_env();
    let dir = data_dir();
    // A VM the fuzzer starts stops within seconds (its firmware ignores
    // ACPI, so a stop waits the whole vm_stop_timeout before it forces).
    let config = dir.path().join("fuzz-config.toml");
    std::fs::write(&config, "vm_stop_timeout = 2\n").unwrap();
    let config = config.display().to_string();
    let d = Daemon::start_with(dir.path(), &[("KEEL_CONFIG", &config)], (free_port(), free_port(), free_port()));
    let power = fixtures(&d);

    let runs = [
        fuzz(&st, &d, "power user", &power, &MANAGER_OBJECTS, &bounds),
        fuzz(&st, &d, "manager", &d.token.clone(), &[], &bounds),
    ];

    println!("\n===== summary =====");
    for r in &runs {
        println!("{}: {} in {:.0} s", r.who, if r.ok { "no failures" } else { "FAILURES" }, r.seconds);
        print!("{}", r.summary);
    }
    let failed: Vec<&str> = runs.iter().filter(|r| !r.ok).map(|r| r.who).collect();
    if !failed.is_empty() {
        // What the daemon said about the failures: its warnings, errors and
        // panics (a 500's detail is there under the answer's request id).
        let log = d.output();
        let bad: Vec<&str> =
            log.lines().filter(|l| l.contains("WARN") || l.contains("ERROR") || l.contains("panicked")).collect();
        println!("\n===== the daemon's warnings and errors (last 60 of {}) =====", bad.len());
        for l in &bad[bad.len().saturating_sub(60)..] {
            println!("{l}");
        }
    }
    assert!(
        failed.is_empty(),
        "schemathesis found failures in the run(s) of the {} (see each run's report above; a failure's \
         `curl` line repeats it, and the same seed and command repeat the run)",
        failed.join(" and ")
    );
}
