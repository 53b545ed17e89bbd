//! The appliance's iSCSI targets: every volume in the metadata is a target
//! `iqn.2026-11.io.keel:VOLUME` with LUN 0, under the initiator ACL and
//! CHAP secret kept in its export settings. A logged-in LUN holds a session
//! on its volume, so the API refuses to delete a volume in use.

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use keel_blockstore::{AnyBackend, BlockDevice, Extent, Result, Volume};
use keel_iscsi_target::{Access, Chap, Targets};
use keel_nbd_server::ExportStats;

use crate::app::{App, IscsiTargets, SessionGuard};

/// [`Targets`] over the appliance's metadata and pool.
pub struct AppTargets {
    app: Arc<App>,
}

impl AppTargets {
    /// The targets of `app`.
    pub fn new(app: Arc<App>) -> AppTargets {
        AppTargets { app }
    }
}

/// A volume served as a LUN, counted as a session while it is open.
pub struct InUse {
    vol: Volume<AnyBackend>,
    stats: Arc<ExportStats>,
    _guard: SessionGuard,
}

impl Targets for AppTargets {
    type Device = InUse;

    fn names(&self) -> Vec<String> {
        self.app.targets().into_iter().map(|t| t.iqn).collect()
    }

    fn open(&self, name: &str) -> Option<Arc<InUse>> {
        let t = self.app.target(name)?;
        let vol = self.app.pools.volume(&t.volume).ok()?;
        let guard = self.app.sessions.open("iscsi", &t.volume);
        let stats = self.app.iscsi_io.lock().entry(t.volume.clone()).or_default().clone();
        Some(Arc::new(InUse { vol, stats, _guard: guard }))
    }

    /// With access keys on, discovery lists nothing: target names are
    /// volume names, tenants' data. Each volume's `iscsi_url` names its
    /// target.
    fn discoverable(&self, _name: &str) -> bool {
        !self.app.access.required()
    }

    fn access(&self, name: &str) -> Option<Access> {
        let Some(t) = self.app.target(name) else {
            // With keys on, a target that does not exist asks for CHAP like
            // one that does (with a secret nobody knows), so a login does
            // not reveal which volume names exist.
            let keyed = self.app.access.required() && name.starts_with(crate::model::IQN_PREFIX);
            let user = name.strip_prefix(crate::model::IQN_PREFIX).unwrap_or(name).to_string();
            let secret = crate::auth::new_password();
            return keyed.then(|| Access { initiators: Vec::new(), chap: Some(Chap { user, secret }), mutual: None });
        };
        Some(Access {
            initiators: t.initiators,
            chap: t.chap.map(|c| Chap { user: c.user, secret: c.secret }),
            mutual: None,
        })
    }
}

impl InUse {
    fn count_write(&self, bytes: usize) {
        self.stats.write_ops.fetch_add(1, Ordering::Relaxed);
        self.stats.write_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }
}

impl BlockDevice for InUse {
    fn size(&self) -> u64 {
        self.vol.size()
    }
    fn block_size(&self) -> u32 {
        self.vol.block_size()
    }
    fn read_only(&self) -> bool {
        self.vol.read_only()
    }
    async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.stats.read_ops.fetch_add(1, Ordering::Relaxed);
        self.stats.read_bytes.fetch_add(buf.len() as u64, Ordering::Relaxed);
        self.vol.read(offset, buf).await
    }
    async fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        self.count_write(data.len());
        self.vol.write(offset, data, fua).await
    }
    async fn write_atomic(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        self.count_write(data.len());
        self.vol.write_atomic(offset, data, fua).await
    }
    fn atomic_max(&self) -> u32 {
        BlockDevice::atomic_max(&self.vol)
    }
    async fn flush(&self) -> Result<()> {
        self.vol.flush().await
    }
    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.vol.discard(offset, len).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.vol.write_zeroes(offset, len, fua).await
    }
    async fn copy_within(&self, src: u64, dst: u64, len: u64, fua: bool) -> Result<()> {
        self.count_write(len as usize);
        self.vol.copy_within(src, dst, len, fua).await
    }
    async fn prefetch(&self, offset: u64, len: u64) -> Result<()> {
        self.vol.prefetch(offset, len).await
    }
    async fn allocation(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.vol.allocation(offset, len).await
    }
    async fn changed_since(&self, snapshot: &str) -> Result<Vec<Range<u64>>> {
        self.vol.changed_since(snapshot).await
    }
}
