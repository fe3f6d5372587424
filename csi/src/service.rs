//! The CSI Identity and Node services: the shim's state, and each call
//! logged and counted (publishing itself is in [`crate::publish`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bpfman_csi::v1::identity_server::Identity;
use bpfman_csi::v1::node_server::Node;
use bpfman_csi::v1::{
    GetPluginCapabilitiesRequest, GetPluginCapabilitiesResponse, GetPluginInfoRequest, GetPluginInfoResponse,
    NodeExpandVolumeRequest, NodeExpandVolumeResponse, NodeGetCapabilitiesRequest, NodeGetCapabilitiesResponse,
    NodeGetInfoRequest, NodeGetInfoResponse, NodeGetVolumeStatsRequest, NodeGetVolumeStatsResponse, NodePublishVolumeRequest,
    NodePublishVolumeResponse, NodeStageVolumeRequest, NodeStageVolumeResponse, NodeUnpublishVolumeRequest,
    NodeUnpublishVolumeResponse, NodeUnstageVolumeRequest, NodeUnstageVolumeResponse, PluginCapability, ProbeRequest,
    ProbeResponse, plugin_capability,
};
use modelcache_api::client::{Client, ClientError};
use modelcache_api::error::ErrorKind;
use tonic::{Request, Response, Status};

use crate::calls::{Call, Metrics};
use crate::releases::Releases;
use crate::targets::Targets;
use crate::{DRIVER_NAME, Mode, ShimConfig, mounts, request};

/// Time kept back from kubelet's deadline to answer before it expires.
pub(crate) const DEADLINE_MARGIN: Duration = Duration::from_millis(500);

/// The shim: stateless but for its publish records and per-target locks.
#[derive(Clone)]
pub struct Shim {
    pub(crate) config: ShimConfig,
    pub(crate) daemon: Client,
    pub(crate) targets: Targets,
    pub(crate) releases: Releases,
    metrics: Metrics,
    /// Calls for one target run one at a time: two concurrent publishes of
    /// a volume never mount twice.
    locks: Arc<Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>>,
}

/// An engine error as the gRPC status kubelet acts on: retryable codes
/// (ABORTED, UNAVAILABLE, RESOURCE_EXHAUSTED) for what may pass.
pub(crate) fn status_of(error: ClientError) -> Status {
    status_for(error.kind(), modelcache_api::error::chain(&error))
}

pub(crate) fn status_for(kind: ErrorKind, message: String) -> Status {
    match kind {
        ErrorKind::InvalidArgument => Status::invalid_argument(message),
        ErrorKind::NotFound => Status::not_found(message),
        ErrorKind::Conflict => Status::already_exists(message),
        ErrorKind::QuotaDenied => Status::resource_exhausted(message),
        ErrorKind::PermissionDenied => Status::permission_denied(message),
        ErrorKind::Unavailable => Status::unavailable(message),
        ErrorKind::DataLoss => Status::data_loss(message),
        ErrorKind::PolicyFailed => Status::failed_precondition(message),
        ErrorKind::Cancelled => Status::aborted(message),
        ErrorKind::Internal => Status::internal(message),
    }
}

/// The deadline kubelet set on the call (`grpc-timeout`), if any.
pub(crate) fn deadline<T>(request: &Request<T>) -> Option<Duration> {
    let text = request.metadata().get("grpc-timeout")?.to_str().ok()?;
    let (value, unit) = text.split_at(text.len().checked_sub(1)?);
    let value: u64 = value.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(value * 3600),
        "M" => Duration::from_secs(value * 60),
        "S" => Duration::from_secs(value),
        "m" => Duration::from_millis(value),
        "u" => Duration::from_micros(value),
        "n" => Duration::from_nanos(value),
        _ => return None,
    })
}

impl Shim {
    /// # Errors
    /// When the state directory cannot be made.
    pub fn new(config: ShimConfig) -> std::io::Result<Shim> {
        std::fs::create_dir_all(&config.state_dir)?;
        Ok(Shim {
            daemon: Client::new(&config.daemon_socket),
            targets: Targets::new(config.state_dir.join("targets")),
            releases: Releases::new(config.state_dir.join("releases")),
            metrics: Metrics::default(),
            config,
            locks: Arc::default(),
        })
    }

    pub(crate) fn lock(&self, target: &Path) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|poison| poison.into_inner());
        // Only targets someone holds or awaits keep a lock: one per pod
        // ever seen would grow for the node's lifetime.
        locks.retain(|_, lock| Arc::strong_count(lock) > 1);
        locks.entry(target.to_owned()).or_default().clone()
    }

    /// Targets the shim holds mounted now: (ephemeral, persistent).
    fn published_by_kind(&self) -> (usize, usize) {
        let mounted: Vec<bool> = self
            .targets
            .list()
            .into_iter()
            .filter(|published| mounts::mount_at(&published.target).is_some())
            .map(|published| published.ephemeral)
            .collect();
        let ephemeral = mounted.iter().filter(|ephemeral| **ephemeral).count();
        (ephemeral, mounted.len() - ephemeral)
    }

    /// The metrics the services count into.
    pub fn metrics(&self) -> Metrics {
        self.metrics.clone()
    }

    /// The metrics, published volumes counted now.
    pub fn metrics_text(&self) -> String {
        self.metrics.encode(self.published_by_kind())
    }
}

/// Who a call is about, for its log line: the pod's namespace and name from
/// the volume context, else its UID from the target path.
fn pod_of(context: &HashMap<String, String>, target: &str) -> String {
    match (context.get(request::POD_NAMESPACE), context.get(request::POD_NAME)) {
        (Some(namespace), Some(name)) => format!("{namespace}/{name}"),
        _ => request::pod_uid_in(Path::new(target)).unwrap_or_default(),
    }
}

#[tonic::async_trait]
impl Identity for Shim {
    async fn get_plugin_info(&self, _: Request<GetPluginInfoRequest>) -> Result<Response<GetPluginInfoResponse>, Status> {
        let call = Call::start("GetPluginInfo", "", String::new());
        call.finish(
            &self.metrics,
            Ok(Response::new(GetPluginInfoResponse {
                name: DRIVER_NAME.into(),
                vendor_version: env!("CARGO_PKG_VERSION").into(),
                manifest: HashMap::new(),
            })),
        )
    }

    /// The controller service in controller mode; no topology.
    async fn get_plugin_capabilities(
        &self,
        _: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        let call = Call::start("GetPluginCapabilities", "", String::new());
        let capabilities = match self.config.mode {
            Mode::Node => Vec::new(),
            Mode::Controller => vec![PluginCapability {
                r#type: Some(plugin_capability::Type::Service(plugin_capability::Service {
                    r#type: plugin_capability::service::Type::ControllerService as i32,
                })),
            }],
        };
        call.finish(&self.metrics, Ok(Response::new(GetPluginCapabilitiesResponse { capabilities })))
    }

    /// The shim's own liveness (the livenessprobe sidecar asks): ready
    /// whenever it answers. The daemon's health is its own container's
    /// probes': a shim restarted for a daemon that is down would leave
    /// kubelet no socket to unpublish through, and unpublish needs no daemon.
    async fn probe(&self, _: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
        let call = Call::start("Probe", "", String::new());
        call.finish(&self.metrics, Ok(Response::new(ProbeResponse { ready: Some(true) })))
    }
}

#[tonic::async_trait]
impl Node for Shim {
    async fn node_stage_volume(&self, _: Request<NodeStageVolumeRequest>) -> Result<Response<NodeStageVolumeResponse>, Status> {
        let call = Call::start("NodeStageVolume", "", String::new());
        call.finish(&self.metrics, Err(Status::unimplemented("modelcache volumes are not staged")))
    }

    async fn node_unstage_volume(
        &self,
        _: Request<NodeUnstageVolumeRequest>,
    ) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        let call = Call::start("NodeUnstageVolume", "", String::new());
        call.finish(&self.metrics, Err(Status::unimplemented("modelcache volumes are not staged")))
    }

    async fn node_publish_volume(
        &self,
        request: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        let inner = request.get_ref();
        let call = Call::start("NodePublishVolume", &inner.volume_id, pod_of(&inner.volume_context, &inner.target_path));
        let result = self.publish(request).await.map(|()| Response::new(NodePublishVolumeResponse {}));
        call.finish(&self.metrics, result)
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let request = request.into_inner();
        let call = Call::start("NodeUnpublishVolume", &request.volume_id, pod_of(&HashMap::new(), &request.target_path));
        let result = self.unpublish(request).await.map(|()| Response::new(NodeUnpublishVolumeResponse {}));
        call.finish(&self.metrics, result)
    }

    async fn node_get_volume_stats(
        &self,
        request: Request<NodeGetVolumeStatsRequest>,
    ) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        let call = Call::start("NodeGetVolumeStats", &request.get_ref().volume_id, String::new());
        call.finish(&self.metrics, Err(Status::unimplemented("volume stats are not reported")))
    }

    async fn node_expand_volume(
        &self,
        request: Request<NodeExpandVolumeRequest>,
    ) -> Result<Response<NodeExpandVolumeResponse>, Status> {
        let call = Call::start("NodeExpandVolume", &request.get_ref().volume_id, String::new());
        call.finish(&self.metrics, Err(Status::unimplemented("modelcache volumes do not expand")))
    }

    async fn node_get_capabilities(
        &self,
        _: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        let call = Call::start("NodeGetCapabilities", "", String::new());
        call.finish(&self.metrics, Ok(Response::new(NodeGetCapabilitiesResponse { capabilities: Vec::new() })))
    }

    async fn node_get_info(&self, _: Request<NodeGetInfoRequest>) -> Result<Response<NodeGetInfoResponse>, Status> {
        let call = Call::start("NodeGetInfo", "", String::new());
        call.finish(
            &self.metrics,
            Ok(Response::new(NodeGetInfoResponse {
                node_id: self.config.node_id.clone(),
                max_volumes_per_node: 0,
                accessible_topology: None,
            })),
        )
    }
}
