//! The metadata interface (`keel_mgmt::db::Meta`) means the same on both of
//! its stores: each scenario runs on redb and on a real etcd (Debian's
//! `etcd-server`, started here on loopback ports with a data directory of
//! its own). Two writers are two threads on one redb file, and two
//! connections (as two nodes would have) to etcd.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use keel_mgmt::db::{self, Meta, Table, USERS, VOLUMES};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A one-member etcd of the test's own.
struct Etcd {
    child: Option<Child>,
    dir: tempfile::TempDir,
    client: u16,
    peer: u16,
}

impl Etcd {
    fn start() -> Etcd {
        let dir = tempfile::tempdir().unwrap();
        let mut e = Etcd { child: None, dir, client: free_port(), peer: free_port() };
        e.spawn();
        e
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client)
    }

    fn spawn(&mut self) {
        let peer = format!("http://127.0.0.1:{}", self.peer);
        let child = Command::new("etcd")
            .args(["--name", "t", "--data-dir"])
            .arg(self.dir.path().join("etcd"))
            .args(["--listen-client-urls", &self.url(), "--advertise-client-urls", &self.url()])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("t={peer}"), "--log-level", "error"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd (Debian's etcd-server): run scripts/install-deps.sh");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.client)).is_err() {
            assert!(Instant::now() < deadline, "etcd did not come up");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

fn open_etcd(e: &Etcd) -> Meta {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match Meta::open_etcd(&[e.url()], "/keel-test/") {
            Ok((m, _)) => return m,
            Err(err) => {
                assert!(Instant::now() < deadline, "cannot open the metadata in etcd: {err}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// Two writers on one store, and what keeps the store alive.
type Pair = (Arc<Meta>, Arc<Meta>, Box<dyn std::any::Any>);

fn redb_pair() -> Pair {
    let dir = tempfile::tempdir().unwrap();
    let (m, v) = Meta::open(&dir.path().join("m.redb")).unwrap();
    assert_eq!(v, 0);
    assert_eq!(m.kind(), "redb");
    let m = Arc::new(m);
    (m.clone(), m, Box::new(dir))
}

fn etcd_pair() -> Pair {
    let e = Etcd::start();
    let a = open_etcd(&e);
    let b = open_etcd(&e);
    assert_eq!(a.kind(), "etcd");
    (Arc::new(a), Arc::new(b), Box::new(e))
}

fn s(v: &str) -> String {
    v.to_string()
}

fn records_and_failed_transactions(p: Pair) {
    let (m, _, _keep) = p;
    m.put(USERS, "b", &s("2")).unwrap();
    m.put(USERS, "a", &s("1")).unwrap();
    let all: Vec<(String, String)> = m.list(USERS).unwrap();
    assert_eq!(all, vec![(s("a"), s("1")), (s("b"), s("2"))], "in key order");
    // A transaction sees its own writes, in get and list.
    let seen = m
        .write(|w| {
            w.put(USERS, "c", &s("3"))?;
            let removed = w.remove(USERS, "a")?;
            let gone = w.remove(USERS, "nobody")?;
            let c: Option<String> = w.get(USERS, "c")?;
            let a: Option<String> = w.get(USERS, "a")?;
            let l: Vec<(String, String)> = w.list(USERS)?;
            Ok::<_, db::Error>((removed, gone, c, a, l))
        })
        .unwrap();
    assert_eq!(seen, (true, false, Some(s("3")), None, vec![(s("b"), s("2")), (s("c"), s("3"))]));
    // A failed transaction leaves nothing.
    let r: Result<(), db::Error> = m.write(|w| {
        w.put(USERS, "d", &s("4"))?;
        w.remove(USERS, "b")?;
        w.event(&s("never"))?;
        Err(db::Error::TooNew { found: 9 })
    });
    assert!(r.is_err());
    let all: Vec<(String, String)> = m.list(USERS).unwrap();
    assert_eq!(all, vec![(s("b"), s("2")), (s("c"), s("3"))]);
    assert!(m.events::<String>(0, 10).unwrap().is_empty(), "the failed transaction's event is not there");
    assert_eq!(m.get::<String>(USERS, "c").unwrap(), Some(s("3")));
    assert_eq!(m.get::<String>(USERS, "d").unwrap(), None);
}

fn events_follow_in_order(p: Pair) {
    let (m, _, _keep) = p;
    for e in ["e1", "e2", "e3"] {
        m.write(|w| w.event(&s(e))).unwrap();
    }
    let all: Vec<(u64, String)> = m.events(0, 10).unwrap();
    assert_eq!(all, vec![(1, s("e1")), (2, s("e2")), (3, s("e3"))]);
    assert_eq!(m.events::<String>(0, 1).unwrap(), vec![(3, s("e3"))], "with no cursor: the newest");
    assert_eq!(m.events::<String>(1, 1).unwrap(), vec![(2, s("e2"))], "with a cursor: the next");
    assert_eq!(m.events::<String>(3, 5).unwrap(), vec![]);
    // Two in one transaction: consecutive.
    let ids = m.write(|w| Ok::<_, db::Error>((w.event(&s("e4"))?, w.event(&s("e5"))?))).unwrap();
    assert_eq!(ids, (4, 5));
}

/// Run `f(writer, thread)` on `n` threads, half on each writer, all at once.
fn race<T: Send + 'static>(p: &Pair, n: usize, f: impl Fn(&Meta, usize) -> T + Send + Sync + 'static) -> Vec<T> {
    let f = Arc::new(f);
    let barrier = Arc::new(Barrier::new(n));
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let m = if i % 2 == 0 { p.0.clone() } else { p.1.clone() };
            let (f, barrier) = (f.clone(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                f(&m, i)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn concurrent_increments_lose_nothing(p: Pair) {
    p.0.put(VOLUMES, "counter", &0u64).unwrap();
    race(&p, 4, |m, _| {
        for _ in 0..20 {
            m.write(|w| {
                let n: u64 = w.get(VOLUMES, "counter")?.unwrap();
                w.put(VOLUMES, "counter", &(n + 1))
            })
            .unwrap();
        }
    });
    assert_eq!(p.1.get::<u64>(VOLUMES, "counter").unwrap(), Some(80), "every read-modify-write counted once");
}

fn the_same_name_created_twice_has_one_winner(p: Pair) {
    let won = race(&p, 6, |m, i| {
        m.write(|w| {
            if w.get::<String>(VOLUMES, "vol1")?.is_some() {
                return Ok::<_, db::Error>(false);
            }
            w.put(VOLUMES, "vol1", &format!("made by {i}"))?;
            Ok(true)
        })
        .unwrap()
    });
    let winners: Vec<usize> = won.iter().enumerate().filter(|(_, w)| **w).map(|(i, _)| i).collect();
    assert_eq!(winners.len(), 1, "exactly one creation wins: {won:?}");
    assert_eq!(p.0.get::<String>(VOLUMES, "vol1").unwrap(), Some(format!("made by {}", winners[0])));
}

/// A quota checked inside the transaction, over a list of the table:
/// creations that together would pass it cannot all win.
fn a_quota_read_in_a_transaction_holds(p: Pair) {
    const QUOTA: u64 = 10;
    let won = race(&p, 6, |m, i| {
        m.write(|w| {
            let used: u64 = w.list::<u64>(VOLUMES)?.iter().map(|(_, size)| size).sum();
            if used + 3 > QUOTA {
                return Ok::<_, db::Error>(false);
            }
            w.put(VOLUMES, &format!("v{i}"), &3u64)?;
            Ok(true)
        })
        .unwrap()
    });
    let sizes: Vec<(String, u64)> = p.1.list(VOLUMES).unwrap();
    let used: u64 = sizes.iter().map(|(_, s)| s).sum();
    assert_eq!(won.iter().filter(|w| **w).count(), 3, "three of size 3 fit in 10: {won:?} {sizes:?}");
    assert!(used <= QUOTA, "{used} > {QUOTA}: {sizes:?}");
}

fn concurrent_events_get_distinct_ids(p: Pair) {
    let ids =
        race(&p, 4, |m, i| (0..10).map(|j| m.write(|w| w.event(&format!("{i}.{j}"))).unwrap()).collect::<Vec<u64>>());
    let mut all: Vec<u64> = ids.into_iter().flatten().collect();
    all.sort_unstable();
    assert_eq!(all, (1..=40).collect::<Vec<u64>>(), "every event its own number, none skipped");
    let logged: Vec<(u64, String)> = p.0.events(0, 100).unwrap();
    assert_eq!(logged.len(), 40);
}

macro_rules! on_both {
    ($($name:ident),* $(,)?) => {
        mod redb {
            $(#[test] fn $name() { super::$name(super::redb_pair()) })*
        }
        mod etcd {
            $(#[test] fn $name() { super::$name(super::etcd_pair()) })*
        }
    };
}

on_both!(
    records_and_failed_transactions,
    events_follow_in_order,
    concurrent_increments_lose_nothing,
    the_same_name_created_twice_has_one_winner,
    a_quota_read_in_a_transaction_holds,
    concurrent_events_get_distinct_ids,
);

#[test]
fn etcd_away_is_a_clear_error_that_changes_nothing_and_passes_when_it_is_back() {
    let mut e = Etcd::start();
    let m = open_etcd(&e);
    m.put(USERS, "a", &s("1")).unwrap();
    e.kill();
    let t = Instant::now();
    let r = m.write(|w| w.put(USERS, "b", &s("2")));
    assert!(matches!(r, Err(db::Error::Unavailable(_))), "{r:?}");
    assert!(t.elapsed() < Duration::from_secs(20), "the refusal took {:?}", t.elapsed());
    let msg = r.unwrap_err().to_string();
    assert!(msg.contains("etcd"), "the error says what is away: {msg}");
    let api: keel_mgmt::error::ApiError = db::Error::Unavailable(msg).into();
    assert_eq!(api.status.as_u16(), 503);
    // Back, with its data: the same connection works again, and the write
    // that was refused did not happen.
    e.spawn();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match m.get::<String>(USERS, "a") {
            Ok(v) => {
                assert_eq!(v, Some(s("1")));
                break;
            }
            Err(err) => {
                assert!(Instant::now() < deadline, "no reconnection: {err}");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
    assert_eq!(m.get::<String>(USERS, "b").unwrap(), None);
    m.write(|w| w.put(USERS, "b", &s("2"))).unwrap();
    assert_eq!(m.get::<String>(USERS, "b").unwrap(), Some(s("2")));
}

#[test]
fn a_newer_schema_in_etcd_is_refused() {
    let e = Etcd::start();
    let m = open_etcd(&e);
    drop(m);
    let (_, found) = Meta::open_etcd(&[e.url()], "/keel-test/").unwrap();
    assert_eq!(found, db::SCHEMA_VERSION, "the version was recorded");
    // A newer Keel wrote it: refused.
    let raw = open_etcd_raw(&e);
    raw(format!("{}", db::SCHEMA_VERSION + 1));
    assert!(matches!(Meta::open_etcd(&[e.url()], "/keel-test/"), Err(db::Error::TooNew { .. })));
    let _ = Table::name(USERS);
}

/// Put the schema version key directly, as another Keel would (etcd's
/// JSON gateway: keys and values in base64).
fn open_etcd_raw(e: &Etcd) -> impl Fn(String) {
    let url = format!("{}/v3/kv/put", e.url());
    move |v: String| {
        let b64 = |x: &str| {
            const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
            let b = x.as_bytes();
            let mut out = String::new();
            for c in b.chunks(3) {
                let n = (c[0] as u32) << 16 | (*c.get(1).unwrap_or(&0) as u32) << 8 | *c.get(2).unwrap_or(&0) as u32;
                for i in 0..4 {
                    if i <= c.len() {
                        out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
                    } else {
                        out.push('=');
                    }
                }
            }
            out
        };
        let body = serde_json::json!({ "key": b64("/keel-test/schema_version"), "value": b64(&v) });
        ureq::post(&url).send_json(body).expect("etcd's JSON gateway");
    }
}
