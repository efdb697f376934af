//! Data planes: what moves the bytes of an established client ↔ broker pair.
//!
//! The connection code does everything up to a connected broker socket and then hands the pair
//! to a [`DataPlane`]: the userspace copy path ([`UserspaceCopy`]) or the in-kernel sockmap splice
//! ([`EbpfSplice`]), which asks, through [`DataPlane::connect_handling`], to have the CONNECT left
//! in the client socket for the kernel to forward.

#[allow(unsafe_code)]
pub mod ebpf;
pub mod packet;
mod userspace;

pub use ebpf::EbpfSplice;

/// For the data planes' tests that need root (BPF programs, `TCP_REPAIR`): true when they can
/// run; otherwise prints `SKIPPED: <what> needs root` and returns false, except under `CI=true`,
/// where a missing privilege fails the test.
#[cfg(test)]
pub(crate) fn root_or_skip(what: &str) -> bool {
    let root =
        std::fs::metadata("/proc/self").is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0);
    if !root {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true and {what} needs root"
        );
        println!("SKIPPED: {what} needs root");
    }
    root
}
pub use userspace::UserspaceCopy;

use crate::stats::ByteMeter;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// A decrypted or unwrapped client byte stream (TLS, WebSocket): anything the userspace copy
/// path can read and write.
pub trait ClientIo: AsyncRead + AsyncWrite + Unpin + Send + 'static {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> ClientIo for T {}

/// The client side of a flow: a bare TCP socket can be spliced in the kernel; anything layered
/// on top of TCP (TLS, WebSocket) has to be moved by the daemon.
pub enum ClientStream {
    Tcp(TcpStream),
    Layered(Box<dyn ClientIo>),
}

impl ClientStream {
    /// The bare TCP socket, if the client speaks MQTT directly on it.
    pub fn as_tcp_mut(&mut self) -> Option<&mut TcpStream> {
        match self {
            ClientStream::Tcp(s) => Some(s),
            ClientStream::Layered(_) => None,
        }
    }
}

impl AsyncRead for ClientStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            ClientStream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            ClientStream::Layered(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            ClientStream::Layered(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            ClientStream::Tcp(s) => Pin::new(s).poll_flush(cx),
            ClientStream::Layered(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            ClientStream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            ClientStream::Layered(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

impl std::fmt::Debug for ClientStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientStream::Tcp(s) => f.debug_tuple("Tcp").field(s).finish(),
            ClientStream::Layered(_) => f.write_str("Layered"),
        }
    }
}

/// How the connection code must treat the CONNECT before the hand-over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectHandling {
    /// Read exactly the CONNECT's bytes from the client and write them to the broker.
    Consume,
    /// Only peek at the CONNECT; the data plane forwards it with everything behind it.
    Peek,
}

/// Which data path carried a flow; shown in stats and the access log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataPath {
    Userspace,
    Sockmap,
    Packet,
}

impl DataPath {
    /// The name used in stats and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            DataPath::Userspace => "userspace",
            DataPath::Sockmap => "sockmap",
            DataPath::Packet => "packet",
        }
    }
}

/// A connected pair and the limits that apply to it. `S` is the shape of its two sides: any
/// stream ([`ClientStream`]), or bare TCP once a splice has checked (see [`Flow::into_tcp`]).
#[derive(Debug)]
pub struct Flow<S = ClientStream> {
    pub client: S,
    /// Bare TCP, or TLS to the broker (`upstream_tls`): the same two shapes as a client's.
    pub broker: S,
    /// Close both sides when nothing moved either way for this long.
    pub idle_timeout: Duration,
    /// Per-direction buffer of the userspace copy path.
    pub buffer_size: usize,
    /// Meters (server, listener, …) that every moved byte is added to.
    pub meters: Vec<Arc<ByteMeter>>,
    /// Bytes the daemon wrote into the broker socket that did not come from the client (the
    /// PROXY header): the close rule must not count them as forwarded client bytes.
    pub broker_preamble_len: u64,
}

impl Flow {
    /// The flow with both sides as bare TCP sockets, which a splice can take; the flow as it was
    /// when a side is layered (TLS, WebSocket), which only the daemon can move.
    pub fn into_tcp(self) -> Result<Flow<TcpStream>, Box<Flow>> {
        match (self.client, self.broker) {
            (ClientStream::Tcp(client), ClientStream::Tcp(broker)) => Ok(Flow {
                client,
                broker,
                idle_timeout: self.idle_timeout,
                buffer_size: self.buffer_size,
                meters: self.meters,
                broker_preamble_len: self.broker_preamble_len,
            }),
            (client, broker) => Err(Box::new(Flow {
                client,
                broker,
                ..self
            })),
        }
    }
}

impl From<Flow<TcpStream>> for Flow {
    fn from(flow: Flow<TcpStream>) -> Flow {
        Flow {
            client: ClientStream::Tcp(flow.client),
            broker: ClientStream::Tcp(flow.broker),
            idle_timeout: flow.idle_timeout,
            buffer_size: flow.buffer_size,
            meters: flow.meters,
            broker_preamble_len: flow.broker_preamble_len,
        }
    }
}

/// How a flow ended, for the access log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// Both sides closed; the client's FIN came first.
    ClientClosed,
    /// Both sides closed; the broker's FIN came first.
    BrokerClosed,
    /// Reset or error on the client side.
    ClientError,
    /// Reset or error on the broker side.
    BrokerError,
    /// Nothing moved for `idle_timeout`.
    Idle,
    /// After a FIN, the bytes before it did not drain into the peer in time; both sides closed.
    DrainTimeout,
}

impl CloseReason {
    /// The name used in the access log.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::ClientClosed => "client_closed",
            CloseReason::BrokerClosed => "broker_closed",
            CloseReason::ClientError => "client_error",
            CloseReason::BrokerError => "broker_error",
            CloseReason::Idle => "idle_timeout",
            CloseReason::DrainTimeout => "drain_timeout",
        }
    }
}

/// Why a flow took its data path: the one answer the access log (`path_reason=`) and the
/// listener's stats (`data_path_reason`) give.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathReason {
    /// The process's data path (`dataplane.mode`; `dataplane.reason` in the stats says why it is
    /// that one).
    Mode,
    /// TLS is terminated in the daemon on the client side (there is no kTLS here).
    ClientTls,
    /// The brokers are spoken to over TLS (`upstream_tls`).
    BrokerTls,
    /// WebSocket frames are unwrapped (and re-framed) by the daemon.
    WebSocket,
    /// The kernel refused to splice the pair (a socket was no longer established); copied in
    /// userspace.
    SpliceRefused,
}

impl PathReason {
    /// The name used in stats and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            PathReason::Mode => "mode",
            PathReason::ClientTls => "client_tls",
            PathReason::BrokerTls => "broker_tls",
            PathReason::WebSocket => "websocket",
            PathReason::SpliceRefused => "splice_refused",
        }
    }

    /// The data path of a listener's flows, and why: only a plain-TCP listener with a plain-TCP
    /// upstream can take the process's data path; anything the daemon must decrypt or unframe is
    /// copied in userspace.
    pub fn for_listener(client_tls: bool, websocket: bool, broker_tls: bool) -> PathReason {
        if client_tls {
            PathReason::ClientTls
        } else if websocket {
            PathReason::WebSocket
        } else if broker_tls {
            PathReason::BrokerTls
        } else {
            PathReason::Mode
        }
    }
}

/// The totals of a finished flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowEnd {
    /// The path that actually carried the flow (a refused splice runs on userspace).
    pub path: DataPath,
    pub bytes_to_broker: u64,
    pub bytes_to_client: u64,
    pub reason: CloseReason,
}

impl FlowEnd {
    /// A flow that ended before any byte was moved.
    pub fn nothing_moved(path: DataPath, reason: CloseReason) -> FlowEnd {
        FlowEnd {
            path,
            bytes_to_broker: 0,
            bytes_to_client: 0,
            reason,
        }
    }
}

/// The future a data plane returns for one flow.
pub type FlowFuture = Pin<Box<dyn Future<Output = FlowEnd> + Send>>;

/// Moves the bytes of established pairs until both sides are done.
pub trait DataPlane: Send + Sync + 'static {
    /// Which path this is.
    fn path(&self) -> DataPath;
    /// Whether the connection code reads the CONNECT or leaves it in the socket.
    fn connect_handling(&self) -> ConnectHandling;
    /// Runs one flow to its end.
    fn run(&self, flow: Flow) -> FlowFuture;
    /// The splice's counters for `GET /stats` (`None` on the userspace path).
    fn splice_stats(&self) -> Option<crate::stats::SpliceStats> {
        None
    }
    /// The packet splice's counters for `GET /stats` (`None` on the other paths).
    fn packet_stats(&self) -> Option<crate::stats::PacketStats> {
        None
    }
    /// Brings the byte meters of running flows up to date before stats are read. The userspace
    /// path adds bytes as it copies them; a spliced flow's bytes never pass the daemon, so its
    /// meters are fed from the kernel's counters here (else a long session would show 0 until
    /// it closes).
    fn refresh_meters(&self) {}
}

#[cfg(test)]
mod tests {
    use super::PathReason;

    #[test]
    fn only_plain_tcp_on_both_sides_takes_the_process_data_path() {
        // (client TLS, WebSocket, broker TLS) → reason; the client side's reason wins.
        let table = [
            ((false, false, false), PathReason::Mode),
            ((true, false, false), PathReason::ClientTls),
            ((false, true, false), PathReason::WebSocket),
            ((false, false, true), PathReason::BrokerTls),
            ((true, true, true), PathReason::ClientTls),
            ((false, true, true), PathReason::WebSocket),
        ];
        for ((tls, ws, broker_tls), want) in table {
            assert_eq!(
                PathReason::for_listener(tls, ws, broker_tls),
                want,
                "{tls} {ws} {broker_tls}"
            );
        }
    }
}
