//! Login throttling and the password-hashing pool.
//!
//! **Throttling.** Failed logins are counted per client address and per
//! user. The first [`FREE_FAILURES`] cost nothing; each one after that locks
//! the key for twice as long as the one before (1 s, 2 s, 4 s, ...), up to
//! [`ADDR_CAP`] for an address and [`USER_CAP`] for a user. While a key is
//! locked its logins are refused at once with a 429 that says when the lock
//! ends (`Retry-After`), before any password is checked, so a guesser gets
//! a few tries a minute and costs the appliance nothing between them.
//! Counts are forgotten [`FORGET_AFTER`] after the last failure.
//!
//! A user's lock cannot shut the user out from elsewhere: it is capped at a
//! minute, and it does not apply to an address the user has logged in from
//! successfully before (kept for 30 days), the way a bank's known-device
//! cookie works. A guesser on another address locks itself and the user's
//! name for everyone new, never the user's own machines.
//!
//! Addresses are the TCP peer's: a header such as `X-Forwarded-For` is never
//! believed (the API is not meant to sit behind a proxy).
//!
//! **Hashing.** argon2id with its default cost (19 MiB of memory, 2 passes,
//! 1 lane) takes tens of milliseconds of one core per check. A storm of
//! logins must not take the CPU from the data path, so checks run on a pool
//! of [`Hasher`] threads of their own, at most one per two cores, in the
//! `SCHED_IDLE` class (they run on CPU time the NBD and iSCSI workers leave,
//! and yield to them at every wake-up), each within a budget of
//! [`HASH_DUTY`] of a core over time, fed by a bounded queue: when the
//! queue is full a login is refused with 503 at once instead of waiting.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::error::{ApiError, ApiResult};

/// Failed logins a key may have before it is locked.
pub const FREE_FAILURES: u32 = 3;
/// Longest lock of a client address.
pub const ADDR_CAP: Duration = Duration::from_secs(15 * 60);
/// Longest lock of a user name (short: anyone can fail logins for it).
pub const USER_CAP: Duration = Duration::from_secs(60);
/// Failures are forgotten this long after a key's last one.
pub const FORGET_AFTER: Duration = Duration::from_secs(15 * 60);
/// How long a successful login makes its address known for its user.
pub const KNOWN_FOR: Duration = Duration::from_secs(30 * 24 * 3600);
/// Most keys of each kind kept (the oldest go first beyond it).
const MAX_KEYS: usize = 10_000;

#[derive(Clone, Copy, Debug)]
struct Strikes {
    failures: u32,
    last: Instant,
    locked_until: Instant,
}

impl Strikes {
    fn fresh(now: Instant) -> Strikes {
        Strikes { failures: 0, last: now, locked_until: now }
    }

    /// Count a failure; the lock that follows from it.
    fn fail(&mut self, now: Instant, cap: Duration) -> Option<Duration> {
        if now.duration_since(self.last) > FORGET_AFTER {
            *self = Strikes::fresh(now);
        }
        self.failures = self.failures.saturating_add(1);
        self.last = now;
        if self.failures <= FREE_FAILURES {
            return None;
        }
        let exp = (self.failures - FREE_FAILURES - 1).min(20);
        let lock = Duration::from_secs(1u64 << exp).min(cap);
        self.locked_until = now + lock;
        Some(lock)
    }

    fn locked_for(&self, now: Instant) -> Option<Duration> {
        (self.locked_until > now).then(|| self.locked_until - now)
    }
}

#[derive(Default)]
struct State {
    by_addr: HashMap<IpAddr, Strikes>,
    by_user: HashMap<String, Strikes>,
    known: HashMap<(String, IpAddr), Instant>,
}

fn prune<K: Clone + Eq + std::hash::Hash, V>(m: &mut HashMap<K, V>, stale: impl Fn(&V) -> bool) {
    if m.len() < MAX_KEYS {
        return;
    }
    m.retain(|_, v| !stale(v));
    if m.len() >= MAX_KEYS {
        // Still full of live keys: drop an arbitrary half rather than grow.
        let drop: Vec<K> = m.keys().take(m.len() / 2).cloned().collect();
        for k in drop {
            m.remove(&k);
        }
    }
}

/// Seconds, rounded up, for a message and `Retry-After`.
fn secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// The failed-login counters of one daemon.
#[derive(Default)]
pub struct LoginThrottle {
    state: Mutex<State>,
}

impl LoginThrottle {
    /// A throttle that has seen nothing.
    pub fn new() -> LoginThrottle {
        LoginThrottle::default()
    }

    /// May `addr` try a password for `user` now? A 429 saying until when
    /// otherwise.
    pub fn check(&self, user: &str, addr: IpAddr) -> ApiResult<()> {
        self.check_at(user, addr, Instant::now())
    }

    fn check_at(&self, user: &str, addr: IpAddr, now: Instant) -> ApiResult<()> {
        let s = self.state.lock();
        if let Some(d) = s.by_addr.get(&addr).and_then(|k| k.locked_for(now)) {
            return Err(ApiError::too_many(
                format!(
                    "too many failed logins from your address: try again in {} s (each further failure doubles \
                     the wait, up to {} min)",
                    secs(d),
                    ADDR_CAP.as_secs() / 60
                ),
                secs(d),
            ));
        }
        let known = s.known.get(&(user.to_string(), addr)).is_some_and(|t| now.duration_since(*t) < KNOWN_FOR);
        if !known && let Some(d) = s.by_user.get(user).and_then(|k| k.locked_for(now)) {
            return Err(ApiError::too_many(
                format!(
                    "too many failed logins for user {user}: try again in {} s, or from an address it has \
                     logged in from before",
                    secs(d)
                ),
                secs(d),
            ));
        }
        Ok(())
    }

    /// Count a failed login of `addr` as `user` (known or not).
    pub fn failed(&self, user: &str, addr: IpAddr) {
        self.failed_at(user, addr, Instant::now());
    }

    fn failed_at(&self, user: &str, addr: IpAddr, now: Instant) {
        let mut s = self.state.lock();
        let stale = |k: &Strikes| now.duration_since(k.last) > FORGET_AFTER && k.locked_until <= now;
        prune(&mut s.by_addr, stale);
        prune(&mut s.by_user, stale);
        let a = s.by_addr.entry(addr).or_insert_with(|| Strikes::fresh(now)).fail(now, ADDR_CAP);
        let u = s.by_user.entry(user.to_string()).or_insert_with(|| Strikes::fresh(now)).fail(now, USER_CAP);
        drop(s);
        tracing::warn!(target: "keel::auth", %addr, user, "failed login");
        if let Some(d) = a {
            tracing::warn!(target: "keel::auth", %addr, "address locked for {} s after failed logins", secs(d));
        }
        if let Some(d) = u {
            tracing::warn!(target: "keel::auth", user, "user locked for {} s for new addresses", secs(d));
        }
    }

    /// A successful login: the address is known for the user from now on,
    /// and its own failures are forgiven.
    pub fn succeeded(&self, user: &str, addr: IpAddr) {
        let now = Instant::now();
        let mut s = self.state.lock();
        s.by_addr.remove(&addr);
        prune(&mut s.known, |t| now.duration_since(*t) > KNOWN_FOR);
        s.known.insert((user.to_string(), addr), now);
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// Put the calling thread in the `SCHED_IDLE` class: it runs on CPU time
/// that nothing else wants, and any normal thread that wakes (an NBD or
/// iSCSI worker with a completion) preempts it at once. Where that is not
/// allowed, nice 19.
fn idle_priority() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_setscheduler on pid 0 (this thread) with a valid,
    // initialized sched_param only changes this thread's scheduling class.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } == 0 {
        return;
    }
    let e = std::io::Error::last_os_error();
    // SAFETY: setpriority on this thread's own id changes only its weight.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 19) };
    if r != 0 {
        let e2 = std::io::Error::last_os_error();
        tracing::warn!("password hashing runs at normal priority: SCHED_IDLE: {e}; nice: {e2}");
    }
}

/// The password-hashing threads (see the module's docs).
pub struct Hasher {
    queue: mpsc::SyncSender<Job>,
    threads: usize,
}

/// Logins that may wait for a hashing thread before new ones are refused.
pub const HASH_QUEUE: usize = 64;

/// The share of one core a hashing thread may use over time. At argon2's
/// ~20-35 ms a check that is 3 to 5 logins a second per thread in a storm;
/// a burst of [`HASH_BURST`] of checking time goes at full speed.
pub const HASH_DUTY: f64 = 0.10;

/// Checking time a hashing thread may spend at once before [`HASH_DUTY`]
/// applies (about 25 logins back to back).
pub const HASH_BURST: Duration = Duration::from_millis(500);

/// A hashing thread's time budget: it earns [`HASH_DUTY`] seconds of
/// checking per second of wall time, up to [`HASH_BURST`], and waits when
/// it has spent more. Even in the `SCHED_IDLE` class, argon2's 19 MiB
/// working set evicts the data path's caches and its preemptions cost
/// context switches: measured here, a hashing thread kept busy cost NBD
/// random reads 20-30% (`benches/login-storm.sh`); the budget bounds that.
struct Budget {
    credit: f64,
    last: Instant,
}

impl Budget {
    fn new() -> Budget {
        Budget { credit: HASH_BURST.as_secs_f64(), last: Instant::now() }
    }

    fn earn(&mut self) {
        let now = Instant::now();
        self.credit =
            (self.credit + now.duration_since(self.last).as_secs_f64() * HASH_DUTY).min(HASH_BURST.as_secs_f64());
        self.last = now;
    }

    /// Sleep until the budget is no longer overspent.
    fn wait(&mut self) {
        self.earn();
        if self.credit < 0.0 {
            std::thread::sleep(Duration::from_secs_f64(-self.credit / HASH_DUTY));
            self.earn();
        }
    }

    fn spend(&mut self, d: Duration) {
        self.earn();
        self.credit -= d.as_secs_f64();
    }
}

impl Hasher {
    /// Start `threads` hashing threads (0: one per two cores, at least one).
    pub fn start(threads: usize) -> Hasher {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads = if threads == 0 { (cores / 2).max(1) } else { threads };
        let (tx, rx) = mpsc::sync_channel::<Job>(HASH_QUEUE);
        let rx = std::sync::Arc::new(std::sync::Mutex::new(rx));
        for i in 0..threads {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("keel-hash-{i}"))
                .spawn(move || {
                    idle_priority();
                    let mut budget = Budget::new();
                    loop {
                        let job = match rx.lock() {
                            Ok(q) => q.recv(),
                            Err(_) => return,
                        };
                        match job {
                            Ok(job) => {
                                budget.wait();
                                let t0 = Instant::now();
                                job();
                                budget.spend(t0.elapsed());
                            }
                            Err(_) => return,
                        }
                    }
                })
                .expect("spawning a password hashing thread");
        }
        Hasher { queue: tx, threads }
    }

    /// How many hashing threads run.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Run `f` (a password check) on a hashing thread. 503 at once when
    /// [`HASH_QUEUE`] checks wait already.
    pub async fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> ApiResult<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        match self.queue.try_send(job) {
            Ok(()) => {}
            Err(mpsc::TrySendError::Full(_)) => {
                return Err(ApiError::busy("too many logins at once: retry in a second", 1));
            }
            Err(mpsc::TrySendError::Disconnected(_)) => {
                return Err(ApiError::internal("checking the password", "the hashing threads are gone"));
            }
        }
        rx.await.map_err(|e| ApiError::internal("checking the password", format!("the check was lost: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn failures_lock_with_doubling_waits_up_to_the_caps() {
        let t = LoginThrottle::new();
        let t0 = Instant::now();
        let (a, b) = (ip("10.0.0.1"), ip("10.0.0.2"));
        for _ in 0..FREE_FAILURES {
            assert!(t.check_at("admin", a, t0).is_ok());
            t.failed_at("admin", a, t0);
        }
        assert!(t.check_at("admin", a, t0).is_ok(), "the free failures cost nothing");
        t.failed_at("admin", a, t0);
        let e = t.check_at("admin", a, t0).unwrap_err();
        assert_eq!((e.status.as_u16(), e.retry_after), (429, Some(1)), "{e}");
        assert!(t.check_at("admin", a, t0 + Duration::from_millis(1001)).is_ok());
        let mut waits = Vec::new();
        let mut now = t0;
        for _ in 0..14 {
            t.failed_at("admin", a, now);
            waits.push(t.check_at("admin", a, now).unwrap_err().retry_after.unwrap());
            now += Duration::from_secs(1);
        }
        assert_eq!(&waits[..6], &[2, 4, 8, 16, 32, 64], "{waits:?}");
        assert!(waits.iter().all(|w| *w <= ADDR_CAP.as_secs()), "{waits:?}");
        assert_eq!(*waits.last().unwrap(), ADDR_CAP.as_secs(), "{waits:?}");
        // Another address, new to the user: the user's lock (capped at a
        // minute) applies; the message says so.
        let e = t.check_at("admin", b, now).unwrap_err();
        assert!(e.message.contains("user admin") && e.retry_after.unwrap() <= USER_CAP.as_secs(), "{e}");
        assert!(t.check_at("alice", b, now).is_ok(), "other users are not affected");
        // Forgotten after a quiet spell.
        let later = now + ADDR_CAP + FORGET_AFTER + Duration::from_secs(1);
        assert!(t.check_at("admin", a, later).is_ok());
        t.failed_at("admin", a, later);
        assert!(t.check_at("admin", a, later).is_ok(), "the count started over");
    }

    #[test]
    fn a_known_address_is_not_locked_out_by_a_guesser_elsewhere() {
        let t = LoginThrottle::new();
        let (home, guesser) = (ip("10.0.0.1"), ip("10.0.0.66"));
        t.succeeded("admin", home);
        for _ in 0..20 {
            t.failed("admin", guesser);
        }
        assert_eq!(t.check("admin", guesser).unwrap_err().status.as_u16(), 429);
        assert!(t.check("admin", home).is_ok(), "the user's own address still gets in");
        assert_eq!(t.check("admin", ip("10.0.0.7")).unwrap_err().status.as_u16(), 429);
    }

    #[test]
    fn memory_stays_bounded() {
        let t = LoginThrottle::new();
        for i in 0..(3 * MAX_KEYS as u32) {
            t.failed(&format!("u{i}"), IpAddr::from(i.to_be_bytes()));
        }
        let s = t.state.lock();
        assert!(s.by_addr.len() <= MAX_KEYS && s.by_user.len() <= MAX_KEYS);
    }

    #[tokio::test]
    async fn the_hashing_queue_is_bounded() {
        let h = Hasher::start(1);
        let (gate_tx, gate_rx) = std::sync::mpsc::channel::<()>();
        let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
        // Occupy the thread, then fill the queue.
        let first = h.run(move || {
            started_tx.send(()).unwrap();
            gate_rx.recv().is_ok()
        });
        let mut first = Box::pin(first);
        assert!(futures::poll!(&mut first).is_pending());
        started_rx.recv().unwrap();
        let mut waiting = Vec::new();
        for _ in 0..HASH_QUEUE {
            let mut f = Box::pin(h.run(|| true));
            assert!(futures::poll!(&mut f).is_pending());
            waiting.push(f);
        }
        let e = h.run(|| true).await.unwrap_err();
        assert_eq!((e.status.as_u16(), e.retry_after), (503, Some(1)));
        gate_tx.send(()).unwrap();
        assert!(first.await.unwrap());
        for f in waiting {
            assert!(f.await.unwrap());
        }
    }
}
