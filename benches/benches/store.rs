//! In-process costs of the block store's data path, on a pool held in
//! memory ([`MemBackend`]), so what is measured is the store's own work
//! (map lookups and updates, checksums, allocation, commits) without a disk.
//!
//! Run with `cargo bench -p keel-benches --bench store`.

use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use keel_blockstore::backend::MemBackend;
use keel_blockstore::{AlignedBuf, Pool, PoolOptions, Volume};
use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};
use tokio::runtime::Runtime;

const KIB4: u64 = 4096;
const MIB: u64 = 1 << 20;

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime")
}

async fn new_pool(bytes: u64) -> Pool<MemBackend> {
    Pool::create(MemBackend::new(bytes), PoolOptions::default()).await.expect("create pool")
}

/// A buffer of random bytes.
fn random_buf(len: usize, seed: u64) -> AlignedBuf {
    let mut b = AlignedBuf::new(len);
    SmallRng::seed_from_u64(seed).fill_bytes(&mut b);
    b
}

/// A volume of `size` bytes, written whole and committed.
async fn filled_volume(pool: &Pool<MemBackend>, name: &str, size: u64) -> Volume<MemBackend> {
    let vol = pool.create_volume(name, size).await.expect("create volume");
    let buf = random_buf(MIB as usize, 1);
    let mut off = 0;
    while off < size {
        let len = MIB.min(size - off) as usize;
        vol.write(off, &buf[..len], false).await.expect("prefill");
        off += len as u64;
    }
    pool.flush().await.expect("flush");
    vol
}

/// 4 KiB reads and writes: allocated data, overwrites (copy-on-write to a
/// new block every time), and first writes into never-written space.
fn small_io(c: &mut Criterion) {
    let rt = runtime();
    const VOL: u64 = 64 * MIB;
    let blocks = VOL / KIB4;
    // Room for the overwrites' copy-on-write churn between reclaims.
    let pool = rt.block_on(new_pool(256 * MIB));
    let vol = rt.block_on(filled_volume(&pool, "v", VOL));

    let mut g = c.benchmark_group("store_4k");
    g.throughput(Throughput::Bytes(KIB4));

    let mut rng = SmallRng::seed_from_u64(7);
    let mut buf = AlignedBuf::new(KIB4 as usize);
    g.bench_function("read_allocated", |b| {
        b.iter(|| {
            rt.block_on(async {
                let off = rng.gen_range(0..blocks) * KIB4;
                vol.read(off, &mut buf).await.expect("read");
            })
        })
    });

    let data = random_buf(KIB4 as usize, 2);
    g.bench_function("overwrite", |b| {
        b.iter(|| {
            rt.block_on(async {
                let off = rng.gen_range(0..blocks) * KIB4;
                vol.write(off, &data, false).await.expect("overwrite");
            })
        })
    });

    // First writes: each iteration writes a block no one has written yet,
    // in order through a fresh volume. When a volume is used up it is
    // deleted and a new one made, outside the timed part (so is the commit
    // pair that returns the deleted volume's space).
    let fw_pool = rt.block_on(new_pool(512 * MIB));
    const FW_BLOCKS: u64 = 16384; // 64 MiB per fresh volume
    let mut next_vol = 0u64;
    g.bench_function("first_write", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut total = Duration::ZERO;
                let mut left = iters;
                while left > 0 {
                    let n = left.min(FW_BLOCKS);
                    let name = format!("fw{next_vol}");
                    next_vol += 1;
                    let v = fw_pool.create_volume(&name, FW_BLOCKS * KIB4).await.expect("create volume");
                    let t = Instant::now();
                    for i in 0..n {
                        v.write(i * KIB4, &data, false).await.expect("first write");
                    }
                    total += t.elapsed();
                    drop(v);
                    fw_pool.delete_volume(&name, false).await.expect("delete volume");
                    // Two commits: one to free the blocks, one to pass the
                    // grace period so they can be reused.
                    fw_pool.flush().await.expect("flush");
                    fw_pool.flush().await.expect("flush");
                    left -= n;
                }
                total
            })
        })
    });
    g.finish();
}

/// 1 MiB sequential writes (overwriting allocated data) and reads.
fn large_io(c: &mut Criterion) {
    let rt = runtime();
    const VOL: u64 = 64 * MIB;
    let pool = rt.block_on(new_pool(384 * MIB));
    let vol = rt.block_on(filled_volume(&pool, "v", VOL));

    let mut g = c.benchmark_group("store_1m");
    g.throughput(Throughput::Bytes(MIB));

    let data = random_buf(MIB as usize, 3);
    let mut off = 0u64;
    g.bench_function("seq_write", |b| {
        b.iter(|| {
            rt.block_on(async {
                vol.write(off, &data, false).await.expect("write");
                off = (off + MIB) % VOL;
            })
        })
    });

    let mut buf = AlignedBuf::new(MIB as usize);
    let mut off = 0u64;
    g.bench_function("seq_read", |b| {
        b.iter(|| {
            rt.block_on(async {
                vol.read(off, &mut buf).await.expect("read");
                off = (off + MIB) % VOL;
            })
        })
    });
    g.finish();
}

/// Taking a snapshot costs the same whatever the volume holds: it copies
/// the root entry, not the map. Snapshots are deleted (untimed) every 50 so
/// the catalog stays small.
fn snapshot_create(c: &mut Criterion) {
    let rt = runtime();
    let mut g = c.benchmark_group("snapshot_create");
    for data_mib in [16u64, 256] {
        let pool = rt.block_on(new_pool(data_mib * MIB * 2 + 64 * MIB));
        let _vol = rt.block_on(filled_volume(&pool, "v", data_mib * MIB));
        g.bench_with_input(BenchmarkId::new("volume_data", format!("{data_mib}MiB")), &data_mib, |b, _| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    const CHUNK: u64 = 50;
                    let mut total = Duration::ZERO;
                    let mut left = iters;
                    while left > 0 {
                        let n = left.min(CHUNK);
                        let t = Instant::now();
                        for i in 0..n {
                            pool.snapshot("v", &format!("s{i}")).await.expect("snapshot");
                        }
                        total += t.elapsed();
                        for i in 0..n {
                            pool.delete_snapshot("v", &format!("s{i}")).await.expect("delete snapshot");
                        }
                        left -= n;
                    }
                    total
                })
            })
        });
    }
    g.finish();
}

/// 4 KiB random reads of a volume with no snapshots and with 100: the same
/// cost, since every device has its own (shared) tree.
fn read_with_snapshots(c: &mut Criterion) {
    let rt = runtime();
    const VOL: u64 = 64 * MIB;
    let blocks = VOL / KIB4;
    let mut g = c.benchmark_group("read_4k_snapshots");
    g.throughput(Throughput::Bytes(KIB4));
    for snaps in [0usize, 100] {
        let pool = rt.block_on(new_pool(128 * MIB));
        let vol = rt.block_on(filled_volume(&pool, "v", VOL));
        rt.block_on(async {
            for i in 0..snaps {
                pool.snapshot("v", &format!("s{i}")).await.expect("snapshot");
            }
        });
        let mut rng = SmallRng::seed_from_u64(11);
        let mut buf = AlignedBuf::new(KIB4 as usize);
        g.bench_with_input(BenchmarkId::from_parameter(snaps), &snaps, |b, _| {
            b.iter(|| {
                rt.block_on(async {
                    let off = rng.gen_range(0..blocks) * KIB4;
                    vol.read(off, &mut buf).await.expect("read");
                })
            })
        });
    }
    g.finish();
}

/// A 16 MiB copy inside a volume (what EXTENDED COPY does): shared blocks
/// (`copy_within`, aligned) against reading and writing the same bytes.
fn copy_16m(c: &mut Criterion) {
    let rt = runtime();
    const LEN: u64 = 16 * MIB;
    let pool = rt.block_on(new_pool(256 * MIB));
    let vol = rt.block_on(filled_volume(&pool, "v", 64 * MIB));
    let mut g = c.benchmark_group("copy_16m");
    g.throughput(Throughput::Bytes(LEN));
    // Alternate sources, so every copy changes every destination entry.
    let mut from = 0u64;
    g.bench_function("shared_copy_within", |b| {
        b.iter(|| {
            rt.block_on(async {
                vol.copy_within(from, 32 * MIB, LEN, false).await.expect("copy");
                from = LEN - from;
            })
        })
    });
    let mut buf = AlignedBuf::new(MIB as usize);
    g.bench_function("read_and_write", |b| {
        b.iter(|| {
            rt.block_on(async {
                for k in 0..LEN / MIB {
                    vol.read(k * MIB, &mut buf).await.expect("read");
                    vol.write(32 * MIB + k * MIB, &buf, false).await.expect("write");
                }
            })
        })
    });
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! {
    name = benches;
    config = config();
    targets = small_io, large_io, snapshot_create, read_with_snapshots, copy_16m
}
criterion_main!(benches);
