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
use super::plugin::Versioned;
use super::quota::Filesystem;
use super::{Decision, FailMode, FailureCause, KnownNames, Plugin, PluginFailure, PluginSet, legacy};

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

/// Every candidate's references in one list, for the WIT records to borrow.
fn all_references(input: &GcInput) -> Vec<&str> {
    input.candidates.iter().flat_map(|candidate| candidate.references.iter().map(String::as_str)).collect()
}

/// What a request borrows from an input: the WIT records point into it, so
/// no string of 100,000 candidates is copied on the host.
struct Lowered<'a> {
    input: &'a GcInput,
    candidates: Vec<wit::Candidate<'a>>,
    /// The candidates' keys, to check the answer against.
    keys: KnownNames,
}

impl<'a> Lowered<'a> {
    /// `references` is `all_references(input)`.
    fn new(input: &'a GcInput, mut references: &'a [&'a str]) -> Lowered<'a> {
        let candidates = input
            .candidates
            .iter()
            .map(|candidate| {
                let (own, rest) = references.split_at(candidate.references.len());
                references = rest;
                wit::Candidate {
                    key: &candidate.key,
                    manifest_digest: &candidate.manifest_digest,
                    references: own,
                    bytes_on_disk: candidate.bytes_on_disk,
                    exclusive_bytes: candidate.exclusive_bytes,
                    created_at: candidate.created_at,
                    last_used_at: candidate.last_used_at,
                    use_count: candidate.use_count,
                }
            })
            .collect();
        Lowered { input, candidates, keys: KnownNames::new(input.candidates.iter().map(|candidate| candidate.key.as_str())) }
    }

    fn request<'r>(&'r self, settings: &'r str) -> wit::Request<'r> {
        wit::Request {
            filesystem: self.input.filesystem.into(),
            cache_bytes: self.input.cache_bytes,
            now: self.input.now,
            candidates: &self.candidates,
            settings,
        }
    }
}

impl Plugin {
    /// Calls this plugin's gc decision on `input` and checks the answer.
    ///
    /// # Errors
    /// Why the call failed; the caller applies the fail mode.
    pub fn gc(&self, input: &GcInput) -> Result<Vec<String>, FailureCause> {
        self.gc_lowered(&Lowered::new(input, &all_references(input)))
    }

    fn gc_lowered(&self, lowered: &Lowered<'_>) -> Result<Vec<String>, FailureCause> {
        let indices = self.exports.gc.as_ref().ok_or_else(|| not_served(self, Decision::Gc))?;
        let request = lowered.request(&self.config.settings_json);
        let answer = match indices {
            Versioned::Current(indices) => {
                self.call("gc", |store, instance| indices.load(&mut *store, instance)?.call_decide(&mut *store, request))?
            }
            Versioned::Legacy(indices) => legacy::gc(self, indices, &request)?,
        };
        let evict = answer.map_err(FailureCause::PluginError)?;
        if let Some(unknown) = evict.iter().find(|key| !lowered.keys.contains(key)) {
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
        let references = all_references(&input);
        let lowered = Lowered::new(&input, &references);
        let mut decision = GcDecision::default();
        let mut chosen = HashSet::new();
        for plugin in plugins {
            match plugin.gc_lowered(&lowered) {
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
