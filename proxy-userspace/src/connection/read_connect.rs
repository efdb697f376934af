//! Reading exactly one CONNECT from a client, never a byte more.
//!
//! Bytes behind the CONNECT belong to the flow and must reach the broker through the data plane,
//! so the fixed header is read first (its size limit checked before anything is buffered) and
//! then exactly the remaining length.

use crate::mqtt::{self, Connect, ConnectError, Framing};
use tokio::io::{AsyncRead, AsyncReadExt};
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
    client: &mut (impl AsyncRead + Unpin),
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
    client: &mut (impl AsyncRead + Unpin),
    packet: &mut Vec<u8>,
    n: usize,
) -> Result<(), ReadConnectError> {
    let start = packet.len();
    packet.resize(start + n, 0);
    client.read_exact(&mut packet[start..]).await?;
    Ok(())
}

/// Peeks one whole CONNECT without consuming it: the bytes stay queued in the client socket for
/// the in-kernel splice to forward. Returns the CONNECT's length and fields.
///
/// While the packet is incomplete, `SO_RCVLOWAT` is set to the bytes still needed, so the socket
/// reports readable once, when they are there, not per fragment. The caller resets it to 1 (the
/// hand-over kick, or before any userspace read).
pub async fn peek_connect(
    client: &mut TcpStream,
    max_size: usize,
) -> Result<(usize, Connect), ReadConnectError> {
    use crate::dataplane::ebpf::{peek, set_rcvlowat};
    use std::os::fd::AsFd;
    use tokio::io::Interest;

    let mut buf = vec![0u8; 256];
    let mut sniffed = false;
    loop {
        let ready = client.ready(Interest::READABLE).await?;
        // `try_io` clears the readiness when the closure says WouldBlock, so the next `ready`
        // waits for the kernel's next wake-up (which SO_RCVLOWAT holds back until enough is queued).
        let outcome = client.try_io(Interest::READABLE, || {
            let n = peek(client.as_fd(), &mut buf)?;
            if n == 0 {
                return Ok(Err(ReadConnectError::Closed));
            }
            let wanted = match mqtt::frame_connect(&buf[..n], max_size) {
                Ok(Framing::Complete { total_len, .. }) if n >= total_len => {
                    return Ok(mqtt::parse_connect(&buf[..total_len])
                        .map(|c| (total_len, c))
                        .map_err(ReadConnectError::Invalid));
                }
                Ok(Framing::Complete { total_len, .. }) => total_len,
                Ok(Framing::Incomplete { needed }) => n + needed,
                Err(ConnectError::TooLarge { version: None, .. }) if !sniffed => {
                    sniffed = true;
                    n + VERSION_PREFIX
                }
                Err(error) => return Ok(Err(ReadConnectError::Invalid(error))),
            };
            if ready.is_read_closed() {
                return Ok(Err(ReadConnectError::Closed));
            }
            if buf.len() < wanted {
                buf.resize(wanted, 0);
            }
            set_rcvlowat(client.as_fd(), wanted)?;
            Err(std::io::ErrorKind::WouldBlock.into())
        });
        match outcome {
            Ok(result) => return result,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(_) => return Err(ReadConnectError::Closed),
        }
    }
}
