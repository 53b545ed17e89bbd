//! The io_uring engine: positional reads, writes and fdatasync submitted to
//! one io_uring per backend, completed by a dedicated thread.
//!
//! # Design
//!
//! * **One ring per backend**, `RING_ENTRIES` submission entries (the kernel
//!   sizes the completion queue at twice that).
//! * **Submission** happens on the calling task's thread: push one SQE and
//!   `io_uring_enter(to_submit)` while holding `Shared::sq_lock` (a
//!   `parking_lot::Mutex`, held for two short operations, never across an
//!   `.await`). Every submitter drains the submission queue before it releases
//!   the lock, so the queue is empty whenever the lock is free.
//! * **Completion** is the job of one thread per backend (`keel-uring-cq`). It
//!   blocks in `io_uring_enter(to_submit = 0, min_complete = 1, GETEVENTS)`:
//!   with `to_submit = 0` that call only waits for the completion queue to hold
//!   at least one entry, so it never touches the submission queue and needs no
//!   lock; the kernel serializes concurrent `io_uring_enter` callers on its own
//!   (submission under `ctx->uring_lock`, waiting on the CQ wait queue). The
//!   thread is the *only* consumer of the completion queue, so it can use
//!   `completion_shared` without further locking. It drains every CQE, stores
//!   the result in the slot named by `user_data` and wakes the task waiting on
//!   it. There is no lost-wakeup window: the wait returns at once when CQEs
//!   are already queued, and the thread only publishes the CQ head after it
//!   has consumed the entries. We do not set `COOP_TASKRUN`/`DEFER_TASKRUN`,
//!   so completion task work queued to a submitting thread is run promptly
//!   (the kernel interrupts that thread) and never waits for it to re-enter
//!   the ring.
//! * **Per-I/O state** lives in a slot table allocated at open: `RING_ENTRIES`
//!   slots, each a small `Mutex<{result, waker}>` plus a `Condvar` used only by
//!   the synchronous cancel path, a stack of free slot indices, and a
//!   `tokio::sync::Semaphore` with one permit per slot that tasks acquire
//!   (asynchronously) before popping a free slot. `user_data` is the slot
//!   index. Nothing is heap-allocated per I/O. Because at most `RING_ENTRIES`
//!   operations are in flight (plus the shutdown NOP), the completion queue
//!   (2 x `RING_ENTRIES`) cannot overflow.
//! * **Shutdown**: dropping the backend submits a NOP whose `user_data` is
//!   `SHUTDOWN`; the completion thread exits when it reaps it and is joined.
//!
//! # Cancellation
//!
//! The futures borrow the caller's buffer and hand its address to the kernel.
//! If such a future is dropped while its SQE is in flight, the slot guard's
//! `Drop` blocks the dropping thread until the kernel has posted the CQE, so
//! the borrow (which lasts as long as the future) cannot end while the kernel
//! may still touch the buffer. The wait is bounded by one device I/O. See the
//! caveat on leaking in [`SlotGuard::submit`].

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::thread::JoinHandle;
use std::time::Duration;

use io_uring::{IoUring, opcode, squeue, types};
use parking_lot::{Condvar, Mutex};
use tokio::sync::{Semaphore, SemaphorePermit};

use super::aligned::is_aligned;
use super::{BLOCK_SIZE, Backend};

/// Submission queue entries, and the number of I/O slots.
const RING_ENTRIES: u32 = 256;
/// `user_data` of the NOP that tells the completion thread to exit.
const SHUTDOWN: u64 = u64::MAX;
/// Largest length put in one SQE (the field is a u32; keep it block aligned
/// so a remainder after a full-length transfer stays aligned for O_DIRECT).
const MAX_SQE_LEN: usize = (u32::MAX as usize) & !(BLOCK_SIZE - 1);

/// io_uring + O_DIRECT engine.
pub struct UringBackend {
    shared: Arc<Shared>,
    completer: Option<JoinHandle<()>>,
    len: u64,
    direct: bool,
}

/// State shared by the submitting tasks and the completion thread.
struct Shared {
    ring: IoUring,
    file: File,
    /// Serializes every use of the submission queue (`submission_shared`).
    sq_lock: Mutex<()>,
    slots: Box<[Slot]>,
    /// Indices of idle slots. Capacity `RING_ENTRIES`, never reallocates.
    free: Mutex<Vec<u32>>,
    /// One permit per idle slot: acquiring a permit guarantees `free` is not
    /// empty.
    permits: Semaphore,
}

struct Slot {
    state: Mutex<SlotState>,
    /// Signalled on completion when a dropping future waits synchronously.
    done: Condvar,
}

#[derive(Default)]
struct SlotState {
    /// The CQE result (bytes transferred or `-errno`), once posted.
    result: Option<i32>,
    /// The task to wake when the result arrives.
    waker: Option<Waker>,
    /// A thread is blocked on `Slot::done` waiting for the result.
    sync_waiter: bool,
}

impl UringBackend {
    /// Open an existing file or device. Fails (so [`super::Engine::Auto`] can
    /// fall back) when io_uring is unavailable: no kernel support, disabled
    /// by `kernel.io_uring_disabled`, blocked by seccomp, or too old to have
    /// the READ/WRITE/FSYNC opcodes.
    pub fn open(path: &Path) -> io::Result<UringBackend> {
        let (file, direct, len) = super::open_direct(path)?;

        let mut ring: IoUring = IoUring::builder().dontfork().build(RING_ENTRIES)?;
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

        let slots: Box<[Slot]> =
            (0..RING_ENTRIES).map(|_| Slot { state: Mutex::new(SlotState::default()), done: Condvar::new() }).collect();
        // Pop order does not matter; reverse so slot 0 is handed out first.
        let free: Vec<u32> = (0..RING_ENTRIES).rev().collect();
        let shared = Arc::new(Shared {
            ring,
            file,
            sq_lock: Mutex::new(()),
            slots,
            free: Mutex::new(free),
            permits: Semaphore::new(RING_ENTRIES as usize),
        });
        let completer = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new().name("keel-uring-cq".into()).spawn(move || shared.completion_loop())?
        };
        Ok(UringBackend { shared, completer: Some(completer), len, direct })
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

    fn fd(&self) -> types::Fd {
        types::Fd(self.shared.file.as_raw_fd())
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
        let _sq = self.sq_lock.lock();
        loop {
            // SAFETY: `sq_lock` is held, and every SubmissionQueue is created
            // under it and dropped before it is released, so no other
            // SubmissionQueue exists.
            let mut sq = unsafe { self.ring.submission_shared() };
            // SAFETY: forwarded from this function's contract.
            if unsafe { sq.push(sqe) }.is_ok() {
                break;
            }
            // Cannot happen (the queue is drained before the lock is
            // released and holds RING_ENTRIES), but stay correct: flush and
            // retry.
            drop(sq);
            self.submit_locked();
        }
        // The SubmissionQueue was dropped above, which published its tail.
        self.submit_locked();
    }

    /// Submit until the submission queue is empty. Call with `sq_lock` held.
    ///
    /// Once an SQE has been published it cannot be taken back, and its buffer
    /// is only guaranteed alive while the submitting future waits for the
    /// CQE, so the SQE *must* reach the kernel: transient failures (EINTR,
    /// EAGAIN, EBUSY, ENOMEM) are retried with a short back-off; any other
    /// failure means the ring itself is broken (the NOP round trip at open
    /// proved it worked) and we abort rather than return with an SQE still
    /// pointing at a buffer we no longer own or hang every future forever.
    fn submit_locked(&self) {
        let mut backoff = Duration::from_micros(10);
        loop {
            match self.ring.submitter().submit() {
                Ok(_) => {}
                Err(e) => match e.raw_os_error() {
                    Some(libc::EINTR) => {}
                    Some(libc::EAGAIN | libc::EBUSY | libc::ENOMEM) => {
                        // Rare (kernel allocation failure, CQ overflow
                        // backlog). The completion thread keeps reaping
                        // without this lock, so it resolves; meanwhile other
                        // submitters queue on `sq_lock` (blocking their
                        // threads for at most the back-off).
                        std::thread::sleep(backoff);
                        backoff = (backoff * 2).min(Duration::from_millis(10));
                    }
                    _ => {
                        tracing::error!("io_uring submission failed irrecoverably: {e}");
                        std::process::abort();
                    }
                },
            }
            // SAFETY: `sq_lock` is held by our caller (see push_and_submit);
            // this SubmissionQueue is only read and dropped right away (its
            // drop stores back the tail it just loaded).
            if unsafe { self.ring.submission_shared() }.is_empty() {
                return;
            }
        }
    }

    /// Body of the completion thread.
    fn completion_loop(&self) {
        loop {
            // SAFETY: no submissions (to_submit = 0) and no argument pointer;
            // this only waits until the CQ holds at least one entry.
            let waited = unsafe {
                self.ring.submitter().enter::<libc::sigset_t>(0, 1, io_uring::EnterFlags::GETEVENTS.bits(), None)
            };
            if let Err(e) = waited {
                match e.raw_os_error() {
                    Some(libc::EINTR | libc::EAGAIN | libc::EBUSY) => {}
                    _ => {
                        tracing::error!("io_uring completion wait failed: {e}");
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            }
            // SAFETY: this thread is the only place a CompletionQueue is ever
            // created once the ring is shared.
            let cq = unsafe { self.ring.completion_shared() };
            let mut shutdown = false;
            for cqe in cq {
                match cqe.user_data() {
                    SHUTDOWN => shutdown = true,
                    idx => self.complete(idx, cqe.result()),
                }
            }
            // Dropping `cq` (consumed by the loop) published the new head.
            if shutdown {
                return;
            }
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
            if st.sync_waiter {
                slot.done.notify_one();
            }
            st.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
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

    fn poll_result(&mut self, cx: &mut Context<'_>) -> Poll<i32> {
        let mut st = self.shared.slots[self.idx as usize].state.lock();
        if let Some(res) = st.result.take() {
            st.waker = None;
            self.in_flight = false;
            return Poll::Ready(res);
        }
        match &st.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => st.waker = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        let slot = &self.shared.slots[self.idx as usize];
        {
            let mut st = slot.state.lock();
            if self.in_flight {
                // The future was dropped mid-I/O. The kernel may still read
                // or write the caller's buffer until the CQE is posted, and
                // that buffer is only guaranteed to live until this drop
                // returns, so block until the completion thread has seen the
                // CQE. The completion thread never waits on anything a task
                // holds, so this cannot deadlock; it takes one device I/O.
                st.sync_waiter = true;
                while st.result.is_none() {
                    slot.done.wait(&mut st);
                }
            }
            *st = SlotState::default();
        }
        self.shared.free.lock().push(self.idx);
    }
}

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
        self.len
    }
}

impl Drop for UringBackend {
    fn drop(&mut self) {
        // No I/O of ours is in flight: every future borrows `self`, and a
        // dropped future waits for its CQE. Tell the completion thread to
        // exit (it reaps CQEs in order, so anything before the NOP is still
        // delivered) and join it. The ring and file close when the last
        // `Arc<Shared>` goes, i.e. here once the thread is joined.
        let nop = opcode::Nop::new().build().user_data(SHUTDOWN);
        // SAFETY: a NOP references no memory.
        unsafe { self.shared.push_and_submit(&nop) };
        if let Some(thread) = self.completer.take()
            && thread.join().is_err()
        {
            tracing::error!("io_uring completion thread panicked");
        }
    }
}
