//! mqsplice's kernel data path, linked into one BPF object that proxy-userspace embeds.
//!
//! One module per program kind, so the maps a program touches sit next to it.
//!
//! Only the bpf target is `no_std`/`no_main`: on the host (`cargo clippy --workspace`, where
//! feature unification links std into proxy-common) this is an ordinary empty binary, so the
//! whole workspace can be linted in one go and the program code still gets checked.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

mod sockmap;
mod tc;

/// BPF programs cannot unwind or print; the verifier rejects any path that could reach this, so
/// it only has to satisfy the compiler.
#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

/// The kernel only allows GPL-compatible programs to call the sockmap redirect helpers.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

/// Host builds only exist to be linted; there is nothing to run.
#[cfg(not(target_arch = "bpf"))]
fn main() {}
