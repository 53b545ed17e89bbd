//! Keel's tiny test guest: a Debian cloud kernel and a busybox initramfs
//! (built by `tests/guest/build-guest.sh`), booted under QEMU TCG.
//!
//! The guest's `/init` does what `keel.action=` on the kernel command line
//! asks and (except for `vm`) powers off, so QEMU exits and [`boot`] returns
//! the serial console. Actions:
//!
//! * `write-marker`: write `KEEL-GUEST-MARKER <uptime>` (NUL-padded to one
//!   sector) at sector [`MARKER_SECTOR`] of `/dev/vda` with `dd conv=fsync`,
//!   read it back past the page cache and print [`OK`]. The exact marker is
//!   echoed on a `KEEL-GUEST WROTE ...` line ([`Output::marker`]).
//! * `shell`: a busybox shell on the console (for people, not tests).
//! * [`VM_ACTION`] (`vm`): runs until powered off, for VM lifecycle tests
//!   where the VM manager starts QEMU itself (use [`BootArgs::cmdline`] of
//!   `BootArgs::new(VM_ACTION)` and the files in [`ensure_guest`]'s
//!   directory, or boot [`iso_path`] from a CD-ROM) and tests read the
//!   console file. In order, the guest
//!   - loads the VM-only modules too: ACPI power button and evdev, PIIX
//!     IDE plus SCSI CD-ROM for an `ide-cd` on the default `pc` machine, and
//!     `virtio_console` for the guest agent's virtio-serial port;
//!   - waits up to 10 s for `/dev/vda` and reads sector [`MARKER_SECTOR`]:
//!     a marker there is reported as `KEEL-GUEST SAW <marker>`
//!     ([`saw_marker`]), otherwise it writes `KEEL-GUEST-MARKER <uptime>
//!     <random>` like `write-marker` and prints `KEEL-GUEST WROTE <marker>`
//!     ([`wrote_marker`]); the random word makes every boot's marker unique,
//!     so a clone that SAW its source's marker got it from shared data
//!     (without `/dev/vda`: `KEEL-GUEST FAIL no /dev/vda`, and it goes on);
//!   - prints `KEEL-GUEST MAC <iface> <address>` for each `ethN` ([`macs`]);
//!   - opens the ACPI power button's input device and watches it in the
//!     background: QMP `system_powerdown` (even right after [`READY`]) makes
//!     it print [`ACPI_POWEROFF`] and `poweroff -f`, so QEMU exits;
//!   - starts the real QEMU guest agent (`qemu-ga` with its libraries, when
//!     the build host had `/usr/sbin/qemu-ga`) in the background on the
//!     virtio-serial port named [`AGENT_PORT_NAME`] (QEMU: `-device
//!     virtio-serial-pci,id=vser0 -device
//!     virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0`)
//!     and prints [`AGENT_UP`] once the agent has the port open, so from
//!     [`READY`] on QMP `query-chardev` shows the chardev `frontend-open`.
//!     Without `qemu-ga` in the guest it prints [`AGENT_NONE`], without such
//!     a port [`AGENT_NO_PORT`]. The agent's fsfreeze hook prints
//!     [`FSFREEZE_FREEZE`] when `guest-fsfreeze-freeze` starts and
//!     [`FSFREEZE_THAW`] when `guest-fsfreeze-thaw` is done
//!     ([`fsfreeze_events`]). The initramfs has no block-device file system,
//!     so both return `{"return": 0}` (none frozen) and
//!     `guest-fsfreeze-status` stays `thawed`. Note that this `qemu-ga`
//!     answers the `0xFF` sent before `guest-sync-delimited` with a JSON
//!     parse error line of its own, before the `0xFF`-prefixed
//!     `{"return": ID}`: a client skips everything up to the `0xFF`;
//!   - prints [`READY`];
//!   - every ~0.3 s prints whichever of these changed (each once at start):
//!     `KEEL-GUEST DISKS vda vdb ...` (the `/sys/block/vd*` names, sorted;
//!     [`last_disks`]), `KEEL-GUEST CD <label>` (the ISO 9660 volume
//!     identifier of the medium in `/dev/sr0`, trailing spaces dropped; `none`
//!     without drive or medium, `?` for a medium that is not ISO 9660;
//!     [`last_cd`]) and `KEEL-GUEST NICS eth0 ...` ([`last_nics`]). It leaves
//!     the CD-ROM tray alone (no auto-close, no door lock), so QMP `eject`,
//!     `blockdev-open-tray` and friends are not undone by the guest.
//!     Hot-(un)plugged `virtio-blk-pci` and `virtio-net-pci` devices show up
//!     within a second; `device_del` completes (ACPI PCI hotplug).
//! * none: print [`BOOTED`].
//!
//! Besides `vmlinuz` and `initramfs.cpio.gz` the build makes [`iso_path`]
//! (`guest.iso`): a BIOS-bootable ISO 9660 image with volume identifier
//! [`ISO_LABEL`] (isolinux, El Torito no-emulation) holding the same kernel
//! and initramfs, which boots at once into `console=ttyS0 panic=-1 quiet
//! keel.action=vm`. Booted from an `ide-cd` (SeaBIOS, then isolinux, whose
//! banner also goes to the serial console) it runs the `vm` action as
//! above and reports its own medium: `KEEL-GUEST CD KEEL-GUEST`. Under TCG
//! that boot takes roughly 9 to 12 s to [`READY`], a few seconds more than a
//! direct kernel boot (BIOS reads of the 18 MiB from the CD).
//!
//! The console parsers ([`saw_marker`], [`last_disks`], ...) take the
//! console text as read so far and ignore its last line until it is
//! complete (ends with a newline), so they can poll a file QEMU is still
//! writing. Each reports the last matching line, so a console that spans
//! several boots gives the newest state.
//!
//! ```no_run
//! use keel_tests::guest::{self, BootArgs};
//! let out = guest::boot(&BootArgs::new("write-marker").drive("file=disk.raw,format=raw,if=virtio"));
//! out.assert_ok();
//! ```
//!
//! [`boot`] blocks for the whole boot (seconds): from async tests call it
//! through `tokio::task::spawn_blocking`.
//!
//! Knobs (environment): `KEEL_GUEST_DIR` (where the guest is built, default
//! `<target>/keel-guest`), `KEEL_QEMU` (the QEMU binary), `KEEL_GUEST_ECHO=1`
//! (copy the console to stderr as it arrives), `KEEL_GUEST_VERBOSE=1` (boot
//! without `quiet`, so the kernel log is on the console too).

use std::fmt;
use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

/// Printed by the guest when its action succeeded.
pub const OK: &str = "KEEL-GUEST-OK";
/// Printed by the guest when booted without an action.
pub const BOOTED: &str = "KEEL-GUEST-BOOTED";
/// The long-running action for VM lifecycle tests (`keel.action=vm`).
pub const VM_ACTION: &str = "vm";
/// Printed by the `vm` action once it is set up (marker, MACs, power button).
pub const READY: &str = "KEEL-GUEST-READY";
/// Printed by the `vm` action when the ACPI power button was pressed (QMP
/// `system_powerdown`), just before it powers off.
pub const ACPI_POWEROFF: &str = "KEEL-GUEST ACPI-POWEROFF";
/// What the `vm` action reports as the CD label without a drive or medium.
pub const NO_CD: &str = "none";
/// The name of the virtio-serial port the `vm` action runs the guest agent on.
pub const AGENT_PORT_NAME: &str = "org.qemu.guest_agent.0";
/// Printed by the `vm` action (before [`READY`]) once `qemu-ga` runs and has
/// the [`AGENT_PORT_NAME`] port open.
pub const AGENT_UP: &str = "KEEL-GUEST AGENT up";
/// Printed by the `vm` action instead of [`AGENT_UP`] when the guest was
/// built without `qemu-ga` (the build host had none).
pub const AGENT_NONE: &str = "KEEL-GUEST AGENT none";
/// Printed by the `vm` action instead of [`AGENT_UP`] when the VM has no
/// virtio-serial port named [`AGENT_PORT_NAME`].
pub const AGENT_NO_PORT: &str = "KEEL-GUEST AGENT no-port";
/// Printed by the guest agent's fsfreeze hook when `guest-fsfreeze-freeze`
/// starts (before anything is frozen).
pub const FSFREEZE_FREEZE: &str = "KEEL-GUEST FSFREEZE freeze";
/// Printed by the guest agent's fsfreeze hook when `guest-fsfreeze-thaw` has
/// thawed.
pub const FSFREEZE_THAW: &str = "KEEL-GUEST FSFREEZE thaw";
/// The ISO 9660 volume identifier of [`iso_path`]; the `vm` action booted
/// from it reports `KEEL-GUEST CD KEEL-GUEST`.
pub const ISO_LABEL: &str = "KEEL-GUEST";
/// Prefix of every failure line the guest prints.
pub const FAIL: &str = "KEEL-GUEST FAIL";
/// The sector (512 bytes) of `/dev/vda` that `write-marker` writes.
pub const MARKER_SECTOR: u64 = 2048;
/// Start of the marker the guest writes; the guest's uptime follows.
pub const MARKER_PREFIX: &str = "KEEL-GUEST-MARKER ";
/// Default limit on a whole boot.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// The workspace root (the parent of this crate).
fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// Where the guest is built: `$KEEL_GUEST_DIR`, else `keel-guest` in the
/// cargo target directory.
pub fn guest_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("KEEL_GUEST_DIR") {
        return PathBuf::from(d);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("target"));
    workspace_root().join(target).join("keel-guest")
}

/// Build the guest once (per process; a file lock serialises processes,
/// and the script itself is a no-op when its outputs are current). Returns
/// the directory holding `vmlinuz`, `initramfs.cpio.gz` and `guest.iso`.
/// Panics, with the script's output, when the build fails.
pub fn ensure_guest() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(build_guest).clone()
}

/// The guest as a bootable ISO (`guest.iso` in [`ensure_guest`]'s
/// directory, built first if needed): boots from a CD-ROM into the `vm`
/// action; its volume identifier is [`ISO_LABEL`].
pub fn iso_path() -> PathBuf {
    ensure_guest().join("guest.iso")
}

fn build_guest() -> PathBuf {
    let dir = guest_dir();
    let parent = dir.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."));
    std::fs::create_dir_all(&parent).unwrap_or_else(|e| panic!("cannot create {}: {e}", parent.display()));
    let lock_path = dir.with_extension("lock");
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", lock_path.display()));
    // SAFETY: flock on a file descriptor this function owns for the whole
    // call; the lock is released when `lock` is closed.
    let rc = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
    assert_eq!(rc, 0, "flock {}: {}", lock_path.display(), std::io::Error::last_os_error());

    let script = workspace_root().join("tests/guest/build-guest.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg(&dir)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    drop(lock);
    if !out.status.success() {
        panic!(
            "{} {} failed ({}); scripts/install-deps.sh installs what it needs:\n{}{}",
            script.display(),
            dir.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    dir
}

/// How to boot the guest.
#[derive(Clone, Debug)]
pub struct BootArgs {
    /// `keel.action=` for the guest's init; `None` just boots.
    pub action: Option<String>,
    /// Extra kernel command-line words.
    pub append: Vec<String>,
    /// Extra QEMU arguments (drives, devices, netdevs).
    pub qemu_args: Vec<String>,
    /// Guest memory.
    pub memory_mib: u32,
    /// QEMU is killed when the boot takes longer.
    pub timeout: Duration,
}

impl Default for BootArgs {
    fn default() -> Self {
        BootArgs { action: None, append: Vec::new(), qemu_args: Vec::new(), memory_mib: 256, timeout: DEFAULT_TIMEOUT }
    }
}

impl BootArgs {
    /// Boot with `keel.action=action`.
    pub fn new(action: &str) -> Self {
        BootArgs { action: Some(action.to_string()), ..BootArgs::default() }
    }

    /// Add `-drive spec`, e.g. `file=nbd://127.0.0.1:10809/vol,format=raw,if=virtio`.
    pub fn drive(mut self, spec: &str) -> Self {
        self.qemu_args.extend(["-drive".to_string(), spec.to_string()]);
        self
    }

    /// Add raw QEMU arguments.
    pub fn qemu<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> Self {
        self.qemu_args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Add a kernel command-line word.
    pub fn append(mut self, word: &str) -> Self {
        self.append.push(word.to_string());
        self
    }

    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    pub fn memory_mib(mut self, m: u32) -> Self {
        self.memory_mib = m;
        self
    }

    /// The kernel command line.
    pub fn cmdline(&self) -> String {
        let mut words = vec!["console=ttyS0".to_string(), "panic=-1".to_string()];
        // The serial console is slow under TCG: the kernel's boot log costs
        // seconds. Warnings, oopses and panics still print.
        if std::env::var_os("KEEL_GUEST_VERBOSE").is_none_or(|v| v.is_empty() || v == "0") {
            words.push("quiet".to_string());
        }
        if let Some(a) = &self.action {
            words.push(format!("keel.action={a}"));
        }
        words.extend(self.append.iter().cloned());
        words.join(" ")
    }

    /// The full QEMU argument list for a guest built in `dir`.
    pub fn qemu_command_line(&self, dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = ["-accel", "tcg", "-m"].map(String::from).to_vec();
        v.push(self.memory_mib.to_string());
        v.extend(["-nographic", "-no-reboot"].map(String::from));
        // No default NIC unless the caller configures networking.
        if !self.qemu_args.iter().any(|a| matches!(a.as_str(), "-nic" | "-net" | "-netdev")) {
            v.extend(["-nic", "none"].map(String::from));
        }
        v.push("-kernel".into());
        v.push(dir.join("vmlinuz").display().to_string());
        v.push("-initrd".into());
        v.push(dir.join("initramfs.cpio.gz").display().to_string());
        v.push("-append".into());
        v.push(self.cmdline());
        v.extend(self.qemu_args.iter().cloned());
        v
    }
}

/// Panics unless `sector` (512 bytes read from [`MARKER_SECTOR`] of the
/// guest's disk, through the store) holds `marker`, NUL-padded: the guest's
/// write landed.
pub fn assert_marker_sector(sector: &[u8], marker: &str) {
    let shown = String::from_utf8_lossy(sector);
    assert!(sector.starts_with(MARKER_PREFIX.as_bytes()), "sector {MARKER_SECTOR}: {shown:?}");
    assert_eq!(&sector[..marker.len()], marker.as_bytes(), "{shown}");
    assert!(sector[marker.len()..].iter().all(|&b| b == 0), "marker not NUL-padded: {shown:?}");
}

/// QEMU arguments for one virtio NIC on user networking, through which the
/// guest reaches the host's loopback services at 10.0.2.2.
pub const USER_NIC: [&str; 4] = ["-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0"];

/// What a boot produced.
#[derive(Debug)]
pub struct Output {
    /// The guest's serial console (QEMU's stdout).
    pub console: String,
    /// QEMU's stderr.
    pub stderr: String,
    /// QEMU's exit status; `None` when it was killed for timing out.
    pub status: Option<ExitStatus>,
    pub timed_out: bool,
    /// Wall time from starting QEMU until it exited.
    pub elapsed: Duration,
    /// The QEMU command line, for messages.
    pub command: Vec<String>,
}

impl Output {
    /// QEMU exited by itself, successfully, and the guest printed [`OK`].
    pub fn ok(&self) -> bool {
        !self.timed_out && self.status.is_some_and(|s| s.success()) && self.has_line(OK)
    }

    /// Whether some console line ends with `line` (ignoring surrounding
    /// whitespace and carriage returns; firmware escape codes can precede it).
    pub fn has_line(&self, line: &str) -> bool {
        has_line(&self.console, line)
    }

    /// Panics with the whole console unless [`Output::ok`].
    pub fn assert_ok(&self) {
        assert!(self.ok(), "guest did not report {OK}:\n{self}");
    }

    /// The marker `write-marker` wrote (without padding), from its
    /// `KEEL-GUEST WROTE ...` line.
    pub fn marker(&self) -> Option<String> {
        wrote_marker(&self.console)
    }

    /// The guest's uptime (seconds) when init started, from its
    /// `KEEL-GUEST INIT` line.
    pub fn init_uptime(&self) -> Option<f64> {
        self.console.lines().find_map(|l| {
            let (_, rest) = l.split_once("KEEL-GUEST INIT ")?;
            rest.split_whitespace().find_map(|w| w.strip_prefix("uptime="))?.parse().ok()
        })
    }
}

impl fmt::Display for Output {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let status = match (self.timed_out, &self.status) {
            (true, _) => "killed after timeout".to_string(),
            (false, Some(s)) => s.to_string(),
            (false, None) => "unknown".to_string(),
        };
        writeln!(f, "qemu-system-x86_64 {}", self.command.join(" "))?;
        writeln!(f, "status: {status}, {:.1} s", self.elapsed.as_secs_f64())?;
        writeln!(f, "--- console ---\n{}", self.console)?;
        write!(f, "--- qemu stderr ---\n{}", self.stderr)
    }
}

/// Whether some console line ends with `line` (ignoring surrounding
/// whitespace and carriage returns; firmware escape codes can precede it).
pub fn has_line(console: &str, line: &str) -> bool {
    console.lines().any(|l| l.trim().ends_with(line))
}

/// The rest of each complete console line that carries `KEEL-GUEST <tag>`
/// (the tag followed by a space or the line's end), without that space or
/// the line end. Anything before the prefix (firmware escape codes) is
/// skipped; an unterminated last line is not looked at.
fn tagged<'a>(console: &'a str, tag: &'a str) -> impl DoubleEndedIterator<Item = &'a str> + 'a {
    console.split_inclusive('\n').filter(|l| l.ends_with('\n')).filter_map(move |l| {
        let l = l.trim_end();
        let (_, rest) = l.split_once("KEEL-GUEST ")?;
        let rest = rest.strip_prefix(tag)?;
        if rest.is_empty() { Some(rest) } else { rest.strip_prefix(' ') }
    })
}

/// The marker the guest wrote (`write-marker` or `vm`), from the last
/// `KEEL-GUEST WROTE <marker>` line.
pub fn wrote_marker(console: &str) -> Option<String> {
    tagged(console, "WROTE").rev().find(|m| m.starts_with(MARKER_PREFIX)).map(str::to_string)
}

/// The marker the `vm` action found already on `/dev/vda`, from the last
/// `KEEL-GUEST SAW <marker>` line.
pub fn saw_marker(console: &str) -> Option<String> {
    tagged(console, "SAW").rev().find(|m| m.starts_with(MARKER_PREFIX)).map(str::to_string)
}

/// The last `KEEL-GUEST DISKS ...` report of the `vm` action: the guest's
/// virtio disks (`vda`, `vdb`, ...), sorted; empty when it has none.
pub fn last_disks(console: &str) -> Option<Vec<String>> {
    tagged(console, "DISKS").next_back().map(|r| r.split_whitespace().map(str::to_string).collect())
}

/// The last `KEEL-GUEST CD ...` report of the `vm` action: the ISO 9660
/// volume identifier of the medium in the CD-ROM drive, [`NO_CD`] without a
/// drive or medium, `?` for a medium that is not ISO 9660. `None` when the
/// guest has not reported yet.
pub fn last_cd(console: &str) -> Option<String> {
    tagged(console, "CD").next_back().map(str::to_string)
}

/// The last `KEEL-GUEST NICS ...` report of the `vm` action: the guest's
/// `ethN` interfaces, sorted.
pub fn last_nics(console: &str) -> Option<Vec<String>> {
    tagged(console, "NICS").next_back().map(|r| r.split_whitespace().map(str::to_string).collect())
}

/// Every `KEEL-GUEST MAC <iface> <address>` line of the `vm` action, in
/// order, as (interface, lower-case MAC address).
pub fn macs(console: &str) -> Vec<(String, String)> {
    tagged(console, "MAC")
        .filter_map(|r| {
            let mut w = r.split_whitespace();
            let (iface, mac) = (w.next()?, w.next()?);
            Some((iface.to_string(), mac.to_ascii_lowercase()))
        })
        .collect()
}

/// The guest agent's fsfreeze hook calls in the `vm` action, in order:
/// `"freeze"` for each [`FSFREEZE_FREEZE`] line, `"thaw"` for each
/// [`FSFREEZE_THAW`].
pub fn fsfreeze_events(console: &str) -> Vec<String> {
    tagged(console, "FSFREEZE").map(str::to_string).collect()
}

/// Boot the guest (building it first if needed) and wait, at most
/// `args.timeout`, for QEMU to exit. Panics only when QEMU cannot be started.
pub fn boot(args: &BootArgs) -> Output {
    let dir = ensure_guest();
    let qemu = std::env::var("KEEL_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".to_string());
    let command = args.qemu_command_line(&dir);
    let echo = std::env::var_os("KEEL_GUEST_ECHO").is_some_and(|v| !v.is_empty() && v != "0");

    let start = Instant::now();
    let mut child = Command::new(&qemu)
        .args(&command)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {qemu} (scripts/install-deps.sh installs it): {e}"));
    let console = Arc::new(Mutex::new(Vec::new()));
    let stdout = child.stdout.take().map(|s| collect(s, console.clone(), echo));
    let stderr_buf = Arc::new(Mutex::new(Vec::new()));
    let stderr = child.stderr.take().map(|s| collect(s, stderr_buf.clone(), echo));

    let deadline = start + args.timeout;
    let (status, timed_out) = loop {
        match child.try_wait() {
            Ok(Some(s)) => break (Some(s), false),
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break (None, true);
            }
            Ok(None) => thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("waiting for {qemu}: {e}"),
        }
    };
    let elapsed = start.elapsed();
    for t in [stdout, stderr].into_iter().flatten() {
        let _ = t.join();
    }
    let text =
        |b: &Arc<Mutex<Vec<u8>>>| String::from_utf8_lossy(&b.lock().unwrap_or_else(|e| e.into_inner())).into_owned();
    Output { console: text(&console), stderr: text(&stderr_buf), status, timed_out, elapsed, command }
}

/// Read `r` to its end into `buf`, copying to stderr when `echo`.
fn collect<R: Read + Send + 'static>(mut r: R, buf: Arc<Mutex<Vec<u8>>>, echo: bool) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        loop {
            match r.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if echo {
                        use std::io::Write;
                        let _ = std::io::stderr().write_all(&chunk[..n]);
                    }
                    buf.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(&chunk[..n]);
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn output(console: &str, status: Option<ExitStatus>) -> Output {
        Output {
            console: console.to_string(),
            stderr: String::new(),
            status,
            timed_out: status.is_none(),
            elapsed: Duration::ZERO,
            command: Vec::new(),
        }
    }

    fn success() -> ExitStatus {
        Command::new("true").status().unwrap()
    }

    #[test]
    fn parses_the_console() {
        let console = "\x1bc\x1b[?7l\x1b[2J\r\nKEEL-GUEST INIT 6.1.0-56-cloud-amd64 uptime=4.04\r\n\
                       KEEL-GUEST ACTION write-marker\r\nKEEL-GUEST WROTE KEEL-GUEST-MARKER 4.62\r\n\
                       KEEL-GUEST-OK\r\nKEEL-GUEST POWEROFF\r\n";
        let out = output(console, Some(success()));
        assert!(out.ok());
        assert_eq!(out.marker().as_deref(), Some("KEEL-GUEST-MARKER 4.62"));
        assert_eq!(out.init_uptime(), Some(4.04));
        // Killed by the timeout: not ok even with the line present.
        assert!(!output(console, None).ok());
        let out = output("KEEL-GUEST FAIL no /dev/vda\r\n", Some(success()));
        assert!(!out.ok() && out.marker().is_none());
    }

    #[test]
    fn parses_the_vm_console() {
        let console = "\x1bc\x1b[?7l\x1b[2J\r\nKEEL-GUEST INIT 6.1.0-56-cloud-amd64 uptime=4.45\r\n\
                       KEEL-GUEST ACTION vm\r\n\
                       KEEL-GUEST SAW KEEL-GUEST-MARKER 5.74 2162a255\r\n\
                       KEEL-GUEST MAC eth0 52:54:00:12:34:56\r\n\
                       KEEL-GUEST AGENT up\r\n\
                       KEEL-GUEST-READY\r\n\
                       KEEL-GUEST DISKS vda\r\n\
                       KEEL-GUEST CD none\r\n\
                       KEEL-GUEST NICS eth0\r\n\
                       KEEL-GUEST CD KEEL_CD_ONE\r\n\
                       [    7.722276] I/O error, dev sr0, sector 64 op 0x0:(READ) flags 0x0 phys_seg 1 prio class 2\r\n\
                       KEEL-GUEST CD SECOND LABEL\r\n\
                       KEEL-GUEST DISKS vda vdb\r\n\
                       KEEL-GUEST NICS eth0 eth1\r\n\
                       KEEL-GUEST FSFREEZE freeze\r\n\
                       KEEL-GUEST FSFREEZE thaw\r\n\
                       KEEL-GUEST DISKS vda\r\n\
                       KEEL-GUEST CD none\r\n\
                       KEEL-GUEST CD KEEL_CD_ONE\r\n\
                       KEEL-GUEST ACPI-POWEROFF\r\n\
                       [   13.148466] reboot: Power down\r\n";
        assert!(has_line(console, READY) && has_line(console, ACPI_POWEROFF));
        assert!(has_line(console, AGENT_UP) && !has_line(console, AGENT_NONE) && !has_line(console, AGENT_NO_PORT));
        assert!(has_line(console, FSFREEZE_FREEZE) && has_line(console, FSFREEZE_THAW));
        assert_eq!(fsfreeze_events(console), ["freeze", "thaw"]);
        assert_eq!(saw_marker(console).as_deref(), Some("KEEL-GUEST-MARKER 5.74 2162a255"));
        assert_eq!(wrote_marker(console), None);
        assert_eq!(macs(console), [("eth0".to_string(), "52:54:00:12:34:56".to_string())]);
        assert_eq!(last_disks(console), Some(vec!["vda".to_string()]));
        assert_eq!(last_cd(console).as_deref(), Some("KEEL_CD_ONE"));
        assert_eq!(last_nics(console), Some(vec!["eth0".to_string(), "eth1".to_string()]));

        // Nothing reported yet; a line still being written does not count.
        let early = "KEEL-GUEST INIT 6.1.0-56-cloud-amd64 uptime=2.88\r\nKEEL-GUEST WROTE KEEL-GUEST-MARKER 4.92 2878f336\r\n\
                     KEEL-GUEST DISKS\r\nKEEL-GUEST CD none\r\nKEEL-GUEST CD SECOND LA";
        assert_eq!(wrote_marker(early).as_deref(), Some("KEEL-GUEST-MARKER 4.92 2878f336"));
        assert_eq!(saw_marker(early), None);
        assert_eq!(last_disks(early), Some(vec![]));
        assert_eq!(last_cd(early).as_deref(), Some(NO_CD));
        assert_eq!(last_nics(early), None);
        assert!(macs(early).is_empty());
        assert!(fsfreeze_events(early).is_empty() && !has_line(early, AGENT_UP));
        assert_eq!(last_cd(""), None);
        // Only whole tags: "CD" is not "CDX", and a label keeps inner spaces.
        assert_eq!(last_cd("KEEL-GUEST CDX foo\nKEEL-GUEST CD ?\n").as_deref(), Some("?"));
        assert_eq!(last_cd("KEEL-GUEST CD A B\n").as_deref(), Some("A B"));
    }

    #[test]
    fn command_line() {
        let a = BootArgs::new("write-marker").drive("file=x.raw,format=raw,if=virtio").append("foo=1");
        assert!(a.cmdline().starts_with("console=ttyS0 panic=-1"));
        assert!(a.cmdline().ends_with("keel.action=write-marker foo=1"));
        let v = a.qemu_command_line(Path::new("/g"));
        assert_eq!(&v[..4], ["-accel", "tcg", "-m", "256"]);
        assert!(v.windows(2).any(|w| w == ["-nic", "none"]));
        assert!(v.windows(2).any(|w| w == ["-kernel", "/g/vmlinuz"]));
        assert_eq!(&v[v.len() - 2..], ["-drive", "file=x.raw,format=raw,if=virtio"]);
        let v = BootArgs::default().qemu(["-nic", "user,model=virtio-net-pci"]).qemu_command_line(Path::new("/g"));
        assert!(!v.windows(2).any(|w| w == ["-nic", "none"]));
    }
}
