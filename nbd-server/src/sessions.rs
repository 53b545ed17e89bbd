//! Counting what the server does per export: open connections (sessions)
//! and I/O, for whoever runs the server (the appliance refuses to delete a
//! volume that a client has open, and reports the counters as metrics).
//!
//! [`CountingExports`] wraps any [`Exports`]: every device it opens is a
//! [`Counted`] that holds its export's [`ExportStats`] and counts one open
//! session from open to drop. The connection code keeps the device for the
//! whole transmission phase and drops the ones it opens only to answer
//! NBD_OPT_INFO, so "open devices" is "clients connected to that export".

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use keel_blockstore::{BlockDevice, Extent, Result};

use crate::server::Exports;

/// Counters of one export.
#[derive(Debug, Default)]
pub struct ExportStats {
    /// Devices open now (connections in the transmission phase).
    pub sessions: AtomicU64,
    /// Read requests served.
    pub read_ops: AtomicU64,
    /// Bytes read.
    pub read_bytes: AtomicU64,
    /// Write requests served (write-zeroes included).
    pub write_ops: AtomicU64,
    /// Bytes written.
    pub write_bytes: AtomicU64,
}

/// A point-in-time copy of an export's counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExportCounters {
    /// Export name.
    pub name: String,
    /// Open sessions.
    pub sessions: u64,
    /// Read requests.
    pub read_ops: u64,
    /// Bytes read.
    pub read_bytes: u64,
    /// Write requests.
    pub write_ops: u64,
    /// Bytes written.
    pub write_bytes: u64,
}

/// Wraps an [`Exports`] and counts sessions and I/O per export name.
pub struct CountingExports<E: Exports> {
    inner: E,
    stats: Mutex<HashMap<String, Arc<ExportStats>>>,
}

impl<E: Exports> CountingExports<E> {
    /// Count what is done through `inner`.
    pub fn new(inner: E) -> CountingExports<E> {
        CountingExports { inner, stats: Mutex::new(HashMap::new()) }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Arc<ExportStats>>> {
        // Counters stay usable after a panic elsewhere: they are plain numbers.
        self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn stats_of(&self, name: &str) -> Arc<ExportStats> {
        self.lock().entry(name.to_string()).or_default().clone()
    }

    /// Open sessions on export `name` (0 for an export never opened).
    pub fn sessions(&self, name: &str) -> u64 {
        self.lock().get(name).map_or(0, |s| s.sessions.load(Ordering::Relaxed))
    }

    /// The exports it counts.
    pub fn inner(&self) -> &E {
        &self.inner
    }

    /// Open sessions on every export.
    pub fn total_sessions(&self) -> u64 {
        self.lock().values().map(|s| s.sessions.load(Ordering::Relaxed)).sum()
    }

    /// Counters of every export opened since the server started.
    pub fn counters(&self) -> Vec<ExportCounters> {
        let mut v: Vec<ExportCounters> = self
            .lock()
            .iter()
            .map(|(name, s)| ExportCounters {
                name: name.clone(),
                sessions: s.sessions.load(Ordering::Relaxed),
                read_ops: s.read_ops.load(Ordering::Relaxed),
                read_bytes: s.read_bytes.load(Ordering::Relaxed),
                write_ops: s.write_ops.load(Ordering::Relaxed),
                write_bytes: s.write_bytes.load(Ordering::Relaxed),
            })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Forget the counters of an export (its device was deleted). Sessions
    /// still open keep their own handle.
    pub fn forget(&self, name: &str) {
        self.lock().remove(name);
    }
}

impl<E: Exports> Exports for CountingExports<E> {
    type Device = Counted<E::Device>;

    fn open(&self, name: &str) -> Option<Arc<Counted<E::Device>>> {
        let dev = self.inner.open(name)?;
        let stats = self.stats_of(name);
        stats.sessions.fetch_add(1, Ordering::Relaxed);
        Some(Arc::new(Counted { dev, stats }))
    }

    fn names(&self) -> Vec<String> {
        self.inner.names()
    }

    fn list_refusal(&self) -> Option<String> {
        self.inner.list_refusal()
    }

    fn unknown_export(&self, name: &str) -> String {
        self.inner.unknown_export(name)
    }

    fn log_name(&self, name: &str) -> String {
        self.inner.log_name(name)
    }

    fn bitmaps(&self, name: &str) -> Vec<String> {
        self.inner.bitmaps(name)
    }

    fn ready(&self, name: &str) -> impl std::future::Future<Output = ()> + Send {
        self.inner.ready(name)
    }

    fn eviction(&self, name: &str) -> Option<tokio::sync::watch::Receiver<u64>> {
        self.inner.eviction(name)
    }
}

/// A device opened through [`CountingExports`]: one session until dropped.
pub struct Counted<D> {
    dev: Arc<D>,
    stats: Arc<ExportStats>,
}

impl<D> Drop for Counted<D> {
    fn drop(&mut self) {
        self.stats.sessions.fetch_sub(1, Ordering::Relaxed);
    }
}

impl<D: BlockDevice> BlockDevice for Counted<D> {
    fn size(&self) -> u64 {
        self.dev.size()
    }
    fn block_size(&self) -> u32 {
        self.dev.block_size()
    }
    fn read_only(&self) -> bool {
        self.dev.read_only()
    }
    async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.stats.read_ops.fetch_add(1, Ordering::Relaxed);
        self.stats.read_bytes.fetch_add(buf.len() as u64, Ordering::Relaxed);
        self.dev.read(offset, buf).await
    }
    async fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        self.stats.write_ops.fetch_add(1, Ordering::Relaxed);
        self.stats.write_bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
        self.dev.write(offset, data, fua).await
    }
    async fn write_atomic(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        self.stats.write_ops.fetch_add(1, Ordering::Relaxed);
        self.stats.write_bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
        self.dev.write_atomic(offset, data, fua).await
    }
    fn atomic_max(&self) -> u32 {
        self.dev.atomic_max()
    }
    async fn flush(&self) -> Result<()> {
        self.dev.flush().await
    }
    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.dev.discard(offset, len).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        self.stats.write_ops.fetch_add(1, Ordering::Relaxed);
        self.dev.write_zeroes(offset, len, fua).await
    }
    async fn copy_within(&self, src: u64, dst: u64, len: u64, fua: bool) -> Result<()> {
        self.stats.write_ops.fetch_add(1, Ordering::Relaxed);
        self.dev.copy_within(src, dst, len, fua).await
    }
    async fn prefetch(&self, offset: u64, len: u64) -> Result<()> {
        self.dev.prefetch(offset, len).await
    }
    async fn allocation(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.dev.allocation(offset, len).await
    }
    async fn changed_since(&self, snapshot: &str) -> Result<Vec<Range<u64>>> {
        self.dev.changed_since(snapshot).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct One;
    impl Exports for One {
        type Device = Zero;
        fn open(&self, name: &str) -> Option<Arc<Zero>> {
            (name == "v").then(|| Arc::new(Zero))
        }
        fn names(&self) -> Vec<String> {
            vec!["v".into()]
        }
        fn bitmaps(&self, _: &str) -> Vec<String> {
            Vec::new()
        }
    }
    struct Zero;
    impl BlockDevice for Zero {
        fn size(&self) -> u64 {
            4096
        }
        fn block_size(&self) -> u32 {
            4096
        }
        fn read_only(&self) -> bool {
            false
        }
        async fn read(&self, _: u64, buf: &mut [u8]) -> Result<()> {
            buf.fill(0);
            Ok(())
        }
        async fn write(&self, _: u64, _: &[u8], _: bool) -> Result<()> {
            Ok(())
        }
        async fn write_atomic(&self, _: u64, _: &[u8], _: bool) -> Result<()> {
            Ok(())
        }
        fn atomic_max(&self) -> u32 {
            4096
        }
        async fn flush(&self) -> Result<()> {
            Ok(())
        }
        async fn discard(&self, _: u64, _: u64) -> Result<()> {
            Ok(())
        }
        async fn write_zeroes(&self, _: u64, _: u64, _: bool) -> Result<()> {
            Ok(())
        }
        async fn copy_within(&self, _: u64, _: u64, _: u64, _: bool) -> Result<()> {
            Ok(())
        }
        async fn prefetch(&self, _: u64, _: u64) -> Result<()> {
            Ok(())
        }
        async fn allocation(&self, _: u64, _: u64) -> Result<Vec<Extent>> {
            Ok(Vec::new())
        }
        async fn changed_since(&self, _: &str) -> Result<Vec<Range<u64>>> {
            Ok(Vec::new())
        }
    }

    #[tokio::test]
    async fn sessions_count_open_devices_and_io() {
        let ex = CountingExports::new(One);
        assert!(ex.open("nope").is_none());
        assert_eq!(ex.sessions("nope"), 0);
        let a = ex.open("v").unwrap();
        let b = ex.open("v").unwrap();
        assert_eq!(ex.sessions("v"), 2);
        let mut buf = [1u8; 512];
        a.read(0, &mut buf).await.unwrap();
        b.write(0, &buf, false).await.unwrap();
        drop(a);
        assert_eq!(ex.sessions("v"), 1);
        assert_eq!(ex.total_sessions(), 1);
        let c = &ex.counters()[0];
        assert_eq!((c.read_ops, c.read_bytes, c.write_ops, c.write_bytes), (1, 512, 1, 512));
        drop(b);
        assert_eq!(ex.sessions("v"), 0);
    }
}
