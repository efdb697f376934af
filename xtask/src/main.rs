//! Developer and CI entry point: `cargo xtask <command>` (alias in .cargo/config.toml).
//!
//! One place for the chores that need more than cargo (nightly, bpf-linker, Debian packages,
//! root), so CI (`.ci/run`) and people run exactly the same thing. The build graph itself stays
//! in cargo: `proxy-userspace/build.rs` builds the eBPF object.

mod setup;
mod suites;

use anyhow::{Context as _, Result, bail, ensure};
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Parser)]
#[command(about = "Set up, build, run, test, demo and benchmark mqsplice")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building and testing need (idempotent).
    Setup,
    /// Setup, then build the daemon (release unless --debug).
    Build {
        /// Build the dev profile instead of release.
        #[arg(long)]
        debug: bool,
    },
    /// Setup, build (release) and run the daemon: `cargo xtask run -- --config FILE`
    /// (default `./mqsplice.toml`).
    Run {
        /// Arguments after `mqsplice run`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Setup, then the lints and every test suite, each timed (what CI runs).
    Test {
        /// Skip `cargo fmt --check` and clippy.
        #[arg(long)]
        no_lint: bool,
    },
    /// Three embedded brokers, mqsplice in front, ten clients; prints the spread and the stats.
    Demo,
    /// Numbered-byte flows through the daemon (release) for N minutes on each data path; one
    /// line per minute per path, non-zero exit on any corrupted, hung or short flow
    /// (docs/stress.md).
    Stress {
        /// How long to run.
        #[arg(long)]
        minutes: u64,
        /// Which data path: userspace, sockmap (needs root) or both.
        #[arg(long, default_value = "both")]
        mode: String,
    },
    /// mqsplice against a direct connection, NGINX and HAProxy, side by side.
    Bench {
        /// Arguments for the bench program (`--quick`, `--rounds N`, ...).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Setup => setup::setup(),
        Cmd::Build { debug } => build(debug).map(|_| ()),
        Cmd::Run { args } => run(args),
        Cmd::Test { no_lint } => suites::test(!no_lint),
        Cmd::Demo => demo(),
        Cmd::Stress { minutes, mode } => stress(minutes, &mode),
        Cmd::Bench { args } => bench(args),
    }
}

/// The workspace root (xtask's parent directory).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Where cargo puts binaries of `profile` (`debug` or `release`).
fn target_dir(profile: &str) -> PathBuf {
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root().join("target"), PathBuf::from);
    target.join(profile)
}

/// A cargo command with the toolchain that runs xtask, in the workspace root.
fn cargo_command(args: &[&str]) -> Command {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut command = Command::new(cargo);
    command.args(args).current_dir(root());
    command
}

/// Runs a cargo subcommand, failing with its arguments on a non-zero exit.
fn cargo(args: &[&str]) -> Result<()> {
    let status = cargo_command(args).status().context("cannot start cargo")?;
    ensure!(
        status.success(),
        "cargo {} failed: {status}",
        args.join(" ")
    );
    Ok(())
}

/// Setup, then builds the daemon; returns the binary's path.
fn build(debug: bool) -> Result<PathBuf> {
    setup::setup()?;
    let mut args = vec!["build", "-p", "proxy-userspace", "--bin", "mqsplice"];
    if !debug {
        args.push("--release");
    }
    cargo(&args)?;
    Ok(target_dir(if debug { "debug" } else { "release" }).join("mqsplice"))
}

fn run(mut args: Vec<String>) -> Result<()> {
    if !args
        .iter()
        .any(|a| a == "--config" || a == "-c" || a.starts_with("--config="))
    {
        let default = PathBuf::from("mqsplice.toml");
        if !default.is_file() {
            bail!(
                "no --config given and no ./mqsplice.toml: write one (README has a full example), then `cargo xtask run -- --config FILE`"
            );
        }
        args.extend(["--config".to_string(), default.display().to_string()]);
    }
    let binary = build(false)?;
    let status = Command::new(&binary)
        .arg("run")
        .args(&args)
        .status()
        .context("cannot start mqsplice")?;
    ensure!(status.success(), "mqsplice exited with {status}");
    Ok(())
}

fn demo() -> Result<()> {
    let binary = build(true)?;
    let status = cargo_command(&["run", "-q", "-p", "mqsplice-tests", "--bin", "demo"])
        .env("MQSPLICE_BIN", &binary)
        .status()
        .context("cannot start the demo")?;
    ensure!(status.success(), "the demo failed: {status}");
    Ok(())
}

fn stress(minutes: u64, mode: &str) -> Result<()> {
    let binary = build(false)?;
    cargo(&[
        "build",
        "--release",
        "-p",
        "mqsplice-tests",
        "--bin",
        "stress",
    ])?;
    let status = Command::new(target_dir("release").join("stress"))
        .args(["--minutes", &minutes.to_string(), "--mode", mode])
        .env("MQSPLICE_BIN", &binary)
        .current_dir(root())
        .status()
        .context("cannot start the stress run")?;
    ensure!(status.success(), "the stress run failed: {status}");
    Ok(())
}

/// The peers the benchmark compares against, from Debian.
const BENCH_PACKAGES: &[&str] = &["nginx", "libnginx-mod-stream", "haproxy"];

fn bench(args: Vec<String>) -> Result<()> {
    let binary = build(false)?;
    setup::debian_packages(BENCH_PACKAGES)?;
    cargo(&[
        "build",
        "--release",
        "-p",
        "mqsplice-bench",
        "--bin",
        "bench",
    ])?;
    let status = Command::new(target_dir("release").join("bench"))
        .args(&args)
        .env("MQSPLICE_BIN", &binary)
        .current_dir(root())
        .status()
        .context("cannot start the bench")?;
    ensure!(status.success(), "the bench failed: {status}");
    Ok(())
}
