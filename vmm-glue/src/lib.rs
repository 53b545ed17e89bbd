//! Keel's glue to QEMU: everything that knows QEMU's command line, QMP and
//! the guest agent, and nothing about users, quotas or the metadata
//! database (that is `mgmt`).
//!
//! * [`config`]: a VM's hardware ([`VmConfig`]) and the QEMU command line
//!   it becomes.
//! * [`process`]: starting QEMU daemonized (so it outlives a restart of
//!   the Keel daemon), finding it again by its pid file, stopping it.
//! * [`qmp`]: an async QMP client (commands, events, hang-up).
//! * [`agent`]: the QEMU guest agent (file-system freeze and thaw).
//! * [`accel`]: choosing an accelerator that really runs guests here.

pub mod accel;
pub mod agent;
pub mod config;
pub mod process;
pub mod qmp;

pub use accel::Accel;
pub use config::{BootDevice, DirectBoot, DiskSource, NetBackend, VmConfig, VmDisk, VmNic};
pub use qmp::{Qmp, QmpError, QmpEvent};

/// Where the QEMU binary is when nothing says otherwise.
pub const DEFAULT_QEMU: &str = "qemu-system-x86_64";
