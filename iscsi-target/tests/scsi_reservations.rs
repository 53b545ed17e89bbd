//! Persistent reservations and RESERVE(6): who may read and write under
//! each reservation type, ownership, preemption, nexus loss and reset.

mod scsi_common;
use keel_iscsi_target::scsi::ResetKind;
use scsi_common::*;

const REGISTER: u8 = 0;
const RESERVE: u8 = 1;
const RELEASE: u8 = 2;
const CLEAR: u8 = 3;
const PREEMPT: u8 = 4;
const REGISTER_AND_IGNORE: u8 = 6;

async fn can_read(lu: &Lu, n: &keel_iscsi_target::scsi::Nexus) -> bool {
    match exec(lu, n, &read10(0, 1), &[]).await.status {
        0 => true,
        0x18 => false,
        s => panic!("unexpected status {s:#x}"),
    }
}

async fn can_write(lu: &Lu, n: &keel_iscsi_target::scsi::Nexus) -> bool {
    match exec(lu, n, &write10(0, 1), &[0; 512]).await.status {
        0 => true,
        0x18 => false,
        s => panic!("unexpected status {s:#x}"),
    }
}

/// The access table of SPC-4 5.13.1 for one type: (registered reads,
/// registered writes, unregistered reads, unregistered writes) of a
/// second initiator while the first holds the reservation.
async fn check_access(rtype: u8, want: (bool, bool, bool, bool)) {
    let (_p, lu) = lu(MIB).await;
    let (a, b) = (nexus(1, "iqn.a"), nexus(2, "iqn.b"));
    assert_good(&prout(&lu, &a, REGISTER_AND_IGNORE, 0, 0, 0xA).await);
    assert_good(&prout(&lu, &b, REGISTER_AND_IGNORE, 0, 0, 0xB).await);
    assert_good(&prout(&lu, &a, RESERVE, rtype, 0xA, 0).await);
    assert!(can_read(&lu, &a).await && can_write(&lu, &a).await, "holder has full access ({rtype})");
    let got_reg = (can_read(&lu, &b).await, can_write(&lu, &b).await);
    assert_good(&prout(&lu, &b, REGISTER, 0, 0xB, 0).await);
    let got_unreg = (can_read(&lu, &b).await, can_write(&lu, &b).await);
    assert_eq!((got_reg.0, got_reg.1, got_unreg.0, got_unreg.1), want, "type {rtype}");
    // Commands outside the read/write classes are never blocked.
    assert_good(&exec(&lu, &b, &[0x12, 0, 0, 0, 36, 0], &[]).await);
    assert_good(&exec(&lu, &b, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]).await);
    assert_good(&prout(&lu, &a, RELEASE, rtype, 0xA, 0).await);
    assert!(can_write(&lu, &b).await);
}

#[tokio::test]
async fn write_exclusive_blocks_writes_of_everyone_else() {
    check_access(1, (true, false, true, false)).await;
}

#[tokio::test]
async fn exclusive_access_blocks_everyone_else() {
    check_access(3, (false, false, false, false)).await;
}

#[tokio::test]
async fn registrants_only_types_admit_registrants() {
    check_access(5, (true, true, true, false)).await;
    check_access(6, (true, true, false, false)).await;
}

#[tokio::test]
async fn all_registrants_types_admit_registrants() {
    check_access(7, (true, true, true, false)).await;
    check_access(8, (true, true, false, false)).await;
}

async fn read_reservation(lu: &Lu, n: &keel_iscsi_target::scsi::Nexus) -> Option<(u64, u8)> {
    let r = exec(lu, n, &[0x5E, 1, 0, 0, 0, 0, 0, 0, 64, 0], &[]).await;
    assert_good(&r);
    let len = u32::from_be_bytes(r.data_in[4..8].try_into().unwrap());
    (len == 16).then(|| (u64::from_be_bytes(r.data_in[8..16].try_into().unwrap()), r.data_in[21] & 0xF))
}

#[tokio::test]
async fn registration_keys_and_reservation_are_reported() {
    let (_p, lu) = lu(MIB).await;
    let (a, b) = (nexus(1, "iqn.a"), nexus(2, "iqn.b"));
    // REGISTER from an unregistered nexus with a nonzero key conflicts.
    assert_eq!(prout(&lu, &a, REGISTER, 0, 5, 0xA).await.status, 0x18);
    assert_good(&prout(&lu, &a, REGISTER, 0, 0, 0xA).await);
    assert_good(&prout(&lu, &b, REGISTER, 0, 0, 0xB).await);
    // Wrong key conflicts.
    assert_eq!(prout(&lu, &a, REGISTER, 0, 0xB, 0xC).await.status, 0x18);
    let r = exec(&lu, &a, &[0x5E, 0, 0, 0, 0, 0, 0, 0, 64, 0], &[]).await;
    assert_eq!(u32::from_be_bytes(r.data_in[4..8].try_into().unwrap()), 16);
    assert_eq!(&r.data_in[8..24], &[0, 0, 0, 0, 0, 0, 0, 0xA, 0, 0, 0, 0, 0, 0, 0, 0xB]);
    assert_eq!(read_reservation(&lu, &a).await, None);
    assert_good(&prout(&lu, &a, RESERVE, 1, 0xA, 0).await);
    assert_eq!(read_reservation(&lu, &b).await, Some((0xA, 1)));
    // Another type from the holder, or a reserve from a non-holder, conflicts.
    assert_eq!(prout(&lu, &a, RESERVE, 3, 0xA, 0).await.status, 0x18);
    assert_eq!(prout(&lu, &b, RESERVE, 1, 0xB, 0).await.status, 0x18);
    // Release with the wrong type is an invalid release.
    assert_eq!(sense(&prout(&lu, &a, RELEASE, 3, 0xA, 0).await), (5, 0x26, 0x04));
    // Unregistered initiators cannot reserve.
    let c = nexus(3, "iqn.c");
    assert_eq!(prout(&lu, &c, RESERVE, 1, 0, 0).await.status, 0x18);
    // Reporting a truncated key list keeps the full length.
    let r = exec(&lu, &a, &[0x5E, 0, 0, 0, 0, 0, 0, 0, 12, 0], &[]).await;
    assert_eq!(r.data_in.len(), 12);
    assert_eq!(u32::from_be_bytes(r.data_in[4..8].try_into().unwrap()), 16);
}

#[tokio::test]
async fn unregistering_the_holder_releases_the_reservation() {
    let (_p, lu) = lu(MIB).await;
    let (a, b) = (nexus(1, "iqn.a"), nexus(2, "iqn.b"));
    assert_good(&prout(&lu, &a, REGISTER, 0, 0, 0xA).await);
    assert_good(&prout(&lu, &b, REGISTER, 0, 0, 0xB).await);
    assert_good(&prout(&lu, &a, RESERVE, 3, 0xA, 0).await);
    assert!(!can_read(&lu, &b).await);
    assert_good(&prout(&lu, &a, REGISTER, 0, 0xA, 0).await);
    assert!(can_read(&lu, &b).await);
    assert_eq!(read_reservation(&lu, &b).await, None);
}

#[tokio::test]
async fn all_registrants_reservation_survives_until_the_last_registrant_leaves() {
    let (_p, lu) = lu(MIB).await;
    let (a, b, c) = (nexus(1, "iqn.a"), nexus(2, "iqn.b"), nexus(3, "iqn.c"));
    assert_good(&prout(&lu, &a, REGISTER, 0, 0, 0xA).await);
    assert_good(&prout(&lu, &b, REGISTER, 0, 0, 0xB).await);
    assert_good(&prout(&lu, &a, RESERVE, 8, 0xA, 0).await);
    assert_eq!(read_reservation(&lu, &b).await, Some((0, 8)));
    assert_good(&prout(&lu, &a, REGISTER, 0, 0xA, 0).await);
    assert_eq!(read_reservation(&lu, &b).await, Some((0, 8)));
    assert!(!can_read(&lu, &c).await);
    assert!(!can_read(&lu, &a).await);
    assert_good(&prout(&lu, &b, REGISTER, 0, 0xB, 0).await);
    assert_eq!(read_reservation(&lu, &c).await, None);
    assert!(can_write(&lu, &c).await);
}

#[tokio::test]
async fn preempt_takes_over_and_clear_drops_everything() {
    let (_p, lu) = lu(MIB).await;
    let (a, b) = (nexus(1, "iqn.a"), nexus(2, "iqn.b"));
    assert_good(&prout(&lu, &a, REGISTER, 0, 0, 0xA).await);
    assert_good(&prout(&lu, &b, REGISTER, 0, 0, 0xB).await);
    assert_good(&prout(&lu, &a, RESERVE, 1, 0xA, 0).await);
    assert_good(&prout(&lu, &b, PREEMPT, 3, 0xB, 0xA).await);
    assert_eq!(read_reservation(&lu, &b).await, Some((0xB, 3)));
    // a lost its registration and learns it once.
    let r = exec(&lu, &a, &[0; 6], &[]).await;
    assert_eq!(sense(&r), (6, 0x2A, 0x05));
    assert!(!can_read(&lu, &a).await);
    assert_eq!(prout(&lu, &a, RESERVE, 1, 0xA, 0).await.status, 0x18);
    // Preempting a key nobody holds conflicts.
    assert_eq!(prout(&lu, &b, PREEMPT, 3, 0xB, 0x77).await.status, 0x18);
    assert_good(&prout(&lu, &a, REGISTER, 0, 0, 0xA).await);
    assert_good(&prout(&lu, &a, CLEAR, 0, 0xA, 0).await);
    assert_eq!(sense(&exec(&lu, &b, &[0; 6], &[]).await), (6, 0x2A, 0x03));
    assert_eq!(read_reservation(&lu, &b).await, None);
    let r = exec(&lu, &b, &[0x5E, 0, 0, 0, 0, 0, 0, 0, 64, 0], &[]).await;
    assert_eq!(u32::from_be_bytes(r.data_in[4..8].try_into().unwrap()), 0);
}

#[tokio::test]
async fn persistent_reservations_survive_nexus_loss_and_reset() {
    let (_p, lu) = lu(MIB).await;
    let (a, b) = (nexus(1, "iqn.a"), nexus(2, "iqn.b"));
    assert_good(&prout(&lu, &a, REGISTER, 0, 0, 0xA).await);
    assert_good(&prout(&lu, &a, RESERVE, 1, 0xA, 0).await);
    lu.nexus_lost(&a);
    lu.reset(&b, ResetKind::Lun);
    clear_ua(&lu, &b).await;
    assert!(!can_write(&lu, &b).await);
    assert_eq!(read_reservation(&lu, &b).await, Some((0xA, 1)));
    // A new session of the same initiator port is the same nexus.
    let a2 = nexus(1, "iqn.a");
    clear_ua(&lu, &a2).await;
    assert!(can_write(&lu, &a2).await);
}

#[tokio::test]
async fn report_capabilities_lists_every_type() {
    let (_p, lu) = lu(MIB).await;
    let a = nexus(1, "iqn.a");
    let r = exec(&lu, &a, &[0x5E, 2, 0, 0, 0, 0, 0, 0, 8, 0], &[]).await;
    assert_good(&r);
    assert_eq!(u16::from_be_bytes([r.data_in[0], r.data_in[1]]), 8);
    assert_eq!(r.data_in[3] & 0x80, 0x80);
    assert_eq!((r.data_in[4], r.data_in[5]), (0xEA, 0x01));
    let r = exec(&lu, &a, &[0x5E, 4, 0, 0, 0, 0, 0, 0, 8, 0], &[]).await;
    assert_eq!(sense(&r), (5, 0x24, 0));
}

#[tokio::test]
async fn read_full_status_names_each_registrant() {
    let (_p, lu) = lu(MIB).await;
    let (a, b) = (nexus(1, "iqn.a"), nexus(2, "iqn.b"));
    assert_good(&prout(&lu, &a, REGISTER, 0, 0, 0xA).await);
    assert_good(&prout(&lu, &b, REGISTER, 0, 0, 0xB).await);
    assert_good(&prout(&lu, &a, RESERVE, 1, 0xA, 0).await);
    let r = exec(&lu, &a, &[0x5E, 3, 0, 0, 0, 0, 0, 0x10, 0, 0], &[]).await;
    assert_good(&r);
    let d = &r.data_in[8..];
    assert_eq!(u64::from_be_bytes(d[0..8].try_into().unwrap()), 0xA);
    assert_eq!((d[12], d[13]), (1, 1));
    let tid_len = u32::from_be_bytes(d[20..24].try_into().unwrap()) as usize;
    let tid = &d[24..24 + tid_len];
    assert_eq!(tid[0], 0x45);
    assert!(String::from_utf8_lossy(&tid[4..]).starts_with("iqn.a,i,0x800000000001"));
    let d2 = &d[24 + tid_len..];
    assert_eq!(u64::from_be_bytes(d2[0..8].try_into().unwrap()), 0xB);
    assert_eq!(d2[12], 0);
}

#[tokio::test]
async fn reserve6_excludes_other_initiators_until_released() {
    let (_p, lu) = lu(MIB).await;
    let (a, b) = (nexus(1, "iqn.a"), nexus(2, "iqn.b"));
    assert_good(&exec(&lu, &a, &[0x16, 0, 0, 0, 0, 0], &[]).await);
    assert_good(&exec(&lu, &a, &[0x16, 0, 0, 0, 0, 0], &[]).await);
    assert_eq!(exec(&lu, &b, &[0x16, 0, 0, 0, 0, 0], &[]).await.status, 0x18);
    // RELEASE from a non-holder is a no-op.
    assert_good(&exec(&lu, &b, &[0x17, 0, 0, 0, 0, 0], &[]).await);
    assert_eq!(exec(&lu, &b, &[0x1A, 0, 0x3F, 0, 255, 0], &[]).await.status, 0x18);
    assert_good(&exec(&lu, &a, &[0x1A, 0, 0x3F, 0, 255, 0], &[]).await);
    assert_good(&exec(&lu, &b, &[0x12, 0, 0, 0, 36, 0], &[]).await);
    assert!(!can_read(&lu, &b).await);
    assert_good(&exec(&lu, &a, &[0x17, 0, 0, 0, 0, 0], &[]).await);
    assert_good(&exec(&lu, &b, &[0x16, 0, 0, 0, 0, 0], &[]).await);
    // Nexus loss releases it.
    lu.nexus_lost(&b);
    assert!(can_write(&lu, &a).await);
    // And so does a reset.
    assert_good(&exec(&lu, &a, &[0x16, 0, 0, 0, 0, 0], &[]).await);
    lu.reset(&a, ResetKind::TargetWarm);
    clear_ua(&lu, &b).await;
    assert!(can_write(&lu, &b).await);
}

#[tokio::test]
async fn reserve6_conflicts_while_registrations_exist() {
    let (_p, lu) = lu(MIB).await;
    let a = nexus(1, "iqn.a");
    assert_good(&prout(&lu, &a, REGISTER, 0, 0, 0xA).await);
    assert_eq!(exec(&lu, &a, &[0x16, 0, 0, 0, 0, 0], &[]).await.status, 0x18);
}
