//! What `/proc` and the C library say about CPU time, memory and processes.

use anyhow::{Context, bail};
use std::collections::{HashMap, VecDeque};

/// Busy ticks of the whole machine: user + nice + system + irq + softirq from `/proc/stat`.
/// Softirq matters: a spliced flow is forwarded there, outside any process's own accounting.
pub fn machine_cpu_ticks() -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let line = stat.lines().next().context("empty /proc/stat")?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq ...
    if fields.len() < 7 {
        bail!("unexpected /proc/stat line {line:?}");
    }
    Ok(fields[0] + fields[1] + fields[2] + fields[5] + fields[6])
}

/// The fields of `/proc/PID/stat` after the command name (which may hold spaces), so index 0
/// is the state, 1 the ppid, 11 utime, 12 stime and 19 the start time.
fn proc_stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// Start time of a process in ticks since boot, which tells a process from a later one that
/// got the same pid; `None` once it is gone or a zombie.
pub fn start_time(pid: u32) -> Option<u64> {
    let f = proc_stat_fields(pid)?;
    if f.first()? == "Z" {
        return None;
    }
    f.get(19)?.parse().ok()
}

/// `pid` and all its descendants (an nginx master and its workers), found through the ppid
/// of every process in `/proc`.
pub fn process_tree(pid: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(p) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
                continue;
            };
            if let Some(ppid) = proc_stat_fields(p).and_then(|f| f.get(1)?.parse().ok()) {
                children.entry(ppid).or_default().push(p);
            }
        }
    }
    let mut tree = vec![pid];
    let mut queue = VecDeque::from([pid]);
    while let Some(p) = queue.pop_front() {
        for &c in children.get(&p).into_iter().flatten() {
            tree.push(c);
            queue.push_back(c);
        }
    }
    tree
}

/// utime + stime of the given processes, in ticks; `None` without processes or when one is
/// gone (a measurement across a crash is no measurement).
pub fn process_cpu_ticks(pids: &[u32]) -> Option<u64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().try_fold(0u64, |sum, &pid| {
        let f = proc_stat_fields(pid)?;
        Some(sum + f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
    })
}

/// Sum of VmRSS of the given processes, in KiB.
pub fn rss_kib(pids: &[u32]) -> Option<u64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().try_fold(0u64, |sum, &pid| {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse::<u64>()
            .ok()?;
        Some(sum + kib)
    })
}

/// USER_HZ, the unit of `/proc` CPU times.
pub fn user_hz() -> f64 {
    // SAFETY: sysconf reads a constant of the C library; no pointers, no shared state.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 { hz as f64 } else { 100.0 }
}

/// The 1-minute load average, to show in the report how busy the machine was.
pub fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Raises this process's open-file limit (soft and, as root, hard) towards `want`, because it
/// holds both ends of every held connection: client and echo broker. Returns the soft limit
/// now in force.
pub fn raise_open_files(want: u64) -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid, writable rlimit for the call to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return 1024;
    }
    if limit.rlim_cur >= want {
        return limit.rlim_cur;
    }
    // Root may raise the hard limit too; otherwise stay under it.
    let raised = libc::rlimit {
        rlim_cur: want,
        rlim_max: want.max(limit.rlim_max),
    };
    // SAFETY: `raised` is a valid rlimit that the call only reads.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
        return want;
    }
    let capped = libc::rlimit {
        rlim_cur: limit.rlim_max,
        rlim_max: limit.rlim_max,
    };
    // SAFETY: as above; the soft limit only rises to the existing hard limit.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &capped) } == 0 {
        return limit.rlim_max;
    }
    limit.rlim_cur
}

/// Sends `signal` to one process.
pub fn signal(pid: u32, signal: libc::c_int) {
    // SAFETY: kill(2) takes plain integers; callers only pass pids they started and checked
    // (by start time) to be still the same process.
    unsafe {
        libc::kill(pid as libc::pid_t, signal);
    }
}
