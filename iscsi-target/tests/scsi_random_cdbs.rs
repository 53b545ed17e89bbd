//! Random CDBs and Data-Out buffers: `execute`, `parse_cdb` and
//! `data_out_len` never panic, and every answer is GOOD, RESERVATION
//! CONFLICT or a CHECK CONDITION carrying well-formed sense.

mod scsi_common;
use keel_iscsi_target::scsi::{Command, no_such_lun, parse_cdb};
use proptest::prelude::*;
use scsi_common::*;

/// Opcodes the layer knows, so random CDBs reach the executors instead of
/// stopping at INVALID COMMAND OPERATION CODE.
const OPCODES: &[u8] = &[
    0x00, 0x03, 0x08, 0x0A, 0x12, 0x15, 0x16, 0x17, 0x1A, 0x1B, 0x1E, 0x25, 0x28, 0x2A, 0x2E, 0x2F, 0x34, 0x35, 0x37,
    0x41, 0x42, 0x48, 0x55, 0x5A, 0x5E, 0x5F, 0x83, 0x84, 0x88, 0x89, 0x8A, 0x8B, 0x8E, 0x8F, 0x90, 0x91, 0x93, 0x9E,
    0xA0, 0xA3, 0xA8, 0xAA, 0xAE, 0xAF, 0xB7,
];

fn valid_sense(s: &[u8]) -> bool {
    match s.first().map(|b| b & 0x7F) {
        Some(0x70) => s.len() >= 18 && s[7] as usize + 8 == s.len(),
        Some(0x72) => s.len() >= 8 && s[7] as usize + 8 == s.len(),
        _ => false,
    }
}

fn cdb_strategy() -> impl Strategy<Value = Vec<u8>> {
    (prop::sample::select(OPCODES), prop::collection::vec(any::<u8>(), 0..20), any::<bool>()).prop_map(
        |(op, mut rest, small)| {
            if small {
                // Keep LBAs and lengths small so commands reach the device.
                for b in rest.iter_mut().skip(1).take(12) {
                    *b &= 0x03;
                }
            }
            let mut c = vec![op];
            c.append(&mut rest);
            c
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn random_commands_never_panic(
        cmds in prop::collection::vec(
            (cdb_strategy(), prop::collection::vec(any::<u8>(), 0..1100), 0u64..3), 1..12)
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        rt.block_on(async {
            let (_p, lu) = lu_in_pool(MIB, 8 * MIB).await;
            for (cdb, data, who) in cmds {
                let _ = parse_cdb(&cdb);
                let want = lu.data_out_len(&cdb) as usize;
                let data = if data.len() > 600 { vec![0u8; want.min(1 << 16)] } else { data };
                let n = nexus(who + 1, &format!("iqn.i{who}"));
                let r = lu.execute(&n, Command { cdb: &cdb, data_out: &data, lun: 0 }).await;
                match r.status {
                    0 | 0x18 => prop_assert!(r.sense.is_empty()),
                    2 => prop_assert!(valid_sense(&r.sense), "bad sense {:?} for {:02x?}", r.sense, cdb),
                    s => prop_assert!(false, "status {s:#x}"),
                }
                let r = no_such_lun(Command { cdb: &cdb, data_out: &data, lun: 9 });
                prop_assert!(r.status == 0 || valid_sense(&r.sense));
            }
            Ok(())
        })?;
    }

    #[test]
    fn parse_cdb_never_panics(cdb in prop::collection::vec(any::<u8>(), 0..40)) {
        let _ = parse_cdb(&cdb);
    }
}
