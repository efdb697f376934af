//! CONNACK encoding for refusals.

use super::ProtocolVersion;

/// The CONNACK bytes refusing a client of `version` with `code`.
pub fn connack(version: ProtocolVersion, code: u8) -> &'static [u8] {
    let _ = (version, code);
    &[]
}
