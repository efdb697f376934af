//! The echo broker: just enough MQTT that a proxy in front of it sees a real session, and cheap
//! enough that the proxy, not the broker, is what the benchmark measures.
//!
//! One thread per connection with a blocking socket: a blocked `read` is woken directly by the
//! kernel, the cheapest wake-up there is. Per connection: one buffer, grown once when traffic
//! shows, and one reply buffer; nothing is allocated per message. Complete packets are parsed
//! from the fixed header (type byte + remaining length); runs of PUBLISHes are echoed with one
//! `write` straight from the receive buffer, as a subscriber to its own topic would get them.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// First buffer of a connection: enough for the CONNECT and idle traffic, so 10,000 held
/// connections stay cheap.
const SMALL_BUFFER: usize = 4 * 1024;
/// Buffer once a read filled the small one: big reads and big echo writes under load.
const BIG_BUFFER: usize = 256 * 1024;
/// Largest packet accepted; anything bigger is a broken client (or proxy).
const MAX_PACKET: usize = 4 * 1024 * 1024;
/// A connection silent for this long is dropped (the held-connection phase is far shorter).
const IDLE_LIMIT: Duration = Duration::from_secs(600);
/// A write blocked for this long means the client stopped reading; give up on it.
const WRITE_LIMIT: Duration = Duration::from_secs(30);

/// A running echo broker on a loopback port. Dropping it stops accepting; connections end
/// when their clients close.
pub struct EchoBroker {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl EchoBroker {
    /// Binds a free loopback port and accepts on a background thread.
    pub fn start() -> io::Result<EchoBroker> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        std::thread::Builder::new()
            .name("echo-accept".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    if flag.load(Ordering::Relaxed) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    // Small stacks: the held-connection phase runs 10,000 of these threads.
                    let _ = std::thread::Builder::new()
                        .stack_size(128 * 1024)
                        .spawn(move || {
                            let _ = serve(stream);
                        });
                }
            })?;
        Ok(EchoBroker { addr, stop })
    }
}

impl Drop for EchoBroker {
    /// Sets the flag, then wakes the blocked `accept` with one connection.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
    }
}

/// A parsed fixed header: the type-and-flags byte, the header's length and the remaining length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub first: u8,
    pub header_len: usize,
    pub remaining: usize,
}

/// Parses the fixed header at the start of `buf`: `Ok(None)` when more bytes are needed,
/// an error for a remaining length longer than four bytes.
pub fn parse_header(buf: &[u8]) -> io::Result<Option<Header>> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    match read_varint(&buf[1..]) {
        Some((remaining, len)) => Ok(Some(Header {
            first,
            header_len: 1 + len,
            remaining,
        })),
        None if buf.len() >= 5 => Err(io::Error::other("remaining length longer than 4 bytes")),
        None => Ok(None),
    }
}

/// Decodes an MQTT variable byte integer: (value, bytes used), or `None` when `buf` ends
/// first or the integer runs past four bytes.
fn read_varint(buf: &[u8]) -> Option<(usize, usize)> {
    let mut value = 0usize;
    for (i, &byte) in buf.iter().take(4).enumerate() {
        value |= ((byte & 0x7f) as usize) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

/// Serves one connection until the client closes or sends DISCONNECT.
fn serve(mut stream: TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(IDLE_LIMIT))?;
    stream.set_write_timeout(Some(WRITE_LIMIT))?;
    let mut buf = vec![0u8; SMALL_BUFFER];
    let mut reply = Vec::with_capacity(256);
    let mut end = 0usize;
    let mut mqtt5 = false;
    loop {
        let space = buf.len() - end;
        let n = stream.read(&mut buf[end..])?;
        if n == 0 {
            return Ok(());
        }
        end += n;
        let mut pos = 0usize;
        // Start of the run of PUBLISHes not yet echoed.
        let mut run = 0usize;
        let mut need = 0usize;
        while let Some(h) = parse_header(&buf[pos..end])? {
            let total = h.header_len + h.remaining;
            if total > MAX_PACKET {
                return Err(io::Error::other("packet too large"));
            }
            if pos + total > end {
                need = total;
                break;
            }
            let packet = &buf[pos..pos + total];
            if h.first >> 4 != 3 {
                stream.write_all(&buf[run..pos])?;
                reply.clear();
                let keep_going = answer(packet, h, &mut mqtt5, &mut reply);
                stream.write_all(&reply)?;
                if !keep_going {
                    return Ok(());
                }
                run = pos + total;
            }
            pos += total;
        }
        stream.write_all(&buf[run..pos])?;
        buf.copy_within(pos..end, 0);
        end -= pos;
        // Grow when a read filled all the space (traffic), or when one packet does not fit.
        let want = if n == space { BIG_BUFFER } else { 0 }.max(need);
        if want > buf.len() {
            buf.resize(want, 0);
        }
    }
}

/// Writes the answer to a non-PUBLISH packet into `reply`; false for DISCONNECT.
pub fn answer(packet: &[u8], h: Header, mqtt5: &mut bool, reply: &mut Vec<u8>) -> bool {
    let body = &packet[h.header_len..];
    // The first two bytes of the variable header (packet id, or the protocol name's length).
    let packet_id = |body: &[u8]| [*body.first().unwrap_or(&0), *body.get(1).unwrap_or(&0)];
    match h.first >> 4 {
        // CONNECT: protocol name (u16 length + bytes), then the level; 5 means MQTT 5.
        1 => {
            let name_len = u16::from_be_bytes(packet_id(body)) as usize;
            *mqtt5 = body.get(2 + name_len) == Some(&5);
            if *mqtt5 {
                reply.extend_from_slice(&[0x20, 0x03, 0x00, 0x00, 0x00]);
            } else {
                reply.extend_from_slice(&[0x20, 0x02, 0x00, 0x00]);
            }
        }
        // SUBSCRIBE: packet id, (MQTT 5: properties), then filters of u16 length + name +
        // options byte; every filter is granted QoS 0.
        8 => {
            let mut at = 2;
            if *mqtt5 {
                at = match read_varint(&body[2.min(body.len())..]) {
                    Some((props, len)) => 2 + len + props,
                    None => body.len(),
                };
            }
            let mut filters = 0usize;
            while at + 2 <= body.len() {
                let len = u16::from_be_bytes([body[at], body[at + 1]]) as usize;
                at += 2 + len + 1;
                filters += 1;
            }
            let len = 2 + usize::from(*mqtt5) + filters;
            reply.push(0x90);
            reply.extend(mqsplice_tests::raw::varint(len));
            reply.extend_from_slice(&packet_id(body));
            if *mqtt5 {
                reply.push(0);
            }
            reply.resize(reply.len() + filters, 0x00);
        }
        // UNSUBSCRIBE: UNSUBACK with the packet id (MQTT 5: empty properties, one success
        // code per filter is optional to get right here; the bench never unsubscribes).
        10 => {
            reply.extend_from_slice(&[0xb0, 0x02]);
            reply.extend_from_slice(&packet_id(body));
        }
        // PINGREQ
        12 => reply.extend_from_slice(&[0xd0, 0x00]),
        // DISCONNECT
        14 => return false,
        // PUBACK, PUBREC, … from a client: nothing to answer for a QoS 0 broker.
        _ => {}
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers() {
        assert_eq!(parse_header(&[0x30]).unwrap(), None);
        assert_eq!(
            parse_header(&[0x30, 0x05]).unwrap(),
            Some(Header {
                first: 0x30,
                header_len: 2,
                remaining: 5
            })
        );
        assert_eq!(parse_header(&[0x30, 0x80]).unwrap(), None);
        assert_eq!(
            parse_header(&[0x30, 0x80, 0x08])
                .unwrap()
                .unwrap()
                .remaining,
            1024
        );
        assert!(parse_header(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01]).is_err());
    }

    #[test]
    fn answers() {
        let mut v5 = false;
        let mut reply = Vec::new();
        let sub = [0x82, 0x08, 0x00, 0x07, 0x00, 0x03, b'a', b'/', b'b', 0x00];
        let h = parse_header(&sub).unwrap().unwrap();
        assert!(answer(&sub, h, &mut v5, &mut reply));
        assert_eq!(reply, [0x90, 0x03, 0x00, 0x07, 0x00]);
        reply.clear();
        let ping = [0xc0, 0x00];
        assert!(answer(
            &ping,
            parse_header(&ping).unwrap().unwrap(),
            &mut v5,
            &mut reply
        ));
        assert_eq!(reply, [0xd0, 0x00]);
    }
}
