//! Starting the real `keel` daemon for end-to-end tests, and talking to it
//! through the HTTP API and the CLI.

#![allow(dead_code)]

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The `keel` binary under test.
pub const KEEL: &str = env!("CARGO_BIN_EXE_keel");

/// A free loopback port (bound and released; good enough on a test box).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A data directory under /var/tmp (O_DIRECT needs a real file system).
pub fn data_dir() -> tempfile::TempDir {
    let base = std::env::var("KEEL_TEST_DIR").unwrap_or_else(|_| "/var/tmp".into());
    tempfile::Builder::new().prefix("keel-mgmt-test-").tempdir_in(base).unwrap()
}

/// A running daemon.
pub struct Daemon {
    pub child: Option<Child>,
    pub data: PathBuf,
    pub api: u16,
    pub nbd: u16,
    pub iscsi: u16,
    pub token: String,
    pub log: PathBuf,
}

impl Daemon {
    /// Start on fresh ports in `data`.
    pub fn start(data: &Path) -> Daemon {
        // `free_port` lets its port go before the daemon binds it, so a test
        // running alongside may take it meanwhile: then try other ports.
        for _ in 0..5 {
            let ports = (free_port(), free_port(), free_port());
            if let Some(d) = Daemon::try_start(data, &[], ports) {
                return d;
            }
        }
        panic!("keel serve found its ports taken five times over");
    }

    /// Start on fresh ports with extra environment (`KEEL_CONFIG`, ...).
    pub fn start_env(data: &Path, env: &[(&str, &str)]) -> Daemon {
        for _ in 0..5 {
            let ports = (free_port(), free_port(), free_port());
            if let Some(d) = Daemon::try_start(data, env, ports) {
                return d;
            }
        }
        panic!("keel serve found its ports taken five times over");
    }

    /// Start with extra environment and given ports (api, nbd, iscsi).
    pub fn start_with(data: &Path, env: &[(&str, &str)], ports: (u16, u16, u16)) -> Daemon {
        // A restart on the ports a killed daemon held: another test's
        // `free_port` probe may hold one for a moment.
        for _ in 0..20 {
            if let Some(d) = Daemon::try_start(data, env, ports) {
                return d;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("keel serve found its ports {ports:?} taken for 2 s");
    }

    /// Start, or `None` if a port was taken ("Address already in use").
    fn try_start(data: &Path, env: &[(&str, &str)], ports: (u16, u16, u16)) -> Option<Daemon> {
        let (api, nbd, iscsi) = ports;
        let log = data.join(format!("daemon-{}.log", free_port()));
        let out = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(KEEL);
        cmd.args(["serve", "--data"])
            .arg(data)
            .args(["--pool-size", "2G", "--cache", "16M"])
            .args(["--api", &format!("127.0.0.1:{api}")])
            .args(["--nbd", &format!("127.0.0.1:{nbd}")])
            .args(["--iscsi", &format!("127.0.0.1:{iscsi}")])
            .env_remove("KEEL_DATA")
            .env_remove("KEEL_CRASH_POINT")
            .env_remove("KEEL_EXPORT_AUTH")
            // Guests run under TCG unless a test asks for the probe: the
            // KVM probe costs seconds of CPU where KVM hangs.
            .env("KEEL_ACCEL", "tcg")
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap();
        let mut d = Daemon { child: Some(child), data: data.to_path_buf(), api, nbd, iscsi, token: String::new(), log };
        if !d.wait_ready() {
            // Not dropped: dropping kills the data directory's VMs, which
            // the next try adopts.
            std::mem::forget(d);
            return None;
        }
        d.token = read_token(data);
        Some(d)
    }

    /// True once the daemon is up; false if it exited because a port was
    /// taken. Any other exit, or no start within two minutes, fails.
    fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                if self.output().contains("Address already in use") {
                    return false;
                }
                panic!("keel serve exited with {st} before it was up:\n{}", self.output());
            }
            if self.output().contains("keel is up") {
                return true;
            }
            assert!(Instant::now() < deadline, "keel serve did not come up:\n{}", self.output());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// What the daemon printed so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The API base URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.api)
    }

    /// A request with the manager's token.
    pub fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        self.call_as(&self.token.clone(), method, path, body)
    }

    /// The `nbd_url` the API gives for volume `volume` (access key included).
    pub fn nbd_url(&self, volume: &str) -> String {
        let (st, v) = self.call("GET", &format!("/api/v1/volumes/{volume}"), None);
        assert_eq!(st, 200, "volume {volume}: {v}");
        v["nbd_url"].as_str().expect("nbd_url").to_string()
    }

    /// A request with `token` ("" for none).
    pub fn call_as(&self, token: &str, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        call(&self.url(), token, method, path, body)
    }

    /// Run the CLI against this daemon with the manager's token.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.cli_as(&self.token.clone(), args, None)
    }

    /// Run the CLI with `token` and optional stdin.
    pub fn cli_as(&self, token: &str, args: &[&str], stdin: Option<&str>) -> Output {
        let mut cmd = Command::new(KEEL);
        cmd.args(args).env("KEEL_API", self.url()).env("KEEL_TOKEN", token).env_remove("KEEL_DATA");
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        {
            use std::io::Write;
            let mut si = child.stdin.take().unwrap();
            if let Some(s) = stdin {
                si.write_all(s.as_bytes()).unwrap();
            }
        }
        child.wait_with_output().unwrap()
    }

    /// Log in as `user`; returns the token.
    pub fn login(&self, user: &str, password: &str) -> String {
        let (st, v) =
            self.call_as("", "POST", "/api/v1/tokens", Some(serde_json::json!({"user": user, "password": password})));
        assert_eq!(st, 201, "login {user}: {v}");
        v["token"].as_str().unwrap().to_string()
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Wait for the daemon to die on its own (a crash point).
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().unwrap();
        c.wait().unwrap()
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let st = c.wait().unwrap();
            assert!(st.success(), "keel serve did not stop cleanly ({st}):\n{}", self.output());
        }
    }

    /// Restart on the same data directory and ports.
    pub fn restart(&mut self) {
        self.stop();
        let new = Daemon::start_with(&self.data.clone(), &[], (self.api, self.nbd, self.iscsi));
        // Not dropped: dropping kills the data directory's VMs, which the
        // new daemon has just adopted.
        std::mem::forget(std::mem::replace(self, new));
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
        kill_vms(&self.data);
    }
}

/// SIGKILL the QEMUs of the VMs in data directory `data` (they outlive the
/// daemon by design; a test must not leave them behind).
pub fn kill_vms(data: &Path) -> usize {
    let needle = format!("{}/vms/", data.display());
    let mut killed = 0;
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<i32>().ok()) else { continue };
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(&needle) {
            // SAFETY: kill(2) has no memory effects.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            killed += 1;
        }
    }
    killed
}

/// The token in DATA/credentials.
pub fn read_token(data: &Path) -> String {
    let text = std::fs::read_to_string(data.join("credentials")).unwrap();
    let line = text.lines().find(|l| l.starts_with("token")).unwrap();
    line.split('"').nth(1).unwrap().to_string()
}

/// One HTTP request; returns the status and the JSON body (Null if none).
pub fn call(base: &str, token: &str, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let mut r = ureq::request(method, &format!("{base}{path}"));
    if !token.is_empty() {
        r = r.set("Authorization", &format!("Bearer {token}"));
    }
    let res = match body {
        Some(b) => r.send_json(b),
        None => r.call(),
    };
    let resp = match res {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{method} {path}: {e}"),
    };
    let status = resp.status();
    let mut text = String::new();
    resp.into_reader().read_to_string(&mut text).unwrap();
    let v = if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap_or(Value::String(text)) };
    (status, v)
}

/// Assert a JSON error with `status` whose message is not empty.
#[track_caller]
pub fn assert_error(got: (u16, Value), status: u16) -> String {
    assert_eq!(got.0, status, "expected {status}, got {} {}", got.0, got.1);
    let msg = got.1["error"].as_str().unwrap_or_else(|| panic!("no error message in {}", got.1));
    assert!(!msg.is_empty());
    msg.to_string()
}

/// Run the CLI with the manager's token; panic with its output unless it
/// succeeds; its stdout.
#[track_caller]
pub fn cli_ok(d: &Daemon, args: &[&str]) -> String {
    let out = d.cli(args);
    let (o, e) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "keel {args:?} failed: {o}{e}");
    o.into_owned()
}

/// Run a command; panic with its output unless it succeeds.
#[track_caller]
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `qemu-io` on an NBD URL with one command.
pub fn qemu_io(url: &str, cmd: &str) -> Output {
    Command::new("qemu-io").args(["-f", "raw", "-c", cmd, url]).output().unwrap()
}

/// `qemu-io -c "read -P PATTERN OFF LEN"` succeeded and verified.
#[track_caller]
pub fn assert_reads(url: &str, pattern: u8, off: &str, len: &str) {
    let cmd = format!("read -P {pattern:#x} {off} {len}");
    let out = Command::new("qemu-io").args(["-r", "-f", "raw", "-c", &cmd, url]).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success() && text.contains("read ") && !text.to_lowercase().contains("fail"),
        "{url}: reading pattern {pattern:#x} at {off}+{len}: {text}"
    );
}

/// Volume names in the store, read from a stopped daemon's pool with
/// `keel pool`.
pub fn store_volumes(data: &Path) -> Vec<String> {
    let out = run_ok(Command::new(KEEL).args(["pool", "inspect", "--data"]).arg(data));
    let mut v: Vec<String> = out
        .lines()
        .filter(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| !n.contains('@'))
        .map(str::to_string)
        .collect();
    v.sort();
    v
}

/// Start uploading ISO `name` (announcing 10 MiB) and send only the first
/// MiB: the upload job stays running until the connection or the daemon
/// goes away.
pub fn start_stalled_upload(d: &Daemon, name: &str) -> std::net::TcpStream {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", d.api)).unwrap();
    write!(
        s,
        "PUT /api/v1/isos/{name} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Length: 10485760\r\n\r\n",
        d.token
    )
    .unwrap();
    s.write_all(&[7u8; 1 << 20]).unwrap();
    s
}

/// POST a JSON body of 3 MiB (over the API's 2 MiB limit) to create a
/// volume: (status, JSON body).
pub fn post_oversized(d: &Daemon) -> (u16, Value) {
    let big = format!("{{\"name\": \"v\", \"size\": \"1M\", \"pad\": \"{}\"}}", "x".repeat(3 << 20));
    // The server answers 413 and closes the connection while the client
    // may still be sending the rest of the body; the reset that follows
    // can reach the client before it reads the answer (a broken pipe).
    // That is the transport, not the answer under test: try again, a few
    // times at most.
    let mut attempts = 0;
    let (st, body) = loop {
        attempts += 1;
        let r = ureq::post(&format!("{}/api/v1/volumes", d.url()))
            .set("Authorization", &format!("Bearer {}", d.token))
            .set("Content-Type", "application/json")
            .send_string(&big);
        match r {
            Ok(r) => break (r.status(), r.into_string().unwrap()),
            Err(ureq::Error::Status(s, r)) => break (s, r.into_string().unwrap()),
            Err(e @ ureq::Error::Transport(_)) if attempts < 5 => eprintln!("attempt {attempts}: {e}"),
            Err(e) => panic!("{e}"),
        }
    };
    let v = serde_json::from_str(&body).unwrap_or_else(|_| panic!("not JSON: {body}"));
    (st, v)
}

/// An ISO-shaped file whose ISO 9660 volume identifier is `label`.
pub fn iso_with_label(dir: &Path, label: &str) -> std::path::PathBuf {
    let mut b = vec![0u8; 2048 * 18];
    let pvd = 2048 * 16;
    b[pvd] = 1;
    b[pvd + 1..pvd + 6].copy_from_slice(b"CD001");
    let mut id = [b' '; 32];
    id[..label.len()].copy_from_slice(label.as_bytes());
    b[pvd + 40..pvd + 72].copy_from_slice(&id);
    let path = dir.join(format!("{label}.iso"));
    std::fs::write(&path, b).unwrap();
    path
}
