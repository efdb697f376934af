//! The hand-over of one flow to the TC program: freeze, drain, mute, rewrite (the rules are in
//! [`super::handover`]); and taking it back out of the maps when it is over.

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::Mutex;
use std::time::Duration;

use proxy_common::direction::{TO_CLIENT, TO_UPSTREAM};
use proxy_common::packet::{PacketFlowState, PacketKey, PacketLeg, family, leg_mode};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::handover::{
    Fallback, Muted, Rewrite, SocketQueues, check_legs, check_mss, drained, rewrites,
};
use super::loader::PacketMaps;
use super::repair::{established, negotiated, peer_mss, queue_seqs, set_repair, timestamp_now};
use super::route::{Egress, egress};
use crate::dataplane::ebpf::{queued_in, unacked_out};

/// How long a failed mute waits before the next try: the peers' acknowledgments are on their way.
const RETRY_MUTE: Duration = Duration::from_millis(5);

/// A flow the program now carries: its id, its two flow-table keys, and the proxy's two muted
/// sockets, which keep their ports until the flow is over and then close without a trace.
#[derive(Debug)]
pub struct SplicedFlow {
    pub flow: u64,
    /// Bytes the daemon moved during the drain, client → broker and back: the flow's first bytes
    /// after the CONNECT, which the program never saw.
    pub drained: [u64; 2],
    /// Each direction's sequence number on its receiving leg at the hand-over.
    start_seq: [u32; 2],
    keys: [PacketKey; 2],
    _muted: [TcpStream; 2],
}

/// The flow-table key of the segments arriving on a proxy socket: from its peer, to it.
fn incoming(local: SocketAddr, peer: SocketAddr) -> PacketKey {
    let mut key = PacketKey::default();
    match (peer, local) {
        (SocketAddr::V4(p), SocketAddr::V4(l)) => {
            key.src[..4].copy_from_slice(&p.ip().octets());
            key.dst[..4].copy_from_slice(&l.ip().octets());
            key.family = family::V4;
        }
        _ => {
            key.src = ipv6_octets(peer);
            key.dst = ipv6_octets(local);
            key.family = family::V6;
        }
    }
    key.sport = peer.port().to_be();
    key.dport = local.port().to_be();
    key
}

fn ipv6_octets(addr: SocketAddr) -> [u8; 16] {
    match addr {
        SocketAddr::V6(a) => a.ip().octets(),
        SocketAddr::V4(a) => a.ip().to_ipv6_mapped().octets(),
    }
}

/// The entry for the segments of one leg: they leave as segments of the other leg's socket.
fn leg_entry(
    flow: u64,
    direction: u32,
    mode: u32,
    other_incoming: &PacketKey,
    rewrite: Option<&Rewrite>,
) -> PacketLeg {
    // Leaving on the other leg is the reverse of what arrives there.
    let mut leg = PacketLeg {
        flow,
        new_src: other_incoming.dst,
        new_dst: other_incoming.src,
        new_sport: other_incoming.dport,
        new_dport: other_incoming.sport,
        mode,
        direction,
        ..PacketLeg::default()
    };
    if let Some(r) = rewrite {
        leg.seq_delta = r.seq_delta;
        leg.ack_delta = r.ack_delta;
        leg.ts_val_target = r.ts_val_target;
        leg.wscale_from = r.wscale_from;
        leg.wscale_to = r.wscale_to;
    }
    leg
}

/// The interface a rewritten segment is sent out of; 0 lets it go on up this host's stack.
fn ifindex(egress: &Egress) -> u32 {
    match egress {
        Egress::Local => 0,
        Egress::Interface(_, index) => *index,
    }
}

/// Moves whatever `from` holds into `to`; returns how many bytes. A FIN from `from`'s peer is
/// an error here: a flow that is closing is left to the copy path, which passes the close on
/// (spliced, the proxy's socket would have taken the FIN and its peer never hear of it).
async fn move_available(
    from: &TcpStream,
    to: &mut TcpStream,
    buf: &mut [u8],
) -> std::io::Result<u64> {
    let mut moved = 0;
    loop {
        match from.try_read(buf) {
            Ok(0) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "closed during the hand-over",
                ));
            }
            Ok(n) => {
                to.write_all(&buf[..n]).await?;
                moved += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(moved),
            Err(e) => return Err(e),
        }
    }
}

fn queues(
    socket: &TcpStream,
    send_next: u32,
    peer_acked: Option<u32>,
) -> std::io::Result<SocketQueues> {
    Ok(SocketQueues {
        unread: queued_in(socket.as_fd())?,
        unacked: unacked_out(socket.as_fd())?,
        send_next,
        peer_acked,
    })
}

/// Hands the pair to the program, or says why not (the sockets are then as they were, unmuted,
/// and every byte either moved or still queued in them, for the next data path).
pub async fn hand_over(
    maps: &Mutex<PacketMaps>,
    flow: u64,
    mut client: TcpStream,
    mut broker: TcpStream,
    timeout: Duration,
) -> Result<SplicedFlow, (Fallback, TcpStream, TcpStream)> {
    let addrs = (|| {
        Some((
            client.local_addr().ok()?,
            client.peer_addr().ok()?,
            broker.local_addr().ok()?,
            broker.peer_addr().ok()?,
        ))
    })();
    let Some((client_local, client_peer, broker_local, broker_peer)) = addrs else {
        return Err((Fallback::DrainTimeout, client, broker));
    };
    if client_peer.is_ipv4() != broker_peer.is_ipv4() {
        return Err((Fallback::AddressFamily, client, broker));
    }
    let legs = negotiated(client.as_fd()).and_then(|c| Ok((c, negotiated(broker.as_fd())?)));
    let checked = match legs {
        Ok((c, b)) => check_legs(&c, &b),
        Err(_) => Err(Fallback::DrainTimeout),
    };
    if let Err(reason) = checked {
        return Err((reason, client, broker));
    }
    let keys = [
        incoming(client_local, client_peer),
        incoming(broker_local, broker_peer),
    ];
    let redirect = match (egress(broker_peer.ip()), egress(client_peer.ip())) {
        (Ok(to_broker), Ok(to_client)) => [ifindex(&to_broker), ifindex(&to_client)],
        _ => return Err((Fallback::NoRoute, client, broker)),
    };
    if let Err(reason) = freeze(maps, flow, &keys) {
        return Err((reason, client, broker));
    }
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; 64 * 1024];
    let mut drained = [0u64; 2];
    loop {
        // Not bounded by the deadline: cut short, a write would lose the bytes already read. A
        // peer that stops reading holds the hand-over as it would hold the copy path, and the
        // flow goes to the copy path once it reads again.
        let moved = async {
            drained[0] += move_available(&client, &mut broker, &mut buf).await?;
            drained[1] += move_available(&broker, &mut client, &mut buf).await?;
            std::io::Result::Ok(())
        }
        .await;
        if moved.is_err() {
            // A side closed or reset during the hand-over: the copy path ends the flow as it
            // ends any other, with every byte the proxy's sockets took delivered.
            remove(maps, flow, &keys);
            return Err((Fallback::PeerClosed, client, broker));
        }
        if Instant::now() > deadline {
            remove(maps, flow, &keys);
            return Err((Fallback::DrainTimeout, client, broker));
        }
        let muted = match try_mute(maps, flow, &client, &broker) {
            Ok(muted) => muted,
            Err(reason) => {
                remove(maps, flow, &keys);
                return Err((reason, client, broker));
            }
        };
        if let Some(muted) = muted {
            if let Err(reason) = check_mss(&muted[0], &muted[1]) {
                // Nothing was sent while muted: unmuted, the sockets go on as they were.
                let _ = set_repair(client.as_fd(), false);
                let _ = set_repair(broker.as_fd(), false);
                remove(maps, flow, &keys);
                return Err((reason, client, broker));
            }
            let (up, down) = rewrites(&muted[0], &muted[1]);
            let mut entries = [
                leg_entry(flow, TO_UPSTREAM, leg_mode::SPLICE, &keys[1], Some(&up)),
                leg_entry(flow, TO_CLIENT, leg_mode::SPLICE, &keys[0], Some(&down)),
            ];
            // A client's segment leaves where the broker is reached, and back.
            entries[0].redirect_ifindex = redirect[0];
            entries[1].redirect_ifindex = redirect[1];
            let mut m = maps.lock().unwrap_or_else(|p| p.into_inner());
            for (key, entry) in keys.iter().zip(entries) {
                let _ = m.flows.insert(key, entry, 0);
            }
            return Ok(SplicedFlow {
                flow,
                drained,
                start_seq: [muted[1].seqs.send_next, muted[0].seqs.send_next],
                keys,
                _muted: [client, broker],
            });
        }
        tokio::time::sleep(RETRY_MUTE).await;
    }
}

/// Mutes both sockets when they are drained; leaves them unmuted and returns `None` when not yet.
fn try_mute(
    maps: &Mutex<PacketMaps>,
    flow: u64,
    client: &TcpStream,
    broker: &TcpStream,
) -> Result<Option<[Muted; 2]>, Fallback> {
    let muted = mute_if_drained(maps, flow, client, broker);
    // A FIN or RST that reached a socket between the last read and the mute: the copy path
    // must pass it on.
    if !(established(client.as_fd()) && established(broker.as_fd())) {
        if muted.is_some() {
            let _ = set_repair(client.as_fd(), false);
            let _ = set_repair(broker.as_fd(), false);
        }
        return Err(Fallback::PeerClosed);
    }
    Ok(muted)
}

fn mute_if_drained(
    maps: &Mutex<PacketMaps>,
    flow: u64,
    client: &TcpStream,
    broker: &TcpStream,
) -> Option<[Muted; 2]> {
    if queued_in(client.as_fd()).ok()? != 0 || queued_in(broker.as_fd()).ok()? != 0 {
        return None;
    }
    let unmute = || {
        let _ = set_repair(client.as_fd(), false);
        let _ = set_repair(broker.as_fd(), false);
    };
    if set_repair(client.as_fd(), true).is_err() || set_repair(broker.as_fd(), true).is_err() {
        unmute();
        return None;
    }
    let read = || -> std::io::Result<[Muted; 2]> {
        let muted = |s: &TcpStream| -> std::io::Result<Muted> {
            Ok(Muted {
                seqs: queue_seqs(s.as_fd())?,
                negotiated: negotiated(s.as_fd())?,
                peer_mss: peer_mss(s.as_fd())?,
                ts_now: timestamp_now(s.as_fd())?,
            })
        };
        Ok([muted(client)?, muted(broker)?])
    };
    let Ok(muted) = read() else {
        unmute();
        return None;
    };
    let state = flow_state(maps, flow).unwrap_or_default();
    let acked = |dir: u32| {
        (state.peer_acked_seen[dir as usize] != 0).then_some(state.peer_acked[dir as usize])
    };
    let ready = match (
        queues(client, muted[0].seqs.send_next, acked(TO_UPSTREAM)),
        queues(broker, muted[1].seqs.send_next, acked(TO_CLIENT)),
    ) {
        (Ok(c), Ok(b)) => drained(&c, &b),
        _ => false,
    };
    if !ready {
        unmute();
        return None;
    }
    Some(muted)
}

/// The flow's state as the program keeps it.
pub fn flow_state(maps: &Mutex<PacketMaps>, flow: u64) -> Option<PacketFlowState> {
    let m = maps.lock().unwrap_or_else(|p| p.into_inner());
    m.state.get(&flow, 0).ok()
}

/// Writes the flow's state entry and both legs' entries, frozen.
fn freeze(maps: &Mutex<PacketMaps>, flow: u64, keys: &[PacketKey; 2]) -> Result<(), Fallback> {
    let mut m = maps.lock().unwrap_or_else(|p| p.into_inner());
    m.state
        .insert(flow, PacketFlowState::default(), 0)
        .map_err(|_| Fallback::TableFull)?;
    let entries = [
        leg_entry(flow, TO_UPSTREAM, leg_mode::FREEZE, &keys[1], None),
        leg_entry(flow, TO_CLIENT, leg_mode::FREEZE, &keys[0], None),
    ];
    for (key, entry) in keys.iter().zip(entries) {
        if m.flows.insert(key, entry, 0).is_err() {
            drop(m);
            remove(maps, flow, keys);
            return Err(Fallback::TableFull);
        }
    }
    Ok(())
}

/// Takes the flow out of the maps.
fn remove(maps: &Mutex<PacketMaps>, flow: u64, keys: &[PacketKey; 2]) {
    let mut m = maps.lock().unwrap_or_else(|p| p.into_inner());
    for key in keys {
        let _ = m.flows.remove(key);
    }
    let _ = m.state.remove(&flow);
}

impl SplicedFlow {
    /// Payload bytes the program forwarded each way (client → broker, broker → client), each
    /// byte once however often it was sent, from the flow's state.
    pub fn forwarded(&self, state: &PacketFlowState) -> [u64; 2] {
        [0, 1].map(|dir| {
            if state.seq_end_seen[dir] == 0 {
                0
            } else {
                state.seq_end[dir].wrapping_sub(self.start_seq[dir]) as u64
            }
        })
    }

    /// Takes the flow out of the maps and closes the muted sockets (nothing goes on the wire).
    pub fn finish(self, maps: &Mutex<PacketMaps>) -> Option<PacketFlowState> {
        let state = flow_state(maps, self.flow);
        remove(maps, self.flow, &self.keys);
        state
    }
}

#[cfg(test)]
mod tests {
    use super::super::loader::PacketPrograms;
    use super::*;
    use std::io::{Read, Write};

    /// Writes `words` 4-byte counters, starting at 0, as fast as the socket takes them.
    fn write_numbered(mut to: std::net::TcpStream, words: u32) -> std::net::TcpStream {
        let mut next = 0u32;
        let mut chunk = Vec::with_capacity(64 * 1024);
        while next < words {
            chunk.clear();
            while chunk.len() < 64 * 1024 && next < words {
                chunk.extend_from_slice(&next.to_be_bytes());
                next += 1;
            }
            to.write_all(&chunk).unwrap();
        }
        to
    }

    /// Reads `words` counters and checks each is the next one; returns the first wrong offset.
    fn check_numbered(
        mut from: std::net::TcpStream,
        words: u32,
    ) -> Result<std::net::TcpStream, String> {
        let mut expected = 0u32;
        let mut pending = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        while expected < words {
            let n = from.read(&mut buf).map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Err(format!("closed after {expected} of {words} counters"));
            }
            pending.extend_from_slice(&buf[..n]);
            let whole = pending.len() / 4 * 4;
            for word in pending[..whole].chunks_exact(4) {
                let got = u32::from_be_bytes(word.try_into().unwrap());
                if got != expected {
                    return Err(format!(
                        "byte {}: counter {got}, expected {expected}",
                        expected as u64 * 4
                    ));
                }
                expected += 1;
            }
            pending.drain(..whole);
        }
        Ok(from)
    }

    /// A client that streams from the moment it connected, and a broker that streams back: the
    /// bytes the proxy's sockets took before the hand-over and those after it reach the other end
    /// once each, in order, both ways; then both close and the program sees both FINs
    /// acknowledged. Needs root (TC program, TCP_REPAIR).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_loopback_flow_moves_numbered_bytes_both_ways_across_the_hand_over() {
        numbered_flow("127.0.0.1:0", "127.0.0.1:0", None).await;
    }

    /// The same with every address different, so the program rewrites addresses too (the IPv4
    /// header checksum, and the TCP checksum through its pseudo-header).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flow_whose_legs_differ_in_addresses_too_moves_numbered_bytes() {
        numbered_flow("127.0.0.3:0", "127.0.0.2:0", Some("127.0.0.4:0")).await;
    }

    /// The same over IPv6.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_ipv6_loopback_flow_moves_numbered_bytes() {
        numbered_flow("[::1]:0", "[::1]:0", None).await;
    }

    /// Streams numbered bytes both ways through a proxy listening on `proxy`, to a broker on
    /// `broker`, from a client bound to `client` (any address when `None`).
    async fn numbered_flow(proxy: &str, broker: &str, client: Option<&str>) {
        if !crate::dataplane::root_or_skip("the packet splice") {
            return;
        }
        const WORDS: u32 = 4 << 20; // 16 MiB each way
        let (_programs, maps) = PacketPrograms::load(&["lo".to_string()], 64).unwrap();
        let maps = Mutex::new(maps);
        let proxy_listener = std::net::TcpListener::bind(proxy).unwrap();
        let broker_listener = std::net::TcpListener::bind(broker).unwrap();
        let client = match client {
            Some(bind) => {
                let bind: SocketAddr = bind.parse().unwrap();
                let socket = socket2::Socket::new(
                    socket2::Domain::for_address(bind),
                    socket2::Type::STREAM,
                    None,
                )
                .unwrap();
                socket.bind(&bind.into()).unwrap();
                socket
                    .connect(&proxy_listener.local_addr().unwrap().into())
                    .unwrap();
                std::net::TcpStream::from(socket)
            }
            None => std::net::TcpStream::connect(proxy_listener.local_addr().unwrap()).unwrap(),
        };
        let (proxy_client, _) = proxy_listener.accept().unwrap();
        let proxy_broker =
            std::net::TcpStream::connect(broker_listener.local_addr().unwrap()).unwrap();
        let (broker, _) = broker_listener.accept().unwrap();

        let client_writer = {
            let c = client.try_clone().unwrap();
            std::thread::spawn(move || write_numbered(c, WORDS))
        };
        let broker_writer = {
            let b = broker.try_clone().unwrap();
            std::thread::spawn(move || write_numbered(b, WORDS))
        };
        let broker_reader = {
            let b = broker.try_clone().unwrap();
            std::thread::spawn(move || check_numbered(b, WORDS))
        };
        let client_reader = {
            let c = client.try_clone().unwrap();
            std::thread::spawn(move || check_numbered(c, WORDS))
        };

        for s in [&proxy_client, &proxy_broker] {
            s.set_nonblocking(true).unwrap();
        }
        let spliced = hand_over(
            &maps,
            1,
            TcpStream::from_std(proxy_client).unwrap(),
            TcpStream::from_std(proxy_broker).unwrap(),
            Duration::from_secs(5),
        )
        .await
        .map_err(|(reason, _, _)| reason)
        .expect("handed over");

        let waited = tokio::task::spawn_blocking(move || {
            (
                client_writer.join().unwrap(),
                broker_writer.join().unwrap(),
                broker_reader.join().unwrap(),
                client_reader.join().unwrap(),
            )
        })
        .await
        .unwrap();
        let (client_w, broker_w, to_broker, to_client) = waited;
        let to_broker = to_broker.expect("client → broker");
        let to_client = to_client.expect("broker → client");
        client_w.shutdown(std::net::Shutdown::Write).unwrap();
        broker_w.shutdown(std::net::Shutdown::Write).unwrap();
        for mut end in [to_broker, to_client] {
            assert_eq!(end.read(&mut [0u8; 1]).unwrap(), 0, "the FIN came through");
        }
        let mut state = flow_state(&maps, 1).unwrap();
        for _ in 0..200 {
            if state.fin_acked == [1, 1] {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
            state = flow_state(&maps, 1).unwrap();
        }
        assert_eq!(state.fin_acked, [1, 1], "{state:?}");
        let forwarded = spliced.forwarded(&state);
        assert_eq!(
            [
                forwarded[0] + spliced.drained[0],
                forwarded[1] + spliced.drained[1]
            ],
            [WORDS as u64 * 4; 2],
            "every byte counted once: {state:?}"
        );
        let totals: Vec<_> = {
            let m = maps.lock().unwrap();
            m.totals.get(&0, 0).unwrap().iter().copied().collect()
        };
        let frozen_drops: u64 = totals.iter().map(|t| t.frozen_drops).sum();
        println!(
            "rewritten {} + {} bytes in {} + {} segments; {frozen_drops} segments dropped while frozen",
            state.bytes[0], state.bytes[1], state.packets[0], state.packets[1]
        );
        spliced.finish(&maps);
        let m = maps.lock().unwrap();
        assert_eq!(m.flows.keys().count(), 0, "the flow table is empty");
    }
}
