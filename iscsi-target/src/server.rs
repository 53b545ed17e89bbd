//! Accepting connections, logging them in, and what is served: every
//! volume of a pool is a target `iqn.2026-11.io.keel:VOLUME` with LUN 0.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::time::Duration;

use keel_blockstore::{Backend, BlockDevice, DeviceKind, Pool, Volume};
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

use crate::login::{Access, Directory, Established, Login, SessionType};
use crate::pdu::{self, BHS_LEN, Bhs, Framing};
use crate::scsi::{LogicalUnit, LuIdentity, Nexus, ResetKind};
use crate::session::{Keepalive, Session, SessionHost};

/// Prefix of every Keel target name; the volume name follows.
pub const IQN_PREFIX: &str = "iqn.2026-11.io.keel:";

/// The targets a server offers.
pub trait Targets: Send + Sync + 'static {
    /// The device type behind a LUN.
    type Device: BlockDevice + 'static;
    /// Every target name.
    fn names(&self) -> Vec<String>;
    /// The device behind target `name`'s LUN 0.
    fn open(&self, name: &str) -> Option<Arc<Self::Device>>;
    /// Who may log in to `name`, or `None` when there is no such target.
    /// The default opens the device to find out and lets anyone in, with
    /// no CHAP.
    fn access(&self, name: &str) -> Option<Access> {
        self.open(name).map(|_| Access::default())
    }
    /// Who may open discovery sessions (default: anyone, no CHAP).
    fn discovery_access(&self) -> Access {
        Access::default()
    }
    /// Whether discovery sessions may learn of target `name` through
    /// `SendTargets` (default: yes). A session logged in to a target always
    /// learns its own address.
    fn discoverable(&self, _name: &str) -> bool {
        true
    }
}

/// Every volume of a pool as `iqn.2026-11.io.keel:VOLUME` (snapshots are
/// served over NBD; an IQN cannot carry the `@`).
pub struct PoolTargets<B: Backend> {
    pool: Pool<B>,
    access: Mutex<HashMap<String, Access>>,
}

impl<B: Backend> PoolTargets<B> {
    /// Serve the volumes of `pool`.
    pub fn new(pool: Pool<B>) -> PoolTargets<B> {
        PoolTargets { pool, access: Mutex::new(HashMap::new()) }
    }
    /// Set the ACL and CHAP credentials of the target of `volume`.
    pub fn set_access(&self, volume: &str, access: Access) {
        self.access.lock().insert(volume.to_string(), access);
    }
}

impl<B: Backend> Targets for PoolTargets<B> {
    type Device = Volume<B>;

    fn names(&self) -> Vec<String> {
        self.pool
            .list()
            .into_iter()
            .filter(|d| d.kind != DeviceKind::Snapshot)
            .map(|d| format!("{IQN_PREFIX}{}", d.name))
            .collect()
    }

    fn open(&self, name: &str) -> Option<Arc<Volume<B>>> {
        let vol = name.strip_prefix(IQN_PREFIX)?;
        if vol.contains('@') {
            return None;
        }
        self.pool.volume(vol).ok().map(Arc::new)
    }

    fn access(&self, name: &str) -> Option<Access> {
        let vol = name.strip_prefix(IQN_PREFIX).filter(|v| !v.contains('@'))?;
        self.pool.volume(vol).ok()?;
        Some(self.access.lock().get(vol).cloned().unwrap_or_default())
    }
}

/// Server settings.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Target portal group tag.
    pub tpgt: u16,
    /// Seconds a connection may take to log in.
    pub login_timeout: Duration,
    /// NOP-In pings of idle initiators.
    pub keepalive: Keepalive,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            tpgt: 1,
            login_timeout: Duration::from_secs(15),
            keepalive: Keepalive { interval: Duration::from_secs(10), timeout: Duration::from_secs(15) },
        }
    }
}

struct SessionEntry {
    initiator: String,
    isid: [u8; 6],
    target: String,
    kill: Arc<Notify>,
}

struct LuEntry<D: BlockDevice + 'static> {
    lu: Arc<LogicalUnit<D>>,
    users: usize,
}

/// An iSCSI target server.
pub struct Server<T: Targets> {
    targets: Arc<T>,
    config: ServerConfig,
    sessions: Mutex<HashMap<u64, SessionEntry>>,
    lus: Mutex<HashMap<String, LuEntry<T::Device>>>,
    next_id: AtomicU64,
    next_tsih: AtomicU16,
}

struct Dir<'a, T: Targets>(&'a T);

impl<T: Targets> Directory for Dir<'_, T> {
    fn access(&self, target: &str) -> Option<Access> {
        self.0.access(target)
    }
    fn discovery_access(&self) -> Access {
        self.0.discovery_access()
    }
}

fn naa_of(name: &str) -> u64 {
    // FNV-1a of the name, under NAA type 6 with a locally administered
    // company id.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (0x6u64 << 60) | (0x004b_4545_u64 << 36) | (h & 0xf_ffff_ffff)
}

impl<T: Targets> Server<T> {
    /// A server for `targets`.
    pub fn new(targets: Arc<T>, config: ServerConfig) -> Arc<Server<T>> {
        Arc::new(Server {
            targets,
            config,
            sessions: Mutex::new(HashMap::new()),
            lus: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            next_tsih: AtomicU16::new(1),
        })
    }

    /// Accept connections on `listener` until the task is dropped.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) -> io::Result<()> {
        loop {
            let (sock, peer) = listener.accept().await?;
            let _ = sock.set_nodelay(true);
            let me = self.clone();
            tokio::spawn(async move {
                if let Err(e) = me.connection(sock).await {
                    tracing::debug!(%peer, "iSCSI connection ended: {e}");
                }
            });
        }
    }

    fn lu_for(&self, target: &str) -> Option<Arc<LogicalUnit<T::Device>>> {
        let mut lus = self.lus.lock();
        if let Some(e) = lus.get_mut(target) {
            e.users += 1;
            return Some(e.lu.clone());
        }
        let dev = self.targets.open(target)?;
        let name = target.strip_prefix(IQN_PREFIX).unwrap_or(target).to_string();
        let naa = naa_of(target);
        let id = LuIdentity { serial: format!("{:016x}", naa), name, naa, target_name: target.to_string() };
        let lu = Arc::new(LogicalUnit::new(dev, id));
        lus.insert(target.to_string(), LuEntry { lu: lu.clone(), users: 1 });
        Some(lu)
    }

    fn lu_release(&self, target: &str) {
        let mut lus = self.lus.lock();
        if let Some(e) = lus.get_mut(target) {
            e.users -= 1;
            if e.users == 0 {
                lus.remove(target);
            }
        }
    }

    async fn connection(self: Arc<Self>, sock: TcpStream) -> io::Result<()> {
        let local = sock.local_addr()?;
        let (rd, mut wr) = sock.into_split();
        // Small enough that reading a PDU's header does not pull most of a
        // large data segment through the buffer (the session reads those
        // straight into their command's buffer), large enough to bring in
        // several small PDUs per system call.
        let mut rd = BufReader::with_capacity(64 * 1024, rd);
        let tsih = loop {
            let t = self.next_tsih.fetch_add(1, Ordering::Relaxed);
            if t != 0 {
                break t;
            }
        };
        let mut login = Login::new(self.config.tpgt, tsih);
        let est: Established = {
            let fut = async {
                let mut rest = Vec::new();
                loop {
                    let mut hdr = [0u8; BHS_LEN];
                    rd.read_exact(&mut hdr).await?;
                    let bhs = Bhs(hdr);
                    let n = pdu::rest_len(&bhs, Framing::default(), 64 * 1024)
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{e:?}")))?;
                    rest.resize(n, 0);
                    rd.read_exact(&mut rest).await?;
                    let p = pdu::parse_rest(&bhs, &rest, Framing::default())
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("{e:?}")))?;
                    let step = login.step(&bhs, p.data, &Dir(&*self.targets));
                    let mut out = Vec::new();
                    pdu::encode(&mut out, &step.bhs, &step.data, Framing::default());
                    wr.write_all(&out).await?;
                    if step.failed {
                        return Err(io::Error::new(io::ErrorKind::PermissionDenied, "login refused"));
                    }
                    if let Some(est) = step.done {
                        return Ok(est);
                    }
                }
            };
            tokio::time::timeout(self.config.login_timeout, fut)
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "login timed out"))??
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let kill = Arc::new(Notify::new());
        let lu = match est.kind {
            SessionType::Discovery => None,
            SessionType::Normal => match self.lu_for(&est.target) {
                Some(lu) => Some(lu),
                None => return Err(io::Error::new(io::ErrorKind::NotFound, "target vanished during login")),
            },
        };
        // Session reinstatement: a new login with the same initiator and
        // ISID to the same target replaces the old session.
        let old: Vec<Arc<Notify>> = {
            let mut s = self.sessions.lock();
            let stale: Vec<u64> = s
                .iter()
                .filter(|(_, e)| e.initiator == est.initiator && e.isid == est.isid && e.target == est.target)
                .map(|(k, _)| *k)
                .collect();
            let kills = stale.iter().filter_map(|k| s.remove(k)).map(|e| e.kill).collect();
            s.insert(
                id,
                SessionEntry {
                    initiator: est.initiator.clone(),
                    isid: est.isid,
                    target: est.target.clone(),
                    kill: kill.clone(),
                },
            );
            kills
        };
        for k in old {
            k.notify_one();
        }
        tracing::info!(initiator = %est.initiator, target = %est.target, "iSCSI session {id} logged in");
        let nexus = Nexus {
            id,
            initiator_name: est.initiator.clone(),
            isid: est.isid,
            target_port_name: format!("{},t,0x{:04x}", est.target, self.config.tpgt),
            rel_port_id: 1,
        };
        let session = Session {
            lu: lu.clone(),
            nexus,
            target: est.target.clone(),
            params: est.params.clone(),
            cmdsn: est.cmdsn,
            statsn: est.statsn,
            kill,
            keepalive: self.config.keepalive,
            local,
        };
        let r = session.run(rd, wr, self.clone()).await;
        self.sessions.lock().remove(&id);
        if lu.is_some() {
            self.lu_release(&est.target);
        }
        tracing::info!("iSCSI session {id} ended");
        r
    }
}

impl<T: Targets> SessionHost for Server<T> {
    fn send_targets(
        &self,
        initiator: &str,
        only: Option<&str>,
        discovery: bool,
        local: SocketAddr,
    ) -> Vec<(String, String)> {
        let portal = format!("{local},{}", self.config.tpgt);
        self.targets
            .names()
            .into_iter()
            .filter(|n| only.is_none_or(|o| o == n))
            .filter(|n| !discovery || self.targets.discoverable(n))
            .filter(|n| self.targets.access(n).is_some_and(|a| a.allows(initiator)))
            .map(|n| (n, portal.clone()))
            .collect()
    }

    fn cold_reset(&self, target: &str) {
        let kills: Vec<_> =
            self.sessions.lock().values().filter(|e| e.target == target).map(|e| e.kill.clone()).collect();
        for k in kills {
            k.notify_one();
        }
    }

    fn warm_reset(&self, target: &str, by: &Nexus) {
        if let Some(e) = self.lus.lock().get(target) {
            e.lu.reset(by, ResetKind::TargetWarm);
        }
    }
}
