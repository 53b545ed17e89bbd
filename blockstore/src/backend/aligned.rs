//! Block-aligned heap buffers, as O_DIRECT requires.

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

use super::BLOCK_SIZE;

/// A zeroed buffer whose address and length are multiples of [`BLOCK_SIZE`].
///
/// Allocate once and reuse: protocol servers keep one per in-flight request
/// slot so the data path allocates nothing per I/O.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only allow reads of the owned bytes.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes rounded up to a whole block (at least
    /// one block).
    pub fn new(len: usize) -> AlignedBuf {
        let len = len.max(1).div_ceil(BLOCK_SIZE) * BLOCK_SIZE;
        let layout = Self::layout(len);
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuf { ptr, len }
    }

    fn layout(len: usize) -> Layout {
        Layout::from_size_align(len, BLOCK_SIZE).expect("buffer layout")
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is a live allocation of len initialized (zeroed) bytes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref, and &mut self gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with exactly this layout.
        unsafe { dealloc(self.ptr.as_ptr(), Self::layout(self.len)) }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len)
    }
}

/// A small free list of [`AlignedBuf`]s, so a protocol server's requests
/// reuse buffers instead of allocating (and zeroing) one per I/O.
///
/// A buffer handed out may hold an earlier request's bytes: callers either
/// fill it completely or use only what they filled.
#[derive(Default)]
pub struct BufPool(parking_lot::Mutex<Kept>);

#[derive(Default)]
struct Kept {
    bufs: Vec<AlignedBuf>,
    bytes: usize,
}

impl BufPool {
    /// Buffers kept at most.
    const KEEP: usize = 256;
    /// Bytes kept at most, all buffers together: a burst of large requests
    /// does not leave its buffers held for the rest of the connection.
    const KEEP_BYTES: usize = 32 << 20;

    /// A buffer of at least `len` bytes (and not wastefully more: at most
    /// four times `len`, or four blocks).
    pub fn get(&self, len: usize) -> AlignedBuf {
        let mut k = self.0.lock();
        if let Some(i) = k.bufs.iter().position(|b| b.len() >= len && b.len() <= len.max(BLOCK_SIZE) * 4) {
            let b = k.bufs.swap_remove(i);
            k.bytes -= b.len();
            return b;
        }
        drop(k);
        AlignedBuf::new(len)
    }

    /// Give a buffer back for reuse (or free it, when the pool is full).
    pub fn put(&self, b: AlignedBuf) {
        let mut k = self.0.lock();
        if k.bufs.len() < Self::KEEP && k.bytes + b.len() <= Self::KEEP_BYTES {
            k.bytes += b.len();
            k.bufs.push(b);
        }
    }
}

/// True when `buf` can go to an O_DIRECT backend as it is.
pub(crate) fn is_aligned(buf: &[u8]) -> bool {
    (buf.as_ptr() as usize).is_multiple_of(BLOCK_SIZE) && buf.len().is_multiple_of(BLOCK_SIZE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_reuses_buffers_and_keeps_a_bounded_number_of_bytes() {
        let pool = BufPool::default();
        let b = pool.get(4096);
        let at = b.as_ptr();
        pool.put(b);
        assert_eq!(pool.get(4096).as_ptr(), at, "a returned buffer is handed out again");
        for _ in 0..20 {
            pool.put(AlignedBuf::new(4 << 20));
        }
        let k = pool.0.lock();
        assert_eq!(k.bytes, k.bufs.iter().map(|b| b.len()).sum::<usize>());
        assert!(k.bytes <= BufPool::KEEP_BYTES, "{} bytes kept", k.bytes);
        assert_eq!(k.bufs.len(), BufPool::KEEP_BYTES / (4 << 20));
    }
}
