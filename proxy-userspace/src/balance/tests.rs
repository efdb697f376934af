use super::*;
use std::net::{Ipv4Addr, Ipv6Addr};

fn spec(key: &str, weight: u32) -> ServerSpec {
    ServerSpec {
        key: key.to_string(),
        weight,
        backup: false,
        down: false,
    }
}

fn key(client_id: &str) -> SelectKey<'_> {
    SelectKey {
        source_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        client_id,
    }
}

#[test]
fn smoke_every_method_selects() {
    let servers = [spec("a:1883", 1), spec("b:1883", 1)];
    for method in [
        BalanceMethod::RoundRobin,
        BalanceMethod::LeastConn,
        BalanceMethod::IpHash,
        BalanceMethod::ClientId,
    ] {
        let b = Balancer::new(method, &servers);
        assert!(b.select(&key("c"), &|_| true, &|_| 0).is_some());
        let _ = Ipv6Addr::LOCALHOST;
    }
}
