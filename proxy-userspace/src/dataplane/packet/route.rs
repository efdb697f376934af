//! Which interface a rewritten segment leaves by: the route to the peer of the other leg, read
//! from the kernel's main routing table (`/proc/net/route`, `/proc/net/ipv6_route`), or none when
//! that peer is an address of this host (then the segment goes on up this host's stack).
//!
//! Policy routing (rules, other tables) is not followed: a host that needs it names the
//! interfaces in `[dataplane.packet]` and must route the legs through them.

use std::net::IpAddr;

/// One route of the main table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub interface: String,
    /// The destination network, as a number (IPv4 in the low 32 bits).
    pub network: u128,
    pub prefix_len: u8,
    pub metric: u32,
    pub ipv6: bool,
}

/// The IPv4 routes of `/proc/net/route` (addresses and masks in the host's byte order as hex).
pub fn parse_ipv4_routes(text: &str) -> Vec<Route> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let hex = |i: usize| u32::from_str_radix(f.get(i)?, 16).ok();
            let (destination, flags, metric, mask) = (hex(1)?, hex(3)?, hex(6)?, hex(7)?);
            // RTF_UP.
            if flags & 1 == 0 {
                return None;
            }
            // The file has the bytes in memory order: a little-endian read of a big-endian number.
            Some(Route {
                interface: f[0].to_string(),
                network: u32::from_be(destination.to_le()) as u128,
                prefix_len: u32::from_be(mask.to_le()).count_ones() as u8,
                metric,
                ipv6: false,
            })
        })
        .collect()
}

/// The IPv6 routes of `/proc/net/ipv6_route`.
pub fn parse_ipv6_routes(text: &str) -> Vec<Route> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 {
                return None;
            }
            let flags = u32::from_str_radix(f[8], 16).ok()?;
            if flags & 1 == 0 {
                return None;
            }
            Some(Route {
                interface: f[9].to_string(),
                network: u128::from_str_radix(f[0], 16).ok()?,
                prefix_len: u8::from_str_radix(f[1], 16).ok()?,
                metric: u32::from_str_radix(f[5], 16).ok()?,
                ipv6: true,
            })
        })
        .collect()
}

fn covers(route: &Route, address: u128, bits: u32) -> bool {
    let len = u32::from(route.prefix_len).min(bits);
    if len == 0 {
        return true;
    }
    let shift = bits - len;
    (route.network >> shift) == (address >> shift)
}

/// The interface of the most specific route to `destination` (lowest metric among equals).
pub fn interface_for(destination: IpAddr, routes: &[Route]) -> Option<String> {
    let (address, bits, ipv6) = match destination {
        IpAddr::V4(a) => (u32::from(a) as u128, 32, false),
        IpAddr::V6(a) => (u128::from(a), 128, true),
    };
    routes
        .iter()
        .filter(|r| r.ipv6 == ipv6 && covers(r, address, bits))
        .max_by(|a, b| {
            a.prefix_len
                .cmp(&b.prefix_len)
                .then(b.metric.cmp(&a.metric))
        })
        .map(|r| r.interface.clone())
}

/// Where segments to `destination` go from this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Egress {
    /// An address of this host: the segment continues up the stack where it arrived.
    Local,
    /// Out of this interface (its name and index).
    Interface(String, u32),
}

/// Where segments to `destination` go, from the kernel's tables.
pub fn egress(destination: IpAddr) -> std::io::Result<Egress> {
    // An address of this host is one a socket can be bound to.
    let local = match destination {
        IpAddr::V4(a) => a.is_loopback() || std::net::UdpSocket::bind((a, 0)).is_ok(),
        IpAddr::V6(a) => a.is_loopback() || std::net::UdpSocket::bind((a, 0)).is_ok(),
    };
    if local {
        return Ok(Egress::Local);
    }
    let mut routes = parse_ipv4_routes(&std::fs::read_to_string("/proc/net/route")?);
    routes.extend(parse_ipv6_routes(
        &std::fs::read_to_string("/proc/net/ipv6_route").unwrap_or_default(),
    ));
    let interface = interface_for(destination, &routes).ok_or_else(|| {
        std::io::Error::other(format!("no route to {destination} in the main table"))
    })?;
    let index = std::fs::read_to_string(format!("/sys/class/net/{interface}/ifindex"))?
        .trim()
        .parse()
        .map_err(|_| std::io::Error::other(format!("no index for {interface}")))?;
    Ok(Egress::Interface(interface, index))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    const ROUTE: &str =
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0
eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
veth1\t00020A0A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
down0\t00030A0A\t00000000\t0000\t0\t0\t0\t00FFFFFF\t0\t0\t0
";

    const IPV6_ROUTE: &str = "fd000000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0
00000000000000000000000000000000 00 00000000000000000000000000000000 00 fd000000000000000000000000000001 00000400 00000003 00000000 00000003     eth0
fd0a0002000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001    veth1
";

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_most_specific_route_names_the_interface() {
        let routes = parse_ipv4_routes(ROUTE);
        assert_eq!(routes.len(), 3, "the route that is not up is left out");
        assert_eq!(
            routes[1].network,
            u32::from(Ipv4Addr::new(192, 0, 2, 0)) as u128
        );
        assert_eq!(routes[1].prefix_len, 24);
        assert_eq!(
            interface_for(ip("10.10.2.2"), &routes).as_deref(),
            Some("veth1")
        );
        assert_eq!(
            interface_for(ip("192.0.2.7"), &routes).as_deref(),
            Some("eth0")
        );
        // The default route.
        assert_eq!(
            interface_for(ip("8.8.8.8"), &routes).as_deref(),
            Some("eth0")
        );
        // A route that is not up is not taken.
        assert_eq!(
            interface_for(ip("10.10.3.1"), &routes).as_deref(),
            Some("eth0")
        );
    }

    #[test]
    fn ipv6_routes_too() {
        let routes = parse_ipv6_routes(IPV6_ROUTE);
        assert_eq!(routes.len(), 3);
        assert_eq!(
            interface_for(ip("fd0a:2::2"), &routes).as_deref(),
            Some("veth1")
        );
        assert_eq!(
            interface_for(ip("fd00::9"), &routes).as_deref(),
            Some("eth0")
        );
        assert_eq!(
            interface_for(ip("2001:db8::1"), &routes).as_deref(),
            Some("eth0")
        );
        // No IPv6 route answers for IPv4.
        assert_eq!(interface_for(ip("10.10.2.2"), &routes), None);
    }

    #[test]
    fn this_hosts_addresses_are_local() {
        assert_eq!(egress(ip("127.0.0.1")).unwrap(), Egress::Local);
        assert_eq!(egress(ip("::1")).unwrap(), Egress::Local);
    }
}
