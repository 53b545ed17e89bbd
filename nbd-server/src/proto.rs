//! The NBD wire protocol (the NetworkBlockDevice project's `doc/proto.md`)
//! as a pure codec: constants, typed messages, `decode` functions that say
//! "incomplete" instead of waiting, and `encode` functions that append to a
//! buffer. Nothing here touches a socket (mini-redis `frame.rs` style).

use thiserror::Error;

/// "NBDMAGIC": first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": newstyle negotiation magic (server greeting and option requests).
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// Magic of an option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a compact request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of an extended request (64-bit length).
pub const EXT_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Magic of an extended reply chunk.
pub const EXT_REPLY_MAGIC: u32 = 0x6e8a_278c;

/// Handshake flags (server).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: no 124 bytes of zeroes after NBD_OPT_EXPORT_NAME.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: no zeroes.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Options.
pub mod opt {
    pub const EXPORT_NAME: u32 = 1;
    pub const ABORT: u32 = 2;
    pub const LIST: u32 = 3;
    pub const STARTTLS: u32 = 5;
    pub const INFO: u32 = 6;
    pub const GO: u32 = 7;
    pub const STRUCTURED_REPLY: u32 = 8;
    pub const LIST_META_CONTEXT: u32 = 9;
    pub const SET_META_CONTEXT: u32 = 10;
    pub const EXTENDED_HEADERS: u32 = 11;
}

/// Option reply types.
pub mod rep {
    pub const ACK: u32 = 1;
    pub const SERVER: u32 = 2;
    pub const INFO: u32 = 3;
    pub const META_CONTEXT: u32 = 4;
    const ERR: u32 = 1 << 31;
    pub const ERR_UNSUP: u32 = ERR + 1;
    pub const ERR_POLICY: u32 = ERR + 2;
    pub const ERR_INVALID: u32 = ERR + 3;
    pub const ERR_PLATFORM: u32 = ERR + 4;
    pub const ERR_TLS_REQD: u32 = ERR + 5;
    pub const ERR_UNKNOWN: u32 = ERR + 6;
    pub const ERR_SHUTDOWN: u32 = ERR + 7;
    pub const ERR_BLOCK_SIZE_REQD: u32 = ERR + 8;
    pub const ERR_TOO_BIG: u32 = ERR + 9;
    pub const ERR_EXT_HEADER_REQD: u32 = ERR + 10;
}

/// NBD_INFO types.
pub mod info {
    pub const EXPORT: u16 = 0;
    pub const NAME: u16 = 1;
    pub const DESCRIPTION: u16 = 2;
    pub const BLOCK_SIZE: u16 = 3;
}

/// Transmission flags.
pub mod tflag {
    pub const HAS_FLAGS: u16 = 1 << 0;
    pub const READ_ONLY: u16 = 1 << 1;
    pub const SEND_FLUSH: u16 = 1 << 2;
    pub const SEND_FUA: u16 = 1 << 3;
    pub const SEND_TRIM: u16 = 1 << 5;
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    pub const SEND_DF: u16 = 1 << 7;
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    pub const SEND_CACHE: u16 = 1 << 10;
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
}

/// Commands.
pub mod cmd {
    pub const READ: u16 = 0;
    pub const WRITE: u16 = 1;
    pub const DISC: u16 = 2;
    pub const FLUSH: u16 = 3;
    pub const TRIM: u16 = 4;
    pub const CACHE: u16 = 5;
    pub const WRITE_ZEROES: u16 = 6;
    pub const BLOCK_STATUS: u16 = 7;
}

/// Command flags.
pub mod cflag {
    pub const FUA: u16 = 1 << 0;
    pub const NO_HOLE: u16 = 1 << 1;
    pub const DF: u16 = 1 << 2;
    pub const REQ_ONE: u16 = 1 << 3;
    pub const FAST_ZERO: u16 = 1 << 4;
    pub const PAYLOAD_LEN: u16 = 1 << 5;
}

/// Structured reply chunk types.
pub mod chunk {
    pub const NONE: u16 = 0;
    pub const OFFSET_DATA: u16 = 1;
    pub const OFFSET_HOLE: u16 = 2;
    pub const BLOCK_STATUS: u16 = 5;
    pub const BLOCK_STATUS_EXT: u16 = 6;
    pub const ERROR: u16 = (1 << 15) + 1;
    pub const ERROR_OFFSET: u16 = (1 << 15) + 2;
    /// Flag: last chunk of the reply.
    pub const FLAG_DONE: u16 = 1;
}

/// Errno values NBD uses.
pub mod errno {
    pub const EPERM: u32 = 1;
    pub const EIO: u32 = 5;
    pub const ENOMEM: u32 = 12;
    pub const EINVAL: u32 = 22;
    pub const ENOSPC: u32 = 28;
    pub const EOVERFLOW: u32 = 75;
    pub const ENOTSUP: u32 = 95;
    pub const ESHUTDOWN: u32 = 108;
}

/// base:allocation flags.
pub const STATE_HOLE: u32 = 1;
/// base:allocation flags.
pub const STATE_ZERO: u32 = 2;
/// qemu:dirty-bitmap flag.
pub const STATE_DIRTY: u32 = 1;

/// Longest option payload accepted (the protocol suggests servers may limit
/// it; names are at most 4096 bytes).
pub const MAX_OPTION_LEN: u32 = 64 * 1024;

/// A codec error: the peer broke the protocol. The connection ends.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ProtoError {
    /// Wrong magic number.
    #[error("bad magic {0:#x}")]
    BadMagic(u64),
    /// An option payload over [`MAX_OPTION_LEN`].
    #[error("option payload of {0} bytes is too large")]
    OptionTooLarge(u32),
    /// A write payload over the negotiated maximum.
    #[error("request payload of {0} bytes is too large")]
    PayloadTooLarge(u64),
}

/// Result of a decode: a value and the bytes it used, or `None` when more
/// bytes are needed.
pub type Decoded<T> = Result<Option<(T, usize)>, ProtoError>;

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().expect("4 bytes"))
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().expect("8 bytes"))
}

/// The server's greeting (fixed newstyle).
pub fn encode_greeting(out: &mut Vec<u8>) {
    out.extend_from_slice(&NBDMAGIC.to_be_bytes());
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
}

/// An option request header; its payload follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionHeader {
    /// Option number.
    pub option: u32,
    /// Payload length.
    pub len: u32,
}

/// Decode an option request header (16 bytes).
pub fn decode_option_header(b: &[u8]) -> Decoded<OptionHeader> {
    if b.len() < 16 {
        return Ok(None);
    }
    let magic = be64(b);
    if magic != IHAVEOPT {
        return Err(ProtoError::BadMagic(magic));
    }
    let h = OptionHeader { option: be32(&b[8..]), len: be32(&b[12..]) };
    if h.len > MAX_OPTION_LEN {
        return Err(ProtoError::OptionTooLarge(h.len));
    }
    Ok(Some((h, 16)))
}

/// Append an option reply.
pub fn encode_option_reply(out: &mut Vec<u8>, option: u32, reply: u32, data: &[u8]) {
    out.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// The payload of INFO/GO: export name and requested info types.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InfoRequest {
    /// Export name.
    pub name: String,
    /// NBD_INFO_* types asked for.
    pub requests: Vec<u16>,
}

/// Parse the payload of NBD_OPT_INFO / NBD_OPT_GO.
pub fn parse_info_request(p: &[u8]) -> Option<InfoRequest> {
    if p.len() < 4 {
        return None;
    }
    let n = be32(p) as usize;
    let rest = p.get(4..)?;
    let name = std::str::from_utf8(rest.get(..n)?).ok()?.to_string();
    let rest = &rest[n..];
    if rest.len() < 2 {
        return None;
    }
    let count = be16(rest) as usize;
    let rest = &rest[2..];
    if rest.len() != count * 2 {
        return None;
    }
    let requests = rest.chunks_exact(2).map(be16).collect();
    Some(InfoRequest { name, requests })
}

/// The payload of LIST_META_CONTEXT / SET_META_CONTEXT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetaRequest {
    /// Export name.
    pub name: String,
    /// Context queries.
    pub queries: Vec<String>,
}

/// Parse the payload of NBD_OPT_LIST_META_CONTEXT / SET_META_CONTEXT.
pub fn parse_meta_request(p: &[u8]) -> Option<MetaRequest> {
    let mut at = 0usize;
    let mut take = |n: usize| -> Option<&[u8]> {
        let s = p.get(at..at + n)?;
        at += n;
        Some(s)
    };
    let n = be32(take(4)?) as usize;
    let name = std::str::from_utf8(take(n)?).ok()?.to_string();
    let count = be32(take(4)?) as usize;
    let mut queries = Vec::with_capacity(count.min(64));
    for _ in 0..count {
        let l = be32(take(4)?) as usize;
        queries.push(std::str::from_utf8(take(l)?).ok()?.to_string());
    }
    if at != p.len() {
        return None;
    }
    Some(MetaRequest { name, queries })
}

/// A transmission-phase request header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// Command flags.
    pub flags: u16,
    /// Command.
    pub kind: u16,
    /// Cookie echoed in the reply.
    pub cookie: u64,
    /// Offset.
    pub offset: u64,
    /// Length (for a write, also the payload length).
    pub len: u64,
}

/// Decode a request header: 28 bytes compact, 32 bytes with extended
/// headers. `max_payload` bounds write payloads.
pub fn decode_request(b: &[u8], extended: bool, max_payload: u64) -> Decoded<Request> {
    let size = if extended { 32 } else { 28 };
    if b.len() < size {
        return Ok(None);
    }
    let magic = be32(b);
    let want = if extended { EXT_REQUEST_MAGIC } else { REQUEST_MAGIC };
    if magic != want {
        return Err(ProtoError::BadMagic(magic as u64));
    }
    let len = if extended { be64(&b[24..]) } else { be32(&b[24..]) as u64 };
    let r = Request { flags: be16(&b[4..]), kind: be16(&b[6..]), cookie: be64(&b[8..]), offset: be64(&b[16..]), len };
    if r.kind == cmd::WRITE && r.len > max_payload {
        return Err(ProtoError::PayloadTooLarge(r.len));
    }
    Ok(Some((r, size)))
}

/// Where reply encoders put bytes: a `Vec`, or a [`Header`] on the stack.
pub trait Out {
    /// Append `b`.
    fn put(&mut self, b: &[u8]);
}

impl Out for Vec<u8> {
    fn put(&mut self, b: &[u8]) {
        self.extend_from_slice(b);
    }
}

/// A reply header (and a chunk's offset field) built without allocating.
pub struct Header {
    buf: [u8; 48],
    len: usize,
}

impl Default for Header {
    fn default() -> Self {
        Header { buf: [0; 48], len: 0 }
    }
}

impl Header {
    /// The bytes put so far.
    pub fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Out for Header {
    fn put(&mut self, b: &[u8]) {
        self.buf[self.len..self.len + b.len()].copy_from_slice(b);
        self.len += b.len();
    }
}

/// Encode a simple reply header (data, if any, follows).
pub fn encode_simple_reply(out: &mut impl Out, cookie: u64, error: u32) {
    out.put(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.put(&error.to_be_bytes());
    out.put(&cookie.to_be_bytes());
}

/// Encode a structured (or, with `extended`, extended) reply chunk header
/// for a payload of `len` bytes at `offset` (the offset field exists only
/// in extended headers).
pub fn encode_chunk_header(
    out: &mut impl Out,
    extended: bool,
    flags: u16,
    kind: u16,
    cookie: u64,
    offset: u64,
    len: u64,
) {
    if extended {
        out.put(&EXT_REPLY_MAGIC.to_be_bytes());
        out.put(&flags.to_be_bytes());
        out.put(&kind.to_be_bytes());
        out.put(&cookie.to_be_bytes());
        out.put(&offset.to_be_bytes());
        out.put(&len.to_be_bytes());
    } else {
        out.put(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        out.put(&flags.to_be_bytes());
        out.put(&kind.to_be_bytes());
        out.put(&cookie.to_be_bytes());
        out.put(&(len as u32).to_be_bytes());
    }
}

/// Encode an error chunk (structured replies) with a message.
pub fn encode_error_chunk(out: &mut Vec<u8>, extended: bool, cookie: u64, error: u32, msg: &str) {
    let msg = &msg.as_bytes()[..msg.len().min(4096)];
    encode_chunk_header(out, extended, chunk::FLAG_DONE, chunk::ERROR, cookie, 0, 6 + msg.len() as u64);
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg);
}

/// Run every decoder over `data` (the fuzz target's body, also used by the
/// property test so the stable test suite exercises the same code).
pub fn fuzz_all(data: &[u8]) {
    let _ = decode_option_header(data);
    let _ = parse_info_request(data);
    let _ = parse_meta_request(data);
    for extended in [false, true] {
        if let Ok(Some((r, n))) = decode_request(data, extended, 32 << 20) {
            assert_eq!(n, if extended { 32 } else { 28 });
            assert!(r.kind != cmd::WRITE || r.len <= 32 << 20);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trip_and_limits() {
        let mut b = Vec::new();
        b.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b.extend_from_slice(&cflag::FUA.to_be_bytes());
        b.extend_from_slice(&cmd::WRITE.to_be_bytes());
        b.extend_from_slice(&7u64.to_be_bytes());
        b.extend_from_slice(&4096u64.to_be_bytes());
        b.extend_from_slice(&512u32.to_be_bytes());
        assert_eq!(decode_request(&b[..20], false, 1 << 20), Ok(None));
        let (r, n) = decode_request(&b, false, 1 << 20).unwrap().unwrap();
        assert_eq!((r.kind, r.flags, r.cookie, r.offset, r.len, n), (cmd::WRITE, cflag::FUA, 7, 4096, 512, 28));
        assert_eq!(decode_request(&b, false, 256), Err(ProtoError::PayloadTooLarge(512)));
        b[0] ^= 1;
        assert!(matches!(decode_request(&b, false, 1 << 20), Err(ProtoError::BadMagic(_))));
    }

    #[test]
    fn info_and_meta_payloads_parse_strictly() {
        let mut p = Vec::new();
        p.extend_from_slice(&3u32.to_be_bytes());
        p.extend_from_slice(b"vol");
        p.extend_from_slice(&1u16.to_be_bytes());
        p.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
        assert_eq!(parse_info_request(&p), Some(InfoRequest { name: "vol".into(), requests: vec![info::BLOCK_SIZE] }));
        assert_eq!(parse_info_request(&p[..p.len() - 1]), None);
        let mut m = Vec::new();
        m.extend_from_slice(&1u32.to_be_bytes());
        m.extend_from_slice(b"v");
        m.extend_from_slice(&1u32.to_be_bytes());
        m.extend_from_slice(&15u32.to_be_bytes());
        m.extend_from_slice(b"base:allocation");
        assert_eq!(
            parse_meta_request(&m),
            Some(MetaRequest { name: "v".into(), queries: vec!["base:allocation".into()] })
        );
        m.push(0);
        assert_eq!(parse_meta_request(&m), None);
        assert_eq!(parse_meta_request(&[0, 0, 0, 9]), None);
    }

    #[test]
    fn option_header_refuses_huge_payloads() {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&opt::GO.to_be_bytes());
        b.extend_from_slice(&(MAX_OPTION_LEN + 1).to_be_bytes());
        assert_eq!(decode_option_header(&b), Err(ProtoError::OptionTooLarge(MAX_OPTION_LEN + 1)));
    }
}
