//! Keel's block store: thin volumes, O(1) snapshots and clones, change
//! tracking and checksums, on one file or block device.
//!
//! The design is in `ARCHITECTURE.md` at the repository root: a pool is a
//! pair of superblocks, a catalog of devices, reference counts, and a data
//! area where every device's map is a copy-on-write radix tree of 4 KiB
//! pages pointing at 4 KiB data blocks. Snapshots and clones share pages
//! (dm-thin's single shared mapping), so they cost O(1) to make and nothing
//! to read through. Every block is checksummed by the entry that points at
//! it; no block a committed state can see is ever overwritten, so a crash
//! leaves the last commit intact and every checksum true.
//!
//! Protocol servers use the [`BlockDevice`] trait; the pool itself is driven
//! through [`Pool`].

pub mod backend;
mod blockhash;
mod cache;
mod datacache;
mod device;
mod error;
pub mod format;
mod grace;
mod ops;
mod pool;
mod scratch;
mod space;
mod tree;
mod volume;
mod walk;
mod writeback;

pub use backend::{AlignedBuf, AnyBackend, BLOCK_SIZE, Backend, BufPool, Engine};
pub use datacache::DataCacheStats;
pub use device::BlockDevice;
pub use error::{Error, ErrorKind, Result};
pub use format::DeviceKind;
pub use ops::{DeviceInfo, PoolStats};
pub use pool::{GrowReport, OpenReport, Pool, PoolOptions};
pub use volume::{Extent, SECTOR, Volume};
pub use walk::{CheckReport, Damage, ScrubReport};
