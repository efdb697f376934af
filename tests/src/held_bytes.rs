//! `dataplane.daemon_held_bytes` sampled while flows run: the bytes the daemon itself holds for
//! throttled directions must stay under `dataplane.max_daemon_held_total` and be back to 0 once
//! the flows end. The key is newer than this harness: when a daemon does not report it, the
//! check says so instead of passing.

use crate::stats::fetch_json as stats;
use serde_json::Value;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// The stats key sampled, and the bound it is held to.
pub const KEY: &str = "daemon_held_bytes";
pub const BOUND_KEY: &str = "max_daemon_held_total";

/// What the samples showed: how many stats documents were read (`polls`), the key's `peak`
/// (`None` when no document had the key), the `bound` as the stats reported it, and
/// `dataplane.throttles_total` at the last poll (`throttles`).
#[derive(Debug, Clone, Copy, Default)]
pub struct Samples {
    pub polls: u64,
    pub peak: Option<u64>,
    pub bound: Option<u64>,
    pub throttles: Option<u64>,
}

impl Samples {
    fn add(&mut self, json: &Value) {
        let dataplane = &json["dataplane"];
        self.polls += 1;
        self.throttles = dataplane["throttles_total"].as_u64().or(self.throttles);
        self.bound = dataplane[BOUND_KEY].as_u64().or(self.bound);
        if let Some(held) = dataplane[KEY].as_u64() {
            self.peak = Some(self.peak.unwrap_or(0).max(held));
        }
    }
}

/// Polls the stats every 20 ms on a thread until stopped (or for at most `limit`).
pub struct Sampler {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Samples>,
}

impl Sampler {
    pub fn start(stats_addr: SocketAddr, limit: Duration) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = thread::spawn(move || {
            let deadline = Instant::now() + limit;
            let mut samples = Samples::default();
            while !flag.load(Relaxed) && Instant::now() < deadline {
                samples.add(&stats(stats_addr));
                thread::sleep(Duration::from_millis(20));
            }
            samples
        });
        Sampler { stop, handle }
    }

    /// Stops sampling; adds one last sample from `after` (the stats once the flows are done).
    pub fn finish(self, after: &Value) -> Samples {
        self.stop.store(true, Relaxed);
        let mut samples = self.handle.join().expect("sampler thread");
        samples.add(after);
        samples
    }
}

/// The check itself: `Ok(None)` when the daemon does not report the key (the caller prints
/// that the check was skipped), `Ok(Some(peak))` when it held, `Err` with what broke.
pub fn judge(samples: &Samples, after: &Value) -> Result<Option<u64>, String> {
    let Some(peak) = samples.peak else {
        return Ok(None);
    };
    let Some(bound) = samples.bound else {
        return Err(format!(
            "dataplane.{KEY} is reported but dataplane.{BOUND_KEY} is not"
        ));
    };
    if peak > bound {
        return Err(format!(
            "dataplane.{KEY} peaked at {} bytes over {} polls, above dataplane.{BOUND_KEY} = {bound}",
            peak, samples.polls
        ));
    }
    match after["dataplane"][KEY].as_u64() {
        Some(0) => Ok(Some(peak)),
        other => Err(format!(
            "dataplane.{KEY} is {other:?} after every flow ended, not 0"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sampled(docs: &[Value]) -> Samples {
        let mut samples = Samples::default();
        for d in docs {
            samples.add(d);
        }
        samples
    }

    fn doc(held: Option<u64>, bound: Option<u64>) -> Value {
        let mut dataplane = json!({ "throttles_total": 3 });
        if let Some(h) = held {
            dataplane[KEY] = json!(h);
        }
        if let Some(b) = bound {
            dataplane[BOUND_KEY] = json!(b);
        }
        json!({ "dataplane": dataplane })
    }

    #[test]
    fn absent_key_is_reported_as_not_checked() {
        let after = doc(None, None);
        assert_eq!(
            judge(&sampled(&[doc(None, None), after.clone()]), &after),
            Ok(None)
        );
    }

    #[test]
    fn peak_within_bound_and_zero_after_holds() {
        let after = doc(Some(0), Some(100));
        let s = sampled(&[
            doc(Some(40), Some(100)),
            doc(Some(100), Some(100)),
            after.clone(),
        ]);
        assert_eq!(judge(&s, &after), Ok(Some(100)));
    }

    #[test]
    fn over_the_bound_missing_bound_or_left_over_fails() {
        let after = doc(Some(0), Some(100));
        assert!(
            judge(
                &sampled(&[doc(Some(101), Some(100)), after.clone()]),
                &after
            )
            .is_err()
        );
        let no_bound = doc(Some(0), None);
        assert!(judge(&sampled(&[doc(Some(5), None), no_bound.clone()]), &no_bound).is_err());
        let left = doc(Some(7), Some(100));
        assert!(judge(&sampled(&[doc(Some(5), Some(100)), left.clone()]), &left).is_err());
    }
}
