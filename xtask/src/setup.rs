//! `cargo xtask setup`: everything a fresh Debian/Ubuntu machine needs to build and test
//! mqsplice's kernel data plane, each step skipped when already satisfied so CI can run it on
//! every job.

use std::{
    fs,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail, ensure};

/// bpf-linker release known to link aya-ebpf 0.2.1 objects with the nightly's LLVM.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Debian packages the tests and the demo use (bpftool for inspecting maps, mosquitto as broker,
/// chromium and node for the browser test, iproute2 and nftables for the packet splice's network
/// namespaces and the loss they inject).
const DEB_PACKAGES: &[&str] = &[
    "bpftool",
    "iproute2",
    "nftables",
    "mosquitto",
    "mosquitto-clients",
    "chromium",
    "nodejs",
];

/// The amqtt release the `upstream_protocol = "ws"` test runs against (its WebSocket listener).
const AMQTT_VERSION: &str = "0.12.1";

/// Runs every setup step, stopping at the first failure with a message naming the step.
pub fn setup() -> Result<()> {
    rust_src().context("setup: rust-src for the nightly toolchain")?;
    bpf_linker().context("setup: bpf-linker")?;
    debian_packages(DEB_PACKAGES).context("setup: Debian packages")?;
    bpffs().context("setup: bpffs at /sys/fs/bpf")?;
    npm_modules().context("setup: npm modules for the browser test (tests/browser)")?;
    amqtt().context("setup: amqtt for the WebSocket upstream test")?;
    Ok(())
}

/// MQTT.js and playwright-core, exactly as tests/browser/package-lock.json pins them.
fn npm_modules() -> Result<()> {
    let dir = crate::root().join("tests/browser");
    let present = dir.join("node_modules/mqtt/dist/mqtt.min.js").exists()
        && dir
            .join("node_modules/playwright-core/package.json")
            .exists();
    if present {
        report("npm mqtt, playwright-core", "already present");
        return Ok(());
    }
    if output(Command::new("npm").arg("--version")).is_none() {
        debian_packages(&["npm"])?;
    }
    run(Command::new("npm")
        .current_dir(&dir)
        .args(["ci", "--no-audit", "--no-fund"]))?;
    report("npm mqtt, playwright-core", "installed");
    Ok(())
}

/// amqtt in a virtualenv under target/ (the tests find it at target/amqtt-venv/bin/amqtt).
fn amqtt() -> Result<()> {
    let venv = crate::root().join("target/amqtt-venv");
    let bin = venv.join("bin/amqtt");
    let installed =
        output(Command::new(venv.join("bin/pip")).args(["show", "amqtt"])).is_some_and(|s| {
            s.lines()
                .any(|l| l.trim() == format!("Version: {AMQTT_VERSION}"))
        });
    if installed && bin.exists() {
        report("amqtt", &format!("{AMQTT_VERSION} already present"));
        return Ok(());
    }
    if !venv.join("bin/pip").exists() {
        if output(Command::new("python3").args(["-m", "venv", "--help"])).is_none() {
            debian_packages(&["python3-venv"])?;
        }
        run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    }
    run(Command::new(venv.join("bin/pip"))
        .args(["install", "-q"])
        .arg(format!("amqtt=={AMQTT_VERSION}")))?;
    ensure!(bin.exists(), "{} missing after pip install", bin.display());
    report("amqtt", &format!("{AMQTT_VERSION} installed"));
    Ok(())
}

fn report(item: &str, what: &str) {
    println!("setup: {item}: {what}");
}

/// Runs `cmd`, failing with its full command line when it cannot start or exits non-zero.
fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    ensure!(status.success(), "{cmd:?} failed: {status}");
    Ok(())
}

/// Runs `cmd` and returns its stdout; `None` when it cannot start or fails.
fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.stderr(Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `-Z build-std=core` (used by aya-build on nightly) compiles core from source.
fn rust_src() -> Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .context("`rustup component list --toolchain nightly` failed: is rustup's nightly toolchain installed?")?;
    if installed.lines().any(|l| l.trim() == "rust-src") {
        report("rust-src (nightly)", "already present");
        return Ok(());
    }
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))?;
    report("rust-src (nightly)", "installed");
    Ok(())
}

/// bpf-linker has no prebuilt binary for this setup, so it is built against the nightly's own
/// libLLVM (no separate LLVM install), with the `llvm-NN` feature matching that LLVM.
fn bpf_linker() -> Result<()> {
    let current = output(Command::new("bpf-linker").arg("--version"));
    if let Some(v) = &current
        && v.split_whitespace().nth(1) == Some(BPF_LINKER_VERSION)
    {
        report(
            "bpf-linker",
            &format!("{BPF_LINKER_VERSION} already present"),
        );
        return Ok(());
    }

    let vv = output(Command::new("rustc").args(["+nightly", "-vV"]))
        .context("`rustc +nightly -vV` failed: is rustup's nightly toolchain installed?")?;
    let llvm_major = vv
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("`rustc +nightly -vV` printed no LLVM version")?
        .trim()
        .to_owned();
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))
        .context("`rustc +nightly --print sysroot` failed")?;
    let libdir = format!("{}/lib", sysroot.trim());
    let llvm_lib = fs::read_dir(&libdir)
        .with_context(|| format!("reading {libdir}"))?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .find_map(|n| {
            n.strip_prefix("lib")
                .and_then(|n| n.strip_suffix(".so"))
                .filter(|n| n.starts_with("LLVM-"))
                .map(str::to_owned)
        })
        .with_context(|| {
            format!("no libLLVM-*.so in {libdir} (nightly without its LLVM dylib?)")
        })?;

    report(
        "bpf-linker",
        &format!(
            "{} found; building {BPF_LINKER_VERSION} against {llvm_lib} (llvm-{llvm_major}), about a minute",
            current.as_deref().map_or("none", str::trim)
        ),
    );
    let rustflags = format!("-L {libdir} -l dylib={llvm_lib} -C link-arg=-Wl,-rpath,{libdir}");
    run(Command::new("cargo")
        .env("RUSTFLAGS", rustflags)
        .args(["+nightly", "install", "bpf-linker"])
        .args(["--version", &format!("={BPF_LINKER_VERSION}")])
        .args(["--locked", "--no-default-features", "--features"])
        .arg(format!("llvm-{llvm_major},no-llvm-linking")))?;
    let v = output(Command::new("bpf-linker").arg("--version"))
        .context("bpf-linker still not runnable after install: is ~/.cargo/bin on PATH?")?;
    report("bpf-linker", &format!("installed ({})", v.trim()));
    Ok(())
}

fn deb_installed(pkg: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]))
        .is_some_and(|s| s.trim() == "install ok installed")
}

/// Installs the Debian packages in `packages` that are missing (apt-get update only if any are).
pub fn debian_packages(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| !deb_installed(p))
        .collect();
    for p in packages.iter().filter(|p| !missing.contains(p)) {
        report(p, "already present");
    }
    if missing.is_empty() {
        return Ok(());
    }
    let sudo = !is_root();
    let apt = |args: &[&str]| {
        let mut cmd = Command::new(if sudo { "sudo" } else { "apt-get" });
        if sudo {
            cmd.arg("apt-get");
        }
        cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        cmd
    };
    run(&mut apt(&["update", "-q"]))?;
    let mut install = apt(&["install", "-y", "-q", "--no-install-recommends"]);
    run(install.args(&missing))?;
    for p in &missing {
        ensure!(
            deb_installed(p),
            "{p} still not installed after apt-get install"
        );
        report(p, "installed");
    }
    Ok(())
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// Pinned maps live on bpffs; containers and minimal VMs often do not mount it.
fn bpffs() -> Result<()> {
    let mounts = fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    let mounted = mounts.lines().any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.get(1) == Some(&"/sys/fs/bpf") && f.get(2) == Some(&"bpf")
    });
    if mounted {
        report("bpffs /sys/fs/bpf", "already mounted");
        return Ok(());
    }
    let mut cmd = if is_root() {
        Command::new("mount")
    } else {
        let mut c = Command::new("sudo");
        c.arg("mount");
        c
    };
    if let Err(e) = run(cmd.args(["-t", "bpf", "bpf", "/sys/fs/bpf"])) {
        bail!("{e:#}; mount it by hand with `mount -t bpf bpf /sys/fs/bpf` (needs root)");
    }
    report("bpffs /sys/fs/bpf", "mounted");
    Ok(())
}
