//! Fixture cases for policy authors: one decision of one plugin on a JSON
//! input, with the answer or the failure it must give. `modelcache plugins
//! test` runs them through the same runtime, limits and checks the engine
//! uses, so what passes is what a node runs.
//!
//! A case file is JSON, one case or an array of them:
//!
//! ```json
//! {
//!   "name": "denies a pull over the limit",
//!   "decision": "quota",
//!   "settings": { "max-bytes": 1000 },
//!   "input": { "reference": "…", "incoming-bytes": 2000, … },
//!   "expect": { "verdict": "deny", "reason": "…" }
//! }
//! ```
//!
//! or, instead of `expect`, `"expect-failure": { "cause": "timeout" }` with an
//! optional `"contains"` the failure's message must include. `settings`,
//! `timeout-ms` and `memory-mib` default to the plugin's `NAME.toml`.
//!
//! Answers compare as JSON values: object keys in any order, arrays in
//! order (an exclude plugin's skips and a gc plugin's evictions are ordered
//! answers). Each answer has the shape `plugins run` prints: `{"skips": […]}`,
//! `{"verdict": "admit"}` / `{"verdict": "deny", "reason": …}`, `{"evict": […]}`,
//! and for admission `{"verdict": "admit", "node-credentials": …, "tenant": …}`
//! (`tenant` only when one is named), and for verify
//! `{"verdict": "trusted", "signer": …}` / `{"verdict": "refused", "reason": …}`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};

use super::admission::{AdmissionInput, AdmissionVerdict};
use super::exclude::ExcludeInput;
use super::gc::GcInput;
use super::quota::{QuotaInput, QuotaVerdict};
use super::verify::{VerifyInput, VerifyVerdict};
use super::{CompiledPlugin, Decision, FailureCause, Plugin, PluginConfig, PluginError, Runtime};

/// Why a case file could not be read. Distinct from a case that fails: the
/// suite cannot run at all.
#[derive(Debug, thiserror::Error)]
pub enum CaseFileError {
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: not a case file", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{}: case `{name}` {problem}", path.display())]
    Invalid { path: PathBuf, name: String, problem: &'static str },
    #[error("{}: no case files (`*.json`) found", path.display())]
    Empty { path: PathBuf },
}

/// One case as written.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct RawCase {
    name: Option<String>,
    decision: Decision,
    settings: Option<Value>,
    timeout_ms: Option<u64>,
    memory_mib: Option<u64>,
    input: Value,
    expect: Option<Value>,
    expect_failure: Option<ExpectedFailure>,
}

/// A failure a case expects.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ExpectedFailure {
    /// A [`FailureCause`] label (`timeout`, `out-of-memory`, `trap`,
    /// `plugin-error`, `invalid-output`, `instantiate`), or
    /// `settings-rejected` when `validate-settings` must refuse the settings.
    pub cause: String,
    /// Text the failure's message must contain.
    pub contains: Option<String>,
}

/// What a case requires of the answer.
#[derive(Clone, Debug, PartialEq)]
pub enum Expectation {
    Answer(Value),
    Failure(ExpectedFailure),
}

/// One case, ready to run.
#[derive(Clone, Debug)]
pub struct Case {
    pub name: String,
    pub file: PathBuf,
    pub decision: Decision,
    settings: Option<Value>,
    timeout_ms: Option<u64>,
    memory_mib: Option<u64>,
    input: Value,
    pub expectation: Expectation,
}

/// The cases of a file, or of every `*.json` file of a directory (by name).
///
/// # Errors
/// A file that cannot be read or parsed, or a case that expects neither or
/// both of an answer and a failure.
pub fn load(path: &Path) -> Result<Vec<Case>, CaseFileError> {
    let files = if path.is_dir() {
        let entries = std::fs::read_dir(path).map_err(|source| CaseFileError::Read { path: path.to_owned(), source })?;
        let mut files: Vec<PathBuf> = entries
            .filter_map(Result::ok)
            .map(|entry| entry.path())
            .filter(|file| file.extension().is_some_and(|ext| ext == "json") && file.is_file())
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(CaseFileError::Empty { path: path.to_owned() });
        }
        files
    } else {
        vec![path.to_owned()]
    };
    let mut cases = Vec::new();
    for file in files {
        cases.extend(load_file(&file)?);
    }
    Ok(cases)
}

fn load_file(path: &Path) -> Result<Vec<Case>, CaseFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| CaseFileError::Read { path: path.to_owned(), source })?;
    let parse_error = |source| CaseFileError::Parse { path: path.to_owned(), source };
    // Parsed in two steps so an error names the offending key, not "no variant matched".
    let (raws, numbered) = match serde_json::from_str(&text).map_err(parse_error)? {
        Value::Array(values) => {
            let raws: Result<Vec<RawCase>, _> = values.into_iter().map(serde_json::from_value).collect();
            (raws.map_err(parse_error)?, true)
        }
        value => (vec![serde_json::from_value(value).map_err(parse_error)?], false),
    };
    let stem = path.file_stem().map(|stem| stem.to_string_lossy().into_owned()).unwrap_or_default();
    raws.into_iter()
        .enumerate()
        .map(|(index, raw)| {
            let name = raw.name.clone().unwrap_or_else(|| if numbered { format!("{stem}#{}", index + 1) } else { stem.clone() });
            let expectation = match (raw.expect, raw.expect_failure) {
                (Some(answer), None) => Expectation::Answer(answer),
                (None, Some(failure)) => Expectation::Failure(failure),
                (None, None) => {
                    return Err(CaseFileError::Invalid {
                        path: path.to_owned(),
                        name,
                        problem: "has neither `expect` nor `expect-failure`",
                    });
                }
                (Some(_), Some(_)) => {
                    return Err(CaseFileError::Invalid {
                        path: path.to_owned(),
                        name,
                        problem: "has both `expect` and `expect-failure`",
                    });
                }
            };
            Ok(Case {
                name,
                file: path.to_owned(),
                decision: raw.decision,
                settings: raw.settings,
                timeout_ms: raw.timeout_ms,
                memory_mib: raw.memory_mib,
                input: raw.input,
                expectation,
            })
        })
        .collect()
}

/// Why a decision on a JSON input gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The input does not have the decision's shape.
    #[error("not a valid {decision} input")]
    Input {
        decision: Decision,
        #[source]
        source: serde_json::Error,
    },
    /// The plugin does not serve the decision.
    #[error("plugin `{plugin}` does not serve the {decision} decision")]
    NotServed { plugin: String, decision: Decision },
    /// The plugin was refused under the case's configuration.
    #[error(transparent)]
    Load(#[from] PluginError),
    /// The call failed.
    #[error("{0}")]
    Failed(FailureCause),
}

impl CallError {
    /// The label an `expect-failure` names this by, if any.
    fn cause_label(&self) -> Option<&'static str> {
        match self {
            CallError::Failed(cause) | CallError::Load(PluginError::SettingsFailed { cause, .. }) => Some(cause.label()),
            CallError::Load(PluginError::SettingsRejected { .. }) => Some("settings-rejected"),
            _ => None,
        }
    }
}

/// Runs `decision` of `plugin` on a JSON `input`; the answer as JSON, in the
/// shape described in the module docs.
///
/// # Errors
/// An input of the wrong shape, a decision the plugin does not serve, or the
/// call's failure.
pub fn call(plugin: &Plugin, decision: Decision, input: Value) -> Result<Value, CallError> {
    if !plugin.serves(decision) {
        return Err(CallError::NotServed { plugin: plugin.name().to_owned(), decision });
    }
    let shape = |source| CallError::Input { decision, source };
    match decision {
        Decision::Admission => {
            let input: AdmissionInput = serde_json::from_value(input).map_err(shape)?;
            Ok(match plugin.admission(&input).map_err(CallError::Failed)? {
                AdmissionVerdict::Admit(grant) => {
                    let mut answer = json!({ "verdict": "admit", "node-credentials": grant.node_credentials });
                    if let Some(tenant) = grant.tenant {
                        answer["tenant"] = json!(tenant);
                    }
                    answer
                }
                AdmissionVerdict::Deny { reason, .. } => json!({ "verdict": "deny", "reason": reason }),
            })
        }
        Decision::Verify => {
            let input: VerifyInput = serde_json::from_value(input).map_err(shape)?;
            Ok(match plugin.verify(&input).map_err(CallError::Failed)? {
                VerifyVerdict::Trusted { signer, .. } => json!({ "verdict": "trusted", "signer": signer }),
                VerifyVerdict::Refused { reason, .. } => json!({ "verdict": "refused", "reason": reason }),
            })
        }
        Decision::Exclude => {
            let input: ExcludeInput = serde_json::from_value(input).map_err(shape)?;
            let skips = plugin.exclude(&input).map_err(CallError::Failed)?;
            let skips: Vec<Value> = skips.into_iter().map(|skip| json!({ "path": skip.path, "reason": skip.reason })).collect();
            Ok(json!({ "skips": skips }))
        }
        Decision::Quota => {
            let input: QuotaInput = serde_json::from_value(input).map_err(shape)?;
            Ok(match plugin.quota(&input).map_err(CallError::Failed)? {
                QuotaVerdict::Admit => json!({ "verdict": "admit" }),
                QuotaVerdict::Deny { reason, .. } => json!({ "verdict": "deny", "reason": reason }),
            })
        }
        Decision::Gc => {
            let input: GcInput = serde_json::from_value(input).map_err(shape)?;
            Ok(json!({ "evict": plugin.gc(&input).map_err(CallError::Failed)? }))
        }
    }
}

/// How one case went.
#[derive(Debug)]
pub struct Outcome {
    pub elapsed: Duration,
    pub verdict: Verdict,
}

#[derive(Debug)]
pub enum Verdict {
    Pass,
    /// The answer differs from the expected one.
    WrongAnswer {
        expected: Value,
        actual: Value,
    },
    /// A failure was expected; the call answered.
    UnexpectedAnswer {
        expected: ExpectedFailure,
        actual: Value,
    },
    /// An answer (or another failure) was expected; the call failed.
    UnexpectedFailure {
        expected: String,
        actual: String,
    },
}

impl Case {
    /// The decision's input, as written.
    pub fn input(&self) -> &Value {
        &self.input
    }

    /// The configuration this case runs under.
    pub fn config(&self, base: &PluginConfig) -> PluginConfig {
        let mut config = base.clone();
        // Serve every decision the component exports, whatever NAME.toml
        // narrows it to: a case names its decision itself.
        config.decisions = None;
        if let Some(settings) = &self.settings {
            config.settings_json = settings.to_string();
        }
        if let Some(timeout_ms) = self.timeout_ms {
            config.limits.timeout = Duration::from_millis(timeout_ms);
        }
        if let Some(memory_mib) = self.memory_mib {
            config.limits.memory_bytes = memory_mib << 20;
        }
        config
    }

    /// Runs the case against `compiled` under `base` (the plugin's
    /// `NAME.toml`) with the case's own settings and limits.
    pub fn run(&self, runtime: &std::sync::Arc<Runtime>, compiled: &CompiledPlugin, base: &PluginConfig) -> Outcome {
        let started = std::time::Instant::now();
        let answer = Plugin::new(runtime, compiled, self.config(base))
            .map_err(CallError::Load)
            .and_then(|plugin| call(&plugin, self.decision, self.input.clone()));
        let elapsed = started.elapsed();
        let verdict = match (&self.expectation, answer) {
            (Expectation::Answer(expected), Ok(actual)) if *expected == actual => Verdict::Pass,
            (Expectation::Answer(expected), Ok(actual)) => Verdict::WrongAnswer { expected: expected.clone(), actual },
            (Expectation::Answer(expected), Err(error)) => {
                Verdict::UnexpectedFailure { expected: format!("the answer {expected}"), actual: super::error_chain(&error) }
            }
            (Expectation::Failure(expected), Ok(actual)) => Verdict::UnexpectedAnswer { expected: expected.clone(), actual },
            (Expectation::Failure(expected), Err(error)) => {
                let message = super::error_chain(&error);
                let cause_matches = error.cause_label() == Some(expected.cause.as_str());
                let text_matches = expected.contains.as_deref().is_none_or(|text| message.contains(text));
                if cause_matches && text_matches {
                    Verdict::Pass
                } else {
                    let mut wanted = format!("a failure with cause `{}`", expected.cause);
                    if let Some(text) = &expected.contains {
                        wanted.push_str(&format!(" containing {text:?}"));
                    }
                    let label = error.cause_label().unwrap_or("none");
                    Verdict::UnexpectedFailure { expected: wanted, actual: format!("cause `{label}`: {message}") }
                }
            }
        };
        Outcome { elapsed, verdict }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn a_file_holds_one_case_or_many_and_a_directory_reads_json_files_in_order() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "b.json",
            r#"[{"decision":"gc","input":{},"expect":{"evict":[]}},
            {"name":"named","decision":"gc","input":{},"expect-failure":{"cause":"timeout"}}]"#,
        );
        write(dir.path(), "a.json", r#"{"decision":"quota","input":{},"expect":{"verdict":"admit"}}"#);
        write(dir.path(), "notes.txt", "not a case");
        let cases = load(dir.path()).unwrap();
        let names: Vec<&str> = cases.iter().map(|case| case.name.as_str()).collect();
        assert_eq!(names, ["a", "b#1", "named"]);
        assert_eq!(cases[2].expectation, Expectation::Failure(ExpectedFailure { cause: "timeout".into(), contains: None }));
    }

    #[test]
    fn a_case_must_expect_exactly_one_thing() {
        let dir = tempfile::tempdir().unwrap();
        let neither = write(dir.path(), "neither.json", r#"{"decision":"quota","input":{}}"#);
        let error = load(&neither).unwrap_err().to_string();
        assert!(error.contains("neither.json: case `neither` has neither"), "{error}");
        let both =
            write(dir.path(), "both.json", r#"{"decision":"quota","input":{},"expect":{},"expect-failure":{"cause":"trap"}}"#);
        assert!(load(&both).unwrap_err().to_string().contains("has both"));
    }

    #[test]
    fn unknown_keys_and_empty_directories_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(load(dir.path()), Err(CaseFileError::Empty { .. })));
        let typo = write(dir.path(), "typo.json", r#"{"decision":"quota","input":{},"expected":{}}"#);
        let error = load(&typo).unwrap_err().to_string();
        assert!(error.starts_with(&format!("{}: not a case file", typo.display())), "{error}");
    }
}
