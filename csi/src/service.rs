//! The CSI Identity and Node services.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bpfman_csi::v1::identity_server::Identity;
use bpfman_csi::v1::node_server::Node;
use bpfman_csi::v1::volume_capability::AccessType;
use bpfman_csi::v1::{
    GetPluginCapabilitiesRequest, GetPluginCapabilitiesResponse, GetPluginInfoRequest, GetPluginInfoResponse,
    NodeExpandVolumeRequest, NodeExpandVolumeResponse, NodeGetCapabilitiesRequest, NodeGetCapabilitiesResponse,
    NodeGetInfoRequest, NodeGetInfoResponse, NodeGetVolumeStatsRequest, NodeGetVolumeStatsResponse, NodePublishVolumeRequest,
    NodePublishVolumeResponse, NodeStageVolumeRequest, NodeStageVolumeResponse, NodeUnpublishVolumeRequest,
    NodeUnpublishVolumeResponse, NodeUnstageVolumeRequest, NodeUnstageVolumeResponse, ProbeRequest, ProbeResponse,
};
use modelcache_api::client::{Client, ClientError};
use modelcache_api::error::ErrorKind;
use modelcache_api::protocol::MountBody;
use modelcache_api::record::{VolumeRecord, VolumeState};
use modelcache_api::tenancy::RegistryCredentials;
use tonic::{Request, Response, Status};

use crate::targets::{Published, Targets};
use crate::{DRIVER_NAME, ShimConfig, mounts, request};

/// Time kept back from kubelet's deadline to answer before it expires.
const DEADLINE_MARGIN: Duration = Duration::from_millis(500);

/// The shim: stateless but for its publish records and per-target locks.
#[derive(Clone)]
pub struct Shim {
    config: ShimConfig,
    daemon: Client,
    targets: Targets,
    /// Calls for one target run one at a time: two concurrent publishes of
    /// a volume never mount twice.
    locks: Arc<Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>>,
}

/// An engine error as the gRPC status kubelet acts on: retryable codes
/// (ABORTED, UNAVAILABLE, RESOURCE_EXHAUSTED) for what may pass.
fn status_of(error: ClientError) -> Status {
    status_for(error.kind(), modelcache_api::error::chain(&error))
}

fn status_for(kind: ErrorKind, message: String) -> Status {
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
fn deadline<T>(request: &Request<T>) -> Option<Duration> {
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
            config,
            locks: Arc::default(),
        })
    }

    fn lock(&self, target: &Path) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|poison| poison.into_inner());
        // Only targets someone holds or awaits keep a lock: one per pod
        // ever seen would grow for the node's lifetime.
        locks.retain(|_, lock| Arc::strong_count(lock) > 1);
        locks.entry(target.to_owned()).or_default().clone()
    }

    async fn publish(&self, request: Request<NodePublishVolumeRequest>) -> Result<(), Status> {
        let wait = deadline(&request)
            .map(|deadline| deadline.saturating_sub(DEADLINE_MARGIN).min(self.config.publish_timeout))
            .unwrap_or(self.config.publish_timeout);
        let request = request.into_inner();
        // Arguments first, before anything is looked up.
        if request.volume_id.is_empty() {
            return Err(Status::invalid_argument("volume_id is required"));
        }
        if request.target_path.is_empty() {
            return Err(Status::invalid_argument("target_path is required"));
        }
        let capability =
            request.volume_capability.as_ref().ok_or_else(|| Status::invalid_argument("volume_capability is required"))?;
        match capability.access_type {
            Some(AccessType::Mount(_)) => {}
            Some(AccessType::Block(_)) => {
                return Err(Status::invalid_argument(
                    "block access is not supported: a modelcache volume is a read-only file tree; use a mount volume",
                ));
            }
            None => return Err(Status::invalid_argument("volume_capability has no access type")),
        }
        let target = PathBuf::from(&request.target_path);
        if !target.is_absolute() {
            return Err(Status::invalid_argument(format!("target_path `{}` is not absolute", target.display())));
        }
        let spec = request::parse_context(&request.volume_context).map_err(Status::invalid_argument)?;
        let spec_requester = spec.requester;
        request::check_pod(&spec_requester, &target).map_err(Status::invalid_argument)?;
        let published = Published {
            volume: request::volume_id(&request.volume_id),
            mount_id: request::mount_id(spec.mount_name.as_deref(), &target),
            target: target.clone(),
            csi_volume_id: request.volume_id.clone(),
            reference: spec.reference,
            options: spec.options,
            readonly: request.readonly,
        };

        let lock = self.lock(&target);
        let _one_at_a_time = lock.lock().await;
        let mounted = mounts::mount_at(&target);
        match self.targets.load(&target) {
            Some(existing) if !existing.same_request(&published) => {
                return Err(Status::already_exists(format!(
                    "{} already holds volume {} ({}, readonly {}); unpublish it first",
                    target.display(),
                    existing.csi_volume_id,
                    existing.reference,
                    existing.readonly
                )));
            }
            Some(_) if mounted.is_some() => return Ok(()),
            None if mounted.is_some() => {
                return Err(Status::already_exists(format!("{} is already a mount point", target.display())));
            }
            _ => {}
        }
        // Remembered before the engine is asked: an unpublish during the
        // pull then releases the right record.
        self.targets.save(&published).map_err(|error| Status::internal(format!("recording the publish: {error}")))?;

        let body = MountBody {
            reference: published.reference.clone(),
            exclude_weights: published.options.exclude_weights,
            patterns: published.options.patterns.clone(),
            wait_seconds: wait.as_secs_f64(),
            requester: Some(spec_requester),
            // The pod's pull secret (`nodePublishSecretRef`): passed on to
            // the daemon, never written or logged here.
            credentials: RegistryCredentials::from_secret_map(&request.secrets),
        };
        let path = format!("/v1/volumes/{}/{}", published.volume, published.mount_id);
        let answer = self.daemon.put::<_, VolumeRecord>(&path, &body).await.map_err(status_of)?;
        let record = answer.body;
        match record.state() {
            VolumeState::Ready => {}
            VolumeState::Pulling => {
                return Err(Status::aborted(format!(
                    "{} is still being pulled ({} of {} bytes); the pull goes on, retry to join it",
                    published.reference, record.bytes_done, record.bytes_total
                )));
            }
            // Failed (or released meanwhile): the record's own kind, so a
            // quota denial stays RESOURCE_EXHAUSTED and a cancellation
            // ABORTED, whichever answer carried it.
            state => {
                return Err(match record.error() {
                    Some(error) => status_for(error.kind, error.message.clone()),
                    None => Status::aborted(format!("the volume is {state:?}; retry")),
                });
            }
        }
        let stage = self.config.state_dir.join("stage");
        let mounted = std::fs::create_dir_all(&target)
            .and_then(|()| mounts::private_stage(&stage))
            .and_then(|()| mounts::bind_read_only(&record.path, &target, &stage));
        if let Err(error) = mounted {
            // INTERNAL is final for kubelet: it forgets the volume and may
            // never unpublish it, so the ready record is released here, or
            // it would hold its model against GC for good.
            if let Err(release) = self.daemon.delete::<VolumeRecord>(&path).await {
                tracing::warn!(volume = %published.csi_volume_id, "releasing after a failed bind mount: {release}");
            }
            let _ = self.targets.remove(&target);
            return Err(Status::internal(format!("bind-mounting {} at {}: {error}", record.path.display(), target.display())));
        }
        tracing::info!(volume = %published.csi_volume_id, target = %target.display(), reference = %published.reference, "published");
        Ok(())
    }

    async fn unpublish(&self, request: NodeUnpublishVolumeRequest) -> Result<(), Status> {
        if request.volume_id.is_empty() {
            return Err(Status::invalid_argument("volume_id is required"));
        }
        if request.target_path.is_empty() {
            return Err(Status::invalid_argument("target_path is required"));
        }
        let target = PathBuf::from(&request.target_path);
        let lock = self.lock(&target);
        let _one_at_a_time = lock.lock().await;
        if mounts::mount_at(&target).is_some() {
            mounts::unmount(&target).map_err(|error| Status::internal(format!("unmounting {}: {error}", target.display())))?;
        }
        match std::fs::remove_dir(&target) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
                return Err(Status::internal(format!("removing {}: {error}", target.display())));
            }
            _ => {}
        }
        // The target file is written before the daemon is ever asked, so
        // without one there is most likely nothing to release: a release by
        // the ids the request implies is tried, but a daemon that is down
        // does not fail the call, so pods on such a node still finish
        // terminating.
        let Some(published) = self.targets.load(&target) else {
            let path = format!("/v1/volumes/{}/{}", request::volume_id(&request.volume_id), request::mount_id(None, &target));
            match self.daemon.delete::<VolumeRecord>(&path).await {
                Err(error) if error.kind() != ErrorKind::NotFound => {
                    tracing::warn!(volume = %request.volume_id, target = %target.display(), "no publish recorded here; release not confirmed: {error}");
                }
                _ => {}
            }
            tracing::info!(volume = %request.volume_id, target = %target.display(), "unpublished");
            return Ok(());
        };
        let (volume, mount_id) = (published.volume, published.mount_id);
        match self.daemon.delete::<VolumeRecord>(&format!("/v1/volumes/{volume}/{mount_id}")).await {
            Ok(_) => {}
            Err(error) if error.kind() == ErrorKind::NotFound => {}
            Err(error) => return Err(status_of(error)),
        }
        self.targets.remove(&target).map_err(|error| Status::internal(format!("forgetting the publish: {error}")))?;
        tracing::info!(volume = %request.volume_id, target = %target.display(), "unpublished");
        Ok(())
    }
}

#[tonic::async_trait]
impl Identity for Shim {
    async fn get_plugin_info(&self, _: Request<GetPluginInfoRequest>) -> Result<Response<GetPluginInfoResponse>, Status> {
        Ok(Response::new(GetPluginInfoResponse {
            name: DRIVER_NAME.into(),
            vendor_version: env!("CARGO_PKG_VERSION").into(),
            manifest: HashMap::new(),
        }))
    }

    /// A node-only plugin: no controller service, no topology.
    async fn get_plugin_capabilities(
        &self,
        _: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        Ok(Response::new(GetPluginCapabilitiesResponse { capabilities: Vec::new() }))
    }

    /// Ready when the daemon answers.
    async fn probe(&self, _: Request<ProbeRequest>) -> Result<Response<ProbeResponse>, Status> {
        let ready = Client::new(&self.config.daemon_socket).healthy().await;
        Ok(Response::new(ProbeResponse { ready: Some(ready) }))
    }
}

#[tonic::async_trait]
impl Node for Shim {
    async fn node_stage_volume(&self, _: Request<NodeStageVolumeRequest>) -> Result<Response<NodeStageVolumeResponse>, Status> {
        Err(Status::unimplemented("modelcache volumes are not staged"))
    }

    async fn node_unstage_volume(
        &self,
        _: Request<NodeUnstageVolumeRequest>,
    ) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        Err(Status::unimplemented("modelcache volumes are not staged"))
    }

    async fn node_publish_volume(
        &self,
        request: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        self.publish(request).await.map(|()| Response::new(NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        self.unpublish(request.into_inner()).await.map(|()| Response::new(NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        _: Request<NodeGetVolumeStatsRequest>,
    ) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        Err(Status::unimplemented("volume stats are not reported"))
    }

    async fn node_expand_volume(
        &self,
        _: Request<NodeExpandVolumeRequest>,
    ) -> Result<Response<NodeExpandVolumeResponse>, Status> {
        Err(Status::unimplemented("modelcache volumes do not expand"))
    }

    async fn node_get_capabilities(
        &self,
        _: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        Ok(Response::new(NodeGetCapabilitiesResponse { capabilities: Vec::new() }))
    }

    async fn node_get_info(&self, _: Request<NodeGetInfoRequest>) -> Result<Response<NodeGetInfoResponse>, Status> {
        Ok(Response::new(NodeGetInfoResponse {
            node_id: self.config.node_id.clone(),
            max_volumes_per_node: 0,
            accessible_topology: None,
        }))
    }
}
