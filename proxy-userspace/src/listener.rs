//! Listeners: accept, enforce `max_connections`, and start one task per connection.

use crate::access_log::AccessLog;
use crate::config::ListenerConfig;
use crate::dataplane::DataPlane;
use crate::reject::RejectReason;
use crate::stats::{ByteMeter, ConnectionCounters};
use crate::upstream::Upstream;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;
use tokio::net::TcpListener;

/// Everything a connection accepted on one listener needs, shared by all of them.
#[derive(Debug)]
pub struct ListenerContext {
    pub config: ListenerConfig,
    pub upstream: Arc<Upstream>,
    pub dataplane: Arc<dyn DataPlane>,
    /// Why this listener's flows take `dataplane`.
    pub path_reason: crate::dataplane::PathReason,
    /// This listener's counters.
    pub counters: ConnectionCounters,
    /// Bytes through this listener.
    pub bytes: Arc<ByteMeter>,
    /// The process-wide counters, updated alongside the listener's.
    pub global: Arc<ConnectionCounters>,
    pub access_log: Arc<AccessLog>,
    /// The TLS server side of a `tls` listener.
    pub tls: Option<Arc<crate::tls::ServerTls>>,
    /// The WebSocket settings and counters of a `ws` listener.
    pub ws: Option<crate::ws::WsListener>,
}

impl std::fmt::Debug for dyn DataPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.path().as_str())
    }
}

impl ListenerContext {
    /// Applies `update` to the listener's and the process's counters alike.
    pub fn count(&self, update: impl Fn(&ConnectionCounters)) {
        update(&self.counters);
        update(&self.global);
    }
}

/// Accepts connections forever; each one is served by [`crate::connection::serve`] in its own task.
pub async fn accept_loop(listener: TcpListener, ctx: Arc<ListenerContext>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // EMFILE/ENFILE and friends: back off instead of spinning; the socket stays queued.
                tracing::warn!(listener = %ctx.config.name, "accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        ctx.count(|c| {
            c.accepted.fetch_add(1, Relaxed);
        });
        if ctx.counters.active.load(Relaxed) >= ctx.config.max_connections as u64 {
            ctx.count(|c| c.reject(RejectReason::OverLimit));
            drop(stream);
            continue;
        }
        let active = crate::connection::ActiveConnection::track(&ctx);
        tokio::spawn(crate::connection::serve(ctx.clone(), active, stream, peer));
    }
}
