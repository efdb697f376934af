//! The socket calls the packet splice's hand-over needs (`TCP_REPAIR` and what it unlocks), each
//! a small safe wrapper over one syscall.
//!
//! A socket in repair mode sends nothing at all (no data, ACK, keepalive, FIN or RST, not even
//! when it is closed): that is how the proxy's two sockets of a flow are muted once the TC
//! program speaks for them, and closed later without a trace on the wire.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

/// `TCP_REPAIR_QUEUE` values: which queue `TCP_QUEUE_SEQ` reads.
const TCP_RECV_QUEUE: libc::c_int = 1;
const TCP_SEND_QUEUE: libc::c_int = 2;

/// `tcpi_options` bits.
const TCPI_OPT_TIMESTAMPS: u8 = 1;
const TCPI_OPT_SACK: u8 = 2;
const TCPI_OPT_WSCALE: u8 = 4;

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn set_int(fd: BorrowedFd<'_>, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: `fd` is live for the borrow; `value` is a c_int and the length passed matches it.
    check(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            name,
            (&raw const value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
}

fn get_u32(fd: BorrowedFd<'_>, name: libc::c_int) -> io::Result<u32> {
    let mut value: u32 = 0;
    let mut len = std::mem::size_of::<u32>() as libc::socklen_t;
    // SAFETY: `value` and `len` are valid for writes and `len` holds the buffer's size.
    check(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            name,
            (&raw mut value).cast(),
            &raw mut len,
        )
    })?;
    Ok(value)
}

/// Puts the socket in repair mode (muted) or takes it out. Needs `CAP_NET_ADMIN`.
pub fn set_repair(fd: BorrowedFd<'_>, on: bool) -> io::Result<()> {
    set_int(fd, libc::TCP_REPAIR, libc::c_int::from(on))
}

/// Where a muted socket's two byte streams stand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueSeqs {
    /// The sequence number of the next byte expected from the peer (`rcv_nxt`).
    pub recv_next: u32,
    /// The sequence number of the next byte the socket would send (`write_seq`).
    pub send_next: u32,
}

/// Reads a socket's sequence numbers; the socket must be in repair mode.
pub fn queue_seqs(fd: BorrowedFd<'_>) -> io::Result<QueueSeqs> {
    set_int(fd, libc::TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)?;
    let recv_next = get_u32(fd, libc::TCP_QUEUE_SEQ)?;
    set_int(fd, libc::TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)?;
    let send_next = get_u32(fd, libc::TCP_QUEUE_SEQ)?;
    Ok(QueueSeqs {
        recv_next,
        send_next,
    })
}

/// The MSS the peer announced (`TCP_MAXSEG` of a socket in repair mode, `mss_clamp`).
pub fn peer_mss(fd: BorrowedFd<'_>) -> io::Result<u32> {
    get_u32(fd, libc::TCP_MAXSEG)
}

/// The TSval the socket would send now (`TCP_TIMESTAMP`): its clock plus its per-connection offset.
pub fn timestamp_now(fd: BorrowedFd<'_>) -> io::Result<u32> {
    get_u32(fd, libc::TCP_TIMESTAMP)
}

/// What a connection negotiated in its handshake that a rewrite between two legs must match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    /// Both ends send timestamps.
    pub timestamps: bool,
    /// Both ends accept SACK.
    pub sack: bool,
    /// Window scaling is on (else both scales are 0).
    pub window_scaling: bool,
    /// The scale the peer applies to the windows it sends (`tcpi_snd_wscale`).
    pub peer_wscale: u8,
    /// The scale this socket applies to the windows it sends (`tcpi_rcv_wscale`).
    pub own_wscale: u8,
    /// The MSS this socket announced to its peer (`tcpi_advmss`): the largest segment the peer sends.
    pub announced_mss: u32,
}

/// Whether the connection is still established (`tcpi_state`): no FIN or RST has reached it.
pub fn established(fd: BorrowedFd<'_>) -> bool {
    const TCP_ESTABLISHED: u8 = 1;
    crate::dataplane::ebpf::tcp_info(fd)
        .is_ok_and(|(info, len)| len > 0 && info[0] == TCP_ESTABLISHED)
}

/// Offsets in `struct tcp_info` (stable ABI): the options byte, the two window scales packed in
/// the next byte (send scale in the low nibble), and `tcpi_advmss`.
const TCPI_OPTIONS: usize = 5;
const TCPI_WSCALE: usize = 6;
const TCPI_ADVMSS: usize = 84;

/// Reads what the connection negotiated, from `TCP_INFO`.
pub fn negotiated(fd: BorrowedFd<'_>) -> io::Result<Negotiated> {
    let (info, len) = crate::dataplane::ebpf::tcp_info(fd)?;
    if len < TCPI_ADVMSS + 4 {
        return Err(io::Error::other("tcp_info too short"));
    }
    let options = info[TCPI_OPTIONS];
    let window_scaling = options & TCPI_OPT_WSCALE != 0;
    let scales = if window_scaling { info[TCPI_WSCALE] } else { 0 };
    Ok(Negotiated {
        timestamps: options & TCPI_OPT_TIMESTAMPS != 0,
        sack: options & TCPI_OPT_SACK != 0,
        window_scaling,
        peer_wscale: scales & 0x0f,
        own_wscale: scales >> 4,
        announced_mss: u32_at(&info, TCPI_ADVMSS),
    })
}

fn u32_at(info: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(info[at..at + 4].try_into().expect("4 bytes"))
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of the program's `bpf_ktime_get_ns`, so the
/// daemon can tell how long ago the program last saw a flow's segment.
pub fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec to write; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsFd;
    use std::time::Duration;

    /// A connected loopback pair: (the side that connected, the side that accepted).
    fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        (client, server)
    }

    #[test]
    fn loopback_connections_negotiate_timestamps_sack_and_scaling() {
        let (client, _server) = pair();
        let n = negotiated(client.as_fd()).unwrap();
        // Linux's defaults (net.ipv4.tcp_timestamps, tcp_sack, tcp_window_scaling = 1).
        assert!(n.timestamps && n.sack && n.window_scaling, "{n:?}");
        assert!(n.announced_mss > 1000, "{n:?}");
    }

    /// What the hand-over relies on: a muted socket's sequence numbers line up with its peer's
    /// (what one sent next is what the other expects next), and closing it sends nothing, so its
    /// peer sees neither a FIN nor a RST. Needs CAP_NET_ADMIN.
    #[test]
    fn a_muted_socket_tells_its_sequence_numbers_and_closes_without_a_trace() {
        if !crate::dataplane::root_or_skip("TCP_REPAIR") {
            return;
        }
        let (mut client, mut server) = pair();
        client.write_all(&[7u8; 1000]).unwrap();
        let mut got = [0u8; 1000];
        server.read_exact(&mut got).unwrap();
        server.write_all(b"back").unwrap();
        client.read_exact(&mut [0u8; 4]).unwrap();
        // Let the ACKs land, so neither side has anything unacknowledged.
        std::thread::sleep(Duration::from_millis(50));

        set_repair(server.as_fd(), true).unwrap();
        set_repair(client.as_fd(), true).unwrap();
        let s = queue_seqs(server.as_fd()).unwrap();
        let c = queue_seqs(client.as_fd()).unwrap();
        assert_eq!(c.send_next, s.recv_next, "client → server stream");
        assert_eq!(s.send_next, c.recv_next, "server → client stream");
        // Loopback's MSS (65,536-byte MTU less the headers), as announced by the server.
        assert!(peer_mss(client.as_fd()).unwrap() > 60_000);
        set_repair(client.as_fd(), false).unwrap();
        assert!(timestamp_now(client.as_fd()).unwrap() > 0);

        // The server's socket goes away muted: the client must not hear of it.
        drop(server);
        client
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut byte = [0u8; 1];
        match client.read(&mut byte) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            other => panic!("a muted socket's close reached its peer: {other:?}"),
        }
    }
}
