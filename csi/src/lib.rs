//! The CSI node shim: kubelet's NodePublish and NodeUnpublish calls turned
//! into calls on the modelcache daemon's API, plus a read-only bind mount.
//!
//! - [`request`]: a publish's `volume_context` (or a static PV's
//!   `volumeAttributes`) as a mount request; ids kubelet gives mapped to the
//!   engine's volume and mount ids.
//! - [`mounts`]: bind mounts and the mount table.
//! - [`targets`]: what the shim published where, so an unpublish after a
//!   restart still knows which engine record to release.
//! - [`releases`]: releases the daemon has not confirmed, retried until it
//!   does.
//! - [`calls`]: every call as a log line and as metrics.
//! - [`publish`]: NodePublish and NodeUnpublish, of model and runtime
//!   volumes.
//! - [`service`]: the Identity and Node services.
//! - [`controller`]: the Controller service, for dynamic provisioning.
//!
//! The shim never touches the store: it asks the daemon for a volume's tree
//! and bind-mounts that tree read-only at kubelet's target path.

pub mod calls;
pub mod controller;
pub mod mounts;
pub mod publish;
pub mod releases;
pub mod request;
pub mod service;
pub mod targets;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use bpfman_csi::v1::controller_server::ControllerServer;
use bpfman_csi::v1::identity_server::IdentityServer;
use bpfman_csi::v1::node_server::NodeServer;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

/// The name kubelet knows the driver by.
pub const DRIVER_NAME: &str = "csi.modelcache.io";

/// Which services the process offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Identity and Node, beside the daemon on every node (a DaemonSet).
    Node,
    /// Identity and Controller, beside the external-provisioner (a
    /// Deployment); it needs no daemon.
    Controller,
}

/// How the shim runs.
#[derive(Clone, Debug)]
pub struct ShimConfig {
    pub mode: Mode,
    /// Where kubelet reaches the shim.
    pub endpoint: PathBuf,
    /// The daemon's API socket.
    pub daemon_socket: PathBuf,
    /// This node's id (the Kubernetes node name).
    pub node_id: String,
    /// Where the shim remembers its publishes.
    pub state_dir: PathBuf,
    /// How long a publish waits for the model before answering ABORTED
    /// while the pull goes on (kubelet gives a call about 2 minutes).
    pub publish_timeout: Duration,
    /// How often releases the daemon did not confirm are retried.
    pub release_retry: Duration,
    /// Where `/metrics` is served, if anywhere.
    pub metrics_address: Option<SocketAddr>,
}

/// Serves the Identity and Node services on `config.endpoint` until
/// `shutdown` resolves.
///
/// # Errors
/// When the socket cannot be bound or serving fails.
pub async fn serve(config: ShimConfig, shutdown: impl std::future::Future<Output = ()> + Send) -> anyhow::Result<()> {
    if let Some(parent) = config.endpoint.parent() {
        std::fs::create_dir_all(parent)?;
    }
    match std::fs::remove_file(&config.endpoint) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => return Err(error.into()),
        _ => {}
    }
    let listener = UnixListener::bind(&config.endpoint)?;
    let shim = service::Shim::new(config.clone())?;
    if let Some(address) = config.metrics_address {
        let metrics = tokio::net::TcpListener::bind(address).await?;
        let shim = shim.clone();
        let router = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || {
                let shim = shim.clone();
                async move {
                    let text = tokio::task::spawn_blocking(move || shim.metrics_text()).await.unwrap_or_default();
                    ([(axum::http::header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text)
                }
            }),
        );
        tokio::spawn(async move {
            if let Err(error) = axum::serve(metrics, router).await {
                tracing::error!("serving metrics: {error}");
            }
        });
    }
    let server = tonic::transport::Server::builder().add_service(IdentityServer::new(shim.clone()));
    let server = match config.mode {
        Mode::Node => {
            // Owed releases: at start, then periodically.
            let retrying = shim.clone();
            let retry = config.release_retry;
            tokio::spawn(async move {
                loop {
                    retrying.retry_releases().await;
                    tokio::time::sleep(retry).await;
                }
            });
            tracing::info!(endpoint = %config.endpoint.display(), daemon = %config.daemon_socket.display(), "CSI node service serving");
            server.add_service(NodeServer::new(shim))
        }
        Mode::Controller => {
            tracing::info!(endpoint = %config.endpoint.display(), "CSI controller service serving");
            let provisioner = controller::Provisioner::new(config.state_dir.join("volumes"), shim.metrics());
            server.add_service(ControllerServer::new(provisioner))
        }
    };
    server.serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown).await?;
    let _ = std::fs::remove_file(&config.endpoint);
    Ok(())
}
