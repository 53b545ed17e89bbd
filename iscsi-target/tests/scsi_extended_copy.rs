//! EXTENDED COPY (LID1) within one LU and RECEIVE COPY RESULTS.

mod scsi_common;
use scsi_common::*;

/// An identification descriptor target descriptor naming the LU by `naa`.
fn target(naa: u64, nul: bool) -> Vec<u8> {
    let mut t = vec![0u8; 32];
    t[0] = 0xE4;
    t[1] = if nul { 0x20 } else { 0 };
    t[4] = 0x01;
    t[5] = 0x03;
    t[7] = 8;
    t[8..16].copy_from_slice(&naa.to_be_bytes());
    t[29..32].copy_from_slice(&[0, 2, 0]);
    t
}

fn segment(src: u16, dst: u16, blocks: u16, src_lba: u64, dst_lba: u64) -> Vec<u8> {
    let mut s = vec![0x02, 0, 0, 24];
    s.extend_from_slice(&src.to_be_bytes());
    s.extend_from_slice(&dst.to_be_bytes());
    s.extend_from_slice(&[0, 0]);
    s.extend_from_slice(&blocks.to_be_bytes());
    s.extend_from_slice(&src_lba.to_be_bytes());
    s.extend_from_slice(&dst_lba.to_be_bytes());
    s
}

fn list(list_id: u8, usage: u8, targets: &[Vec<u8>], segments: &[Vec<u8>]) -> Vec<u8> {
    let t: Vec<u8> = targets.concat();
    let s: Vec<u8> = segments.concat();
    let mut p = vec![list_id, usage << 3];
    p.extend_from_slice(&(t.len() as u16).to_be_bytes());
    p.extend_from_slice(&[0; 4]);
    p.extend_from_slice(&(s.len() as u32).to_be_bytes());
    p.extend_from_slice(&[0; 4]);
    p.extend(t);
    p.extend(s);
    p
}

fn xcopy_cdb(len: usize) -> Vec<u8> {
    let mut c = vec![0x83, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    c.extend_from_slice(&(len as u32).to_be_bytes());
    c.extend_from_slice(&[0, 0]);
    c
}

fn naa() -> u64 {
    identity().naa | 0x6000_0000_0000_0000
}

#[tokio::test]
async fn copies_blocks_within_the_lu_and_reports_status() {
    let (_p, lu) = lu(MIB).await;
    let n = nexus(1, "iqn.i1");
    let data = pattern(7, 64 * 512);
    assert_good(&exec(&lu, &n, &write10(0, 64), &data).await);
    let p = list(1, 0, &[target(naa(), false)], &[segment(0, 0, 64, 0, 2048 - 64)]);
    assert_eq!(lu.data_out_len(&xcopy_cdb(p.len())), p.len() as u32);
    // No status before the copy.
    let rcr = [0x84, 0x00, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 64, 0, 0];
    assert_eq!(sense(&exec(&lu, &n, &rcr, &[]).await), (5, 0x24, 0));
    assert_good(&exec(&lu, &n, &xcopy_cdb(p.len()), &p).await);
    assert_eq!(exec(&lu, &n, &read10(2048 - 64, 64), &[]).await.data_in, data);
    let st = exec(&lu, &n, &rcr, &[]).await;
    assert_good(&st);
    assert_eq!((st.data_in[4], u16::from_be_bytes([st.data_in[5], st.data_in[6]])), (1, 1));
    // Overlapping forward copy keeps the source intact while reading it.
    let p = list(2, 2, &[target(naa(), false)], &[segment(0, 0, 64, 0, 8)]);
    assert_good(&exec(&lu, &n, &xcopy_cdb(p.len()), &p).await);
    assert_eq!(exec(&lu, &n, &read10(8, 64), &[]).await.data_in, data);
    // Parameter list length 0 is a no-op.
    assert_good(&exec(&lu, &n, &xcopy_cdb(0), &[]).await);
}

#[tokio::test]
async fn parameter_and_descriptor_errors() {
    let (_p, lu) = lu(MIB).await;
    let n = nexus(1, "iqn.i1");
    let good = list(1, 0, &[target(naa(), false)], &[segment(0, 0, 8, 0, 100)]);
    // Truncated lists.
    assert_eq!(sense(&exec(&lu, &n, &xcopy_cdb(47), &good[..47]).await), (5, 0x1A, 0));
    assert_eq!(sense(&exec(&lu, &n, &xcopy_cdb(75), &good[..75]).await), (5, 0x1A, 0));
    // Too many descriptors.
    let t5 = vec![target(naa(), false); 5];
    let p = list(1, 0, &t5, &[segment(0, 0, 8, 0, 100)]);
    assert_eq!(sense(&exec(&lu, &n, &xcopy_cdb(p.len()), &p).await), (5, 0x26, 0x06));
    let s33 = vec![segment(0, 0, 8, 0, 100); 33];
    let p = list(1, 0, &[target(naa(), false)], &s33);
    assert_eq!(sense(&exec(&lu, &n, &xcopy_cdb(p.len()), &p).await), (5, 0x26, 0x08));
    // Unsupported descriptor types.
    let mut fc = target(naa(), false);
    fc[0] = 0xE0;
    let p = list(1, 0, &[fc], &[segment(0, 0, 8, 0, 100)]);
    assert_eq!(sense(&exec(&lu, &n, &xcopy_cdb(p.len()), &p).await), (5, 0x26, 0x07));
    let mut s2s = segment(0, 0, 8, 0, 100);
    s2s[0] = 0x03;
    let p = list(1, 0, &[target(naa(), false)], &[s2s]);
    assert_eq!(sense(&exec(&lu, &n, &xcopy_cdb(p.len()), &p).await), (5, 0x26, 0x09));
    // Unreachable targets: NUL, another LU, a bad index; and beyond the end.
    for p in [
        list(1, 0, &[target(naa(), true)], &[segment(0, 0, 8, 0, 100)]),
        list(1, 0, &[target(naa() ^ 1, false)], &[segment(0, 0, 8, 0, 100)]),
        list(1, 0, &[target(naa(), false)], &[segment(0, 1, 8, 0, 100)]),
        list(1, 0, &[target(naa(), false)], &[segment(0, 0, 8, 0, 2047)]),
    ] {
        assert_eq!(sense(&exec(&lu, &n, &xcopy_cdb(p.len()), &p).await).0, 0x0A);
    }
    // A reserved LU ID TYPE does not matter: the designator names the LU.
    let mut t = target(naa(), false);
    t[1] = 0x80;
    let p = list(1, 0, &[t], &[segment(0, 0, 8, 0, 100)]);
    assert_good(&exec(&lu, &n, &xcopy_cdb(p.len()), &p).await);
}

#[tokio::test]
async fn operating_parameters_and_vpd_8f() {
    let (_p, lu) = lu(MIB).await;
    let n = nexus(1, "iqn.i1");
    let r = exec(&lu, &n, &[0x84, 0x03, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0], &[]).await;
    assert_good(&r);
    assert_eq!(u32::from_be_bytes(r.data_in[0..4].try_into().unwrap()) as usize + 4, r.data_in.len());
    assert_eq!(u16::from_be_bytes([r.data_in[8], r.data_in[9]]), 4);
    assert_eq!(u16::from_be_bytes([r.data_in[10], r.data_in[11]]), 32);
    let inq = exec(&lu, &n, &[0x12, 0, 0, 0, 96, 0], &[]).await;
    assert_eq!(inq.data_in[5] & 0x08, 0x08, "3PC");
    let vpd = exec(&lu, &n, &[0x12, 1, 0x8F, 0x01, 0, 0], &[]).await;
    assert_good(&vpd);
    let mut at = 4;
    let mut types = Vec::new();
    while at < vpd.data_in.len() {
        types.push(u16::from_be_bytes([vpd.data_in[at], vpd.data_in[at + 1]]));
        at += 4 + u16::from_be_bytes([vpd.data_in[at + 2], vpd.data_in[at + 3]]) as usize;
    }
    assert_eq!(at, vpd.data_in.len());
    assert_eq!(types, vec![0x0000, 0x0004, 0x0008, 0x000C, 0x8001]);
}

/// Block-aligned copies take no new data space: the store shares the
/// source's blocks (copy-on-write), and both sides then live on alone.
#[tokio::test]
async fn aligned_copies_share_blocks_instead_of_copying() {
    let (p, lu) = lu(8 * MIB).await;
    let n = nexus(1, "iqn.i1");
    let blocks = 4096u16; // 2 MiB
    let data = pattern(9, blocks as usize * 512);
    assert_good(&exec(&lu, &n, &write10(0, blocks), &data).await);
    assert_good(&exec(&lu, &n, &[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]).await); // SYNCHRONIZE CACHE
    let before = p.stats().allocated_bytes;
    let list = list(1, 0, &[target(naa(), false)], &[segment(0, 0, blocks, 0, 8192)]);
    assert_good(&exec(&lu, &n, &xcopy_cdb(list.len()), &list).await);
    assert_good(&exec(&lu, &n, &[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], &[]).await);
    let grown = p.stats().allocated_bytes - before;
    assert!(grown <= 64 * 1024, "a 2 MiB copy took {grown} bytes: it was copied, not shared");
    assert_eq!(exec(&lu, &n, &read10(8192, blocks), &[]).await.data_in, data);
    // Overwrite the source: the copy keeps the old data.
    let new = pattern(10, 8 * 512);
    assert_good(&exec(&lu, &n, &write10(0, 8), &new).await);
    assert_eq!(exec(&lu, &n, &read10(8192, 8), &[]).await.data_in, data[..8 * 512]);
}
