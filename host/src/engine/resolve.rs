//! From a reference to what a mount serves: the digest a tag names (one
//! registry request for a herd, the tag memory while the registry is
//! away), the parsed manifest (cached by digest), the exclude decision (one
//! plugin call for a herd, remembered), and `inspect`.

use std::sync::Arc;

use serde::Serialize;

use super::access::Access;
use super::{Engine, EngineError};
use crate::digest::Digest;
use crate::error::ErrorKind;
use crate::modelpack::{Model, Selection};
use crate::plugins::exclude::{Artifact, ExcludeDecision, ExcludeInput, ExcludeOptions, ModelFile, Skip};
use crate::registry::{Credential, ModelRef};
use crate::store::{EntryKey, Hold};
use modelcache_api::record::Proof;
use modelcache_api::tenancy::Requester;

/// A request's reference resolved to a model, a selection and the entry
/// that serves it, with the manifest and the entry held against GC.
pub(super) struct Resolved {
    pub(super) reference: ModelRef,
    /// Who asks; the flight this request starts names them to quota.
    pub(super) requester: Requester,
    /// How the requester was shown able to read the manifest.
    pub(super) proof: Proof,
    /// The credential this request's downloads use.
    pub(super) credential: Credential,
    /// Whom the verify policy found the model signed by (none: no policy).
    pub(super) verified_by: Option<String>,
    pub(super) model: Arc<Model>,
    pub(super) selection: Selection,
    pub(super) key: EntryKey,
    pub(super) skips: Vec<Skip>,
    _holds: [Hold; 2],
}

impl Resolved {
    /// Bytes of the selected layers.
    pub(super) fn bytes(&self) -> u64 {
        self.selection.layers(&self.model).map(|layer| layer.blob.size).sum()
    }
}

/// Per layer of `model`: its path, size, type, digest and whether it is cached.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct InspectedLayer {
    pub path: String,
    pub size: u64,
    pub media_type: String,
    pub digest: Digest,
    pub cached: bool,
}

/// What `inspect` reports of a reference.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Inspection {
    pub reference: String,
    pub digest: Digest,
    pub artifact_type: String,
    pub layers: Vec<InspectedLayer>,
    /// Cached trees of this manifest.
    pub entries: Vec<EntryKey>,
    /// The signature material found for it.
    pub signatures: InspectedSignatures,
}

/// What signatures a model has, and what the verify policy makes of them.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct InspectedSignatures {
    /// Cosign signatures under the `.sig` tag.
    pub cosign: usize,
    /// Referrers, as `artifact type` and digest.
    pub referrers: Vec<(String, String)>,
    /// Signature layers (model-signing bundles) by path.
    pub layers: Vec<String>,
    /// Whom verify policy finds it signed by.
    pub trusted: Option<String>,
    /// Why verify policy refuses it.
    pub refused: Option<String>,
}

impl Engine {
    /// A reference and options turned into a model, a selection and the entry
    /// that serves it; the manifest and the entry are held against GC from
    /// the moment they are known.
    pub(super) async fn resolve_request(
        self: &Arc<Self>,
        reference: &ModelRef,
        options: &ExcludeOptions,
        access: &Access,
    ) -> Result<Resolved, EngineError> {
        let digest = self.resolve(reference, access).await?;
        let authorized = self.authorize(reference, &digest, access).await?;
        let manifest_hold = self.store.hold(None, std::slice::from_ref(&digest));
        let model = self.model(reference, &digest, &authorized.credential).await?;
        let verified_by = self.verify(reference, &model, &authorized.credential, &access.requester).await?;
        let decision = self.exclude(reference, &model, options, &access.requester).await?;
        let selection = model.select(decision.skips.iter().map(|skip| skip.path.as_str()));
        let key = EntryKey::new(digest, selection.key().clone());
        let entry_hold = self.store.hold(Some(&key), &[]);
        Ok(Resolved {
            reference: reference.clone(),
            requester: access.requester.clone(),
            proof: authorized.proof,
            credential: authorized.credential,
            verified_by,
            model,
            selection,
            key,
            skips: decision.skips,
            _holds: [manifest_hold, entry_hold],
        })
    }

    /// The digest `reference` names: what the registry said less than the
    /// tag TTL ago, else one registry request for all the callers asking
    /// about the same reference at once (a caller that joins gets the
    /// answer to a request sent at most one round trip before its own
    /// arrival), else, when the registry cannot be reached, what the tag
    /// named when last heard of ([`crate::registry::TagMemory`]). Asked with
    /// `access`'s credentials in order; callers with other credentials do
    /// not share a request. What a tag names is no secret once known: the
    /// manifest it names is checked per requester (`Engine::authorize`).
    pub(super) async fn resolve(&self, reference: &ModelRef, access: &Access) -> Result<Digest, EngineError> {
        if let Some(digest) = reference.digest() {
            return Ok(digest);
        }
        if let Some(digest) = self.tags.fresh(reference) {
            return Ok(digest);
        }
        let (registry, tags) = (self.registry.clone(), self.tags.clone());
        let (owned, credentials) = (reference.clone(), access.credentials());
        let mut ticket = self.resolutions.join((reference.to_string(), access.key()), move |_| async move {
            let mut last = None;
            for credential in &credentials {
                match registry.resolve(&owned, credential).await {
                    Ok(digest) => {
                        tags.remember(&owned, &digest);
                        return Ok(digest);
                    }
                    // Refused or unknown with these credentials: the next may do.
                    Err(error) if matches!(error.kind(), ErrorKind::NotFound | ErrorKind::PermissionDenied) => {
                        last = Some(error);
                    }
                    Err(error) => return Err(error.into()),
                }
            }
            let error = last.expect("one credential at least was tried");
            // Gone for the node: never to be served from memory.
            if access_is_node_only(&credentials) {
                tags.forget(&owned);
            }
            Err(error.into())
        });
        match ticket.wait().await {
            Ok(digest) => Ok(digest),
            Err(error) if error.kind() == ErrorKind::Unavailable => match self.tags.fall_back(reference) {
                Some(digest) => {
                    tracing::warn!(%reference, %digest, "serving what the tag named when last heard of: {}", crate::plugins::error_chain(&*error));
                    Ok(digest)
                }
                None => Err(match &*error {
                    EngineError::Registry(registry) if !access.requester.is_empty() => {
                        tracing::warn!(%reference, requester = %access.requester, "registry unreachable: {}", crate::plugins::error_chain(&**registry));
                        EngineError::AccessUnavailable { reference: reference.to_string() }
                    }
                    _ => EngineError::Shared(error),
                }),
            },
            Err(error) => Err(match &*error {
                EngineError::Registry(registry) if registry.kind() == ErrorKind::PermissionDenied => {
                    self.access_denied(reference, &access.requester)
                }
                _ => EngineError::Shared(error),
            }),
        }
    }

    /// A pin's target: a bare `sha256:` digest, or a reference resolved now.
    pub(super) async fn resolve_target(&self, target: &str) -> Result<Digest, EngineError> {
        if let Ok(digest) = target.parse::<Digest>() {
            return Ok(digest);
        }
        self.resolve(&ModelRef::parse(target)?, &Access::operator()).await
    }

    /// The manifest of `digest`: from the store, or fetched by digest, checked
    /// to be a model, then stored.
    async fn model(&self, reference: &ModelRef, digest: &Digest, credential: &Credential) -> Result<Arc<Model>, EngineError> {
        if self.store.has_blob(digest) {
            let parsed = self.models.lock().unwrap_or_else(|poison| poison.into_inner()).get(digest).cloned();
            if let Some(model) = parsed {
                return Ok(model);
            }
            let model = Arc::new(Model::parse(digest, &self.store.read_blob(digest)?)?);
            self.remember_model(&model);
            return Ok(model);
        }
        let bytes = self.registry.fetch_manifest(reference, digest, credential).await?;
        self.access.fetched_from(super::access::repository_of(reference), digest);
        let model = Arc::new(Model::parse(digest, &bytes)?);
        self.store.put_blob(digest, &bytes)?;
        self.remember_model(&model);
        Ok(model)
    }

    fn remember_model(&self, model: &Arc<Model>) {
        let mut parsed = self.models.lock().unwrap_or_else(|poison| poison.into_inner());
        // 64: more than the models one node serves.
        crate::memo::insert_bounded(&mut parsed, 64, model.digest.clone(), model.clone());
    }

    /// The exclude decision for this model and these options: remembered,
    /// or asked of the plugins once for all the mounts asking at once.
    async fn exclude(
        &self,
        reference: &ModelRef,
        model: &Model,
        options: &ExcludeOptions,
        requester: &Requester,
    ) -> Result<ExcludeDecision, EngineError> {
        let plugins = self.plugins.current();
        // The namespace and service account only: one answer serves every
        // pod of a deployment, and a herd of them costs one call.
        let requester = Requester {
            namespace: requester.namespace.clone(),
            service_account: requester.service_account.clone(),
            ..Requester::default()
        };
        let memo_key = (requester.clone(), reference.to_string(), model.digest.to_string(), options.clone());
        if let Some(decision) = self.decisions.get(&plugins, &memo_key) {
            return Ok(decision);
        }
        let decisions = self.decisions.clone();
        let flight_key = (plugins.generation(), memo_key.clone());
        let mut ticket = self.excluding.join(flight_key, |_| {
            let input = ExcludeInput {
                requester: requester.clone(),
                artifact: Artifact {
                    reference: reference.to_string(),
                    manifest_digest: model.digest.to_string(),
                    annotations: model.annotations.clone(),
                },
                files: model
                    .layers
                    .iter()
                    .map(|layer| ModelFile {
                        path: layer.path.to_string(),
                        size: layer.blob.size,
                        media_type: layer.blob.media_type.clone(),
                        layer_digest: layer.blob.digest.to_string(),
                    })
                    .collect(),
                options: options.clone(),
            };
            let reference = reference.to_string();
            async move {
                let asked = plugins.clone();
                let decision = tokio::task::spawn_blocking(move || asked.exclude(input))
                    .await
                    .map_err(EngineError::join("ask the exclude decision"))?
                    .map_err(|source| EngineError::Exclude { reference, source })?;
                decisions.put(&plugins, memo_key, &decision);
                Ok(decision)
            }
        });
        ticket.wait().await.map_err(EngineError::Shared)
    }

    /// What a reference resolves to (as a mount would resolve it now), its
    /// files and what of them is cached, its signatures and what verify
    /// policy makes of them (asked afresh, not remembered). Writes nothing
    /// but the manifest's signature layers, which are fetched into the store
    /// as a mount would.
    ///
    /// # Errors
    /// Registry and manifest errors.
    pub async fn inspect(self: &Arc<Self>, reference: &str) -> Result<Inspection, EngineError> {
        let reference = ModelRef::parse(reference)?;
        let digest = self.resolve(&reference, &Access::operator()).await?;
        let model = if self.store.has_blob(&digest) {
            Model::parse(&digest, &self.store.read_blob(&digest)?)?
        } else {
            Model::parse(&digest, &self.registry.fetch_manifest(&reference, &digest, &Credential::Node).await?)?
        };
        let layers = model
            .layers
            .iter()
            .map(|layer| InspectedLayer {
                path: layer.path.to_string(),
                size: layer.blob.size,
                media_type: layer.blob.media_type.clone(),
                digest: layer.blob.digest.clone(),
                cached: self.store.has_layer(layer),
            })
            .collect();
        let entries = self.store.entries()?.into_iter().filter(|key| key.manifest == digest).collect();
        let model = Arc::new(model);
        let signatures = self.inspect_signatures(&reference, &model).await?;
        let artifact_type = model.artifact_type.clone();
        Ok(Inspection { reference: reference.to_string(), digest, artifact_type, layers, entries, signatures })
    }
}

/// Whether a tag was asked about with the node's credentials alone: only
/// then does a refusal mean the tag is gone for this node.
fn access_is_node_only(credentials: &[Credential]) -> bool {
    matches!(credentials, [Credential::Node])
}
