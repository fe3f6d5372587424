//! Why a plugin was refused at load, and why one call of it failed.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use super::{Decision, LEGACY_POLICY_VERSION, POLICY_VERSION};

/// A boxed cause, for errors from wasmtime (whose own error type is not a
/// `std::error::Error`).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A plugin that could not be loaded. The other plugins of the directory load
/// regardless; the refusal is reported in the plugin's status.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("plugin `{plugin}`: cannot read {}", path.display())]
    Read {
        plugin: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("plugin `{plugin}`: {}: {reason}", path.display())]
    Config { plugin: String, path: PathBuf, reason: String },
    #[error("plugin `{plugin}`: not a WebAssembly component this host can compile")]
    Compile {
        plugin: String,
        #[source]
        source: BoxError,
    },
    #[error(
        "plugin `{plugin}` imports `{import}`, which modelcache does not grant \
         (policies get clocks, random and stdio only); {hint}"
    )]
    ForbiddenImport { plugin: String, import: String, hint: &'static str },
    #[error(
        "plugin `{plugin}` was built against modelcache:policy@{found}, which this host does not serve \
         (it serves modelcache:policy@{POLICY_VERSION} and, for older plugins, modelcache:policy@{LEGACY_POLICY_VERSION}); \
         rebuild it against wit/policy.wit"
    )]
    IncompatibleVersion { plugin: String, found: String },
    #[error("plugin `{plugin}` exports no modelcache:policy decision (admission, verify, exclude, quota or gc)")]
    NoDecision { plugin: String },
    #[error("plugin `{plugin}` does not export `settings.validate-settings`, which every plugin must")]
    NoSettings { plugin: String },
    #[error("plugin `{plugin}`: its configuration asks it to serve `{decision}`, which the component does not export")]
    DecisionNotExported { plugin: String, decision: Decision },
    #[error("plugin `{plugin}`: its `{interface}` export does not match that interface of the WIT")]
    Mismatch {
        plugin: String,
        interface: String,
        #[source]
        source: BoxError,
    },
    #[error("plugin `{plugin}`: settings rejected: {reason}")]
    SettingsRejected { plugin: String, reason: String },
    #[error("plugin `{plugin}`: validate-settings failed: {cause}")]
    SettingsFailed { plugin: String, cause: FailureCause },
}

impl PluginError {
    /// The plugin the error is about.
    pub fn plugin(&self) -> &str {
        match self {
            PluginError::Read { plugin, .. }
            | PluginError::Config { plugin, .. }
            | PluginError::Compile { plugin, .. }
            | PluginError::ForbiddenImport { plugin, .. }
            | PluginError::IncompatibleVersion { plugin, .. }
            | PluginError::NoDecision { plugin }
            | PluginError::NoSettings { plugin }
            | PluginError::DecisionNotExported { plugin, .. }
            | PluginError::Mismatch { plugin, .. }
            | PluginError::SettingsRejected { plugin, .. }
            | PluginError::SettingsFailed { plugin, .. } => plugin,
        }
    }
}

/// Why one call of a plugin failed. Every cause is logged; the plugin's fail
/// mode for the decision then decides what the failure means.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "cause", content = "detail", rename_all = "kebab-case")]
pub enum FailureCause {
    /// The call ran past its deadline and was interrupted.
    Timeout(#[serde(with = "millis")] Duration),
    /// The instance asked for more memory than its cap.
    OutOfMemory(u64),
    /// The guest trapped (a Rust panic ends in a trap too).
    Trap(String),
    /// The plugin answered with its own error (`err(message)`).
    PluginError(String),
    /// The answer broke the interface's rules (an unknown path or key).
    InvalidOutput(String),
    /// The instance could not be created.
    Instantiate(String),
}

impl FailureCause {
    /// A short label for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            FailureCause::Timeout(_) => "timeout",
            FailureCause::OutOfMemory(_) => "out-of-memory",
            FailureCause::Trap(_) => "trap",
            FailureCause::PluginError(_) => "plugin-error",
            FailureCause::InvalidOutput(_) => "invalid-output",
            FailureCause::Instantiate(_) => "instantiate",
        }
    }
}

impl fmt::Display for FailureCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FailureCause::Timeout(deadline) => write!(f, "timeout: ran past its {} ms deadline", deadline.as_millis()),
            FailureCause::OutOfMemory(cap) => write!(f, "out of memory: exceeded its {} MiB cap", cap >> 20),
            FailureCause::Trap(message) => write!(f, "trap: {message}"),
            FailureCause::PluginError(message) => write!(f, "plugin error: {message}"),
            FailureCause::InvalidOutput(message) => write!(f, "invalid output: {message}"),
            FailureCause::Instantiate(message) => write!(f, "instantiation failed: {message}"),
        }
    }
}

/// One failed call, as decisions report it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, thiserror::Error)]
#[error("{decision} plugin `{plugin}` failed ({cause})")]
pub struct PluginFailure {
    pub plugin: String,
    pub decision: Decision,
    pub cause: FailureCause,
}

mod millis {
    use std::time::Duration;

    pub fn serialize<S: serde::Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_u64(duration.as_millis() as u64)
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        <u64 as serde::Deserialize>::deserialize(deserializer).map(Duration::from_millis)
    }
}
