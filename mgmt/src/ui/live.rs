//! Live updates: one server-sent event stream per page, `/ui/live`.
//!
//! - `event: log`, with `id:` the event log's sequence number: each new
//!   event the user may see. A reconnecting `EventSource` sends the last
//!   id as `Last-Event-ID` and gets everything after it, so nothing is
//!   missed across a dropped connection (as long as the log still holds
//!   it: it keeps the newest 100 000). A first connection starts after
//!   `?after=N` (the newest event the page showed), else at the newest.
//! - `event: job`, without an id: a job's view (state, bytes done, total,
//!   percentage) whenever it changed, and each running job once at the
//!   start, so a page's progress bars need no reload. Time left is worked
//!   out by the page from the rate it sees.
//! - `event: vm`, without an id: `{"name", "state"}` of each VM the user
//!   may see whenever its state changed (and each once at the start), so
//!   VM pages follow a VM that starts, stops or crashes.
//!
//! The stream reads the same [`App`] calls as the API (`list_events`,
//! `list_jobs`, `list_vms`) with the session's user twice a second, and ends when the
//! session does (logout, expiry).

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::Stream;
use serde::Deserialize;

use super::{Session, UiError};
use crate::app::{App, JobState};

#[derive(Deserialize, Default)]
pub struct LiveQ {
    after: Option<u64>,
}

/// How often the stream looks for news.
const TICK: Duration = Duration::from_millis(400);

pub async fn stream(
    State(app): State<Arc<App>>,
    s: Session,
    headers: HeaderMap,
    Query(q): Query<LiveQ>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, UiError> {
    let resume = headers.get("last-event-id").and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<u64>().ok());
    let cursor = match resume.or(q.after) {
        Some(c) => c,
        None => app.last_event_id()?,
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Event>(64);
    tokio::spawn(feed(app, s.token.clone(), cursor, tx));
    let out = futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|e| (Ok(e), rx)) });
    Ok(Sse::new(out).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

async fn feed(app: Arc<App>, token: String, mut cursor: u64, tx: tokio::sync::mpsc::Sender<Event>) {
    let mut sent: HashMap<u64, (JobState, u64, u64)> = HashMap::new();
    let mut vm_states: HashMap<String, &'static str> = HashMap::new();
    let mut first = true;
    loop {
        // The session may have ended (logout, expiry): then so does the stream.
        let Ok(user) = app.authenticate(&token) else { return };
        // From the cursor on; the cursor then moves past every event
        // looked at, visible or not, so none is looked at twice. (Cursor 0:
        // from the start of the log, which keeps the newest.)
        if let Ok((events, scanned)) = app.follow_events(&user, cursor, 200) {
            for e in events {
                let id = e["id"].as_u64().unwrap_or(cursor);
                cursor = cursor.max(id);
                let ev = Event::default().event("log").id(id.to_string()).data(e.to_string());
                if tx.send(ev).await.is_err() {
                    return;
                }
            }
            cursor = cursor.max(scanned);
        }
        if let Ok(jobs) = app.list_jobs(&user) {
            for j in jobs {
                let key = (j.state, j.done_bytes, j.total_bytes);
                let changed = match sent.get(&j.id) {
                    Some(k) => *k != key,
                    // New to this stream: running ones, or any that started
                    // after the stream did.
                    None => j.state == JobState::Running || !first,
                };
                if changed {
                    sent.insert(j.id, key);
                    let data = serde_json::to_string(&j).unwrap_or_default();
                    if tx.send(Event::default().event("job").data(data)).await.is_err() {
                        return;
                    }
                } else {
                    sent.entry(j.id).or_insert(key);
                }
            }
        }
        if let Ok(vms) = app.list_vms(&user) {
            for v in vms {
                let st = v.state.as_str();
                if vm_states.get(&v.name) != Some(&st) {
                    vm_states.insert(v.name.clone(), st);
                    let data = serde_json::json!({ "name": v.name, "state": st }).to_string();
                    if tx.send(Event::default().event("vm").data(data)).await.is_err() {
                        return;
                    }
                }
            }
        }
        first = false;
        tokio::select! {
            _ = tokio::time::sleep(TICK) => {}
            _ = tx.closed() => return,
        }
    }
}
