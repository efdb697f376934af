//! Hand-made MQTT bytes, for the cases no well-behaved client library will produce.

/// Encodes an MQTT variable byte integer.
pub fn varint(mut n: usize) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let mut byte = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if n == 0 {
            return out;
        }
    }
}

/// A CONNECT with protocol name `name`, level `level`, clean session and the raw client id bytes;
/// MQTT 5 (level 5) gets an empty property block.
pub fn connect_packet(name: &str, level: u8, client_id: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&(name.len() as u16).to_be_bytes());
    body.extend_from_slice(name.as_bytes());
    body.push(level);
    body.push(0x02); // clean session
    body.extend_from_slice(&60u16.to_be_bytes()); // keep alive
    if level == 5 {
        body.push(0); // no properties
    }
    body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    body.extend_from_slice(client_id);
    let mut packet = vec![0x10];
    packet.extend(varint(body.len()));
    packet.extend(body);
    packet
}

/// An MQTT 3.1.1 CONNECT for `client_id`.
pub fn connect_v311(client_id: &str) -> Vec<u8> {
    connect_packet("MQTT", 4, client_id.as_bytes())
}

/// An MQTT 5 CONNECT for `client_id`.
pub fn connect_v5(client_id: &str) -> Vec<u8> {
    connect_packet("MQTT", 5, client_id.as_bytes())
}

/// A QoS 0 PUBLISH (MQTT 3.1.1 layout).
pub fn publish_qos0(topic: &str, payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    body.extend_from_slice(topic.as_bytes());
    body.extend_from_slice(payload);
    let mut packet = vec![0x30];
    packet.extend(varint(body.len()));
    packet.extend(body);
    packet
}

/// How a peer ended a connection as seen by a reader.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closed {
    /// An orderly FIN: every byte sent before it was delivered.
    Eof,
    /// A reset (the peer closed with unread input); bytes in flight may be lost.
    Reset,
}

/// Reads everything until the peer closes; panics if it is still open after `wait`.
/// Refusal tests need both the bytes and whether the close was orderly.
pub async fn read_to_close(
    stream: &mut tokio::net::TcpStream,
    wait: std::time::Duration,
) -> (Vec<u8>, Closed) {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let ended = tokio::time::timeout(wait, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) => return Closed::Eof,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(_) => return Closed::Reset,
            }
        }
    })
    .await;
    match ended {
        Ok(closed) => (got, closed),
        Err(_) => panic!(
            "peer still open after {wait:?} ({} bytes read: {:02x?})",
            got.len(),
            &got[..got.len().min(32)]
        ),
    }
}

/// Reads exactly `n` bytes; panics on EOF, error or after `wait`.
pub async fn read_exactly(
    stream: &mut tokio::net::TcpStream,
    n: usize,
    wait: std::time::Duration,
) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; n];
    tokio::time::timeout(wait, stream.read_exact(&mut buf))
        .await
        .unwrap_or_else(|_| panic!("{n} bytes not read within {wait:?}"))
        .unwrap_or_else(|e| panic!("reading {n} bytes: {e}"));
    buf
}

/// `n` bytes of a recognisable pattern (so a reordering or a dropped chunk shows up).
pub fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8 ^ seed).collect()
}
