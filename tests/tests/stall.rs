//! A peer that stops reading must block the writer on the other side before the host's memory
//! pays for it: a stalled broker blocks a client writing 512 MiB, a client that never reads blocks
//! a broker writing 512 MiB, and once the reader resumes everything arrives intact and in order.
//! These judge the host's `MemAvailable`, so they run one at a time and beside no other test file.

use mqsplice_tests::Mode;
use mqsplice_tests::flows::{
    End, KIB, MIB, chunk, connect_flow, flow_backend, mem_available_kib, read_stream, tcp_mem_pages,
};
use mqsplice_tests::setup::Setup;
use sha2::{Digest, Sha256};
use std::io::{ErrorKind, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::{Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

/// `cargo test` runs a file's tests in parallel; these must not share the host's memory figure.
static SERIAL: Mutex<()> = Mutex::new(());

const TOTAL: u64 = 512 * MIB;
const SEED: u64 = 512;
/// How far `MemAvailable` may fall while the reader is stalled.
const MEMORY_BUDGET_KIB: u64 = 256 * 1024;
/// No progress for this long counts as blocked.
const BLOCKED: Duration = Duration::from_secs(2);

/// Writes stream `SEED` from byte `sent` on, with short write timeouts, until no byte was taken
/// for `BLOCKED` (returns true), or `until` bytes were written (returns false). Fails if a write
/// still makes progress once the host's `MemAvailable` has fallen by `MEMORY_BUDGET_KIB`, or
/// after 60 s.
fn write_until_blocked(
    writer: &mut TcpStream,
    hash: &mut Sha256,
    sent: &mut u64,
    until: u64,
    mem_before: u64,
    what: &str,
) -> bool {
    writer
        .set_write_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let started = Instant::now();
    let mut last_progress = Instant::now();
    let mut current = (u64::MAX, Vec::new());
    while *sent < until {
        if last_progress.elapsed() >= BLOCKED {
            return true;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{what}: still writing after 60 s ({} MiB)",
            *sent / MIB
        );
        if current.0 != *sent / MIB {
            current = (*sent / MIB, chunk(SEED, *sent / MIB));
        }
        let end = (until - current.0 * MIB).min(MIB) as usize;
        match writer.write(&current.1[(*sent % MIB) as usize..end]) {
            Ok(n) => {
                hash.update(&current.1[(*sent % MIB) as usize..][..n]);
                *sent += n as u64;
                last_progress = Instant::now();
                // Judged when the writer made progress: memory taken while it is already
                // blocked (another process on the host) is not held against the data path.
                let fallen = mem_before.saturating_sub(mem_available_kib());
                assert!(
                    fallen < MEMORY_BUDGET_KIB,
                    "{what}: the writer was not blocked before MemAvailable fell by {} MiB \
                     ({} MiB written, TCP memory {} MiB)",
                    fallen / 1024,
                    *sent / MIB,
                    tcp_mem_pages() * 4 / 1024
                );
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => panic!("{what}: write after {} bytes: {e}", *sent),
        }
    }
    false
}

/// One side writes 512 MiB while the other does not read: the writer must block within the
/// memory budget; then the reader drains and must get every byte in order.
fn stalled_reader_blocks_the_writer(mode: Mode, client_writes: bool) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let what = format!(
        "{mode:?} {}",
        if client_writes {
            "client → stalled broker"
        } else {
            "broker → stalled client"
        }
    );
    let (tx, rx) = mpsc::channel();
    let broker = flow_backend(move |_, s| {
        let _ = tx.send(s);
    });
    let daemon = Setup::tcp(mode, &[broker]).spawn_graceful();
    let listen = daemon.listen;
    let client = connect_flow(listen, 0);
    let server = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    let (mut writer, mut reader) = if client_writes {
        (client, server)
    } else {
        (server, client)
    };

    let (mem_before, tcp_before) = (mem_available_kib(), tcp_mem_pages());
    let started = Instant::now();
    let mut hash = Sha256::new();
    let mut sent = 0;
    let blocked = write_until_blocked(&mut writer, &mut hash, &mut sent, TOTAL, mem_before, &what);
    println!(
        "{what}: {} after {} MiB in {:?}; MemAvailable fell {} MiB, TCP memory rose {} MiB",
        if blocked { "blocked" } else { "never blocked" },
        sent / MIB,
        started.elapsed(),
        mem_before.saturating_sub(mem_available_kib()) / 1024,
        tcp_mem_pages().saturating_sub(tcp_before) * 4 / 1024
    );
    assert!(
        blocked,
        "{what}: all 512 MiB were taken with nobody reading"
    );

    let drain =
        thread::spawn(move || read_stream(&mut reader, None, Duration::from_secs(30), None));
    writer
        .set_write_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    for k in sent / MIB..TOTAL / MIB {
        let c = chunk(SEED, k);
        let rest = &c[(sent - k * MIB) as usize..];
        writer
            .write_all(rest)
            .unwrap_or_else(|e| panic!("{what}: write after {sent} bytes: {e}"));
        hash.update(rest);
        sent += rest.len() as u64;
    }
    writer.shutdown(Shutdown::Write).unwrap();
    let got = drain.join().unwrap();
    println!(
        "{what}: all {} KiB across in {:?}",
        got.len / KIB,
        started.elapsed()
    );
    let digest: [u8; 32] = hash.finalize().into();
    assert_eq!(
        (got.len, got.end, got.digest == digest),
        (TOTAL, End::Eof, true),
        "{what}: length, end, digest matches"
    );
}

#[test]
fn userspace_stalled_broker_blocks_a_client_writing_512_mib() {
    stalled_reader_blocks_the_writer(Mode::Userspace, true);
}

#[test]
fn ebpf_stalled_broker_blocks_a_client_writing_512_mib() {
    if !Mode::Sockmap.runnable() {
        return;
    }
    stalled_reader_blocks_the_writer(Mode::Sockmap, true);
}

#[test]
fn userspace_client_that_never_reads_blocks_a_broker_writing_512_mib() {
    stalled_reader_blocks_the_writer(Mode::Userspace, false);
}

#[test]
fn ebpf_client_that_never_reads_blocks_a_broker_writing_512_mib() {
    if !Mode::Sockmap.runnable() {
        return;
    }
    stalled_reader_blocks_the_writer(Mode::Sockmap, false);
}
