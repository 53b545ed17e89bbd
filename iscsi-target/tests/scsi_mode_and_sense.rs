//! Mode pages, sense formats, unit attentions, INQUIRY and the other
//! reporting commands.

mod scsi_common;
use keel_iscsi_target::scsi::{Command, ResetKind, no_such_lun};
use scsi_common::*;

fn control_page(d_sense: bool, swp: bool) -> Vec<u8> {
    let mut p = vec![0u8; 4];
    p.extend_from_slice(&[
        0x0A,
        10,
        if d_sense { 4 } else { 0 },
        0,
        if swp { 8 } else { 0 },
        0,
        0,
        0,
        0xFF,
        0xFF,
        0,
        0,
    ]);
    p
}

#[tokio::test]
async fn d_sense_switches_to_descriptor_sense() {
    let (_p, lu) = lu(MIB).await;
    let n = nexus(1, "iqn.i1");
    let bad = read10(1 << 20, 1);
    assert_eq!(exec(&lu, &n, &bad, &[]).await.sense[0], 0x70);
    let p = control_page(true, false);
    assert_good(&exec(&lu, &n, &[0x15, 0x10, 0, 0, p.len() as u8, 0], &p).await);
    let r = exec(&lu, &n, &bad, &[]).await;
    assert_eq!(r.sense[0], 0x72);
    assert_eq!(sense(&r), (5, 0x21, 0));
    let ms = exec(&lu, &n, &[0x1A, 0x08, 0x0A, 0, 255, 0], &[]).await;
    assert_eq!(ms.data_in[4 + 2] & 0x04, 0x04);
    let p = control_page(false, false);
    assert_good(&exec(&lu, &n, &[0x15, 0x10, 0, 0, p.len() as u8, 0], &p).await);
    assert_eq!(exec(&lu, &n, &bad, &[]).await.sense[0], 0x70);
    // A reset returns the mode pages to their defaults.
    let p = control_page(true, false);
    assert_good(&exec(&lu, &n, &[0x15, 0x10, 0, 0, p.len() as u8, 0], &p).await);
    lu.reset(&nexus(9, "iqn.resetter"), ResetKind::Lun);
    let ua = exec(&lu, &n, &bad, &[]).await;
    assert_eq!((ua.sense[0], sense(&ua)), (0x70, (6, 0x29, 0x03)));
    assert_eq!(exec(&lu, &n, &bad, &[]).await.sense[0], 0x70);
}

#[tokio::test]
async fn swp_write_protects_and_unchangeable_fields_are_refused() {
    let (_p, lu) = lu(MIB).await;
    let n = nexus(1, "iqn.i1");
    let p = control_page(false, true);
    assert_good(&exec(&lu, &n, &[0x15, 0x10, 0, 0, p.len() as u8, 0], &p).await);
    assert_eq!(sense(&exec(&lu, &n, &write10(0, 1), &[0; 512]).await), (7, 0x27, 0));
    let p = control_page(false, false);
    assert_good(&exec(&lu, &n, &[0x15, 0x10, 0, 0, p.len() as u8, 0], &p).await);
    assert_good(&exec(&lu, &n, &write10(0, 1), &[0; 512]).await);
    let mut p = control_page(false, false);
    p[4 + 3] = 0x10; // QAM: not changeable
    assert_eq!(sense(&exec(&lu, &n, &[0x15, 0x10, 0, 0, p.len() as u8, 0], &p).await), (5, 0x26, 0));
    // Saved values do not exist.
    assert_eq!(sense(&exec(&lu, &n, &[0x1A, 0, 0xCA, 0, 255, 0], &[]).await), (5, 0x39, 0));
    assert_eq!(sense(&exec(&lu, &n, &[0x1A, 0, 0x05, 0, 255, 0], &[]).await), (5, 0x24, 0));
}

#[tokio::test]
async fn mode_sense_all_pages_and_header() {
    let (_p, lu) = lu(MIB).await;
    let n = nexus(1, "iqn.i1");
    let r = exec(&lu, &n, &[0x1A, 0, 0x3F, 0, 255, 0], &[]).await;
    assert_good(&r);
    let d = &r.data_in;
    assert_eq!(d[0] as usize, d.len() - 1);
    assert_eq!(d[3], 8);
    assert_eq!(u32::from_be_bytes(d[4..8].try_into().unwrap()), 2048);
    let pages: Vec<u8> = {
        let mut at = 12;
        let mut v = Vec::new();
        while at < d.len() {
            v.push(d[at] & 0x3F);
            at += d[at + 1] as usize + 2;
        }
        v
    };
    assert_eq!(pages, vec![0x08, 0x0A, 0x1C]);
    let r10 = exec(&lu, &n, &[0x5A, 0x08, 0x3F, 0, 0, 0, 0, 1, 0, 0], &[]).await;
    assert_eq!(u16::from_be_bytes([r10.data_in[0], r10.data_in[1]]) as usize, r10.data_in.len() - 2);
    // Allocation length truncates.
    assert_eq!(exec(&lu, &n, &[0x1A, 0, 0x3F, 0, 4, 0], &[]).await.data_in.len(), 4);
}

#[tokio::test]
async fn unit_attention_after_reset_is_reported_once_per_nexus() {
    let (_p, lu) = lu(MIB).await;
    let (a, b) = (nexus(1, "iqn.a"), nexus(2, "iqn.b"));
    assert_good(&exec(&lu, &a, &[0; 6], &[]).await);
    assert_good(&exec(&lu, &b, &[0; 6], &[]).await);
    let c = nexus(3, "iqn.c");
    assert_good(&exec(&lu, &c, &[0; 6], &[]).await);
    lu.reset(&c, ResetKind::Lun);
    // The nexus that asked for the reset gets no attention.
    assert_good(&exec(&lu, &c, &[0; 6], &[]).await);
    // INQUIRY and REPORT LUNS neither report nor clear it.
    assert_good(&exec(&lu, &a, &[0x12, 0, 0, 0, 36, 0], &[]).await);
    assert_good(&exec(&lu, &a, &[0xA0, 0, 0, 0, 0, 0, 0, 0, 0, 64, 0, 0], &[]).await);
    assert_eq!(sense(&exec(&lu, &a, &read10(0, 1), &[]).await), (6, 0x29, 0x03));
    assert_good(&exec(&lu, &a, &read10(0, 1), &[]).await);
    // REQUEST SENSE reports it as data and clears it.
    let r = exec(&lu, &b, &[0x03, 0, 0, 0, 18, 0], &[]).await;
    assert_good(&r);
    assert_eq!((r.data_in[2] & 0xF, r.data_in[12]), (6, 0x29));
    assert_good(&exec(&lu, &b, &[0; 6], &[]).await);
    let r = exec(&lu, &b, &[0x03, 0, 0, 0, 18, 0], &[]).await;
    assert_eq!(r.data_in[2] & 0xF, 0);
}

#[tokio::test]
async fn inquiry_standard_data_and_vpd_pages() {
    let (_p, lu) = lu(MIB).await;
    let n = nexus(1, "iqn.i1");
    let r = exec(&lu, &n, &[0x12, 0, 0, 0, 255, 0], &[]).await;
    let d = &r.data_in;
    assert_eq!((d[0], d[2], d[3] & 0x0F), (0, 6, 2));
    assert_eq!(d[4] as usize + 5, d.len());
    assert_eq!(&d[8..16], b"KEEL    ");
    assert_eq!(&d[16..27], b"Keel volume");
    assert_eq!(&d[58..60], &[0x00, 0xA0]);
    assert_eq!(exec(&lu, &n, &[0x12, 0, 0, 0, 5, 0], &[]).await.data_in.len(), 5);
    let pages = exec(&lu, &n, &[0x12, 1, 0, 0, 255, 0], &[]).await.data_in;
    for &p in &pages[4..] {
        let r = exec(&lu, &n, &[0x12, 1, p, 0, 255, 0], &[]).await;
        assert_good(&r);
        assert_eq!(r.data_in[1], p);
        assert_eq!(u16::from_be_bytes([r.data_in[2], r.data_in[3]]) as usize + 4, r.data_in.len());
    }
    let id = exec(&lu, &n, &[0x12, 1, 0x83, 0, 255, 0], &[]).await.data_in;
    assert_eq!(&id[4..8], &[0x01, 0x03, 0, 8]);
    assert_eq!(id[8] >> 4, 6);
    assert_eq!(sense(&exec(&lu, &n, &[0x12, 1, 0x42, 0, 255, 0], &[]).await), (5, 0x24, 0));
    assert_eq!(sense(&exec(&lu, &n, &[0x12, 2, 0, 0, 255, 0], &[]).await), (5, 0x24, 0));
    assert_eq!(sense(&exec(&lu, &n, &[0x12, 0, 0x80, 0, 255, 0], &[]).await), (5, 0x24, 0));
}

#[tokio::test]
async fn report_supported_opcodes_all_and_one() {
    let (_p, lu) = lu(MIB).await;
    let n = nexus(1, "iqn.i1");
    let all = exec(&lu, &n, &[0xA3, 0x0C, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0], &[]).await;
    assert_good(&all);
    let len = u32::from_be_bytes(all.data_in[0..4].try_into().unwrap()) as usize;
    assert_eq!(len + 4, all.data_in.len());
    assert_eq!(len % 8, 0);
    let with_t = exec(&lu, &n, &[0xA3, 0x0C, 0x80, 0, 0, 0, 0, 0, 0x10, 0, 0, 0], &[]).await;
    assert_eq!(u32::from_be_bytes(with_t.data_in[0..4].try_into().unwrap()) as usize, len / 8 * 20);
    // READ(10): one command, no service action.
    let one = exec(&lu, &n, &[0xA3, 0x0C, 0x01, 0x28, 0, 0, 0, 0, 1, 0, 0, 0], &[]).await;
    assert_eq!(one.data_in[1] & 7, 3);
    assert_eq!(u16::from_be_bytes([one.data_in[2], one.data_in[3]]), 10);
    assert_eq!(one.data_in[4], 0x28);
    // READ CAPACITY(16) needs the service action form.
    let r = exec(&lu, &n, &[0xA3, 0x0C, 0x01, 0x9E, 0, 0, 0, 0, 1, 0, 0, 0], &[]).await;
    assert_eq!(sense(&r), (5, 0x24, 0));
    let sa = exec(&lu, &n, &[0xA3, 0x0C, 0x02, 0x9E, 0, 0x10, 0, 0, 1, 0, 0, 0], &[]).await;
    assert_eq!(sa.data_in[1] & 7, 3);
    let unsupported = exec(&lu, &n, &[0xA3, 0x0C, 0x01, 0xC0, 0, 0, 0, 0, 1, 0, 0, 0], &[]).await;
    assert_eq!(unsupported.data_in[1] & 7, 1);
}

#[tokio::test]
async fn report_luns_and_missing_luns() {
    let (_p, lu) = lu(MIB).await;
    let n = nexus(1, "iqn.i1");
    let r = exec(&lu, &n, &[0xA0, 0, 0, 0, 0, 0, 0, 0, 0, 64, 0, 0], &[]).await;
    assert_eq!(r.data_in, [0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    let cmd = |cdb: &'static [u8]| Command { cdb, data_out: &[], lun: 3 };
    let inq = no_such_lun(cmd(&[0x12, 0, 0, 0, 36, 0]));
    assert_eq!(inq.data_in[0], 0x7F);
    let tur = no_such_lun(cmd(&[0, 0, 0, 0, 0, 0]));
    assert_eq!(sense(&tur), (5, 0x25, 0));
    let rs = no_such_lun(cmd(&[0x03, 0, 0, 0, 18, 0]));
    assert_eq!((rs.status, rs.data_in[12]), (0, 0x25));
}

#[tokio::test]
async fn start_stop_accepts_start_and_refuses_eject_of_a_fixed_disk() {
    let (_p, lu) = lu(MIB).await;
    let n = nexus(1, "iqn.i1");
    assert_good(&exec(&lu, &n, &[0x1B, 0, 0, 0, 1, 0], &[]).await);
    assert_good(&exec(&lu, &n, &[0x1B, 1, 0, 0, 0, 0], &[]).await);
    assert_eq!(sense(&exec(&lu, &n, &[0x1B, 1, 0, 0, 2, 0], &[]).await), (5, 0x24, 0));
    assert_eq!(sense(&exec(&lu, &n, &[0x1B, 0, 0, 0, 3, 0], &[]).await), (5, 0x24, 0));
    // PREVENT is accepted and cleared by nexus loss.
    assert_good(&exec(&lu, &n, &[0x1E, 0, 0, 0, 1, 0], &[]).await);
    lu.nexus_lost(&n);
    assert_good(&exec(&lu, &n, &[0x1E, 0, 0, 0, 0, 0], &[]).await);
}
