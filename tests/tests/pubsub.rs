//! Publish/subscribe through mqsplice between real clients and real brokers.

use mqsplice_tests::broker::EmbeddedBroker;
use mqsplice_tests::client::connect;
use mqsplice_tests::{Mode, proxy};
use rumqttc::QoS;
use std::time::Duration;

async fn roundtrip_through_proxy(mode: Mode) {
    let broker = EmbeddedBroker::start();
    let running = proxy::start(&proxy::config(
        mode,
        &proxy::servers(&[broker.addr], ""),
        "",
        "",
    ))
    .await;
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

    let stats = running.stats();
    assert_eq!(stats["dataplane"]["mode"], mode.config_value());
    assert_eq!(stats["connections"]["handled"], 2);
    assert_eq!(stats["connections"]["active"], 2);
    assert_eq!(proxy::totals(&stats), vec![2]);
    publisher.disconnect().await;
    subscriber.disconnect().await;
    assert!(
        mqsplice_tests::wait_until(
            Duration::from_secs(5),
            || running.stats()["connections"]["active"] == 0
        )
        .await,
        "connections did not close: {}",
        running.stats()
    );
    // Per-server bytes of spliced flows are added when the flow ends; check after the close.
    let to_server = proxy::server_field(&running.stats(), "bytes_to_server")[0]
        .as_u64()
        .unwrap();
    let from_server = proxy::server_field(&running.stats(), "bytes_from_server")[0]
        .as_u64()
        .unwrap();
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
    let running = proxy::start(&proxy::config(
        Mode::Userspace,
        &proxy::servers(&[broker.addr], ""),
        "",
        "",
    ))
    .await;
    let client = connect(running.listener_addr("mqtt").unwrap(), "stats-1")
        .await
        .unwrap();
    let stats = proxy::fetch_stats(running.stats_addr().unwrap()).await;
    assert_eq!(stats["connections"]["accepted"], 1);
    assert_eq!(stats["listeners"]["mqtt"]["handled"], 1);
    assert_eq!(stats["listeners"]["mqtt"]["data_path"], "userspace");
    assert_eq!(stats["listeners"]["mqtt"]["data_path_reason"], "mode");
    let server = &stats["upstreams"]["brokers"]["servers"][0];
    assert_eq!(server["addr"], broker.addr.to_string());
    assert_eq!(server["state"], "up");
    assert_eq!(server["active"], 1);
    for reason in [
        "malformed",
        "bad_protocol",
        "too_large",
        "connect_timeout",
        "no_upstream",
        "over_limit",
        "closed",
    ] {
        assert_eq!(stats["connections"]["rejected"][reason], 0, "{reason}");
    }
    client.disconnect().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ebpf_publish_subscribe_roundtrip() {
    if Mode::Sockmap.runnable() {
        roundtrip_through_proxy(Mode::Sockmap).await;
    }
}
