//! Loader for the in-kernel data plane (the `proxy-ebpf` object built by `build.rs`).
//!
//! Loading is all-or-nothing and reports *why* it failed in one line, so the daemon can fall back
//! to its userspace copy loop and say so, instead of half-splicing connections.

use std::{
    fs, io,
    os::fd::{AsRawFd, BorrowedFd},
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfError,
    maps::{HashMap, Map, MapData, SockHash},
    programs::{ProgramError, SkSkb},
};
use proxy_common::{FlowKey, PeerEntry, SockCookie};

/// The object produced by `build.rs`; empty when the build ran with `AYA_BUILD_SKIP`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/proxy-ebpf"));

/// Where the maps are pinned unless the caller picks another directory; a fixed path lets
/// operators inspect a running daemon with `bpftool map show pinned /sys/fs/bpf/mqsplice/mqs_socks`.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/mqsplice";

/// Mount point of the BPF filesystem that pins must live on.
const BPFFS: &str = "/sys/fs/bpf";

const SOCKS_MAP: &str = "mqs_socks";
const PEERS_MAP: &str = "mqs_peers";
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
    /// Anything else (missing map or program in the object, attach failure, ...).
    #[error("eBPF data plane unavailable: {0}")]
    Other(String),
}

/// The loaded and attached data plane; dropping it detaches the program and removes the pins.
///
/// Holds the maps the daemon writes (sockets and their peers) so splicing a connection is two
/// map updates, with no lookups by name on the hot path.
pub struct EbpfPrograms {
    socks: SockHash<MapData, FlowKey>,
    peers: HashMap<MapData, FlowKey, PeerEntry>,
    pin_dir: PathBuf,
    _pins: PinGuard,
    // Owns the program and its attachment to `socks`; kept last so it is dropped after the maps
    // are no longer reachable from this struct (order does not matter to the kernel).
    _ebpf: Ebpf,
}

impl std::fmt::Debug for EbpfPrograms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EbpfPrograms")
            .field("pin_dir", &self.pin_dir)
            .finish_non_exhaustive()
    }
}

impl EbpfPrograms {
    /// Loads the data plane with its maps pinned under [`DEFAULT_PIN_DIR`].
    pub fn load() -> Result<Self, EbpfUnavailable> {
        Self::load_with_pin_dir(DEFAULT_PIN_DIR)
    }

    /// Loads the data plane pinning maps under `pin_dir` (which must be on bpffs), so several
    /// instances (tests, a second daemon) do not fight over one directory.
    pub fn load_with_pin_dir(pin_dir: impl AsRef<Path>) -> Result<Self, EbpfUnavailable> {
        let pin_dir = pin_dir.as_ref().to_path_buf();
        Self::load_into(pin_dir.clone()).inspect_err(|_| {
            // Do not leave an empty directory behind from a failed attempt (non-empty = in use).
            let _ = fs::remove_dir(&pin_dir);
        })
    }

    fn load_into(pin_dir: PathBuf) -> Result<Self, EbpfUnavailable> {
        if OBJECT.is_empty() {
            return Err(EbpfUnavailable::NotBuilt);
        }
        raise_memlock();

        ensure_bpffs(&pin_dir)?;

        let mut ebpf = Ebpf::load(OBJECT).map_err(classify_load)?;
        let mut pins = Vec::new();
        let mut take_pinned = |name: &'static str| {
            let map = ebpf.take_map(name).ok_or_else(|| missing("map", name))?;
            let path = pin_dir.join(name);
            pin_map(&map, &path)?;
            pins.push(path);
            Ok::<_, EbpfUnavailable>(map)
        };
        let socks = take_pinned(SOCKS_MAP);
        let peers = take_pinned(PEERS_MAP);
        let pins_guard = PinGuard(pins);
        let socks: SockHash<MapData, FlowKey> =
            SockHash::try_from(socks?).map_err(|e| other("map", SOCKS_MAP, &e))?;
        let peers: HashMap<MapData, FlowKey, PeerEntry> =
            HashMap::try_from(peers?).map_err(|e| other("map", PEERS_MAP, &e))?;

        let prog: &mut SkSkb = ebpf
            .program_mut(VERDICT_PROG)
            .ok_or_else(|| missing("program", VERDICT_PROG))?
            .try_into()
            .map_err(|e| other("program", VERDICT_PROG, &e))?;
        prog.load().map_err(classify_program)?;
        prog.attach(socks.fd()).map_err(classify_program)?;

        Ok(Self {
            socks,
            peers,
            pin_dir,
            _pins: pins_guard,
            _ebpf: ebpf,
        })
    }

    /// Directory holding this instance's pinned maps (for log lines and bpftool hints).
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Hands a connected pair to the kernel: from now on bytes received on either socket are
    /// sent out of the other without reaching userspace.
    ///
    /// Order matters: both peer entries first, then `b`, then `a`, so that the first skb the
    /// verdict program sees on either socket already finds its peer in the SOCKHASH. Bytes that
    /// were queued before insertion are pushed through by re-arming `SO_RCVLOWAT`.
    pub fn splice(
        &mut self,
        a: BorrowedFd<'_>,
        b: BorrowedFd<'_>,
    ) -> io::Result<(SockCookie, SockCookie)> {
        let (ca, cb) = (socket_cookie(a)?, socket_cookie(b)?);
        let insert_peer = |peers: &mut HashMap<MapData, FlowKey, PeerEntry>, k, v| {
            peers
                .insert(k, PeerEntry { peer_cookie: v }, 0)
                .map_err(|e| io::Error::other(format!("{PEERS_MAP} insert: {e}")))
        };
        insert_peer(&mut self.peers, ca, cb)?;
        insert_peer(&mut self.peers, cb, ca)?;
        for (cookie, fd) in [(cb, b), (ca, a)] {
            if let Err(e) = self.socks.insert(cookie, fd.as_raw_fd(), 0) {
                self.unsplice(ca, cb);
                return Err(io::Error::other(format!("{SOCKS_MAP} insert: {e}")));
            }
        }
        kick(a)?;
        kick(b)?;
        Ok((ca, cb))
    }

    /// Takes a pair back out of the kernel path (best effort: the kernel also drops closed
    /// sockets from the SOCKHASH by itself, but not their peer entries).
    pub fn unsplice(&mut self, a: SockCookie, b: SockCookie) {
        for cookie in [a, b] {
            // A missing entry only means it was never inserted or already gone.
            let _ = self.socks.remove(&cookie);
            let _ = self.peers.remove(&cookie);
        }
    }
}

/// Removes pins when the data plane goes away (or loading fails half-way): a leftover pin keeps
/// the map, and through it the attached program, alive after the daemon exits.
struct PinGuard(Vec<PathBuf>);

impl Drop for PinGuard {
    fn drop(&mut self) {
        for pin in &self.0 {
            let _ = fs::remove_file(pin);
        }
        if let Some(dir) = self.0.first().and_then(|p| p.parent()) {
            // Only succeeds when empty, i.e. nobody else pinned anything there.
            let _ = fs::remove_dir(dir);
        }
    }
}

/// The kernel's cookie for a socket: the key the verdict program sees for the same socket.
pub fn socket_cookie(fd: BorrowedFd<'_>) -> io::Result<SockCookie> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `fd` is a live descriptor for the duration of the borrow; `cookie` and `len` are
    // valid for writes and `len` holds the buffer's size, as getsockopt requires.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// Setting `SO_RCVLOWAT` calls the socket's data-ready hook, which makes the psock run the
/// verdict program over bytes that were already queued before the socket joined the map.
fn kick(fd: BorrowedFd<'_>) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: `fd` is live for the borrow; `one` is a c_int and the length passed matches it.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&raw const one).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; newer ones use memcg and ignore it.
fn raise_memlock() {
    if let Err(e) = rlimit::setrlimit(
        rlimit::Resource::MEMLOCK,
        rlimit::INFINITY,
        rlimit::INFINITY,
    ) {
        tracing::debug!("could not raise RLIMIT_MEMLOCK ({e}); fine on Linux >= 5.11");
    }
}

/// Pins `map` at `path`, replacing a pin left by a previous run that died without cleaning up.
fn pin_map(map: &Map, path: &Path) -> Result<(), EbpfUnavailable> {
    match fs::remove_file(path) {
        Ok(()) => tracing::debug!("replaced stale pin {}", path.display()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(EbpfUnavailable::Bpffs(format!(
                "remove stale {}: {e}",
                path.display()
            )));
        }
    }
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
