//! Fuzz every NBD decoder with arbitrary bytes: none may panic, and what
//! decodes must be consistent with the bytes consumed.
//!
//! Run: `cd nbd-server/fuzz && cargo +nightly fuzz run codec`.
#![no_main]

use keel_nbd_server::proto;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    keel_nbd_server::proto::fuzz_all(data);
    if let Ok(Some((_, n))) = proto::decode_option_header(data) {
        assert_eq!(n, 16);
    }
});
