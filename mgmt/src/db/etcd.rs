//! The metadata in etcd: the same tables and transactions as redb, for a
//! cluster's shared state.
//!
//! **Keys** (all under the configured prefix `P`, e.g. `/keel/`):
//!
//! | key | value |
//! |---|---|
//! | `P schema_version` | the schema version, as in redb's `meta` table |
//! | `P t/TABLE/KEY` | a record: the same JSON document as in redb |
//! | `P v/TABLE` | the table's version: rewritten by every transaction that writes to the table |
//! | `P seq/events` | the sequence number of the newest event |
//! | `P e/SEQ` (20 digits) | an event; the newest [`EVENTS_KEPT`] are kept |
//!
//! **Transactions** by optimistic concurrency: a [`Txn`] reads at one
//! revision of the store (the first read fixes it) and remembers the
//! `mod_revision` of every key it read (0 for a key that was absent), buffers
//! its writes, and commits them in one etcd transaction guarded by "every key
//! read still has that `mod_revision`". Listing a table reads its version
//! key, so a record added to or removed from the table by anyone else makes
//! the guard fail too (no phantoms). A failed guard runs the transaction
//! again at a newer revision, up to [`TRIES`] times. The outcome is what
//! redb's one-writer-at-a-time gives: serializable transactions; of two
//! that conflict (the same name created twice, two creations that together
//! pass a quota both read), exactly one commits, and the other runs again
//! and sees it.
//!
//! etcd refuses a transaction of more than its `--max-txn-ops` operations
//! (128 by default): each record written counts one, each table written one
//! more, each event two.
//!
//! The client is the `etcd-client` crate (async, tonic); this module gives
//! the rest of `mgmt` the same blocking interface as redb's by running it on
//! a runtime of its own (one thread) and waiting for each call, so a call
//! blocks its caller for a network round trip as a redb commit blocks it for
//! an fsync.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetOptions, SortOrder, SortTarget, TxnOp};

use super::{EVENTS_KEPT, Error, Result, SCHEMA_VERSION, Table};

/// How often a transaction is run again when others keep changing what it
/// read.
pub const TRIES: u32 = 64;
/// Longest a single call to etcd may take before it counts as unreachable.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);

struct Inner {
    handle: tokio::runtime::Handle,
    client: Client,
    prefix: String,
}

/// An open connection to the metadata in etcd.
pub struct EtcdMeta {
    inner: Arc<Inner>,
    rt: Option<tokio::runtime::Runtime>,
}

impl Drop for EtcdMeta {
    fn drop(&mut self) {
        // Dropping a runtime blocks; the daemon may drop this in async code.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

fn unavailable(e: impl std::fmt::Display) -> Error {
    Error::Unavailable(e.to_string())
}

/// Run `f` on the etcd runtime and wait for it (from any thread, inside an
/// async runtime or not).
fn block<T: Send + 'static>(
    handle: &tokio::runtime::Handle,
    f: impl Future<Output = std::result::Result<T, etcd_client::Error>> + Send + 'static,
) -> Result<T> {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    handle.spawn(async move {
        let r = tokio::time::timeout(CALL_TIMEOUT, f).await;
        let _ = tx.send(r);
    });
    match rx.recv() {
        Ok(Ok(Ok(v))) => Ok(v),
        Ok(Ok(Err(e))) => Err(unavailable(e)),
        Ok(Err(_)) => Err(unavailable(format!("no answer within {} s", CALL_TIMEOUT.as_secs()))),
        Err(_) => Err(unavailable("the etcd client stopped")),
    }
}

/// The first key after every key that starts with `prefix`.
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

impl Inner {
    fn rec(&self, table: Table, key: &str) -> String {
        format!("{}t/{}/{key}", self.prefix, table.name())
    }
    fn table_prefix(&self, table: Table) -> String {
        format!("{}t/{}/", self.prefix, table.name())
    }
    fn version(&self, table: Table) -> String {
        format!("{}v/{}", self.prefix, table.name())
    }
    fn seq(&self) -> String {
        format!("{}seq/events", self.prefix)
    }
    fn event(&self, id: u64) -> String {
        format!("{}e/{id:020}", self.prefix)
    }

    /// `(value, mod_revision)` of `key` at `rev` (0: the newest), and the
    /// store's revision the answer is of.
    fn get_at(&self, key: String, rev: i64) -> Result<(Option<(String, i64)>, i64)> {
        let mut c = self.client.clone();
        let (kv, header_rev) = block(&self.handle, async move {
            let opts = if rev > 0 { Some(GetOptions::new().with_revision(rev)) } else { None };
            let r = c.get(key, opts).await?;
            let header_rev = r.header().map_or(0, |h| h.revision());
            let kv = r.kvs().first().map(|kv| (kv.value().to_vec(), kv.mod_revision()));
            Ok((kv, header_rev))
        })?;
        let kv = kv
            .map(|(v, m)| String::from_utf8(v).map(|s| (s, m)).map_err(|_| unavailable("a record is not UTF-8")))
            .transpose()?;
        Ok((kv, header_rev))
    }

    /// Every `(key without prefix, value)` whose key starts with `prefix`,
    /// at `rev` (0: the newest), in key order.
    fn range_at(&self, prefix: String, rev: i64) -> Result<Vec<(String, String)>> {
        let mut c = self.client.clone();
        let strip = prefix.len();
        let kvs = block(&self.handle, async move {
            let mut opts =
                GetOptions::new().with_range(prefix_end(&prefix)).with_sort(SortTarget::Key, SortOrder::Ascend);
            if rev > 0 {
                opts = opts.with_revision(rev);
            }
            let r = c.get(prefix, Some(opts)).await?;
            Ok(r.kvs().iter().map(|kv| (kv.key().to_vec(), kv.value().to_vec())).collect::<Vec<_>>())
        })?;
        kvs.into_iter()
            .map(|(k, v)| {
                let k = String::from_utf8(k).map_err(|_| unavailable("a key is not UTF-8"))?;
                let v = String::from_utf8(v).map_err(|_| unavailable("a record is not UTF-8"))?;
                Ok((k[strip..].to_string(), v))
            })
            .collect()
    }
}

impl EtcdMeta {
    /// Connect to `endpoints` (`http://host:port`), keys under `prefix`.
    pub fn connect(endpoints: &[String], prefix: &str) -> Result<EtcdMeta> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("keel-etcd")
            .enable_all()
            .build()
            .map_err(unavailable)?;
        let handle = rt.handle().clone();
        let eps = endpoints.to_vec();
        let client = block(&handle, async move {
            let opts = ConnectOptions::new()
                .with_connect_timeout(Duration::from_secs(3))
                .with_timeout(CALL_TIMEOUT)
                .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5));
            Client::connect(eps, Some(opts)).await
        })
        .map_err(|e| unavailable(format!("connecting to {}: {e}", endpoints.join(","))))?;
        let prefix = if prefix.ends_with('/') { prefix.to_string() } else { format!("{prefix}/") };
        let m = EtcdMeta { inner: Arc::new(Inner { handle, client, prefix }), rt: Some(rt) };
        // Reachable now, not at the first request.
        m.inner.get_at(m.inner.seq(), 0)?;
        Ok(m)
    }

    /// Record this build's schema version; returns the one found (0: new).
    pub fn schema_version(&self, mine: u64) -> Result<u64> {
        let key = format!("{}schema_version", self.inner.prefix);
        let (v, _) = self.inner.get_at(key.clone(), 0)?;
        let found = v.map_or(0, |(v, _)| v.parse::<u64>().unwrap_or(0));
        if found > mine {
            return Err(Error::TooNew { found });
        }
        if found < SCHEMA_VERSION {
            let mut c = self.inner.client.clone();
            block(&self.inner.handle, async move { c.put(key, mine.to_string(), None).await.map(|_| ()) })?;
        }
        Ok(found)
    }

    /// One record's JSON.
    pub fn get(&self, table: Table, key: &str) -> Result<Option<String>> {
        Ok(self.inner.get_at(self.inner.rec(table, key), 0)?.0.map(|(v, _)| v))
    }

    /// Every record of `table` as `(key, JSON)`, in key order.
    pub fn list(&self, table: Table) -> Result<Vec<(String, String)>> {
        self.inner.range_at(self.inner.table_prefix(table), 0)
    }

    /// Events as [`super::Meta::events`] gives them: with `after` 0 the
    /// newest `limit`, else the next `limit` after `after`; oldest first.
    pub fn events(&self, after: u64, limit: usize) -> Result<Vec<(u64, String)>> {
        let mut c = self.inner.client.clone();
        let prefix = format!("{}e/", self.inner.prefix);
        let from = if after > 0 { self.inner.event(after + 1) } else { prefix.clone() };
        let end = prefix_end(&prefix);
        let order = if after > 0 { SortOrder::Ascend } else { SortOrder::Descend };
        let kvs = block(&self.inner.handle, async move {
            let opts = GetOptions::new().with_range(end).with_sort(SortTarget::Key, order).with_limit(limit as i64);
            let r = c.get(from, Some(opts)).await?;
            Ok(r.kvs().iter().map(|kv| (kv.key().to_vec(), kv.value().to_vec())).collect::<Vec<_>>())
        })?;
        let mut out = Vec::with_capacity(kvs.len());
        for (k, v) in kvs {
            let k = String::from_utf8_lossy(&k);
            let id = k[prefix.len()..].parse::<u64>().map_err(|_| unavailable(format!("event key {k} is damaged")))?;
            out.push((id, String::from_utf8(v).map_err(|_| unavailable("an event is not UTF-8"))?));
        }
        if after == 0 {
            out.reverse();
        }
        Ok(out)
    }

    /// Run `f` as one transaction (see the module's documentation): again,
    /// at a newer revision, while another writer changed what it read.
    pub fn write<R, E: From<Error>>(
        &self,
        mut f: impl FnMut(&mut Txn) -> std::result::Result<R, E>,
    ) -> std::result::Result<R, E> {
        for attempt in 0..TRIES {
            let mut t = Txn::new(self.inner.clone());
            let r = f(&mut t)?;
            if t.commit()? {
                return Ok(r);
            }
            // Someone else committed first: back off a little, then again.
            let ms = 1 + (attempt as u64).min(20) * u64::from(rand::random::<u8>() % 4);
            std::thread::sleep(Duration::from_millis(ms));
        }
        Err(Error::Contended(TRIES).into())
    }
}

/// A transaction in progress (the etcd side of [`super::Write`]).
pub struct Txn {
    inner: Arc<Inner>,
    /// The store's revision every read is at (0 until the first read).
    rev: i64,
    /// Every key read, with the `mod_revision` it had (0: absent).
    reads: HashMap<String, i64>,
    /// Buffered writes: a value, or `None` for a removal.
    writes: BTreeMap<String, Option<String>>,
    tables: BTreeSet<&'static str>,
    events: Vec<(u64, String)>,
    next_event: Option<u64>,
}

impl Txn {
    fn new(inner: Arc<Inner>) -> Txn {
        Txn {
            inner,
            rev: 0,
            reads: HashMap::new(),
            writes: BTreeMap::new(),
            tables: BTreeSet::new(),
            events: Vec::new(),
            next_event: None,
        }
    }

    /// Read `key` at the transaction's revision and remember what it was.
    fn read(&mut self, key: String) -> Result<Option<String>> {
        let (kv, header_rev) = self.inner.get_at(key.clone(), self.rev)?;
        if self.rev == 0 {
            self.rev = header_rev;
        }
        self.reads.entry(key).or_insert(kv.as_ref().map_or(0, |(_, m)| *m));
        Ok(kv.map(|(v, _)| v))
    }

    /// A record's JSON as this transaction sees it.
    pub fn get(&mut self, table: Table, key: &str) -> Result<Option<String>> {
        let k = self.inner.rec(table, key);
        if let Some(w) = self.writes.get(&k) {
            return Ok(w.clone());
        }
        self.read(k)
    }

    /// Every record of `table` as this transaction sees it.
    pub fn list(&mut self, table: Table) -> Result<Vec<(String, String)>> {
        // The table's version guards against records added or removed by
        // others; reading it first also fixes the revision.
        self.read(self.inner.version(table))?;
        let prefix = self.inner.table_prefix(table);
        let mut all: BTreeMap<String, String> = self.inner.range_at(prefix.clone(), self.rev)?.into_iter().collect();
        for (k, w) in self.writes.range(prefix.clone()..) {
            let Some(name) = k.strip_prefix(&prefix) else { break };
            match w {
                Some(v) => all.insert(name.to_string(), v.clone()),
                None => all.remove(name),
            };
        }
        Ok(all.into_iter().collect())
    }

    /// Write a record.
    pub fn put(&mut self, table: Table, key: &str, json: String) {
        self.writes.insert(self.inner.rec(table, key), Some(json));
        self.tables.insert(table.name());
    }

    /// Remove a record; true when it was there.
    pub fn remove(&mut self, table: Table, key: &str) -> Result<bool> {
        let was = self.get(table, key)?.is_some();
        self.writes.insert(self.inner.rec(table, key), None);
        self.tables.insert(table.name());
        Ok(was)
    }

    /// Append an event; returns its sequence number.
    pub fn event(&mut self, json: String) -> Result<u64> {
        let id = match self.next_event {
            Some(n) => n,
            None => self.read(self.inner.seq())?.and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) + 1,
        };
        self.next_event = Some(id + 1);
        self.events.push((id, json));
        Ok(id)
    }

    /// Commit if nothing read has changed: `Ok(false)` when something has
    /// (the caller runs the transaction again).
    fn commit(self) -> Result<bool> {
        if self.writes.is_empty() && self.events.is_empty() {
            // Nothing to write: what was read was one consistent revision.
            return Ok(true);
        }
        let guards: Vec<Compare> =
            self.reads.iter().map(|(k, m)| Compare::mod_revision(k.as_str(), CompareOp::Equal, *m)).collect();
        let mut ops = Vec::new();
        for (k, w) in &self.writes {
            ops.push(match w {
                Some(v) => TxnOp::put(k.as_str(), v.as_str(), None),
                None => TxnOp::delete(k.as_str(), None),
            });
        }
        for t in &self.tables {
            // Any value: what the guard looks at is the key's mod_revision.
            ops.push(TxnOp::put(format!("{}v/{t}", self.inner.prefix), self.rev.to_string(), None));
        }
        if let Some((last, _)) = self.events.last() {
            for (id, json) in &self.events {
                ops.push(TxnOp::put(self.inner.event(*id), json.as_str(), None));
                if *id > EVENTS_KEPT {
                    ops.push(TxnOp::delete(self.inner.event(id - EVENTS_KEPT), None));
                }
            }
            ops.push(TxnOp::put(self.inner.seq(), last.to_string(), None));
        }
        let mut c = self.inner.client.clone();
        let txn = etcd_client::Txn::new().when(guards).and_then(ops);
        block(&self.inner.handle, async move { c.txn(txn).await.map(|r| r.succeeded()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ends_are_the_next_key() {
        assert_eq!(prefix_end("/keel/e/"), b"/keel/e0".to_vec());
        assert_eq!(prefix_end("a\u{7f}"), b"a\x80".to_vec());
    }
}
