//! The one broker stand-in: a raw TCP server that answers the way a test asks (CONNACK with a
//! chosen return code, echo, stall, close), so a test sees exactly the bytes the proxy forwards
//! and controls when the "broker" reads, writes and closes. Real brokers are in `broker`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// What the fake broker does with every connection it accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    /// Nothing: the connection goes to the test untouched ([`FakeBroker::next`]).
    Handover,
    /// Reads one CONNECT, answers a CONNACK with this return code, then hands the connection
    /// to the test (held open until the test takes it or the broker is dropped).
    Connack(u8),
    /// CONNACK (accepted), then every byte back to the sender until it closes.
    Echo,
    /// Accepts and never reads: the proxy's writes pile up in the socket buffers.
    Stall,
    /// Accepts and closes at once, before reading anything.
    Close,
    /// Reads one CONNECT, then closes without answering.
    CloseAfterConnect,
}

/// A listening socket on 127.0.0.1 that counts every accepted connection and treats it as its
/// [`Behaviour`] says.
#[derive(Debug)]
pub struct FakeBroker {
    /// Where the proxy should connect.
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    incoming: mpsc::UnboundedReceiver<TcpStream>,
    task: JoinHandle<()>,
    /// Its own runtime when started from a plain (non-async) test.
    runtime: Option<tokio::runtime::Runtime>,
}

/// The CONNACK of an accepted MQTT 3.1.1 session.
pub const CONNACK_OK: [u8; 4] = [0x20, 0x02, 0x00, 0x00];

impl FakeBroker {
    /// A broker that hands every connection to the test ([`Behaviour::Handover`]).
    pub async fn start() -> FakeBroker {
        FakeBroker::with(Behaviour::Handover).await
    }

    /// Binds a free loopback port and starts accepting at once (no readiness wait needed).
    pub async fn with(behaviour: Behaviour) -> FakeBroker {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake broker");
        let addr = listener.local_addr().expect("bound address");
        let accepted = Arc::new(AtomicUsize::new(0));
        let (tx, incoming) = mpsc::unbounded_channel();
        let counter = Arc::clone(&accepted);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counter.fetch_add(1, Relaxed);
                let tx = tx.clone();
                tokio::spawn(serve(behaviour, stream, tx));
            }
        });
        FakeBroker {
            addr,
            accepted,
            incoming,
            task,
            runtime: None,
        }
    }

    /// [`FakeBroker::with`] for a plain `#[test]` without a runtime: the broker runs on a small
    /// runtime of its own, kept as long as the broker.
    pub fn blocking(behaviour: Behaviour) -> FakeBroker {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("fake broker runtime");
        let mut broker = runtime.block_on(FakeBroker::with(behaviour));
        broker.runtime = Some(runtime);
        broker
    }

    /// How many connections reached this broker so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Relaxed)
    }

    /// The next connection handed over; panics if none arrives within `wait`.
    pub async fn next(&mut self, wait: Duration) -> TcpStream {
        tokio::time::timeout(wait, self.incoming.recv())
            .await
            .unwrap_or_else(|_| panic!("no connection reached the fake broker within {wait:?}"))
            .expect("fake broker accept loop ended")
    }
}

impl FakeBroker {
    /// [`FakeBroker::next`] as a blocking std socket, for tests that drive it from plain
    /// threads (or from `spawn_blocking`).
    pub fn next_std(&mut self, wait: Duration) -> std::net::TcpStream {
        let handle = match &self.runtime {
            Some(runtime) => runtime.handle().clone(),
            None => tokio::runtime::Handle::current(),
        };
        let stream = handle
            .block_on(self.next(wait))
            .into_std()
            .expect("std socket");
        stream.set_nonblocking(false).expect("blocking socket");
        stream
    }
}

impl Drop for FakeBroker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(behaviour: Behaviour, mut stream: TcpStream, tx: mpsc::UnboundedSender<TcpStream>) {
    match behaviour {
        Behaviour::Handover => {
            let _ = tx.send(stream);
        }
        Behaviour::Connack(code) => {
            if read_packet(&mut stream).await.is_some()
                && stream.write_all(&[0x20, 0x02, 0x00, code]).await.is_ok()
            {
                let _ = tx.send(stream);
            }
        }
        Behaviour::Echo => {
            if read_packet(&mut stream).await.is_none()
                || stream.write_all(&CONNACK_OK).await.is_err()
            {
                return;
            }
            let (mut reader, mut writer) = stream.split();
            let _ = tokio::io::copy(&mut reader, &mut writer).await;
        }
        Behaviour::Stall => {
            // Held (unread) until the peer goes away or the test ends; nothing to do.
            let _ = tx.send(stream);
        }
        Behaviour::Close => drop(stream),
        Behaviour::CloseAfterConnect => {
            let _ = read_packet(&mut stream).await;
        }
    }
}

/// Reads one whole MQTT packet (fixed header, remaining length, body); `None` at EOF, on an
/// error or on a length field longer than four bytes.
pub async fn read_packet(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut packet = Vec::with_capacity(64);
    let mut remaining = 0usize;
    loop {
        let byte = stream.read_u8().await.ok()?;
        packet.push(byte);
        let at = packet.len() - 1;
        if at == 0 {
            continue;
        }
        if at > 4 {
            return None;
        }
        remaining |= usize::from(byte & 0x7f) << (7 * (at - 1));
        if byte & 0x80 == 0 {
            break;
        }
    }
    let header = packet.len();
    packet.resize(header + remaining, 0);
    stream.read_exact(&mut packet[header..]).await.ok()?;
    Some(packet)
}
