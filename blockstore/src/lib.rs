//! Keel's block store.
pub mod backend;
