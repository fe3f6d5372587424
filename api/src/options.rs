//! What a request asks to leave out of a volume, and what was left out.

use serde::{Deserialize, Serialize};

/// What a request asks to leave out.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ExcludeOptions {
    #[serde(default)]
    pub exclude_weights: bool,
    #[serde(default)]
    pub patterns: Vec<String>,
}

impl ExcludeOptions {
    /// Whether the request asks to leave anything out.
    pub fn is_empty(&self) -> bool {
        !self.exclude_weights && self.patterns.is_empty()
    }
}

/// A file to leave out, and who said so.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Skip {
    pub path: String,
    pub reason: String,
    pub plugin: String,
}
