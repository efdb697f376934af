//! The WebSocket leg to a broker of an `upstream_protocol = "ws"` upstream.
//!
//! The client's WebSocket is terminated here as on any ws listener (the CONNECT must be read to
//! balance on it); the broker gets a fresh upgrade carrying the client's path, subprotocol and
//! `Host` (or `upstream_host`), plus `X-Forwarded-For` and `X-Real-IP`, as NGINX's guide sets
//! them. MQTT bytes are then re-framed each way: frame boundaries mean nothing to MQTT.

use super::handshake::Upgrade;
use super::stream::WsBytes;
use std::net::{IpAddr, SocketAddr};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::handshake::client::{Request, generate_key};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Error as WsError, http};

/// Upgrades `tcp` (connected to `broker`) to a WebSocket as a client.
///
/// `peer` is the address the proxy's socket saw, appended to `X-Forwarded-For` (NGINX's
/// `$proxy_add_x_forwarded_for`); `client` is the address in `X-Real-IP`.
pub async fn connect_broker(
    tcp: TcpStream,
    broker: SocketAddr,
    upgrade: &Upgrade,
    upstream_host: Option<&str>,
    peer: IpAddr,
    client: IpAddr,
    config: WebSocketConfig,
) -> Result<WsBytes<TcpStream>, WsError> {
    let request = broker_request(broker, upgrade, upstream_host, peer, client)?;
    let (ws, _response) =
        tokio_tungstenite::client_async_with_config(request, tcp, Some(config)).await?;
    Ok(WsBytes::new(ws, None))
}

fn broker_request(
    broker: SocketAddr,
    upgrade: &Upgrade,
    upstream_host: Option<&str>,
    peer: IpAddr,
    client: IpAddr,
) -> Result<Request, http::Error> {
    let broker_host = broker.to_string();
    let host = upstream_host
        .or(upgrade.host.as_deref())
        .unwrap_or(&broker_host);
    let forwarded_for = match &upgrade.forwarded_for {
        Some(chain) => format!("{chain}, {peer}"),
        None => peer.to_string(),
    };
    let mut builder = Request::builder()
        .method("GET")
        .uri(format!("ws://{broker_host}{}", upgrade.target))
        .header("Host", host)
        .header("Connection", "Upgrade")
        .header("Upgrade", "websocket")
        .header("Sec-WebSocket-Version", "13")
        .header("Sec-WebSocket-Key", generate_key())
        .header("X-Forwarded-For", forwarded_for)
        .header("X-Real-IP", client.to_string());
    if let Some(p) = upgrade.subprotocol {
        builder = builder.header("Sec-WebSocket-Protocol", p);
    }
    builder.body(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_carries_path_protocol_host_and_addresses() {
        let upgrade = Upgrade {
            target: "/mqtt?a=1".into(),
            host: Some("lb.example".into()),
            subprotocol: Some("mqtt"),
            accept: String::new(),
            forwarded_for: Some("203.0.113.1".into()),
            real_ip: None,
            head_len: 0,
        };
        let broker: SocketAddr = "127.0.0.1:8083".parse().unwrap();
        let peer: IpAddr = "10.0.0.2".parse().unwrap();
        let client: IpAddr = "203.0.113.1".parse().unwrap();
        let req = broker_request(broker, &upgrade, None, peer, client).unwrap();
        assert_eq!(req.uri().path_and_query().unwrap().as_str(), "/mqtt?a=1");
        assert_eq!(req.headers()["host"], "lb.example");
        assert_eq!(req.headers()["sec-websocket-protocol"], "mqtt");
        assert_eq!(req.headers()["x-forwarded-for"], "203.0.113.1, 10.0.0.2");
        assert_eq!(req.headers()["x-real-ip"], "203.0.113.1");
        let req = broker_request(broker, &upgrade, Some("emqx.internal"), peer, client).unwrap();
        assert_eq!(req.headers()["host"], "emqx.internal");
    }
}
