//! Counters and the JSON stats endpoint.
//!
//! Counters are plain atomics updated where things happen (accept, reject, flow end, per copied
//! chunk); the JSON is built only when `GET /stats` asks for it.

mod http;
mod schema;

pub use http::serve_stats;
pub use schema::*;

use crate::reject::RejectReason;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Connection counters kept for the whole process and again for each listener.
#[derive(Debug, Default)]
pub struct ConnectionCounters {
    /// Connections currently open (from accept to close, rejected ones included).
    pub active: AtomicU64,
    /// Connections accepted from the listening socket.
    pub accepted: AtomicU64,
    /// Connections handed to a broker and a data plane.
    pub handled: AtomicU64,
    rejected: [AtomicU64; RejectReason::ALL.len()],
}

impl ConnectionCounters {
    /// Counts one connection refused for `reason`.
    pub fn reject(&self, reason: RejectReason) {
        self.rejected[reason as usize].fetch_add(1, Relaxed);
    }

    /// How many connections were refused for `reason`.
    pub fn rejected(&self, reason: RejectReason) -> u64 {
        self.rejected[reason as usize].load(Relaxed)
    }

    /// The counters now, every refusal reason listed.
    pub fn snapshot(&self) -> ConnectionStats {
        ConnectionStats {
            active: self.active.load(Relaxed),
            accepted: self.accepted.load(Relaxed),
            handled: self.handled.load(Relaxed),
            rejected: RejectReason::ALL
                .iter()
                .map(|r| (r.as_str().to_string(), self.rejected(*r)))
                .collect(),
        }
    }
}

/// Bytes moved in each direction, added per copied chunk so long-lived flows show up live.
#[derive(Debug, Default)]
pub struct ByteMeter {
    /// Client → broker.
    pub to_broker: AtomicU64,
    /// Broker → client.
    pub to_client: AtomicU64,
}

impl ByteMeter {
    /// Adds `n` bytes in direction `dir`.
    pub fn add(&self, dir: Direction, n: u64) {
        match dir {
            Direction::ToBroker => self.to_broker.fetch_add(n, Relaxed),
            Direction::ToClient => self.to_client.fetch_add(n, Relaxed),
        };
    }
}

/// Which way bytes flow through a spliced pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    ToBroker,
    ToClient,
}
