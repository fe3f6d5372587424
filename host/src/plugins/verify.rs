//! The verify decision: whether a model is signed by someone the deployment
//! trusts, on the signature material the host gathered (cosign signatures,
//! referrers, signature layers) before any weight is fetched.
//!
//! Every verify plugin must trust; the signers they name are kept, in
//! plugin order. A failing plugin with fail mode `closed` (the default)
//! refuses, the reason naming the plugin and the cause; with `open` it is
//! passed over (a warn-only deployment: its failures are logged). With no
//! verify plugin nothing is verified and every model mounts.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::bindings::{types, verify as wit};
use super::exclude::not_served;
use super::{Decision, FailMode, FailureCause, Plugin, PluginFailure, PluginSet, Requester, lower_requester};

/// The input of a verify decision.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct VerifyInput {
    #[serde(default)]
    pub requester: Requester,
    pub reference: String,
    pub manifest_digest: String,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    pub layers: Vec<SignedLayer>,
    #[serde(default)]
    pub cosign: Vec<CosignSignature>,
    #[serde(default)]
    pub referrers: Vec<Referrer>,
    #[serde(default)]
    pub model_signatures: Vec<ModelSignature>,
}

/// One layer of the manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct SignedLayer {
    pub path: String,
    pub digest: String,
    pub size: u64,
    pub media_type: String,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

/// A cosign keyed signature (one layer under the `.sig` tag).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct CosignSignature {
    /// The simple-signing payload, verbatim (case files give it as text).
    #[serde(with = "text")]
    pub payload: Vec<u8>,
    /// Base64, as in the `dev.cosignproject.cosign/signature` annotation.
    pub signature: String,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

/// A manifest naming this one as its subject.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Referrer {
    pub digest: String,
    pub media_type: String,
    pub artifact_type: String,
    pub size: u64,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

/// A signature shipped as a layer of the model.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ModelSignature {
    pub path: String,
    pub layer_digest: String,
    /// The layer's bytes (case files give them as text).
    #[serde(with = "text")]
    pub bundle: Vec<u8>,
}

/// Bytes that are text in every format that carries them (JSON payloads and
/// bundles), written as a string in case files.
mod text {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&String::from_utf8_lossy(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
        Ok(String::deserialize(deserializer)?.into_bytes())
    }
}

/// The answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "verdict", rename_all = "kebab-case")]
pub enum VerifyVerdict {
    Trusted {
        signer: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        plugin: Option<String>,
    },
    Refused {
        reason: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        plugin: Option<String>,
    },
}

/// The composed answer: `None` when no plugin serves verify, or when every
/// one failed open (`failures` then says why: nobody vouched, and the mount
/// goes on as a warn-only deployment wants).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct VerifyDecision {
    pub verdict: Option<VerifyVerdict>,
    pub failures: Vec<PluginFailure>,
}

fn annotations(map: &BTreeMap<String, String>) -> Vec<types::Annotation<'_>> {
    map.iter().map(|(key, value)| types::Annotation { key, value }).collect()
}

impl Plugin {
    /// Calls this plugin's verify decision on `input`.
    ///
    /// # Errors
    /// Why the call failed; the caller applies the fail mode.
    pub fn verify(&self, input: &VerifyInput) -> Result<VerifyVerdict, FailureCause> {
        let indices = self.exports.verify.as_ref().ok_or_else(|| not_served(self, Decision::Verify))?;
        let layer_annotations: Vec<_> = input.layers.iter().map(|layer| annotations(&layer.annotations)).collect();
        let layers: Vec<_> = input
            .layers
            .iter()
            .zip(&layer_annotations)
            .map(|(layer, annotations)| wit::Layer {
                path: &layer.path,
                digest: &layer.digest,
                size: layer.size,
                media_type: &layer.media_type,
                annotations,
            })
            .collect();
        let cosign_annotations: Vec<_> = input.cosign.iter().map(|signature| annotations(&signature.annotations)).collect();
        let cosign: Vec<_> = input
            .cosign
            .iter()
            .zip(&cosign_annotations)
            .map(|(signature, annotations)| wit::CosignSignature {
                payload: &signature.payload,
                signature: &signature.signature,
                annotations,
            })
            .collect();
        let referrer_annotations: Vec<_> = input.referrers.iter().map(|referrer| annotations(&referrer.annotations)).collect();
        let referrers: Vec<_> = input
            .referrers
            .iter()
            .zip(&referrer_annotations)
            .map(|(referrer, annotations)| wit::Referrer {
                digest: &referrer.digest,
                media_type: &referrer.media_type,
                artifact_type: &referrer.artifact_type,
                size: referrer.size,
                annotations,
            })
            .collect();
        let model_signatures: Vec<_> = input
            .model_signatures
            .iter()
            .map(|signature| wit::ModelSignature {
                path: &signature.path,
                layer_digest: &signature.layer_digest,
                bundle: &signature.bundle,
            })
            .collect();
        let manifest_annotations = annotations(&input.annotations);
        let request = wit::Request {
            requester: lower_requester(&input.requester),
            reference: &input.reference,
            manifest_digest: &input.manifest_digest,
            annotations: &manifest_annotations,
            layers: &layers,
            cosign: &cosign,
            referrers: &referrers,
            model_signatures: &model_signatures,
            settings: &self.config.settings_json,
        };
        let answer =
            self.call("verify", |store, instance| indices.load(&mut *store, instance)?.call_decide(&mut *store, request))?;
        Ok(match answer.map_err(FailureCause::PluginError)? {
            wit::Verdict::Trusted(signer) => VerifyVerdict::Trusted { signer, plugin: Some(self.name.clone()) },
            wit::Verdict::Refused(reason) => VerifyVerdict::Refused { reason, plugin: Some(self.name.clone()) },
        })
    }
}

impl PluginSet {
    /// Asks every verify plugin in order; all must trust.
    pub fn verify(&self, input: &VerifyInput) -> VerifyDecision {
        let mut failures = Vec::new();
        let mut signers = Vec::new();
        let mut asked = false;
        for plugin in self.serving(Decision::Verify) {
            asked = true;
            match plugin.verify(input) {
                Ok(VerifyVerdict::Trusted { signer, .. }) => signers.push(signer),
                Ok(refused) => return VerifyDecision { verdict: Some(refused), failures },
                Err(cause) => {
                    let failure = plugin.failure(Decision::Verify, cause);
                    if plugin.fail_mode(Decision::Verify) == FailMode::Closed {
                        let verdict = VerifyVerdict::Refused {
                            reason: format!("{failure}; its fail mode for verify is closed"),
                            plugin: Some(plugin.name.clone()),
                        };
                        failures.push(failure);
                        return VerifyDecision { verdict: Some(verdict), failures };
                    }
                    failures.push(failure);
                }
            }
        }
        let verdict = (asked && !signers.is_empty()).then(|| VerifyVerdict::Trusted { signer: signers.join(", "), plugin: None });
        VerifyDecision { verdict, failures }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With no verify plugin nothing is verified.
    #[test]
    fn no_plugin_verifies_nothing() {
        let input = VerifyInput {
            requester: Requester::default(),
            reference: "r/m:1".into(),
            manifest_digest: "sha256:00".into(),
            annotations: BTreeMap::new(),
            layers: Vec::new(),
            cosign: Vec::new(),
            referrers: Vec::new(),
            model_signatures: Vec::new(),
        };
        assert_eq!(PluginSet::default().verify(&input).verdict, None);
    }

    /// Case files give payloads and bundles as text.
    #[test]
    fn case_shapes() {
        let signature: CosignSignature =
            serde_json::from_str(r#"{"payload": "{\"critical\": {}}", "signature": "MEUC"}"#).unwrap();
        assert_eq!(signature.payload, br#"{"critical": {}}"#);
        let verdict: VerifyVerdict = serde_json::from_str(r#"{"verdict": "trusted", "signer": "release-key"}"#).unwrap();
        assert_eq!(verdict, VerifyVerdict::Trusted { signer: "release-key".into(), plugin: None });
    }
}
