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
