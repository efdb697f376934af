//! The built `mqsplice` binary as a child process, for checks of the daemon itself
//! (exit codes, its own descriptors and memory, its logs).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A running `mqsplice run` with its config file and everything it wrote to stderr.
pub struct Daemon {
    pub child: Child,
    pub listen: SocketAddr,
    pub stats: SocketAddr,
    pub config_path: PathBuf,
    stderr: Arc<Mutex<String>>,
}

/// Writes `text` to a fresh temporary file and returns its path.
pub fn write_config(text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "mqsplice-test-{}-{}",
        std::process::id(),
        crate::free_port()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("mqsplice.toml");
    std::fs::write(&path, text).unwrap();
    path
}

impl Daemon {
    /// Starts `MQSPLICE_BIN run --config` with `text` and waits until it serves stats (bound
    /// after every listener, so probing it leaves no stray connection on the MQTT port).
    pub fn start(text: &str, listen: SocketAddr, stats: SocketAddr) -> Daemon {
        let config_path = write_config(text);
        // For debugging a failing test: `MQSPLICE_TEST_LOG=mqsplice=debug` raises the daemon's
        // log level and copies its stderr to /tmp/mqsplice-test-daemon-<pid>.log.
        let log_level = std::env::var("MQSPLICE_TEST_LOG").ok();
        let mut child = Command::new(crate::proxy::binary())
            .args(["run", "--log-level", log_level.as_deref().unwrap_or("info")])
            .args(["--config"])
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn mqsplice");
        let stderr = Arc::new(Mutex::new(String::new()));
        let pipe = child.stderr.take().unwrap();
        let sink = stderr.clone();
        let mut copy = log_level.and_then(|_| {
            std::fs::File::create(format!("/tmp/mqsplice-test-daemon-{}.log", child.id())).ok()
        });
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                if let Some(file) = &mut copy {
                    use std::io::Write;
                    let _ = writeln!(file, "{line}");
                }
                let mut all = sink.lock().unwrap();
                all.push_str(&line);
                all.push('\n');
            }
        });
        crate::broker::wait_for_port(stats, Duration::from_secs(20));
        Daemon {
            child,
            listen,
            stats,
            config_path,
            stderr,
        }
    }

    /// Everything the daemon wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// The number of open descriptors of the daemon process.
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .unwrap()
            .count()
    }

    /// CPU time the daemon has used so far, all threads, in nanoseconds (from each thread's
    /// `schedstat`, far finer than the 10 ms ticks of `/proc/<pid>/stat`).
    pub fn cpu_ns(&self) -> u64 {
        let tasks = format!("/proc/{}/task", self.child.id());
        std::fs::read_dir(tasks)
            .unwrap()
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok())
            .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
            .sum()
    }

    /// Sends SIGKILL: no destructor runs, as in a crash.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Resident memory of the daemon process, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    /// Sends signal `name` (`"HUP"`, `"TERM"`) through `kill(1)`, so the tests need no
    /// `unsafe`; true when it was delivered.
    pub fn signal(&self, name: &str) -> bool {
        Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Sends SIGTERM: the graceful stop that removes the daemon's pins.
    pub fn signal_term(&self) {
        self.signal("TERM");
    }

    /// Sends SIGTERM and returns the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        self.signal_term();
        for _ in 0..100 {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        panic!("mqsplice did not exit within 5 s of SIGTERM");
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
