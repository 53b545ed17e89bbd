//! Failed logins slow a guesser down, per client address and per user,
//! without locking the user out of the addresses it uses; the API speaks
//! HTTPS when given a certificate. Driven with curl from several loopback
//! addresses (127.0.0.0/8 is all local), as separate clients would.

mod common;

use std::process::Command;

use common::*;
use serde_json::{Value, json};

/// POST /api/v1/tokens from `from`: (status, Retry-After, body).
fn login_from(d: &Daemon, from: &str, user: &str, password: &str) -> (u16, Option<u64>, Value) {
    let body = json!({"user": user, "password": password}).to_string();
    let out = Command::new("curl")
        .args(["-s", "-i", "--interface", from, "-H", "content-type: application/json", "--data-binary", &body])
        .arg(format!("{}/api/v1/tokens", d.url()))
        .output()
        .expect("curl");
    assert!(out.status.success(), "curl from {from}: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout).replace("\r\n", "\n");
    let (head, body) = text.split_once("\n\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).expect("a status line");
    let retry = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("retry-after:").map(|v| v.trim().parse().unwrap()));
    (status, retry, serde_json::from_str(body).unwrap_or(Value::Null))
}

#[test]
fn failed_logins_back_off_per_address_and_user_but_known_addresses_get_in() {
    let dir = data_dir();
    let d = Daemon::start(dir.path());
    let (st, v) = d.call(
        "POST",
        "/api/v1/users",
        Some(
            json!({"name": "alice", "role": "power", "password": "alice's long password", "quota": {"storage": "1G"}}),
        ),
    );
    assert_eq!(st, 201, "{v}");
    let good = "alice's long password";
    // Alice's own machine.
    assert_eq!(login_from(&d, "127.0.0.1", "alice", good).0, 201);

    // A guesser elsewhere: three free failures, then a lock that doubles.
    let guesser = "127.0.0.2";
    for i in 0..3 {
        let (st, _, v) = login_from(&d, guesser, "alice", &format!("guess {i}"));
        assert_eq!(st, 401, "free failure {i}: {v}");
    }
    assert_eq!(login_from(&d, guesser, "alice", "guess 3").0, 401, "the fourth failure is answered, then locks");
    let (st, retry, v) = login_from(&d, guesser, "alice", good);
    assert_eq!(st, 429, "locked: even the right password is not checked now: {v}");
    assert_eq!(retry, Some(1), "{v}");
    let msg = v["error"].as_str().unwrap();
    assert!(msg.contains("try again in 1 s"), "{msg}");
    assert!(v["request_id"].is_string());

    // Two more failures, each once the lock before it ended, make the lock
    // 4 s: long enough to look at it from other addresses, even on a busy
    // machine where a password check takes a while.
    for (guess, wait) in [("guess 4", 2), ("guess 5", 4)] {
        std::thread::sleep(std::time::Duration::from_millis(1000 * wait / 2 + 100));
        assert_eq!(login_from(&d, guesser, "alice", guess).0, 401, "{guess}");
        let (st, retry, v) = login_from(&d, guesser, "alice", good);
        assert_eq!((st, retry), (429, Some(wait)), "{v}");
    }
    // A new address is held by the user's lock (short, and it says so)...
    let (st, retry, v) = login_from(&d, "127.0.0.3", "alice", good);
    assert_eq!(st, 429, "{v}");
    assert!(v["error"].as_str().unwrap().contains("user alice") && retry.unwrap() <= 60, "{v}");
    // ... Alice's known address is not ...
    assert_eq!(login_from(&d, "127.0.0.1", "alice", good).0, 201, "alice gets in from her own machine");
    // ... and the lock was still on meanwhile.
    let (st, _, v) = login_from(&d, "127.0.0.4", "alice", good);
    assert_eq!(st, 429, "the user's lock held while alice logged in: {v}");
    // Other users on a new address are not affected.
    assert_eq!(login_from(&d, "127.0.0.3", "admin", "wrong").0, 401);
    // The log says who failed from where.
    assert!(d.output().contains("failed login") && d.output().contains("127.0.0.2"), "{}", d.output());
}

#[test]
fn the_api_speaks_https_with_a_certificate() {
    let dir = data_dir();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    let (crt, key) = (dir.path().join("api.crt"), dir.path().join("api.key"));
    std::fs::write(&crt, cert.cert.pem()).unwrap();
    std::fs::write(&key, cert.signing_key.serialize_pem()).unwrap();
    let conf = dir.path().join("keel.toml");
    std::fs::write(&conf, format!("api_tls_cert = {:?}\napi_tls_key = {:?}\n", crt, key)).unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let d = Daemon::start_env(&data, &[("KEEL_CONFIG", conf.to_str().unwrap())]);
    let https = format!("https://127.0.0.1:{}", d.api);
    let creds = std::fs::read_to_string(data.join("credentials")).unwrap();
    assert!(creds.contains(&format!("api = \"{https}\"")), "{creds}");

    // curl trusting the certificate: a login and an authenticated call.
    let body = json!({"user": "admin", "password": password_of(&data)}).to_string();
    let out = Command::new("curl")
        .args(["-s", "--fail-with-body", "--cacert", crt.to_str().unwrap(), "-H", "content-type: application/json"])
        .args(["--data-binary", &body, &format!("{https}/api/v1/tokens")])
        .output()
        .unwrap();
    assert!(out.status.success(), "{} {}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["token"].as_str().unwrap().starts_with("keel_"));
    // Without trusting it, curl refuses the server; plain HTTP gets no API.
    let out = Command::new("curl").args(["-s", &format!("{https}/api/v1/openapi.json")]).output().unwrap();
    assert_eq!(out.status.code(), Some(60), "an untrusted certificate is refused by curl");
    let out = Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("http://127.0.0.1:{}/api/v1/openapi.json", d.api),
        ])
        .output()
        .unwrap();
    assert_ne!(String::from_utf8_lossy(&out.stdout), "200", "plain HTTP must not be served on the TLS port");
    // The CLI, given the certificate to trust.
    let out = Command::new(KEEL)
        .args(["volume", "create", "over-tls", "--size", "8M"])
        .env("KEEL_API", &https)
        .env("KEEL_API_CA", &crt)
        .env("KEEL_DATA", &data)
        .env_remove("KEEL_TOKEN")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = Command::new(KEEL)
        .args(["volume", "list"])
        .env("KEEL_API", &https)
        .env("KEEL_DATA", &data)
        .env_remove("KEEL_API_CA")
        .env_remove("KEEL_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success(), "the CLI must not trust an unknown certificate");
}

fn password_of(data: &std::path::Path) -> String {
    let text = std::fs::read_to_string(data.join("credentials")).unwrap();
    let v: toml::Table = toml::from_str(&text).unwrap();
    v["password"].as_str().unwrap().to_string()
}
