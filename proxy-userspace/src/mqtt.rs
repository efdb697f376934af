//! MQTT CONNECT codec: pure functions over byte slices, no I/O.
//!
//! The proxy only needs the first packet of a connection: enough of it to pick a broker
//! (protocol version, client identifier) and to refuse bad input with the right CONNACK.
//! Everything after the CONNECT is forwarded untouched.
//!
//! Reading a connection goes in two steps so a hostile client cannot make the proxy buffer
//! more than `max_size` bytes: [`frame_connect`] looks at the fixed header only and says how
//! many bytes the CONNECT spans, then [`parse_connect`] validates the whole packet.

#![warn(missing_docs)]

mod connack;
mod connect;
mod rewrite;
mod wire;

pub use connack::{
    Connack, V3_NOT_AUTHORIZED, V3_SERVER_UNAVAILABLE, V3_UNACCEPTABLE_PROTOCOL_VERSION,
    V5_MALFORMED_PACKET, V5_NOT_AUTHORIZED, V5_PACKET_TOO_LARGE, V5_SERVER_UNAVAILABLE, connack,
    not_authorized, server_unavailable,
};
pub use connect::{
    Connect, ConnectError, Field, Framing, ProtocolVersion, StringProblem, Will, frame_connect,
    parse_connect, sniff_version,
};
pub use rewrite::{RewriteError, rewrite_connect};
