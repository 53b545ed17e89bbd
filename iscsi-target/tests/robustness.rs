//! Bad and hostile initiators: each gets the protocol's answer or a clean
//! close, and everyone else keeps being served with their data intact.

mod common;

use std::time::Duration;

use common::wire::{Wire, read10, write10};
use common::{Harness, MIB, run, text};
use keel_iscsi_target::pdu::{self, Bhs, op};
use keel_iscsi_target::session::Keepalive;
use keel_iscsi_target::{ServerConfig, text as keys};

async fn logged_in(h: &Harness, vol: &str, offer: &[(&str, &str)]) -> Wire {
    let mut w = Wire::connect(h.addr).await;
    let (status, _) = w.login(&h.iqn(vol), offer).await;
    assert_eq!(status, 0, "login refused");
    w
}

/// Write `blocks` of `byte` at `lba` with immediate data and check GOOD.
async fn write_ok(w: &mut Wire, lba: u32, blocks: u16, byte: u8) {
    let data = vec![byte; blocks as usize * 512];
    let b = w.command(&write10(lba, blocks), false, true, data.len() as u32);
    w.send(&b, &data).await;
    let (r, _) = w.expect(op::SCSI_RESP).await.expect("response");
    assert_eq!(r.0[3], 0, "write failed");
}

async fn read_back(w: &mut Wire, lba: u32, blocks: u16) -> Vec<u8> {
    let b = w.command(&read10(lba, blocks), true, false, blocks as u32 * 512);
    w.send(&b, &[]).await;
    let mut got = Vec::new();
    loop {
        let (r, d) = w.recv().await.expect("data");
        if r.opcode() == op::DATA_IN {
            got.extend_from_slice(&d);
            if r.flags() & 0x01 != 0 {
                return got;
            }
        } else if r.opcode() == op::SCSI_RESP {
            assert_eq!(r.0[3], 0);
            return got;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn digests_both_ways_and_a_corrupted_data_digest_is_refused() {
    let h = Harness::new(128 * MIB).await;
    h.pool.create_volume("v", 8 * MIB).await.unwrap();
    let mut w =
        logged_in(&h, "v", &[("HeaderDigest", "CRC32C"), ("DataDigest", "CRC32C"), ("ImmediateData", "Yes")]).await;
    assert!(w.framing.header_digest && w.framing.data_digest, "digests not negotiated");
    write_ok(&mut w, 8, 2, 0x11).await;
    assert_eq!(read_back(&mut w, 8, 2).await, vec![0x11; 1024]);

    // A write whose data digest is wrong: the target rejects the PDU and the
    // command does not succeed; nothing of it reaches the disk.
    let data = vec![0x22u8; 512];
    let b = w.command(&write10(8, 1), false, true, 512);
    let mut bytes = Vec::new();
    pdu::encode(&mut bytes, &b, &data, w.framing);
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    w.send_raw(&bytes).await.unwrap();
    let (r, _) = w.recv().await.expect("reject");
    assert_eq!(r.opcode(), op::REJECT);
    assert_eq!(r.0[2], pdu::reject::DATA_DIGEST);
    let (r, _) = w.expect(op::SCSI_RESP).await.expect("the command's status");
    assert_eq!((r.itt(), r.0[3]), (b.itt(), 2), "the corrupted write must end in CHECK CONDITION");
    // The session goes on; the old data is intact.
    assert_eq!(read_back(&mut w, 8, 2).await, vec![0x11; 1024]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_pdus_get_rejects_or_a_close_and_others_are_unaffected() {
    let h = Harness::new(128 * MIB).await;
    h.pool.create_volume("v", 8 * MIB).await.unwrap();
    let mut bystander = logged_in(&h, "v", &[]).await;
    write_ok(&mut bystander, 0, 8, 0xaa).await;

    // An unknown opcode is rejected and the session continues.
    let mut w = logged_in(&h, "v", &[]).await;
    let mut b = Bhs::new(0x1c);
    b.0[1] = 0x80;
    w.send(&b, &[]).await;
    let (r, d) = w.recv().await.expect("reject");
    assert_eq!(r.opcode(), op::REJECT);
    assert_eq!(r.0[2], pdu::reject::NOT_SUPPORTED);
    assert_eq!(d.len(), 48, "a Reject carries the offending header");
    write_ok(&mut w, 16, 1, 0x33).await;

    // A data segment beyond what the target declared: rejected and closed.
    let mut b = w.command(&write10(0, 1), false, true, 512);
    b.set_data_len(4 << 20);
    w.send_raw(&b.0).await.unwrap();
    let mut saw_close = false;
    for _ in 0..3 {
        match w.recv().await {
            Some((r, _)) => assert_eq!(r.opcode(), op::REJECT),
            None => {
                saw_close = true;
                break;
            }
        }
    }
    assert!(saw_close, "connection kept open after an oversized segment");

    // Garbage instead of a login: closed.
    let mut g = Wire::connect(h.addr).await;
    let _ = g.send_raw(&[0xffu8; 48]).await;
    let _ = g.send_raw(b"GET / HTTP/1.0\r\n\r\n").await;
    assert!(g.recv().await.is_none_or(|(r, _)| r.opcode() == op::LOGIN_RESP));

    // A write announced but whose data never comes, then the initiator
    // vanishes.
    let mut v = logged_in(&h, "v", &[("InitialR2T", "Yes"), ("ImmediateData", "No")]).await;
    let b = v.command(&write10(0, 8), false, true, 8 * 512);
    v.send(&b, &[]).await;
    let (r2t, _) = v.recv().await.expect("R2T");
    assert_eq!(r2t.opcode(), op::R2T);
    drop(v);

    // The bystander's data and session are unharmed.
    assert_eq!(read_back(&mut bystander, 0, 8).await, vec![0xaa; 8 * 512]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_sequence_numbers_are_ignored_or_fail_the_command() {
    let h = Harness::new(128 * MIB).await;
    h.pool.create_volume("v", 8 * MIB).await.unwrap();
    let mut w =
        logged_in(&h, "v", &[("InitialR2T", "Yes"), ("ImmediateData", "Yes"), ("MaxBurstLength", "262144")]).await;

    // A CmdSN far outside the window is silently ignored: the next
    // in-window command is answered first.
    let mut tur = w.command(&[0u8; 6], false, false, 0);
    tur.put_u32(24, w.cmdsn + 1000);
    w.cmdsn -= 1;
    w.send(&tur, &[]).await;
    let ok = w.command(&[0u8; 6], false, false, 0);
    let ok_itt = ok.itt();
    w.send(&ok, &[]).await;
    let (r, _) = w.expect(op::SCSI_RESP).await.unwrap();
    assert_eq!(r.itt(), ok_itt, "target answered a command outside the CmdSN window");

    // Data-Out with a wrong DataSN fails its command (no data written).
    write_ok(&mut w, 4, 1, 0x44).await;
    let b = w.command(&write10(4, 1), false, true, 512);
    w.send(&b, &[]).await;
    let (r2t, _) = w.expect(op::R2T).await.unwrap();
    let mut d = Bhs::new(op::DATA_OUT);
    d.0[1] = 0x80;
    d.put_u32(16, b.itt());
    d.put_u32(20, r2t.ttt());
    d.put_u32(36, 27);
    d.put_u32(40, 0);
    w.send(&d, &[0x55; 512]).await;
    let (r, _) = w.expect(op::SCSI_RESP).await.unwrap();
    assert_eq!(r.0[3], 2, "CHECK CONDITION expected");
    assert_eq!(read_back(&mut w, 4, 1).await, vec![0x44; 512]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_initiator_is_pinged_then_dropped() {
    let cfg = ServerConfig {
        keepalive: Keepalive { interval: Duration::from_millis(300), timeout: Duration::from_millis(900) },
        ..ServerConfig::default()
    };
    let h = Harness::with_config(128 * MIB, cfg).await;
    h.pool.create_volume("v", 8 * MIB).await.unwrap();
    let mut w = logged_in(&h, "v", &[]).await;
    let f = w.framing;
    let (ping, _) = tokio::time::timeout(Duration::from_secs(5), w.recv_with(f)).await.unwrap().expect("ping");
    assert_eq!(ping.opcode(), op::NOP_IN);
    assert_eq!(ping.itt(), 0xffff_ffff);
    assert_ne!(ping.ttt(), 0xffff_ffff, "a ping wants an answer");
    // Answer nothing: the target hangs up.
    let gone = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if w.recv_with(f).await.is_none() {
                return;
            }
        }
    })
    .await;
    assert!(gone.is_ok(), "dead initiator not dropped");

    // An initiator that answers stays (the wire client answers pings the
    // way real initiators do) past several ping intervals.
    let mut a = logged_in(&h, "v", &[]).await;
    let waited = tokio::time::timeout(Duration::from_secs(3), a.recv()).await;
    assert!(waited.is_err(), "answered pings but was dropped: {waited:?}");
    write_ok(&mut a, 0, 1, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_logins_leaves_the_target_serving() {
    let h = Harness::new(128 * MIB).await;
    h.pool.create_volume("v", 8 * MIB).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..300 {
        let addr = h.addr;
        let iqn = h.iqn("v");
        tasks.push(tokio::spawn(async move {
            let mut w = Wire::connect(addr).await;
            if i % 3 == 0 {
                // Half a login, then gone.
                let mut d = Vec::new();
                keys::push(&mut d, "InitiatorName", "iqn.flood");
                let mut b = Bhs::new(op::LOGIN_REQ);
                b.0[1] = 0x04;
                w.send(&b, &d).await;
            } else {
                let (s, _) = w.login(&iqn, &[]).await;
                assert_eq!(s, 0);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let inq = run(&["iscsi-inq", &h.url("v")], &[]).await;
    assert!(inq.status.success(), "{}", text(&inq));
}

/// A Data-Out PDU for `cmd`'s burst `ttt`.
fn data_out(cmd: &Bhs, ttt: u32, datasn: u32, offset: u32, last: bool) -> Bhs {
    let mut d = Bhs::new(op::DATA_OUT);
    d.0[1] = if last { 0x80 } else { 0 };
    d.put_u32(16, cmd.itt());
    d.put_u32(20, ttt);
    d.put_u32(36, datasn);
    d.put_u32(40, offset);
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn solicited_data_in_odd_pieces_with_digests_lands_whole() {
    // Data-Out segments are read straight into the command's buffer: pieces
    // of odd lengths (with padding before their digests) must land at their
    // offsets, and a corrupted digest must fail the command and write
    // nothing.
    let h = Harness::new(128 * MIB).await;
    h.pool.create_volume("v", 8 * MIB).await.unwrap();
    let mut w = logged_in(
        &h,
        "v",
        &[("HeaderDigest", "CRC32C"), ("DataDigest", "CRC32C"), ("InitialR2T", "Yes"), ("ImmediateData", "No")],
    )
    .await;
    assert!(w.framing.header_digest && w.framing.data_digest, "digests not negotiated");
    let data: Vec<u8> = (0..2048u32).map(|i| (i * 7 + i / 256) as u8).collect();
    let b = w.command(&write10(40, 4), false, true, 2048);
    w.send(&b, &[]).await;
    let (r2t, _) = w.expect(op::R2T).await.unwrap();
    assert_eq!((r2t.u32_at(40), r2t.u32_at(44)), (0, 2048), "one R2T for the whole write");
    let cuts = [0usize, 509, 510, 1027, 2048];
    for (sn, win) in cuts.windows(2).enumerate() {
        let last = win[1] == 2048;
        let d = data_out(&b, r2t.ttt(), sn as u32, win[0] as u32, last);
        w.send(&d, &data[win[0]..win[1]]).await;
    }
    let (r, _) = w.expect(op::SCSI_RESP).await.unwrap();
    assert_eq!(r.0[3], 0, "write in odd pieces failed");
    assert_eq!(read_back(&mut w, 40, 4).await, data);

    // The same write again, with a different pattern and its second piece's
    // data digest broken: rejected, the command fails, the data stays.
    let b = w.command(&write10(40, 4), false, true, 2048);
    w.send(&b, &[]).await;
    let (r2t, _) = w.expect(op::R2T).await.unwrap();
    w.send(&data_out(&b, r2t.ttt(), 0, 0, false), &[0x99; 1024]).await;
    let mut bytes = Vec::new();
    pdu::encode(&mut bytes, &data_out(&b, r2t.ttt(), 1, 1024, true), &[0x99; 1024], w.framing);
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    w.send_raw(&bytes).await.unwrap();
    let (r, _) = w.recv().await.expect("reject");
    assert_eq!((r.opcode(), r.0[2]), (op::REJECT, pdu::reject::DATA_DIGEST));
    let (r, _) = w.expect(op::SCSI_RESP).await.expect("the command's status");
    assert_eq!((r.itt(), r.0[3]), (b.itt(), 2), "a write with a corrupted Data-Out must end in CHECK CONDITION");
    assert_eq!(read_back(&mut w, 40, 4).await, data, "a failed write changed the disk");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_out_out_of_order_fails_the_command() {
    // DataPDUInOrder=Yes is what the target negotiates: a Data-Out must start
    // where the previous one of its burst ended. Pieces that go back over
    // data already sent and skip some (all the bytes counted, a gap of
    // whatever the reused buffer held left), or that come out of order,
    // fail their command, with nothing written.
    let h = Harness::new(128 * MIB).await;
    h.pool.create_volume("v", 8 * MIB).await.unwrap();
    let mut w = logged_in(&h, "v", &[("InitialR2T", "Yes"), ("ImmediateData", "Yes")]).await;
    write_ok(&mut w, 64, 2, 0x61).await;
    let cases: [(&str, [(u32, usize); 3]); 2] = [
        ("an overlap and a gap", [(0, 512), (256, 256), (768, 256)]),
        ("pieces out of order", [(0, 512), (768, 256), (512, 256)]),
    ];
    for (name, pieces) in cases {
        let b = w.command(&write10(64, 2), false, true, 1024);
        w.send(&b, &[]).await;
        let (r2t, _) = w.expect(op::R2T).await.unwrap();
        for (sn, (offset, len)) in pieces.into_iter().enumerate() {
            w.send(&data_out(&b, r2t.ttt(), sn as u32, offset, sn == 2), &vec![0x62; len]).await;
        }
        let answer = tokio::time::timeout(Duration::from_secs(10), w.expect(op::SCSI_RESP)).await;
        let (r, _) = answer.expect("no answer to the write").unwrap();
        assert_eq!((r.itt(), r.0[3]), (b.itt(), 2), "a write with {name} must fail");
        assert_eq!(read_back(&mut w, 64, 2).await, vec![0x61; 1024], "a write with {name} changed the disk");
    }
    // The session still writes correctly afterwards.
    write_ok(&mut w, 64, 2, 0x64).await;
    assert_eq!(read_back(&mut w, 64, 2).await, vec![0x64; 1024]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_initiator_gone_while_a_write_waits_for_data_loses_its_reservation() {
    // The session's end waits for its running commands; a write that was
    // still waiting for its Data-Out must not make that wait endless, or
    // the I_T nexus is never lost and its RESERVE(6) holds the LU forever.
    let h = Harness::new(128 * MIB).await;
    h.pool.create_volume("v", 8 * MIB).await.unwrap();
    let mut a = logged_in(&h, "v", &[("InitialR2T", "Yes"), ("ImmediateData", "Yes")]).await;
    let mut b = logged_in(&h, "v", &[]).await;
    let reserve = a.command(&[0x16, 0, 0, 0, 0, 0], false, false, 0);
    a.send(&reserve, &[]).await;
    let (r, _) = a.expect(op::SCSI_RESP).await.unwrap();
    assert_eq!(r.0[3], 0, "RESERVE(6) failed");
    let w = b.command(&write10(0, 1), false, true, 512);
    b.send(&w, &[0x77; 512]).await;
    let (r, _) = b.expect(op::SCSI_RESP).await.unwrap();
    assert_eq!(r.0[3], 0x18, "another initiator's write must meet RESERVATION CONFLICT");

    // A starts a write, gets its R2T, and vanishes without sending data.
    let c = a.command(&write10(8, 8), false, true, 8 * 512);
    a.send(&c, &[]).await;
    let (r2t, _) = a.expect(op::R2T).await.unwrap();
    assert_eq!(r2t.itt(), c.itt());
    drop(a);

    // A's session ends and releases its reservation: B's writes go through.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let w = b.command(&write10(0, 1), false, true, 512);
        b.send(&w, &[0x77; 512]).await;
        let (r, _) = b.expect(op::SCSI_RESP).await.unwrap();
        if r.0[3] == 0 {
            break;
        }
        assert_eq!(r.0[3], 0x18);
        assert!(tokio::time::Instant::now() < deadline, "the vanished initiator's reservation is still held");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(read_back(&mut b, 0, 1).await, vec![0x77; 512]);
}
