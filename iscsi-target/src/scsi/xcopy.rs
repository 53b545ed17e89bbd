//! EXTENDED COPY (LID1) and RECEIVE COPY RESULTS (SPC-4 6.4, 6.18): block
//! to block copies within this LU, done by reading and writing.

use keel_blockstore::BlockDevice;

use super::sense::SenseError;
use super::{LogicalUnit, Outcome};

/// The outcome of the last copy, for RECEIVE COPY RESULTS COPY STATUS.
#[derive(Default, Debug, Clone)]
#[allow(dead_code)] // filled in with EXTENDED COPY
pub(super) struct CopyStatus {
    pub list_id: u8,
    pub segments: u16,
    pub blocks: u32,
    pub valid: bool,
}

impl<D: BlockDevice + 'static> LogicalUnit<D> {
    #[allow(dead_code)]
    pub(super) fn third_party_copy_vpd(&self) -> Vec<u8> {
        vec![0, 0x8F, 0, 0]
    }

    pub(super) async fn extended_copy(&self, _param_len: u32, _data: &[u8]) -> Outcome {
        Err(SenseError::invalid_opcode().into())
    }

    pub(super) fn receive_copy_results(&self, _action: u8, _list_id: u8, _alloc: u32) -> Outcome {
        Err(SenseError::invalid_opcode().into())
    }
}
