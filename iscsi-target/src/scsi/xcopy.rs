//! EXTENDED COPY (LID1) and RECEIVE COPY RESULTS (SPC-4 6.4, 6.18): block
//! device to block device copies between identification-descriptor copy
//! targets that name this LU, done by the store as a copy-on-write share of
//! whole blocks (no data is read or written for them).

use keel_blockstore::BlockDevice;

use super::cdb::op;
use super::sense::{SenseError, key};
use super::{BLOCK, Fail, LogicalUnit, Outcome, Port, dev_err, truncate};

/// Copy target (CSCD) descriptors one EXTENDED COPY may carry.
pub(super) const MAX_TARGET_DESCRIPTORS: u16 = 4;
/// Segment descriptors one EXTENDED COPY may carry.
pub(super) const MAX_SEGMENT_DESCRIPTORS: u16 = 32;
/// Target plus segment descriptor bytes one EXTENDED COPY may carry.
pub(super) const MAX_DESCRIPTOR_LIST_LENGTH: u32 = 1024;
/// Bytes one segment may copy (its block count is a 16-bit field).
const MAX_SEGMENT_BYTES: u32 = 0xFFFF * BLOCK;
/// Identification descriptor target descriptor.
const TARGET_IDENTIFICATION: u8 = 0xE4;
/// Block device to block device segment descriptor.
const SEGMENT_BLOCK_TO_BLOCK: u8 = 0x02;
/// Copy status entries kept (oldest dropped first).
const MAX_HELD_STATUS: usize = 64;

/// The outcome of one completed copy, for RECEIVE COPY RESULTS COPY STATUS.
#[derive(Debug, Clone)]
pub(super) struct CopyStatus {
    port: Port,
    list_id: u8,
    segments: u16,
    kib: u32,
}

fn copy_aborted(asc: u8, ascq: u8) -> Fail {
    SenseError::new(key::COPY_ABORTED, asc, ascq).into()
}

/// UNREACHABLE COPY TARGET (08h/04h).
fn unreachable() -> Fail {
    copy_aborted(0x08, 0x04)
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(x)
}

/// One block-to-block segment.
struct Segment {
    src: u16,
    dst: u16,
    blocks: u16,
    src_lba: u64,
    dst_lba: u64,
}

impl<D: BlockDevice + 'static> LogicalUnit<D> {
    /// VPD page 8Fh: the third-party copy descriptors for LID1 EXTENDED COPY.
    pub(super) fn third_party_copy_vpd(&self) -> Vec<u8> {
        let mut body = Vec::new();
        let mut push = |dtype: u16, content: &[u8]| {
            let mut c = content.to_vec();
            c.resize(c.len().div_ceil(4) * 4, 0);
            body.extend_from_slice(&dtype.to_be_bytes());
            body.extend_from_slice(&(c.len() as u16).to_be_bytes());
            body.extend(c);
        };
        // Supported commands: EXTENDED COPY (00h), RECEIVE COPY RESULTS (00h, 03h).
        let cmds = [op::EXTENDED_COPY, 1, 0x00, op::RECEIVE_COPY_RESULTS, 2, 0x00, 0x03];
        let mut c = vec![cmds.len() as u8];
        c.extend_from_slice(&cmds);
        push(0x0000, &c);
        // Parameter data.
        let mut c = vec![0u8; 28];
        c[4..6].copy_from_slice(&MAX_TARGET_DESCRIPTORS.to_be_bytes());
        c[6..8].copy_from_slice(&MAX_SEGMENT_DESCRIPTORS.to_be_bytes());
        c[8..12].copy_from_slice(&MAX_DESCRIPTOR_LIST_LENGTH.to_be_bytes());
        push(0x0004, &c);
        // Supported descriptors.
        push(0x0008, &[2, SEGMENT_BLOCK_TO_BLOCK, TARGET_IDENTIFICATION]);
        // Supported CSCD descriptor IDs: none.
        push(0x000C, &[0, 0]);
        // General copy operations.
        let mut c = vec![0u8; 32];
        c[0..4].copy_from_slice(&1u32.to_be_bytes());
        c[4..8].copy_from_slice(&1u32.to_be_bytes());
        c[8..12].copy_from_slice(&MAX_SEGMENT_BYTES.to_be_bytes());
        c[12] = 9; // data segment granularity: 512 bytes
        push(0x8001, &c);
        let mut d = vec![0, 0x8F];
        d.extend_from_slice(&(body.len() as u16).to_be_bytes());
        d.extend(body);
        d
    }

    /// True when an identification descriptor target descriptor names this LU.
    fn names_this_lu(&self, t: &[u8]) -> bool {
        let (code_set, dtype, len) = (t[4] & 0x0F, t[5] & 0x0F, t[7] as usize);
        let assoc = (t[5] >> 4) & 0x03;
        code_set == 1 && dtype == 3 && assoc == 0 && len == 8 && t[8..16] == self.naa().to_be_bytes()
    }

    pub(super) async fn extended_copy(&self, port: &Port, param_len: u32, data: &[u8]) -> Outcome {
        if param_len == 0 {
            return Ok(Vec::new());
        }
        let p = data.get(..param_len as usize).ok_or_else(SenseError::param_list_length)?;
        if p.len() < 16 {
            return Err(SenseError::param_list_length().into());
        }
        let list_id = p[0];
        let usage = (p[1] >> 3) & 0x03;
        let tgt_len = be16(p, 2) as usize;
        let seg_len = be32(p, 8) as usize;
        let inline_len = be32(p, 12) as usize;
        if 16 + tgt_len + seg_len + inline_len > p.len() {
            return Err(SenseError::param_list_length().into());
        }
        if (tgt_len + seg_len) as u64 > MAX_DESCRIPTOR_LIST_LENGTH as u64 {
            return Err(SenseError::param_list_length().into());
        }
        if usage == 3 && list_id != 0 {
            return Err(SenseError::invalid_field_in_param(0, None).into());
        }
        if inline_len != 0 {
            return Err(SenseError::invalid_field_in_param(12, None).into());
        }
        if tgt_len & 31 != 0 {
            return Err(SenseError::invalid_field_in_param(2, None).into());
        }
        let targets = tgt_len / 32;
        if targets > MAX_TARGET_DESCRIPTORS as usize {
            return Err(SenseError::new(key::ILLEGAL_REQUEST, 0x26, 0x06).into()); // TOO MANY TARGET DESCRIPTORS
        }
        for i in 0..targets {
            let at = 16 + 32 * i;
            let t = &p[at..at + 32];
            if t[0] != TARGET_IDENTIFICATION {
                return Err(SenseError::new(key::ILLEGAL_REQUEST, 0x26, 0x07)
                    .with_field(false, at as u16, None)
                    .into());
            }
            // LU ID TYPE (byte 1, bits 7-6) is not checked: the designator
            // names the LU, whatever the type says (libiscsi 1.19's
            // ExtendedCopy.ValidTgtDescr expects a reserved type to work).
            // NUL, a device type other than block, or another LU: unreachable.
            if t[1] & 0x20 != 0 || t[1] & 0x1F != 0 || !self.names_this_lu(t) {
                return Err(unreachable());
            }
        }
        let mut segments = Vec::new();
        let mut at = 16 + tgt_len;
        let end = 16 + tgt_len + seg_len;
        while at < end {
            if segments.len() == MAX_SEGMENT_DESCRIPTORS as usize {
                return Err(SenseError::new(key::ILLEGAL_REQUEST, 0x26, 0x08).into()); // TOO MANY SEGMENT DESCRIPTORS
            }
            if end - at < 4 {
                return Err(SenseError::param_list_length().into());
            }
            if p[at] != SEGMENT_BLOCK_TO_BLOCK {
                return Err(SenseError::new(key::ILLEGAL_REQUEST, 0x26, 0x09)
                    .with_field(false, at as u16, None)
                    .into());
            }
            let len = be16(p, at + 2) as usize + 4;
            if len != 28 {
                return Err(SenseError::invalid_field_in_param(at as u16 + 2, None).into());
            }
            if at + len > end {
                return Err(SenseError::param_list_length().into());
            }
            let s = &p[at..at + len];
            segments.push(Segment {
                src: be16(s, 4),
                dst: be16(s, 6),
                blocks: be16(s, 10),
                src_lba: be64(s, 12),
                dst_lba: be64(s, 20),
            });
            at += len;
        }
        if self.write_protected() && !segments.is_empty() {
            return Err(SenseError::write_protected().into());
        }
        let mut done_bytes = 0u64;
        for s in &segments {
            if s.src as usize >= targets || s.dst as usize >= targets {
                return Err(unreachable());
            }
            let n = s.blocks as u64;
            let cap = self.blocks();
            if s.src_lba.checked_add(n).is_none_or(|e| e > cap) || s.dst_lba.checked_add(n).is_none_or(|e| e > cap) {
                return Err(copy_aborted(0x00, 0x00));
            }
            self.copy_blocks(s.src_lba, s.dst_lba, n).await?;
            done_bytes += n * BLOCK as u64;
        }
        if usage != 2 && usage != 3 {
            let mut st = self.state.lock();
            st.xcopy.retain(|c| !(c.port == *port && c.list_id == list_id));
            if st.xcopy.len() == MAX_HELD_STATUS {
                st.xcopy.remove(0);
            }
            let kib = (done_bytes / 1024).min(u32::MAX as u64) as u32;
            st.xcopy.push(CopyStatus { port: port.clone(), list_id, segments: segments.len() as u16, kib });
        }
        Ok(Vec::new())
    }

    /// Copy `n` blocks within the LU (the store shares whole blocks rather
    /// than copying them, and handles overlap like `memmove`).
    async fn copy_blocks(&self, src: u64, dst: u64, n: u64) -> Result<(), Fail> {
        let (src, dst, len) = (src * BLOCK as u64, dst * BLOCK as u64, n * BLOCK as u64);
        if len == 0 || src == dst {
            return Ok(());
        }
        let fua = !self.state.lock().modes.wce;
        let _g = self.io.read().await;
        self.dev.copy_within(src, dst, len, fua).await.map_err(dev_err)?;
        Ok(())
    }

    pub(super) fn receive_copy_results(&self, port: &Port, action: u8, list_id: u8, alloc: u32) -> Outcome {
        if action == op::SA_OPERATING_PARAMETERS {
            let mut d = vec![0u8; 44];
            d[8..10].copy_from_slice(&MAX_TARGET_DESCRIPTORS.to_be_bytes());
            d[10..12].copy_from_slice(&MAX_SEGMENT_DESCRIPTORS.to_be_bytes());
            d[12..16].copy_from_slice(&MAX_DESCRIPTOR_LIST_LENGTH.to_be_bytes());
            d[16..20].copy_from_slice(&MAX_SEGMENT_BYTES.to_be_bytes());
            d[34..36].copy_from_slice(&1u16.to_be_bytes()); // total concurrent copies
            d[36] = 1; // maximum concurrent copies
            d[37] = 9; // data segment granularity: 512 bytes
            d[43] = 2;
            d.extend_from_slice(&[SEGMENT_BLOCK_TO_BLOCK, TARGET_IDENTIFICATION]);
            let n = (d.len() - 4) as u32;
            d[0..4].copy_from_slice(&n.to_be_bytes());
            return Ok(truncate(d, alloc));
        }
        let st = self.state.lock();
        let Some(c) = st.xcopy.iter().find(|c| c.port == *port && c.list_id == list_id) else {
            return Err(SenseError::invalid_field_in_cdb(2, None).into());
        };
        let mut d = vec![0u8; 12];
        d[3] = 8;
        d[4] = 0x01; // completed, no errors
        d[5..7].copy_from_slice(&c.segments.to_be_bytes());
        d[7] = 0x01; // transfer count in KiB
        d[8..12].copy_from_slice(&c.kib.to_be_bytes());
        Ok(truncate(d, alloc))
    }
}
