//! The io_uring engine: positional reads, writes and fdatasync submitted to
//! one io_uring per backend and reaped, as far as possible, by threads that
//! are running anyway (fio's model), not by a thread of their own.
//!
//! # Design
//!
//! * **One ring per backend**, `RING_ENTRIES` submission entries (the kernel
//!   sizes the completion queue at twice that), with `IORING_SETUP_SUBMIT_ALL`
//!   when the kernel has it (5.18). The kernel posts a block device's CQE from
//!   task work of the thread that submitted the SQE: it interrupts (or wakes)
//!   that thread to do so. We do not set `COOP_TASKRUN`, which would defer
//!   that until the submitter next enters the kernel: it measured no better
//!   here, and it would leave an idle worker asleep while a busy one (say,
//!   checksumming a 1 MiB read) sits on completions. `SINGLE_ISSUER` and
//!   `DEFER_TASKRUN` are out of reach: every tokio worker submits. The
//!   file is registered with the ring, so an I/O costs the kernel no
//!   file-table lookup or reference count.
//! * **Submission** happens on the calling task's thread, combined: a
//!   submitter pushes its SQE under `Shared::sq_lock` (a `parking_lot::Mutex`
//!   held only for the push, never across a system call or an `.await`)
//!   and, unless another thread is already submitting, becomes the
//!   submitter: it calls `io_uring_enter(to_submit)` without the lock, then
//!   takes it again and repeats while SQEs are queued. A thread that finds a
//!   submitter at work leaves its SQE to it and goes on at once, so two
//!   workers never wait for each other's system call, and SQEs pushed
//!   meanwhile go to the kernel in one enter (one doorbell for the batch).
//!   The submitter flag is cleared under the lock only when the queue is
//!   empty, so no SQE is left behind. An enter also runs the thread's
//!   pending completion task work, so CQEs of earlier I/Os are in the queue
//!   when it returns.
//! * **Reaping** (draining the completion queue, storing each result in the
//!   slot named by `user_data` and waking its task) is done under
//!   `Shared::cq_lock`, which is only ever held for the drain itself, never
//!   across a wait, by whoever gets there:
//!   1. *the I/O futures*: each poll that finds its result missing first
//!      tries the lock and drains what is there (`try_lock`: if someone else
//!      is draining, it does not wait). Under load most CQEs are found this
//!      way, right after the enter that posted them, by a thread that is
//!      already running, and the tasks they wake are scheduled on that
//!      worker without waking another thread;
//!   2. *the runtime's reactor*, when all workers are idle: the ring fd is
//!      registered with the tokio I/O driver of the runtime the first pending
//!      I/O is polled in (`tokio::io::unix::AsyncFd`, readable when the CQ is
//!      not empty), with a waker of our own (`ReactorWake`) rather than a
//!      task's. When a worker parks in `epoll_wait`, a posted CQE wakes it
//!      directly (the same wake that brings it in to run its completion task
//!      work), and `ReactorWake::wake` drains the queue from inside the
//!      driver and re-arms itself. The waker stays registered for as long as
//!      the runtime lives, so there is always exactly one registration
//!      however many I/Os wait. Readiness is cleared *before* each drain and
//!      re-polled after it, so a CQE posted during the drain raises a new
//!      edge: none is lost. (A runtime built without `enable_io` has no
//!      reactor: registering panics inside tokio; we catch that once per
//!      backend and use the fallback.)
//!   3. *the fallback thread* (`keel-uring-cq`), which guarantees progress
//!      when neither of the above will run: I/O polled outside any tokio
//!      runtime (e.g. `futures::executor::block_on`), a runtime without a
//!      reactor, or the reactor's runtime shut down. A future that goes
//!      pending without the reactor's cover marks its slot `foreign`; while
//!      any slot is foreign (or the reactor is gone and I/O is in flight) the
//!      thread waits in `io_uring_enter(GETEVENTS, min_complete = 1)` (no
//!      submission, no lock) and drains. Otherwise it sleeps on a condvar
//!      and, every `WATCHDOG` interval, drains whatever sits in the queue, so
//!      a runtime that holds the reactor but is not being driven (a
//!      current-thread runtime outside `block_on`) delays I/O by at most that
//!      interval instead of hanging it.
//!
//!   A poll stores its waker in its slot under the slot's lock and a reaper
//!   stores the result and takes the waker under the same lock, so a result
//!   is either seen by the poll or wakes the waker it stored: no lost
//!   wake-ups.
//! * **Per-I/O state** lives in a slot table allocated at open: `RING_ENTRIES`
//!   slots, each a small `Mutex<{result, waker, foreign}>`, a stack of free
//!   slot indices, and a `tokio::sync::Semaphore` with one permit per slot
//!   that tasks acquire (asynchronously) before popping a free slot.
//!   `user_data` is the slot index. Nothing is heap-allocated per I/O (the
//!   reactor registration and its waker are made once per backend and
//!   runtime). Because at most `RING_ENTRIES` operations are in flight (plus
//!   the shutdown NOP), the completion queue (2 x `RING_ENTRIES`) cannot
//!   overflow.
//! * **Shutdown**: dropping the backend removes the reactor registration,
//!   tells the fallback thread to exit (flag, condvar, and a NOP so a wait in
//!   the kernel returns) and joins it.
//!
//! Waits in the kernel use `IORING_ENTER_EXT_ARG` timeouts (Linux 5.11), so
//! a wait whose CQE was taken by another reaper just before it began ends
//! after the timeout; `open` refuses rings without that feature.
//!
//! # Cancellation
//!
//! The futures borrow the caller's buffer and hand its address to the kernel.
//! If such a future is dropped while its SQE is in flight, the slot guard's
//! `Drop` blocks the dropping thread until the CQE has been reaped (it reaps
//! itself, waiting in the kernel between drains, so this works even when the
//! dropping thread is the only one that drives the runtime), so the borrow
//! (which lasts as long as the future) cannot end while the kernel may still
//! touch the buffer. The wait is bounded by one device I/O. See the caveat on
//! leaking in [`SlotGuard::submit`].

use std::fs::File;
use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll, Wake, Waker};
use std::thread::JoinHandle;
use std::time::Duration;

use io_uring::{IoUring, opcode, squeue, types};
use parking_lot::{Condvar, Mutex};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;
use tokio::sync::{Semaphore, SemaphorePermit};

use super::aligned::is_aligned;
use super::{BLOCK_SIZE, Backend};

/// Submission queue entries, and the number of I/O slots.
const RING_ENTRIES: u32 = 256;
/// `user_data` of the NOP that wakes the fallback thread at shutdown.
const SHUTDOWN: u64 = u64::MAX;
/// Largest length put in one SQE (the field is a u32; keep it block aligned
/// so a remainder after a full-length transfer stays aligned for O_DIRECT).
const MAX_SQE_LEN: usize = (u32::MAX as usize) & !(BLOCK_SIZE - 1);
/// Most buffers in one vectored SQE (the kernel's `UIO_MAXIOV`).
const MAX_IOV: usize = 1024;
/// How often the fallback thread drains the queue while the reactor covers
/// every waiter (see the module docs).
const WATCHDOG: Duration = Duration::from_millis(10);
/// Longest single wait of the fallback thread in the kernel.
const FALLBACK_WAIT: Duration = Duration::from_millis(10);
/// Longest single wait in the kernel of a dropped future's cancellation.
const CANCEL_WAIT: Duration = Duration::from_millis(1);

/// `Shared::reactor_state`: no registration yet (or dropped).
const REACTOR_NONE: u8 = 0;
/// Registered and armed: every posted CQE will be reaped by the reactor.
const REACTOR_ARMED: u8 = 1;
/// The runtime it was registered with is shutting down or gone.
const REACTOR_DEAD: u8 = 2;
/// Registration failed (a runtime without IO); not retried.
const REACTOR_UNAVAILABLE: u8 = 3;

/// io_uring + O_DIRECT engine.
pub struct UringBackend {
    shared: Arc<Shared>,
    fallback: Option<JoinHandle<()>>,
    len: AtomicU64,
    direct: bool,
}

/// State shared by the submitting tasks, the reactor and the fallback
/// thread.
struct Shared {
    /// The ring fd's registration with a tokio reactor. Declared before
    /// `ring`, whose fd it refers to, so it is dropped first (it is normally
    /// taken out earlier, in `UringBackend::drop`).
    reactor: Mutex<Option<Reactor>>,
    /// One of the `REACTOR_*` constants.
    reactor_state: AtomicU8,
    ring: IoUring,
    /// Registered with the ring as file 0; SQEs name it by that index. The
    /// ring holds a reference of its own until `UringBackend::drop`
    /// unregisters it. Used directly only to re-read its size.
    file: File,
    /// Serializes every use of the submission queue (`submission_shared`);
    /// true while a thread is submitting on everyone's behalf.
    sq_lock: Mutex<bool>,
    /// Serializes every use of the completion queue (`completion_shared`).
    /// Held only while draining, never across a wait.
    cq_lock: Mutex<()>,
    slots: Box<[Slot]>,
    /// Indices of idle slots. Capacity `RING_ENTRIES`, never reallocates.
    free: Mutex<Vec<u32>>,
    /// One permit per idle slot: acquiring a permit guarantees `free` is not
    /// empty.
    permits: Semaphore,
    /// Slots whose waiting future is not covered by the reactor.
    foreign_waiters: AtomicUsize,
    /// The fallback thread sleeps on `fallback_cv` under this lock.
    fallback_lock: Mutex<()>,
    fallback_cv: Condvar,
    /// Set when the backend is dropped: the fallback thread exits.
    shutdown: AtomicBool,
    /// For the reactor's waker, which must not keep `Shared` alive.
    this: Weak<Shared>,
    /// CQEs reaped, indexed by `Reaper`.
    reaped: [AtomicU64; 3],
}

/// Who drained a CQE (for [`UringBackend::reap_stats`]).
#[derive(Clone, Copy)]
enum Reaper {
    Poll = 0,
    Reactor = 1,
    Thread = 2,
}

/// How many completions each reaping path has handled since open; a
/// diagnostic for benchmarks and tests (see the module docs for the paths).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReapStats {
    /// Found by a polled I/O future on its own thread.
    pub by_poll: u64,
    /// Found by the runtime's reactor (a worker woken from `epoll_wait`).
    pub by_reactor: u64,
    /// Found by the fallback thread, or by a dropped future cancelling.
    pub by_thread: u64,
}

/// The ring fd registered with one runtime's reactor.
struct Reactor {
    fd: AsyncFd<RingFd>,
    /// `Waker::from(Arc<ReactorWake>)`: the only waker ever registered.
    waker: Waker,
}

/// The ring's fd, borrowed (the ring owns it and outlives the registration).
struct RingFd(RawFd);

impl AsRawFd for RingFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// Woken by the reactor when the completion queue becomes non-empty.
struct ReactorWake {
    shared: Weak<Shared>,
}

impl Wake for ReactorWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        if let Some(shared) = self.shared.upgrade() {
            shared.reactor_round();
        }
    }
}

struct Slot {
    state: Mutex<SlotState>,
}

#[derive(Default)]
struct SlotState {
    /// The CQE result (bytes transferred or `-errno`), once posted.
    result: Option<i32>,
    /// The task to wake when the result arrives.
    waker: Option<Waker>,
    /// Counted in `Shared::foreign_waiters`.
    foreign: bool,
}

impl UringBackend {
    /// Open an existing file or device. Fails (so [`super::Engine::Auto`] can
    /// fall back) when io_uring is unavailable: no kernel support, disabled
    /// by `kernel.io_uring_disabled`, blocked by seccomp, or too old to have
    /// the READ/WRITE/FSYNC opcodes and `IORING_ENTER_EXT_ARG` (5.11), or
    /// when the ring refuses to register the file.
    pub fn open(path: &Path) -> io::Result<UringBackend> {
        let (file, direct, len) = super::open_direct(path)?;

        let mut ring: IoUring = match IoUring::builder().dontfork().setup_submit_all().build(RING_ENTRIES) {
            Ok(ring) => ring,
            // Kernels before 5.18 refuse the flag.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => IoUring::builder().dontfork().build(RING_ENTRIES)?,
            Err(e) => return Err(e),
        };
        if !ring.params().is_feature_ext_arg() {
            return Err(io::Error::new(io::ErrorKind::Unsupported, "io_uring lacks IORING_ENTER_EXT_ARG (Linux 5.11)"));
        }
        let mut probe = io_uring::Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        for (code, name) in [
            (opcode::Read::CODE, "READ"),
            (opcode::Write::CODE, "WRITE"),
            (opcode::Fsync::CODE, "FSYNC"),
            (opcode::Nop::CODE, "NOP"),
        ] {
            if !probe.is_supported(code) {
                return Err(io::Error::new(io::ErrorKind::Unsupported, format!("io_uring lacks IORING_OP_{name}")));
            }
        }
        nop_round_trip(&mut ring)?;
        // The file is registered, so SQEs name it by index and the kernel
        // skips the file-table lookup and reference count of every I/O.
        ring.submitter().register_files(&[file.as_raw_fd()])?;

        let slots: Box<[Slot]> = (0..RING_ENTRIES).map(|_| Slot { state: Mutex::new(SlotState::default()) }).collect();
        // Pop order does not matter; reverse so slot 0 is handed out first.
        let free: Vec<u32> = (0..RING_ENTRIES).rev().collect();
        let shared = Arc::new_cyclic(|this| Shared {
            reactor: Mutex::new(None),
            reactor_state: AtomicU8::new(REACTOR_NONE),
            ring,
            file,
            sq_lock: Mutex::new(false),
            cq_lock: Mutex::new(()),
            slots,
            free: Mutex::new(free),
            permits: Semaphore::new(RING_ENTRIES as usize),
            foreign_waiters: AtomicUsize::new(0),
            fallback_lock: Mutex::new(()),
            fallback_cv: Condvar::new(),
            shutdown: AtomicBool::new(false),
            this: this.clone(),
            reaped: Default::default(),
        });
        let fallback = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new().name("keel-uring-cq".into()).spawn(move || shared.fallback_loop())?
        };
        Ok(UringBackend { shared, fallback: Some(fallback), len: AtomicU64::new(len), direct })
    }

    /// Whether O_DIRECT is in effect.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    fn check_direct(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.direct && !(is_aligned(buf) && offset.is_multiple_of(BLOCK_SIZE as u64)) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "O_DIRECT I/O needs {BLOCK_SIZE}-aligned buffer, length and offset \
                     (got {} bytes at {offset})",
                    buf.len()
                ),
            ));
        }
        Ok(())
    }

    /// The file, as registered at open (index 0 of the ring's table).
    fn fd(&self) -> types::Fixed {
        types::Fixed(0)
    }

    /// Completions reaped by each path so far.
    pub fn reap_stats(&self) -> ReapStats {
        let n = |r: Reaper| self.shared.reaped[r as usize].load(Ordering::Relaxed);
        ReapStats { by_poll: n(Reaper::Poll), by_reactor: n(Reaper::Reactor), by_thread: n(Reaper::Thread) }
    }
}

/// Submit a NOP and wait for it on the calling thread, before the ring is
/// shared: proves that `io_uring_enter` works (seccomp filters and some
/// sandboxes allow `io_uring_setup` but refuse `io_uring_enter`).
fn nop_round_trip(ring: &mut IoUring) -> io::Result<()> {
    let nop = opcode::Nop::new().build().user_data(0);
    // SAFETY: a NOP references no memory.
    unsafe { ring.submission().push(&nop) }.map_err(|_| io::Error::other("io_uring submission queue full at open"))?;
    loop {
        match ring.submit_and_wait(1) {
            Ok(_) => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    match ring.completion().next() {
        Some(cqe) if cqe.result() >= 0 => Ok(()),
        Some(cqe) => Err(io::Error::from_raw_os_error(-cqe.result())),
        None => Err(io::Error::other("io_uring NOP did not complete")),
    }
}

impl Shared {
    /// Push `sqe` and submit it (and anything else queued).
    ///
    /// # Safety
    ///
    /// Every buffer `sqe` points to must stay valid, and not be otherwise
    /// accessed in a conflicting way, until its CQE has been reaped.
    unsafe fn push_and_submit(&self, sqe: &squeue::Entry) {
        {
            let mut submitting = self.sq_lock.lock();
            loop {
                // SAFETY: `sq_lock` is held, and every SubmissionQueue is
                // created under it and dropped before it is released, so no
                // other SubmissionQueue exists.
                let mut sq = unsafe { self.ring.submission_shared() };
                // SAFETY: forwarded from this function's contract.
                if unsafe { sq.push(sqe) }.is_ok() {
                    break;
                }
                // Cannot happen (at most RING_ENTRIES operations are in
                // flight, and the queue holds that many), but stay correct:
                // hand the queue to the kernel and retry.
                drop(sq);
                self.submit_queued();
            }
            // The SubmissionQueue was dropped above, which published its tail.
            if *submitting {
                return; // the submitter at work takes this SQE too
            }
            *submitting = true;
        }
        loop {
            self.submit_queued();
            let mut submitting = self.sq_lock.lock();
            // SAFETY: `sq_lock` is held; this SubmissionQueue is only read
            // and dropped right away.
            if unsafe { self.ring.submission_shared() }.is_empty() {
                *submitting = false;
                return;
            }
        }
    }

    /// Hand every queued SQE to the kernel. Called by the one thread that is
    /// submitting (see [`Shared::push_and_submit`]), without `sq_lock`:
    /// pushes under the lock may go on meanwhile (the kernel takes SQEs up
    /// to the tail it reads; later ones wait for the next round). The one
    /// exception, a push that finds the queue full (which the slot count
    /// rules out), calls it under the lock; the kernel serializes
    /// concurrent enters itself.
    ///
    /// Once an SQE has been published it cannot be taken back, and its buffer
    /// is only guaranteed alive while the submitting future waits for the
    /// CQE, so the SQE *must* reach the kernel: transient failures (EINTR,
    /// EAGAIN, EBUSY, ENOMEM) are retried with a short back-off; any other
    /// failure means the ring itself is broken (the NOP round trip at open
    /// proved it worked) and we abort rather than return with an SQE still
    /// pointing at a buffer we no longer own or hang every future forever.
    fn submit_queued(&self) {
        let mut backoff = Duration::from_micros(10);
        loop {
            match self.ring.submitter().submit() {
                Ok(_) => return,
                Err(e) => match e.raw_os_error() {
                    Some(libc::EINTR) => {}
                    Some(libc::EAGAIN | libc::EBUSY | libc::ENOMEM) => {
                        // Rare (kernel allocation failure, CQ overflow
                        // backlog). Reapers never wait for the submitter, so
                        // it resolves; other threads' SQEs wait in the queue
                        // for at most the back-off.
                        std::thread::sleep(backoff);
                        backoff = (backoff * 2).min(Duration::from_millis(10));
                    }
                    _ => {
                        tracing::error!("io_uring submission failed irrecoverably: {e}");
                        std::process::abort();
                    }
                },
            }
        }
    }

    /// Drain the completion queue unless another thread is draining it.
    /// For callers that are not responsible for progress (a polled future).
    fn try_reap(&self) {
        if let Some(cq) = self.cq_lock.try_lock() {
            self.drain_locked(Reaper::Poll);
            drop(cq);
        }
    }

    /// Drain the completion queue, waiting for the lock if needed (it is only
    /// ever held for a drain).
    fn reap(&self, by: Reaper) {
        let _cq = self.cq_lock.lock();
        self.drain_locked(by);
    }

    /// Complete every CQE in the queue. Call with `cq_lock` held.
    fn drain_locked(&self, by: Reaper) {
        // SAFETY: `cq_lock` is held, and every CompletionQueue is created
        // under it and dropped before it is released, so no other
        // CompletionQueue exists.
        let cq = unsafe { self.ring.completion_shared() };
        let mut n = 0;
        for cqe in cq {
            match cqe.user_data() {
                SHUTDOWN => {}
                idx => {
                    self.complete(idx, cqe.result());
                    n += 1;
                }
            }
        }
        // Dropping `cq` (consumed by the loop) published the new head.
        if n > 0 {
            self.reaped[by as usize].fetch_add(n, Ordering::Relaxed);
        }
    }

    fn complete(&self, idx: u64, result: i32) {
        let Some(slot) = usize::try_from(idx).ok().and_then(|i| self.slots.get(i)) else {
            tracing::error!("io_uring CQE with unknown user_data {idx}");
            return;
        };
        let waker = {
            let mut st = slot.state.lock();
            st.result = Some(result);
            st.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Wait in the kernel until the completion queue holds an entry, or
    /// `timeout`. Takes no lock and submits nothing.
    fn wait_cq(&self, timeout: Duration) {
        let ts = types::Timespec::from(timeout);
        let args = types::SubmitArgs::new().timespec(&ts);
        let flags = io_uring::EnterFlags::GETEVENTS.bits() | io_uring::EnterFlags::EXT_ARG.bits();
        // SAFETY: no submissions (to_submit = 0); with EXT_ARG the argument
        // must be an `io_uring_getevents_arg`, which `SubmitArgs` is
        // (repr(transparent)), and it and the timespec it points to outlive
        // the call.
        let waited = unsafe { self.ring.submitter().enter(0, 1, flags, Some(&args)) };
        if let Err(e) = waited {
            match e.raw_os_error() {
                Some(libc::ETIME | libc::EINTR | libc::EAGAIN | libc::EBUSY) => {}
                _ => {
                    tracing::error!("io_uring completion wait failed: {e}");
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    }

    /// Whether a posted CQE will be reaped by the reactor without anyone
    /// polling; registers with the current runtime's reactor if there is
    /// none yet.
    fn reactor_covers(&self) -> bool {
        match self.reactor_state.load(Ordering::Acquire) {
            REACTOR_ARMED => true,
            REACTOR_UNAVAILABLE => false,
            _ => self.start_reactor(),
        }
    }

    #[cold]
    fn start_reactor(&self) -> bool {
        if tokio::runtime::Handle::try_current().is_err() {
            return false;
        }
        {
            let mut reactor = self.reactor.lock();
            match self.reactor_state.load(Ordering::Acquire) {
                REACTOR_ARMED => return true,
                REACTOR_UNAVAILABLE => return false,
                _ => {}
            }
            // Drop a registration with a dead runtime before making one.
            *reactor = None;
            let fd = RingFd(self.ring.as_raw_fd());
            // tokio panics (rather than returning an error) when the runtime
            // was built without IO; that is the only way to find out.
            let made = std::panic::catch_unwind(|| {
                // SAFETY: the fd is the ring's, owned by `self.ring`, which
                // stays open for as long as this registration: it is kept in
                // `self.reactor`, dropped before `ring` (field order) and in
                // practice earlier, in `UringBackend::drop`.
                unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
            });
            match made {
                Ok(Ok(fd)) => {
                    let waker = Waker::from(Arc::new(ReactorWake { shared: self.this.clone() }));
                    *reactor = Some(Reactor { fd, waker });
                    self.reactor_state.store(REACTOR_ARMED, Ordering::Release);
                }
                Ok(Err(e)) => {
                    tracing::warn!("io_uring: cannot register the ring with the tokio reactor ({e}); using a thread");
                    self.reactor_state.store(REACTOR_UNAVAILABLE, Ordering::Release);
                    return false;
                }
                Err(_) => {
                    tracing::warn!("io_uring: the tokio runtime has no IO driver (enable_io); using a thread");
                    self.reactor_state.store(REACTOR_UNAVAILABLE, Ordering::Release);
                    return false;
                }
            }
        }
        // Arm it (and reap anything already there).
        self.reactor_round();
        self.reactor_state.load(Ordering::Acquire) == REACTOR_ARMED
    }

    /// Clear the ring fd's readiness, drain, and re-arm, until the reactor
    /// holds our waker with no readiness pending. Runs when the reactor
    /// wakes `ReactorWake`, and once at registration.
    fn reactor_round(&self) {
        loop {
            {
                let reactor = self.reactor.lock();
                let Some(r) = reactor.as_ref() else { return };
                let mut cx = Context::from_waker(&r.waker);
                match r.fd.poll_read_ready(&mut cx) {
                    // Registered: the next CQE posted wakes us.
                    Poll::Pending => return,
                    // Cleared before draining: a CQE posted from here on
                    // raises a new edge that the next poll sees.
                    Poll::Ready(Ok(mut guard)) => guard.clear_ready(),
                    Poll::Ready(Err(_)) => {
                        // The runtime is shutting down: hand over to the
                        // fallback thread.
                        self.reactor_state.store(REACTOR_DEAD, Ordering::Release);
                        drop(reactor);
                        self.notify_fallback();
                        return;
                    }
                }
            }
            self.reap(Reaper::Reactor);
        }
    }

    fn notify_fallback(&self) {
        let _g = self.fallback_lock.lock();
        self.fallback_cv.notify_one();
    }

    /// Whether the fallback thread must wait on the completion queue.
    fn needs_fallback(&self) -> bool {
        self.foreign_waiters.load(Ordering::Acquire) > 0
            || (self.reactor_state.load(Ordering::Acquire) != REACTOR_ARMED
                && self.permits.available_permits() < RING_ENTRIES as usize)
    }

    /// Body of the fallback thread.
    fn fallback_loop(&self) {
        loop {
            if self.shutdown.load(Ordering::Acquire) {
                return;
            }
            if self.needs_fallback() {
                self.reap(Reaper::Thread);
                self.wait_cq(FALLBACK_WAIT);
            } else {
                {
                    let mut g = self.fallback_lock.lock();
                    if !self.shutdown.load(Ordering::Acquire) && !self.needs_fallback() {
                        self.fallback_cv.wait_for(&mut g, WATCHDOG);
                    }
                }
                // Watchdog: complete anything a reactor that is not being
                // driven left in the queue.
                self.reap(Reaper::Thread);
            }
        }
    }

    async fn slot(&self) -> io::Result<SlotGuard<'_>> {
        let permit = self.permits.acquire().await.map_err(|_| io::Error::other("io_uring backend closed"))?;
        let idx = self.free.lock().pop().expect("a semaphore permit guarantees a free slot");
        Ok(SlotGuard { shared: self, idx, in_flight: false, _permit: permit })
    }
}

/// Exclusive use of one slot for the duration of one backend call (which may
/// submit several SQEs in turn, e.g. after a short read).
struct SlotGuard<'a> {
    shared: &'a Shared,
    idx: u32,
    /// An SQE carrying this slot's index has been submitted and its result
    /// not yet taken.
    in_flight: bool,
    // Declared last: dropped after `Drop::drop` has returned the slot to the
    // free stack, so a new permit always finds a free slot.
    _permit: SemaphorePermit<'a>,
}

impl SlotGuard<'_> {
    /// Submit `sqe` tagged with this slot, then wait for its result.
    ///
    /// # Safety
    ///
    /// Every buffer `sqe` points to must stay valid (and not be accessed in
    /// a way that conflicts with the kernel's access) for as long as this
    /// guard is alive. This guard's `Drop` waits for the CQE, so a buffer
    /// borrowed for the whole lifetime of the enclosing future satisfies
    /// this, *provided that future is dropped rather than leaked*: a future
    /// leaked with `mem::forget` after being polled never runs this guard's
    /// destructor, its borrow ends anyway, and the kernel may then access a
    /// buffer the caller has reused. That is the inherent limit of
    /// borrowed-buffer io_uring APIs; the store never leaks its I/O futures.
    async unsafe fn submit(&mut self, sqe: squeue::Entry) -> i32 {
        debug_assert!(!self.in_flight);
        let sqe = sqe.user_data(u64::from(self.idx));
        self.in_flight = true;
        // SAFETY: forwarded from this function's contract; the completion
        // for this user_data is awaited below (or in Drop).
        unsafe { self.shared.push_and_submit(&sqe) };
        std::future::poll_fn(|cx| self.poll_result(cx)).await
    }

    fn take_result(&mut self, st: &mut SlotState) -> Option<i32> {
        let res = st.result.take()?;
        st.waker = None;
        if std::mem::take(&mut st.foreign) {
            self.shared.foreign_waiters.fetch_sub(1, Ordering::AcqRel);
        }
        self.in_flight = false;
        Some(res)
    }

    fn poll_result(&mut self, cx: &mut Context<'_>) -> Poll<i32> {
        let slot = &self.shared.slots[self.idx as usize];
        if let Some(res) = self.take_result(&mut slot.state.lock()) {
            return Poll::Ready(res);
        }
        // Not there yet: complete whatever is in the queue (ours included,
        // perhaps) while this thread is running anyway.
        self.shared.try_reap();
        let covered = self.shared.reactor_covers();
        let mut st = slot.state.lock();
        if let Some(res) = self.take_result(&mut st) {
            return Poll::Ready(res);
        }
        match &st.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => st.waker = Some(cx.waker().clone()),
        }
        if !covered && !st.foreign {
            st.foreign = true;
            let before = self.shared.foreign_waiters.fetch_add(1, Ordering::AcqRel);
            drop(st);
            if before == 0 {
                self.shared.notify_fallback();
            }
        }
        Poll::Pending
    }
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        let slot = &self.shared.slots[self.idx as usize];
        if self.in_flight {
            // The future was dropped mid-I/O. The kernel may still read or
            // write the caller's buffer until the CQE is posted, and that
            // buffer is only guaranteed to live until this drop returns, so
            // reap until our CQE has been seen, waiting in the kernel between
            // drains. Reaping ourselves (rather than waiting for a reaper)
            // matters when this thread is the one that drives the runtime.
            // The timeout covers a CQE taken by another reaper between our
            // check and our wait. Bounded by one device I/O.
            while slot.state.lock().result.is_none() {
                self.shared.reap(Reaper::Thread);
                if slot.state.lock().result.is_some() {
                    break;
                }
                self.shared.wait_cq(CANCEL_WAIT);
            }
        }
        {
            let mut st = slot.state.lock();
            if st.foreign {
                self.shared.foreign_waiters.fetch_sub(1, Ordering::AcqRel);
            }
            *st = SlotState::default();
        }
        self.shared.free.lock().push(self.idx);
    }
}

/// The buffers of a vectored SQE.
struct IoVecs(Vec<libc::iovec>);

// SAFETY: the pointers are into buffers the owning future borrows as
// `&[u8]`, which are `Sync`; the vector itself is plain owned memory.
unsafe impl Send for IoVecs {}

/// `offset + done`, or an error if that overflows (the kernel would refuse
/// it anyway; this keeps debug builds from panicking).
fn position(offset: u64, done: usize) -> io::Result<u64> {
    offset
        .checked_add(done as u64)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("offset {offset}+{done} overflows")))
}

/// How a CQE result is handled by the read/write loops.
enum Outcome {
    Done(usize),
    Retry,
    Fail(io::Error),
}

fn classify(res: i32) -> Outcome {
    if res >= 0 {
        Outcome::Done(res as usize)
    } else if res == -libc::EINTR || res == -libc::EAGAIN {
        Outcome::Retry
    } else {
        Outcome::Fail(io::Error::from_raw_os_error(-res))
    }
}

impl Backend for UringBackend {
    async fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.check_direct(buf, offset)?;
        if buf.is_empty() {
            return Ok(());
        }
        let mut slot = self.shared.slot().await?;
        let mut done = 0;
        while done < buf.len() {
            let rest = &mut buf[done..];
            let len = rest.len().min(MAX_SQE_LEN) as u32;
            let sqe = opcode::Read::new(self.fd(), rest.as_mut_ptr(), len).offset(position(offset, done)?).build();
            // SAFETY: `sqe` points at `len` bytes inside `buf`, which is
            // mutably borrowed by this future for its whole lifetime; `slot`
            // is a local of this future, so its Drop (which waits for the
            // CQE) runs before that borrow can end. See `SlotGuard::submit`.
            let res = unsafe { slot.submit(sqe) }.await;
            match classify(res) {
                Outcome::Done(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("read of {} bytes at {offset} hit end of device after {done} bytes", buf.len()),
                    ));
                }
                Outcome::Done(n) => done += n,
                Outcome::Retry => {}
                Outcome::Fail(e) => return Err(e),
            }
        }
        Ok(())
    }

    async fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check_direct(buf, offset)?;
        if buf.is_empty() {
            return Ok(());
        }
        let mut slot = self.shared.slot().await?;
        let mut done = 0;
        while done < buf.len() {
            let rest = &buf[done..];
            let len = rest.len().min(MAX_SQE_LEN) as u32;
            let sqe = opcode::Write::new(self.fd(), rest.as_ptr(), len).offset(position(offset, done)?).build();
            // SAFETY: `sqe` points at `len` bytes inside `buf`, which is
            // borrowed by this future for its whole lifetime (the kernel only
            // reads it); `slot` is a local of this future, so its Drop (which
            // waits for the CQE) runs before that borrow can end. See
            // `SlotGuard::submit`.
            let res = unsafe { slot.submit(sqe) }.await;
            match classify(res) {
                Outcome::Done(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        format!("write at {offset}+{done} returned 0 bytes"),
                    ));
                }
                Outcome::Done(n) => done += n,
                Outcome::Retry => {}
                Outcome::Fail(e) => return Err(e),
            }
        }
        Ok(())
    }

    async fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        for b in bufs {
            self.check_direct(b, offset)?;
        }
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        // Declared before `slot`, so dropped after it: the kernel may read
        // the array until the CQE is in (submission can be deferred to
        // another thread's enter).
        let mut iov = IoVecs(Vec::with_capacity(bufs.len().min(MAX_IOV)));
        let mut slot = self.shared.slot().await?;
        let mut done = 0;
        // Position in `bufs` of byte `done`: buffer `k`, `within` bytes in.
        let (mut k, mut within) = (0, 0);
        while done < total {
            iov.0.clear();
            let mut len = 0usize;
            for (n, b) in bufs[k..].iter().enumerate() {
                if iov.0.len() == MAX_IOV || len == MAX_SQE_LEN {
                    break;
                }
                let rest = &b[if n == 0 { within } else { 0 }..];
                let l = rest.len().min(MAX_SQE_LEN - len);
                iov.0.push(libc::iovec { iov_base: rest.as_ptr() as *mut libc::c_void, iov_len: l });
                len += l;
            }
            let sqe = opcode::Writev::new(self.fd(), iov.0.as_ptr(), iov.0.len() as u32)
                .offset(position(offset, done)?)
                .build();
            // SAFETY: `sqe` points at `iov`, whose entries point inside
            // `bufs`, borrowed by this future for its whole lifetime (the
            // kernel only reads them); `iov` and `slot` are locals of this
            // future, and `slot`'s Drop (which waits for the CQE) runs
            // before `iov` is dropped and before the borrow of `bufs` can
            // end. See `SlotGuard::submit`.
            let res = unsafe { slot.submit(sqe) }.await;
            match classify(res) {
                Outcome::Done(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        format!("vectored write at {offset}+{done} returned 0 bytes"),
                    ));
                }
                Outcome::Done(n) => {
                    done += n;
                    let mut n = n;
                    while n > 0 {
                        let step = (bufs[k].len() - within).min(n);
                        n -= step;
                        within += step;
                        if within == bufs[k].len() {
                            k += 1;
                            within = 0;
                        }
                    }
                }
                Outcome::Retry => {}
                Outcome::Fail(e) => return Err(e),
            }
        }
        Ok(())
    }

    async fn sync(&self) -> io::Result<()> {
        let mut slot = self.shared.slot().await?;
        loop {
            let sqe = opcode::Fsync::new(self.fd()).flags(types::FsyncFlags::DATASYNC).build();
            // SAFETY: an fsync SQE references no user memory.
            let res = unsafe { slot.submit(sqe) }.await;
            match classify(res) {
                Outcome::Done(_) => return Ok(()),
                Outcome::Retry => {}
                Outcome::Fail(e) => return Err(e),
            }
        }
    }

    fn len(&self) -> u64 {
        self.len.load(Ordering::Relaxed)
    }
    fn refresh_len(&self) -> io::Result<u64> {
        let len = super::device_len(&self.shared.file)?;
        self.len.store(len, Ordering::Relaxed);
        Ok(len)
    }
}

impl Drop for UringBackend {
    fn drop(&mut self) {
        // No I/O of ours is in flight: every future borrows `self`, and a
        // dropped future waits for its CQE. Leave the reactor first (its
        // registration names the ring's fd), then stop the fallback thread:
        // the flag and the condvar reach it when it sleeps, the NOP's CQE
        // when it waits in the kernel (its wait also times out).
        drop(self.shared.reactor.lock().take());
        self.shared.reactor_state.store(REACTOR_UNAVAILABLE, Ordering::Release);
        self.shared.shutdown.store(true, Ordering::Release);
        self.shared.notify_fallback();
        let nop = opcode::Nop::new().build().user_data(SHUTDOWN);
        // SAFETY: a NOP references no memory.
        unsafe { self.shared.push_and_submit(&nop) };
        if let Some(thread) = self.fallback.take()
            && thread.join().is_err()
        {
            tracing::error!("io_uring fallback thread panicked");
        }
        // The ring's own reference to the file: the kernel tears a ring down
        // in the background after its fd closes, so without this the file
        // would stay open for a while after the pool closed (a file system
        // could not be unmounted, a deleted pool file's space would come
        // back late). Nothing is in flight: see the top of this function.
        if let Err(e) = self.shared.ring.submitter().unregister_files() {
            tracing::warn!("io_uring: unregistering the pool file: {e}");
        }
        // A reactor wake-up that was already running may still hold a
        // reference for a moment (it finds no registration and returns); wait
        // for it so the file is closed when this drop returns.
        while Arc::strong_count(&self.shared) > 1 {
            std::thread::yield_now();
        }
        // The ring and file close when `self.shared` is dropped, right after.
    }
}
