//! The client side of a numbered flow: CONNECT, then a writer thread sends the numbered stream
//! as fast as the path takes it while a reader thread checks every byte of the echo, both with
//! 64 KiB I/O. A watchdog calls the flow hung when neither side moved for `stall`, or when the
//! deadline passes, so a wedged path costs a bounded time and is reported, not waited for.

use super::pauses::{Pauses, Schedule};
use super::{Checker, Mismatch, Numbering};
use crate::flows::{End, linger_zero, try_connect_flow};
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::thread;
use std::time::{Duration, Instant};

/// Reads and writes are this big, like a bulk MQTT client's.
pub const IO: usize = 64 * 1024;
/// How often blocked reads and writes look up from their socket to see whether to stop.
const POLL: Duration = Duration::from_millis(250);
/// The MQTT DISCONNECT packet.
pub const DISCONNECT: [u8; 2] = [0xE0, 0x00];

/// One flow: its client id and numbering come from `index`; `len` bytes go up and come back.
#[derive(Debug, Clone, Copy)]
pub struct FlowSpec {
    pub index: usize,
    pub len: u64,
    /// A reader that stops and resumes now and then.
    pub pauses: Option<Pauses>,
    /// No byte written or read for this long: hung.
    pub stall: Duration,
    /// The whole flow may take no longer than this: hung.
    pub deadline: Duration,
}

impl FlowSpec {
    /// A flow with a reader that never pauses, 10 s of stall allowed, a 120 s deadline.
    pub fn new(index: usize, len: u64) -> FlowSpec {
        FlowSpec {
            index,
            len,
            pauses: None,
            stall: Duration::from_secs(10),
            deadline: Duration::from_secs(120),
        }
    }
}

/// How a flow ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every byte came back, in order, then an orderly EOF.
    Ok,
    /// The first wrong bytes.
    Corrupt(Mismatch),
    /// The stream ended (`end`) after `received` right bytes, short of its length or without
    /// an orderly EOF.
    Short { received: u64, end: End },
    /// Nothing moved for the stall time, or the deadline passed.
    Hung { sent: u64, received: u64 },
    /// No connection or no CONNACK.
    Failed(String),
}

/// One flow's outcome and figures.
#[derive(Debug, Clone)]
pub struct FlowReport {
    pub index: usize,
    pub len: u64,
    pub outcome: Outcome,
    /// Pauses the reader took.
    pub pauses: u64,
    pub elapsed: Duration,
}

/// What the two threads share: progress for the watchdog, and the flag that stops them.
#[derive(Default)]
struct Progress {
    sent: AtomicU64,
    received: AtomicU64,
    stop: AtomicBool,
}

/// Runs one full-duplex flow through the echo broker at `addr` and judges it.
pub fn run_flow(addr: SocketAddr, spec: FlowSpec) -> FlowReport {
    let started = Instant::now();
    let report = |outcome, pauses| FlowReport {
        index: spec.index,
        len: spec.len,
        outcome,
        pauses,
        elapsed: started.elapsed(),
    };
    let stream = match try_connect_flow(addr, spec.index) {
        Ok(s) => s,
        Err(e) => return report(Outcome::Failed(e), 0),
    };
    let progress = Arc::new(Progress::default());
    let numbering = Numbering::of(spec.index as u64);
    let writer = {
        let (mut s, progress) = (stream.try_clone().expect("clone"), progress.clone());
        thread::spawn(move || write_numbered(&mut s, numbering, spec.len, &progress))
    };
    let reader = {
        let (mut s, progress) = (stream.try_clone().expect("clone"), progress.clone());
        thread::spawn(move || read_numbered(&mut s, numbering, spec, &progress))
    };
    let mut last = (0, Instant::now());
    let hung = loop {
        if reader.is_finished() {
            break false;
        }
        let moved = progress.sent.load(Relaxed) + progress.received.load(Relaxed);
        if moved != last.0 {
            last = (moved, Instant::now());
        }
        if last.1.elapsed() > spec.stall || started.elapsed() > spec.deadline {
            break true;
        }
        thread::sleep(Duration::from_millis(20));
    };
    progress.stop.store(true, Relaxed);
    let (outcome, pauses) = reader.join().expect("reader thread");
    let _ = writer.join();
    let outcome = if hung {
        Outcome::Hung {
            sent: progress.sent.load(Relaxed),
            received: progress.received.load(Relaxed),
        }
    } else {
        outcome
    };
    if outcome != Outcome::Ok {
        // Whatever is still queued is of no interest: reset rather than linger.
        linger_zero(&stream);
    }
    report(outcome, pauses)
}

/// Writes `len` numbered bytes, then shuts the write side (unless stopped first).
fn write_numbered(s: &mut TcpStream, numbering: Numbering, len: u64, progress: &Progress) {
    let _ = s.set_write_timeout(Some(POLL));
    let mut buf = vec![0u8; IO];
    let mut offset = 0u64;
    while offset < len {
        let n = (len - offset).min(IO as u64) as usize;
        numbering.fill(offset, &mut buf[..n]);
        let mut done = 0;
        while done < n {
            if progress.stop.load(Relaxed) {
                return;
            }
            match s.write(&buf[done..n]) {
                Ok(k) => {
                    done += k;
                    progress.sent.fetch_add(k as u64, Relaxed);
                }
                Err(e) if is_retry(&e) => {}
                // A reset or broken pipe: the reader sees the same and says so.
                Err(_) => return,
            }
        }
        offset += n as u64;
    }
    let _ = s.shutdown(Shutdown::Write);
}

/// Reads and checks the echo until its EOF; returns the outcome and the pauses taken.
fn read_numbered(
    s: &mut TcpStream,
    numbering: Numbering,
    spec: FlowSpec,
    progress: &Progress,
) -> (Outcome, u64) {
    let _ = s.set_read_timeout(Some(POLL));
    let mut checker = Checker::new(numbering, spec.len);
    let mut schedule = spec.pauses.map(Schedule::new);
    let mut buf = vec![0u8; IO];
    let outcome = loop {
        if progress.stop.load(Relaxed) {
            // The watchdog's verdict replaces this one.
            break Outcome::Ok;
        }
        let n = match s.read(&mut buf) {
            Ok(0) if checker.offset() == spec.len => break Outcome::Ok,
            Ok(0) => break short(&checker, End::Eof),
            Ok(n) => n,
            Err(e) if is_retry(&e) => continue,
            Err(_) => break short(&checker, End::Reset),
        };
        let wanted = (spec.len - checker.offset()).min(n as u64) as usize;
        if let Err(m) = checker.check(&buf[..wanted]) {
            break Outcome::Corrupt(m);
        }
        if wanted < n {
            break Outcome::Corrupt(checker.extra(&buf[wanted..n]));
        }
        progress.received.fetch_add(n as u64, Relaxed);
        if let Some(pause) = schedule.as_mut().and_then(|s| s.after_read(n as u64)) {
            thread::sleep(pause);
        }
    };
    (outcome, schedule.map_or(0, |s| s.taken))
}

fn short(checker: &Checker, end: End) -> Outcome {
    Outcome::Short {
        received: checker.offset(),
        end,
    }
}

fn is_retry(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
    )
}

/// Runs `specs` all at once, one thread each; reports in the order given.
pub fn run_flows(addr: SocketAddr, specs: &[FlowSpec]) -> Vec<FlowReport> {
    let handles: Vec<_> = specs
        .iter()
        .map(|&spec| thread::spawn(move || run_flow(addr, spec)))
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().expect("flow thread"))
        .collect()
}

/// A paho-style disconnect: the last packet (DISCONNECT) goes out in the same segment as the
/// FIN (`MSG_MORE`, then `shutdown(Write)`), and the socket is reset right after (`SO_LINGER` 0,
/// close), as paho does when a client disconnects.
pub fn paho_disconnect(addr: SocketAddr, index: usize) -> Result<(), String> {
    let stream = try_connect_flow(addr, index)?;
    socket2::SockRef::from(&stream)
        .send_with_flags(&DISCONNECT, libc::MSG_MORE)
        .map_err(|e| format!("DISCONNECT: {e}"))?;
    stream
        .shutdown(Shutdown::Write)
        .map_err(|e| format!("shutdown: {e}"))?;
    linger_zero(&stream);
    drop(stream);
    Ok(())
}
