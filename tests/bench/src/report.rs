//! The figures of every round, their medians and spread, the project's targets, and the two
//! forms they are reported in: markdown tables on stdout and JSON.

use crate::load::{LATENCY_PUBLISH, Throughput};
use crate::paths::PathKind;
use serde_json::{Map, Value, json};
use std::collections::HashMap;

/// Every figure of one path in one round; proxy figures are `None` for `direct`. `duplex` is
/// the full-speed full-duplex stream (no window); of the bytes the splice carried in it (both
/// ways), `duplex_daemon_share` is the share its daemon copied because a direction was
/// throttled, and `duplex_copies_resumed` the throttled copies its progress check moved on
/// (wake-ups the kernel did not deliver), both `None` off the splice. `conns_held` is the
/// connections actually held in the memory phase; `splice` the eBPF daemon's `dataplane` stats at
/// the end of the round (splice counters).
#[derive(Debug, Clone)]
pub struct Sample {
    pub(crate) round: usize,
    pub(crate) p50_us: f64,
    pub(crate) p99_us: f64,
    pub(crate) small: Throughput,
    pub(crate) bulk: Throughput,
    pub(crate) duplex: Throughput,
    pub(crate) duplex_daemon_share: Option<f64>,
    pub(crate) duplex_copies_resumed: Option<u64>,
    pub(crate) conns_held: Option<usize>,
    pub(crate) rss_before_kib: Option<u64>,
    pub(crate) rss_bytes_per_conn: Option<f64>,
    pub(crate) splice: Option<Value>,
}

/// A reported metric: JSON key, table header, getter.
type Metric = (&'static str, &'static str, fn(&Sample) -> Option<f64>);

/// Table and JSON columns, one definition so that the two never disagree.
const METRICS: [Metric; 15] = [
    ("p50_us", "p50 µs", |s| Some(s.p50_us)),
    ("p99_us", "p99 µs", |s| Some(s.p99_us)),
    ("small_msgs_per_s", "64 B msg/s", |s| {
        Some(s.small.msgs_per_s)
    }),
    ("small_mb_per_s", "64 B MB/s", |s| Some(s.small.mb_per_s)),
    ("small_machine_cpu_s_per_gb", "64 B machine CPU s/GB", |s| {
        Some(s.small.machine_cpu_s_per_gb)
    }),
    ("small_proxy_cpu_s_per_gb", "64 B proxy CPU s/GB", |s| {
        s.small.proxy_cpu_s_per_gb
    }),
    ("bulk_msgs_per_s", "1 KiB msg/s", |s| {
        Some(s.bulk.msgs_per_s)
    }),
    ("bulk_mb_per_s", "1 KiB MB/s", |s| Some(s.bulk.mb_per_s)),
    ("bulk_machine_cpu_s_per_gb", "1 KiB machine CPU s/GB", |s| {
        Some(s.bulk.machine_cpu_s_per_gb)
    }),
    ("bulk_proxy_cpu_s_per_gb", "1 KiB proxy CPU s/GB", |s| {
        s.bulk.proxy_cpu_s_per_gb
    }),
    ("duplex_mb_per_s", "duplex MB/s", |s| {
        Some(s.duplex.mb_per_s)
    }),
    (
        "duplex_machine_cpu_s_per_gb",
        "duplex machine CPU s/GB",
        |s| Some(s.duplex.machine_cpu_s_per_gb),
    ),
    ("duplex_proxy_cpu_s_per_gb", "duplex proxy CPU s/GB", |s| {
        s.duplex.proxy_cpu_s_per_gb
    }),
    (
        "duplex_daemon_share",
        "duplex share copied by the daemon",
        |s| s.duplex_daemon_share,
    ),
    ("rss_bytes_per_conn", "proxy RSS B/conn", |s| {
        s.rss_bytes_per_conn
    }),
];

/// The value of metric `key` in `sample`.
fn metric(sample: &Sample, key: &str) -> Option<f64> {
    METRICS
        .iter()
        .find(|m| m.0 == key)
        .and_then(|m| (m.2)(sample))
}

/// How a target's value is judged.
#[derive(Clone, Copy)]
enum Goal {
    AtMost(f64),
    AtLeast(f64),
}

impl Goal {
    fn met(self, v: f64) -> bool {
        match self {
            Goal::AtMost(g) => v <= g,
            Goal::AtLeast(g) => v >= g,
        }
    }

    fn text(self) -> String {
        match self {
            Goal::AtMost(g) => format!("≤ {g}"),
            Goal::AtLeast(g) => format!("≥ {g}"),
        }
    }
}

/// Looks a metric up for a path (by name): from the medians, or from one round.
type Lookup<'a> = dyn Fn(&str, &str) -> Option<f64> + 'a;

/// A target of the project: name, JSON key, goal, and how to compute it from a lookup.
type Target = (&'static str, &'static str, Goal, fn(&Lookup) -> Option<f64>);

/// The targets of the splice issue, all from the same run.
const TARGETS: [Target; 6] = [
    (
        "sockmap p50 / nginx p50",
        "p50_vs_nginx",
        Goal::AtMost(1.1),
        |get| Some(get("mqsplice-sockmap", "p50_us")? / get("nginx", "p50_us")?),
    ),
    (
        "sockmap 1 KiB MB/s / nginx",
        "bulk_vs_nginx",
        Goal::AtLeast(1.2),
        |get| Some(get("mqsplice-sockmap", "bulk_mb_per_s")? / get("nginx", "bulk_mb_per_s")?),
    ),
    (
        "(sockmap − direct) / (nginx − direct) machine CPU s/GB, 1 KiB",
        "cpu_over_direct_vs_nginx",
        Goal::AtMost(0.5),
        |get| {
            let key = "bulk_machine_cpu_s_per_gb";
            let direct = get("direct", key)?;
            let nginx = get("nginx", key)? - direct;
            (nginx > 0.0).then_some((get("mqsplice-sockmap", key)? - direct) / nginx)
        },
    ),
    (
        "sockmap full-duplex MB/s / nginx",
        "duplex_vs_nginx",
        Goal::AtLeast(1.2),
        |get| Some(get("mqsplice-sockmap", "duplex_mb_per_s")? / get("nginx", "duplex_mb_per_s")?),
    ),
    (
        "(sockmap − direct) / (nginx − direct) machine CPU s/GB, full duplex",
        "duplex_cpu_over_direct_vs_nginx",
        Goal::AtMost(0.5),
        |get| {
            let key = "duplex_machine_cpu_s_per_gb";
            let direct = get("direct", key)?;
            let nginx = get("nginx", key)? - direct;
            (nginx > 0.0).then_some((get("mqsplice-sockmap", key)? - direct) / nginx)
        },
    ),
    (
        "sockmap RSS per spliced connection, bytes",
        "rss_per_spliced_conn",
        Goal::AtMost(1000.0),
        |get| get("mqsplice-sockmap", "rss_bytes_per_conn"),
    ),
];

/// Median of the values (mean of the middle two for an even count).
fn median(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    })
}

/// (min, max) of the values.
fn range(values: &[f64]) -> Option<(f64, f64)> {
    let min = values.iter().copied().reduce(f64::min)?;
    let max = values.iter().copied().reduce(f64::max)?;
    Some((min, max))
}

/// A number for the table: few digits for large values, more for small ones.
pub fn fmt_value(v: Option<f64>) -> String {
    match v {
        None => "–".into(),
        Some(v) if v.abs() >= 100.0 => format!("{v:.0}"),
        Some(v) if v.abs() >= 10.0 => format!("{v:.1}"),
        Some(v) if v.abs() >= 0.1 => format!("{v:.2}"),
        Some(v) => format!("{v:.4}"),
    }
}

/// `value / base`, when both exist and the base is not zero.
fn ratio(value: Option<f64>, base: Option<f64>) -> Option<f64> {
    match (value, base) {
        (Some(v), Some(b)) if b != 0.0 => Some(v / b),
        _ => None,
    }
}

/// A markdown table: header cells, then rows of cells.
fn table(out: &mut String, header: &[&str], rows: &[Vec<String>]) {
    out.push_str(&format!("| {} |\n", header.join(" | ")));
    out.push_str(&format!("|---|{}\n", "---:|".repeat(header.len() - 1)));
    for row in rows {
        out.push_str(&format!("| {} |\n", row.join(" | ")));
    }
}

/// What the whole run produced.
pub struct Results {
    pub order: Vec<PathKind>,
    pub samples: HashMap<&'static str, Vec<Sample>>,
    /// Paths left out of the whole run, with the reason.
    pub skipped: Vec<(String, String)>,
    /// Rounds of a path that failed, with the error.
    pub failures: Vec<(String, usize, String)>,
    /// Things to know when reading the numbers (limits hit, machine load).
    pub notes: Vec<String>,
}

/// One evaluated target.
struct Evaluated {
    name: &'static str,
    key: &'static str,
    goal: Goal,
    value: Option<f64>,
    per_round: Option<(f64, f64)>,
}

impl Results {
    /// Median of each metric of each path.
    fn medians(&self) -> HashMap<&'static str, HashMap<&'static str, Option<f64>>> {
        self.order
            .iter()
            .map(|k| {
                let samples = &self.samples[k.name()];
                let m = METRICS
                    .iter()
                    .map(|(key, _, get)| (*key, median(samples.iter().filter_map(get).collect())))
                    .collect();
                (k.name(), m)
            })
            .collect()
    }

    /// Every target from the medians, and its range over the rounds in which every path it
    /// needs was measured (rounds interleave the paths, so these are paired comparisons).
    fn targets(&self) -> Vec<Evaluated> {
        let med = self.medians();
        let from_medians = |path: &str, key: &str| -> Option<f64> { *med.get(path)?.get(key)? };
        let rounds: Vec<usize> = {
            let mut r: Vec<usize> = self.samples.values().flatten().map(|s| s.round).collect();
            r.sort_unstable();
            r.dedup();
            r
        };
        TARGETS
            .iter()
            .map(|&(name, key, goal, compute)| {
                let per_round: Vec<f64> = rounds
                    .iter()
                    .filter_map(|&round| {
                        let get = |path: &str, metric_key: &str| -> Option<f64> {
                            let s = self.samples.get(path)?.iter().find(|s| s.round == round)?;
                            metric(s, metric_key)
                        };
                        compute(&get)
                    })
                    .collect();
                Evaluated {
                    name,
                    key,
                    goal,
                    value: compute(&from_medians),
                    per_round: range(&per_round),
                }
            })
            .collect()
    }

    /// The markdown report.
    pub fn markdown(&self, params: &Value) -> String {
        let mut out = String::new();
        let med = self.medians();
        let rounds = params["rounds"].as_u64().unwrap_or(0);
        out.push_str(&format!(
            "### Medians over {rounds} round(s): {} round trips of a {LATENCY_PUBLISH}-byte \
             PUBLISH; windowed streams (window {}) of 64 B and of 1 KiB payloads, {} ms each; {} \
             held connections\n\n",
            params["round_trips"], params["window"], params["stream_ms"], params["conns"],
        ));
        let mut header = vec!["path"];
        header.extend(METRICS.iter().map(|m| m.1));
        let rows: Vec<Vec<String>> = self
            .order
            .iter()
            .map(|k| {
                let mut row = vec![k.name().to_string()];
                row.extend(METRICS.iter().map(|m| fmt_value(med[k.name()][m.0])));
                row
            })
            .collect();
        table(&mut out, &header, &rows);

        out.push_str("\n### Spread over rounds (min – max)\n\n");
        let rows: Vec<Vec<String>> = self
            .order
            .iter()
            .map(|k| {
                let mut row = vec![k.name().to_string()];
                row.extend(METRICS.iter().map(|m| {
                    let values: Vec<f64> = self.samples[k.name()].iter().filter_map(m.2).collect();
                    match range(&values) {
                        Some((lo, hi)) => {
                            format!("{} – {}", fmt_value(Some(lo)), fmt_value(Some(hi)))
                        }
                        None => fmt_value(None),
                    }
                }));
                row
            })
            .collect();
        table(&mut out, &header, &rows);

        for base in ["direct", "nginx"] {
            let Some(b) = med.get(base) else { continue };
            out.push_str(&format!(
                "\n### Ratios of medians against {base} (×; higher is better only for msg/s and MB/s)\n\n"
            ));
            let rows: Vec<Vec<String>> = self
                .order
                .iter()
                .map(|k| {
                    let m = &med[k.name()];
                    let mut row = vec![k.name().to_string()];
                    row.extend(METRICS.iter().map(|x| fmt_value(ratio(m[x.0], b[x.0]))));
                    row
                })
                .collect();
            table(&mut out, &header, &rows);
        }

        out.push_str("\n### Targets (same run; value from the medians, range from each round's paired figures)\n\n");
        let rows: Vec<Vec<String>> = self
            .targets()
            .iter()
            .map(|t| {
                vec![
                    t.name.to_string(),
                    fmt_value(t.value),
                    t.per_round
                        .map(|(lo, hi)| {
                            format!("{} – {}", fmt_value(Some(lo)), fmt_value(Some(hi)))
                        })
                        .unwrap_or_else(|| fmt_value(None)),
                    t.goal.text(),
                    match t.value {
                        Some(v) if t.goal.met(v) => "PASS".into(),
                        Some(_) => "MISS".into(),
                        None => "n/a (a path it needs did not run)".into(),
                    },
                ]
            })
            .collect();
        table(
            &mut out,
            &["target", "value", "per round", "goal", "verdict"],
            &rows,
        );

        out.push_str(
            "\nmsg/s and MB/s count each echoed PUBLISH once (headers included; it makes the full \
             round trip client → proxy → broker → proxy → client). Machine CPU: /proc/stat \
             user+nice+system+irq+softirq over the stream phase — load generator, echo broker, \
             proxy, the kernel's softirq and kworker share of a splice, and anything else running \
             on the machine. Proxy CPU and RSS: every process of the proxy (nginx master and \
             workers). RSS B/conn: proxy VmRSS growth from no client connection to the held \
             ones, divided by their number.\n",
        );
        for note in &self.notes {
            out.push_str(&format!("\nNote: {note}\n"));
        }
        for (name, why) in &self.skipped {
            out.push_str(&format!("\nSkipped {name}: {why}\n"));
        }
        for (name, round, why) in &self.failures {
            out.push_str(&format!("\nFAILED {name}, round {round}: {why}\n"));
        }
        out
    }

    /// The JSON report: parameters, every round's figures, medians, spread, ratios, targets.
    pub fn json(&self, params: Value) -> Value {
        let to_map = |m: &HashMap<&str, Option<f64>>| -> Value {
            METRICS
                .iter()
                .map(|(key, ..)| (key.to_string(), json!(m[key])))
                .collect::<Map<_, _>>()
                .into()
        };
        let med = self.medians();
        let paths: Vec<Value> = self
            .order
            .iter()
            .map(|kind| {
                let samples = &self.samples[kind.name()];
                let rounds: Vec<Value> = samples
                    .iter()
                    .map(|s| {
                        let mut v: Map<String, Value> = METRICS
                            .iter()
                            .map(|(key, _, get)| (key.to_string(), json!(get(s))))
                            .collect();
                        v.insert("round".into(), json!(s.round));
                        v.insert("conns_held".into(), json!(s.conns_held));
                        v.insert("rss_before_kib".into(), json!(s.rss_before_kib));
                        v.insert("splice".into(), s.splice.clone().unwrap_or(Value::Null));
                        v.into()
                    })
                    .collect();
                let spread = |pick: fn((f64, f64)) -> f64| -> Value {
                    METRICS
                        .iter()
                        .map(|(key, _, get)| {
                            let values: Vec<f64> = samples.iter().filter_map(get).collect();
                            (key.to_string(), json!(range(&values).map(pick)))
                        })
                        .collect::<Map<_, _>>()
                        .into()
                };
                let ratios = |base: &str| -> Value {
                    match med.get(base) {
                        None => Value::Null,
                        Some(b) => METRICS
                            .iter()
                            .map(|(key, ..)| {
                                (key.to_string(), json!(ratio(med[kind.name()][key], b[key])))
                            })
                            .collect::<Map<_, _>>()
                            .into(),
                    }
                };
                json!({
                    "path": kind.name(),
                    "rounds": rounds,
                    "median": to_map(&med[kind.name()]),
                    "min": spread(|r| r.0),
                    "max": spread(|r| r.1),
                    "vs_direct": ratios("direct"),
                    "vs_nginx": ratios("nginx"),
                })
            })
            .collect();
        let targets: Vec<Value> = self
            .targets()
            .iter()
            .map(|t| {
                json!({
                    "key": t.key,
                    "name": t.name,
                    "goal": t.goal.text(),
                    "value": t.value,
                    "per_round_min": t.per_round.map(|r| r.0),
                    "per_round_max": t.per_round.map(|r| r.1),
                    "verdict": match t.value {
                        Some(v) if t.goal.met(v) => "PASS",
                        Some(_) => "MISS",
                        None => "n/a",
                    },
                })
            })
            .collect();
        json!({
            "params": params,
            "paths": paths,
            "targets": targets,
            "notes": self.notes,
            "skipped": self.skipped.iter().map(|(p, why)| json!({"path": p, "reason": why})).collect::<Vec<_>>(),
            "failures": self.failures.iter().map(|(p, r, why)| json!({"path": p, "round": r, "error": why})).collect::<Vec<_>>(),
        })
    }
}
