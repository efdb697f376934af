//! Re-encoding a CONNECT with another client identifier or user name (taken from a client
//! certificate), every other byte kept as the client sent it.

use super::connect::Connect;
use super::wire::{VarInt, decode_varint};

/// The user name flag of the connect flags byte.
const FLAG_USERNAME: u8 = 0x80;
/// MQTT's largest remaining length (four varint bytes).
const MAX_REMAINING: usize = 268_435_455;

/// Why a CONNECT could not be re-encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RewriteError {
    /// The new value is not a valid MQTT UTF-8 string (too long or containing NUL).
    #[error("the new {field} is not a valid MQTT string ({len} bytes{nul})", nul = if *.has_nul { ", contains NUL" } else { "" })]
    InvalidValue {
        /// `client id` or `user name`.
        field: &'static str,
        /// Its length in bytes.
        len: usize,
        /// Whether it contains a NUL character.
        has_nul: bool,
    },
    /// The packet would outgrow MQTT's remaining-length limit.
    #[error("the rewritten CONNECT would be larger than MQTT allows")]
    TooLarge,
    /// `packet` and `connect` do not describe the same CONNECT.
    #[error("the CONNECT bytes do not match their parsed fields")]
    Mismatch,
}

fn check(field: &'static str, value: &str) -> Result<(), RewriteError> {
    if value.len() > usize::from(u16::MAX) || value.contains('\0') {
        return Err(RewriteError::InvalidValue {
            field,
            len: value.len(),
            has_nul: value.contains('\0'),
        });
    }
    Ok(())
}

fn push_string(out: &mut Vec<u8>, value: &str) {
    // Checked by `check`: at most 65535 bytes.
    out.extend_from_slice(&(value.len() as u16).to_be_bytes());
    out.extend_from_slice(value.as_bytes());
}

fn push_varint(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let byte = (n % 128) as u8;
        n /= 128;
        if n == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// Re-encodes `packet` (the CONNECT `connect` was parsed from) with `client_id` and/or `username`
/// replaced; a user name is added (and its flag set) when the client sent none. The remaining
/// length is recomputed; the protocol name, flags, keep-alive, MQTT 5 properties, will and
/// password are copied byte for byte.
pub fn rewrite_connect(
    packet: &[u8],
    connect: &Connect,
    client_id: Option<&str>,
    username: Option<&str>,
) -> Result<Vec<u8>, RewriteError> {
    if let Some(id) = client_id {
        check("client id", id)?;
    }
    if let Some(name) = username {
        check("user name", name)?;
    }
    let packet = packet
        .get(..connect.packet_len)
        .ok_or(RewriteError::Mismatch)?;
    let VarInt::Value { len, .. } = decode_varint(packet.get(1..).unwrap_or_default()) else {
        return Err(RewriteError::Mismatch);
    };
    let header_len = 1 + len;
    // Protocol name (length-prefixed), level, then the flags byte.
    let name_len = match packet.get(header_len..header_len + 2) {
        Some(&[hi, lo]) => usize::from(u16::from_be_bytes([hi, lo])),
        _ => return Err(RewriteError::Mismatch),
    };
    let flags_at = header_len + 2 + name_len + 1;
    let id_start = connect.client_id_range.start;
    let id_end = connect.client_id_range.end;
    let user_at = connect.username_at;
    // The old user name field, if any, ends after its prefix and bytes.
    let user_end = match &connect.username {
        Some(old) => user_at + 2 + old.len(),
        None => user_at,
    };
    // Flags and keep-alive lie before the client id's length prefix.
    if !(id_start >= 2
        && flags_at + 3 <= id_start - 2
        && id_end <= user_at
        && user_end <= packet.len())
    {
        return Err(RewriteError::Mismatch);
    }

    let mut body = Vec::with_capacity(packet.len() + 64);
    body.extend_from_slice(&packet[header_len..id_start - 2]);
    if username.is_some() {
        body[flags_at - header_len] |= FLAG_USERNAME;
    }
    match client_id {
        Some(id) => push_string(&mut body, id),
        None => body.extend_from_slice(&packet[id_start - 2..id_end]),
    }
    body.extend_from_slice(&packet[id_end..user_at]);
    match username {
        Some(name) => push_string(&mut body, name),
        None => body.extend_from_slice(&packet[user_at..user_end]),
    }
    body.extend_from_slice(&packet[user_end..]);
    if body.len() > MAX_REMAINING {
        return Err(RewriteError::TooLarge);
    }
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(packet[0]);
    push_varint(&mut out, body.len());
    out.extend_from_slice(&body);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt::parse_connect;

    fn packet(body: &[u8]) -> Vec<u8> {
        let mut out = vec![0x10];
        push_varint(&mut out, body.len());
        out.extend_from_slice(body);
        out
    }

    fn s(v: &str) -> Vec<u8> {
        let mut out = (v.len() as u16).to_be_bytes().to_vec();
        out.extend_from_slice(v.as_bytes());
        out
    }

    /// name, level, flags, keep-alive, [properties], id, [will props, topic, payload], [user], [pass]
    fn connect(proto: &str, level: u8, flags: u8, props: &[u8], rest: &[&[u8]]) -> Vec<u8> {
        let mut body = s(proto);
        body.extend_from_slice(&[level, flags, 0, 30]);
        body.extend_from_slice(props);
        for part in rest {
            body.extend_from_slice(part);
        }
        packet(&body)
    }

    #[test]
    fn v311_client_id_and_new_username() {
        let original = connect("MQTT", 4, 0x02, &[], &[&s("dev1")]);
        let c = parse_connect(&original).unwrap();
        let out = rewrite_connect(&original, &c, Some("2A2B3C4D"), Some("cn")).unwrap();
        let expected = connect("MQTT", 4, 0x82, &[], &[&s("2A2B3C4D"), &s("cn")]);
        assert_eq!(out, expected);
        let parsed = parse_connect(&out).unwrap();
        assert_eq!(parsed.client_id, "2A2B3C4D");
        assert_eq!(parsed.username.as_deref(), Some("cn"));
        assert_eq!(parsed.keep_alive, 30);
    }

    #[test]
    fn v31_with_will_username_and_password_keeps_the_rest() {
        let will = [s("will/topic"), s("bye")].concat();
        let original = connect(
            "MQIsdp",
            3,
            0xC0 | 0x04 | 0x08 | 0x20 | 0x02,
            &[],
            &[&s("old-id"), &will, &s("user"), &s("secret")],
        );
        let c = parse_connect(&original).unwrap();
        let out = rewrite_connect(&original, &c, None, Some("device-7")).unwrap();
        let expected = connect(
            "MQIsdp",
            3,
            0xC0 | 0x04 | 0x08 | 0x20 | 0x02,
            &[],
            &[&s("old-id"), &will, &s("device-7"), &s("secret")],
        );
        assert_eq!(out, expected);
        let out = rewrite_connect(&original, &c, Some("x"), None).unwrap();
        let expected = connect(
            "MQIsdp",
            3,
            0xC0 | 0x04 | 0x08 | 0x20 | 0x02,
            &[],
            &[&s("x"), &will, &s("user"), &s("secret")],
        );
        assert_eq!(out, expected);
    }

    #[test]
    fn v5_properties_and_will_properties_are_preserved() {
        // Session expiry 3600 and a user property; will delay 5.
        let props = [&[12u8, 0x11, 0, 0, 0x0e, 0x10, 0x26][..], &s("k"), &s("v")].concat();
        let will = [&[5u8, 0x18, 0, 0, 0, 5][..], &s("t"), &s("p")].concat();
        let password_only = 0x40 | 0x04 | 0x02;
        let original = connect(
            "MQTT",
            5,
            password_only,
            &props,
            &[&s("id"), &will, &s("pw")],
        );
        let c = parse_connect(&original).unwrap();
        assert_eq!(c.session_expiry_interval, Some(3600));
        let out = rewrite_connect(&original, &c, Some("fingerprint"), Some("serial")).unwrap();
        let expected = connect(
            "MQTT",
            5,
            password_only | 0x80,
            &props,
            &[&s("fingerprint"), &will, &s("serial"), &s("pw")],
        );
        assert_eq!(out, expected);
        assert_eq!(
            parse_connect(&out).unwrap().session_expiry_interval,
            Some(3600)
        );
    }

    #[test]
    fn remaining_length_grows_past_one_byte() {
        let original = connect("MQTT", 4, 0x02, &[], &[&s("a")]);
        let c = parse_connect(&original).unwrap();
        let long = "f".repeat(200);
        let out = rewrite_connect(&original, &c, Some(&long), None).unwrap();
        assert_eq!(out, connect("MQTT", 4, 0x02, &[], &[&s(&long)]));
        assert_eq!(&out[1..3], &[0xD4, 0x01]); // 10 + 2 + 200 = 212
        assert_eq!(parse_connect(&out).unwrap().client_id, long);
    }

    #[test]
    fn invalid_values_are_refused() {
        let original = connect("MQTT", 4, 0x02, &[], &[&s("a")]);
        let c = parse_connect(&original).unwrap();
        assert!(matches!(
            rewrite_connect(&original, &c, Some("a\0b"), None),
            Err(RewriteError::InvalidValue { has_nul: true, .. })
        ));
        let huge = "x".repeat(70_000);
        assert!(matches!(
            rewrite_connect(&original, &c, None, Some(&huge)),
            Err(RewriteError::InvalidValue { len: 70_000, .. })
        ));
    }
}
