//! The Controller service, for dynamic provisioning: the external-provisioner
//! sidecar calls CreateVolume for a claim of a StorageClass whose parameters
//! name the model, and the created volume carries those parameters to
//! NodePublish as its volume context. Nothing is pulled here: the node
//! pulls when a pod first mounts the volume (with `WaitForFirstConsumer`,
//! on the node the pod was scheduled to).
//!
//! StorageClass parameters: the `modelcache.io/` keys of an inline volume
//! (see [`crate::request`]) and the `csi.storage.k8s.io/` keys the
//! provisioner adds (`--extra-create-metadata`: the claim's name and
//! namespace, ignored). Any other key is refused, so a misspelt one is
//! never silently dropped.
//!
//! A model volume is read-only: a claim for a writer access mode is
//! refused here rather than at NodePublish, where the pod would wait for
//! ever. Capacity is what the claim asks for; it bounds nothing.
//!
//! Created volumes are remembered in the state directory (one file per
//! name), so a CreateVolume repeated with other parameters is ALREADY_EXISTS
//! and ValidateVolumeCapabilities knows its volumes.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use bpfman_csi::v1::controller_server::Controller;
use bpfman_csi::v1::controller_service_capability::{self, rpc};
use bpfman_csi::v1::validate_volume_capabilities_response::Confirmed;
use bpfman_csi::v1::volume_capability::AccessType;
use bpfman_csi::v1::volume_capability::access_mode::Mode;
use bpfman_csi::v1::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tonic::{Request, Response, Status};

use crate::calls::{Call, Metrics};
use crate::request;
use crate::targets::{list_json, remove_file, save_json};

/// One provisioned volume.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Provisioned {
    pub name: String,
    pub volume_id: String,
    /// The `modelcache.io/` parameters: the volume context NodePublish reads.
    pub context: HashMap<String, String>,
    pub capacity_bytes: i64,
}

/// The Controller service.
#[derive(Clone)]
pub struct Provisioner {
    dir: PathBuf,
    metrics: Metrics,
    /// One CreateVolume or DeleteVolume at a time: the check for an
    /// existing name and the write are one step.
    lock: Arc<tokio::sync::Mutex<()>>,
}

/// Whether `capabilities` are all ones a read-only file tree can serve.
///
/// # Errors
/// A message for INVALID_ARGUMENT naming the capability.
pub fn check_capabilities(capabilities: &[VolumeCapability]) -> Result<(), String> {
    if capabilities.is_empty() {
        return Err("volume_capabilities are required".into());
    }
    for capability in capabilities {
        match capability.access_type {
            Some(AccessType::Mount(_)) => {}
            Some(AccessType::Block(_)) => return Err("block access is not supported: a model volume is a file tree".into()),
            None => return Err("a volume capability has no access type".into()),
        }
        let mode = capability.access_mode.as_ref().map(|mode| mode.mode()).unwrap_or(Mode::Unknown);
        if !matches!(mode, Mode::SingleNodeReaderOnly | Mode::MultiNodeReaderOnly) {
            return Err(format!(
                "access mode {} writes, but a model volume is read-only: claim it ReadOnlyMany",
                mode.as_str_name()
            ));
        }
    }
    Ok(())
}

/// The volume context of a volume made from `parameters`: its
/// `modelcache.io/` keys, checked as NodePublish will read them.
///
/// # Errors
/// A message for INVALID_ARGUMENT naming the key.
pub fn context_of(parameters: &HashMap<String, String>) -> Result<HashMap<String, String>, String> {
    if let Some(unknown) =
        parameters.keys().find(|key| !key.starts_with(request::PREFIX) && !key.starts_with("csi.storage.k8s.io/"))
    {
        return Err(format!("unknown StorageClass parameter `{unknown}` (a model is named by `{}`)", request::REFERENCE));
    }
    request::parse_model(parameters).map_err(|error| format!("StorageClass parameters: {error}"))?;
    Ok(parameters.iter().filter(|(key, _)| key.starts_with(request::PREFIX)).map(|(k, v)| (k.clone(), v.clone())).collect())
}

impl Provisioner {
    pub fn new(dir: PathBuf, metrics: Metrics) -> Provisioner {
        Provisioner { dir, metrics, lock: Arc::default() }
    }

    fn file(&self, volume_id: &str) -> PathBuf {
        self.dir.join(format!("{}.json", hex::encode(Sha256::digest(volume_id.as_bytes()))))
    }

    fn load(&self, volume_id: &str) -> Option<Provisioned> {
        serde_json::from_slice(&std::fs::read(self.file(volume_id)).ok()?).ok()
    }

    /// Every volume provisioned here.
    pub fn list(&self) -> Vec<Provisioned> {
        list_json(&self.dir)
    }

    async fn create(&self, request: CreateVolumeRequest) -> Result<Volume, Status> {
        if request.name.is_empty() {
            return Err(Status::invalid_argument("name is required"));
        }
        check_capabilities(&request.volume_capabilities).map_err(Status::invalid_argument)?;
        if request.volume_content_source.is_some() {
            return Err(Status::invalid_argument("a model volume is made from its model, not from a snapshot or a volume"));
        }
        let context = context_of(&request.parameters).map_err(Status::invalid_argument)?;
        let (required, limit) = request.capacity_range.map_or((0, 0), |range| (range.required_bytes, range.limit_bytes));
        if required < 0 || limit < 0 || (limit > 0 && required > limit) {
            return Err(Status::out_of_range(format!("capacity range {required}..{limit} is empty")));
        }
        // The name is the volume id (the provisioner's `pvc-<uid>`): the
        // same claim always finds its volume.
        let wanted =
            Provisioned { name: request.name.clone(), volume_id: request.name.clone(), context, capacity_bytes: required };
        let _one_at_a_time = self.lock.lock().await;
        let provisioned = match self.load(&wanted.volume_id) {
            Some(existing)
                if existing.context != wanted.context
                    || existing.capacity_bytes < required
                    || (limit > 0 && existing.capacity_bytes > limit) =>
            {
                return Err(Status::already_exists(format!(
                    "volume {} exists with other parameters or capacity; delete it first",
                    existing.name
                )));
            }
            Some(existing) => existing,
            None => {
                save_json(&self.dir, &self.file(&wanted.volume_id), &wanted)
                    .map_err(|error| Status::internal(format!("recording volume {}: {error}", wanted.name)))?;
                wanted
            }
        };
        Ok(Volume {
            capacity_bytes: provisioned.capacity_bytes,
            volume_id: provisioned.volume_id,
            volume_context: provisioned.context,
            ..Volume::default()
        })
    }

    async fn delete(&self, request: DeleteVolumeRequest) -> Result<(), Status> {
        if request.volume_id.is_empty() {
            return Err(Status::invalid_argument("volume_id is required"));
        }
        let _one_at_a_time = self.lock.lock().await;
        // Nodes hold nothing for the volume once its pods are gone: their
        // records were released at unpublish, and GC keeps the model only
        // while something uses it.
        remove_file(&self.file(&request.volume_id))
            .map_err(|error| Status::internal(format!("forgetting volume {}: {error}", request.volume_id)))
    }

    #[allow(clippy::result_large_err, reason = "tonic's handlers answer `Status` unboxed")]
    fn validate(&self, request: ValidateVolumeCapabilitiesRequest) -> Result<ValidateVolumeCapabilitiesResponse, Status> {
        if request.volume_id.is_empty() {
            return Err(Status::invalid_argument("volume_id is required"));
        }
        if request.volume_capabilities.is_empty() {
            return Err(Status::invalid_argument("volume_capabilities are required"));
        }
        if self.load(&request.volume_id).is_none() {
            return Err(Status::not_found(format!("no volume {} was provisioned here", request.volume_id)));
        }
        Ok(match check_capabilities(&request.volume_capabilities) {
            Ok(()) => ValidateVolumeCapabilitiesResponse {
                confirmed: Some(Confirmed {
                    volume_context: request.volume_context,
                    volume_capabilities: request.volume_capabilities,
                    parameters: request.parameters,
                    mutable_parameters: request.mutable_parameters,
                }),
                message: String::new(),
            },
            Err(message) => ValidateVolumeCapabilitiesResponse { confirmed: None, message },
        })
    }
}

#[allow(clippy::result_large_err, reason = "tonic's handlers answer `Status` unboxed")]
fn unimplemented<T>(metrics: &Metrics, method: &'static str) -> Result<Response<T>, Status> {
    Call::start(method, "", String::new()).finish(metrics, Err(Status::unimplemented(format!("{method} is not offered"))))
}

#[tonic::async_trait]
impl Controller for Provisioner {
    async fn create_volume(&self, request: Request<CreateVolumeRequest>) -> Result<Response<CreateVolumeResponse>, Status> {
        let request = request.into_inner();
        let claim = match (
            request.parameters.get("csi.storage.k8s.io/pvc/namespace"),
            request.parameters.get("csi.storage.k8s.io/pvc/name"),
        ) {
            (Some(namespace), Some(name)) => format!("{namespace}/{name}"),
            _ => String::new(),
        };
        let call = Call::start("CreateVolume", &request.name, claim);
        let result = self.create(request).await.map(|volume| Response::new(CreateVolumeResponse { volume: Some(volume) }));
        call.finish(&self.metrics, result)
    }

    async fn delete_volume(&self, request: Request<DeleteVolumeRequest>) -> Result<Response<DeleteVolumeResponse>, Status> {
        let request = request.into_inner();
        let call = Call::start("DeleteVolume", &request.volume_id, String::new());
        let result = self.delete(request).await.map(|()| Response::new(DeleteVolumeResponse {}));
        call.finish(&self.metrics, result)
    }

    async fn validate_volume_capabilities(
        &self,
        request: Request<ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<ValidateVolumeCapabilitiesResponse>, Status> {
        let request = request.into_inner();
        let call = Call::start("ValidateVolumeCapabilities", &request.volume_id, String::new());
        call.finish(&self.metrics, self.validate(request).map(Response::new))
    }

    async fn controller_get_capabilities(
        &self,
        _: Request<ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<ControllerGetCapabilitiesResponse>, Status> {
        let capability = ControllerServiceCapability {
            r#type: Some(controller_service_capability::Type::Rpc(controller_service_capability::Rpc {
                r#type: rpc::Type::CreateDeleteVolume as i32,
            })),
        };
        let call = Call::start("ControllerGetCapabilities", "", String::new());
        call.finish(&self.metrics, Ok(Response::new(ControllerGetCapabilitiesResponse { capabilities: vec![capability] })))
    }

    async fn controller_publish_volume(
        &self,
        _: Request<ControllerPublishVolumeRequest>,
    ) -> Result<Response<ControllerPublishVolumeResponse>, Status> {
        unimplemented(&self.metrics, "ControllerPublishVolume")
    }

    async fn controller_unpublish_volume(
        &self,
        _: Request<ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<ControllerUnpublishVolumeResponse>, Status> {
        unimplemented(&self.metrics, "ControllerUnpublishVolume")
    }

    async fn list_volumes(&self, _: Request<ListVolumesRequest>) -> Result<Response<ListVolumesResponse>, Status> {
        unimplemented(&self.metrics, "ListVolumes")
    }

    async fn get_capacity(&self, _: Request<GetCapacityRequest>) -> Result<Response<GetCapacityResponse>, Status> {
        unimplemented(&self.metrics, "GetCapacity")
    }

    async fn create_snapshot(&self, _: Request<CreateSnapshotRequest>) -> Result<Response<CreateSnapshotResponse>, Status> {
        unimplemented(&self.metrics, "CreateSnapshot")
    }

    async fn delete_snapshot(&self, _: Request<DeleteSnapshotRequest>) -> Result<Response<DeleteSnapshotResponse>, Status> {
        unimplemented(&self.metrics, "DeleteSnapshot")
    }

    async fn list_snapshots(&self, _: Request<ListSnapshotsRequest>) -> Result<Response<ListSnapshotsResponse>, Status> {
        unimplemented(&self.metrics, "ListSnapshots")
    }

    async fn controller_expand_volume(
        &self,
        _: Request<ControllerExpandVolumeRequest>,
    ) -> Result<Response<ControllerExpandVolumeResponse>, Status> {
        unimplemented(&self.metrics, "ControllerExpandVolume")
    }

    async fn controller_get_volume(
        &self,
        _: Request<ControllerGetVolumeRequest>,
    ) -> Result<Response<ControllerGetVolumeResponse>, Status> {
        unimplemented(&self.metrics, "ControllerGetVolume")
    }

    async fn controller_modify_volume(
        &self,
        _: Request<ControllerModifyVolumeRequest>,
    ) -> Result<Response<ControllerModifyVolumeResponse>, Status> {
        unimplemented(&self.metrics, "ControllerModifyVolume")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bpfman_csi::v1::volume_capability::{AccessMode, MountVolume};

    fn capability(mode: Mode) -> VolumeCapability {
        VolumeCapability {
            access_mode: Some(AccessMode { mode: mode as i32 }),
            access_type: Some(AccessType::Mount(MountVolume::default())),
        }
    }

    /// Reader modes of a mount pass; writers, block and nothing do not.
    #[test]
    fn capabilities() {
        assert!(check_capabilities(&[capability(Mode::MultiNodeReaderOnly), capability(Mode::SingleNodeReaderOnly)]).is_ok());
        assert!(check_capabilities(&[capability(Mode::SingleNodeWriter)]).unwrap_err().contains("ReadOnlyMany"));
        assert!(check_capabilities(&[]).unwrap_err().contains("required"));
        let block = VolumeCapability {
            access_type: Some(AccessType::Block(Default::default())),
            ..capability(Mode::MultiNodeReaderOnly)
        };
        assert!(check_capabilities(&[block]).unwrap_err().contains("block"));
    }

    /// The model's keys become the context; the provisioner's are dropped;
    /// others and bad values are refused by name.
    #[test]
    fn contexts() {
        let parameters = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let context = context_of(&parameters(&[
            (request::REFERENCE, "registry.local/m:1"),
            (request::EXCLUDE_WEIGHTS, "true"),
            ("csi.storage.k8s.io/pvc/name", "claim"),
        ]))
        .unwrap();
        assert_eq!(context.len(), 2);
        assert_eq!(context[request::REFERENCE], "registry.local/m:1");
        assert!(
            context_of(&parameters(&[(request::REFERENCE, "r/m:1"), ("reference", "x")])).unwrap_err().contains("`reference`")
        );
        assert!(context_of(&parameters(&[])).unwrap_err().contains(request::REFERENCE));
        assert!(context_of(&parameters(&[(request::REFERENCE, "Not A Ref")])).is_err());
    }
}
