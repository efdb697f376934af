//! Blocking building blocks for the safety tests: checksummed streams, a raw broker stand-in that
//! tells its connections apart by client id, and the
//! host/process figures (TCP_INFO, MemAvailable, context switches) the tests judge by.

use crate::raw::connect_v311;
use sha2::{Digest, Sha256};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::{Arc, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;
pub const CONNACK: [u8; 4] = [0x20, 0x02, 0x00, 0x00];

/// A small fixed-seed PRNG (xorshift64*): the same sizes and roles on every run.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Log-uniform in `[low, high]`: as many tiny flows as huge ones, per order of magnitude.
    pub fn log_uniform(&mut self, low: u64, high: u64) -> u64 {
        let u = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        let (l, h) = ((low as f64).ln(), (high as f64).ln());
        ((l + u * (h - l)).exp() as u64).clamp(low, high)
    }
}

/// One MiB of pseudo-random bytes, made once: every stream is built from it.
fn base_block() -> &'static [u8] {
    static BLOCK: OnceLock<Vec<u8>> = OnceLock::new();
    BLOCK.get_or_init(|| {
        let mut rng = Rng::new(0x5eed);
        (0..MIB / 8)
            .flat_map(|_| rng.next_u64().to_le_bytes())
            .collect()
    })
}

/// MiB number `k` of stream `seed`: the random block stamped with (seed, k), so a lost,
/// duplicated or reordered chunk, or bytes of another stream, change the digest.
pub fn chunk(seed: u64, k: u64) -> Vec<u8> {
    let mut c = base_block().to_vec();
    c[..8].copy_from_slice(&seed.to_le_bytes());
    c[8..16].copy_from_slice(&k.to_le_bytes());
    c
}

/// SHA-256 of the first `len` bytes of stream `seed`, without sending it.
pub fn digest_of(seed: u64, len: u64) -> [u8; 32] {
    let mut hash = Sha256::new();
    let mut k = 0;
    while k * MIB < len {
        let c = chunk(seed, k);
        hash.update(&c[..(len - k * MIB).min(MIB) as usize]);
        k += 1;
    }
    hash.finalize().into()
}

/// Writes the first `len` bytes of stream `seed` (blocking) and returns their SHA-256.
pub fn write_stream(stream: &mut TcpStream, seed: u64, len: u64) -> [u8; 32] {
    let mut hash = Sha256::new();
    let mut k = 0;
    while k * MIB < len {
        let c = chunk(seed, k);
        let part = &c[..(len - k * MIB).min(MIB) as usize];
        stream
            .write_all(part)
            .unwrap_or_else(|e| panic!("stream {seed}: write at {}: {e}", k * MIB));
        hash.update(part);
        k += 1;
    }
    hash.finalize().into()
}

/// How a read loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Read `limit` bytes (the stream may still be open).
    Limit,
    /// An orderly FIN.
    Eof,
    /// A reset or another error.
    Reset,
    /// Nothing arrived for the read timeout.
    Timeout,
}

/// What a reader got: length, SHA-256 and how it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    pub len: u64,
    pub digest: [u8; 32],
    pub end: End,
}

/// Reads until EOF, an error, `limit` bytes or `idle` without a byte; hashes everything read.
/// `pause` (bytes, delay) makes a slow reader: after each `bytes` it sleeps `delay`.
pub fn read_stream(
    stream: &mut TcpStream,
    limit: Option<u64>,
    idle: Duration,
    pause: Option<(usize, Duration)>,
) -> Received {
    stream.set_read_timeout(Some(idle)).unwrap();
    let mut hash = Sha256::new();
    let mut len = 0u64;
    let step = pause.map_or(256 * KIB as usize, |p| p.0);
    let mut buf = vec![0u8; step];
    let end = loop {
        let want = limit.map_or(step as u64, |l| (l - len).min(step as u64)) as usize;
        if want == 0 {
            break End::Limit;
        }
        match stream.read(&mut buf[..want]) {
            Ok(0) => break End::Eof,
            Ok(n) => {
                hash.update(&buf[..n]);
                len += n as u64;
                if let Some((_, delay)) = pause {
                    thread::sleep(delay);
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                break End::Timeout;
            }
            Err(_) => break End::Reset,
        }
    };
    Received {
        len,
        digest: hash.finalize().into(),
        end,
    }
}

/// The CONNECT every flow sends: client id `flow-NNNNN` names the flow (fixed length, so the
/// broker stand-in can read exactly one CONNECT).
pub fn flow_connect(index: usize) -> Vec<u8> {
    connect_v311(&format!("flow-{index:05}"))
}

/// Connects through the proxy as flow `index` and waits for the CONNACK; panics without it.
pub fn connect_flow(addr: SocketAddr, index: usize) -> TcpStream {
    try_connect_flow(addr, index).unwrap_or_else(|e| panic!("flow {index}: {e}"))
}

/// [`connect_flow`] that reports failure, for load that counts failed flows instead of
/// stopping at the first (connect and CONNACK each bounded by 10 s).
pub fn try_connect_flow(addr: SocketAddr, index: usize) -> Result<TcpStream, String> {
    let timeout = Duration::from_secs(10);
    let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(|e| e.to_string())?;
    stream
        .write_all(&flow_connect(index))
        .map_err(|e| format!("CONNECT: {e}"))?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let mut connack = [0u8; 4];
    stream
        .read_exact(&mut connack)
        .map_err(|e| format!("no CONNACK: {e}"))?;
    if connack != CONNACK {
        return Err(format!("CONNACK expected, got {connack:02x?}"));
    }
    Ok(stream)
}

/// A raw broker stand-in: for every connection, on its own thread, reads the flow's CONNECT,
/// answers CONNACK and runs `role(flow index, socket)`.
pub fn flow_backend<F>(role: F) -> SocketAddr
where
    F: Fn(usize, TcpStream) + Send + Sync + 'static,
{
    flow_backend_on(TcpListener::bind("127.0.0.1:0").unwrap(), role)
}

/// [`flow_backend`] on a listener the caller bound (an address in a network namespace).
pub fn flow_backend_on<F>(listener: TcpListener, role: F) -> SocketAddr
where
    F: Fn(usize, TcpStream) + Send + Sync + 'static,
{
    let addr = listener.local_addr().unwrap();
    let role = Arc::new(role);
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { break };
            let role = role.clone();
            thread::spawn(move || {
                let mut connect = vec![0u8; flow_connect(0).len()];
                stream
                    .set_read_timeout(Some(Duration::from_secs(10)))
                    .unwrap();
                if stream.read_exact(&mut connect).is_err() {
                    return;
                }
                let id = String::from_utf8_lossy(&connect[connect.len() - 5..]).to_string();
                let Ok(index) = id.parse::<usize>() else {
                    return;
                };
                if stream.write_all(&CONNACK).is_err() {
                    return;
                }
                stream.set_read_timeout(None).unwrap();
                role(index, stream);
            });
        }
    });
    addr
}

/// Polls `condition` every 20 ms until it holds or `timeout` passes; true when it held.
pub fn wait_for(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if condition() {
            return true;
        }
        thread::sleep(Duration::from_millis(20));
    }
    condition()
}

/// `tcpi_bytes_acked` of `stream`: bytes the peer acknowledged, plus one for the SYN (read with
/// the daemon's own `TCP_INFO` wrapper, so the test and the close rule agree on the offsets).
pub fn bytes_acked(stream: &TcpStream) -> u64 {
    mqsplice::dataplane::ebpf::tcp_bytes(stream.as_fd())
        .expect("TCP_INFO")
        .acked
}

/// Sets `SO_LINGER` to zero, so closing `stream` sends a RST instead of a FIN.
pub fn linger_zero(stream: &TcpStream) {
    socket2::SockRef::from(stream)
        .set_linger(Some(Duration::ZERO))
        .expect("SO_LINGER");
}

/// The host's `MemAvailable`, in KiB.
pub fn mem_available_kib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("MemAvailable in /proc/meminfo")
}

/// Pages of memory all TCP sockets hold now (`/proc/net/sockstat`, `TCP: … mem N`).
pub fn tcp_mem_pages() -> u64 {
    std::fs::read_to_string("/proc/net/sockstat")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("TCP:"))
        .and_then(|l| {
            l.split_whitespace()
                .skip_while(|w| *w != "mem")
                .nth(1)?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

/// Voluntary context switches of every thread of process `pid` so far.
pub fn voluntary_ctxt_switches(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("status")).ok())
        .filter_map(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))?
                .trim()
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// Makes `path` readable (and, for directories, searchable) by everyone.
pub fn world_readable(path: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    let mut perms = std::fs::metadata(path).unwrap().permissions();
    perms.set_mode(0o755);
    std::fs::set_permissions(path, perms).unwrap();
}

/// A daemon stopped with SIGTERM when dropped, even on a failed assertion: a clean stop removes
/// its pinned maps, which a SIGKILL (`Daemon`'s own drop) would leave in bpffs.
pub struct Graceful(pub crate::daemon::Daemon);

impl Graceful {
    pub fn start(text: &str, listen: SocketAddr, stats: SocketAddr) -> Graceful {
        Graceful(crate::daemon::Daemon::start(text, listen, stats))
    }
}

impl std::ops::Deref for Graceful {
    type Target = crate::daemon::Daemon;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl Drop for Graceful {
    fn drop(&mut self) {
        self.0.signal_term();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(self.0.child.try_wait(), Ok(Some(_))) {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}
