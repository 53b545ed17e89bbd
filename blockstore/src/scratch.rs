//! Per-operation scratch arrays, kept out of the I/O futures.
//!
//! A read or write of up to [`PIECE_BLOCKS`] blocks needs that many map
//! entries, checksums and extents while it waits for the disk. Held inline
//! they made every I/O future several KiB, which each protocol server then
//! copies as it spawns, polls and finishes a request's task. A [`Scratch`]
//! lives on the heap instead and is recycled through a small per-thread free
//! list, so the hot path neither allocates (once warm) nor takes a lock.

use std::cell::RefCell;
use std::ops::{Deref, DerefMut};

use crate::format::Entry;
use crate::pool::PIECE_BLOCKS;

/// Arrays one block-range operation works in.
pub(crate) struct Arrays {
    pub entries: [Entry; PIECE_BLOCKS],
    pub crcs: [u32; PIECE_BLOCKS],
    pub extents: [(u64, u64); PIECE_BLOCKS],
}

/// Scratch arrays kept per thread for reuse.
const KEEP: usize = 64;

thread_local! {
    static FREE: RefCell<Vec<Box<Arrays>>> = const { RefCell::new(Vec::new()) };
}

/// A borrowed set of [`Arrays`], returned to the current thread's free list
/// when dropped. Contents are whatever the last user left: callers write
/// before they read.
pub(crate) struct Scratch(Option<Box<Arrays>>);

impl Scratch {
    pub fn take() -> Scratch {
        let reused = FREE.try_with(|f| f.borrow_mut().pop()).ok().flatten();
        Scratch(Some(reused.unwrap_or_else(|| {
            Box::new(Arrays {
                entries: [Entry::ZERO; PIECE_BLOCKS],
                crcs: [0; PIECE_BLOCKS],
                extents: [(0, 0); PIECE_BLOCKS],
            })
        })))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Some(b) = self.0.take() {
            let _ = FREE.try_with(|f| {
                let mut f = f.borrow_mut();
                if f.len() < KEEP {
                    f.push(b);
                }
            });
        }
    }
}

impl Deref for Scratch {
    type Target = Arrays;
    fn deref(&self) -> &Arrays {
        self.0.as_ref().expect("scratch present until dropped")
    }
}

impl DerefMut for Scratch {
    fn deref_mut(&mut self) -> &mut Arrays {
        self.0.as_mut().expect("scratch present until dropped")
    }
}
