//! Fuzz the iSCSI PDU framing, the text-key parser and the login state
//! machine with arbitrary bytes: none may panic.
//!
//! Run: `cd iscsi-target/fuzz && cargo +nightly fuzz run pdu`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    keel_iscsi_target::pdu::fuzz_frame(data);
    keel_iscsi_target::login::fuzz_login(data);
});
