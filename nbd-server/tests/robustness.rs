//! The server against clients that misbehave, vanish, crowd it or spread
//! their I/O over several connections, driven byte by byte by the raw
//! client in `common/wire.rs`.

mod common;
#[path = "common/wire.rs"]
mod wire;

use common::*;
use keel_blockstore::{AnyBackend, Engine, Pool, PoolOptions};
use keel_nbd_server::proto::{self, cflag, chunk, cmd, errno, info, opt, rep, tflag};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use wire::*;

/// qemu-io reads a block through the server (a real client still works).
async fn qemu_io_reads(h: &Harness, export: &str) {
    let out = within("qemu-io", run("qemu-io", &["-r", "-f", "raw", "-c", "read 0 64k", &h.url(export)])).await;
    assert!(text(&out).contains("read 65536/65536 bytes"), "{}", text(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_handshakes_are_dropped_and_the_server_keeps_serving() {
    let h = Harness::new(256 * MIB).await;
    h.pool.create_volume("v", 16 * MIB).await.unwrap();

    // Client flags without NBD_FLAG_C_FIXED_NEWSTYLE.
    let mut w = Wire::connect(h.addr).await;
    w.send(&0u32.to_be_bytes()).await;
    assert!(w.closed().await.is_empty());

    // An option with the wrong magic.
    let mut w = Wire::start(h.addr).await;
    let mut b = b"IHAVEOPX".to_vec();
    b.extend_from_slice(&opt::LIST.to_be_bytes());
    b.extend_from_slice(&0u32.to_be_bytes());
    w.send(&b).await;
    assert!(w.closed().await.is_empty());

    // An option claiming more than 64 KiB of data (only the header is sent:
    // the server must not wait for the payload).
    let mut w = Wire::start(h.addr).await;
    let mut b = proto::IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&opt::GO.to_be_bytes());
    b.extend_from_slice(&(proto::MAX_OPTION_LEN + 1).to_be_bytes());
    w.send(&b).await;
    assert!(w.closed().await.is_empty());
    // ... while exactly 64 KiB is still a legal (if unknown) option.
    let mut w = Wire::start(h.addr).await;
    let r = w.option(99, &vec![7u8; proto::MAX_OPTION_LEN as usize]).await;
    assert_eq!(r[0].kind, rep::ERR_UNSUP, "{r:?}");
    drop(w);

    // Garbage instead of a client: text, and all-ones bytes (whose first
    // four bytes even set the fixed-newstyle flag).
    for garbage in [b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n".to_vec(), vec![0xff; 100]] {
        let mut w = Wire::connect(h.addr).await;
        w.send(&garbage).await;
        let _ = w.closed().await;
    }

    // NBD_OPT_EXPORT_NAME for an export that does not exist: no way to
    // answer with an error, so the server closes.
    let mut w = Wire::start(h.addr).await;
    w.send_option(opt::EXPORT_NAME, b"nope").await;
    assert!(w.closed().await.is_empty());

    // Clients that go away at awkward points.
    drop(Wire::connect(h.addr).await);
    let mut w = Wire::start(h.addr).await;
    w.send(&proto::IHAVEOPT.to_be_bytes()[..5]).await;
    drop(w);
    let mut w = Wire::start(h.addr).await;
    let mut b = proto::IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&opt::GO.to_be_bytes());
    b.extend_from_slice(&100u32.to_be_bytes());
    b.extend_from_slice(&[0; 10]);
    w.send(&b).await;
    drop(w);

    // Through all that the server kept serving.
    assert_serving(h.addr, "v", 0).await;
    qemu_io_reads(&h, "v").await;
}

/// proto.md, "Client flags": "Clients MUST NOT set any other flags; the
/// server MUST drop the TCP connection if the client sets an unknown flag".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_client_flags_drop_the_connection() {
    let h = Harness::new(256 * MIB).await;
    h.pool.create_volume("v", 16 * MIB).await.unwrap();
    let mut w = Wire::connect(h.addr).await;
    let flags = proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES | 1 << 5;
    w.send(&flags.to_be_bytes()).await;
    // If the server went on negotiating, it answers this LIST.
    let mut b = proto::IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&opt::LIST.to_be_bytes());
    b.extend_from_slice(&0u32.to_be_bytes());
    let _ = w.try_send(&b).await;
    let mut buf = [0u8; 512];
    let answered = within("the server closing the connection", w.s.read(&mut buf)).await.unwrap_or(0);
    assert_eq!(
        answered, 0,
        "the server accepted client flags {flags:#x} (bit 5 is unknown) and answered NBD_OPT_LIST instead of closing"
    );
    assert_serving(h.addr, "v", 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_and_malformed_options_are_refused_and_negotiation_goes_on() {
    let h = Harness::new(256 * MIB).await;
    h.pool.create_volume("v", 16 * MIB).await.unwrap();
    let mut w = Wire::start(h.addr).await;
    let r = w.option(99, b"whatever").await;
    assert_eq!(r.len(), 1);
    assert_eq!((r[0].option, r[0].kind), (99, rep::ERR_UNSUP), "{r:?}");
    assert!(r[0].text().contains("99"), "{}", r[0].text());
    let r = w.option(99, &[]).await;
    assert_eq!(r[0].kind, rep::ERR_UNSUP);
    // Known options with bad data are ERR_INVALID.
    assert_eq!(w.option(opt::LIST, b"x").await[0].kind, rep::ERR_INVALID);
    assert_eq!(w.option(opt::STRUCTURED_REPLY, b"x").await[0].kind, rep::ERR_INVALID);
    assert_eq!(w.option(opt::GO, &[0, 0, 0, 9, b'v']).await[0].kind, rep::ERR_INVALID);
    assert_eq!(w.option(opt::INFO, &[0, 0]).await[0].kind, rep::ERR_INVALID);
    // SET_META_CONTEXT before STRUCTURED_REPLY.
    let mut p = 1u32.to_be_bytes().to_vec();
    p.push(b'v');
    p.extend_from_slice(&0u32.to_be_bytes());
    assert_eq!(w.option(opt::SET_META_CONTEXT, &p).await[0].kind, rep::ERR_INVALID);
    // And then GO works and so does I/O.
    let e = w.go("v", &[]).await.unwrap();
    assert_eq!(e.size, 16 * MIB);
    let d = pattern(3, 8192);
    w.write_ok(4096, &d, 0).await;
    assert!(w.read_ok(4096, 8192).await == d);
    w.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_exports_listing_info_and_abort() {
    let h = Harness::new(256 * MIB).await;
    h.pool.create_volume("v", 16 * MIB).await.unwrap();
    h.pool.create_volume("w", 8 * MIB).await.unwrap();
    h.pool.snapshot("v", "s").await.unwrap();

    let mut w = Wire::start(h.addr).await;
    let e = w.info("nope", &[]).await.unwrap_err();
    assert_eq!((e.option, e.kind), (opt::INFO, rep::ERR_UNKNOWN), "{e:?}");
    let e = w.go("nope", &[info::BLOCK_SIZE]).await.unwrap_err();
    assert_eq!((e.option, e.kind), (opt::GO, rep::ERR_UNKNOWN), "{e:?}");
    assert!(e.text().contains("nope"), "{}", e.text());
    let e = w.go("", &[]).await.unwrap_err();
    assert_eq!(e.kind, rep::ERR_UNKNOWN);

    let mut names = w.list().await.unwrap();
    names.sort();
    assert_eq!(names, ["v", "v@s", "w"]);

    let e = w.info("v", &[info::BLOCK_SIZE, info::NAME, info::DESCRIPTION]).await.unwrap();
    assert_eq!(e.size, 16 * MIB);
    assert!(e.flags & tflag::HAS_FLAGS != 0 && e.flags & tflag::READ_ONLY == 0, "{:#x}", e.flags);
    for f in [tflag::SEND_FLUSH, tflag::SEND_FUA, tflag::SEND_TRIM, tflag::SEND_WRITE_ZEROES, tflag::CAN_MULTI_CONN] {
        assert!(e.flags & f != 0, "flag {f:#x} missing from {:#x}", e.flags);
    }
    assert!(e.flags & tflag::SEND_DF == 0, "DF without structured replies");
    assert_eq!(e.block_size, Some((512, 4096, 32 << 20)));
    assert_eq!(e.name.as_deref(), Some("v"));
    assert!(e.description.is_some());
    let e = w.info("v@s", &[]).await.unwrap();
    assert_eq!(e.size, 16 * MIB);
    assert!(e.flags & tflag::READ_ONLY != 0, "snapshots are read-only: {:#x}", e.flags);
    // INFO does not end negotiation.
    let e = w.info("w", &[]).await.unwrap();
    assert_eq!(e.size, 8 * MIB);

    // ABORT: an ACK, then the server closes.
    let r = w.option(opt::ABORT, &[]).await;
    assert_eq!((r[0].option, r[0].kind, r[0].data.len()), (opt::ABORT, rep::ACK, 0));
    assert!(w.closed().await.is_empty());

    // ABORT as the very first option works too.
    let mut w = Wire::start(h.addr).await;
    assert_eq!(w.option(opt::ABORT, &[]).await[0].kind, rep::ACK);
    assert!(w.closed().await.is_empty());

    // Old-style NBD_OPT_EXPORT_NAME for a real export.
    let mut w = Wire::start(h.addr).await;
    w.send_option(opt::EXPORT_NAME, b"w").await;
    let r = w.read_exact(10).await; // NO_ZEROES was negotiated
    assert_eq!(u64::from_be_bytes(r[..8].try_into().unwrap()), 8 * MIB);
    assert!(w.read_ok(0, 512).await.iter().all(|&b| b == 0));
    w.disconnect().await;
    // ... and without NO_ZEROES, the 124 zero bytes follow.
    let mut w = Wire::connect(h.addr).await;
    w.send(&proto::FLAG_C_FIXED_NEWSTYLE.to_be_bytes()).await;
    w.send_option(opt::EXPORT_NAME, b"w").await;
    let r = w.read_exact(10 + 124).await;
    assert!(r[10..].iter().all(|&b| b == 0));
    assert!(w.read_ok(4096, 512).await.iter().all(|&b| b == 0));
    w.disconnect().await;
}

/// Errors in the transmission phase; each leaves the connection in sync.
async fn transmission_errors(structured: bool) {
    let h = Harness::new(256 * MIB).await;
    let size = 64 * MIB;
    h.pool.create_volume("v", size).await.unwrap();
    let (mut w, e) = Wire::open(h.addr, "v", structured).await;
    assert_eq!(e.size, size);
    assert_eq!(e.flags & tflag::SEND_DF != 0, structured, "DF iff structured: {:#x}", e.flags);
    let good = pattern(1, 65536);
    w.write_ok(0, &good, 0).await;
    let expect = |r: &Reply, e: u32, what: &str| {
        assert_eq!(r.error, e, "{what}: {r:?}");
        assert!(r.data.is_empty() || !r.simple, "{what}: data with an error");
        if structured {
            // proto.md: errors SHOULD come as structured error chunks
            // (and for reads MUST NOT be simple replies).
            assert!(!r.simple && !r.message.is_empty(), "{what}: {r:?}");
        } else {
            assert!(r.simple, "{what}");
        }
    };
    let in_sync = async |w: &mut Wire<tokio::net::TcpStream>| {
        assert!(w.read_ok(0, 65536).await == good, "connection out of sync");
    };

    // Reads beyond the end.
    expect(&w.read(size, 4096).await, errno::EINVAL, "read at the end");
    expect(&w.read(size - 512, 1024).await, errno::EINVAL, "read across the end");
    expect(&w.read(u64::MAX - 511, 1024).await, errno::EINVAL, "read with offset+len overflowing");
    in_sync(&mut w).await;
    // Writes beyond the end: ENOSPC, and the payload is consumed.
    expect(&w.write(size, &pattern(2, 4096), 0).await, errno::ENOSPC, "write at the end");
    expect(&w.write(size - 512, &pattern(2, 1024), 0).await, errno::ENOSPC, "write across the end");
    expect(&w.write(u64::MAX - 511, &pattern(2, 1024), 0).await, errno::ENOSPC, "write overflowing");
    in_sync(&mut w).await;
    // Unaligned requests.
    expect(&w.read(100, 512).await, errno::EINVAL, "unaligned read offset");
    expect(&w.read(0, 100).await, errno::EINVAL, "unaligned read length");
    expect(&w.write(512 + 1, &pattern(3, 512), 0).await, errno::EINVAL, "unaligned write offset");
    expect(&w.write(0, &pattern(3, 1000), 0).await, errno::EINVAL, "unaligned write length");
    expect(&w.request(cmd::TRIM, 0, 7, 4096, &[]).await, errno::EINVAL, "unaligned trim");
    expect(&w.request(cmd::WRITE_ZEROES, 0, 4096, 77, &[]).await, errno::EINVAL, "unaligned write zeroes");
    in_sync(&mut w).await;
    // An unknown command (with a length, which must not be taken as a
    // payload).
    expect(&w.request(99, 0, 0, 4096, &[]).await, errno::EINVAL, "unknown command");
    in_sync(&mut w).await;
    // Block status without a meta context.
    expect(&w.request(cmd::BLOCK_STATUS, 0, 0, 65536, &[]).await, errno::EINVAL, "block status without context");
    in_sync(&mut w).await;
    // A read over the 32 MiB maximum is refused (EOVERFLOW); exactly the
    // maximum is fine.
    let r = w.read(0, (32 << 20) + 512).await;
    // (proto.md prefers EINVAL here and reserves EOVERFLOW for DF reads;
    // either way it is an error and the stream stays in sync.)
    assert!(r.error == errno::EOVERFLOW || r.error == errno::EINVAL, "{r:?}");
    let r = w.read(0, 32 << 20).await;
    assert_eq!(r.error, 0);
    assert!(r.data[..65536] == good[..] && r.data[65536..].iter().all(|&b| b == 0));
    // A write of exactly the maximum payload is accepted.
    let big = pattern(4, 32 << 20);
    w.write_ok(16 * MIB, &big, 0).await;
    assert!(w.read_ok(16 * MIB, 32 << 20).await == big);
    // Zero-length requests get an answer (whatever it is) and keep the
    // stream in sync.
    let _ = w.request(cmd::WRITE, 0, 0, 0, &[]).await;
    let _ = w.read(0, 0).await;
    let _ = w.request(cmd::TRIM, 0, 0, 0, &[]).await;
    in_sync(&mut w).await;
    // The normal commands, with FUA where it applies.
    w.write_ok(MIB, &pattern(5, 4096), cflag::FUA).await;
    assert_eq!(w.flush().await.error, 0);
    assert_eq!(w.request(cmd::TRIM, cflag::FUA, MIB, 4096, &[]).await.error, 0);
    assert_eq!(w.request(cmd::WRITE_ZEROES, cflag::FUA, 2 * MIB, 65536, &[]).await.error, 0);
    assert_eq!(w.request(cmd::WRITE_ZEROES, cflag::NO_HOLE, 3 * MIB, 8192, &[]).await.error, 0);
    assert_eq!(w.request(cmd::CACHE, 0, 0, 65536, &[]).await.error, 0);
    assert!(w.read_ok(MIB, 4096).await.iter().all(|&b| b == 0));
    in_sync(&mut w).await;

    if structured {
        // A sparse read: data then a hole, reassembled exactly.
        let r = w.read(0, 256 * 1024).await;
        assert_eq!(r.error, 0);
        assert!(r.chunks.contains(&chunk::OFFSET_HOLE), "no hole chunk in {:?}", r.chunks);
        assert!(r.data[..65536] == good[..] && r.data[65536..].iter().all(|&b| b == 0));
        // With DF: one data chunk.
        let r = w.request(cmd::READ, cflag::DF, 0, 256 * 1024, &[]).await;
        assert_eq!(r.chunks, [chunk::OFFSET_DATA], "DF read must be one chunk");
        assert!(r.data[..65536] == good[..] && r.data[65536..].iter().all(|&b| b == 0));
    }
    w.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transmission_errors_with_simple_replies() {
    transmission_errors(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transmission_errors_with_structured_replies() {
    transmission_errors(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_write_header_closes_only_that_connection() {
    let h = Harness::new(256 * MIB).await;
    h.pool.create_volume("v", 64 * MIB).await.unwrap();
    for structured in [false, true] {
        let (mut other, _) = Wire::open(h.addr, "v", structured).await;
        let d = pattern(9, 4096);
        other.write_ok(0, &d, 0).await;

        let (mut w, _) = Wire::open(h.addr, "v", structured).await;
        w.write_ok(4096, &d, 0).await;
        // A write header claiming 32 MiB + 4 KiB, and some of "its" payload.
        let mut b = Wire::<tokio::net::TcpStream>::request_header(0, cmd::WRITE, 77, 0, (32 << 20) + 4096);
        b.extend_from_slice(&[0xee; 4096]);
        let _ = w.try_send(&b).await;
        let rest = w.closed().await;
        assert!(rest.is_empty(), "the server answered an unparseable request: {rest:?}");
        // Nothing of it reached the volume, and the other connection works.
        assert!(other.read_ok(0, 4096).await == d);
        assert!(other.read_ok(4096, 4096).await == d);
        other.write_ok(8192, &d, 0).await;
        other.disconnect().await;
    }
    // A request with a bad magic also closes the connection.
    let (mut w, _) = Wire::open(h.addr, "v", false).await;
    let mut b = Wire::<tokio::net::TcpStream>::request_header(0, cmd::READ, 1, 0, 512);
    b[0] ^= 0x80;
    w.send(&b).await;
    assert!(w.closed().await.is_empty());
    assert_serving(h.addr, "v", 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_exports_refuse_writes_with_eperm() {
    let h = Harness::new(256 * MIB).await;
    let v = h.pool.create_volume("v", 16 * MIB).await.unwrap();
    let d = pattern(6, 65536);
    v.write(0, &d, false).await.unwrap();
    h.pool.snapshot("v", "s").await.unwrap();
    for structured in [false, true] {
        let (mut w, e) = Wire::open(h.addr, "v@s", structured).await;
        assert!(e.flags & tflag::READ_ONLY != 0);
        for (what, r) in [
            ("write", w.write(0, &pattern(7, 4096), 0).await),
            ("fua write", w.write(0, &pattern(7, 4096), cflag::FUA).await),
            ("trim", w.request(cmd::TRIM, 0, 0, 4096, &[]).await),
            ("write zeroes", w.request(cmd::WRITE_ZEROES, 0, 0, 4096, &[]).await),
        ] {
            assert_eq!(r.error, errno::EPERM, "{what}: {r:?}");
        }
        assert!(w.read_ok(0, 65536).await == d);
        assert_eq!(w.flush().await.error, 0);
        w.disconnect().await;
    }
    // The volume itself is untouched and writable.
    assert_serving(h.addr, "v", 4 * MIB).await;
    let mut b = vec![0u8; 65536];
    h.pool.volume("v@s").unwrap().read(0, &mut b).await.unwrap();
    assert!(b == d);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_status_needs_a_meta_context_for_the_chosen_export() {
    let h = Harness::new(256 * MIB).await;
    let v = h.pool.create_volume("v", 16 * MIB).await.unwrap();
    h.pool.create_volume("other", 16 * MIB).await.unwrap();
    v.write(0, &pattern(1, 65536), false).await.unwrap();

    // Simple replies: no way to have a context at all.
    let (mut w, _) = Wire::open(h.addr, "v", false).await;
    let r = w.request(cmd::BLOCK_STATUS, 0, 0, MIB as u32, &[]).await;
    assert_eq!(r.error, errno::EINVAL, "{r:?}");
    w.disconnect().await;

    // A context chosen for another export does not carry over to "v".
    let mut w = Wire::start(h.addr).await;
    w.structured_reply().await;
    let c = w.set_meta("other", &["base:allocation"]).await.unwrap();
    assert_eq!(c.len(), 1);
    w.go("v", &[]).await.unwrap();
    let r = w.request(cmd::BLOCK_STATUS, 0, 0, MIB as u32, &[]).await;
    assert_eq!(r.error, errno::EINVAL, "{r:?}");
    w.disconnect().await;

    // With base:allocation on "v" it answers.
    let mut w = Wire::start(h.addr).await;
    w.structured_reply().await;
    let c = w.set_meta("v", &["base:allocation"]).await.unwrap();
    assert_eq!(c, [(1, "base:allocation".to_string())]);
    w.go("v", &[]).await.unwrap();
    let r = w.request(cmd::BLOCK_STATUS, 0, 0, MIB as u32, &[]).await;
    assert_eq!(r.error, 0, "{r:?}");
    assert_eq!(r.status.len(), 1);
    let (id, d) = &r.status[0];
    assert_eq!(*id, 1);
    assert_eq!(d[0], (65536, 0), "{d:?}");
    assert!(d[1..].iter().all(|&(_, f)| f == proto::STATE_HOLE | proto::STATE_ZERO), "{d:?}");
    assert_eq!(d.iter().map(|&(l, _)| l as u64).sum::<u64>(), MIB);
    // Out of range is still an error.
    let r = w.request(cmd::BLOCK_STATUS, 0, 16 * MIB, 4096, &[]).await;
    assert_eq!(r.error, errno::EINVAL, "{r:?}");
    w.disconnect().await;
}

/// The payload of LIST_META_CONTEXT / SET_META_CONTEXT.
fn meta_payload(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut p = (export.len() as u32).to_be_bytes().to_vec();
    p.extend_from_slice(export.as_bytes());
    p.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        p.extend_from_slice(&(q.len() as u32).to_be_bytes());
        p.extend_from_slice(q.as_bytes());
    }
    p
}

/// The context names of a LIST_META_CONTEXT answer (which must end in ACK).
fn context_names(r: &[wire::OptReply]) -> Vec<String> {
    assert_eq!(r.last().unwrap().kind, rep::ACK, "{r:?}");
    let mut v: Vec<String> = r[..r.len() - 1]
        .iter()
        .map(|x| {
            assert_eq!(x.kind, rep::META_CONTEXT, "{x:?}");
            String::from_utf8(x.data[4..].to_vec()).unwrap()
        })
        .collect();
    v.sort();
    v
}

/// proto.md, NBD_OPT_LIST_META_CONTEXT: "If zero queries are sent, then
/// the server MUST return all the metadata contexts that are available to
/// the client to select on the given export." (nbdinfo shows the empty
/// answer as an empty "contexts:" list.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_meta_context_without_queries_lists_every_context() {
    let h = Harness::new(256 * MIB).await;
    h.pool.create_volume("v", 16 * MIB).await.unwrap();
    h.pool.snapshot("v", "s").await.unwrap();
    let mut w = Wire::start(h.addr).await;
    w.structured_reply().await;
    let all = ["base:allocation".to_string(), "qemu:dirty-bitmap:s".to_string()];
    let r = w.option(opt::LIST_META_CONTEXT, &meta_payload("v", &[])).await;
    assert_eq!(context_names(&r), all, "LIST_META_CONTEXT with no queries");
    // The wildcards the server documents for listing (connection.rs,
    // match_contexts: "Prefix queries ... match everything, but only when
    // listing").
    let r = w.option(opt::LIST_META_CONTEXT, &meta_payload("v", &["base:"])).await;
    assert_eq!(context_names(&r), all[..1], "LIST_META_CONTEXT base:");
    let r = w.option(opt::LIST_META_CONTEXT, &meta_payload("v", &["qemu:dirty-bitmap:"])).await;
    assert_eq!(context_names(&r), all[1..], "LIST_META_CONTEXT qemu:dirty-bitmap:");
    // Exact names list themselves.
    let r = w.option(opt::LIST_META_CONTEXT, &meta_payload("v", &["base:allocation", "qemu:dirty-bitmap:s"])).await;
    assert_eq!(context_names(&r), all);
}

/// proto.md, NBD_OPT_SET_META_CONTEXT: "If zero queries are sent, the
/// server MUST select no metadata contexts." (And wildcards are for
/// listing only, by the server's own rule.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_meta_context_without_queries_selects_nothing() {
    let h = Harness::new(256 * MIB).await;
    h.pool.create_volume("v", 16 * MIB).await.unwrap();
    h.pool.snapshot("v", "s").await.unwrap();
    for queries in [&[][..], &["base:"][..], &["qemu:dirty-bitmap:"][..]] {
        let mut w = Wire::start(h.addr).await;
        w.structured_reply().await;
        let c = w.set_meta("v", queries).await.unwrap();
        assert!(c.is_empty(), "SET_META_CONTEXT {queries:?} selected {c:?}");
        w.go("v", &[]).await.unwrap();
        let r = w.request(cmd::BLOCK_STATUS, 0, 0, 65536, &[]).await;
        assert_eq!(r.error, errno::EINVAL, "block status after selecting nothing: {r:?}");
        w.disconnect().await;
    }
}

/// proto.md, NBD_OPT_SET_META_CONTEXT: "Issuing this command replaces all
/// previously-set metadata contexts (including when this command fails)".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_set_meta_context_clears_the_selection() {
    let h = Harness::new(256 * MIB).await;
    h.pool.create_volume("v", 16 * MIB).await.unwrap();
    let mut w = Wire::start(h.addr).await;
    w.structured_reply().await;
    assert_eq!(w.set_meta("v", &["base:allocation"]).await.unwrap().len(), 1);
    let e = w.set_meta("nope", &["base:allocation"]).await.unwrap_err();
    assert_eq!(e.kind, rep::ERR_UNKNOWN);
    w.go("v", &[]).await.unwrap();
    let r = w.request(cmd::BLOCK_STATUS, 0, 0, 65536, &[]).await;
    assert_eq!(r.error, errno::EINVAL, "the context chosen before the failed SET_META_CONTEXT survived: {r:?}");
    w.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_vanishing_mid_write_loses_nothing_acknowledged() {
    let h = Harness::new(256 * MIB).await;
    h.pool.create_volume("v", 64 * MIB).await.unwrap();
    let flushed = pattern(11, 65536);
    let (mut w, _) = Wire::open(h.addr, "v", false).await;
    w.write_ok(0, &flushed, 0).await;
    assert_eq!(w.flush().await.error, 0);
    // A write of other data over it, cut off half way through its payload.
    let mut b = Wire::<tokio::net::TcpStream>::request_header(0, cmd::WRITE, 1000, 0, 65536);
    b.extend_from_slice(&pattern(12, 32768));
    w.send(&b).await;
    w.s.flush().await.unwrap();
    drop(w);

    // Another client that vanishes with 64 writes and a 32 MiB read in
    // flight, reading none of the replies.
    let (mut w, _) = Wire::open(h.addr, "v", true).await;
    for i in 0..64u64 {
        w.send_request(cmd::WRITE, 0, 8 * MIB + i * 65536, 65536, &pattern(i as u8, 65536)).await;
    }
    w.send_request(cmd::READ, 0, 0, 32 << 20, &[]).await;
    drop(w);
    // And one that reads only the first bytes of a big read reply.
    let (mut w, _) = Wire::open(h.addr, "v", false).await;
    w.send_request(cmd::READ, 0, 0, 32 << 20, &[]).await;
    w.read_exact(1 << 20).await;
    drop(w);

    let (mut w, _) = Wire::open(h.addr, "v", false).await;
    assert!(w.read_ok(0, 65536).await == flushed, "the flushed data changed");
    w.disconnect().await;
    let mut buf = vec![0u8; 65536];
    h.pool.volume("v").unwrap().read(0, &mut buf).await.unwrap();
    assert!(buf == flushed);
    assert_serving(h.addr, "v", 4 * MIB).await;
    qemu_io_reads(&h, "v").await;
}

/// Raise the soft open-file limit to what the test needs (within the hard
/// limit).
fn raise_nofile(want: u64) {
    let mut l = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the rlimit we pass.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) }, 0);
    if l.rlim_cur < want {
        l.rlim_cur = want.min(l.rlim_max);
        // SAFETY: setrlimit only reads the rlimit we pass.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &l) }, 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_idle_connections_do_not_starve_new_clients() {
    raise_nofile(8192);
    let h = Harness::new(256 * MIB).await;
    h.pool.create_volume("v", 16 * MIB).await.unwrap();
    let started = std::time::Instant::now();
    let mut idle = Vec::new();
    // 1000 in transmission, doing nothing.
    for _ in 0..1000 {
        idle.push(Wire::open(h.addr, "v", false).await.0);
    }
    // 100 that stopped after the client flags, 100 that sent nothing.
    let mut half = Vec::new();
    for _ in 0..100 {
        half.push(Wire::start(h.addr).await);
        half.push(Wire::connect(h.addr).await);
    }
    eprintln!("opened 1200 connections in {:?}", started.elapsed());
    assert_serving(h.addr, "v", 0).await;
    qemu_io_reads(&h, "v").await;
    // The first of the idle ones still works after all that.
    let d = pattern(21, 4096);
    idle[0].write_ok(MIB, &d, 0).await;
    assert!(idle[999].read_ok(MIB, 4096).await == d);
    drop(idle);
    drop(half);
    assert_serving(h.addr, "v", 8192).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_conn_flush_on_one_connection_covers_writes_on_another() {
    let h = Harness::new(64 * MIB).await;
    h.pool.create_volume("v", 16 * MIB).await.unwrap();
    let (mut a, ea) = Wire::open(h.addr, "v", false).await;
    let (mut b, eb) = Wire::open(h.addr, "v", true).await;
    assert!(ea.flags & tflag::CAN_MULTI_CONN != 0 && eb.flags & tflag::CAN_MULTI_CONN != 0, "{:#x}", ea.flags);

    // Written on A (no FUA), flushed on B.
    let d1 = pattern(31, 3 * 65536);
    a.write_ok(MIB, &d1, 0).await;
    assert_eq!(b.flush().await.error, 0);
    assert!(b.read_ok(MIB, d1.len() as u32).await == d1, "B does not see A's write");
    // Written with FUA on B, nothing else.
    let d2 = pattern(32, 8192);
    b.write_ok(5 * MIB + 4096, &d2, cflag::FUA).await;

    // What a power cut would leave: a copy of the pool file, opened fresh.
    let copy = h.path("copy.img");
    std::fs::copy(h.path("pool.img"), &copy).unwrap();
    let backend = AnyBackend::open(&copy, Engine::Auto).unwrap();
    let (pool, _) = Pool::open(backend, PoolOptions::default()).await.unwrap();
    let v = pool.volume("v").unwrap();
    let mut got = vec![0u8; d1.len()];
    v.read(MIB, &mut got).await.unwrap();
    assert!(got == d1, "a write flushed from another connection is not durable");
    let mut got = vec![0u8; d2.len()];
    v.read(5 * MIB + 4096, &mut got).await.unwrap();
    assert!(got == d2, "a FUA write is not durable");
    drop(v);
    drop(pool);
    a.disconnect().await;
    b.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_each_get_exactly_one_reply() {
    let h = Harness::new(256 * MIB).await;
    h.pool.create_volume("v", 64 * MIB).await.unwrap();
    for structured in [false, true] {
        let (mut w, _) = Wire::open(h.addr, "v", structured).await;
        // 300 requests (more than max_inflight) before reading any reply:
        // writes of distinct data, then reads of them, then errors.
        let mut expect = std::collections::HashMap::new();
        for i in 0..100u64 {
            let c = w.send_request(cmd::WRITE, 0, i * 65536, 65536, &pattern(i as u8, 65536)).await;
            expect.insert(c, (cmd::WRITE, i, 0));
        }
        for i in 0..100u64 {
            let c = w.send_request(cmd::READ, 0, i * 65536 + 512, 4096, &[]).await;
            expect.insert(c, (cmd::READ, i, 0));
        }
        for i in 0..100u64 {
            let c = w.send_request(cmd::READ, 0, 64 * MIB + i * 512, 512, &[]).await;
            expect.insert(c, (cmd::READ, i, errno::EINVAL));
        }
        // Reads may pass the writes they follow (the server runs requests
        // concurrently), so only check the errors and the count here.
        for _ in 0..300 {
            let r = w.reply().await;
            let (_, _, e) = expect.remove(&r.cookie).unwrap_or_else(|| panic!("duplicate reply {}", r.cookie));
            assert_eq!(r.error, e, "{r:?}");
        }
        assert!(expect.is_empty());
        for i in [0u64, 37, 99] {
            assert!(w.read_ok(i * 65536, 65536).await == pattern(i as u8, 65536));
        }
        w.disconnect().await;
    }
}

/// Replies go out combined (whoever finds the socket free writes everything
/// queued). A client that asks for far more data than the server keeps in
/// flight per connection (96 MiB), and reads none of it for a while, stalls
/// only itself: another client is served meanwhile, and when the first one
/// reads, every reply comes exactly once, whole and with the right data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_does_not_read_its_replies_stalls_only_itself() {
    let h = Harness::new(512 * MIB).await;
    h.pool.create_volume("v", 128 * MIB).await.unwrap();
    let (mut w, _) = Wire::open(h.addr, "v", true).await;
    for i in 0..128u64 {
        w.write_ok(i * MIB, &pattern(i as u8, MIB as usize), 0).await;
    }
    // 256 reads of 1 MiB (twice the volume, over twice the in-flight budget),
    // every other one allowed to come in pieces (no DF flag).
    let mut expect = std::collections::HashMap::new();
    for k in 0..256u64 {
        let at = (k % 128) * MIB;
        let flags = if k % 2 == 0 { cflag::DF } else { 0 };
        expect.insert(w.send_request(cmd::READ, flags, at, MIB as u32, &[]).await, k % 128);
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    qemu_io_reads(&h, "v").await;
    for _ in 0..256 {
        let r = w.reply().await;
        let i = expect.remove(&r.cookie).unwrap_or_else(|| panic!("duplicate or unknown reply {}", r.cookie));
        assert_eq!(r.error, 0, "{r:?}");
        assert!(r.data == pattern(i as u8, MIB as usize), "read of MiB {i} returned other data");
    }
    assert!(expect.is_empty());
    w.disconnect().await;
}

/// A block that fails its checksum fails the read it is in, however the
/// read is answered: one reply, one chunk, or pieces sent as they are read
/// (where data chunks of the good pieces may come first, then the error
/// chunk ends the reply). qemu-io sees an I/O error, not data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_block_fails_the_read_whichever_way_it_is_answered() {
    use std::os::unix::fs::FileExt;
    let h = Harness::new(256 * MIB).await;
    let v = h.pool.create_volume("v", 16 * MIB).await.unwrap();
    let data = pattern(7, 4 * MIB as usize);
    v.write(0, &data, false).await.unwrap();
    h.pool.flush().await.unwrap();
    // Garble the block at 3 MiB + 4 KiB behind the store's back.
    let phys = v.physical_block(3 * MIB + 4096).await.unwrap().expect("written block is mapped");
    let f = std::fs::OpenOptions::new().write(true).open(h.path("pool.img")).unwrap();
    f.write_all_at(&[0x5a; 512], phys * 4096 + 1024).unwrap();
    f.sync_all().unwrap();
    for structured in [false, true] {
        let (mut w, _) = Wire::open(h.addr, "v", structured).await;
        // The good first 2 MiB still read back.
        assert!(w.read_ok(0, 2 * MIB as u32).await == data[..2 * MIB as usize]);
        let flag_sets: &[u16] = if structured { &[0, cflag::DF] } else { &[0] };
        for &flags in flag_sets {
            let c = w.send_request(cmd::READ, flags, 2 * MIB, 2 * MIB as u32, &[]).await;
            let r = w.reply().await;
            assert_eq!(r.cookie, c);
            assert_eq!(r.error, errno::EIO, "structured {structured} flags {flags}: {r:?}");
        }
        w.disconnect().await;
    }
    let out = run_failing("qemu-io", &["-r", "-f", "raw", "-c", "read 2M 2M", &h.url("v")]).await;
    assert!(text(&out).contains("Input/output error"), "{}", text(&out));
}

/// NBD_CMD_CACHE pulls the range into the store's data cache: after it, a
/// block damaged on disk behind the store still reads back as written (it
/// comes from memory, verified when it went in), while the same damage
/// outside the cached range fails its read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_pulls_a_range_into_the_data_cache() {
    use std::os::unix::fs::FileExt;
    // Writes fill the cache, so the data is written by the pool opened
    // without one, and served by the same pool reopened with one.
    let (dir, pool) = keel_tests::data::temp_pool_with("keel-nbd", 256 * MIB, PoolOptions::default()).await;
    let data = pattern(9, 4 * MIB as usize);
    pool.create_volume("v", 16 * MIB).await.unwrap().write(0, &data, false).await.unwrap();
    pool.close().await.unwrap();
    let backend = AnyBackend::open(&dir.path().join("pool.img"), Engine::Auto).unwrap();
    let opts = PoolOptions { data_cache_bytes: 8 * MIB as usize, ..PoolOptions::default() };
    let (pool, _) = Pool::open(backend, opts).await.unwrap();
    let h = Harness::serving(dir, pool, keel_nbd_server::ServerConfig::default()).await;
    let v = h.pool.volume("v").unwrap();
    assert_eq!(h.pool.stats().data_cache.used_bytes, 0);
    let (mut w, _) = Wire::open(h.addr, "v", true).await;
    assert_eq!(w.request(cmd::CACHE, 0, 0, 2 * MIB as u32, &[]).await.error, 0);
    assert_eq!(h.pool.stats().data_cache.used_bytes, 2 * MIB);
    let f = std::fs::OpenOptions::new().write(true).open(h.path("pool.img")).unwrap();
    for at in [MIB, 3 * MIB] {
        let phys = v.physical_block(at).await.unwrap().expect("written block is mapped");
        f.write_all_at(&[0x5a; 512], phys * 4096).unwrap();
    }
    f.sync_all().unwrap();
    assert!(w.read_ok(0, 2 * MIB as u32).await == data[..2 * MIB as usize]);
    let c = w.send_request(cmd::READ, 0, 3 * MIB, 4096, &[]).await;
    let r = w.reply().await;
    assert_eq!((r.cookie, r.error), (c, errno::EIO), "{r:?}");
    // Beyond the end: the protocol's error, as for a read.
    assert_eq!(w.request(cmd::CACHE, 0, 16 * MIB, 4096, &[]).await.error, errno::EINVAL);
    w.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_ignores_unknown_info_requests() {
    // NBD_OPT_GO with NBD_INFO requests the server does not know: it MUST
    // ignore them and still send NBD_INFO_EXPORT.
    let h = Harness::new(256 * MIB).await;
    h.pool.create_volume("v", 16 * MIB).await.unwrap();
    let mut w = Wire::start(h.addr).await;
    let e = w.go("v", &[info::BLOCK_SIZE, 1234, 77]).await.unwrap();
    assert_eq!(e.size, 16 * MIB);
    assert!(e.block_size.is_some());
    assert_serving(h.addr, "v", 0).await;
    w.disconnect().await;
}
