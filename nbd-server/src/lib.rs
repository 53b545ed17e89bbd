//! NBD server for Keel volumes.
//!
//! [`proto`] is the pure codec; [`connection`] is the only code that
//! touches sockets: the fixed-newstyle handshake (EXPORT_NAME, INFO, GO,
//! LIST, ABORT, STARTTLS, STRUCTURED_REPLY, EXTENDED_HEADERS, meta contexts)
//! and the transmission phase, where each request becomes a typed
//! operation run against a [`keel_blockstore::BlockDevice`] concurrently with
//! the others on the connection. [`server`] accepts connections and owns the
//! configuration (TLS, whether it is required, limits). What is exported
//! comes from an [`Exports`] implementation; [`PoolExports`] exports every
//! volume of a pool under its name and every snapshot read-only as
//! `VOLUME@SNAPSHOT`, with `qemu:dirty-bitmap:SNAPSHOT` contexts backed by
//! the store's change tracking.

pub mod connection;
pub mod proto;
pub mod server;
pub mod sessions;
pub mod tls;

pub use server::{Exports, PoolExports, ServerConfig, serve, serve_unix};
pub use sessions::{Counted, CountingExports, ExportCounters, ExportStats};
