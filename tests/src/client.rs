//! rumqttc clients driven through the proxy.

use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::time::timeout;

/// A connected client with its event loop, polled by the test.
pub struct Client {
    pub client: AsyncClient,
    pub events: EventLoop,
}

/// Connects `client_id` to `addr` and waits for a successful CONNACK.
pub async fn connect(addr: SocketAddr, client_id: &str) -> anyhow::Result<Client> {
    let mut options = MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
    options.set_keep_alive(Duration::from_secs(30));
    options.set_max_packet_size(2 * 1024 * 1024, 2 * 1024 * 1024);
    let (client, mut events) = AsyncClient::new(options, 64);
    let connack = timeout(Duration::from_secs(10), async {
        loop {
            match events.poll().await? {
                Event::Incoming(Packet::ConnAck(ack)) => return anyhow::Ok(ack),
                _ => continue,
            }
        }
    })
    .await??;
    anyhow::ensure!(
        connack.code == rumqttc::ConnectReturnCode::Success,
        "CONNACK {:?}",
        connack.code
    );
    Ok(Client { client, events })
}

impl Client {
    /// Subscribes and waits for the SUBACK.
    pub async fn subscribe(&mut self, topic: &str, qos: QoS) -> anyhow::Result<()> {
        self.client.subscribe(topic, qos).await?;
        timeout(Duration::from_secs(10), async {
            loop {
                if let Event::Incoming(Packet::SubAck(_)) = self.events.poll().await? {
                    return anyhow::Ok(());
                }
            }
        })
        .await?
    }

    /// Publishes and drives the event loop until the publish is out (and acknowledged for QoS 1).
    pub async fn publish(&mut self, topic: &str, qos: QoS, payload: Vec<u8>) -> anyhow::Result<()> {
        self.client.publish(topic, qos, false, payload).await?;
        timeout(Duration::from_secs(10), async {
            loop {
                match (qos, self.events.poll().await?) {
                    (QoS::AtMostOnce, Event::Outgoing(rumqttc::Outgoing::Publish(_))) => {
                        return anyhow::Ok(());
                    }
                    (QoS::AtLeastOnce, Event::Incoming(Packet::PubAck(_))) => return anyhow::Ok(()),
                    _ => continue,
                }
            }
        })
        .await?
    }

    /// The next PUBLISH delivered to this client, within `wait`.
    pub async fn next_publish(&mut self, wait: Duration) -> anyhow::Result<rumqttc::Publish> {
        timeout(wait, async {
            loop {
                if let Event::Incoming(Packet::Publish(publish)) = self.events.poll().await? {
                    return anyhow::Ok(publish);
                }
            }
        })
        .await?
    }

    /// Sends DISCONNECT and drives the loop until it is written.
    pub async fn disconnect(mut self) {
        let _ = self.client.disconnect().await;
        let _ = timeout(Duration::from_secs(2), async {
            loop {
                match self.events.poll().await {
                    Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) | Err(_) => break,
                    _ => continue,
                }
            }
        })
        .await;
    }
}
