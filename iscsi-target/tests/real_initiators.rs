//! Keel's iSCSI target against real initiators: libiscsi's tools and
//! QEMU's built-in iSCSI client.

mod common;

use common::{Harness, MIB, run, text, write_random};
use keel_iscsi_target::{Access, Chap};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_inquiry_and_capacity_through_libiscsi() {
    let h = Harness::new(256 * MIB).await;
    h.pool.create_volume("alpha", 64 * MIB).await.unwrap();
    h.pool.create_volume("beta", 32 * MIB).await.unwrap();

    let ls = run(&["iscsi-ls", "-s", &format!("iscsi://{}", h.addr)], &[]).await;
    let out = text(&ls);
    assert!(ls.status.success(), "{out}");
    assert!(out.contains(&format!("Target:{} Portal:{},1", h.iqn("alpha"), h.addr)), "{out}");
    assert!(out.contains(&h.iqn("beta")), "{out}");
    assert!(out.contains("Lun:0    Type:DIRECT_ACCESS"), "{out}");

    let inq = run(&["iscsi-inq", &h.url("alpha")], &[]).await;
    let out = text(&inq);
    assert!(inq.status.success(), "{out}");
    assert!(out.contains("Vendor:KEEL"), "{out}");
    assert!(out.contains("Peripheral Device Type:DIRECT_ACCESS"), "{out}");

    let cap = run(&["iscsi-readcapacity16", &h.url("beta")], &[]).await;
    let out = text(&cap);
    assert!(cap.status.success(), "{out}");
    assert!(out.contains(&format!("Total size:{}", 32 * MIB)), "{out}");
    assert!(out.contains("LOGICAL BLOCK LENGTH IN BYTES:512"), "{out}");

    // An unknown target is refused at login.
    let bad = run(&["iscsi-inq", &h.url("nope")], &[]).await;
    assert!(!bad.status.success(), "{}", text(&bad));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_convert_and_compare_over_iscsi_with_and_without_digests() {
    let h = Harness::new(512 * MIB).await;
    h.pool.create_volume("disk", 64 * MIB).await.unwrap();
    let src = h.path("src.img");
    let data = write_random(&src, 24 * MIB as usize, 7);
    let src = src.to_str().unwrap();

    let conv = run(&["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, &h.url("disk")], &[]).await;
    assert!(conv.status.success(), "{}", text(&conv));
    for digest in ["none", "crc32c"] {
        let json = format!(
            r#"json:{{"driver":"raw","size":{},"file":{{"driver":"iscsi","transport":"tcp","portal":"{}","target":"{}","lun":0,"header-digest":"{digest}"}}}}"#,
            data.len(),
            h.addr,
            h.iqn("disk")
        );
        let cmp = run(&["qemu-img", "compare", "-f", "raw", src, &json], &[]).await;
        let out = text(&cmp);
        assert!(cmp.status.success() && out.contains("Images are identical"), "digest {digest}: {out}");
    }
    // The bytes really are in the store.
    let mut buf = vec![0u8; MIB as usize];
    h.pool.volume("disk").unwrap().read(5 * MIB, &mut buf).await.unwrap();
    assert_eq!(buf, data[5 * MIB as usize..6 * MIB as usize]);

    // qemu-io patterns, verified on read back; the tail past the copied
    // data still reads as zeros.
    let io = run(
        &[
            "qemu-io",
            "-f",
            "raw",
            "-c",
            "write -P 0x5a 40M 3M",
            "-c",
            "read -P 0x5a 40M 3M",
            "-c",
            "read -P 0 50M 1M",
            &h.url("disk"),
        ],
        &[],
    )
    .await;
    let out = text(&io);
    assert!(io.status.success() && !out.contains("Pattern verification failed"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chap_mutual_chap_and_initiator_acl_are_enforced() {
    let h = Harness::new(256 * MIB).await;
    h.pool.create_volume("secure", 16 * MIB).await.unwrap();
    h.targets.set_access(
        "secure",
        Access {
            initiators: vec!["iqn.2026-11.test:good".into()],
            chap: Some(Chap { user: "alice".into(), secret: "alice-secret-1".into() }),
            mutual: None,
        },
    );
    let with_creds = |user: &str, secret: &str| format!("iscsi://{user}%{secret}@{}/{}/0", h.addr, h.iqn("secure"));
    let good = ["-i", "iqn.2026-11.test:good"];

    let ok = run(&["iscsi-inq", good[0], good[1], &with_creds("alice", "alice-secret-1")], &[]).await;
    assert!(ok.status.success(), "right secret refused: {}", text(&ok));
    let wrong = run(&["iscsi-inq", good[0], good[1], &with_creds("alice", "not-the-secret")], &[]).await;
    assert!(!wrong.status.success(), "wrong secret accepted: {}", text(&wrong));
    let none = run(&["iscsi-inq", good[0], good[1], &h.url("secure")], &[]).await;
    assert!(!none.status.success(), "no CHAP accepted: {}", text(&none));
    let other = run(&["iscsi-inq", "-i", "iqn.2026-11.test:other", &with_creds("alice", "alice-secret-1")], &[]).await;
    assert!(!other.status.success(), "initiator off the ACL accepted: {}", text(&other));
    // Discovery hides the target from an initiator off its ACL.
    let ls = run(&["iscsi-ls", "-i", "iqn.2026-11.test:other", &format!("iscsi://{}", h.addr)], &[]).await;
    assert!(!text(&ls).contains(&h.iqn("secure")), "{}", text(&ls));

    // Mutual CHAP: the target proves itself too.
    h.targets.set_access(
        "secure",
        Access {
            initiators: vec![],
            chap: Some(Chap { user: "alice".into(), secret: "alice-secret-1".into() }),
            mutual: Some(Chap { user: "target".into(), secret: "target-secret-9".into() }),
        },
    );
    let env_ok = [("LIBISCSI_CHAP_TARGET_USERNAME", "target"), ("LIBISCSI_CHAP_TARGET_PASSWORD", "target-secret-9")];
    let ok = run(&["iscsi-inq", &with_creds("alice", "alice-secret-1")], &env_ok).await;
    assert!(ok.status.success(), "mutual CHAP refused: {}", text(&ok));
    let env_bad = [("LIBISCSI_CHAP_TARGET_USERNAME", "target"), ("LIBISCSI_CHAP_TARGET_PASSWORD", "impostor-secret")];
    let bad = run(&["iscsi-inq", &with_creds("alice", "alice-secret-1")], &env_bad).await;
    assert!(!bad.status.success(), "initiator accepted a target with the wrong secret: {}", text(&bad));
}
