//! iSCSI target for Keel volumes (issue 4): iSCSI PDUs, login and session
//! state machines, and the SCSI (SPC/SBC) command layer over a
//! [`keel_blockstore::BlockDevice`].
//!
//! [`scsi`] owns the command layer: CDB decoding, the direct-access block
//! device model (thin provisioning, reservations, mode pages, sense).

pub mod scsi;
