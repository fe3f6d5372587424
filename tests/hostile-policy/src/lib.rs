//! A policy for the runtime's tests. Its `mode` setting picks a misbehaviour,
//! the same for every decision:
//! - `well` (default): admission admits (node credentials, no tenant),
//!   verify trusts (signer `hostile-policy`), exclude skips `*.md`, quota
//!   admits, gc evicts all;
//! - `loop`: never returns;
//! - `grow`: allocates until the memory cap stops it;
//! - `panic`: panics (a trap);
//! - `lie`: answers with a path or key that is not in the input (admission
//!   and verify, which have no such answer, behave well);
//! - `refuse`: answers `err(...)`;
//! - `chatty`: prints to stdout and stderr, then behaves well;
//! - `sleep`: sleeps 30 s (a blocking WASI clock pollable), then behaves well.
//!
//! `validate-mode` applies the same to `validate-settings`. `only-reference`,
//! when set, limits `mode` to the admission, verify, exclude and quota
//! requests whose reference contains it; the others are served well.
//!
//! `verify-mode: "report"` makes a verify that behaves well refuse instead,
//! its reason listing what the host gathered, so a test can see it:
//! `referrers: <artifact-type>{k=v,...}; ...; cosign: <count>; model-signatures: <path>, ...`
//! (annotations sorted by key, `-` for an empty list).

modelcache_policy::generate!("full-policy");

use exports::modelcache::policy::{admission, exclude, gc, quota, settings, verify};
use serde::Deserialize;

#[derive(Default, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
struct Settings {
    mode: Option<String>,
    validate_mode: Option<String>,
    only_reference: Option<String>,
    verify_mode: Option<String>,
}

impl Settings {
    /// The mode for a request about `reference`.
    fn mode_for(&self, reference: &str) -> Option<&str> {
        match &self.only_reference {
            Some(only) if !reference.contains(only.as_str()) => None,
            _ => self.mode.as_deref(),
        }
    }
}

fn parse(settings: &str) -> Settings {
    modelcache_policy::parse_settings(settings).unwrap_or_default()
}

/// Misbehaves as `mode` says; returns normally only for `well` and `chatty`.
fn misbehave(mode: Option<&str>) -> Result<(), String> {
    match mode.unwrap_or("well") {
        "loop" => {
            let mut counter: u64 = 0;
            loop {
                counter = std::hint::black_box(counter.wrapping_add(1));
            }
        }
        "grow" => {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                hoard.push(vec![1u8; 8 << 20]);
                std::hint::black_box(&hoard);
            }
        }
        "panic" => panic!("hostile policy panics on purpose"),
        "refuse" => Err("hostile policy refuses".to_owned()),
        "chatty" => {
            println!("hello from the policy's stdout");
            eprintln!("hello from the policy's stderr");
            Ok(())
        }
        "sleep" => {
            std::thread::sleep(std::time::Duration::from_secs(30));
            Ok(())
        }
        _ => Ok(()),
    }
}

struct Policy;

impl settings::Guest for Policy {
    fn validate_settings(settings: String) -> Result<(), String> {
        misbehave(parse(&settings).validate_mode.as_deref())
    }
}

impl exclude::Guest for Policy {
    fn decide(request: exclude::Request) -> Result<Vec<exclude::Skip>, String> {
        let settings = parse(&request.settings);
        let mode = settings.mode_for(&request.artifact.reference);
        misbehave(mode)?;
        if mode == Some("lie") {
            return Ok(vec![exclude::Skip { path: "../not-in-the-model".into(), reason: "lies".into() }]);
        }
        Ok(request
            .files
            .into_iter()
            .filter(|file| file.path.ends_with(".md"))
            .map(|file| exclude::Skip { path: file.path, reason: "hostile: markdown".into() })
            .collect())
    }
}

impl admission::Guest for Policy {
    fn decide(request: admission::Request) -> Result<admission::Verdict, String> {
        misbehave(parse(&request.settings).mode_for(&request.reference.text))?;
        Ok(admission::Verdict::Admit(admission::Grant { node_credentials: true, tenant: None }))
    }
}

impl verify::Guest for Policy {
    fn decide(request: verify::Request) -> Result<verify::Verdict, String> {
        let settings = parse(&request.settings);
        misbehave(settings.mode_for(&request.reference))?;
        if settings.verify_mode.as_deref() == Some("report") {
            return Ok(verify::Verdict::Refused(report(&request)));
        }
        Ok(verify::Verdict::Trusted("hostile-policy".into()))
    }
}

/// What a verify request carries, for `verify-mode: "report"`.
fn report(request: &verify::Request) -> String {
    let mut parts: Vec<String> = request
        .referrers
        .iter()
        .map(|referrer| {
            let mut annotations: Vec<_> = referrer.annotations.iter().collect();
            annotations.sort_by(|a, b| a.key.cmp(&b.key));
            let annotations: Vec<String> =
                annotations.iter().map(|annotation| format!("{}={}", annotation.key, annotation.value)).collect();
            format!("{}{{{}}}", referrer.artifact_type, annotations.join(","))
        })
        .collect();
    if parts.is_empty() {
        parts.push("-".into());
    }
    let paths: Vec<&str> = request.model_signatures.iter().map(|signature| signature.path.as_str()).collect();
    let paths = if paths.is_empty() { "-".to_owned() } else { paths.join(", ") };
    format!("referrers: {}; cosign: {}; model-signatures: {paths}", parts.join("; "), request.cosign.len())
}

impl quota::Guest for Policy {
    fn decide(request: quota::Request) -> Result<quota::Verdict, String> {
        misbehave(parse(&request.settings).mode_for(&request.reference))?;
        Ok(quota::Verdict::Admit)
    }
}

impl gc::Guest for Policy {
    fn decide(request: gc::Request) -> Result<Vec<String>, String> {
        let mode = parse(&request.settings).mode;
        misbehave(mode.as_deref())?;
        if mode.as_deref() == Some("lie") {
            return Ok(vec!["no-such-key".into()]);
        }
        Ok(request.candidates.into_iter().map(|candidate| candidate.key).collect())
    }
}

#[cfg(target_arch = "wasm32")]
export!(Policy);

#[cfg(test)]
mod tests {
    use super::*;
    use exports::modelcache::policy::verify::{Annotation, Referrer, Request, Requester};

    fn annotation(key: &str, value: &str) -> Annotation {
        Annotation { key: key.into(), value: value.into() }
    }

    /// `verify-mode: report` refuses, listing the referrers (annotations sorted
    /// by key), the cosign count and the signature layers' paths.
    #[test]
    fn report_lists_what_verify_was_given() {
        let referrer = |artifact_type: &str, annotations: Vec<Annotation>| Referrer {
            digest: "sha256:00".into(),
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            artifact_type: artifact_type.into(),
            size: 1,
            annotations,
        };
        let mut request = Request {
            requester: Requester { namespace: None, pod: None, pod_uid: None, service_account: None, volume: None },
            reference: "registry.local/models/tiny:v1".into(),
            manifest_digest: "sha256:00".into(),
            annotations: vec![],
            layers: vec![],
            cosign: vec![],
            referrers: vec![referrer("application/vnd.example.unknown.v1+json", vec![annotation("org.example.note", "hello")])],
            model_signatures: vec![],
            settings: r#"{"verify-mode": "report"}"#.into(),
        };
        let verdict = <Policy as verify::Guest>::decide(request.clone()).unwrap();
        assert_eq!(
            verdict,
            verify::Verdict::Refused(
                "referrers: application/vnd.example.unknown.v1+json{org.example.note=hello}; cosign: 0; model-signatures: -"
                    .into()
            )
        );
        request.referrers.push(referrer("b", vec![annotation("z", "1"), annotation("a.b", "2"), annotation("a", "3")]));
        request.referrers.push(referrer("c", vec![]));
        request.model_signatures.push(verify::ModelSignature {
            path: "model.sig".into(),
            layer_digest: "sha256:11".into(),
            bundle: vec![],
        });
        assert_eq!(
            report(&request),
            "referrers: application/vnd.example.unknown.v1+json{org.example.note=hello}; b{a=3,a.b=2,z=1}; c{}; cosign: 0; \
             model-signatures: model.sig"
        );
        assert_eq!(
            report(&Request { referrers: vec![], ..request.clone() }),
            "referrers: -; cosign: 0; model-signatures: model.sig"
        );
        request.settings = "{}".into();
        assert_eq!(<Policy as verify::Guest>::decide(request).unwrap(), verify::Verdict::Trusted("hostile-policy".into()));
    }
}
