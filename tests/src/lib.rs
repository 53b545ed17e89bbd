//! End-to-end tests that start the real daemon and drive it with real clients.
//!
//! Shared helpers live here so every crate's integration tests can use them:
//! [`guest`] builds and boots Keel's tiny test VM; [`data`] makes test data
//! and finds scratch space.

pub mod data;
pub mod guest;
