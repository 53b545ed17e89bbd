//! NBD server for Keel volumes (issue 3): a sans-I/O codec for the NBD
//! protocol and a server that runs each request against a
//! [`keel_blockstore::BlockDevice`]. Not yet built: this crate only fixes its
//! place in the dependency graph (`nbd-server -> blockstore`).
