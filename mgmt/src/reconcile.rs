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
//!    A move is finished or undone by the volume's record: the copy in the
//!    pool the record does not name is deleted.
//! 2. drops the record of any volume the store does not have, unless its
//!    pool is offline (then the volume is unavailable, not gone);
//! 3. adopts any store volume without a record (made outside the daemon,
//!    e.g. by an older Keel), owned by the first Manager.
//!
//! Every action is returned as a sentence, printed at start and logged as
//! an event.

use std::collections::HashSet;

use keel_blockstore::DeviceKind;

use crate::db::{self, INTENTS, Meta, USERS, VOLUMES};
use crate::model::{Intent, IscsiExport, Role, User, VolumeMeta, now};
use crate::pools::Pools;

/// Reconcile metadata with the store; returns what was done.
pub async fn reconcile(pool: &Pools, meta: &Meta) -> anyhow::Result<Vec<String>> {
    let mut said = Vec::new();
    let in_store = |pool: &Pools| -> HashSet<String> {
        // Names starting with `_` are the daemon's own (appliance base
        // volumes), never user volumes.
        pool.list()
            .into_iter()
            .filter(|d| d.kind == DeviceKind::Volume && !d.name.starts_with('_'))
            .map(|d| d.name)
            .collect()
    };
    // Moves first: until they are settled a name is in two pools.
    for (key, intent) in meta.list::<Intent>(INTENTS)? {
        let Intent::Move { name, from, to } = &intent else { continue };
        let home = meta.get::<VolumeMeta>(VOLUMES, name)?.map(|m| m.pool().to_string()).unwrap_or(from.clone());
        let other = if &home == to { from } else { to };
        pool.set_home(name, Some(&home));
        match pool.open_pool(other) {
            Ok(p) => {
                match p.delete_volume(name, true).await {
                    Ok(()) => {}
                    Err(e) if e.kind() == keel_blockstore::ErrorKind::NotFound => {}
                    Err(e) => return Err(anyhow::anyhow!("dropping the copy of {name} in pool {other}: {e}")),
                }
                pool.set_home(name, None);
                // The move's temporary snapshots of the source.
                let temp = format!("{name}@{}", crate::pool_ops::TEMP_SNAP);
                for d in pool.list().into_iter().filter(|d| d.name.starts_with(&temp)) {
                    let snap = &d.name[name.len() + 1..];
                    if let Err(e) = pool.delete_snapshot(name, snap).await {
                        return Err(anyhow::anyhow!("dropping {}: {e}", d.name));
                    }
                }
                meta.write(|w| w.remove(INTENTS, &key))?;
                let how = if &home == to { "finished" } else { "rolled back" };
                said.push(format!("{how} moving volume {name} from pool {from} to {to}: dropped the copy in {other}"));
            }
            Err(e) => said.push(format!(
                "moving volume {name} from pool {from} to {to} is unsettled: the copy in {other} stays until that                  pool is back ({e}); the volume is the copy in {home}"
            )),
        }
    }
    // A name in two pools with no move to explain it (a pool taken from
    // elsewhere with a clashing name): the copy the record names is the
    // volume; the other stays untouched, hidden, and is reported.
    let mut seen: std::collections::HashMap<String, Vec<String>> = Default::default();
    for slot in pool.slots() {
        for d in slot.pool.as_ref().map(|p| p.list()).unwrap_or_default() {
            if d.kind == DeviceKind::Volume {
                seen.entry(d.name).or_default().push(slot.name().to_string());
            }
        }
    }
    for (name, pools) in seen.into_iter().filter(|(_, p)| p.len() > 1) {
        if matches!(meta.get::<Intent>(INTENTS, &name)?, Some(Intent::Move { .. })) {
            continue; // said above
        }
        let home = meta.get::<VolumeMeta>(VOLUMES, &name)?.map(|m| m.pool().to_string());
        let home = home.filter(|h| pools.contains(h)).unwrap_or_else(|| pools[0].clone());
        pool.set_home(&name, Some(&home));
        said.push(format!(
            "volume {name} is in pools {}: the copy in {home} is used, the others are left as they are",
            pools.join(" and ")
        ));
    }
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
                        pool: pool.pool_of(&name),
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
            Intent::Move { .. } => {}
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
    for (name, m) in &records {
        // A volume of a pool that is offline (or gone from the
        // configuration) is unavailable, not gone.
        let open = pool.slot(m.pool()).is_some_and(|s| s.pool.is_some());
        if !store.contains(name) && open {
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
                pool: pool.pool_of(name),
            };
            meta.put(VOLUMES, name, &m)?;
            said.push(format!("adopted volume {name}, found in the store without metadata (owner {owner})"));
        }
    }
    Ok(said)
}
