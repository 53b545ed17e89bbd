//! Data-plane access keys: who may open a volume over NBD or iSCSI.
//!
//! NBD has no authentication of its own, and an iSCSI target without CHAP
//! admits any initiator, so on a shared appliance any local process could
//! open any tenant's volume by name. Every volume therefore has an *access
//! key*: 16 letters and digits (~95 bits), derived from the daemon's secret
//! (`DATA/access.secret`, 32 random bytes, mode 0600) and the volume's name
//! and key salt (random per volume, in its record) by keyed BLAKE3: no
//! secret is stored per volume, and internal volumes (appliance bases: no
//! record, salt 0) have keys too.
//!
//! * NBD: the export name is `VOLUME:KEY` (a snapshot `VOLUME@SNAP:KEY`, with
//!   its volume's key). The `nbd_url` the API gives a user who may see the
//!   volume carries it, so QEMU, qemu-img, nbdinfo and nbdcopy use it as it
//!   is. A name without the right key is "not found" (nothing says whether
//!   the volume exists), and NBD_OPT_LIST is refused.
//! * iSCSI: a target with no CHAP secret of its own requires CHAP with user
//!   `VOLUME` and the key as secret; the `iscsi_url` carries both
//!   (`iscsi://VOLUME%KEY@portal/iqn/0`, libiscsi's and QEMU's form).
//! * Rotating a volume's key draws a new salt: every URL handed out before
//!   stops working for new connections.
//!
//! `--export-auth none` (config `export_auth = "none"`) turns the keys off
//! for appliances on a host where every local user is trusted.
//!
//! The daemon's own NBD clients (QEMU for VM disks, qemu-img for OVA export
//! and import) use a private Unix socket instead (`DATA/nbd.sock`, mode
//! 0600, plain device names): a key on their command lines would be readable
//! by every local user through `/proc/PID/cmdline`. Internal volumes
//! (`_`-named appliance bases) are served there only.

use std::io;
use std::path::Path;
use std::sync::Arc;

use keel_blockstore::{AnyBackend, Volume};
use keel_nbd_server::{Counted, Exports};

use crate::app::App;

/// Length of an access key.
const KEY_LEN: usize = 16;
const ALPHABET: &[u8; 62] = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";

/// The daemon's secret and whether keys are required.
pub struct AccessKeys {
    secret: [u8; 32],
    required: bool,
}

impl AccessKeys {
    /// Read `DATA/access.secret`, making it (mode 0600, synced) on first use.
    pub fn load(data: &Path, required: bool) -> io::Result<AccessKeys> {
        let path = data.join("access.secret");
        match std::fs::read(&path) {
            Ok(b) if b.len() == 32 => {
                let mut secret = [0u8; 32];
                secret.copy_from_slice(&b);
                return Ok(AccessKeys { secret, required });
            }
            Ok(b) => {
                return Err(io::Error::other(format!(
                    "{} holds {} bytes, not 32: restore it from a backup (every volume's access key derives from it), \
                     or delete it to give every volume a new key",
                    path.display(),
                    b.len()
                )));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let secret: [u8; 32] = rand::random();
        // Synced, directory included: a lost secret changes every volume's key.
        crate::serve::write_owner_only(&path, &secret)?;
        Ok(AccessKeys { secret, required })
    }

    /// Keys made from a fixed secret (unit tests).
    #[cfg(test)]
    pub fn fixed(secret: [u8; 32], required: bool) -> AccessKeys {
        AccessKeys { secret, required }
    }

    /// Whether clients must present keys.
    pub fn required(&self) -> bool {
        self.required
    }

    /// The access key of volume `volume` whose key salt is `salt`.
    pub fn key(&self, volume: &str, salt: u64) -> String {
        let mut h = blake3::Hasher::new_keyed(&self.secret);
        h.update(b"keel volume access key\0");
        h.update(volume.as_bytes());
        h.update(b"\0");
        h.update(&salt.to_le_bytes());
        let digest = h.finalize();
        let mut n = u128::from_le_bytes(digest.as_bytes()[..16].try_into().expect("16 bytes"));
        (0..KEY_LEN)
            .map(|_| {
                let c = ALPHABET[(n % 62) as usize] as char;
                n /= 62;
                c
            })
            .collect()
    }

    /// The NBD export name of device `device` (a volume or `VOLUME@SNAP`)
    /// whose volume's key salt is `salt`.
    pub fn export_name(&self, device: &str, salt: u64) -> String {
        if !self.required {
            return device.to_string();
        }
        format!("{device}:{}", self.key(volume_of(device), salt))
    }

    /// The device an export name opens, if its key is right (or keys are
    /// not required and it names a device plainly). `salt` gives a volume's
    /// key salt, or `None` when the volume has no key (no record).
    pub fn check(&self, export: &str, salt: impl Fn(&str) -> Option<u64>) -> Option<String> {
        if let Some((device, key)) = export.rsplit_once(':')
            && key.len() == KEY_LEN
            && let Some(salt) = salt(volume_of(device))
        {
            let want = self.key(volume_of(device), salt);
            if constant_time_eq(key.as_bytes(), want.as_bytes()) {
                return Some(device.to_string());
            }
        }
        (!self.required).then(|| export.to_string())
    }
}

/// Where the daemon's private NBD socket lives: `DATA/nbd.sock`, or, when
/// that path is too long for a socket address (108 bytes), a 0700 directory
/// under the temporary directory named after the data directory.
pub fn nbd_socket_path(data: &Path) -> std::path::PathBuf {
    let abs = std::path::absolute(data).unwrap_or_else(|_| data.to_path_buf());
    let p = abs.join("nbd.sock");
    if p.as_os_str().len() < 100 {
        return p;
    }
    let tag = blake3::hash(abs.as_os_str().as_encoded_bytes()).to_hex();
    std::env::temp_dir().join(format!("keel-{}", &tag[..16])).join("nbd.sock")
}

/// The volume part of a device name (`VOLUME@SNAP` -> `VOLUME`).
fn volume_of(device: &str) -> &str {
    device.split_once('@').map_or(device, |(v, _)| v)
}

/// Equal, without stopping at the first difference.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The NBD exports of the appliance: the pool's devices behind their access
/// keys, counted per device.
pub struct AppExports {
    app: Arc<App>,
}

impl AppExports {
    /// The exports of `app`.
    pub fn new(app: Arc<App>) -> AppExports {
        AppExports { app }
    }

    /// The device a TCP client's export name opens: never an internal one
    /// (`_`-named: appliance bases, served only on the private socket), and
    /// with keys on only a volume with a record (one being created, or a
    /// record from before keys, has no key of its own yet).
    fn device(&self, export: &str) -> Option<String> {
        let device = self.app.access.check(export, |v| self.app.key_salt(v))?;
        (!device.starts_with('_')).then_some(device)
    }
}

impl Exports for AppExports {
    type Device = Counted<Volume<AnyBackend>>;

    fn open(&self, name: &str) -> Option<Arc<Self::Device>> {
        self.app.nbd.open(&self.device(name)?)
    }

    fn names(&self) -> Vec<String> {
        if self.app.access.required() { Vec::new() } else { self.app.nbd.names() }
    }

    fn list_refusal(&self) -> Option<String> {
        self.app.access.required().then(|| {
            "this server does not list its exports: every volume's nbd_url (`keel volume show NAME`) names its \
             export, access key included"
                .to_string()
        })
    }

    fn unknown_export(&self, name: &str) -> String {
        let shown = name.rsplit_once(':').map_or(name, |(d, _)| d);
        if self.app.access.required() {
            format!(
                "no export {shown:?} with that access key: use the nbd_url `keel volume show` gives, which carries \
                 the volume's current key"
            )
        } else {
            format!("no export named {shown:?}")
        }
    }

    fn log_name(&self, name: &str) -> String {
        match name.rsplit_once(':') {
            Some((d, k)) if k.len() == KEY_LEN => format!("{d}:<key>"),
            _ => name.to_string(),
        }
    }

    fn bitmaps(&self, name: &str) -> Vec<String> {
        self.device(name).map(|d| self.app.nbd.bitmaps(&d)).unwrap_or_default()
    }

    fn ready(&self, name: &str) -> impl std::future::Future<Output = ()> + Send {
        let device = self.device(name);
        async move {
            if let Some(d) = device {
                self.app.nbd.ready(&d).await;
            }
        }
    }

    fn eviction(&self, name: &str) -> Option<tokio::sync::watch::Receiver<u64>> {
        self.app.nbd.eviction(&self.device(name)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_depend_on_secret_volume_and_salt() {
        let a = AccessKeys::fixed([1; 32], true);
        let b = AccessKeys::fixed([2; 32], true);
        let k = a.key("web", 0);
        assert_eq!(k.len(), KEY_LEN);
        assert!(k.bytes().all(|c| c.is_ascii_alphanumeric()), "{k}");
        assert_eq!(k, a.key("web", 0), "stable");
        assert_ne!(k, a.key("web", 1));
        assert_ne!(k, a.key("web2", 0));
        assert_ne!(k, b.key("web", 0));
    }

    #[test]
    fn the_private_socket_fits_a_socket_address() {
        let short = Path::new("/var/lib/keel");
        assert_eq!(nbd_socket_path(short), Path::new("/var/lib/keel/nbd.sock"));
        let long = std::path::PathBuf::from(format!("/srv/{}", "deep/".repeat(30)));
        let p = nbd_socket_path(&long);
        assert!(p.as_os_str().len() < 108, "{}", p.display());
        assert!(p.starts_with(std::env::temp_dir()), "{}", p.display());
        assert_eq!(p, nbd_socket_path(&long), "the same data directory, the same socket");
        let other = std::path::PathBuf::from(format!("/srv/{}", "other/".repeat(30)));
        assert_ne!(nbd_socket_path(&other), p, "two data directories, two sockets");
    }

    #[test]
    fn export_names_open_only_with_the_right_key() {
        let a = AccessKeys::fixed([7; 32], true);
        let salt0 = |_: &str| Some(0);
        let name = a.export_name("web", 0);
        assert_eq!(a.check(&name, salt0).as_deref(), Some("web"));
        let snap = a.export_name("web@monday", 0);
        assert!(snap.starts_with("web@monday:"));
        assert_eq!(a.check(&snap, salt0).as_deref(), Some("web@monday"));
        // The snapshot's key is its volume's.
        assert_eq!(snap.rsplit_once(':').unwrap().1, name.rsplit_once(':').unwrap().1);
        assert_eq!(a.check("web", salt0), None, "no key");
        assert_eq!(a.check("web:0000000000000000", salt0), None, "wrong key");
        let other = a.export_name("db", 0);
        let stolen = format!("web:{}", other.rsplit_once(':').unwrap().1);
        assert_eq!(a.check(&stolen, salt0), None, "another volume's key");
        assert_eq!(a.check(&name, |_| Some(1)), None, "a rotated key");
        assert_eq!(a.check(&name, |_| None), None, "a volume without a key");
        // Internal names contain ':' themselves.
        let internal = a.export_name("_a:base:0@base", 0);
        assert_eq!(a.check(&internal, salt0).as_deref(), Some("_a:base:0@base"));

        let open = AccessKeys::fixed([7; 32], false);
        assert_eq!(open.export_name("web", 0), "web");
        assert_eq!(open.check("web", salt0).as_deref(), Some("web"));
        assert_eq!(open.check(&name, salt0).as_deref(), Some("web"), "a keyed name still works");
    }
}
