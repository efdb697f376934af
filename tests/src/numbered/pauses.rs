//! A reader that stops and resumes at seeded random moments: each stop long enough for the data
//! path to notice (the sockmap path throttles a direction held over its limit for 20 ms), short
//! enough that a flow throttles and resumes many times, and the same moments on every run.

use crate::flows::Rng;
use std::time::Duration;

/// When and how long a reader pauses: after every `every` bytes (log-uniform in the range) it
/// sleeps for a time log-uniform in `length`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pauses {
    pub seed: u64,
    pub every: (u64, u64),
    pub length: (Duration, Duration),
}

impl Pauses {
    /// A client that stops reading now and then: every 512 KiB–4 MiB, for 30–300 ms.
    pub fn client(seed: u64) -> Pauses {
        Pauses {
            seed,
            every: (512 * 1024, 4 * 1024 * 1024),
            length: (Duration::from_millis(30), Duration::from_millis(300)),
        }
    }

    /// A broker that reads slowly: every 64–512 KiB it sleeps 5–50 ms (about 10 MB/s).
    pub fn slow_broker(seed: u64) -> Pauses {
        Pauses {
            seed,
            every: (64 * 1024, 512 * 1024),
            length: (Duration::from_millis(5), Duration::from_millis(50)),
        }
    }
}

/// The running schedule of one reader.
pub struct Schedule {
    pauses: Pauses,
    rng: Rng,
    until_next: u64,
    /// Pauses taken so far.
    pub taken: u64,
}

impl Schedule {
    pub fn new(pauses: Pauses) -> Schedule {
        let mut rng = Rng::new(pauses.seed);
        let until_next = rng.log_uniform(pauses.every.0, pauses.every.1);
        Schedule {
            pauses,
            rng,
            until_next,
            taken: 0,
        }
    }

    /// Counts `n` bytes read; returns how long to pause now, if at all.
    pub fn after_read(&mut self, n: u64) -> Option<Duration> {
        if n < self.until_next {
            self.until_next -= n;
            return None;
        }
        let (every, (short, long)) = (self.pauses.every, self.pauses.length);
        self.until_next = self.rng.log_uniform(every.0, every.1);
        self.taken += 1;
        let micros = self
            .rng
            .log_uniform(short.as_micros() as u64, long.as_micros() as u64);
        Some(Duration::from_micros(micros))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_16_mib_read_pauses_several_times_the_same_way_every_run() {
        let run = || {
            let mut s = Schedule::new(Pauses::client(5));
            (0..256)
                .filter_map(|_| s.after_read(64 * 1024))
                .collect::<Vec<_>>()
        };
        let pauses = run();
        assert!(pauses.len() >= 4, "{pauses:?}");
        assert!(
            pauses
                .iter()
                .all(|p| (Duration::from_millis(30)..=Duration::from_millis(300)).contains(p))
        );
        assert_eq!(pauses, run());
    }
}
