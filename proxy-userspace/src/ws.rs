//! MQTT over WebSocket: the HTTP upgrade on `ws` listeners, frames unwrapped into the MQTT byte
//! stream, and the WebSocket leg to brokers of an `upstream_protocol = "ws"` upstream.
//!
//! The connection code stays the same for every listener kind: [`accept`] turns an accepted TCP
//! socket into an [`WsBytes`] byte stream (or refuses it with an HTTP error), after which the
//! CONNECT is read and balanced exactly as on TCP.

mod forwarded;
mod handshake;
mod stats;
mod stream;
mod upstream;

pub use handshake::{SUBPROTOCOLS, Upgrade};
pub use stats::{FrameViolation, UpgradeFailure, WsStats};
pub use stream::WsBytes;
pub use upstream::connect_broker;

use crate::config::WsListenerConfig;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};

/// How long a refused client is given to read its HTTP error, and how much of its further
/// input is read and dropped meanwhile.
const REFUSAL_LINGER: std::time::Duration = std::time::Duration::from_secs(2);
const REFUSAL_DRAIN: usize = 64 * 1024;

/// A ws listener's settings and counters, shared by its connections.
#[derive(Debug)]
pub struct WsListener {
    /// The listener's ws keys.
    pub config: WsListenerConfig,
    /// Its counters, shared with every upgraded stream (frames, bytes, violations).
    pub stats: Arc<WsStats>,
}

/// A client that completed the upgrade, over transport `S` (TCP for ws, TLS for wss).
pub struct Accepted<S> {
    /// The MQTT byte stream.
    pub stream: WsBytes<S>,
    /// The client's address: the peer's, or a trusted proxy's `X-Forwarded-For` / `X-Real-IP`
    /// (port 0: headers carry no port).
    pub client: SocketAddr,
    /// The accepted request, for a WebSocket broker leg.
    pub upgrade: Upgrade,
}

/// tungstenite's limits for one side: frames and reassembled messages up to `max_frame_size`,
/// buffers sized like the copy path's.
pub fn ws_config(max_frame_size: usize, buffer_size: usize) -> WebSocketConfig {
    WebSocketConfig::default()
        .max_frame_size(Some(max_frame_size))
        .max_message_size(Some(max_frame_size))
        .read_buffer_size(buffer_size)
        .write_buffer_size(buffer_size)
}

/// Performs the server side of the upgrade within `handshake_timeout`; every failure is counted
/// and, where the client is still there, answered with an HTTP error before the close.
pub async fn accept<S>(
    mut tcp: S,
    peer: SocketAddr,
    listener: &WsListener,
    buffer_size: usize,
) -> Result<Accepted<S>, UpgradeFailure>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let started = Instant::now();
    let deadline = started + listener.config.handshake_timeout;
    let mut head = Vec::with_capacity(1024);
    let checked = tokio::time::timeout_at(
        deadline,
        read_request(&mut tcp, &mut head, &listener.config),
    )
    .await
    .unwrap_or(Err(UpgradeFailure::Timeout));
    let upgrade = match checked {
        Ok(upgrade) => upgrade,
        Err(reason) => {
            listener.stats.failed(reason);
            if let Some(response) = handshake::refusal(reason) {
                // Bounded: a client that does not read its error is not waited for. What it
                // still sends is read and dropped until its FIN (at most REFUSAL_DRAIN bytes),
                // so that unread input does not turn the close into a reset that eats the answer.
                let _ = tokio::time::timeout_at(Instant::now() + REFUSAL_LINGER, async {
                    tcp.write_all(response.as_bytes()).await?;
                    tcp.shutdown().await?;
                    let mut sink = [0u8; 1024];
                    let mut drained = 0;
                    while drained < REFUSAL_DRAIN {
                        match tcp.read(&mut sink).await? {
                            0 => break,
                            n => drained += n,
                        }
                    }
                    Ok::<_, std::io::Error>(())
                })
                .await;
            }
            return Err(reason);
        }
    };
    let response = handshake::switching_protocols(&upgrade);
    match tokio::time::timeout_at(deadline, tcp.write_all(response.as_bytes())).await {
        Ok(Ok(())) => {}
        Ok(Err(_)) => {
            listener.stats.failed(UpgradeFailure::Closed);
            return Err(UpgradeFailure::Closed);
        }
        Err(_) => {
            listener.stats.failed(UpgradeFailure::Timeout);
            return Err(UpgradeFailure::Timeout);
        }
    }
    let client_ip = forwarded::client_ip(
        peer.ip().to_canonical(),
        &listener.config.trust_forwarded_for,
        upgrade.forwarded_for.as_deref(),
        upgrade.real_ip.as_deref(),
    );
    let client = if client_ip == peer.ip().to_canonical() {
        peer
    } else {
        SocketAddr::new(client_ip, 0)
    };
    // Bytes the client sent right behind the request head already belong to the WebSocket.
    let early = head.split_off(upgrade.head_len);
    let config = ws_config(listener.config.max_frame_size, buffer_size);
    let ws = WebSocketStream::from_partially_read(tcp, early, Role::Server, Some(config)).await;
    listener.stats.upgraded(started.elapsed());
    Ok(Accepted {
        stream: WsBytes::new(ws, Some(listener.stats.clone())),
        client,
        upgrade,
    })
}

/// Reads until the request head is complete (or refused); never more than [`handshake::MAX_HEAD`]
/// bytes plus one read.
async fn read_request(
    tcp: &mut (impl AsyncRead + Unpin),
    head: &mut Vec<u8>,
    config: &WsListenerConfig,
) -> Result<Upgrade, UpgradeFailure> {
    let mut chunk = [0u8; 1024];
    // Bounded: each turn adds at least one byte, and the head is refused beyond MAX_HEAD.
    loop {
        let n = match tcp.read(&mut chunk).await {
            Ok(0) | Err(_) => return Err(UpgradeFailure::Closed),
            Ok(n) => n,
        };
        head.extend_from_slice(&chunk[..n]);
        if let Some(upgrade) = handshake::check_request(head, config)? {
            return Ok(upgrade);
        }
    }
}
