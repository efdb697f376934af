//! A WebSocket as a byte stream: binary messages in, their payloads out as one continuous MQTT
//! stream, and each write sent as one binary frame.
//!
//! MQTT packets and frames need not line up: a packet may span frames and a frame may carry
//! several packets, so the payloads are simply concatenated. The read side keeps the unread
//! rest of the current message (no copy: tungstenite hands out a slice of its read buffer); the
//! write side copies into one reusable buffer that tungstenite copies out of at once, so
//! steady-state writes do not allocate. Backpressure: a write is accepted only once the
//! previous frame has left tungstenite's buffer; `poll_flush` pushes the current one out.

use super::stats::{FrameViolation, WsStats};
use bytes::{Buf, Bytes, BytesMut};
use futures_util::{Sink, Stream};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Context, Poll, ready};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message, error::ProtocolError};

/// [`AsyncRead`] + [`AsyncWrite`] over a WebSocket; see the module doc.
pub struct WsBytes<S> {
    ws: WebSocketStream<S>,
    /// The unread rest of the last binary message.
    pending: Bytes,
    /// Reused for every outgoing frame.
    out: BytesMut,
    /// The client's side is counted; a broker-side leg passes `None`.
    stats: Option<Arc<WsStats>>,
    /// A close frame arrived (or the stream ended): reads return EOF from now on.
    read_done: bool,
}

impl<S> WsBytes<S> {
    /// Wraps an upgraded WebSocket.
    pub fn new(ws: WebSocketStream<S>, stats: Option<Arc<WsStats>>) -> Self {
        WsBytes {
            ws,
            pending: Bytes::new(),
            out: BytesMut::new(),
            stats,
            read_done: false,
        }
    }
}

/// Which counted rule a tungstenite read error broke, if any.
fn violation(error: &WsError) -> Option<FrameViolation> {
    match error {
        WsError::Capacity(_) => Some(FrameViolation::TooLarge),
        WsError::Protocol(ProtocolError::UnmaskedFrameFromClient) => Some(FrameViolation::Unmasked),
        WsError::Protocol(ProtocolError::ResetWithoutClosingHandshake) => None,
        WsError::Protocol(_) | WsError::Utf8(_) => Some(FrameViolation::Protocol),
        _ => None,
    }
}

fn close_code(v: FrameViolation) -> CloseCode {
    match v {
        FrameViolation::TooLarge => CloseCode::Size,
        FrameViolation::Text => CloseCode::Unsupported,
        FrameViolation::Unmasked | FrameViolation::Protocol => CloseCode::Protocol,
    }
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> WsBytes<S> {
    /// Counts the violation and sends a close frame with its code, best effort (the connection
    /// is dropped right after, so a blocked write is not waited for).
    fn refuse(&mut self, cx: &mut Context<'_>, v: FrameViolation) -> io::Error {
        if let Some(stats) = &self.stats {
            stats.violated(v);
        }
        let mut ws = Pin::new(&mut self.ws);
        if let Poll::Ready(Ok(())) = ws.as_mut().poll_ready(cx) {
            let frame = CloseFrame {
                code: close_code(v),
                reason: v.as_str().into(),
            };
            if ws.as_mut().start_send(Message::Close(Some(frame))).is_ok() {
                let _ = ws.poll_flush(cx);
            }
        }
        self.read_done = true;
        io::Error::new(io::ErrorKind::InvalidData, v.as_str())
    }
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> AsyncRead for WsBytes<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // Bounded: every turn either returns or consumes one message from the socket.
        loop {
            if !this.pending.is_empty() {
                let n = this.pending.len().min(buf.remaining());
                buf.put_slice(&this.pending[..n]);
                this.pending.advance(n);
                return Poll::Ready(Ok(()));
            }
            if this.read_done {
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut this.ws).poll_next(cx)) {
                Some(Ok(Message::Binary(payload))) => {
                    if let Some(stats) = &this.stats {
                        stats.frames_in.fetch_add(1, Relaxed);
                        stats.bytes_in.fetch_add(payload.len() as u64, Relaxed);
                    }
                    this.pending = payload;
                }
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(this.refuse(cx, FrameViolation::Text)));
                }
                // tungstenite answers pings itself (the pong goes out with the next read or write).
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Close(_))) | None => this.read_done = true,
                Some(Err(error)) => {
                    return Poll::Ready(Err(match violation(&error) {
                        Some(v) => this.refuse(cx, v),
                        None => io::Error::other(error),
                    }));
                }
            }
        }
    }
}

fn io_error(error: WsError) -> io::Error {
    match error {
        WsError::Io(e) => e,
        WsError::ConnectionClosed | WsError::AlreadyClosed => io::ErrorKind::BrokenPipe.into(),
        other => io::Error::other(other),
    }
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> AsyncWrite for WsBytes<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let mut ws = Pin::new(&mut this.ws);
        // The previous frame must be on the socket first: that is the backpressure.
        ready!(ws.as_mut().poll_flush(cx)).map_err(io_error)?;
        this.out.extend_from_slice(data);
        let frame = this.out.split().freeze();
        ws.as_mut()
            .start_send(Message::Binary(frame))
            .map_err(io_error)?;
        // The frame was copied into tungstenite's buffer; take the allocation back.
        this.out.reserve(data.len());
        if let Some(stats) = &this.stats {
            stats.frames_out.fetch_add(1, Relaxed);
            stats.bytes_out.fetch_add(data.len() as u64, Relaxed);
        }
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().ws)
            .poll_flush(cx)
            .map_err(io_error)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match ready!(Pin::new(&mut self.get_mut().ws).poll_close(cx)) {
            Ok(()) | Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => Poll::Ready(Ok(())),
            Err(e) => Poll::Ready(Err(io_error(e))),
        }
    }
}
