//! `cargo xtask stress --minutes N [--mode userspace|sockmap|both]`: the numbered-byte mix of the
//! integrity suite, run continuously for N minutes on each data path (one daemon per path,
//! default configuration apart from the mode), one line per minute per path, a summary at the
//! end, and a non-zero exit if any flow was corrupted, hung or cut short, a paho-style DISCONNECT
//! was lost, or the daemon did not settle after a cycle. See docs/stress.md.

mod mix;
mod report;

use anyhow::{Context, bail};
use mix::Tally;
use mqsplice_tests::Mode;
use mqsplice_tests::flows::Graceful;
use mqsplice_tests::setup::Setup;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::thread;
use std::time::{Duration, Instant};

struct Args {
    minutes: u64,
    modes: Vec<Mode>,
}

fn parse() -> anyhow::Result<Args> {
    let mut args = Args {
        minutes: 1,
        modes: Mode::ALL.to_vec(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--minutes" => args.minutes = value()?.parse().context("--minutes")?,
            "--mode" => {
                args.modes = match value()?.as_str() {
                    "userspace" => vec![Mode::Userspace],
                    "sockmap" => vec![Mode::Sockmap],
                    "both" => Mode::ALL.to_vec(),
                    other => bail!("--mode {other}: expected userspace, sockmap or both"),
                }
            }
            other => bail!("unknown argument {other} (--minutes N, --mode userspace|sockmap|both)"),
        }
    }
    if args.minutes == 0 {
        bail!("--minutes must be at least 1");
    }
    Ok(args)
}

/// One path under load: its daemon and what it has done.
struct Run {
    mode: Mode,
    daemon: Graceful,
    tally: Arc<Tally>,
    worker: Option<thread::JoinHandle<()>>,
}

fn main() -> anyhow::Result<()> {
    let args = parse()?;
    let started = Instant::now();
    let until = started + Duration::from_secs(args.minutes * 60);
    let mut runs = Vec::new();
    for &mode in &args.modes {
        if !mode.runnable() {
            if args.modes.len() == 1 {
                bail!("the {} path needs root", mode.config_value());
            }
            continue;
        }
        let tally = Arc::new(Tally::default());
        let broker = mix::backend(tally.clone());
        let daemon = Setup::tcp(mode, &[broker]).spawn_graceful();
        let (listen, stats) = (daemon.listen, daemon.stats);
        let worker = {
            let tally = tally.clone();
            thread::spawn(move || mix::run(listen, stats, until, &tally))
        };
        println!(
            "{}: daemon pid {} on {listen}, stats {stats}",
            mode.config_value(),
            daemon.child.id()
        );
        runs.push(Run {
            mode,
            daemon,
            tally,
            worker: Some(worker),
        });
    }

    let mut minute = 0;
    while runs
        .iter()
        .any(|r| r.worker.as_ref().is_some_and(|w| !w.is_finished()))
    {
        thread::sleep(Duration::from_millis(200));
        let due = started.elapsed().as_secs() / 60;
        if due > minute {
            minute = due;
            for r in &runs {
                println!(
                    "{}",
                    report::line(r.mode.config_value(), minute, &r.daemon, &r.tally)
                );
            }
        }
    }

    println!(
        "\nsummary after {:.1} min:",
        started.elapsed().as_secs_f64() / 60.0
    );
    let mut failed = false;
    for r in &mut runs {
        r.worker.take().unwrap().join().expect("mix thread");
        let path = r.mode.config_value();
        println!("{}", report::line(path, minute, &r.daemon, &r.tally));
        let flows = r.tally.flows.lock().unwrap().clone();
        println!("{path}: {flows}");
        if let Some(e) = r.tally.last_unsettled.lock().unwrap().as_ref() {
            println!("{path}: last cycle slow to settle: {e}");
        }
        failed |= !flows.clean()
            || r.tally.paho_lost.load(Relaxed) > 0
            || r.tally.slow_to_settle.load(Relaxed) > 0;
    }
    // Stops the daemons (SIGTERM) before exiting: `process::exit` runs no destructors.
    drop(runs);
    if failed {
        eprintln!(
            "FAILED: flows corrupted, hung or cut short, DISCONNECTs lost, or the daemon slow to \
             settle (see above)"
        );
        std::process::exit(1);
    }
    println!("every flow came back whole");
    Ok(())
}
