//! Passive health: NGINX's `max_fails` failed connects within `fail_timeout` make a server
//! unavailable for `fail_timeout`.

use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// Failure bookkeeping for one server. Touched only on connect outcomes, never per byte.
#[derive(Debug)]
pub struct Health {
    max_fails: u32,
    fail_timeout: Duration,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    fails: u32,
    window_start: Option<Instant>,
    unavailable_until: Option<Instant>,
}

impl Health {
    /// `max_fails = 0` turns passive health off, as in NGINX.
    pub fn new(max_fails: u32, fail_timeout: Duration) -> Health {
        Health {
            max_fails,
            fail_timeout,
            state: Mutex::new(State::default()),
        }
    }

    /// Whether the server may be chosen at `now`.
    pub fn is_available(&self, now: Instant) -> bool {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.unavailable_until.is_none_or(|until| now >= until)
    }

    /// Counts a failed connect; true when this failure made the server unavailable.
    pub fn record_failure(&self, now: Instant) -> bool {
        if self.max_fails == 0 {
            return false;
        }
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let window_open = state
            .window_start
            .is_some_and(|start| now < start + self.fail_timeout);
        if !window_open {
            state.fails = 0;
            state.window_start = Some(now);
        }
        state.fails += 1;
        if state.fails >= self.max_fails {
            state.fails = 0;
            state.window_start = None;
            state.unavailable_until = Some(now + self.fail_timeout);
            return true;
        }
        false
    }

    /// A successful connect clears the failure count.
    pub fn record_success(&self) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.fails = 0;
        state.window_start = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_fails_within_window_makes_unavailable_for_fail_timeout() {
        let h = Health::new(2, Duration::from_secs(10));
        let t0 = Instant::now();
        assert!(!h.record_failure(t0));
        assert!(h.is_available(t0));
        assert!(h.record_failure(t0 + Duration::from_secs(3)));
        assert!(!h.is_available(t0 + Duration::from_secs(4)));
        assert!(h.is_available(t0 + Duration::from_secs(13)));
    }

    #[test]
    fn failures_outside_the_window_do_not_add_up() {
        let h = Health::new(2, Duration::from_secs(10));
        let t0 = Instant::now();
        assert!(!h.record_failure(t0));
        assert!(!h.record_failure(t0 + Duration::from_secs(11)));
        assert!(h.is_available(t0 + Duration::from_secs(12)));
    }

    #[test]
    fn success_resets_and_zero_disables() {
        let h = Health::new(2, Duration::from_secs(10));
        let t0 = Instant::now();
        h.record_failure(t0);
        h.record_success();
        assert!(!h.record_failure(t0));
        let off = Health::new(0, Duration::from_secs(10));
        for _ in 0..10 {
            assert!(!off.record_failure(t0));
        }
        assert!(off.is_available(t0));
    }
}
