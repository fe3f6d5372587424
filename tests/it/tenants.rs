//! Tenants: who asks travels with a mount, admission policy decides on it
//! before anything is asked of a registry, and plugins built against the
//! 0.1 WIT keep serving beside 0.2 ones.

use crate::support;

use modelcache::api::client::{Client, ClientError};
use modelcache::api::{MountBody, VolumeSocket, VolumeSocketBody};
use modelcache::error::ErrorKind;
use modelcache::plugins::admission::{AdmissionInput, AdmissionVerdict};
use modelcache::plugins::exclude::{Artifact, ExcludeInput, ExcludeOptions, ModelFile};
use modelcache::plugins::{CompiledCache, PluginHost, Runtime, RuntimeOptions};
use modelcache::registry::ModelRef;
use modelcache::volumes::VolumeRecord;
use modelcache_api::tenancy::Requester;
use support::{Daemon, PluginDir, bytes, publish, start_registry};

fn namespace(name: &str) -> Requester {
    Requester { namespace: Some(name.into()), pod: Some(format!("{name}-pod")), ..Requester::default() }
}

async fn mount_as(
    client: &Client,
    volume: &str,
    reference: &str,
    requester: Option<Requester>,
) -> Result<VolumeRecord, ClientError> {
    let body = MountBody { reference: reference.into(), wait_seconds: 120.0, requester, ..MountBody::default() };
    Ok(client.put(&format!("/v1/volumes/{volume}/default"), &body).await?.body)
}

fn refusal(result: Result<VolumeRecord, ClientError>) -> (ErrorKind, String) {
    match result {
        Err(ClientError::Api { error, .. }) => (error.kind, error.message),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

const ALLOWLIST_SETTINGS: &str = r#"
[settings.namespaces.research]
allow = ["HOST/models/*"]
[settings.namespaces.web]
allow = []
"#;

/// The reference admission policy on a real daemon: `research` mounts
/// `HOST/models/*` (and only that), `web` mounts nothing. A refused mount
/// leaves no record and asks the registry nothing; metrics count admissions
/// by the tenant the policy names. The policy's own cases pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespace_allowlist_decides_who_mounts_what() {
    let Some(registry) = start_registry() else { return };
    let (allowed, source) = publish(&registry, "models/llama:v1", &[("model.safetensors", bytes(61, 4096))]);
    let (elsewhere, _) = publish(&registry, "other/llama:v1", &[("model.safetensors", bytes(62, 4096))]);
    let plugins = PluginDir::new();
    plugins.add("namespace-allowlist", "namespace-allowlist");
    plugins.configure("namespace-allowlist", &ALLOWLIST_SETTINGS.replace("HOST", &registry.host()));
    let daemon =
        Daemon::start(&format!("plugin-dir = {:?}\n[registries]\ninsecure = [\"{}\"]\n", plugins.path(), registry.host()));
    let client = daemon.client();

    let record = mount_as(&client, "research-1", &allowed, Some(namespace("research"))).await.unwrap();
    assert_eq!(support::read_tree(&record.path), support::read_tree(source.path()));
    let requester = record.requester.expect("the record names who asked");
    assert_eq!((requester.namespace.as_deref(), requester.volume.as_deref()), (Some("research"), Some("research-1")));

    let asked = registry.requests_for("/v2/");
    let (kind, message) = refusal(mount_as(&client, "web-1", &allowed, Some(namespace("web"))).await);
    assert_eq!(kind, ErrorKind::PermissionDenied, "{message}");
    assert!(message.contains("namespace `web`") && message.contains(&allowed), "{message}");
    let (kind, message) = refusal(mount_as(&client, "research-2", &elsewhere, Some(namespace("research"))).await);
    assert_eq!(kind, ErrorKind::PermissionDenied, "{message}");
    assert!(message.contains("namespace `research`"), "{message}");
    let (kind, _) = refusal(mount_as(&client, "unlisted-1", &allowed, Some(namespace("unlisted"))).await);
    assert_eq!(kind, ErrorKind::PermissionDenied, "the default allows nothing");
    assert_eq!(registry.requests_for("/v2/"), asked, "a refused mount asks the registry nothing");
    for volume in ["web-1", "research-2", "unlisted-1"] {
        let status = client.get::<VolumeRecord>(&format!("/v1/volumes/{volume}/default")).await;
        assert!(
            matches!(status, Err(ClientError::Api { ref error, .. }) if error.kind == ErrorKind::NotFound),
            "{volume}: {status:?}"
        );
    }

    // The CLI states a requester the same way.
    let cli = support::modelcache()
        .args(["mount", &allowed, "--volume", "web-2", "--namespace", "web", "--socket"])
        .arg(&daemon.socket)
        .output()
        .unwrap();
    assert!(!cli.status.success());
    assert!(String::from_utf8_lossy(&cli.stderr).contains("namespace `web`"), "{}", String::from_utf8_lossy(&cli.stderr));

    let metrics = daemon.metrics();
    assert_eq!(metrics.get(r#"modelcache_admissions_total{tenant="research",outcome="admitted"}"#), Some(&1.0), "{metrics:?}");
    assert_eq!(metrics.get(r#"modelcache_admissions_total{tenant="other",outcome="refused"}"#), Some(&4.0), "{metrics:?}");
    assert!(!metrics.keys().any(|key| key.contains("tenant=\"web\"") || key.contains("unlisted")), "{metrics:?}");

    let cases = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/namespace-allowlist/cases");
    let cache = tempfile::tempdir().unwrap();
    let output = support::modelcache()
        .args(["plugins", "test"])
        .arg(support::plugin_wasm("namespace-allowlist"))
        .arg(&cases)
        .arg("--cache-dir")
        .arg(cache.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success() && stdout.contains(" 0 failed"), "{stdout}{}", String::from_utf8_lossy(&output.stderr));
}

const MAJOR_NINE: &str = r#"
(component
  (core module $m (func (export "f")))
  (core instance $i (instantiate $m))
  (func $f (canon lift (core func $i "f")))
  (instance $exports (export "decide" (func $f)))
  (export "modelcache:policy/admission@9.0.0" (instance $exports))
  (export "modelcache:policy/settings@9.0.0" (instance $exports))
)"#;

/// A plugin built against 0.1 and one built against 0.2 load from one
/// directory and both serve their decisions; `plugins ls` shows each one's
/// version; a plugin for 9.0.0 is refused, the reason naming the versions
/// this host serves.
#[test]
fn plugins_of_both_versions_serve_side_by_side() {
    let dir = PluginDir::new();
    dir.add("legacy-policy", "legacy");
    dir.configure("legacy", "[settings]\nskip-suffix = \".md\"\n");
    dir.add("namespace-allowlist", "allowlist");
    dir.configure("allowlist", "[settings.namespaces.research]\nallow = [\"**\"]\n");
    dir.add_wat("from-the-future", MAJOR_NINE);
    let runtime = Runtime::new(RuntimeOptions::default()).unwrap();
    let host = PluginHost::open(runtime, Some(CompiledCache::new(support::component_cache())), Some(dir.path().to_owned()));
    let set = host.current();
    let status = |name: &str| set.statuses().iter().find(|status| status.name == name).unwrap().clone();
    assert_eq!((status("legacy").loaded, status("legacy").policy_version.as_deref()), (true, Some("0.1.0")));
    assert_eq!((status("allowlist").loaded, status("allowlist").policy_version.as_deref()), (true, Some("0.2.0")));
    let future = status("from-the-future");
    let reason = future.error.unwrap();
    assert!(!future.loaded && reason.contains("9.0.0") && reason.contains("0.2.0") && reason.contains("0.1.0"), "{reason}");

    let file = |path: &str| ModelFile {
        path: path.into(),
        size: 1,
        media_type: "text/plain".into(),
        layer_digest: format!("sha256:{path}"),
    };
    let input = ExcludeInput {
        requester: namespace("research"),
        artifact: Artifact {
            reference: "r.local/m:1".into(),
            manifest_digest: "sha256:00".into(),
            annotations: Default::default(),
        },
        files: vec![file("README.md"), file("model.bin")],
        options: ExcludeOptions::default(),
    };
    let skips = set.exclude(input).unwrap().skips;
    assert_eq!(
        skips.iter().map(|skip| (skip.path.as_str(), skip.plugin.as_str())).collect::<Vec<_>>(),
        [("README.md", "legacy")]
    );
    let ask = |who: &str| {
        let input = AdmissionInput {
            requester: namespace(who),
            reference: ModelRef::parse("r.local/models/m:1").unwrap(),
            options: ExcludeOptions::default(),
        };
        set.admission(&input).verdict
    };
    assert!(matches!(ask("research"), AdmissionVerdict::Admit(_)));
    assert!(matches!(ask("web"), AdmissionVerdict::Deny { plugin: Some(ref plugin), .. } if plugin == "allowlist"));

    let listed = support::modelcache().args(["plugins", "ls", "--dir"]).arg(dir.path()).output().unwrap();
    let table = String::from_utf8_lossy(&listed.stdout);
    let row = |name: &str| table.lines().find(|line| line.starts_with(name)).unwrap_or_default().to_owned();
    assert!(row("legacy").contains(" 0.1.0 ") && row("allowlist").contains(" 0.2.0 "), "{table}");
    assert!(row("from-the-future").contains("refused"), "{table}");
}

/// A volume socket speaks for the requester it was made for: its mounts
/// carry that identity, and one that claims another is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_socket_cannot_claim_another_requester() {
    let Some(registry) = start_registry() else { return };
    let (reference, _source) = publish(&registry, "models/bound:v1", &[("a.bin", bytes(63, 1024))]);
    let daemon = Daemon::start(&format!("[registries]\ninsecure = [\"{}\"]\n", registry.host()));
    let admin = daemon.client();
    let body = VolumeSocketBody { volume: "pod-a".into(), requester: Some(namespace("team-a")) };
    let socket: VolumeSocket = admin.post("/v1/volume-sockets", &body).await.unwrap().body;
    let bound = Client::new(&socket.path);

    let (kind, message) = refusal(mount_as(&bound, "pod-a", &reference, Some(namespace("team-b"))).await);
    assert_eq!(kind, ErrorKind::PermissionDenied, "{message}");
    assert!(message.contains("another requester"), "{message}");
    let record = mount_as(&bound, "pod-a", &reference, None).await.unwrap();
    let requester = record.requester.unwrap();
    assert_eq!((requester.namespace.as_deref(), requester.volume.as_deref()), (Some("team-a"), Some("pod-a")));

    let other = VolumeSocketBody { volume: "pod-a".into(), requester: Some(namespace("team-b")) };
    let error = admin.post::<_, VolumeSocket>("/v1/volume-sockets", &other).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Conflict, "{error}");
    // Without a namespace a socket's mounts would pass for the operator's.
    let nobody = VolumeSocketBody { volume: "pod-c".into(), requester: None };
    let error = admin.post::<_, VolumeSocket>("/v1/volume-sockets", &nobody).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::InvalidArgument, "{error}");
}
