//! The QEMU guest agent (`qemu-ga` in the guest, on a virtio-serial port
//! whose host end is [`crate::VmConfig::agent_socket`]).
//!
//! A guest without an agent never answers, so every call is bounded, and
//! [`present`] asks QEMU first whether the guest has the port open at all
//! (QMP `query-chardev`'s `frontend-open`), which costs no wait.

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::Qmp;
use crate::config::AGENT_CHARDEV;

/// Whether the guest has opened the agent's port (an agent is running).
pub async fn present(qmp: &Qmp) -> bool {
    let Ok(devs) = qmp.execute_within("query-chardev", Value::Null, Duration::from_secs(2)).await else {
        return false;
    };
    devs.as_array().into_iter().flatten().any(|d| d["label"] == AGENT_CHARDEV && d["frontend-open"] == true)
}

/// Run one agent command and return its `return` value. Synchronises first
/// (`guest-sync-delimited`, which also discards a previous caller's stale
/// replies); the whole exchange is bounded by `limit`.
pub async fn execute(socket: &Path, command: &str, args: Value, limit: Duration) -> Result<Value, String> {
    tokio::time::timeout(limit, execute_inner(socket, command, args))
        .await
        .map_err(|_| format!("the guest agent did not answer {command} in {} ms", limit.as_millis()))?
}

async fn execute_inner(socket: &Path, command: &str, args: Value) -> Result<Value, String> {
    let s = UnixStream::connect(socket).await.map_err(|e| format!("guest agent socket {}: {e}", socket.display()))?;
    let (r, mut w) = s.into_split();
    let mut r = BufReader::new(r);
    let sync_id: u64 = rand_id();
    // 0xFF resets the agent's parser; the reply to a delimited sync is
    // preceded by 0xFF too.
    let sync = json!({"execute": "guest-sync-delimited", "arguments": {"id": sync_id}});
    let mut msg = vec![0xffu8];
    msg.extend_from_slice(format!("{sync}\n").as_bytes());
    w.write_all(&msg).await.map_err(|e| e.to_string())?;
    loop {
        let line = read_line(&mut r).await?;
        let start = line.iter().position(|b| *b != 0xff).unwrap_or(line.len());
        if let Ok(v) = serde_json::from_slice::<Value>(&line[start..])
            && v["return"].as_u64() == Some(sync_id)
        {
            break;
        }
    }
    let mut cmd = json!({"execute": command});
    if !args.is_null() {
        cmd["arguments"] = args;
    }
    w.write_all(format!("{cmd}\n").as_bytes()).await.map_err(|e| e.to_string())?;
    let line = read_line(&mut r).await?;
    let v: Value =
        serde_json::from_slice(&line).map_err(|e| format!("guest agent: {e}: {}", String::from_utf8_lossy(&line)))?;
    if let Some(r) = v.get("return") {
        return Ok(r.clone());
    }
    Err(format!("guest agent refused {command}: {}", v["error"]["desc"].as_str().unwrap_or("?")))
}

/// One line (bytes: the sync delimiter 0xFF is not UTF-8).
async fn read_line(r: &mut BufReader<tokio::net::unix::OwnedReadHalf>) -> Result<Vec<u8>, String> {
    let mut line = Vec::new();
    let n = r.read_until(b'\n', &mut line).await.map_err(|e| e.to_string())?;
    if n == 0 {
        return Err("the guest agent hung up".into());
    }
    Ok(line)
}

fn rand_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    h.finish() >> 12
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    #[tokio::test]
    async fn sync_then_command() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qga.sock");
        let l = UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            let (r, mut w) = s.into_split();
            let mut r = BufReader::new(r);
            let mut buf = Vec::new();
            // A stale reply from an earlier caller first: must be skipped.
            w.write_all(b"{\"return\": 7}\n").await.unwrap();
            r.read_until(b'\n', &mut buf).await.unwrap();
            assert_eq!(buf[0], 0xff);
            let v: Value = serde_json::from_slice(&buf[1..]).unwrap();
            let id = v["arguments"]["id"].clone();
            let mut reply = vec![0xffu8];
            reply.extend_from_slice(format!("{}\n", json!({"return": id})).as_bytes());
            w.write_all(&reply).await.unwrap();
            buf.clear();
            r.read_until(b'\n', &mut buf).await.unwrap();
            let v: Value = serde_json::from_slice(&buf).unwrap();
            assert_eq!(v["execute"], "guest-fsfreeze-freeze");
            w.write_all(b"{\"return\": 2}\n").await.unwrap();
        });
        let r = execute(&path, "guest-fsfreeze-freeze", Value::Null, Duration::from_secs(5)).await.unwrap();
        assert_eq!(r, json!(2));
        server.await.unwrap();
    }

    #[tokio::test]
    async fn a_silent_agent_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qga.sock");
        let _l = UnixListener::bind(&path).unwrap();
        let e = execute(&path, "guest-ping", Value::Null, Duration::from_millis(100)).await.unwrap_err();
        assert!(e.contains("did not answer"), "{e}");
    }
}
