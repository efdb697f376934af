//! The paths under test and the proxies behind them: started fresh for every measurement,
//! stopped cleanly (SIGTERM, and for mqsplice a check that it exited 0 and removed its pins).

use crate::broker::EchoBroker;
use crate::procfs::{process_tree, signal, start_time};
use anyhow::{Context, bail};
use mqsplice_tests::free_port;
use serde_json::Value;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Time a proxy gets to start listening.
const START_LIMIT: Duration = Duration::from_secs(15);
/// Time a proxy gets to exit after SIGTERM.
const STOP_LIMIT: Duration = Duration::from_secs(10);

/// One path from the load generator to the echo broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathKind {
    Direct,
    MqspliceSockmap,
    /// The splice with `max_inflight_*` lifted far out of a bulk stream's reach: the kernel's
    /// redirect path alone, the daemon copying nothing (a row beside the defaults, never instead).
    MqspliceSockmapLifted,
    MqspliceUserspace,
    /// The packet splice (in development), on loopback like every path here.
    MqsplicePacket,
    Nginx,
    Haproxy,
}

impl PathKind {
    /// Every path, in table order.
    pub const ALL: [PathKind; 7] = [
        PathKind::Direct,
        PathKind::MqspliceSockmap,
        PathKind::MqspliceSockmapLifted,
        PathKind::MqsplicePacket,
        PathKind::MqspliceUserspace,
        PathKind::Nginx,
        PathKind::Haproxy,
    ];

    /// Name in the table and the JSON.
    pub fn name(self) -> &'static str {
        match self {
            PathKind::Direct => "direct",
            PathKind::MqspliceSockmap => "mqsplice-sockmap",
            PathKind::MqspliceSockmapLifted => "mqsplice-sockmap-lifted",
            PathKind::MqspliceUserspace => "mqsplice-userspace",
            PathKind::MqsplicePacket => "mqsplice-packet",
            PathKind::Nginx => "nginx",
            PathKind::Haproxy => "haproxy",
        }
    }

    /// Whether this path runs the eBPF splice.
    pub fn is_sockmap(self) -> bool {
        matches!(
            self,
            PathKind::MqspliceSockmap | PathKind::MqspliceSockmapLifted
        )
    }
}

/// The programs found on this machine, decided once before the rounds.
pub struct Tools {
    /// The open-file limit the proxies inherit (and cannot go past).
    pub nofile: u64,
    pub mqsplice: PathBuf,
    pub nginx: Option<NginxTool>,
    pub haproxy: Option<PathBuf>,
}

/// The nginx binary and the `load_module` line its stream module needs (empty when built in).
pub struct NginxTool {
    pub binary: PathBuf,
    pub load_module: String,
}

/// Finds `name` in PATH or the sbin directories (which a non-root PATH often lacks).
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// nginx with its stream module, or why it cannot be benchmarked.
pub fn find_nginx() -> Result<NginxTool, String> {
    let binary = find_program("nginx").ok_or("nginx is not installed")?;
    let module = Path::new("/usr/lib/nginx/modules/ngx_stream_module.so");
    if module.is_file() {
        return Ok(NginxTool {
            binary,
            load_module: format!("load_module {};", module.display()),
        });
    }
    // `nginx -V` prints its configure flags on stderr; a static stream module needs no line.
    let flags = Command::new(&binary)
        .arg("-V")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
        .unwrap_or_default();
    if flags.split_whitespace().any(|f| f == "--with-stream") {
        Ok(NginxTool {
            binary,
            load_module: String::new(),
        })
    } else {
        Err("the nginx stream module is not installed (libnginx-mod-stream)".into())
    }
}

/// The bpffs directory prefix of this run's eBPF daemons; each start gets its own directory.
pub fn pin_prefix() -> String {
    format!("/sys/fs/bpf/mqsplice-bench-{}-", std::process::id())
}

/// Removes pin directories of this process that a daemon left behind (after a SIGKILL);
/// returns the ones it found.
pub fn remove_leftover_pins() -> Vec<String> {
    let prefix = pin_prefix();
    let name_prefix = prefix.trim_start_matches("/sys/fs/bpf/").to_string();
    let mut found = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/sys/fs/bpf") {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(&name_prefix) {
                let _ = std::fs::remove_dir_all(entry.path());
                found.push(entry.path().display().to_string());
            }
        }
    }
    found
}

/// A proxy started as a child process, with its temporary directory. Dropping it without
/// [`ChildProxy::stop`] still stops the whole process tree and removes the directory.
pub struct ChildProxy {
    child: Child,
    dir: PathBuf,
    /// Every process seen in the tree, with its start time: if the master dies first, its
    /// workers are re-parented away and only this list still finds them; the start time makes
    /// sure a reused pid is never signalled.
    seen: Mutex<Vec<(u32, u64)>>,
    stopped: bool,
    /// Whether death by the SIGTERM counts as a clean stop (haproxy does not catch it);
    /// mqsplice must catch it and exit 0.
    sigterm_death_ok: bool,
}

impl ChildProxy {
    /// Spawns `command` (output to `dir/output.log`) and waits until `ready` accepts.
    pub fn spawn(
        mut command: Command,
        dir: PathBuf,
        ready: SocketAddr,
        sigterm_death_ok: bool,
    ) -> anyhow::Result<Self> {
        let log = std::fs::File::create(dir.join("output.log"))?;
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawn {command:?}"))?;
        let mut proxy = ChildProxy {
            child,
            dir,
            seen: Mutex::new(Vec::new()),
            stopped: false,
            sigterm_death_ok,
        };
        let deadline = Instant::now() + START_LIMIT;
        loop {
            if let Some(status) = proxy.child.try_wait()? {
                bail!("exited with {status}: {}", proxy.logs().trim());
            }
            if TcpStream::connect_timeout(&ready, Duration::from_millis(200)).is_ok() {
                proxy.tree();
                return Ok(proxy);
            }
            if Instant::now() > deadline {
                bail!(
                    "not listening on {ready} within {START_LIMIT:?}: {}",
                    proxy.logs().trim()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The current process tree, also remembered for cleanup.
    pub fn tree(&self) -> Vec<u32> {
        let tree = process_tree(self.child.id());
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        for &pid in &tree {
            if let Some(start) = start_time(pid)
                && !seen.contains(&(pid, start))
            {
                seen.push((pid, start));
            }
        }
        tree
    }

    /// Everything the proxy wrote to its output and error log, for failure messages.
    fn logs(&self) -> String {
        ["output.log", "error.log"]
            .iter()
            .filter_map(|f| std::fs::read_to_string(self.dir.join(f)).ok())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// SIGTERM to the root and a wait for its exit; an error when it needed more than
    /// [`STOP_LIMIT`] or exited with a failure status.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        self.tree();
        signal(self.child.id(), libc::SIGTERM);
        let deadline = Instant::now() + STOP_LIMIT;
        let status = loop {
            if let Some(status) = self.child.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                bail!("still running {STOP_LIMIT:?} after SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        self.stopped = true;
        let clean =
            status.success() || (self.sigterm_death_ok && status.signal() == Some(libc::SIGTERM));
        if !clean {
            bail!("exited with {status} after SIGTERM: {}", self.logs().trim());
        }
        Ok(())
    }
}

impl Drop for ChildProxy {
    /// Whatever [`ChildProxy::stop`] did not finish: SIGTERM, a grace period, then SIGKILL to
    /// every process of the tree still alive (killing only a master would leave its workers).
    fn drop(&mut self) {
        if !self.stopped {
            let _ = self.stop();
        }
        let seen = std::mem::take(self.seen.get_mut().unwrap_or_else(|e| e.into_inner()));
        for (pid, start) in seen {
            if pid != self.child.id() && start_time(pid) == Some(start) {
                signal(pid, libc::SIGKILL);
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A started path: its own echo broker, where clients connect, and the proxy in between.
/// A fresh broker port per start keeps the TIME_WAIT sockets of 10,000 closed connections
/// from one measurement out of the next one's port space.
pub struct Peer {
    pub kind: PathKind,
    pub listen: SocketAddr,
    pub proxy: Option<ChildProxy>,
    /// mqsplice's stats endpoint.
    pub stats: Option<SocketAddr>,
    /// The eBPF daemon's pin directory.
    pub pin_dir: Option<String>,
    pub _broker: EchoBroker,
}

impl Peer {
    /// The proxy's processes (empty for `direct`).
    pub fn pids(&self) -> Vec<u32> {
        self.proxy.as_ref().map(|p| p.tree()).unwrap_or_default()
    }

    /// mqsplice's `GET /stats`, for the splice counters.
    pub fn stats(&self) -> anyhow::Result<Value> {
        let addr = self.stats.context("no stats endpoint on this path")?;
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.write_all(b"GET /stats HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")?;
        let mut response = Vec::new();
        s.read_to_end(&mut response)?;
        let text = String::from_utf8_lossy(&response);
        let body = text.split_once("\r\n\r\n").context("no HTTP body")?.1;
        Ok(serde_json::from_str(body)?)
    }

    /// `dataplane` of the stats, checked to be the splice when this is the eBPF path.
    pub fn splice_stats(&self) -> anyhow::Result<Option<Value>> {
        if !self.kind.is_sockmap() {
            return Ok(None);
        }
        let dataplane = self.stats()?["dataplane"].take();
        if dataplane["mode"] != "sockmap" {
            bail!("the eBPF daemon runs dataplane {}", dataplane["mode"]);
        }
        Ok(Some(dataplane))
    }

    /// Stops the proxy; for the eBPF daemon also checks that its pin directory is gone.
    pub fn stop(mut self) -> anyhow::Result<()> {
        if let Some(proxy) = self.proxy.as_mut() {
            proxy.stop()?;
        }
        if let Some(dir) = &self.pin_dir
            && Path::new(dir).exists()
        {
            let _ = std::fs::remove_dir_all(dir);
            bail!("the daemon exited but left its pins in {dir}");
        }
        Ok(())
    }
}

/// A fresh temporary directory for one proxy run.
pub fn temp_dir(name: &str) -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "mqsplice-bench-{}-{name}-{}",
        std::process::id(),
        free_port()
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Starts `kind` in front of a new echo broker, sized for `conns` client connections: every
/// proxy must allow them (nginx `worker_connections` and `worker_rlimit_nofile`, haproxy
/// `maxconn`, from which it computes its own descriptor limit; mqsplice raises its own).
pub fn start_peer(kind: PathKind, tools: &Tools, conns: usize) -> anyhow::Result<Peer> {
    static STARTS: AtomicUsize = AtomicUsize::new(0);
    let broker = EchoBroker::start().context("echo broker")?;
    let echo = broker.addr;
    // Each client connection is two descriptors in the proxy (client side, broker side).
    let slots = 2 * conns + 256;
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
    let mut peer = Peer {
        kind,
        listen,
        proxy: None,
        stats: None,
        pin_dir: None,
        _broker: broker,
    };
    match kind {
        PathKind::Direct => peer.listen = echo,
        PathKind::MqspliceSockmap
        | PathKind::MqspliceSockmapLifted
        | PathKind::MqsplicePacket
        | PathKind::MqspliceUserspace => {
            let stats: SocketAddr = format!("127.0.0.1:{}", free_port()).parse()?;
            let dataplane = if kind.is_sockmap() {
                let dir = format!("{}{}", pin_prefix(), STARTS.fetch_add(1, Ordering::Relaxed));
                let mut keys = format!("mode = \"sockmap\"\nbpffs_pin = \"{dir}\"");
                if kind == PathKind::MqspliceSockmapLifted {
                    keys.push_str(
                        "\nmax_inflight_per_flow = \"1GiB\"\nmax_inflight_total = \"4GiB\"",
                    );
                }
                peer.pin_dir = Some(dir);
                keys
            } else if kind == PathKind::MqsplicePacket {
                "mode = \"packet\"\n[dataplane.packet]\ninterfaces = [\"lo\"]".to_string()
            } else {
                "mode = \"userspace\"".to_string()
            };
            let config = format!(
                r#"[stats]
listen = "{stats}"
[dataplane]
{dataplane}
[log]
access = "off"
[[upstream]]
name = "echo"
servers = [{{ addr = "{echo}" }}]
[[listener]]
name = "mqtt"
kind = "tcp"
listen = "{listen}"
upstream = "echo"
max_connections = {max}
"#,
                max = conns + 64,
            );
            let dir = temp_dir("mqsplice")?;
            let file = dir.join("mqsplice.toml");
            std::fs::write(&file, config)?;
            let mut command = Command::new(&tools.mqsplice);
            command
                .args(["--log-level", "warn", "run", "--config"])
                .arg(&file);
            // The stats port is bound after every listener: probing it leaves no stray
            // connection on the MQTT port.
            peer.proxy = Some(ChildProxy::spawn(command, dir, stats, false)?);
            peer.stats = Some(stats);
        }
        PathKind::Nginx => {
            let nginx = tools.nginx.as_ref().context("nginx not available")?;
            let dir = temp_dir("nginx")?;
            let d = dir.display();
            let config = format!(
                "{load}
daemon off;
master_process on;
worker_processes auto;
worker_rlimit_nofile {nofile};
error_log {d}/error.log warn;
pid {d}/nginx.pid;
events {{ worker_connections {slots}; }}
stream {{
    upstream b {{ server {echo}; }}
    server {{ listen {listen}; proxy_pass b; }}
}}
",
                load = nginx.load_module,
                nofile = (slots as u64 + 64).min(tools.nofile),
            );
            let file = dir.join("nginx.conf");
            std::fs::write(&file, config)?;
            let mut command = Command::new(&nginx.binary);
            command
                .arg("-p")
                .arg(&dir)
                .arg("-c")
                .arg(&file)
                .arg("-e")
                .arg(dir.join("error.log"));
            peer.proxy = Some(ChildProxy::spawn(command, dir, listen, true)?);
        }
        PathKind::Haproxy => {
            let haproxy = tools.haproxy.as_ref().context("haproxy not available")?;
            let dir = temp_dir("haproxy")?;
            let config = format!(
                "global
    maxconn {maxconn}
defaults
    mode tcp
    maxconn {maxconn}
    timeout connect 5s
    timeout client 10m
    timeout server 10m
frontend f
    bind {listen}
    default_backend b
backend b
    server echo {echo} maxconn {maxconn}
",
                maxconn = conns + 64,
            );
            let file = dir.join("haproxy.cfg");
            std::fs::write(&file, config)?;
            let mut command = Command::new(haproxy);
            command.arg("-db").arg("-f").arg(&file);
            peer.proxy = Some(ChildProxy::spawn(command, dir, listen, true)?);
        }
    }
    Ok(peer)
}
