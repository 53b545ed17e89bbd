//! Every byte the store reads or writes goes through [`Backend`].
//!
//! Like redb's `StorageBackend` and Firecracker's `FileEngine`, one small
//! trait hides where the bytes live: [`UringBackend`] (io_uring + O_DIRECT,
//! the fast path on Linux), [`FileBackend`] (portable positional I/O), and
//! [`MemBackend`] for tests. The crash tests add a fault-injecting backend on
//! top (see `tests/crash_consistency.rs`).
//!
//! Contract: offsets and lengths given by the store are multiples of
//! [`BLOCK_SIZE`] and buffers are [`BLOCK_SIZE`]-aligned in memory (the store
//! bounces unaligned caller buffers through [`AlignedBuf`]), so every backend
//! may use O_DIRECT. A completed `write_at` is not durable until a later
//! `sync` completes.

mod aligned;
mod file;
mod mem;
mod uring;

pub use aligned::{AlignedBuf, BufPool};
pub use file::FileBackend;
pub use mem::MemBackend;
pub use uring::{ReapStats, UringBackend};

use std::future::Future;
use std::io;

/// The unit of allocation, checksumming and backend I/O.
pub const BLOCK_SIZE: usize = 4096;

/// Positional async I/O on the pool's underlying file or block device.
pub trait Backend: Send + Sync + 'static {
    /// Read exactly `buf.len()` bytes at `offset`. Reading past the end is an
    /// error.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> impl Future<Output = io::Result<()>> + Send;
    /// Write all of `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> impl Future<Output = io::Result<()>> + Send;
    /// Write `bufs` one after another from `offset`, as [`Backend::write_at`]
    /// of their concatenation would (a gather write: the write-back writes
    /// a run of staged blocks straight from the data cache's slots). Like
    /// any write, it may tear on a crash. By default, one `write_at` per
    /// buffer, in order.
    fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> impl Future<Output = io::Result<()>> + Send {
        async move {
            let mut at = offset;
            for b in bufs {
                self.write_at(b, at).await?;
                at += b.len() as u64;
            }
            Ok(())
        }
    }
    /// Make every completed write durable.
    fn sync(&self) -> impl Future<Output = io::Result<()>> + Send;
    /// Size in bytes, as last read (at open, or by the last
    /// [`Backend::refresh_len`]).
    fn len(&self) -> u64;
    /// Read the size again (a file that got longer, a block device that
    /// grew: `lvextend`, `losetup -c`), remember it for [`Backend::len`] and
    /// return it. Backends whose `len` is always current return it.
    fn refresh_len(&self) -> io::Result<u64>;
    /// True when the backend holds no bytes.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Which engine to open a file or device with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    /// io_uring with O_DIRECT when the kernel allows it, else [`Engine::Sync`].
    Auto,
    /// io_uring with O_DIRECT; fails if io_uring is unavailable.
    Uring,
    /// Portable positional I/O (pread/pwrite), O_DIRECT when possible.
    Sync,
}

/// A file or device opened with the engine chosen at run time (Firecracker's
/// `FileEngine` pattern: one enum, no dynamic dispatch, no boxed futures).
pub enum AnyBackend {
    /// io_uring engine.
    Uring(UringBackend),
    /// Portable engine.
    File(FileBackend),
    /// In memory (tests, benches).
    Mem(MemBackend),
}

impl AnyBackend {
    /// Open `path` (a regular file or a block device) with `engine`.
    pub fn open(path: &std::path::Path, engine: Engine) -> io::Result<AnyBackend> {
        match engine {
            Engine::Sync => Ok(AnyBackend::File(FileBackend::open(path)?)),
            Engine::Uring => Ok(AnyBackend::Uring(UringBackend::open(path)?)),
            Engine::Auto => match UringBackend::open(path) {
                Ok(b) => Ok(AnyBackend::Uring(b)),
                Err(e) => {
                    tracing::warn!("io_uring unavailable ({e}); using the portable engine");
                    Ok(AnyBackend::File(FileBackend::open(path)?))
                }
            },
        }
    }

    /// The engine actually in use, for logs and stats.
    pub fn engine_name(&self) -> &'static str {
        match self {
            AnyBackend::Uring(_) => "io_uring",
            AnyBackend::File(_) => "sync",
            AnyBackend::Mem(_) => "memory",
        }
    }
}

impl Backend for AnyBackend {
    async fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match self {
            AnyBackend::Uring(b) => b.read_at(buf, offset).await,
            AnyBackend::File(b) => b.read_at(buf, offset).await,
            AnyBackend::Mem(b) => b.read_at(buf, offset).await,
        }
    }
    async fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        match self {
            AnyBackend::Uring(b) => b.write_at(buf, offset).await,
            AnyBackend::File(b) => b.write_at(buf, offset).await,
            AnyBackend::Mem(b) => b.write_at(buf, offset).await,
        }
    }
    async fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        match self {
            AnyBackend::Uring(b) => b.write_vectored_at(bufs, offset).await,
            AnyBackend::File(b) => b.write_vectored_at(bufs, offset).await,
            AnyBackend::Mem(b) => b.write_vectored_at(bufs, offset).await,
        }
    }
    async fn sync(&self) -> io::Result<()> {
        match self {
            AnyBackend::Uring(b) => b.sync().await,
            AnyBackend::File(b) => b.sync().await,
            AnyBackend::Mem(b) => b.sync().await,
        }
    }
    fn len(&self) -> u64 {
        match self {
            AnyBackend::Uring(b) => b.len(),
            AnyBackend::File(b) => b.len(),
            AnyBackend::Mem(b) => b.len(),
        }
    }
    fn refresh_len(&self) -> io::Result<u64> {
        match self {
            AnyBackend::Uring(b) => b.refresh_len(),
            AnyBackend::File(b) => b.refresh_len(),
            AnyBackend::Mem(b) => b.refresh_len(),
        }
    }
}

/// Open `path` for direct I/O: O_DIRECT when the file system supports it
/// (tmpfs does not), plain buffered I/O otherwise. Returns the file, whether
/// O_DIRECT is on, and its size.
pub(crate) fn open_direct(path: &std::path::Path) -> io::Result<(std::fs::File, bool, u64)> {
    use std::os::unix::fs::OpenOptionsExt;
    let direct = std::fs::OpenOptions::new().read(true).write(true).custom_flags(libc::O_DIRECT).open(path);
    let (file, is_direct) = match direct {
        Ok(f) => (f, true),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            (std::fs::OpenOptions::new().read(true).write(true).open(path)?, false)
        }
        Err(e) => return Err(e),
    };
    let len = device_len(&file)?;
    Ok((file, is_direct, len))
}

/// Size of a regular file or a block device, asked of the kernel now (a
/// block device's through `BLKGETSIZE64`, which sees a resize at once).
pub(crate) fn device_len(file: &std::fs::File) -> io::Result<u64> {
    use std::os::unix::fs::FileTypeExt;
    use std::os::unix::io::AsRawFd;
    let meta = file.metadata()?;
    if meta.file_type().is_block_device() {
        let mut size: u64 = 0;
        // BLKGETSIZE64 = _IOR(0x12, 114, size_t)
        const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
        // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which
        // points at a live, writable u64 for the duration of the call.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size as *mut u64) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(size)
    } else {
        Ok(meta.len())
    }
}
