//! Keel's appliance: the daemon behind `keel serve` and the CLI that talks
//! to it.
//!
//! - [`serve`] starts everything: the default pool, the metadata database
//!   ([`db`]), reconciliation after a crash ([`reconcile`]), the NBD server
//!   and the HTTP API ([`api`]).
//! - [`app`] holds the operations, typed and free of HTTP, with the tenant
//!   rules of [`auth`]; [`model`] the records they keep.
//! - [`cli`] is the command line client.
//!
//! - [`vms`] runs virtual machines on QEMU over the volumes (through
//!   `keel-vmm-glue`).
//!
//! The iSCSI target reads its targets through [`app::IscsiTargets`].

pub mod access;
pub mod api;
pub mod app;
pub mod appliances;
pub mod auth;
pub mod cli;
pub mod cli_vm;
pub mod db;
pub mod error;
pub mod http;
pub mod iscsi;
pub mod model;
pub mod names;
pub mod pool_ops;
pub mod pools;
pub mod reconcile;
pub mod serve;
pub mod throttle;
pub mod ui;
pub mod vms;
