//! Broker stand-ins for numbered flows, on `flows::flow_backend` (CONNACK first, then the role):
//! an echo, optionally reading slowly, and a broker that waits for a client's DISCONNECT and
//! closes. Every role gives up after a minute of silence, so no test leaves a thread behind
//! for long.

use super::client::{DISCONNECT, IO};
use super::pauses::{Pauses, Schedule};
use crate::flows::flow_backend;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::thread;
use std::time::Duration;

/// A role gives up after this long without a byte.
const IDLE: Duration = Duration::from_secs(60);

/// Echoes every byte back until the client's EOF, then shuts its own write side. With `slow`,
/// it sleeps between reads, so the client → broker direction backs up.
pub fn echo(mut s: TcpStream, slow: Option<Pauses>) {
    let _ = s.set_read_timeout(Some(IDLE));
    let _ = s.set_write_timeout(Some(IDLE));
    let mut schedule = slow.map(Schedule::new);
    let mut buf = vec![0u8; IO];
    loop {
        match s.read(&mut buf) {
            Ok(0) => {
                let _ = s.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
                if let Some(pause) = schedule.as_mut().and_then(|s| s.after_read(n as u64)) {
                    thread::sleep(pause);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// An echo broker; `slow(flow index)` says whether that flow's broker reads slowly.
pub fn echo_backend(slow: impl Fn(usize) -> Option<Pauses> + Send + Sync + 'static) -> SocketAddr {
    flow_backend(move |i, s| echo(s, slow(i)))
}

/// An echo broker on a listener the caller bound (an address in a network namespace).
pub fn echo_backend_on(listener: std::net::TcpListener) -> SocketAddr {
    crate::flows::flow_backend_on(listener, |_, s| echo(s, None))
}

/// Reads until the client's DISCONNECT and closes at once, as a broker does; true when the
/// DISCONNECT arrived, as the last bytes the client sent.
pub fn await_disconnect(mut s: TcpStream) -> bool {
    let _ = s.set_read_timeout(Some(IDLE));
    let mut got = Vec::new();
    let mut buf = [0u8; 64];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return false,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
        if got.ends_with(&DISCONNECT) {
            return got == DISCONNECT;
        }
    }
}
