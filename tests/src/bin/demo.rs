//! `cargo xtask demo`: the EMQX-behind-NGINX quick start, without Docker and without NGINX.
//!
//! Three brokers on loopback, mqsplice (the built binary from `MQSPLICE_BIN`) in front of them
//! balancing by client identifier, ten clients that subscribe and publish through it; then the
//! per-broker distribution and the stats JSON, and everything stops.

use mqsplice_tests::Mode;
use mqsplice_tests::broker::EmbeddedBroker;
use mqsplice_tests::client::connect;
use mqsplice_tests::daemon::{Daemon, config_for};
use mqsplice_tests::proxy::fetch_stats;
use rumqttc::QoS;
use std::time::Duration;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let brokers: Vec<_> = (0..3).map(|_| EmbeddedBroker::start().addr).collect();
    for (i, broker) in brokers.iter().enumerate() {
        println!("broker {} (rumqttd) on {broker}", i + 1);
    }
    let (config, listen, stats) = config_for(Mode::Userspace, &brokers, "balance = \"client_id\"");
    // The default data path choice, as a new operator would get it.
    let config = config.replace("mode = \"userspace\"", "mode = \"auto\"");
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

    let json = fetch_stats(stats).await;
    let servers = json["upstreams"]["brokers"]["servers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let distribution: Vec<String> = servers.iter().map(|s| s["active"].to_string()).collect();
    println!("\nclients per broker: {}", distribution.join("/"));
    for (i, server) in servers.iter().enumerate() {
        println!(
            "  broker {} {}: {} client(s)",
            i + 1,
            server["addr"],
            server["active"]
        );
    }
    println!("\nGET /stats:\n{}", serde_json::to_string_pretty(&json)?);

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
