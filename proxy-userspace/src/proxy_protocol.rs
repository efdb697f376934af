//! PROXY protocol headers (v1 text, v2 binary) that tell a broker the real client address.
//!
//! Written once per connection, before the CONNECT, on the broker leg. EMQX, HiveMQ and VerneMQ
//! accept both versions; without it every client would appear to come from mqsplice.

use crate::config::ProxyProtocol;
use std::net::{IpAddr, SocketAddr};

/// The 12-byte signature that opens every v2 header.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// The header announcing a connection from `client` to `local` (the address the client reached),
/// or an empty vector when the protocol is off.
pub fn header(version: ProxyProtocol, client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    let (client, local) = (unmap(client), unmap(local));
    match version {
        ProxyProtocol::Off => Vec::new(),
        ProxyProtocol::V1 => v1(client, local).into_bytes(),
        ProxyProtocol::V2 => v2(client, local),
    }
}

/// An IPv4 client seen through an IPv6 socket is announced as IPv4, as brokers log it.
fn unmap(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), addr.port()),
            None => addr,
        },
        IpAddr::V4(_) => addr,
    }
}

fn v1(client: SocketAddr, local: SocketAddr) -> String {
    let family = match (client, local) {
        (SocketAddr::V4(_), SocketAddr::V4(_)) => "TCP4",
        (SocketAddr::V6(_), SocketAddr::V6(_)) => "TCP6",
        // v1 cannot describe a connection whose ends are of different families.
        _ => return "PROXY UNKNOWN\r\n".to_string(),
    };
    format!(
        "PROXY {family} {} {} {} {}\r\n",
        client.ip(),
        local.ip(),
        client.port(),
        local.port()
    )
}

fn v2(client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + 36);
    out.extend_from_slice(&V2_SIGNATURE);
    // Version 2, command PROXY.
    out.push(0x21);
    match (client, local) {
        (SocketAddr::V4(c), SocketAddr::V4(l)) => {
            out.push(0x11); // AF_INET, STREAM
            out.extend_from_slice(&12u16.to_be_bytes());
            out.extend_from_slice(&c.ip().octets());
            out.extend_from_slice(&l.ip().octets());
            out.extend_from_slice(&c.port().to_be_bytes());
            out.extend_from_slice(&l.port().to_be_bytes());
        }
        (SocketAddr::V6(c), SocketAddr::V6(l)) => {
            out.push(0x21); // AF_INET6, STREAM
            out.extend_from_slice(&36u16.to_be_bytes());
            out.extend_from_slice(&c.ip().octets());
            out.extend_from_slice(&l.ip().octets());
            out.extend_from_slice(&c.port().to_be_bytes());
            out.extend_from_slice(&l.port().to_be_bytes());
        }
        _ => {
            out.push(0x00); // AF_UNSPEC: the receiver keeps the socket's own addresses
            out.extend_from_slice(&0u16.to_be_bytes());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn off_writes_nothing() {
        assert!(header(ProxyProtocol::Off, addr("1.2.3.4:5"), addr("6.7.8.9:1883")).is_empty());
    }

    #[test]
    fn v1_ipv4_and_ipv6() {
        let h = header(
            ProxyProtocol::V1,
            addr("192.0.2.7:40001"),
            addr("198.51.100.1:1883"),
        );
        assert_eq!(h, b"PROXY TCP4 192.0.2.7 198.51.100.1 40001 1883\r\n");
        let h = header(
            ProxyProtocol::V1,
            addr("[2001:db8::7]:40001"),
            addr("[::1]:1883"),
        );
        assert_eq!(h, b"PROXY TCP6 2001:db8::7 ::1 40001 1883\r\n");
    }

    #[test]
    fn v1_mixed_families_is_unknown_but_mapped_v4_is_v4() {
        let h = header(
            ProxyProtocol::V1,
            addr("[2001:db8::7]:1"),
            addr("10.0.0.1:1883"),
        );
        assert_eq!(h, b"PROXY UNKNOWN\r\n");
        let h = header(
            ProxyProtocol::V1,
            addr("[::ffff:192.0.2.7]:1"),
            addr("[::ffff:10.0.0.1]:1883"),
        );
        assert_eq!(h, b"PROXY TCP4 192.0.2.7 10.0.0.1 1 1883\r\n");
    }

    #[test]
    fn v2_ipv4_layout() {
        let h = header(
            ProxyProtocol::V2,
            addr("192.0.2.7:40001"),
            addr("198.51.100.1:1883"),
        );
        let mut want = V2_SIGNATURE.to_vec();
        want.extend_from_slice(&[0x21, 0x11, 0, 12]); // v2 PROXY, TCP over IPv4, 12 address bytes
        want.extend_from_slice(&[192, 0, 2, 7]); // source address
        want.extend_from_slice(&[198, 51, 100, 1]); // destination address
        want.extend_from_slice(&40001u16.to_be_bytes()); // source port
        want.extend_from_slice(&1883u16.to_be_bytes()); // destination port
        assert_eq!(h, want);
    }

    #[test]
    fn v2_ipv6_layout() {
        let h = header(
            ProxyProtocol::V2,
            addr("[2001:db8::7]:40001"),
            addr("[::1]:1883"),
        );
        assert_eq!(&h[12..16], &[0x21, 0x21, 0, 36]);
        assert_eq!(h.len(), 16 + 36);
        assert_eq!(
            &h[16..32],
            &"2001:db8::7"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets()
        );
        assert_eq!(&h[48..50], &40001u16.to_be_bytes());
        assert_eq!(&h[50..52], &1883u16.to_be_bytes());
    }
}
