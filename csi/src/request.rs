//! What a publish asks for: the model and options from the volume context,
//! and the engine ids for kubelet's volume id and target path.
//!
//! Context keys (an inline volume's `volumeAttributes`, or a static PV's):
//! - `modelcache.io/reference` (required): the model, `registry/repo:tag` or
//!   `…@sha256:…`;
//! - `modelcache.io/exclude-weights`: `"true"` leaves the weights out;
//! - `modelcache.io/exclude-patterns`: a JSON array of gitignore-style patterns;
//! - `modelcache.io/mount-id`: a name for the mount in the engine's records.
//!
//! Other `modelcache.io/` keys are refused (a typo would otherwise be
//! ignored silently); kubelet's `csi.storage.k8s.io/*` keys are not ours.

use std::collections::HashMap;
use std::path::Path;

use modelcache_api::ids::{MountId, VolumeId};
use modelcache_api::options::ExcludeOptions;
use modelcache_api::reference::ModelRef;
use sha2::{Digest as _, Sha256};

pub const PREFIX: &str = "modelcache.io/";
pub const REFERENCE: &str = "modelcache.io/reference";
pub const EXCLUDE_WEIGHTS: &str = "modelcache.io/exclude-weights";
pub const EXCLUDE_PATTERNS: &str = "modelcache.io/exclude-patterns";
pub const MOUNT_ID: &str = "modelcache.io/mount-id";

/// A publish's model and options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountSpec {
    pub reference: String,
    pub options: ExcludeOptions,
    pub mount_name: Option<String>,
}

/// Reads the volume context.
///
/// # Errors
/// A message naming the key and what is wrong, for INVALID_ARGUMENT.
pub fn parse_context(context: &HashMap<String, String>) -> Result<MountSpec, String> {
    if let Some(unknown) = context
        .keys()
        .find(|key| key.starts_with(PREFIX) && ![REFERENCE, EXCLUDE_WEIGHTS, EXCLUDE_PATTERNS, MOUNT_ID].contains(&key.as_str()))
    {
        return Err(format!(
            "unknown volume attribute `{unknown}` (known: {REFERENCE}, {EXCLUDE_WEIGHTS}, {EXCLUDE_PATTERNS}, {MOUNT_ID})"
        ));
    }
    let reference = context
        .get(REFERENCE)
        .map(|reference| reference.trim())
        .filter(|reference| !reference.is_empty())
        .ok_or_else(|| format!("the volume attribute `{REFERENCE}` is required"))?;
    ModelRef::parse(reference).map_err(|error| format!("{REFERENCE}: {error}"))?;
    let exclude_weights = match context.get(EXCLUDE_WEIGHTS).map(|value| value.trim().to_ascii_lowercase()) {
        None => false,
        Some(value) if value == "true" => true,
        Some(value) if value == "false" || value.is_empty() => false,
        Some(value) => return Err(format!("{EXCLUDE_WEIGHTS}: `{value}` is neither true nor false")),
    };
    let patterns = match context.get(EXCLUDE_PATTERNS) {
        None => Vec::new(),
        Some(json) => serde_json::from_str::<Vec<String>>(json)
            .map_err(|error| format!("{EXCLUDE_PATTERNS}: not a JSON array of strings ({error})"))?,
    };
    let mount_name = context.get(MOUNT_ID).filter(|name| !name.is_empty()).cloned();
    if let Some(name) = &mount_name {
        let valid =
            name.len() <= 100 && name.bytes().all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'-'));
        if !valid || name.starts_with('.') {
            return Err(format!("{MOUNT_ID}: `{name}` must be 1 to 100 of A-Z a-z 0-9 . _ -"));
        }
    }
    Ok(MountSpec { reference: reference.to_owned(), options: ExcludeOptions { exclude_weights, patterns }, mount_name })
}

fn short_hash(text: &str, digits: usize) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))[..digits].to_owned()
}

/// The engine volume for kubelet's volume id: the id itself when it is a
/// valid file name (inline volumes: `csi-<hex>`), else a hash of it (static
/// PV handles may hold any characters).
pub fn volume_id(csi_volume_id: &str) -> VolumeId {
    VolumeId::new(csi_volume_id)
        .unwrap_or_else(|_| VolumeId::new(&format!("pv-{}", short_hash(csi_volume_id, 40))).expect("a hex id is valid"))
}

/// The engine mount for one target path: every target gets its own record
/// and tree (a static PV may be published to several pods of a node, and
/// releasing one must not empty the others), named after the optional
/// `mount-id` attribute for readability.
pub fn mount_id(mount_name: Option<&str>, target: &Path) -> MountId {
    let name = mount_name.unwrap_or("target");
    MountId::new(&format!("{name}-{}", short_hash(&target.to_string_lossy(), 16))).expect("a checked name and hex are valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(key, value)| (key.to_string(), value.to_string())).collect()
    }

    /// Every key is read; kubelet's own keys are ignored.
    #[test]
    fn reads_the_context() {
        let spec = parse_context(&context(&[
            (REFERENCE, "registry.local/m:1"),
            (EXCLUDE_WEIGHTS, "True"),
            (EXCLUDE_PATTERNS, r#"["docs/", "*.md"]"#),
            (MOUNT_ID, "llm"),
            ("csi.storage.k8s.io/pod.name", "pod"),
            ("csi.storage.k8s.io/ephemeral", "true"),
        ]))
        .unwrap();
        assert_eq!(spec.reference, "registry.local/m:1");
        assert!(spec.options.exclude_weights);
        assert_eq!(spec.options.patterns, ["docs/", "*.md"]);
        assert_eq!(spec.mount_name.as_deref(), Some("llm"));
    }

    /// Missing, malformed and misspelt attributes are refused by name.
    #[test]
    fn refuses_bad_contexts() {
        let error = |pairs: &[(&str, &str)]| parse_context(&context(pairs)).unwrap_err();
        assert!(error(&[]).contains(REFERENCE));
        assert!(error(&[(REFERENCE, "  ")]).contains("required"));
        assert!(error(&[(REFERENCE, "Not A Reference")]).contains("not a valid model reference"));
        assert!(error(&[(REFERENCE, "r/m:1"), (EXCLUDE_WEIGHTS, "yes")]).contains("neither true nor false"));
        assert!(error(&[(REFERENCE, "r/m:1"), (EXCLUDE_PATTERNS, "docs/")]).contains("JSON array"));
        assert!(error(&[(REFERENCE, "r/m:1"), ("modelcache.io/refernce", "x")]).contains("modelcache.io/refernce"));
        assert!(error(&[(REFERENCE, "r/m:1"), (MOUNT_ID, "../x")]).contains(MOUNT_ID));
    }

    /// Ids kubelet gives map to valid engine ids; one per target path.
    #[test]
    fn ids() {
        assert_eq!(volume_id("csi-0123abc").as_str(), "csi-0123abc");
        let odd = volume_id("projects/a/volumes/b c");
        assert!(odd.as_str().starts_with("pv-") && odd.as_str().len() == 43);
        assert_eq!(volume_id("projects/a/volumes/b c"), odd);
        let long = format!("/var/lib/kubelet/pods/{}/volumes/x/mount", "p".repeat(200));
        let first = mount_id(None, Path::new(&long));
        assert_ne!(first, mount_id(None, Path::new("/other")));
        assert!(mount_id(Some("llm"), Path::new(&long)).as_str().starts_with("llm-"));
    }
}
