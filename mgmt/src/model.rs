//! The records kept in the metadata database, and the names they are keyed
//! by.

use serde::{Deserialize, Serialize};

/// Prefix of every iSCSI target name: the target of volume `NAME` is
/// `iqn.2026-11.io.keel:NAME`.
pub const IQN_PREFIX: &str = keel_iscsi_target::IQN_PREFIX;

/// A tenant role.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything.
    Manager,
    /// Owns volumes (and later VMs) within a quota; creates regular users
    /// under it.
    Power,
    /// Owns exactly one VM (when VMs exist); sees its own user record.
    Regular,
}

impl Role {
    /// Parse `manager`, `power` or `regular`.
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "manager" => Some(Role::Manager),
            "power" => Some(Role::Power),
            "regular" => Some(Role::Regular),
            _ => None,
        }
    }

    /// The name used in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Manager => "manager",
            Role::Power => "power",
            Role::Regular => "regular",
        }
    }
}

/// What a Power User may own in total (its own and its sub-users').
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quota {
    /// Virtual CPUs over all VMs (enforced when VMs exist).
    pub cpus: u32,
    /// Guest memory in bytes over all VMs (enforced when VMs exist).
    pub memory_bytes: u64,
    /// Provisioned volume bytes (sum of volume sizes).
    pub storage_bytes: u64,
}

/// A user.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct User {
    /// Login name (the key).
    pub name: String,
    /// Role.
    pub role: Role,
    /// The Power User this user was created under, if any.
    pub parent: Option<String>,
    /// Quota of a Power User.
    pub quota: Option<Quota>,
    /// argon2 PHC string.
    pub password_hash: String,
    /// Unix seconds.
    pub created: u64,
}

/// An API token (stored by the hash of its secret).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Token {
    /// Whose token.
    pub user: String,
    /// Unix seconds.
    pub created: u64,
    /// Unix seconds after which it is refused; `None` for the first
    /// manager's token in `DATA/credentials` (guarded by the file's mode).
    #[serde(default)]
    pub expires: Option<u64>,
}

/// CHAP credentials of an iSCSI target.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chap {
    /// CHAP user name.
    pub user: String,
    /// CHAP secret (12 to 16 bytes is what initiators expect).
    pub secret: String,
}

/// How a volume is exported over iSCSI.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IscsiExport {
    /// Initiator IQNs allowed to log in; empty allows every initiator.
    pub initiators: Vec<String>,
    /// CHAP credentials; none means no CHAP.
    pub chap: Option<Chap>,
}

/// A volume's metadata (its data and size live in the block store).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VolumeMeta {
    /// Volume name (the key, and its store name).
    pub name: String,
    /// Owning user.
    pub owner: String,
    /// Unix seconds.
    pub created: u64,
    /// `VOLUME@SNAPSHOT` it was cloned from.
    pub origin: Option<String>,
    /// iSCSI export settings.
    #[serde(default)]
    pub iscsi: IscsiExport,
    /// Random salt of the volume's access key (see [`crate::access`]), new
    /// for every volume (a volume made under a deleted one's name does not
    /// inherit its key) and at every rotation of the key. 0 in records from
    /// before access keys.
    #[serde(default)]
    pub key_salt: u64,
    /// The pool holding it; `None` (records from before pools): the
    /// default pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
}

impl VolumeMeta {
    /// The pool holding it.
    pub fn pool(&self) -> &str {
        self.pool.as_deref().unwrap_or(crate::pools::DEFAULT_POOL)
    }
}

/// A store operation recorded before it runs, so a restart after `kill -9`
/// can finish or undo it.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Intent {
    /// A volume is being created (or cloned) for `owner`.
    Create {
        /// Volume name.
        name: String,
        /// Owner of the new volume.
        owner: String,
        /// Clone source, if a clone.
        origin: Option<String>,
    },
    /// A volume is being deleted.
    Delete {
        /// Volume name.
        name: String,
    },
    /// A volume is being copied from pool `from` to pool `to`: the copy in
    /// the pool its record does not name is the one to drop.
    Move {
        /// Volume name.
        name: String,
        /// Source pool.
        from: String,
        /// Target pool.
        to: String,
    },
}

impl Intent {
    /// The volume it is about (the key of the intent record).
    pub fn name(&self) -> &str {
        match self {
            Intent::Create { name, .. } | Intent::Delete { name } | Intent::Move { name, .. } => name,
        }
    }
}

/// An ISO image in the store.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct IsoMeta {
    /// Name (file `DATA/isos/NAME.iso`).
    pub name: String,
    /// Bytes.
    pub size_bytes: u64,
    /// Who uploaded it.
    pub owner: String,
    /// Unix seconds.
    pub created: u64,
}

/// The state of a VM. Transitions ([`VmState::next`]):
///
/// ```text
/// stopped/crashed --start--> starting --qemu up--> running --stop--> stopping --exit--> stopped
///        starting --qemu failed--> stopped        running --qemu died--> crashed
///        running --guest powered off--> stopped   stopping --timeout--> (forced) stopped
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    /// No QEMU.
    Stopped,
    /// QEMU is being started.
    Starting,
    /// QEMU runs the guest.
    Running,
    /// Shutdown asked; QEMU still runs.
    Stopping,
    /// QEMU exited without being asked to (killed, crashed).
    Crashed,
}

/// What happens to a VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmEvent {
    /// Start asked.
    Start,
    /// QEMU is up.
    Started,
    /// QEMU could not be started.
    StartFailed,
    /// Stop asked.
    Stop,
    /// QEMU exited after a stop, or the guest powered itself off.
    Exited,
    /// QEMU exited unasked.
    Died,
}

impl VmState {
    /// The state after `e`, or why `e` is not possible now.
    pub fn next(self, e: VmEvent) -> Result<VmState, String> {
        use VmEvent as E;
        use VmState as S;
        match (self, e) {
            (S::Stopped | S::Crashed, E::Start) => Ok(S::Starting),
            (S::Starting, E::Started) => Ok(S::Running),
            (S::Starting, E::StartFailed) => Ok(S::Stopped),
            (S::Running | S::Starting, E::Stop) => Ok(S::Stopping),
            (S::Stopping, E::Stop) => Ok(S::Stopping),
            (S::Running | S::Stopping, E::Exited) => Ok(S::Stopped),
            (S::Running | S::Starting, E::Died) => Ok(S::Crashed),
            (S::Stopping, E::Died) => Ok(S::Stopped),
            (S::Running | S::Starting | S::Stopping, E::Start) => Err("it is already running".into()),
            (S::Stopped | S::Crashed, E::Stop) => Err("it is not running".into()),
            (s, e) => Err(format!("{e:?} cannot happen in state {}", s.as_str())),
        }
    }

    /// The state's name.
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Stopped => "stopped",
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Stopping => "stopping",
            VmState::Crashed => "crashed",
        }
    }

    /// Whether a QEMU process exists (or may).
    pub fn has_qemu(self) -> bool {
        matches!(self, VmState::Starting | VmState::Running | VmState::Stopping)
    }
}

/// A disk of a VM: a Keel volume, under a device id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmDiskMeta {
    /// Device id in QEMU (`disk0`, `disk1`, ...).
    pub id: String,
    /// The volume.
    pub volume: String,
}

/// How a NIC is connected.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Network {
    /// QEMU user-mode networking (NAT).
    User,
    /// An existing tap interface.
    Tap(String),
    /// A host bridge.
    Bridge(String),
}

/// A NIC of a VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmNicMeta {
    /// Device id in QEMU (`nic0`, ...).
    pub id: String,
    /// MAC address.
    pub mac: String,
    /// Connection.
    pub network: Network,
}

/// Direct kernel boot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelBoot {
    /// Kernel image path on the host.
    pub kernel: String,
    /// Initrd path on the host.
    pub initrd: Option<String>,
    /// Kernel command line.
    #[serde(default)]
    pub append: String,
}

/// A VM's record.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmMeta {
    /// Name (the key).
    pub name: String,
    /// Owning user.
    pub owner: String,
    /// Virtual CPUs.
    pub cpus: u32,
    /// Guest memory.
    pub memory_bytes: u64,
    /// Disks in order.
    pub disks: Vec<VmDiskMeta>,
    /// ISO in the CD-ROM.
    pub cdrom: Option<String>,
    /// NICs in order.
    pub nics: Vec<VmNicMeta>,
    /// Boot order: `cdrom`, `disk`, `network`.
    pub boot: Vec<String>,
    /// Direct kernel boot.
    pub kernel: Option<KernelBoot>,
    /// Last known state.
    pub state: VmState,
    /// QEMU's pid while it runs.
    pub pid: Option<i32>,
    /// Why it last failed or crashed.
    pub error: Option<String>,
    /// Unix seconds.
    pub created: u64,
    /// When the current run started (unix seconds).
    pub started: Option<u64>,
    /// Running time is recorded in [`crate::db::USAGE`] up to here.
    pub metered_until: Option<u64>,
    /// The snapshots of the last backup, which the next one diffs against.
    #[serde(default)]
    pub backup_base: Option<BackupBase>,
}

/// The point in time of a VM's last backup.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupBase {
    /// Snapshot name on each of the VM's disk volumes.
    pub snapshot: String,
    /// The appliance it was stored as.
    pub appliance: String,
}

/// Running time of one VM of one owner in one hour.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageRow {
    /// Owner charged.
    pub user: String,
    /// The VM.
    pub vm: String,
    /// Start of the hour (unix seconds, a multiple of 3600).
    pub hour: u64,
    /// Seconds the VM ran in that hour.
    pub seconds: u64,
}

/// Split `[from, to)` at hour boundaries: `(hour start, seconds)` pairs.
pub fn split_hours(from: u64, to: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut t = from;
    while t < to {
        let hour = t - t % 3600;
        let end = (hour + 3600).min(to);
        out.push((hour, end - t));
        t = end;
    }
    out
}

/// One entry of the event log.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Event {
    /// Unix seconds.
    pub time: u64,
    /// Who did it (`keel` for the daemon itself).
    pub user: String,
    /// What was done, e.g. `volume.create`.
    pub action: String,
    /// On what.
    pub target: String,
    /// Free-form detail.
    pub detail: String,
}

/// The largest volume: 16 TiB. Thin volumes cost nothing until written,
/// but some work is proportional to a volume's size (an appliance's
/// manifest holds an entry per 1 MiB chunk, 16 M of them at this size), so
/// the size a request may ask for is bounded.
pub const MAX_VOLUME_BYTES: u64 = 16 << 40;

/// Check a volume size from a request: a positive multiple of 512 bytes, at
/// most [`MAX_VOLUME_BYTES`]. `what` names it in the error ("size", "blank
/// disk size").
pub fn check_volume_size(what: &str, size: u64) -> Result<(), String> {
    if size == 0 || !size.is_multiple_of(512) {
        return Err(format!("{what} {size} must be a positive multiple of 512 bytes"));
    }
    if size > MAX_VOLUME_BYTES {
        return Err(format!("{what} {size} is over the largest volume Keel makes, 16 TiB ({MAX_VOLUME_BYTES} bytes)"));
    }
    Ok(())
}

/// Seconds since the epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// A new volume's access key salt (see [`crate::access`]): random, never 0,
/// which marks records from before access keys.
pub fn new_key_salt() -> u64 {
    rand::random::<u64>().max(1)
}

/// Parse a size: bytes, or a number with a K/M/G/T suffix (powers of 1024),
/// optionally followed by `B` or `iB`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t.strip_suffix("iB").or_else(|| t.strip_suffix('B')).unwrap_or(t);
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("unknown size suffix in {s:?} (use K, M, G or T)")),
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    let n: u64 = num.trim().parse().map_err(|_| format!("{s:?} is not a size (examples: 512, 64M, 10G)"))?;
    n.checked_mul(mult).ok_or_else(|| format!("{s:?} is too large"))
}

/// Bytes as a short human string (binary units).
pub fn human(b: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{b} B") } else { format!("{v:.1} {}", UNITS[u]) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_suffixes() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("10G").unwrap(), 10 << 30);
        assert_eq!(parse_size("64m").unwrap(), 64 << 20);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("2T").unwrap(), 2 << 40);
        assert!(parse_size("5X").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn vm_state_machine() {
        use VmEvent as E;
        use VmState as S;
        let run = S::Stopped.next(E::Start).and_then(|s| s.next(E::Started)).unwrap();
        assert_eq!(run, S::Running);
        assert_eq!(run.next(E::Stop).and_then(|s| s.next(E::Exited)), Ok(S::Stopped));
        assert_eq!(run.next(E::Died), Ok(S::Crashed));
        assert_eq!(run.next(E::Exited), Ok(S::Stopped), "the guest powered itself off");
        assert_eq!(S::Starting.next(E::StartFailed), Ok(S::Stopped));
        assert_eq!(S::Crashed.next(E::Start), Ok(S::Starting));
        assert!(run.next(E::Start).unwrap_err().contains("already running"));
        assert!(S::Stopped.next(E::Stop).unwrap_err().contains("not running"));
        assert!(S::Stopped.next(E::Started).is_err());
        assert!(S::Stopped.next(E::Died).is_err());
    }

    #[test]
    fn hours_split() {
        assert_eq!(split_hours(3500, 3700), vec![(0, 100), (3600, 100)]);
        assert_eq!(split_hours(7200, 7200), vec![]);
        assert_eq!(split_hours(10, 7300), vec![(0, 3590), (3600, 3600), (7200, 100)]);
    }
}
