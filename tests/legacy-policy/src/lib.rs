//! A policy for the host's tests, built against the frozen
//! `modelcache:policy@0.1.0` WIT (`wit/v0.1`) as a plugin written before 0.2
//! was: it proves that a 0.2 host still loads and calls 0.1 plugins unchanged.
//!
//! Exclude only. Settings: `{"skip-suffix": ".md"}` (required): skips every
//! file whose path ends with the suffix, with the reason
//! `legacy 0.1 plugin skips *<suffix>`.

wit_bindgen::generate!({ path: "../../wit/v0.1", world: "exclude-policy" });

use exports::modelcache::policy::exclude::{self, Request, Skip};
use exports::modelcache::policy::settings;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Settings {
    skip_suffix: String,
}

fn parse(settings: &str) -> Result<Settings, String> {
    serde_json::from_str(settings).map_err(|error| format!("invalid settings: {error}"))
}

/// The decision as a plain function, so it is tested natively.
///
/// # Errors
/// Invalid settings.
pub fn decide(request: &Request) -> Result<Vec<Skip>, String> {
    let suffix = parse(&request.settings)?.skip_suffix;
    Ok(request
        .files
        .iter()
        .filter(|file| file.path.ends_with(&suffix))
        .map(|file| Skip { path: file.path.clone(), reason: format!("legacy 0.1 plugin skips *{suffix}") })
        .collect())
}

struct Policy;

impl settings::Guest for Policy {
    fn validate_settings(settings: String) -> Result<(), String> {
        parse(&settings).map(drop)
    }
}

impl exclude::Guest for Policy {
    fn decide(request: Request) -> Result<Vec<Skip>, String> {
        decide(&request)
    }
}

// Exporting only on wasm keeps native builds free of the component's
// `ns:pkg/iface#func` symbol names, which native linkers reject.
#[cfg(target_arch = "wasm32")]
export!(Policy);

#[cfg(test)]
mod tests {
    use super::*;
    use exports::modelcache::policy::exclude::{Artifact, ModelFile, Options};

    /// The 0.1 request has no requester; files ending with the suffix are skipped.
    #[test]
    fn skips_the_suffix() {
        let file = |path: &str| ModelFile { path: path.into(), size: 1, media_type: String::new(), layer_digest: String::new() };
        let request = Request {
            artifact: Artifact { reference: "r/m:1".into(), manifest_digest: "sha256:00".into(), annotations: vec![] },
            files: vec![file("README.md"), file("model.safetensors"), file("docs/a.md")],
            options: Options { exclude_weights: false, patterns: vec![] },
            settings: r#"{"skip-suffix": ".md"}"#.into(),
        };
        let skips = decide(&request).unwrap();
        assert_eq!(skips.iter().map(|skip| skip.path.as_str()).collect::<Vec<_>>(), ["README.md", "docs/a.md"]);
        assert_eq!(skips[0].reason, "legacy 0.1 plugin skips *.md");
        assert!(<Policy as settings::Guest>::validate_settings("{}".into()).unwrap_err().contains("skip-suffix"));
    }
}
