//! `keel vm ...` and `keel usage`: the VM commands of the CLI.

use std::io::BufRead;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::cli::{Client, print_kv, s, seg, table};
use crate::model::{human, parse_size};

/// `keel vm` subcommands.
#[derive(clap::Subcommand)]
pub enum VmCmd {
    /// Create a VM (stopped unless --start).
    Create(Box<CreateArgs>),
    /// Back up a VM (running or not) into the appliance library.
    Backup {
        /// VM.
        name: String,
        /// Name of the new appliance.
        #[arg(long)]
        appliance: String,
        /// Return once the job starts instead of waiting for it.
        #[arg(long)]
        no_wait: bool,
    },
    /// Overwrite a stopped VM's disks with an appliance's content.
    Restore {
        /// VM.
        name: String,
        /// The appliance (a backup of it, or any with as many disks).
        #[arg(long)]
        appliance: String,
    },
    /// Start a VM.
    Start {
        /// Name.
        name: String,
    },
    /// Stop a VM: ACPI shutdown, forced after a timeout.
    Stop {
        /// Name.
        name: String,
        /// Power off at once, without asking the guest.
        #[arg(long)]
        force: bool,
    },
    /// Reset a running VM.
    Reset {
        /// Name.
        name: String,
    },
    /// Delete a VM (asks whether its disks go too unless told).
    Delete {
        /// Name.
        name: String,
        /// Delete its disks too.
        #[arg(long, conflicts_with = "keep_disks")]
        disks: bool,
        /// Keep its disks as volumes.
        #[arg(long)]
        keep_disks: bool,
        /// Stop it first if it runs.
        #[arg(long)]
        force: bool,
    },
    /// List the VMs you can see.
    List,
    /// Show one VM.
    Show {
        /// Name.
        name: String,
    },
    /// The serial console so far.
    Log {
        /// Name.
        name: String,
        /// Keep following it.
        #[arg(short, long)]
        follow: bool,
    },
    /// Change the CD of a VM (live when it runs).
    Cd {
        /// Name.
        name: String,
        /// ISO from the ISO store.
        #[arg(required_unless_present = "eject")]
        iso: Option<String>,
        /// Eject the CD.
        #[arg(long, conflicts_with = "iso")]
        eject: bool,
    },
    /// Clone a VM, running or not: its disks at one instant, a new
    /// identity, started when the source runs.
    Clone {
        /// Source VM.
        source: String,
        /// New VM.
        name: String,
        /// Owner of the new VM (default: you).
        #[arg(long)]
        owner: Option<String>,
    },
    /// Hot-plug or unplug a disk.
    #[command(subcommand)]
    Disk(DiskCmd),
    /// Hot-plug or unplug a NIC.
    #[command(subcommand)]
    Nic(NicCmd),
}

/// `keel vm create` arguments.
#[derive(clap::Args)]
pub struct CreateArgs {
    /// Name (a-z, 0-9, '.', '-').
    name: String,
    /// Virtual CPUs [default: 1, or the appliance's].
    #[arg(long)]
    cpus: Option<u32>,
    /// Memory (K/M/G) [default: 512M, or the appliance's].
    #[arg(long)]
    memory: Option<String>,
    /// Attach an existing volume (repeat; in boot order).
    #[arg(long)]
    disk: Vec<String>,
    /// Make a new empty disk NAME-disk0 of this size, attached first.
    #[arg(long)]
    blank_disk: Option<String>,
    /// ISO from the ISO store in the CD-ROM.
    #[arg(long)]
    iso: Option<String>,
    /// Boot this kernel directly (managers only).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initrd for --kernel.
    #[arg(long, requires = "kernel")]
    initrd: Option<PathBuf>,
    /// Kernel command line for --kernel.
    #[arg(long, requires = "kernel", allow_hyphen_values = true)]
    append: Option<String>,
    /// NIC: user, tap:IFNAME or bridge:BRIDGE (repeat; default one
    /// user-mode NIC; `none` for no NIC).
    #[arg(long)]
    nic: Vec<String>,
    /// Boot order, e.g. cdrom,disk [default: disk,cdrom].
    #[arg(long)]
    boot: Option<String>,
    /// Owner (default: you).
    #[arg(long)]
    owner: Option<String>,
    /// Make its disks from this appliance (its CPUs, memory and boot
    /// order too, unless given).
    #[arg(long)]
    from_appliance: Option<String>,
    /// Start it once created.
    #[arg(long)]
    start: bool,
}

/// `keel vm disk` subcommands.
#[derive(clap::Subcommand)]
pub enum DiskCmd {
    /// Attach a volume to a VM.
    Attach {
        /// VM.
        vm: String,
        /// Volume.
        volume: String,
    },
    /// Detach a volume from a VM.
    Detach {
        /// VM.
        vm: String,
        /// Volume.
        volume: String,
    },
}

/// `keel vm nic` subcommands.
#[derive(clap::Subcommand)]
pub enum NicCmd {
    /// Add a NIC.
    Add {
        /// VM.
        vm: String,
        /// user, tap:IFNAME or bridge:BRIDGE.
        #[arg(long, default_value = "user")]
        network: String,
    },
    /// Remove a NIC by its id (nic0, nic1, ...).
    Remove {
        /// VM.
        vm: String,
        /// NIC id.
        id: String,
    },
}

/// `user`, `tap:IF`, `bridge:BR` as the API's JSON.
pub fn network(s: &str) -> Result<Value> {
    Ok(match s.split_once(':') {
        None if s == "user" => json!("user"),
        Some(("tap", i)) => json!({ "tap": i }),
        Some(("bridge", b)) => json!({ "bridge": b }),
        _ => bail!("network {s:?} is not user, tap:IFNAME or bridge:BRIDGE"),
    })
}

fn abs(p: PathBuf) -> Result<String> {
    let a = std::fs::canonicalize(&p).with_context(|| format!("{}", p.display()))?;
    Ok(a.display().to_string())
}

fn vm_rows(v: &Value) -> Vec<Vec<String>> {
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|x| {
                    vec![
                        s(&x["name"]),
                        s(&x["owner"]),
                        s(&x["state"]),
                        s(&x["cpus"]),
                        human(x["memory_bytes"].as_u64().unwrap_or(0)),
                        x["disks"]
                            .as_array()
                            .map(|d| d.iter().map(|d| s(&d["volume"])).collect::<Vec<_>>().join(","))
                            .unwrap_or_default(),
                        s(&x["cdrom"]),
                    ]
                })
                .collect()
        })
        .unwrap_or_default()
}

fn said(c: &Client, v: &Value, what: &str) {
    c.print(v, |v| println!("VM {} {what}: {}", s(&v["name"]), s(&v["state"])));
}

/// `keel vm ...`.
pub fn vm(c: &Client, cmd: VmCmd) -> Result<()> {
    match cmd {
        VmCmd::Create(a) => {
            let CreateArgs {
                name,
                cpus,
                memory,
                disk,
                blank_disk,
                iso,
                kernel,
                initrd,
                append,
                nic,
                boot,
                owner,
                from_appliance,
                start,
            } = *a;
            let mut b = json!({"name": name, "disks": disk, "start": start});
            if let Some(c) = cpus {
                b["cpus"] = json!(c);
            }
            if let Some(m) = memory {
                b["memory"] = json!(parse_size(&m).map_err(anyhow::Error::msg)?);
            }
            if let Some(a) = from_appliance {
                b["from_appliance"] = json!(a);
            }
            if let Some(s) = blank_disk {
                b["blank_disk"] = json!(s);
            }
            if let Some(i) = iso {
                b["iso"] = json!(i);
            }
            if let Some(k) = kernel {
                let mut kb = json!({"kernel": abs(k)?, "append": append.unwrap_or_default()});
                if let Some(i) = initrd {
                    kb["initrd"] = json!(abs(i)?);
                }
                b["kernel"] = kb;
            }
            if !nic.is_empty() {
                let nics: Vec<Value> =
                    if nic == ["none"] { Vec::new() } else { nic.iter().map(|n| network(n)).collect::<Result<_>>()? };
                b["nics"] = json!(nics);
            }
            if let Some(o) = boot {
                b["boot"] = json!(o.split(',').map(str::trim).collect::<Vec<_>>());
            }
            if let Some(o) = owner {
                b["owner"] = json!(o);
            }
            let v = c.send("POST", "/vms", b)?;
            said(c, &v, "created");
        }
        VmCmd::Start { name } => {
            let v = c.send("POST", &format!("/vms/{}/start", seg(&name)?), json!({}))?;
            said(c, &v, "started");
        }
        VmCmd::Stop { name, force } => {
            let q = if force { "?force=true" } else { "" };
            let v = c.send("POST", &format!("/vms/{}/stop{q}", seg(&name)?), json!({}))?;
            said(c, &v, "stopped");
        }
        VmCmd::Reset { name } => {
            let v = c.send("POST", &format!("/vms/{}/reset", seg(&name)?), json!({}))?;
            said(c, &v, "reset");
        }
        VmCmd::Delete { name, disks, keep_disks, force } => {
            let delete_disks = if disks || keep_disks {
                disks
            } else {
                let vm = c.get(&format!("/vms/{}", seg(&name)?))?;
                let vols: Vec<String> = vm["disks"].as_array().into_iter().flatten().map(|d| s(&d["volume"])).collect();
                if vols.is_empty() {
                    false
                } else {
                    eprint!("Delete VM {name}'s disks too ({})? [y/N] ", vols.join(", "));
                    let mut line = String::new();
                    let n = std::io::stdin().lock().read_line(&mut line)?;
                    if n == 0 {
                        bail!("no answer on stdin: say --disks (delete them) or --keep-disks");
                    }
                    matches!(line.trim(), "y" | "Y" | "yes")
                }
            };
            let q = format!(
                "?disks={}{}",
                if delete_disks { "delete" } else { "keep" },
                if force { "&force=true" } else { "" }
            );
            c.delete(&format!("/vms/{}{q}", seg(&name)?))?;
            let what = if delete_disks { "with its disks" } else { "its disks kept" };
            c.print(&json!({"deleted": name, "disks_deleted": delete_disks}), |_| {
                println!("deleted VM {name} ({what})")
            });
        }
        VmCmd::List => {
            let v = c.get("/vms")?;
            c.print(&v, |v| table(&["NAME", "OWNER", "STATE", "CPUS", "MEMORY", "DISKS", "CD"], vm_rows(v)));
        }
        VmCmd::Show { name } => {
            let v = c.get(&format!("/vms/{}", seg(&name)?))?;
            c.print(&v, |v| {
                print_kv(
                    v,
                    &["name", "owner", "state", "cpus", "memory_bytes", "cdrom", "boot", "pid", "error", "started"],
                );
                for d in v["disks"].as_array().into_iter().flatten() {
                    println!("{:<16} {} {}", format!("disk {}", s(&d["id"])), s(&d["volume"]), s(&d["nbd_url"]));
                }
                for n in v["nics"].as_array().into_iter().flatten() {
                    println!("{:<16} {} {}", format!("nic {}", s(&n["id"])), s(&n["mac"]), n["network"]);
                }
            });
        }
        VmCmd::Log { name, follow } => {
            let path = format!("/vms/{}/console", seg(&name)?);
            let mut offset = 0u64;
            loop {
                let v = c.get(&format!("{path}?offset={offset}"))?;
                let text = v["text"].as_str().unwrap_or("");
                use std::io::Write;
                let mut out = std::io::stdout().lock();
                match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
                    Ok(()) => {}
                    // The reader went away (`keel vm log X | grep -q ...`).
                    Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
                    Err(e) => return Err(e.into()),
                }
                offset = v["offset"].as_u64().unwrap_or(offset);
                if !follow {
                    break;
                }
                if text.is_empty() {
                    std::thread::sleep(Duration::from_millis(300));
                }
            }
        }
        VmCmd::Cd { name, iso, eject } => {
            let iso = if eject { None } else { iso };
            let v = c.send("PUT", &format!("/vms/{}/cdrom", seg(&name)?), json!({ "iso": iso }))?;
            c.print(&v, |v| {
                println!("VM {}: CD {}", s(&v["name"]), if eject { "ejected".into() } else { s(&v["cdrom"]) })
            });
        }
        VmCmd::Clone { source, name, owner } => {
            let mut b = json!({ "name": name });
            if let Some(o) = owner {
                b["owner"] = json!(o);
            }
            let v = c.send("POST", &format!("/vms/{}/clones", seg(&source)?), b)?;
            c.print(&v, |v| {
                println!(
                    "cloned {source} to VM {} ({}) in {:.0} ms; {source} was paused {:.1} ms ({})",
                    s(&v["vm"]["name"]),
                    s(&v["vm"]["state"]),
                    v["stats"]["total_ms"].as_f64().unwrap_or(0.0),
                    v["stats"]["paused_ms"].as_f64().unwrap_or(0.0),
                    s(&v["stats"]["consistency"]),
                )
            });
        }
        VmCmd::Backup { name, appliance, no_wait } => {
            let job = c.send("POST", &format!("/vms/{}/backups", seg(&name)?), json!({ "appliance": appliance }))?;
            finish_backup(c, &job, no_wait)?;
        }
        VmCmd::Restore { name, appliance } => {
            let v = c.send("POST", &format!("/vms/{}/restore", seg(&name)?), json!({ "appliance": appliance }))?;
            said(c, &v, &format!("restored from {appliance}"));
        }
        VmCmd::Disk(DiskCmd::Attach { vm, volume }) => {
            let v = c.send("POST", &format!("/vms/{}/disks", seg(&vm)?), json!({ "volume": volume }))?;
            said(c, &v, &format!("has {volume} attached"));
        }
        VmCmd::Disk(DiskCmd::Detach { vm, volume }) => {
            let v = c.delete(&format!("/vms/{}/disks/{}", seg(&vm)?, seg(&volume)?))?;
            said(c, &v, &format!("has {volume} detached"));
        }
        VmCmd::Nic(NicCmd::Add { vm, network: n }) => {
            let v = c.send("POST", &format!("/vms/{}/nics", seg(&vm)?), json!({ "network": network(&n)? }))?;
            said(c, &v, "has a new NIC");
        }
        VmCmd::Nic(NicCmd::Remove { vm, id }) => {
            let v = c.delete(&format!("/vms/{}/nics/{}", seg(&vm)?, seg(&id)?))?;
            said(c, &v, &format!("has NIC {id} removed"));
        }
    }
    Ok(())
}

/// Wait for job `id`, with a progress bar on stderr; its final view.
pub fn wait_job(c: &Client, id: u64) -> Result<Value> {
    use std::io::IsTerminal;
    let tty = !c.json && std::io::stderr().is_terminal();
    loop {
        let j = c.get(&format!("/jobs/{id}"))?;
        if tty {
            let pct = j["progress_percent"].as_f64().unwrap_or(0.0);
            let bar = "#".repeat((pct / 4.0) as usize);
            eprint!("\r[{bar:<25}] {pct:>5.1}% {}", s(&j["kind"]));
        }
        match j["state"].as_str() {
            Some("running") => std::thread::sleep(Duration::from_millis(200)),
            Some("failed") => {
                if tty {
                    eprintln!();
                }
                bail!("{} {} failed: {}", s(&j["kind"]), s(&j["target"]), s(&j["error"]))
            }
            _ => {
                if tty {
                    eprintln!();
                }
                return Ok(j);
            }
        }
    }
}

fn finish_backup(c: &Client, job: &Value, no_wait: bool) -> Result<()> {
    let id = job["id"].as_u64().context("the API answered without a job id")?;
    if no_wait {
        c.print(job, |_| println!("backup running as job {id}: `keel job list` follows it"));
        return Ok(());
    }
    let j = wait_job(c, id)?;
    c.print(&j, |j| {
        let r = &j["result"];
        let secs = r["seconds"].as_f64().unwrap_or(0.0);
        let logical = r["logical_bytes"].as_u64().unwrap_or(0);
        println!(
            "appliance {}: {} logical, {} read, {} new stored, in {secs:.2} s ({:.0} MB/s of logical data; {}, paused {:.1} ms)",
            s(&r["appliance"]),
            human(logical),
            human(r["read_bytes"].as_u64().unwrap_or(0)),
            human(r["new_bytes"].as_u64().unwrap_or(0)),
            logical as f64 / secs.max(1e-9) / 1e6,
            s(&r["consistency"]),
            r["paused_ms"].as_f64().unwrap_or(0.0),
        )
    });
    Ok(())
}

/// `keel appliance` subcommands.
#[derive(clap::Subcommand)]
pub enum ApplianceCmd {
    /// List the appliances you can see.
    List,
    /// Show one appliance (logical, stored and unique size).
    Show {
        /// Name.
        name: String,
    },
    /// Make an appliance from a VM, running or stopped (copy-back).
    Create {
        /// Name.
        name: String,
        /// The VM.
        #[arg(long)]
        from_vm: String,
        /// Return once the job starts.
        #[arg(long)]
        no_wait: bool,
    },
    /// Delete an appliance; chunks no other appliance holds are freed.
    Delete {
        /// Name.
        name: String,
    },
    /// Re-hash every chunk of an appliance and report damage.
    Verify {
        /// Name.
        name: String,
    },
    /// Write an appliance to an OVA file (OVF + streamOptimized VMDK), as
    /// VirtualBox and VMware import them.
    Export {
        /// Name.
        name: String,
        /// The .ova file to write.
        file: PathBuf,
    },
    /// Import an OVA file (from VirtualBox, VMware, or Keel) as an
    /// appliance.
    Import {
        /// The .ova file.
        file: PathBuf,
        /// Appliance name (default: the file name without .ova).
        #[arg(long)]
        name: Option<String>,
    },
}

/// `keel appliance ...`.
pub fn appliance(c: &Client, cmd: ApplianceCmd) -> Result<()> {
    match cmd {
        ApplianceCmd::List => {
            let v = c.get("/appliances")?;
            c.print(&v, |v| {
                let rows = v
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|a| {
                        vec![
                            s(&a["name"]),
                            s(&a["owner"]),
                            s(&a["source_vm"]),
                            a["disks"].as_array().map_or(0, |d| d.len()).to_string(),
                            human(a["logical_bytes"].as_u64().unwrap_or(0)),
                            human(a["stored_bytes"].as_u64().unwrap_or(0)),
                            human(a["unique_bytes"].as_u64().unwrap_or(0)),
                        ]
                    })
                    .collect();
                table(&["NAME", "OWNER", "FROM VM", "DISKS", "LOGICAL", "STORED", "UNIQUE"], rows)
            });
        }
        ApplianceCmd::Show { name } => {
            let v = c.get(&format!("/appliances/{}", seg(&name)?))?;
            c.print(&v, |v| {
                print_kv(
                    v,
                    &[
                        "name",
                        "owner",
                        "source_vm",
                        "cpus",
                        "memory_bytes",
                        "boot",
                        "logical_bytes",
                        "stored_bytes",
                        "unique_bytes",
                    ],
                );
                for d in v["disks"].as_array().into_iter().flatten() {
                    println!(
                        "{:<16} {}",
                        format!("disk {}", s(&d["id"])),
                        human(d["size_bytes"].as_u64().unwrap_or(0))
                    );
                }
            });
        }
        ApplianceCmd::Create { name, from_vm, no_wait } => {
            let job = c.send("POST", "/appliances", json!({ "name": name, "vm": from_vm }))?;
            finish_backup(c, &job, no_wait)?;
        }
        ApplianceCmd::Delete { name } => {
            let v = c.delete(&format!("/appliances/{}", seg(&name)?))?;
            c.print(&v, |v| {
                println!(
                    "deleted appliance {name}: {} chunk(s), {} freed",
                    s(&v["chunks"]),
                    human(v["bytes"].as_u64().unwrap_or(0))
                )
            });
        }
        ApplianceCmd::Export { name, file } => {
            let n = c.download(&format!("/appliances/{}/ova", seg(&name)?), &file)?;
            c.print(&json!({"exported": name, "file": file, "bytes": n}), |_| {
                println!("exported appliance {name} to {} ({})", file.display(), human(n))
            });
        }
        ApplianceCmd::Import { file, name } => {
            let name = match name {
                Some(n) => n,
                None => file
                    .file_stem()
                    .map(|s| s.to_string_lossy().to_lowercase())
                    .context("give the appliance a name with --name")?,
            };
            let v = c.upload(&format!("/appliances/{}/ova", seg(&name)?), &file)?;
            c.print(&v, |v| {
                println!(
                    "imported {} as appliance {} ({} disk(s), {} logical, {} stored)",
                    file.display(),
                    s(&v["name"]),
                    v["disks"].as_array().map_or(0, |d| d.len()),
                    human(v["logical_bytes"].as_u64().unwrap_or(0)),
                    human(v["stored_bytes"].as_u64().unwrap_or(0))
                )
            });
        }
        ApplianceCmd::Verify { name } => {
            let v = c.send("POST", &format!("/appliances/{}/verify", seg(&name)?), json!({}))?;
            c.print(&v, |v| {
                for d in v["damage"].as_array().into_iter().flatten() {
                    println!("damaged chunk {}: {} (held by {})", s(&d["hash"]), s(&d["detail"]), d["appliances"]);
                }
            });
            if v["ok"] != true {
                bail!("appliance {name} is damaged");
            }
            if !c.json {
                println!("appliance {name}: every chunk verified");
            }
        }
    }
    Ok(())
}

/// `keel usage`.
pub fn usage(c: &Client, user: Option<String>) -> Result<()> {
    let q = match &user {
        Some(u) => format!("?user={}", seg(u)?),
        None => String::new(),
    };
    let v = c.get(&format!("/usage{q}"))?;
    c.print(&v, |v| {
        let rows = v.as_array().cloned().unwrap_or_default();
        let mut total: std::collections::BTreeMap<String, u64> = Default::default();
        let mut out = Vec::new();
        for r in &rows {
            let hour = r["hour"].as_u64().unwrap_or(0);
            let secs = r["seconds"].as_u64().unwrap_or(0);
            *total.entry(s(&r["user"])).or_default() += secs;
            out.push(vec![s(&r["user"]), s(&r["vm"]), hour_utc(hour), format!("{secs}")]);
        }
        table(&["USER", "VM", "HOUR (UTC)", "SECONDS"], out);
        for (u, t) in total {
            println!("total {u}: {:.2} VM-hours ({t} s)", t as f64 / 3600.0);
        }
    });
    Ok(())
}

/// `YYYY-MM-DD HH:00` of a unix time.
pub fn hour_utc(t: u64) -> String {
    let days = t / 86_400;
    let h = (t % 86_400) / 3600;
    // Civil from days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {h:02}:00")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hours_print_as_dates() {
        assert_eq!(hour_utc(0), "1970-01-01 00:00");
        assert_eq!(hour_utc(1_795_305_600 + 7 * 3600), "2026-11-22 07:00");
        assert_eq!(hour_utc(951_782_400), "2000-02-29 00:00");
    }

    #[test]
    fn networks_parse() {
        assert_eq!(network("user").unwrap(), json!("user"));
        assert_eq!(network("tap:tap0").unwrap(), json!({"tap": "tap0"}));
        assert_eq!(network("bridge:br0").unwrap(), json!({"bridge": "br0"}));
        assert!(network("wifi").is_err());
    }
}
