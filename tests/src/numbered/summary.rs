//! Outcomes added up: the counts a test asserts on and the stress tool prints, with the first
//! few failures spelled out (offset, replay distance, how far a hung flow got).

use super::client::{FlowReport, Outcome};
use std::fmt;

/// How many failures are spelled out.
const SHOWN: usize = 8;

/// Counts of flow outcomes, and the first failures.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub flows: u64,
    pub ok: u64,
    pub corrupt: u64,
    pub short: u64,
    pub hung: u64,
    /// Bytes that came back right, over all flows.
    pub bytes: u64,
    /// Reader pauses over all flows.
    pub pauses: u64,
    pub failures: Vec<String>,
}

impl Summary {
    pub fn of(reports: &[FlowReport]) -> Summary {
        let mut s = Summary::default();
        for r in reports {
            s.add(r);
        }
        s
    }

    /// Counts one flow.
    pub fn add(&mut self, r: &FlowReport) {
        self.flows += 1;
        self.pauses += r.pauses;
        match &r.outcome {
            Outcome::Ok => {
                self.ok += 1;
                self.bytes += r.len;
                return;
            }
            Outcome::Corrupt(m) => {
                self.corrupt += 1;
                self.bytes += m.offset;
            }
            Outcome::Short { received, .. } => {
                self.short += 1;
                self.bytes += received;
            }
            Outcome::Hung { received, .. } => {
                self.hung += 1;
                self.bytes += received;
            }
            Outcome::Failed(_) => self.short += 1,
        }
        if self.failures.len() < SHOWN {
            self.failures.push(describe(r));
        }
    }

    /// Adds another summary's counts.
    pub fn merge(&mut self, other: &Summary) {
        self.flows += other.flows;
        self.ok += other.ok;
        self.corrupt += other.corrupt;
        self.short += other.short;
        self.hung += other.hung;
        self.bytes += other.bytes;
        self.pauses += other.pauses;
        let room = SHOWN.saturating_sub(self.failures.len());
        self.failures
            .extend(other.failures.iter().take(room).cloned());
    }

    /// Every flow came back whole.
    pub fn clean(&self) -> bool {
        self.ok == self.flows
    }
}

/// One failed flow in a line.
pub fn describe(r: &FlowReport) -> String {
    let what = match &r.outcome {
        Outcome::Ok => "ok".to_string(),
        Outcome::Corrupt(m) => format!("corrupt {m}"),
        Outcome::Short { received, end } => {
            format!("short: {received} of {} bytes, then {end:?}", r.len)
        }
        Outcome::Hung { sent, received } => {
            format!("hung: {sent} sent, {received} back of {}", r.len)
        }
        Outcome::Failed(e) => format!("failed: {e}"),
    };
    format!(
        "flow {} ({} MiB, {} pauses, {:.1}s): {what}",
        r.index,
        r.len >> 20,
        r.pauses,
        r.elapsed.as_secs_f64()
    )
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} flows: {} ok, {} corrupt, {} short, {} hung; {} MiB back right, {} reader pauses",
            self.flows,
            self.ok,
            self.corrupt,
            self.short,
            self.hung,
            self.bytes >> 20,
            self.pauses
        )?;
        for line in &self.failures {
            write!(f, "\n  {line}")?;
        }
        Ok(())
    }
}
