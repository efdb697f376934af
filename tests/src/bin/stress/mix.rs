//! One data path's load, cycle after cycle until its deadline: a bulk flow beside parallel
//! flows, then pausing readers beside a slowly reading broker, then paho-style disconnects beside
//! a client reconnecting with the same id. Every flow is numbered and judged (`numbered`); after
//! each cycle the daemon must settle (nothing held) within `close_drain_timeout` and a margin.

use mqsplice_tests::flows::{MIB, flow_backend};
use mqsplice_tests::numbered::client::{FlowSpec, paho_disconnect, run_flow, run_flows};
use mqsplice_tests::numbered::pauses::Pauses;
use mqsplice_tests::numbered::summary::Summary;
use mqsplice_tests::numbered::upstream::{await_disconnect, echo};
use mqsplice_tests::settle::settled;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// Flow indices (the 5-digit client ids) carry the broker's role: `kind * 10_000 + n`.
const SLOW_BROKER: usize = 4;
const DISCONNECT: usize = 5;

/// What one path has done so far; read by the per-minute report while the mix runs.
#[derive(Default)]
pub struct Tally {
    pub flows: Mutex<Summary>,
    pub paho: AtomicU64,
    /// Paho-style clients whose DISCONNECT did not reach the broker.
    pub paho_lost: AtomicU64,
    pub cycles: AtomicU64,
    /// Cycles after which the daemon still held something 5 s later (a paho-style pair held
    /// until `close_drain_timeout`, say), and 35 s later; the last such report.
    pub slow_to_settle: AtomicU64,
    pub unsettled: AtomicU64,
    pub last_unsettled: Mutex<Option<String>>,
}

impl Tally {
    fn add(&self, reports: &[mqsplice_tests::numbered::client::FlowReport]) {
        let mut flows = self.flows.lock().unwrap();
        for r in reports {
            flows.add(r);
        }
    }
}

/// The broker stand-in for every role, chosen by flow index.
pub fn backend(tally: Arc<Tally>) -> SocketAddr {
    flow_backend(move |i, s| match i / 10_000 {
        SLOW_BROKER => echo(s, Some(Pauses::slow_broker(i as u64))),
        DISCONNECT => {
            if !await_disconnect(s) {
                tally.paho_lost.fetch_add(1, Relaxed);
            }
        }
        _ => echo(s, None),
    })
}

/// Runs cycles against the daemon at `listen` until `until`.
pub fn run(listen: SocketAddr, stats: SocketAddr, until: Instant, tally: &Tally) {
    let mut cycle = 0usize;
    while Instant::now() < until {
        // Flows get the time left plus a grace, so the run ends soon after its deadline.
        let deadline = until.saturating_duration_since(Instant::now()) + Duration::from_secs(30);
        let spec = |index: usize, len: u64| FlowSpec {
            deadline,
            ..FlowSpec::new(index, len)
        };
        let n = |k: usize| (cycle * 100 + k) % 10_000;

        // Bulk beside parallel flows.
        let bulk = {
            let s = spec(n(0), 128 * MIB);
            thread::spawn(move || run_flow(listen, s))
        };
        let parallel: Vec<_> = (1..=20).map(|k| spec(10_000 + n(k), 16 * MIB)).collect();
        tally.add(&run_flows(listen, &parallel));
        tally.add(&[bulk.join().expect("bulk flow")]);

        // Pausing readers beside a slow broker.
        let mut mixed: Vec<_> = (0..8)
            .map(|k| FlowSpec {
                pauses: Some(Pauses::client(n(k) as u64 + 7)),
                ..spec(20_000 + n(k), 32 * MIB)
            })
            .collect();
        mixed.extend((0..8).map(|k| spec(SLOW_BROKER * 10_000 + n(k), 16 * MIB)));
        tally.add(&run_flows(listen, &mixed));

        // Paho-style disconnects beside a client reconnecting with one id.
        let paho: Vec<_> = (0..50)
            .map(|k| {
                let index = DISCONNECT * 10_000 + n(k);
                thread::spawn(move || paho_disconnect(listen, index))
            })
            .collect();
        for _ in 0..5 {
            tally.add(&[run_flow(listen, spec(30_000 + n(0), MIB))]);
        }
        for p in paho {
            match p.join().expect("paho client") {
                Ok(()) => tally.paho.fetch_add(1, Relaxed),
                Err(_) => tally.paho_lost.fetch_add(1, Relaxed),
            };
        }

        // Every pair of the cycle has ended: the daemon should let go at once. 30 s is the
        // default close_drain_timeout: a pair held longer than that is a leak.
        if let Err(e) = settled(stats, Duration::from_secs(5)) {
            tally.slow_to_settle.fetch_add(1, Relaxed);
            let e = match settled(stats, Duration::from_secs(30)) {
                Ok(took) => format!("{e}\n(settled {took:?} later)"),
                Err(e) => {
                    tally.unsettled.fetch_add(1, Relaxed);
                    e
                }
            };
            *tally.last_unsettled.lock().unwrap() = Some(e);
        }
        tally.cycles.fetch_add(1, Relaxed);
        cycle += 1;
    }
}
