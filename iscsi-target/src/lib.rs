//! iSCSI target for Keel volumes (issue 4): iSCSI PDUs, login and session
//! state machines, and the SCSI (SPC/SBC) command layer over a
//! [`keel_blockstore::BlockDevice`]. Not yet built: this crate only fixes its
//! place in the dependency graph (`iscsi-target -> blockstore`).
