//! Builds the kernel half of mqsplice (`proxy-ebpf`) and leaves the object in `OUT_DIR`, where
//! `dataplane::ebpf` embeds it with `include_bytes_aligned!`.
//!
//! The object needs a nightly toolchain with `rust-src` (for `-Z build-std=core`) and
//! `bpf-linker`; none of them are visible to cargo, so they are checked here first and a missing
//! one fails the build with a message that names the fix instead of a wall of linker errors.

use std::{env, fs, path::PathBuf, process::Command};

use anyhow::{Context as _, bail};
use aya_build::{Package, Toolchain};

/// The eBPF crate's package (and binary) name; also the file name the object gets in OUT_DIR.
const EBPF_PACKAGE: &str = "proxy-ebpf";
const SETUP_HINT: &str = "run `cargo xtask setup` to install it";

fn main() -> anyhow::Result<()> {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    if env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true")) {
        // Host-only builds (e.g. a quick clippy without nightly): embed an empty object so the
        // crate still compiles; the loader reports it as unavailable at run time.
        println!("cargo:warning=AYA_BUILD_SKIP set: the eBPF data plane is not built");
        fs::write(out_dir.join(EBPF_PACKAGE), [])?;
        return Ok(());
    }
    check_toolchain()?;

    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let ebpf_dir = manifest_dir.join("..").join(EBPF_PACKAGE);
    let ebpf_dir = ebpf_dir
        .to_str()
        .with_context(|| format!("non-UTF-8 path {}", ebpf_dir.display()))?;
    aya_build::build_ebpf(
        [Package {
            name: EBPF_PACKAGE,
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        Toolchain::Nightly,
    )
}

/// Fails early, naming the missing tool, when aya-build could not possibly succeed.
fn check_toolchain() -> anyhow::Result<()> {
    let out = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .env_remove("RUSTC")
        .env_remove("RUSTUP_TOOLCHAIN")
        .output()
        .with_context(|| {
            "cannot run `rustup run nightly rustc`: the eBPF programs need rustup with a nightly \
             toolchain; install one, then run `cargo xtask setup`"
        })?;
    if !out.status.success() {
        bail!(
            "the nightly Rust toolchain is not usable ({}); install it with rustup, then run \
             `cargo xtask setup`",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let sysroot = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let core_src = sysroot.join("lib/rustlib/src/rust/library/core");
    if !core_src.is_dir() {
        bail!(
            "the nightly toolchain has no rust-src component ({} is missing); {SETUP_HINT}",
            core_src.display()
        );
    }
    let out = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .with_context(|| format!("bpf-linker not found on PATH; {SETUP_HINT}"))?;
    if !out.status.success() {
        bail!(
            "`bpf-linker --version` failed ({}); {SETUP_HINT}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
