//! `modelcache-csi`: the CSI node plugin kubelet talks to.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use modelcache_csi::{Mode, ShimConfig, serve};
use tracing_subscriber::EnvFilter;

/// The modelcache CSI node shim.
#[derive(Debug, Parser)]
#[command(name = "modelcache-csi", version, about)]
struct Args {
    /// The services to offer: `node` beside the daemon on every node,
    /// `controller` beside the external-provisioner.
    #[arg(long, value_enum, default_value = "node")]
    mode: Mode,
    /// The CSI endpoint kubelet calls (a unix socket path; `unix://` is accepted).
    #[arg(long, env = "CSI_ENDPOINT", default_value = "/csi/csi.sock")]
    endpoint: String,
    /// The modelcache daemon's API socket.
    #[arg(long, env = "MODELCACHE_SOCKET", default_value = modelcache_api::DEFAULT_SOCKET)]
    daemon_socket: PathBuf,
    /// This node's id (the Kubernetes node name); the node service needs it.
    #[arg(long, env = "NODE_NAME", default_value = "")]
    node_id: String,
    /// Where the shim remembers what it published.
    #[arg(long, env = "MODELCACHE_CSI_STATE", default_value = "/var/lib/modelcache-csi")]
    state_dir: PathBuf,
    /// Seconds a publish waits for the model before answering ABORTED while
    /// the pull goes on (kubelet allows a call about 120 s).
    #[arg(long, default_value_t = 100)]
    publish_timeout: u64,
    /// Seconds between retries of releases the daemon did not confirm (an
    /// unpublish while it was down).
    #[arg(long, default_value_t = 30)]
    release_retry: u64,
    /// Where to serve `/metrics` (e.g. `0.0.0.0:9465`); none when unset.
    #[arg(long, env = "MODELCACHE_CSI_METRICS")]
    metrics_address: Option<std::net::SocketAddr>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = EnvFilter::try_from_env("MODELCACHE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(false).init();
    if args.mode == Mode::Node && args.node_id.is_empty() {
        anyhow::bail!("the node service needs this node's id: pass --node-id or set NODE_NAME (the manifests set it)");
    }
    let config = ShimConfig {
        mode: args.mode,
        endpoint: PathBuf::from(args.endpoint.trim_start_matches("unix://")),
        daemon_socket: args.daemon_socket,
        node_id: args.node_id,
        state_dir: args.state_dir,
        publish_timeout: Duration::from_secs(args.publish_timeout),
        release_retry: Duration::from_secs(args.release_retry.max(1)),
        metrics_address: args.metrics_address,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let stop = async {
            use tokio::signal::unix::{SignalKind, signal};
            if let (Ok(mut terminate), Ok(mut interrupt)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
                tokio::select! {
                    _ = terminate.recv() => {}
                    _ = interrupt.recv() => {}
                }
            } else {
                std::future::pending::<()>().await;
            }
        };
        serve(config, stop).await
    })
}
