//! One client connection from accept to close, top to bottom in [`serve`].

mod identity;
mod read_connect;
mod refuse;

use crate::access_log::Entry;
use crate::balance::SelectKey;
use crate::config::UpstreamProtocol;
use crate::dataplane::{ClientStream, CloseReason, ConnectHandling, Flow, FlowEnd, copy_layered};
use crate::listener::ListenerContext;
use crate::mqtt;
use crate::proxy_protocol;
use crate::reject::RejectReason;
use crate::stats::Direction;
use crate::ws;
use read_connect::{ReadConnectError, peek_connect, read_connect};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Serves one accepted client: read CONNECT → choose broker → connect → hand to the data plane.
///
/// `_active` is taken by the accept loop, so `max_connections` counts this connection at once.
pub async fn serve(
    ctx: Arc<ListenerContext>,
    _active: ActiveConnection,
    tcp: TcpStream,
    peer: SocketAddr,
) {
    let started = Instant::now();
    let _ = tcp.set_nodelay(ctx.config.tcp_nodelay);
    let local = tcp.local_addr().unwrap_or(peer);
    // The address the socket saw; `peer` becomes the client's (X-Forwarded-For) below.
    let socket_peer = peer;

    let refused_in_handshake = |reason: RejectReason| {
        ctx.count(|c| c.reject(reason));
        ctx.access_log.write(&Entry {
            client: peer,
            client_id: None,
            listener: &ctx.config.name,
            broker: None,
            path: ctx.dataplane.path().as_str(),
            bytes_to_broker: 0,
            bytes_to_client: 0,
            duration: started.elapsed(),
            close: reason.as_str(),
        });
    };

    // 0. The layers the listener's kind puts between TCP and MQTT (none on `tcp`): a TLS
    //    handshake (tls), within connect_packet_timeout, counted by outcome; then the WebSocket
    //    upgrade (ws), within its handshake_timeout.
    let mut identity = None;
    // The handshakes run boxed: inline, their futures (buffers included) would make every
    // connection's task bigger for its whole life, spliced TCP flows too.
    let transport = match &ctx.tls {
        None => ClientStream::Tcp(tcp),
        Some(tls) => match Box::pin(tls.accept(tcp, ctx.config.connect_packet_timeout)).await {
            Ok(stream) => {
                // Copied only when a rewrite will read it.
                if ctx.config.rewrite_client_id.is_some() || ctx.config.rewrite_username.is_some() {
                    identity = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .map(|c| c.to_vec());
                }
                ClientStream::Layered(Box::new(stream))
            }
            Err(failure) => {
                tracing::debug!(client = %peer, "TLS handshake failed: {}", failure.as_str());
                return refused_in_handshake(RejectReason::TlsHandshake);
            }
        },
    };
    let (mut client, peer, upgrade) = match &ctx.ws {
        None => (transport, peer, None),
        Some(ws) => match Box::pin(ws::accept(transport, peer, ws, ctx.config.buffer_size)).await {
            Ok(accepted) => (
                ClientStream::Layered(Box::new(accepted.stream)),
                accepted.client,
                Some(accepted.upgrade),
            ),
            Err(reason) => {
                tracing::debug!(client = %peer, "WebSocket upgrade refused: {}", reason.as_str());
                return refused_in_handshake(RejectReason::WsHandshake);
            }
        },
    };
    let log =
        |client_id: Option<&str>, broker: Option<SocketAddr>, end: Option<FlowEnd>, close: &str| {
            ctx.access_log.write(&Entry {
                client: peer,
                client_id,
                listener: &ctx.config.name,
                broker,
                path: end.map_or(ctx.dataplane.path(), |e| e.path).as_str(),
                bytes_to_broker: end.map_or(0, |e| e.bytes_to_broker),
                bytes_to_client: end.map_or(0, |e| e.bytes_to_client),
                duration: started.elapsed(),
                close,
            })
        };

    // 1. Read one complete CONNECT, within connect_packet_timeout: consumed for the userspace
    //    path (`packet` holds its bytes), or only peeked for the splice (`packet` is None).
    let deadline = started + ctx.config.connect_packet_timeout;
    let max_size = ctx.config.max_connect_size;
    let read = tokio::time::timeout_at(deadline, async {
        match (ctx.dataplane.connect_handling(), client.as_tcp_mut()) {
            (ConnectHandling::Peek, Some(tcp)) => {
                peek_connect(tcp, max_size).await.map(|(_, c)| (None, c))
            }
            _ => read_connect(&mut client, max_size)
                .await
                .map(|(p, c)| (Some(p), c)),
        }
    })
    .await;
    let (packet, connect) = match read {
        Ok(Ok(read)) => read,
        Ok(Err(ReadConnectError::Closed)) => {
            ctx.count(|c| c.reject(RejectReason::Closed));
            return log(None, None, None, RejectReason::Closed.as_str());
        }
        Ok(Err(ReadConnectError::Invalid(error))) => {
            let reason = error.reject_reason();
            tracing::debug!(client = %peer, "refused: {error}");
            refuse::refuse(&ctx, client, reason, error.connack()).await;
            return log(None, None, None, reason.as_str());
        }
        Err(_elapsed) => {
            refuse::refuse(
                &ctx,
                client,
                RejectReason::ConnectTimeout,
                None::<mqtt::Connack>,
            )
            .await;
            return log(None, None, None, RejectReason::ConnectTimeout.as_str());
        }
    };
    // 1b. The certificate's identity in place of the client's, when the listener says so.
    let version = connect.version;
    let (packet, connect) = match identity::apply(&ctx.config, identity.as_deref(), packet, connect)
    {
        Ok(rewritten) => rewritten,
        Err(error) => {
            tracing::info!(client = %peer, "refused: {error}");
            let connack = mqtt::not_authorized(version);
            refuse::refuse(&ctx, client, RejectReason::CertIdentity, Some(connack)).await;
            return log(None, None, None, RejectReason::CertIdentity.as_str());
        }
    };
    let client_id = Some(connect.client_id.as_str());

    // 2. Choose a broker and connect, trying the next choice on failure.
    let key = SelectKey {
        source_ip: peer.ip(),
        client_id: &connect.client_id,
    };
    let mut broker = match ctx.upstream.connect(&key, ctx.config.tcp_nodelay).await {
        Ok(connected) => connected,
        Err(error) => {
            tracing::warn!(client = %peer, upstream = %ctx.upstream.config.name, "no broker: {error}");
            let connack = mqtt::server_unavailable(connect.version);
            refuse::refuse(&ctx, client, RejectReason::NoUpstream, Some(connack)).await;
            return log(client_id, None, None, RejectReason::NoUpstream.as_str());
        }
    };
    let server = broker.server.server().clone();
    let broker_addr = broker.stream.peer_addr().ok();
    // From here on the connection counts as handled by this broker, whatever happens next.
    ctx.count(|c| {
        c.handled.fetch_add(1, Relaxed);
    });
    server.total.fetch_add(1, Relaxed);

    // 3'. A WebSocket broker leg: upgrade, write the CONNECT into it, copy both ways.
    if ctx.upstream.config.upstream_protocol == UpstreamProtocol::Ws
        && let Some(upgrade) = &upgrade
    {
        let meters = [Arc::clone(&ctx.bytes), Arc::clone(&server.bytes)];
        let client = WsClient {
            stream: client,
            upgrade,
            socket_peer,
            addr: peer,
            connect: packet,
        };
        let end = Box::pin(serve_ws_broker(&ctx, &meters, client, broker.stream)).await;
        let close = end.map_or(CloseReason::BrokerError.as_str(), |e| e.reason.as_str());
        return log(client_id, broker_addr, end, close);
    }

    // 3. The PROXY header (if on), then TLS to the broker (if `upstream_tls`), then the CONNECT
    //    when it was consumed. Without TLS both go in one write.
    let mut preamble = proxy_protocol::header(ctx.upstream.config.proxy_protocol, peer, local);
    let broker_preamble_len = preamble.len() as u64;
    let consumed = packet.as_ref().map_or(0, |p| p.len() as u64);
    let broker_error = |what: &str, error: std::io::Error| {
        tracing::warn!(client = %peer, broker = ?broker_addr, "{what} failed: {error}");
        log(
            client_id,
            broker_addr,
            None,
            CloseReason::BrokerError.as_str(),
        )
    };
    let broker_stream = match &ctx.upstream.tls {
        None => {
            if let Some(packet) = &packet {
                preamble.extend_from_slice(packet);
            }
            if !preamble.is_empty()
                && let Err(error) = broker.stream.write_all(&preamble).await
            {
                return broker_error("writing the CONNECT", error);
            }
            ClientStream::Tcp(broker.stream)
        }
        Some(tls) => {
            if !preamble.is_empty()
                && let Err(error) = broker.stream.write_all(&preamble).await
            {
                return broker_error("writing the PROXY header", error);
            }
            let handshake = tokio::time::timeout(
                ctx.upstream.config.connect_timeout,
                tls.connect(broker.stream, &server.config.addr),
            )
            .await
            .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()));
            let mut stream = match handshake {
                Ok(stream) => ClientStream::Layered(Box::new(stream)),
                Err(error) => return broker_error("the TLS handshake with the broker", error),
            };
            if let Some(packet) = &packet
                && let Err(error) = stream.write_all(packet).await
            {
                return broker_error("writing the CONNECT", error);
            }
            stream
        }
    };
    server.bytes.add(Direction::ToBroker, consumed);
    ctx.bytes.add(Direction::ToBroker, consumed);

    // 4. Hand the pair to the data plane until both sides are done.
    let flow = Flow {
        client,
        broker: broker_stream,
        idle_timeout: ctx.config.idle_timeout,
        buffer_size: ctx.config.buffer_size,
        meters: vec![Arc::clone(&ctx.bytes), Arc::clone(&server.bytes)],
        broker_preamble_len,
    };
    let mut end = ctx.dataplane.run(flow).await;
    end.bytes_to_broker += consumed;
    log(client_id, broker_addr, Some(end), end.reason.as_str());
}

/// A WebSocket client on its way to a WebSocket broker.
struct WsClient<'a> {
    stream: ClientStream,
    upgrade: &'a ws::Upgrade,
    /// The address the client's socket came from.
    socket_peer: SocketAddr,
    /// The client's address (X-Forwarded-For when trusted).
    addr: SocketAddr,
    /// The CONNECT's bytes, read from the client.
    connect: Option<Vec<u8>>,
}

/// Steps 3 and 4 for an `upstream_protocol = "ws"` upstream: the broker gets its own upgrade
/// (within the upstream's connect_timeout) and the CONNECT as the first frame; `None` when
/// that failed.
async fn serve_ws_broker(
    ctx: &ListenerContext,
    meters: &[Arc<crate::stats::ByteMeter>],
    client: WsClient<'_>,
    broker: TcpStream,
) -> Option<FlowEnd> {
    let broker_addr = broker.peer_addr().ok()?;
    let max_frame = ctx
        .config
        .ws
        .as_ref()
        .map_or(crate::config::DEFAULT_MAX_FRAME_SIZE, |w| w.max_frame_size);
    let config = ws::ws_config(max_frame, ctx.config.buffer_size);
    let upgraded = tokio::time::timeout(
        ctx.upstream.config.connect_timeout,
        ws::connect_broker(
            broker,
            broker_addr,
            client.upgrade,
            ctx.upstream.config.upstream_host.as_deref(),
            client.socket_peer.ip(),
            client.addr.ip(),
            config,
        ),
    )
    .await;
    let mut broker_ws = match upgraded {
        Ok(Ok(ws)) => ws,
        Ok(Err(error)) => {
            tracing::warn!(client = %client.addr, broker = %broker_addr, "WebSocket upgrade to the broker failed: {error}");
            return None;
        }
        Err(_) => {
            tracing::warn!(client = %client.addr, broker = %broker_addr, "WebSocket upgrade to the broker timed out");
            return None;
        }
    };
    let packet = client.connect.unwrap_or_default();
    if broker_ws.write_all(&packet).await.is_err() || broker_ws.flush().await.is_err() {
        return None;
    }
    let mut end = copy_layered(
        client.stream,
        Box::new(broker_ws),
        ctx.config.idle_timeout,
        ctx.config.buffer_size,
        meters,
    )
    .await;
    for meter in meters {
        meter.add(Direction::ToBroker, packet.len() as u64);
    }
    end.bytes_to_broker += packet.len() as u64;
    Some(end)
}

/// Counts a connection as active on its listener and globally for as long as it lives.
#[derive(Debug)]
pub struct ActiveConnection {
    ctx: Arc<ListenerContext>,
}

impl ActiveConnection {
    /// Starts counting one connection.
    pub fn track(ctx: &Arc<ListenerContext>) -> Self {
        ctx.count(|c| {
            c.active.fetch_add(1, Relaxed);
        });
        ActiveConnection {
            ctx: Arc::clone(ctx),
        }
    }
}

impl Drop for ActiveConnection {
    fn drop(&mut self) {
        self.ctx.count(|c| {
            c.active.fetch_sub(1, Relaxed);
        });
    }
}
