//! A raw NBD client for tests: every byte of the protocol written and
//! checked by hand (with the constants of `keel_nbd_server::proto`), every
//! read bounded by a timeout so a server that hangs fails the test instead
//! of blocking it.
#![allow(dead_code)]

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use keel_nbd_server::proto::{self, chunk, cmd, info, opt, rep};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long any single wait on the server may take.
pub const LIMIT: Duration = Duration::from_secs(10);

/// Await `f`, failing the test if it takes longer than [`LIMIT`].
pub async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(LIMIT, f).await.unwrap_or_else(|_| panic!("timed out after {LIMIT:?}: {what}"))
}

/// `len` bytes of a pattern that differs per seed and per offset.
pub fn pattern(seed: u8, len: usize) -> Vec<u8> {
    keel_tests::data::pseudo_random(seed as u64, len)
}

/// One option reply.
#[derive(Debug, Clone)]
pub struct OptReply {
    pub option: u32,
    pub kind: u32,
    pub data: Vec<u8>,
}

impl OptReply {
    pub fn is_error(&self) -> bool {
        self.kind & (1 << 31) != 0
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.data).into_owned()
    }
}

/// What NBD_OPT_INFO / NBD_OPT_GO told about an export.
#[derive(Debug, Clone, Default)]
pub struct Export {
    pub size: u64,
    pub flags: u16,
    /// (min, preferred, max) when NBD_INFO_BLOCK_SIZE was sent.
    pub block_size: Option<(u32, u32, u32)>,
    pub name: Option<String>,
    pub description: Option<String>,
}

/// A whole reply to one request (all chunks of a structured reply).
#[derive(Debug, Clone, Default)]
pub struct Reply {
    pub cookie: u64,
    /// 0 on success, else the errno.
    pub error: u32,
    /// For reads: the bytes, holes filled with zeros.
    pub data: Vec<u8>,
    /// Bytes of the read the chunks covered (data and holes).
    pub covered: u64,
    /// Error message of an error chunk.
    pub message: String,
    /// True for a simple reply.
    pub simple: bool,
    /// Types of the chunks, in arrival order.
    pub chunks: Vec<u16>,
    /// Block status: (context id, [(length, flags)]).
    pub status: Vec<(u32, Vec<(u32, u32)>)>,
}

/// A raw client over any byte stream (TCP or TLS).
pub struct Wire<S> {
    pub s: S,
    /// Handshake flags from the greeting.
    pub handshake_flags: u16,
    /// Whether structured replies are on.
    pub structured: bool,
    next_cookie: u64,
    /// cookie -> (command, offset, length) of requests awaiting a reply.
    pending: HashMap<u64, (u16, u64, u64)>,
    /// Structured replies still open.
    partial: HashMap<u64, Reply>,
}

impl Wire<TcpStream> {
    /// Connect and read the greeting.
    pub async fn connect(addr: SocketAddr) -> Wire<TcpStream> {
        let s = within("connect", TcpStream::connect(addr)).await.expect("connect");
        s.set_nodelay(true).unwrap();
        Wire::greeted(s).await
    }

    /// Connect, read the greeting and send the usual client flags.
    pub async fn start(addr: SocketAddr) -> Wire<TcpStream> {
        let mut w = Wire::connect(addr).await;
        w.send_client_flags().await;
        w
    }

    /// Connect and enter transmission on `export` (with structured replies
    /// if asked).
    pub async fn open(addr: SocketAddr, export: &str, structured: bool) -> (Wire<TcpStream>, Export) {
        let mut w = Wire::start(addr).await;
        if structured {
            w.structured_reply().await;
        }
        let e = w.go(export, &[]).await.unwrap_or_else(|r| panic!("GO {export}: {r:?} {}", r.text()));
        (w, e)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Wire<S> {
    /// A client over a stream whose greeting was already handled.
    pub fn new(s: S) -> Wire<S> {
        Wire {
            s,
            handshake_flags: 0,
            structured: false,
            next_cookie: 1,
            pending: HashMap::new(),
            partial: HashMap::new(),
        }
    }

    /// A client over a fresh connection: reads and checks the greeting.
    pub async fn greeted(s: S) -> Wire<S> {
        let mut w = Wire::new(s);
        let g = w.read_exact(18).await;
        assert_eq!(u64::from_be_bytes(g[..8].try_into().unwrap()), proto::NBDMAGIC, "greeting magic");
        assert_eq!(u64::from_be_bytes(g[8..16].try_into().unwrap()), proto::IHAVEOPT, "newstyle magic");
        w.handshake_flags = u16::from_be_bytes([g[16], g[17]]);
        assert!(w.handshake_flags & proto::FLAG_FIXED_NEWSTYLE != 0, "server must offer fixed newstyle");
        w
    }

    /// Send the usual client flags (fixed newstyle, no zeroes).
    pub async fn send_client_flags(&mut self) {
        self.send(&(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES).to_be_bytes()).await;
    }

    pub async fn send(&mut self, b: &[u8]) {
        within("send", self.s.write_all(b)).await.expect("send to the server");
    }

    /// Send, tolerating a server that already closed.
    pub async fn try_send(&mut self, b: &[u8]) -> io::Result<()> {
        within("send", self.s.write_all(b)).await
    }

    pub async fn try_read_exact(&mut self, n: usize) -> io::Result<Vec<u8>> {
        let mut b = vec![0u8; n];
        within("read from the server", self.s.read_exact(&mut b)).await?;
        Ok(b)
    }

    pub async fn read_exact(&mut self, n: usize) -> Vec<u8> {
        self.try_read_exact(n).await.expect("read from the server")
    }

    /// Wait for the server to close the connection; returns whatever it
    /// sent first. Fails the test if it stays open past [`LIMIT`].
    pub async fn closed(&mut self) -> Vec<u8> {
        let mut got = Vec::new();
        let mut b = vec![0u8; 65536];
        loop {
            match within("the server closing the connection", self.s.read(&mut b)).await {
                Ok(0) => return got,
                Ok(n) => got.extend_from_slice(&b[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe | io::ErrorKind::UnexpectedEof
                    ) =>
                {
                    return got;
                }
                Err(e) => panic!("unexpected error waiting for close: {e}"),
            }
        }
    }

    // ----- handshake -----

    pub async fn send_option(&mut self, option: u32, data: &[u8]) {
        let mut b = proto::IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.send(&b).await;
    }

    pub async fn read_opt_reply(&mut self) -> OptReply {
        let h = self.read_exact(20).await;
        assert_eq!(u64::from_be_bytes(h[..8].try_into().unwrap()), proto::OPT_REPLY_MAGIC, "option reply magic");
        let option = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        assert!(len <= 1 << 20, "option reply of {len} bytes");
        let data = self.read_exact(len as usize).await;
        OptReply { option, kind, data }
    }

    /// Send an option and read every reply up to the final one (ACK or an
    /// error).
    pub async fn option(&mut self, option: u32, data: &[u8]) -> Vec<OptReply> {
        self.send_option(option, data).await;
        let mut out = Vec::new();
        loop {
            let r = self.read_opt_reply().await;
            assert_eq!(r.option, option, "reply to the wrong option: {r:?}");
            let last = r.kind == rep::ACK || r.is_error();
            out.push(r);
            if last {
                return out;
            }
        }
    }

    fn info_payload(name: &str, requests: &[u16]) -> Vec<u8> {
        let mut p = (name.len() as u32).to_be_bytes().to_vec();
        p.extend_from_slice(name.as_bytes());
        p.extend_from_slice(&(requests.len() as u16).to_be_bytes());
        for r in requests {
            p.extend_from_slice(&r.to_be_bytes());
        }
        p
    }

    fn parse_infos(replies: &[OptReply]) -> Result<Export, OptReply> {
        let last = replies.last().expect("a reply");
        if last.is_error() {
            assert_eq!(replies.len(), 1, "an error must be the only reply: {replies:?}");
            return Err(last.clone());
        }
        let mut e = Export::default();
        let mut saw_export = false;
        for r in &replies[..replies.len() - 1] {
            assert_eq!(r.kind, rep::INFO, "unexpected reply {r:?}");
            let t = u16::from_be_bytes([r.data[0], r.data[1]]);
            let d = &r.data[2..];
            match t {
                info::EXPORT => {
                    assert_eq!(d.len(), 10, "NBD_INFO_EXPORT length");
                    e.size = u64::from_be_bytes(d[..8].try_into().unwrap());
                    e.flags = u16::from_be_bytes([d[8], d[9]]);
                    saw_export = true;
                }
                info::BLOCK_SIZE => {
                    assert_eq!(d.len(), 12, "NBD_INFO_BLOCK_SIZE length");
                    let v = |i: usize| u32::from_be_bytes(d[i..i + 4].try_into().unwrap());
                    e.block_size = Some((v(0), v(4), v(8)));
                }
                info::NAME => e.name = Some(String::from_utf8(d.to_vec()).unwrap()),
                info::DESCRIPTION => e.description = Some(String::from_utf8(d.to_vec()).unwrap()),
                other => panic!("unknown info type {other}"),
            }
        }
        assert!(saw_export, "the server MUST send NBD_INFO_EXPORT: {replies:?}");
        Ok(e)
    }

    pub async fn info(&mut self, name: &str, requests: &[u16]) -> Result<Export, OptReply> {
        let r = self.option(opt::INFO, &Self::info_payload(name, requests)).await;
        Self::parse_infos(&r)
    }

    /// NBD_OPT_GO: on success the connection is in transmission.
    pub async fn go(&mut self, name: &str, requests: &[u16]) -> Result<Export, OptReply> {
        let r = self.option(opt::GO, &Self::info_payload(name, requests)).await;
        Self::parse_infos(&r)
    }

    pub async fn structured_reply(&mut self) {
        let r = self.option(opt::STRUCTURED_REPLY, &[]).await;
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].kind, rep::ACK, "STRUCTURED_REPLY: {:?}", r[0]);
        self.structured = true;
    }

    /// NBD_OPT_LIST: the export names.
    pub async fn list(&mut self) -> Result<Vec<String>, OptReply> {
        let r = self.option(opt::LIST, &[]).await;
        let last = r.last().unwrap();
        if last.is_error() {
            return Err(last.clone());
        }
        Ok(r[..r.len() - 1]
            .iter()
            .map(|x| {
                assert_eq!(x.kind, rep::SERVER);
                let n = u32::from_be_bytes(x.data[..4].try_into().unwrap()) as usize;
                String::from_utf8(x.data[4..4 + n].to_vec()).unwrap()
            })
            .collect())
    }

    /// NBD_OPT_SET_META_CONTEXT: (id, name) of each selected context.
    pub async fn set_meta(&mut self, export: &str, queries: &[&str]) -> Result<Vec<(u32, String)>, OptReply> {
        let mut p = (export.len() as u32).to_be_bytes().to_vec();
        p.extend_from_slice(export.as_bytes());
        p.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            p.extend_from_slice(&(q.len() as u32).to_be_bytes());
            p.extend_from_slice(q.as_bytes());
        }
        let r = self.option(opt::SET_META_CONTEXT, &p).await;
        let last = r.last().unwrap();
        if last.is_error() {
            return Err(last.clone());
        }
        Ok(r[..r.len() - 1]
            .iter()
            .map(|x| {
                assert_eq!(x.kind, rep::META_CONTEXT);
                let id = u32::from_be_bytes(x.data[..4].try_into().unwrap());
                (id, String::from_utf8(x.data[4..].to_vec()).unwrap())
            })
            .collect())
    }

    // ----- transmission -----

    /// The bytes of a compact request header.
    pub fn request_header(flags: u16, kind: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
        let mut b = Vec::with_capacity(28);
        b.extend_from_slice(&proto::REQUEST_MAGIC.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b
    }

    /// Send a request (with `payload` after the header when non-empty) and
    /// return its cookie.
    pub async fn send_request(&mut self, kind: u16, flags: u16, offset: u64, len: u32, payload: &[u8]) -> u64 {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let mut b = Self::request_header(flags, kind, cookie, offset, len);
        b.extend_from_slice(payload);
        self.send(&b).await;
        self.pending.insert(cookie, (kind, offset, len as u64));
        cookie
    }

    /// Read messages until some reply is complete; return it.
    pub async fn reply(&mut self) -> Reply {
        loop {
            let m = self.read_exact(4).await;
            let magic = u32::from_be_bytes(m[..4].try_into().unwrap());
            if magic == proto::SIMPLE_REPLY_MAGIC {
                let h = self.read_exact(12).await;
                let error = u32::from_be_bytes(h[..4].try_into().unwrap());
                let cookie = u64::from_be_bytes(h[4..12].try_into().unwrap());
                let (kind, _off, len) =
                    self.pending.remove(&cookie).unwrap_or_else(|| panic!("simple reply to unknown cookie {cookie}"));
                assert!(!self.partial.contains_key(&cookie), "simple reply after structured chunks");
                if self.structured {
                    assert_ne!(kind, cmd::READ, "a simple reply to a read once structured replies are on");
                }
                let data =
                    if kind == cmd::READ && error == 0 { self.read_exact(len as usize).await } else { Vec::new() };
                let covered = data.len() as u64;
                return Reply { cookie, error, data, covered, simple: true, ..Default::default() };
            }
            assert_eq!(magic, proto::STRUCTURED_REPLY_MAGIC, "reply magic {magic:#x}");
            assert!(self.structured, "structured chunk without negotiating structured replies");
            let h = self.read_exact(16).await;
            let flags = u16::from_be_bytes([h[0], h[1]]);
            let kind = u16::from_be_bytes([h[2], h[3]]);
            let cookie = u64::from_be_bytes(h[4..12].try_into().unwrap());
            let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let payload = self.read_exact(len as usize).await;
            let (rkind, roff, rlen) =
                *self.pending.get(&cookie).unwrap_or_else(|| panic!("chunk for unknown cookie {cookie}"));
            let r = self.partial.entry(cookie).or_insert_with(|| Reply {
                cookie,
                data: if rkind == cmd::READ { vec![0u8; rlen as usize] } else { Vec::new() },
                ..Default::default()
            });
            r.chunks.push(kind);
            match kind {
                chunk::NONE => assert_eq!(len, 0, "NBD_REPLY_TYPE_NONE with a payload"),
                chunk::OFFSET_DATA => {
                    assert_eq!(rkind, cmd::READ, "data chunk for a non-read");
                    let at = u64::from_be_bytes(payload[..8].try_into().unwrap());
                    let n = payload.len() as u64 - 8;
                    assert!(at >= roff && at + n <= roff + rlen, "data chunk {at}+{n} outside {roff}+{rlen}");
                    let i = (at - roff) as usize;
                    r.data[i..i + n as usize].copy_from_slice(&payload[8..]);
                    r.covered += n;
                }
                chunk::OFFSET_HOLE => {
                    assert_eq!(rkind, cmd::READ, "hole chunk for a non-read");
                    assert_eq!(len, 12);
                    let at = u64::from_be_bytes(payload[..8].try_into().unwrap());
                    let n = u32::from_be_bytes(payload[8..12].try_into().unwrap()) as u64;
                    assert!(at >= roff && at + n <= roff + rlen, "hole chunk {at}+{n} outside {roff}+{rlen}");
                    r.covered += n;
                }
                chunk::BLOCK_STATUS => {
                    assert_eq!(rkind, cmd::BLOCK_STATUS);
                    let id = u32::from_be_bytes(payload[..4].try_into().unwrap());
                    let d = payload[4..]
                        .chunks_exact(8)
                        .map(|c| {
                            (
                                u32::from_be_bytes(c[..4].try_into().unwrap()),
                                u32::from_be_bytes(c[4..].try_into().unwrap()),
                            )
                        })
                        .collect();
                    r.status.push((id, d));
                }
                chunk::ERROR | chunk::ERROR_OFFSET => {
                    let e = u32::from_be_bytes(payload[..4].try_into().unwrap());
                    let ml = u16::from_be_bytes([payload[4], payload[5]]) as usize;
                    assert_ne!(e, 0, "error chunk with error 0");
                    r.error = e;
                    r.message = String::from_utf8_lossy(&payload[6..6 + ml]).into_owned();
                }
                other => panic!("unknown chunk type {other}"),
            }
            if flags & chunk::FLAG_DONE != 0 {
                let r = self.partial.remove(&cookie).unwrap();
                self.pending.remove(&cookie);
                if rkind == cmd::READ && r.error == 0 {
                    assert_eq!(r.covered, rlen, "read chunks must cover the request exactly");
                }
                return r;
            }
        }
    }

    /// One request, one reply.
    pub async fn request(&mut self, kind: u16, flags: u16, offset: u64, len: u32, payload: &[u8]) -> Reply {
        let c = self.send_request(kind, flags, offset, len, payload).await;
        let r = self.reply().await;
        assert_eq!(r.cookie, c, "reply to the wrong request");
        r
    }

    pub async fn read(&mut self, offset: u64, len: u32) -> Reply {
        self.request(cmd::READ, 0, offset, len, &[]).await
    }

    pub async fn write(&mut self, offset: u64, data: &[u8], flags: u16) -> Reply {
        self.request(cmd::WRITE, flags, offset, data.len() as u32, data).await
    }

    pub async fn flush(&mut self) -> Reply {
        self.request(cmd::FLUSH, 0, 0, 0, &[]).await
    }

    /// Read and insist on success.
    pub async fn read_ok(&mut self, offset: u64, len: u32) -> Vec<u8> {
        let r = self.read(offset, len).await;
        assert_eq!(r.error, 0, "read {offset}+{len} failed: {r:?}");
        r.data
    }

    /// Write and insist on success.
    pub async fn write_ok(&mut self, offset: u64, data: &[u8], flags: u16) {
        let r = self.write(offset, data, flags).await;
        assert_eq!(r.error, 0, "write {offset}+{} failed: {} {}", data.len(), r.error, r.message);
    }

    /// NBD_CMD_DISC, then wait for the server to close.
    pub async fn disconnect(mut self) {
        let b = Self::request_header(0, cmd::DISC, 0, 0, 0);
        self.send(&b).await;
        let rest = self.closed().await;
        assert!(rest.is_empty(), "bytes after NBD_CMD_DISC: {rest:?}");
    }
}

/// A quick end-to-end check that `export` serves I/O: a fresh connection
/// writes a block at `offset`, reads it back, and disconnects cleanly.
pub async fn assert_serving(addr: SocketAddr, export: &str, offset: u64) {
    let (mut w, e) = Wire::open(addr, export, false).await;
    assert!(e.size >= offset + 4096);
    let data = pattern(offset as u8 ^ 0x5c, 4096);
    w.write_ok(offset, &data, 0).await;
    assert!(w.read_ok(offset, 4096).await == data, "read back differs");
    w.disconnect().await;
}
