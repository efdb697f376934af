//! Reading exactly one CONNECT from a client, never a byte more.
//!
//! Bytes behind the CONNECT belong to the flow and must reach the broker through the data plane,
//! so the fixed header is read first (its size limit checked before anything is buffered) and
//! then exactly the remaining length.

use crate::mqtt::{self, Connect, ConnectError, Framing};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// Why no CONNECT could be read.
#[derive(Debug)]
pub enum ReadConnectError {
    /// The client closed or reset first.
    Closed,
    /// The bytes were not an acceptable CONNECT.
    Invalid(ConnectError),
}

impl From<std::io::Error> for ReadConnectError {
    fn from(_: std::io::Error) -> Self {
        ReadConnectError::Closed
    }
}

/// Bytes of variable header that tell the protocol version (name length, `MQIsdp`, level).
const VERSION_PREFIX: usize = 9;

/// Reads one CONNECT (the whole packet's bytes and its parsed fields).
pub async fn read_connect(
    client: &mut TcpStream,
    max_size: usize,
) -> Result<(Vec<u8>, Connect), ReadConnectError> {
    let mut packet = Vec::with_capacity(128);
    let mut sniffed = false;
    loop {
        match mqtt::frame_connect(&packet, max_size) {
            Ok(Framing::Incomplete { needed }) => read_more(client, &mut packet, needed).await?,
            Ok(Framing::Complete { total_len, .. }) => {
                let missing = total_len - packet.len();
                read_more(client, &mut packet, missing).await?;
                let connect = mqtt::parse_connect(&packet).map_err(ReadConnectError::Invalid)?;
                return Ok((packet, connect));
            }
            Err(ConnectError::TooLarge { version: None, .. }) if !sniffed => {
                // Learn the version (for MQTT 5's CONNACK 0x95) from the first bytes of the
                // variable header; they are part of this oversized CONNECT, never of the next packet.
                sniffed = true;
                read_more(client, &mut packet, VERSION_PREFIX).await?;
            }
            Err(error) => return Err(ReadConnectError::Invalid(error)),
        }
    }
}

async fn read_more(
    client: &mut TcpStream,
    packet: &mut Vec<u8>,
    n: usize,
) -> Result<(), ReadConnectError> {
    let start = packet.len();
    packet.resize(start + n, 0);
    client.read_exact(&mut packet[start..]).await?;
    Ok(())
}
