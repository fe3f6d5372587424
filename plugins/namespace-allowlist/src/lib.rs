//! Reference admission policy: which Kubernetes namespaces may mount which
//! models, and which of them may use the node's own registry credentials.
//!
//! A rule is `{"allow": [GLOB, …], "node-credentials": BOOL}`. The globs match
//! `REGISTRY/REPOSITORY` of the requested reference (`registry.local:5000/models/llama`),
//! never its tag or digest, so a rule admits every version of what it names.
//! `*` stays within one path segment, `**` crosses segments (`registry.local/**`),
//! `?`, `[a-z]` and `{a,b}` work as in shells. `node-credentials` defaults to false:
//! the requester's own pull secret, or none.
//!
//! Settings (all optional):
//! - `namespaces`: a rule per namespace, by name. A listed namespace is its own
//!   tenant (the grant's `tenant`, which bounds the metrics' labels).
//! - `default`: the rule for a namespace not listed (default: allow nothing);
//!   such a mount counts under no tenant.
//! - `operator`: the rule for a request with no namespace: the node's operator
//!   on the daemon's admin socket (the CSI driver always sends a namespace).
//!   Default: allow `**` with the node's credentials.
//!
//! ```json
//! { "namespaces": { "research": { "allow": ["registry.local/models/*"], "node-credentials": true },
//!                   "web": { "allow": [] } },
//!   "default":  { "allow": [], "node-credentials": false },
//!   "operator": { "allow": ["**"], "node-credentials": true } }
//! ```

modelcache_policy::generate!("admission-policy");

use std::collections::BTreeMap;

use exports::modelcache::policy::admission::{self, Grant, Request, Verdict};
use exports::modelcache::policy::settings;
use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use serde::Deserialize;

/// The settings' top level as written; each rule is checked on its own, so an
/// error can say which rule it is in.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawSettings {
    namespaces: BTreeMap<String, serde_json::Value>,
    default: Option<serde_json::Value>,
    operator: Option<serde_json::Value>,
}

/// One rule as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawRule {
    allow: Vec<String>,
    #[serde(default)]
    node_credentials: bool,
}

/// A rule with its globs compiled.
#[derive(Debug)]
pub struct Rule {
    /// The globs as written, for the reasons.
    allow: Vec<String>,
    globs: GlobSet,
    node_credentials: bool,
}

impl Rule {
    /// Parses the rule at `key` (`namespaces.research`, `default`, `operator`).
    fn parse(key: &str, value: serde_json::Value) -> Result<Rule, String> {
        let raw: RawRule = serde_json::from_value(value).map_err(|error| format!("invalid settings: `{key}`: {error}"))?;
        Rule::new(key, raw.allow, raw.node_credentials)
    }

    fn new(key: &str, allow: Vec<String>, node_credentials: bool) -> Result<Rule, String> {
        let mut globs = GlobSetBuilder::new();
        for pattern in &allow {
            let glob = GlobBuilder::new(pattern)
                .literal_separator(true)
                .build()
                .map_err(|error| format!("invalid settings: `{key}.allow`: `{pattern}` is not a valid glob: {}", error.kind()))?;
            globs.add(glob);
        }
        let globs = globs.build().map_err(|error| format!("invalid settings: `{key}.allow`: {error}"))?;
        Ok(Rule { allow, globs, node_credentials })
    }

    /// Whether the rule admits `target`, a `REGISTRY/REPOSITORY`.
    pub fn allows(&self, target: &str) -> bool {
        self.globs.is_match(target)
    }

    /// What the rule admits, for a reason: `a`, `a or b`, `a, b or c`.
    fn allowed(&self) -> String {
        match self.allow.split_last() {
            None => String::new(),
            Some((last, [])) => last.clone(),
            Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        }
    }
}

/// The policy's settings, every glob compiled.
#[derive(Debug)]
pub struct Settings {
    namespaces: BTreeMap<String, Rule>,
    default: Rule,
    operator: Rule,
}

impl Settings {
    /// Parses and checks the settings JSON.
    ///
    /// # Errors
    /// A message naming the offending key, namespace or glob.
    pub fn parse(json: &str) -> Result<Settings, String> {
        // Checked as an object first: serde would take `[]` for a struct.
        let value: serde_json::Value = modelcache_policy::parse_settings(json)?;
        if !value.is_object() {
            return Err(format!("invalid settings: expected a JSON object, not {value}"));
        }
        let raw: RawSettings = serde_json::from_value(value).map_err(|error| format!("invalid settings: {error}"))?;
        let mut namespaces = BTreeMap::new();
        for (namespace, value) in raw.namespaces {
            if namespace.is_empty() {
                return Err("invalid settings: `namespaces` has a rule for an empty name; a namespace is never empty".to_owned());
            }
            let rule = Rule::parse(&format!("namespaces.{namespace}"), value)?;
            namespaces.insert(namespace, rule);
        }
        let default = match raw.default {
            Some(value) => Rule::parse("default", value)?,
            None => Rule::new("default", Vec::new(), false)?,
        };
        let operator = match raw.operator {
            Some(value) => Rule::parse("operator", value)?,
            None => Rule::new("operator", vec!["**".to_owned()], true)?,
        };
        Ok(Settings { namespaces, default, operator })
    }

    /// The rule that applies to a requester in `namespace` (none: the operator).
    fn rule_for<'a>(&'a self, namespace: Option<&'a str>) -> (Subject<'a>, &'a Rule) {
        match namespace {
            None => (Subject::Operator, &self.operator),
            Some(namespace) => match self.namespaces.get(namespace) {
                Some(rule) => (Subject::Listed(namespace), rule),
                None => (Subject::Unlisted(namespace), &self.default),
            },
        }
    }
}

/// Whose rule decided.
enum Subject<'a> {
    /// A namespace with its own rule.
    Listed(&'a str),
    /// A namespace under the default rule.
    Unlisted(&'a str),
    /// A request with no namespace.
    Operator,
}

/// The reason a mount of `reference` is refused under `rule`.
fn refusal(subject: &Subject, reference: &str, rule: &Rule) -> String {
    let empty = rule.allow.is_empty();
    let allowed = rule.allowed();
    match subject {
        Subject::Listed(namespace) if empty => {
            format!("namespace `{namespace}` may not mount {reference}: its allowlist is empty")
        }
        Subject::Listed(namespace) => format!("namespace `{namespace}` may not mount {reference}: it may mount {allowed} only"),
        Subject::Unlisted(namespace) if empty => {
            format!("namespace `{namespace}` may not mount {reference}: it is not listed and the default allowlist is empty")
        }
        Subject::Unlisted(namespace) => {
            format!(
                "namespace `{namespace}` may not mount {reference}: it is not listed, and the default lets it mount {allowed} only"
            )
        }
        Subject::Operator if empty => {
            format!("a request with no namespace (the operator) may not mount {reference}: the operator's allowlist is empty")
        }
        Subject::Operator => {
            format!("a request with no namespace (the operator) may not mount {reference}: it may mount {allowed} only")
        }
    }
}

/// The decision as a plain function, so it is tested natively.
///
/// # Errors
/// Invalid settings (the host checked them at load, so only a host bug gets here).
pub fn decide(request: &Request) -> Result<Verdict, String> {
    let settings = Settings::parse(&request.settings)?;
    // Only `None` is the operator: an empty namespace is a namespace like any
    // other unlisted one, never the operator's rights.
    let namespace = request.requester.namespace.as_deref();
    let (subject, rule) = settings.rule_for(namespace);
    let reference = &request.reference;
    let target = format!("{}/{}", reference.registry, reference.repository);
    if !rule.allows(&target) {
        return Ok(Verdict::Deny(refusal(&subject, &reference.text, rule)));
    }
    let tenant = match subject {
        Subject::Listed(namespace) => Some(namespace.to_owned()),
        Subject::Unlisted(_) | Subject::Operator => None,
    };
    Ok(Verdict::Admit(Grant { node_credentials: rule.node_credentials, tenant }))
}

struct Policy;

impl settings::Guest for Policy {
    fn validate_settings(settings: String) -> Result<(), String> {
        Settings::parse(&settings).map(drop)
    }
}

impl admission::Guest for Policy {
    fn decide(request: Request) -> Result<Verdict, String> {
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
    use exports::modelcache::policy::admission::{Options, Reference, Requester};

    const SETTINGS: &str = r#"{
        "namespaces": {
            "research": { "allow": ["registry.local/models/*", "registry.local:5000/shared/**"], "node-credentials": true },
            "web": { "allow": [] },
            "batch": { "allow": ["registry.local/models/*"] }
        },
        "default": { "allow": ["registry.local/public/*"] }
    }"#;

    /// A reference split as the host splits it (enough for these tests).
    fn reference(text: &str) -> Reference {
        let (registry, rest) = text.split_once('/').unwrap();
        let (name, digest) = match rest.split_once('@') {
            Some((name, digest)) => (name, Some(digest.to_owned())),
            None => (rest, None),
        };
        let (repository, tag) = match name.rsplit_once(':') {
            Some((repository, tag)) => (repository, Some(tag.to_owned())),
            None => (name, None),
        };
        Reference { text: text.into(), registry: registry.into(), repository: repository.into(), tag, digest }
    }

    fn request(namespace: Option<&str>, text: &str, settings: &str) -> Request {
        Request {
            requester: Requester {
                namespace: namespace.map(str::to_owned),
                pod: Some("pod-0".into()),
                pod_uid: None,
                service_account: Some("default".into()),
                volume: Some("csi-1".into()),
            },
            reference: reference(text),
            options: Options { exclude_weights: false, patterns: vec![] },
            settings: settings.into(),
        }
    }

    fn verdict(namespace: Option<&str>, text: &str) -> Verdict {
        decide(&request(namespace, text, SETTINGS)).unwrap()
    }

    fn admit(node_credentials: bool, tenant: Option<&str>) -> Verdict {
        Verdict::Admit(Grant { node_credentials, tenant: tenant.map(str::to_owned) })
    }

    fn invalid(settings: &str) -> String {
        <Policy as settings::Guest>::validate_settings(settings.into()).unwrap_err()
    }

    /// `*` matches within one segment of `REGISTRY/REPOSITORY`, `**` across
    /// them; the tag and the digest play no part.
    #[test]
    fn globs_match_registry_and_repository_only() {
        let research = Some("research");
        assert_eq!(verdict(research, "registry.local/models/llama:v1"), admit(true, Some("research")));
        let digest = "registry.local/models/llama@sha256:4444444444444444444444444444444444444444444444444444444444444444";
        assert_eq!(verdict(research, digest), admit(true, Some("research")));
        assert_eq!(verdict(research, "registry.local:5000/shared/a/b/c:1"), admit(true, Some("research")));
        for refused in [
            "registry.local/models/deep/x:1",
            "registry.local/other/x:1",
            "registry.local:5000/models/llama:v1",
            "evil.example/registry.local/models/llama:v1",
        ] {
            assert!(matches!(verdict(research, refused), Verdict::Deny(_)), "{refused}");
        }
        // A tag that looks like an allowed path does not help.
        assert!(matches!(verdict(research, "registry.local/other:models"), Verdict::Deny(_)));
    }

    /// A listed namespace is its own tenant; an unlisted one gets the default
    /// and no tenant; no namespace gets the operator's rule.
    #[test]
    fn rules_and_tenants_by_requester() {
        assert_eq!(verdict(Some("batch"), "registry.local/models/llama:v1"), admit(false, Some("batch")));
        assert_eq!(verdict(Some("unlisted"), "registry.local/public/bert:1"), admit(false, None));
        assert!(matches!(verdict(Some("unlisted"), "registry.local/models/llama:v1"), Verdict::Deny(_)));
        assert!(matches!(verdict(Some(""), "registry.local/models/llama:v1"), Verdict::Deny(_)));
        assert_eq!(verdict(None, "anywhere.example/a/b/c:1"), admit(true, None));
        let operator = r#"{"operator": {"allow": ["registry.local/**"]}}"#;
        assert_eq!(decide(&request(None, "registry.local/a/b:1", operator)).unwrap(), admit(false, None));
        assert!(matches!(decide(&request(None, "other.example/a:1", operator)).unwrap(), Verdict::Deny(_)));
    }

    /// With no settings nothing but the operator may mount.
    #[test]
    fn defaults_allow_only_the_operator() {
        assert!(matches!(decide(&request(Some("research"), "registry.local/models/llama:v1", "{}")).unwrap(), Verdict::Deny(_)));
        assert_eq!(decide(&request(None, "registry.local/models/llama:v1", "{}")).unwrap(), admit(true, None));
    }

    /// Reasons name the namespace, the reference and what is allowed.
    #[test]
    fn reasons_say_what_is_allowed() {
        let reason = |namespace: Option<&str>, text: &str, settings: &str| match decide(&request(namespace, text, settings)) {
            Ok(Verdict::Deny(reason)) => reason,
            other => panic!("{other:?}"),
        };
        let llama = "registry.local/models/llama:v1";
        assert_eq!(
            reason(Some("web"), llama, SETTINGS),
            "namespace `web` may not mount registry.local/models/llama:v1: its allowlist is empty"
        );
        assert_eq!(
            reason(Some("research"), "registry.local/other/x:1", SETTINGS),
            "namespace `research` may not mount registry.local/other/x:1: it may mount registry.local/models/* or registry.local:5000/shared/** only"
        );
        assert_eq!(
            reason(Some("unlisted"), llama, SETTINGS),
            "namespace `unlisted` may not mount registry.local/models/llama:v1: it is not listed, and the default lets it mount registry.local/public/* only"
        );
        assert_eq!(
            reason(Some("unlisted"), llama, "{}"),
            "namespace `unlisted` may not mount registry.local/models/llama:v1: it is not listed and the default allowlist is empty"
        );
        let three = r#"{"operator": {"allow": ["a/*", "b/*", "c/**"]}}"#;
        assert_eq!(
            reason(None, llama, three),
            "a request with no namespace (the operator) may not mount registry.local/models/llama:v1: it may mount a/*, b/* or c/** only"
        );
        assert_eq!(
            reason(None, llama, r#"{"operator": {"allow": []}}"#),
            "a request with no namespace (the operator) may not mount registry.local/models/llama:v1: the operator's allowlist is empty"
        );
    }

    /// Invalid settings are refused with the key, rule or glob at fault.
    #[test]
    fn invalid_settings_are_named() {
        assert!(<Policy as settings::Guest>::validate_settings(SETTINGS.into()).is_ok());
        assert!(<Policy as settings::Guest>::validate_settings("{}".into()).is_ok());
        assert!(invalid(r#"{"namespace": {}}"#).contains("unknown field `namespace`"));
        let unknown = invalid(r#"{"namespaces": {"web": {"allow": [], "alow": []}}}"#);
        assert!(unknown.starts_with("invalid settings: `namespaces.web`: unknown field `alow`"), "{unknown}");
        let missing = invalid(r#"{"default": {"node-credentials": true}}"#);
        assert!(missing.starts_with("invalid settings: `default`: missing field `allow`"), "{missing}");
        assert_eq!(
            invalid(r#"{"namespaces": {"research": {"allow": ["registry.local/[models"]}}}"#),
            "invalid settings: `namespaces.research.allow`: `registry.local/[models` is not a valid glob: unclosed character class; missing ']'"
        );
        assert!(invalid(r#"{"operator": {"allow": ["{a,b"]}}"#).starts_with("invalid settings: `operator.allow`: `{a,b`"));
        assert!(invalid(r#"{"namespaces": {"": {"allow": []}}}"#).contains("empty name"));
        assert!(invalid(r#"{"namespaces": {"web": {"allow": "x/*"}}}"#).contains("`namespaces.web`: invalid type"));
        assert!(invalid(r#"{"default": {"allow": [], "node-credentials": "yes"}}"#).contains("`default`: invalid type"));
        assert_eq!(invalid("[]"), "invalid settings: expected a JSON object, not []");
        assert!(invalid("{").starts_with("invalid settings: EOF while parsing an object"));
    }
}
