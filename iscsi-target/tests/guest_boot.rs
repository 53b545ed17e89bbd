//! A QEMU guest whose disk is a Keel LUN, through QEMU's built-in iSCSI
//! client: it boots and its write reaches the store.

mod common;

use common::{Harness, MIB};
use keel_tests::guest::{self, BootArgs, MARKER_PREFIX, MARKER_SECTOR};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_on_an_iscsi_lun_writes_through_to_the_store() {
    let h = Harness::new(256 * MIB).await;
    h.pool.create_volume("vol", 64 * MIB).await.unwrap();

    let args = BootArgs::new("write-marker").drive(&format!("file={},format=raw,if=virtio,cache=none", h.url("vol")));
    // QEMU runs for seconds: keep it off the runtime's workers, which serve iSCSI.
    let out = tokio::task::spawn_blocking(move || guest::boot(&args)).await.unwrap();
    out.assert_ok();
    let marker = out.marker().unwrap_or_else(|| panic!("no marker line on the console:\n{out}"));
    eprintln!("guest booted on an iSCSI LUN and wrote {marker:?} in {:.1} s", out.elapsed.as_secs_f64());

    let mut sector = vec![0xffu8; 512];
    h.pool.volume("vol").unwrap().read(MARKER_SECTOR * 512, &mut sector).await.unwrap();
    assert!(
        sector.starts_with(MARKER_PREFIX.as_bytes()),
        "sector {MARKER_SECTOR}: {:?}",
        String::from_utf8_lossy(&sector)
    );
    assert_eq!(&sector[..marker.len()], marker.as_bytes(), "{}", String::from_utf8_lossy(&sector));
}
