//! The admission decision: whether a requester may mount a reference with
//! these options, and with what (the node's credentials, a tenant to count
//! the mount under). Asked first, before any registry request.
//!
//! Every admission plugin must admit; the first deny decides. Node
//! credentials are granted only when every plugin grants them; the tenant
//! is the first one named. A failing plugin with fail mode `closed` (the
//! default) refuses, the reason naming the plugin and the cause; with
//! `open` it is passed over. With no admission plugin every mount is
//! admitted with the node's credentials and no tenant: a node that serves
//! one team needs no policy.

use serde::{Deserialize, Serialize};

use super::bindings::{admission as wit, types};
use super::exclude::ExcludeOptions;
use super::exclude::not_served;
use super::{Decision, FailMode, FailureCause, Plugin, PluginFailure, PluginSet, Requester, lower_requester};
use crate::registry::ModelRef;

/// The input of an admission decision.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct AdmissionInput {
    #[serde(default)]
    pub requester: Requester,
    pub reference: ModelRef,
    #[serde(default)]
    pub options: ExcludeOptions,
}

/// The answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "verdict", rename_all = "kebab-case")]
pub enum AdmissionVerdict {
    Admit(Grant),
    Deny {
        reason: String,
        /// The plugin that refused.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        plugin: Option<String>,
    },
}

/// What an admitted mount may use.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Grant {
    /// The node's registry credentials may be used, after the requester's.
    pub node_credentials: bool,
    /// The tenant the mount counts under in metrics (`other` when none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

impl Grant {
    /// What the built-in rule grants: the node's credentials, no tenant.
    pub fn builtin() -> Grant {
        Grant { node_credentials: true, tenant: None }
    }
}

/// The composed answer and the plugins that failed open on the way.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct AdmissionDecision {
    #[serde(flatten)]
    pub verdict: AdmissionVerdict,
    pub failures: Vec<PluginFailure>,
}

impl Plugin {
    /// Calls this plugin's admission decision on `input`.
    ///
    /// # Errors
    /// Why the call failed; the caller applies the fail mode.
    pub fn admission(&self, input: &AdmissionInput) -> Result<AdmissionVerdict, FailureCause> {
        let indices = self.exports.admission.as_ref().ok_or_else(|| not_served(self, Decision::Admission))?;
        let reference = &input.reference;
        let digest = reference.digest().map(|digest| digest.to_string());
        let patterns: Vec<&str> = input.options.patterns.iter().map(String::as_str).collect();
        let request = wit::Request {
            requester: lower_requester(&input.requester),
            reference: wit::Reference {
                text: reference.as_str(),
                registry: reference.registry(),
                repository: reference.repository(),
                tag: reference.as_reference().tag(),
                digest: digest.as_deref(),
            },
            options: types::Options { exclude_weights: input.options.exclude_weights, patterns: &patterns },
            settings: &self.config.settings_json,
        };
        let answer =
            self.call("admission", |store, instance| indices.load(&mut *store, instance)?.call_decide(&mut *store, request))?;
        Ok(match answer.map_err(FailureCause::PluginError)? {
            wit::Verdict::Admit(grant) => {
                AdmissionVerdict::Admit(Grant { node_credentials: grant.node_credentials, tenant: grant.tenant })
            }
            wit::Verdict::Deny(reason) => AdmissionVerdict::Deny { reason, plugin: Some(self.name.clone()) },
        })
    }
}

impl PluginSet {
    /// Asks every admission plugin in order; all must admit.
    pub fn admission(&self, input: &AdmissionInput) -> AdmissionDecision {
        let mut plugins = self.serving(Decision::Admission).peekable();
        if plugins.peek().is_none() {
            return AdmissionDecision { verdict: AdmissionVerdict::Admit(Grant::builtin()), failures: Vec::new() };
        }
        let mut failures = Vec::new();
        let mut granted: Option<Grant> = None;
        for plugin in plugins {
            match plugin.admission(input) {
                Ok(AdmissionVerdict::Admit(grant)) => {
                    granted = Some(match granted {
                        None => grant,
                        Some(so_far) => Grant {
                            node_credentials: so_far.node_credentials && grant.node_credentials,
                            tenant: so_far.tenant.or(grant.tenant),
                        },
                    });
                }
                Ok(deny) => return AdmissionDecision { verdict: deny, failures },
                Err(cause) => {
                    let failure = plugin.failure(Decision::Admission, cause);
                    if plugin.fail_mode(Decision::Admission) == FailMode::Closed {
                        let verdict = AdmissionVerdict::Deny {
                            reason: format!("{failure}; its fail mode for admission is closed"),
                            plugin: Some(plugin.name.clone()),
                        };
                        failures.push(failure);
                        return AdmissionDecision { verdict, failures };
                    }
                    failures.push(failure);
                }
            }
        }
        // Every plugin failed open: admitted as with no plugin, but without
        // the node's credentials, which a plugin was there to ration.
        let grant = granted.unwrap_or(Grant { node_credentials: false, tenant: None });
        AdmissionDecision { verdict: AdmissionVerdict::Admit(grant), failures }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With no admission plugin, a set admits with the node's credentials.
    #[test]
    fn empty_set_admits_with_node_credentials() {
        let input = AdmissionInput {
            requester: Requester { namespace: Some("web".into()), ..Requester::default() },
            reference: ModelRef::parse("registry.local/models/m:1").unwrap(),
            options: ExcludeOptions::default(),
        };
        let decision = PluginSet::default().admission(&input);
        assert_eq!(decision.verdict, AdmissionVerdict::Admit(Grant::builtin()));
        assert!(decision.failures.is_empty());
    }

    /// The case-file shapes: kebab-case, the verdict as a tag.
    #[test]
    fn verdicts_read_as_case_files_write_them() {
        let admit: AdmissionVerdict =
            serde_json::from_str(r#"{"verdict": "admit", "node-credentials": true, "tenant": "research"}"#).unwrap();
        assert_eq!(admit, AdmissionVerdict::Admit(Grant { node_credentials: true, tenant: Some("research".into()) }));
        let input: AdmissionInput = serde_json::from_str(
            r#"{"requester": {"namespace": "web", "volume": "csi-1"}, "reference": "registry.local:5000/models/m@sha256:0000000000000000000000000000000000000000000000000000000000000000"}"#,
        )
        .unwrap();
        assert_eq!(input.reference.registry(), "registry.local:5000");
        assert_eq!(input.requester.volume.as_deref(), Some("csi-1"));
        assert!(serde_json::from_str::<AdmissionInput>(r#"{"reference": "r/m:1", "who": "x"}"#).is_err());
    }
}
