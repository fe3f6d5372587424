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
//! An inline volume with no attribute of its own is a runtime volume: its pod
//! mounts models itself, through the volume's socket (see
//! [`crate::service`]).
//!
//! Other `modelcache.io/` keys are refused (a typo would otherwise be
//! ignored silently). Of kubelet's `csi.storage.k8s.io/*` keys, the pod's
//! namespace, name, UID and service account name the requester, which
//! admission policies decide on; the namespace is required (kubelet passes
//! it with the CSIDriver's `podInfoOnMount: true`), so that no pod is ever
//! taken for the node's operator.

use std::collections::HashMap;
use std::path::Path;

use modelcache_api::ids::{MountId, VolumeId};
use modelcache_api::options::ExcludeOptions;
use modelcache_api::reference::ModelRef;
use modelcache_api::tenancy::Requester;
use sha2::{Digest as _, Sha256};

pub const PREFIX: &str = "modelcache.io/";
pub const REFERENCE: &str = "modelcache.io/reference";
pub const EXCLUDE_WEIGHTS: &str = "modelcache.io/exclude-weights";
pub const EXCLUDE_PATTERNS: &str = "modelcache.io/exclude-patterns";
pub const MOUNT_ID: &str = "modelcache.io/mount-id";
pub const POD_NAMESPACE: &str = "csi.storage.k8s.io/pod.namespace";
pub const POD_NAME: &str = "csi.storage.k8s.io/pod.name";
pub const POD_UID: &str = "csi.storage.k8s.io/pod.uid";
pub const SERVICE_ACCOUNT: &str = "csi.storage.k8s.io/serviceAccount.name";
pub const EPHEMERAL: &str = "csi.storage.k8s.io/ephemeral";

/// A publish's model and options, and who asks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountSpec {
    pub reference: String,
    pub options: ExcludeOptions,
    pub mount_name: Option<String>,
    pub requester: Requester,
}

/// The model and options the `modelcache.io/` keys name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelSpec {
    pub reference: String,
    pub options: ExcludeOptions,
    pub mount_name: Option<String>,
}

/// Reads the volume context: the model ([`parse_model`]) and the pod.
///
/// # Errors
/// A message naming the key and what is wrong, for INVALID_ARGUMENT.
pub fn parse_context(context: &HashMap<String, String>) -> Result<MountSpec, String> {
    let ModelSpec { reference, options, mount_name } = parse_model(context)?;
    Ok(MountSpec { reference, options, mount_name, requester: parse_requester(context)? })
}

/// The pod kubelet publishes for, from its `csi.storage.k8s.io/` keys.
///
/// # Errors
/// A message for INVALID_ARGUMENT.
pub fn parse_requester(context: &HashMap<String, String>) -> Result<Requester, String> {
    let pod = |key: &str| context.get(key).filter(|value| !value.is_empty()).cloned();
    let requester = Requester {
        namespace: Some(pod(POD_NAMESPACE).ok_or_else(|| {
            format!(
                "kubelet passed no `{POD_NAMESPACE}`: set `podInfoOnMount: true` in the CSIDriver (deploy/base/csidriver.yaml does)"
            )
        })?),
        pod: pod(POD_NAME),
        pod_uid: pod(POD_UID),
        service_account: pod(SERVICE_ACCOUNT),
        volume: None,
    };
    requester.validate().map_err(|error| error.to_string())?;
    Ok(requester)
}

/// Whether a publish asks for a runtime volume: an inline volume with no
/// attribute of its own (only kubelet's `csi.storage.k8s.io/` keys), whose
/// pod mounts models itself through the volume's socket. Any other key
/// (a misspelt reference, say) makes it a model volume, refused by name
/// if it names no model. A persistent volume always names its model.
pub fn is_runtime(context: &HashMap<String, String>) -> bool {
    is_ephemeral(context) && context.keys().all(|key| key.starts_with("csi.storage.k8s.io/"))
}

/// Reads the `modelcache.io/` keys of a volume context or of a
/// StorageClass's parameters; other keys are not looked at.
///
/// # Errors
/// A message naming the key and what is wrong, for INVALID_ARGUMENT.
pub fn parse_model(context: &HashMap<String, String>) -> Result<ModelSpec, String> {
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
    Ok(ModelSpec { reference: reference.to_owned(), options: ExcludeOptions { exclude_weights, patterns }, mount_name })
}

/// Checks the pod's keys against the target path kubelet chose
/// (`…/pods/<pod uid>/volumes/…`): kubelet sets those keys only with
/// `podInfoOnMount`, and without it a pod's own volume attributes could
/// claim any namespace. The UID is required, and must be the path's.
///
/// # Errors
/// A message for INVALID_ARGUMENT.
pub fn check_pod(requester: &Requester, target: &Path) -> Result<(), String> {
    let uid = requester.pod_uid.as_deref().ok_or_else(|| {
        format!("kubelet passed no `{POD_UID}`: set `podInfoOnMount: true` in the CSIDriver (deploy/base/csidriver.yaml does)")
    })?;
    match pod_uid_in(target) {
        Some(found) if found != uid => Err(format!(
            "`{POD_UID}` is `{uid}` but the target path is pod {found}'s: pod keys in volume attributes are not the pod's \
             (set `podInfoOnMount: true` in the CSIDriver)"
        )),
        _ => Ok(()),
    }
}

/// The pod UID in a kubelet target path (`…/pods/<uid>/volumes/…`).
pub fn pod_uid_in(target: &Path) -> Option<String> {
    let components: Vec<_> = target.components().map(|component| component.as_os_str().to_string_lossy()).collect();
    components.windows(3).find(|window| window[0] == "pods" && window[2] == "volumes").map(|window| window[1].to_string())
}

/// Whether kubelet publishes an inline volume of one pod
/// (`csi.storage.k8s.io/ephemeral`), not a persistent volume.
pub fn is_ephemeral(context: &HashMap<String, String>) -> bool {
    context.get(EPHEMERAL).is_some_and(|value| value == "true")
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
            (POD_NAMESPACE, "research"),
            (POD_NAME, "pod"),
            (SERVICE_ACCOUNT, "trainer"),
            ("csi.storage.k8s.io/ephemeral", "true"),
        ]))
        .unwrap();
        assert_eq!(spec.requester.namespace.as_deref(), Some("research"));
        assert_eq!((spec.requester.pod.as_deref(), spec.requester.service_account.as_deref()), (Some("pod"), Some("trainer")));
        assert_eq!(spec.reference, "registry.local/m:1");
        assert!(spec.options.exclude_weights);
        assert_eq!(spec.options.patterns, ["docs/", "*.md"]);
        assert_eq!(spec.mount_name.as_deref(), Some("llm"));
    }

    /// Missing, malformed and misspelt attributes are refused by name.
    #[test]
    fn refuses_bad_contexts() {
        let error = |pairs: &[(&str, &str)]| {
            let mut pairs = pairs.to_vec();
            if !pairs.iter().any(|(key, _)| *key == POD_NAMESPACE) {
                pairs.push((POD_NAMESPACE, "ns"));
            }
            parse_context(&context(&pairs)).unwrap_err()
        };
        assert!(error(&[]).contains(REFERENCE));
        assert!(parse_context(&context(&[(REFERENCE, "r/m:1")])).unwrap_err().contains("podInfoOnMount"));
        assert!(error(&[(REFERENCE, "r/m:1"), (POD_NAMESPACE, "Not A Name")]).contains("namespace"));
        assert!(error(&[(REFERENCE, "  ")]).contains("required"));
        assert!(error(&[(REFERENCE, "Not A Reference")]).contains("not a valid model reference"));
        assert!(error(&[(REFERENCE, "r/m:1"), (EXCLUDE_WEIGHTS, "yes")]).contains("neither true nor false"));
        assert!(error(&[(REFERENCE, "r/m:1"), (EXCLUDE_PATTERNS, "docs/")]).contains("JSON array"));
        assert!(error(&[(REFERENCE, "r/m:1"), ("modelcache.io/refernce", "x")]).contains("modelcache.io/refernce"));
        assert!(error(&[(REFERENCE, "r/m:1"), (MOUNT_ID, "../x")]).contains(MOUNT_ID));
    }

    /// Only an inline volume with kubelet's keys alone is a runtime volume.
    #[test]
    fn runtime_volumes() {
        assert!(is_runtime(&context(&[(EPHEMERAL, "true"), (POD_NAMESPACE, "ns")])));
        assert!(!is_runtime(&context(&[(EPHEMERAL, "false"), (POD_NAMESPACE, "ns")])), "a persistent volume");
        assert!(!is_runtime(&context(&[(EPHEMERAL, "true"), ("modelcahce.io/reference", "r/m:1")])), "a typo");
        assert!(!is_runtime(&context(&[(EPHEMERAL, "true"), (REFERENCE, "r/m:1")])));
    }

    /// The pod's UID is required and must be the target path's.
    #[test]
    fn pod_keys_match_the_target() {
        let requester = |uid: Option<&str>| Requester { pod_uid: uid.map(str::to_owned), ..Requester::default() };
        let target = Path::new("/var/lib/kubelet/pods/abc-1/volumes/kubernetes.io~csi/m/mount");
        assert!(check_pod(&requester(Some("abc-1")), target).is_ok());
        assert!(check_pod(&requester(Some("abc-2")), target).unwrap_err().contains("abc-1"));
        assert!(check_pod(&requester(None), target).unwrap_err().contains("podInfoOnMount"));
        assert!(check_pod(&requester(Some("abc-1")), Path::new("/elsewhere/mount")).is_ok());
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
