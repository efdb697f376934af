//! CONNACK encoding for refusals.
//!
//! The proxy only ever sends a CONNACK to refuse a client, so the encoding is fixed: session
//! present 0, no properties. Codes are named per protocol family because 3.x return codes and
//! 5.0 reason codes are different numbering schemes.

use super::ProtocolVersion;

/// 3.x return code telling the client to retry with another protocol level.
pub const V3_UNACCEPTABLE_PROTOCOL_VERSION: u8 = 0x01;
/// 3.x return code for "the network connection was made but the MQTT service is unavailable".
pub const V3_SERVER_UNAVAILABLE: u8 = 0x03;
/// 5.0 reason code for a CONNECT that could not be parsed.
pub const V5_MALFORMED_PACKET: u8 = 0x81;
/// 5.0 reason code for "no broker can take you now"; clients back off and retry.
pub const V5_SERVER_UNAVAILABLE: u8 = 0x88;
/// 3.x return code for a client the server will not accept (no usable client certificate).
pub const V3_NOT_AUTHORIZED: u8 = 0x05;
/// 5.0 reason code for a client the server will not accept (no usable client certificate).
pub const V5_NOT_AUTHORIZED: u8 = 0x87;
/// 5.0 reason code for a CONNECT larger than the proxy accepts.
pub const V5_PACKET_TOO_LARGE: u8 = 0x95;

/// A CONNACK held inline so refusing a client never allocates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Connack {
    bytes: [u8; 5],
    len: u8,
}

impl Connack {
    /// The return/reason code, so callers can log what the client was told.
    pub fn code(&self) -> u8 {
        self.bytes[3]
    }
}

impl AsRef<[u8]> for Connack {
    fn as_ref(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

/// The CONNACK refusing a client of `version` with `code`; the layout differs because MQTT 5
/// adds a properties length the 3.x decoders would not expect.
pub fn connack(version: ProtocolVersion, code: u8) -> Connack {
    match version {
        // Fixed header, remaining length 2, acknowledge flags 0, return code.
        ProtocolVersion::V3_1 | ProtocolVersion::V3_1_1 => Connack {
            bytes: [0x20, 0x02, 0x00, code, 0x00],
            len: 4,
        },
        // Fixed header, remaining length 3, acknowledge flags 0, reason code, properties length 0.
        ProtocolVersion::V5 => Connack {
            bytes: [0x20, 0x03, 0x00, code, 0x00],
            len: 5,
        },
    }
}

/// The CONNACK sent when no broker could take the client, in the client's own dialect.
pub fn server_unavailable(version: ProtocolVersion) -> Connack {
    match version {
        ProtocolVersion::V3_1 | ProtocolVersion::V3_1_1 => connack(version, V3_SERVER_UNAVAILABLE),
        ProtocolVersion::V5 => connack(version, V5_SERVER_UNAVAILABLE),
    }
}

/// The CONNACK sent when the client's certificate cannot give the identity it must connect as.
pub fn not_authorized(version: ProtocolVersion) -> Connack {
    match version {
        ProtocolVersion::V3_1 | ProtocolVersion::V3_1_1 => connack(version, V3_NOT_AUTHORIZED),
        ProtocolVersion::V5 => connack(version, V5_NOT_AUTHORIZED),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v3_layout() {
        for version in [ProtocolVersion::V3_1, ProtocolVersion::V3_1_1] {
            // CONNACK, remaining length 2, flags 0, return code 1.
            assert_eq!(connack(version, 0x01).as_ref(), &[0x20, 0x02, 0x00, 0x01]);
            assert_eq!(connack(version, 0x01).code(), 0x01);
        }
    }

    #[test]
    fn v5_layout() {
        // CONNACK, remaining length 3, flags 0, reason 0x95, properties length 0.
        let c = connack(ProtocolVersion::V5, V5_PACKET_TOO_LARGE);
        assert_eq!(c.as_ref(), &[0x20, 0x03, 0x00, 0x95, 0x00]);
        assert_eq!(c.code(), 0x95);
    }

    #[test]
    fn server_unavailable_per_version() {
        assert_eq!(
            server_unavailable(ProtocolVersion::V3_1).as_ref(),
            &[0x20, 0x02, 0x00, 0x03]
        );
        assert_eq!(
            server_unavailable(ProtocolVersion::V3_1_1).as_ref(),
            &[0x20, 0x02, 0x00, 0x03]
        );
        assert_eq!(
            server_unavailable(ProtocolVersion::V5).as_ref(),
            &[0x20, 0x03, 0x00, 0x88, 0x00]
        );
    }
}
