//! An async QMP client.
//!
//! QMP is JSON over a UNIX socket: QEMU greets, the client negotiates
//! capabilities, then sends `{"execute": CMD, "arguments": {...}, "id": N}`
//! and gets `{"return": ...}` or `{"error": {"class", "desc"}}` with the same
//! id. Events (`{"event": NAME, "data": ..., "timestamp": ...}`) may arrive
//! at any time, between or before replies.
//!
//! [`Qmp`] runs one reader task per connection that routes replies to
//! their callers by id and events to [`Qmp::events`] subscribers, so
//! commands may be issued from several tasks at once. When QEMU hangs up
//! (it exited) every pending command fails with [`QmpError::Closed`] and
//! [`Qmp::closed`] resolves.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::{Mutex, broadcast, oneshot, watch};

/// QMP failures.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket could not be reached or broke.
    #[error("QMP socket {path}: {source}")]
    Io {
        /// Socket path.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// QEMU said something that is not QMP.
    #[error("QMP protocol: {0}")]
    Protocol(String),
    /// QEMU refused the command.
    #[error("QEMU refused {command}: {desc} ({class})")]
    Command {
        /// The command.
        command: String,
        /// QMP error class, e.g. `GenericError`, `DeviceNotFound`.
        class: String,
        /// QEMU's message.
        desc: String,
    },
    /// QEMU hung up (it exited) before answering.
    #[error("QEMU closed its QMP socket (the VM's QEMU exited)")]
    Closed,
    /// No answer in time.
    #[error("QEMU did not answer {0} in time")]
    Timeout(String),
}

/// An asynchronous event from QEMU.
#[derive(Clone, Debug)]
pub struct QmpEvent {
    /// Event name, e.g. `SHUTDOWN`, `DEVICE_DELETED`.
    pub name: String,
    /// Its `data` member (`null` when absent).
    pub data: Value,
}

type Pending = Arc<pending_map::Map>;

/// Replies awaited, by command id (a std mutex, never held
/// across an await).
mod pending_map {
    use super::*;

    #[derive(Default)]
    pub struct Map(std::sync::Mutex<Option<HashMap<u64, oneshot::Sender<Value>>>>);

    impl Map {
        pub fn new() -> Map {
            Map(std::sync::Mutex::new(Some(HashMap::new())))
        }
        /// Register `id`; false when the connection is already closed.
        pub fn insert(&self, id: u64, tx: oneshot::Sender<Value>) -> bool {
            match self.0.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
                Some(m) => {
                    m.insert(id, tx);
                    true
                }
                None => false,
            }
        }
        pub fn take(&self, id: u64) -> Option<oneshot::Sender<Value>> {
            self.0.lock().unwrap_or_else(|e| e.into_inner()).as_mut()?.remove(&id)
        }
        pub fn remove(&self, id: u64) {
            self.take(id);
        }
        /// Close: drop every pending sender (their receivers see Closed)
        /// and refuse new ones.
        pub fn close(&self) {
            self.0.lock().unwrap_or_else(|e| e.into_inner()).take();
        }
    }
}

/// A connected QMP session.
pub struct Qmp {
    path: String,
    writer: Mutex<OwnedWriteHalf>,
    pending: Pending,
    next_id: AtomicU64,
    events: broadcast::Sender<QmpEvent>,
    closed: watch::Receiver<bool>,
}

impl Qmp {
    /// Connect to QEMU's QMP socket at `path`, read the greeting and leave
    /// capabilities negotiation mode. Fails in `timeout` when QEMU does not
    /// greet.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Arc<Qmp>, QmpError> {
        let p = path.display().to_string();
        let io = |source| QmpError::Io { path: p.clone(), source };
        let stream = tokio::time::timeout(timeout, UnixStream::connect(path))
            .await
            .map_err(|_| QmpError::Timeout("connect".into()))?
            .map_err(io)?;
        let (read, write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        let greeting = tokio::time::timeout(timeout, lines.next_line())
            .await
            .map_err(|_| QmpError::Timeout("greeting".into()))?
            .map_err(io)?
            .ok_or(QmpError::Closed)?;
        let g: Value = serde_json::from_str(&greeting).map_err(|e| QmpError::Protocol(format!("greeting: {e}")))?;
        if g.get("QMP").is_none() {
            return Err(QmpError::Protocol(format!("expected a QMP greeting, got {greeting}")));
        }
        let (events, _) = broadcast::channel(256);
        let (closed_tx, closed) = watch::channel(false);
        let qmp = Arc::new(Qmp {
            path: p,
            writer: Mutex::new(write),
            pending: Arc::new(pending_map::Map::new()),
            next_id: AtomicU64::new(1),
            events: events.clone(),
            closed,
        });
        let pending = qmp.pending.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let Ok(v) = serde_json::from_str::<Value>(&line) else {
                    tracing::warn!(%line, "QMP: not JSON, ignored");
                    continue;
                };
                if let Some(name) = v.get("event").and_then(Value::as_str) {
                    let data = v.get("data").cloned().unwrap_or(Value::Null);
                    let _ = events.send(QmpEvent { name: name.to_string(), data });
                } else if let Some(tx) = v.get("id").and_then(Value::as_u64).and_then(|id| pending.take(id)) {
                    let _ = tx.send(v);
                }
            }
            pending.close();
            let _ = closed_tx.send(true);
        });
        tokio::time::timeout(timeout, qmp.execute("qmp_capabilities", json!({})))
            .await
            .map_err(|_| QmpError::Timeout("qmp_capabilities".into()))??;
        Ok(qmp)
    }

    /// Run `command` with `arguments` (an object, or `null` for none) and
    /// return its `return` value.
    pub async fn execute(&self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut msg = json!({ "execute": command, "id": id });
        if !arguments.is_null() {
            msg["arguments"] = arguments;
        }
        let (tx, rx) = oneshot::channel();
        if !self.pending.insert(id, tx) {
            return Err(QmpError::Closed);
        }
        let mut line = msg.to_string();
        line.push('\n');
        let sent = self.writer.lock().await.write_all(line.as_bytes()).await;
        if let Err(e) = sent {
            self.pending.remove(id);
            return Err(if e.kind() == std::io::ErrorKind::BrokenPipe {
                QmpError::Closed
            } else {
                QmpError::Io { path: self.path.clone(), source: e }
            });
        }
        let reply = rx.await.map_err(|_| QmpError::Closed)?;
        if let Some(r) = reply.get("return") {
            return Ok(r.clone());
        }
        let err = reply.get("error").cloned().unwrap_or(Value::Null);
        let s = |k: &str| err.get(k).and_then(Value::as_str).unwrap_or("?").to_string();
        Err(QmpError::Command { command: command.to_string(), class: s("class"), desc: s("desc") })
    }

    /// [`Qmp::execute`] with a time limit.
    pub async fn execute_within(&self, command: &str, arguments: Value, limit: Duration) -> Result<Value, QmpError> {
        tokio::time::timeout(limit, self.execute(command, arguments))
            .await
            .map_err(|_| QmpError::Timeout(command.to_string()))?
    }

    /// Subscribe to events from now on.
    pub fn events(&self) -> broadcast::Receiver<QmpEvent> {
        self.events.subscribe()
    }

    /// Resolves when QEMU has hung up.
    pub async fn closed(&self) {
        let mut c = self.closed.clone();
        let _ = c.wait_for(|closed| *closed).await;
    }

    /// Whether QEMU has hung up.
    pub fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }
}

/// Wait for event `name` whose data satisfies `matches`, at most `limit`.
pub async fn wait_event(
    rx: &mut broadcast::Receiver<QmpEvent>,
    name: &str,
    limit: Duration,
    matches: impl Fn(&Value) -> bool,
) -> Option<QmpEvent> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Ok(e)) if e.name == name && matches(&e.data) => return Some(e),
            Ok(Ok(_)) | Ok(Err(broadcast::error::RecvError::Lagged(_))) => continue,
            Ok(Err(broadcast::error::RecvError::Closed)) | Err(_) => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    /// A scripted QMP server: greets, then answers each command by the
    /// function given, and can emit events.
    async fn fake_qemu(path: &Path) -> tokio::task::JoinHandle<()> {
        let listener = UnixListener::bind(path).unwrap();
        tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let (r, mut w) = s.into_split();
            let mut lines = BufReader::new(r).lines();
            w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n").await.unwrap();
            while let Ok(Some(l)) = lines.next_line().await {
                let v: Value = serde_json::from_str(&l).unwrap();
                let id = v["id"].clone();
                let reply = match v["execute"].as_str().unwrap() {
                    "qmp_capabilities" => json!({"return": {}, "id": id}),
                    "query-status" => {
                        // An event first, then the reply: the client must
                        // route both.
                        w.write_all(b"{\"event\": \"RESUME\", \"data\": {}, \"timestamp\": {}}\n").await.unwrap();
                        json!({"return": {"status": "running", "running": true}, "id": id})
                    }
                    "quit" => {
                        w.write_all(format!("{}\n", json!({"return": {}, "id": id})).as_bytes()).await.unwrap();
                        return;
                    }
                    "hang" => continue,
                    other => {
                        json!({"error": {"class": "CommandNotFound", "desc": format!("The command {other} has not been found")}, "id": id})
                    }
                };
                w.write_all(format!("{reply}\n").as_bytes()).await.unwrap();
            }
        })
    }

    #[tokio::test]
    async fn commands_events_errors_and_hangup() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let server = fake_qemu(&path).await;
        let qmp = Qmp::connect(&path, Duration::from_secs(5)).await.unwrap();
        let mut events = qmp.events();
        let st = qmp.execute("query-status", Value::Null).await.unwrap();
        assert_eq!(st["status"], "running");
        let e = wait_event(&mut events, "RESUME", Duration::from_secs(5), |_| true).await;
        assert!(e.is_some());
        match qmp.execute("nonsense", json!({})).await {
            Err(QmpError::Command { class, .. }) => assert_eq!(class, "CommandNotFound"),
            other => panic!("{other:?}"),
        }
        // A command QEMU never answers fails when QEMU hangs up.
        let q2 = qmp.clone();
        let hung = tokio::spawn(async move { q2.execute("hang", json!({})).await });
        assert!(matches!(
            qmp.execute_within("hang", json!({}), Duration::from_millis(50)).await,
            Err(QmpError::Timeout(_))
        ));
        qmp.execute("quit", json!({})).await.unwrap();
        server.await.unwrap();
        qmp.closed().await;
        assert!(qmp.is_closed());
        assert!(matches!(hung.await.unwrap(), Err(QmpError::Closed)));
        assert!(matches!(qmp.execute("query-status", Value::Null).await, Err(QmpError::Closed)));
    }

    #[tokio::test]
    async fn no_qemu_is_an_io_error() {
        let dir = tempfile::tempdir().unwrap();
        let r = Qmp::connect(&dir.path().join("absent.sock"), Duration::from_secs(1)).await;
        assert!(matches!(r, Err(QmpError::Io { .. })), "{:?}", r.err());
    }
}
