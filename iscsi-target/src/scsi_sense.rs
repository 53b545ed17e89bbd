//! The few SCSI sense responses the transport itself produces (for
//! commands that fail before they reach the logical unit).

use crate::scsi::Response;

/// CHECK CONDITION with fixed-format sense `key/asc/ascq`.
pub fn check_condition(key: u8, asc: u8, ascq: u8) -> Response {
    let mut s = vec![0u8; 18];
    s[0] = 0x70;
    s[2] = key;
    s[7] = 10;
    s[12] = asc;
    s[13] = ascq;
    Response { status: 2, sense: s, data_in: Vec::new() }
}

/// ILLEGAL REQUEST / INVALID FIELD IN CDB.
pub fn invalid_field_in_cdb() -> Response {
    check_condition(0x05, 0x24, 0x00)
}

/// ILLEGAL REQUEST / INVALID FIELD IN INFORMATION UNIT (a write whose
/// expected length ends inside a block).
pub fn invalid_field_in_iu() -> Response {
    check_condition(0x05, 0x0e, 0x03)
}

/// ABORTED COMMAND / DATA PHASE ERROR (Data-Out out of sequence).
pub fn data_phase_error() -> Response {
    check_condition(0x0b, 0x4b, 0x00)
}

/// HARDWARE ERROR / INTERNAL TARGET FAILURE (a command's task panicked).
pub fn internal_target_failure() -> Response {
    check_condition(0x04, 0x44, 0x00)
}

/// ABORTED COMMAND / PROTOCOL SERVICE CRC ERROR (data digest mismatch).
pub fn crc_error() -> Response {
    check_condition(0x0b, 0x47, 0x05)
}
