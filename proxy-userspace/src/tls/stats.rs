//! Handshake counters of one TLS listener.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Why a TLS handshake failed, as counted in stats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// Not finished within the listener's `connect_packet_timeout`.
    Timeout,
    /// The client closed or reset the connection during the handshake.
    Closed,
    /// The bytes were not TLS (plain MQTT, garbage) or broke the protocol.
    Malformed,
    /// No client certificate under `verify_client = "required"`.
    NoCertificate,
    /// The client certificate does not chain to `client_ca`.
    UnknownCa,
    /// The client certificate (or one of its CAs) has expired or is not valid yet.
    Expired,
    /// The path to `client_ca` has more intermediates than `verify_depth`.
    ChainTooLong,
    /// Any other problem with the client certificate (usage, signature, revocation).
    BadCertificate,
    /// No protocol version or cipher suite in common.
    Incompatible,
    /// The client offered ALPN names, none of them in `alpn`.
    NoAlpn,
    /// The client aborted with an alert (it did not accept our certificate, typically).
    AlertReceived,
    /// Anything else.
    Other,
}

impl HandshakeFailure {
    /// Every reason, in the order stats list them.
    pub const ALL: [HandshakeFailure; 12] = [
        HandshakeFailure::Timeout,
        HandshakeFailure::Closed,
        HandshakeFailure::Malformed,
        HandshakeFailure::NoCertificate,
        HandshakeFailure::UnknownCa,
        HandshakeFailure::Expired,
        HandshakeFailure::ChainTooLong,
        HandshakeFailure::BadCertificate,
        HandshakeFailure::Incompatible,
        HandshakeFailure::NoAlpn,
        HandshakeFailure::AlertReceived,
        HandshakeFailure::Other,
    ];

    /// The stats key.
    pub fn as_str(self) -> &'static str {
        match self {
            HandshakeFailure::Timeout => "timeout",
            HandshakeFailure::Closed => "closed",
            HandshakeFailure::Malformed => "malformed",
            HandshakeFailure::NoCertificate => "no_certificate",
            HandshakeFailure::UnknownCa => "unknown_ca",
            HandshakeFailure::Expired => "expired",
            HandshakeFailure::ChainTooLong => "chain_too_long",
            HandshakeFailure::BadCertificate => "bad_certificate",
            HandshakeFailure::Incompatible => "incompatible",
            HandshakeFailure::NoAlpn => "no_alpn",
            HandshakeFailure::AlertReceived => "alert_received",
            HandshakeFailure::Other => "other",
        }
    }
}

/// Counters shared by every connection of one TLS listener.
#[derive(Debug, Default)]
pub struct TlsStats {
    ok: AtomicU64,
    resumed: AtomicU64,
    failed: [AtomicU64; HandshakeFailure::ALL.len()],
    /// Sum of successful handshakes' durations, microseconds.
    time_us: AtomicU64,
    /// Longest successful handshake, microseconds.
    max_us: AtomicU64,
    reloads: AtomicU64,
    reload_failures: AtomicU64,
}

impl TlsStats {
    /// One completed handshake; `resumed` when it resumed a session.
    pub fn ok(&self, resumed: bool, took: Duration) {
        self.ok.fetch_add(1, Relaxed);
        if resumed {
            self.resumed.fetch_add(1, Relaxed);
        }
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.time_us.fetch_add(us, Relaxed);
        self.max_us.fetch_max(us, Relaxed);
    }

    /// One failed handshake.
    pub fn failed(&self, reason: HandshakeFailure) {
        self.failed[reason as usize].fetch_add(1, Relaxed);
    }

    /// How many handshakes failed for `reason`.
    pub fn failures(&self, reason: HandshakeFailure) -> u64 {
        self.failed[reason as usize].load(Relaxed)
    }

    /// One certificate reload (SIGHUP), successful or not.
    pub fn reloaded(&self, ok: bool) {
        if ok {
            self.reloads.fetch_add(1, Relaxed);
        } else {
            self.reload_failures.fetch_add(1, Relaxed);
        }
    }

    /// `{handshakes_ok, resumed, handshakes_failed: {reason: n}, handshake_time_avg_us, ...}`.
    pub fn snapshot(&self) -> crate::stats::TlsStats {
        let ok = self.ok.load(Relaxed);
        let total_us = self.time_us.load(Relaxed);
        crate::stats::TlsStats {
            handshakes_ok: ok,
            resumed: self.resumed.load(Relaxed),
            handshakes_failed: HandshakeFailure::ALL
                .iter()
                .map(|r| (r.as_str().to_string(), self.failures(*r)))
                .collect(),
            handshake_time_avg_us: total_us.checked_div(ok).unwrap_or(0),
            handshake_time_max_us: self.max_us.load(Relaxed),
            handshake_time_total_us: total_us,
            reloads: self.reloads.load(Relaxed),
            reload_failures: self.reload_failures.load(Relaxed),
        }
    }
}
