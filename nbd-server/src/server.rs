//! Accepting connections, and what is exported.

use std::sync::Arc;

use keel_blockstore::{Backend, BlockDevice, DeviceKind, Pool, Volume};
use tokio::net::TcpListener;

use crate::connection::Socket;

/// The exports a server offers.
pub trait Exports: Send + Sync + 'static {
    /// The device type behind an export.
    type Device: BlockDevice + 'static;
    /// Open an export by name.
    fn open(&self, name: &str) -> Option<Arc<Self::Device>>;
    /// Names of every export (NBD_OPT_LIST).
    fn names(&self) -> Vec<String>;
    /// Why NBD_OPT_LIST is refused (answered with `NBD_REP_ERR_POLICY`
    /// and this message), if it is: exports whose names are secrets.
    fn list_refusal(&self) -> Option<String> {
        None
    }
    /// The message for a client that asked for an export [`Exports::open`]
    /// did not find.
    fn unknown_export(&self, name: &str) -> String {
        format!("no export named {name:?}")
    }
    /// An export name as logs may show it (without anything secret in it).
    fn log_name(&self, name: &str) -> String {
        name.to_string()
    }
    /// The snapshots whose changes export `name` can report as
    /// `qemu:dirty-bitmap:SNAPSHOT`.
    fn bitmaps(&self, name: &str) -> Vec<String>;
    /// Wait before opening export `name` (asked in the handshake, before
    /// [`Exports::open`]): for an export that is being switched to other
    /// storage, until the switch is over. The handshake's timeout bounds it.
    fn ready(&self, _name: &str) -> impl std::future::Future<Output = ()> + Send {
        async {}
    }
    /// A watch whose value changes when connections to `name` must end: a
    /// connection watching it stops taking requests, lets those in flight
    /// finish, and closes, and the client reconnects (QEMU's NBD client with
    /// `reconnect-delay` resends what was not answered). `None`: never.
    fn eviction(&self, _name: &str) -> Option<tokio::sync::watch::Receiver<u64>> {
        None
    }
}

/// Every volume of a pool under its name; every snapshot read-only as
/// `VOLUME@SNAPSHOT`.
pub struct PoolExports<B: Backend> {
    pool: Pool<B>,
}

impl<B: Backend> PoolExports<B> {
    /// Export the devices of `pool`.
    pub fn new(pool: Pool<B>) -> PoolExports<B> {
        PoolExports { pool }
    }
}

impl<B: Backend> Exports for PoolExports<B> {
    type Device = Volume<B>;

    fn open(&self, name: &str) -> Option<Arc<Volume<B>>> {
        self.pool.volume(name).ok().map(Arc::new)
    }

    fn names(&self) -> Vec<String> {
        self.pool.list().into_iter().map(|d| d.name).collect()
    }

    fn bitmaps(&self, name: &str) -> Vec<String> {
        let volume = name.split('@').next().unwrap_or(name);
        let prefix = format!("{volume}@");
        self.pool
            .list()
            .into_iter()
            .filter(|d| d.kind == DeviceKind::Snapshot)
            .filter_map(|d| d.name.strip_prefix(&prefix).map(str::to_string))
            .collect()
    }
}

/// Server settings.
#[derive(Clone)]
pub struct ServerConfig {
    /// TLS credentials for NBD_OPT_STARTTLS; `None` disables TLS.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// Refuse every option but STARTTLS (and ABORT) until TLS is on.
    pub require_tls: bool,
    /// Largest read or write payload (also advertised as the maximum block
    /// size).
    pub max_payload: u32,
    /// Requests served at once per connection.
    pub max_inflight: usize,
    /// Seconds a client may take to finish the handshake.
    pub handshake_timeout_secs: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            tls: None,
            require_tls: false,
            max_payload: 32 << 20,
            max_inflight: 128,
            handshake_timeout_secs: 30,
        }
    }
}

/// Serve `exports` on Unix socket `listener` until the task is dropped
/// (who may connect is the socket file's permissions' business).
pub async fn serve_unix<E: Exports>(
    listener: tokio::net::UnixListener,
    exports: Arc<E>,
    config: Arc<ServerConfig>,
) -> std::io::Result<()> {
    serve_on(listener, exports, config).await
}

/// Serve `exports` on `listener` until the task is dropped.
pub async fn serve<E: Exports>(
    listener: TcpListener,
    exports: Arc<E>,
    config: Arc<ServerConfig>,
) -> std::io::Result<()> {
    serve_on(listener, exports, config).await
}

/// A listener connections are accepted on.
trait Listen: Send + Sync {
    type Stream: Socket;
    /// The next connection, and who it comes from (for the logs).
    fn next(&self) -> impl std::future::Future<Output = std::io::Result<(Self::Stream, String)>> + Send;
}

impl Listen for TcpListener {
    type Stream = tokio::net::TcpStream;
    async fn next(&self) -> std::io::Result<(Self::Stream, String)> {
        let (sock, peer) = self.accept().await?;
        let _ = sock.set_nodelay(true);
        Ok((sock, peer.to_string()))
    }
}

impl Listen for tokio::net::UnixListener {
    type Stream = tokio::net::UnixStream;
    async fn next(&self) -> std::io::Result<(Self::Stream, String)> {
        Ok((self.accept().await?.0, "unix socket".to_string()))
    }
}

async fn serve_on<E: Exports, L: Listen>(
    listener: L,
    exports: Arc<E>,
    config: Arc<ServerConfig>,
) -> std::io::Result<()> {
    loop {
        let (sock, peer) = match listener.next().await {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let exports = exports.clone();
        let config = config.clone();
        tokio::spawn(async move {
            match crate::connection::run(sock, exports, config).await {
                Ok(()) => tracing::debug!(%peer, "NBD connection closed"),
                Err(e) => tracing::info!(%peer, "NBD connection ended: {e}"),
            }
        });
    }
}
