//! Keel volumes served over NBD, driven by the clients users have:
//! qemu-img, qemu-io, nbdinfo, nbdcopy and fio's nbd engine.

mod common;
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_converts_onto_a_volume_and_compares_equal() {
    let h = Harness::new(512 * MIB).await;
    h.pool.create_volume("disk", 64 * MIB).await.unwrap();
    let src = h.path("src.raw");
    patterned_file(&src, 64 * MIB, 7);
    let url = h.url("disk");
    let info = run("qemu-img", &["info", "--output=json", &url]).await;
    assert!(text(&info).contains("\"virtual-size\": 67108864"), "{}", text(&info));
    run("qemu-img", &["convert", "-n", "-f", "raw", "-O", "raw", src.to_str().unwrap(), &url]).await;
    run("qemu-img", &["compare", "-f", "raw", "-F", "raw", src.to_str().unwrap(), &url]).await;
    // Holes in the source stayed holes in the thin volume.
    let v = h.pool.volume("disk").unwrap();
    assert!(v.allocated_bytes() <= 33 * MIB, "allocated {} bytes for 32 MiB of data", v.allocated_bytes());
    // And a volume with different data compares unequal.
    v.write(0, &vec![1u8; 4096], false).await.unwrap();
    let out = tokio::process::Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw", src.to_str().unwrap(), &url])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_patterns_verify() {
    let h = Harness::new(256 * MIB).await;
    h.pool.create_volume("v", 32 * MIB).await.unwrap();
    let url = h.url("v");
    let out = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xab 0 1M",
            "-c",
            "write -P 0xcd -f 1M 512k",
            "-c",
            "write -z 2M 1M",
            "-c",
            "write -P 0x11 3M 4k",
            "-c",
            "discard 3M 4k",
            "-c",
            "write -P 0x22 5120 1024",
            "-c",
            "flush",
            "-c",
            "read -P 0xab 0 5120",
            "-c",
            "read -P 0x22 5120 1024",
            "-c",
            "read -P 0xab 6144 1042432",
            "-c",
            "read -P 0xcd 1M 512k",
            "-c",
            "read -P 0 2M 1M",
            "-c",
            "read -P 0 3M 4k",
            &url,
        ],
    )
    .await;
    let t = text(&out);
    assert!(!t.contains("fail") && !t.contains("error"), "{t}");
    assert_eq!(t.matches("read ").count(), 6, "{t}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_maps_allocation_and_dirty_bitmap_from_the_store() {
    let h = Harness::new(256 * MIB).await;
    let v = h.pool.create_volume("v", 16 * MIB).await.unwrap();
    v.write(MIB, &vec![5u8; 2 * MIB as usize], false).await.unwrap();
    h.pool.snapshot("v", "monday").await.unwrap();
    v.write(8 * MIB, &vec![6u8; 65536], false).await.unwrap();
    v.write(MIB, &vec![7u8; 4096], false).await.unwrap();

    let out = run("nbdinfo", &["--map", "--totals", &h.url("v")]).await;
    let t = text(&out);
    // Totals: bytes, percent, type, description. Data = 2 MiB + 64 KiB.
    let data_line = t.lines().find(|l| l.contains("data")).unwrap_or_else(|| panic!("{t}"));
    assert!(data_line.trim_start().starts_with(&(2 * MIB + 65536).to_string()), "{t}");

    let out = run("nbdinfo", &["--map=qemu:dirty-bitmap:monday", &h.url("v")]).await;
    let t = text(&out);
    let dirty: Vec<(u64, u64)> = t
        .lines()
        .filter(|l| l.contains("dirty"))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[0].parse().unwrap(), f[1].parse().unwrap())
        })
        .collect();
    assert_eq!(dirty, vec![(MIB, 4096), (8 * MIB, 65536)], "{t}");

    let list = run("nbdinfo", &["--list", &format!("nbd://{}", h.addr)]).await;
    let t = text(&list);
    assert!(t.contains("export=\"v\"") || t.contains("export=v") || t.contains("v@monday"), "{t}");
    assert!(t.contains("v@monday"), "{t}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdcopy_round_trips_through_a_volume() {
    let h = Harness::new(256 * MIB).await;
    h.pool.create_volume("v", 32 * MIB).await.unwrap();
    let src = h.path("in.raw");
    let back = h.path("out.raw");
    patterned_file(&src, 32 * MIB, 3);
    run("nbdcopy", &[src.to_str().unwrap(), &h.url("v")]).await;
    run("nbdcopy", &[&h.url("v"), back.to_str().unwrap()]).await;
    assert!(std::fs::read(&src).unwrap() == std::fs::read(&back).unwrap(), "nbdcopy round trip differs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fio_nbd_engine_verifies_crc32c() {
    let h = Harness::new(256 * MIB).await;
    h.pool.create_volume("v", 64 * MIB).await.unwrap();
    h.pool.snapshot("v", "s").await.unwrap();
    let uri = format!("--uri={}", h.url("v"));
    let out = run(
        "fio",
        &[
            "--name=verify",
            "--ioengine=nbd",
            &uri,
            "--rw=randwrite",
            "--bs=4k",
            "--size=32m",
            "--iodepth=16",
            "--verify=crc32c",
            "--verify_fatal=1",
            "--do_verify=1",
            // No state file in the working directory.
            "--verify_state_save=0",
        ],
    )
    .await;
    let t = text(&out);
    assert!(t.contains("WRITE:"), "fio reported no writes: {t}");
    assert!(!t.contains("verify: bad") && !t.contains("crc32c: verify failed"), "{t}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_are_exported_read_only() {
    let h = Harness::new(256 * MIB).await;
    let v = h.pool.create_volume("v", 8 * MIB).await.unwrap();
    v.write(0, &vec![0x5a; 65536], false).await.unwrap();
    h.pool.snapshot("v", "s").await.unwrap();
    v.write(0, &vec![0x00; 65536], false).await.unwrap();
    let url = h.url("v@s");
    run("qemu-io", &["-r", "-f", "raw", "-c", "read -P 0x5a 0 64k", &url]).await;
    let out = run_failing("qemu-io", &["-f", "raw", "-c", "write -P 1 0 4k", &url]).await;
    let t = text(&out);
    assert!(
        t.to_lowercase().contains("read-only") || t.contains("Permission denied") || t.contains("not permitted"),
        "{t}"
    );
    let out = run_failing("qemu-img", &["info", &h.url("nope")]).await;
    assert!(!text(&out).is_empty());
}
