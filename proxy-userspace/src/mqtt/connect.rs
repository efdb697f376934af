//! CONNECT framing and parsing.

/// The MQTT protocol versions a broker may be asked to speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtocolVersion {
    /// 3.1: protocol name `MQIsdp`, level 3.
    V3_1,
    /// 3.1.1: `MQTT`, level 4.
    V3_1_1,
    /// 5.0: `MQTT`, level 5.
    V5,
}

/// What the fixed header says about a buffer that starts a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// At least `needed` more bytes are required before anything more can be said.
    Incomplete { needed: usize },
    /// The whole CONNECT is `total_len` bytes (fixed header included); `header_len` of them are the fixed header.
    Complete { header_len: usize, total_len: usize },
}

/// The parts of a CONNECT that balancing, logging and rewriting need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    pub version: ProtocolVersion,
    pub client_id: String,
    pub username: Option<String>,
    pub keep_alive: u16,
    pub clean_start: bool,
}

/// Why a CONNECT was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectError {
    #[error("first packet is not a CONNECT")]
    NotConnect,
}

/// Header-only check of the start of a connection; never buffers past `max_size`.
pub fn frame_connect(buf: &[u8], max_size: usize) -> Result<Framing, ConnectError> {
    let _ = (buf, max_size);
    Err(ConnectError::NotConnect)
}

/// Parses one complete CONNECT packet (exactly its bytes).
pub fn parse_connect(packet: &[u8]) -> Result<Connect, ConnectError> {
    let _ = packet;
    Err(ConnectError::NotConnect)
}

/// The protocol version from a prefix of a CONNECT, when the prefix is long enough to tell.
pub fn sniff_version(prefix: &[u8]) -> Option<ProtocolVersion> {
    let _ = prefix;
    None
}
