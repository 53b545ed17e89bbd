//! A real VM (Keel's tiny test guest under QEMU TCG) with its disk on a
//! Keel volume served over NBD: what the guest writes must land in the store.

mod common;
use common::*;

use keel_tests::guest::{self, BootArgs, MARKER_SECTOR};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_on_an_nbd_volume_writes_through_to_the_store() {
    let h = Harness::new(256 * MIB).await;
    h.pool.create_volume("vol", 64 * MIB).await.unwrap();

    let args = BootArgs::new("write-marker").drive(&format!("file={},format=raw,if=virtio,cache=none", h.url("vol")));
    // QEMU runs for seconds: keep it off the runtime's workers, which serve NBD.
    let out = tokio::task::spawn_blocking(move || guest::boot(&args)).await.unwrap();
    out.assert_ok();
    let marker = out.marker().unwrap_or_else(|| panic!("no marker line on the console:\n{out}"));
    eprintln!(
        "guest booted and wrote {marker:?} in {:.1} s (init started at {:?} s guest uptime)",
        out.elapsed.as_secs_f64(),
        out.init_uptime()
    );

    // The guest's write reached Keel: the sector holds the marker, NUL-padded.
    let mut sector = vec![0xffu8; 512];
    h.pool.volume("vol").unwrap().read(MARKER_SECTOR * 512, &mut sector).await.unwrap();
    guest::assert_marker_sector(&sector, &marker);
}

/// The Linux kernel's own NBD client (`nbd-client` and the nbd module in
/// the guest, over QEMU's user networking) against Keel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_linux_kernels_nbd_client_writes_through_to_the_store() {
    let h = Harness::new(256 * MIB).await;
    h.pool.create_volume("kvol", 64 * MIB).await.unwrap();
    let args = BootArgs::new("nbd-marker").append(&format!("keel.nbd={}/kvol", h.addr.port())).qemu(guest::USER_NIC);
    let out = tokio::task::spawn_blocking(move || guest::boot(&args)).await.unwrap();
    out.assert_ok();
    assert!(out.has_line("KEEL-GUEST NBD connected"), "{out}");
    let marker = out.marker().unwrap_or_else(|| panic!("no marker line on the console:\n{out}"));
    let mut sector = vec![0xffu8; 512];
    h.pool.volume("kvol").unwrap().read(MARKER_SECTOR * 512, &mut sector).await.unwrap();
    guest::assert_marker_sector(&sector, &marker);
}
