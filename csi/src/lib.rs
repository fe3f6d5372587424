//! The CSI node shim: kubelet's NodePublish and NodeUnpublish calls turned
//! into calls on the modelcache daemon's API, plus a read-only bind mount.
//!
//! - [`request`]: a publish's `volume_context` (or a static PV's
//!   `volumeAttributes`) as a mount request; ids kubelet gives mapped to the
//!   engine's volume and mount ids.
//! - [`mounts`]: bind mounts and the mount table.
//! - [`targets`]: what the shim published where, so an unpublish after a
//!   restart still knows which engine record to release.
//! - [`service`]: the Identity and Node services.
//!
//! The shim never touches the store: it asks the daemon for a volume's tree
//! and bind-mounts that tree read-only at kubelet's target path.

pub mod mounts;
pub mod request;
pub mod service;
pub mod targets;

use std::path::PathBuf;
use std::time::Duration;

use bpfman_csi::v1::identity_server::IdentityServer;
use bpfman_csi::v1::node_server::NodeServer;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;

/// The name kubelet knows the driver by.
pub const DRIVER_NAME: &str = "csi.modelcache.io";

/// How the shim runs.
#[derive(Clone, Debug)]
pub struct ShimConfig {
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
    tracing::info!(endpoint = %config.endpoint.display(), daemon = %config.daemon_socket.display(), "CSI node shim serving");
    tonic::transport::Server::builder()
        .add_service(IdentityServer::new(shim.clone()))
        .add_service(NodeServer::new(shim))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await?;
    let _ = std::fs::remove_file(&config.endpoint);
    Ok(())
}
