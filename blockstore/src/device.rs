//! The interface protocol servers (NBD, iSCSI) program against.

use std::future::Future;
use std::ops::Range;

use crate::backend::Backend;
use crate::error::Result;
use crate::volume::{Extent, Volume};

/// An async block device: what an NBD export or an iSCSI LUN serves.
///
/// Offsets and lengths are in bytes, multiples of 512. Reads of unwritten
/// ranges return zeros. `write` with `fua` and `flush` follow the durability
/// rules of the NBD and SCSI protocols: when they complete, the data (for
/// `flush`, every write completed before it) survives a power cut.
pub trait BlockDevice: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Preferred I/O granularity (the store's block: 4096).
    fn block_size(&self) -> u32;
    /// True when writes are refused.
    fn read_only(&self) -> bool;
    /// Read `buf.len()` bytes at `offset`.
    fn read(&self, offset: u64, buf: &mut [u8]) -> impl Future<Output = Result<()>> + Send;
    /// Write `data` at `offset`; durable on return when `fua`.
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> impl Future<Output = Result<()>> + Send;
    /// Write `data` at `offset` all or nothing (even across a crash):
    /// whole device blocks ([`BlockDevice::block_size`]), at most
    /// [`BlockDevice::atomic_max`] bytes.
    fn write_atomic(&self, offset: u64, data: &[u8], fua: bool) -> impl Future<Output = Result<()>> + Send;
    /// Largest [`BlockDevice::write_atomic`] in bytes.
    fn atomic_max(&self) -> u32;
    /// Make every completed write durable.
    fn flush(&self) -> impl Future<Output = Result<()>> + Send;
    /// Deallocate a range (it reads as zeros after).
    fn discard(&self, offset: u64, len: u64) -> impl Future<Output = Result<()>> + Send;
    /// Make a range read as zeros, deallocating whole blocks.
    fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> impl Future<Output = Result<()>> + Send;
    /// Copy `len` bytes from offset `src` to offset `dst` of this device
    /// (the ranges may overlap, as with `memmove`); durable on return when
    /// `fua`. The store shares whole blocks instead of copying them.
    fn copy_within(&self, src: u64, dst: u64, len: u64, fua: bool) -> impl Future<Output = Result<()>> + Send;
    /// Pull a range into the store's data cache, if it has one (NBD
    /// `CACHE`, iSCSI PRE-FETCH); reads of it then need no disk I/O.
    fn prefetch(&self, offset: u64, len: u64) -> impl Future<Output = Result<()>> + Send;
    /// Allocated and unallocated extents of a range.
    fn allocation(&self, offset: u64, len: u64) -> impl Future<Output = Result<Vec<Extent>>> + Send;
    /// Byte ranges changed since snapshot `snapshot` of this volume.
    fn changed_since(&self, snapshot: &str) -> impl Future<Output = Result<Vec<Range<u64>>>> + Send;
}

impl<B: Backend> BlockDevice for Volume<B> {
    fn size(&self) -> u64 {
        Volume::size(self)
    }
    fn block_size(&self) -> u32 {
        crate::backend::BLOCK_SIZE as u32
    }
    fn read_only(&self) -> bool {
        Volume::read_only(self)
    }
    async fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        Volume::read(self, offset, buf).await
    }
    async fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        Volume::write(self, offset, data, fua).await
    }
    async fn write_atomic(&self, offset: u64, data: &[u8], fua: bool) -> Result<()> {
        Volume::write_atomic(self, offset, data, fua).await
    }
    fn atomic_max(&self) -> u32 {
        Volume::<B>::ATOMIC_MAX as u32
    }
    async fn flush(&self) -> Result<()> {
        Volume::flush(self).await
    }
    async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        Volume::discard(self, offset, len).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<()> {
        Volume::write_zeroes(self, offset, len, fua).await
    }
    async fn copy_within(&self, src: u64, dst: u64, len: u64, fua: bool) -> Result<()> {
        Volume::copy_within(self, src, dst, len, fua).await
    }
    async fn prefetch(&self, offset: u64, len: u64) -> Result<()> {
        Volume::prefetch(self, offset, len).await
    }
    async fn allocation(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        Volume::allocation(self, offset, len).await
    }
    async fn changed_since(&self, snapshot: &str) -> Result<Vec<Range<u64>>> {
        Volume::changed_since(self, snapshot).await
    }
}
