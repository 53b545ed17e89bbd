//! The appliance library over a real pool: backup, incremental backup from
//! the store's change tracking, dedup, restore, delete and garbage
//! collection, damage found by verify and refused by restore.

use keel_blockstore::{AnyBackend, Pool};
use keel_images::{BackupDisk, CHUNK_SIZE, Descriptor, Library};
use keel_tests::data::{pseudo_random, temp_pool};

const MIB: u64 = 1 << 20;

fn head(name: &str) -> Descriptor {
    Descriptor {
        name: name.into(),
        owner: "admin".into(),
        created: 0,
        source_vm: Some("vm".into()),
        cpus: 1,
        memory_bytes: 256 * MIB,
        boot: vec!["disk".into()],
        disks: vec![],
    }
}

async fn read_all(pool: &Pool<AnyBackend>, name: &str) -> Vec<u8> {
    let v = pool.volume(name).unwrap();
    let mut buf = vec![0u8; v.size() as usize];
    v.read(0, &mut buf).await.unwrap();
    buf
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backups_are_incremental_deduplicated_independent_and_verified() {
    let (dir, pool) = temp_pool("keel-images-", 256 * MIB).await;
    let lib = Library::open(&dir.path().join("lib")).unwrap();
    let size = 32 * MIB;
    let v = pool.create_volume("v", size).await.unwrap();
    // Data in chunks 0, 3 and 7 (7 half written), zeros written in chunk 5,
    // the rest never written.
    v.write(0, &pseudo_random(1, MIB as usize), false).await.unwrap();
    v.write(3 * MIB, &pseudo_random(2, MIB as usize), false).await.unwrap();
    v.write(7 * MIB, &pseudo_random(3, (MIB / 2) as usize), false).await.unwrap();
    v.write(5 * MIB, &vec![0u8; MIB as usize], false).await.unwrap();
    pool.snapshot("v", "s1").await.unwrap();
    let s1 = pool.volume("v@s1").unwrap();

    let progress = |_: u64| {};
    let disks = vec![BackupDisk { id: "disk0".into(), source: &s1, base: None }];
    let (a1, st) = lib.backup(head("a1"), disks, &progress).await.unwrap();
    assert_eq!(st.logical_bytes, size);
    assert_eq!(st.new_chunks, 3, "{st:?}");
    assert!(st.read_bytes <= 5 * MIB, "unwritten chunks are not read: {st:?}");
    let m1 = &a1.disks[0];
    assert_eq!(m1.chunks.len(), (size / CHUNK_SIZE) as usize);
    assert!(m1.chunks[5].is_empty() && m1.chunks[1].is_empty());
    assert!(!m1.chunks[7].is_empty());
    assert_eq!(lib.get("a1").unwrap(), a1);

    // Change one chunk, back up again from the change list.
    v.write(3 * MIB + 4096, &pseudo_random(4, 8192), false).await.unwrap();
    pool.snapshot("v", "s2").await.unwrap();
    let s2 = pool.volume("v@s2").unwrap();
    let changed = pool.changed_ranges("v@s1", "v@s2").await.unwrap();
    let disks = vec![BackupDisk { id: "disk0".into(), source: &s2, base: Some((m1.clone(), changed)) }];
    let (a2, st) = lib.backup(head("a2"), disks, &progress).await.unwrap();
    assert_eq!(st.read_bytes, MIB, "only the changed chunk is read: {st:?}");
    assert_eq!((st.new_chunks, st.dedup_chunks), (1, 0), "{st:?}");
    assert_eq!(a2.disks[0].chunks[0], m1.chunks[0]);
    assert_ne!(a2.disks[0].chunks[3], m1.chunks[3]);

    // The same data backed up in full again: nothing new is stored.
    pool.clone_snapshot("v@s2", "twin").await.unwrap();
    pool.snapshot("twin", "t").await.unwrap();
    let t = pool.volume("twin@t").unwrap();
    let before = lib.stored_bytes().unwrap();
    let disks = vec![BackupDisk { id: "disk0".into(), source: &t, base: None }];
    let (_, st) = lib.backup(head("a3"), disks, &progress).await.unwrap();
    assert_eq!((st.new_chunks, st.new_bytes), (0, 0), "{st:?}");
    assert_eq!(lib.stored_bytes().unwrap(), before);
    let usage = lib.usage().unwrap();
    assert_eq!(usage["a3"].unique_bytes, 0, "a3 shares everything with a2");
    assert!(usage["a1"].unique_bytes > 0, "a1 alone holds the old chunk 3");

    // A name is taken once.
    let disks = vec![BackupDisk { id: "disk0".into(), source: &t, base: None }];
    assert!(matches!(lib.backup(head("a1"), disks, &progress).await, Err(keel_images::library::Error::Exists(_))));

    // Restores give back each point in time.
    for (app, snap) in [("a1", "v@s1"), ("a2", "v@s2")] {
        let name = format!("r-{app}");
        let r = pool.create_volume(&name, size).await.unwrap();
        lib.restore_disk(&lib.get(app).unwrap().disks[0], &r, true, &progress).await.unwrap();
        assert!(read_all(&pool, &name).await == read_all(&pool, snap).await, "{app} restores {snap}");
    }
    // Restoring over a used volume zeroes what the backup has as zeros.
    let over = pool.volume("r-a2").unwrap();
    over.write(MIB, &pseudo_random(9, 4096), false).await.unwrap();
    lib.restore_disk(&a1.disks[0], &over, false, &progress).await.unwrap();
    assert!(read_all(&pool, "r-a2").await == read_all(&pool, "v@s1").await);

    // Deleting the older backup leaves the newer whole; its own chunk goes.
    let gc = lib.delete("a1").await.unwrap();
    assert_eq!(gc.chunks, 1, "{gc:?}");
    assert!(lib.verify(None).await.unwrap().is_empty());
    let r = pool.create_volume("r2", size).await.unwrap();
    lib.restore_disk(&a2.disks[0], &r, true, &progress).await.unwrap();
    assert!(read_all(&pool, "r2").await == read_all(&pool, "v@s2").await);

    // A damaged chunk: verify names it and who holds it; restore refuses.
    let victim = a2.disks[0].chunks[0].clone();
    let path = lib.dir().join("chunks").join(&victim[..2]).join(&victim);
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();
    let damage = lib.verify(Some("a2")).await.unwrap();
    assert_eq!(damage.len(), 1, "{damage:?}");
    assert_eq!(damage[0].hash, victim);
    assert_eq!(damage[0].appliances, ["a2"]);
    let r = pool.create_volume("r3", size).await.unwrap();
    let e = lib.restore_disk(&a2.disks[0], &r, true, &progress).await.unwrap_err();
    assert!(matches!(e, keel_images::library::Error::Corrupt { .. }), "{e}");
    std::fs::remove_file(&path).unwrap();
    let damage = lib.verify(None).await.unwrap();
    assert_eq!(damage.len(), 1);
    assert_eq!(damage[0].detail, "missing");
    assert_eq!(damage[0].appliances, ["a2", "a3"]);
    pool.close().await.unwrap();
}

/// A name that is not a plain file name never reaches the file system: a
/// JSON file outside the library is neither read, nor reported, nor deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_that_leave_the_library_are_refused() {
    let (dir, pool) = temp_pool("keel-images-", 64 * MIB).await;
    let lib = Library::open(&dir.path().join("lib")).unwrap();
    // A descriptor-shaped file beside the library, where `../../evil` from
    // `lib/appliances/` would land.
    let evil = dir.path().join("evil.json");
    std::fs::write(&evil, serde_json::to_vec(&head("evil")).unwrap()).unwrap();
    let v = pool.create_volume("v", 4 * MIB).await.unwrap();
    drop(v);
    pool.snapshot("v", "s").await.unwrap();
    let s = pool.volume("v@s").unwrap();
    for bad in ["../../evil", "../evil", "/etc/passwd", "a/b", ".hidden", "a\0b", "a\nb", "", "A"] {
        assert!(matches!(lib.get(bad), Err(keel_images::library::Error::BadName(_))), "get {bad:?}");
        assert!(!lib.exists(bad), "exists {bad:?}");
        assert!(matches!(lib.delete(bad).await, Err(keel_images::library::Error::BadName(_))), "delete {bad:?}");
        let disks = vec![BackupDisk { id: "disk0".into(), source: &s, base: None }];
        assert!(lib.backup(head(bad), disks, &|_| {}).await.is_err(), "backup {bad:?}");
    }
    assert!(evil.exists(), "the file outside the library is untouched");
    assert!(lib.list().unwrap().is_empty());
}
