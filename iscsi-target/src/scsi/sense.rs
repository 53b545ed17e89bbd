//! Sense data: the error half of every SCSI command (SPC-4 4.5).
//!
//! A [`SenseError`] is what a parser or executor returns when a command
//! fails; [`SenseError::encode`] turns it into fixed-format (0x70) or
//! descriptor-format (0x72) sense bytes, as the control mode page's D_SENSE
//! bit asks.

use std::fmt;

/// Sense keys (SPC-4 table 48).
pub mod key {
    /// NO SENSE.
    pub const NO_SENSE: u8 = 0x0;
    /// NOT READY.
    pub const NOT_READY: u8 = 0x2;
    /// MEDIUM ERROR.
    pub const MEDIUM_ERROR: u8 = 0x3;
    /// HARDWARE ERROR.
    pub const HARDWARE_ERROR: u8 = 0x4;
    /// ILLEGAL REQUEST.
    pub const ILLEGAL_REQUEST: u8 = 0x5;
    /// UNIT ATTENTION.
    pub const UNIT_ATTENTION: u8 = 0x6;
    /// DATA PROTECT.
    pub const DATA_PROTECT: u8 = 0x7;
    /// ABORTED COMMAND.
    pub const ABORTED_COMMAND: u8 = 0xB;
    /// COPY ABORTED.
    pub const COPY_ABORTED: u8 = 0xA;
    /// MISCOMPARE.
    pub const MISCOMPARE: u8 = 0xE;
}

/// Where in the CDB or parameter list the offending field is (the
/// sense-key-specific FIELD POINTER, SPC-4 4.5.2.4.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FieldPointer {
    /// True for the CDB, false for the parameter list.
    pub in_cdb: bool,
    /// Byte offset.
    pub byte: u16,
    /// Bit within the byte, when known.
    pub bit: Option<u8>,
}

/// A failed command: sense key, additional sense code and qualifier, and the
/// optional INFORMATION and field pointer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SenseError {
    /// Sense key.
    pub key: u8,
    /// Additional sense code.
    pub asc: u8,
    /// Additional sense code qualifier.
    pub ascq: u8,
    /// INFORMATION field (a miscompare offset, say).
    pub info: Option<u64>,
    /// Sense-key-specific field pointer.
    pub field: Option<FieldPointer>,
}

impl fmt::Display for SenseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sense key {:#x} asc/ascq {:02x}/{:02x}", self.key, self.asc, self.ascq)
    }
}

impl std::error::Error for SenseError {}

impl SenseError {
    /// A sense error with no INFORMATION and no field pointer.
    pub const fn new(key: u8, asc: u8, ascq: u8) -> SenseError {
        SenseError { key, asc, ascq, info: None, field: None }
    }

    /// ILLEGAL REQUEST / INVALID COMMAND OPERATION CODE (20h/00h).
    pub fn invalid_opcode() -> SenseError {
        SenseError::new(key::ILLEGAL_REQUEST, 0x20, 0x00).with_field(true, 0, None)
    }

    /// ILLEGAL REQUEST / INVALID FIELD IN CDB (24h/00h) pointing at `byte` (and `bit`).
    pub fn invalid_field_in_cdb(byte: u16, bit: Option<u8>) -> SenseError {
        SenseError::new(key::ILLEGAL_REQUEST, 0x24, 0x00).with_field(true, byte, bit)
    }

    /// ILLEGAL REQUEST / INVALID FIELD IN PARAMETER LIST (26h/00h).
    pub fn invalid_field_in_param(byte: u16, bit: Option<u8>) -> SenseError {
        SenseError::new(key::ILLEGAL_REQUEST, 0x26, 0x00).with_field(false, byte, bit)
    }

    /// ILLEGAL REQUEST / PARAMETER LIST LENGTH ERROR (1Ah/00h).
    pub fn param_list_length() -> SenseError {
        SenseError::new(key::ILLEGAL_REQUEST, 0x1A, 0x00)
    }

    /// ILLEGAL REQUEST / LOGICAL BLOCK ADDRESS OUT OF RANGE (21h/00h).
    pub fn lba_out_of_range() -> SenseError {
        SenseError::new(key::ILLEGAL_REQUEST, 0x21, 0x00)
    }

    /// ILLEGAL REQUEST / LOGICAL UNIT NOT SUPPORTED (25h/00h).
    pub fn lun_not_supported() -> SenseError {
        SenseError::new(key::ILLEGAL_REQUEST, 0x25, 0x00)
    }

    /// ILLEGAL REQUEST / SAVING PARAMETERS NOT SUPPORTED (39h/00h).
    pub fn saving_not_supported() -> SenseError {
        SenseError::new(key::ILLEGAL_REQUEST, 0x39, 0x00)
    }

    /// ILLEGAL REQUEST / INVALID FIELD IN COMMAND INFORMATION UNIT (0Eh/03h):
    /// the transport delivered less Data-Out than the CDB transfers.
    pub fn invalid_field_in_iu() -> SenseError {
        SenseError::new(key::ILLEGAL_REQUEST, 0x0E, 0x03)
    }

    /// DATA PROTECT / WRITE PROTECTED (27h/00h).
    pub fn write_protected() -> SenseError {
        SenseError::new(key::DATA_PROTECT, 0x27, 0x00)
    }

    /// DATA PROTECT / SPACE ALLOCATION FAILED WRITE PROTECT (27h/07h).
    pub fn space_allocation_failed() -> SenseError {
        SenseError::new(key::DATA_PROTECT, 0x27, 0x07)
    }

    /// MEDIUM ERROR / UNRECOVERED READ ERROR (11h/00h).
    pub fn unrecovered_read() -> SenseError {
        SenseError::new(key::MEDIUM_ERROR, 0x11, 0x00)
    }

    /// HARDWARE ERROR / INTERNAL TARGET FAILURE (44h/00h).
    pub fn internal_failure() -> SenseError {
        SenseError::new(key::HARDWARE_ERROR, 0x44, 0x00)
    }

    /// MISCOMPARE / MISCOMPARE DURING VERIFY OPERATION (1Dh/00h) at byte `offset`.
    pub fn miscompare(offset: u64) -> SenseError {
        SenseError { info: Some(offset), ..SenseError::new(key::MISCOMPARE, 0x1D, 0x00) }
    }

    /// Attach a field pointer.
    pub fn with_field(mut self, in_cdb: bool, byte: u16, bit: Option<u8>) -> SenseError {
        self.field = Some(FieldPointer { in_cdb, byte, bit });
        self
    }

    /// The sense bytes: descriptor format (0x72) when `descriptor`, else
    /// fixed format (0x70).
    pub fn encode(&self, descriptor: bool) -> Vec<u8> {
        let sks = self.field.map(|f| {
            let mut b0 = 0x80u8;
            if f.in_cdb {
                b0 |= 0x40;
            }
            if let Some(bit) = f.bit {
                b0 |= 0x08 | (bit & 7);
            }
            let [hi, lo] = f.byte.to_be_bytes();
            [b0, hi, lo]
        });
        if descriptor {
            let mut s = vec![0x72, self.key & 0xF, self.asc, self.ascq, 0, 0, 0, 0];
            if let Some(info) = self.info {
                s.extend_from_slice(&[0x00, 0x0A, 0x80, 0]);
                s.extend_from_slice(&info.to_be_bytes());
            }
            if let Some(sks) = sks {
                s.extend_from_slice(&[0x02, 0x06, 0, 0]);
                s.extend_from_slice(&sks);
                s.push(0);
            }
            s[7] = (s.len() - 8) as u8;
            s
        } else {
            let mut s = vec![0u8; 18];
            s[0] = 0x70;
            s[2] = self.key & 0xF;
            if let Some(info) = self.info {
                s[0] |= 0x80;
                s[3..7].copy_from_slice(&(info.min(u32::MAX as u64) as u32).to_be_bytes());
            }
            s[7] = 10;
            s[12] = self.asc;
            s[13] = self.ascq;
            if let Some(sks) = sks {
                s[15..18].copy_from_slice(&sks);
            }
            s
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_format_carries_key_asc_info_and_field_pointer() {
        let s = SenseError::invalid_field_in_cdb(2, Some(5)).encode(false);
        assert_eq!(s.len(), 18);
        assert_eq!((s[0], s[2], s[7], s[12], s[13]), (0x70, 5, 10, 0x24, 0));
        assert_eq!(&s[15..18], &[0x80 | 0x40 | 0x08 | 5, 0, 2]);
        let m = SenseError::miscompare(513).encode(false);
        assert_eq!((m[0], m[2]), (0xF0, 0xE));
        assert_eq!(u32::from_be_bytes(m[3..7].try_into().unwrap()), 513);
    }

    #[test]
    fn descriptor_format_carries_information_descriptor() {
        let s = SenseError::miscompare(7).encode(true);
        assert_eq!((s[0], s[1], s[2], s[3]), (0x72, 0xE, 0x1D, 0));
        assert_eq!(s[7] as usize, s.len() - 8);
        assert_eq!(&s[8..12], &[0, 0x0A, 0x80, 0]);
        assert_eq!(u64::from_be_bytes(s[12..20].try_into().unwrap()), 7);
    }
}
