//! The load generator: MQTT clients on raw sockets, so the client costs as little as the
//! broker and the proxy in between is what shows.

use crate::broker::parse_header;
use crate::procfs::{machine_cpu_ticks, process_cpu_ticks};
use anyhow::{Context, bail};
use mqsplice_tests::raw::{connect_v311, publish_qos0};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The CONNACK the echo broker answers an MQTT 3.1.1 CONNECT with.
const CONNACK: [u8; 4] = [0x20, 0x02, 0x00, 0x00];
/// Size of the PUBLISH bounced in the latency phase, header included.
pub const LATENCY_PUBLISH: usize = 64;
/// Read/write timeout of the setup steps (connect, CONNACK).
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// No echo for this long in a throughput phase means the path lost messages or hung.
const STALL_LIMIT: Duration = Duration::from_secs(5);
/// Wall-clock budget of one measurement phase.
pub const PHASE_LIMIT: Duration = Duration::from_secs(60);
/// Round trips before the timed ones, so connection setup and cold caches stay out.
const WARMUP_ROUND_TRIPS: usize = 200;
/// Held connections opened before their CONNACKs are read: pipelining the handshakes keeps
/// 10,000 connections to a couple of seconds, well under every proxy's accept backlog.
const CONNECT_BATCH: usize = 64;
/// Ends a PUBLISH stream: the broker answers it after echoing everything before it.
const PINGREQ: [u8; 2] = [0xc0, 0x00];
/// Upper bound on the messages of one stream (the duration ends it long before).
const MAX_STREAM_MESSAGES: u64 = 100_000_000;
/// Topic of the throughput PUBLISHes.
const TOPIC: &str = "bench/t";

/// Connects as an MQTT client: TCP_NODELAY, bounded timeouts, CONNECT; the CONNACK is read
/// by [`read_connack`] so that callers can pipeline handshakes.
fn start_connect(addr: SocketAddr, client_id: &str) -> anyhow::Result<TcpStream> {
    let mut stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)
        .with_context(|| format!("connect to {addr}"))?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    stream.write_all(&connect_v311(client_id))?;
    Ok(stream)
}

/// Reads the CONNACK, checked byte for byte (a proxy that mangles the handshake fails loudly).
fn read_connack(stream: &mut TcpStream) -> anyhow::Result<()> {
    let mut connack = [0u8; 4];
    stream.read_exact(&mut connack).context("CONNACK")?;
    if connack != CONNACK {
        bail!("answered {connack:02x?} instead of a CONNACK");
    }
    Ok(())
}

/// A connected MQTT session.
fn mqtt_connect(addr: SocketAddr, client_id: &str) -> anyhow::Result<TcpStream> {
    let mut stream = start_connect(addr, client_id)?;
    read_connack(&mut stream)?;
    Ok(stream)
}

/// A QoS 0 PUBLISH on [`TOPIC`] of exactly `size` bytes, header included.
fn publish_of_size(size: usize) -> Vec<u8> {
    // Fixed header: one length byte below 128 bytes of body, two up to 16 KiB.
    let overhead = 2
        + TOPIC.len()
        + if size - 2 - 2 - TOPIC.len() < 128 {
            2
        } else {
            3
        };
    let packet = publish_qos0(TOPIC, &vec![0xa5u8; size - overhead]);
    assert_eq!(packet.len(), size);
    packet
}

/// A QoS 0 PUBLISH on [`TOPIC`] carrying `payload` bytes.
pub fn publish_with_payload(payload: usize) -> Vec<u8> {
    publish_qos0(TOPIC, &vec![0x5au8; payload])
}

/// Round-trip latency of one PUBLISH at a time, in microseconds: (p50, p99).
pub fn latency(addr: SocketAddr, round_trips: usize) -> anyhow::Result<(f64, f64)> {
    let mut stream = mqtt_connect(addr, "bench-latency")?;
    let packet = publish_of_size(LATENCY_PUBLISH);
    let mut back = vec![0u8; packet.len()];
    let deadline = Instant::now() + PHASE_LIMIT;
    let mut samples = Vec::with_capacity(round_trips);
    for i in 0..WARMUP_ROUND_TRIPS + round_trips {
        if Instant::now() > deadline {
            bail!("latency phase passed {PHASE_LIMIT:?} after {i} round trips");
        }
        let start = Instant::now();
        stream.write_all(&packet)?;
        stream.read_exact(&mut back)?;
        let took = start.elapsed();
        if back != packet {
            bail!("the echo differs from the PUBLISH sent");
        }
        if i >= WARMUP_ROUND_TRIPS {
            samples.push(took.as_nanos() as u64);
        }
    }
    samples.sort_unstable();
    let pick = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize] as f64 / 1e3;
    Ok((pick(0.50), pick(0.99)))
}

/// What one throughput phase measured.
#[derive(Debug, Clone, Copy)]
pub struct Throughput {
    pub msgs_per_s: f64,
    /// PUBLISH bytes (headers included) echoed per second, each counted once.
    pub mb_per_s: f64,
    /// Busy CPU of the whole machine over the phase, per GB echoed.
    pub machine_cpu_s_per_gb: f64,
    /// CPU of the proxy's own processes, per GB echoed; `None` for `direct`.
    pub proxy_cpu_s_per_gb: Option<f64>,
    /// PUBLISH bytes sent (and echoed), each counted once.
    pub bytes: u64,
}

/// Counts complete PUBLISHes in a byte stream read in arbitrary pieces: headers byte by byte
/// (they may straddle reads), bodies skipped in one step. Every packet must be the PUBLISH
/// that was sent, by type and length, until the PINGRESP that ends the stream.
struct EchoCounter {
    header: [u8; 5],
    header_len: usize,
    body_left: usize,
    expect_remaining: usize,
    packets: u64,
    /// The PINGRESP arrived: every PUBLISH sent before the PINGREQ has been echoed.
    ended: bool,
}

impl EchoCounter {
    fn new(expect_remaining: usize) -> EchoCounter {
        EchoCounter {
            header: [0; 5],
            header_len: 0,
            body_left: 0,
            expect_remaining,
            packets: 0,
            ended: false,
        }
    }

    /// Consumes `data`; an error for anything but the expected PUBLISH.
    fn feed(&mut self, mut data: &[u8]) -> anyhow::Result<()> {
        while !data.is_empty() {
            if self.body_left > 0 {
                let k = self.body_left.min(data.len());
                self.body_left -= k;
                data = &data[k..];
                if self.body_left == 0 {
                    self.packets += 1;
                }
                continue;
            }
            self.header[self.header_len] = data[0];
            self.header_len += 1;
            data = &data[1..];
            if let Some(h) = parse_header(&self.header[..self.header_len])? {
                if h.first == 0xd0 && h.remaining == 0 && data.is_empty() {
                    self.ended = true;
                    self.header_len = 0;
                    continue;
                }
                if h.first != 0x30 || h.remaining != self.expect_remaining {
                    bail!(
                        "echo stream broken after {} packets: header {:02x} length {}",
                        self.packets,
                        h.first,
                        h.remaining
                    );
                }
                self.header_len = 0;
                self.body_left = h.remaining;
                if h.remaining == 0 {
                    self.packets += 1;
                }
            }
        }
        Ok(())
    }
}

/// A windowed PUBLISH stream for `duration`: a writer thread keeps up to `window` messages in
/// flight (it tops the window up once a quarter of it is free, so writes carry several
/// messages) and ends the stream with a PINGREQ; this thread counts the echoes until the
/// PINGRESP, which the broker sends only after echoing everything before it. CPU is sampled
/// around the phase, for the whole machine and for the `proxy` processes.
pub fn throughput(
    addr: SocketAddr,
    payload: usize,
    duration: Duration,
    window: u64,
    proxy: &[u32],
    user_hz: f64,
) -> anyhow::Result<Throughput> {
    let packet = publish_with_payload(payload);
    let size = packet.len();
    let expect_remaining = parse_header(&packet)?
        .context("built a broken PUBLISH")?
        .remaining;
    let mut reader = mqtt_connect(addr, &format!("bench-stream-{payload}"))?;
    reader.set_read_timeout(Some(STALL_LIMIT))?;
    let mut writer = reader.try_clone()?;
    writer.set_write_timeout(Some(STALL_LIMIT))?;
    let batch: Vec<u8> = packet.repeat(window as usize);
    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));

    let meter = CostMeter::start(proxy, user_hz)?;
    let start = meter.start;
    let sender = {
        let received = received.clone();
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("bench-writer".into())
            .spawn(move || -> io::Result<u64> {
                let refill = (window / 4).max(1);
                let mut sent = 0u64;
                while sent < MAX_STREAM_MESSAGES
                    && start.elapsed() < duration
                    && !stop.load(Ordering::Relaxed)
                {
                    let free = window - (sent - received.load(Ordering::Acquire));
                    if free < refill {
                        // The reader unparks this thread after every read.
                        std::thread::park_timeout(Duration::from_millis(50));
                        continue;
                    }
                    let k = free.min(MAX_STREAM_MESSAGES - sent);
                    writer.write_all(&batch[..k as usize * size])?;
                    sent += k;
                }
                writer.write_all(&PINGREQ)?;
                Ok(sent)
            })?
    };
    let mut buf = vec![0u8; 256 * 1024];
    let mut counter = EchoCounter::new(expect_remaining);
    let deadline = start + duration + PHASE_LIMIT;
    let read_result = read_echoes(&mut reader, &mut counter, &mut buf, deadline, |packets| {
        received.store(packets, Ordering::Release);
        sender.thread().unpark();
    });
    let cost = meter.stop()?;
    stop.store(true, Ordering::Relaxed);
    sender.thread().unpark();
    if read_result.is_err() {
        // Unblock a writer stuck in `write` before joining it.
        let _ = reader.shutdown(std::net::Shutdown::Both);
    }
    let sent = sender.join().expect("bench writer panicked");
    stream_figures(sent, read_result, counter.packets, size, cost)
}

/// Opens up to `count` MQTT sessions and keeps them idle. Stops early, with the reason, at
/// the first connection that fails (a descriptor or proxy limit) or when the phase runs out
/// of time; the sessions opened so far are returned either way.
pub fn hold(addr: SocketAddr, count: usize) -> (Vec<TcpStream>, Option<String>) {
    let deadline = Instant::now() + PHASE_LIMIT;
    let mut held = Vec::with_capacity(count);
    while held.len() < count {
        if Instant::now() > deadline {
            return (held, Some(format!("time limit {PHASE_LIMIT:?} reached")));
        }
        let batch = CONNECT_BATCH.min(count - held.len());
        let mut pending = Vec::with_capacity(batch);
        for _ in 0..batch {
            match start_connect(addr, &format!("bench-held-{}", held.len() + pending.len())) {
                Ok(s) => pending.push(s),
                Err(e) => return (held, Some(format!("{e:#}"))),
            }
        }
        for mut stream in pending {
            if let Err(e) = read_connack(&mut stream) {
                return (held, Some(format!("{e:#}")));
            }
            held.push(stream);
        }
    }
    (held, None)
}

/// Reads echoes into `counter` until the PINGRESP that ends the stream, failing on a close, a
/// stall of [`STALL_LIMIT`] or the `deadline`; `after_read` gets the echo count after each read.
fn read_echoes(
    reader: &mut TcpStream,
    counter: &mut EchoCounter,
    buf: &mut [u8],
    deadline: Instant,
    mut after_read: impl FnMut(u64),
) -> anyhow::Result<()> {
    while !counter.ended {
        if Instant::now() > deadline {
            bail!("passed its time limit after {} echoes", counter.packets);
        }
        let n = match reader.read(buf) {
            Ok(0) => bail!("closed after {} echoes", counter.packets),
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                bail!(
                    "no echo for {STALL_LIMIT:?} after {} echoes (lost in the path?)",
                    counter.packets
                )
            }
            Err(e) => return Err(e.into()),
        };
        counter.feed(&buf[..n])?;
        after_read(counter.packets);
    }
    Ok(())
}

/// Time and CPU ticks from the start of a stream phase, for its [`Cost`].
struct CostMeter<'a> {
    start: Instant,
    machine_before: u64,
    proxy: &'a [u32],
    proxy_before: Option<u64>,
    user_hz: f64,
}

impl<'a> CostMeter<'a> {
    fn start(proxy: &'a [u32], user_hz: f64) -> anyhow::Result<Self> {
        Ok(Self {
            machine_before: machine_cpu_ticks()?,
            proxy_before: process_cpu_ticks(proxy),
            start: Instant::now(),
            proxy,
            user_hz,
        })
    }

    fn stop(&self) -> anyhow::Result<Cost> {
        let elapsed = self.start.elapsed().as_secs_f64();
        Ok(Cost {
            elapsed,
            machine_ticks: machine_cpu_ticks()? - self.machine_before,
            proxy_ticks: (self.proxy_before, process_cpu_ticks(self.proxy)),
            user_hz: self.user_hz,
        })
    }
}

/// What a stream phase cost, measured around it.
struct Cost {
    elapsed: f64,
    machine_ticks: u64,
    proxy_ticks: (Option<u64>, Option<u64>),
    user_hz: f64,
}

/// A stream's figures once its writer has been joined: every PUBLISH of `size` bytes it sent
/// must have come back.
fn stream_figures(
    sent: io::Result<u64>,
    read_result: anyhow::Result<()>,
    echoed: u64,
    size: usize,
    cost: Cost,
) -> anyhow::Result<Throughput> {
    read_result?;
    let sent = sent.context("writer")?;
    if sent != echoed {
        bail!("{sent} PUBLISHes sent but {echoed} echoed");
    }
    Ok(figures(sent * size as u64, sent, &cost))
}

/// A phase's figures from what it moved and the CPU ticks it cost.
fn figures(bytes: u64, messages: u64, cost: &Cost) -> Throughput {
    let gb = bytes as f64 / 1e9;
    Throughput {
        bytes,
        msgs_per_s: messages as f64 / cost.elapsed,
        mb_per_s: gb * 1e3 / cost.elapsed,
        machine_cpu_s_per_gb: cost.machine_ticks as f64 / cost.user_hz / gb,
        proxy_cpu_s_per_gb: match cost.proxy_ticks {
            (Some(b), Some(a)) => Some(a.saturating_sub(b) as f64 / cost.user_hz / gb),
            _ => None,
        },
    }
}

/// Payload of the full-duplex bulk stream's PUBLISHes.
pub const DUPLEX_PAYLOAD: usize = 16 * 1024;
/// One write of the full-duplex stream: many PUBLISHes at once, as a bulk sender writes.
const DUPLEX_WRITE: usize = 1024 * 1024;

/// A full-speed, full-duplex bulk stream for `duration`: no window, the writer writes PUBLISHes
/// of [`DUPLEX_PAYLOAD`] in 1 MiB writes as fast as the path takes them while this thread reads
/// the echoes, so both directions of the path are full at once. This is the load that makes a
/// splice throttle (the windowed streams above rarely do), so it is where a splice that hands
/// bytes to its daemon would lose its advantage. Figures as in [`throughput`].
pub fn duplex(
    addr: SocketAddr,
    duration: Duration,
    proxy: &[u32],
    user_hz: f64,
) -> anyhow::Result<Throughput> {
    let packet = publish_with_payload(DUPLEX_PAYLOAD);
    let size = packet.len();
    let per_write = (DUPLEX_WRITE / size).max(1);
    let batch = packet.repeat(per_write);
    let expect_remaining = parse_header(&packet)?
        .context("built a broken PUBLISH")?
        .remaining;
    let mut reader = mqtt_connect(addr, "bench-duplex")?;
    reader.set_read_timeout(Some(STALL_LIMIT))?;
    let mut writer = reader.try_clone()?;
    writer.set_write_timeout(Some(STALL_LIMIT))?;
    let stop = Arc::new(AtomicBool::new(false));

    let meter = CostMeter::start(proxy, user_hz)?;
    let start = meter.start;
    let sender = {
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("bench-duplex-writer".into())
            .spawn(move || -> io::Result<u64> {
                let mut sent = 0u64;
                while start.elapsed() < duration && !stop.load(Ordering::Relaxed) {
                    writer.write_all(&batch)?;
                    sent += per_write as u64;
                }
                writer.write_all(&PINGREQ)?;
                Ok(sent)
            })?
    };
    let mut buf = vec![0u8; DUPLEX_WRITE];
    let mut counter = EchoCounter::new(expect_remaining);
    let deadline = start + duration + PHASE_LIMIT;
    let read_result = read_echoes(&mut reader, &mut counter, &mut buf, deadline, |_| {});
    let cost = meter.stop()?;
    stop.store(true, Ordering::Relaxed);
    if read_result.is_err() {
        let _ = reader.shutdown(std::net::Shutdown::Both);
    }
    let sent = sender.join().expect("bench duplex writer panicked");
    stream_figures(sent, read_result, counter.packets, size, cost)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_across_splits() {
        let p = publish_with_payload(1024);
        let remaining = parse_header(&p).unwrap().unwrap().remaining;
        let stream = p.repeat(5);
        for cut in [1, 2, 3, 7, 1000, 1037, 4000] {
            let mut c = EchoCounter::new(remaining);
            for piece in stream.chunks(cut) {
                c.feed(piece).unwrap();
            }
            assert_eq!(c.packets, 5, "pieces of {cut}");
            c.feed(&[0xd0, 0x00]).unwrap();
            assert!(c.ended);
        }
        assert_eq!(publish_of_size(LATENCY_PUBLISH).len(), 64);
    }
}
