//! mqsplice's kernel data path, linked into one BPF object that proxy-userspace embeds.
//!
//! One module per program kind, so the maps a program touches sit next to it.
#![no_std]
#![no_main]

mod sockmap;

/// BPF programs cannot unwind or print; the verifier rejects any path that could reach this, so
/// it only has to satisfy the compiler.
#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

/// The kernel only allows GPL-compatible programs to call the sockmap redirect helpers.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
