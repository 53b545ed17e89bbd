//! An in-memory backend for tests and benches.

use std::io;
use std::sync::Arc;

use parking_lot::RwLock;

use super::Backend;

/// Bytes in memory. Cloning shares the same bytes.
#[derive(Clone)]
pub struct MemBackend {
    bytes: Arc<RwLock<Vec<u8>>>,
}

impl MemBackend {
    /// A zeroed backend of `len` bytes.
    pub fn new(len: u64) -> MemBackend {
        MemBackend::from_bytes(vec![0; len as usize])
    }

    /// A backend holding `bytes` (a crash image, say).
    pub fn from_bytes(bytes: Vec<u8>) -> MemBackend {
        MemBackend { bytes: Arc::new(RwLock::new(bytes)) }
    }

    /// A copy of every byte.
    pub fn snapshot(&self) -> Vec<u8> {
        self.bytes.read().clone()
    }

    /// Make the backend `len` bytes long: zeros added at the end, or the
    /// end cut off (a device that grew, or shrank, under a pool).
    pub fn set_len(&self, len: u64) {
        let mut bytes = self.bytes.write();
        let len = len as usize;
        if len > bytes.len() {
            // A zeroed allocation and one copy: `resize` goes byte by byte
            // in the unoptimized builds tests run in.
            let mut grown = vec![0u8; len];
            grown[..bytes.len()].copy_from_slice(&bytes);
            *bytes = grown;
        } else {
            bytes.truncate(len);
        }
    }

    /// Run `f` on the bytes (corrupting them in a test, say).
    pub fn with_bytes_mut<R>(&self, f: impl FnOnce(&mut Vec<u8>) -> R) -> R {
        f(&mut self.bytes.write())
    }
}

fn range(offset: u64, len: usize, total: usize) -> io::Result<std::ops::Range<usize>> {
    let start = usize::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let end = start.checked_add(len).filter(|&e| e <= total).ok_or_else(|| {
        io::Error::new(io::ErrorKind::UnexpectedEof, format!("I/O at {offset}+{len} beyond end {total}"))
    })?;
    Ok(start..end)
}

impl Backend for MemBackend {
    async fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let bytes = self.bytes.read();
        let r = range(offset, buf.len(), bytes.len())?;
        buf.copy_from_slice(&bytes[r]);
        Ok(())
    }
    async fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut bytes = self.bytes.write();
        let r = range(offset, buf.len(), bytes.len())?;
        bytes[r].copy_from_slice(buf);
        Ok(())
    }
    async fn sync(&self) -> io::Result<()> {
        Ok(())
    }
    fn len(&self) -> u64 {
        self.bytes.read().len() as u64
    }
    fn refresh_len(&self) -> io::Result<u64> {
        Ok(self.len())
    }
}
