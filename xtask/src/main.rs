//! Developer and CI entry point: `cargo xtask <command>` (alias in .cargo/config.toml).
//!
//! One place for the steps that need more than cargo (nightly, bpf-linker, Debian packages,
//! root), so CI (`.ci/run`) and humans run exactly the same thing.

mod setup;

use std::process::Command;

use anyhow::{Context as _, Result, ensure};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Build, test and demo mqsplice")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what building the eBPF data plane needs (idempotent).
    Setup,
    /// Setup, then build the daemon (release unless --debug).
    Build {
        /// Build the dev profile instead of release.
        #[arg(long)]
        debug: bool,
    },
    /// Build and run the daemon.
    Run,
    /// Setup, then run the test suite (what CI runs).
    Test,
    /// Start brokers and the balancer and show a client session going through it.
    Demo,
    /// Compare throughput/latency of the data planes.
    Bench,
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Setup => setup::setup(),
        Cmd::Build { debug } => build(debug),
        Cmd::Run => run(),
        Cmd::Test => test(),
        Cmd::Demo => demo(),
        Cmd::Bench => bench(),
    }
}

/// Runs a cargo subcommand with the same toolchain that runs xtask.
fn cargo(args: &[&str]) -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(&cargo)
        .args(args)
        .status()
        .with_context(|| format!("cannot start {cargo}"))?;
    ensure!(
        status.success(),
        "cargo {} failed: {status}",
        args.join(" ")
    );
    Ok(())
}

fn build(debug: bool) -> Result<()> {
    setup::setup()?;
    let mut args = vec!["build", "-p", "proxy-userspace"];
    if !debug {
        args.push("--release");
    }
    cargo(&args)
}

fn run() -> Result<()> {
    build(false)?;
    println!("xtask run: TODO (start target/release/mqsplice with a config)");
    Ok(())
}

fn test() -> Result<()> {
    setup::setup()?;
    println!("xtask test: TODO (workspace tests, clippy, fmt); running the eBPF load test for now");
    cargo(&[
        "test",
        "-p",
        "proxy-userspace",
        "--test",
        "ebpf_load",
        "--",
        "--nocapture",
    ])
}

fn demo() -> Result<()> {
    setup::setup()?;
    println!("xtask demo: TODO");
    Ok(())
}

fn bench() -> Result<()> {
    setup::setup()?;
    println!("xtask bench: TODO");
    Ok(())
}
