//! One client connection from accept to close, top to bottom in [`serve`].

mod identity;
mod read_connect;
mod refuse;

use crate::access_log::Entry;
use crate::balance::SelectKey;
use crate::config::UpstreamProtocol;
use crate::dataplane::{ClientStream, CloseReason, ConnectHandling, Flow, FlowEnd, PathReason};
use crate::listener::ListenerContext;
use crate::mqtt;
use crate::proxy_protocol;
use crate::reject::RejectReason;
use crate::stats::Direction;
use crate::upstream::{Connected, Server};
use crate::ws;
use read_connect::{ReadConnectError, peek_connect, read_connect};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Serves one accepted client: accept its layers → read CONNECT → choose a broker → connect →
/// hand the pair to the data plane → one access-log record of how it ended.
///
/// `_active` is taken by the accept loop, so `max_connections` counts this connection at once.
pub async fn serve(
    ctx: Arc<ListenerContext>,
    _active: ActiveConnection,
    tcp: TcpStream,
    peer: SocketAddr,
) {
    let started = Instant::now();
    let record = handle(&ctx, tcp, peer, started).await;
    record.write(&ctx, started);
}

/// The connection's life, top to bottom; every way it can end is the [`Record`] returned.
async fn handle(
    ctx: &ListenerContext,
    tcp: TcpStream,
    peer: SocketAddr,
    started: Instant,
) -> Record {
    // 0. The layers between TCP and MQTT (TLS, WebSocket), counted by outcome.
    let mut client = match accept_layers(ctx, tcp, peer).await {
        Ok(client) => client,
        Err(reason) => {
            ctx.count(|c| c.reject(reason));
            return Record::refused(peer, None, reason);
        }
    };
    // 1. One complete CONNECT within connect_packet_timeout, with the certificate's identity.
    // The steps that end before the flow does run boxed: inline, their futures would size every
    // connection's task for its whole life, spliced flows too.
    let connect = match Box::pin(read_client_connect(ctx, &mut client, started)).await {
        Ok(connect) => connect,
        Err(refusal) => return refusal.send(ctx, client, None).await,
    };
    // 2. A broker, trying the next choice on failure.
    let broker = match Box::pin(connect_broker(ctx, client.addr, &connect.connect)).await {
        Ok(broker) => broker,
        Err(refusal) => return refusal.send(ctx, client, Some(&connect.connect)).await,
    };
    // 3–4. The preamble and the CONNECT into the broker, then the data plane until both sides
    //      are done.
    hand_over(ctx, client, connect, broker).await
}

/// How one connection ended: what its access-log line says.
struct Record {
    /// The client's address (X-Forwarded-For's when the listener trusts it).
    client: SocketAddr,
    client_id: Option<String>,
    broker: Option<SocketAddr>,
    /// The flow's totals, when it reached a data plane.
    end: Option<FlowEnd>,
    close: &'static str,
}

impl Record {
    fn refused(client: SocketAddr, client_id: Option<String>, reason: RejectReason) -> Record {
        Record {
            client,
            client_id,
            broker: None,
            end: None,
            close: reason.as_str(),
        }
    }

    fn write(&self, ctx: &ListenerContext, started: Instant) {
        ctx.access_log.write(&Entry {
            client: self.client,
            client_id: self.client_id.as_deref(),
            listener: &ctx.config.name,
            broker: self.broker,
            path: self.end.map_or(ctx.dataplane.path(), |e| e.path).as_str(),
            path_reason: path_reason(ctx, self.end).as_str(),
            bytes_to_broker: self.end.map_or(0, |e| e.bytes_to_broker),
            bytes_to_client: self.end.map_or(0, |e| e.bytes_to_client),
            duration: started.elapsed(),
            close: self.close,
        });
    }
}

/// Why a connection took its data path: its listener's reason, unless the kernel refused to
/// splice the flow and it was copied instead.
fn path_reason(ctx: &ListenerContext, end: Option<FlowEnd>) -> PathReason {
    match end {
        Some(end) if end.path != ctx.dataplane.path() => PathReason::SpliceRefused,
        _ => ctx.path_reason,
    }
}

/// A client refused before it reached a broker: why, and the CONNACK it is owed.
struct Refusal {
    reason: RejectReason,
    connack: Option<mqtt::Connack>,
}

impl Refusal {
    /// Counts the refusal and sends the CONNACK (see [`refuse::refuse`]).
    async fn send(
        self,
        ctx: &ListenerContext,
        client: Client,
        connect: Option<&mqtt::Connect>,
    ) -> Record {
        refuse::refuse(ctx, client.stream, self.reason, self.connack).await;
        Record::refused(
            client.addr,
            connect.map(|c| c.client_id.clone()),
            self.reason,
        )
    }
}

/// A client past its listener's layers.
struct Client {
    stream: ClientStream,
    /// The client's address: the socket's, or X-Forwarded-For's when the listener trusts it.
    addr: SocketAddr,
    /// The address the client's socket came from.
    socket_peer: SocketAddr,
    /// The listener's address the client reached (for the PROXY header).
    local: SocketAddr,
    /// The client certificate, kept only when a rewrite will read it.
    certificate: Option<Vec<u8>>,
    /// The WebSocket upgrade, on ws and wss listeners.
    upgrade: Option<ws::Upgrade>,
}

/// Step 0: a TLS handshake (tls, wss) within connect_packet_timeout, then the WebSocket upgrade
/// (ws, wss) within its handshake_timeout; nothing on `tcp`.
async fn accept_layers(
    ctx: &ListenerContext,
    tcp: TcpStream,
    peer: SocketAddr,
) -> Result<Client, RejectReason> {
    let _ = tcp.set_nodelay(ctx.config.tcp_nodelay);
    let local = tcp.local_addr().unwrap_or(peer);
    let mut certificate = None;
    // The handshakes run boxed: inline, their futures (buffers included) would make every
    // connection's task bigger for its whole life, spliced TCP flows too.
    let transport = match &ctx.tls {
        None => ClientStream::Tcp(tcp),
        Some(tls) => match Box::pin(tls.accept(tcp, ctx.config.connect_packet_timeout)).await {
            Ok(stream) => {
                if ctx.config.rewrite_client_id.is_some() || ctx.config.rewrite_username.is_some() {
                    certificate = stream
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
                return Err(RejectReason::TlsHandshake);
            }
        },
    };
    let (stream, addr, upgrade) = match &ctx.ws {
        None => (transport, peer, None),
        Some(ws) => match Box::pin(ws::accept(transport, peer, ws, ctx.config.buffer_size)).await {
            Ok(accepted) => (
                ClientStream::Layered(Box::new(accepted.stream)),
                accepted.client,
                Some(accepted.upgrade),
            ),
            Err(reason) => {
                tracing::debug!(client = %peer, "WebSocket upgrade refused: {}", reason.as_str());
                return Err(RejectReason::WsHandshake);
            }
        },
    };
    Ok(Client {
        stream,
        addr,
        socket_peer: peer,
        local,
        certificate,
        upgrade,
    })
}

/// A client's CONNECT, as the broker will get it.
struct ClientConnect {
    /// Its bytes when they were consumed (userspace path); `None` when only peeked (the splice
    /// forwards them from the socket).
    packet: Option<Vec<u8>>,
    connect: mqtt::Connect,
}

/// Step 1: one complete CONNECT within connect_packet_timeout (peeked for the splice, consumed
/// otherwise), then the certificate's identity in place of the client's when the listener says
/// so.
async fn read_client_connect(
    ctx: &ListenerContext,
    client: &mut Client,
    started: Instant,
) -> Result<ClientConnect, Refusal> {
    let deadline = started + ctx.config.connect_packet_timeout;
    let max_size = ctx.config.max_connect_size;
    let stream = &mut client.stream;
    let read = tokio::time::timeout_at(deadline, async {
        match (ctx.dataplane.connect_handling(), stream.as_tcp_mut()) {
            (ConnectHandling::Peek, Some(tcp)) => {
                peek_connect(tcp, max_size).await.map(|(_, c)| (None, c))
            }
            _ => read_connect(stream, max_size)
                .await
                .map(|(p, c)| (Some(p), c)),
        }
    })
    .await;
    let (packet, connect) = match read {
        Ok(Ok(read)) => read,
        Ok(Err(ReadConnectError::Closed)) => {
            return Err(Refusal {
                reason: RejectReason::Closed,
                connack: None,
            });
        }
        Ok(Err(ReadConnectError::Invalid(error))) => {
            tracing::debug!(client = %client.addr, "refused: {error}");
            return Err(Refusal {
                reason: error.reject_reason(),
                connack: error.connack(),
            });
        }
        Err(_elapsed) => {
            return Err(Refusal {
                reason: RejectReason::ConnectTimeout,
                connack: None,
            });
        }
    };
    let version = connect.version;
    match identity::apply(&ctx.config, client.certificate.as_deref(), packet, connect) {
        Ok((packet, connect)) => Ok(ClientConnect { packet, connect }),
        Err(error) => {
            tracing::info!(client = %client.addr, "refused: {error}");
            Err(Refusal {
                reason: RejectReason::CertIdentity,
                connack: Some(mqtt::not_authorized(version)),
            })
        }
    }
}

/// Step 2: a connected broker, chosen by the upstream's balancing; from then on the connection
/// counts as handled by it, whatever happens next.
async fn connect_broker(
    ctx: &ListenerContext,
    client: SocketAddr,
    connect: &mqtt::Connect,
) -> Result<Connected, Refusal> {
    let key = SelectKey {
        source_ip: client.ip(),
        client_id: &connect.client_id,
    };
    match ctx.upstream.connect(&key, ctx.config.tcp_nodelay).await {
        Ok(connected) => {
            ctx.count(|c| {
                c.handled.fetch_add(1, Relaxed);
            });
            connected.server.server().total.fetch_add(1, Relaxed);
            Ok(connected)
        }
        Err(error) => {
            tracing::warn!(client = %client, upstream = %ctx.upstream.config.name, "no broker: {error}");
            Err(Refusal {
                reason: RejectReason::NoUpstream,
                connack: Some(mqtt::server_unavailable(connect.version)),
            })
        }
    }
}

/// Steps 3 and 4: the broker leg opened ([`open_broker`], or [`open_ws_broker`] for a WebSocket
/// upstream), then the data plane until both sides are done.
async fn hand_over(
    ctx: &ListenerContext,
    client: Client,
    connect: ClientConnect,
    broker: Connected,
) -> Record {
    let server = broker.server.server().clone();
    let broker_addr = broker.stream.peer_addr().ok();
    let record = |end: Option<FlowEnd>, close: &'static str| Record {
        client: client.addr,
        client_id: Some(connect.connect.client_id.clone()),
        broker: broker_addr,
        end,
        close,
    };
    let preamble = proxy_protocol::header(
        ctx.upstream.config.proxy_protocol,
        client.addr,
        client.local,
    );
    let broker_preamble_len = preamble.len() as u64;
    let packet = connect.packet.as_deref();
    let consumed = packet.map_or(0, |p| p.len() as u64);
    let opened = match &client.upgrade {
        Some(upgrade) if ctx.upstream.config.upstream_protocol == UpstreamProtocol::Ws => {
            let peers = (client.socket_peer, client.addr);
            Box::pin(open_ws_broker(ctx, broker.stream, upgrade, peers, packet)).await
        }
        _ => Box::pin(open_broker(ctx, &server, broker.stream, preamble, packet)).await,
    };
    let broker_stream = match opened {
        Ok(stream) => stream,
        Err((what, error)) => {
            tracing::warn!(client = %client.addr, broker = ?broker_addr, "{what} failed: {error}");
            return record(None, CloseReason::BrokerError.as_str());
        }
    };
    server.bytes.add(Direction::ToBroker, consumed);
    ctx.bytes.add(Direction::ToBroker, consumed);

    let flow = Flow {
        client: client.stream,
        broker: broker_stream,
        idle_timeout: ctx.config.idle_timeout,
        buffer_size: ctx.config.buffer_size,
        meters: vec![Arc::clone(&ctx.bytes), Arc::clone(&server.bytes)],
        broker_preamble_len,
    };
    let mut end = ctx.dataplane.run(flow).await;
    end.bytes_to_broker += consumed;
    record(Some(end), end.reason.as_str())
}

/// Step 3: the PROXY header (if on), TLS to the broker (if `upstream_tls`), then the CONNECT
/// when it was consumed; without TLS the header and the CONNECT go in one write. An error says
/// which of these failed.
async fn open_broker(
    ctx: &ListenerContext,
    server: &Server,
    mut broker: TcpStream,
    mut preamble: Vec<u8>,
    packet: Option<&[u8]>,
) -> Result<ClientStream, (&'static str, std::io::Error)> {
    let Some(tls) = &ctx.upstream.tls else {
        if let Some(packet) = packet {
            preamble.extend_from_slice(packet);
        }
        if !preamble.is_empty() {
            broker
                .write_all(&preamble)
                .await
                .map_err(|e| ("writing the CONNECT", e))?;
        }
        return Ok(ClientStream::Tcp(broker));
    };
    if !preamble.is_empty() {
        broker
            .write_all(&preamble)
            .await
            .map_err(|e| ("writing the PROXY header", e))?;
    }
    let handshake = tokio::time::timeout(
        ctx.upstream.config.connect_timeout,
        tls.connect(broker, &server.config.addr),
    )
    .await
    .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()));
    let mut stream = ClientStream::Layered(Box::new(
        handshake.map_err(|e| ("the TLS handshake with the broker", e))?,
    ));
    if let Some(packet) = packet {
        stream
            .write_all(packet)
            .await
            .map_err(|e| ("writing the CONNECT", e))?;
    }
    Ok(stream)
}

/// Step 3 for an `upstream_protocol = "ws"` upstream: the broker gets its own upgrade (within
/// the upstream's connect_timeout, carrying the client's addresses as `peers`: its socket's and
/// X-Forwarded-For's), then the CONNECT as the first frame.
async fn open_ws_broker(
    ctx: &ListenerContext,
    broker: TcpStream,
    upgrade: &ws::Upgrade,
    peers: (SocketAddr, SocketAddr),
    packet: Option<&[u8]>,
) -> Result<ClientStream, (&'static str, std::io::Error)> {
    const UPGRADE: &str = "the WebSocket upgrade to the broker";
    let broker_addr = broker.peer_addr().map_err(|e| (UPGRADE, e))?;
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
            upgrade,
            ctx.upstream.config.upstream_host.as_deref(),
            peers.0.ip(),
            peers.1.ip(),
            config,
        ),
    )
    .await
    .map_err(|_| (UPGRADE, std::io::ErrorKind::TimedOut.into()))?;
    let mut broker_ws = upgraded.map_err(|e| (UPGRADE, std::io::Error::other(e.to_string())))?;
    let packet = packet.unwrap_or_default();
    let written = match broker_ws.write_all(packet).await {
        Ok(()) => broker_ws.flush().await,
        Err(e) => Err(e),
    };
    written.map_err(|e| ("writing the CONNECT", e))?;
    Ok(ClientStream::Layered(Box::new(broker_ws)))
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
