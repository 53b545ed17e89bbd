//! A QEMU guest whose disk is a Keel LUN, through QEMU's built-in iSCSI
//! client: it boots and its write reaches the store.

mod common;

use common::{Harness, MIB};
use keel_iscsi_target::{Access, Chap};
use keel_tests::guest::{self, BootArgs, MARKER_SECTOR};

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
    guest::assert_marker_sector(&sector, &marker);
}

/// The Linux kernel's own iSCSI initiator (`iscsistart` and iscsi_tcp in the
/// guest, over QEMU's user networking), logging in with CHAP: the target
/// speaks to the initiator most hosts run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_linux_kernels_iscsi_initiator_logs_in_with_chap_and_writes_through() {
    let h = Harness::new(256 * MIB).await;
    h.pool.create_volume("kvol", 64 * MIB).await.unwrap();
    let chap = Chap { user: "guest".into(), secret: "kernel-secret1".into() };
    h.targets.set_access("kvol", Access { chap: Some(chap), ..Access::default() });
    let boot = |secret: &str| {
        let spec = format!("keel.iscsi={},{},guest,{secret}", h.addr.port(), h.iqn("kvol"));
        BootArgs::new("iscsi-marker").append(&spec).qemu(guest::USER_NIC)
    };
    // A wrong secret: the kernel's login fails, nothing is written.
    let args = boot("wrong-secret99");
    let out = tokio::task::spawn_blocking(move || guest::boot(&args)).await.unwrap();
    let failed = out.console.lines().find(|l| l.contains("KEEL-GUEST FAIL iscsistart"));
    let failed = failed.unwrap_or_else(|| panic!("a wrong CHAP secret logged in:\n{out}"));
    assert!(failed.contains("authenticat"), "the login failed, but not on CHAP: {failed}");

    let args = boot("kernel-secret1");
    let out = tokio::task::spawn_blocking(move || guest::boot(&args)).await.unwrap();
    out.assert_ok();
    assert!(out.has_line("KEEL-GUEST ISCSI logged in"), "{out}");
    let marker = out.marker().unwrap_or_else(|| panic!("no marker line on the console:\n{out}"));
    let mut sector = vec![0xffu8; 512];
    h.pool.volume("kvol").unwrap().read(MARKER_SECTOR * 512, &mut sector).await.unwrap();
    guest::assert_marker_sector(&sector, &marker);
}
