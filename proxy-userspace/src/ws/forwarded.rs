//! The client's address behind trusted reverse proxies: `X-Forwarded-For`, then `X-Real-IP`.

use ipnet::IpNet;
use std::net::{IpAddr, SocketAddr};

/// The address to balance on and announce in the PROXY header.
///
/// Only a trusted peer's headers count. `X-Forwarded-For` is walked from the right (the hop
/// nearest to us) past trusted proxies; the first untrusted address is the client. When every
/// hop is trusted the leftmost is taken; an unparsable entry stops the walk at the last good one.
pub fn client_ip(
    peer: IpAddr,
    trusted: &[IpNet],
    forwarded_for: Option<&str>,
    real_ip: Option<&str>,
) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    if let Some(chain) = forwarded_for {
        let mut candidate = None;
        for entry in chain.rsplit(',') {
            let Some(ip) = parse_entry(entry) else { break };
            candidate = Some(ip);
            if !is_trusted(&ip) {
                break;
            }
        }
        if let Some(ip) = candidate {
            return ip;
        }
    }
    real_ip.and_then(parse_entry).unwrap_or(peer)
}

/// One address as proxies write it: `1.2.3.4`, `2001:db8::1`, `[2001:db8::1]:443`, `1.2.3.4:80`.
fn parse_entry(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim();
    entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<SocketAddr>().ok().map(|s| s.ip()))
        .map(|ip| ip.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn nets() -> Vec<IpNet> {
        vec![
            "10.0.0.0/8".parse().unwrap(),
            "127.0.0.1/32".parse().unwrap(),
        ]
    }

    #[test]
    fn untrusted_peer_headers_are_ignored() {
        let got = client_ip(
            ip("192.0.2.9"),
            &nets(),
            Some("203.0.113.5"),
            Some("203.0.113.6"),
        );
        assert_eq!(got, ip("192.0.2.9"));
    }

    #[test]
    fn rightmost_untrusted_hop_is_the_client() {
        let chain = "198.51.100.1, 203.0.113.5, 10.1.1.1";
        assert_eq!(
            client_ip(ip("10.0.0.1"), &nets(), Some(chain), None),
            ip("203.0.113.5")
        );
        // A client cannot spoof past the untrusted hop by prepending.
        assert_eq!(
            client_ip(
                ip("127.0.0.1"),
                &nets(),
                Some("10.9.9.9, 203.0.113.5"),
                None
            ),
            ip("203.0.113.5")
        );
    }

    #[test]
    fn all_trusted_takes_leftmost_and_garbage_stops() {
        assert_eq!(
            client_ip(ip("10.0.0.1"), &nets(), Some("10.2.2.2, 10.3.3.3"), None),
            ip("10.2.2.2")
        );
        assert_eq!(
            client_ip(ip("10.0.0.1"), &nets(), Some("unknown, 10.3.3.3"), None),
            ip("10.3.3.3")
        );
        assert_eq!(
            client_ip(ip("10.0.0.1"), &nets(), Some("[2001:db8::7]:443"), None),
            ip("2001:db8::7")
        );
    }

    #[test]
    fn real_ip_when_no_forwarded_for() {
        assert_eq!(
            client_ip(ip("10.0.0.1"), &nets(), None, Some(" 203.0.113.8 ")),
            ip("203.0.113.8")
        );
        assert_eq!(
            client_ip(ip("10.0.0.1"), &nets(), Some("junk"), Some("junk")),
            ip("10.0.0.1")
        );
        assert_eq!(
            client_ip(ip("10.0.0.1"), &nets(), None, None),
            ip("10.0.0.1")
        );
    }
}
