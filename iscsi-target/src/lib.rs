//! iSCSI target for Keel volumes (RFC 7143 over SPC-4/SBC-4).
//!
//! Layers, from the wire up:
//! - [`pdu`]: the PDU codec (headers, digests, padding), pure and fuzzed;
//! - [`text`]: text keys and operational parameter negotiation;
//! - [`login`]: the login state machine (None, CHAP, mutual CHAP; ACLs);
//! - [`session`]: the full-feature phase of one connection (CmdSN window,
//!   R2T and Data-Out gathering, Data-In, task management, NOP pings);
//! - [`scsi`]: the SCSI command layer of a thin-provisioned disk over a
//!   [`keel_blockstore::BlockDevice`];
//! - [`server`]: accepting connections, the session and LU registries, and
//!   [`server::PoolTargets`], which makes every volume of a pool a target.

pub mod login;
pub mod pdu;
pub mod scsi;
mod scsi_sense;
pub mod server;
pub mod session;
pub mod text;

pub use login::{Access, Chap};
pub use server::{IQN_PREFIX, PoolTargets, Server, ServerConfig, Targets};
