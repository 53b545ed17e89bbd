//! NBD_OPT_EXTENDED_HEADERS: 32-byte requests with 64-bit lengths, and
//! extended reply chunks (also for simple-looking replies), spoken by a raw
//! client so the wire bytes are checked exactly.

mod common;
use common::*;
use keel_nbd_server::proto::{self, chunk, cmd, info, opt, rep};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn read_exact(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut b)).await.expect("server answered").unwrap();
    b
}

fn u16b(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn u32b(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}
fn u64b(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

async fn option(s: &mut TcpStream, o: u32, data: &[u8]) {
    let mut m = proto::IHAVEOPT.to_be_bytes().to_vec();
    m.extend_from_slice(&o.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    s.write_all(&m).await.unwrap();
}

/// Read option replies until ACK; returns the (type, data) of each.
async fn replies(s: &mut TcpStream) -> Vec<(u32, Vec<u8>)> {
    let mut out = Vec::new();
    loop {
        let h = read_exact(s, 20).await;
        assert_eq!(u64b(&h), proto::OPT_REPLY_MAGIC);
        let (kind, len) = (u32b(&h[12..]), u32b(&h[16..]) as usize);
        let data = read_exact(s, len).await;
        out.push((kind, data));
        if kind == rep::ACK || kind & (1 << 31) != 0 {
            return out;
        }
    }
}

fn request(flags: u16, kind: u16, cookie: u64, offset: u64, len: u64) -> Vec<u8> {
    let mut r = proto::EXT_REQUEST_MAGIC.to_be_bytes().to_vec();
    r.extend_from_slice(&flags.to_be_bytes());
    r.extend_from_slice(&kind.to_be_bytes());
    r.extend_from_slice(&cookie.to_be_bytes());
    r.extend_from_slice(&offset.to_be_bytes());
    r.extend_from_slice(&len.to_be_bytes());
    r
}

/// One extended reply chunk: (flags, type, cookie, offset, payload).
async fn chunk(s: &mut TcpStream) -> (u16, u16, u64, u64, Vec<u8>) {
    let h = read_exact(s, 32).await;
    assert_eq!(u32b(&h), proto::EXT_REPLY_MAGIC, "an extended reply header");
    let len = u64b(&h[24..]) as usize;
    (u16b(&h[4..]), u16b(&h[6..]), u64b(&h[8..]), u64b(&h[16..]), read_exact(s, len).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extended_headers_carry_reads_writes_and_block_status() {
    let h = Harness::new(256 * MIB).await;
    let v = h.pool.create_volume("v", 8 * MIB).await.unwrap();
    v.write(MIB, &vec![0x42u8; 8192], false).await.unwrap();

    let mut s = TcpStream::connect(h.addr).await.unwrap();
    let greet = read_exact(&mut s, 18).await;
    assert_eq!(u64b(&greet), proto::NBDMAGIC);
    s.write_all(&(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES).to_be_bytes()).await.unwrap();
    option(&mut s, opt::EXTENDED_HEADERS, &[]).await;
    assert_eq!(replies(&mut s).await.last().unwrap().0, rep::ACK);
    let mut meta = 1u32.to_be_bytes().to_vec();
    meta.extend_from_slice(b"v");
    meta.extend_from_slice(&1u32.to_be_bytes());
    meta.extend_from_slice(&15u32.to_be_bytes());
    meta.extend_from_slice(b"base:allocation");
    option(&mut s, opt::SET_META_CONTEXT, &meta).await;
    let r = replies(&mut s).await;
    assert_eq!(r[0].0, rep::META_CONTEXT, "{r:?}");
    let ctx = u32b(&r[0].1);
    let mut go = 1u32.to_be_bytes().to_vec();
    go.extend_from_slice(b"v");
    go.extend_from_slice(&1u16.to_be_bytes());
    go.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
    option(&mut s, opt::GO, &go).await;
    let r = replies(&mut s).await;
    assert_eq!(r.last().unwrap().0, rep::ACK, "{r:?}");

    // A write with a 64-bit length field, then its extended NONE reply.
    let mut w = request(0, cmd::WRITE, 1, 2 * MIB, 4096);
    w.extend_from_slice(&[0x77u8; 4096]);
    s.write_all(&w).await.unwrap();
    let (flags, kind, cookie, _, payload) = chunk(&mut s).await;
    assert_eq!((flags & chunk::FLAG_DONE, kind, cookie, payload.len()), (chunk::FLAG_DONE, chunk::NONE, 1, 0));

    // A read: one OFFSET_DATA chunk (payload: offset, then data).
    s.write_all(&request(0, cmd::READ, 2, 2 * MIB, 4096)).await.unwrap();
    let (flags, kind, cookie, _, payload) = chunk(&mut s).await;
    assert_eq!((flags & chunk::FLAG_DONE, kind, cookie), (chunk::FLAG_DONE, chunk::OFFSET_DATA, 2));
    assert_eq!(u64b(&payload), 2 * MIB);
    assert!(payload[8..].iter().all(|&b| b == 0x77));

    // Block status: BLOCK_STATUS_EXT with 64-bit descriptors.
    s.write_all(&request(0, cmd::BLOCK_STATUS, 3, 0, 4 * MIB)).await.unwrap();
    let (flags, kind, cookie, _, p) = chunk(&mut s).await;
    assert_eq!((flags & chunk::FLAG_DONE, kind, cookie), (chunk::FLAG_DONE, chunk::BLOCK_STATUS_EXT, 3));
    assert_eq!(u32b(&p), ctx);
    let count = u32b(&p[4..]) as usize;
    let descs: Vec<(u64, u64)> = (0..count).map(|i| (u64b(&p[8 + 16 * i..]), u64b(&p[16 + 16 * i..]))).collect();
    let hole = (proto::STATE_HOLE | proto::STATE_ZERO) as u64;
    assert_eq!(descs, vec![(MIB, hole), (8192, 0), (MIB - 8192, hole), (4096, 0), (2 * MIB - 4096, hole)]);

    // An error is an extended ERROR chunk.
    s.write_all(&request(0, cmd::READ, 4, 8 * MIB, 4096)).await.unwrap();
    let (_, kind, cookie, _, p) = chunk(&mut s).await;
    assert_eq!((kind, cookie, u32b(&p)), (chunk::ERROR, 4, proto::errno::EINVAL));
    s.write_all(&request(0, cmd::DISC, 5, 0, 0)).await.unwrap();
}
