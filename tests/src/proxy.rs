//! mqsplice under test from raw TOML text, for the tests about the parser itself; every other
//! test describes its configuration with [`crate::setup::Setup`].

use mqsplice::Running;
use mqsplice::config::Config;
use std::path::PathBuf;

/// Starts mqsplice in process from a TOML document (listen on port 0; read the bound address back).
pub async fn start_toml(toml: &str) -> Running {
    let config = Config::from_toml_str(toml).unwrap_or_else(|e| panic!("test config: {e}\n{toml}"));
    mqsplice::start(config).await.expect("start mqsplice")
}

/// The built `mqsplice` binary: `cargo xtask test` passes it in `MQSPLICE_BIN`. Per-process tests
/// fail without it rather than pick up a stale build.
pub fn binary() -> PathBuf {
    let path = std::env::var_os("MQSPLICE_BIN")
        .expect("MQSPLICE_BIN is not set: run the per-process tests through `cargo xtask test`");
    let path = PathBuf::from(path);
    assert!(
        path.is_file(),
        "MQSPLICE_BIN={} is not a file",
        path.display()
    );
    path
}

/// Runs `mqsplice <command> --config <file holding text>` to completion (`check`, or a `run`
/// that is expected to fail fast), for the tests of what the binary prints and returns.
pub fn run_binary(command: &str, text: &str) -> std::process::Output {
    std::process::Command::new(binary())
        .args([command, "--config"])
        .arg(crate::daemon::write_config(text))
        .output()
        .expect("run mqsplice")
}
