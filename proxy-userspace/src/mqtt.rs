//! MQTT CONNECT codec: pure functions over byte slices, no I/O.
//!
//! The proxy only needs the first packet of a connection: enough of it to pick a broker
//! (protocol version, client identifier) and to refuse bad input with the right CONNACK.
//! Everything after the CONNECT is forwarded untouched.

mod connack;
mod connect;

pub use connack::connack;
pub use connect::{Connect, ConnectError, Framing, ProtocolVersion, frame_connect, parse_connect, sniff_version};
