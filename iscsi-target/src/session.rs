//! The full-feature phase of one connection (RFC 7143 sections 3, 4, 11).
//!
//! Two halves. The reader owns the socket's read side: it checks each PDU's
//! sequence numbers, gathers a write's data (immediate, unsolicited and
//! solicited by R2T) and queues each SCSI command, once its data is in, to
//! the connection's driver, which runs them concurrently against the
//! logical unit (all three in the connection's one task). The writer owns the
//! write side: everything that goes out (responses, Data-In, R2T, NOP-In)
//! passes through one channel to it, and it stamps StatSN, ExpCmdSN and
//! MaxCmdSN at the moment of sending, batching whatever is queued into one
//! write.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use keel_blockstore::{AlignedBuf, BlockDevice, BufPool};
use parking_lot::Mutex;
use tokio::io::{AsyncBufRead, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{Notify, mpsc};

use crate::pdu::{self, BHS_LEN, Bhs, FrameError, Framing, op, reject};
use crate::scsi::{Command, LogicalUnit, Nexus, ResetKind, Response};
use crate::text::{self, Params};

/// Commands one session may have queued (the CmdSN window).
pub const QUEUE_DEPTH: u32 = 128;
/// Largest write (expected data transfer length) collected for one command.
pub const MAX_WRITE: u32 = crate::scsi::MAX_TRANSFER_BLOCKS * 512;
const RESERVED_TAG: u32 = 0xffff_ffff;

/// What a session's target-side events need from the server.
pub trait SessionHost: Send + Sync + 'static {
    /// SendTargets: `(target name, portal)` pairs visible to `initiator`;
    /// `only` restricts to one target; `discovery` says the asking session
    /// is a discovery session (not logged in to a target).
    fn send_targets(
        &self,
        initiator: &str,
        only: Option<&str>,
        discovery: bool,
        local: SocketAddr,
    ) -> Vec<(String, String)>;
    /// TARGET COLD RESET on `target`: end every session to it.
    fn cold_reset(&self, target: &str);
    /// TARGET WARM RESET on `target`.
    fn warm_reset(&self, target: &str, by: &Nexus);
}

/// Liveness settings: the target pings an idle initiator with NOP-In and
/// drops it when the ping goes unanswered.
#[derive(Clone, Copy, Debug)]
pub struct Keepalive {
    /// Idle time before a ping.
    pub interval: Duration,
    /// How long a ping may go unanswered.
    pub timeout: Duration,
}

/// State shared by the reader, the writer and running tasks.
struct Shared {
    exp_cmdsn: AtomicU32,
    max_cmdsn: AtomicU32,
    out: mpsc::UnboundedSender<Out>,
    tasks: Mutex<HashMap<u32, Arc<TaskCtl>>>,
    kill: Arc<Notify>,
}

#[derive(Default)]
struct TaskCtl {
    aborted: AtomicBool,
    done: AtomicBool,
    notify: Notify,
    lun: u64,
}

impl TaskCtl {
    async fn wait(&self) {
        loop {
            let n = self.notify.notified();
            if self.done.load(Ordering::Acquire) {
                return;
            }
            n.await;
        }
    }
}

/// How a PDU's StatSN field is filled.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stat {
    /// Assign the next StatSN and advance it.
    Next,
    /// Carry the next StatSN without advancing (R2T, pings).
    Peek,
}

enum Out {
    /// A SCSI command's completion: Data-In (if any) then status.
    Scsi { itt: u32, lun: u64, resp: Response, send_data: bool, residual: (u8, u32) },
    /// Any other PDU; bytes 24..36 (StatSN, ExpCmdSN, MaxCmdSN) are stamped.
    Pdu { bhs: Bhs, data: Vec<u8>, stat: Stat },
    /// Flush and close the connection.
    Close,
}

/// Write data being gathered for one command.
struct Gather {
    cdb: Vec<u8>,
    lun: u64,
    edtl: u32,
    /// `edtl` bytes (and maybe more), from the connection's pool: every
    /// byte of the first `edtl` is written before the command runs, since
    /// data PDUs must arrive in order (DataPDUInOrder=Yes, which we
    /// negotiate) and each one is checked against the next offset due.
    buf: AlignedBuf,
    received: u32,
    /// End of the unsolicited region (immediate + unsolicited Data-Out).
    unsol_end: u32,
    /// Next unsolicited offset due.
    unsol_next: u32,
    unsol_datasn: u32,
    /// Next offset to solicit.
    next_offset: u32,
    r2tsn: u32,
    /// Outstanding R2Ts: ttt -> (offset, len, received, next DataSN); the
    /// next offset due in a burst is its offset plus what it received.
    bursts: HashMap<u32, (u32, u32, u32, u32)>,
    read: bool,
    immediate: bool,
    ctl: Arc<TaskCtl>,
}

/// One logged-in connection of a normal or discovery session.
pub struct Session<D: BlockDevice + 'static> {
    /// The LU of a normal session (LUN 0); `None` for discovery.
    pub lu: Option<Arc<LogicalUnit<D>>>,
    /// The I_T nexus.
    pub nexus: Nexus,
    /// Target name ("" for discovery).
    pub target: String,
    /// Negotiated parameters.
    pub params: Params,
    /// First CmdSN of the full-feature phase.
    pub cmdsn: u32,
    /// Next StatSN.
    pub statsn: u32,
    /// Ends the session from outside (reinstatement, cold reset).
    pub kill: Arc<Notify>,
    /// Keepalive pings.
    pub keepalive: Keepalive,
    /// The connection's local address (SendTargets portals).
    pub local: SocketAddr,
}

fn framing(p: &Params) -> Framing {
    Framing { header_digest: p.header_digest, data_digest: p.data_digest }
}

/// The LUN number of an 8-byte LUN field (peripheral or flat addressing),
/// or `None` for anything else.
pub fn lun_number(field: u64) -> Option<u64> {
    let b = field.to_be_bytes();
    if b[2..].iter().any(|&x| x != 0) {
        return None;
    }
    match b[0] >> 6 {
        0 | 1 => Some(((b[0] as u64 & 0x3f) << 8) | b[1] as u64),
        _ => None,
    }
}

impl<D: BlockDevice + 'static> Session<D> {
    /// Run the full-feature phase until logout, error or kill.
    pub async fn run<R, W, H>(self, mut rd: BufReader<R>, wr: W, host: Arc<H>) -> io::Result<()>
    where
        R: AsyncRead + Unpin + Send,
        W: AsyncWrite + Unpin + Send + 'static,
        H: SessionHost,
    {
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            exp_cmdsn: AtomicU32::new(self.cmdsn),
            max_cmdsn: AtomicU32::new(self.cmdsn.wrapping_add(QUEUE_DEPTH - 1)),
            out: tx,
            tasks: Mutex::new(HashMap::new()),
            kill: self.kill.clone(),
        });
        let heard = Arc::new(AtomicBool::new(false));
        let ping_due = Arc::new(AtomicBool::new(false));
        let (cmds, cmd_rx) = mpsc::unbounded_channel();
        let writer = writer(wr, rx, shared.clone(), framing(&self.params), self.params.max_send_data, self.statsn);
        let pinger = tokio::spawn(pinger(shared.clone(), heard.clone(), ping_due.clone(), self.keepalive));
        let mut conn = Reader {
            s: &self,
            shared: shared.clone(),
            gathers: HashMap::new(),
            bufs: Arc::new(BufPool::default()),
            next_ttt: 1,
            text_pending: None,
            heard,
            ping_due,
            host,
            cmds,
        };
        let session = async {
            let result = tokio::select! {
                r = conn.read_loop(&mut rd) => r,
                _ = self.kill.notified() => Ok(()),
            };
            // Writes still waiting for their data will not get it: they
            // end here, unanswered, or the wait below would never end.
            conn.abandon_gathers();
            // Dropping the reader closes the command queue: the driver
            // ends once the commands already queued have run.
            drop(conn);
            pinger.abort();
            // Let running tasks finish (their writes are acknowledged to
            // nobody, but they must not race a new session's I/O).
            let running: Vec<_> = shared.tasks.lock().values().cloned().collect();
            for t in running {
                t.aborted.store(true, Ordering::Release);
                t.wait().await;
            }
            let _ = shared.out.send(Out::Close);
            result
        };
        // The reader, the commands and the writer of a connection run in
        // this one task, so on one worker thread at a time: a command's
        // completion wakes the writer without waking another thread, and
        // the connection's data stays in one CPU's caches. Connections are
        // spread over the runtime's workers.
        let (result, (), _) = tokio::join!(session, drive(cmd_rx), writer);
        if let Some(lu) = &self.lu {
            lu.nexus_lost(&self.nexus);
        }
        result
    }
}

/// Where [`Reader::read_in_place`] put a PDU's data segment.
enum InPlace {
    /// In the gather buffer of the Data-Out's command, at its offset.
    DataOut,
    /// In the first bytes of this buffer: a write command's immediate data.
    Command(AlignedBuf),
}

/// A SCSI command's immediate data.
enum Imm<'a> {
    /// As received, in the reader's buffer.
    Bytes(&'a [u8]),
    /// Already in the first bytes (the PDU's data segment length) of a
    /// buffer for the command.
    Placed(AlignedBuf),
}

/// Read the rest of a PDU without AHS whose header `bhs` has been read:
/// its header digest (checked: a mismatch is an error, the framing cannot
/// be trusted), its data segment into `dst` (exactly its length), padding
/// and data digest. Whether the data digest matched (true when none was
/// negotiated).
async fn read_segment<R: AsyncRead + Unpin>(
    rd: &mut BufReader<R>,
    bhs: &Bhs,
    fr: Framing,
    dst: &mut [u8],
) -> io::Result<bool> {
    if fr.header_digest {
        let mut d = [0u8; 4];
        rd.read_exact(&mut d).await?;
        if !pdu::digest_matches(&[&bhs.0], &d) {
            return Err(protocol_error("header digest error"));
        }
    }
    read_into(rd, dst).await?;
    let pad = pdu::pad(dst.len());
    let mut trailer = [0u8; 7];
    let trailer = &mut trailer[..pad + if fr.data_digest { 4 } else { 0 }];
    rd.read_exact(trailer).await?;
    Ok(!fr.data_digest || pdu::digest_matches(&[dst, &trailer[..pad]], &trailer[pad..]))
}

/// Commands that move at least this many bytes run in a task of their own
/// rather than in their connection's.
const OWN_TASK: u32 = 256 * 1024;

/// Reads of at least this many bytes bypass the connection's read buffer.
const DIRECT_READ: usize = 32 * 1024;

/// Fill `dst` from `rd`: first what `rd` has buffered, then a remainder of
/// at least [`DIRECT_READ`] bytes straight from the socket (one copy fewer
/// than through the buffer). A smaller remainder goes through the buffer,
/// whose refill may bring in the next PDUs with the same system call.
async fn read_into<R: AsyncRead + Unpin>(rd: &mut BufReader<R>, dst: &mut [u8]) -> io::Result<()> {
    let have = rd.buffer().len().min(dst.len());
    dst[..have].copy_from_slice(&rd.buffer()[..have]);
    std::pin::Pin::new(&mut *rd).consume(have);
    let rest = &mut dst[have..];
    if rest.len() >= DIRECT_READ {
        // The buffer is empty now (it held less than `dst`), so reading
        // past it keeps the stream in order.
        rd.get_mut().read_exact(rest).await?;
    } else if !rest.is_empty() {
        rd.read_exact(rest).await?;
    }
    Ok(())
}

/// A SCSI command's execution, queued by the reader to the connection's
/// driver.
type CmdFuture = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Run the connection's commands, concurrently, until the reader has
/// closed the queue and every command has finished.
async fn drive(mut queue: mpsc::UnboundedReceiver<CmdFuture>) {
    use futures::StreamExt;
    let mut running = futures::stream::FuturesUnordered::new();
    loop {
        tokio::select! {
            biased;
            Some(()) = running.next(), if !running.is_empty() => {}
            next = queue.recv() => match next {
                Some(cmd) => running.push(cmd),
                None => break,
            },
        }
    }
    while running.next().await.is_some() {}
}

struct Reader<'a, D: BlockDevice + 'static, H: SessionHost> {
    s: &'a Session<D>,
    shared: Arc<Shared>,
    gathers: HashMap<u32, Gather>,
    /// Write buffers, reused from command to command.
    bufs: Arc<BufPool>,
    next_ttt: u32,
    text_pending: Option<(u32, Vec<u8>)>,
    /// Set on every PDU received; the pinger takes it (a flag rather than
    /// a time: no clock read and no lock per PDU).
    heard: Arc<AtomicBool>,
    ping_due: Arc<AtomicBool>,
    host: Arc<H>,
    /// To the connection's command driver ([`drive`]).
    cmds: mpsc::UnboundedSender<CmdFuture>,
}

fn protocol_error(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

impl<D: BlockDevice + 'static, H: SessionHost> Reader<'_, D, H> {
    fn send(&self, m: Out) {
        let _ = self.shared.out.send(m);
    }

    fn reject(&self, reason: u8, bad: &Bhs) {
        let mut b = Bhs::new(op::REJECT);
        b.0[1] = 0x80;
        b.0[2] = reason;
        b.put_u32(16, RESERVED_TAG);
        self.send(Out::Pdu { bhs: b, data: bad.0.to_vec(), stat: Stat::Next });
    }

    /// CmdSN check for a non-immediate request: true to process it.
    fn accept_cmdsn(&self, bhs: &Bhs) -> bool {
        if bhs.immediate() {
            return true;
        }
        let exp = self.shared.exp_cmdsn.load(Ordering::Acquire);
        if bhs.cmdsn() != exp {
            tracing::debug!(cmdsn = bhs.cmdsn(), exp, "CmdSN outside the window: ignored");
            return false;
        }
        self.shared.exp_cmdsn.store(exp.wrapping_add(1), Ordering::Release);
        true
    }

    /// A non-immediate request that completes at once opens the window by one.
    fn complete_now(&self, bhs: &Bhs) {
        if !bhs.immediate() {
            self.shared.max_cmdsn.fetch_add(1, Ordering::AcqRel);
        }
    }

    async fn read_loop<R: AsyncRead + Unpin>(&mut self, rd: &mut BufReader<R>) -> io::Result<()> {
        let fr = framing(&self.s.params);
        let max_data = self.s.params.max_recv_data as usize;
        let mut rest = Vec::new();
        loop {
            let mut hdr = [0u8; BHS_LEN];
            match rd.read_exact(&mut hdr).await {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e),
            }
            let bhs = Bhs(hdr);
            let n = match pdu::rest_len(&bhs, fr, max_data) {
                Ok(n) => n,
                Err(FrameError::TooLong(n)) => {
                    self.reject(reject::PROTOCOL, &bhs);
                    return Err(protocol_error(format!("data segment of {n} bytes exceeds {max_data}")));
                }
                Err(e) => return Err(protocol_error(format!("{e:?}"))),
            };
            if let Some((placed, digest_ok)) = self.read_in_place(rd, &bhs, fr).await? {
                self.heard.store(true, Ordering::Relaxed);
                match placed {
                    _ if !digest_ok => self.bad_data_digest(&bhs),
                    InPlace::DataOut => self.data_out(&bhs, None)?,
                    InPlace::Command(buf) => self.scsi_command(&bhs, &[], Imm::Placed(buf))?,
                }
                continue;
            }
            rest.resize(n, 0);
            rd.read_exact(&mut rest).await?;
            self.heard.store(true, Ordering::Relaxed);
            let parsed = match pdu::parse_rest(&bhs, &rest, fr) {
                Ok(p) => p,
                Err(FrameError::HeaderDigest) => {
                    // The header cannot be trusted, so neither can the
                    // framing of what follows: ERL 0 drops the connection.
                    return Err(protocol_error("header digest error"));
                }
                Err(e) => return Err(protocol_error(format!("{e:?}"))),
            };
            if !parsed.data_digest_ok {
                self.bad_data_digest(&bhs);
                continue;
            }
            let data = parsed.data;
            let ahs = parsed.ahs;
            match bhs.opcode() {
                op::NOP_OUT => self.nop_out(&bhs, data),
                op::SCSI_CMD => self.scsi_command(&bhs, ahs, Imm::Bytes(data))?,
                op::DATA_OUT => self.data_out(&bhs, Some(data))?,
                op::TMF_REQ => self.tmf(&bhs).await,
                op::TEXT_REQ => self.text(&bhs, data),
                op::LOGOUT_REQ => {
                    self.logout(&bhs).await;
                    return Ok(());
                }
                op::SNACK => self.reject(reject::SNACK, &bhs),
                op::LOGIN_REQ => self.reject(reject::PROTOCOL, &bhs),
                _ => self.reject(reject::NOT_SUPPORTED, &bhs),
            }
        }
    }

    /// A PDU whose data digest failed. Its header is sound (its own digest
    /// passed, or none was negotiated): reject the PDU, keep the CmdSN
    /// sequence whole, and fail the command it carried or fed.
    fn bad_data_digest(&mut self, bhs: &Bhs) {
        self.reject(reject::DATA_DIGEST, bhs);
        match bhs.opcode() {
            op::DATA_OUT => self.fail_gather(bhs.itt()),
            op::SCSI_CMD if self.s.lu.is_some() && self.accept_cmdsn(bhs) => {
                let ctl = TaskCtl { lun: bhs.lun(), ..TaskCtl::default() };
                let resp = crate::scsi_sense::crc_error();
                complete(&self.shared, Done::failed(bhs.itt(), bhs.immediate(), bhs.lun(), resp), &ctl);
            }
            op::NOP_OUT | op::TEXT_REQ if bhs.itt() != RESERVED_TAG && self.accept_cmdsn(bhs) => self.complete_now(bhs),
            _ => {}
        }
    }

    fn nop_out(&mut self, bhs: &Bhs, data: &[u8]) {
        if bhs.itt() == RESERVED_TAG {
            // The answer to our ping (TTT set) or an unsolicited ping that
            // wants no answer.
            self.ping_due.store(false, Ordering::Release);
            return;
        }
        if !self.accept_cmdsn(bhs) {
            return;
        }
        self.complete_now(bhs);
        let mut b = Bhs::new(op::NOP_IN);
        b.0[1] = 0x80;
        b.put_u64(8, bhs.lun());
        b.put_u32(16, bhs.itt());
        b.put_u32(20, RESERVED_TAG);
        self.send(Out::Pdu { bhs: b, data: data.to_vec(), stat: Stat::Next });
    }

    fn scsi_command(&mut self, bhs: &Bhs, ahs: &[u8], data: Imm<'_>) -> io::Result<()> {
        let imm = match &data {
            Imm::Bytes(d) => d.len(),
            Imm::Placed(_) => bhs.data_len(),
        };
        if self.s.lu.is_none() {
            self.reject(reject::PROTOCOL, bhs);
            return Err(protocol_error("SCSI command on a discovery session"));
        }
        if !self.accept_cmdsn(bhs) {
            return Ok(());
        }
        let itt = bhs.itt();
        let flags = bhs.flags();
        let (read, write) = (flags & 0x40 != 0, flags & 0x20 != 0);
        let edtl = bhs.u32_at(20);
        let mut cdb = bhs.0[32..48].to_vec();
        // An extended CDB arrives in an AHS of type 1.
        if ahs.len() >= 4 && ahs[2] == 1 {
            let len = u16::from_be_bytes([ahs[0], ahs[1]]) as usize;
            if len >= 1 && 3 + len <= ahs.len() {
                cdb.extend_from_slice(&ahs[4..3 + len]);
            }
        }
        let ctl = Arc::new(TaskCtl { lun: bhs.lun(), ..TaskCtl::default() });
        if self.gathers.contains_key(&itt) || self.shared.tasks.lock().contains_key(&itt) {
            self.reject(reject::TASK_IN_PROGRESS, bhs);
            self.complete_now(bhs);
            return Ok(());
        }
        if imm > 0 && !self.immediate_allowed(write, imm, edtl) {
            self.reject(reject::PROTOCOL, bhs);
            self.complete_now(bhs);
            return Ok(());
        }
        if !write || edtl == 0 {
            self.shared.tasks.lock().insert(itt, ctl.clone());
            self.spawn(itt, bhs.immediate(), cdb, bhs.lun(), edtl, read, None, ctl);
            return Ok(());
        }
        if edtl > MAX_WRITE {
            // Too large to gather: fail the command; any Data-Out that
            // follows for it is for an unknown task and is dropped.
            self.shared.tasks.lock().insert(itt, ctl.clone());
            let resp = crate::scsi_sense::invalid_field_in_cdb();
            complete(&self.shared, Done::failed(itt, bhs.immediate(), bhs.lun(), resp), &ctl);
            return Ok(());
        }
        let p = &self.s.params;
        let unsol_end = if p.initial_r2t { imm as u32 } else { p.first_burst.min(edtl).max(imm as u32) };
        let buf = match data {
            Imm::Placed(buf) => buf,
            Imm::Bytes(d) => {
                let mut buf = self.bufs.get(edtl as usize);
                buf[..d.len()].copy_from_slice(d);
                buf
            }
        };
        let mut g = Gather {
            cdb,
            lun: bhs.lun(),
            edtl,
            buf,
            received: imm as u32,
            unsol_end,
            unsol_next: imm as u32,
            unsol_datasn: 0,
            next_offset: unsol_end,
            r2tsn: 0,
            bursts: HashMap::new(),
            read,
            immediate: bhs.immediate(),
            ctl,
        };
        self.solicit(itt, &mut g);
        self.shared.tasks.lock().insert(itt, g.ctl.clone());
        if g.received == g.edtl {
            self.launch(itt, g);
        } else {
            self.gathers.insert(itt, g);
        }
        Ok(())
    }

    /// Send R2Ts until MaxOutstandingR2T are out or everything is asked.
    fn solicit(&mut self, itt: u32, g: &mut Gather) {
        let p = &self.s.params;
        while g.next_offset < g.edtl && (g.bursts.len() as u32) < p.max_outstanding_r2t {
            let len = (g.edtl - g.next_offset).min(p.max_burst);
            let ttt = self.next_ttt;
            self.next_ttt = self.next_ttt.wrapping_add(1);
            if self.next_ttt == RESERVED_TAG {
                self.next_ttt = 1;
            }
            let mut b = Bhs::new(op::R2T);
            b.0[1] = 0x80;
            b.put_u64(8, g.lun);
            b.put_u32(16, itt);
            b.put_u32(20, ttt);
            b.put_u32(36, g.r2tsn);
            b.put_u32(40, g.next_offset);
            b.put_u32(44, len);
            self.send(Out::Pdu { bhs: b, data: Vec::new(), stat: Stat::Peek });
            g.bursts.insert(ttt, (g.next_offset, len, 0, 0));
            g.r2tsn += 1;
            g.next_offset += len;
        }
    }

    /// A Data-Out PDU: `data` is its data segment, or `None` when
    /// [`Reader::read_in_place`] has already put it in the gather buffer at
    /// the offset the PDU names.
    fn data_out(&mut self, bhs: &Bhs, data: Option<&[u8]>) -> io::Result<()> {
        let itt = bhs.itt();
        let Some(mut g) = self.gathers.remove(&itt) else {
            // Data for a task that failed, was aborted or never existed.
            return Ok(());
        };
        let ttt = bhs.ttt();
        let offset = bhs.u32_at(40);
        let datasn = bhs.u32_at(36);
        let len = data.map_or(bhs.data_len(), <[u8]>::len) as u32;
        let end = offset.checked_add(len).filter(|&e| e <= g.edtl);
        // Data PDUs come in order (DataPDUInOrder=Yes): each must start
        // where the previous one of its sequence ended.
        let ok = match (end, ttt) {
            (None, _) => false,
            (Some(end), RESERVED_TAG) => {
                let good = offset == g.unsol_next && end <= g.unsol_end && datasn == g.unsol_datasn;
                g.unsol_next = end;
                g.unsol_datasn = g.unsol_datasn.wrapping_add(1);
                good
            }
            (Some(_), ttt) => match g.bursts.get_mut(&ttt) {
                Some((boff, blen, got, next_sn)) => {
                    let good = offset == *boff + *got && *got + len <= *blen && datasn == *next_sn;
                    *got += len;
                    *next_sn = next_sn.wrapping_add(1);
                    good
                }
                None => false,
            },
        };
        if !ok {
            // A DataSN, offset or tag the task does not expect: the data
            // cannot be trusted, so the command fails (ERL 0 has no
            // within-command recovery) and the session goes on.
            tracing::debug!(itt, datasn, offset, "unexpected Data-Out: failing the command");
            let resp = crate::scsi_sense::data_phase_error();
            complete(&self.shared, Done::failed(itt, g.immediate, g.lun, resp), &g.ctl);
            return Ok(());
        }
        if let Some(data) = data {
            g.buf[offset as usize..(offset + len) as usize].copy_from_slice(data);
        }
        g.received += len;
        if ttt != RESERVED_TAG
            && let Some(&(_, blen, got, _)) = g.bursts.get(&ttt)
            && got >= blen
        {
            g.bursts.remove(&ttt);
            self.solicit(itt, &mut g);
        }
        if g.received >= g.edtl && g.bursts.is_empty() && g.next_offset >= g.edtl {
            self.launch(itt, g);
        } else {
            self.gathers.insert(itt, g);
        }
        Ok(())
    }

    /// Read the data segment of a write's PDU straight into the buffer the
    /// command will be executed from, rather than through the reader's
    /// buffer (one copy fewer of every byte written): a Data-Out's into its
    /// command's gather buffer at the offset the PDU names, a write
    /// command's immediate data into a new buffer from the pool. `None`
    /// (and nothing read) for any other PDU, for a Data-Out of no command
    /// being gathered or beyond its end, and for a command the target will
    /// refuse anyway; otherwise where the data went and whether its digest
    /// (if one was negotiated) matched. A Data-Out's offset is checked
    /// against the next one due afterwards, in [`Reader::data_out`]: data
    /// that turns out to be unexpected fails the command it landed in.
    async fn read_in_place<R: AsyncRead + Unpin>(
        &mut self,
        rd: &mut BufReader<R>,
        bhs: &Bhs,
        fr: Framing,
    ) -> io::Result<Option<(InPlace, bool)>> {
        let len = bhs.data_len();
        if bhs.ahs_len() != 0 || len == 0 {
            return Ok(None);
        }
        match bhs.opcode() {
            op::DATA_OUT => {
                let offset = bhs.u32_at(40) as usize;
                let Some(g) = self.gathers.get_mut(&bhs.itt()) else {
                    return Ok(None);
                };
                if offset.checked_add(len).is_none_or(|end| end > g.edtl as usize) {
                    return Ok(None);
                }
                let ok = read_segment(rd, bhs, fr, &mut g.buf[offset..offset + len]).await?;
                Ok(Some((InPlace::DataOut, ok)))
            }
            op::SCSI_CMD => {
                let edtl = bhs.u32_at(20);
                let write = bhs.flags() & 0x20 != 0;
                // What `scsi_command` refuses before it gathers.
                if self.s.lu.is_none() || !self.immediate_allowed(write, len, edtl) || edtl > MAX_WRITE {
                    return Ok(None);
                }
                let mut buf = self.bufs.get(edtl as usize);
                let ok = read_segment(rd, bhs, fr, &mut buf[..len]).await?;
                Ok(Some((InPlace::Command(buf), ok)))
            }
            _ => Ok(None),
        }
    }

    /// Whether a command may carry `imm` bytes of immediate data: a write
    /// of at least that many bytes, with ImmediateData=Yes negotiated.
    fn immediate_allowed(&self, write: bool, imm: usize, edtl: u32) -> bool {
        write && self.s.params.immediate_data && imm <= edtl as usize
    }

    /// End every write still gathering its data, without an answer (the
    /// connection is gone), so that its task counts as done.
    fn abandon_gathers(&mut self) {
        for (itt, g) in self.gathers.drain() {
            g.ctl.aborted.store(true, Ordering::Release);
            let resp = crate::scsi_sense::data_phase_error();
            complete(&self.shared, Done::failed(itt, g.immediate, g.lun, resp), &g.ctl);
        }
    }

    fn fail_gather(&mut self, itt: u32) {
        if let Some(g) = self.gathers.remove(&itt) {
            complete(&self.shared, Done::failed(itt, g.immediate, g.lun, crate::scsi_sense::crc_error()), &g.ctl);
        }
    }

    fn launch(&mut self, itt: u32, g: Gather) {
        let Gather { cdb, lun, edtl, buf, read, ctl, immediate, .. } = g;
        self.spawn(itt, immediate, cdb, lun, edtl, read, Some(buf), ctl);
    }

    #[allow(clippy::too_many_arguments)]
    fn spawn(
        &self,
        itt: u32,
        immediate: bool,
        cdb: Vec<u8>,
        lun: u64,
        edtl: u32,
        read: bool,
        data_out: Option<AlignedBuf>,
        ctl: Arc<TaskCtl>,
    ) {
        let lu = self.s.lu.clone().expect("normal session");
        let nexus = self.s.nexus.clone();
        let shared = self.shared.clone();
        let bufs = self.bufs.clone();
        let own_task = (edtl >= OWN_TASK).then(|| ctl.clone());
        let cmd = Box::pin(async move {
            // A gathered buffer holds exactly `edtl` bytes of data.
            let data = data_out.as_ref().map_or(&[][..], |b| &b[..edtl as usize]);
            let (resp, residual) = execute(&lu, &nexus, &cdb, lun, edtl, read, data).await;
            if let Some(b) = data_out {
                bufs.put(b);
            }
            complete(&shared, Done { itt, immediate, lun, resp, send_data: read, residual }, &ctl);
        });
        if let Some(watch) = own_task {
            // A large transfer's CPU work (checksums, copies into the data
            // cache) would hold up the whole connection on its one thread:
            // it gets a task of its own, which another worker can run. The
            // driver waits for it, and answers for it if it panics (else its
            // TaskCtl would never be done, and an ABORT TASK, a logout or
            // the session's end would wait for it forever).
            let task = tokio::spawn(cmd);
            let shared = self.shared.clone();
            let _ = self.cmds.send(Box::pin(async move {
                if task.await.is_err() && !watch.done.load(Ordering::Acquire) {
                    let resp = crate::scsi_sense::internal_target_failure();
                    complete(&shared, Done::failed(itt, immediate, lun, resp), &watch);
                }
            }));
        } else {
            // The driver runs until the reader is gone, so the queue is open.
            let _ = self.cmds.send(cmd);
        }
    }

    async fn tmf(&mut self, bhs: &Bhs) {
        let func = bhs.flags() & 0x7f;
        let accepted = self.accept_cmdsn(bhs);
        if !accepted {
            return;
        }
        self.complete_now(bhs);
        let lun = bhs.lun();
        let response: u8 = match func {
            // ABORT TASK
            1 => {
                let rtt = bhs.u32_at(20);
                let gathered = self.gathers.remove(&rtt);
                let task = self.shared.tasks.lock().get(&rtt).cloned();
                if let Some(g) = gathered {
                    g.ctl.aborted.store(true, Ordering::Release);
                    self.shared.tasks.lock().remove(&rtt);
                    0
                } else if let Some(t) = task {
                    t.aborted.store(true, Ordering::Release);
                    t.wait().await;
                    0
                } else {
                    // Completed already, or never received: RFC 7143
                    // 11.5.1 answers "Function complete" when RefCmdSN is
                    // inside the window and below the TMF's own CmdSN.
                    let refsn = bhs.u32_at(32);
                    let exp = self.shared.exp_cmdsn.load(Ordering::Acquire);
                    if refsn.wrapping_sub(exp.wrapping_sub(QUEUE_DEPTH)) <= QUEUE_DEPTH { 0 } else { 1 }
                }
            }
            // ABORT TASK SET, CLEAR TASK SET, LUN RESET
            2 | 4 | 5 => {
                if lun_number(lun) != Some(0) {
                    2
                } else {
                    self.abort_all(Some(lun)).await;
                    if func == 5
                        && let Some(lu) = &self.s.lu
                    {
                        lu.reset(&self.s.nexus, ResetKind::Lun);
                    }
                    0
                }
            }
            // CLEAR ACA: no ACA support.
            3 => 5,
            6 => {
                self.abort_all(None).await;
                self.host.warm_reset(&self.s.target, &self.s.nexus);
                0
            }
            7 => {
                self.abort_all(None).await;
                if let Some(lu) = &self.s.lu {
                    lu.reset(&self.s.nexus, ResetKind::TargetCold);
                }
                let b = tmf_response(bhs, 0);
                self.send(Out::Pdu { bhs: b, data: Vec::new(), stat: Stat::Next });
                self.host.cold_reset(&self.s.target);
                return;
            }
            // TASK REASSIGN needs ERL 2.
            8 => 5,
            _ => 5,
        };
        let b = tmf_response(bhs, response);
        self.send(Out::Pdu { bhs: b, data: Vec::new(), stat: Stat::Next });
    }

    async fn abort_all(&mut self, lun: Option<u64>) {
        let keep: Vec<u32> = self.gathers.keys().copied().collect();
        for itt in keep {
            if lun.is_none_or(|l| self.gathers[&itt].lun == l)
                && let Some(g) = self.gathers.remove(&itt)
            {
                g.ctl.aborted.store(true, Ordering::Release);
                self.shared.tasks.lock().remove(&itt);
            }
        }
        let running: Vec<_> =
            self.shared.tasks.lock().values().filter(|t| lun.is_none_or(|l| t.lun == l)).cloned().collect();
        for t in running {
            t.aborted.store(true, Ordering::Release);
            t.wait().await;
        }
    }

    fn text(&mut self, bhs: &Bhs, data: &[u8]) {
        if !self.accept_cmdsn(bhs) {
            return;
        }
        self.complete_now(bhs);
        let max = self.s.params.max_send_data as usize;
        let mut body = match self.text_pending.take() {
            Some((ttt, rest)) if bhs.ttt() == ttt => rest,
            _ => {
                let mut out = Vec::new();
                for (k, v) in text::parse(data) {
                    if k == "SendTargets" {
                        let discovery = self.s.lu.is_none();
                        let only = if discovery {
                            // Discovery: every target (the host filters what
                            // discovery may learn), or the one named.
                            match v.as_str() {
                                "All" | "" => None,
                                name => Some(name.to_string()),
                            }
                        } else if v == "All" || v.is_empty() || *v == self.s.target {
                            // A normal session learns its own target's
                            // addresses, and nothing of other targets.
                            Some(self.s.target.clone())
                        } else {
                            Some(String::new())
                        };
                        let mut last = String::new();
                        let initiator = &self.s.nexus.initiator_name;
                        for (name, portal) in
                            self.host.send_targets(initiator, only.as_deref(), discovery, self.s.local)
                        {
                            if name != last {
                                text::push(&mut out, "TargetName", &name);
                                last = name;
                            }
                            text::push(&mut out, "TargetAddress", &portal);
                        }
                    } else {
                        text::push(&mut out, &k, "NotUnderstood");
                    }
                }
                out
            }
        };
        let mut b = Bhs::new(op::TEXT_RESP);
        b.put_u64(8, bhs.lun());
        b.put_u32(16, bhs.itt());
        if body.len() > max {
            let rest = body.split_off(max);
            let ttt = self.next_ttt;
            self.next_ttt = self.next_ttt.wrapping_add(1).max(1);
            b.0[1] = 0x40;
            b.put_u32(20, ttt);
            self.text_pending = Some((ttt, rest));
        } else {
            b.0[1] = 0x80;
            b.put_u32(20, RESERVED_TAG);
        }
        self.send(Out::Pdu { bhs: b, data: body, stat: Stat::Next });
    }

    async fn logout(&mut self, bhs: &Bhs) {
        self.accept_cmdsn(bhs);
        self.complete_now(bhs);
        // Writes still waiting for data will not get it after a logout.
        self.abandon_gathers();
        // Wait for running commands so their responses precede ours.
        let running: Vec<_> = self.shared.tasks.lock().values().cloned().collect();
        for t in running {
            t.wait().await;
        }
        let reason = bhs.flags() & 0x7f;
        let mut b = Bhs::new(op::LOGOUT_RESP);
        b.0[1] = 0x80;
        b.0[2] = if reason <= 1 { 0 } else { 2 };
        b.put_u32(16, bhs.itt());
        b.put_u16(40, self.s.params.time2wait as u16);
        b.put_u16(42, self.s.params.time2retain as u16);
        self.send(Out::Pdu { bhs: b, data: Vec::new(), stat: Stat::Next });
    }
}

fn tmf_response(req: &Bhs, response: u8) -> Bhs {
    let mut b = Bhs::new(op::TMF_RESP);
    b.0[1] = 0x80;
    b.0[2] = response;
    b.put_u32(16, req.itt());
    b
}

/// A finished command, ready to be answered.
struct Done {
    itt: u32,
    /// Immediate commands do not move the CmdSN window.
    immediate: bool,
    lun: u64,
    resp: Response,
    /// Send `resp.data_in` as Data-In (the command had the R bit).
    send_data: bool,
    /// Residual flag (OVERFLOW/UNDERFLOW) and count.
    residual: (u8, u32),
}

impl Done {
    /// A command that fails before it runs.
    fn failed(itt: u32, immediate: bool, lun: u64, resp: Response) -> Done {
        Done { itt, immediate, lun, resp, send_data: false, residual: (0, 0) }
    }
}

/// Queue a task's completion unless it was aborted, and open the window.
fn complete(shared: &Shared, done: Done, ctl: &TaskCtl) {
    let Done { itt, immediate, lun, resp, send_data, residual } = done;
    {
        let mut tasks = shared.tasks.lock();
        if tasks.get(&itt).is_some_and(|t| std::ptr::eq(Arc::as_ptr(t), ctl)) {
            tasks.remove(&itt);
        }
    }
    if !ctl.aborted.load(Ordering::Acquire) {
        let _ = shared.out.send(Out::Scsi { itt, lun, resp, send_data, residual });
    }
    if !immediate {
        shared.max_cmdsn.fetch_add(1, Ordering::AcqRel);
    }
    ctl.done.store(true, Ordering::Release);
    ctl.notify.notify_waiters();
}

/// Residual flags for the SCSI Response / final Data-In.
const OVERFLOW: u8 = 0x04;
const UNDERFLOW: u8 = 0x02;

/// Run one command against LUN `lun` and work out its residual.
async fn execute<D: BlockDevice + 'static>(
    lu: &LogicalUnit<D>,
    nexus: &Nexus,
    cdb: &[u8],
    lun: u64,
    edtl: u32,
    read: bool,
    data_out: &[u8],
) -> (Response, (u8, u32)) {
    if lun_number(lun) != Some(0) {
        let resp = crate::scsi::no_such_lun(Command { cdb, data_out, lun });
        let n = resp.data_in.len() as u32;
        return (resp, residual_for(n, edtl));
    }
    let need = lu.data_out_len(cdb);
    if need > 0 && !read && is_block_write(cdb) {
        // Block writes follow the iSCSI residual rules (RFC 7143 11.4.5):
        // with less data than the CDB asks for, only what came is written,
        // in whole blocks (a partial block is an error); with more, the
        // excess is ignored.
        let have = (data_out.len() as u32).min(edtl);
        if have < need {
            let resp = match shorten(cdb, have) {
                Some(short) => {
                    lu.execute(nexus, Command { cdb: &short, data_out: &data_out[..have as usize], lun }).await
                }
                None => crate::scsi_sense::invalid_field_in_iu(),
            };
            return (resp, residual_for(need, have));
        }
        let resp = lu.execute(nexus, Command { cdb, data_out: &data_out[..need as usize], lun }).await;
        return (resp, residual_for(need, edtl));
    }
    if need > 0 && !read {
        // Anything else (parameter lists, WRITE SAME's block, COMPARE AND
        // WRITE's pair) goes to the logical unit as it came, which judges
        // a size that does not match the CDB.
        let resp = lu.execute(nexus, Command { cdb, data_out, lun }).await;
        return (resp, residual_for(need, edtl));
    }
    let resp = lu.execute(nexus, Command { cdb, data_out, lun }).await;
    if read {
        let n = resp.data_in.len() as u32;
        (resp, residual_for(n, edtl))
    } else if need == 0 && !resp.data_in.is_empty() {
        // The initiator expects no Data-In (no R bit): report what it
        // missed as overflow.
        let n = resp.data_in.len() as u32;
        (resp, (OVERFLOW, n))
    } else {
        (resp, (0, 0))
    }
}

fn residual_for(actual: u32, expected: u32) -> (u8, u32) {
    match actual.cmp(&expected) {
        std::cmp::Ordering::Greater => (OVERFLOW, actual - expected),
        std::cmp::Ordering::Less => (UNDERFLOW, expected - actual),
        std::cmp::Ordering::Equal => (0, 0),
    }
}

fn is_block_write(cdb: &[u8]) -> bool {
    matches!(cdb.first(), Some(0x0a | 0x2a | 0xaa | 0x8a | 0x2e | 0xae | 0x8e))
}

/// The CDB of a block write cut down to `bytes` (whole 512-byte blocks).
fn shorten(cdb: &[u8], bytes: u32) -> Option<Vec<u8>> {
    if !bytes.is_multiple_of(512) || !is_block_write(cdb) {
        return None;
    }
    let blocks = bytes / 512;
    let mut c = cdb.to_vec();
    match c[0] {
        0x0a if c.len() >= 6 => {
            if blocks == 0 {
                return None; // WRITE(6) cannot say zero blocks
            }
            c[4] = blocks as u8;
        }
        0x2a | 0x2e if c.len() >= 10 => c[7..9].copy_from_slice(&(blocks as u16).to_be_bytes()),
        0xaa | 0xae if c.len() >= 12 => c[6..10].copy_from_slice(&blocks.to_be_bytes()),
        0x8a | 0x8e if c.len() >= 16 => c[10..14].copy_from_slice(&blocks.to_be_bytes()),
        _ => return None,
    }
    Some(c)
}

async fn pinger(shared: Arc<Shared>, heard: Arc<AtomicBool>, due: Arc<AtomicBool>, ka: Keepalive) {
    let mut ttt: u32 = 0x4b45_0000;
    // When this task first saw `heard` set after the last PDU: no earlier
    // than that PDU, so idleness is never overstated (a ping or a drop
    // comes at most one tick later than it would by the PDU's own time).
    let mut last_rx = Instant::now();
    loop {
        tokio::time::sleep(ka.interval.min(ka.timeout) / 2).await;
        if heard.swap(false, Ordering::Relaxed) {
            last_rx = Instant::now();
        }
        let idle = last_rx.elapsed();
        if due.load(Ordering::Acquire) {
            if idle >= ka.timeout {
                tracing::info!("initiator did not answer a NOP-In ping for {:?}: dropping it", ka.timeout);
                shared.kill.notify_waiters();
                shared.kill.notify_one();
                return;
            }
        } else if idle >= ka.interval {
            ttt = ttt.wrapping_add(1);
            let mut b = Bhs::new(op::NOP_IN);
            b.0[1] = 0x80;
            b.put_u32(16, RESERVED_TAG);
            b.put_u32(20, ttt);
            due.store(true, Ordering::Release);
            let _ = shared.out.send(Out::Pdu { bhs: b, data: Vec::new(), stat: Stat::Peek });
        }
    }
}

async fn writer<W: AsyncWrite + Unpin>(
    mut w: W,
    mut rx: mpsc::UnboundedReceiver<Out>,
    shared: Arc<Shared>,
    fr: Framing,
    max_send: u32,
    mut statsn: u32,
) -> io::Result<()> {
    let mut buf: Vec<u8> = Vec::with_capacity(1 << 20);
    let max_send = max_send.max(512) as usize;
    loop {
        let Some(first) = rx.recv().await else { break };
        let mut next = Some(first);
        let mut close = false;
        while let Some(m) = next.take() {
            match m {
                Out::Close => close = true,
                Out::Pdu { mut bhs, data, stat } => {
                    bhs.put_u32(24, statsn);
                    if stat == Stat::Next {
                        statsn = statsn.wrapping_add(1);
                    }
                    stamp(&mut bhs, &shared);
                    pdu::encode(&mut buf, &bhs, &data, fr);
                }
                Out::Scsi { itt, lun, resp, send_data, residual } => {
                    encode_scsi(&mut buf, itt, lun, resp, send_data, residual, &mut statsn, &shared, fr, max_send);
                }
            }
            if close || buf.len() >= 1 << 20 {
                break;
            }
            next = rx.try_recv().ok();
        }
        if !buf.is_empty() {
            w.write_all(&buf).await?;
            buf.clear();
        }
        if close {
            let _ = w.shutdown().await;
            break;
        }
    }
    Ok(())
}

fn stamp(bhs: &mut Bhs, shared: &Shared) {
    bhs.put_u32(28, shared.exp_cmdsn.load(Ordering::Acquire));
    bhs.put_u32(32, shared.max_cmdsn.load(Ordering::Acquire));
}

#[allow(clippy::too_many_arguments)]
fn encode_scsi(
    buf: &mut Vec<u8>,
    itt: u32,
    lun: u64,
    resp: Response,
    send_data: bool,
    residual: (u8, u32),
    statsn: &mut u32,
    shared: &Shared,
    fr: Framing,
    max_send: usize,
) {
    let good = resp.status == 0 && resp.sense.is_empty();
    let data: &[u8] = if send_data { &resp.data_in } else { &[] };
    // Data beyond the expected length is not sent (overflow residual).
    let data = if send_data && residual.0 == OVERFLOW {
        &data[..data.len().saturating_sub(residual.1 as usize)]
    } else {
        data
    };
    let mut datasn = 0u32;
    let mut offset = 0usize;
    while offset < data.len() {
        let n = (data.len() - offset).min(max_send);
        let last = offset + n == data.len();
        let mut b = Bhs::new(op::DATA_IN);
        let mut flags = 0u8;
        if last {
            flags |= 0x80;
            if good {
                // Phase collapse: status rides on the last Data-In.
                flags |= 0x01 | residual.0;
                b.0[3] = 0;
                b.put_u32(44, residual.1);
            }
        }
        b.0[1] = flags;
        b.put_u64(8, lun);
        b.put_u32(16, itt);
        b.put_u32(20, RESERVED_TAG);
        b.put_u32(24, *statsn);
        if last && good {
            *statsn = statsn.wrapping_add(1);
        }
        stamp(&mut b, shared);
        b.put_u32(36, datasn);
        b.put_u32(40, offset as u32);
        pdu::encode_header(buf, &b, n, fr);
        let chunk = &data[offset..offset + n];
        buf.extend_from_slice(chunk);
        pdu::data_trailer(buf, chunk, fr);
        datasn += 1;
        offset += n;
    }
    if good && !data.is_empty() {
        return;
    }
    let mut b = Bhs::new(op::SCSI_RESP);
    b.0[1] = 0x80 | residual.0;
    b.0[2] = 0;
    b.0[3] = resp.status;
    b.put_u64(8, 0);
    let _ = lun;
    b.put_u32(16, itt);
    b.put_u32(24, *statsn);
    *statsn = statsn.wrapping_add(1);
    stamp(&mut b, shared);
    b.put_u32(36, datasn);
    b.put_u32(44, residual.1);
    let mut seg = Vec::new();
    if !resp.sense.is_empty() {
        seg.extend_from_slice(&(resp.sense.len() as u16).to_be_bytes());
        seg.extend_from_slice(&resp.sense);
    }
    pdu::encode(buf, &b, &seg, fr);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lun_numbers() {
        assert_eq!(lun_number(0), Some(0));
        assert_eq!(lun_number(0x0001_0000_0000_0000), Some(1));
        assert_eq!(lun_number(0x4001_0000_0000_0000), Some(1));
        assert_eq!(lun_number(0x0000_0000_0000_0001), None);
    }

    #[test]
    fn residuals_and_short_writes() {
        assert_eq!(residual_for(512, 10000), (UNDERFLOW, 9488));
        assert_eq!(residual_for(512, 200), (OVERFLOW, 312));
        let cdb = [0x2a, 0, 0, 0, 0, 0, 0, 0, 2, 0];
        assert_eq!(shorten(&cdb, 512).unwrap()[7..9], [0, 1]);
        assert!(shorten(&cdb, 200).is_none());
    }
}
