//! Why a client connection was refused before it reached a broker.

use serde::Serialize;

/// The counted reason a connection was closed before being handed to a data plane.
///
/// Each variant is a key under `connections.rejected` in the stats JSON, so operators can
/// tell a misbehaving client population from an unhealthy broker pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectReason {
    /// The first packet was not a CONNECT, or its framing or fields were malformed.
    Malformed,
    /// Unknown protocol name or unsupported protocol level.
    BadProtocol,
    /// The CONNECT was larger than `max_connect_size`.
    TooLarge,
    /// No complete CONNECT arrived within `connect_packet_timeout`.
    ConnectTimeout,
    /// No broker was available (all down, unavailable, or every connect failed).
    NoUpstream,
    /// The listener was at `max_connections`.
    OverLimit,
    /// The client closed or reset before sending a complete CONNECT (port probes, TCP health checks).
    Closed,
    /// The TLS handshake failed (the listener's `tls` stats say why).
    TlsHandshake,
    /// The CONNECT could not be rewritten from the client certificate (none sent under
    /// `verify_client = "optional"`, or it lacks the field).
    CertIdentity,
    /// A ws listener's HTTP upgrade failed (the listener's `ws.upgrades_failed` says why).
    WsHandshake,
}

impl RejectReason {
    /// Every reason, in the order the stats JSON lists them.
    pub const ALL: [RejectReason; 10] = [
        RejectReason::Malformed,
        RejectReason::BadProtocol,
        RejectReason::TooLarge,
        RejectReason::ConnectTimeout,
        RejectReason::NoUpstream,
        RejectReason::OverLimit,
        RejectReason::Closed,
        RejectReason::TlsHandshake,
        RejectReason::CertIdentity,
        RejectReason::WsHandshake,
    ];

    /// The stats and access-log key for this reason.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::Malformed => "malformed",
            RejectReason::BadProtocol => "bad_protocol",
            RejectReason::TooLarge => "too_large",
            RejectReason::ConnectTimeout => "connect_timeout",
            RejectReason::NoUpstream => "no_upstream",
            RejectReason::OverLimit => "over_limit",
            RejectReason::Closed => "closed",
            RejectReason::TlsHandshake => "tls_handshake",
            RejectReason::CertIdentity => "cert_identity",
            RejectReason::WsHandshake => "ws_handshake",
        }
    }
}
