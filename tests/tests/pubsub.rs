//! Publish/subscribe through mqsplice between real clients and real brokers.

use mqsplice_tests::Mode;
use mqsplice_tests::broker::EmbeddedBroker;
use mqsplice_tests::client::connect;
use mqsplice_tests::setup::Setup;
use mqsplice_tests::stats::{REJECT_REASONS, fetch_async, totals, upstream_servers};
use rumqttc::QoS;
use std::time::Duration;

async fn roundtrip_through_proxy(mode: Mode) {
    let broker = EmbeddedBroker::start();
    let running = Setup::tcp(mode, &[broker.addr]).start().await;
    let addr = running.listener_addr("mqtt").unwrap();

    let mut subscriber = connect(addr, "sub-1").await.unwrap();
    subscriber
        .subscribe("sensors/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    let mut publisher = connect(addr, "pub-1").await.unwrap();
    for (i, qos) in [
        (0, QoS::AtMostOnce),
        (1, QoS::AtLeastOnce),
        (2, QoS::AtLeastOnce),
    ] {
        publisher
            .publish(&format!("sensors/{i}"), qos, vec![i as u8; 1000])
            .await
            .unwrap();
        let got = subscriber
            .next_publish(Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(got.topic, format!("sensors/{i}"));
        assert_eq!(&got.payload[..], &vec![i as u8; 1000][..]);
    }

    let stats = running.typed_stats();
    assert_eq!(stats.dataplane.mode, mode.config_value());
    assert_eq!(stats.connections.handled, 2);
    assert_eq!(stats.connections.active, 2);
    assert_eq!(totals(&stats), vec![2]);
    publisher.disconnect().await;
    subscriber.disconnect().await;
    assert!(
        mqsplice_tests::wait_until(Duration::from_secs(5), || running
            .typed_stats()
            .connections
            .active
            == 0)
        .await,
        "connections did not close: {:?}",
        running.typed_stats()
    );
    // Per-server bytes of spliced flows are added when the flow ends; check after the close.
    let stats = running.typed_stats();
    let to_server = upstream_servers(&stats)[0].bytes_to_server;
    let from_server = upstream_servers(&stats)[0].bytes_from_server;
    assert!(to_server > 3000, "bytes to server {to_server}");
    assert!(from_server > 3000, "bytes from server {from_server}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn userspace_publish_subscribe_roundtrip() {
    roundtrip_through_proxy(Mode::Userspace).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_endpoint_serves_json_over_http() {
    let broker = EmbeddedBroker::start();
    let running = Setup::tcp(Mode::Userspace, &[broker.addr]).start().await;
    let client = connect(running.listener_addr("mqtt").unwrap(), "stats-1")
        .await
        .unwrap();
    let stats = fetch_async(running.stats_addr().unwrap()).await;
    assert_eq!(stats.connections.accepted, 1);
    let listener = &stats.listeners["mqtt"];
    assert_eq!(listener.connections.handled, 1);
    assert_eq!(listener.data_path, "userspace");
    assert_eq!(listener.data_path_reason, "mode");
    let server = &upstream_servers(&stats)[0];
    assert_eq!(server.addr, broker.addr.to_string());
    assert_eq!(server.state, "up");
    assert_eq!(server.active, 1);
    for reason in REJECT_REASONS {
        assert_eq!(stats.connections.rejected[reason], 0, "{reason}");
    }
    client.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ebpf_publish_subscribe_roundtrip() {
    if Mode::Sockmap.runnable() {
        roundtrip_through_proxy(Mode::Sockmap).await;
    }
}
