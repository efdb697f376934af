//! MQTT over WebSocket from the client side: a tokio-tungstenite client that sends raw MQTT bytes
//! in binary frames cut exactly where a test says, and reads MQTT packets back out of frames.

use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::ServerName;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::{Bytes, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// A connected WebSocket client over transport `S` (plain TCP for `ws://`, a rustls stream for
/// `wss://`) and the MQTT bytes received but not yet taken.
pub struct WsClient<S = MaybeTlsStream<TcpStream>> {
    pub ws: WebSocketStream<S>,
    received: Vec<u8>,
}

/// Opens `ws://addr{path}` offering `subprotocol` (if any), with `headers` added.
pub async fn connect(
    addr: SocketAddr,
    path: &str,
    subprotocol: Option<&str>,
    headers: &[(&str, &str)],
) -> anyhow::Result<WsClient> {
    let request = request(&format!("ws://{addr}{path}"), subprotocol, headers)?;
    let (ws, _response) = tokio_tungstenite::connect_async(request).await?;
    Ok(WsClient {
        ws,
        received: Vec::new(),
    })
}

/// Opens `wss://localhost:{port}{path}` on `addr`: a TLS handshake with `tls` (server name
/// `localhost`; the ALPN names are the config's), then the upgrade offering `subprotocol`.
pub async fn connect_tls(
    addr: SocketAddr,
    path: &str,
    subprotocol: Option<&str>,
    tls: Arc<rustls::ClientConfig>,
) -> anyhow::Result<WsClient<TlsStream<TcpStream>>> {
    let tcp = TcpStream::connect(addr).await?;
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(ServerName::try_from("localhost")?, tcp)
        .await?;
    let url = format!("wss://localhost:{}{path}", addr.port());
    let (ws, _response) =
        tokio_tungstenite::client_async(request(&url, subprotocol, &[])?, stream).await?;
    Ok(WsClient {
        ws,
        received: Vec::new(),
    })
}

/// An upgrade request for `url` offering `subprotocol` (if any), with `headers` added.
fn request(
    url: &str,
    subprotocol: Option<&str>,
    headers: &[(&str, &str)],
) -> anyhow::Result<Request> {
    let mut request = url.into_client_request()?;
    if let Some(p) = subprotocol {
        request
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", p.parse()?);
    }
    for (name, value) in headers {
        let name = tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(name.as_bytes())?;
        request.headers_mut().append(name, value.parse()?);
    }
    Ok(request)
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsClient<S> {
    /// Sends `bytes` as one binary frame.
    pub async fn send(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        self.ws
            .send(Message::Binary(Bytes::copy_from_slice(bytes)))
            .await?;
        Ok(())
    }

    /// The next complete MQTT packet, however the frames cut it; fails after `wait`.
    pub async fn packet(&mut self, wait: Duration) -> anyhow::Result<Vec<u8>> {
        tokio::time::timeout(wait, async {
            loop {
                if let Some(len) = packet_len(&self.received) {
                    return Ok(self.received.drain(..len).collect());
                }
                match self.ws.next().await {
                    Some(Ok(Message::Binary(b))) => self.received.extend_from_slice(&b),
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                    Some(Ok(other)) => anyhow::bail!("unexpected message {other:?}"),
                    Some(Err(e)) => return Err(e.into()),
                    None => anyhow::bail!("closed"),
                }
            }
        })
        .await
        .map_err(|_| anyhow::anyhow!("no MQTT packet within {wait:?}"))?
    }

    /// Exactly `n` payload bytes, across however many frames.
    pub async fn bytes(&mut self, n: usize, wait: Duration) -> anyhow::Result<Vec<u8>> {
        tokio::time::timeout(wait, async {
            while self.received.len() < n {
                match self.ws.next().await {
                    Some(Ok(Message::Binary(b))) => self.received.extend_from_slice(&b),
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                    Some(Ok(other)) => anyhow::bail!("unexpected message {other:?}"),
                    Some(Err(e)) => return Err(e.into()),
                    None => anyhow::bail!("closed after {} bytes", self.received.len()),
                }
            }
            Ok(self.received.drain(..n).collect())
        })
        .await
        .map_err(|_| anyhow::anyhow!("{n} bytes not received within {wait:?}"))?
    }
}

/// The length of the complete MQTT packet at the start of `buf`, if it is all there.
pub fn packet_len(buf: &[u8]) -> Option<usize> {
    let mut remaining = 0usize;
    for i in 1..5 {
        let byte = *buf.get(i)?;
        remaining |= usize::from(byte & 0x7f) << (7 * (i - 1));
        if byte & 0x80 == 0 {
            let total = 1 + i + remaining;
            return (buf.len() >= total).then_some(total);
        }
    }
    None
}

/// A SUBSCRIBE (MQTT 3.1.1) for one topic filter.
pub fn subscribe(packet_id: u16, filter: &str, qos: u8) -> Vec<u8> {
    let mut body = packet_id.to_be_bytes().to_vec();
    body.extend_from_slice(&(filter.len() as u16).to_be_bytes());
    body.extend_from_slice(filter.as_bytes());
    body.push(qos);
    let mut packet = vec![0x82];
    packet.extend(crate::raw::varint(body.len()));
    packet.extend(body);
    packet
}

/// A QoS 1 PUBLISH (MQTT 3.1.1).
pub fn publish_qos1(packet_id: u16, topic: &str, payload: &[u8]) -> Vec<u8> {
    let mut body = (topic.len() as u16).to_be_bytes().to_vec();
    body.extend_from_slice(topic.as_bytes());
    body.extend_from_slice(&packet_id.to_be_bytes());
    body.extend_from_slice(payload);
    let mut packet = vec![0x32];
    packet.extend(crate::raw::varint(body.len()));
    packet.extend(body);
    packet
}

/// A raw upgrade request for `path` on `addr` with `extra` header lines (each ending in `\r\n`).
pub fn upgrade_request(addr: SocketAddr, path: &str, extra: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

/// A client frame as RFC 6455 lays it out: `fin`, `opcode`, and a mask (or none, which a server
/// must refuse).
pub fn frame(opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut out = vec![0x80 | opcode];
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(mask_bit | n as u8),
        n if n <= 0xffff => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(key) => {
            out.extend_from_slice(&key);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        }
        None => out.extend_from_slice(payload),
    }
    out
}
