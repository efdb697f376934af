//! `cargo xtask demo`: the EMQX-behind-NGINX quick start, without Docker and without NGINX.
//!
//! Three brokers on loopback, mqsplice (the built binary from `MQSPLICE_BIN`) in front of them
//! balancing by client identifier, ten clients that subscribe and publish through it; then the
//! per-broker distribution and the stats JSON, and everything stops.

use mqsplice_tests::broker::EmbeddedBroker;
use mqsplice_tests::client::connect;
use mqsplice_tests::daemon::Daemon;
use mqsplice_tests::setup::{Kind, Setup};
use rumqttc::QoS;
use std::time::Duration;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let brokers: Vec<_> = (0..3).map(|_| EmbeddedBroker::start().addr).collect();
    for (i, broker) in brokers.iter().enumerate() {
        println!("broker {} (rumqttd) on {broker}", i + 1);
    }
    // The default data path choice (`auto`), as a new operator would get it.
    let setup = Setup::one(Kind::Tcp, "mqtt", &brokers).upstream_with(|u| u.balance("client_id"));
    let (config, listen, stats) = setup.for_binary();
    let mut daemon = Daemon::start(&config, listen, stats);
    println!(
        "\nmqsplice on {listen}, stats on http://{stats}/stats, with {}:\n",
        daemon.config_path.display()
    );
    println!("{config}");

    let mut clients = Vec::new();
    for i in 1..=10 {
        let id = format!("demo-device-{i:02}");
        let mut client = connect(listen, &id).await?;
        client
            .subscribe(&format!("demo/{id}/#"), QoS::AtLeastOnce)
            .await?;
        clients.push((id, client));
    }
    for (id, client) in &mut clients {
        let topic = format!("demo/{id}/temperature");
        client
            .publish(&topic, QoS::AtLeastOnce, b"21.5".to_vec())
            .await?;
        let echoed = client.next_publish(Duration::from_secs(10)).await?;
        println!(
            "{id}: published and received back {:?} on {}",
            String::from_utf8_lossy(&echoed.payload),
            echoed.topic
        );
    }

    let typed = mqsplice_tests::stats::fetch_async(stats).await;
    let servers = mqsplice_tests::stats::upstream_servers(&typed);
    let distribution: Vec<String> = servers.iter().map(|s| s.active.to_string()).collect();
    println!("\nclients per broker: {}", distribution.join("/"));
    for (i, server) in servers.iter().enumerate() {
        println!(
            "  broker {} {}: {} client(s)",
            i + 1,
            server.addr,
            server.active
        );
    }
    println!("\nGET /stats:\n{}", serde_json::to_string_pretty(&typed)?);

    for (_, client) in clients {
        client.disconnect().await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let status = daemon.terminate();
    println!("\naccess log (mqsplice stderr):\n{}", daemon.stderr());
    println!("mqsplice stopped ({status}); brokers stop with this process.");
    anyhow::ensure!(status.success(), "mqsplice exited with {status}");
    Ok(())
}
