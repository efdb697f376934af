//! CONNECT framing and parsing.

use std::fmt;
use std::ops::Range;

use super::connack::{
    Connack, V3_UNACCEPTABLE_PROTOCOL_VERSION, V5_MALFORMED_PACKET, V5_PACKET_TOO_LARGE, connack,
};
use super::wire::{Reader, VarInt, decode_varint};
use crate::reject::RejectReason;

/// The only acceptable first byte: packet type 1 (CONNECT) with the reserved flags all zero.
const CONNECT_BYTE: u8 = 0x10;

// Connect flags (MQTT 3.1.1 §3.1.2.3, MQTT 5 §3.1.2.3).
const FLAG_RESERVED: u8 = 0x01;
const FLAG_CLEAN_START: u8 = 0x02;
const FLAG_WILL: u8 = 0x04;
const FLAG_WILL_QOS: u8 = 0x18;
const FLAG_WILL_RETAIN: u8 = 0x20;
const FLAG_PASSWORD: u8 = 0x40;
const FLAG_USERNAME: u8 = 0x80;

/// The MQTT protocol versions a broker may be asked to speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProtocolVersion {
    /// 3.1: protocol name `MQIsdp`, level 3.
    V3_1,
    /// 3.1.1: `MQTT`, level 4.
    V3_1_1,
    /// 5.0: `MQTT`, level 5.
    V5,
}

impl ProtocolVersion {
    /// The protocol level byte, for logs and for re-encoding a CONNECT.
    pub fn level(self) -> u8 {
        match self {
            ProtocolVersion::V3_1 => 3,
            ProtocolVersion::V3_1_1 => 4,
            ProtocolVersion::V5 => 5,
        }
    }

    /// The protocol name this version travels under, for re-encoding a CONNECT.
    pub fn protocol_name(self) -> &'static str {
        match self {
            ProtocolVersion::V3_1 => "MQIsdp",
            ProtocolVersion::V3_1_1 | ProtocolVersion::V5 => "MQTT",
        }
    }

    /// Whether the CONNECT carries property blocks, which changes its layout.
    fn has_properties(self) -> bool {
        self == ProtocolVersion::V5
    }

    /// The version a known protocol name announces at `level`, if that pairing exists.
    fn from_name_level(name: &[u8], level: u8) -> Option<Self> {
        match (name, level) {
            (b"MQIsdp", 3) => Some(ProtocolVersion::V3_1),
            (b"MQTT", 4) => Some(ProtocolVersion::V3_1_1),
            (b"MQTT", 5) => Some(ProtocolVersion::V5),
            _ => None,
        }
    }
}

impl fmt::Display for ProtocolVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ProtocolVersion::V3_1 => "3.1",
            ProtocolVersion::V3_1_1 => "3.1.1",
            ProtocolVersion::V5 => "5.0",
        })
    }
}

/// What the fixed header says about a buffer that starts a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// At least `needed` more bytes are required before anything more can be said.
    Incomplete { needed: usize },
    /// The whole CONNECT is `total_len` bytes (fixed header included); `header_len` of them are the fixed header.
    Complete { header_len: usize, total_len: usize },
}

/// The last will a client registered, kept small: enough to log and to reason about sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Will {
    /// QoS 0, 1 or 2.
    pub qos: u8,
    /// Whether the broker will retain the will message.
    pub retain: bool,
}

/// The parts of a CONNECT that balancing, logging and rewriting need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    pub version: ProtocolVersion,
    /// May be empty: the broker then assigns one (or refuses, which is its call, not ours).
    pub client_id: String,
    pub username: Option<String>,
    pub keep_alive: u16,
    /// "Clean session" in 3.x, "clean start" in 5.0: the same bit.
    pub clean_start: bool,
    /// Present when the will flag is set.
    pub will: Option<Will>,
    /// Whether a password was sent; its bytes are deliberately not kept.
    pub has_password: bool,
    /// MQTT 5 Session Expiry Interval, when sent: tells persistent sessions from throwaway ones.
    pub session_expiry_interval: Option<u32>,
    /// Byte offsets of the client id's UTF-8 content within the packet (its two-byte length
    /// prefix is the two bytes before), so the CONNECT can be re-encoded with another id.
    pub client_id_range: Range<usize>,
    /// Length of the whole CONNECT; bytes after it belong to the next packets.
    pub packet_len: usize,
}

/// A field of the CONNECT, to say precisely where a packet went wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    ProtocolName,
    ProtocolLevel,
    ConnectFlags,
    KeepAlive,
    Properties,
    ClientId,
    WillProperties,
    WillTopic,
    WillPayload,
    Username,
    Password,
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Field::ProtocolName => "protocol name",
            Field::ProtocolLevel => "protocol level",
            Field::ConnectFlags => "connect flags",
            Field::KeepAlive => "keep alive",
            Field::Properties => "properties",
            Field::ClientId => "client identifier",
            Field::WillProperties => "will properties",
            Field::WillTopic => "will topic",
            Field::WillPayload => "will payload",
            Field::Username => "user name",
            Field::Password => "password",
        })
    }
}

/// Why an MQTT string was rejected; both make the packet malformed per the specification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StringProblem {
    InvalidUtf8,
    /// MQTT strings must not contain U+0000.
    ContainsNull,
}

impl fmt::Display for StringProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StringProblem::InvalidUtf8 => "is not well-formed UTF-8",
            StringProblem::ContainsNull => "contains U+0000",
        })
    }
}

/// Why a CONNECT was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectError {
    #[error("first packet is not a CONNECT (packet type {packet_type})")]
    NotConnect { packet_type: u8 },
    #[error("CONNECT fixed header has reserved flags {flags:#06b}, must be 0")]
    BadHeaderFlags { flags: u8 },
    #[error("CONNECT remaining length is longer than 4 bytes")]
    MalformedRemainingLength,
    #[error("CONNECT of {size} bytes exceeds the {max} byte limit")]
    TooLarge {
        size: usize,
        max: usize,
        /// Known when the bytes read so far revealed it; decides whether a CONNACK can be sent.
        version: Option<ProtocolVersion>,
    },
    #[error("buffer holds only part of the CONNECT ({needed} more bytes needed)")]
    PacketIncomplete { needed: usize },
    #[error("CONNECT truncated: {field} runs past the end of the packet")]
    Truncated { field: Field },
    #[error("unknown protocol name {:?}", String::from_utf8_lossy(name))]
    UnknownProtocol { name: Vec<u8> },
    #[error("unsupported protocol level {level} for protocol name {protocol}")]
    UnsupportedLevel { protocol: &'static str, level: u8 },
    #[error("reserved connect flag is set")]
    ReservedFlagSet,
    #[error("will QoS 3 is invalid")]
    InvalidWillQos,
    #[error("will QoS or will retain set without the will flag")]
    WillFlagsWithoutWill,
    #[error("password flag set without the user name flag")]
    PasswordWithoutUsername,
    #[error("{field} length is longer than 4 bytes")]
    MalformedPropertyLength { field: Field },
    #[error("{field}: property {id:#04x} is not allowed here")]
    InvalidProperty { field: Field, id: u8 },
    #[error("{field}: property {id:#04x} appears more than once")]
    DuplicateProperty { field: Field, id: u8 },
    #[error("{field}: property {id:#04x} runs past the end of the property block")]
    PropertyTruncated { field: Field, id: u8 },
    #[error("client identifier {problem}")]
    InvalidClientId {
        /// Decides the CONNACK: MQTT 5 has a reason code for it, 3.x has none that fits.
        version: ProtocolVersion,
        problem: StringProblem,
    },
    #[error("{field} {problem}")]
    InvalidString {
        field: Field,
        problem: StringProblem,
    },
    #[error("{count} unexpected bytes after the last CONNECT field")]
    ExtraBytes { count: usize },
}

impl ConnectError {
    /// The stats bucket for this refusal, so operators can tell bad clients from misconfigured ones.
    pub fn reject_reason(&self) -> RejectReason {
        match self {
            ConnectError::UnknownProtocol { .. } | ConnectError::UnsupportedLevel { .. } => {
                RejectReason::BadProtocol
            }
            ConnectError::TooLarge { .. } => RejectReason::TooLarge,
            _ => RejectReason::Malformed,
        }
    }

    /// The CONNACK to send before closing, when the client can understand one; `None` means
    /// close silently (the client's dialect is unknown or 3.x has no fitting code).
    pub fn connack(&self) -> Option<Connack> {
        match self {
            // MQTT-3.1.2-2: answer an unsupported level with 0x01 in the 3.1.1 format, which
            // every client version can decode.
            ConnectError::UnsupportedLevel { .. } => Some(connack(
                ProtocolVersion::V3_1_1,
                V3_UNACCEPTABLE_PROTOCOL_VERSION,
            )),
            ConnectError::InvalidClientId {
                version: ProtocolVersion::V5,
                ..
            } => Some(connack(ProtocolVersion::V5, V5_MALFORMED_PACKET)),
            ConnectError::TooLarge {
                version: Some(ProtocolVersion::V5),
                ..
            } => Some(connack(ProtocolVersion::V5, V5_PACKET_TOO_LARGE)),
            _ => None,
        }
    }
}

/// Header-only check of the start of a connection; never buffers past `max_size`.
///
/// `Complete` only says how long the CONNECT is; the caller keeps reading until it holds
/// `total_len` bytes, then calls [`parse_connect`].
pub fn frame_connect(buf: &[u8], max_size: usize) -> Result<Framing, ConnectError> {
    let Some(&first) = buf.first() else {
        return Ok(Framing::Incomplete { needed: 1 });
    };
    if first != CONNECT_BYTE {
        return Err(if first >> 4 == CONNECT_BYTE >> 4 {
            ConnectError::BadHeaderFlags {
                flags: first & 0x0f,
            }
        } else {
            ConnectError::NotConnect {
                packet_type: first >> 4,
            }
        });
    }
    match decode_varint(&buf[1..]) {
        // One more byte may end the remaining length; no way to know how many follow.
        VarInt::Incomplete => Ok(Framing::Incomplete { needed: 1 }),
        VarInt::TooLong => Err(ConnectError::MalformedRemainingLength),
        VarInt::Value { value, len } => {
            let header_len = 1 + len;
            let total_len = header_len + value;
            if total_len > max_size {
                return Err(ConnectError::TooLarge {
                    size: total_len,
                    max: max_size,
                    version: sniff_version(buf),
                });
            }
            Ok(Framing::Complete {
                header_len,
                total_len,
            })
        }
    }
}

/// The fixed header's lengths, for callers that have already framed the packet.
fn header(buf: &[u8]) -> Result<(usize, usize), ConnectError> {
    match frame_connect(buf, usize::MAX)? {
        Framing::Complete {
            header_len,
            total_len,
        } => Ok((header_len, total_len)),
        Framing::Incomplete { needed } => Err(ConnectError::PacketIncomplete { needed }),
    }
}

/// Parses one complete CONNECT packet; bytes after it (the client's next packets) are ignored.
pub fn parse_connect(packet: &[u8]) -> Result<Connect, ConnectError> {
    let (header_len, total_len) = header(packet)?;
    let Some(body) = packet.get(..total_len) else {
        return Err(ConnectError::PacketIncomplete {
            needed: total_len - packet.len(),
        });
    };
    let mut r = Reader::new(body, header_len);
    let truncated = |field| ConnectError::Truncated { field };

    let (name, _) = r.length_prefixed().ok_or(truncated(Field::ProtocolName))?;
    let protocol = match name {
        b"MQTT" => "MQTT",
        b"MQIsdp" => "MQIsdp",
        _ => {
            return Err(ConnectError::UnknownProtocol {
                name: name.to_vec(),
            });
        }
    };
    let level = r.u8().ok_or(truncated(Field::ProtocolLevel))?;
    let version = ProtocolVersion::from_name_level(name, level)
        .ok_or(ConnectError::UnsupportedLevel { protocol, level })?;

    let flags = r.u8().ok_or(truncated(Field::ConnectFlags))?;
    if flags & FLAG_RESERVED != 0 {
        return Err(ConnectError::ReservedFlagSet);
    }
    let will_qos = (flags & FLAG_WILL_QOS) >> 3;
    let will_retain = flags & FLAG_WILL_RETAIN != 0;
    let will = if flags & FLAG_WILL != 0 {
        if will_qos == 3 {
            return Err(ConnectError::InvalidWillQos);
        }
        Some(Will {
            qos: will_qos,
            retain: will_retain,
        })
    } else {
        if will_qos != 0 || will_retain {
            return Err(ConnectError::WillFlagsWithoutWill);
        }
        None
    };
    let has_username = flags & FLAG_USERNAME != 0;
    let has_password = flags & FLAG_PASSWORD != 0;
    // Only 5.0 allows a password without a user name (MQTT-3.1.2-22 in 3.1.1).
    if has_password && !has_username && !version.has_properties() {
        return Err(ConnectError::PasswordWithoutUsername);
    }

    let keep_alive = r.u16().ok_or(truncated(Field::KeepAlive))?;

    let mut session_expiry_interval = None;
    if version.has_properties() {
        session_expiry_interval = properties(&mut r, Field::Properties)?;
    }

    let (id_bytes, client_id_range) = r.length_prefixed().ok_or(truncated(Field::ClientId))?;
    let client_id = mqtt_str(id_bytes)
        .map_err(|problem| ConnectError::InvalidClientId { version, problem })?
        .to_owned();

    if will.is_some() {
        if version.has_properties() {
            properties(&mut r, Field::WillProperties)?;
        }
        string(&mut r, Field::WillTopic)?;
        r.length_prefixed().ok_or(truncated(Field::WillPayload))?;
    }
    let username = if has_username {
        Some(string(&mut r, Field::Username)?.to_owned())
    } else {
        None
    };
    if has_password {
        r.length_prefixed().ok_or(truncated(Field::Password))?;
    }
    if r.remaining() != 0 {
        return Err(ConnectError::ExtraBytes {
            count: r.remaining(),
        });
    }

    Ok(Connect {
        version,
        client_id,
        username,
        keep_alive,
        clean_start: flags & FLAG_CLEAN_START != 0,
        will,
        has_password,
        session_expiry_interval,
        client_id_range,
        packet_len: total_len,
    })
}

/// Checks the rules every MQTT UTF-8 string obeys.
fn mqtt_str(bytes: &[u8]) -> Result<&str, StringProblem> {
    let s = std::str::from_utf8(bytes).map_err(|_| StringProblem::InvalidUtf8)?;
    if s.contains('\0') {
        return Err(StringProblem::ContainsNull);
    }
    Ok(s)
}

/// Reads a length-prefixed MQTT string belonging to `field`.
fn string<'a>(r: &mut Reader<'a>, field: Field) -> Result<&'a str, ConnectError> {
    let (bytes, _) = r
        .length_prefixed()
        .ok_or(ConnectError::Truncated { field })?;
    mqtt_str(bytes).map_err(|problem| ConnectError::InvalidString { field, problem })
}

/// How a property's value is encoded, which is all that is needed to skip it.
#[derive(Clone, Copy)]
enum PropertyKind {
    Byte,
    TwoByte,
    FourByte,
    String,
    StringPair,
    Binary,
}

/// The properties MQTT 5 allows in a CONNECT's own block (§3.1.2.11).
fn connect_property(id: u8) -> Option<PropertyKind> {
    Some(match id {
        0x11 => PropertyKind::FourByte,   // Session Expiry Interval
        0x21 => PropertyKind::TwoByte,    // Receive Maximum
        0x27 => PropertyKind::FourByte,   // Maximum Packet Size
        0x22 => PropertyKind::TwoByte,    // Topic Alias Maximum
        0x19 => PropertyKind::Byte,       // Request Response Information
        0x17 => PropertyKind::Byte,       // Request Problem Information
        0x26 => PropertyKind::StringPair, // User Property
        0x15 => PropertyKind::String,     // Authentication Method
        0x16 => PropertyKind::Binary,     // Authentication Data
        _ => return None,
    })
}

/// The properties MQTT 5 allows in the will block (§3.1.3.2).
fn will_property(id: u8) -> Option<PropertyKind> {
    Some(match id {
        0x18 => PropertyKind::FourByte,   // Will Delay Interval
        0x01 => PropertyKind::Byte,       // Payload Format Indicator
        0x02 => PropertyKind::FourByte,   // Message Expiry Interval
        0x03 => PropertyKind::String,     // Content Type
        0x08 => PropertyKind::String,     // Response Topic
        0x09 => PropertyKind::Binary,     // Correlation Data
        0x26 => PropertyKind::StringPair, // User Property
        _ => return None,
    })
}

const SESSION_EXPIRY_INTERVAL: u8 = 0x11;
const USER_PROPERTY: u8 = 0x26;

/// Walks one MQTT 5 property block so the fields after it are found at the right offset,
/// rejecting what a broker would call malformed. Returns the Session Expiry Interval if seen.
fn properties(r: &mut Reader<'_>, field: Field) -> Result<Option<u32>, ConnectError> {
    let len = match r.varint() {
        VarInt::Value { value, .. } => value,
        VarInt::Incomplete => return Err(ConnectError::Truncated { field }),
        VarInt::TooLong => return Err(ConnectError::MalformedPropertyLength { field }),
    };
    let block = r.take(len).ok_or(ConnectError::Truncated { field })?;
    let allowed = match field {
        Field::WillProperties => will_property,
        _ => connect_property,
    };
    let mut p = Reader::new(block, 0);
    let mut seen = 0u64;
    let mut session_expiry = None;
    while let Some(id) = p.u8() {
        // Identifiers are variable byte integers, but every defined one fits in 7 bits, so a
        // byte with the continuation bit can only start an unknown identifier.
        let kind = allowed(id).ok_or(ConnectError::InvalidProperty { field, id })?;
        if id != USER_PROPERTY {
            let bit = 1u64 << (id & 0x3f);
            if seen & bit != 0 {
                return Err(ConnectError::DuplicateProperty { field, id });
            }
            seen |= bit;
        }
        let overrun = ConnectError::PropertyTruncated { field, id };
        let bad_string = |problem| ConnectError::InvalidString { field, problem };
        match kind {
            PropertyKind::Byte => {
                p.u8().ok_or(overrun)?;
            }
            PropertyKind::TwoByte => {
                p.u16().ok_or(overrun)?;
            }
            PropertyKind::FourByte => {
                let value = p.u32().ok_or(overrun)?;
                if id == SESSION_EXPIRY_INTERVAL {
                    session_expiry = Some(value);
                }
            }
            PropertyKind::String => {
                let (s, _) = p.length_prefixed().ok_or(overrun)?;
                mqtt_str(s).map_err(bad_string)?;
            }
            PropertyKind::StringPair => {
                for _ in 0..2 {
                    let (s, _) = p.length_prefixed().ok_or(overrun.clone())?;
                    mqtt_str(s).map_err(bad_string)?;
                }
            }
            PropertyKind::Binary => {
                p.length_prefixed().ok_or(overrun)?;
            }
        }
    }
    Ok(session_expiry)
}

/// The protocol version from a prefix of a CONNECT, when the prefix is long enough to tell.
///
/// Used when refusing an oversized CONNECT: the reply depends on the version, but the proxy
/// must not buffer the whole packet to learn it.
pub fn sniff_version(prefix: &[u8]) -> Option<ProtocolVersion> {
    if prefix.first() != Some(&CONNECT_BYTE) {
        return None;
    }
    let VarInt::Value { value, len } = decode_varint(prefix.get(1..)?) else {
        return None;
    };
    let header_len = 1 + len;
    let end = prefix.len().min(header_len + value);
    let mut r = Reader::new(prefix.get(..end)?, header_len);
    let (name, _) = r.length_prefixed()?;
    let level = r.u8()?;
    ProtocolVersion::from_name_level(name, level)
}
