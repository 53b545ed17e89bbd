//! The fuzz target's body over random inputs, on the stable toolchain (the
//! coverage-guided run is `cargo +nightly fuzz run codec` in
//! nbd-server/fuzz).

use keel_nbd_server::proto;
use proptest::prelude::*;

fn header_like() -> impl Strategy<Value = Vec<u8>> {
    // Real magics followed by random bytes, so decoding gets past the magic.
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..64),
        proptest::collection::vec(any::<u8>(), 0..40).prop_map(|mut v| {
            let mut b = proto::IHAVEOPT.to_be_bytes().to_vec();
            b.append(&mut v);
            b
        }),
        proptest::collection::vec(any::<u8>(), 0..40).prop_map(|mut v| {
            let mut b = proto::REQUEST_MAGIC.to_be_bytes().to_vec();
            b.append(&mut v);
            b
        }),
        proptest::collection::vec(any::<u8>(), 0..40).prop_map(|mut v| {
            let mut b = proto::EXT_REQUEST_MAGIC.to_be_bytes().to_vec();
            b.append(&mut v);
            b
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(20_000))]
    #[test]
    fn decoders_never_panic(data in header_like()) {
        proto::fuzz_all(&data);
    }
}
