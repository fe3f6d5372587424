//! NodePublishVolume and NodeUnpublishVolume: a model volume bind-mounted
//! read-only, or a runtime volume with its socket; and undoing either.

use std::path::PathBuf;

use bpfman_csi::v1::volume_capability::AccessType;
use bpfman_csi::v1::{NodePublishVolumeRequest, NodeUnpublishVolumeRequest};
use modelcache_api::error::ErrorKind;
use modelcache_api::options::ExcludeOptions;
use modelcache_api::protocol::{MountBody, VolumeSocket, VolumeSocketBody};
use modelcache_api::record::{VolumeRecord, VolumeState};
use modelcache_api::tenancy::{RegistryCredentials, Requester};
use tonic::{Code, Request, Status};

use crate::mounts::{self, MountEntry};
use crate::releases::record_path;
use crate::request;
use crate::service::{DEADLINE_MARGIN, Shim, deadline, status_for, status_of};
use crate::targets::Published;

impl Shim {
    pub(crate) async fn publish(&self, request: Request<NodePublishVolumeRequest>) -> Result<(), Status> {
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
        if request::is_runtime(&request.volume_context) {
            let requester = request::parse_requester(&request.volume_context).map_err(Status::invalid_argument)?;
            request::check_pod(&requester, &target).map_err(Status::invalid_argument)?;
            let published = Published {
                volume: request::volume_id(&request.volume_id),
                mount_id: request::mount_id(None, &target),
                target,
                csi_volume_id: request.volume_id.clone(),
                reference: String::new(),
                options: ExcludeOptions::default(),
                readonly: request.readonly,
                ephemeral: true,
                mounted: false,
                runtime: true,
            };
            return self.publish_runtime(published, requester).await;
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
            runtime: false,
        };

        let lock = self.lock(&target);
        let _one_at_a_time = lock.lock().await;
        let Some(adopt) = self.claim(&published)? else { return Ok(()) };

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
        let outcome = self.mount(&published, &body, adopt).await;
        self.settle(published, outcome).await
    }

    /// Records a publish's mount as done, or undoes a publish that failed
    /// for good: kubelet forgets a volume whose publish failed with a final
    /// code and never unpublishes it, so nothing of it may stay behind, or
    /// its record would hold its model against GC for ever.
    async fn settle(&self, published: Published, outcome: Result<(), Failure>) -> Result<(), Status> {
        match outcome {
            Ok(()) => {
                let done = Published { mounted: true, ..published };
                if let Err(error) = self.targets.save(&done) {
                    // The mount is right; a publish again adopts it.
                    tracing::warn!(volume = %done.csi_volume_id, target = %done.target.display(), "recording the mount: {error}");
                }
                Ok(())
            }
            Err(failure) => {
                if is_final(failure.status.code()) {
                    self.abandon(&published, failure.owns_record).await;
                }
                Err(failure.status)
            }
        }
    }

    /// Takes `published`'s target, under its lock: `None` when this very
    /// publish is mounted already; else the mount found there, if any, to
    /// adopt. A mount this shim did not finish (no record, or one saved
    /// before the mount) is adopted only when it shows the very tree this
    /// publish gets, read-only: kubelet retries a publish after its own
    /// restart or a lost state directory, and ALREADY_EXISTS would be
    /// final. A release still owed for the record is moot (it is wanted
    /// again); then the target is remembered before the daemon is asked,
    /// so an unpublish during the pull releases the right record.
    #[allow(clippy::result_large_err, reason = "tonic's handlers answer `Status` unboxed")]
    fn claim(&self, published: &Published) -> Result<Option<Option<MountEntry>>, Status> {
        let target = &published.target;
        let adopt = match (self.targets.load(target), mounts::mount_at(target)) {
            (Some(existing), _) if !existing.same_request(published) => {
                return Err(Status::already_exists(format!(
                    "{} already holds volume {} ({}); unpublish it first",
                    target.display(),
                    existing.csi_volume_id,
                    if existing.runtime { "a runtime volume" } else { &existing.reference }
                )));
            }
            (Some(existing), Some(_)) if existing.mounted => return Ok(None),
            (_, found) => found,
        };
        self.releases
            .remove(&published.volume, &published.mount_id)
            .map_err(|error| Status::internal(format!("forgetting an owed release: {error}")))?;
        self.targets.save(published).map_err(|error| Status::internal(format!("recording the publish: {error}")))?;
        Ok(Some(adopt))
    }

    /// A runtime volume: the daemon's socket for the volume, then the
    /// volume's tree directory and socket mounted read-only at the target
    /// (see [`mounts::mount_runtime`]). The pod mounts models through the
    /// socket, which touches only this volume and speaks for this pod.
    async fn publish_runtime(&self, published: Published, requester: Requester) -> Result<(), Status> {
        let target = published.target.clone();
        let lock = self.lock(&target);
        let _one_at_a_time = lock.lock().await;
        let Some(adopt) = self.claim(&published)? else { return Ok(()) };
        let body = VolumeSocketBody { volume: published.volume.to_string(), requester: Some(requester) };
        let mounted = async {
            let socket = self.daemon.post::<_, VolumeSocket>("/v1/volume-sockets", &body).await.map_err(|error| Failure {
                // A conflict is a socket made for another pod.
                owns_record: error.kind() != ErrorKind::Conflict,
                status: status_of(error),
            })?;
            let socket = socket.body;
            // Only this volume's own directories are ever bound into the pod.
            let socket_dir = socket
                .path
                .parent()
                .filter(|dir| dir.file_name() == Some(published.volume.as_str().as_ref()))
                .filter(|_| socket.trees.file_name() == Some(published.volume.as_str().as_ref()))
                .ok_or_else(|| {
                    Failure::of(Status::internal(format!(
                        "the daemon's socket {} or tree directory {} is not volume {}'s own (an older daemon?)",
                        socket.path.display(),
                        socket.trees.display(),
                        published.volume
                    )))
                })?;
            if let Some(found) = &adopt {
                let ours = found.read_only
                    && mounts::same_directory(&target.join(mounts::RUNTIME_MODELS), &socket.trees)
                    && mounts::same_directory(&target.join(mounts::RUNTIME_API), socket_dir);
                if ours {
                    tracing::info!(volume = %published.csi_volume_id, target = %target.display(), "adopted this runtime volume's mount");
                    return Ok(());
                }
                return Err(Failure::of(Status::already_exists(format!(
                    "{} is already a mount point, of something other than this runtime volume read-only",
                    target.display()
                ))));
            }
            let stage = self.config.state_dir.join("stage");
            std::fs::create_dir_all(&target)
                .and_then(|()| mounts::private_stage(&stage))
                .and_then(|()| mounts::mount_runtime(&socket.trees, socket_dir, &target, &stage))
                .map_err(|error| {
                    Failure::of(Status::internal(format!("mounting the runtime volume at {}: {error}", target.display())))
                })
        };
        let outcome = mounted.await;
        self.settle(published, outcome).await
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

    pub(crate) async fn unpublish(&self, request: NodeUnpublishVolumeRequest) -> Result<(), Status> {
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
            // Both kinds are tried: a model volume's record by the ids the
            // request implies; a runtime volume's socket, and its records
            // only if a socket was served (a persistent volume's other
            // targets hold records of the same volume).
            let volume = request::volume_id(&request.volume_id);
            let released = match self.delete_record(&record_path(&volume, &request::mount_id(None, &target))).await {
                Ok(()) => match self.close_socket(&volume).await {
                    Ok(true) => self.release_volume(&volume).await,
                    Ok(false) => Ok(()),
                    Err(error) => Err(error),
                },
                Err(error) => Err(error),
            };
            if let Err(error) = released {
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
