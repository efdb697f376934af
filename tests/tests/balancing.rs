//! Broker selection through the running proxy: spread, stickiness, failover, re-resolution.

use mqsplice_tests::broker::{ChildBroker, EmbeddedBroker};
use mqsplice_tests::client::connect;
use mqsplice_tests::fake::{Behaviour, FakeBroker};
use mqsplice_tests::setup::{Kind, Listener, Server, Setup, Upstream};
use mqsplice_tests::stats::{totals, upstream_servers};
use mqsplice_tests::{Mode, wait_until};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Connects `count` distinct client ids (`prefix-i`), at most `parallel` at once, each
/// disconnecting after its CONNACK.
async fn connect_many(addr: SocketAddr, prefix: &str, count: usize, parallel: usize) {
    let semaphore = Arc::new(tokio::sync::Semaphore::new(parallel));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..count {
        let permit = semaphore.clone().acquire_owned().await.unwrap();
        let id = format!("{prefix}-{i}");
        tasks.spawn(async move {
            let client = connect(addr, &id)
                .await
                .unwrap_or_else(|e| panic!("{id}: {e}"));
            client.disconnect().await;
            drop(permit);
        });
    }
    while let Some(result) = tasks.join_next().await {
        result.unwrap();
    }
}

fn three_brokers() -> Vec<SocketAddr> {
    (0..3).map(|_| EmbeddedBroker::start().addr).collect()
}

async fn spread_3000_clients(mode: Mode, balance: &str) {
    let brokers = three_brokers();
    let running = Setup::tcp(mode, &brokers)
        .upstream_with(|u| u.balance(balance))
        .start()
        .await;
    connect_many(running.listener_addr("mqtt").unwrap(), "spread", 3000, 64).await;
    let totals = totals(&running.typed_stats());
    assert_eq!(totals.iter().sum::<u64>(), 3000, "{totals:?}");
    for total in &totals {
        assert!(
            (800..=1200).contains(total),
            "{balance}: {totals:?} is not within ±20% of 1000 each"
        );
    }
    eprintln!("{balance} over 3 brokers: {totals:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn userspace_client_id_spreads_3000_clients_evenly() {
    spread_3000_clients(Mode::Userspace, "client_id").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn userspace_round_robin_spreads_3000_clients_evenly() {
    spread_3000_clients(Mode::Userspace, "round_robin").await;
}

/// Which server (index) the next connection of `client_id` lands on, from the stats totals.
async fn lands_on(running: &mqsplice::Running, client_id: &str) -> usize {
    let before = totals(&running.typed_stats());
    let client = connect(running.listener_addr("mqtt").unwrap(), client_id)
        .await
        .unwrap();
    let after = totals(&running.typed_stats());
    client.disconnect().await;
    let changed: Vec<usize> = (0..before.len())
        .filter(|&i| after[i] != before[i])
        .collect();
    assert_eq!(changed.len(), 1, "{before:?} -> {after:?}");
    changed[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn userspace_same_client_id_reconnects_to_the_same_broker() {
    let brokers = three_brokers();
    let running = Setup::tcp(Mode::Userspace, &brokers)
        .upstream_with(|u| u.balance("client_id"))
        .start()
        .await;
    let mut seen = std::collections::HashSet::new();
    for i in 0..12 {
        let id = format!("sticky-{i}");
        let first = lands_on(&running, &id).await;
        seen.insert(first);
        for _ in 0..3 {
            assert_eq!(lands_on(&running, &id).await, first, "{id} moved");
        }
    }
    assert!(
        seen.len() > 1,
        "12 client ids all hashed to one broker: {seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn userspace_killed_broker_clients_go_to_the_others_and_stats_show_it_unavailable() {
    let mut killable = ChildBroker::start(env!("CARGO_BIN_EXE_test-broker"));
    let others = three_brokers()[..2].to_vec();
    let brokers = vec![killable.addr, others[0], others[1]];
    let running = Setup::tcp(Mode::Userspace, &brokers)
        .upstream_with(|u| {
            u.balance("client_id")
                .each_server(|s| s.max_fails(1).fail_timeout("30s"))
        })
        .start()
        .await;
    // Find client ids that hash to the broker we will kill.
    let mut victims = Vec::new();
    for i in 0..60 {
        let id = format!("victim-{i}");
        if lands_on(&running, &id).await == 0 {
            victims.push(id);
        }
    }
    assert!(
        victims.len() >= 5,
        "only {} of 60 ids hashed to broker 0",
        victims.len()
    );

    killable.kill();
    for id in &victims {
        let landed = lands_on(&running, id).await;
        assert_ne!(landed, 0, "{id} still sent to the killed broker");
    }
    let stats = running.typed_stats();
    let server = &upstream_servers(&stats)[0];
    assert_eq!(server.state, "unavailable", "{server:?}");
    assert!(server.failures >= 1, "{server:?}");
    assert_eq!(stats.connections.rejected["no_upstream"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn userspace_backup_serves_only_when_every_primary_is_down() {
    let mut primary = ChildBroker::start(env!("CARGO_BIN_EXE_test-broker"));
    let backup = EmbeddedBroker::start();
    let servers = [
        Server::new(&primary.addr.to_string())
            .max_fails(1)
            .fail_timeout("30s"),
        Server::new(&backup.addr.to_string()).backup(),
    ];
    let running = Setup::empty()
        .mode(Mode::Userspace)
        .upstream(Upstream::named("brokers", servers))
        .listener(Listener::new("mqtt", Kind::Tcp, "brokers"))
        .start()
        .await;
    for i in 0..5 {
        assert_eq!(lands_on(&running, &format!("b-{i}")).await, 0);
    }
    assert_eq!(upstream_servers(&running.typed_stats())[1].state, "backup");
    primary.kill();
    for i in 0..5 {
        assert_eq!(lands_on(&running, &format!("b-{i}")).await, 1);
    }
}

/// A resolver whose answer the test can change.
struct MovableName {
    answer: Mutex<Vec<SocketAddr>>,
}

impl mqsplice::upstream::Resolve for MovableName {
    fn resolve<'a>(&'a self, host_port: &'a str) -> mqsplice::upstream::ResolveFuture<'a> {
        Box::pin(async move {
            if host_port == "broker.test:1883" {
                Ok(self.answer.lock().unwrap().clone())
            } else {
                Ok(vec![host_port.parse().map_err(std::io::Error::other)?])
            }
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn userspace_host_name_that_resolves_to_a_new_address_is_followed() {
    let (old_broker, new_broker) = (
        FakeBroker::with(Behaviour::Connack(0)).await,
        FakeBroker::with(Behaviour::Connack(0)).await,
    );
    let (old, new) = (old_broker.addr, new_broker.addr);
    let resolver = Arc::new(MovableName {
        answer: Mutex::new(vec![old]),
    });
    let running = Setup::empty()
        .mode(Mode::Userspace)
        .upstream(
            Upstream::named("brokers", [Server::new("broker.test:1883")]).resolve_interval("200ms"),
        )
        .listener(Listener::new("mqtt", Kind::Tcp, "brokers"))
        .start_with(mqsplice::Options {
            resolver: resolver.clone(),
        })
        .await;
    let proxy_addr = running.listener_addr("mqtt").unwrap();
    let resolved =
        |running: &mqsplice::Running| upstream_servers(&running.typed_stats())[0].resolved.clone();
    assert_eq!(resolved(&running), vec![old.to_string()]);
    connect_raw(proxy_addr, "dns-1").await;
    assert_eq!((old_broker.accepted(), new_broker.accepted()), (1, 0));

    *resolver.answer.lock().unwrap() = vec![new];
    assert!(
        wait_until(Duration::from_secs(5), || resolved(&running)
            == vec![new.to_string()])
        .await,
        "the new address was not picked up: {:?}",
        running.typed_stats()
    );
    connect_raw(proxy_addr, "dns-2").await;
    assert_eq!((old_broker.accepted(), new_broker.accepted()), (1, 1));
}

/// Sends a CONNECT through the proxy and waits for the backend's CONNACK.
async fn connect_raw(proxy: SocketAddr, client_id: &str) {
    let mut stream = tokio::net::TcpStream::connect(proxy).await.unwrap();
    stream
        .write_all(&mqsplice_tests::raw::connect_v311(client_id))
        .await
        .unwrap();
    let mut connack = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut connack))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(connack, [0x20, 0x02, 0x00, 0x00]);
}
