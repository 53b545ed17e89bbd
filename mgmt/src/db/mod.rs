//! The metadata database: one interface, [`Meta`], over two stores.
//!
//! - **redb** (the default, one node): an embedded file, `DATA/keel.redb`.
//!   The schema version lives in its `meta` table; [`Meta::open`] runs the
//!   migrations from the file's version up to [`SCHEMA_VERSION`] in one
//!   transaction and refuses a file written by a newer Keel. Writes are
//!   redb transactions committed with immediate durability, so a record is
//!   on disk when the call returns.
//! - **etcd** (a cluster's shared state, [`etcd`]): the same tables as key
//!   prefixes, the same transactions by compare-and-swap on revisions.
//!
//! Every record is a JSON document keyed by name (or by a sequence number
//! for the event log), in one table per kind. A transaction
//! ([`Meta::write`]) means the same on both: everything it read is what the
//! store held when it committed, and all its writes land together or none
//! does. redb gets that by running one writer at a time; etcd by checking,
//! at commit, that no key the transaction read has changed since (and
//! running the transaction again when one has), so the closure may run more
//! than once and must do nothing but read and write through [`Write`].

pub mod etcd;

use redb::{Database, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Version of the schema this build writes.
pub const SCHEMA_VERSION: u64 = 4;

const META: TableDefinition<&str, &str> = TableDefinition::new("meta");
/// Users by name ([`crate::model::User`]).
pub const USERS: Table = Table("users");
/// API tokens by the hex BLAKE2s hash of the token ([`crate::model::Token`]).
pub const TOKENS: Table = Table("tokens");
/// Volumes by name ([`crate::model::VolumeMeta`]).
pub const VOLUMES: Table = Table("volumes");
/// Store operations begun and not yet recorded ([`crate::model::Intent`]).
pub const INTENTS: Table = Table("intents");
/// ISO images by name ([`crate::model::IsoMeta`]).
pub const ISOS: Table = Table("isos");
/// Virtual machines by name ([`crate::model::VmMeta`]).
pub const VMS: Table = Table("vms");
/// VM running time by `OWNER/HOUR/VM` ([`crate::model::UsageRow`]).
pub const USAGE: Table = Table("usage");
/// Jobs by id (zero-padded, so key order is id order); the newest
/// [`JOBS_KEPT`] are kept.
pub const JOBS: Table = Table("jobs");
/// Pools other than the default, by name ([`crate::pools::PoolRecord`]).
pub const POOLS: Table = Table("pools");
/// How many job records are kept.
pub const JOBS_KEPT: u64 = 1000;
/// How many events the log keeps (each append past it drops the oldest).
pub const EVENTS_KEPT: u64 = 100_000;
const EVENTS: TableDefinition<u64, &str> = TableDefinition::new("events");

/// A table of JSON documents keyed by name.
#[derive(Clone, Copy, Debug)]
pub struct Table(&'static str);

impl Table {
    fn def(self) -> TableDefinition<'static, &'static str, &'static str> {
        TableDefinition::new(self.0)
    }

    /// The table's name.
    pub fn name(self) -> &'static str {
        self.0
    }
}

/// Metadata failures.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The database file failed.
    #[error("metadata database: {0}")]
    Db(#[source] Box<redb::Error>),
    /// A stored record does not parse.
    #[error("metadata record {key:?} in {table} is damaged: {source}")]
    Json {
        /// Table name.
        table: &'static str,
        /// Record key.
        key: String,
        /// Parse error.
        #[source]
        source: serde_json::Error,
    },
    /// The file was written by a newer Keel.
    #[error("metadata schema version {found} is newer than this keel supports ({SCHEMA_VERSION}): upgrade keel")]
    TooNew {
        /// Version in the file.
        found: u64,
    },
    /// The shared store cannot be reached (etcd down, no quorum): nothing
    /// was changed.
    #[error("the cluster's shared state (etcd) cannot be reached: {0}")]
    Unavailable(String),
    /// Other writers kept changing what the transaction read.
    #[error("the metadata kept changing under this change ({0} tries): try again")]
    Contended(u32),
}

/// Result alias.
pub type Result<T, E = Error> = std::result::Result<T, E>;

fn dbe<E: Into<redb::Error>>(e: E) -> Error {
    Error::Db(Box::new(e.into()))
}

/// The open metadata database.
pub struct Meta {
    store: Store,
}

enum Store {
    Redb(Database),
    Etcd(etcd::EtcdMeta),
}

/// One write transaction: every change in it lands together or not at all.
pub struct Write<'a> {
    inner: WriteInner<'a>,
}

enum WriteInner<'a> {
    Redb(&'a redb::WriteTransaction),
    Etcd(&'a mut etcd::Txn),
}

impl Write<'_> {
    /// Insert or replace `key` in `table`.
    pub fn put<T: Serialize>(&mut self, table: Table, key: &str, value: &T) -> Result<()> {
        let json = serde_json::to_string(value).expect("metadata records serialize");
        match &mut self.inner {
            WriteInner::Redb(tx) => {
                tx.open_table(table.def()).map_err(dbe)?.insert(key, json.as_str()).map_err(dbe)?;
                Ok(())
            }
            WriteInner::Etcd(t) => {
                t.put(table, key, json);
                Ok(())
            }
        }
    }

    /// Remove `key` from `table`; true when it was there.
    pub fn remove(&mut self, table: Table, key: &str) -> Result<bool> {
        match &mut self.inner {
            WriteInner::Redb(tx) => Ok(tx.open_table(table.def()).map_err(dbe)?.remove(key).map_err(dbe)?.is_some()),
            WriteInner::Etcd(t) => t.remove(table, key),
        }
    }

    /// Read `key` inside the transaction.
    pub fn get<T: DeserializeOwned>(&mut self, table: Table, key: &str) -> Result<Option<T>> {
        match &mut self.inner {
            WriteInner::Redb(tx) => {
                let t = tx.open_table(table.def()).map_err(dbe)?;
                let v = t.get(key).map_err(dbe)?;
                v.map(|v| parse(table.0, key, v.value())).transpose()
            }
            WriteInner::Etcd(t) => t.get(table, key)?.map(|v| parse(table.0, key, &v)).transpose(),
        }
    }

    /// Every record of `table` inside the transaction, in key order (a
    /// record any other writer adds, changes or removes before this one
    /// commits makes it run again on etcd, as redb's one writer at a time
    /// means anyway).
    pub fn list<T: DeserializeOwned>(&mut self, table: Table) -> Result<Vec<(String, T)>> {
        match &mut self.inner {
            WriteInner::Redb(tx) => {
                let t = tx.open_table(table.def()).map_err(dbe)?;
                let mut out = Vec::new();
                for r in t.iter().map_err(dbe)? {
                    let (k, v) = r.map_err(dbe)?;
                    out.push((k.value().to_string(), parse(table.0, k.value(), v.value())?));
                }
                Ok(out)
            }
            WriteInner::Etcd(t) => {
                t.list(table)?.into_iter().map(|(k, v)| Ok((k.clone(), parse(table.0, &k, &v)?))).collect()
            }
        }
    }

    /// Append an event; returns its sequence number.
    pub fn event<T: Serialize>(&mut self, value: &T) -> Result<u64> {
        let json = serde_json::to_string(value).expect("events serialize");
        match &mut self.inner {
            WriteInner::Redb(tx) => {
                let mut t = tx.open_table(EVENTS).map_err(dbe)?;
                let next = t.last().map_err(dbe)?.map_or(1, |(k, _)| k.value() + 1);
                t.insert(next, json.as_str()).map_err(dbe)?;
                if next > EVENTS_KEPT {
                    t.remove(next - EVENTS_KEPT).map_err(dbe)?;
                }
                Ok(next)
            }
            WriteInner::Etcd(t) => t.event(json),
        }
    }
}

fn parse<T: DeserializeOwned>(table: &'static str, key: &str, json: &str) -> Result<T> {
    serde_json::from_str(json).map_err(|source| Error::Json { table, key: key.to_string(), source })
}

/// A migration takes the schema from version `n` to `n + 1` (redb: etcd
/// keeps tables as key prefixes and needs none).
type Migration = fn(&redb::WriteTransaction) -> Result<()>;

/// `MIGRATIONS[n]` upgrades version `n` to `n + 1`. Version 0 is an empty
/// file; version 1 creates the tables; version 2 adds VMs and usage;
/// version 3 jobs; version 4 pools.
const MIGRATIONS: [Migration; 4] = [
    |tx| {
        for t in [USERS, TOKENS, VOLUMES, INTENTS, ISOS] {
            tx.open_table(t.def()).map_err(dbe)?;
        }
        tx.open_table(EVENTS).map_err(dbe)?;
        Ok(())
    },
    |tx| {
        for t in [VMS, USAGE] {
            tx.open_table(t.def()).map_err(dbe)?;
        }
        Ok(())
    },
    |tx| {
        tx.open_table(JOBS.def()).map_err(dbe)?;
        // The log is bounded from now on: drop what is over the bound.
        let mut t = tx.open_table(EVENTS).map_err(dbe)?;
        let len = t.len().map_err(dbe)?;
        if len > EVENTS_KEPT {
            let first = t.first().map_err(dbe)?.map_or(0, |(k, _)| k.value());
            let cut = first + (len - EVENTS_KEPT);
            t.retain_in(..cut, |_, _| false).map_err(dbe)?;
        }
        Ok(())
    },
    |tx| {
        tx.open_table(POOLS.def()).map_err(dbe)?;
        Ok(())
    },
];

impl Meta {
    /// Open (or create) the database at `path` and bring its schema up to
    /// date. Returns the database and the version it was found at.
    pub fn open(path: &std::path::Path) -> Result<(Meta, u64)> {
        let db = Database::create(path).map_err(dbe)?;
        let tx = db.begin_write().map_err(dbe)?;
        let found = {
            let t = tx.open_table(META).map_err(dbe)?;
            let v = t.get("schema_version").map_err(dbe)?;
            v.map(|v| v.value().parse::<u64>().unwrap_or(0)).unwrap_or(0)
        };
        if found > SCHEMA_VERSION {
            return Err(Error::TooNew { found });
        }
        {
            for m in &MIGRATIONS[found as usize..] {
                m(&tx)?;
            }
            let v = SCHEMA_VERSION.to_string();
            tx.open_table(META).map_err(dbe)?.insert("schema_version", v.as_str()).map_err(dbe)?;
        }
        tx.commit().map_err(dbe)?;
        Ok((Meta { store: Store::Redb(db) }, found))
    }

    /// Open the shared metadata in etcd (`endpoints`, keys under `prefix`)
    /// and record this build's schema version there; a newer one is refused.
    /// Returns the database and the version it was found at (0: new).
    pub fn open_etcd(endpoints: &[String], prefix: &str) -> Result<(Meta, u64)> {
        let e = etcd::EtcdMeta::connect(endpoints, prefix)?;
        let found = e.schema_version(SCHEMA_VERSION)?;
        Ok((Meta { store: Store::Etcd(e) }, found))
    }

    /// Which store this is: `redb` or `etcd`.
    pub fn kind(&self) -> &'static str {
        match self.store {
            Store::Redb(_) => "redb",
            Store::Etcd(_) => "etcd",
        }
    }

    /// Run `f` in one write transaction and commit it durably when it
    /// returns `Ok`; nothing of it is kept when it fails. On etcd `f` runs
    /// again when another writer changed what it read meanwhile, so it must
    /// do nothing but read and write through its [`Write`].
    pub fn write<R, E: From<Error>>(&self, mut f: impl FnMut(&mut Write<'_>) -> Result<R, E>) -> Result<R, E> {
        match &self.store {
            Store::Redb(db) => {
                let tx = db.begin_write().map_err(dbe)?;
                let r = f(&mut Write { inner: WriteInner::Redb(&tx) })?;
                tx.commit().map_err(dbe)?;
                Ok(r)
            }
            Store::Etcd(e) => e.write(|t| f(&mut Write { inner: WriteInner::Etcd(t) })),
        }
    }

    /// One record.
    pub fn get<T: DeserializeOwned>(&self, table: Table, key: &str) -> Result<Option<T>> {
        let db = match &self.store {
            Store::Redb(db) => db,
            Store::Etcd(e) => return e.get(table, key)?.map(|v| parse(table.0, key, &v)).transpose(),
        };
        let rx = db.begin_read().map_err(dbe)?;
        let t = rx.open_table(table.def()).map_err(dbe)?;
        let v = t.get(key).map_err(dbe)?;
        v.map(|v| parse(table.0, key, v.value())).transpose()
    }

    /// Every record of `table`, in key order.
    pub fn list<T: DeserializeOwned>(&self, table: Table) -> Result<Vec<(String, T)>> {
        let db = match &self.store {
            Store::Redb(db) => db,
            Store::Etcd(e) => {
                return e.list(table)?.into_iter().map(|(k, v)| Ok((k.clone(), parse(table.0, &k, &v)?))).collect();
            }
        };
        let rx = db.begin_read().map_err(dbe)?;
        let t = rx.open_table(table.def()).map_err(dbe)?;
        let mut out = Vec::with_capacity(t.len().map_err(dbe)? as usize);
        for r in t.iter().map_err(dbe)? {
            let (k, v) = r.map_err(dbe)?;
            out.push((k.value().to_string(), parse(table.0, k.value(), v.value())?));
        }
        Ok(out)
    }

    /// Put one record in its own transaction.
    pub fn put<T: Serialize>(&self, table: Table, key: &str, value: &T) -> Result<()> {
        self.write(|w| w.put(table, key, value))
    }

    /// Events oldest first: with `after` 0, the newest `limit`; with a
    /// cursor, the next `limit` after sequence number `after` (so a client
    /// following the log by its last sequence number misses nothing).
    pub fn events<T: DeserializeOwned>(&self, after: u64, limit: usize) -> Result<Vec<(u64, T)>> {
        let db = match &self.store {
            Store::Redb(db) => db,
            Store::Etcd(e) => {
                return e
                    .events(after, limit)?
                    .into_iter()
                    .map(|(id, v)| Ok((id, parse("events", &id.to_string(), &v)?)))
                    .collect();
            }
        };
        let rx = db.begin_read().map_err(dbe)?;
        let t = rx.open_table(EVENTS).map_err(dbe)?;
        let mut out = Vec::new();
        if after > 0 {
            for r in t.range(after.saturating_add(1)..).map_err(dbe)? {
                let (k, v) = r.map_err(dbe)?;
                out.push((k.value(), parse("events", &k.value().to_string(), v.value())?));
                if out.len() >= limit {
                    break;
                }
            }
            return Ok(out);
        }
        for r in t.range(after.saturating_add(1)..).map_err(dbe)?.rev() {
            let (k, v) = r.map_err(dbe)?;
            out.push((k.value(), parse("events", &k.value().to_string(), v.value())?));
            if out.len() >= limit {
                break;
            }
        }
        out.reverse();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_reopen_and_failed_transactions_leave_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.redb");
        let (m, v) = Meta::open(&path).unwrap();
        assert_eq!(v, 0);
        m.put(USERS, "a", &"x".to_string()).unwrap();
        let r: Result<()> = m.write(|w| {
            w.put(USERS, "b", &"y".to_string())?;
            Err(Error::TooNew { found: 9 })
        });
        assert!(r.is_err());
        m.write(|w| w.event(&"e1")).unwrap();
        m.write(|w| w.event(&"e2")).unwrap();
        drop(m);
        let (m, v) = Meta::open(&path).unwrap();
        assert_eq!(v, SCHEMA_VERSION);
        let users: Vec<(String, String)> = m.list(USERS).unwrap();
        assert_eq!(users, vec![("a".to_string(), "x".to_string())]);
        let ev: Vec<(u64, String)> = m.events(0, 10).unwrap();
        assert_eq!(ev, vec![(1, "e1".to_string()), (2, "e2".to_string())]);
        let ev: Vec<(u64, String)> = m.events(0, 1).unwrap();
        assert_eq!(ev, vec![(2, "e2".to_string())]);
        // With a cursor: the next ones, not the newest.
        m.write(|w| w.event(&"e3")).unwrap();
        let ev: Vec<(u64, String)> = m.events(1, 1).unwrap();
        assert_eq!(ev, vec![(2, "e2".to_string())]);
        let ev: Vec<(u64, String)> = m.events(1, 10).unwrap();
        assert_eq!(ev, vec![(2, "e2".to_string()), (3, "e3".to_string())]);
    }

    #[test]
    fn the_event_log_keeps_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let (m, _) = Meta::open(&dir.path().join("m.redb")).unwrap();
        let extra = 25;
        m.write(|w| {
            for i in 0..EVENTS_KEPT + extra {
                w.event(&i)?;
            }
            Ok::<_, Error>(())
        })
        .unwrap();
        // The oldest `extra` are gone; a cursor before them resumes at the
        // oldest kept; the newest is last.
        let first: Vec<(u64, u64)> = m.events(1, 1).unwrap();
        assert_eq!(first, vec![(extra + 1, extra)]);
        let newest: Vec<(u64, u64)> = m.events(0, 1).unwrap();
        assert_eq!(newest, vec![(EVENTS_KEPT + extra, EVENTS_KEPT + extra - 1)]);
        let Store::Redb(db) = &m.store else { unreachable!() };
        let rx = db.begin_read().unwrap();
        assert_eq!(rx.open_table(EVENTS).unwrap().len().unwrap(), EVENTS_KEPT);
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.redb");
        let (m, _) = Meta::open(&path).unwrap();
        m.write(|w| {
            let WriteInner::Redb(tx) = &w.inner else { unreachable!() };
            tx.open_table(META).map_err(dbe)?.insert("schema_version", "99").map_err(dbe)?;
            Ok::<_, Error>(())
        })
        .unwrap();
        drop(m);
        assert!(matches!(Meta::open(&path), Err(Error::TooNew { found: 99 })));
    }
}
