//! End-to-end tests that start the real daemon and drive it with real clients.
