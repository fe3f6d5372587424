//! Reference exclude policy: leaves out the weights when a request asks for it,
//! and files matching gitignore-syntax patterns.
//!
//! Settings (all optional):
//! - `patterns`: patterns the operator applies to every request, before the
//!   request's own (so a request's `!pattern` can bring a file back).
//! - `weight-extensions`: file endings treated as weights for layers that carry
//!   no ModelPack media type (default: `.safetensors .bin .gguf .pt .pth .onnx
//!   .safetensors.index.json`).

modelcache_policy::generate!("exclude-policy");

use exports::modelcache::policy::exclude::{self, ModelFile, Request, Skip};
use exports::modelcache::policy::settings;
use modelcache_policy::pattern::Rules;
use serde::Deserialize;

/// The settings this policy understands.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct Settings {
    pub patterns: Vec<String>,
    pub weight_extensions: Option<Vec<String>>,
}

const WEIGHT_MEDIA_TYPES: [&str; 2] = ["application/vnd.cncf.model.weight.v1.", "application/vnd.cnai.model.weight.v1."];
const MODELPACK_PREFIXES: [&str; 2] = ["application/vnd.cncf.model.", "application/vnd.cnai.model."];
const WEIGHT_EXTENSIONS: [&str; 7] = [".safetensors", ".bin", ".gguf", ".pt", ".pth", ".onnx", ".safetensors.index.json"];

impl Settings {
    fn parse(json: &str) -> Result<(Settings, Rules), String> {
        let settings: Settings = modelcache_policy::parse_settings(json)?;
        let rules =
            Rules::parse(settings.patterns.iter().map(String::as_str)).map_err(|error| format!("settings.patterns: {error}"))?;
        Ok((settings, rules))
    }

    fn is_weight(&self, file: &ModelFile) -> bool {
        if WEIGHT_MEDIA_TYPES.iter().any(|prefix| file.media_type.starts_with(prefix)) {
            return true;
        }
        // A ModelPack type that is not a weight type says what the file is;
        // only untyped layers are judged by their name.
        if MODELPACK_PREFIXES.iter().any(|prefix| file.media_type.starts_with(prefix)) {
            return false;
        }
        match &self.weight_extensions {
            Some(extensions) => extensions.iter().any(|ext| file.path.ends_with(ext.as_str())),
            None => WEIGHT_EXTENSIONS.iter().any(|ext| file.path.ends_with(ext)),
        }
    }
}

/// The decision as a plain function, so it is tested natively.
///
/// # Errors
/// Invalid settings or an unparsable request pattern.
pub fn decide(request: &Request) -> Result<Vec<Skip>, String> {
    let (settings, mut rules) = Settings::parse(&request.settings)?;
    let request_rules =
        Rules::parse(request.options.patterns.iter().map(String::as_str)).map_err(|error| format!("request {error}"))?;
    rules.extend(request_rules);
    let mut skips = Vec::new();
    for file in &request.files {
        let reason = if request.options.exclude_weights && settings.is_weight(file) {
            Some("weights excluded by the request".to_owned())
        } else {
            rules.excluded_by(&file.path).map(|pattern| format!("matches `{pattern}`"))
        };
        if let Some(reason) = reason {
            skips.push(Skip { path: file.path.clone(), reason });
        }
    }
    Ok(skips)
}

struct Policy;

impl settings::Guest for Policy {
    fn validate_settings(settings: String) -> Result<(), String> {
        Settings::parse(&settings).map(drop)
    }
}

impl exclude::Guest for Policy {
    fn decide(request: Request) -> Result<Vec<Skip>, String> {
        decide(&request)
    }
}

// Exporting only on wasm keeps native builds (unit tests) free of the
// component's `ns:pkg/iface#func` symbol names, which native linkers reject.
#[cfg(target_arch = "wasm32")]
export!(Policy);

#[cfg(test)]
mod tests {
    use super::*;
    use exports::modelcache::policy::exclude::{Artifact, Options, Requester};

    fn file(path: &str, media_type: &str) -> ModelFile {
        ModelFile { path: path.into(), size: 1, media_type: media_type.into(), layer_digest: String::new() }
    }

    fn request(files: Vec<ModelFile>, exclude_weights: bool, patterns: &[&str], settings: &str) -> Request {
        Request {
            requester: Requester { namespace: None, pod: None, pod_uid: None, service_account: None, volume: None },
            artifact: Artifact { reference: "r/m:1".into(), manifest_digest: "sha256:00".into(), annotations: vec![] },
            files,
            options: Options { exclude_weights, patterns: patterns.iter().map(|p| p.to_string()).collect() },
            settings: settings.into(),
        }
    }

    fn skipped(request: &Request) -> Vec<String> {
        decide(request).unwrap().into_iter().map(|skip| skip.path).collect()
    }

    const RAW_WEIGHT: &str = "application/vnd.cncf.model.weight.v1.raw";
    const CONFIG: &str = "application/vnd.cncf.model.weight.config.v1.raw";

    /// exclude-weights drops weight layers by media type, legacy prefix included,
    /// and never a weight.config layer.
    #[test]
    fn weights_by_media_type() {
        let files = vec![
            file("model.safetensors", RAW_WEIGHT),
            file("old.bin", "application/vnd.cnai.model.weight.v1.tar"),
            file("config.json", CONFIG),
            file("weights.bin.conf", CONFIG),
        ];
        assert_eq!(skipped(&request(files.clone(), true, &[], "{}")), ["model.safetensors", "old.bin"]);
        assert!(skipped(&request(files, false, &[], "{}")).is_empty());
    }

    /// Untyped layers are judged by file endings at any depth.
    #[test]
    fn weights_by_extension_for_untyped_layers() {
        let files = vec![
            file("a/b/model.gguf", "application/octet-stream"),
            file("model.safetensors.index.json", "application/json"),
            file("README.md", "text/markdown"),
            file("typed-doc.bin", "application/vnd.cncf.model.doc.v1.raw"),
        ];
        assert_eq!(skipped(&request(files.clone(), true, &[], "{}")), ["a/b/model.gguf", "model.safetensors.index.json"]);
        let custom = r#"{"weight-extensions": [".md"]}"#;
        assert_eq!(skipped(&request(files, true, &[], custom)), ["README.md"]);
    }

    /// Patterns match the whole path; operator patterns come first, so a
    /// request can re-include.
    #[test]
    fn patterns_from_settings_and_request() {
        let files = vec![file("docs/a.md", CONFIG), file("src/docs/b.md", CONFIG), file("README.md", CONFIG)];
        let settings = r#"{"patterns": ["*.md"]}"#;
        assert_eq!(skipped(&request(files.clone(), false, &["!README.md"], settings)), ["docs/a.md", "src/docs/b.md"]);
        assert_eq!(skipped(&request(files, false, &["/docs/"], "{}")), ["docs/a.md"]);
    }

    /// Reasons say why a file was skipped.
    #[test]
    fn reasons_name_the_cause() {
        let skips = decide(&request(vec![file("x.md", CONFIG), file("w.bin", RAW_WEIGHT)], true, &["*.md"], "{}")).unwrap();
        assert_eq!(skips[0].reason, "matches `*.md`");
        assert_eq!(skips[1].reason, "weights excluded by the request");
    }

    /// Bad settings and bad patterns are errors that name the problem.
    #[test]
    fn invalid_settings_and_patterns() {
        assert!(<Policy as settings::Guest>::validate_settings(r#"{"patern": []}"#.into()).unwrap_err().contains("patern"));
        assert!(<Policy as settings::Guest>::validate_settings(r#"{"patterns": ["[x"]}"#.into()).unwrap_err().contains("[x"));
        assert!(<Policy as settings::Guest>::validate_settings("{}".into()).is_ok());
        assert!(decide(&request(vec![], false, &["[oops"], "{}")).unwrap_err().contains("[oops"));
    }
}
