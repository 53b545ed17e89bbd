//! UNMAP, WRITE SAME and GET LBA STATUS over a thin volume.

mod scsi_common;
use scsi_common::*;

fn unmap_list(ranges: &[(u64, u32)]) -> Vec<u8> {
    let mut p = vec![0u8; 8];
    p[0..2].copy_from_slice(&((6 + 16 * ranges.len()) as u16).to_be_bytes());
    p[2..4].copy_from_slice(&((16 * ranges.len()) as u16).to_be_bytes());
    for &(lba, n) in ranges {
        p.extend_from_slice(&lba.to_be_bytes());
        p.extend_from_slice(&n.to_be_bytes());
        p.extend_from_slice(&[0; 4]);
    }
    p
}

fn unmap_cdb(len: usize) -> Vec<u8> {
    vec![0x42, 0, 0, 0, 0, 0, 0, (len >> 8) as u8, len as u8, 0]
}

/// (lba, blocks, deallocated) descriptors of GET LBA STATUS at `lba`.
async fn lba_status(lu: &Lu, n: &keel_iscsi_target::scsi::Nexus, lba: u64) -> Vec<(u64, u32, u8)> {
    let mut c = vec![0x9E, 0x12];
    c.extend_from_slice(&lba.to_be_bytes());
    c.extend_from_slice(&4096u32.to_be_bytes());
    c.extend_from_slice(&[0, 0]);
    let r = exec(lu, n, &c, &[]).await;
    assert_good(&r);
    let len = u32::from_be_bytes(r.data_in[0..4].try_into().unwrap()) as usize;
    assert_eq!(len + 4, r.data_in.len());
    r.data_in[8..]
        .chunks(16)
        .map(|d| {
            (u64::from_be_bytes(d[0..8].try_into().unwrap()), u32::from_be_bytes(d[8..12].try_into().unwrap()), d[12])
        })
        .collect()
}

#[tokio::test]
async fn unmapped_blocks_read_zeros_and_report_deallocated() {
    let (_p, lu) = lu(MIB).await;
    let n = nexus(1, "iqn.i1");
    assert_good(&exec(&lu, &n, &write10(0, 64), &pattern(1, 64 * 512)).await);
    assert_eq!(lba_status(&lu, &n, 0).await[0], (0, 64, 0));
    let list = unmap_list(&[(8, 16), (40, 8)]);
    assert_good(&exec(&lu, &n, &unmap_cdb(list.len()), &list).await);
    assert_eq!(exec(&lu, &n, &read10(8, 16), &[]).await.data_in, vec![0; 16 * 512]);
    let st = lba_status(&lu, &n, 0).await;
    assert_eq!(&st[..5], &[(0, 8, 0), (8, 16, 1), (24, 16, 0), (40, 8, 1), (48, 16, 0)]);
    // Descriptors start at the LBA asked for.
    assert_eq!(lba_status(&lu, &n, 10).await[0], (10, 14, 1));
}

#[tokio::test]
async fn unmap_parameter_list_errors() {
    let (_p, lu) = lu(MIB).await;
    let n = nexus(1, "iqn.i1");
    assert_good(&exec(&lu, &n, &unmap_cdb(0), &[]).await);
    assert_eq!(sense(&exec(&lu, &n, &unmap_cdb(4), &[0; 4]).await), (5, 0x1A, 0));
    let beyond = unmap_list(&[(0, 8), (2047, 2)]);
    assert_eq!(sense(&exec(&lu, &n, &unmap_cdb(beyond.len()), &beyond).await), (5, 0x21, 0));
    let mut anchor = unmap_cdb(24);
    anchor[1] = 1;
    assert_eq!(sense(&exec(&lu, &n, &anchor, &unmap_list(&[(0, 8)])).await), (5, 0x24, 0));
    // A zero-length descriptor is not an error.
    let zero = unmap_list(&[(0, 0)]);
    assert_good(&exec(&lu, &n, &unmap_cdb(zero.len()), &zero).await);
}

#[tokio::test]
async fn write_same_with_unmap_deallocates_and_with_data_fills() {
    let (_p, lu) = lu(MIB).await;
    let n = nexus(1, "iqn.i1");
    let block = pattern(9, 512);
    let ws16 = |lba: u64, blocks: u32, flags: u8| {
        let mut c = vec![0x93, flags];
        c.extend_from_slice(&lba.to_be_bytes());
        c.extend_from_slice(&blocks.to_be_bytes());
        c.extend_from_slice(&[0, 0]);
        c
    };
    assert_good(&exec(&lu, &n, &ws16(0, 32, 0), &block).await);
    let r = exec(&lu, &n, &read10(0, 32), &[]).await;
    assert!(r.data_in.chunks(512).all(|b| b == block));
    assert_good(&exec(&lu, &n, &ws16(8, 16, 0x08), &[0; 512]).await);
    assert_eq!(lba_status(&lu, &n, 0).await[..3], [(0, 8, 0), (8, 16, 1), (24, 8, 0)]);
    // NDOB: no data, zeros.
    assert_eq!(lu.data_out_len(&ws16(0, 8, 0x09)), 0);
    assert_good(&exec(&lu, &n, &ws16(0, 8, 0x09), &[]).await);
    assert_eq!(lba_status(&lu, &n, 0).await[0], (0, 24, 1));
    // Zero blocks: to the end of the medium.
    assert_good(&exec(&lu, &n, &ws16(1000, 0, 0x08), &[0; 512]).await);
    assert_eq!(sense(&exec(&lu, &n, &ws16(2049, 0, 0x08), &[0; 512]).await), (5, 0x21, 0));
    assert_eq!(sense(&exec(&lu, &n, &ws16(2040, 9, 0), &block).await), (5, 0x21, 0));
    // The Data-Out buffer must be exactly one block.
    assert_eq!(exec(&lu, &n, &ws16(0, 8, 0x08), &[0; 256]).await.status, 2);
    assert_eq!(exec(&lu, &n, &ws16(0, 8, 0x08), &[0; 1024]).await.status, 2);
}

#[tokio::test]
async fn capacity_and_vpd_advertise_thin_provisioning() {
    let (_p, lu) = lu(MIB).await;
    let n = nexus(1, "iqn.i1");
    let r = exec(&lu, &n, &[0x9E, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32, 0, 0], &[]).await;
    assert_good(&r);
    assert_eq!(u64::from_be_bytes(r.data_in[0..8].try_into().unwrap()), 2047);
    assert_eq!(u32::from_be_bytes(r.data_in[8..12].try_into().unwrap()), 512);
    assert_eq!(r.data_in[13] & 0x0F, 0, "one logical block per physical block (see PHYS_EXPONENT)");
    assert_eq!(r.data_in[14] & 0xC0, 0xC0);
    let b2 = exec(&lu, &n, &[0x12, 1, 0xB2, 0, 64, 0], &[]).await;
    assert_eq!(b2.data_in[5] & 0xE0, 0xE0);
    assert_eq!(b2.data_in[6] & 0x07, 2);
    let b0 = exec(&lu, &n, &[0x12, 1, 0xB0, 0, 64, 0], &[]).await;
    assert_eq!(u32::from_be_bytes(b0.data_in[28..32].try_into().unwrap()), 8);
}

#[tokio::test]
async fn sanitize_block_erase_deallocates_the_whole_lun() {
    let (_p, lu) = lu(MIB).await;
    let n = nexus(1, "iqn.i1");
    assert_good(&exec(&lu, &n, &write10(0, 256), &vec![b'a'; 256 * 512]).await);
    assert_good(&exec(&lu, &n, &write10(2048 - 256, 256), &vec![b'a'; 256 * 512]).await);
    assert_good(&exec(&lu, &n, &[0x48, 0x02, 0, 0, 0, 0, 0, 0, 0, 0], &[]).await);
    assert_eq!(lba_status(&lu, &n, 0).await, vec![(0, 2048, 1)]);
    assert_eq!(exec(&lu, &n, &read10(0, 8), &[]).await.data_in, vec![0; 8 * 512]);
    // Nonzero parameter list length, reserved bits and bytes, crypto erase.
    assert_eq!(sense(&exec(&lu, &n, &[0x48, 0x02, 0, 0, 0, 0, 0, 0, 8, 0], &[0; 8]).await), (5, 0x24, 0));
    assert_eq!(sense(&exec(&lu, &n, &[0x48, 0x42, 0, 0, 0, 0, 0, 0, 0, 0], &[]).await), (5, 0x24, 0));
    assert_eq!(sense(&exec(&lu, &n, &[0x48, 0x02, 0, 0, 4, 0, 0, 0, 0, 0], &[]).await), (5, 0x24, 0));
    assert_eq!(sense(&exec(&lu, &n, &[0x48, 0x03, 0, 0, 0, 0, 0, 0, 0, 0], &[]).await), (5, 0x24, 0));
}

#[tokio::test]
async fn sanitize_overwrite_writes_the_pattern_everywhere() {
    let (_p, lu) = lu(MIB).await;
    let n = nexus(1, "iqn.i1");
    let mut p = vec![0x01, 0, 0x02, 0x00];
    p.extend_from_slice(&[0xAA; 512]);
    let cdb = |len: u16| [0x48, 0x01, 0, 0, 0, 0, 0, (len >> 8) as u8, len as u8, 0];
    assert_good(&exec(&lu, &n, &cdb(516), &p).await);
    assert_eq!(exec(&lu, &n, &read10(2040, 8), &[]).await.data_in, vec![0xAA; 8 * 512]);
    let mut four = vec![0x01, 0, 0, 4, 1, 2, 3, 4];
    assert_good(&exec(&lu, &n, &cdb(8), &four).await);
    assert_eq!(&exec(&lu, &n, &read10(7, 1), &[]).await.data_in[..8], &[1, 2, 3, 4, 1, 2, 3, 4]);
    for len in 0..5 {
        assert_eq!(sense(&exec(&lu, &n, &cdb(len), &four[..len as usize]).await), (5, 0x24, 0));
    }
    four[0] = 0; // OVERWRITE COUNT 0
    assert_eq!(sense(&exec(&lu, &n, &cdb(8), &four).await), (5, 0x24, 0));
    assert_eq!(sense(&exec(&lu, &n, &cdb(517), &[1; 517]).await), (5, 0x24, 0));
}
