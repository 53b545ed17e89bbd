//! libiscsi's conformance suite (iscsi-test-cu, SCSI and iSCSI families)
//! against a Keel LUN, counted honestly by ../shared/tools/iscsi-conformance
//! (a skip is not a pass). Fails on any failed test, and if fewer than 200
//! pass. The skips that remain are by construction: see ARCHITECTURE.md
//! ("iSCSI conformance").

mod common;

use std::path::PathBuf;

use common::{Harness, MIB, run, text};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libiscsi_conformance_suite_has_no_failure() {
    let tool = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/tools/iscsi-conformance");
    assert!(tool.exists(), "{} is missing: the shared tools sit beside the repository", tool.display());
    let h = Harness::new(4096 * MIB).await;
    h.pool.create_volume("conformance", 1024 * MIB).await.unwrap();
    let json = h.path("results.json");
    let out = run(&[tool.to_str().unwrap(), &h.url("conformance"), "--json", json.to_str().unwrap()], &[]).await;
    let report = text(&out);
    eprintln!("{report}");
    let last =
        report.lines().rev().find(|l| l.contains(" passed, ")).unwrap_or_else(|| panic!("no summary:\n{report}"));
    let nums: Vec<u32> =
        last.split(|c: char| !c.is_ascii_digit()).filter(|s| !s.is_empty()).map(|s| s.parse().unwrap()).collect();
    let (passed, failed) = (nums[0], nums[1]);
    assert_eq!(failed, 0, "conformance failures:\n{report}");
    assert!(passed >= 200, "only {passed} conformance tests passed:\n{report}");
    assert!(out.status.success(), "{report}");
}
