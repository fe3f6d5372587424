//! Reference verify policy: a model is trusted when a key from the settings
//! signed it, in either of two formats the host gathers without the weights.
//!
//! - **cosign** keyed signatures (the `sha256-<hex>.sig` tag): the signature
//!   (base64 DER ECDSA P-256 over SHA-256 of the payload, or raw Ed25519 over
//!   the payload) must verify with a trusted key, and the simple-signing
//!   payload must be a container image signature naming *this* manifest
//!   digest. The manifest digest covers every layer, so nothing else is checked.
//! - **model-signing** (OpenSSF `model_signing sign key`): a Sigstore bundle
//!   shipped as a layer (`model.sig`). Its DSSE signature over the in-toto
//!   statement must verify with a trusted key; the statement must list files
//!   hashed with sha256 (method `files`), consistent with its subject digest;
//!   and the files it lists must be exactly the model's layers, each with the
//!   layer's digest, leaving out only the signature layers the host gathered
//!   (never a tar layer; the statement's own `ignore_paths` do not count, as
//!   a statement is not bound to a manifest). A layer digest is the file's
//!   sha256 and the host checks every blob against its digest, so no weight
//!   is hashed here.
//!
//! The first trusted signature wins; the signer is `"<key name> (cosign)"` or
//! `"<key name> (model-signing)"`. Otherwise the model is refused, the reason
//! saying what was found and why each failed.
//!
//! Settings:
//! - `keys` (required, at least one): trusted public keys by name, each a PEM
//!   SPKI public key (`-----BEGIN PUBLIC KEY-----`, as `openssl pkey -pubout`
//!   writes it) of ECDSA P-256 or Ed25519. model-signing 1.1 signs with EC keys
//!   only (P-256 here; its P-384 and P-521 keys are refused at load), so
//!   Ed25519 serves cosign-format signatures.
//! - `formats`: which formats may vouch, `cosign` and/or `model-signing`
//!   (default both).
//! - `signature-paths`: the layer paths that are signatures rather than model
//!   files (default `["model.sig"]`): they are never required to be signed, and
//!   the reasons name them.
//! - `mode`: `enforce` (default) refuses an untrusted model; `warn` fails the
//!   call with the reason instead, so that with the host's `[fail-mode]
//!   verify = "open"` the model mounts and the failure is logged.
//!
//! ```json
//! { "keys": { "release": "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE…\n-----END PUBLIC KEY-----\n" },
//!   "formats": ["cosign", "model-signing"],
//!   "signature-paths": ["model.sig"] }
//! ```

modelcache_policy::generate!("verify-policy");

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD as BASE64, URL_SAFE as BASE64_URL};
use exports::modelcache::policy::settings;
use exports::modelcache::policy::verify::{self, CosignSignature, Layer, ModelSignature, Request, Verdict};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

/// `critical.type` of a cosign simple-signing payload.
const COSIGN_TYPE: &str = "cosign container image signature";
/// The Sigstore bundle versions that carry a DSSE envelope as model-signing writes it.
const BUNDLE_MEDIA_TYPES: [&str; 2] =
    ["application/vnd.dev.sigstore.bundle.v0.3+json", "application/vnd.dev.sigstore.bundle.v0.2+json"];
/// The DSSE payload type of an in-toto statement.
const IN_TOTO_PAYLOAD: &str = "application/vnd.in-toto+json";
const IN_TOTO_STATEMENT: &str = "https://in-toto.io/Statement/v1";
const MODEL_SIGNING_PREDICATE: &str = "https://model_signing/signature/v1.0";

/// A signature format this plugin checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    Cosign,
    ModelSigning,
}

impl fmt::Display for Format {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(match self {
            Format::Cosign => "cosign",
            Format::ModelSigning => "model-signing",
        })
    }
}

/// The settings as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawSettings {
    #[serde(default)]
    keys: BTreeMap<String, String>,
    #[serde(default = "all_formats")]
    formats: Vec<Format>,
    #[serde(default = "default_signature_paths")]
    signature_paths: Vec<String>,
    #[serde(default)]
    mode: Mode,
}

/// What an untrusted model gets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Refused.
    #[default]
    Enforce,
    /// The call fails with the reason instead: with the host's fail mode
    /// `open` for verify, the model mounts and the failure is logged (a
    /// warn-only roll-out); with `closed` it is refused all the same.
    Warn,
}

fn all_formats() -> Vec<Format> {
    vec![Format::Cosign, Format::ModelSigning]
}

fn default_signature_paths() -> Vec<String> {
    vec!["model.sig".to_owned()]
}

/// A trusted public key.
#[derive(Debug)]
pub enum PublicKey {
    /// ECDSA P-256: DER signatures over SHA-256 of the message.
    P256(p256::ecdsa::VerifyingKey),
    /// Ed25519: raw 64-byte signatures over the message itself.
    Ed25519(ed25519_dalek::VerifyingKey),
}

impl PublicKey {
    /// Parses a PEM SPKI public key of either kind.
    ///
    /// # Errors
    /// What the text is not, fit to follow the key's name.
    pub fn from_pem(pem: &str) -> Result<PublicKey, String> {
        use p256::pkcs8::DecodePublicKey as _;
        if pem.contains("PRIVATE KEY-----") {
            return Err("is a private key; give its public key (`openssl pkey -pubout`)".to_owned());
        }
        let p256 = match p256::ecdsa::VerifyingKey::from_public_key_pem(pem) {
            Ok(key) => return Ok(PublicKey::P256(key)),
            Err(error) => error,
        };
        if let Ok(key) = ed25519_dalek::VerifyingKey::from_public_key_pem(pem) {
            return Ok(PublicKey::Ed25519(key));
        }
        Err(format!("is not a PEM public key (`-----BEGIN PUBLIC KEY-----`) of ECDSA P-256 or Ed25519: {p256}"))
    }

    /// Whether `signature` is this key's signature of `message`.
    pub fn verifies(&self, message: &[u8], signature: &[u8]) -> bool {
        use p256::ecdsa::signature::Verifier as _;
        match self {
            PublicKey::P256(key) => {
                p256::ecdsa::Signature::from_der(signature).is_ok_and(|signature| key.verify(message, &signature).is_ok())
            }
            PublicKey::Ed25519(key) => ed25519_dalek::Signature::from_slice(signature)
                .is_ok_and(|signature| key.verify_strict(message, &signature).is_ok()),
        }
    }
}

/// A key the deployment trusts, with the name the signer is shown by.
#[derive(Debug)]
pub struct TrustedKey {
    name: String,
    key: PublicKey,
}

/// The checked settings.
#[derive(Debug)]
pub struct Settings {
    /// By name.
    keys: Vec<TrustedKey>,
    formats: Vec<Format>,
    signature_paths: Vec<String>,
    mode: Mode,
}

impl Settings {
    /// Parses and checks the settings JSON, keys included.
    ///
    /// # Errors
    /// A message naming the offending key.
    pub fn parse(json: &str) -> Result<Settings, String> {
        // Checked as an object first: serde would take `[]` for a struct.
        let value: serde_json::Value = modelcache_policy::parse_settings(json)?;
        if !value.is_object() {
            return Err(format!("invalid settings: expected a JSON object, not {value}"));
        }
        let raw: RawSettings = serde_json::from_value(value).map_err(|error| format!("invalid settings: {error}"))?;
        if raw.keys.is_empty() {
            return Err(
                "invalid settings: `keys` names no key; trust at least one: `\"keys\": {\"NAME\": \"-----BEGIN PUBLIC KEY-----…\"}`"
                    .to_owned(),
            );
        }
        let mut keys = Vec::with_capacity(raw.keys.len());
        for (name, pem) in raw.keys {
            if name.is_empty() {
                return Err(
                    "invalid settings: `keys` has a key with an empty name; the name is how its signer is shown".to_owned()
                );
            }
            let key = PublicKey::from_pem(&pem).map_err(|problem| format!("invalid settings: `keys.{name}` {problem}"))?;
            keys.push(TrustedKey { name, key });
        }
        if raw.formats.is_empty() {
            return Err("invalid settings: `formats` is empty; enable `cosign`, `model-signing` or both".to_owned());
        }
        if raw.signature_paths.is_empty() || raw.signature_paths.iter().any(String::is_empty) {
            return Err("invalid settings: `signature-paths` must list at least one path, none empty".to_owned());
        }
        Ok(Settings { keys, formats: raw.formats, signature_paths: raw.signature_paths, mode: raw.mode })
    }

    fn enabled(&self, format: Format) -> bool {
        self.formats.contains(&format)
    }

    /// The trusted key whose signature of `message` `signature` is.
    fn signer(&self, message: &[u8], signature: &[u8]) -> Option<&TrustedKey> {
        self.keys.iter().find(|trusted| trusted.key.verifies(message, signature))
    }
}

/// Standard base64 (what cosign and protobuf's JSON write), or its URL-safe
/// variant (which protobuf's JSON also reads).
fn decode_base64(text: &str) -> Option<Vec<u8>> {
    let text = text.trim();
    BASE64.decode(text).or_else(|_| BASE64_URL.decode(text)).ok()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// The 32 bytes of a lowercase hex sha256 digest.
fn unhex_sha256(text: &str) -> Option<[u8; 32]> {
    let bytes = text.as_bytes();
    if bytes.len() != 64 || !bytes.iter().all(|byte| matches!(byte, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let mut out = [0u8; 32];
    for (index, pair) in bytes.chunks(2).enumerate() {
        out[index] = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(out)
}

/// Checks one cosign signature: the trusted key that made it for this manifest.
fn check_cosign<'a>(
    settings: &'a Settings,
    signature: &CosignSignature,
    manifest_digest: &str,
) -> Result<&'a TrustedKey, String> {
    let raw = decode_base64(&signature.signature).ok_or("its signature is not base64")?;
    // Nothing in the payload counts before its signature is checked.
    let key = settings.signer(&signature.payload, &raw).ok_or("signed by an untrusted key")?;
    let payload: serde_json::Value =
        serde_json::from_slice(&signature.payload).map_err(|error| format!("its payload is not JSON ({error})"))?;
    let critical = &payload["critical"];
    match critical["type"].as_str() {
        Some(COSIGN_TYPE) => {}
        Some(other) => return Err(format!("its payload is a `{other}`, not a {COSIGN_TYPE}")),
        None => return Err(format!("its payload is not a {COSIGN_TYPE}")),
    }
    match critical["image"]["docker-manifest-digest"].as_str() {
        Some(digest) if digest == manifest_digest => Ok(key),
        Some(digest) => Err(format!("signed for another manifest, {digest}")),
        None => Err("its payload names no manifest digest".to_owned()),
    }
}

/// DSSE's pre-authentication encoding: what a DSSE signature signs.
fn pae(payload_type: &str, body: &[u8]) -> Vec<u8> {
    let mut out = format!("DSSEv1 {} {payload_type} {} ", payload_type.len(), body.len()).into_bytes();
    out.extend_from_slice(body);
    out
}

/// An in-toto statement as model-signing writes it (fields not read are
/// allowed and ignored).
#[derive(Deserialize)]
struct Statement {
    #[serde(rename = "_type")]
    kind: String,
    subject: Vec<Subject>,
    #[serde(rename = "predicateType")]
    predicate_type: String,
    predicate: Predicate,
}

#[derive(Deserialize)]
struct Subject {
    digest: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct Predicate {
    serialization: Serialization,
    resources: Vec<Resource>,
}

#[derive(Deserialize)]
struct Serialization {
    method: String,
}

#[derive(Deserialize)]
struct Resource {
    name: String,
    algorithm: String,
    digest: String,
}

impl Statement {
    /// The signed files, `name -> sha256:<hex>`, once the statement is one
    /// whose digests are file digests and is consistent with its subject.
    fn files(&self) -> Result<BTreeMap<&str, String>, String> {
        if self.kind != IN_TOTO_STATEMENT {
            return Err(format!("its statement is a `{}`, not an in-toto statement v1", self.kind));
        }
        if self.predicate_type != MODEL_SIGNING_PREDICATE {
            return Err(format!("its predicate is `{}`, not {MODEL_SIGNING_PREDICATE}", self.predicate_type));
        }
        let method = &self.predicate.serialization.method;
        if method != "files" {
            return Err(format!("it signs by `{method}`; only `files` digests are layer digests"));
        }
        let mut files = BTreeMap::new();
        let mut all = Sha256::new();
        for resource in &self.predicate.resources {
            if resource.algorithm != "sha256" {
                return Err(format!(
                    "it hashes {} with `{}`; only sha256 digests are layer digests",
                    resource.name, resource.algorithm
                ));
            }
            let raw =
                unhex_sha256(&resource.digest).ok_or_else(|| format!("its digest of {} is not sha256 hex", resource.name))?;
            all.update(raw);
            if files.insert(resource.name.as_str(), format!("sha256:{}", resource.digest)).is_some() {
                return Err(format!("its statement lists {} twice", resource.name));
            }
        }
        // model-signing's subject: sha256 over the raw digests, in payload order.
        let subject = hex(&all.finalize());
        match self.subject.as_slice() {
            [only] if only.digest.get("sha256") == Some(&subject) => Ok(files),
            _ => Err("its statement is inconsistent: the subject digest is not that of its files".to_owned()),
        }
    }
}

/// Whether a layer is a tar archive (its digest is no file's).
fn is_tar(layer: &Layer) -> bool {
    layer.media_type.contains(".tar")
}

/// The differences between the signed files and the model's layers, in
/// manifest order, then the signed files the model lacks.
fn differences(files: &BTreeMap<&str, String>, layers: &[Layer], gathered: &[&str]) -> Vec<String> {
    let mut problems = Vec::new();
    let mut seen = BTreeSet::new();
    for layer in layers {
        let path = layer.path.as_str();
        let Some(signed) = files.get(path) else {
            // Not signed: fine only for the signature layers the host
            // gathered (raw files it read whole). The statement's own
            // `ignore_paths` do not count: a statement is not bound to a
            // manifest, and any layer added at an ignored path (`.git`, by
            // default) would ride along unsigned.
            if !gathered.contains(&path) || is_tar(layer) {
                problems.push(if is_tar(layer) {
                    format!("{path} is a tar layer, which model-signing cannot sign as one file")
                } else {
                    format!("{path} is in the model but not signed")
                });
            }
            continue;
        };
        if !seen.insert(path) {
            problems.push(format!("{path} is in the model twice"));
        } else if *signed != layer.digest {
            problems.push(format!("{path} has digest {} but the signature says {signed}", layer.digest));
        }
    }
    for name in files.keys() {
        if !seen.contains(name) {
            problems.push(format!("{name} is signed but not in the model"));
        }
    }
    problems
}

/// Checks one model-signing bundle: the trusted key that signed exactly
/// these files.
fn check_model_signature<'a>(
    settings: &'a Settings,
    signature: &ModelSignature,
    layers: &[Layer],
    gathered: &[&str],
) -> Result<&'a TrustedKey, String> {
    let bundle: serde_json::Value =
        serde_json::from_slice(&signature.bundle).map_err(|error| format!("not a Sigstore bundle ({error})"))?;
    let media_type = bundle["mediaType"].as_str().unwrap_or_default();
    if !BUNDLE_MEDIA_TYPES.contains(&media_type) {
        return Err(format!("not a Sigstore bundle v0.2 or v0.3 (media type `{media_type}`)"));
    }
    let envelope = &bundle["dsseEnvelope"];
    if !envelope.is_object() {
        return Err("the bundle has no DSSE envelope".to_owned());
    }
    let payload_type = envelope["payloadType"].as_str().unwrap_or_default();
    if payload_type != IN_TOTO_PAYLOAD {
        return Err(format!("its payload type is `{payload_type}`, not {IN_TOTO_PAYLOAD}"));
    }
    let body = envelope["payload"].as_str().and_then(decode_base64).ok_or("its payload is not base64")?;
    let raw = envelope["signatures"][0]["sig"].as_str().and_then(decode_base64).ok_or("its envelope has no signature")?;
    // Nothing in the statement counts before its signature is checked.
    let key = settings.signer(&pae(payload_type, &body), &raw).ok_or("signed by an untrusted key")?;
    let statement: Statement =
        serde_json::from_slice(&body).map_err(|error| format!("its statement is not model-signing's ({error})"))?;
    let files = statement.files()?;
    let mut problems = differences(&files, layers, gathered).into_iter();
    match (problems.next(), problems.len()) {
        (None, _) => Ok(key),
        (Some(first), 0) => Err(first),
        (Some(first), more) => Err(format!("{first} (and {more} more)")),
    }
}

/// One format's findings for the reason: the distinct reasons its
/// signatures failed, `what` naming them.
fn finding(what: &str, reasons: &[String]) -> String {
    let mut distinct: Vec<&str> = Vec::new();
    for reason in reasons {
        if !distinct.contains(&reason.as_str()) {
            distinct.push(reason);
        }
    }
    match reasons.len() {
        1 => format!("{what}: {}", distinct.join(", ")),
        count => format!("{what} ({count} signatures): {}", distinct.join(", ")),
    }
}

/// The decision as a plain function, so it is tested natively.
///
/// # Errors
/// Invalid settings (the host checked them at load, so only a host bug gets here).
pub fn decide(request: &Request) -> Result<Verdict, String> {
    let settings = Settings::parse(&request.settings)?;
    match judge(&settings, request)? {
        Verdict::Refused(reason) if settings.mode == Mode::Warn => Err(format!("untrusted (warn mode): {reason}")),
        verdict => Ok(verdict),
    }
}

fn judge(settings: &Settings, request: &Request) -> Result<Verdict, String> {
    let mut findings = Vec::new();
    let mut absent = Vec::new();
    if settings.enabled(Format::Cosign) {
        let mut reasons = Vec::new();
        for signature in &request.cosign {
            match check_cosign(settings, signature, &request.manifest_digest) {
                Ok(key) => return Ok(Verdict::Trusted(format!("{} ({})", key.name, Format::Cosign))),
                Err(reason) => reasons.push(reason),
            }
        }
        if reasons.is_empty() {
            absent.push("no cosign signature".to_owned());
            findings.push("cosign: none found".to_owned());
        } else {
            findings.push(finding("cosign", &reasons));
        }
    }
    if settings.enabled(Format::ModelSigning) {
        for signature in &request.model_signatures {
            let gathered: Vec<&str> = request.model_signatures.iter().map(|found| found.path.as_str()).collect();
            match check_model_signature(settings, signature, &request.layers, &gathered) {
                Ok(key) => return Ok(Verdict::Trusted(format!("{} ({})", key.name, Format::ModelSigning))),
                Err(reason) => findings.push(format!("model-signing {}: {reason}", signature.path)),
            }
        }
        if request.model_signatures.is_empty() {
            let missing = format!("no {} layer", settings.signature_paths.join(" or "));
            findings.push(format!("model-signing: {missing}"));
            absent.push(missing);
        }
    }
    let enabled = [Format::Cosign, Format::ModelSigning].into_iter().filter(|format| settings.enabled(*format)).count();
    if absent.len() == enabled {
        return Ok(Verdict::Refused(format!("no signature found ({})", absent.join(", "))));
    }
    Ok(Verdict::Refused(format!("no signature by a trusted key: {}", findings.join("; "))))
}

struct Policy;

impl settings::Guest for Policy {
    fn validate_settings(settings: String) -> Result<(), String> {
        Settings::parse(&settings).map(drop)
    }
}

impl verify::Guest for Policy {
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

    /// In warn mode an untrusted model fails the call (the host's fail mode
    /// decides) instead of being refused; a trusted one is still trusted.
    #[test]
    fn warn_mode_fails_instead_of_refusing() {
        let settings = |mode: &str| {
            let pem = include_str!("../tests/data/ec-pub.pem");
            serde_json::json!({ "keys": { "release": pem }, "mode": mode }).to_string()
        };
        assert_eq!(Settings::parse(&settings("warn")).unwrap().mode, Mode::Warn);
        assert!(Settings::parse(&settings("loud")).unwrap_err().contains("unknown variant"));
        let unsigned = decide(&request(settings("warn"))).unwrap_err();
        assert!(unsigned.starts_with("untrusted (warn mode): no signature found"), "{unsigned}");
        let signed = Request { model_signatures: vec![model_signature(MODEL_SIG)], ..request(settings("warn")) };
        assert_eq!(decide(&signed), Ok(Verdict::Trusted("release (model-signing)".into())));
    }
    use exports::modelcache::policy::verify::{Annotation, Referrer, Requester};
    use serde_json::{Value, json};

    // Real signatures: `model.sig` made by `model_signing sign key` (1.1.1)
    // with the key of `ec-pub.pem` over a three-file model, the cosign
    // payload signed by openssl with the same key (DER ECDSA) and with the
    // key of `ed-pub.pem` (`openssl pkeyutl -sign -rawin`, Ed25519).
    const MODEL_SIG: &[u8] = include_bytes!("../tests/data/model.sig");
    const IGNORE_CONFIG_SIG: &[u8] = include_bytes!("../tests/data/ignore-config.sig");
    const SHARD_SIG: &[u8] = include_bytes!("../tests/data/shard.sig");
    const BLAKE2_SIG: &[u8] = include_bytes!("../tests/data/blake2.sig");
    const RELEASE_KEY: &str = include_str!("../tests/data/ec-pub.pem");
    const OTHER_KEY: &str = include_str!("../tests/data/other-pub.pem");
    const ED25519_KEY: &str = include_str!("../tests/data/ed-pub.pem");
    const COSIGN_PAYLOAD: &[u8] = include_bytes!("../tests/data/cosign-payload.json");
    const COSIGN_SIGNATURE: &str = include_str!("../tests/data/cosign-payload.sig.b64");
    const COSIGN_ED25519_SIGNATURE: &str = include_str!("../tests/data/cosign-payload.ed25519.sig.b64");
    /// The manifest the cosign payload names.
    const MANIFEST: &str = "sha256:e605db2db5ab5433709bb85af164b0ad3e2a44c0b8ecfd7a1e6c6bb38eef87ea";
    /// The model's files as its manifest's layers: path, digest, media type.
    const FILES: [(&str, &str, &str); 4] = [
        (
            "config.json",
            "sha256:9c9d31c587e1dbc7629b482bc1a6a19806c06fe799ba7e17e996491220093d9a",
            "application/vnd.cncf.model.weight.config.v1.raw",
        ),
        (
            "model.safetensors",
            "sha256:315b6a4c220d81fabddad7edc14c15dcceb738937c0146837d463e63188f06d2",
            "application/vnd.cncf.model.weight.v1.raw",
        ),
        (
            "tokenizer/tokenizer.json",
            "sha256:2fa14b599d55decb6e8a10d5ea8654d4b804fccecf1b6afc4f0e409a026201b1",
            "application/vnd.cncf.model.weight.config.v1.raw",
        ),
        (
            "model.sig",
            "sha256:19d5fb2d112e2bf0a3e18c1700f037f1497c349de99b26a3432a3654a49ef49b",
            "application/vnd.cncf.model.doc.v1.raw",
        ),
    ];

    fn layer(path: &str, digest: &str, media_type: &str) -> Layer {
        Layer {
            path: path.into(),
            digest: digest.into(),
            size: 1,
            media_type: media_type.into(),
            annotations: vec![Annotation { key: "org.cncf.model.filepath".into(), value: path.into() }],
        }
    }

    fn layers() -> Vec<Layer> {
        FILES.iter().map(|(path, digest, media_type)| layer(path, digest, media_type)).collect()
    }

    fn settings(keys: &[(&str, &str)]) -> String {
        let keys: serde_json::Map<String, Value> = keys.iter().map(|(name, pem)| ((*name).to_owned(), json!(pem))).collect();
        json!({ "keys": keys }).to_string()
    }

    fn request(settings: String) -> Request {
        Request {
            requester: Requester { namespace: None, pod: None, pod_uid: None, service_account: None, volume: None },
            reference: "127.0.0.1:43359/demo/tiny:v1".into(),
            manifest_digest: MANIFEST.into(),
            annotations: vec![],
            layers: layers(),
            cosign: vec![],
            referrers: vec![],
            model_signatures: vec![],
            settings,
        }
    }

    fn model_signature(bundle: &[u8]) -> ModelSignature {
        ModelSignature { path: "model.sig".into(), layer_digest: FILES[3].1.into(), bundle: bundle.to_vec() }
    }

    /// A request carrying `model.sig`, trusting `keys`.
    fn model_signed(keys: &[(&str, &str)]) -> Request {
        Request { model_signatures: vec![model_signature(MODEL_SIG)], ..request(settings(keys)) }
    }

    fn cosign(signature: &str) -> CosignSignature {
        CosignSignature {
            payload: COSIGN_PAYLOAD.to_vec(),
            signature: signature.trim().into(),
            annotations: vec![Annotation { key: "dev.cosignproject.cosign/signature".into(), value: signature.trim().into() }],
        }
    }

    /// A request carrying the cosign signature `signature`, trusting `keys`.
    fn cosign_signed(keys: &[(&str, &str)], signature: &str) -> Request {
        Request { cosign: vec![cosign(signature)], ..request(settings(keys)) }
    }

    fn trusted(request: &Request) -> String {
        match decide(request).unwrap() {
            Verdict::Trusted(signer) => signer,
            Verdict::Refused(reason) => panic!("refused: {reason}"),
        }
    }

    fn refused(request: &Request) -> String {
        match decide(request).unwrap() {
            Verdict::Refused(reason) => reason,
            Verdict::Trusted(signer) => panic!("trusted: {signer}"),
        }
    }

    fn invalid(settings: &str) -> String {
        <Policy as settings::Guest>::validate_settings(settings.into()).unwrap_err()
    }

    /// A model-signing bundle by a trusted key over exactly the model's files is trusted.
    #[test]
    fn model_signing_trusted_with_the_signing_key() {
        assert_eq!(trusted(&model_signed(&[("release", RELEASE_KEY)])), "release (model-signing)");
        assert_eq!(trusted(&model_signed(&[("other", OTHER_KEY), ("release", RELEASE_KEY)])), "release (model-signing)");
    }

    /// A bundle signed by a key not in the settings is refused, whatever it says.
    #[test]
    fn model_signing_refused_with_another_key() {
        assert_eq!(
            refused(&model_signed(&[("other", OTHER_KEY), ("ed", ED25519_KEY)])),
            "no signature by a trusted key: cosign: none found; model-signing model.sig: signed by an untrusted key"
        );
    }

    /// A statement changed after signing no longer verifies.
    #[test]
    fn model_signing_refused_when_the_statement_changed() {
        let mut bundle: Value = serde_json::from_slice(MODEL_SIG).unwrap();
        let body = BASE64.decode(bundle["dsseEnvelope"]["payload"].as_str().unwrap()).unwrap();
        let body = String::from_utf8(body).unwrap().replace("config.json", "config.jsoN");
        bundle["dsseEnvelope"]["payload"] = BASE64.encode(body).into();
        let request = Request {
            model_signatures: vec![model_signature(&serde_json::to_vec(&bundle).unwrap())],
            ..model_signed(&[("release", RELEASE_KEY)])
        };
        assert!(refused(&request).ends_with("model-signing model.sig: signed by an untrusted key"));
    }

    /// A layer whose digest is not the signed one is refused, naming both digests.
    #[test]
    fn model_signing_refused_when_a_file_was_swapped() {
        let mut request = model_signed(&[("release", RELEASE_KEY)]);
        request.layers[0].digest = format!("sha256:{}", "0".repeat(64));
        assert_eq!(
            refused(&request),
            "no signature by a trusted key: cosign: none found; model-signing model.sig: config.json has digest \
             sha256:0000000000000000000000000000000000000000000000000000000000000000 but the signature says \
             sha256:9c9d31c587e1dbc7629b482bc1a6a19806c06fe799ba7e17e996491220093d9a"
        );
        request.layers[1].digest = format!("sha256:{}", "1".repeat(64));
        assert!(refused(&request).ends_with(" (and 1 more)"));
    }

    /// A signed file the model lacks, and a model file nobody signed, are refused by name.
    #[test]
    fn model_signing_refused_when_a_file_is_missing_or_extra() {
        let mut missing = model_signed(&[("release", RELEASE_KEY)]);
        missing.layers.remove(2);
        assert_eq!(
            refused(&missing),
            "no signature by a trusted key: cosign: none found; model-signing model.sig: tokenizer/tokenizer.json is signed but not in the model"
        );
        let mut extra = model_signed(&[("release", RELEASE_KEY)]);
        extra.layers.push(layer("extra.txt", FILES[0].1, "application/vnd.cncf.model.doc.v1.raw"));
        assert!(refused(&extra).ends_with("model-signing model.sig: extra.txt is in the model but not signed"));
        let mut renamed = model_signed(&[("release", RELEASE_KEY)]);
        renamed.layers[0].path = "config2.json".into();
        assert!(refused(&renamed).ends_with(": config2.json is in the model but not signed (and 1 more)"));
        let mut tar = model_signed(&[("release", RELEASE_KEY)]);
        tar.layers.push(layer("data", FILES[0].1, "application/vnd.cncf.model.weight.v1.tar"));
        assert!(refused(&tar).ends_with(": data is a tar layer, which model-signing cannot sign as one file"));
        let mut twice = model_signed(&[("release", RELEASE_KEY)]);
        twice.layers.push(layer(FILES[0].0, FILES[0].1, FILES[0].2));
        assert!(refused(&twice).ends_with(": config.json is in the model twice"));
    }

    /// Only the signature layers the host gathered go unsigned: not the
    /// paths a statement ignores (a layer added at `.git` would ride along),
    /// not a path the settings name that the host did not gather, never a
    /// tar layer.
    #[test]
    fn only_gathered_signature_layers_go_unsigned() {
        let mut request = model_signed(&[("release", RELEASE_KEY)]);
        assert_eq!(trusted(&request), "release (model-signing)");
        request.layers.push(layer(".git/config", FILES[0].1, "application/vnd.cncf.model.doc.v1.raw"));
        assert!(refused(&request).ends_with(": .git/config is in the model but not signed"), "{}", refused(&request));
        // Signed with `--ignore-paths model/config.json`: config.json must still be signed.
        let mut ignoring =
            Request { model_signatures: vec![model_signature(IGNORE_CONFIG_SIG)], ..model_signed(&[("release", RELEASE_KEY)]) };
        ignoring.layers[0].digest = format!("sha256:{}", "0".repeat(64));
        assert!(refused(&ignoring).contains("config.json is in the model but not signed"), "{}", refused(&ignoring));
        // A path in `signature-paths` the host did not gather is a model file.
        let mut two = model_signed(&[("release", RELEASE_KEY)]);
        two.settings =
            json!({ "keys": { "release": RELEASE_KEY }, "signature-paths": ["model.sig", "sigs/other.sig"] }).to_string();
        two.layers.push(layer("sigs/other.sig", FILES[0].1, "application/vnd.cncf.model.doc.v1.raw"));
        assert!(refused(&two).contains("sigs/other.sig is in the model but not signed"), "{}", refused(&two));
        // A tar layer at the signature's own path is never a signature.
        let mut tarred = model_signed(&[("release", RELEASE_KEY)]);
        tarred.layers[3].media_type = "application/vnd.cncf.model.weight.v1.tar".into();
        assert!(refused(&tarred).contains("model.sig is a tar layer"), "{}", refused(&tarred));
    }

    /// Sharded and non-sha256 statements are refused: their digests are no layer's.
    #[test]
    fn model_signing_refuses_digests_that_are_not_layer_digests() {
        for (bundle, expected) in [
            (SHARD_SIG, "model-signing model.sig: it signs by `shards`; only `files` digests are layer digests"),
            (BLAKE2_SIG, "model-signing model.sig: it hashes config.json with `blake2b`; only sha256 digests are layer digests"),
        ] {
            let request =
                Request { model_signatures: vec![model_signature(bundle)], ..model_signed(&[("release", RELEASE_KEY)]) };
            let reason = refused(&request);
            assert!(reason.ends_with(expected), "{reason}");
        }
    }

    /// Bundles that are not model-signing's are refused with what they are.
    #[test]
    fn model_signing_refuses_other_bundles() {
        let reason = |bundle: &[u8]| {
            let request =
                Request { model_signatures: vec![model_signature(bundle)], ..model_signed(&[("release", RELEASE_KEY)]) };
            refused(&request).rsplit_once("model.sig: ").unwrap().1.to_owned()
        };
        assert!(reason(b"not json").starts_with("not a Sigstore bundle (expected ident"));
        assert_eq!(reason(b"{}"), "not a Sigstore bundle v0.2 or v0.3 (media type ``)");
        let message = br#"{"mediaType": "application/vnd.dev.sigstore.bundle.v0.3+json", "messageSignature": {}}"#;
        assert_eq!(reason(message), "the bundle has no DSSE envelope");
        let mut bundle: Value = serde_json::from_slice(MODEL_SIG).unwrap();
        bundle["mediaType"] = json!("application/vnd.dev.sigstore.bundle.v0.2+json");
        let request = Request {
            model_signatures: vec![model_signature(&serde_json::to_vec(&bundle).unwrap())],
            ..model_signed(&[("release", RELEASE_KEY)])
        };
        assert_eq!(trusted(&request), "release (model-signing)");
    }

    /// A cosign signature by a trusted key naming this manifest is trusted.
    #[test]
    fn cosign_trusted() {
        assert_eq!(trusted(&cosign_signed(&[("release", RELEASE_KEY)], COSIGN_SIGNATURE)), "release (cosign)");
        let reason = refused(&cosign_signed(&[("other", OTHER_KEY)], COSIGN_SIGNATURE));
        assert_eq!(
            reason,
            "no signature by a trusted key: cosign: signed by an untrusted key; model-signing: no model.sig layer"
        );
    }

    /// The same cosign signature on another manifest is refused.
    #[test]
    fn cosign_refused_for_another_manifest() {
        let mut request = cosign_signed(&[("release", RELEASE_KEY)], COSIGN_SIGNATURE);
        request.manifest_digest = format!("sha256:{}", "4".repeat(64));
        assert_eq!(
            refused(&request),
            "no signature by a trusted key: cosign: signed for another manifest, \
             sha256:e605db2db5ab5433709bb85af164b0ad3e2a44c0b8ecfd7a1e6c6bb38eef87ea; model-signing: no model.sig layer"
        );
        request.cosign.push(cosign(COSIGN_ED25519_SIGNATURE));
        request.cosign.push(cosign("not base64!"));
        assert_eq!(
            refused(&request),
            "no signature by a trusted key: cosign (3 signatures): signed for another manifest, \
             sha256:e605db2db5ab5433709bb85af164b0ad3e2a44c0b8ecfd7a1e6c6bb38eef87ea, signed by an untrusted key, \
             its signature is not base64; model-signing: no model.sig layer"
        );
    }

    /// An Ed25519 cosign-format signature made with openssl is trusted with its key only.
    #[test]
    fn cosign_ed25519_trusted() {
        assert_eq!(trusted(&cosign_signed(&[("ed", ED25519_KEY)], COSIGN_ED25519_SIGNATURE)), "ed (cosign)");
        let reason = refused(&cosign_signed(&[("release", RELEASE_KEY)], COSIGN_ED25519_SIGNATURE));
        assert!(reason.starts_with("no signature by a trusted key: cosign: signed by an untrusted key"), "{reason}");
    }

    /// A format left out of `formats` vouches for nothing.
    #[test]
    fn formats_limit_what_vouches() {
        let only_model_signing = json!({ "keys": { "release": RELEASE_KEY }, "formats": ["model-signing"] }).to_string();
        let request = Request { cosign: vec![cosign(COSIGN_SIGNATURE)], ..request(only_model_signing.clone()) };
        assert_eq!(refused(&request), "no signature found (no model.sig layer)");
        let request = Request { settings: only_model_signing, ..model_signed(&[]) };
        assert_eq!(trusted(&request), "release (model-signing)");
        let only_cosign = json!({ "keys": { "release": RELEASE_KEY }, "formats": ["cosign"] }).to_string();
        let request = Request { settings: only_cosign, ..model_signed(&[]) };
        assert_eq!(refused(&request), "no signature found (no cosign signature)");
    }

    /// With nothing signed the reason says what was looked for; referrers do not vouch.
    #[test]
    fn nothing_found() {
        let mut request = request(settings(&[("release", RELEASE_KEY)]));
        request.referrers.push(Referrer {
            digest: format!("sha256:{}", "9".repeat(64)),
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            artifact_type: "application/vnd.example.unknown.v1+json".into(),
            size: 1,
            annotations: vec![],
        });
        assert_eq!(refused(&request), "no signature found (no cosign signature, no model.sig layer)");
        request.settings =
            json!({ "keys": { "release": RELEASE_KEY }, "signature-paths": ["model.sig", "signature.sig"] }).to_string();
        assert_eq!(refused(&request), "no signature found (no cosign signature, no model.sig or signature.sig layer)");
    }

    /// Invalid settings are refused naming the key at fault.
    #[test]
    fn invalid_settings_are_named() {
        assert!(<Policy as settings::Guest>::validate_settings(settings(&[("a", RELEASE_KEY), ("b", ED25519_KEY)])).is_ok());
        // CRLF line ends are fine.
        assert!(<Policy as settings::Guest>::validate_settings(settings(&[("a", &RELEASE_KEY.replace('\n', "\r\n"))])).is_ok());
        let bad = invalid(&settings(&[
            ("release", RELEASE_KEY),
            ("broken", "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"),
        ]));
        assert!(
            bad.starts_with("invalid settings: `keys.broken` is not a PEM public key (`-----BEGIN PUBLIC KEY-----`) of ECDSA P-256 or Ed25519: "),
            "{bad}"
        );
        // P-384 (which model-signing can use) is not supported: say so by its OID.
        let p384 = invalid(&settings(&[("p384", include_str!("../tests/data/p384-pub.pem"))]));
        assert!(p384.ends_with("of ECDSA P-256 or Ed25519: unknown/unsupported algorithm OID: 1.3.132.0.34"), "{p384}");
        assert!(invalid(&settings(&[("x", "hello")])).starts_with("invalid settings: `keys.x` is not a PEM public key"));
        assert_eq!(
            invalid(&settings(&[("mine", "-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n")])),
            "invalid settings: `keys.mine` is a private key; give its public key (`openssl pkey -pubout`)"
        );
        let none =
            "invalid settings: `keys` names no key; trust at least one: `\"keys\": {\"NAME\": \"-----BEGIN PUBLIC KEY-----…\"}`";
        assert_eq!(invalid("{}"), none);
        assert_eq!(invalid(r#"{"keys": {}}"#), none);
        assert!(invalid(&settings(&[("", RELEASE_KEY)])).contains("a key with an empty name"));
        let key = json!(RELEASE_KEY);
        assert!(
            invalid(&format!(r#"{{"keys": {{"a": {key}}}, "key": 1}}"#)).starts_with("invalid settings: unknown field `key`")
        );
        assert!(
            invalid(&format!(r#"{{"keys": {{"a": {key}}}, "formats": ["notation"]}}"#))
                .starts_with("invalid settings: unknown variant `notation`, expected `cosign` or `model-signing`")
        );
        assert!(invalid(&format!(r#"{{"keys": {{"a": {key}}}, "formats": []}}"#)).contains("`formats` is empty"));
        assert!(invalid(&format!(r#"{{"keys": {{"a": {key}}}, "signature-paths": []}}"#)).contains("`signature-paths`"));
        assert_eq!(invalid("[]"), "invalid settings: expected a JSON object, not []");
    }

    /// The annotations of a case file, as the host lowers them (sorted by key).
    fn case_annotations(value: &Value) -> Vec<Annotation> {
        let mut annotations: Vec<Annotation> = value
            .as_object()
            .into_iter()
            .flatten()
            .map(|(key, value)| Annotation { key: key.clone(), value: value.as_str().unwrap().into() })
            .collect();
        annotations.sort_by(|a, b| a.key.cmp(&b.key));
        annotations
    }

    /// A case file's input as the host hands it over.
    fn case_request(input: &Value, settings: &Value) -> Request {
        let text = |value: &Value| value.as_str().unwrap().to_owned();
        let list = |key: &str| input[key].as_array().cloned().unwrap_or_default();
        Request {
            requester: Requester {
                namespace: input["requester"]["namespace"].as_str().map(str::to_owned),
                pod: input["requester"]["pod"].as_str().map(str::to_owned),
                pod_uid: input["requester"]["pod-uid"].as_str().map(str::to_owned),
                service_account: input["requester"]["service-account"].as_str().map(str::to_owned),
                volume: input["requester"]["volume"].as_str().map(str::to_owned),
            },
            reference: text(&input["reference"]),
            manifest_digest: text(&input["manifest-digest"]),
            annotations: case_annotations(&input["annotations"]),
            layers: list("layers")
                .iter()
                .map(|layer| Layer {
                    path: text(&layer["path"]),
                    digest: text(&layer["digest"]),
                    size: layer["size"].as_u64().unwrap(),
                    media_type: text(&layer["media-type"]),
                    annotations: case_annotations(&layer["annotations"]),
                })
                .collect(),
            cosign: list("cosign")
                .iter()
                .map(|signature| CosignSignature {
                    payload: text(&signature["payload"]).into_bytes(),
                    signature: text(&signature["signature"]),
                    annotations: case_annotations(&signature["annotations"]),
                })
                .collect(),
            referrers: list("referrers")
                .iter()
                .map(|referrer| Referrer {
                    digest: text(&referrer["digest"]),
                    media_type: text(&referrer["media-type"]),
                    artifact_type: text(&referrer["artifact-type"]),
                    size: referrer["size"].as_u64().unwrap(),
                    annotations: case_annotations(&referrer["annotations"]),
                })
                .collect(),
            model_signatures: list("model-signatures")
                .iter()
                .map(|signature| ModelSignature {
                    path: text(&signature["path"]),
                    layer_digest: text(&signature["layer-digest"]),
                    bundle: text(&signature["bundle"]).into_bytes(),
                })
                .collect(),
            settings: settings.to_string(),
        }
    }

    /// The cases for `modelcache plugins test` give the answers they expect
    /// (checked natively here; the host runs them in the sandbox).
    #[test]
    fn cases_hold() {
        let directory = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("cases");
        let mut count = 0;
        for entry in std::fs::read_dir(directory).unwrap() {
            let path = entry.unwrap().path();
            let cases: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            for case in cases.as_array().unwrap() {
                let name = format!("{}: {}", path.display(), case["name"]);
                assert_eq!(case["decision"], "verify", "{name}");
                count += 1;
                if let Some(failure) = case.get("expect-failure") {
                    assert_eq!(failure["cause"], "settings-rejected", "{name}");
                    let error = <Policy as settings::Guest>::validate_settings(case["settings"].to_string()).unwrap_err();
                    assert!(error.contains(failure["contains"].as_str().unwrap()), "{name}: {error}");
                    continue;
                }
                let answer = match decide(&case_request(&case["input"], &case["settings"])).unwrap() {
                    Verdict::Trusted(signer) => json!({ "verdict": "trusted", "signer": signer }),
                    Verdict::Refused(reason) => json!({ "verdict": "refused", "reason": reason }),
                };
                assert_eq!(answer, case["expect"], "{name}");
            }
        }
        assert!(count >= 7, "{count} cases");
    }
}
