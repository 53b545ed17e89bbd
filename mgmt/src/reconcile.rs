//! Bringing metadata and the block store back in step after a crash.
//!
//! Both are durable on their own (a store catalog change is committed when
//! it returns; a metadata transaction when it commits), but an operation
//! touches both, and `kill -9` can fall between. So every catalog change is
//! bracketed: an intent record is committed first, then the store is
//! changed, then the volume record and the removal of the intent are
//! committed together. On start, [`reconcile`]:
//!
//! 1. finishes or undoes every intent left behind: a create whose volume is
//!    in the store is finished (the volume is adopted with the intended
//!    owner); one whose volume is not is dropped. A delete is finished: the
//!    volume is deleted from the store if still there, and its record
//!    dropped.
//! 2. drops the record of any volume the store does not have;
//! 3. adopts any store volume without a record (made outside the daemon,
//!    e.g. by an older Keel), owned by the first Manager.
//!
//! Every action is returned as a sentence, printed at start and logged as
//! an event.

use std::collections::HashSet;

use keel_blockstore::{AnyBackend, DeviceKind, Pool};

use crate::db::{self, INTENTS, Meta, USERS, VOLUMES};
use crate::model::{Intent, IscsiExport, Role, User, VolumeMeta, now};

/// Reconcile metadata with the store; returns what was done.
pub async fn reconcile(pool: &Pool<AnyBackend>, meta: &Meta) -> anyhow::Result<Vec<String>> {
    let mut said = Vec::new();
    let in_store = |pool: &Pool<AnyBackend>| -> HashSet<String> {
        // Names starting with `_` are the daemon's own (appliance base
        // volumes), never user volumes.
        pool.list()
            .into_iter()
            .filter(|d| d.kind == DeviceKind::Volume && !d.name.starts_with('_'))
            .map(|d| d.name)
            .collect()
    };
    let store = in_store(pool);
    for (key, intent) in meta.list::<Intent>(INTENTS)? {
        let name = intent.name().to_string();
        match &intent {
            Intent::Create { owner, origin, .. } => {
                let recorded = meta.get::<VolumeMeta>(VOLUMES, &name)?.is_some();
                if store.contains(&name) && !recorded {
                    let m = VolumeMeta {
                        name: name.clone(),
                        owner: owner.clone(),
                        created: now(),
                        origin: origin.clone(),
                        iscsi: IscsiExport::default(),
                        key_salt: crate::model::new_key_salt(),
                    };
                    meta.write(|w| {
                        w.put(VOLUMES, &name, &m)?;
                        w.remove(INTENTS, &key)?;
                        Ok::<_, db::Error>(())
                    })?;
                    said.push(format!(
                        "finished creating volume {name} (owner {owner}): the store had it, metadata did not"
                    ));
                } else {
                    meta.write(|w| w.remove(INTENTS, &key))?;
                    if !store.contains(&name) {
                        said.push(format!("rolled back creating volume {name}: it never reached the store"));
                    }
                }
            }
            Intent::Delete { .. } => {
                if store.contains(&name) {
                    match pool.delete_volume(&name, true).await {
                        Ok(()) => {}
                        Err(e) if e.kind() == keel_blockstore::ErrorKind::NotFound => {}
                        Err(e) => return Err(anyhow::anyhow!("finishing the deletion of volume {name}: {e}")),
                    }
                }
                meta.write(|w| {
                    w.remove(VOLUMES, &name)?;
                    w.remove(INTENTS, &key)?;
                    Ok::<_, db::Error>(())
                })?;
                said.push(format!("finished deleting volume {name}"));
            }
        }
    }
    let store = in_store(pool);
    let records: Vec<(String, VolumeMeta)> = meta.list(VOLUMES)?;
    for (name, _) in &records {
        if !store.contains(name) {
            meta.write(|w| w.remove(VOLUMES, name))?;
            said.push(format!("dropped the record of volume {name}: the store does not have it"));
        }
    }
    let recorded: HashSet<&String> = records.iter().map(|(n, _)| n).collect();
    let mut orphans: Vec<&String> = store.iter().filter(|n| !recorded.contains(n)).collect();
    orphans.sort();
    if !orphans.is_empty() {
        let users: Vec<(String, User)> = meta.list(USERS)?;
        let owner = users.iter().find(|(_, u)| u.role == Role::Manager).map(|(n, _)| n.clone());
        let owner = owner.ok_or_else(|| anyhow::anyhow!("no manager to adopt volumes without metadata"))?;
        for name in orphans {
            let m = VolumeMeta {
                name: name.clone(),
                owner: owner.clone(),
                created: now(),
                origin: None,
                iscsi: IscsiExport::default(),
                key_salt: crate::model::new_key_salt(),
            };
            meta.put(VOLUMES, name, &m)?;
            said.push(format!("adopted volume {name}, found in the store without metadata (owner {owner})"));
        }
    }
    Ok(said)
}
