//! The SCSI command layer (SPC-4 / SBC-4) of a thin-provisioned
//! direct-access disk over a Keel volume.
//!
//! The transport hands every SCSI command to [`LogicalUnit::execute`] with
//! the I_T nexus it arrived on; [`cdb::parse_cdb`] decodes the CDB into a
//! typed [`Cdb`] and the executor runs it against the [`BlockDevice`].
//! Per-LU state (unit attentions, RESERVE(6) and persistent reservations,
//! mode pages) lives behind one mutex that is never held across an await;
//! COMPARE AND WRITE and ORWRITE take an exclusive I/O lock so their
//! read-modify-write is atomic against every other write to the LU.

pub mod cdb;
mod pr;
mod sbc;
pub mod sense;
mod spc;
mod xcopy;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use keel_blockstore::{BlockDevice, ErrorKind};
use parking_lot::Mutex;

pub use cdb::{Cdb, parse_cdb};
pub use sense::SenseError;

/// Logical block size in bytes.
pub const BLOCK: u32 = 512;
/// Logical blocks per physical block, as an exponent, in READ CAPACITY(16).
/// The store's blocks are 4096 bytes, but we report 0 (one 512-byte block
/// per physical block), as tgt does: GET LBA STATUS then answers per
/// logical block, which libiscsi's GetLBAStatus.UnmapSingle requires (with
/// an exponent of 3 it expects the first descriptor past the requested LBA,
/// contrary to SBC-4). The 4 KiB preference still reaches initiators through
/// VPD B0h's OPTIMAL TRANSFER LENGTH GRANULARITY and UNMAP GRANULARITY.
pub const PHYS_EXPONENT: u8 = 0;
/// Maximum transfer length in blocks (VPD page B0h).
pub const MAX_TRANSFER_BLOCKS: u32 = 131_072;
/// Maximum UNMAP LBA count (VPD page B0h).
pub const MAX_UNMAP_BLOCKS: u32 = 1 << 20;
/// Maximum UNMAP block descriptor count (VPD page B0h).
pub const MAX_UNMAP_DESCRIPTORS: u32 = 256;
/// Maximum WRITE SAME length in blocks (VPD page B0h).
pub const MAX_WRITE_SAME_BLOCKS: u64 = 1 << 32;
/// Maximum COMPARE AND WRITE length in blocks (VPD page B0h).
pub const MAX_COMPARE_AND_WRITE_BLOCKS: u32 = 255;
/// WRITE ATOMIC(16): ATOMIC ALIGNMENT and ATOMIC TRANSFER LENGTH
/// GRANULARITY in blocks (one store block).
pub const ATOMIC_BLOCKS: u32 = 8;
/// Unmap granularity in blocks (VPD page B0h).
pub const UNMAP_GRANULARITY: u32 = 8;

/// SCSI status GOOD.
pub const GOOD: u8 = 0x00;
/// SCSI status CHECK CONDITION.
pub const CHECK_CONDITION: u8 = 0x02;
/// SCSI status RESERVATION CONFLICT.
pub const RESERVATION_CONFLICT: u8 = 0x18;

/// What the LU reports about itself.
#[derive(Clone, Debug)]
pub struct LuIdentity {
    /// Volume name.
    pub name: String,
    /// Unit serial number (VPD page 80h).
    pub serial: String,
    /// NAA-6 identifier for VPD page 83h (derive it from a hash of the name).
    pub naa: u64,
    /// Target IQN.
    pub target_name: String,
}

/// One I_T nexus (an iSCSI session). `id` is unique for the process lifetime.
#[derive(Clone, Debug)]
pub struct Nexus {
    /// Process-unique session id.
    pub id: u64,
    /// Initiator IQN.
    pub initiator_name: String,
    /// Initiator session id.
    pub isid: [u8; 6],
    /// Target port name, "IQN,t,0x0001".
    pub target_port_name: String,
    /// Relative target port identifier.
    pub rel_port_id: u16,
}

/// A SCSI command as the transport received it.
#[derive(Clone, Copy, Debug)]
pub struct Command<'a> {
    /// The CDB (iSCSI carries 16 bytes; longer than the command is fine).
    pub cdb: &'a [u8],
    /// Every Data-Out byte the initiator sent (up to its expected data
    /// transfer length), not cut to [`LogicalUnit::data_out_len`]: WRITE
    /// SAME and COMPARE AND WRITE refuse a buffer of the wrong size, block
    /// writes use the first transfer-length bytes and refuse a short buffer
    /// with INVALID FIELD IN COMMAND INFORMATION UNIT, writing nothing.
    pub data_out: &'a [u8],
    /// Logical unit number.
    pub lun: u64,
}

/// The outcome of a command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    /// 0 GOOD, 2 CHECK CONDITION, 0x18 RESERVATION CONFLICT.
    pub status: u8,
    /// Sense bytes, empty unless CHECK CONDITION.
    pub sense: Vec<u8>,
    /// Data-In, truncated to the CDB's allocation length.
    pub data_in: Vec<u8>,
}

impl Response {
    fn good(data_in: Vec<u8>) -> Response {
        Response { status: GOOD, sense: Vec::new(), data_in }
    }

    fn check(e: &SenseError, descriptor: bool) -> Response {
        Response { status: CHECK_CONDITION, sense: e.encode(descriptor), data_in: Vec::new() }
    }

    fn conflict() -> Response {
        Response { status: RESERVATION_CONFLICT, sense: Vec::new(), data_in: Vec::new() }
    }
}

/// Kinds of reset the transport reports to every LU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResetKind {
    /// LOGICAL UNIT RESET.
    Lun,
    /// TARGET WARM RESET.
    TargetWarm,
    /// TARGET COLD RESET.
    TargetCold,
}

/// An I_T nexus as reservations and unit attentions know it: by port names,
/// so it outlives one session id (a re-login with the same ISID is the same
/// nexus).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Port {
    initiator: String,
    isid: [u8; 6],
    target_port: String,
}

impl Port {
    fn of(n: &Nexus) -> Port {
        Port { initiator: n.initiator_name.to_ascii_lowercase(), isid: n.isid, target_port: n.target_port_name.clone() }
    }
}

/// Why a command failed: sense data, or a reservation conflict.
#[derive(Debug)]
enum Fail {
    Sense(SenseError),
    Conflict,
}

impl From<SenseError> for Fail {
    fn from(e: SenseError) -> Fail {
        Fail::Sense(e)
    }
}

type Outcome = Result<Vec<u8>, Fail>;

/// The sense a block store error maps to.
fn dev_err(e: keel_blockstore::Error) -> SenseError {
    match e.kind() {
        ErrorKind::ReadOnly => SenseError::write_protected(),
        ErrorKind::NoSpace => SenseError::space_allocation_failed(),
        ErrorKind::Corrupt => SenseError::unrecovered_read(),
        ErrorKind::OutOfRange => SenseError::lba_out_of_range(),
        _ => SenseError::internal_failure(),
    }
}

/// Mode page state (current values; nothing is saveable).
#[derive(Clone, Copy, Debug)]
struct Modes {
    /// Caching page WCE: writes may sit in a volatile cache.
    wce: bool,
    /// Control page D_SENSE: descriptor-format sense.
    d_sense: bool,
    /// Control page SWP: software write protect.
    swp: bool,
}

impl Default for Modes {
    fn default() -> Modes {
        Modes { wce: true, d_sense: false, swp: false }
    }
}

#[derive(Default)]
struct State {
    known: HashSet<Port>,
    ua: HashMap<Port, VecDeque<(u8, u8)>>,
    reserve6: Option<Port>,
    prevent: HashSet<Port>,
    pr: pr::PrState,
    modes: Modes,
    xcopy: Vec<xcopy::CopyStatus>,
}

impl State {
    fn push_ua(&mut self, port: &Port, asc: u8, ascq: u8) {
        let q = self.ua.entry(port.clone()).or_default();
        if !q.contains(&(asc, ascq)) && q.len() < 8 {
            q.push_back((asc, ascq));
        }
    }
}

/// How a command is treated under a reservation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Access {
    /// Allowed under every reservation.
    Always,
    /// A read-class command.
    Read,
    /// A write-class command.
    Write,
}

/// A thin-provisioned SCSI direct-access logical unit over a block device.
pub struct LogicalUnit<D: BlockDevice> {
    dev: Arc<D>,
    id: LuIdentity,
    state: Mutex<State>,
    /// Writes hold it shared; COMPARE AND WRITE and ORWRITE exclusive.
    io: tokio::sync::RwLock<()>,
}

impl<D: BlockDevice + 'static> LogicalUnit<D> {
    /// A logical unit serving `dev`.
    pub fn new(dev: Arc<D>, id: LuIdentity) -> Self {
        LogicalUnit { dev, id, state: Mutex::new(State::default()), io: tokio::sync::RwLock::new(()) }
    }

    /// Number of Data-Out bytes this CDB transfers (WRITE(10): blocks * 512;
    /// UNMAP, MODE SELECT, PERSISTENT RESERVE OUT, EXTENDED COPY, SANITIZE:
    /// the parameter list length; COMPARE AND WRITE: 2 * blocks * 512), 0
    /// for none or for a CDB that does not decode. For iSCSI residuals.
    pub fn data_out_len(&self, cdb: &[u8]) -> u32 {
        cdb::data_out_len(cdb, BLOCK)
    }

    /// Capacity in logical blocks.
    fn blocks(&self) -> u64 {
        self.dev.size() / BLOCK as u64
    }

    /// True when writes must be refused (read-only volume or SWP).
    fn write_protected(&self) -> bool {
        self.dev.read_only() || self.state.lock().modes.swp
    }

    /// Run one command.
    pub async fn execute(&self, nexus: &Nexus, cmd: Command<'_>) -> Response {
        let port = Port::of(nexus);
        let opcode = cmd.cdb.first().copied().unwrap_or(0xFF);
        let (descriptor, pending) = {
            let mut st = self.state.lock();
            st.known.insert(port.clone());
            let exempt = matches!(opcode, cdb::op::INQUIRY | cdb::op::REPORT_LUNS | cdb::op::REQUEST_SENSE);
            let pending = if exempt { None } else { st.ua.get_mut(&port).and_then(|q| q.pop_front()) };
            (st.modes.d_sense, pending)
        };
        if let Some((asc, ascq)) = pending {
            return Response::check(&SenseError::new(sense::key::UNIT_ATTENTION, asc, ascq), descriptor);
        }
        let parsed = match parse_cdb(cmd.cdb) {
            Ok(c) => c,
            Err(e) => return Response::check(&e, descriptor),
        };
        let result = match self.reservation_check(&port, &parsed) {
            Ok(()) => self.run(nexus, &port, &parsed, cmd).await,
            Err(f) => Err(f),
        };
        match result {
            Ok(data) => Response::good(data),
            Err(Fail::Conflict) => Response::conflict(),
            // D_SENSE may have just changed (MODE SELECT); read it again.
            Err(Fail::Sense(e)) => Response::check(&e, self.state.lock().modes.d_sense),
        }
    }

    /// RESERVATION CONFLICT when a RESERVE(6) or persistent reservation
    /// held through another nexus forbids `c` (SPC-4 5.13.1 table 68, SBC-4
    /// 4.17 table 13).
    fn reservation_check(&self, port: &Port, c: &Cdb) -> Result<(), Fail> {
        let st = self.state.lock();
        if let Some(holder) = &st.reserve6
            && holder != port
        {
            let allowed = matches!(
                c,
                Cdb::Inquiry { .. }
                    | Cdb::ReportLuns { .. }
                    | Cdb::RequestSense { .. }
                    | Cdb::ReportSupportedOpcodes { .. }
                    | Cdb::ReportTargetPortGroups { .. }
                    | Cdb::Release6
                    | Cdb::PreventAllow { prevent: false }
            );
            if !allowed {
                return Err(Fail::Conflict);
            }
        }
        if st.pr.conflicts(port, access(c)) { Err(Fail::Conflict) } else { Ok(()) }
    }

    async fn run(&self, nexus: &Nexus, port: &Port, c: &Cdb, cmd: Command<'_>) -> Outcome {
        let data = cmd.data_out;
        match c {
            Cdb::TestUnitReady => Ok(Vec::new()),
            Cdb::RequestSense { desc, alloc } => Ok(self.request_sense(port, *desc, *alloc)),
            Cdb::Inquiry { evpd, page, alloc } => self.inquiry(nexus, *evpd, *page, *alloc),
            Cdb::ReportLuns { select, alloc } => report_luns(*select, *alloc),
            Cdb::ReadCapacity10 => Ok(self.read_capacity10()),
            Cdb::ReadCapacity16 { alloc } => Ok(self.read_capacity16(*alloc)),
            Cdb::Read { range, .. } => self.read(*range).await,
            Cdb::Write { range, fua, .. } => self.write(*range, *fua, data, false).await,
            Cdb::WriteVerify { range, .. } => self.write(*range, true, data, false).await,
            Cdb::Verify { range, bytchk, .. } => self.verify(*range, *bytchk, data).await,
            Cdb::PreFetch { range, immed, .. } => self.pre_fetch(*range, *immed).await,
            Cdb::SyncCache { range, .. } => self.sync_cache(*range).await,
            Cdb::Unmap { anchor, param_len } => self.unmap(*anchor, *param_len, data).await,
            Cdb::WriteSame { range, unmap, ndob, size, .. } => {
                self.write_same(*range, *unmap, *ndob, *size, data).await
            }
            Cdb::GetLbaStatus { lba, alloc } => self.get_lba_status(*lba, *alloc).await,
            Cdb::CompareAndWrite { range, fua } => self.compare_and_write(*range, *fua, data).await,
            Cdb::OrWrite { range, fua } => self.orwrite(*range, *fua, data).await,
            Cdb::WriteAtomic { range, fua } => self.write(*range, *fua, data, true).await,
            Cdb::PrIn { action, alloc } => self.pr_in(*action, *alloc),
            Cdb::PrOut { action, scope, rtype, param_len } => {
                self.pr_out(nexus, port, *action, *scope, *rtype, *param_len, data)
            }
            Cdb::Reserve6 => self.reserve6(port),
            Cdb::Release6 => self.release6(port),
            Cdb::ModeSense { ten, dbd, llbaa, pc, page, subpage, alloc } => {
                self.mode_sense(*ten, *dbd, *llbaa, *pc, *page, *subpage, *alloc)
            }
            Cdb::ModeSelect { ten, sp, param_len, .. } => self.mode_select(port, *ten, *sp, *param_len, data),
            Cdb::ReportSupportedOpcodes { rctd, options, opcode, sa, alloc } => {
                spc::report_supported_opcodes(*rctd, *options, *opcode, *sa, *alloc)
            }
            Cdb::ReportTargetPortGroups { alloc } => Ok(spc::report_target_port_groups(nexus, *alloc)),
            Cdb::StartStopUnit { power_condition, loej, .. } => self.start_stop(*power_condition, *loej),
            Cdb::PreventAllow { prevent } => {
                let mut st = self.state.lock();
                if *prevent {
                    st.prevent.insert(port.clone());
                } else {
                    st.prevent.remove(port);
                }
                Ok(Vec::new())
            }
            Cdb::ReadDefectData { twelve, plist, glist, format, alloc } => {
                Ok(spc::read_defect_data(*twelve, *plist, *glist, *format, *alloc))
            }
            Cdb::ExtendedCopy { param_len } => self.extended_copy(port, *param_len, data).await,
            Cdb::ReceiveCopyResults { action, list_id, alloc } => {
                self.receive_copy_results(port, *action, *list_id, *alloc)
            }
            Cdb::Sanitize { action, param_len, .. } => self.sanitize(*action, *param_len, data).await,
        }
    }

    /// I_T nexus loss: RESERVE(6) held through it is released and its
    /// PREVENT cleared; persistent reservations stay.
    pub fn nexus_lost(&self, nexus: &Nexus) {
        let port = Port::of(nexus);
        let mut st = self.state.lock();
        if st.reserve6.as_ref() == Some(&port) {
            st.reserve6 = None;
        }
        st.prevent.remove(&port);
    }

    /// LOGICAL UNIT RESET or TARGET WARM/COLD RESET: RESERVE(6) released,
    /// PREVENT cleared, mode pages back to their defaults, a unit attention
    /// for every other nexus the LU knows (29h/03h for a LUN reset, 29h/00h
    /// warm, 29h/01h cold). Persistent reservations survive.
    pub fn reset(&self, by: &Nexus, kind: ResetKind) {
        let by = Port::of(by);
        let mut st = self.state.lock();
        st.known.insert(by.clone());
        st.reserve6 = None;
        st.prevent.clear();
        let (asc, ascq) = match kind {
            ResetKind::Lun => (0x29, 0x03),
            ResetKind::TargetWarm => (0x29, 0x00),
            ResetKind::TargetCold => (0x29, 0x01),
        };
        // Device operating modes return to their initial conditions
        // (SAM-5 6.3.3); nothing is saved, so that is the default values.
        st.modes = Modes::default();
        // Every other nexus learns of the reset through a unit attention;
        // the one that asked for it knows already (tgt does the same, and
        // libiscsi's suite counts on it: its teardown after
        // Reserve6.LUNReset would otherwise trip over the attention).
        let known: Vec<Port> = st.known.iter().filter(|p| **p != by).cloned().collect();
        for p in known {
            // A reset supersedes what was pending (SAM-5 5.14).
            st.ua.remove(&p);
            st.push_ua(&p, asc, ascq);
        }
    }

    fn request_sense(&self, port: &Port, desc: bool, alloc: u32) -> Vec<u8> {
        let pending = self.state.lock().ua.get_mut(port).and_then(|q| q.pop_front());
        let e = match pending {
            Some((asc, ascq)) => SenseError::new(sense::key::UNIT_ATTENTION, asc, ascq),
            None => SenseError::new(sense::key::NO_SENSE, 0, 0),
        };
        truncate(e.encode(desc), alloc)
    }

    fn reserve6(&self, port: &Port) -> Outcome {
        let mut st = self.state.lock();
        if st.pr.has_registrations() {
            return Err(Fail::Conflict);
        }
        match &st.reserve6 {
            Some(h) if h != port => Err(Fail::Conflict),
            _ => {
                st.reserve6 = Some(port.clone());
                Ok(Vec::new())
            }
        }
    }

    fn release6(&self, port: &Port) -> Outcome {
        let mut st = self.state.lock();
        if st.pr.has_registrations() {
            return Err(Fail::Conflict);
        }
        if st.reserve6.as_ref() == Some(port) {
            st.reserve6 = None;
        }
        Ok(Vec::new())
    }

    fn start_stop(&self, power_condition: u8, loej: bool) -> Outcome {
        // Power conditions other than START_VALID (0), ACTIVE (1), IDLE (2),
        // STANDBY (3), LU_CONTROL (7), FORCE_IDLE_0 (0xA), FORCE_STANDBY_0
        // (0xB) are reserved.
        if !matches!(power_condition, 0 | 1 | 2 | 3 | 7 | 0xA | 0xB) {
            return Err(SenseError::invalid_field_in_cdb(4, Some(7)).into());
        }
        // The medium is not removable (RMB=0): there is nothing to load or
        // eject (SBC-4 5.25).
        if power_condition == 0 && loej {
            return Err(SenseError::invalid_field_in_cdb(4, Some(1)).into());
        }
        Ok(Vec::new())
    }
}

/// The reservation class of a command.
fn access(c: &Cdb) -> Access {
    match c {
        Cdb::Read { .. }
        | Cdb::Verify { .. }
        | Cdb::PreFetch { .. }
        | Cdb::GetLbaStatus { .. }
        | Cdb::ReadDefectData { .. }
        | Cdb::ModeSense { .. }
        | Cdb::ReceiveCopyResults { .. } => Access::Read,
        Cdb::Write { .. }
        | Cdb::WriteVerify { .. }
        | Cdb::WriteSame { .. }
        | Cdb::Unmap { .. }
        | Cdb::CompareAndWrite { .. }
        | Cdb::OrWrite { .. }
        | Cdb::WriteAtomic { .. }
        | Cdb::SyncCache { .. }
        | Cdb::ModeSelect { .. }
        | Cdb::Sanitize { .. }
        | Cdb::ExtendedCopy { .. }
        | Cdb::PreventAllow { prevent: true } => Access::Write,
        Cdb::StartStopUnit { power_condition, start, .. } if !(*start && *power_condition == 0) => Access::Write,
        _ => Access::Always,
    }
}

/// `data` cut to the allocation length.
fn truncate(mut data: Vec<u8>, alloc: u32) -> Vec<u8> {
    data.truncate(alloc as usize);
    data
}

fn report_luns(select: u8, alloc: u32) -> Outcome {
    // SELECT REPORT 00h, 01h (well known, none here), 02h; SPC-4 adds 10h-12h.
    if !matches!(select, 0x00 | 0x01 | 0x02 | 0x10 | 0x11 | 0x12) {
        return Err(SenseError::invalid_field_in_cdb(2, Some(7)).into());
    }
    // LUN 0 is an ordinary LU: listed for "all" (00h, 02h, 11h), not for
    // the well-known (01h) or administrative-only (10h, 12h) selections.
    let mut d = vec![0u8; 8];
    if matches!(select, 0x00 | 0x02 | 0x11) {
        d[3] = 8;
        d.extend_from_slice(&[0u8; 8]);
    }
    Ok(truncate(d, alloc))
}

/// The answer for a LUN that does not exist.
pub fn no_such_lun(cmd: Command<'_>) -> Response {
    match parse_cdb(cmd.cdb) {
        Ok(Cdb::Inquiry { evpd: false, alloc, .. }) => {
            let mut d = vec![0u8; 36];
            d[0] = 0x7F; // qualifier 3, device type 1Fh
            d[2] = 0x06;
            d[3] = 0x02;
            d[4] = 31;
            d[8..16].copy_from_slice(b"KEEL    ");
            Response::good(truncate(d, alloc))
        }
        Ok(Cdb::Inquiry { .. }) => Response::check(&SenseError::lun_not_supported(), false),
        Ok(Cdb::ReportLuns { select, alloc }) => match report_luns(select, alloc) {
            Ok(d) => Response::good(d),
            Err(Fail::Sense(e)) => Response::check(&e, false),
            Err(Fail::Conflict) => Response::conflict(),
        },
        Ok(Cdb::RequestSense { desc, alloc }) => {
            Response::good(truncate(SenseError::lun_not_supported().encode(desc), alloc))
        }
        _ => Response::check(&SenseError::lun_not_supported(), false),
    }
}
