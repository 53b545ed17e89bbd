//! The portable engine: positional reads and writes on the calling thread.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use super::Backend;

/// A file or block device accessed with pread/pwrite (O_DIRECT when the file
/// system allows). The futures complete on the calling thread: this engine
/// exists for portability and as the reference the io_uring engine is tested
/// against, not for speed.
pub struct FileBackend {
    file: File,
    len: AtomicU64,
    direct: bool,
}

impl FileBackend {
    /// Open an existing file or device read-write.
    pub fn open(path: &Path) -> io::Result<FileBackend> {
        let (file, direct, len) = super::open_direct(path)?;
        Ok(FileBackend { file, len: AtomicU64::new(len), direct })
    }

    /// Whether O_DIRECT is in effect.
    pub fn is_direct(&self) -> bool {
        self.direct
    }
}

impl Backend for FileBackend {
    async fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
    async fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }
    async fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }
    fn len(&self) -> u64 {
        self.len.load(Ordering::Relaxed)
    }
    fn refresh_len(&self) -> io::Result<u64> {
        let len = super::device_len(&self.file)?;
        self.len.store(len, Ordering::Relaxed);
        Ok(len)
    }
}
