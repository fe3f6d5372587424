//! The exclude decision: which files of a model stay out of a volume.
//!
//! Several plugins skip the union of their answers (the first reason given
//! for a path is kept). A failing plugin with fail mode `open` skips nothing;
//! with `closed` the decision fails and so does the mount. With no exclude
//! plugin nothing is skipped, and a request that asks for exclusion is
//! refused rather than silently served in full.

pub use modelcache_api::options::{ExcludeOptions, Skip};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::bindings::{exclude as wit, types};
use super::plugin::Versioned;
use super::{Decision, FailMode, FailureCause, KnownNames, Plugin, PluginFailure, PluginSet, Requester, legacy, lower_requester};

/// The input of an exclude decision.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ExcludeInput {
    /// Who asks (absent in case files written for 0.1: nobody known).
    #[serde(default)]
    pub requester: Requester,
    pub artifact: Artifact,
    pub files: Vec<ModelFile>,
    #[serde(default)]
    pub options: ExcludeOptions,
}

/// The model being mounted.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Artifact {
    pub reference: String,
    pub manifest_digest: String,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

/// One file (one layer) of the model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ModelFile {
    pub path: String,
    pub size: u64,
    pub media_type: String,
    pub layer_digest: String,
}

/// The check of a request's patterns, here because it needs the SDK's
/// pattern parser, which the API's types do not carry.
pub trait ValidatePatterns {
    /// Checks the request's patterns against the gitignore syntax the WIT
    /// promises plugins (the SDK's parser, which the reference plugin uses).
    /// A request is checked before anything is fetched: a pattern a plugin
    /// could not parse would otherwise fail that plugin, and with the
    /// exclude fail mode `open` (the default) the files the user asked to
    /// leave out would be pulled.
    ///
    /// # Errors
    /// [`ExcludeError::InvalidPattern`] naming the first bad pattern.
    fn validate(&self) -> Result<(), ExcludeError>;
}

impl ValidatePatterns for ExcludeOptions {
    fn validate(&self) -> Result<(), ExcludeError> {
        modelcache_policy::pattern::Rules::parse(self.patterns.iter().map(String::as_str))
            .map(drop)
            .map_err(ExcludeError::InvalidPattern)
    }
}

/// The composed answer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ExcludeDecision {
    pub skips: Vec<Skip>,
    /// Plugins that failed open (their answers are missing from `skips`).
    pub failures: Vec<PluginFailure>,
}

/// Why an exclude decision could not be made.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ExcludeError {
    #[error("{0}; its fail mode for exclude is closed")]
    Failed(PluginFailure),
    #[error(
        "the request asks to leave files out (exclude-weights or patterns) but no plugin serves \
         the exclude decision; install exclude-patterns.wasm in the plugin directory"
    )]
    Unserved,
    #[error("the request's exclude pattern `{}` does not parse: it {}", .0.pattern, .0.reason)]
    InvalidPattern(modelcache_policy::pattern::PatternError),
}

impl ExcludeError {
    pub fn kind(&self) -> crate::error::ErrorKind {
        match self {
            ExcludeError::Failed(_) => crate::error::ErrorKind::PolicyFailed,
            ExcludeError::Unserved | ExcludeError::InvalidPattern(_) => crate::error::ErrorKind::InvalidArgument,
        }
    }
}

/// What a request borrows from an input: the WIT records point into it, so
/// no string is copied on the host.
struct Lowered<'a> {
    annotations: Vec<types::Annotation<'a>>,
    files: Vec<wit::ModelFile<'a>>,
    patterns: Vec<&'a str>,
    input: &'a ExcludeInput,
    /// The input's paths, to check the answer against.
    paths: KnownNames,
}

impl<'a> Lowered<'a> {
    fn new(input: &'a ExcludeInput) -> Lowered<'a> {
        Lowered {
            annotations: input.artifact.annotations.iter().map(|(key, value)| types::Annotation { key, value }).collect(),
            files: input
                .files
                .iter()
                .map(|file| wit::ModelFile {
                    path: &file.path,
                    size: file.size,
                    media_type: &file.media_type,
                    layer_digest: &file.layer_digest,
                })
                .collect(),
            patterns: input.options.patterns.iter().map(String::as_str).collect(),
            input,
            paths: KnownNames::new(input.files.iter().map(|file| file.path.as_str())),
        }
    }

    fn request<'r>(&'r self, settings: &'r str) -> wit::Request<'r> {
        wit::Request {
            requester: lower_requester(&self.input.requester),
            artifact: wit::Artifact {
                reference: &self.input.artifact.reference,
                manifest_digest: &self.input.artifact.manifest_digest,
                annotations: &self.annotations,
            },
            files: &self.files,
            options: types::Options { exclude_weights: self.input.options.exclude_weights, patterns: &self.patterns },
            settings,
        }
    }
}

impl Plugin {
    /// Calls this plugin's exclude decision on `input` and checks the answer.
    ///
    /// # Errors
    /// Why the call failed; the caller applies the fail mode.
    pub fn exclude(&self, input: &ExcludeInput) -> Result<Vec<Skip>, FailureCause> {
        self.exclude_lowered(&Lowered::new(input))
    }

    fn exclude_lowered(&self, lowered: &Lowered<'_>) -> Result<Vec<Skip>, FailureCause> {
        let indices = self.exports.exclude.as_ref().ok_or_else(|| not_served(self, Decision::Exclude))?;
        let request = lowered.request(&self.config.settings_json);
        let answer = match indices {
            Versioned::Current(indices) => {
                self.call("exclude", |store, instance| indices.load(&mut *store, instance)?.call_decide(&mut *store, request))?
            }
            Versioned::Legacy(indices) => legacy::exclude(self, indices, &request)?,
        };
        let skips = answer.map_err(FailureCause::PluginError)?;
        if let Some(unknown) = skips.iter().find(|skip| !lowered.paths.contains(&skip.path)) {
            return Err(FailureCause::InvalidOutput(format!("skips `{}`, which is not a file of the model", unknown.path)));
        }
        Ok(skips.into_iter().map(|skip| Skip { path: skip.path, reason: skip.reason, plugin: self.name.clone() }).collect())
    }
}

/// Exclude decisions a plugin set already made, by the model and options
/// they were made for.
///
/// A policy is a function of its input: each call gets a fresh instance,
/// which keeps nothing, and an exclude policy has no business reading the
/// clock or random numbers (`docs/policies.md` asks policy authors for
/// this). The requester, the reference and the manifest digest fix the rest
/// of the input (the files and annotations are the manifest's), so a warm
/// mount asks again only for another requester or other options; for a 1,000-file model, asking is about a
/// millisecond and a half. A reload makes a new set, which starts with no
/// answers. A decision where a plugin failed open is not kept: the next
/// mount asks again.
#[derive(Debug, Default)]
pub struct ExcludeMemo {
    kept: Mutex<Option<Answers>>,
}

/// The answers of one plugin set.
#[derive(Debug)]
struct Answers {
    /// The [`PluginSet::generation`] of the set that answered.
    made_by: u64,
    decisions: HashMap<MemoKey, ExcludeDecision>,
}

/// What an exclude decision is remembered by: who asks, the reference as
/// written, the manifest digest and the options.
pub type MemoKey = (Requester, String, String, ExcludeOptions);

impl ExcludeMemo {
    /// Distinct models and options kept.
    const KEPT: usize = 256;

    fn kept(&self) -> std::sync::MutexGuard<'_, Option<Answers>> {
        self.kept.lock().unwrap_or_else(|poison| poison.into_inner())
    }

    /// What `set` decided for this model and these options, if it did.
    pub fn get(&self, set: &PluginSet, key: &MemoKey) -> Option<ExcludeDecision> {
        let kept = self.kept();
        let answers = kept.as_ref().filter(|answers| answers.made_by == set.generation())?;
        answers.decisions.get(key).cloned()
    }

    /// Keeps what `set` decided, unless a plugin failed; the answers of an
    /// earlier set go.
    pub fn put(&self, set: &PluginSet, key: MemoKey, decision: &ExcludeDecision) {
        if !decision.failures.is_empty() {
            return;
        }
        let made_by = set.generation();
        let mut kept = self.kept();
        let answers = match kept.take() {
            Some(answers) if answers.made_by == made_by => kept.insert(answers),
            _ => kept.insert(Answers { made_by, decisions: HashMap::new() }),
        };
        crate::memo::insert_bounded(&mut answers.decisions, Self::KEPT, key, decision.clone());
    }
}

pub(super) fn not_served(plugin: &Plugin, decision: Decision) -> FailureCause {
    FailureCause::Instantiate(format!("plugin `{}` does not serve {decision}", plugin.name))
}

impl PluginSet {
    /// Runs every exclude plugin in order and unions their skips.
    ///
    /// # Errors
    /// A plugin failed with fail mode `closed`, or the request asks for
    /// exclusion and no plugin serves it.
    pub fn exclude(&self, input: ExcludeInput) -> Result<ExcludeDecision, ExcludeError> {
        let mut plugins = self.serving(Decision::Exclude).peekable();
        if plugins.peek().is_none() {
            return if input.options.is_empty() { Ok(ExcludeDecision::default()) } else { Err(ExcludeError::Unserved) };
        }
        let lowered = Lowered::new(&input);
        let mut decision = ExcludeDecision::default();
        let mut skipped = HashSet::new();
        for plugin in plugins {
            match plugin.exclude_lowered(&lowered) {
                Ok(skips) => {
                    for skip in skips {
                        if skipped.insert(skip.path.clone()) {
                            decision.skips.push(skip);
                        }
                    }
                }
                Err(cause) => {
                    let failure = plugin.failure(Decision::Exclude, cause);
                    match plugin.fail_mode(Decision::Exclude) {
                        FailMode::Open => decision.failures.push(failure),
                        FailMode::Closed => return Err(ExcludeError::Failed(failure)),
                    }
                }
            }
        }
        Ok(decision)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A remembered decision is given back for the set that made it only;
    /// keeping one of a newer set drops the older set's answers.
    #[test]
    fn the_memo_answers_for_the_set_that_decided() {
        let memo = ExcludeMemo::default();
        let (old, new) = (PluginSet::default(), PluginSet::default());
        let key: MemoKey = (Requester::default(), "registry/model:1".into(), "sha256:aa".into(), ExcludeOptions::default());
        let decision = ExcludeDecision { skips: Vec::new(), failures: Vec::new() };
        memo.put(&old, key.clone(), &decision);
        assert_eq!(memo.get(&old, &key), Some(decision.clone()));
        assert_eq!(memo.get(&new, &key), None);
        memo.put(&new, key.clone(), &decision);
        assert_eq!(memo.get(&old, &key), None);
        assert_eq!(memo.get(&new, &key), Some(decision));
    }
}
