//! The userspace copy path: two buffers per flow, read → write, FIN propagated per direction.
//!
//! Backpressure is TCP's own: while a write to one side is blocked the other side is not read,
//! so its receive window closes; nothing is buffered beyond `buffer_size` per direction.

use super::{
    ClientStream, CloseReason, ConnectHandling, DataPath, DataPlane, Flow, FlowEnd, FlowFuture,
};
use crate::stats::{ByteMeter, Direction};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

/// The data plane that copies through the daemon; works everywhere, needs no privilege.
#[derive(Debug, Default, Clone, Copy)]
pub struct UserspaceCopy;

impl DataPlane for UserspaceCopy {
    fn path(&self) -> DataPath {
        DataPath::Userspace
    }

    fn connect_handling(&self) -> ConnectHandling {
        ConnectHandling::Consume
    }

    fn run(&self, flow: Flow) -> FlowFuture {
        Box::pin(copy_flow(flow))
    }
}

/// Which side failed, for the close reason.
enum Failure {
    Read,
    Write,
}

async fn copy_flow(flow: Flow) -> FlowEnd {
    let Flow {
        client,
        mut broker,
        idle_timeout,
        buffer_size,
        meters,
        ..
    } = flow;
    match (client, &mut broker) {
        (ClientStream::Tcp(mut client), ClientStream::Tcp(broker)) => {
            let halves = (client.split(), broker.split());
            copy_pair(halves, idle_timeout, buffer_size, &meters).await
        }
        // TLS or WebSocket on either side: split through a lock, as tokio does for any stream.
        (client, _) => {
            let halves = (tokio::io::split(client), tokio::io::split(broker));
            copy_pair(halves, idle_timeout, buffer_size, &meters).await
        }
    }
}

/// The read and write halves of the client and of the broker.
type Halves<CR, CW, BR, BW> = ((CR, CW), (BR, BW));

async fn copy_pair<CR, CW, BR, BW>(
    halves: Halves<CR, CW, BR, BW>,
    idle: Duration,
    size: usize,
    meters: &[Arc<ByteMeter>],
) -> FlowEnd
where
    CR: AsyncRead + Unpin,
    CW: AsyncWrite + Unpin,
    BR: AsyncRead + Unpin,
    BW: AsyncWrite + Unpin,
{
    let ((client_read, client_write), (broker_read, broker_write)) = halves;
    let progress = Progress {
        started: Instant::now(),
        last_activity_ms: AtomicU64::new(0),
        moved: Default::default(),
    };
    let up = copy_direction(
        client_read,
        broker_write,
        size,
        Direction::ToBroker,
        meters,
        &progress,
    );
    let down = copy_direction(
        broker_read,
        client_write,
        size,
        Direction::ToClient,
        meters,
        &progress,
    );
    tokio::pin!(up, down);

    let (mut up_done, mut down_done) = (false, false);
    let mut first_fin = None;
    let mut idle_deadline = progress.started + idle;
    let reason = loop {
        tokio::select! {
            result = &mut up, if !up_done => match result {
                Ok(()) => {
                    up_done = true;
                    first_fin.get_or_insert(CloseReason::ClientClosed);
                }
                Err(Failure::Read) => break CloseReason::ClientError,
                Err(Failure::Write) => break CloseReason::BrokerError,
            },
            result = &mut down, if !down_done => match result {
                Ok(()) => {
                    down_done = true;
                    first_fin.get_or_insert(CloseReason::BrokerClosed);
                }
                Err(Failure::Read) => break CloseReason::BrokerError,
                Err(Failure::Write) => break CloseReason::ClientError,
            },
            _ = tokio::time::sleep_until(idle_deadline) => {
                let last = progress.last_activity();
                if last + idle <= Instant::now() {
                    break CloseReason::Idle;
                }
                idle_deadline = last + idle;
            }
        }
        if up_done && down_done {
            break first_fin.unwrap_or(CloseReason::ClientClosed);
        }
    };
    FlowEnd {
        path: DataPath::Userspace,
        bytes_to_broker: progress.moved[0].load(Relaxed),
        bytes_to_client: progress.moved[1].load(Relaxed),
        reason,
    }
}

/// What both directions of one flow share: bytes moved and when anything last moved.
struct Progress {
    started: Instant,
    last_activity_ms: AtomicU64,
    /// Indexed by direction: 0 to the broker, 1 to the client.
    moved: [AtomicU64; 2],
}

impl Progress {
    fn record(&self, dir: Direction, n: u64) {
        self.moved[dir as usize].fetch_add(n, Relaxed);
        self.last_activity_ms
            .store(self.started.elapsed().as_millis() as u64, Relaxed);
    }

    fn last_activity(&self) -> Instant {
        self.started + Duration::from_millis(self.last_activity_ms.load(Relaxed))
    }
}

/// Copies one direction until EOF (then shuts the writer's send side) or an error.
async fn copy_direction<R, W>(
    mut reader: R,
    mut writer: W,
    buffer_size: usize,
    dir: Direction,
    meters: &[Arc<ByteMeter>],
    progress: &Progress,
) -> Result<(), Failure>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; buffer_size];
    loop {
        let n = match reader.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(_) => return Err(Failure::Read),
        };
        // The flush is free on a socket and pushes a layered stream's frame or record out now.
        if writer.write_all(&buf[..n]).await.is_err() || writer.flush().await.is_err() {
            return Err(Failure::Write);
        }
        progress.record(dir, n as u64);
        for meter in meters {
            meter.add(dir, n as u64);
        }
    }
    // Half-close: the other direction keeps flowing.
    let _ = writer.shutdown().await;
    Ok(())
}
