//! The gc decision: which unreferenced cache entries to evict.
//!
//! The host offers only entries no volume references, no pull or link step
//! holds and no operator pinned. Several plugins evict the union of their
//! answers, in plugin order (each plugin is one reason to evict: a TTL, a
//! watermark, …). A failing plugin with fail mode `open` (the default)
//! contributes nothing; with `closed` the whole run evicts nothing. With no
//! gc plugin nothing is evicted.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use super::bindings::gc as wit;
use super::exclude::not_served;
use super::quota::Filesystem;
use super::{Decision, FailMode, FailureCause, KnownNames, Plugin, PluginFailure, PluginSet};

/// The input of a gc decision.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct GcInput {
    pub filesystem: Filesystem,
    pub cache_bytes: u64,
    /// Seconds since the Unix epoch.
    pub now: u64,
    pub candidates: Vec<Candidate>,
}

/// An entry that may be evicted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Candidate {
    pub key: String,
    pub manifest_digest: String,
    #[serde(default)]
    pub references: Vec<String>,
    pub bytes_on_disk: u64,
    pub exclusive_bytes: u64,
    pub created_at: u64,
    pub last_used_at: u64,
    pub use_count: u64,
}

/// The composed answer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct GcDecision {
    /// Keys to evict, in order, each with the plugin that chose it.
    pub evict: Vec<GcChoice>,
    pub failures: Vec<PluginFailure>,
}

/// One key to evict and who chose it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct GcChoice {
    pub key: String,
    pub plugin: String,
}

impl GcDecision {
    /// The keys, in order.
    pub fn keys(&self) -> Vec<&str> {
        self.evict.iter().map(|choice| choice.key.as_str()).collect()
    }
}

/// Moves the input into the WIT types: with 100,000 candidates, copying
/// their strings would cost more than the plugin's own work.
fn into_wit(input: GcInput) -> wit::Request {
    wit::Request {
        filesystem: input.filesystem.into(),
        cache_bytes: input.cache_bytes,
        now: input.now,
        candidates: input
            .candidates
            .into_iter()
            .map(|candidate| wit::Candidate {
                key: candidate.key,
                manifest_digest: candidate.manifest_digest,
                references: candidate.references,
                bytes_on_disk: candidate.bytes_on_disk,
                exclusive_bytes: candidate.exclusive_bytes,
                created_at: candidate.created_at,
                last_used_at: candidate.last_used_at,
                use_count: candidate.use_count,
            })
            .collect(),
        settings: String::new(),
    }
}

impl Plugin {
    /// Calls this plugin's gc decision on `input` and checks the answer.
    ///
    /// # Errors
    /// Why the call failed; the caller applies the fail mode.
    pub fn gc(&self, input: &GcInput) -> Result<Vec<String>, FailureCause> {
        let keys = KnownNames::new(input.candidates.iter().map(|candidate| candidate.key.as_str()));
        self.gc_wit(&mut into_wit(input.clone()), &keys)
    }

    fn gc_wit(&self, request: &mut wit::Request, keys: &KnownNames) -> Result<Vec<String>, FailureCause> {
        let indices = self.exports.gc.as_ref().ok_or_else(|| not_served(self, Decision::Gc))?;
        request.settings.clone_from(&self.config.settings_json);
        let answer = self.call("gc", |store, instance| indices.load(&mut *store, instance)?.call_decide(&mut *store, request))?;
        let evict = answer.map_err(FailureCause::PluginError)?;
        if let Some(unknown) = evict.iter().find(|key| !keys.contains(key)) {
            return Err(FailureCause::InvalidOutput(format!("evicts `{unknown}`, which is not a candidate")));
        }
        Ok(evict)
    }
}

impl PluginSet {
    /// Asks every gc plugin in order and unions their answers.
    pub fn gc(&self, input: GcInput) -> GcDecision {
        let mut plugins = self.serving(Decision::Gc).peekable();
        if plugins.peek().is_none() || input.candidates.is_empty() {
            return GcDecision::default();
        }
        let keys = KnownNames::new(input.candidates.iter().map(|candidate| candidate.key.as_str()));
        let mut request = into_wit(input);
        let mut decision = GcDecision::default();
        let mut chosen = HashSet::new();
        for plugin in plugins {
            match plugin.gc_wit(&mut request, &keys) {
                Ok(evict) => {
                    for key in evict {
                        if chosen.insert(key.clone()) {
                            decision.evict.push(GcChoice { key, plugin: plugin.name.clone() });
                        }
                    }
                }
                Err(cause) => {
                    let failure = plugin.failure(Decision::Gc, cause);
                    decision.failures.push(failure);
                    if plugin.fail_mode(Decision::Gc) == FailMode::Closed {
                        decision.evict.clear();
                        return decision;
                    }
                }
            }
        }
        decision
    }
}
