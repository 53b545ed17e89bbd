//! Keel's image library: virtual appliances (a descriptor plus disks stored
//! as content-addressed, zstd-compressed chunks, deduplicated across every
//! appliance), live backups into it, and restores out of it
//! ([`library`]). The ISO store lives in `mgmt` (files kept once,
//! read-only).

pub mod library;

pub use library::{BackupDisk, BackupStats, CHUNK_SIZE, Damage, Descriptor, DiskManifest, GcReport, Library, Usage};
