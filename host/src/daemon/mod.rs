//! `modelcache serve`: one long-lived engine per node, its API on a unix
//! socket, metrics over HTTP, GC on schedule, plugins reloaded when their
//! directory changes, and a graceful end on SIGTERM.

pub mod config;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use notify::Watcher;
use tokio::sync::watch;

use crate::api::server::serve;
use crate::api::sockets::{VolumeSockets, bind};
use crate::engine::{Engine, EngineError};
pub use config::{ConfigError, LogFormat, ServeConfig};

/// Why the daemon could not run.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("cannot serve {what} at {address}")]
    Listen {
        what: &'static str,
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot watch the plugin directory {}", dir.display())]
    Watch {
        dir: std::path::PathBuf,
        #[source]
        source: notify::Error,
    },
}

/// What happened at shutdown.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stopped {
    /// Mounts still under way when the shutdown timeout ran out.
    pub cancelled: usize,
}

/// Runs the daemon until `stop` resolves (the binary passes SIGTERM/SIGINT).
///
/// # Errors
/// When the engine cannot open or a socket cannot be served.
pub async fn run(
    config: ServeConfig,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<Stopped, DaemonError> {
    let engine_config = config.engine.clone();
    // Opening waits for the root lock and recovers the store: blocking work.
    let engine = tokio::task::spawn_blocking(move || Engine::open(engine_config))
        .await
        .map_err(|source| EngineError::Join { step: "open the engine", source })??;
    let (recovery, failed) = engine.recovery();
    tracing::info!(
        root = %config.engine.root.display(),
        temporaries = recovery.temporaries.len(),
        incomplete_entries = recovery.incomplete_entries.len(),
        failed_records = failed.len(),
        "engine open"
    );

    let periodic = config.gc_interval.map(|interval| engine.spawn_periodic_gc(interval));
    let _watcher = match engine.plugins().dir() {
        Some(dir) => Some(watch_plugins(&engine, dir)?),
        None => None,
    };
    let (stopping, stopped) = watch::channel(false);
    if let Some(address) = config.metrics_address {
        let listener = tokio::net::TcpListener::bind(address).await.map_err(|source| DaemonError::Listen {
            what: "metrics",
            address: address.to_string(),
            source,
        })?;
        tokio::spawn(serve_metrics(listener, engine.clone(), stopped.clone()));
        tracing::info!(%address, "metrics at /metrics");
    }

    let listener = bind(&config.socket, config.socket_mode).map_err(|source| DaemonError::Listen {
        what: "the API",
        address: config.socket.display().to_string(),
        source,
    })?;
    let sockets = Arc::new(VolumeSockets::new(config.volume_sockets.clone()));
    tracing::info!(socket = %config.socket.display(), "serving the API");
    let mut api_stopped = stopped.clone();
    let api = tokio::spawn(serve(listener, engine.clone(), sockets.clone(), async move {
        let _ = api_stopped.wait_for(|stopping| *stopping).await;
    }));

    stop.await;
    tracing::info!(timeout_ms = config.shutdown_timeout.as_millis() as u64, "shutting down: no new requests");
    let _ = stopping.send(true);
    sockets.close_all();
    if let Some(periodic) = periodic {
        periodic.abort();
    }
    let cancelled = engine.shutdown(config.shutdown_timeout).await;
    // In-flight API calls (waiting mounts) end with their mounts.
    let _ = tokio::time::timeout(Duration::from_secs(5), api).await;
    let _ = std::fs::remove_file(&config.socket);
    tracing::info!(cancelled, "stopped");
    Ok(Stopped { cancelled })
}

/// Reloads the plugin set when the directory changes, debounced: editors
/// and copies write in bursts, and a half-written `.wasm` is not worth
/// compiling (a refused new version would keep the old one serving anyway).
fn watch_plugins(engine: &Arc<Engine>, dir: &Path) -> Result<notify::RecommendedWatcher, DaemonError> {
    const QUIET: Duration = Duration::from_millis(300);
    let (events, mut receiver) = tokio::sync::mpsc::unbounded_channel::<()>();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok_and(|event| !event.kind.is_access()) {
            let _ = events.send(());
        }
    })
    .map_err(|source| DaemonError::Watch { dir: dir.to_owned(), source })?;
    watcher
        .watch(dir, notify::RecursiveMode::NonRecursive)
        .map_err(|source| DaemonError::Watch { dir: dir.to_owned(), source })?;
    let engine = Arc::downgrade(engine);
    tokio::spawn(async move {
        while receiver.recv().await.is_some() {
            // Wait until the directory has been quiet for a moment.
            while tokio::time::timeout(QUIET, receiver.recv()).await.is_ok_and(|event| event.is_some()) {}
            let Some(engine) = engine.upgrade() else { return };
            let set = tokio::task::spawn_blocking(move || engine.plugins().reload()).await;
            if let Ok(set) = set {
                let refused = set.statuses().iter().filter(|status| status.error.is_some()).count();
                tracing::info!(loaded = set.plugins().len(), with_errors = refused, "plugin directory changed: reloaded");
            }
        }
    });
    Ok(watcher)
}

async fn serve_metrics(listener: tokio::net::TcpListener, engine: Arc<Engine>, mut stopped: watch::Receiver<bool>) {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let engine = engine.clone();
            async move {
                let gauges = crate::metrics::Gauges {
                    store_bytes: engine.store().cache_bytes(),
                    reserved_bytes: engine.reserved_bytes(),
                    active_mounts: engine.active_mounts() as u64,
                };
                ([("content-type", "text/plain; version=0.0.4")], crate::metrics::metrics().render(gauges))
            }
        }),
    );
    let shutdown = async move {
        let _ = stopped.wait_for(|stopping| *stopping).await;
    };
    if let Err(error) = axum::serve(listener, app).with_graceful_shutdown(shutdown).await {
        tracing::error!("metrics server stopped: {error}");
    }
}
