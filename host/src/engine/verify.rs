//! Signed models only: the verify decision for a mount, on the signature
//! material gathered before any weight is fetched (cosign signatures and
//! referrers from the registry, the model's signature layers through the
//! store), asked once per plugin set and manifest and remembered.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::resolve::InspectedSignatures;
use super::{Engine, EngineError};
use crate::digest::Digest;
use crate::flight::Progress;
use crate::modelpack::{LayerFormat, Model};
use crate::plugins::verify::{CosignSignature, ModelSignature, Referrer, SignedLayer, VerifyInput, VerifyVerdict};
use crate::plugins::{Decision, PluginSet};
use crate::registry::{Credential, ModelRef};
use modelcache_api::tenancy::Requester;

/// A signature layer is read whole into memory: larger ones are not
/// signatures (a model-signing bundle is a few KiB).
const MAX_SIGNATURE_LAYER: u64 = 1 << 20;

/// How long gathering may take: a registry that trickles must not hold
/// every mount of a manifest.
const GATHER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Trusted verdicts of one plugin set, by manifest. Only trust is kept: it
/// is bound to the content (a signer vouched for these bytes), while a
/// refusal may come from where the manifest was asked for (a repository
/// without the signature), so it is asked again next time.
#[derive(Debug, Default)]
pub(super) struct Verdicts(Mutex<Option<(u64, HashMap<Digest, String>)>>);

impl Verdicts {
    fn get(&self, set: &PluginSet, digest: &Digest) -> Option<String> {
        let kept = self.0.lock().unwrap_or_else(|poison| poison.into_inner());
        kept.as_ref().filter(|(made_by, _)| *made_by == set.generation())?.1.get(digest).cloned()
    }

    fn put(&self, set: &PluginSet, digest: &Digest, signer: &str) {
        let mut kept = self.0.lock().unwrap_or_else(|poison| poison.into_inner());
        let answers = match kept.take() {
            Some((made_by, answers)) if made_by == set.generation() => answers,
            _ => HashMap::new(),
        };
        let (_, answers) = kept.insert((set.generation(), answers));
        crate::memo::insert_bounded(answers, 1024, digest.clone(), signer.to_owned());
    }
}

impl Engine {
    /// Whom the model is signed by, as the verify plugins judge it; `None`
    /// when no plugin serves verify.
    ///
    /// # Errors
    /// [`EngineError::Unverified`] when a plugin refuses; gathering errors.
    pub(super) async fn verify(
        self: &Arc<Self>,
        reference: &ModelRef,
        model: &Arc<Model>,
        credential: &Credential,
        requester: &Requester,
    ) -> Result<Option<String>, EngineError> {
        let plugins = self.plugins.current();
        if plugins.serving(Decision::Verify).next().is_none() {
            return Ok(None);
        }
        if let Some(signer) = self.verdicts.get(&plugins, &model.digest) {
            return judged(reference, Some(VerifyVerdict::Trusted { signer, plugin: None }));
        }
        let engine = self.clone();
        let (owned, model_owned, credential, requester) =
            (reference.clone(), model.clone(), credential.clone(), requester.clone());
        let set = plugins.clone();
        let key = (plugins.generation(), super::access::repository_of(reference), model.digest.clone());
        let mut ticket = self.verifying.join(key, move |_| async move {
            let input = tokio::time::timeout(GATHER_TIMEOUT, engine.gather(&owned, &model_owned, &credential, requester))
                .await
                .map_err(|_| EngineError::GatherTimeout { reference: owned.to_string() })??;
            let asked = set.clone();
            let decision = tokio::task::spawn_blocking(move || asked.verify(&input))
                .await
                .map_err(EngineError::join("ask the verify decision"))?;
            if let (Some(VerifyVerdict::Trusted { signer, .. }), true) = (&decision.verdict, decision.failures.is_empty()) {
                engine.verdicts.put(&set, &model_owned.digest, signer);
            }
            if decision.verdict.is_none() {
                tracing::warn!(reference = %owned, digest = %model_owned.digest, "verify failed open: mounted with nobody vouching");
            }
            Ok(decision.verdict)
        });
        let verdict = ticket.wait().await.map_err(EngineError::Shared)?;
        judged(reference, verdict)
    }

    /// The input of the verify decision: the manifest's facts and every
    /// signature found, none of it a weight.
    async fn gather(
        self: &Arc<Self>,
        reference: &ModelRef,
        model: &Arc<Model>,
        credential: &Credential,
        requester: Requester,
    ) -> Result<VerifyInput, EngineError> {
        // Best effort: what cannot be read is missing for the plugin, which
        // may still trust what is there (a model-signing layer when the
        // `.sig` tag is junk, say).
        let cosign = self.registry.cosign_signatures(reference, &model.digest, credential).await.unwrap_or_else(|error| {
            tracing::warn!(%reference, "cosign signatures not read: {}", crate::plugins::error_chain(&error));
            Vec::new()
        });
        let referrers = self.registry.referrers(reference, &model.digest, credential).await.unwrap_or_else(|error| {
            tracing::warn!(%reference, "referrers not read: {}", crate::plugins::error_chain(&error));
            Vec::new()
        });
        let mut model_signatures = Vec::new();
        for layer in &model.layers {
            let path = layer.path.to_string();
            // A raw file read whole, never an archive to unpack.
            let candidate = layer.format == LayerFormat::Raw && layer.blob.size <= MAX_SIGNATURE_LAYER;
            if !candidate || !self.config.signature_paths.contains(&path) {
                continue;
            }
            self.ensure_layer(reference, layer, &Arc::new(Progress::default()), true, credential).await?;
            let bundle = self.store.read_blob(&layer.blob.digest)?;
            model_signatures.push(ModelSignature { path, layer_digest: layer.blob.digest.to_string(), bundle });
        }
        Ok(VerifyInput {
            requester,
            reference: reference.to_string(),
            manifest_digest: model.digest.to_string(),
            annotations: model.annotations.clone(),
            layers: model
                .layers
                .iter()
                .map(|layer| SignedLayer {
                    path: layer.path.to_string(),
                    digest: layer.blob.digest.to_string(),
                    size: layer.blob.size,
                    media_type: layer.blob.media_type.clone(),
                    annotations: layer.annotations.clone(),
                })
                .collect(),
            cosign: cosign
                .into_iter()
                .map(|found| CosignSignature {
                    payload: found.payload,
                    signature: found.signature,
                    annotations: found.annotations,
                })
                .collect(),
            referrers: referrers
                .into_iter()
                .map(|found| Referrer {
                    digest: found.digest,
                    media_type: found.media_type,
                    artifact_type: found.artifact_type,
                    size: found.size,
                    annotations: found.annotations,
                })
                .collect(),
            model_signatures,
        })
    }
}

impl Engine {
    /// The signatures of `model` and, if a plugin serves verify, its
    /// verdict, asked afresh with the node's credentials.
    pub(super) async fn inspect_signatures(
        self: &Arc<Self>,
        reference: &ModelRef,
        model: &Arc<Model>,
    ) -> Result<InspectedSignatures, EngineError> {
        let input = self.gather(reference, model, &Credential::Node, Requester::default()).await?;
        let mut inspected = InspectedSignatures {
            cosign: input.cosign.len(),
            referrers: input.referrers.iter().map(|referrer| (referrer.artifact_type.clone(), referrer.digest.clone())).collect(),
            layers: input.model_signatures.iter().map(|signature| signature.path.clone()).collect(),
            trusted: None,
            refused: None,
        };
        let plugins = self.plugins.current();
        let decision = tokio::task::spawn_blocking(move || plugins.verify(&input))
            .await
            .map_err(EngineError::join("ask the verify decision"))?;
        match decision.verdict {
            Some(VerifyVerdict::Trusted { signer, .. }) => inspected.trusted = Some(signer),
            Some(VerifyVerdict::Refused { reason, .. }) => inspected.refused = Some(reason),
            None => {}
        }
        Ok(inspected)
    }
}

/// A verdict as the mount sees it, counted.
fn judged(reference: &ModelRef, verdict: Option<VerifyVerdict>) -> Result<Option<String>, EngineError> {
    let metrics = crate::metrics::metrics();
    let Some(verdict) = verdict else {
        metrics.verifications.inc(["failed-open"]);
        return Ok(None);
    };
    match verdict {
        VerifyVerdict::Trusted { signer, .. } => {
            metrics.verifications.inc(["trusted"]);
            Ok(Some(signer))
        }
        VerifyVerdict::Refused { reason, .. } => {
            metrics.verifications.inc(["refused"]);
            Err(EngineError::Unverified { reference: reference.to_string(), reason })
        }
    }
}
