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
    NodeUnpublishVolumeResponse, NodeUnstageVolumeRequest, NodeUnstageVolumeResponse, PluginCapability, ProbeRequest,
    ProbeResponse, plugin_capability,
};
use modelcache_api::client::{Client, ClientError};
use modelcache_api::error::ErrorKind;
use modelcache_api::protocol::MountBody;
use modelcache_api::record::{VolumeRecord, VolumeState};
use modelcache_api::tenancy::RegistryCredentials;
use tonic::{Code, Request, Response, Status};

use crate::calls::{Call, Metrics};
use crate::mounts::MountEntry;
use crate::releases::{Release, Releases, record_path};
use crate::targets::{Published, Targets};
use crate::{DRIVER_NAME, Mode, ShimConfig, mounts, request};

/// Time kept back from kubelet's deadline to answer before it expires.
const DEADLINE_MARGIN: Duration = Duration::from_millis(500);

/// How long a release waits for the daemon before it is owed instead.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(10);

/// The shim: stateless but for its publish records and per-target locks.
#[derive(Clone)]
pub struct Shim {
    config: ShimConfig,
    daemon: Client,
    targets: Targets,
    releases: Releases,
    metrics: Metrics,
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
            releases: Releases::new(config.state_dir.join("releases")),
            metrics: Metrics::default(),
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
        // kubelet takes a volume published without `readonly` as writable
        // (it may relabel or chown it); the tree is read-only, and shared.
        if !request.readonly {
            return Err(Status::invalid_argument(
                "readOnly is false, but a modelcache volume is read-only: set `readOnly: true` on the pod's inline csi \
                 volume, or on the pod's persistentVolumeClaim volume",
            ));
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
            ephemeral: request::is_ephemeral(&request.volume_context),
            mounted: false,
        };

        let lock = self.lock(&target);
        let _one_at_a_time = lock.lock().await;
        // A mount this shim did not finish (no record, or one saved before
        // the mount) is adopted only when it shows the very tree this
        // publish gets, read-only: kubelet retries a publish after its own
        // restart or a lost state directory, and ALREADY_EXISTS would be
        // final.
        let existing = self.targets.load(&target);
        let adopt = match (&existing, mounts::mount_at(&target)) {
            (Some(existing), _) if !existing.same_request(&published) => {
                return Err(Status::already_exists(format!(
                    "{} already holds volume {} ({}, readonly {}); unpublish it first",
                    target.display(),
                    existing.csi_volume_id,
                    existing.reference,
                    existing.readonly
                )));
            }
            (Some(existing), Some(_)) if existing.mounted => return Ok(()),
            (_, found) => found,
        };
        // A release still owed for this record is moot: the record is
        // wanted again. Then the target is remembered before the engine is
        // asked, so an unpublish during the pull releases the right record.
        self.releases
            .remove(&published.volume, &published.mount_id)
            .map_err(|error| Status::internal(format!("forgetting an owed release: {error}")))?;
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
        match self.mount(&published, &body, adopt).await {
            Ok(()) => {
                let done = Published { mounted: true, ..published };
                if let Err(error) = self.targets.save(&done) {
                    // The mount is right; a publish again adopts it.
                    tracing::warn!(volume = %done.csi_volume_id, target = %target.display(), "recording the mount: {error}");
                }
                Ok(())
            }
            Err(failure) => {
                if is_final(failure.status.code()) {
                    // kubelet forgets a volume whose publish failed for
                    // good and never unpublishes it: nothing of it may stay
                    // behind, or the record would hold its model against
                    // GC for ever.
                    self.abandon(&published, failure.owns_record).await;
                }
                Err(failure.status)
            }
        }
    }

    /// The daemon's record for `published`, then the read-only bind mount.
    async fn mount(&self, published: &Published, body: &MountBody, adopt: Option<MountEntry>) -> Result<(), Failure> {
        let target = &published.target;
        let path = record_path(&published.volume, &published.mount_id);
        let answer = self.daemon.put::<_, VolumeRecord>(&path, body).await.map_err(|error| Failure {
            // A conflict is another request's record under these ids.
            owns_record: error.kind() != ErrorKind::Conflict,
            status: status_of(error),
        })?;
        let record = answer.body;
        match record.state() {
            VolumeState::Ready => {}
            VolumeState::Pulling => {
                return Err(Failure::of(Status::aborted(format!(
                    "{} is still being pulled ({} of {} bytes); the pull goes on, retry to join it",
                    published.reference, record.bytes_done, record.bytes_total
                ))));
            }
            // Failed (or released meanwhile): the record's own kind, so a
            // quota denial stays RESOURCE_EXHAUSTED and a cancellation
            // ABORTED, whichever answer carried it.
            state => {
                return Err(Failure::of(match record.error() {
                    Some(error) => status_for(error.kind, error.message.clone()),
                    None => Status::aborted(format!("the volume is {state:?}; retry")),
                }));
            }
        }
        if let Some(found) = adopt {
            if found.read_only && mounts::same_directory(target, &record.path) {
                tracing::info!(volume = %published.csi_volume_id, target = %target.display(), "adopted a mount of this volume's tree");
                return Ok(());
            }
            return Err(Failure::of(Status::already_exists(format!(
                "{} is already a mount point, of something other than {}'s tree read-only",
                target.display(),
                published.reference
            ))));
        }
        let stage = self.config.state_dir.join("stage");
        std::fs::create_dir_all(target)
            .and_then(|()| mounts::private_stage(&stage))
            .and_then(|()| mounts::bind_read_only(&record.path, target, &stage))
            .map_err(|error| {
                Failure::of(Status::internal(format!("bind-mounting {} at {}: {error}", record.path.display(), target.display())))
            })
    }

    /// Undoes a publish that failed for good: the daemon's record released
    /// (or owed, if the daemon is unreachable), the target forgotten.
    async fn abandon(&self, published: &Published, release: bool) {
        if release && let Err(error) = self.release(published).await {
            tracing::error!(volume = %published.csi_volume_id, "a release the daemon did not confirm cannot be kept: {error}");
        }
        if let Err(error) = self.targets.remove(&published.target) {
            tracing::warn!(volume = %published.csi_volume_id, target = %published.target.display(), "forgetting a failed publish: {error}");
        }
        // The directory this publish made, if empty and no mount point.
        let _ = std::fs::remove_dir(&published.target);
    }

    /// Releases `published`'s record; when the daemon does not confirm,
    /// the release is owed (kept and retried, see [`crate::releases`]).
    ///
    /// # Errors
    /// When the daemon did not confirm and the owed release cannot be kept.
    async fn release(&self, published: &Published) -> std::io::Result<()> {
        let owed = Release {
            volume: published.volume.clone(),
            mount_id: published.mount_id.clone(),
            target: published.target.clone(),
            csi_volume_id: published.csi_volume_id.clone(),
        };
        let error = match self.delete_record(&owed.path()).await {
            Ok(()) => return Ok(()),
            Err(error) => error,
        };
        self.releases.add(&owed)?;
        tracing::warn!(
            volume = %owed.csi_volume_id, target = %owed.target.display(),
            "the daemon did not confirm the release ({error}); retried until it does"
        );
        Ok(())
    }

    /// Deletes a record at the daemon, bounded in time: a daemon that
    /// accepts and never answers must not hold up a pod's termination.
    /// A record the daemon does not know counts as released.
    async fn delete_record(&self, path: &str) -> Result<(), String> {
        match tokio::time::timeout(RELEASE_TIMEOUT, self.daemon.delete::<VolumeRecord>(path)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(error)) if error.kind() == ErrorKind::NotFound => Ok(()),
            Ok(Err(error)) => Err(modelcache_api::error::chain(&error)),
            Err(_) => Err(format!("no answer in {} s", RELEASE_TIMEOUT.as_secs())),
        }
    }

    /// Retries every owed release once; those the daemon confirms (or no
    /// longer knows) are forgotten.
    pub async fn retry_releases(&self) {
        for owed in self.releases.list() {
            let lock = self.lock(&owed.target);
            let _one_at_a_time = lock.lock().await;
            // Published again meanwhile: the record is wanted.
            let superseded = self
                .targets
                .load(&owed.target)
                .is_some_and(|published| published.volume == owed.volume && published.mount_id == owed.mount_id);
            if !superseded {
                match self.delete_record(&owed.path()).await {
                    Ok(()) => {
                        tracing::info!(volume = %owed.csi_volume_id, target = %owed.target.display(), "released an owed record")
                    }
                    Err(error) => {
                        tracing::debug!(volume = %owed.csi_volume_id, "an owed release is still not confirmed: {error}");
                        continue;
                    }
                }
            }
            if let Err(error) = self.releases.remove(&owed.volume, &owed.mount_id) {
                tracing::warn!(volume = %owed.csi_volume_id, "forgetting a done release: {error}");
            }
        }
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
        // does not fail the call.
        let Some(published) = self.targets.load(&target) else {
            let path = record_path(&request::volume_id(&request.volume_id), &request::mount_id(None, &target));
            if let Err(error) = self.delete_record(&path).await {
                tracing::warn!(volume = %request.volume_id, target = %target.display(), "no publish recorded here; release not confirmed: {error}");
            }
            return Ok(());
        };
        // The pod's side is done: whatever the daemon answers, the call
        // succeeds (an error would be retried for ever and keep the pod
        // Terminating); an unconfirmed release is owed instead. Only an
        // owed release that cannot be kept fails the call, so the retry
        // tries again rather than the release being lost.
        self.release(&published)
            .await
            .map_err(|error| Status::internal(format!("keeping the release the daemon did not confirm: {error}")))?;
        self.targets.remove(&target).map_err(|error| Status::internal(format!("forgetting the publish: {error}")))?;
        Ok(())
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

/// A publish that failed, and whether the daemon's record under its ids is
/// its own to release.
struct Failure {
    status: Status,
    owns_record: bool,
}

impl Failure {
    fn of(status: Status) -> Failure {
        Failure { status, owns_record: true }
    }
}

/// Whether kubelet gives up on a publish answered with `code` (its
/// `isFinalError`): all but the codes that say "try again".
fn is_final(code: Code) -> bool {
    !matches!(code, Code::Cancelled | Code::DeadlineExceeded | Code::Unavailable | Code::ResourceExhausted | Code::Aborted)
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
