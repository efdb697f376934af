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
    Incomplete {
        /// A lower bound, so the caller can wait for data without over-reading.
        needed: usize,
    },
    /// The whole CONNECT is `total_len` bytes (fixed header included); `header_len` of them are the fixed header.
    Complete {
        /// Where the variable header starts.
        header_len: usize,
        /// How many bytes to buffer before calling [`parse_connect`].
        total_len: usize,
    },
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
    /// The dialect of every later packet, and of any CONNACK the proxy sends.
    pub version: ProtocolVersion,
    /// May be empty: the broker then assigns one (or refuses, which is its call, not ours).
    pub client_id: String,
    /// For balancing by tenant and for access logs.
    pub username: Option<String>,
    /// Seconds; bounds how long an idle client may look dead before the broker drops it.
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
    /// Byte offset of the user name field (its length prefix) within the packet, or of where it
    /// would go (before the password) when there is none, so the user name can be set too.
    pub username_at: usize,
    /// Length of the whole CONNECT; bytes after it belong to the next packets.
    pub packet_len: usize,
}

/// A field of the CONNECT, so errors say where a packet went wrong, in CONNECT order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    /// `MQTT` or `MQIsdp`, length-prefixed.
    ProtocolName,
    /// The byte after the protocol name.
    ProtocolLevel,
    /// The flags byte.
    ConnectFlags,
    /// Two bytes, big-endian.
    KeepAlive,
    /// MQTT 5 CONNECT properties.
    Properties,
    /// The first payload field.
    ClientId,
    /// MQTT 5 will properties.
    WillProperties,
    /// Present with the will flag.
    WillTopic,
    /// Present with the will flag.
    WillPayload,
    /// Present with the user name flag.
    Username,
    /// Present with the password flag.
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
    /// Includes encoded surrogates and over-long forms, which MQTT forbids too.
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

/// Why a CONNECT was refused, one variant per cause so logs and tests can be precise.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectError {
    /// Not MQTT, or a client skipping CONNECT: nothing can be forwarded.
    #[error("first packet is not a CONNECT (packet type {packet_type})")]
    NotConnect {
        /// The high nibble of the first byte.
        packet_type: u8,
    },
    /// CONNECT's fixed-header flags are reserved and must be 0.
    #[error("CONNECT fixed header has reserved flags {flags:#06b}, must be 0")]
    BadHeaderFlags {
        /// The low nibble of the first byte.
        flags: u8,
    },
    /// A remaining length on five or more bytes; the packet cannot be framed.
    #[error("CONNECT remaining length is longer than 4 bytes")]
    MalformedRemainingLength,
    /// Refused before buffering, so a client cannot make the proxy hold large packets.
    #[error("CONNECT of {size} bytes exceeds the {max} byte limit")]
    TooLarge {
        /// The announced total length, fixed header included.
        size: usize,
        /// The configured limit.
        max: usize,
        /// Known when the bytes read so far revealed it; decides whether a CONNACK can be sent.
        version: Option<ProtocolVersion>,
    },
    /// [`parse_connect`] got fewer bytes than the fixed header announces: a caller bug, or
    /// a connection that closed mid-packet.
    #[error("buffer holds only part of the CONNECT ({needed} more bytes needed)")]
    PacketIncomplete {
        /// At least this many more bytes were expected.
        needed: usize,
    },
    /// A field runs past the remaining length.
    #[error("CONNECT truncated: {field} runs past the end of the packet")]
    Truncated {
        /// The first field that did not fit.
        field: Field,
    },
    /// Not an MQTT client at all (or a dialect no broker here speaks).
    #[error("unknown protocol name {:?}", String::from_utf8_lossy(name))]
    UnknownProtocol {
        /// The name as sent, for logs.
        name: Vec<u8>,
    },
    /// An MQTT client of a version the brokers do not speak; it may retry with another.
    #[error("unsupported protocol level {level} for protocol name {protocol}")]
    UnsupportedLevel {
        /// `MQTT` or `MQIsdp`.
        protocol: &'static str,
        /// The level byte as sent.
        level: u8,
    },
    /// Connect flags bit 0 is reserved and must be 0.
    #[error("reserved connect flag is set")]
    ReservedFlagSet,
    /// QoS 3 does not exist.
    #[error("will QoS 3 is invalid")]
    InvalidWillQos,
    /// Will QoS and will retain must be 0 when there is no will.
    #[error("will QoS or will retain set without the will flag")]
    WillFlagsWithoutWill,
    /// Forbidden in 3.1 and 3.1.1; MQTT 5 allows it.
    #[error("password flag set without the user name flag")]
    PasswordWithoutUsername,
    /// A property block length on five or more bytes.
    #[error("{field} length is longer than 4 bytes")]
    MalformedPropertyLength {
        /// Which property block.
        field: Field,
    },
    /// An identifier MQTT 5 does not define for this block.
    #[error("{field}: property {id:#04x} is not allowed here")]
    InvalidProperty {
        /// Which property block.
        field: Field,
        /// The identifier's first byte.
        id: u8,
    },
    /// Only user properties may repeat.
    #[error("{field}: property {id:#04x} appears more than once")]
    DuplicateProperty {
        /// Which property block.
        field: Field,
        /// The repeated identifier.
        id: u8,
    },
    /// A property value does not fit in its block, though the block fits in the packet.
    #[error("{field}: property {id:#04x} runs past the end of the property block")]
    PropertyTruncated {
        /// Which property block.
        field: Field,
        /// The property that overran.
        id: u8,
    },
    /// Kept apart from other bad strings because MQTT 5 clients get a CONNACK for it.
    #[error("client identifier {problem}")]
    InvalidClientId {
        /// Decides the CONNACK: MQTT 5 has a reason code for it, 3.x has none that fits.
        version: ProtocolVersion,
        /// What is wrong with it.
        problem: StringProblem,
    },
    /// A bad will topic, user name or string property.
    #[error("{field} {problem}")]
    InvalidString {
        /// Where the string was.
        field: Field,
        /// What is wrong with it.
        problem: StringProblem,
    },
    /// Bytes inside the remaining length that no flag accounts for: the client and the
    /// proxy disagree on the layout, so neither can be trusted.
    #[error("{count} unexpected bytes after the last CONNECT field")]
    ExtraBytes {
        /// How many.
        count: usize,
    },
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
    let username_at = r.position();
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
        username_at,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// 3.1.1, the smallest useful CONNECT.
    const V311_MINIMAL: &[u8] = &[
        0x10, 0x10, // CONNECT, remaining length 16
        0x00, 0x04, b'M', b'Q', b'T', b'T', // protocol name "MQTT"
        0x04, // level 4
        0x02, // flags: clean session
        0x00, 0x3c, // keep alive 60
        0x00, 0x04, b'd', b'e', b'v', b'1', // client id "dev1"
    ];

    /// 3.1.1 with every optional field, followed by the client's next packet.
    const V311_FULL: &[u8] = &[
        0x10, 0x22, // CONNECT, remaining length 34
        0x00, 0x04, b'M', b'Q', b'T', b'T', // protocol name "MQTT"
        0x04, // level 4
        0xee, // flags: user name, password, will retain, will QoS 1, will, clean session
        0x01, 0x2c, // keep alive 300
        0x00, 0x02, b'c', b'1', // client id "c1"
        0x00, 0x03, b'w', b'/', b't', // will topic "w/t"
        0x00, 0x03, b'b', b'y', b'e', // will payload "bye"
        0x00, 0x04, b'u', b's', b'e', b'r', // user name "user"
        0x00, 0x02, 0x00, 0xff, // password, binary
        0xc0, 0x00, // trailing: PINGREQ, not part of the CONNECT
    ];

    /// 3.1: protocol name "MQIsdp" at level 3.
    const V31: &[u8] = &[
        0x10, 0x11, // CONNECT, remaining length 17
        0x00, 0x06, b'M', b'Q', b'I', b's', b'd', b'p', // protocol name "MQIsdp"
        0x03, // level 3
        0x00, // flags: none (persistent session)
        0x00, 0x0a, // keep alive 10
        0x00, 0x03, b'a', b'b', b'c', // client id "abc"
    ];

    /// 5.0 with CONNECT properties and an empty client id.
    const V5_PROPS: &[u8] = &[
        0x10, 0x1c, // CONNECT, remaining length 28
        0x00, 0x04, b'M', b'Q', b'T', b'T', // protocol name "MQTT"
        0x05, // level 5
        0x02, // flags: clean start
        0x00, 0x00, // keep alive 0
        0x0f, // properties length 15
        0x11, 0x00, 0x00, 0x0e, 0x10, // session expiry interval 3600
        0x21, 0x00, 0x0a, // receive maximum 10
        0x26, 0x00, 0x01, b'k', 0x00, 0x01, b'v', // user property "k" = "v"
        0x00, 0x00, // client id "" (broker assigns one)
    ];

    /// 5.0 with a will carrying will properties, user name and password, then trailing bytes.
    const V5_WILL: &[u8] = &[
        0x10, 0x2c, // CONNECT, remaining length 44
        0x00, 0x04, b'M', b'Q', b'T', b'T', // protocol name "MQTT"
        0x05, // level 5
        0xc6, // flags: user name, password, will (QoS 0), clean start
        0x00, 0x1e, // keep alive 30
        0x00, // properties length 0
        0x00, 0x02, b'i', b'd', // client id "id"
        0x0d, // will properties length 13
        0x18, 0x00, 0x00, 0x00, 0x05, // will delay interval 5
        0x01, 0x01, // payload format indicator: UTF-8
        0x03, 0x00, 0x03, b't', b'/', b'p', // content type "t/p"
        0x00, 0x03, b'l', b'w', b't', // will topic "lwt"
        0x00, 0x02, 0xde, 0xad, // will payload, binary
        0x00, 0x01, b'u', // user name "u"
        0x00, 0x01, b'p', // password "p"
        0x30, 0x00, // trailing: start of a PUBLISH, not part of the CONNECT
    ];

    const VALID: &[&[u8]] = &[V311_MINIMAL, V311_FULL, V31, V5_PROPS, V5_WILL];

    /// A copy of a single-byte-remaining-length packet whose body is cut to `body_len` bytes,
    /// with the remaining length fixed to match, so fields run past the packet, not the buffer.
    fn cut(packet: &[u8], body_len: usize) -> Vec<u8> {
        assert!(body_len < 0x80);
        let mut out = vec![packet[0], body_len as u8];
        out.extend_from_slice(&packet[2..2 + body_len]);
        out
    }

    /// Builds a packet from a body, encoding the remaining length.
    fn with_header(body: &[u8]) -> Vec<u8> {
        let mut out = vec![0x10];
        let mut n = body.len();
        loop {
            let byte = (n % 128) as u8;
            n /= 128;
            if n == 0 {
                out.push(byte);
                break;
            }
            out.push(byte | 0x80);
        }
        out.extend_from_slice(body);
        out
    }

    #[test]
    fn parses_v311_minimal() {
        let c = parse_connect(V311_MINIMAL).unwrap();
        assert_eq!(
            c,
            Connect {
                version: ProtocolVersion::V3_1_1,
                client_id: "dev1".into(),
                username: None,
                keep_alive: 60,
                clean_start: true,
                will: None,
                has_password: false,
                session_expiry_interval: None,
                client_id_range: 14..18,
                username_at: 18,
                packet_len: 18,
            }
        );
        assert_eq!(&V311_MINIMAL[c.client_id_range], b"dev1");
    }

    #[test]
    fn parses_v311_full_ignoring_trailing_bytes() {
        let c = parse_connect(V311_FULL).unwrap();
        assert_eq!(c.version, ProtocolVersion::V3_1_1);
        assert_eq!(c.client_id, "c1");
        assert_eq!(c.username.as_deref(), Some("user"));
        assert!(c.has_password);
        assert_eq!(c.keep_alive, 300);
        assert!(c.clean_start);
        assert_eq!(
            c.will,
            Some(Will {
                qos: 1,
                retain: true
            })
        );
        assert_eq!(c.packet_len, V311_FULL.len() - 2);
        assert_eq!(&V311_FULL[c.client_id_range], b"c1");
    }

    #[test]
    fn parses_v31() {
        let c = parse_connect(V31).unwrap();
        assert_eq!(c.version, ProtocolVersion::V3_1);
        assert_eq!(c.client_id, "abc");
        assert_eq!(c.keep_alive, 10);
        assert!(!c.clean_start);
        assert_eq!(c.will, None);
    }

    #[test]
    fn parses_v5_properties_and_empty_client_id() {
        let c = parse_connect(V5_PROPS).unwrap();
        assert_eq!(c.version, ProtocolVersion::V5);
        assert_eq!(c.client_id, "");
        assert_eq!(c.client_id_range, 30..30);
        assert_eq!(c.session_expiry_interval, Some(3600));
        assert_eq!(c.keep_alive, 0);
        assert!(c.clean_start);
        assert_eq!(c.packet_len, V5_PROPS.len());
    }

    #[test]
    fn parses_v5_will_username_password() {
        let c = parse_connect(V5_WILL).unwrap();
        assert_eq!(c.version, ProtocolVersion::V5);
        assert_eq!(c.client_id, "id");
        assert_eq!(c.username.as_deref(), Some("u"));
        assert!(c.has_password);
        assert_eq!(
            c.will,
            Some(Will {
                qos: 0,
                retain: false
            })
        );
        assert_eq!(c.session_expiry_interval, None);
        assert_eq!(c.packet_len, V5_WILL.len() - 2);
        assert_eq!(&V5_WILL[c.client_id_range], b"id");
    }

    #[test]
    fn v5_password_without_username_is_allowed() {
        let p = [
            0x10, 0x10, // CONNECT, remaining length 16
            0x00, 0x04, b'M', b'Q', b'T', b'T', // protocol name "MQTT"
            0x05, // level 5
            0x40, // flags: password only
            0x00, 0x00, // keep alive 0
            0x00, // properties length 0
            0x00, 0x00, // client id ""
            0x00, 0x01, b'p', // password "p"
        ];
        let c = parse_connect(&p).unwrap();
        assert!(c.has_password);
        assert_eq!(c.username, None);
    }

    #[test]
    fn parses_packet_with_two_byte_remaining_length() {
        let mut body = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', 0x04, 0x02, 0x00, 0x3c];
        body.extend_from_slice(&[0x00, 200]);
        body.extend(std::iter::repeat_n(b'x', 200));
        let p = with_header(&body);
        assert_eq!(
            &p[..3],
            &[0x10, 0xd4, 0x01],
            "remaining length 212 on two bytes"
        );
        let c = parse_connect(&p).unwrap();
        assert_eq!(c.client_id.len(), 200);
        assert_eq!(c.client_id_range, 15..215);
        assert_eq!(c.packet_len, 215);
    }

    #[test]
    fn frames_remaining_lengths_of_one_to_four_bytes() {
        let cases: &[(&[u8], usize, usize)] = &[
            (&[0x10, 0x00], 2, 2),
            (&[0x10, 0x7f], 2, 129),
            (&[0x10, 0x80, 0x01], 3, 131),
            (&[0x10, 0xff, 0x7f], 3, 16_386),
            (&[0x10, 0x80, 0x80, 0x01], 4, 16_388),
            (&[0x10, 0xff, 0xff, 0x7f], 4, 2_097_155),
            (&[0x10, 0x80, 0x80, 0x80, 0x01], 5, 2_097_157),
            (&[0x10, 0xff, 0xff, 0xff, 0x7f], 5, 268_435_460),
            // Non-minimal encoding of 16 is accepted.
            (&[0x10, 0x90, 0x00], 3, 19),
        ];
        for &(buf, header_len, total_len) in cases {
            assert_eq!(
                frame_connect(buf, usize::MAX),
                Ok(Framing::Complete {
                    header_len,
                    total_len
                }),
                "{buf:02x?}"
            );
        }
        assert_eq!(
            frame_connect(V311_FULL, 64),
            Ok(Framing::Complete {
                header_len: 2,
                total_len: 36
            })
        );
    }

    #[test]
    fn frames_incomplete_headers() {
        for buf in [
            &[][..],
            &[0x10],
            &[0x10, 0x80],
            &[0x10, 0x80, 0x80],
            &[0x10, 0xff, 0xff, 0xff],
        ] {
            assert_eq!(
                frame_connect(buf, 1024),
                Ok(Framing::Incomplete { needed: 1 }),
                "{buf:02x?}"
            );
        }
    }

    #[test]
    fn incomplete_body_frames_but_does_not_parse() {
        let partial = &V5_PROPS[..20];
        assert_eq!(
            frame_connect(partial, 1024),
            Ok(Framing::Complete {
                header_len: 2,
                total_len: 30
            })
        );
        assert_eq!(
            parse_connect(partial),
            Err(ConnectError::PacketIncomplete { needed: 10 })
        );
        assert_eq!(
            parse_connect(&[0x10, 0x80]),
            Err(ConnectError::PacketIncomplete { needed: 1 })
        );
    }

    #[test]
    fn rejects_other_first_packets() {
        let publish = [0x30, 0x02, 0x00, 0x00];
        let err = frame_connect(&publish, 1024).unwrap_err();
        assert_eq!(err, ConnectError::NotConnect { packet_type: 3 });
        assert_eq!(parse_connect(&publish).unwrap_err(), err);
        assert_eq!(err.reject_reason(), RejectReason::Malformed);
        assert_eq!(err.connack(), None);

        // CONNECT type with a reserved header flag set.
        let mut flagged = V311_MINIMAL.to_vec();
        flagged[0] = 0x11;
        let err = frame_connect(&flagged, 1024).unwrap_err();
        assert_eq!(err, ConnectError::BadHeaderFlags { flags: 1 });
        assert_eq!(parse_connect(&flagged).unwrap_err(), err);
        assert_eq!(err.reject_reason(), RejectReason::Malformed);
        assert_eq!(err.connack(), None);

        // Decided from the first byte alone.
        assert_eq!(
            frame_connect(&[0x20], 1024),
            Err(ConnectError::NotConnect { packet_type: 2 })
        );
    }

    #[test]
    fn rejects_five_byte_remaining_length() {
        let buf = [0x10, 0x80, 0x80, 0x80, 0x80, 0x01];
        let err = frame_connect(&buf, usize::MAX).unwrap_err();
        assert_eq!(err, ConnectError::MalformedRemainingLength);
        // Known as soon as the fourth length byte still continues.
        assert_eq!(frame_connect(&buf[..5], usize::MAX), Err(err.clone()));
        assert_eq!(parse_connect(&buf), Err(err.clone()));
        assert_eq!(err.reject_reason(), RejectReason::Malformed);
        assert_eq!(err.connack(), None);
    }

    #[test]
    fn rejects_truncated_fields_at_every_position() {
        use Field::*;
        // (packet, expected field for body lengths 0.., in order, with the cut-off lengths).
        let v311: &[(usize, Field)] = &[
            (6, ProtocolName),
            (7, ProtocolLevel),
            (8, ConnectFlags),
            (10, KeepAlive),
            (14, ClientId),
            (19, WillTopic),
            (24, WillPayload),
            (30, Username),
            (34, Password),
        ];
        let v5_props: &[(usize, Field)] = &[
            (6, ProtocolName),
            (7, ProtocolLevel),
            (8, ConnectFlags),
            (10, KeepAlive),
            (26, Properties),
            (28, ClientId),
        ];
        let v5_will: &[(usize, Field)] = &[
            (6, ProtocolName),
            (7, ProtocolLevel),
            (8, ConnectFlags),
            (10, KeepAlive),
            (11, Properties),
            (15, ClientId),
            (29, WillProperties),
            (34, WillTopic),
            (38, WillPayload),
            (41, Username),
            (44, Password),
        ];
        for (packet, table) in [(V311_FULL, v311), (V5_PROPS, v5_props), (V5_WILL, v5_will)] {
            let full = table.last().unwrap().0;
            for body_len in 0..full {
                let field = table.iter().find(|(end, _)| body_len < *end).unwrap().1;
                let p = cut(packet, body_len);
                assert_eq!(
                    parse_connect(&p),
                    Err(ConnectError::Truncated { field }),
                    "body cut to {body_len} bytes: {p:02x?}"
                );
                let err = parse_connect(&p).unwrap_err();
                assert_eq!(err.reject_reason(), RejectReason::Malformed);
                assert_eq!(err.connack(), None);
            }
            assert!(parse_connect(&cut(packet, full)).is_ok());
        }
    }

    #[test]
    fn rejects_extra_bytes_inside_the_packet() {
        let mut p = cut(V311_MINIMAL, 16);
        p[1] = 18;
        p.extend_from_slice(&[0xaa, 0xbb]);
        assert_eq!(
            parse_connect(&p),
            Err(ConnectError::ExtraBytes { count: 2 })
        );
    }

    #[test]
    fn rejects_unknown_protocol_name() {
        let p = [
            0x10, 0x0e, // CONNECT, remaining length 14
            0x00, 0x04, b'H', b'T', b'T', b'P', // protocol name "HTTP"
            0x04, // level 4
            0x02, // flags: clean session
            0x00, 0x3c, // keep alive 60
            0x00, 0x02, b'i', b'd', // client id "id"
        ];
        let err = parse_connect(&p).unwrap_err();
        assert_eq!(
            err,
            ConnectError::UnknownProtocol {
                name: b"HTTP".to_vec()
            }
        );
        assert_eq!(err.reject_reason(), RejectReason::BadProtocol);
        assert_eq!(err.connack(), None);
        assert_eq!(sniff_version(&p), None);
        // The name is judged before the level is even read.
        assert_eq!(parse_connect(&cut(&p, 6)), Err(err));
    }

    #[test]
    fn rejects_unsupported_levels_with_a_311_connack() {
        let mut mqtt6 = V311_MINIMAL.to_vec();
        mqtt6[8] = 6; // "MQTT" level 6
        let mut mqisdp4 = V31.to_vec();
        mqisdp4[10] = 4; // "MQIsdp" level 4
        let mut mqtt3 = V311_MINIMAL.to_vec();
        mqtt3[8] = 3; // "MQTT" level 3
        for (p, protocol, level) in [
            (mqtt6, "MQTT", 6),
            (mqisdp4, "MQIsdp", 4),
            (mqtt3, "MQTT", 3),
        ] {
            let err = parse_connect(&p).unwrap_err();
            assert_eq!(err, ConnectError::UnsupportedLevel { protocol, level });
            assert_eq!(err.reject_reason(), RejectReason::BadProtocol);
            assert_eq!(
                err.connack().unwrap().as_ref(),
                &[0x20, 0x02, 0x00, 0x01],
                "CONNACK, length 2, flags 0, unacceptable protocol version"
            );
            assert_eq!(sniff_version(&p), None);
        }
    }

    #[test]
    fn rejects_bad_client_ids() {
        // V311_MINIMAL's client id bytes are at 14..18, V5_WILL's at 15..17.
        let cases: &[(&[u8], usize, u8, StringProblem)] = &[
            (V311_MINIMAL, 15, 0xff, StringProblem::InvalidUtf8),
            (V311_MINIMAL, 15, 0x00, StringProblem::ContainsNull),
            (V5_WILL, 16, 0xc3, StringProblem::InvalidUtf8), // truncated 2-byte sequence
            (V5_WILL, 16, 0x00, StringProblem::ContainsNull),
        ];
        for &(packet, at, byte, problem) in cases {
            let mut p = packet.to_vec();
            p[at] = byte;
            let err = parse_connect(&p).unwrap_err();
            let version = sniff_version(&p).unwrap();
            assert_eq!(err, ConnectError::InvalidClientId { version, problem });
            assert_eq!(err.reject_reason(), RejectReason::Malformed);
            match version {
                ProtocolVersion::V5 => assert_eq!(
                    err.connack().unwrap().as_ref(),
                    &[0x20, 0x03, 0x00, 0x81, 0x00],
                    "CONNACK, length 3, flags 0, malformed packet, no properties"
                ),
                _ => assert_eq!(err.connack(), None),
            }
        }
        // Surrogate code points encoded in UTF-8 are not well-formed either.
        let mut p = V311_MINIMAL.to_vec();
        p[15..18].copy_from_slice(&[0xed, 0xa0, 0x80]);
        assert!(matches!(
            parse_connect(&p),
            Err(ConnectError::InvalidClientId {
                problem: StringProblem::InvalidUtf8,
                ..
            })
        ));
    }

    #[test]
    fn accepts_multibyte_utf8_client_id() {
        let mut p = V311_MINIMAL.to_vec();
        p[14..18].copy_from_slice("dé1".as_bytes());
        assert_eq!(parse_connect(&p).unwrap().client_id, "dé1");
    }

    #[test]
    fn rejects_bad_strings_in_other_fields() {
        let mut p = V311_FULL.to_vec();
        p[20] = 0x00; // will topic "w\0t"
        assert_eq!(
            parse_connect(&p),
            Err(ConnectError::InvalidString {
                field: Field::WillTopic,
                problem: StringProblem::ContainsNull
            })
        );
        let mut p = V311_FULL.to_vec();
        p[31] = 0xfe; // user name "u\xfeer"
        assert_eq!(
            parse_connect(&p),
            Err(ConnectError::InvalidString {
                field: Field::Username,
                problem: StringProblem::InvalidUtf8
            })
        );
        let mut p = V5_PROPS.to_vec();
        p[27] = 0xff; // user property key "\xff"
        assert_eq!(
            parse_connect(&p),
            Err(ConnectError::InvalidString {
                field: Field::Properties,
                problem: StringProblem::InvalidUtf8
            })
        );
    }

    #[test]
    fn too_large_connack_depends_on_known_version() {
        // Only the fixed header and the protocol level were read: the caller's ~10 byte peek.
        let v5 = &V5_PROPS[..9];
        let err = frame_connect(v5, 16).unwrap_err();
        assert_eq!(
            err,
            ConnectError::TooLarge {
                size: 30,
                max: 16,
                version: Some(ProtocolVersion::V5)
            }
        );
        assert_eq!(err.reject_reason(), RejectReason::TooLarge);
        assert_eq!(
            err.connack().unwrap().as_ref(),
            &[0x20, 0x03, 0x00, 0x95, 0x00],
            "CONNACK, length 3, flags 0, packet too large, no properties"
        );

        let err = frame_connect(&V311_MINIMAL[..9], 16).unwrap_err();
        assert_eq!(
            err,
            ConnectError::TooLarge {
                size: 18,
                max: 16,
                version: Some(ProtocolVersion::V3_1_1)
            }
        );
        assert_eq!(err.reject_reason(), RejectReason::TooLarge);
        assert_eq!(err.connack(), None);

        // Version not yet visible: no CONNACK either.
        let err = frame_connect(&[0x10, 0xff, 0xff, 0x7f], 1024).unwrap_err();
        assert_eq!(
            err,
            ConnectError::TooLarge {
                size: 2_097_155,
                max: 1024,
                version: None
            }
        );
        assert_eq!(err.connack(), None);

        // Exactly at the limit is fine.
        assert!(frame_connect(V311_MINIMAL, 18).is_ok());
    }

    #[test]
    fn rejects_bad_connect_flags() {
        let with_flags = |flags: u8| {
            let mut p = V311_MINIMAL.to_vec();
            p[9] = flags;
            parse_connect(&p)
        };
        assert_eq!(with_flags(0x03), Err(ConnectError::ReservedFlagSet));
        assert_eq!(with_flags(0x1e), Err(ConnectError::InvalidWillQos)); // will, QoS 3
        assert_eq!(with_flags(0x0a), Err(ConnectError::WillFlagsWithoutWill)); // QoS 1, no will
        assert_eq!(with_flags(0x22), Err(ConnectError::WillFlagsWithoutWill)); // retain, no will
        assert_eq!(with_flags(0x42), Err(ConnectError::PasswordWithoutUsername));
        for flags in [0x03, 0x1e, 0x0a, 0x22, 0x42] {
            let err = with_flags(flags).unwrap_err();
            assert_eq!(err.reject_reason(), RejectReason::Malformed);
            assert_eq!(err.connack(), None);
        }
    }

    #[test]
    fn rejects_bad_properties() {
        // V5_PROPS's properties: length at 12, then session expiry at 13..18.
        let mut p = V5_PROPS.to_vec();
        p[13] = 0x18; // will delay interval is not a CONNECT property
        assert_eq!(
            parse_connect(&p),
            Err(ConnectError::InvalidProperty {
                field: Field::Properties,
                id: 0x18
            })
        );

        let mut p = V5_PROPS.to_vec();
        p[18] = 0x11; // receive maximum replaced by a second session expiry (its 3 bytes fall short)
        assert_eq!(
            parse_connect(&p),
            Err(ConnectError::DuplicateProperty {
                field: Field::Properties,
                id: 0x11
            })
        );

        // A property value running past its block, while the block fits the packet.
        let p = [
            0x10, 0x0f, // CONNECT, remaining length 15
            0x00, 0x04, b'M', b'Q', b'T', b'T', // protocol name "MQTT"
            0x05, // level 5
            0x00, // flags: none
            0x00, 0x00, // keep alive 0
            0x02, // properties length 2
            0x21, 0x00, // receive maximum, one of its two bytes
            0x00, 0x00, // client id ""
        ];
        assert_eq!(
            parse_connect(&p),
            Err(ConnectError::PropertyTruncated {
                field: Field::Properties,
                id: 0x21
            })
        );

        // Properties length on five bytes.
        let p = [
            0x10, 0x0f, // CONNECT, remaining length 15
            0x00, 0x04, b'M', b'Q', b'T', b'T', // protocol name "MQTT"
            0x05, // level 5
            0x00, // flags: none
            0x00, 0x00, // keep alive 0
            0x80, 0x80, 0x80, 0x80, 0x01, // properties length, malformed
        ];
        let err = parse_connect(&p).unwrap_err();
        assert_eq!(
            err,
            ConnectError::MalformedPropertyLength {
                field: Field::Properties
            }
        );
        assert_eq!(err.reject_reason(), RejectReason::Malformed);

        // V5_WILL's will properties start at 17 (length) then will delay at 18.
        let mut p = V5_WILL.to_vec();
        p[18] = 0x11; // session expiry is not a will property
        assert_eq!(
            parse_connect(&p),
            Err(ConnectError::InvalidProperty {
                field: Field::WillProperties,
                id: 0x11
            })
        );
        let mut p = V5_WILL.to_vec();
        p[18] = 0x80; // a multi-byte identifier: none is defined
        assert_eq!(
            parse_connect(&p),
            Err(ConnectError::InvalidProperty {
                field: Field::WillProperties,
                id: 0x80
            })
        );
    }

    #[test]
    fn sniffs_versions_from_short_prefixes() {
        assert_eq!(sniff_version(&V31[..11]), Some(ProtocolVersion::V3_1));
        assert_eq!(
            sniff_version(&V311_MINIMAL[..9]),
            Some(ProtocolVersion::V3_1_1)
        );
        assert_eq!(sniff_version(&V5_PROPS[..9]), Some(ProtocolVersion::V5));
        assert_eq!(sniff_version(&V5_PROPS[..8]), None, "level not yet read");
        assert_eq!(sniff_version(&[0x10]), None);
        assert_eq!(sniff_version(&[0x30, 0x10, 0x00, 0x04]), None);
        // Name and level must lie inside the packet's remaining length.
        assert_eq!(sniff_version(&cut(V5_PROPS, 6)), None);
    }

    #[test]
    fn error_messages_are_readable() {
        assert_eq!(
            ConnectError::Truncated {
                field: Field::WillTopic
            }
            .to_string(),
            "CONNECT truncated: will topic runs past the end of the packet"
        );
        assert_eq!(
            ConnectError::UnknownProtocol {
                name: b"HT\xffP".to_vec()
            }
            .to_string(),
            "unknown protocol name \"HT\u{fffd}P\""
        );
        assert_eq!(
            ConnectError::InvalidClientId {
                version: ProtocolVersion::V5,
                problem: StringProblem::ContainsNull
            }
            .to_string(),
            "client identifier contains U+0000"
        );
    }

    /// Deterministic xorshift64, so fuzz-style loops need no extra crates and are reproducible.
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    /// The properties every input must satisfy, whatever its bytes.
    fn check_invariants(buf: &[u8]) {
        let framing = frame_connect(buf, 4096);
        let sniffed = sniff_version(buf);
        let parsed = parse_connect(buf);
        if let Ok(c) = &parsed {
            assert_eq!(Some(c.version), sniffed);
            assert!(c.packet_len <= buf.len());
            assert!(c.client_id_range.end <= c.packet_len);
            assert_eq!(c.client_id.as_bytes(), &buf[c.client_id_range.clone()]);
            assert!(
                matches!(framing, Ok(Framing::Complete { total_len, .. }) if total_len == c.packet_len)
            );
        }
        if let Err(e) = &parsed {
            let _ = (e.to_string(), e.reject_reason(), e.connack());
        }
        if let Err(e) = &framing {
            let _ = (e.to_string(), e.reject_reason(), e.connack());
        }
    }

    #[test]
    fn every_prefix_of_valid_packets_is_safe() {
        for packet in VALID {
            let len = parse_connect(packet).unwrap().packet_len;
            for end in 0..=packet.len() {
                let prefix = &packet[..end];
                check_invariants(prefix);
                if end < len {
                    assert!(parse_connect(prefix).is_err(), "strict prefix {end} parsed");
                    assert!(frame_connect(prefix, 4096).is_ok());
                } else {
                    assert!(parse_connect(prefix).is_ok(), "complete at {end}");
                }
            }
        }
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        for _ in 0..20_000 {
            let len = (rng.next() % 64) as usize;
            let mut buf: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            // Give half the inputs a CONNECT header so parsing goes deeper than the first byte.
            if rng.next() & 1 == 0 && buf.len() >= 2 {
                buf[0] = 0x10;
                buf[1] = (buf.len() - 2) as u8;
            }
            check_invariants(&buf);
        }
    }

    #[test]
    fn mutated_valid_packets_never_panic() {
        let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
        for _ in 0..50_000 {
            let packet = VALID[(rng.next() % VALID.len() as u64) as usize];
            let mut buf = packet.to_vec();
            for _ in 0..1 + rng.next() % 3 {
                let at = (rng.next() % buf.len() as u64) as usize;
                buf[at] = rng.next() as u8;
            }
            let keep = (rng.next() % (buf.len() as u64 + 1)) as usize;
            buf.truncate(keep.max(buf.len() / 2));
            check_invariants(&buf);
        }
    }
}
