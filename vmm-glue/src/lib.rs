//! QEMU control (issue 6): VM spec to command line, QMP client, guest agent,
//! lifecycle state machine. Not yet built: this crate only fixes its place in
//! the dependency graph (`vmm-glue -> blockstore`, disks attached by URL).
