//! The command line client: the same binary, talking to the HTTP API.
//!
//! Finds the API with `--api`/`KEEL_API` (default
//! `http://127.0.0.1:7450`), the token with `KEEL_TOKEN` or else the
//! `token` line of the credentials file in the data directory
//! (`--data`/`KEEL_DATA`, default `./keel-data`). Prints tables, or the
//! API's JSON with `--json`.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::model::human;

/// A connection to the API.
pub struct Client {
    api: String,
    token: Option<String>,
    agent: ureq::Agent,
    /// Print JSON instead of tables.
    pub json: bool,
}

/// A TLS client configuration that trusts the certificates in the PEM file
/// `ca` (`KEEL_API_CA`: the appliance's own certificate, or the CA that
/// signed it), for an `https://` API.
fn tls_trusting(ca: &Path) -> Result<std::sync::Arc<tokio_rustls::rustls::ClientConfig>> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    use tokio_rustls::rustls;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).with_context(|| format!("reading {}", ca.display()))? {
        roots.add(c.with_context(|| format!("parsing {}", ca.display()))?).context("a certificate it holds")?;
    }
    if roots.is_empty() {
        bail!("{} holds no PEM certificate", ca.display());
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(std::sync::Arc::new(config))
}

/// Read `token = "..."` from a credentials file.
pub fn token_from_credentials(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let v: toml::Table = toml::from_str(&text).ok()?;
    v.get("token")?.as_str().map(str::to_string)
}

impl Client {
    /// A client for `api`; the token from `token` or the credentials in
    /// `data`.
    pub fn new(api: &str, token: Option<String>, data: &Path, json: bool) -> Client {
        let token = token.filter(|t| !t.is_empty()).or_else(|| token_from_credentials(&data.join("credentials")));
        let mut agent = ureq::AgentBuilder::new();
        if let Some(ca) = std::env::var_os("KEEL_API_CA").filter(|v| !v.is_empty()) {
            match tls_trusting(Path::new(&ca)) {
                Ok(c) => agent = agent.tls_config(c),
                Err(e) => {
                    eprintln!("keel: KEEL_API_CA: {e:#}");
                    std::process::exit(2);
                }
            }
        }
        Client { api: api.trim_end_matches('/').to_string(), token, agent: agent.build(), json }
    }

    fn req(&self, method: &str, path: &str) -> ureq::Request {
        let r = self.agent.request(method, &format!("{}/api/v1{path}", self.api));
        match &self.token {
            Some(t) => r.set("Authorization", &format!("Bearer {t}")),
            None => r,
        }
    }

    fn done(&self, r: Result<ureq::Response, ureq::Error>) -> Result<Value> {
        match r {
            Ok(resp) => {
                if resp.status() == 204 {
                    return Ok(Value::Null);
                }
                let text = resp.into_string().context("reading the API's answer")?;
                Ok(serde_json::from_str(&text).unwrap_or(Value::String(text)))
            }
            Err(ureq::Error::Status(code, resp)) => {
                let text = resp.into_string().unwrap_or_default();
                let msg = serde_json::from_str::<Value>(&text)
                    .ok()
                    .and_then(|v| v["error"].as_str().map(str::to_string))
                    .unwrap_or(text);
                let hint = if code == 401 && self.token.is_none() {
                    " (no token: set KEEL_TOKEN, or run on the appliance where DATA/credentials is readable)"
                } else {
                    ""
                };
                bail!("{msg}{hint} [HTTP {code}]")
            }
            Err(e) => bail!(
                "cannot reach the Keel API at {}: {e}; is `keel serve` running? (set --api or KEEL_API)",
                self.api
            ),
        }
    }

    /// GET.
    pub fn get(&self, path: &str) -> Result<Value> {
        self.done(self.req("GET", path).call())
    }
    /// DELETE.
    pub fn delete(&self, path: &str) -> Result<Value> {
        self.done(self.req("DELETE", path).call())
    }
    /// A request with a JSON body.
    pub fn send(&self, method: &str, path: &str, body: Value) -> Result<Value> {
        self.done(self.req(method, path).send_json(body))
    }

    /// Upload a file with progress on stderr.
    pub fn upload(&self, path: &str, file: &Path) -> Result<Value> {
        let f = std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
        let total = f.metadata()?.len();
        use std::io::IsTerminal;
        let tty = !self.json && std::io::stderr().is_terminal();
        let reader = Progress { inner: f, done: 0, total, last: u64::MAX, tty };
        let r = self
            .req("PUT", path)
            .set("Content-Type", "application/octet-stream")
            .set("Content-Length", &total.to_string())
            .send(reader);
        if tty {
            eprintln!();
        } else if !self.json {
            eprintln!("sent {} ({total} bytes)", human(total));
        }
        self.done(r)
    }

    /// GET `path` into `file` (written to a temporary name, renamed when
    /// complete), with progress on stderr; returns the bytes written.
    pub fn download(&self, path: &str, file: &Path) -> Result<u64> {
        let resp = match self.req("GET", path).call() {
            Ok(r) => r,
            Err(e) => {
                self.done(Err(e))?;
                unreachable!("done returns the error");
            }
        };
        let total: u64 = resp.header("Content-Length").and_then(|v| v.parse().ok()).unwrap_or(0);
        use std::io::IsTerminal;
        let tty = !self.json && std::io::stderr().is_terminal();
        let mut reader = Progress { inner: resp.into_reader(), done: 0, total, last: u64::MAX, tty };
        let tmp = file.with_extension("part");
        let mut out = std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let n = std::io::copy(&mut reader, &mut out).with_context(|| format!("writing {}", tmp.display()))?;
        out.sync_all()?;
        if tty {
            eprintln!();
        }
        if total != 0 && n != total {
            let _ = std::fs::remove_file(&tmp);
            bail!("the download stopped after {n} of {total} bytes");
        }
        std::fs::rename(&tmp, file).with_context(|| format!("renaming to {}", file.display()))?;
        Ok(n)
    }

    /// Print `v` as JSON, or run `table` for humans.
    pub fn print(&self, v: &Value, table: impl FnOnce(&Value)) {
        if self.json {
            println!("{}", serde_json::to_string_pretty(v).expect("JSON prints"));
        } else {
            table(v);
        }
    }
}

struct Progress<R> {
    inner: R,
    done: u64,
    total: u64,
    last: u64,
    tty: bool,
}

impl<R: Read> Read for Progress<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.done += n as u64;
        let pct = (self.done * 100).checked_div(self.total).unwrap_or(100);
        if self.tty && pct != self.last {
            self.last = pct;
            let bar = "#".repeat((pct / 4) as usize);
            eprint!("\r[{bar:<25}] {pct:>3}% {} of {}", human(self.done), human(self.total));
        }
        Ok(n)
    }
}

pub(crate) fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        v => v.to_string(),
    }
}

pub(crate) fn table(headers: &[&str], rows: Vec<Vec<String>>) {
    let mut w: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        let s: Vec<String> = cells.iter().enumerate().map(|(i, c)| format!("{c:<width$}", width = w[i])).collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r);
    }
}

fn volume_rows(v: &Value) -> Vec<Vec<String>> {
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|x| {
                    vec![
                        s(&x["name"]),
                        s(&x["owner"]),
                        match x["state"].as_str() {
                            Some("unavailable") => format!("{} (offline)", s(&x["pool"])),
                            _ => s(&x["pool"]),
                        },
                        human(x["size_bytes"].as_u64().unwrap_or(0)),
                        human(x["allocated_bytes"].as_u64().unwrap_or(0)),
                        x["snapshots"].as_array().map_or(0, |a| a.len()).to_string(),
                        s(&x["nbd_url"]),
                    ]
                })
                .collect()
        })
        .unwrap_or_default()
}

pub(crate) fn print_kv(v: &Value, keys: &[&str]) {
    for k in keys {
        let val = &v[*k];
        let shown = match (*k, val) {
            (k, Value::Number(n)) if k.ends_with("_bytes") => format!("{} ({n})", human(n.as_u64().unwrap_or(0))),
            (_, Value::Array(a)) => a.iter().map(s).collect::<Vec<_>>().join(", "),
            _ => s(val),
        };
        println!("{k:<16} {shown}");
    }
}

/// Split `VOLUME@SNAPSHOT`.
pub fn split_snap(s: &str) -> Result<(&str, &str)> {
    match s.split_once('@') {
        Some((v, sn)) if !v.is_empty() && !sn.is_empty() => Ok((v, sn)),
        _ => bail!("{s:?} is not VOLUME@SNAPSHOT"),
    }
}

/// `keel volume ...`.
pub fn volume(c: &Client, cmd: VolumeCmd) -> Result<()> {
    match cmd {
        VolumeCmd::Create { name, size, owner, pool } => {
            let mut b = json!({"name": name, "size": size});
            if let Some(o) = owner {
                b["owner"] = o.into();
            }
            if let Some(p) = pool {
                b["pool"] = p.into();
            }
            let v = c.send("POST", "/volumes", b)?;
            c.print(&v, |v| {
                println!(
                    "created volume {} ({}): {}",
                    s(&v["name"]),
                    human(v["size_bytes"].as_u64().unwrap_or(0)),
                    s(&v["nbd_url"])
                )
            });
        }
        VolumeCmd::Move { name, pool } => {
            let v = c.send("POST", &format!("/volumes/{}/move", seg(&name)?), json!({"pool": pool}))?;
            c.print(&v, |v| println!("volume {} is now in pool {}", s(&v["name"]), s(&v["pool"])));
        }
        VolumeCmd::List => {
            let v = c.get("/volumes")?;
            c.print(&v, |v| table(&["NAME", "OWNER", "POOL", "SIZE", "ALLOCATED", "SNAPS", "NBD URL"], volume_rows(v)));
        }
        VolumeCmd::Show { name } => {
            let v = c.get(&format!("/volumes/{}", seg(&name)?))?;
            c.print(&v, |v| {
                print_kv(
                    v,
                    &[
                        "name",
                        "owner",
                        "pool",
                        "state",
                        "reason",
                        "size_bytes",
                        "allocated_bytes",
                        "origin",
                        "snapshots",
                        "nbd_url",
                        "iscsi_url",
                        "nbd_sessions",
                    ],
                )
            });
        }
        VolumeCmd::Resize { name, size } => {
            let v = c.send("PATCH", &format!("/volumes/{}", seg(&name)?), json!({"size": size}))?;
            c.print(&v, |v| {
                println!("volume {} is now {}", s(&v["name"]), human(v["size_bytes"].as_u64().unwrap_or(0)))
            });
        }
        VolumeCmd::Delete { name, recursive } => {
            let q = if recursive { "?recursive=true" } else { "" };
            c.delete(&format!("/volumes/{}{}", seg(&name)?, q))?;
            c.print(&json!({"deleted": name}), |_| println!("deleted volume {name}"));
        }
        VolumeCmd::Import { file, name, owner } => {
            // An absolute path: qemu-img takes `-x` as an option and
            // `proto:...` (json:, nbd:, ...) as a protocol, not as a file.
            let file = std::fs::canonicalize(&file).with_context(|| format!("{}: no such file", file.display()))?;
            let info = std::process::Command::new("qemu-img")
                .args(["info", "--output=json"])
                .arg(&file)
                .output()
                .context("running qemu-img (install qemu-utils)")?;
            if !info.status.success() {
                bail!(
                    "{} is not a disk image qemu-img reads: {}",
                    file.display(),
                    String::from_utf8_lossy(&info.stderr).trim()
                );
            }
            let info: Value = serde_json::from_slice(&info.stdout).context("qemu-img info's JSON")?;
            let size = info["virtual-size"].as_u64().context("qemu-img info gave no virtual size")?;
            let format = info["format"].as_str().unwrap_or("raw").to_string();
            let size = size.div_ceil(512) * 512;
            let mut b = json!({"name": name, "size": size});
            if let Some(o) = owner {
                b["owner"] = o.into();
            }
            let v = c.send("POST", "/volumes", b)?;
            let url = s(&v["nbd_url"]);
            let converted =
                qemu_img_convert(&["-f", &format, "-O", "raw", "-n"], &file.display().to_string(), &url, c.json);
            if let Err(e) = converted {
                let _ = c.delete(&format!("/volumes/{}", seg(&name)?));
                return Err(e.context(format!("importing {} (the volume was removed again)", file.display())));
            }
            c.print(&v, |v| {
                println!(
                    "imported {} ({format}) as volume {} ({}): {}",
                    file.display(),
                    s(&v["name"]),
                    human(size),
                    s(&v["nbd_url"])
                )
            });
        }
        VolumeCmd::Export { name, file, format } => {
            if !["raw", "qcow2", "vmdk", "vdi", "vhdx"].contains(&format.as_str()) {
                bail!("format {format:?} is not raw, qcow2, vmdk, vdi or vhdx");
            }
            let url = match name.split_once('@') {
                None => s(&c.get(&format!("/volumes/{}", seg(&name)?))?["nbd_url"]),
                Some((vol, sn)) => {
                    seg(sn)?;
                    let snaps = c.get(&format!("/volumes/{}/snapshots", seg(vol)?))?;
                    let found = snaps.as_array().and_then(|a| a.iter().find(|x| x["name"] == sn));
                    found
                        .map(|x| s(&x["nbd_url"]))
                        .with_context(|| format!("volume {vol} has no snapshot {sn}: `keel snapshot list {vol}`"))?
                }
            };
            let mut opts = vec!["-f", "raw", "-O", format.as_str()];
            if format == "vmdk" {
                opts.extend(["-o", "subformat=streamOptimized"]);
            }
            qemu_img_convert(&opts, &url, &file.display().to_string(), c.json)?;
            c.print(&json!({"exported": name, "file": file, "format": format}), |_| {
                println!("exported {name} to {} ({format})", file.display())
            });
        }
        VolumeCmd::Clone { source, name } => {
            let (vol, snap) = split_snap(&source)?;
            let v = c.send(
                "POST",
                &format!("/volumes/{}/snapshots/{}/clones", seg(vol)?, seg(snap)?),
                json!({"name": name}),
            )?;
            c.print(&v, |v| println!("cloned {source} to volume {}: {}", s(&v["name"]), s(&v["nbd_url"])));
        }
    }
    Ok(())
}

/// `qemu-img convert OPTS SRC DST` with its progress on stderr (`-p`) for
/// people.
fn qemu_img_convert(opts: &[&str], src: &str, dst: &str, quiet: bool) -> Result<()> {
    use std::io::IsTerminal;
    let mut cmd = std::process::Command::new("qemu-img");
    cmd.arg("convert").args(opts);
    if !quiet && std::io::stderr().is_terminal() {
        cmd.arg("-p");
    }
    let out = cmd.arg(src).arg(dst).stdout(std::process::Stdio::inherit()).output().context("running qemu-img")?;
    if !out.status.success() {
        bail!("qemu-img convert {src} -> {dst} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// `keel snapshot ...`.
pub fn snapshot(c: &Client, cmd: SnapshotCmd) -> Result<()> {
    match cmd {
        SnapshotCmd::Create { volume, name } => {
            let v = c.send("POST", &format!("/volumes/{}/snapshots", seg(&volume)?), json!({"name": name}))?;
            c.print(&v, |v| println!("created snapshot {volume}@{}: {}", s(&v["name"]), s(&v["nbd_url"])));
        }
        SnapshotCmd::List { volume } => {
            let v = c.get(&format!("/volumes/{}/snapshots", seg(&volume)?))?;
            c.print(&v, |v| {
                let rows = v
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .map(|x| {
                                vec![
                                    s(&x["name"]),
                                    human(x["size_bytes"].as_u64().unwrap_or(0)),
                                    human(x["allocated_bytes"].as_u64().unwrap_or(0)),
                                    s(&x["nbd_url"]),
                                ]
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                table(&["NAME", "SIZE", "ALLOCATED", "NBD URL"], rows)
            });
        }
        SnapshotCmd::Delete { volume, name } => {
            c.delete(&format!("/volumes/{}/snapshots/{}", seg(&volume)?, seg(&name)?))?;
            c.print(&json!({"deleted": format!("{volume}@{name}")}), |_| println!("deleted snapshot {volume}@{name}"));
        }
    }
    Ok(())
}

/// `keel iso ...`.
pub fn iso(c: &Client, cmd: IsoCmd) -> Result<()> {
    match cmd {
        IsoCmd::Upload { file, name } => {
            let name = match name {
                Some(n) => n,
                None => file
                    .file_stem()
                    .map(|s| s.to_string_lossy().to_lowercase())
                    .context("the file has no name: pass --name")?,
            };
            // The server refuses a taken name before reading the body, and
            // a client still sending a large body then sees the connection
            // reset instead of the answer: ask first.
            let taken = c.get("/isos")?.as_array().is_some_and(|a| a.iter().any(|i| i["name"] == name.as_str()));
            if taken {
                bail!("ISO {name} already exists in the store: ISOs are kept once; delete it first or pick --name");
            }
            let v = c.upload(&format!("/isos/{}", seg(&name)?), &file)?;
            c.print(&v, |v| {
                println!("uploaded ISO {} ({})", s(&v["name"]), human(v["size_bytes"].as_u64().unwrap_or(0)))
            });
        }
        IsoCmd::List => {
            let v = c.get("/isos")?;
            c.print(&v, |v| {
                let rows = v
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .map(|x| vec![s(&x["name"]), human(x["size_bytes"].as_u64().unwrap_or(0)), s(&x["owner"])])
                            .collect()
                    })
                    .unwrap_or_default();
                table(&["NAME", "SIZE", "OWNER"], rows)
            });
        }
        IsoCmd::Delete { name } => {
            c.delete(&format!("/isos/{}", seg(&name)?))?;
            c.print(&json!({"deleted": name}), |_| println!("deleted ISO {name}"));
        }
    }
    Ok(())
}

/// `keel user ...`.
pub fn user(c: &Client, cmd: UserCmd) -> Result<()> {
    match cmd {
        UserCmd::Create { name, role, password_stdin, parent, quota_storage, quota_cpus, quota_memory } => {
            let password = if password_stdin {
                let mut p = String::new();
                std::io::stdin().read_to_string(&mut p).context("reading the password from stdin")?;
                p.trim_end_matches(['\n', '\r']).to_string()
            } else {
                let p = crate::auth::new_password();
                eprintln!("password for {name}: {p}");
                p
            };
            let mut b = json!({"name": name, "role": role, "password": password});
            if let Some(p) = parent {
                b["parent"] = p.into();
            }
            if let Some(st) = quota_storage {
                b["quota"] = json!({"storage": st, "cpus": quota_cpus.unwrap_or(0), "memory": quota_memory.unwrap_or_else(|| "0".into())});
            }
            let v = c.send("POST", "/users", b)?;
            c.print(&v, |v| println!("created {} user {}", s(&v["role"]), s(&v["name"])));
        }
        UserCmd::List => {
            let v = c.get("/users")?;
            c.print(&v, |v| {
                let rows = v
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .map(|x| {
                                let quota = x["quota"]["storage_bytes"].as_u64().map_or("-".into(), |q| {
                                    format!("{} of {}", human(x["storage_used_bytes"].as_u64().unwrap_or(0)), human(q))
                                });
                                vec![s(&x["name"]), s(&x["role"]), s(&x["parent"]), quota]
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                table(&["NAME", "ROLE", "PARENT", "STORAGE"], rows)
            });
        }
        UserCmd::Delete { name } => {
            c.delete(&format!("/users/{}", seg(&name)?))?;
            c.print(&json!({"deleted": name}), |_| println!("deleted user {name}"));
        }
        UserCmd::Logout => {
            c.delete("/tokens/current")?;
            c.print(&json!({"revoked": true}), |_| println!("token revoked"));
        }
        UserCmd::Login { name, password_stdin } => {
            if !password_stdin {
                bail!("pass the password on stdin with --password-stdin");
            }
            let mut p = String::new();
            std::io::stdin().read_to_string(&mut p)?;
            let v = c.send("POST", "/tokens", json!({"user": name, "password": p.trim_end_matches(['\n', '\r'])}))?;
            c.print(&v, |v| println!("{}", s(&v["token"])));
        }
    }
    Ok(())
}

/// `keel export ...`.
pub fn export(c: &Client, cmd: ExportCmd) -> Result<()> {
    let show =
        |v: &Value| print_kv(v, &["volume", "nbd_url", "nbd_sessions", "iqn", "iscsi_url", "initiators", "chap_user"]);
    match cmd {
        ExportCmd::Show { volume } => {
            let v = c.get(&format!("/volumes/{}/export", seg(&volume)?))?;
            c.print(&v, show);
        }
        ExportCmd::Set { volume, initiator, chap_user, chap_secret_stdin } => {
            let mut b = json!({"initiators": initiator});
            if let Some(u) = chap_user {
                if !chap_secret_stdin {
                    bail!("--chap-user needs the secret on stdin (--chap-secret-stdin)");
                }
                let mut secret = String::new();
                std::io::stdin().read_to_string(&mut secret).context("reading the CHAP secret from stdin")?;
                b["chap_user"] = u.into();
                b["chap_secret"] = secret.trim_end_matches(['\n', '\r']).into();
            }
            let v = c.send("PUT", &format!("/volumes/{}/export", seg(&volume)?), b)?;
            c.print(&v, show);
        }
        ExportCmd::RotateKey { volume } => {
            let v = c.send("POST", &format!("/volumes/{}/export/key", seg(&volume)?), json!({}))?;
            c.print(&v, show);
        }
    }
    Ok(())
}

/// `keel job list` and `keel event list`.
pub fn jobs_and_events(c: &Client, events: bool, after: u64, limit: usize) -> Result<()> {
    if events {
        let v = c.get(&format!("/events?after={after}&limit={limit}"))?;
        c.print(&v, |v| {
            let rows = v
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|e| {
                            vec![
                                s(&e["id"]),
                                s(&e["time"]),
                                s(&e["user"]),
                                s(&e["action"]),
                                s(&e["target"]),
                                s(&e["detail"]),
                            ]
                        })
                        .collect()
                })
                .unwrap_or_default();
            table(&["ID", "TIME", "USER", "ACTION", "TARGET", "DETAIL"], rows)
        });
    } else {
        let v = c.get("/jobs")?;
        c.print(&v, |v| {
            let rows = v
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|j| {
                            let pct = j["progress_percent"].as_f64().map_or("-".into(), |p| format!("{p:.0}%"));
                            vec![
                                s(&j["id"]),
                                s(&j["kind"]),
                                s(&j["target"]),
                                s(&j["owner"]),
                                s(&j["state"]),
                                pct,
                                s(&j["error"]),
                            ]
                        })
                        .collect()
                })
                .unwrap_or_default();
            table(&["ID", "KIND", "TARGET", "OWNER", "STATE", "PROGRESS", "ERROR"], rows)
        });
    }
    Ok(())
}

/// `keel export` subcommands.
#[derive(clap::Subcommand)]
pub enum ExportCmd {
    /// Show a volume's NBD and iSCSI exports.
    Show {
        /// Volume.
        volume: String,
    },
    /// Set a volume's iSCSI access (replaces the initiator list and CHAP).
    Set {
        /// Volume.
        volume: String,
        /// Initiator IQN allowed to log in (repeat; none allows any).
        #[arg(long)]
        initiator: Vec<String>,
        /// CHAP user (the secret is read from stdin).
        #[arg(long, requires = "chap_secret_stdin")]
        chap_user: Option<String>,
        /// Read the CHAP secret (12 to 16 characters) from stdin.
        #[arg(long)]
        chap_secret_stdin: bool,
    },
    /// Give a volume a new access key: the NBD and iSCSI URLs handed out
    /// before stop working (refused while clients are connected).
    RotateKey {
        /// Volume.
        volume: String,
    },
}

/// `keel volume` subcommands.
#[derive(clap::Subcommand)]
pub enum VolumeCmd {
    /// Create a thin volume.
    Create {
        /// Name (a-z, 0-9, '.', '-').
        name: String,
        /// Size: bytes or with a K/M/G/T suffix.
        #[arg(long)]
        size: String,
        /// Owner (default: you).
        #[arg(long)]
        owner: Option<String>,
        /// Pool (default: the default pool).
        #[arg(long)]
        pool: Option<String>,
    },
    /// Move a volume with its snapshots to another pool, online (VMs and
    /// NBD clients that reconnect keep using it).
    Move {
        /// Name.
        name: String,
        /// The pool to move it to.
        #[arg(long)]
        pool: String,
    },
    /// List the volumes you can see.
    List,
    /// Show one volume.
    Show {
        /// Name.
        name: String,
    },
    /// Grow a volume.
    Resize {
        /// Name.
        name: String,
        /// New size.
        #[arg(long)]
        size: String,
    },
    /// Delete a volume.
    Delete {
        /// Name.
        name: String,
        /// Delete its snapshots too.
        #[arg(long)]
        recursive: bool,
    },
    /// Make a writable clone of a snapshot.
    Clone {
        /// VOLUME@SNAPSHOT.
        source: String,
        /// Name of the new volume.
        name: String,
    },
    /// Make a volume from a disk image (any format qemu-img reads: raw,
    /// qcow2, vmdk, vdi, vhdx...), written over NBD, with progress.
    Import {
        /// The image file.
        file: PathBuf,
        /// Name of the new volume.
        #[arg(long)]
        name: String,
        /// Owner (default: you).
        #[arg(long)]
        owner: Option<String>,
    },
    /// Write a volume (or VOLUME@SNAPSHOT) to a disk image file, read over
    /// NBD, with progress.
    Export {
        /// Volume, or VOLUME@SNAPSHOT for a point in time.
        name: String,
        /// The image file to write.
        file: PathBuf,
        /// raw, qcow2, vmdk, vdi or vhdx.
        #[arg(long, default_value = "raw")]
        format: String,
    },
}

/// `keel pool` subcommands.
#[derive(clap::Subcommand)]
pub enum PoolCmd {
    /// List this node's pools.
    List,
    /// Show one pool.
    Show {
        /// Name.
        name: String,
    },
    /// Add a pool: on a new (or empty) file, a whole block device, or a new
    /// LVM logical volume.
    Create {
        /// Name (a-z, 0-9, '.', '-').
        name: String,
        /// A file to make (needs --size), or an empty file or Keel pool file.
        #[arg(long)]
        file: Option<String>,
        /// A block device (empty, or a Keel pool) to take whole.
        #[arg(long)]
        device: Option<String>,
        /// A volume group to make the pool's logical volume in (needs --size).
        #[arg(long)]
        lvm: Option<String>,
        /// Size of a new file or logical volume: bytes or K/M/G/T.
        #[arg(long)]
        size: Option<String>,
        /// Tier label (e.g. fast, normal).
        #[arg(long)]
        tier: Option<String>,
        /// Take a device or file that holds something else (it is lost).
        #[arg(long)]
        force: bool,
    },
    /// Grow a pool online: a file or LV to --size; without it, to what its
    /// file or device has now.
    Grow {
        /// Name.
        name: String,
        /// New size (files and LVM pools).
        #[arg(long)]
        size: Option<String>,
    },
    /// Remove a pool that holds no volumes (a file or LV Keel made goes).
    Remove {
        /// Name.
        name: String,
        /// Forget an offline pool and its volumes' records.
        #[arg(long)]
        force: bool,
    },
}

fn pool_rows(v: &Value) -> Vec<Vec<String>> {
    let one = |x: &Value| {
        vec![
            s(&x["name"]),
            s(&x["kind"]),
            x["tier"].as_str().unwrap_or("-").to_string(),
            match x["state"].as_str() {
                Some("offline") => format!("offline: {}", s(&x["reason"])),
                _ => "online".into(),
            },
            human(x["total_bytes"].as_u64().unwrap_or(0)),
            human(x["allocated_bytes"].as_u64().unwrap_or(0)),
            human(x["free_bytes"].as_u64().unwrap_or(0)),
            human(x["provisioned_bytes"].as_u64().unwrap_or(0)),
            x["volumes"].as_u64().unwrap_or(0).to_string(),
        ]
    };
    match v.as_array() {
        Some(a) => a.iter().map(one).collect(),
        None => vec![one(v)],
    }
}

const POOL_HEAD: [&str; 9] = ["NAME", "KIND", "TIER", "STATE", "SIZE", "ALLOCATED", "FREE", "PROVISIONED", "VOLUMES"];

/// `keel pool ...`.
pub fn pool(c: &Client, cmd: PoolCmd) -> Result<()> {
    match cmd {
        PoolCmd::List => {
            let v = c.get("/pools")?;
            c.print(&v, |v| table(&POOL_HEAD, pool_rows(v)));
        }
        PoolCmd::Show { name } => {
            let v = c.get(&format!("/pools/{}", seg(&name)?))?;
            c.print(&v, |v| {
                print_kv(
                    v,
                    &[
                        "name",
                        "kind",
                        "tier",
                        "state",
                        "reason",
                        "path",
                        "vg",
                        "lv",
                        "total_bytes",
                        "allocated_bytes",
                        "free_bytes",
                        "provisioned_bytes",
                        "volumes",
                    ],
                )
            });
        }
        PoolCmd::Create { name, file, device, lvm, size, tier, force } => {
            let mut b = json!({"name": name});
            for (k, v) in [("file", file), ("device", device), ("lvm", lvm), ("size", size), ("tier", tier)] {
                if let Some(v) = v {
                    b[k] = v.into();
                }
            }
            if force {
                b["force"] = true.into();
            }
            let v = c.send("POST", "/pools", b)?;
            c.print(&v, |v| {
                println!(
                    "created pool {} ({}, {})",
                    s(&v["name"]),
                    s(&v["kind"]),
                    human(v["total_bytes"].as_u64().unwrap_or(0))
                )
            });
        }
        PoolCmd::Grow { name, size } => {
            let b = match size {
                Some(sz) => json!({"size": sz}),
                None => json!({}),
            };
            let v = c.send("POST", &format!("/pools/{}/grow", seg(&name)?), b)?;
            c.print(&v, |v| {
                println!("pool {} is now {}", s(&v["name"]), human(v["total_bytes"].as_u64().unwrap_or(0)))
            });
        }
        PoolCmd::Remove { name, force } => {
            let q = if force { "?force=true" } else { "" };
            c.delete(&format!("/pools/{}{}", seg(&name)?, q))?;
            c.print(&json!({"removed": name}), |_| println!("removed pool {name}"));
        }
    }
    Ok(())
}

/// `keel snapshot` subcommands.
#[derive(clap::Subcommand)]
pub enum SnapshotCmd {
    /// Take a snapshot.
    Create {
        /// Volume.
        volume: String,
        /// Snapshot name.
        name: String,
    },
    /// List a volume's snapshots.
    List {
        /// Volume.
        volume: String,
    },
    /// Delete a snapshot.
    Delete {
        /// Volume.
        volume: String,
        /// Snapshot name.
        name: String,
    },
}

/// `keel iso` subcommands.
#[derive(clap::Subcommand)]
pub enum IsoCmd {
    /// Upload an ISO (streamed, progress on stderr).
    Upload {
        /// The file.
        file: PathBuf,
        /// Name in the store (default: the file name without extension).
        #[arg(long)]
        name: Option<String>,
    },
    /// List the ISOs.
    List,
    /// Delete an ISO.
    Delete {
        /// Name.
        name: String,
    },
}

/// `keel user` subcommands.
#[derive(clap::Subcommand)]
pub enum UserCmd {
    /// Create a user (the password is generated and printed unless
    /// --password-stdin).
    Create {
        /// Name.
        name: String,
        /// manager, power or regular.
        #[arg(long)]
        role: String,
        /// Read the password from stdin.
        #[arg(long)]
        password_stdin: bool,
        /// Power user to create it under (managers only).
        #[arg(long)]
        parent: Option<String>,
        /// Storage quota of a power user (K/M/G/T).
        #[arg(long)]
        quota_storage: Option<String>,
        /// CPU quota of a power user.
        #[arg(long)]
        quota_cpus: Option<u32>,
        /// Memory quota of a power user (K/M/G/T).
        #[arg(long)]
        quota_memory: Option<String>,
    },
    /// List the users you can see.
    List,
    /// Delete a user.
    Delete {
        /// Name.
        name: String,
    },
    /// Revoke the token in use (KEEL_TOKEN or the credentials file's).
    Logout,
    /// Get a token for a user (password on stdin); prints it.
    Login {
        /// Name.
        name: String,
        /// Read the password from stdin.
        #[arg(long)]
        password_stdin: bool,
    },
}

/// A name as one URL path segment. Names that would change the path's
/// meaning (`..`, `/`, `?`, `#`, `%`, control characters) are refused here,
/// before a request goes out: `keel snapshot delete vol ../../other` must
/// not become a request about volume `other`.
pub(crate) fn seg(name: &str) -> Result<&str> {
    let bad = name.is_empty()
        || name == "."
        || name == ".."
        || name.chars().any(|c| matches!(c, '/' | '?' | '#' | '%' | '\\') || c.is_control() || c == ' ');
    if bad {
        anyhow::bail!(
            "{name:?} is not a valid name (no '/', '?', '#', '%', spaces or control characters, not '.' or '..')"
        );
    }
    Ok(name)
}
