//! Per-listener WebSocket counters: why upgrades failed, why upgraded clients were closed,
//! frames and payload bytes each way, and how long handshakes took.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Why an HTTP request did not become a WebSocket; each is a key of `upgrades_failed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpgradeFailure {
    /// The request head did not arrive within `handshake_timeout`.
    Timeout,
    /// The client closed or reset before the request head was complete.
    Closed,
    /// The request head was larger than the limit (431).
    HeadersTooLarge,
    /// Not parseable HTTP/1.1, or a required header was malformed (400).
    BadRequest,
    /// A method other than GET (405).
    Method,
    /// A path not in `path` (404).
    NotFound,
    /// A plain HTTP request, or an upgrade to something other than websocket (426).
    NotUpgrade,
    /// A `Sec-WebSocket-Version` other than 13 (426).
    Version,
    /// `Origin` not in `allowed_origins` (403).
    Origin,
    /// A subprotocol other than `mqtt`/`mqttv3.1`, or none while one is required (400).
    Subprotocol,
}

impl UpgradeFailure {
    /// Every reason, in the order the stats JSON lists them.
    pub const ALL: [UpgradeFailure; 10] = [
        UpgradeFailure::Timeout,
        UpgradeFailure::Closed,
        UpgradeFailure::HeadersTooLarge,
        UpgradeFailure::BadRequest,
        UpgradeFailure::Method,
        UpgradeFailure::NotFound,
        UpgradeFailure::NotUpgrade,
        UpgradeFailure::Version,
        UpgradeFailure::Origin,
        UpgradeFailure::Subprotocol,
    ];

    /// The stats and access-log key.
    pub fn as_str(self) -> &'static str {
        match self {
            UpgradeFailure::Timeout => "timeout",
            UpgradeFailure::Closed => "closed",
            UpgradeFailure::HeadersTooLarge => "headers_too_large",
            UpgradeFailure::BadRequest => "bad_request",
            UpgradeFailure::Method => "method",
            UpgradeFailure::NotFound => "not_found",
            UpgradeFailure::NotUpgrade => "not_upgrade",
            UpgradeFailure::Version => "version",
            UpgradeFailure::Origin => "origin",
            UpgradeFailure::Subprotocol => "subprotocol",
        }
    }
}

/// Why an upgraded client was closed by the proxy; each is a key of `closed_for`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameViolation {
    /// A frame or message larger than `max_frame_size`.
    TooLarge,
    /// A client frame without the mask RFC 6455 requires.
    Unmasked,
    /// A text frame: MQTT travels in binary frames only.
    Text,
    /// Any other breach of RFC 6455 (reserved bits, bad opcodes, bad close frames, ...).
    Protocol,
}

impl FrameViolation {
    /// Every reason, in the order the stats JSON lists them.
    pub const ALL: [FrameViolation; 4] = [
        FrameViolation::TooLarge,
        FrameViolation::Unmasked,
        FrameViolation::Text,
        FrameViolation::Protocol,
    ];

    /// The stats key.
    pub fn as_str(self) -> &'static str {
        match self {
            FrameViolation::TooLarge => "frame_too_large",
            FrameViolation::Unmasked => "unmasked_frame",
            FrameViolation::Text => "text_frame",
            FrameViolation::Protocol => "protocol_error",
        }
    }
}

/// The counters of one ws listener; updated where things happen, read by `GET /stats`.
#[derive(Debug, Default)]
pub struct WsStats {
    upgrades_ok: AtomicU64,
    failed: [AtomicU64; UpgradeFailure::ALL.len()],
    closed: [AtomicU64; FrameViolation::ALL.len()],
    /// Binary messages received from clients (a fragmented message counts once).
    pub frames_in: AtomicU64,
    /// Binary messages sent to clients.
    pub frames_out: AtomicU64,
    /// Payload bytes received from clients.
    pub bytes_in: AtomicU64,
    /// Payload bytes sent to clients.
    pub bytes_out: AtomicU64,
    handshake_us_total: AtomicU64,
    handshake_us_max: AtomicU64,
}

impl WsStats {
    /// Counts a successful upgrade and how long it took from accept to the 101 being sent.
    pub fn upgraded(&self, took: Duration) {
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.upgrades_ok.fetch_add(1, Relaxed);
        self.handshake_us_total.fetch_add(us, Relaxed);
        self.handshake_us_max.fetch_max(us, Relaxed);
    }

    /// Counts a failed upgrade.
    pub fn failed(&self, reason: UpgradeFailure) {
        self.failed[reason as usize].fetch_add(1, Relaxed);
    }

    /// How many upgrades failed for `reason`.
    pub fn failures(&self, reason: UpgradeFailure) -> u64 {
        self.failed[reason as usize].load(Relaxed)
    }

    /// Counts a client closed for breaking the frame rules.
    pub fn violated(&self, reason: FrameViolation) {
        self.closed[reason as usize].fetch_add(1, Relaxed);
    }

    /// The `ws` object of a listener's stats.
    pub fn snapshot(&self) -> crate::stats::WsStats {
        let ok = self.upgrades_ok.load(Relaxed);
        let total_us = self.handshake_us_total.load(Relaxed);
        let avg_ms = if ok == 0 {
            0.0
        } else {
            total_us as f64 / ok as f64 / 1000.0
        };
        crate::stats::WsStats {
            upgrades_ok: ok,
            upgrades_failed: by_name(
                UpgradeFailure::ALL.map(|r| (r.as_str(), &self.failed[r as usize])),
            ),
            closed_for: by_name(
                FrameViolation::ALL.map(|r| (r.as_str(), &self.closed[r as usize])),
            ),
            frames_in: self.frames_in.load(Relaxed),
            frames_out: self.frames_out.load(Relaxed),
            bytes_in: self.bytes_in.load(Relaxed),
            bytes_out: self.bytes_out.load(Relaxed),
            handshake_ms_avg: (avg_ms * 1000.0).round() / 1000.0,
            handshake_ms_max: self.handshake_us_max.load(Relaxed) as f64 / 1000.0,
        }
    }
}

/// Counters by name, read now.
fn by_name<'a>(
    counters: impl IntoIterator<Item = (&'a str, &'a AtomicU64)>,
) -> std::collections::BTreeMap<String, u64> {
    counters
        .into_iter()
        .map(|(name, n)| (name.to_string(), n.load(Relaxed)))
        .collect()
}
