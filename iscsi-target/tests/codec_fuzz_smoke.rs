//! The fuzz target's body over random and mutated inputs on the stable
//! toolchain (the coverage-guided run is `cargo +nightly fuzz run pdu` in
//! iscsi-target/fuzz).

use keel_iscsi_target::pdu::{self, Bhs, Framing, op};
use keel_iscsi_target::{login, text};
use proptest::prelude::*;

/// A well-formed login request, as a seed for mutation.
fn seed_login() -> Vec<u8> {
    let mut data = Vec::new();
    text::push(&mut data, "InitiatorName", "iqn.x");
    text::push(&mut data, "TargetName", "iqn.tc");
    text::push(&mut data, "AuthMethod", "CHAP,None");
    let mut b = Bhs::new(op::LOGIN_REQ);
    b.0[1] = 0x81;
    let mut out = Vec::new();
    pdu::encode(&mut out, &b, &data, Framing::default());
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..600)) {
        pdu::fuzz_frame(&data);
        login::fuzz_login(&data);
    }

    #[test]
    fn mutated_logins_never_panic(flips in proptest::collection::vec((0usize..200, any::<u8>()), 0..12)) {
        let mut data = seed_login();
        data.extend(seed_login());
        for (at, v) in flips {
            let i = at % data.len();
            data[i] = v;
        }
        pdu::fuzz_frame(&data);
        login::fuzz_login(&data);
    }
}
