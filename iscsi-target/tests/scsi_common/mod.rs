//! Helpers shared by the SCSI layer scenario tests: a logical unit over a
//! volume in a memory pool, nexuses, and CDB builders.
#![allow(dead_code)]

use std::sync::Arc;

use keel_blockstore::backend::MemBackend;
use keel_blockstore::{Pool, PoolOptions, Volume};
use keel_iscsi_target::scsi::{Command, LogicalUnit, LuIdentity, Nexus, Response};

pub const MIB: u64 = 1 << 20;

pub type Lu = LogicalUnit<Volume<MemBackend>>;

pub fn identity() -> LuIdentity {
    LuIdentity {
        name: "v".into(),
        serial: "keel-v-0001".into(),
        naa: 0x6001_4050_0000_1234,
        target_name: "iqn.2026-01.io.keel:v".into(),
    }
}

/// A pool and a fresh `size`-byte volume served as an LU.
pub async fn lu(size: u64) -> (Pool<MemBackend>, Lu) {
    lu_in_pool(size, size + 64 * MIB).await
}

/// An LU over a `size`-byte volume in a pool of `pool_bytes`.
pub async fn lu_in_pool(size: u64, pool_bytes: u64) -> (Pool<MemBackend>, Lu) {
    let pool = Pool::create(MemBackend::new(pool_bytes), PoolOptions::default()).await.unwrap();
    let v = pool.create_volume("v", size).await.unwrap();
    (pool, LogicalUnit::new(Arc::new(v), identity()))
}

/// An LU over a read-only snapshot of a volume.
pub async fn read_only_lu(size: u64) -> (Pool<MemBackend>, Lu) {
    let pool = Pool::create(MemBackend::new(size + 64 * MIB), PoolOptions::default()).await.unwrap();
    pool.create_volume("v", size).await.unwrap();
    let s = pool.snapshot("v", "s").await.unwrap();
    (pool, LogicalUnit::new(Arc::new(s), identity()))
}

pub fn nexus(id: u64, initiator: &str) -> Nexus {
    Nexus {
        id,
        initiator_name: initiator.into(),
        isid: [0x80, 0, 0, 0, 0, id as u8],
        target_port_name: "iqn.2026-01.io.keel:v,t,0x0001".into(),
        rel_port_id: 1,
    }
}

pub async fn exec(lu: &Lu, n: &Nexus, cdb: &[u8], data_out: &[u8]) -> Response {
    lu.execute(n, Command { cdb, data_out, lun: 0 }).await
}

/// Sense key, ASC, ASCQ of a CHECK CONDITION (either format).
pub fn sense(r: &Response) -> (u8, u8, u8) {
    assert_eq!(r.status, 2, "expected CHECK CONDITION, got {r:?}");
    match r.sense[0] & 0x7F {
        0x70 => (r.sense[2] & 0xF, r.sense[12], r.sense[13]),
        0x72 => (r.sense[1] & 0xF, r.sense[2], r.sense[3]),
        f => panic!("bad sense format {f:#x}"),
    }
}

pub fn assert_good(r: &Response) {
    assert_eq!(r.status, 0, "expected GOOD, got {r:?}");
}

pub fn read10(lba: u32, blocks: u16) -> Vec<u8> {
    let mut c = vec![0x28, 0];
    c.extend_from_slice(&lba.to_be_bytes());
    c.push(0);
    c.extend_from_slice(&blocks.to_be_bytes());
    c.push(0);
    c
}

pub fn write10(lba: u32, blocks: u16) -> Vec<u8> {
    let mut c = read10(lba, blocks);
    c[0] = 0x2A;
    c
}

pub fn read16(lba: u64, blocks: u32) -> Vec<u8> {
    let mut c = vec![0x88, 0];
    c.extend_from_slice(&lba.to_be_bytes());
    c.extend_from_slice(&blocks.to_be_bytes());
    c.extend_from_slice(&[0, 0]);
    c
}

pub fn write16(lba: u64, blocks: u32) -> Vec<u8> {
    let mut c = read16(lba, blocks);
    c[0] = 0x8A;
    c
}

/// A block of bytes derived from a seed.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    keel_tests::data::pseudo_random(seed, len)
}

/// PERSISTENT RESERVE OUT with a 24-byte parameter list.
pub async fn prout(lu: &Lu, n: &Nexus, action: u8, rtype: u8, key: u64, sa_key: u64) -> Response {
    let cdb = [0x5F, action, rtype, 0, 0, 0, 0, 0, 24, 0];
    let mut p = vec![0u8; 24];
    p[0..8].copy_from_slice(&key.to_be_bytes());
    p[8..16].copy_from_slice(&sa_key.to_be_bytes());
    exec(lu, n, &cdb, &p).await
}

/// TEST UNIT READY until GOOD (clears unit attentions).
pub async fn clear_ua(lu: &Lu, n: &Nexus) {
    for _ in 0..16 {
        if exec(lu, n, &[0; 6], &[]).await.status == 0 {
            return;
        }
    }
    panic!("unit attention did not clear");
}
