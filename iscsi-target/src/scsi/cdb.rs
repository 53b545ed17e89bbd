//! CDB decoding: wire bytes in, a typed [`Cdb`] out (or the sense the
//! standard names for the bad field). No I/O and no device state here; the
//! executor in [`super`] never looks at CDB bytes.

use super::sense::SenseError;

/// Operation codes this layer decodes.
pub mod op {
    #![allow(missing_docs)]
    pub const TEST_UNIT_READY: u8 = 0x00;
    pub const REQUEST_SENSE: u8 = 0x03;
    pub const READ_6: u8 = 0x08;
    pub const WRITE_6: u8 = 0x0A;
    pub const INQUIRY: u8 = 0x12;
    pub const MODE_SELECT_6: u8 = 0x15;
    pub const RESERVE_6: u8 = 0x16;
    pub const RELEASE_6: u8 = 0x17;
    pub const MODE_SENSE_6: u8 = 0x1A;
    pub const START_STOP_UNIT: u8 = 0x1B;
    pub const PREVENT_ALLOW: u8 = 0x1E;
    pub const READ_CAPACITY_10: u8 = 0x25;
    pub const READ_10: u8 = 0x28;
    pub const WRITE_10: u8 = 0x2A;
    pub const WRITE_VERIFY_10: u8 = 0x2E;
    pub const VERIFY_10: u8 = 0x2F;
    pub const PRE_FETCH_10: u8 = 0x34;
    pub const SYNC_CACHE_10: u8 = 0x35;
    pub const READ_DEFECT_10: u8 = 0x37;
    pub const WRITE_SAME_10: u8 = 0x41;
    pub const UNMAP: u8 = 0x42;
    pub const SANITIZE: u8 = 0x48;
    pub const MODE_SELECT_10: u8 = 0x55;
    pub const MODE_SENSE_10: u8 = 0x5A;
    pub const PR_IN: u8 = 0x5E;
    pub const PR_OUT: u8 = 0x5F;
    pub const EXTENDED_COPY: u8 = 0x83;
    pub const RECEIVE_COPY_RESULTS: u8 = 0x84;
    pub const READ_16: u8 = 0x88;
    pub const COMPARE_AND_WRITE: u8 = 0x89;
    pub const WRITE_16: u8 = 0x8A;
    pub const ORWRITE_16: u8 = 0x8B;
    pub const WRITE_ATOMIC_16: u8 = 0x9C;
    pub const WRITE_VERIFY_16: u8 = 0x8E;
    pub const VERIFY_16: u8 = 0x8F;
    pub const PRE_FETCH_16: u8 = 0x90;
    pub const SYNC_CACHE_16: u8 = 0x91;
    pub const WRITE_SAME_16: u8 = 0x93;
    pub const SERVICE_ACTION_IN_16: u8 = 0x9E;
    pub const REPORT_LUNS: u8 = 0xA0;
    pub const MAINTENANCE_IN: u8 = 0xA3;
    pub const READ_12: u8 = 0xA8;
    pub const WRITE_12: u8 = 0xAA;
    pub const WRITE_VERIFY_12: u8 = 0xAE;
    pub const VERIFY_12: u8 = 0xAF;
    pub const READ_DEFECT_12: u8 = 0xB7;

    /// SERVICE ACTION IN(16) service actions.
    pub const SA_READ_CAPACITY_16: u8 = 0x10;
    pub const SA_GET_LBA_STATUS: u8 = 0x12;
    /// MAINTENANCE IN service actions.
    pub const SA_REPORT_TARGET_PORT_GROUPS: u8 = 0x0A;
    pub const SA_REPORT_SUPPORTED_OPCODES: u8 = 0x0C;
    /// EXTENDED COPY (LID1).
    pub const SA_XCOPY_LID1: u8 = 0x00;
    /// RECEIVE COPY RESULTS service actions.
    pub const SA_COPY_STATUS: u8 = 0x00;
    pub const SA_OPERATING_PARAMETERS: u8 = 0x03;
}

/// The CDB length of an operation code, from its group (SAM-5 5.2).
pub fn cdb_len(opcode: u8) -> usize {
    match opcode >> 5 {
        0 => 6,
        1 | 2 => 10,
        4 => 16,
        5 => 12,
        _ => 16,
    }
}

/// A logical block range: starting LBA and number of blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    /// First logical block.
    pub lba: u64,
    /// Number of logical blocks.
    pub blocks: u32,
}

/// Which variant of a sized command (READ(6)/(10)/(12)/(16), ...).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Size {
    /// 6-byte CDB.
    S6,
    /// 10-byte CDB.
    S10,
    /// 12-byte CDB.
    S12,
    /// 16-byte CDB.
    S16,
}

/// A decoded command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cdb {
    /// TEST UNIT READY.
    TestUnitReady,
    /// REQUEST SENSE.
    RequestSense { desc: bool, alloc: u32 },
    /// INQUIRY.
    Inquiry { evpd: bool, page: u8, alloc: u32 },
    /// REPORT LUNS.
    ReportLuns { select: u8, alloc: u32 },
    /// READ CAPACITY(10).
    ReadCapacity10,
    /// READ CAPACITY(16).
    ReadCapacity16 { alloc: u32 },
    /// READ(6/10/12/16).
    Read { size: Size, range: Range, fua: bool },
    /// WRITE(6/10/12/16).
    Write { size: Size, range: Range, fua: bool },
    /// WRITE AND VERIFY(10/12/16).
    WriteVerify { size: Size, range: Range, bytchk: bool },
    /// VERIFY(10/12/16). `bytchk` true: compare with the Data-Out buffer.
    Verify { size: Size, range: Range, bytchk: bool },
    /// PRE-FETCH(10/16). `immed`: status as soon as the CDB is checked.
    PreFetch { size: Size, range: Range, immed: bool },
    /// SYNCHRONIZE CACHE(10/16).
    SyncCache { size: Size, range: Range },
    /// UNMAP.
    Unmap { anchor: bool, param_len: u16 },
    /// WRITE SAME(10/16).
    WriteSame { size: Size, range: Range, unmap: bool, anchor: bool, ndob: bool },
    /// GET LBA STATUS.
    GetLbaStatus { lba: u64, alloc: u32 },
    /// COMPARE AND WRITE.
    CompareAndWrite { range: Range, fua: bool },
    /// ORWRITE(16).
    OrWrite { range: Range, fua: bool },
    /// WRITE ATOMIC(16): all of it or none of it.
    WriteAtomic { range: Range, fua: bool },
    /// PERSISTENT RESERVE IN.
    PrIn { action: u8, alloc: u16 },
    /// PERSISTENT RESERVE OUT.
    PrOut { action: u8, scope: u8, rtype: u8, param_len: u32 },
    /// RESERVE(6).
    Reserve6,
    /// RELEASE(6).
    Release6,
    /// MODE SENSE(6/10).
    ModeSense { ten: bool, dbd: bool, llbaa: bool, pc: u8, page: u8, subpage: u8, alloc: u16 },
    /// MODE SELECT(6/10).
    ModeSelect { ten: bool, pf: bool, sp: bool, param_len: u16 },
    /// REPORT SUPPORTED OPERATION CODES.
    ReportSupportedOpcodes { rctd: bool, options: u8, opcode: u8, sa: u16, alloc: u32 },
    /// REPORT TARGET PORT GROUPS.
    ReportTargetPortGroups { alloc: u32 },
    /// START STOP UNIT.
    StartStopUnit { power_condition: u8, loej: bool, start: bool },
    /// PREVENT ALLOW MEDIUM REMOVAL.
    PreventAllow { prevent: bool },
    /// READ DEFECT DATA(10/12).
    ReadDefectData { twelve: bool, plist: bool, glist: bool, format: u8, alloc: u32 },
    /// EXTENDED COPY (LID1).
    ExtendedCopy { param_len: u32 },
    /// RECEIVE COPY RESULTS.
    ReceiveCopyResults { action: u8, list_id: u8, alloc: u32 },
    /// SANITIZE.
    Sanitize { action: u8, immed: bool, ause: bool, param_len: u16 },
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be24(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([0, b[at], b[at + 1], b[at + 2]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(x)
}

fn bad(byte: u16, bit: u8) -> SenseError {
    SenseError::invalid_field_in_cdb(byte, Some(bit))
}

/// Reject a nonzero RDPROTECT/WRPROTECT/VRPROTECT field (byte 1 bits 7-5):
/// the device has no protection information.
fn no_protect(c: &[u8]) -> Result<(), SenseError> {
    if c[1] & 0xE0 != 0 { Err(bad(1, 7)) } else { Ok(()) }
}

/// LBA and transfer length of a 10/12/16-byte block command.
fn range(c: &[u8], size: Size) -> Range {
    match size {
        Size::S6 => {
            let lba = be24(c, 1) as u64 & 0x1F_FFFF;
            let blocks = if c[4] == 0 { 256 } else { c[4] as u32 };
            Range { lba, blocks }
        }
        Size::S10 => Range { lba: be32(c, 2) as u64, blocks: be16(c, 7) as u32 },
        Size::S12 => Range { lba: be32(c, 2) as u64, blocks: be32(c, 6) },
        Size::S16 => Range { lba: be64(c, 2), blocks: be32(c, 10) },
    }
}

/// Decode a CDB. `cdb` may be longer than the command (iSCSI carries 16
/// bytes); shorter than the command is an INVALID FIELD IN CDB.
pub fn parse_cdb(cdb: &[u8]) -> Result<Cdb, SenseError> {
    let Some(&opcode) = cdb.first() else {
        return Err(SenseError::invalid_opcode());
    };
    let len = cdb_len(opcode);
    if cdb.len() < len {
        return Err(SenseError::invalid_field_in_cdb(0, None));
    }
    let c = &cdb[..len];
    // CONTROL byte: NACA is not supported (SAM-5 5.3), the rest is vendor
    // specific or reserved.
    if c[len - 1] & 0x04 != 0 {
        return Err(bad(len as u16 - 1, 2));
    }
    use op::*;
    let sized = |s6, s10, s12, s16| match opcode {
        o if o == s6 => Size::S6,
        o if o == s10 => Size::S10,
        o if o == s12 => Size::S12,
        o if o == s16 => Size::S16,
        _ => Size::S16,
    };
    Ok(match opcode {
        TEST_UNIT_READY => Cdb::TestUnitReady,
        REQUEST_SENSE => Cdb::RequestSense { desc: c[1] & 1 != 0, alloc: c[4] as u32 },
        INQUIRY => {
            if c[1] & 0x02 != 0 {
                return Err(bad(1, 1)); // CMDDT (obsolete)
            }
            let evpd = c[1] & 1 != 0;
            if !evpd && c[2] != 0 {
                return Err(bad(2, 7));
            }
            Cdb::Inquiry { evpd, page: c[2], alloc: be16(c, 3) as u32 }
        }
        REPORT_LUNS => Cdb::ReportLuns { select: c[2], alloc: be32(c, 6) },
        READ_CAPACITY_10 => {
            // PMI is obsolete; with PMI clear the LBA must be zero.
            if c[8] & 1 == 0 && be32(c, 2) != 0 {
                return Err(bad(2, 7));
            }
            Cdb::ReadCapacity10
        }
        SERVICE_ACTION_IN_16 => match c[1] & 0x1F {
            SA_READ_CAPACITY_16 => Cdb::ReadCapacity16 { alloc: be32(c, 10) },
            SA_GET_LBA_STATUS => Cdb::GetLbaStatus { lba: be64(c, 2), alloc: be32(c, 10) },
            _ => return Err(bad(1, 4)),
        },
        READ_6 | WRITE_6 => {
            let range = range(c, Size::S6);
            if opcode == READ_6 {
                Cdb::Read { size: Size::S6, range, fua: false }
            } else {
                Cdb::Write { size: Size::S6, range, fua: false }
            }
        }
        READ_10 | READ_12 | READ_16 => {
            no_protect(c)?;
            let size = sized(READ_6, READ_10, READ_12, READ_16);
            Cdb::Read { size, range: range(c, size), fua: c[1] & 0x08 != 0 }
        }
        WRITE_10 | WRITE_12 | WRITE_16 => {
            no_protect(c)?;
            let size = sized(WRITE_6, WRITE_10, WRITE_12, WRITE_16);
            Cdb::Write { size, range: range(c, size), fua: c[1] & 0x08 != 0 }
        }
        WRITE_VERIFY_10 | WRITE_VERIFY_12 | WRITE_VERIFY_16 => {
            no_protect(c)?;
            let size = sized(0xFF, WRITE_VERIFY_10, WRITE_VERIFY_12, WRITE_VERIFY_16);
            // BYTCHK is one bit in SBC-3 and the low bit of a two-bit field
            // in SBC-4; 10b/11b are reserved for WRITE AND VERIFY.
            if c[1] & 0x04 != 0 {
                return Err(bad(1, 2));
            }
            Cdb::WriteVerify { size, range: range(c, size), bytchk: c[1] & 0x02 != 0 }
        }
        VERIFY_10 | VERIFY_12 | VERIFY_16 => {
            no_protect(c)?;
            let size = sized(0xFF, VERIFY_10, VERIFY_12, VERIFY_16);
            match (c[1] >> 1) & 3 {
                0 => Cdb::Verify { size, range: range(c, size), bytchk: false },
                1 => Cdb::Verify { size, range: range(c, size), bytchk: true },
                _ => return Err(bad(1, 2)), // BYTCHK 10b (reserved) or 11b (one block, unsupported)
            }
        }
        PRE_FETCH_10 | PRE_FETCH_16 => {
            let size = sized(0xFF, PRE_FETCH_10, 0xFF, PRE_FETCH_16);
            Cdb::PreFetch { size, range: range(c, size), immed: c[1] & 0x02 != 0 }
        }
        SYNC_CACHE_10 | SYNC_CACHE_16 => {
            let size = sized(0xFF, SYNC_CACHE_10, 0xFF, SYNC_CACHE_16);
            Cdb::SyncCache { size, range: range(c, size) }
        }
        UNMAP => Cdb::Unmap { anchor: c[1] & 1 != 0, param_len: be16(c, 7) },
        WRITE_SAME_10 | WRITE_SAME_16 => {
            no_protect(c)?;
            let size = sized(0xFF, WRITE_SAME_10, 0xFF, WRITE_SAME_16);
            // PBDATA and LBDATA (bits 2 and 1 in the 10-byte CDB) are not supported.
            if size == Size::S10 && c[1] & 0x06 != 0 {
                return Err(bad(1, 2));
            }
            let ndob = size == Size::S16 && c[1] & 0x01 != 0;
            let unmap = c[1] & 0x08 != 0;
            let anchor = c[1] & 0x10 != 0;
            // ANCHOR: anchored blocks are not supported (ANC_SUP=0).
            if anchor {
                return Err(bad(1, 4));
            }
            Cdb::WriteSame { size, range: range(c, size), unmap, anchor, ndob }
        }
        COMPARE_AND_WRITE => {
            no_protect(c)?;
            Cdb::CompareAndWrite { range: Range { lba: be64(c, 2), blocks: c[13] as u32 }, fua: c[1] & 0x08 != 0 }
        }
        ORWRITE_16 => {
            no_protect(c)?;
            Cdb::OrWrite { range: range(c, Size::S16), fua: c[1] & 0x08 != 0 }
        }
        WRITE_ATOMIC_16 => {
            no_protect(c)?;
            // ATOMIC BOUNDARY: we report a maximum boundary size of 0, so
            // only 0 is valid.
            if c[10] != 0 || c[11] != 0 {
                return Err(bad(10, 7));
            }
            let blocks = u16::from_be_bytes([c[12], c[13]]) as u32;
            Cdb::WriteAtomic { range: Range { lba: be64(c, 2), blocks }, fua: c[1] & 0x08 != 0 }
        }
        PR_IN => {
            let action = c[1] & 0x1F;
            if action > 3 {
                return Err(bad(1, 4));
            }
            Cdb::PrIn { action, alloc: be16(c, 7) }
        }
        PR_OUT => {
            let action = c[1] & 0x1F;
            if action > 7 {
                return Err(bad(1, 4));
            }
            Cdb::PrOut { action, scope: c[2] >> 4, rtype: c[2] & 0xF, param_len: be32(c, 5) }
        }
        RESERVE_6 => {
            if c[1] & 0x01 != 0 {
                return Err(bad(1, 0)); // extent reservations (obsolete)
            }
            Cdb::Reserve6
        }
        RELEASE_6 => {
            if c[1] & 0x01 != 0 {
                return Err(bad(1, 0));
            }
            Cdb::Release6
        }
        MODE_SENSE_6 | MODE_SENSE_10 => {
            let ten = opcode == MODE_SENSE_10;
            Cdb::ModeSense {
                ten,
                dbd: c[1] & 0x08 != 0,
                llbaa: ten && c[1] & 0x10 != 0,
                pc: c[2] >> 6,
                page: c[2] & 0x3F,
                subpage: c[3],
                alloc: if ten { be16(c, 7) } else { c[4] as u16 },
            }
        }
        MODE_SELECT_6 | MODE_SELECT_10 => {
            let ten = opcode == MODE_SELECT_10;
            Cdb::ModeSelect {
                ten,
                pf: c[1] & 0x10 != 0,
                sp: c[1] & 0x01 != 0,
                param_len: if ten { be16(c, 7) } else { c[4] as u16 },
            }
        }
        MAINTENANCE_IN => match c[1] & 0x1F {
            SA_REPORT_SUPPORTED_OPCODES => {
                let options = c[2] & 0x07;
                if options > 3 {
                    return Err(bad(2, 2));
                }
                Cdb::ReportSupportedOpcodes {
                    rctd: c[2] & 0x80 != 0,
                    options,
                    opcode: c[3],
                    sa: be16(c, 4),
                    alloc: be32(c, 6),
                }
            }
            SA_REPORT_TARGET_PORT_GROUPS => Cdb::ReportTargetPortGroups { alloc: be32(c, 6) },
            _ => return Err(bad(1, 4)),
        },
        START_STOP_UNIT => {
            Cdb::StartStopUnit { power_condition: c[4] >> 4, loej: c[4] & 0x02 != 0, start: c[4] & 0x01 != 0 }
        }
        PREVENT_ALLOW => {
            // PREVENT 01b only is meaningful for a disk; 10b/11b are obsolete
            // (medium changer) and rejected.
            match c[4] & 0x03 {
                0 => Cdb::PreventAllow { prevent: false },
                1 => Cdb::PreventAllow { prevent: true },
                _ => return Err(bad(4, 1)),
            }
        }
        READ_DEFECT_10 => Cdb::ReadDefectData {
            twelve: false,
            plist: c[2] & 0x10 != 0,
            glist: c[2] & 0x08 != 0,
            format: c[2] & 0x07,
            alloc: be16(c, 7) as u32,
        },
        READ_DEFECT_12 => Cdb::ReadDefectData {
            twelve: true,
            plist: c[1] & 0x10 != 0,
            glist: c[1] & 0x08 != 0,
            format: c[1] & 0x07,
            alloc: be32(c, 6),
        },
        EXTENDED_COPY => {
            if c[1] & 0x1F != SA_XCOPY_LID1 {
                return Err(bad(1, 4));
            }
            Cdb::ExtendedCopy { param_len: be32(c, 10) }
        }
        RECEIVE_COPY_RESULTS => {
            let action = c[1] & 0x1F;
            if action != SA_COPY_STATUS && action != SA_OPERATING_PARAMETERS {
                return Err(bad(1, 4));
            }
            Cdb::ReceiveCopyResults { action, list_id: c[2], alloc: be32(c, 10) }
        }
        SANITIZE => {
            if c[1] & 0x40 != 0 {
                return Err(bad(1, 6));
            }
            if let Some(i) = (2..7).find(|&i| c[i] != 0) {
                return Err(SenseError::invalid_field_in_cdb(i as u16, None));
            }
            Cdb::Sanitize {
                action: c[1] & 0x1F,
                immed: c[1] & 0x80 != 0,
                ause: c[1] & 0x20 != 0,
                param_len: be16(c, 7),
            }
        }
        _ => return Err(SenseError::invalid_opcode()),
    })
}

/// Number of Data-Out bytes `cdb` transfers with 512-byte blocks, 0 when
/// it transfers none or does not decode.
pub fn data_out_len(cdb: &[u8], block: u32) -> u32 {
    let Ok(c) = parse_cdb(cdb) else { return 0 };
    let blocks = |n: u32| n.saturating_mul(block);
    match c {
        Cdb::Write { range, .. }
        | Cdb::WriteVerify { range, .. }
        | Cdb::OrWrite { range, .. }
        | Cdb::WriteAtomic { range, .. } => blocks(range.blocks),
        Cdb::Verify { range, bytchk: true, .. } => blocks(range.blocks),
        Cdb::WriteSame { ndob: false, .. } => block,
        Cdb::CompareAndWrite { range, .. } => blocks(range.blocks).saturating_mul(2),
        Cdb::Unmap { param_len, .. } => param_len as u32,
        Cdb::ModeSelect { param_len, .. } => param_len as u32,
        Cdb::PrOut { param_len, .. } => param_len,
        Cdb::ExtendedCopy { param_len } => param_len,
        Cdb::Sanitize { param_len, .. } => param_len as u32,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read10_decodes_lba_length_and_fua() {
        let c = [0x28, 0x08, 0, 0, 1, 0, 0, 0, 8, 0];
        assert_eq!(
            parse_cdb(&c).unwrap(),
            Cdb::Read { size: Size::S10, range: Range { lba: 256, blocks: 8 }, fua: true }
        );
    }

    #[test]
    fn read6_zero_length_means_256_blocks() {
        let c = [0x08, 0, 0, 5, 0, 0];
        assert_eq!(
            parse_cdb(&c).unwrap(),
            Cdb::Read { size: Size::S6, range: Range { lba: 5, blocks: 256 }, fua: false }
        );
    }

    #[test]
    fn rdprotect_and_short_cdbs_are_invalid_fields() {
        let e = parse_cdb(&[0x28, 0x20, 0, 0, 0, 0, 0, 0, 1, 0]).unwrap_err();
        assert_eq!((e.key, e.asc), (5, 0x24));
        assert_eq!(parse_cdb(&[0x88, 0]).unwrap_err().asc, 0x24);
        assert_eq!(parse_cdb(&[0xC0; 16]).unwrap_err().asc, 0x20);
        assert_eq!(parse_cdb(&[]).unwrap_err().asc, 0x20);
    }

    #[test]
    fn data_out_lengths() {
        assert_eq!(data_out_len(&[0x2A, 0, 0, 0, 0, 0, 0, 0, 4, 0], 512), 2048);
        assert_eq!(data_out_len(&[0x89, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0], 512), 2048);
        assert_eq!(data_out_len(&[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0], 512), 24);
        assert_eq!(data_out_len(&[0x12, 0, 0, 0, 36, 0], 512), 0);
    }
}
