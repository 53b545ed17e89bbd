//! Keel's image library: virtual appliances (a descriptor plus disks stored
//! as content-addressed, zstd-compressed chunks, deduplicated across every
//! appliance), live backups into it, and restores out of it
//! ([`library`]); OVA files, the packages VirtualBox and VMware export and
//! import ([`ova`]). The ISO store lives in `mgmt` (files kept once,
//! read-only).

pub mod library;
pub mod ova;

pub use library::{BackupDisk, BackupStats, CHUNK_SIZE, Damage, Descriptor, DiskManifest, GcReport, Library, Usage};
