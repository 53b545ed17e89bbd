//! A raw iSCSI initiator for tests that must send what real initiators
//! never do.
#![allow(dead_code)]

use keel_iscsi_target::pdu::{self, BHS_LEN, Bhs, Framing, op};
use keel_iscsi_target::text;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub struct Wire {
    pub sock: TcpStream,
    pub framing: Framing,
    pub cmdsn: u32,
    pub statsn: u32,
    pub itt: u32,
}

impl Wire {
    pub async fn connect(addr: std::net::SocketAddr) -> Wire {
        let sock = TcpStream::connect(addr).await.unwrap();
        Wire { sock, framing: Framing::default(), cmdsn: 1, statsn: 0, itt: 1 }
    }

    /// Log in to `target` (no CHAP) in one operational exchange, offering
    /// `keys`. Returns the response's status and keys.
    pub async fn login(&mut self, target: &str, keys: &[(&str, &str)]) -> (u16, Vec<(String, String)>) {
        let mut data = Vec::new();
        text::push(&mut data, "InitiatorName", "iqn.2026-11.test:wire");
        text::push(&mut data, "SessionType", "Normal");
        text::push(&mut data, "TargetName", target);
        for (k, v) in keys {
            text::push(&mut data, k, v);
        }
        let mut b = Bhs::new(op::LOGIN_REQ);
        b.0[0] |= 0x40;
        b.0[1] = 0x80 | (1 << 2) | 3;
        // A distinct ISID per connection: the same initiator name and ISID
        // would reinstate (end) an earlier session.
        static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(1);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed).to_be_bytes();
        b.0[8..14].copy_from_slice(&[0x80, 0x12, 0x34, 0x56, n[0], n[1]]);
        b.put_u32(16, 0);
        b.put_u32(24, self.cmdsn);
        self.send(&b, &data).await;
        let (r, d) = self.recv_with(Framing::default()).await.expect("login response");
        let keys = text::parse(&d);
        for (k, v) in &keys {
            if k == "HeaderDigest" {
                self.framing.header_digest = v == "CRC32C";
            }
            if k == "DataDigest" {
                self.framing.data_digest = v == "CRC32C";
            }
        }
        self.statsn = r.u32_at(24).wrapping_add(1);
        (r.u16_at(36), keys)
    }

    pub async fn send(&mut self, b: &Bhs, data: &[u8]) {
        let mut out = Vec::new();
        pdu::encode(&mut out, b, data, self.framing);
        self.sock.write_all(&out).await.unwrap();
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.sock.write_all(bytes).await
    }

    /// The next PDU other than a NOP-In ping, which is answered as a real
    /// initiator would.
    pub async fn recv(&mut self) -> Option<(Bhs, Vec<u8>)> {
        loop {
            let f = self.framing;
            let (b, d) = self.recv_with(f).await?;
            if b.opcode() == op::NOP_IN && b.itt() == 0xffff_ffff && b.ttt() != 0xffff_ffff {
                self.pong(&b).await;
                continue;
            }
            return Some((b, d));
        }
    }

    /// Answer a ping.
    pub async fn pong(&mut self, ping: &Bhs) {
        let mut pong = Bhs::new(op::NOP_OUT);
        pong.0[0] |= 0x40;
        pong.0[1] = 0x80;
        pong.put_u32(16, 0xffff_ffff);
        pong.put_u32(20, ping.ttt());
        pong.put_u32(24, self.cmdsn);
        self.send(&pong, &[]).await;
    }

    /// The next PDU, or `None` when the target closed the connection.
    pub async fn recv_with(&mut self, f: Framing) -> Option<(Bhs, Vec<u8>)> {
        let mut hdr = [0u8; BHS_LEN];
        self.sock.read_exact(&mut hdr).await.ok()?;
        let b = Bhs(hdr);
        let n = pdu::rest_len(&b, f, 16 << 20).ok()?;
        let mut rest = vec![0u8; n];
        self.sock.read_exact(&mut rest).await.ok()?;
        let p = pdu::parse_rest(&b, &rest, f).expect("target sent a bad digest");
        assert!(p.data_digest_ok, "target sent a bad data digest");
        Some((b, p.data.to_vec()))
    }

    /// A SCSI command PDU for `cdb` (16 bytes max).
    pub fn command(&mut self, cdb: &[u8], read: bool, write: bool, edtl: u32) -> Bhs {
        let mut b = Bhs::new(op::SCSI_CMD);
        b.0[1] = 0x80 | if read { 0x40 } else { 0 } | if write { 0x20 } else { 0 } | 1;
        self.itt += 1;
        b.put_u32(16, self.itt);
        b.put_u32(20, edtl);
        b.put_u32(24, self.cmdsn);
        self.cmdsn += 1;
        b.put_u32(28, self.statsn);
        b.0[32..32 + cdb.len()].copy_from_slice(cdb);
        b
    }

    /// Skip NOP-In pings and R2Ts until a PDU of `opcode` arrives.
    pub async fn expect(&mut self, opcode: u8) -> Option<(Bhs, Vec<u8>)> {
        loop {
            let (b, d) = self.recv().await?;
            if b.opcode() == opcode {
                return Some((b, d));
            }
            assert!(
                matches!(b.opcode(), op::NOP_IN | op::R2T | op::DATA_IN),
                "unexpected PDU {b:?} while waiting for {opcode:#x}"
            );
        }
    }
}

pub fn read10(lba: u32, blocks: u16) -> [u8; 10] {
    let mut c = [0u8; 10];
    c[0] = 0x28;
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&blocks.to_be_bytes());
    c
}

pub fn write10(lba: u32, blocks: u16) -> [u8; 10] {
    let mut c = read10(lba, blocks);
    c[0] = 0x2a;
    c
}
