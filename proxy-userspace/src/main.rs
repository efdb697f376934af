//! The `mqsplice` command: `run` and `check` a configuration file.

use clap::{Parser, Subcommand};
use mqsplice::config::Config;
use std::path::PathBuf;
use std::process::ExitCode;

/// Exit code for a configuration that does not parse or validate.
const EXIT_CONFIG: u8 = 2;
/// Exit code for a failure to start (bind, data plane) or at run time.
const EXIT_RUNTIME: u8 = 1;

#[derive(Parser)]
#[command(
    name = "mqsplice",
    version,
    about = "MQTT load balancer with an in-kernel data path"
)]
struct Cli {
    /// Log filter: error, warn, info, debug, trace, or a tracing directive such as `mqsplice=debug`.
    #[arg(long, global = true, default_value = "info")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy with a configuration file.
    Run {
        /// Path of the TOML configuration file.
        #[arg(long, short)]
        config: PathBuf,
        /// Runtime worker threads (default: one per CPU the process may run on); 1 pins the
        /// whole data path to one core, as NGINX's `worker_processes 1` does.
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
        worker_threads: Option<u16>,
    },
    /// Validate a configuration file and exit (0 when valid).
    Check {
        /// Path of the TOML configuration file.
        #[arg(long, short)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.log_level).unwrap_or_else(|e| {
        eprintln!(
            "mqsplice: bad --log-level {:?} ({e}); using info",
            cli.log_level
        );
        tracing_subscriber::EnvFilter::new("info")
    });
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();

    match cli.command {
        Command::Check { config } => match Config::load(&config) {
            Ok(loaded) => {
                // The files a tls listener names must be readable and fit together too.
                for listener in &loaded.listeners {
                    if let Some(tls) = &listener.tls
                        && let Err(e) = mqsplice::tls::ServerTls::new(tls, &[])
                    {
                        eprintln!("mqsplice: listener {:?}: {e:#}", listener.name);
                        return ExitCode::from(EXIT_CONFIG);
                    }
                }
                println!("{}: ok", config.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("mqsplice: {e}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::Run {
            config,
            worker_threads,
        } => {
            let config = match Config::load(&config) {
                Ok(config) => config,
                Err(e) => {
                    eprintln!("mqsplice: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            raise_open_file_limit();
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            builder.enable_all();
            if let Some(n) = worker_threads {
                builder.worker_threads(usize::from(n));
            }
            let runtime = match builder.build() {
                Ok(runtime) => runtime,
                Err(e) => {
                    eprintln!("mqsplice: cannot start the runtime: {e}");
                    return ExitCode::from(EXIT_RUNTIME);
                }
            };
            match runtime.block_on(run(config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("mqsplice: {e:#}");
                    ExitCode::from(EXIT_RUNTIME)
                }
            }
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let running = mqsplice::start(config).await?;
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate())?;
    let mut hangup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => { tracing::info!("SIGINT: stopping"); break }
            _ = terminate.recv() => { tracing::info!("SIGTERM: stopping"); break }
            _ = hangup.recv() => {
                let reloaded = running.reload_tls();
                if reloaded.is_empty() {
                    tracing::info!("SIGHUP: no TLS listener, nothing to reload");
                }
                for (listener, result) in reloaded {
                    match result {
                        Ok(()) => tracing::info!(%listener, "SIGHUP: TLS certificate, key and CAs reloaded"),
                        Err(e) => tracing::error!(%listener, "SIGHUP: TLS files not reloaded, keeping the old ones: {e:#}"),
                    }
                }
            }
        }
    }
    running.shutdown();
    Ok(())
}

/// Every connection costs two descriptors; the usual soft limit of 1024 would cap a proxy at ~500.
fn raise_open_file_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::info!("open-file limit: {limit}"),
        Err(e) => tracing::warn!(
            "could not raise the open-file limit ({e}); connections may be refused early"
        ),
    }
}
