//! Epoch-based grace periods: a block freed by a commit is handed back to the
//! allocator only when no read that might still be using it is in flight.
//!
//! A reader enters an epoch (two atomic operations, no lock) before it looks
//! up the map and leaves after its data I/O completes. Blocks freed while the
//! global epoch is `e` are reusable once the epoch has reached `e + 2`; the
//! epoch advances from `e` to `e + 1` only when no reader remains in `e - 1`.
//! Commits try to advance it; nothing ever waits for a reader.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// The epoch counter and the readers in the two live epochs.
#[derive(Default)]
pub(crate) struct Grace {
    epoch: AtomicU64,
    active: [AtomicUsize; 2],
}

/// Held by a reader; leaving the epoch on drop.
pub(crate) struct GraceGuard<'a> {
    grace: &'a Grace,
    slot: usize,
}

impl Grace {
    pub fn enter(&self) -> GraceGuard<'_> {
        loop {
            let e = self.epoch.load(Ordering::SeqCst);
            let slot = (e & 1) as usize;
            self.active[slot].fetch_add(1, Ordering::SeqCst);
            if self.epoch.load(Ordering::SeqCst) == e {
                return GraceGuard { grace: self, slot };
            }
            self.active[slot].fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// The current epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// Advance the epoch if no reader is left in the previous one. Returns
    /// the epoch after the attempt. Callers serialize (the commit lock).
    pub fn try_advance(&self) -> u64 {
        let e = self.epoch.load(Ordering::SeqCst);
        let prev = ((e + 1) & 1) as usize;
        if self.active[prev].load(Ordering::SeqCst) == 0 {
            self.epoch.store(e + 1, Ordering::SeqCst);
            e + 1
        } else {
            e
        }
    }
}

impl Drop for GraceGuard<'_> {
    fn drop(&mut self) {
        self.grace.active[self.slot].fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reader_holds_back_the_epoch_two_steps() {
        let g = Grace::default();
        let r = g.enter(); // in epoch 0
        assert_eq!(g.try_advance(), 1); // nobody in epoch -1
        assert_eq!(g.try_advance(), 1); // reader still in 0
        drop(r);
        assert_eq!(g.try_advance(), 2);
    }
}
