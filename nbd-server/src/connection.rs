//! One NBD connection: the only code that touches sockets.
//!
//! The handshake runs option by option (each one decoded by [`crate::proto`]
//! and answered before the next is read). The transmission phase reads
//! requests in order and runs up to `max_inflight` of them at once against
//! the device; replies go out as each finishes, under a lock on the write
//! half so their bytes never interleave.

use std::io::{self, IoSlice};
use std::sync::Arc;
use std::time::Duration;

use keel_blockstore::{AlignedBuf, BlockDevice, Error as StoreError, ErrorKind};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::{Mutex, Semaphore};

use crate::proto::{self, Out, cflag, chunk, cmd, errno, info, opt, rep, tflag};
use crate::server::{Exports, ServerConfig};

/// Smallest I/O the store accepts.
const MIN_BLOCK: u32 = 512;
/// Preferred I/O size (the store's block).
const PREFERRED_BLOCK: u32 = 4096;
/// Reads at least this long are answered sparsely (holes as OFFSET_HOLE).
const SPARSE_READ_MIN: u64 = 64 * 1024;
/// Buffer bytes one connection may have in flight.
const INFLIGHT_BYTES: u64 = 96 << 20;
/// Most block-status descriptors in one reply chunk.
const MAX_DESCRIPTORS: usize = 8192;

/// A metadata context selected with NBD_OPT_SET_META_CONTEXT.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Context {
    /// `base:allocation`.
    Allocation,
    /// `qemu:dirty-bitmap:SNAPSHOT`: changed since that snapshot.
    Dirty(String),
}

impl Context {
    fn name(&self) -> String {
        match self {
            Context::Allocation => "base:allocation".into(),
            Context::Dirty(s) => format!("qemu:dirty-bitmap:{s}"),
        }
    }
}

/// What the handshake has agreed so far.
#[derive(Default)]
struct Negotiated {
    structured: bool,
    extended: bool,
    no_zeroes: bool,
    contexts: Vec<Context>,
    contexts_for: String,
}

enum Outcome<D> {
    Close,
    StartTls,
    Transmit(Arc<D>, String),
}

/// A stream a connection runs on: TCP, or a Unix socket (the appliance's
/// private channel), split into owned halves for the transmission phase.
pub trait Socket: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// The read half.
    type Read: AsyncRead + Unpin + Send + 'static;
    /// The write half.
    type Write: AsyncWrite + Unpin + Send + 'static;
    /// Split without a lock between the halves.
    fn halves(self) -> (Self::Read, Self::Write);
}

impl Socket for TcpStream {
    type Read = tokio::net::tcp::OwnedReadHalf;
    type Write = tokio::net::tcp::OwnedWriteHalf;
    fn halves(self) -> (Self::Read, Self::Write) {
        self.into_split()
    }
}

impl Socket for tokio::net::UnixStream {
    type Read = tokio::net::unix::OwnedReadHalf;
    type Write = tokio::net::unix::OwnedWriteHalf;
    fn halves(self) -> (Self::Read, Self::Write) {
        self.into_split()
    }
}

/// Serve one connection to the end.
pub async fn run<E: Exports, S: Socket>(mut sock: S, exports: Arc<E>, config: Arc<ServerConfig>) -> io::Result<()> {
    let mut neg = Negotiated::default();
    let limit = Duration::from_secs(config.handshake_timeout_secs);
    let mut greeting = Vec::new();
    proto::encode_greeting(&mut greeting);
    let first = async {
        sock.write_all(&greeting).await?;
        let flags = sock.read_u32().await?;
        if flags & proto::FLAG_C_FIXED_NEWSTYLE == 0 {
            return Err(io::Error::other("client does not speak fixed newstyle negotiation"));
        }
        if flags & !(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES) != 0 {
            return Err(io::Error::other(format!("client sent unknown handshake flags {flags:#x}")));
        }
        neg.no_zeroes = flags & proto::FLAG_C_NO_ZEROES != 0;
        handshake(&mut sock, &*exports, &config, &mut neg, false).await
    };
    let outcome = tokio::time::timeout(limit, first).await.map_err(|_| io::Error::other("handshake timed out"))??;
    match outcome {
        Outcome::Close => Ok(()),
        Outcome::Transmit(dev, name) => {
            tracing::debug!(export = %exports.log_name(&name), "NBD transmission");
            let (r, w) = sock.halves();
            transmit(r, w, dev, neg, &config, exports.eviction(&name)).await
        }
        Outcome::StartTls => {
            // Nothing negotiated in the clear carries over into TLS.
            neg = Negotiated { no_zeroes: neg.no_zeroes, ..Default::default() };
            let acceptor = config.tls.clone().expect("STARTTLS accepted only with TLS configured");
            let mut tls = tokio::time::timeout(limit, acceptor.accept(sock))
                .await
                .map_err(|_| io::Error::other("TLS handshake timed out"))??;
            let outcome = tokio::time::timeout(limit, handshake(&mut tls, &*exports, &config, &mut neg, true))
                .await
                .map_err(|_| io::Error::other("handshake timed out"))??;
            match outcome {
                Outcome::Transmit(dev, name) => {
                    tracing::debug!(export = %exports.log_name(&name), "NBD transmission over TLS");
                    let (r, w) = tokio::io::split(tls);
                    transmit(r, w, dev, neg, &config, exports.eviction(&name)).await
                }
                _ => Ok(()),
            }
        }
    }
}

fn transmission_flags(read_only: bool, neg: &Negotiated) -> u16 {
    let mut f = tflag::HAS_FLAGS
        | tflag::SEND_FLUSH
        | tflag::SEND_FUA
        | tflag::SEND_TRIM
        | tflag::SEND_WRITE_ZEROES
        | tflag::SEND_FAST_ZERO
        | tflag::SEND_CACHE
        // Every connection to a volume shares the pool, and a flush commits
        // the whole pool: a flush on one connection covers writes completed
        // on all of them.
        | tflag::CAN_MULTI_CONN;
    if neg.structured {
        f |= tflag::SEND_DF;
    }
    if read_only {
        f |= tflag::READ_ONLY;
    }
    f
}

fn err_reply(out: &mut Vec<u8>, option: u32, kind: u32, msg: &str) {
    proto::encode_option_reply(out, option, kind, msg.as_bytes());
}

/// Option haggling until the client picks an export, aborts, or starts TLS.
async fn handshake<E: Exports, S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    exports: &E,
    config: &ServerConfig,
    neg: &mut Negotiated,
    tls_on: bool,
) -> io::Result<Outcome<E::Device>> {
    loop {
        let mut h = [0u8; 16];
        match s.read_exact(&mut h).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(Outcome::Close),
            Err(e) => return Err(e),
        }
        let hdr = match proto::decode_option_header(&h) {
            Ok(Some((hdr, _))) => hdr,
            Ok(None) => unreachable!("16 bytes are a whole option header"),
            Err(e) => return Err(io::Error::other(format!("bad option: {e}"))),
        };
        let mut payload = vec![0u8; hdr.len as usize];
        s.read_exact(&mut payload).await?;
        let o = hdr.option;
        let mut out = Vec::new();
        if config.require_tls && !tls_on && o != opt::STARTTLS && o != opt::ABORT {
            if o == opt::EXPORT_NAME {
                return Ok(Outcome::Close); // no way to answer with an error
            }
            err_reply(&mut out, o, rep::ERR_TLS_REQD, "this server requires TLS: negotiate NBD_OPT_STARTTLS first");
            s.write_all(&out).await?;
            continue;
        }
        match o {
            opt::EXPORT_NAME => {
                let Ok(name) = String::from_utf8(payload) else { return Ok(Outcome::Close) };
                exports.ready(&name).await;
                let Some(dev) = exports.open(&name) else {
                    tracing::info!("client asked for an export that does not exist: {}", exports.unknown_export(&name));
                    return Ok(Outcome::Close);
                };
                if neg.contexts_for != name {
                    neg.contexts.clear();
                }
                out.extend_from_slice(&dev.size().to_be_bytes());
                out.extend_from_slice(&transmission_flags(dev.read_only(), neg).to_be_bytes());
                if !neg.no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                s.write_all(&out).await?;
                return Ok(Outcome::Transmit(dev, name));
            }
            opt::ABORT => {
                proto::encode_option_reply(&mut out, o, rep::ACK, &[]);
                let _ = s.write_all(&out).await;
                return Ok(Outcome::Close);
            }
            opt::LIST => {
                if !payload.is_empty() {
                    err_reply(&mut out, o, rep::ERR_INVALID, "NBD_OPT_LIST takes no data");
                } else if let Some(why) = exports.list_refusal() {
                    err_reply(&mut out, o, rep::ERR_POLICY, &why);
                } else {
                    for name in exports.names() {
                        let mut d = (name.len() as u32).to_be_bytes().to_vec();
                        d.extend_from_slice(name.as_bytes());
                        proto::encode_option_reply(&mut out, o, rep::SERVER, &d);
                    }
                    proto::encode_option_reply(&mut out, o, rep::ACK, &[]);
                }
            }
            opt::STARTTLS => {
                if !payload.is_empty() {
                    err_reply(&mut out, o, rep::ERR_INVALID, "NBD_OPT_STARTTLS takes no data");
                } else if tls_on {
                    err_reply(&mut out, o, rep::ERR_INVALID, "TLS is already on");
                } else if config.tls.is_none() {
                    err_reply(&mut out, o, rep::ERR_POLICY, "this server has no TLS credentials configured");
                } else {
                    proto::encode_option_reply(&mut out, o, rep::ACK, &[]);
                    s.write_all(&out).await?;
                    return Ok(Outcome::StartTls);
                }
            }
            opt::INFO | opt::GO => {
                let Some(req) = proto::parse_info_request(&payload) else {
                    err_reply(&mut out, o, rep::ERR_INVALID, "malformed NBD_OPT_INFO/GO request");
                    s.write_all(&out).await?;
                    continue;
                };
                exports.ready(&req.name).await;
                let Some(dev) = exports.open(&req.name) else {
                    let msg = exports.unknown_export(&req.name);
                    err_reply(&mut out, o, rep::ERR_UNKNOWN, &msg);
                    s.write_all(&out).await?;
                    continue;
                };
                let mut d = info::EXPORT.to_be_bytes().to_vec();
                d.extend_from_slice(&dev.size().to_be_bytes());
                d.extend_from_slice(&transmission_flags(dev.read_only(), neg).to_be_bytes());
                proto::encode_option_reply(&mut out, o, rep::INFO, &d);
                for r in &req.requests {
                    match *r {
                        info::NAME => {
                            let mut d = info::NAME.to_be_bytes().to_vec();
                            d.extend_from_slice(req.name.as_bytes());
                            proto::encode_option_reply(&mut out, o, rep::INFO, &d);
                        }
                        info::DESCRIPTION => {
                            let mut d = info::DESCRIPTION.to_be_bytes().to_vec();
                            let desc = if dev.read_only() { "Keel snapshot (read-only)" } else { "Keel thin volume" };
                            d.extend_from_slice(desc.as_bytes());
                            proto::encode_option_reply(&mut out, o, rep::INFO, &d);
                        }
                        info::BLOCK_SIZE => {
                            let mut d = info::BLOCK_SIZE.to_be_bytes().to_vec();
                            d.extend_from_slice(&MIN_BLOCK.to_be_bytes());
                            d.extend_from_slice(&PREFERRED_BLOCK.to_be_bytes());
                            d.extend_from_slice(&config.max_payload.to_be_bytes());
                            proto::encode_option_reply(&mut out, o, rep::INFO, &d);
                        }
                        _ => {}
                    }
                }
                proto::encode_option_reply(&mut out, o, rep::ACK, &[]);
                s.write_all(&out).await?;
                if o == opt::GO {
                    if neg.contexts_for != req.name {
                        neg.contexts.clear();
                    }
                    return Ok(Outcome::Transmit(dev, req.name));
                }
                continue;
            }
            opt::STRUCTURED_REPLY => {
                if !payload.is_empty() {
                    err_reply(&mut out, o, rep::ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data");
                } else if neg.extended {
                    err_reply(&mut out, o, rep::ERR_INVALID, "extended headers are already on");
                } else {
                    neg.structured = true;
                    proto::encode_option_reply(&mut out, o, rep::ACK, &[]);
                }
            }
            opt::EXTENDED_HEADERS => {
                if !payload.is_empty() {
                    err_reply(&mut out, o, rep::ERR_INVALID, "NBD_OPT_EXTENDED_HEADERS takes no data");
                } else {
                    neg.extended = true;
                    neg.structured = true;
                    proto::encode_option_reply(&mut out, o, rep::ACK, &[]);
                }
            }
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                let set = o == opt::SET_META_CONTEXT;
                if set {
                    // A SET replaces the selection, even when it fails.
                    neg.contexts.clear();
                    neg.contexts_for.clear();
                }
                match proto::parse_meta_request(&payload) {
                    None => err_reply(&mut out, o, rep::ERR_INVALID, "malformed meta context request"),
                    Some(_) if set && !neg.structured => {
                        err_reply(&mut out, o, rep::ERR_INVALID, "negotiate structured replies first")
                    }
                    Some(req) if exports.open(&req.name).is_none() => {
                        err_reply(&mut out, o, rep::ERR_UNKNOWN, &exports.unknown_export(&req.name))
                    }
                    Some(req) => {
                        let bitmaps = exports.bitmaps(&req.name);
                        let found = match_contexts(&req.queries, &bitmaps, !set);
                        for (i, c) in found.iter().enumerate() {
                            let id: u32 = if set { i as u32 + 1 } else { 0 };
                            let mut d = id.to_be_bytes().to_vec();
                            d.extend_from_slice(c.name().as_bytes());
                            proto::encode_option_reply(&mut out, o, rep::META_CONTEXT, &d);
                        }
                        if set {
                            neg.contexts = found;
                            neg.contexts_for = req.name;
                        }
                        proto::encode_option_reply(&mut out, o, rep::ACK, &[]);
                    }
                }
            }
            _ => {
                let msg = format!("option {o} is not supported");
                err_reply(&mut out, o, rep::ERR_UNSUP, &msg);
            }
        }
        s.write_all(&out).await?;
    }
}

/// The contexts a list of queries selects. Prefix queries (`base:`,
/// `qemu:`, `qemu:dirty-bitmap:`) and an empty list match everything, but
/// only when listing.
fn match_contexts(queries: &[String], bitmaps: &[String], listing: bool) -> Vec<Context> {
    let mut out: Vec<Context> = Vec::new();
    let mut add = |c: Context| {
        if !out.contains(&c) {
            out.push(c);
        }
    };
    if queries.is_empty() && listing {
        add(Context::Allocation);
        bitmaps.iter().for_each(|b| add(Context::Dirty(b.clone())));
    }
    for q in queries {
        if q == "base:allocation" || (listing && q == "base:") {
            add(Context::Allocation);
        } else if let Some(b) = q.strip_prefix("qemu:dirty-bitmap:") {
            if b.is_empty() && listing {
                bitmaps.iter().for_each(|b| add(Context::Dirty(b.clone())));
            } else if bitmaps.iter().any(|x| x == b) {
                add(Context::Dirty(b.to_string()));
            }
        } else if listing && q == "qemu:" {
            bitmaps.iter().for_each(|b| add(Context::Dirty(b.clone())));
        }
    }
    out
}

/// Shared state of a connection in transmission.
struct Conn<D, W> {
    dev: Arc<D>,
    structured: bool,
    extended: bool,
    contexts: Vec<Context>,
    max_payload: u64,
    /// The write half. Only the task that set [`OutState::busy`] locks it
    /// (and the connection's end, to shut it down).
    writer: Mutex<W>,
    out: std::sync::Mutex<OutState>,
    bufs: keel_blockstore::BufPool,
}

/// Replies waiting for the socket. Replies are combined: the task whose
/// reply finds nobody writing becomes the writer and sends everything
/// queued, in one `writev` per round, until the queue is empty; a task that
/// finds a writer at work queues its reply and is done. Replies that finish
/// together (a batch of completions) then cost one system call, not one
/// each, and the client's side of the socket wakes up once for them.
#[derive(Default)]
struct OutState {
    busy: bool,
    /// The connection failed to write: later replies are dropped.
    broken: bool,
    queue: Vec<Reply>,
}

/// A request's admission to the connection (its slot and its buffer
/// budget), released when its reply has been written (or dropped).
struct Keep {
    _slot: tokio::sync::OwnedSemaphorePermit,
    _bytes: tokio::sync::OwnedSemaphorePermit,
}

/// One reply, owning its bytes until they are written.
struct Reply {
    body: Body,
    _keep: Keep,
}

enum Body {
    /// A header alone (a status reply).
    Head(proto::Header),
    /// A header and `len` bytes of a buffer (a read).
    Data(proto::Header, AlignedBuf, usize),
    /// Bytes built on the heap (errors, block status).
    Owned(Vec<u8>),
    /// A sparse read: chunk headers, the extents they describe, the buffer
    /// holding the allocated ones, and the read's offset.
    Sparse(Vec<proto::Header>, Vec<keel_blockstore::Extent>, AlignedBuf, u64),
}

impl Body {
    fn parts<'a>(&'a self, out: &mut Vec<&'a [u8]>) {
        match self {
            Body::Head(h) => out.push(h.bytes()),
            Body::Data(h, buf, len) => {
                out.push(h.bytes());
                out.push(&buf[..*len]);
            }
            Body::Owned(v) => out.push(v),
            Body::Sparse(headers, ext, buf, offset) => {
                for (e, h) in ext.iter().zip(headers) {
                    out.push(h.bytes());
                    if e.allocated {
                        let at = (e.offset - offset) as usize;
                        out.push(&buf[at..at + e.length as usize]);
                    }
                }
            }
        }
    }

    fn into_buf(self) -> Option<AlignedBuf> {
        match self {
            Body::Data(_, b, _) | Body::Sparse(_, _, b, _) => Some(b),
            _ => None,
        }
    }
}

async fn transmit<D, R, W>(
    r: R,
    w: W,
    dev: Arc<D>,
    neg: Negotiated,
    config: &ServerConfig,
    mut evict: Option<tokio::sync::watch::Receiver<u64>>,
) -> io::Result<()>
where
    D: BlockDevice + 'static,
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let conn = Arc::new(Conn {
        dev,
        structured: neg.structured,
        extended: neg.extended,
        contexts: neg.contexts,
        max_payload: config.max_payload as u64,
        writer: Mutex::new(w),
        out: Default::default(),
        bufs: Default::default(),
    });
    let slots = config.max_inflight.max(1);
    let sem = Arc::new(Semaphore::new(slots));
    // Bytes of read and write buffers in flight, in 4 KiB units: a client
    // that queues many large reads without reading the replies cannot make
    // the server hold more than this.
    let budget_units = (INFLIGHT_BYTES / 4096) as u32;
    let bytes = Arc::new(Semaphore::new(budget_units as usize));
    let mut reader = BufReader::with_capacity(256 * 1024, r);
    let hlen = if conn.extended { 32 } else { 28 };
    let result = loop {
        let mut h = [0u8; 32];
        let header = reader.read_exact(&mut h[..hlen]);
        let got = match evict.as_mut() {
            // Evicted between requests (a header half read is lost with the
            // connection; the client resends it after reconnecting).
            Some(rx) => tokio::select! {
                r = header => r,
                _ = evicted(rx) => break Ok(()),
            },
            None => header.await,
        };
        match got {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break Ok(()),
            Err(e) => break Err(e),
        }
        let req = match proto::decode_request(&h[..hlen], conn.extended, conn.max_payload) {
            Ok(Some((req, _))) => req,
            Ok(None) => unreachable!("a whole header was read"),
            Err(e) => {
                // The stream is out of sync (or a write payload is too big
                // to skip safely): the protocol says to close.
                break Err(io::Error::other(format!("protocol error: {e}")));
            }
        };
        let units = if matches!(req.kind, cmd::READ | cmd::WRITE) {
            (req.len.div_ceil(4096).max(1) as u32).min(budget_units)
        } else {
            0
        };
        let byte_permit = bytes.clone().acquire_many_owned(units).await.expect("semaphore open");
        let payload = if req.kind == cmd::WRITE {
            let mut buf = conn.bufs.get(req.len as usize);
            if let Err(e) = reader.read_exact(&mut buf[..req.len as usize]).await {
                break Err(e);
            }
            Some(buf)
        } else {
            None
        };
        if req.kind == cmd::DISC {
            break Ok(());
        }
        let permit = sem.clone().acquire_owned().await.expect("semaphore open");
        let conn = conn.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.handle(req, payload, Keep { _slot: permit, _bytes: byte_permit }).await {
                tracing::debug!("reply not sent: {e}");
            }
        });
    };
    // Let requests in flight finish (their writes are acknowledged only if
    // the reply goes out; either way they complete in the store).
    let _ = sem.acquire_many(slots as u32).await;
    let _ = conn.writer.lock().await.shutdown().await;
    result
}

/// Resolves when the watch's value changes; never when its sender is gone
/// (nothing can evict the connection any more).
async fn evicted(rx: &mut tokio::sync::watch::Receiver<u64>) {
    if rx.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

fn errno_of(e: &StoreError) -> u32 {
    match e.kind() {
        ErrorKind::NoSpace => errno::ENOSPC,
        ErrorKind::ReadOnly => errno::EPERM,
        ErrorKind::OutOfRange | ErrorKind::Invalid => errno::EINVAL,
        _ => errno::EIO,
    }
}

/// Write every slice, however the socket splits it.
async fn write_all_vectored<W: AsyncWrite + Unpin>(w: &mut W, parts: &[&[u8]]) -> io::Result<()> {
    let mut idx = 0;
    let mut off = 0;
    while idx < parts.len() {
        let mut slices: [IoSlice<'_>; 64] = [IoSlice::new(&[]); 64];
        let mut n = 0;
        for (k, p) in parts[idx..].iter().take(64).enumerate() {
            slices[k] = IoSlice::new(if k == 0 { &p[off..] } else { p });
            n += 1;
        }
        let mut wrote = w.write_vectored(&slices[..n]).await?;
        if wrote == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        while idx < parts.len() && wrote > 0 {
            let left = parts[idx].len() - off;
            if wrote >= left {
                wrote -= left;
                idx += 1;
                off = 0;
            } else {
                off += wrote;
                wrote = 0;
            }
        }
    }
    // TLS streams keep the tail of a record until flushed.
    w.flush().await
}

impl<D: BlockDevice, W: AsyncWrite + Unpin + Send> Conn<D, W> {
    /// Queue `body` and, unless another task is writing, write everything
    /// queued (see [`OutState`]).
    async fn send(&self, body: Body, keep: Keep) -> io::Result<()> {
        {
            let mut st = self.out.lock().unwrap_or_else(|e| e.into_inner());
            if st.broken {
                drop(st);
                if let Some(b) = body.into_buf() {
                    self.bufs.put(b);
                }
                return Err(io::Error::other("the connection failed to write an earlier reply"));
            }
            st.queue.push(Reply { body, _keep: keep });
            if st.busy {
                return Ok(());
            }
            st.busy = true;
        }
        let mut w = self.writer.lock().await;
        let mut batch = Vec::new();
        loop {
            {
                let mut st = self.out.lock().unwrap_or_else(|e| e.into_inner());
                if st.queue.is_empty() {
                    st.busy = false;
                    return Ok(());
                }
                std::mem::swap(&mut batch, &mut st.queue);
            }
            let mut parts = Vec::with_capacity(batch.len() * 2);
            batch.iter().for_each(|r| r.body.parts(&mut parts));
            let res = write_all_vectored(&mut *w, &parts).await;
            drop(parts);
            for r in batch.drain(..) {
                if let Some(b) = r.body.into_buf() {
                    self.bufs.put(b);
                }
            }
            if let Err(e) = res {
                let mut st = self.out.lock().unwrap_or_else(|e| e.into_inner());
                st.broken = true;
                st.busy = false;
                st.queue.clear();
                return Err(e);
            }
        }
    }

    /// Send a reply with no data: success or an errno.
    async fn reply_status(&self, cookie: u64, error: u32, msg: &str, keep: Keep) -> io::Result<()> {
        if error != 0 && (self.extended || self.structured) {
            let mut h = Vec::with_capacity(64);
            proto::encode_error_chunk(&mut h, self.extended, cookie, error, msg);
            return self.send(Body::Owned(h), keep).await;
        }
        let mut h = proto::Header::default();
        if self.extended {
            proto::encode_chunk_header(&mut h, true, chunk::FLAG_DONE, chunk::NONE, cookie, 0, 0);
        } else {
            proto::encode_simple_reply(&mut h, cookie, error);
        }
        self.send(Body::Head(h), keep).await
    }

    fn check_range(&self, req: &proto::Request, write: bool) -> Result<(), (u32, String)> {
        let size = self.dev.size();
        let end = req.offset.checked_add(req.len);
        if end.is_none_or(|e| e > size) {
            let e = if write { errno::ENOSPC } else { errno::EINVAL };
            return Err((
                e,
                format!("request at {}+{} goes beyond the end of the export ({size} bytes)", req.offset, req.len),
            ));
        }
        if !req.offset.is_multiple_of(MIN_BLOCK as u64) || !req.len.is_multiple_of(MIN_BLOCK as u64) {
            return Err((
                errno::EINVAL,
                format!("request at {}+{} is not aligned to {MIN_BLOCK} bytes", req.offset, req.len),
            ));
        }
        Ok(())
    }

    async fn handle(&self, req: proto::Request, payload: Option<AlignedBuf>, keep: Keep) -> io::Result<()> {
        let writes = matches!(req.kind, cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES);
        if writes && self.dev.read_only() {
            if let Some(b) = payload {
                self.bufs.put(b);
            }
            return self.reply_status(req.cookie, errno::EPERM, "the export is read-only", keep).await;
        }
        if matches!(req.kind, cmd::READ | cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES | cmd::CACHE | cmd::BLOCK_STATUS)
            && let Err((e, msg)) = self.check_range(&req, matches!(req.kind, cmd::WRITE | cmd::WRITE_ZEROES))
        {
            if let Some(b) = payload {
                self.bufs.put(b);
            }
            return self.reply_status(req.cookie, e, &msg, keep).await;
        }
        let known = match req.kind {
            cmd::READ => cflag::DF,
            cmd::WRITE | cmd::TRIM => cflag::FUA,
            cmd::WRITE_ZEROES => cflag::FUA | cflag::NO_HOLE | cflag::FAST_ZERO,
            cmd::BLOCK_STATUS => cflag::REQ_ONE,
            _ => 0,
        };
        if req.flags & !known != 0 {
            let msg = format!("flags {:#x} are not valid for command {}", req.flags & !known, req.kind);
            return self.reply_status(req.cookie, errno::EINVAL, &msg, keep).await;
        }
        let fua = req.flags & cflag::FUA != 0;
        match req.kind {
            cmd::READ => self.read(req, keep).await,
            cmd::WRITE => {
                let buf = payload.expect("write payload");
                let r = self.dev.write(req.offset, &buf[..req.len as usize], fua).await;
                self.bufs.put(buf);
                self.status(req.cookie, r, keep).await
            }
            cmd::FLUSH => {
                let r = self.dev.flush().await;
                self.status(req.cookie, r, keep).await
            }
            cmd::TRIM => {
                let r = self.dev.discard(req.offset, req.len).await;
                let r = match r {
                    Ok(()) if fua => self.dev.flush().await,
                    r => r,
                };
                self.status(req.cookie, r, keep).await
            }
            cmd::WRITE_ZEROES => {
                if req.flags & cflag::NO_HOLE != 0 {
                    if req.flags & cflag::FAST_ZERO != 0 {
                        // Writing real zeros is not faster than the client
                        // doing it itself.
                        return self
                            .reply_status(req.cookie, errno::ENOTSUP, "zeroing without holes is not fast", keep)
                            .await;
                    }
                    let r = self.write_zero_blocks(req.offset, req.len, fua).await;
                    return self.status(req.cookie, r, keep).await;
                }
                let r = self.dev.write_zeroes(req.offset, req.len, fua).await;
                self.status(req.cookie, r, keep).await
            }
            cmd::CACHE => {
                let r = self.dev.prefetch(req.offset, req.len).await;
                self.status(req.cookie, r, keep).await
            }
            // Boxed: its map walks would make every request's future (which
            // is copied as the request's task is spawned) several KiB.
            cmd::BLOCK_STATUS => Box::pin(self.block_status(req, keep)).await,
            other => {
                let msg = format!("command {other} is not supported");
                self.reply_status(req.cookie, errno::EINVAL, &msg, keep).await
            }
        }
    }

    async fn status(&self, cookie: u64, r: keel_blockstore::Result<()>, keep: Keep) -> io::Result<()> {
        match r {
            Ok(()) => self.reply_status(cookie, 0, "", keep).await,
            Err(e) => {
                tracing::warn!("NBD request failed: {e}");
                self.reply_status(cookie, errno_of(&e), &e.to_string(), keep).await
            }
        }
    }

    async fn write_zero_blocks(&self, mut offset: u64, len: u64, fua: bool) -> keel_blockstore::Result<()> {
        let end = offset + len;
        let chunk = (1u64 << 20).min(len) as usize;
        let zeros = AlignedBuf::new(chunk);
        while offset < end {
            let n = (end - offset).min(chunk as u64) as usize;
            self.dev.write(offset, &zeros[..n], false).await?;
            offset += n as u64;
        }
        if fua { self.dev.flush().await } else { Ok(()) }
    }

    async fn read(&self, req: proto::Request, keep: Keep) -> io::Result<()> {
        let len = req.len as usize;
        if req.len > self.max_payload {
            let msg = format!("read of {} bytes is over the {} byte limit", req.len, self.max_payload);
            let e = if req.flags & cflag::DF != 0 { errno::EOVERFLOW } else { errno::EINVAL };
            return self.reply_status(req.cookie, e, &msg, keep).await;
        }
        if len == 0 {
            return self.reply_status(req.cookie, errno::EINVAL, "zero-length read", keep).await;
        }
        let mut buf = self.bufs.get(len);
        let sparse = self.structured && req.flags & cflag::DF == 0 && req.len >= SPARSE_READ_MIN;
        let extents = if sparse {
            match self.dev.allocation(req.offset, req.len).await {
                Ok(x) => Some(x),
                Err(e) => {
                    self.bufs.put(buf);
                    return self.status(req.cookie, Err(e), keep).await;
                }
            }
        } else {
            None
        };
        // Read the data (only the allocated parts when sparse).
        let r = match &extents {
            None => self.dev.read(req.offset, &mut buf[..len]).await,
            Some(ext) => {
                let mut r = Ok(());
                for e in ext.iter().filter(|e| e.allocated) {
                    let at = (e.offset - req.offset) as usize;
                    r = self.dev.read(e.offset, &mut buf[at..at + e.length as usize]).await;
                    if r.is_err() {
                        break;
                    }
                }
                r
            }
        };
        if let Err(e) = r {
            self.bufs.put(buf);
            return self.status(req.cookie, Err(e), keep).await;
        }
        match extents {
            None => {
                // The common case: one reply (or one data chunk) with all
                // the bytes; its header is built without allocating.
                let h = if self.structured {
                    self.data_chunk(req.cookie, chunk::FLAG_DONE, req.offset, req.len)
                } else {
                    let mut h = proto::Header::default();
                    proto::encode_simple_reply(&mut h, req.cookie, 0);
                    h
                };
                self.send(Body::Data(h, buf, len), keep).await
            }
            Some(ext) => {
                let headers = (ext.iter().enumerate())
                    .map(|(i, e)| {
                        let flags = if i + 1 == ext.len() { chunk::FLAG_DONE } else { 0 };
                        if e.allocated {
                            self.data_chunk(req.cookie, flags, e.offset, e.length)
                        } else {
                            let mut h = proto::Header::default();
                            proto::encode_chunk_header(
                                &mut h,
                                self.extended,
                                flags,
                                chunk::OFFSET_HOLE,
                                req.cookie,
                                e.offset,
                                12,
                            );
                            h.put(&e.offset.to_be_bytes());
                            h.put(&(e.length as u32).to_be_bytes());
                            h
                        }
                    })
                    .collect();
                self.send(Body::Sparse(headers, ext, buf, req.offset), keep).await
            }
        }
    }

    /// The header of an OFFSET_DATA chunk carrying `len` bytes at `offset`
    /// (its offset field included).
    fn data_chunk(&self, cookie: u64, flags: u16, offset: u64, len: u64) -> proto::Header {
        let mut h = proto::Header::default();
        proto::encode_chunk_header(&mut h, self.extended, flags, chunk::OFFSET_DATA, cookie, offset, 8 + len);
        h.put(&offset.to_be_bytes());
        h
    }

    async fn block_status(&self, req: proto::Request, keep: Keep) -> io::Result<()> {
        if !self.structured || self.contexts.is_empty() {
            return self
                .reply_status(
                    req.cookie,
                    errno::EINVAL,
                    "block status needs structured replies and a meta context",
                    keep,
                )
                .await;
        }
        if req.len == 0 {
            return self.reply_status(req.cookie, errno::EINVAL, "zero-length block status", keep).await;
        }
        let one = req.flags & cflag::REQ_ONE != 0;
        let mut out = Vec::new();
        for (i, ctx) in self.contexts.iter().enumerate() {
            let descs: Vec<(u64, u32)> = match ctx {
                Context::Allocation => match self.dev.allocation(req.offset, req.len).await {
                    Ok(ext) => ext
                        .iter()
                        .map(|e| (e.length, if e.allocated { 0 } else { proto::STATE_HOLE | proto::STATE_ZERO }))
                        .collect(),
                    Err(e) => return self.status(req.cookie, Err(e), keep).await,
                },
                Context::Dirty(snap) => match self.dev.changed_since(snap).await {
                    Ok(ranges) => dirty_extents(&ranges, req.offset, req.len),
                    Err(e) => return self.status(req.cookie, Err(e), keep).await,
                },
            };
            let mut descs = split_u32(descs, self.extended);
            descs.truncate(if one { 1 } else { MAX_DESCRIPTORS });
            let flags = if i + 1 == self.contexts.len() { chunk::FLAG_DONE } else { 0 };
            let id = i as u32 + 1;
            if self.extended {
                let len = 8 + 16 * descs.len() as u64;
                proto::encode_chunk_header(&mut out, true, flags, chunk::BLOCK_STATUS_EXT, req.cookie, req.offset, len);
                out.extend_from_slice(&id.to_be_bytes());
                out.extend_from_slice(&(descs.len() as u32).to_be_bytes());
                for (l, f) in descs {
                    out.extend_from_slice(&l.to_be_bytes());
                    out.extend_from_slice(&(f as u64).to_be_bytes());
                }
            } else {
                let len = 4 + 8 * descs.len() as u64;
                proto::encode_chunk_header(&mut out, false, flags, chunk::BLOCK_STATUS, req.cookie, 0, len);
                out.extend_from_slice(&id.to_be_bytes());
                for (l, f) in descs {
                    out.extend_from_slice(&(l as u32).to_be_bytes());
                    out.extend_from_slice(&f.to_be_bytes());
                }
            }
        }
        self.send(Body::Owned(out), keep).await
    }
}

/// Clean (0) / dirty extents covering `offset..offset+len`.
fn dirty_extents(ranges: &[std::ops::Range<u64>], offset: u64, len: u64) -> Vec<(u64, u32)> {
    let end = offset + len;
    let mut out: Vec<(u64, u32)> = Vec::new();
    let mut at = offset;
    let push = |l: u64, f: u32, out: &mut Vec<(u64, u32)>| {
        if l == 0 {
            return;
        }
        match out.last_mut() {
            Some(last) if last.1 == f => last.0 += l,
            _ => out.push((l, f)),
        }
    };
    for r in ranges {
        let (s, e) = (r.start.max(offset), r.end.min(end));
        if s >= e {
            continue;
        }
        push(s - at, 0, &mut out);
        push(e - s, proto::STATE_DIRTY, &mut out);
        at = e;
    }
    push(end - at, 0, &mut out);
    out
}

/// Compact block status lengths are 32-bit: split longer extents.
fn split_u32(descs: Vec<(u64, u32)>, extended: bool) -> Vec<(u64, u32)> {
    if extended {
        return descs;
    }
    const MAX: u64 = 0xFFFF_F000;
    let mut out = Vec::with_capacity(descs.len());
    for (mut l, f) in descs {
        while l > MAX {
            out.push((MAX, f));
            l -= MAX;
        }
        out.push((l, f));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirty_extents_cover_the_window_exactly() {
        let r = vec![4096..8192, 16384..20480];
        assert_eq!(dirty_extents(&r, 0, 32768), vec![(4096, 0), (4096, 1), (8192, 0), (4096, 1), (12288, 0)]);
        assert_eq!(dirty_extents(&r, 6144, 4096), vec![(2048, 1), (2048, 0)]);
        assert_eq!(dirty_extents(&[], 0, 512), vec![(512, 0)]);
    }

    #[test]
    fn prefix_queries_match_only_when_listing() {
        let b = vec!["s1".to_string()];
        assert_eq!(match_contexts(&["qemu:".into()], &b, true), vec![Context::Dirty("s1".into())]);
        assert_eq!(match_contexts(&["qemu:".into()], &b, false), vec![]);
        assert_eq!(match_contexts(&["qemu:dirty-bitmap:s2".into()], &b, false), vec![]);
        assert_eq!(match_contexts(&[], &b, true).len(), 2);
    }
}
