//! The raw socket calls the splice needs and std/tokio do not offer, each a small safe wrapper.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::Path;

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// The kernel's cookie for a socket: the key the verdict program sees for the same socket.
pub fn socket_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `fd` is live for the borrow; `cookie` and `len` are valid for writes and `len`
    // holds the buffer's size, as getsockopt requires.
    check(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    })?;
    Ok(cookie)
}

/// Sets `SO_RCVLOWAT`. While a CONNECT is incomplete, a low-water mark of its length keeps the
/// socket from reporting readable for every fragment; setting it back to 1 after the socket joins
/// the socket map is the hand-over kick: it runs the verdict over bytes queued before insertion.
pub fn set_rcvlowat(fd: BorrowedFd<'_>, bytes: usize) -> io::Result<()> {
    set_int(fd, libc::SOL_SOCKET, libc::SO_RCVLOWAT, bytes as u64)
}

/// Sets `TCP_WINDOW_CLAMP`: the most receive window the socket advertises, whatever its buffer
/// (which keeps autotuning).
pub fn set_window_clamp(fd: BorrowedFd<'_>, bytes: u64) -> io::Result<()> {
    set_int(fd, libc::IPPROTO_TCP, libc::TCP_WINDOW_CLAMP, bytes)
}

/// Sets an `int` socket option, saturating `value` at `c_int::MAX`.
fn set_int(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    value: u64,
) -> io::Result<()> {
    let value = libc::c_int::try_from(value).unwrap_or(libc::c_int::MAX);
    // SAFETY: `fd` is live for the borrow; `value` is a c_int and the length passed matches it.
    check(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&raw const value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    })?;
    Ok(())
}

/// Copies queued bytes without consuming them (`MSG_PEEK`, non-blocking).
pub fn peek(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the duration of the call.
    let n = unsafe {
        libc::recv(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// The two `TCP_INFO` byte counters the close rule compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpBytes {
    /// `tcpi_bytes_acked`: bytes the peer acknowledged (a SYN we sent counts as one).
    pub acked: u64,
    /// `tcpi_bytes_received`: bytes received in sequence (a FIN counts as one).
    pub received: u64,
}

/// Offsets in `struct tcp_info` (stable kernel ABI since 4.1/4.2); read by offset because the
/// `libc` crate's struct stops before them.
const TCPI_BYTES_ACKED: usize = 120;
const TCPI_BYTES_RECEIVED: usize = 128;

/// The kernel's `struct tcp_info` for the socket, as bytes: the `libc` crate's struct stops
/// before fields the data planes read, so they read them by offset (a stable ABI). Returns the
/// bytes and how many the kernel filled.
pub fn tcp_info(fd: BorrowedFd<'_>) -> io::Result<([u8; 256], usize)> {
    let mut info = [0u8; 256];
    let mut len = info.len() as libc::socklen_t;
    // SAFETY: `info` is valid for writes of `len` bytes; the kernel writes at most `len`.
    check(unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &raw mut len,
        )
    })?;
    Ok((info, len as usize))
}

/// Reads `tcpi_bytes_acked` and `tcpi_bytes_received`.
pub fn tcp_bytes(fd: BorrowedFd<'_>) -> io::Result<TcpBytes> {
    let (info, len) = tcp_info(fd)?;
    if len < TCPI_BYTES_RECEIVED + 8 {
        return Err(io::Error::other(
            "tcp_info too short: kernel older than 4.2",
        ));
    }
    let at =
        |offset: usize| u64::from_ne_bytes(info[offset..offset + 8].try_into().expect("8 bytes"));
    Ok(TcpBytes {
        acked: at(TCPI_BYTES_ACKED),
        received: at(TCPI_BYTES_RECEIVED),
    })
}

/// Bytes written into the socket and not yet acknowledged by its peer (`SIOCOUTQ`).
pub fn unacked_out(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut queued: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (= TIOCOUTQ) writes one c_int through the pointer, which is valid.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &raw mut queued) })?;
    Ok(queued.max(0) as u64)
}

/// Bytes queued for reading (`FIONREAD`): the splice's diagnostics (and the `sockmap_repro`
/// test tool) compare it with what the verdict program counted.
pub fn queued_in(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut queued: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int through the pointer, which is valid.
    check(unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &raw mut queued) })?;
    Ok(queued.max(0) as u64)
}

/// Waits up to `timeout_ms` for `fd` to become readable (or hung up): a blocking wait on one
/// non-blocking socket without setting up an epoll instance.
pub fn wait_readable(fd: BorrowedFd<'_>, timeout_ms: i32) {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `p` is one valid pollfd for the duration of the call, and the count passed is 1.
    let _ = unsafe { libc::poll(&raw mut p, 1, timeout_ms) };
}

/// Opens `dir` and takes an exclusive, non-blocking `flock` on it; `WouldBlock` when another
/// process holds it. bpffs cannot hold regular files, so the directory itself is the lock.
pub fn lock_directory(dir: &Path) -> io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: `path` is a NUL-terminated string alive for the call.
    let fd = check(unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: `fd` was just returned by open and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `fd` is a valid open descriptor.
    check(unsafe { libc::flock(fd.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) })?;
    Ok(fd)
}

/// An epoll set owned by the splice watcher.
#[derive(Debug)]
pub struct Epoll {
    fd: OwnedFd,
}

/// What one epoll event reported.
#[derive(Debug, Clone, Copy)]
pub struct Event {
    pub token: u64,
    pub events: u32,
}

impl Epoll {
    /// A new, close-on-exec epoll set.
    pub fn new() -> io::Result<Epoll> {
        // SAFETY: plain syscall with a flag argument.
        let fd = check(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        // SAFETY: `fd` was just returned by epoll_create1 and is owned by nobody else.
        Ok(Epoll {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Watches `fd` for `events` (e.g. `EPOLLRDHUP | EPOLLET`), reporting `token`.
    pub fn add(&self, fd: BorrowedFd<'_>, events: u32, token: u64) -> io::Result<()> {
        let mut event = libc::epoll_event { events, u64: token };
        // SAFETY: both descriptors are valid; `event` is valid for reads during the call.
        check(unsafe {
            libc::epoll_ctl(
                self.fd.as_raw_fd(),
                libc::EPOLL_CTL_ADD,
                fd.as_raw_fd(),
                &raw mut event,
            )
        })?;
        Ok(())
    }

    /// Changes what `fd` is watched for.
    pub fn modify(&self, fd: BorrowedFd<'_>, events: u32, token: u64) -> io::Result<()> {
        let mut event = libc::epoll_event { events, u64: token };
        // SAFETY: both descriptors are valid; `event` is valid for reads during the call.
        check(unsafe {
            libc::epoll_ctl(
                self.fd.as_raw_fd(),
                libc::EPOLL_CTL_MOD,
                fd.as_raw_fd(),
                &raw mut event,
            )
        })?;
        Ok(())
    }

    /// Stops watching `fd` (closing it would too, but only once every duplicate is closed).
    pub fn remove(&self, fd: BorrowedFd<'_>) {
        // SAFETY: both descriptors are valid; a NULL event is allowed for EPOLL_CTL_DEL.
        let _ = unsafe {
            libc::epoll_ctl(
                self.fd.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                fd.as_raw_fd(),
                std::ptr::null_mut(),
            )
        };
    }

    /// Waits up to `timeout_ms` (-1: forever) and appends what happened to `out`.
    pub fn wait(&self, out: &mut Vec<Event>, timeout_ms: i32) -> io::Result<()> {
        let mut raw = [libc::epoll_event { events: 0, u64: 0 }; 256];
        // SAFETY: `raw` is valid for writes of its length in events.
        let n = unsafe {
            libc::epoll_wait(
                self.fd.as_raw_fd(),
                raw.as_mut_ptr(),
                raw.len() as i32,
                timeout_ms,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(())
            } else {
                Err(e)
            };
        }
        out.extend(raw[..n as usize].iter().map(|e| Event {
            token: e.u64,
            events: e.events,
        }));
        Ok(())
    }
}

/// An eventfd, to wake the watcher thread when a flow is handed to it.
#[derive(Debug)]
pub struct Wakeup {
    fd: OwnedFd,
}

impl Wakeup {
    /// A new non-blocking eventfd.
    pub fn new() -> io::Result<Wakeup> {
        // SAFETY: plain syscall with flag arguments.
        let fd = check(unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) })?;
        // SAFETY: `fd` was just returned by eventfd and is owned by nobody else.
        Ok(Wakeup {
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// The descriptor to register in an epoll set.
    pub fn fd(&self) -> BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.fd.as_fd()
    }

    /// Makes the eventfd readable.
    pub fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a valid u64, as eventfd requires.
        let _ = unsafe { libc::write(self.fd.as_raw_fd(), (&raw const one).cast(), 8) };
    }

    /// Resets the eventfd after a wake-up.
    pub fn clear(&self) {
        let mut value: u64 = 0;
        // SAFETY: reads 8 bytes into a valid u64, as eventfd requires.
        let _ = unsafe { libc::read(self.fd.as_raw_fd(), (&raw mut value).cast(), 8) };
    }
}

/// Makes the next `close` of the socket send a reset (`SO_LINGER` with a zero timeout): for a
/// drain that timed out, the peer must not take the end for a clean one.
pub fn reset_on_close(fd: BorrowedFd<'_>) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: `fd` is live for the borrow; `linger` is a valid `struct linger` of the given size.
    let _ = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
}

/// Hands memory the allocator keeps free back to the system (glibc keeps freed chunks of every
/// thread's arena for reuse): after a burst of throttled flows, the daemon's footprint returns to
/// what it was.
pub fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: `malloc_trim` only walks the allocator's own free lists; it has no arguments that
    // point anywhere and is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}
