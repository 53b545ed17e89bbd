//! A hasher for maps keyed by pool block number.
//!
//! Block numbers are chosen by the allocator, not by clients, so the maps
//! need no protection against chosen collisions, and std's SipHash costs
//! more than the rest of a cache lookup. One multiply, folded.

use std::hash::{BuildHasherDefault, Hasher};

/// Hash of a block number: one multiply, high bits folded down.
#[derive(Default)]
pub(crate) struct BlockHasher(u64);

/// For `HashMap<u64, _, BlockHash>`.
pub(crate) type BlockHash = BuildHasherDefault<BlockHasher>;

impl Hasher for BlockHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(self.0 ^ b as u64);
        }
    }

    fn write_u64(&mut self, x: u64) {
        // Another multiplier than the caches' shard choice (Fibonacci
        // hashing), and its high bits folded down: hashbrown tags entries
        // with the top 7 bits, which must not be the shard number again
        // (all equal within a shard).
        let h = x.wrapping_mul(0xD6E8_FEB8_6659_FD93);
        self.0 = h ^ (h >> 32);
    }
}
