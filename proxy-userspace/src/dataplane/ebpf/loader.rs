//! Loader for the in-kernel data plane (the `proxy-ebpf` object built by `build.rs`).
//!
//! Loading is all-or-nothing and reports *why* it failed in one line, so the daemon can fall back
//! to its userspace copy loop and say so, instead of half-splicing connections.

use std::{
    fs, io,
    os::fd::OwnedFd,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{HashMap, Map, MapData, PerCpuArray, RingBuf, SockHash},
    programs::{ProgramError, SkSkb},
};
use proxy_common::{FlowCounters, FlowKey, GlobalCounters, PeerEntry};

/// The object produced by `build.rs`; empty when the build ran with `AYA_BUILD_SKIP`.
pub(crate) static OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy-ebpf"));

/// Mount point of the BPF filesystem that pins must live on.
const BPFFS: &str = "/sys/fs/bpf";

const SOCKS_MAP: &str = "mqs_socks";
const PEERS_MAP: &str = "mqs_peers";
const FLOW_COUNTERS_MAP: &str = "mqs_flow_counters";
const TOTALS_MAP: &str = "mqs_totals";
const EVENTS_MAP: &str = "mqs_events";
const VERDICT_PROG: &str = "mqs_verdict";

/// Why the kernel data plane cannot be used; the daemon logs it once and splices in userspace.
#[derive(Debug, thiserror::Error)]
pub enum EbpfUnavailable {
    /// Loading BPF needs root (or CAP_BPF + CAP_NET_ADMIN); the usual case for a dev run.
    #[error(
        "not permitted to load BPF programs (run as root or grant CAP_BPF and CAP_NET_ADMIN): {0}"
    )]
    NotPermitted(String),
    /// The binary was built with `AYA_BUILD_SKIP`, so there is nothing to load.
    #[error(
        "this binary was built without the eBPF object (AYA_BUILD_SKIP); rebuild after `cargo xtask setup`"
    )]
    NotBuilt,
    /// The kernel or object BTF could not be used (old kernel or `CONFIG_DEBUG_INFO_BTF=n`).
    #[error("BTF unavailable: {0}")]
    Btf(String),
    /// The verifier refused the program; `log` keeps the full verifier output for debugging.
    #[error("the verifier rejected {program}: {reason}")]
    Verifier {
        /// Program name.
        program: &'static str,
        /// The syscall error, one line.
        reason: String,
        /// Full verifier log (multi-line), for `--verbose` output.
        log: String,
    },
    /// The BPF filesystem could not be mounted or the pin directory used.
    #[error("bpffs: {0}")]
    Bpffs(String),
    /// Another instance holds the pin directory's lock.
    #[error(
        "{0} is in use by another mqsplice instance (its lock is held); set dataplane.bpffs_pin to another directory"
    )]
    Locked(String),
    /// Anything else (missing map or program in the object, attach failure, ...).
    #[error("eBPF data plane unavailable: {0}")]
    Other(String),
}

/// Reads the programs' aya-log records and hands them to the `log` facade (and so to the
/// daemon's tracing output); flushed by the splice watcher when its ring buffer is readable.
pub type ProgramLogger = aya_log::EbpfLogger<&'static dyn log::Log>;

/// The maps the daemon drives, taken out of the loaded object.
pub struct Maps {
    /// Spliced sockets by cookie.
    pub socks: SockHash<MapData, FlowKey>,
    /// Cookie → peer cookie and direction.
    pub peers: HashMap<MapData, FlowKey, PeerEntry>,
    /// Cookie → what the program did with that socket's bytes.
    pub flow_counters: HashMap<MapData, FlowKey, FlowCounters>,
    /// Program-wide totals, per CPU.
    pub totals: PerCpuArray<MapData, GlobalCounters>,
    /// Signal events (a socket passed its signal point), read by the splice watcher.
    pub events: Option<RingBuf<MapData>>,
}

/// The loaded and attached data plane; dropping it detaches the program, removes the pins and
/// releases the pin directory's lock.
pub struct EbpfPrograms {
    pin_dir: PathBuf,
    /// Whether the program checks each skb against the socket's stream position (it needs the
    /// kernel's BTF), or why not.
    stream_check: Result<(), String>,
    logger: Option<ProgramLogger>,
    _pins: PinGuard,
    // Owns the program and its attachment to the socket map.
    _ebpf: Ebpf,
    // Held for the life of the instance: a second daemon on the same directory fails to start.
    _lock: OwnedFd,
}

impl std::fmt::Debug for EbpfPrograms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EbpfPrograms")
            .field("pin_dir", &self.pin_dir)
            .finish_non_exhaustive()
    }
}

impl EbpfPrograms {
    /// Loads the data plane pinning maps under `pin_dir` (which must be on bpffs), so several
    /// instances (tests, a second daemon) do not fight over one directory. Returns the maps the
    /// daemon drives beside the handle that keeps everything alive.
    pub fn load(pin_dir: impl AsRef<Path>) -> Result<(Self, Maps), EbpfUnavailable> {
        Self::load_into(pin_dir.as_ref().to_path_buf())
    }

    fn load_into(pin_dir: PathBuf) -> Result<(Self, Maps), EbpfUnavailable> {
        if OBJECT.is_empty() {
            return Err(EbpfUnavailable::NotBuilt);
        }
        raise_memlock();

        ensure_bpffs(&pin_dir)?;
        let lock = super::sockopt::lock_directory(&pin_dir).map_err(|e| {
            if e.kind() == io::ErrorKind::WouldBlock {
                EbpfUnavailable::Locked(pin_dir.display().to_string())
            } else {
                EbpfUnavailable::Bpffs(format!("lock {}: {e}", pin_dir.display()))
            }
        })?;
        remove_stale_pins(&pin_dir)?;

        let offsets = super::btf::KernelOffsets::of_running_kernel();
        let mut loader = EbpfLoader::new();
        if let Ok(o) = &offsets {
            loader
                .override_global("SKB_CB_OFFSET", &o.skb_cb, true)
                .override_global("SKB_SK_OFFSET", &o.skb_sk, true)
                .override_global("TCP_COPIED_SEQ_OFFSET", &o.tcp_copied_seq, true);
        }
        let mut ebpf = loader.load(OBJECT).map_err(classify_load)?;
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => Some(logger),
            Err(e) => {
                tracing::warn!("eBPF program logs will not reach this log: {e}");
                None
            }
        };
        let mut pins = PinGuard(Vec::new(), pin_dir.clone());
        let mut take_pinned = |name: &'static str| {
            let map = ebpf.take_map(name).ok_or_else(|| missing("map", name))?;
            let path = pin_dir.join(name);
            pin_map(&map, &path)?;
            pins.0.push(path);
            Ok::<_, EbpfUnavailable>(map)
        };
        let socks = take_pinned(SOCKS_MAP)?;
        let peers = take_pinned(PEERS_MAP)?;
        let flow_counters = take_pinned(FLOW_COUNTERS_MAP)?;
        let totals = take_pinned(TOTALS_MAP)?;
        let events = take_pinned(EVENTS_MAP)?;
        let maps = Maps {
            socks: SockHash::try_from(socks).map_err(|e| other("map", SOCKS_MAP, &e))?,
            peers: HashMap::try_from(peers).map_err(|e| other("map", PEERS_MAP, &e))?,
            flow_counters: HashMap::try_from(flow_counters)
                .map_err(|e| other("map", FLOW_COUNTERS_MAP, &e))?,
            totals: PerCpuArray::try_from(totals).map_err(|e| other("map", TOTALS_MAP, &e))?,
            events: Some(RingBuf::try_from(events).map_err(|e| other("map", EVENTS_MAP, &e))?),
        };

        let prog: &mut SkSkb = ebpf
            .program_mut(VERDICT_PROG)
            .ok_or_else(|| missing("program", VERDICT_PROG))?
            .try_into()
            .map_err(|e| other("program", VERDICT_PROG, &e))?;
        prog.load().map_err(classify_program)?;
        prog.attach(maps.socks.fd()).map_err(classify_program)?;

        let programs = Self {
            pin_dir,
            stream_check: offsets.map(|_| ()).map_err(|e| e.to_string()),
            logger,
            _pins: pins,
            _ebpf: ebpf,
            _lock: lock,
        };
        Ok((programs, maps))
    }

    /// The programs' log reader, for whoever polls it (once).
    pub fn take_logger(&mut self) -> Option<ProgramLogger> {
        self.logger.take()
    }

    /// `Err(why)` when the program cannot check skbs against the stream (no usable BTF): the
    /// kernel's replays of seen bytes then go through, and the daemon says so.
    pub fn stream_check(&self) -> &Result<(), String> {
        &self.stream_check
    }

    /// Directory holding this instance's pinned maps (for log lines and bpftool hints).
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }
}

/// Clears a directory whose lock was free: whatever is pinned there belongs to a dead instance.
fn remove_stale_pins(pin_dir: &Path) -> Result<(), EbpfUnavailable> {
    let entries = fs::read_dir(pin_dir)
        .map_err(|e| EbpfUnavailable::Bpffs(format!("read {}: {e}", pin_dir.display())))?;
    for entry in entries.flatten() {
        let path = entry.path();
        match fs::remove_file(&path) {
            Ok(()) => tracing::info!(
                "removed stale pin {} left by an instance that is gone",
                path.display()
            ),
            Err(e) => {
                return Err(EbpfUnavailable::Bpffs(format!(
                    "remove stale {}: {e}",
                    path.display()
                )));
            }
        }
    }
    Ok(())
}

/// Removes pins when the data plane goes away (or loading fails half-way): a leftover pin keeps
/// the map, and through it the attached program, alive after the daemon exits.
struct PinGuard(Vec<PathBuf>, PathBuf);

impl Drop for PinGuard {
    fn drop(&mut self) {
        for pin in &self.0 {
            let _ = fs::remove_file(pin);
        }
        // Only succeeds when empty, i.e. nobody else pinned anything there.
        let _ = fs::remove_dir(&self.1);
    }
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; newer ones use memcg and ignore it.
pub(crate) fn raise_memlock() {
    if let Err(e) = rlimit::setrlimit(
        rlimit::Resource::MEMLOCK,
        rlimit::INFINITY,
        rlimit::INFINITY,
    ) {
        tracing::debug!("could not raise RLIMIT_MEMLOCK ({e}); fine on Linux >= 5.11");
    }
}

/// Pins `map` at `path` (the directory was cleared of stale pins under its lock).
fn pin_map(map: &Map, path: &Path) -> Result<(), EbpfUnavailable> {
    map.pin(path)
        .map_err(|e| EbpfUnavailable::Bpffs(format!("pin {}: {}", path.display(), one_line(&e))))
}

/// Makes sure `pin_dir` exists on a mounted bpffs, mounting it at /sys/fs/bpf if needed.
fn ensure_bpffs(pin_dir: &Path) -> Result<(), EbpfUnavailable> {
    let mounts = fs::read_to_string("/proc/mounts")
        .map_err(|e| EbpfUnavailable::Bpffs(format!("read /proc/mounts: {e}")))?;
    let on_bpffs = |dir: &Path| {
        mounts.lines().any(|line| {
            let mut f = line.split_whitespace();
            let (_src, mnt, fstype) = (f.next(), f.next(), f.next());
            fstype == Some("bpf") && mnt.is_some_and(|m| dir.starts_with(m))
        })
    };
    if !on_bpffs(pin_dir) {
        if !pin_dir.starts_with(BPFFS) {
            return Err(EbpfUnavailable::Bpffs(format!(
                "{} is not on a mounted bpf filesystem",
                pin_dir.display()
            )));
        }
        mount_bpffs()?;
    }
    fs::create_dir_all(pin_dir)
        .map_err(|e| EbpfUnavailable::Bpffs(format!("create {}: {e}", pin_dir.display())))
}

fn mount_bpffs() -> Result<(), EbpfUnavailable> {
    let target = c"/sys/fs/bpf";
    // SAFETY: all pointers are NUL-terminated C string literals that live for the whole call;
    // `data` may be NULL for bpffs.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return Err(EbpfUnavailable::Bpffs(format!(
            "mount -t bpf bpf {BPFFS}: {e}"
        )));
    }
    Ok(())
}

fn missing(kind: &str, name: &str) -> EbpfUnavailable {
    EbpfUnavailable::Other(format!("{kind} `{name}` not found in the eBPF object"))
}

fn other(kind: &str, name: &str, e: &dyn std::error::Error) -> EbpfUnavailable {
    EbpfUnavailable::Other(format!("{kind} `{name}`: {}", one_line(e)))
}

/// Joins an error and its sources into one line ("a: b: c").
fn one_line(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(cause) = src {
        let c = cause.to_string();
        if !s.contains(&c) {
            s.push_str(": ");
            s.push_str(&c);
        }
        src = cause.source();
    }
    s.lines().next().unwrap_or_default().to_string()
}

/// True when any error in the chain is EPERM/EACCES from a syscall.
fn denied(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<io::Error>()
            && matches!(io.raw_os_error(), Some(libc::EPERM | libc::EACCES))
        {
            return true;
        }
        cur = err.source();
    }
    false
}

fn classify_load(e: EbpfError) -> EbpfUnavailable {
    if denied(&e) {
        return EbpfUnavailable::NotPermitted(one_line(&e));
    }
    match e {
        EbpfError::BtfError(_) | EbpfError::NoBTF | EbpfError::BtfRelocationError(_) => {
            EbpfUnavailable::Btf(one_line(&e))
        }
        EbpfError::ProgramError(p) => classify_program(p),
        e => EbpfUnavailable::Other(one_line(&e)),
    }
}

fn classify_program(e: ProgramError) -> EbpfUnavailable {
    if denied(&e) {
        return EbpfUnavailable::NotPermitted(one_line(&e));
    }
    match e {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => EbpfUnavailable::Verifier {
            program: VERDICT_PROG,
            reason: io_error.to_string(),
            log: verifier_log.to_string(),
        },
        e => EbpfUnavailable::Other(format!("{VERDICT_PROG}: {}", one_line(&e))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The packet splice's classifier (proxy-ebpf/src/tc.rs) is loaded into the kernel, so the
    /// verifier has accepted every path of it. Needs root; skipped with the reason otherwise,
    /// except under `CI=true`.
    #[test]
    fn the_packet_classifier_passes_the_verifier() {
        if !crate::dataplane::root_or_skip("loading a BPF program") {
            return;
        }
        raise_memlock();
        let mut ebpf = EbpfLoader::new().load(OBJECT).expect("object loads");
        let program: &mut aya::programs::SchedClassifier = ebpf
            .program_mut("mqs_packet")
            .expect("the object has the classifier")
            .try_into()
            .expect("a TC classifier");
        if let Err(e) = program.load() {
            let mut message = format!("{e}");
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                message.push_str(&format!(": {s}"));
                source = s.source();
            }
            panic!("the verifier refused mqs_packet: {message}");
        }
    }
}
