//! Session resumption that honours `session_timeout`: tickets and cache entries carry the time
//! they were issued, and are refused once older than the timeout.

use rustls::server::{ProducesTickets, StoresServerSessions};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `value` with the current time in front.
fn stamp(value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + value.len());
    out.extend_from_slice(&now_secs().to_be_bytes());
    out.extend_from_slice(value);
    out
}

/// The value behind a stamp, if it is younger than `timeout`.
fn unstamp(stamped: Vec<u8>, timeout: Duration) -> Option<Vec<u8>> {
    let issued = u64::from_be_bytes(stamped.get(..8)?.try_into().ok()?);
    let age = now_secs().checked_sub(issued)?;
    (age < timeout.as_secs()).then(|| stamped[8..].to_vec())
}

/// Tickets that expire after `timeout` (the lifetime hint says so too).
#[derive(Debug)]
pub struct TimedTickets {
    /// Kept across certificate reloads, so tickets issued before a SIGHUP still resume.
    pub inner: Arc<dyn ProducesTickets>,
    pub timeout: Duration,
}

impl ProducesTickets for TimedTickets {
    fn enabled(&self) -> bool {
        self.inner.enabled()
    }

    fn lifetime(&self) -> u32 {
        u32::try_from(self.timeout.as_secs()).unwrap_or(u32::MAX)
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.inner.encrypt(&stamp(plain))
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        unstamp(self.inner.decrypt(cipher)?, self.timeout)
    }
}

/// A server-side session cache whose entries expire after `timeout`.
#[derive(Debug)]
pub struct TimedCache {
    pub inner: Arc<dyn StoresServerSessions>,
    pub timeout: Duration,
}

impl StoresServerSessions for TimedCache {
    fn put(&self, key: Vec<u8>, value: Vec<u8>) -> bool {
        self.inner.put(key, stamp(&value))
    }

    fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        unstamp(self.inner.get(key)?, self.timeout)
    }

    fn take(&self, key: &[u8]) -> Option<Vec<u8>> {
        unstamp(self.inner.take(key)?, self.timeout)
    }

    fn can_cache(&self) -> bool {
        self.inner.can_cache()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_expire() {
        let stamped = stamp(b"session");
        assert_eq!(
            unstamp(stamped.clone(), Duration::from_secs(60)).as_deref(),
            Some(&b"session"[..])
        );
        assert_eq!(unstamp(stamped, Duration::ZERO), None);
        let mut old = stamp(b"s");
        old[..8].copy_from_slice(&(now_secs() - 601).to_be_bytes());
        assert_eq!(unstamp(old, Duration::from_secs(600)), None);
        assert_eq!(unstamp(vec![1, 2], Duration::from_secs(600)), None);
    }
}
