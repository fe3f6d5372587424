//! `modelcache serve --config FILE`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use modelcache::daemon::{self, ServeConfig};

use super::LogFormat;

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// The daemon's configuration (TOML; see docs/modelcache.toml). Without
    /// one, every key takes its default.
    #[arg(long, env = "MODELCACHE_CONFIG")]
    pub config: Option<PathBuf>,
}

pub fn run(args: ServeArgs, log_format: Option<LogFormat>) -> anyhow::Result<ExitCode> {
    let config = match &args.config {
        Some(path) => ServeConfig::load(path)?,
        None => ServeConfig::parse("").map_err(|(key, reason)| anyhow::anyhow!("{key}: {reason}"))?,
    };
    let format = log_format.unwrap_or(match config.log_format {
        daemon::LogFormat::Text => LogFormat::Text,
        daemon::LogFormat::Json => LogFormat::Json,
    });
    super::init_logging(format, &config.log_level);
    limit_malloc_arenas();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")?;
    let stopped = runtime.block_on(async {
        let stop = async {
            use tokio::signal::unix::{SignalKind, signal};
            let (Ok(mut terminate), Ok(mut interrupt)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
            else {
                return std::future::pending().await;
            };
            tokio::select! {
                _ = terminate.recv() => tracing::info!("SIGTERM"),
                _ = interrupt.recv() => tracing::info!("SIGINT"),
            }
        };
        daemon::run(config, stop).await
    })?;
    // Blocking steps of cancelled pulls finish before the runtime goes.
    drop(runtime);
    tracing::debug!(cancelled = stopped.cancelled, "daemon exited");
    Ok(ExitCode::SUCCESS)
}

/// One malloc arena per core (at least two). glibc gives threads their own
/// arenas, up to 8 per core, and an arena keeps what was freed in it; a
/// pull's chunks are allocated on the network workers and freed on blocking
/// writer threads, so with an arena per thread every writer would hold some
/// and the daemon's memory during a pull would grow with its thread count
/// (figures, and the alternative measured, in B6 of docs/benchmarks.md).
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let cores = std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get).max(2);
        // SAFETY: mallopt only sets an allocator tunable; called before the
        // runtime's threads start.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, i32::try_from(cores).unwrap_or(i32::MAX));
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct HealthArgs {
    /// The daemon's API socket.
    #[arg(long, env = "MODELCACHE_SOCKET", default_value = modelcache::daemon::config::DEFAULT_SOCKET)]
    pub socket: PathBuf,
}

pub fn health(args: HealthArgs) -> anyhow::Result<ExitCode> {
    let health = super::backend::runtime(super::backend::Threads::One)?.block_on(async {
        modelcache::api::client::Client::new(&args.socket).get::<modelcache::api::Health>("/v1/health").await
    });
    match health {
        Ok(health) => {
            outln!(
                "{} (pid {}, {} mounts under way, {} plugins loaded)",
                health.status,
                health.pid,
                health.active_mounts,
                health.plugins_loaded
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(error) => {
            eprintln!("unhealthy: {}", modelcache::error::chain(&error));
            Ok(ExitCode::FAILURE)
        }
    }
}
