//! A raw TCP server standing in for a broker, so a test sees exactly the bytes the proxy
//! forwards (and controls exactly when the "broker" reads, writes and closes).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// A listening socket on 127.0.0.1 that counts and hands over every accepted connection.
#[derive(Debug)]
pub struct Backend {
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    incoming: mpsc::UnboundedReceiver<TcpStream>,
    task: JoinHandle<()>,
}

impl Backend {
    /// Binds a free loopback port and starts accepting at once (no readiness wait needed).
    pub async fn start() -> Backend {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind backend");
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let (tx, incoming) = mpsc::unbounded_channel();
        let counter = Arc::clone(&accepted);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counter.fetch_add(1, Relaxed);
                if tx.send(stream).is_err() {
                    return;
                }
            }
        });
        Backend {
            addr,
            accepted,
            incoming,
            task,
        }
    }

    /// How many connections reached this backend so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Relaxed)
    }

    /// The next accepted connection; panics if none arrives within `wait`.
    pub async fn next(&mut self, wait: Duration) -> TcpStream {
        tokio::time::timeout(wait, self.incoming.recv())
            .await
            .unwrap_or_else(|_| panic!("no connection reached the backend within {wait:?}"))
            .expect("backend accept loop ended")
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}
