//! io_uring engine (placeholder until the real engine lands).

use std::io;
use std::path::Path;

use super::{Backend, FileBackend};

/// io_uring + O_DIRECT engine.
pub struct UringBackend {
    inner: FileBackend,
}

impl UringBackend {
    /// Open an existing file or device.
    pub fn open(path: &Path) -> io::Result<UringBackend> {
        Ok(UringBackend { inner: FileBackend::open(path)? })
    }
}

impl Backend for UringBackend {
    async fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset).await
    }
    async fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.inner.write_at(buf, offset).await
    }
    async fn sync(&self) -> io::Result<()> {
        self.inner.sync().await
    }
    fn len(&self) -> u64 {
        self.inner.len()
    }
}
