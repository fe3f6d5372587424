//! Signed models only: signatures made by the real tools (the `model_signing`
//! CLI, openssl for cosign's keyed format), pushed to the real registry,
//! judged by the real `verify-signatures` plugin before any weight is fetched.

use crate::support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use modelcache::engine::{Engine, EngineConfig, MountRequest};
use modelcache::error::ErrorKind;
use modelcache::plugins::exclude::ExcludeOptions;
use modelcache::registry::{ModelRef, RegistryConfig};
use modelcache::volumes::{MountId, VolumeId};
use support::{PluginDir, Registry, bytes, digest_of, push, read_tree, start_registry, write_tree};

fn engine(root: &Path, registry: &Registry, plugins: &Path) -> Arc<Engine> {
    let mut config = EngineConfig::new(root);
    config.registry = RegistryConfig { insecure: vec![registry.host()], ..RegistryConfig::default() };
    config.plugin_dir = Some(plugins.to_owned());
    Engine::open(config).expect("engine")
}

fn request(volume: &str, reference: &str) -> MountRequest {
    MountRequest {
        volume: VolumeId::new(volume).unwrap(),
        mount_id: MountId::default(),
        reference: ModelRef::parse(reference).unwrap(),
        options: ExcludeOptions::default(),
        requester: Default::default(),
        credentials: None,
    }
}

fn run(command: &mut Command) {
    let output = command.output().unwrap_or_else(|error| panic!("{command:?}: {error}"));
    assert!(output.status.success(), "{command:?}: {}", String::from_utf8_lossy(&output.stderr));
}

/// An ECDSA P-256 key pair made by openssl: (private key, public key PEM text).
fn key_pair(dir: &Path, name: &str) -> (PathBuf, String) {
    let private = dir.join(format!("{name}.pem"));
    let public = dir.join(format!("{name}.pub.pem"));
    run(Command::new("openssl").args(["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out"]).arg(&private));
    run(Command::new("openssl").args(["ec", "-pubout", "-in"]).arg(&private).arg("-out").arg(&public));
    (private, std::fs::read_to_string(&public).unwrap())
}

/// A plugin directory with `verify-signatures` trusting `keys` (name, PEM).
fn trusting(keys: &[(&str, &str)]) -> PluginDir {
    let plugins = PluginDir::new();
    plugins.add("verify-signatures", "verify-signatures");
    let mut toml = String::from("[settings.keys]\n");
    for (name, pem) in keys {
        toml.push_str(&format!("{name} = {pem:?}\n"));
    }
    plugins.configure("verify-signatures", &toml);
    plugins
}

fn model_signing() -> Option<PathBuf> {
    let found = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .map(|dir| dir.join("model_signing"))
        .find(|path| path.is_file());
    if found.is_none() {
        support::skipping("the model_signing CLI is not installed (pip install model-signing==1.1.1 pyopenssl)");
    }
    found
}

const WEIGHTS: &str = "model.safetensors";

fn files(seed: u64) -> Vec<(&'static str, Vec<u8>)> {
    vec![
        (WEIGHTS, bytes(seed, 2 << 20)),
        ("config.json", format!("{{\"seed\": {seed}}}").into_bytes()),
        ("tokenizer/tokenizer.json", b"{\"vocab\": {}}".to_vec()),
    ]
}

/// A model signed with the real `model_signing` CLI (key-based, offline)
/// and pushed with its signature as a layer: it mounts when the plugin
/// trusts the key, and is refused before any weight blob is requested when
/// the plugin trusts another key, when a file was swapped after signing,
/// and when the signature file is missing. A warm mount does not verify
/// again; a new plugin set does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_signing_signatures_are_judged_before_any_weight() {
    let Some(registry) = start_registry() else { return };
    let Some(model_signing) = model_signing() else { return };
    let keys = tempfile::tempdir().unwrap();
    let (private, public) = key_pair(keys.path(), "release");
    let (_, other) = key_pair(keys.path(), "other");
    let sign = |dir: &Path| {
        run(Command::new(&model_signing)
            .args(["sign", "key", "--private_key"])
            .arg(&private)
            .arg("--signature")
            .arg(dir.join("model.sig"))
            .arg(dir));
    };

    let signed = tempfile::tempdir().unwrap();
    write_tree(signed.path(), &files(71));
    sign(signed.path());
    let signed_ref = push(&registry, signed.path(), &registry.reference("models/signed:v1"));

    let swapped = tempfile::tempdir().unwrap();
    write_tree(swapped.path(), &files(72));
    sign(swapped.path());
    std::fs::write(swapped.path().join("config.json"), b"{\"swapped\": true}").unwrap();
    let swapped_ref = push(&registry, swapped.path(), &registry.reference("models/swapped:v1"));

    let unsigned = tempfile::tempdir().unwrap();
    write_tree(unsigned.path(), &files(73));
    let unsigned_ref = push(&registry, unsigned.path(), &registry.reference("models/unsigned:v1"));

    let weight = |seed| digest_of(&files(seed)[0].1);
    let fetched = |seed| registry.blob_gets().get(&weight(seed)).copied().unwrap_or(0);

    let untrusting = trusting(&[("other", &other)]);
    let root = tempfile::tempdir().unwrap();
    let judge = engine(root.path(), &registry, untrusting.path());
    let error = judge.mount(request("other-key", &signed_ref)).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::PermissionDenied, "{error}");
    assert!(error.to_string().contains("not signed by a trusted key"), "{error}");
    assert_eq!(fetched(71), 0, "refused before any weight");
    drop(judge);

    let plugins = trusting(&[("release", &public)]);
    let root = tempfile::tempdir().unwrap();
    let engine = engine(root.path(), &registry, plugins.path());
    for (volume, reference, seed) in [("swapped", &swapped_ref, 72), ("unsigned", &unsigned_ref, 73)] {
        let error = engine.mount(request(volume, reference)).await.unwrap_err();
        assert_eq!(error.kind(), ErrorKind::PermissionDenied, "{volume}: {error}");
        assert_eq!(fetched(seed), 0, "{volume}: refused before any weight");
    }
    let swapped_error = modelcache::plugins::error_chain(&engine.mount(request("swapped-2", &swapped_ref)).await.unwrap_err());
    assert!(swapped_error.contains("config.json"), "the refusal names the swapped file: {swapped_error}");

    let calls = || modelcache::metrics::metrics().plugin_calls.get(["verify-signatures", "verify"]);
    let before = calls();
    let record = engine.mount(request("trusted", &signed_ref)).await.expect("signed by a trusted key");
    assert_eq!(record.verified_by.as_deref(), Some("release (model-signing)"));
    assert_eq!(read_tree(&record.path), read_tree(signed.path()));
    assert_eq!(calls(), before + 1);
    let warm = engine.mount(request("warm", &signed_ref)).await.unwrap();
    assert_eq!(
        (warm.verified_by.as_deref(), calls()),
        (Some("release (model-signing)"), before + 1),
        "a warm mount asks nothing"
    );
    engine.plugins().reload();
    engine.mount(request("reloaded", &signed_ref)).await.unwrap();
    assert_eq!(calls(), before + 2, "a new plugin set verifies again");
}

/// cosign's keyed format, made with openssl: the simple-signing payload
/// naming the manifest digest, signed (DER ECDSA over SHA-256), pushed as
/// the one layer of the manifest at `sha256-<hex>.sig`. Trusted; the same
/// signature moved to another manifest's tag is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cosign_keyed_signatures_name_their_manifest() {
    let Some(registry) = start_registry() else { return };
    let keys = tempfile::tempdir().unwrap();
    let (private, public) = key_pair(keys.path(), "cosign");
    let model = tempfile::tempdir().unwrap();
    write_tree(model.path(), &files(81));
    let pinned = push(&registry, model.path(), &registry.reference("models/cosigned:v1"));
    let digest = pinned.rsplit_once('@').unwrap().1.to_owned();
    let other = tempfile::tempdir().unwrap();
    write_tree(other.path(), &files(82));
    let other_pinned = push(&registry, other.path(), &registry.reference("models/other:v1"));
    let other_digest = other_pinned.rsplit_once('@').unwrap().1.to_owned();

    let payload = format!(
        r#"{{"critical":{{"identity":{{"docker-reference":"{}"}},"image":{{"docker-manifest-digest":"{digest}"}},"type":"cosign container image signature"}},"optional":null}}"#,
        registry.reference("models/cosigned")
    );
    std::fs::write(keys.path().join("payload.json"), &payload).unwrap();
    run(Command::new("openssl")
        .args(["dgst", "-sha256", "-sign"])
        .arg(&private)
        .arg("-out")
        .arg(keys.path().join("payload.sig"))
        .arg(keys.path().join("payload.json")));
    use base64::Engine as _;
    let signature = base64::engine::general_purpose::STANDARD.encode(std::fs::read(keys.path().join("payload.sig")).unwrap());
    let sign_for = |repository: &str| {
        let payload_digest = registry.put_blob(repository, payload.as_bytes());
        let config = br#"{"architecture":"","os":"","config":{},"rootfs":{"type":"layers","diff_ids":[]}}"#;
        let config_digest = registry.put_blob(repository, config);
        serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config.len() },
            "layers": [{
                "mediaType": "application/vnd.dev.cosign.simplesigning.v1+json",
                "digest": payload_digest,
                "size": payload.len(),
                "annotations": { "dev.cosignproject.cosign/signature": signature },
            }],
        })
        .to_string()
    };
    let oci = "application/vnd.oci.image.manifest.v1+json";
    registry.put_manifest(
        "models/cosigned",
        &format!("{}.sig", digest.replace(':', "-")),
        oci,
        sign_for("models/cosigned").as_bytes(),
    );
    // The same signature, moved to the other model's tag.
    registry.put_manifest(
        "models/other",
        &format!("{}.sig", other_digest.replace(':', "-")),
        oci,
        sign_for("models/other").as_bytes(),
    );

    let plugins = trusting(&[("cosign-key", &public)]);
    let root = tempfile::tempdir().unwrap();
    let engine = engine(root.path(), &registry, plugins.path());
    let record = engine.mount(request("cosigned", &pinned)).await.expect("a trusted cosign signature");
    assert_eq!(record.verified_by.as_deref(), Some("cosign-key (cosign)"));
    let error = engine.mount(request("moved", &other_pinned)).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::PermissionDenied, "{error}");
    assert_eq!(registry.blob_gets().get(&digest_of(&files(82)[0].1)), None, "refused before any weight");

    let inspection = engine.inspect(&pinned).await.unwrap();
    assert_eq!((inspection.signatures.cosign, inspection.signatures.trusted.as_deref()), (1, Some("cosign-key (cosign)")));
}

/// Referrers: an artifact whose manifest has a referrer of a type nobody
/// knows (pushed with the referrers tag scheme, as distribution 2.8 has no
/// referrers API) reaches the plugin with its type and annotations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn referrers_reach_the_plugin() {
    let Some(registry) = start_registry() else { return };
    let model = tempfile::tempdir().unwrap();
    write_tree(model.path(), &files(91));
    let pinned = push(&registry, model.path(), &registry.reference("models/referred:v1"));
    let digest = pinned.rsplit_once('@').unwrap().1.to_owned();
    let artifact = "application/vnd.example.unknown.v1+json";
    let blob = registry.put_blob("models/referred", b"{\"note\": \"hello\"}");
    let empty = registry.put_blob("models/referred", b"{}");
    let referrer = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": artifact,
        "config": { "mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2 },
        "layers": [{ "mediaType": artifact, "digest": blob, "size": 17 }],
        // Distribution 2.8 keeps a subject as given; only its digest matters here.
        "subject": { "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest, "size": 0 },
        "annotations": { "org.example.note": "hello" },
    })
    .to_string();
    let oci = "application/vnd.oci.image.manifest.v1+json";
    let referrer_digest = registry.put_manifest("models/referred", "referrer", oci, referrer.as_bytes());
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": oci,
            "digest": referrer_digest,
            "size": referrer.len(),
            "artifactType": artifact,
            "annotations": { "org.example.note": "hello" },
        }],
    })
    .to_string();
    registry.put_manifest(
        "models/referred",
        &digest.replace(':', "-"),
        "application/vnd.oci.image.index.v1+json",
        index.as_bytes(),
    );

    let plugins = PluginDir::new();
    plugins.add("hostile-policy", "reporter");
    plugins.configure("reporter", "decisions = [\"verify\"]\n[settings]\nverify-mode = \"report\"\n");
    let root = tempfile::tempdir().unwrap();
    let engine = engine(root.path(), &registry, plugins.path());
    let error = modelcache::plugins::error_chain(&engine.mount(request("referred", &pinned)).await.unwrap_err());
    assert!(error.contains(&format!("{artifact}{{org.example.note=hello}}")), "{error}");
}

/// The reference plugin's own cases pass in `plugins test`, through the
/// same runtime a node uses.
#[test]
fn verify_signatures_passes_its_cases() {
    let cases = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/verify-signatures/cases");
    let cache = tempfile::tempdir().unwrap();
    let output = support::modelcache()
        .args(["plugins", "test"])
        .arg(support::plugin_wasm("verify-signatures"))
        .arg(&cases)
        .arg("--cache-dir")
        .arg(cache.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success() && stdout.contains(" 0 failed"), "{stdout}{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.matches("\nPASS  ").count() >= 10, "{stdout}");
}
