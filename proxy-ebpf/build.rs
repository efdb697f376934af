//! Rebuild the eBPF object when the linker that produced it changes.
//!
//! bpf-linker is a dependency cargo cannot see (it is named by the bpf target spec, not by any
//! manifest), so a new linker would otherwise leave a stale object in place. Watching the
//! binary's mtime is coarse but cheap; a different bpf-linker earlier in PATH is not noticed.

fn main() {
    // Only the bpf build links with bpf-linker; the host build of the lib target (as a
    // build-dependency of proxy-userspace, or under clippy) must not require it.
    if std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() != Ok("bpf") {
        return;
    }
    match which::which("bpf-linker") {
        Ok(linker) => println!("cargo:rerun-if-changed={}", linker.display()),
        Err(err) => {
            println!("cargo:warning=bpf-linker not found ({err}); run `cargo xtask setup`");
        }
    }
}
