//! Primary commands (SPC-4): INQUIRY and its VPD pages, READ CAPACITY,
//! mode pages, REPORT SUPPORTED OPERATION CODES, REPORT TARGET PORT GROUPS.

use keel_blockstore::BlockDevice;

use super::cdb::op;
use super::sense::SenseError;
use super::{
    ATOMIC_BLOCKS, BLOCK, LogicalUnit, MAX_COMPARE_AND_WRITE_BLOCKS, MAX_TRANSFER_BLOCKS, MAX_UNMAP_BLOCKS,
    MAX_UNMAP_DESCRIPTORS, MAX_WRITE_SAME_BLOCKS, Modes, Nexus, Outcome, PHYS_EXPONENT, Port, UNMAP_GRANULARITY,
    truncate,
};

/// Version descriptors: SAM-5, SPC-4, SBC-3, iSCSI.
const VERSION_DESCRIPTORS: [u16; 4] = [0x00A0, 0x0460, 0x04C0, 0x0960];

/// VPD pages served, in order.
const VPD_PAGES: [u8; 7] = [0x00, 0x80, 0x83, 0x8F, 0xB0, 0xB1, 0xB2];

/// Space-padded ASCII of exactly `n` bytes.
fn padded(s: &str, n: usize) -> Vec<u8> {
    let mut v: Vec<u8> = s.bytes().filter(|b| b.is_ascii_graphic() || *b == b' ').take(n).collect();
    v.resize(n, b' ');
    v
}

/// A VPD page: header and `body`.
fn vpd(page: u8, body: &[u8]) -> Vec<u8> {
    let mut d = vec![0, page];
    d.extend_from_slice(&(body.len() as u16).to_be_bytes());
    d.extend_from_slice(body);
    d
}

/// A designation descriptor (SPC-4 7.8.6.1).
fn designator(protocol: Option<u8>, code_set: u8, assoc: u8, dtype: u8, id: &[u8]) -> Vec<u8> {
    let mut d = vec![(protocol.unwrap_or(0) << 4) | code_set, (assoc << 4) | dtype, 0, id.len() as u8];
    if protocol.is_some() {
        d[1] |= 0x80; // PIV
    }
    d.extend_from_slice(id);
    d
}

/// A SCSI name string: UTF-8, NUL-terminated, padded to a multiple of 4.
fn name_string(s: &str) -> Vec<u8> {
    let mut v: Vec<u8> = s.bytes().take(250).collect();
    v.push(0);
    v.resize(v.len().div_ceil(4) * 4, 0);
    v
}

const ISCSI: u8 = 5;

impl<D: BlockDevice + 'static> LogicalUnit<D> {
    /// The NAA-6 designator value (top nibble forced to 6).
    pub(super) fn naa(&self) -> u64 {
        (self.id.naa & 0x0FFF_FFFF_FFFF_FFFF) | 0x6000_0000_0000_0000
    }

    pub(super) fn inquiry(&self, nexus: &Nexus, evpd: bool, page: u8, alloc: u32) -> Outcome {
        if !evpd {
            let mut d = vec![0u8; 96];
            d[0] = 0x00; // connected, direct access block device
            d[2] = 0x06; // SPC-4
            d[3] = 0x12; // HISUP, response data format 2
            d[4] = (d.len() - 5) as u8;
            d[5] = 0x10 | 0x08; // TPGS 01b (implicit ALUA), 3PC
            d[7] = 0x02; // CMDQUE
            d[8..16].copy_from_slice(&padded("KEEL", 8));
            d[16..32].copy_from_slice(&padded("Keel volume", 16));
            d[32..36].copy_from_slice(&padded(env!("CARGO_PKG_VERSION"), 4));
            for (i, v) in VERSION_DESCRIPTORS.iter().enumerate() {
                d[58 + 2 * i..60 + 2 * i].copy_from_slice(&v.to_be_bytes());
            }
            return Ok(truncate(d, alloc));
        }
        let d = match page {
            0x00 => vpd(0x00, &VPD_PAGES),
            0x80 => vpd(0x80, &padded(&self.id.serial, self.id.serial.len().clamp(1, 64))),
            0x83 => {
                let mut b = designator(None, 1, 0, 3, &self.naa().to_be_bytes());
                let port = nexus.target_port_name.as_str();
                b.extend(designator(
                    Some(ISCSI),
                    1,
                    1,
                    4,
                    &[0, 0, nexus.rel_port_id.to_be_bytes()[0], nexus.rel_port_id.to_be_bytes()[1]],
                ));
                b.extend(designator(Some(ISCSI), 1, 1, 5, &[0, 0, 0, 1]));
                b.extend(designator(Some(ISCSI), 3, 1, 8, &name_string(port)));
                b.extend(designator(Some(ISCSI), 3, 2, 8, &name_string(&self.id.target_name)));
                vpd(0x83, &b)
            }
            0x8F => self.third_party_copy_vpd(),
            0xB0 => {
                let mut b = [0u8; 0x3C];
                b[1] = MAX_COMPARE_AND_WRITE_BLOCKS as u8;
                b[2..4].copy_from_slice(&(UNMAP_GRANULARITY as u16).to_be_bytes());
                b[4..8].copy_from_slice(&MAX_TRANSFER_BLOCKS.to_be_bytes());
                b[8..12].copy_from_slice(&(1024u32).to_be_bytes());
                b[12..16].copy_from_slice(&MAX_TRANSFER_BLOCKS.to_be_bytes());
                b[16..20].copy_from_slice(&MAX_UNMAP_BLOCKS.to_be_bytes());
                b[20..24].copy_from_slice(&MAX_UNMAP_DESCRIPTORS.to_be_bytes());
                b[24..28].copy_from_slice(&UNMAP_GRANULARITY.to_be_bytes());
                b[28..32].copy_from_slice(&0x8000_0000u32.to_be_bytes()); // UGAVALID, alignment 0
                b[32..40].copy_from_slice(&MAX_WRITE_SAME_BLOCKS.to_be_bytes());
                // WRITE ATOMIC(16): maximum length, alignment, granularity
                // (page bytes 44..56); no atomic boundaries.
                b[40..44].copy_from_slice(&(self.dev.atomic_max() / BLOCK).to_be_bytes());
                b[44..48].copy_from_slice(&ATOMIC_BLOCKS.to_be_bytes());
                b[48..52].copy_from_slice(&ATOMIC_BLOCKS.to_be_bytes());
                vpd(0xB0, &b)
            }
            0xB1 => {
                let mut b = [0u8; 0x3C];
                b[1] = 1; // non-rotating medium
                b[3] = 0x40; // WABEREQ 01b: reads after SANITIZE BLOCK ERASE succeed
                vpd(0xB1, &b)
            }
            0xB2 => {
                // LBPU, LBPWS, LBPWS10, LBPRZ 001b; provisioning type thin.
                vpd(0xB2, &[0, 0x80 | 0x40 | 0x20 | 0x04, 0x02, 0])
            }
            _ => return Err(SenseError::invalid_field_in_cdb(2, None).into()),
        };
        Ok(truncate(d, alloc))
    }

    pub(super) fn read_capacity10(&self) -> Vec<u8> {
        let last = self.blocks().saturating_sub(1).min(u32::MAX as u64) as u32;
        let mut d = last.to_be_bytes().to_vec();
        d.extend_from_slice(&BLOCK.to_be_bytes());
        d
    }

    pub(super) fn read_capacity16(&self, alloc: u32) -> Vec<u8> {
        let mut d = vec![0u8; 32];
        d[0..8].copy_from_slice(&self.blocks().saturating_sub(1).to_be_bytes());
        d[8..12].copy_from_slice(&BLOCK.to_be_bytes());
        d[13] = PHYS_EXPONENT;
        d[14] = 0x80 | 0x40; // LBPME, LBPRZ; lowest aligned LBA 0
        truncate(d, alloc)
    }

    /// One mode page for page control `pc` (0 current, 1 changeable, 2 default).
    fn mode_page(&self, page: u8, pc: u8, m: &Modes) -> Vec<u8> {
        let cur = match pc {
            0 => *m,
            _ => Modes::default(),
        };
        match page {
            0x08 => {
                let mut p = vec![0u8; 20];
                p[0] = 0x08;
                p[1] = 18;
                p[2] = match pc {
                    1 => 0x04,
                    _ if cur.wce => 0x04,
                    _ => 0,
                };
                p
            }
            0x0A => {
                let mut p = vec![0u8; 12];
                p[0] = 0x0A;
                p[1] = 10;
                if pc == 1 {
                    p[2] = 0x04;
                    p[4] = 0x08;
                } else {
                    p[2] = if cur.d_sense { 0x04 } else { 0 };
                    p[4] = if cur.swp { 0x08 } else { 0 };
                    p[8..10].copy_from_slice(&0xFFFFu16.to_be_bytes()); // busy timeout: unlimited
                }
                p
            }
            _ => {
                let mut p = vec![0u8; 12];
                p[0] = 0x1C;
                p[1] = 10;
                p
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn mode_sense(
        &self,
        ten: bool,
        dbd: bool,
        llbaa: bool,
        pc: u8,
        page: u8,
        subpage: u8,
        alloc: u16,
    ) -> Outcome {
        if pc == 3 {
            return Err(SenseError::saving_not_supported().into());
        }
        let pages: &[u8] = match page {
            0x08 => &[0x08],
            0x0A => &[0x0A],
            0x1C => &[0x1C],
            0x3F => &[0x08, 0x0A, 0x1C],
            _ => return Err(SenseError::invalid_field_in_cdb(2, Some(5)).into()),
        };
        if subpage != 0 && subpage != 0xFF {
            return Err(SenseError::invalid_field_in_cdb(3, Some(7)).into());
        }
        let modes = self.state.lock().modes;
        let mut body = Vec::new();
        for &p in pages {
            body.extend(self.mode_page(p, pc, &modes));
        }
        let mut bd = Vec::new();
        if !dbd {
            let blocks = self.blocks();
            if llbaa {
                bd.extend_from_slice(&blocks.to_be_bytes());
                bd.extend_from_slice(&[0; 4]);
                bd.extend_from_slice(&BLOCK.to_be_bytes());
            } else {
                bd.extend_from_slice(&(blocks.min(u32::MAX as u64) as u32).to_be_bytes());
                bd.push(0);
                bd.extend_from_slice(&BLOCK.to_be_bytes()[1..]);
            }
        }
        let dev_specific = if self.write_protected() { 0x90 } else { 0x10 }; // WP, DPOFUA
        let mut d = if ten {
            let mut h = vec![0u8; 8];
            h[3] = dev_specific;
            h[4] = if llbaa && !dbd { 1 } else { 0 };
            h[6..8].copy_from_slice(&(bd.len() as u16).to_be_bytes());
            h
        } else {
            vec![0, 0, dev_specific, bd.len() as u8]
        };
        d.extend(bd);
        d.extend(body);
        if ten {
            let n = (d.len() - 2) as u16;
            d[0..2].copy_from_slice(&n.to_be_bytes());
        } else {
            d[0] = (d.len() - 1).min(255) as u8;
        }
        Ok(truncate(d, alloc as u32))
    }

    pub(super) fn mode_select(&self, port: &Port, ten: bool, sp: bool, param_len: u16, data: &[u8]) -> Outcome {
        if sp {
            return Err(SenseError::invalid_field_in_cdb(1, Some(0)).into());
        }
        if param_len == 0 {
            return Ok(Vec::new());
        }
        let p = data.get(..param_len as usize).ok_or_else(SenseError::param_list_length)?;
        let hlen = if ten { 8 } else { 4 };
        if p.len() < hlen {
            return Err(SenseError::param_list_length().into());
        }
        let bdlen = if ten { u16::from_be_bytes([p[6], p[7]]) as usize } else { p[3] as usize };
        if !matches!(bdlen, 0 | 8 | 16) || (bdlen == 16 && !(ten && p[4] & 1 != 0)) {
            return Err(SenseError::invalid_field_in_param(if ten { 6 } else { 3 }, None).into());
        }
        if p.len() < hlen + bdlen {
            return Err(SenseError::param_list_length().into());
        }
        if bdlen > 0 {
            let b = &p[hlen..hlen + bdlen];
            let len = u32::from_be_bytes([0, b[bdlen - 3], b[bdlen - 2], b[bdlen - 1]]);
            if len != BLOCK && len != 0 {
                return Err(SenseError::invalid_field_in_param((hlen + bdlen - 3) as u16, None).into());
            }
        }
        let old = self.state.lock().modes;
        let mut new = old;
        let mut at = hlen + bdlen;
        while at < p.len() {
            if p.len() - at < 2 {
                return Err(SenseError::param_list_length().into());
            }
            let code = p[at] & 0x3F;
            if p[at] & 0x40 != 0 || !matches!(code, 0x08 | 0x0A | 0x1C) {
                return Err(SenseError::invalid_field_in_param(at as u16, None).into());
            }
            let cur = self.mode_page(code, 0, &new);
            let mask = self.mode_page(code, 1, &new);
            let len = p[at + 1] as usize + 2;
            if len != cur.len() {
                return Err(SenseError::invalid_field_in_param(at as u16 + 1, None).into());
            }
            if at + len > p.len() {
                return Err(SenseError::param_list_length().into());
            }
            let page = &p[at..at + len];
            for i in 2..len {
                if (page[i] ^ cur[i]) & !mask[i] != 0 {
                    return Err(SenseError::invalid_field_in_param((at + i) as u16, None).into());
                }
            }
            match code {
                0x08 => new.wce = page[2] & 0x04 != 0,
                0x0A => {
                    new.d_sense = page[2] & 0x04 != 0;
                    new.swp = page[4] & 0x08 != 0;
                }
                _ => {}
            }
            at += len;
        }
        let mut st = self.state.lock();
        st.modes = new;
        if (new.wce, new.d_sense, new.swp) != (old.wce, old.d_sense, old.swp) {
            let others: Vec<Port> = st.known.iter().filter(|k| *k != port).cloned().collect();
            for o in others {
                st.push_ua(&o, 0x2A, 0x01); // MODE PARAMETERS CHANGED
            }
        }
        Ok(Vec::new())
    }
}

/// One entry of the supported-commands table: opcode, service action and
/// CDB usage data (its length is the CDB length).
struct Supported {
    opcode: u8,
    sa: Option<u16>,
    usage: &'static [u8],
}

const fn cmd(opcode: u8, sa: Option<u16>, usage: &'static [u8]) -> Supported {
    Supported { opcode, sa, usage }
}

const F: u8 = 0xFF;

#[rustfmt::skip]
static SUPPORTED: &[Supported] = &[
    cmd(op::TEST_UNIT_READY, None, &[0x00, 0, 0, 0, 0, 0]),
    cmd(op::REQUEST_SENSE, None, &[0x03, 0x01, 0, 0, F, 0]),
    cmd(op::READ_6, None, &[0x08, 0x1F, F, F, F, 0]),
    cmd(op::WRITE_6, None, &[0x0A, 0x1F, F, F, F, 0]),
    cmd(op::INQUIRY, None, &[0x12, 0x01, F, F, F, 0]),
    cmd(op::MODE_SELECT_6, None, &[0x15, 0x10, 0, 0, F, 0]),
    cmd(op::RESERVE_6, None, &[0x16, 0, 0, 0, 0, 0]),
    cmd(op::RELEASE_6, None, &[0x17, 0, 0, 0, 0, 0]),
    cmd(op::MODE_SENSE_6, None, &[0x1A, 0x08, F, F, F, 0]),
    cmd(op::START_STOP_UNIT, None, &[0x1B, 0x01, 0, 0x0F, 0xF7, 0]),
    cmd(op::PREVENT_ALLOW, None, &[0x1E, 0, 0, 0, 0x01, 0]),
    cmd(op::READ_CAPACITY_10, None, &[0x25, 0, F, F, F, F, 0, 0, 0x01, 0]),
    cmd(op::READ_10, None, &[0x28, 0x18, F, F, F, F, 0, F, F, 0]),
    cmd(op::WRITE_10, None, &[0x2A, 0x18, F, F, F, F, 0, F, F, 0]),
    cmd(op::WRITE_VERIFY_10, None, &[0x2E, 0x12, F, F, F, F, 0, F, F, 0]),
    cmd(op::VERIFY_10, None, &[0x2F, 0x12, F, F, F, F, 0, F, F, 0]),
    cmd(op::PRE_FETCH_10, None, &[0x34, 0x02, F, F, F, F, 0, F, F, 0]),
    cmd(op::SYNC_CACHE_10, None, &[0x35, 0x02, F, F, F, F, 0, F, F, 0]),
    cmd(op::READ_DEFECT_10, None, &[0x37, 0, 0x1F, 0, 0, 0, 0, F, F, 0]),
    cmd(op::WRITE_SAME_10, None, &[0x41, 0x08, F, F, F, F, 0, F, F, 0]),
    cmd(op::UNMAP, None, &[0x42, 0, 0, 0, 0, 0, 0, F, F, 0]),
    cmd(op::SANITIZE, Some(0x01), &[0x48, 0xBF, 0, 0, 0, 0, 0, F, F, 0]),
    cmd(op::SANITIZE, Some(0x02), &[0x48, 0xBF, 0, 0, 0, 0, 0, F, F, 0]),
    cmd(op::MODE_SELECT_10, None, &[0x55, 0x10, 0, 0, 0, 0, 0, F, F, 0]),
    cmd(op::MODE_SENSE_10, None, &[0x5A, 0x18, F, F, 0, 0, 0, F, F, 0]),
    cmd(op::PR_IN, Some(0), &[0x5E, 0x1F, 0, 0, 0, 0, 0, F, F, 0]),
    cmd(op::PR_IN, Some(1), &[0x5E, 0x1F, 0, 0, 0, 0, 0, F, F, 0]),
    cmd(op::PR_IN, Some(2), &[0x5E, 0x1F, 0, 0, 0, 0, 0, F, F, 0]),
    cmd(op::PR_IN, Some(3), &[0x5E, 0x1F, 0, 0, 0, 0, 0, F, F, 0]),
    cmd(op::PR_OUT, Some(0), &[0x5F, 0x1F, F, 0, 0, F, F, F, F, 0]),
    cmd(op::PR_OUT, Some(1), &[0x5F, 0x1F, F, 0, 0, F, F, F, F, 0]),
    cmd(op::PR_OUT, Some(2), &[0x5F, 0x1F, F, 0, 0, F, F, F, F, 0]),
    cmd(op::PR_OUT, Some(3), &[0x5F, 0x1F, F, 0, 0, F, F, F, F, 0]),
    cmd(op::PR_OUT, Some(4), &[0x5F, 0x1F, F, 0, 0, F, F, F, F, 0]),
    cmd(op::PR_OUT, Some(5), &[0x5F, 0x1F, F, 0, 0, F, F, F, F, 0]),
    cmd(op::PR_OUT, Some(6), &[0x5F, 0x1F, F, 0, 0, F, F, F, F, 0]),
    cmd(op::EXTENDED_COPY, Some(0), &[0x83, 0x1F, 0, 0, 0, 0, 0, 0, 0, 0, F, F, F, F, 0, 0]),
    cmd(op::RECEIVE_COPY_RESULTS, Some(0), &[0x84, 0x1F, F, 0, 0, 0, 0, 0, 0, 0, F, F, F, F, 0, 0]),
    cmd(op::RECEIVE_COPY_RESULTS, Some(3), &[0x84, 0x1F, 0, 0, 0, 0, 0, 0, 0, 0, F, F, F, F, 0, 0]),
    cmd(op::READ_16, None, &[0x88, 0x18, F, F, F, F, F, F, F, F, F, F, F, F, 0, 0]),
    cmd(op::COMPARE_AND_WRITE, None, &[0x89, 0x18, F, F, F, F, F, F, F, F, 0, 0, 0, F, 0, 0]),
    cmd(op::WRITE_16, None, &[0x8A, 0x18, F, F, F, F, F, F, F, F, F, F, F, F, 0, 0]),
    cmd(op::ORWRITE_16, None, &[0x8B, 0x18, F, F, F, F, F, F, F, F, F, F, F, F, 0, 0]),
    cmd(op::WRITE_ATOMIC_16, None, &[0x9C, 0x18, F, F, F, F, F, F, F, F, 0, 0, F, F, 0, 0]),
    cmd(op::WRITE_VERIFY_16, None, &[0x8E, 0x12, F, F, F, F, F, F, F, F, F, F, F, F, 0, 0]),
    cmd(op::VERIFY_16, None, &[0x8F, 0x12, F, F, F, F, F, F, F, F, F, F, F, F, 0, 0]),
    cmd(op::PRE_FETCH_16, None, &[0x90, 0x02, F, F, F, F, F, F, F, F, F, F, F, F, 0, 0]),
    cmd(op::SYNC_CACHE_16, None, &[0x91, 0x02, F, F, F, F, F, F, F, F, F, F, F, F, 0, 0]),
    cmd(op::WRITE_SAME_16, None, &[0x93, 0x09, F, F, F, F, F, F, F, F, F, F, F, F, 0, 0]),
    cmd(op::SERVICE_ACTION_IN_16, Some(0x10), &[0x9E, 0x1F, 0, 0, 0, 0, 0, 0, 0, 0, F, F, F, F, 0, 0]),
    cmd(op::SERVICE_ACTION_IN_16, Some(0x12), &[0x9E, 0x1F, F, F, F, F, F, F, F, F, F, F, F, F, 0, 0]),
    cmd(op::REPORT_LUNS, None, &[0xA0, 0, F, 0, 0, 0, F, F, F, F, 0, 0]),
    cmd(op::MAINTENANCE_IN, Some(0x0A), &[0xA3, 0x1F, 0, 0, 0, 0, F, F, F, F, 0, 0]),
    cmd(op::MAINTENANCE_IN, Some(0x0C), &[0xA3, 0x1F, 0x87, F, F, F, F, F, F, F, 0, 0]),
    cmd(op::READ_12, None, &[0xA8, 0x18, F, F, F, F, F, F, F, F, 0, 0]),
    cmd(op::WRITE_12, None, &[0xAA, 0x18, F, F, F, F, F, F, F, F, 0, 0]),
    cmd(op::WRITE_VERIFY_12, None, &[0xAE, 0x12, F, F, F, F, F, F, F, F, 0, 0]),
    cmd(op::VERIFY_12, None, &[0xAF, 0x12, F, F, F, F, F, F, F, F, 0, 0]),
    cmd(op::READ_DEFECT_12, None, &[0xB7, 0x1F, 0, 0, 0, 0, F, F, F, F, 0, 0]),
];

/// The command timeouts descriptor (SPC-4 6.35.4): no nominal time, a
/// recommended timeout of 60 seconds.
fn timeouts() -> [u8; 12] {
    let mut t = [0u8; 12];
    t[1] = 0x0A;
    t[8..12].copy_from_slice(&60u32.to_be_bytes());
    t
}

pub(super) fn report_supported_opcodes(rctd: bool, options: u8, opcode: u8, sa: u16, alloc: u32) -> Outcome {
    let mut d = Vec::new();
    if options == 0 {
        d.extend_from_slice(&[0; 4]);
        for c in SUPPORTED {
            d.push(c.opcode);
            d.push(0);
            d.extend_from_slice(&c.sa.unwrap_or(0).to_be_bytes());
            d.push(0);
            d.push(if rctd { 0x02 } else { 0 } | if c.sa.is_some() { 0x01 } else { 0 });
            d.extend_from_slice(&(c.usage.len() as u16).to_be_bytes());
            if rctd {
                d.extend_from_slice(&timeouts());
            }
        }
        let n = (d.len() - 4) as u32;
        d[0..4].copy_from_slice(&n.to_be_bytes());
        return Ok(truncate(d, alloc));
    }
    let has_sa = SUPPORTED.iter().any(|c| c.opcode == opcode && c.sa.is_some());
    let found = match options {
        // One command, no service action: an opcode with service actions is an error.
        1 if has_sa => return Err(SenseError::invalid_field_in_cdb(2, Some(2)).into()),
        1 => SUPPORTED.iter().find(|c| c.opcode == opcode),
        // One command with a service action: an opcode without them is an error.
        2 if !has_sa && SUPPORTED.iter().any(|c| c.opcode == opcode) => {
            return Err(SenseError::invalid_field_in_cdb(2, Some(2)).into());
        }
        2 => SUPPORTED.iter().find(|c| c.opcode == opcode && c.sa == Some(sa)),
        _ => SUPPORTED.iter().find(|c| c.opcode == opcode && (c.sa.is_none() || c.sa == Some(sa))),
    };
    match found {
        Some(c) => {
            d.push(0);
            d.push(if rctd { 0x80 } else { 0 } | 0x03);
            d.extend_from_slice(&(c.usage.len() as u16).to_be_bytes());
            d.extend_from_slice(c.usage);
            if rctd {
                d.extend_from_slice(&timeouts());
            }
        }
        None => d.extend_from_slice(&[0, 0x01, 0, 0]),
    }
    Ok(truncate(d, alloc))
}

/// One target port group (1, active/optimized) holding the calling port.
pub(super) fn report_target_port_groups(nexus: &Nexus, alloc: u32) -> Vec<u8> {
    let mut d = vec![0u8; 4];
    d.extend_from_slice(&[0x80, 0x01, 0, 1, 0, 0, 0, 1]); // PREF, AO supported; group 1; 1 port
    d.extend_from_slice(&[0, 0]);
    d.extend_from_slice(&nexus.rel_port_id.to_be_bytes());
    let n = (d.len() - 4) as u32;
    d[0..4].copy_from_slice(&n.to_be_bytes());
    truncate(d, alloc)
}

/// An empty defect list in the requested format.
pub(super) fn read_defect_data(twelve: bool, plist: bool, glist: bool, format: u8, alloc: u32) -> Vec<u8> {
    let flags = (if plist { 0x10 } else { 0 }) | (if glist { 0x08 } else { 0 }) | format;
    let d = if twelve { vec![0, flags, 0, 0, 0, 0, 0, 0] } else { vec![0, flags, 0, 0] };
    truncate(d, alloc)
}
