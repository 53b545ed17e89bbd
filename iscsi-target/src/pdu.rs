//! iSCSI PDUs (RFC 7143 section 11): the 48-byte Basic Header Segment, the
//! optional header and data digests, and the data segment.
//!
//! Pure code: no I/O. [`Bhs`] is the raw header with typed accessors for
//! the fields every PDU shares; [`Framing`] says how long the rest of a PDU
//! is once its header has been read; [`encode`] lays out a PDU for sending.

/// Length of the Basic Header Segment.
pub const BHS_LEN: usize = 48;

/// Initiator opcodes.
pub mod op {
    /// NOP-Out.
    pub const NOP_OUT: u8 = 0x00;
    /// SCSI Command.
    pub const SCSI_CMD: u8 = 0x01;
    /// SCSI Task Management Function Request.
    pub const TMF_REQ: u8 = 0x02;
    /// Login Request.
    pub const LOGIN_REQ: u8 = 0x03;
    /// Text Request.
    pub const TEXT_REQ: u8 = 0x04;
    /// SCSI Data-Out.
    pub const DATA_OUT: u8 = 0x05;
    /// Logout Request.
    pub const LOGOUT_REQ: u8 = 0x06;
    /// SNACK Request.
    pub const SNACK: u8 = 0x10;
    /// NOP-In.
    pub const NOP_IN: u8 = 0x20;
    /// SCSI Response.
    pub const SCSI_RESP: u8 = 0x21;
    /// SCSI Task Management Function Response.
    pub const TMF_RESP: u8 = 0x22;
    /// Login Response.
    pub const LOGIN_RESP: u8 = 0x23;
    /// Text Response.
    pub const TEXT_RESP: u8 = 0x24;
    /// SCSI Data-In.
    pub const DATA_IN: u8 = 0x25;
    /// Logout Response.
    pub const LOGOUT_RESP: u8 = 0x26;
    /// Ready To Transfer.
    pub const R2T: u8 = 0x31;
    /// Asynchronous Message.
    pub const ASYNC: u8 = 0x32;
    /// Reject.
    pub const REJECT: u8 = 0x3f;
}

/// Reject reasons (RFC 7143 11.17.1).
pub mod reject {
    /// Data (payload) digest error.
    pub const DATA_DIGEST: u8 = 0x02;
    /// SNACK reject.
    pub const SNACK: u8 = 0x03;
    /// Protocol error.
    pub const PROTOCOL: u8 = 0x04;
    /// Command not supported.
    pub const NOT_SUPPORTED: u8 = 0x05;
    /// Immediate command reject: too many immediate commands.
    pub const IMMEDIATE: u8 = 0x06;
    /// Task in progress.
    pub const TASK_IN_PROGRESS: u8 = 0x07;
    /// Invalid data ack.
    pub const INVALID_DATA_ACK: u8 = 0x08;
    /// Invalid PDU field.
    pub const INVALID_FIELD: u8 = 0x09;
    /// Long operation reject: out of resources.
    pub const OUT_OF_RESOURCES: u8 = 0x0a;
    /// Waiting for logout.
    pub const WAITING_FOR_LOGOUT: u8 = 0x0c;
}

/// The Basic Header Segment of one PDU.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Bhs(pub [u8; BHS_LEN]);

impl std::fmt::Debug for Bhs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bhs(op {:#04x} itt {:#010x} len {})", self.opcode(), self.itt(), self.data_len())
    }
}

impl Default for Bhs {
    fn default() -> Self {
        Bhs([0; BHS_LEN])
    }
}

impl Bhs {
    /// A header with `opcode` and everything else zero.
    pub fn new(opcode: u8) -> Bhs {
        let mut b = Bhs::default();
        b.0[0] = opcode & 0x3f;
        b
    }
    /// The opcode (without the immediate bit).
    pub fn opcode(&self) -> u8 {
        self.0[0] & 0x3f
    }
    /// The I (immediate delivery) bit.
    pub fn immediate(&self) -> bool {
        self.0[0] & 0x40 != 0
    }
    /// Byte 1: the F bit and opcode-specific flags.
    pub fn flags(&self) -> u8 {
        self.0[1]
    }
    /// The F (final) bit.
    pub fn final_bit(&self) -> bool {
        self.0[1] & 0x80 != 0
    }
    /// TotalAHSLength in bytes.
    pub fn ahs_len(&self) -> usize {
        self.0[4] as usize * 4
    }
    /// DataSegmentLength in bytes (without padding).
    pub fn data_len(&self) -> usize {
        (self.0[5] as usize) << 16 | (self.0[6] as usize) << 8 | self.0[7] as usize
    }
    /// Set DataSegmentLength.
    pub fn set_data_len(&mut self, n: usize) {
        debug_assert!(n < 1 << 24);
        self.0[5] = (n >> 16) as u8;
        self.0[6] = (n >> 8) as u8;
        self.0[7] = n as u8;
    }
    /// The 8-byte LUN field.
    pub fn lun(&self) -> u64 {
        self.u64_at(8)
    }
    /// Initiator Task Tag.
    pub fn itt(&self) -> u32 {
        self.u32_at(16)
    }
    /// Big-endian u32 at byte `at`.
    pub fn u32_at(&self, at: usize) -> u32 {
        u32::from_be_bytes(self.0[at..at + 4].try_into().expect("4 bytes"))
    }
    /// Big-endian u64 at byte `at`.
    pub fn u64_at(&self, at: usize) -> u64 {
        u64::from_be_bytes(self.0[at..at + 8].try_into().expect("8 bytes"))
    }
    /// Big-endian u16 at byte `at`.
    pub fn u16_at(&self, at: usize) -> u16 {
        u16::from_be_bytes(self.0[at..at + 2].try_into().expect("2 bytes"))
    }
    /// Store a big-endian u32 at byte `at`.
    pub fn put_u32(&mut self, at: usize, v: u32) {
        self.0[at..at + 4].copy_from_slice(&v.to_be_bytes());
    }
    /// Store a big-endian u64 at byte `at`.
    pub fn put_u64(&mut self, at: usize, v: u64) {
        self.0[at..at + 8].copy_from_slice(&v.to_be_bytes());
    }
    /// Store a big-endian u16 at byte `at`.
    pub fn put_u16(&mut self, at: usize, v: u16) {
        self.0[at..at + 2].copy_from_slice(&v.to_be_bytes());
    }
    /// CmdSN of an initiator request (bytes 24..28).
    pub fn cmdsn(&self) -> u32 {
        self.u32_at(24)
    }
    /// ExpStatSN of an initiator request (bytes 28..32).
    pub fn exp_statsn(&self) -> u32 {
        self.u32_at(28)
    }
    /// Target Transfer Tag (bytes 20..24) of Data-Out, NOP-Out, Text.
    pub fn ttt(&self) -> u32 {
        self.u32_at(20)
    }
}

/// How the rest of a PDU follows its header, given what was negotiated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Framing {
    /// A CRC32C follows the header (and AHS).
    pub header_digest: bool,
    /// A CRC32C follows the padded data segment.
    pub data_digest: bool,
}

/// Bytes of padding after a data segment of `n` bytes.
pub fn pad(n: usize) -> usize {
    (4 - n % 4) % 4
}

/// CRC32C as iSCSI digests use it (RFC 7143 13.1; little-endian on the wire).
pub fn digest(parts: &[&[u8]]) -> u32 {
    parts.iter().fold(0, |crc, p| crc32c::crc32c_append(crc, p))
}

/// Whether `wire`, a digest as received (4 bytes, little-endian), is the
/// CRC32C of `parts`.
pub fn digest_matches(parts: &[&[u8]], wire: &[u8]) -> bool {
    <[u8; 4]>::try_from(wire).is_ok_and(|w| digest(parts) == u32::from_le_bytes(w))
}

/// Lay out one PDU: header, header digest, data, padding, data digest.
pub fn encode(out: &mut Vec<u8>, bhs: &Bhs, data: &[u8], framing: Framing) {
    let mut bhs = *bhs;
    bhs.set_data_len(data.len());
    out.extend_from_slice(&bhs.0);
    if framing.header_digest {
        out.extend_from_slice(&digest(&[&bhs.0]).to_le_bytes());
    }
    if !data.is_empty() {
        out.extend_from_slice(data);
        let p = pad(data.len());
        out.extend_from_slice(&[0u8; 3][..p]);
        if framing.data_digest {
            out.extend_from_slice(&digest(&[data, &[0u8; 3][..p]]).to_le_bytes());
        }
    }
}

/// Header of an encoded PDU (with its digest) for a data segment sent
/// separately with [`data_trailer`]: lets Data-In go out without copying the
/// data into one buffer.
pub fn encode_header(out: &mut Vec<u8>, bhs: &Bhs, data_len: usize, framing: Framing) {
    let mut bhs = *bhs;
    bhs.set_data_len(data_len);
    out.extend_from_slice(&bhs.0);
    if framing.header_digest {
        out.extend_from_slice(&digest(&[&bhs.0]).to_le_bytes());
    }
}

/// Padding and data digest that follow `data` on the wire.
pub fn data_trailer(out: &mut Vec<u8>, data: &[u8], framing: Framing) {
    if data.is_empty() {
        return;
    }
    let p = pad(data.len());
    out.extend_from_slice(&[0u8; 3][..p]);
    if framing.data_digest {
        out.extend_from_slice(&digest(&[data, &[0u8; 3][..p]]).to_le_bytes());
    }
}

/// Why an incoming PDU could not be framed.
#[derive(Debug, PartialEq, Eq)]
pub enum FrameError {
    /// The header digest did not match: the stream cannot be trusted.
    HeaderDigest,
    /// The data segment is larger than we accept.
    TooLong(usize),
}

/// Total bytes after the BHS for a PDU with header `bhs`: AHS, header
/// digest, data and padding, data digest. `max_data` bounds the data
/// segment.
pub fn rest_len(bhs: &Bhs, framing: Framing, max_data: usize) -> Result<usize, FrameError> {
    let data = bhs.data_len();
    if data > max_data {
        return Err(FrameError::TooLong(data));
    }
    let mut n = bhs.ahs_len();
    if framing.header_digest {
        n += 4;
    }
    if data > 0 {
        n += data + pad(data);
        if framing.data_digest {
            n += 4;
        }
    }
    Ok(n)
}

/// A received PDU split into its parts.
#[derive(Debug)]
pub struct Parsed<'a> {
    /// Additional header segments (rarely used: extended CDBs).
    pub ahs: &'a [u8],
    /// The data segment without padding.
    pub data: &'a [u8],
    /// False when a data digest was negotiated and does not match.
    pub data_digest_ok: bool,
}

/// Split the bytes after the BHS (`rest`, exactly [`rest_len`] long).
pub fn parse_rest<'a>(bhs: &Bhs, rest: &'a [u8], framing: Framing) -> Result<Parsed<'a>, FrameError> {
    let ahs_len = bhs.ahs_len();
    let ahs = &rest[..ahs_len];
    let mut at = ahs_len;
    if framing.header_digest {
        if !digest_matches(&[&bhs.0, ahs], &rest[at..at + 4]) {
            return Err(FrameError::HeaderDigest);
        }
        at += 4;
    }
    let n = bhs.data_len();
    let mut data_digest_ok = true;
    let data = &rest[at..at + n];
    if n > 0 {
        let padded = &rest[at..at + n + pad(n)];
        at += n + pad(n);
        if framing.data_digest {
            data_digest_ok = digest_matches(&[padded], &rest[at..at + 4]);
        }
    }
    Ok(Parsed { ahs, data, data_digest_ok })
}

/// Feed arbitrary bytes through the framing code as a receiver would (the
/// fuzz target's entry point): must never panic.
pub fn fuzz_frame(bytes: &[u8]) {
    let mut rest = bytes;
    for framing in [
        Framing::default(),
        Framing { header_digest: true, data_digest: true },
        Framing { header_digest: false, data_digest: true },
    ] {
        while rest.len() >= BHS_LEN {
            let bhs = Bhs(rest[..BHS_LEN].try_into().expect("48 bytes"));
            rest = &rest[BHS_LEN..];
            let Ok(n) = rest_len(&bhs, framing, 1 << 20) else { break };
            if rest.len() < n {
                break;
            }
            if let Ok(p) = parse_rest(&bhs, &rest[..n], framing) {
                let _ = crate::text::parse(p.data);
            }
            rest = &rest[n..];
        }
        rest = bytes;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_rfc_7143_examples() {
        // RFC 7143 appendix A.4: 32 bytes of zeros -> aa 36 91 8a on the wire.
        assert_eq!(digest(&[&[0u8; 32]]).to_le_bytes(), [0xaa, 0x36, 0x91, 0x8a]);
        // 32 bytes of 0xff -> 43 ab a8 62.
        assert_eq!(digest(&[&[0xffu8; 32]]).to_le_bytes(), [0x43, 0xab, 0xa8, 0x62]);
    }

    #[test]
    fn encode_then_parse_round_trips_with_digests() {
        let framing = Framing { header_digest: true, data_digest: true };
        let mut bhs = Bhs::new(op::DATA_IN);
        bhs.put_u32(16, 0x1234);
        let mut out = Vec::new();
        encode(&mut out, &bhs, b"hello", framing);
        assert_eq!(out.len(), 48 + 4 + 8 + 4);
        let got = Bhs(out[..48].try_into().unwrap());
        assert_eq!(got.data_len(), 5);
        assert_eq!(got.itt(), 0x1234);
        let n = rest_len(&got, framing, 1024).unwrap();
        assert_eq!(n, out.len() - 48);
        let p = parse_rest(&got, &out[48..], framing).unwrap();
        assert_eq!(p.data, b"hello");
        assert!(p.data_digest_ok);
        let mut bad = out.clone();
        bad[53] ^= 1;
        assert!(!parse_rest(&got, &bad[48..], framing).unwrap().data_digest_ok);
        bad[50] ^= 1;
        assert_eq!(parse_rest(&got, &bad[48..], framing).unwrap_err(), FrameError::HeaderDigest);
    }

    #[test]
    fn oversized_segments_are_refused_before_reading_them() {
        let mut bhs = Bhs::new(op::SCSI_CMD);
        bhs.set_data_len(1 << 20);
        assert_eq!(rest_len(&bhs, Framing::default(), 65536), Err(FrameError::TooLong(1 << 20)));
    }
}
