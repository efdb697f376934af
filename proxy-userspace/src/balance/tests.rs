//! Unit tests for every method. The consistent-hash tests run 100,000 synthetic clients; the
//! golden tests pin the hash for good.

use super::*;
use std::cell::RefCell;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr};

const ALL_METHODS: [BalanceMethod; 4] = [
    BalanceMethod::RoundRobin,
    BalanceMethod::LeastConn,
    BalanceMethod::IpHash,
    BalanceMethod::ClientId,
];

fn spec(key: &str, weight: u32) -> ServerSpec {
    ServerSpec {
        key: key.to_string(),
        weight,
        backup: false,
        down: false,
    }
}

fn backup(key: &str, weight: u32) -> ServerSpec {
    ServerSpec {
        backup: true,
        ..spec(key, weight)
    }
}

fn down(key: &str, weight: u32) -> ServerSpec {
    ServerSpec {
        down: true,
        ..spec(key, weight)
    }
}

fn equal_servers(n: usize) -> Vec<ServerSpec> {
    (0..n)
        .map(|i| spec(&format!("broker-{i}.mqtt.example:1883"), 1))
        .collect()
}

fn v4(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i))
}

fn all(_: usize) -> bool {
    true
}

fn idle(_: usize) -> u64 {
    0
}

/// `count` picks for varying clients (so the hashing methods also spread), counted per server.
fn tally(b: &Balancer, count: u32, usable: &dyn Fn(usize) -> bool) -> Vec<u32> {
    let mut counts = vec![0; b.servers().len()];
    let mut id = String::new();
    for i in 0..count {
        id.clear();
        write!(id, "tally-{i}").unwrap();
        let k = SelectKey {
            source_ip: v4(i),
            client_id: &id,
        };
        counts[b.select(&k, usable, &idle).expect("a server is usable")] += 1;
    }
    counts
}

// ---------------------------------------------------------------- round robin

fn rr_sequence(b: &Balancer, picks: usize, usable: &dyn Fn(usize) -> bool) -> Vec<usize> {
    let k = SelectKey {
        source_ip: v4(1),
        client_id: "same",
    };
    (0..picks)
        .map(|_| b.select(&k, usable, &idle).unwrap())
        .collect()
}

#[test]
fn round_robin_3_1_1_is_smooth_with_exact_shares_per_cycle() {
    let b = Balancer::new(
        BalanceMethod::RoundRobin,
        &[spec("a", 3), spec("b", 1), spec("c", 1)],
    );
    let seq = rr_sequence(&b, 100, &all);
    // NGINX's smooth order for 3/1/1 (ties to the lowest index): a b a c a, never a a a.
    assert_eq!(seq[..5], [0, 1, 0, 2, 0]);
    for cycle in seq.chunks(5) {
        let mut counts = [0; 3];
        cycle.iter().for_each(|&i| counts[i] += 1);
        assert_eq!(
            counts,
            [3, 1, 1],
            "every cycle of 5 picks has the exact shares: {seq:?}"
        );
        assert_eq!(
            cycle,
            &seq[..5],
            "the state returns to zero after each cycle"
        );
    }
}

#[test]
fn round_robin_equal_weights_rotate_and_other_weights_are_exact() {
    let b = Balancer::new(BalanceMethod::RoundRobin, &equal_servers(4));
    assert_eq!(rr_sequence(&b, 8, &all), [0, 1, 2, 3, 0, 1, 2, 3]);

    let b = Balancer::new(
        BalanceMethod::RoundRobin,
        &[spec("a", 5), spec("b", 2), spec("c", 7), spec("d", 1)],
    );
    let mut counts = [0; 4];
    rr_sequence(&b, 15 * 40, &all)
        .into_iter()
        .for_each(|i| counts[i] += 1);
    assert_eq!(counts, [200, 80, 280, 40]);
}

#[test]
fn round_robin_skips_unusable_servers_and_keeps_the_remaining_shares() {
    let b = Balancer::new(
        BalanceMethod::RoundRobin,
        &[spec("a", 3), spec("b", 1), spec("c", 1)],
    );
    let mut counts = [0; 3];
    rr_sequence(&b, 400, &|i| i != 1)
        .into_iter()
        .for_each(|i| counts[i] += 1);
    assert_eq!(counts, [300, 0, 100]);
    let seq = rr_sequence(&b, 10, &|i| i != 0);
    assert!(
        seq.windows(2).all(|w| w[0] != w[1]),
        "b and c alternate: {seq:?}"
    );
}

#[test]
fn round_robin_retry_with_the_failed_server_unusable_picks_another() {
    let b = Balancer::new(
        BalanceMethod::RoundRobin,
        &[spec("a", 3), spec("b", 1), spec("c", 1)],
    );
    let k = key_for("x");
    for _ in 0..20 {
        let first = b.select(&k, &all, &idle).unwrap();
        let second = b.select(&k, &|i| i != first, &idle).unwrap();
        let third = b.select(&k, &|i| i != first && i != second, &idle).unwrap();
        assert!(first != second && second != third && first != third);
        assert_eq!(b.select(&k, &|_| false, &idle), None);
    }
}

#[test]
fn zero_weight_counts_as_one() {
    let b = Balancer::new(BalanceMethod::RoundRobin, &[spec("a", 0), spec("b", 1)]);
    assert_eq!(rr_sequence(&b, 4, &all), [0, 1, 0, 1]);
}

fn key_for(client_id: &str) -> SelectKey<'_> {
    SelectKey {
        source_ip: v4(7),
        client_id,
    }
}

// ---------------------------------------------------------------- least_conn

#[test]
fn least_conn_picks_the_smallest_active_per_weight() {
    let b = Balancer::new(
        BalanceMethod::LeastConn,
        &[spec("a", 1), spec("b", 2), spec("c", 4)],
    );
    let k = key_for("x");
    let pick = |active: [u64; 3]| b.select(&k, &all, &|i| active[i]).unwrap();
    assert_eq!(pick([3, 5, 9]), 2); // 3, 2.5, 2.25
    assert_eq!(pick([1, 1, 4]), 1); // 1, 0.5, 1
    assert_eq!(pick([0, 1, 1]), 0); // 0, 0.5, 0.25
    assert_eq!(pick([2, 5, 9]), 0); // 2, 2.5, 2.25
    // An unusable least-loaded server yields the next least loaded one.
    assert_eq!(b.select(&k, &|i| i != 1, &|i| [1, 1, 4][i]).unwrap(), 2);
    assert_eq!(b.select(&k, &|_| false, &|i| [1, 1, 4][i]), None);
}

#[test]
fn least_conn_breaks_ties_by_weighted_round_robin() {
    // Same ratio (2 per unit of weight) everywhere: picks follow the 1/2/4 smooth rotation.
    let b = Balancer::new(
        BalanceMethod::LeastConn,
        &[spec("a", 1), spec("b", 2), spec("c", 4)],
    );
    let k = key_for("x");
    let mut counts = [0; 3];
    for _ in 0..70 {
        counts[b.select(&k, &all, &|i| [2, 4, 8][i]).unwrap()] += 1;
    }
    assert_eq!(counts, [10, 20, 40]);
    // Equal weights and an idle cluster rotate instead of piling onto server 0.
    let b = Balancer::new(BalanceMethod::LeastConn, &equal_servers(3));
    let seq: Vec<usize> = (0..6).map(|_| b.select(&k, &all, &idle).unwrap()).collect();
    assert_eq!(seq, [0, 1, 2, 0, 1, 2]);
}

#[test]
fn least_conn_with_growing_counts_keeps_weighted_proportions() {
    let b = Balancer::new(
        BalanceMethod::LeastConn,
        &[spec("a", 3), spec("b", 1), spec("c", 1)],
    );
    let active = RefCell::new([0u64; 3]);
    for _ in 0..500 {
        let i = b
            .select(&key_for("x"), &all, &|i| active.borrow()[i])
            .unwrap();
        active.borrow_mut()[i] += 1;
    }
    assert_eq!(*active.borrow(), [300, 100, 100]);
}

#[test]
fn least_conn_compares_huge_counts_without_overflow() {
    let b = Balancer::new(
        BalanceMethod::LeastConn,
        &[spec("a", u32::MAX), spec("b", u32::MAX - 1)],
    );
    let k = key_for("x");
    // u64::MAX / (2^32 - 1) < u64::MAX / (2^32 - 2), which a float or u64 product would blur.
    assert_eq!(b.select(&k, &all, &|_| u64::MAX).unwrap(), 0);
    assert_eq!(
        b.select(&k, &all, &|i| [u64::MAX, u64::MAX / 2][i])
            .unwrap(),
        1
    );
}

// ---------------------------------------------------------------- rules shared by every method

#[test]
fn backups_are_used_only_when_no_primary_is_usable_with_every_method() {
    let servers = [
        spec("p0", 1),
        backup("b1", 3),
        spec("p2", 1),
        backup("b3", 1),
    ];
    for method in ALL_METHODS {
        let b = Balancer::new(method, &servers);
        let c = tally(&b, 2000, &all);
        assert!(
            c[1] == 0 && c[3] == 0 && c[0] > 0 && c[2] > 0,
            "{method:?}: {c:?}"
        );
        let c = tally(&b, 2000, &|i| i != 0);
        assert_eq!(
            c,
            [0, 0, 2000, 0],
            "{method:?}: one primary left takes everything"
        );
        let c = tally(&b, 2000, &|i| i != 0 && i != 2);
        assert!(
            c[0] == 0 && c[2] == 0 && c[1] > 0 && c[3] > 0,
            "{method:?}: backups share: {c:?}"
        );
        if matches!(method, BalanceMethod::RoundRobin | BalanceMethod::LeastConn) {
            assert_eq!(c, [0, 1500, 0, 500], "{method:?}: backup weights 3/1 apply");
        }
        let c = tally(&b, 500, &|i| i == 3);
        assert_eq!(c, [0, 0, 0, 500], "{method:?}");
        assert_eq!(
            b.select(&key_for("x"), &|_| false, &idle),
            None,
            "{method:?}"
        );
    }
}

#[test]
fn down_servers_are_never_chosen_with_every_method() {
    let servers = [
        down("d0", 5),
        spec("p1", 1),
        spec("p2", 1),
        backup("b3", 1),
        ServerSpec {
            down: true,
            ..backup("b4", 9)
        },
    ];
    for method in ALL_METHODS {
        let b = Balancer::new(method, &servers);
        let c = tally(&b, 3000, &all);
        assert!(
            c[0] == 0 && c[1] > 0 && c[2] > 0 && c[3] == 0 && c[4] == 0,
            "{method:?}: {c:?}"
        );
        // A down primary does not count as usable: the backup tier takes over.
        assert_eq!(
            tally(&b, 300, &|i| i == 0 || i >= 3),
            [0, 0, 0, 300, 0],
            "{method:?}"
        );
        // Down servers everywhere else: nothing to choose even though `usable` says yes.
        assert_eq!(
            b.select(&key_for("x"), &|i| i == 0 || i == 4, &idle),
            None,
            "{method:?}"
        );
        // Least-conn does not prefer an idle down server.
        assert_eq!(
            b.select(&key_for("x"), &|i| i != 2, &|i| if i == 0 {
                0
            } else {
                100
            }),
            Some(1)
        );
    }
}

#[test]
fn nothing_usable_or_no_servers_gives_none() {
    for method in ALL_METHODS {
        let b = Balancer::new(method, &equal_servers(3));
        assert_eq!(
            b.select(&key_for("x"), &|_| false, &idle),
            None,
            "{method:?}"
        );
        let b = Balancer::new(method, &[]);
        assert_eq!(b.select(&key_for("x"), &all, &idle), None, "{method:?}");
        let b = Balancer::new(method, &[down("a", 1), down("b", 1)]);
        assert_eq!(b.select(&key_for("x"), &all, &idle), None, "{method:?}");
    }
}

#[test]
fn balancer_is_send_sync_and_debug_stays_short() {
    fn assert_traits<T: Send + Sync + fmt::Debug>() {}
    assert_traits::<Balancer>();
    let b = Balancer::new(BalanceMethod::ClientId, &equal_servers(3));
    let text = format!("{b:?}");
    assert!(
        text.contains("primary_ring_points: 3000") && text.len() < 1000,
        "{text}"
    );
}

// ---------------------------------------------------------------- consistent hashing

const CLIENTS: u32 = 100_000;

/// The two hash populations: 100k client ids `client-{i}` (client_id), 100k IPv4 addresses
/// 10.0.0.0 + i (ip_hash).
#[derive(Debug, Clone, Copy)]
enum Population {
    ClientIds,
    Ipv4,
}

const POPULATIONS: [Population; 2] = [Population::ClientIds, Population::Ipv4];

impl Population {
    fn method(self) -> BalanceMethod {
        match self {
            Population::ClientIds => BalanceMethod::ClientId,
            Population::Ipv4 => BalanceMethod::IpHash,
        }
    }
}

/// The server chosen for every client of the population.
fn assign(pop: Population, servers: &[ServerSpec], usable: &dyn Fn(usize) -> bool) -> Vec<usize> {
    let b = Balancer::new(pop.method(), servers);
    let mut id = String::new();
    (0..CLIENTS)
        .map(|i| {
            id.clear();
            if let Population::ClientIds = pop {
                write!(id, "client-{i}").unwrap();
            }
            // The client_id population shares one address, the IPv4 one has no client ids.
            let source_ip = match pop {
                Population::ClientIds => v4(0),
                Population::Ipv4 => v4(i),
            };
            b.select(
                &SelectKey {
                    source_ip,
                    client_id: &id,
                },
                usable,
                &idle,
            )
            .unwrap()
        })
        .collect()
}

fn shares(assignment: &[usize], n: usize) -> Vec<f64> {
    let mut counts = vec![0u32; n];
    assignment.iter().for_each(|&i| counts[i] += 1);
    counts
        .iter()
        .map(|&c| f64::from(c) / assignment.len() as f64)
        .collect()
}

#[test]
fn hash_shares_of_equal_servers_are_within_10_percent() {
    for pop in POPULATIONS {
        for n in [3, 5] {
            let s = shares(&assign(pop, &equal_servers(n), &all), n);
            let fair = 1.0 / n as f64;
            assert!(
                s.iter().all(|&x| (x / fair - 1.0).abs() < 0.10),
                "{pop:?} n={n}: {s:?}"
            );
        }
    }
}

#[test]
fn hash_unusable_server_moves_only_its_own_clients() {
    for pop in POPULATIONS {
        for n in [3, 5] {
            let servers = equal_servers(n);
            let before = assign(pop, &servers, &all);
            let gone = n / 2;
            let after = assign(pop, &servers, &|i| i != gone);
            let mut landed = vec![0u32; n];
            for (&b, &a) in before.iter().zip(&after) {
                if b == gone {
                    assert_ne!(a, gone);
                    landed[a] += 1;
                } else {
                    assert_eq!(a, b, "{pop:?} n={n}: a client of a healthy server moved");
                }
            }
            // The orphans spread over every remaining server rather than onto one neighbour.
            let orphans: u32 = landed.iter().sum();
            assert!(
                landed
                    .iter()
                    .enumerate()
                    .all(|(i, &c)| i == gone || c > orphans / (n as u32 - 1) / 2)
            );
            // And making it usable again brings every one of them back.
            assert_eq!(assign(pop, &servers, &all), before);
        }
    }
}

#[test]
fn hash_adding_a_server_moves_about_its_fair_share_and_only_to_it() {
    for pop in POPULATIONS {
        for n in [3, 5] {
            let before = assign(pop, &equal_servers(n), &all);
            let after = assign(pop, &equal_servers(n + 1), &all);
            let mut moved = 0u32;
            for (&b, &a) in before.iter().zip(&after) {
                if a != b {
                    assert_eq!(a, n, "{pop:?} n={n}: a client moved between old servers");
                    moved += 1;
                }
            }
            let fraction = f64::from(moved) / f64::from(CLIENTS);
            let fair = 1.0 / (n + 1) as f64;
            assert!(
                (0.5 * fair..1.5 * fair).contains(&fraction),
                "{pop:?} n={n}: moved {fraction}"
            );
        }
    }
}

#[test]
fn hash_weights_2_1_1_give_50_25_25_percent() {
    for pop in POPULATIONS {
        let servers = [
            spec("broker-0.mqtt.example:1883", 2),
            spec("broker-1.mqtt.example:1883", 1),
            spec("broker-2.mqtt.example:1883", 1),
        ];
        let s = shares(&assign(pop, &servers, &all), 3);
        for (share, want) in s.iter().zip([0.50, 0.25, 0.25]) {
            assert!((share - want).abs() < 0.03, "{pop:?}: {s:?}");
        }
    }
}

#[test]
fn hash_down_is_the_same_as_unusable_and_order_does_not_matter() {
    for pop in POPULATIONS {
        let servers = equal_servers(4);
        let mut with_down = servers.clone();
        with_down[1].down = true;
        assert_eq!(
            assign(pop, &with_down, &all),
            assign(pop, &servers, &|i| i != 1),
            "{pop:?}"
        );
        // Points come from the key, not the position: reordering the config keeps every client.
        let reversed: Vec<ServerSpec> = servers.iter().rev().cloned().collect();
        let forward = assign(pop, &servers, &all);
        let backward = assign(pop, &reversed, &all);
        assert!(
            forward.iter().zip(&backward).all(|(&f, &b)| f == 3 - b),
            "{pop:?}"
        );
    }
}

#[test]
fn hash_backup_ring_is_consistent_too() {
    let mut servers = equal_servers(2);
    servers.extend((0..3).map(|i| backup(&format!("standby-{i}.mqtt.example:1883"), 1)));
    for pop in POPULATIONS {
        assert!(assign(pop, &servers, &all).iter().all(|&i| i < 2));
        let before = assign(pop, &servers, &|i| i >= 2);
        let s = shares(&before, 5);
        assert!(
            s[2..].iter().all(|&x| (x * 3.0 - 1.0).abs() < 0.10),
            "{pop:?}: {s:?}"
        );
        let after = assign(pop, &servers, &|i| i >= 2 && i != 3);
        assert!(
            before
                .iter()
                .zip(&after)
                .all(|(&b, &a)| if b == 3 { a != 3 } else { a == b }),
            "{pop:?}"
        );
    }
}

fn v6_addresses() -> Vec<IpAddr> {
    let mut v = Vec::new();
    for i in 0..48u16 {
        v.push(IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, i, 0, 0, 0, 0, 1)));
        v.push(IpAddr::V6(Ipv6Addr::new(
            0x2001,
            0xdb8,
            0,
            0,
            0,
            0,
            0,
            i + 1,
        )));
    }
    v.push(IpAddr::V6(Ipv6Addr::LOCALHOST));
    v.push(IpAddr::V6(Ipv6Addr::new(
        0xfe80, 0, 0, 0, 0x1c2d, 0x3e4f, 0x5a6b, 0x7c8d,
    )));
    v
}

#[test]
fn ip_hash_handles_ipv6_consistently() {
    let servers = equal_servers(3);
    let b = Balancer::new(BalanceMethod::IpHash, &servers);
    let pick = |b: &Balancer, ip: IpAddr, usable: &dyn Fn(usize) -> bool| {
        b.select(
            &SelectKey {
                source_ip: ip,
                client_id: "ignored",
            },
            usable,
            &idle,
        )
        .unwrap()
    };
    let addrs = v6_addresses();
    let before: Vec<usize> = addrs.iter().map(|&ip| pick(&b, ip, &all)).collect();
    let mut counts = [0; 3];
    before.iter().for_each(|&i| counts[i] += 1);
    assert!(counts.iter().all(|&c| c >= 15), "{counts:?}");
    // Deterministic across rebuilds; removing server 0 moves only its clients.
    let rebuilt = Balancer::new(BalanceMethod::IpHash, &servers);
    for (&ip, &was) in addrs.iter().zip(&before) {
        assert_eq!(pick(&rebuilt, ip, &all), was);
        let now = pick(&b, ip, &|i| i != 0);
        assert!(if was == 0 { now != 0 } else { now == was });
    }
    // A dual-stack listener reports IPv4 peers as ::ffff:a.b.c.d; they hash like the IPv4 address.
    for i in 0..200 {
        let IpAddr::V4(plain) = v4(i * 7919) else {
            unreachable!()
        };
        assert_eq!(
            pick(&b, IpAddr::V6(plain.to_ipv6_mapped()), &all),
            pick(&b, IpAddr::V4(plain), &all)
        );
    }
}

#[test]
fn client_id_hash_ignores_the_address_and_empty_ids_fall_back_to_it() {
    let servers = equal_servers(5);
    let by_id = Balancer::new(BalanceMethod::ClientId, &servers);
    let by_ip = Balancer::new(BalanceMethod::IpHash, &servers);
    let mut seen = [false; 5];
    for i in 0..1000 {
        let anonymous = SelectKey {
            source_ip: v4(i),
            client_id: "",
        };
        let chosen = by_id.select(&anonymous, &all, &idle);
        assert_eq!(chosen, by_ip.select(&anonymous, &all, &idle));
        seen[chosen.unwrap()] = true;
        let named = SelectKey {
            source_ip: v4(i),
            client_id: "sensor-42",
        };
        assert_eq!(
            by_id.select(&named, &all, &idle),
            by_id.select(&key_for("sensor-42"), &all, &idle)
        );
    }
    assert!(seen.iter().all(|&s| s));
}

// ---------------------------------------------------------------- golden data
//
// Recorded once (XXH3-64, 1000 points per unit of weight) and asserted forever: a failure here
// means an upgrade would move clients between brokers and drop their sessions. Do not re-record
// without treating it as a breaking change.

fn golden_servers() -> Vec<ServerSpec> {
    (0..5)
        .map(|i| spec(&format!("mqtt-{i}.broker.svc:1883"), 1))
        .collect()
}

#[test]
fn golden_hash_function_is_xxh3_64() {
    // The published XXH3-64 value for empty input, seed 0: pins the algorithm itself.
    assert_eq!(xxhash_rust::xxh3::xxh3_64(b""), 0x2d06_8005_38d3_94c2);
    assert_eq!(ring::hash_client_id("client-0"), 0x33b4_e191_2be6_4d62);
    assert_eq!(
        ring::hash_ip("10.0.0.1".parse().unwrap()),
        0x83cf_f27f_7da3_9d96
    );
    assert_eq!(
        ring::hash_ip("::ffff:10.0.0.1".parse().unwrap()),
        0x83cf_f27f_7da3_9d96
    );
    assert_eq!(
        ring::hash_ip("2001:db8::1".parse().unwrap()),
        0x275c_8fa5_8c2d_19a0
    );
    assert_eq!(ring::POINTS_PER_WEIGHT, 1000);
    assert_eq!(ring::points_for_weight(3), 3000);
    assert_eq!(ring::points_for_weight(1_000_000), 100_000);
}

#[test]
fn golden_client_id_selection() {
    const GOLDEN: [(&str, usize); 20] = [
        ("client-0", 2),
        ("client-1", 2),
        ("client-99999", 3),
        ("sensor-42", 1),
        ("sensor-43", 3),
        ("mosquitto_pub_1234", 3),
        ("paho/4f2c9a1e", 2),
        ("dev:eu-west:0001", 2),
        ("dev:eu-west:0002", 0),
        ("thermostat.kitchen", 1),
        ("thermostat.bedroom", 3),
        ("a", 4),
        ("Z", 2),
        ("ÄÖÜ-umlaut-client", 0),
        ("emqx_bench_sub_1_100", 2),
        ("emqx_bench_sub_1_101", 4),
        ("00000000-0000-0000-0000-000000000000", 0),
        ("6ba7b810-9dad-11d1-80b4-00c04fd430c8", 0),
        ("truck/7/telemetry", 4),
        (
            "gateway-with-a-rather-long-client-identifier-that-exceeds-64-bytes-01",
            4,
        ),
    ];
    let b = Balancer::new(BalanceMethod::ClientId, &golden_servers());
    for (id, want) in GOLDEN {
        assert_eq!(
            b.select(&key_for(id), &all, &idle),
            Some(want),
            "client id {id:?}"
        );
    }
}

#[test]
fn golden_ip_hash_selection() {
    const GOLDEN: [(&str, usize); 10] = [
        ("10.0.0.1", 3),
        ("10.0.0.2", 0),
        ("192.168.1.17", 1),
        ("203.0.113.250", 3),
        ("255.255.255.255", 2),
        ("0.0.0.0", 1),
        ("2001:db8::1", 2),
        ("2001:db8:1:2:3:4:5:6", 4),
        ("fe80::1c2d:3e4f:5a6b:7c8d", 3),
        ("::1", 0),
    ];
    let b = Balancer::new(BalanceMethod::IpHash, &golden_servers());
    for (ip, want) in GOLDEN {
        let k = SelectKey {
            source_ip: ip.parse().unwrap(),
            client_id: "ignored",
        };
        assert_eq!(b.select(&k, &all, &idle), Some(want), "address {ip}");
    }
}
