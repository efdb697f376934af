//! Refusing a client before it reaches a broker, without losing the reason code to a reset.

use crate::listener::ListenerContext;
use crate::reject::RejectReason;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// How long and how much a refused client may still send before it is closed.
const LINGER_TIME: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 64 * 1024;

/// Counts the refusal, sends the CONNACK if there is one, then half-closes and drains the
/// client until EOF (bounded), so its stack does not turn the CONNACK into a reset.
pub async fn refuse(
    ctx: &ListenerContext,
    mut client: impl AsyncRead + AsyncWrite + Unpin,
    reason: RejectReason,
    connack: Option<impl AsRef<[u8]>>,
) {
    ctx.count(|c| c.reject(reason));
    let Some(connack) = connack else { return };
    if client.write_all(connack.as_ref()).await.is_err() || client.shutdown().await.is_err() {
        return;
    }
    let _ = tokio::time::timeout(LINGER_TIME, async {
        // On the heap: an array here would make every connection's task 4 KiB bigger for its whole life.
        let mut sink = vec![0u8; 4096];
        let mut drained = 0;
        while drained < LINGER_BYTES {
            match client.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => drained += n,
            }
        }
    })
    .await;
}
