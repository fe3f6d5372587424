//! A plugin's optional `NAME.toml`: the decisions it serves, its place in the
//! order, its limits, its fail modes and its settings.
//!
//! ```toml
//! decisions = ["exclude"]     # default: every decision the component exports
//! order = 10                  # lower runs first; ties by name (default 100)
//! timeout-ms = 100            # wall-clock deadline per call (1–60000)
//! memory-mib = 64             # memory cap per instance (1–4096)
//!
//! [fail-mode]                 # what a failed call means
//! exclude = "open"            # open: skip nothing   | closed: the mount fails
//! quota = "closed"            # open: admit          | closed: deny
//! gc = "open"                 # open: evict nothing of this plugin's
//!                             # closed: the whole GC run evicts nothing
//!
//! [settings]                  # passed to the plugin as JSON
//! patterns = ["*.md"]
//! ```

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use super::Decision;

/// Defaults that apply when `NAME.toml` is absent or silent.
pub const DEFAULT_ORDER: i32 = 100;
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(100);
pub const DEFAULT_MEMORY_BYTES: u64 = 64 << 20;
/// The largest memory cap a plugin may ask for; the pooling allocator's slots
/// are sized for it.
pub const MAX_MEMORY_BYTES: u64 = 4 << 30;
const MAX_TIMEOUT: Duration = Duration::from_secs(60);

/// What a failed call of a plugin means for its decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailMode {
    /// The failing plugin is passed over: admission and quota admit on its
    /// part, exclude skips nothing, gc evicts nothing on this plugin's word.
    Open,
    /// The failure stops the decision: the mount is refused or fails, the
    /// pull is denied, the GC run evicts nothing.
    Closed,
}

impl FailMode {
    /// The safe default of each decision.
    pub fn default_for(decision: Decision) -> FailMode {
        match decision {
            Decision::Exclude | Decision::Gc => FailMode::Open,
            Decision::Admission | Decision::Verify | Decision::Quota => FailMode::Closed,
        }
    }
}

/// Resource limits of one call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub timeout: Duration,
    pub memory_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { timeout: DEFAULT_TIMEOUT, memory_bytes: DEFAULT_MEMORY_BYTES }
    }
}

/// A plugin's configuration, defaults filled in.
#[derive(Clone, Debug, PartialEq)]
pub struct PluginConfig {
    /// The decisions to serve; `None` serves every exported one.
    pub decisions: Option<Vec<Decision>>,
    pub order: i32,
    pub limits: Limits,
    pub fail_modes: FailModes,
    /// The `[settings]` table as the JSON document the plugin receives.
    pub settings_json: String,
}

/// One fail mode per decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FailModes {
    pub admission: FailMode,
    pub verify: FailMode,
    pub exclude: FailMode,
    pub quota: FailMode,
    pub gc: FailMode,
}

impl FailModes {
    pub fn get(&self, decision: Decision) -> FailMode {
        match decision {
            Decision::Admission => self.admission,
            Decision::Verify => self.verify,
            Decision::Exclude => self.exclude,
            Decision::Quota => self.quota,
            Decision::Gc => self.gc,
        }
    }
}

impl Default for FailModes {
    fn default() -> Self {
        FailModes {
            admission: FailMode::default_for(Decision::Admission),
            verify: FailMode::default_for(Decision::Verify),
            exclude: FailMode::default_for(Decision::Exclude),
            quota: FailMode::default_for(Decision::Quota),
            gc: FailMode::default_for(Decision::Gc),
        }
    }
}

impl Default for PluginConfig {
    fn default() -> Self {
        PluginConfig {
            decisions: None,
            order: DEFAULT_ORDER,
            limits: Limits::default(),
            fail_modes: FailModes::default(),
            settings_json: "{}".to_owned(),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawConfig {
    decisions: Option<Vec<Decision>>,
    order: Option<i32>,
    timeout_ms: Option<u64>,
    memory_mib: Option<u64>,
    #[serde(default)]
    fail_mode: RawFailModes,
    settings: Option<toml::Table>,
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFailModes {
    admission: Option<FailMode>,
    verify: Option<FailMode>,
    exclude: Option<FailMode>,
    quota: Option<FailMode>,
    gc: Option<FailMode>,
}

impl PluginConfig {
    /// Reads `path` if it exists; a missing file gives the defaults.
    ///
    /// # Errors
    /// A message naming the key and the reason, for the plugin's refusal.
    pub fn load(path: &Path) -> Result<PluginConfig, String> {
        match std::fs::read_to_string(path) {
            Ok(text) => PluginConfig::parse(&text),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(PluginConfig::default()),
            Err(error) => Err(format!("cannot read: {error}")),
        }
    }

    /// Parses the TOML text of a plugin configuration.
    ///
    /// # Errors
    /// A message naming the key and the reason.
    pub fn parse(text: &str) -> Result<PluginConfig, String> {
        let raw: RawConfig = toml::from_str(text).map_err(|error| error.message().to_owned() + &span_hint(text, &error))?;
        let timeout = match raw.timeout_ms {
            None => DEFAULT_TIMEOUT,
            Some(ms) if (1..=MAX_TIMEOUT.as_millis() as u64).contains(&ms) => Duration::from_millis(ms),
            Some(ms) => return Err(format!("timeout-ms = {ms}: must lie between 1 and {}", MAX_TIMEOUT.as_millis())),
        };
        let memory_bytes = match raw.memory_mib {
            None => DEFAULT_MEMORY_BYTES,
            Some(mib) if (1..=MAX_MEMORY_BYTES >> 20).contains(&mib) => mib << 20,
            Some(mib) => return Err(format!("memory-mib = {mib}: must lie between 1 and {}", MAX_MEMORY_BYTES >> 20)),
        };
        let defaults = FailModes::default();
        let fail_modes = FailModes {
            admission: raw.fail_mode.admission.unwrap_or(defaults.admission),
            verify: raw.fail_mode.verify.unwrap_or(defaults.verify),
            exclude: raw.fail_mode.exclude.unwrap_or(defaults.exclude),
            quota: raw.fail_mode.quota.unwrap_or(defaults.quota),
            gc: raw.fail_mode.gc.unwrap_or(defaults.gc),
        };
        let settings_json = serde_json::to_string(&raw.settings.unwrap_or_default())
            .map_err(|error| format!("settings: cannot be passed as JSON: {error}"))?;
        Ok(PluginConfig {
            decisions: raw.decisions,
            order: raw.order.unwrap_or(DEFAULT_ORDER),
            limits: Limits { timeout, memory_bytes },
            fail_modes,
            settings_json,
        })
    }
}

/// `toml`'s message lacks the line; add it so operators find the key.
fn span_hint(text: &str, error: &toml::de::Error) -> String {
    match error.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!(" (line {line})")
        }
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A missing or empty file gives the documented defaults.
    #[test]
    fn defaults() {
        let config = PluginConfig::parse("").unwrap();
        assert_eq!(config, PluginConfig::default());
        assert_eq!(config.limits.timeout, Duration::from_millis(100));
        assert_eq!(config.limits.memory_bytes, 64 << 20);
        assert_eq!(config.fail_modes.quota, FailMode::Closed);
        assert_eq!(config.fail_modes.exclude, FailMode::Open);
        assert_eq!(config.settings_json, "{}");
    }

    /// Every key is read, and settings arrive as JSON.
    #[test]
    fn every_key() {
        let config = PluginConfig::parse(
            r#"
            decisions = ["quota", "gc"]
            order = -3
            timeout-ms = 250
            memory-mib = 16
            [fail-mode]
            quota = "open"
            [settings]
            limit = "80%"
            nested = { depth = 2 }
            "#,
        )
        .unwrap();
        assert_eq!(config.decisions, Some(vec![Decision::Quota, Decision::Gc]));
        assert_eq!(config.order, -3);
        assert_eq!(config.limits, Limits { timeout: Duration::from_millis(250), memory_bytes: 16 << 20 });
        assert_eq!(config.fail_modes.quota, FailMode::Open);
        assert_eq!(config.fail_modes.gc, FailMode::Open);
        let settings: serde_json::Value = serde_json::from_str(&config.settings_json).unwrap();
        assert_eq!(settings, serde_json::json!({"limit": "80%", "nested": {"depth": 2}}));
    }

    /// Unknown keys, unknown decisions and out-of-range limits are refused
    /// with the key in the message.
    #[test]
    fn errors_name_the_key() {
        assert!(PluginConfig::parse("timeout = 5").unwrap_err().contains("timeout"));
        assert!(PluginConfig::parse("decisions = [\"mount\"]").unwrap_err().contains("mount"));
        assert!(PluginConfig::parse("timeout-ms = 0").unwrap_err().contains("timeout-ms"));
        assert!(PluginConfig::parse("memory-mib = 99999").unwrap_err().contains("memory-mib"));
        assert!(PluginConfig::parse("[fail-mode]\nquota = \"maybe\"").unwrap_err().contains("maybe"));
        assert!(PluginConfig::parse("\n\norder = \"x\"").unwrap_err().contains("line 3"));
    }
}
