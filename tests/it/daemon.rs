//! The daemon end to end: the real `modelcache serve` process, its API on a
//! unix socket, the real loopback registry (and a mirror), metrics, hot
//! reload, volume-bound sockets, SIGTERM mid-pull, and the CLI through it.

use crate::support;

use std::time::{Duration, Instant};

use modelcache::api::client::{Client, ClientError};
use modelcache::api::{MountBody, VolumeSocket, VolumeSocketBody};
use modelcache::error::ErrorKind;
use modelcache::plugins::PluginStatus;
use modelcache::volumes::{Origin, VolumeRecord, VolumeState};
use support::{
    BlobAnswer, Daemon, HostileBlobProxy, PluginDir, Registry, TestAuthority, basic_auth, bytes, digest_of, htpasswd, publish,
    push, push_as, read_tree, skipping, start_registry, write_docker_config, write_tree,
};

const MIB: usize = 1 << 20;

fn mount_body(reference: &str, wait_seconds: f64) -> MountBody {
    MountBody { reference: reference.into(), wait_seconds, ..MountBody::default() }
}

async fn mount(client: &Client, volume: &str, reference: &str) -> Result<VolumeRecord, ClientError> {
    Ok(client.put::<_, VolumeRecord>(&format!("/v1/volumes/{volume}/default"), &mount_body(reference, 120.0)).await?.body)
}

fn model(seed: u64) -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("model.safetensors", bytes(seed, 4 * MIB)),
        ("config.json", format!("{{\"seed\": {seed}}}").into_bytes()),
        ("tokenizer/vocab.txt", bytes(seed + 1, 8192)),
        ("README.md", b"# model\n".to_vec()),
    ]
}

/// 32 concurrent mount requests for one model through the API download each
/// blob once; the metrics say so.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_mounts_through_the_api() {
    let Some(registry) = start_registry() else { return };
    let files = model(1);
    let (reference, source) = publish(&registry, "models/api:v1", &files);
    let plugins = PluginDir::reference();
    let daemon =
        Daemon::start(&format!("plugin-dir = {:?}\n[registries]\ninsecure = [\"{}\"]\n", plugins.path(), registry.host()));
    let client = daemon.client();

    let tasks: Vec<_> = (0..32)
        .map(|index| {
            let (client, reference) = (client.clone(), reference.clone());
            tokio::spawn(async move { mount(&client, &format!("pod-{index}"), &reference).await })
        })
        .collect();
    let expected = read_tree(source.path());
    for task in tasks {
        let record = task.await.unwrap().expect("every mount succeeds");
        assert_eq!(record.state(), VolumeState::Ready);
        assert_eq!(read_tree(&record.path), expected);
    }
    let gets = registry.blob_gets();
    for (_, content) in &files {
        assert_eq!(gets.get(&digest_of(content)), Some(&1));
    }
    let records: Vec<VolumeRecord> = client.get("/v1/volumes").await.unwrap();
    assert_eq!(records.len(), 32);

    let metrics = daemon.metrics();
    let value = |name: &str| metrics.get(name).copied().unwrap_or_else(|| panic!("no {name} in {metrics:?}"));
    assert_eq!(value("modelcache_pulls_started_total"), 1.0);
    assert_eq!(value("modelcache_pulls_succeeded_total"), 1.0);
    assert_eq!(
        value("modelcache_cache_misses_total")
            + value("modelcache_coalesced_waiters_total")
            + value("modelcache_cache_hits_total"),
        32.0
    );
    assert_eq!(value("modelcache_cache_misses_total"), 1.0);
    let model_bytes: usize = files.iter().map(|(_, content)| content.len()).sum();
    assert_eq!(value("modelcache_downloaded_bytes_total"), model_bytes as f64);
    assert_eq!(value("modelcache_linked_files_total{method=\"hardlink\"}"), (32 * files.len()) as f64);
    // One exclude decision for the herd, shared or remembered.
    assert_eq!(value("modelcache_plugin_calls_total{plugin=\"exclude-patterns\",decision=\"exclude\"}"), 1.0);
    assert_eq!(value("modelcache_plugin_call_seconds_count{plugin=\"exclude-patterns\",decision=\"exclude\"}"), 1.0);
    assert!(value("modelcache_store_bytes") >= model_bytes as f64);
    assert_eq!(value("modelcache_reserved_bytes"), 0.0);

    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&daemon.socket).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "the main socket is private by default");
}

/// A socket bound to one volume refuses anything about another volume and
/// anything about the cache as a whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_sockets_are_bound_to_their_volume() {
    let Some(registry) = start_registry() else { return };
    let (reference, _source) = publish(&registry, "models/bound:v1", &model(2));
    let daemon = Daemon::start(&format!("[registries]\ninsecure = [\"{}\"]\n", registry.host()));
    let admin = daemon.client();
    mount(&admin, "pod-b", &reference).await.unwrap();
    let socket: VolumeSocket = admin
        .post("/v1/volume-sockets", &VolumeSocketBody { volume: "pod-a".into(), requester: Some(pod_requester()) })
        .await
        .unwrap()
        .body;
    let bound = Client::new(&socket.path);

    assert_eq!(mount(&bound, "pod-a", &reference).await.unwrap().state(), VolumeState::Ready);
    let _: VolumeRecord = bound.get("/v1/volumes/pod-a/default").await.unwrap();
    let listed: Vec<VolumeRecord> = bound.get("/v1/volumes").await.unwrap();
    assert_eq!(listed.iter().map(|record| record.volume.as_str()).collect::<Vec<_>>(), ["pod-a"]);

    let refused = |result: Result<(), ClientError>| match result {
        Err(ClientError::Api { status, error }) => {
            assert_eq!(status.as_u16(), 403);
            assert_eq!(error.kind, ErrorKind::PermissionDenied);
        }
        other => panic!("expected a refusal, got {other:?}"),
    };
    refused(bound.get::<VolumeRecord>("/v1/volumes/pod-b/default").await.map(drop));
    refused(mount(&bound, "pod-b", &reference).await.map(drop));
    refused(bound.delete::<VolumeRecord>("/v1/volumes/pod-b/default").await.map(drop));
    refused(bound.post::<_, serde_json::Value>("/v1/gc", &serde_json::json!({})).await.map(drop));
    refused(bound.get::<serde_json::Value>("/v1/plugins").await.map(drop));
    refused(
        bound
            .post::<_, serde_json::Value>("/v1/volume-sockets", &VolumeSocketBody { volume: "pod-b".into(), requester: None })
            .await
            .map(drop),
    );
    refused(bound.get::<serde_json::Value>("/v1/du").await.map(drop));
    let _: serde_json::Value = bound.get("/v1/health").await.unwrap();

    // `_` names the socket's own volume, and nothing else.
    let own: VolumeRecord = bound.get("/v1/volumes/_/default").await.unwrap();
    assert_eq!(own.volume.as_str(), "pod-a");
    let admin_own = admin.get::<VolumeRecord>("/v1/volumes/_/default").await.unwrap_err();
    assert_eq!(admin_own.kind(), ErrorKind::NotFound, "on the admin socket `_` is just an id");

    // pod-b is untouched; pod-a can be released through its own socket.
    let b: VolumeRecord = admin.get("/v1/volumes/pod-b/default").await.unwrap();
    assert_eq!(b.state(), VolumeState::Ready);
    let released: VolumeRecord = bound.delete("/v1/volumes/pod-a/default").await.unwrap();
    assert_eq!(released.state(), VolumeState::Released);
}

/// A volume socket lives in a directory of its own (the CSI shim
/// bind-mounts it into the pod), holds its volume's tree directory against
/// GC while open, and is opened again at the same place when the daemon
/// restarts; closing it lets the directory go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_sockets_hold_their_volume_and_outlive_a_restart() {
    let mut daemon = Daemon::start("");
    let admin = daemon.client();
    let body = VolumeSocketBody { volume: "pod-c".into(), requester: Some(pod_requester()) };
    let socket: VolumeSocket = admin.post("/v1/volume-sockets", &body).await.unwrap().body;
    assert!(socket.path.ends_with("pod-c/api.sock"), "{}", socket.path.display());
    assert!(socket.trees.is_dir() && socket.trees.ends_with("pod-c"), "{}", socket.trees.display());
    let _: serde_json::Value = admin.post("/v1/gc", &serde_json::json!({})).await.unwrap().body;
    assert!(socket.trees.is_dir(), "GC pruned a held volume's empty directory");

    use std::os::unix::fs::MetadataExt as _;
    let inode = std::fs::metadata(&socket.trees).unwrap().ino();
    daemon.terminate();
    // GC with the daemon down (the CLI's own engine) keeps it too.
    let offline = support::modelcache().args(["gc", "--root"]).arg(&daemon.root).output().unwrap();
    assert!(offline.status.success(), "{}", String::from_utf8_lossy(&offline.stderr));
    assert_eq!(std::fs::metadata(&socket.trees).unwrap().ino(), inode, "pruned while the daemon was down");
    daemon.spawn();
    // The main API answers only once the volume sockets are open again.
    let _: serde_json::Value = admin.get("/v1/health").await.unwrap();
    let health: serde_json::Value = Client::new(&socket.path).get("/v1/health").await.unwrap();
    assert_eq!(health["status"], "ok", "the socket is served again at the same place");
    let _: serde_json::Value = admin.post("/v1/gc", &serde_json::json!({})).await.unwrap().body;
    assert_eq!(std::fs::metadata(&socket.trees).unwrap().ino(), inode, "still the same directory after the restart");

    let _: VolumeSocket = admin.delete("/v1/volume-sockets/pod-c").await.unwrap();
    assert!(!socket.path.exists() && !socket.path.parent().unwrap().exists(), "the socket's files go");
    let _: serde_json::Value = admin.post("/v1/gc", &serde_json::json!({})).await.unwrap().body;
    assert!(!socket.trees.exists(), "an unheld empty directory is pruned");
}

async fn plugin_status(client: &Client, name: &str) -> PluginStatus {
    let statuses: Vec<PluginStatus> = client.get("/v1/plugins").await.unwrap();
    statuses.into_iter().find(|status| status.name == name).expect("the plugin is listed")
}

async fn wait_until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < Duration::from_secs(60), "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The plugin directory is watched: a changed plugin is swapped in; a
/// broken one leaves the last good version serving, with the error shown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_reload_when_their_directory_changes() {
    let plugins = PluginDir::reference();
    let daemon = Daemon::start(&format!("plugin-dir = {:?}\n", plugins.path()));
    let client = daemon.client();
    let first = plugin_status(&client, "exclude-patterns").await;
    assert!(first.loaded);

    plugins.configure("exclude-patterns", "decisions = [\"exclude\"]\n");
    plugins.add("hostile-policy", "exclude-patterns");
    wait_until("the new version serves", || async {
        let status = plugin_status(&client, "exclude-patterns").await;
        status.loaded && status.sha256 != first.sha256 && status.error.is_none()
    })
    .await;
    let second = plugin_status(&client, "exclude-patterns").await;

    std::fs::write(plugins.path().join("exclude-patterns.wasm"), b"not wasm at all").unwrap();
    wait_until("the broken version is reported", || async { plugin_status(&client, "exclude-patterns").await.error.is_some() })
        .await;
    let broken = plugin_status(&client, "exclude-patterns").await;
    assert!(broken.loaded, "the last good version keeps serving");
    assert_eq!(broken.sha256, second.sha256);
    assert!(broken.error.unwrap().contains("not a WebAssembly component"));
    assert!(plugin_status(&client, "quota-watermark").await.loaded);
}

/// A quota plugin asleep in WASI holds the admission lock no longer than
/// its deadline: a concurrent cold pull of another model is admitted within
/// a few deadlines, and the sleeper's own pull is denied as a timeout (quota
/// fails closed) instead of waiting out the 30 s sleep.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sleeping_quota_plugin_does_not_hold_up_other_pulls() {
    let Some(registry) = start_registry() else { return };
    let (sleepy, _) = publish(&registry, "models/sleepy:v1", &model(11));
    let (other, other_source) = publish(&registry, "models/other:v1", &model(12));
    let plugins = PluginDir::new();
    plugins.add("hostile-policy", "sleeper");
    plugins.configure(
        "sleeper",
        "decisions = [\"quota\"]\ntimeout-ms = 500\n[settings]\nmode = \"sleep\"\nonly-reference = \"models/sleepy\"\n",
    );
    let daemon =
        Daemon::start(&format!("plugin-dir = {:?}\n[registries]\ninsecure = [\"{}\"]\n", plugins.path(), registry.host()));
    let client = daemon.client();

    let started = Instant::now();
    let sleeping = {
        let (client, sleepy) = (client.clone(), sleepy.clone());
        tokio::spawn(async move { (mount(&client, "sleepy", &sleepy).await, started.elapsed()) })
    };
    // Long enough for the sleepy pull to resolve and enter its quota call.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let asked = Instant::now();
    let record = mount(&client, "other", &other).await.expect("the other model is admitted");
    let waited = asked.elapsed();
    assert_eq!(read_tree(&record.path), read_tree(other_source.path()));
    assert!(waited < Duration::from_millis(2500), "the other pull took {waited:?} behind a 500 ms deadline");

    let (denied, elapsed) = sleeping.await.unwrap();
    let error = denied.expect_err("a timed-out quota plugin denies");
    assert_eq!(error.kind(), ErrorKind::QuotaDenied, "{error}");
    assert!(error.to_string().contains("sleeper") && error.to_string().contains("timeout"), "{error}");
    assert!(elapsed < Duration::from_millis(2500), "the sleepy pull took {elapsed:?} under a 500 ms deadline");
}

/// A status request may wait for a mount under way (a long poll): it is
/// answered when the mount ends, with the finished record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_long_polls_until_the_mount_ends() {
    let Some(registry) = start_registry() else { return };
    let files = vec![("big.safetensors", bytes(4, 128 * MIB)), ("config.json", b"{}".to_vec())];
    let (reference, source) = publish(&registry, "models/watched:v1", &files);
    let daemon = Daemon::start(&format!("[registries]\ninsecure = [\"{}\"]\n", registry.host()));
    let client = daemon.client();
    let answer = client.put::<_, VolumeRecord>("/v1/volumes/pod/default", &mount_body(&reference, 0.0)).await.unwrap();
    assert_eq!(answer.status.as_u16(), 202);
    let at_once: VolumeRecord = client.get("/v1/volumes/pod/default").await.unwrap();
    assert_eq!(at_once.state(), VolumeState::Pulling, "without a wait the status answers at once");

    let record: VolumeRecord = client.get("/v1/volumes/pod/default?wait-seconds=120").await.unwrap();
    assert_eq!(record.state(), VolumeState::Ready);
    assert_eq!(read_tree(&record.path), read_tree(source.path()));
}

/// SIGTERM mid-pull cancels cleanly: no temporaries, the record says
/// cancelled, and the next start needs no repair; asking again succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_pull_leaves_a_clean_store() {
    let Some(registry) = start_registry() else { return };
    let files = vec![("big.safetensors", bytes(3, 256 * MIB)), ("config.json", b"{}".to_vec())];
    let (reference, source) = publish(&registry, "models/shutdown:v1", &files);
    let mut daemon =
        Daemon::start(&format!("[registries]\ninsecure = [\"{}\"]\n[shutdown]\ntimeout = \"0s\"\n", registry.host()));
    let client = daemon.client();
    let answer = client.put::<_, VolumeRecord>("/v1/volumes/pod/default", &mount_body(&reference, 0.0)).await.unwrap();
    assert_eq!(answer.status.as_u16(), 202);
    wait_until("the pull is under way", || async {
        let record: VolumeRecord = client.get("/v1/volumes/pod/default").await.unwrap();
        record.bytes_done > 0
    })
    .await;
    let status = daemon.terminate();
    assert!(status.success(), "a clean exit: {status}");
    assert!(!daemon.socket.exists(), "the socket is removed");
    assert!(std::fs::read_dir(daemon.root.join("tmp")).unwrap().next().is_none(), "no temporaries left");
    let record: VolumeRecord =
        serde_json::from_slice(&std::fs::read(daemon.root.join("records/pod/default.json")).unwrap()).unwrap();
    assert_eq!(record.state(), VolumeState::Failed);
    assert_eq!(record.error().unwrap().kind, ErrorKind::Cancelled);

    daemon.spawn();
    let opened = daemon.log_text();
    let line = opened.lines().rev().find(|line| line.contains("engine open")).expect("the start is logged");
    assert!(
        line.contains("temporaries=0") && line.contains("incomplete_entries=0") && line.contains("failed_records=0"),
        "the second start needs no repair: {line}"
    );
    let record = mount(&daemon.client(), "pod", &reference).await.unwrap();
    assert_eq!(read_tree(&record.path), read_tree(source.path()));
}

/// A mirror serves what it holds; the origin sees only what it lacks; with
/// the mirror down the origin serves everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrors_serve_before_the_origin() {
    let Some(origin) = start_registry() else { return };
    let Some(mirror) = Registry::start() else { return };
    let files = model(4);
    let dir = tempfile::tempdir().unwrap();
    write_tree(dir.path(), &files);
    push(&origin, dir.path(), &origin.reference("models/mirrored:v1"));
    push(&mirror, dir.path(), &mirror.reference("models/mirrored:v1"));
    let missing = digest_of(&files[0].1);
    mirror.delete(&format!("models/mirrored/blobs/{missing}"));
    let (other, _other_source) = publish(&origin, "models/origin-only:v1", &model(5));
    let origin_manifests = origin.requests_for("/manifests/");

    let daemon = Daemon::start(&format!(
        "[registries]\ninsecure = [\"{origin}\"]\n[registries.mirrors.\"{origin}\"]\nendpoints = [\"http://{mirror}\"]\n",
        origin = origin.host(),
        mirror = mirror.host(),
    ));
    let client = daemon.client();
    let record = mount(&client, "pod", &origin.reference("models/mirrored:v1")).await.unwrap();
    assert_eq!(read_tree(&record.path), read_tree(dir.path()));
    assert_eq!(origin.requests_for("/manifests/"), origin_manifests, "the mirror resolved the tag and served the manifest");
    let at_origin = origin.blob_gets();
    let at_mirror = mirror.blob_gets();
    for (path, content) in &files {
        let digest = digest_of(content);
        if digest == missing {
            assert_eq!(at_origin.get(&digest), Some(&1), "{path}: the origin serves what the mirror lacks");
        } else {
            assert_eq!(at_origin.get(&digest), None, "{path}: the origin is not asked");
            assert_eq!(at_mirror.get(&digest), Some(&1), "{path}: the mirror serves it");
        }
    }

    drop(mirror);
    let record = mount(&client, "pod-2", &other).await.unwrap();
    assert_eq!(record.state(), VolumeState::Ready);
    let cached: Vec<String> = files.iter().map(|(_, content)| digest_of(content)).collect();
    for (path, content) in model(5) {
        let digest = digest_of(&content);
        if !cached.contains(&digest) {
            assert_eq!(origin.blob_gets().get(&digest), Some(&1), "{path}: with the mirror down, the origin serves");
        }
    }
}

/// A pod's identity, for volume sockets.
fn pod_requester() -> modelcache_api::tenancy::Requester {
    modelcache_api::tenancy::Requester { namespace: Some("default".into()), ..Default::default() }
}

/// A registry that wants a password, and a pusher who knows the current one.
struct Guarded {
    registry: Registry,
    pusher: tempfile::TempDir,
}

impl Guarded {
    fn start(password: &str) -> Option<Guarded> {
        let Some(registry) = Registry::start_with_htpasswd(&htpasswd("alice", password)) else {
            skipping("docker-registry is not installed (apt-get install docker-registry)");
            return None;
        };
        let pusher = tempfile::tempdir().unwrap();
        write_docker_config(pusher.path(), &basic_auth(&registry.host(), "alice", password));
        Some(Guarded { registry, pusher })
    }

    fn rotate(&self, password: &str) {
        self.registry.set_htpasswd(&htpasswd("alice", password));
        write_docker_config(self.pusher.path(), &basic_auth(&self.registry.host(), "alice", password));
    }

    fn publish(&self, name: &str, seed: u64) -> (String, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        write_tree(dir.path(), &model(seed));
        let reference = self.registry.reference(name);
        push_as(&self.registry, dir.path(), &reference, Some(self.pusher.path()));
        (reference, dir)
    }
}

/// A rotated secret is used from the next request on, without a restart:
/// the daemon notices its docker config changed (a Kubernetes-style symlink
/// swap) and starts a new session; before that, the refusal names the model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_credentials_are_used_without_a_restart() {
    let Some(guarded) = Guarded::start("first") else { return };
    let host = guarded.registry.host();
    let secret = tempfile::tempdir().unwrap();
    write_docker_config(secret.path(), &basic_auth(&host, "alice", "first"));
    let daemon = Daemon::start(&format!("[registries]\ninsecure = [\"{host}\"]\ndocker-config = {:?}\n", secret.path()));
    let client = daemon.client();
    let (first, first_source) = guarded.publish("models/first:v1", 11);
    let record = mount(&client, "pod-1", &first).await.expect("the password in the secret is admitted");
    assert_eq!(read_tree(&record.path), read_tree(first_source.path()));

    guarded.rotate("second");
    let (second, second_source) = guarded.publish("models/second:v1", 12);
    match mount(&client, "pod-2", &second).await {
        Err(ClientError::Api { error, .. }) => {
            assert_eq!(error.kind, ErrorKind::PermissionDenied);
            assert!(error.message.contains(&second) && error.message.contains("refused"), "{}", error.message);
        }
        other => panic!("the old password should be refused, got {other:?}"),
    }

    write_docker_config(secret.path(), &basic_auth(&host, "alice", "second"));
    let record = mount(&client, "pod-3", &second).await.expect("the rotated secret is used without a restart");
    assert_eq!(read_tree(&record.path), read_tree(second_source.path()));
    // Seen because the file changed: a refused password from a file is not
    // worth asking again about while the file stays the same.
    assert!(daemon.log_text().contains("registry credentials changed"), "{}", daemon.log_text());
    assert!(!daemon.log_text().contains("asking the credential helper again"), "{}", daemon.log_text());

    // A secret that no longer parses keeps the last good credentials.
    std::fs::write(secret.path().join("..data/config.json"), "{ half-written").unwrap();
    let (third, _) = guarded.publish("models/third:v1", 13);
    assert_eq!(mount(&client, "pod-4", &third).await.unwrap().state(), VolumeState::Ready);
    assert!(daemon.log_text().contains("the credentials read before stay in use"), "{}", daemon.log_text());
}

/// Credentials from a helper (`credHelpers`) are asked for once per host,
/// not once per blob; when the registry then refuses them (the helper's
/// token expired) the helper is asked again and the pull goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_helper_token_is_asked_for_again() {
    let Some(guarded) = Guarded::start("token-1") else { return };
    let host = guarded.registry.host();
    let helper = tempfile::tempdir().unwrap();
    let (token, asked) = (helper.path().join("token"), helper.path().join("asked"));
    std::fs::write(&token, "token-1").unwrap();
    let script = helper.path().join("docker-credential-rotating");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nread host\necho \"$host\" >> {asked:?}\nprintf '{{\"Username\":\"alice\",\"Secret\":\"%s\"}}' \"$(cat {token:?})\"\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let config = tempfile::tempdir().unwrap();
    write_docker_config(config.path(), &serde_json::json!({ "credHelpers": { host.clone(): "rotating" } }));
    let path = std::env::join_paths(
        std::iter::once(helper.path().to_owned()).chain(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())),
    )
    .unwrap();
    let daemon = Daemon::start_with_env(
        &format!("[registries]\ninsecure = [\"{host}\"]\ndocker-config = {:?}\n", config.path()),
        vec![("PATH".into(), path)],
    );
    let client = daemon.client();
    let asked_times = || std::fs::read_to_string(&asked).unwrap_or_default().lines().count();

    let (first, first_source) = guarded.publish("models/first:v1", 21);
    let record = mount(&client, "pod-1", &first).await.expect("the helper's token is admitted");
    assert_eq!(read_tree(&record.path), read_tree(first_source.path()));
    assert_eq!(asked_times(), 1, "one question for a tag, a manifest and {} blobs", model(21).len());
    assert_eq!(std::fs::read_to_string(&asked).unwrap().trim(), host);

    guarded.rotate("token-2");
    std::fs::write(&token, "token-2").unwrap();
    let (second, second_source) = guarded.publish("models/second:v1", 22);
    let record = mount(&client, "pod-2", &second).await.expect("a refused token is asked for again");
    assert_eq!(read_tree(&record.path), read_tree(second_source.path()));
    assert_eq!(asked_times(), 2);
    assert!(daemon.log_text().contains("asking the credential helper again"), "{}", daemon.log_text());
}

/// A registry whose certificate a private CA signed: with that CA in
/// `[registries] ca-certificates` the daemon mounts from it over HTTPS;
/// without it a mount fails at once (no retries), saying what to add, and as
/// a mirror it is passed over with a warning; a CA file with no certificate
/// in it is refused, naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_ca_is_trusted_when_configured() {
    let dir = tempfile::tempdir().unwrap();
    let Some(tls) = TestAuthority::make(dir.path()) else { return };
    let Some(registry) = Registry::start_with_tls(&tls) else {
        skipping("docker-registry is not installed (apt-get install docker-registry)");
        return;
    };
    let source = tempfile::tempdir().unwrap();
    write_tree(source.path(), &model(31));
    let reference = registry.reference("models/private:v1");
    let pushed = support::modelcache()
        .arg("push")
        .arg(source.path())
        .arg(&reference)
        .arg("--ca-certificate")
        .arg(&tls.authority)
        .output()
        .unwrap();
    assert!(pushed.status.success(), "{}", String::from_utf8_lossy(&pushed.stderr));

    let daemon = Daemon::start(&format!("[registries]\nca-certificates = [{:?}]\n", tls.authority));
    let record = mount(&daemon.client(), "pod-1", &reference).await.expect("the configured CA is trusted");
    assert_eq!(read_tree(&record.path), read_tree(source.path()));

    // The engine in the CLI (no daemon answers on that socket), without the CA.
    let in_process = |extra: &[&std::ffi::OsStr]| {
        let root = tempfile::tempdir().unwrap();
        let output = support::modelcache()
            .args(["mount", &reference, "--volume", "pod-2", "--socket"])
            .arg(dir.path().join("nobody.sock"))
            .arg("--root")
            .arg(root.path())
            .args(extra)
            .output()
            .unwrap();
        assert!(!output.status.success());
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    let refused = in_process(&[]);
    assert!(refused.contains("TLS certificate is not accepted") && refused.contains("ca-certificates"), "{refused}");
    assert!(!refused.contains("retrying"), "a certificate is not worth asking again about: {refused}");

    std::fs::write(dir.path().join("empty.pem"), "not a certificate\n").unwrap();
    let empty = dir.path().join("empty.pem");
    let refused = in_process(&["--ca-certificate".as_ref(), empty.as_os_str()]);
    assert!(refused.contains("empty.pem") && refused.contains("no PEM certificate"), "{refused}");

    // A mirror whose certificate is not accepted is passed over, loudly: the
    // origin serves.
    let Some(origin) = start_registry() else { return };
    let (at_origin, origin_source) = publish(&origin, "models/behind-a-mirror:v1", &model(32));
    let daemon = Daemon::start(&format!(
        "[registries]\ninsecure = [\"{origin}\"]\n[registries.mirrors.\"{origin}\"]\nendpoints = [\"https://{mirror}\"]\n",
        origin = origin.host(),
        mirror = registry.host(),
    ));
    let record = mount(&daemon.client(), "pod-3", &at_origin).await.expect("the origin serves");
    assert_eq!(read_tree(&record.path), read_tree(origin_source.path()));
    assert!(daemon.log_text().contains("mirror skipped") && daemon.log_text().contains("UnknownIssuer"), "{}", daemon.log_text());
}

fn cli(daemon: &Daemon, args: &[&str]) -> std::process::Output {
    let mut child = support::modelcache()
        .args(args)
        .arg("--socket")
        .arg(&daemon.socket)
        // A root the daemon does not use: the commands must not fall back to it.
        .arg("--root")
        .arg(daemon.dir.path().join("not-the-root"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        assert!(started.elapsed() < Duration::from_secs(120), "{args:?} hung");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// The CLI talks to the daemon when one serves the socket.
#[test]
fn the_cli_goes_through_the_daemon() {
    let Some(registry) = start_registry() else { return };
    let files = model(6);
    let (reference, source) = publish(&registry, "models/cli:v1", &files);
    let plugins = PluginDir::reference();
    let daemon =
        Daemon::start(&format!("plugin-dir = {:?}\n[registries]\ninsecure = [\"{}\"]\n", plugins.path(), registry.host()));
    let run = |args: &[&str]| {
        let output = cli(&daemon, args);
        assert!(output.status.success(), "{args:?}: {}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8(output.stdout).unwrap()
    };
    let prefetched: serde_json::Value = serde_json::from_str(&run(&["prefetch", &reference, "--pin", "--json"])).unwrap();
    assert_eq!(prefetched["state"], "ready");
    assert_eq!(prefetched["pinned"], true);
    assert!(run(&["pin"]).contains(&reference));

    let record: VolumeRecord = serde_json::from_str(&run(&["mount", &reference, "--volume", "cli", "--json"])).unwrap();
    assert_eq!(record.origin, Some(Origin::Cached), "prefetched before");
    assert!(record.path.starts_with(&daemon.root));
    assert_eq!(read_tree(&record.path), read_tree(source.path()));
    let listed: Vec<VolumeRecord> = serde_json::from_str(&run(&["ls", "--json"])).unwrap();
    assert_eq!(listed.len(), 1);
    let status: VolumeRecord = serde_json::from_str(&run(&["status", "--volume", "cli", "--json"])).unwrap();
    assert_eq!(status.state(), VolumeState::Ready);
    let plugins_listed: Vec<PluginStatus> = serde_json::from_str(&run(&["plugins", "ls", "--json"])).unwrap();
    assert_eq!(plugins_listed.len(), 3);
    let report: serde_json::Value = serde_json::from_str(&run(&["gc", "--dry-run", "--json"])).unwrap();
    assert_eq!(report["dry-run"], true);
    assert_eq!(report["candidates"], 0, "pinned and referenced: nothing to offer");
    let inspected: serde_json::Value = serde_json::from_str(&run(&["inspect", &reference, "--json"])).unwrap();
    assert_eq!(inspected["layers"].as_array().unwrap().len(), files.len());
    let health = support::modelcache().arg("health").arg("--socket").arg(&daemon.socket).output().unwrap();
    assert!(health.status.success() && String::from_utf8_lossy(&health.stdout).starts_with("ok"));
    run(&["unmount", "--volume", "cli"]);
    run(&["unpin", &reference]);
    assert!(!daemon.dir.path().join("not-the-root").exists(), "nothing ran on the local root");
    let unhealthy = support::modelcache().arg("health").arg("--socket").arg(daemon.dir.path().join("no.sock")).output().unwrap();
    assert!(!unhealthy.status.success());

    let output = cli(&daemon, &["mount", "registry.invalid:1/none:v1", "--volume", "bad"]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("unavailable"), "{}", String::from_utf8_lossy(&output.stderr));
}

/// A bad configuration fails at start, naming the key and the reason.
#[test]
fn bad_config_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "[gc]\ninterval = \"whenever\"\n").unwrap();
    let output = support::modelcache().args(["serve", "--config"]).arg(&config).output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("gc.interval") && stderr.contains("whenever"), "{stderr}");
    std::fs::write(&config, "[api]\nsockett = \"/tmp/x\"\n").unwrap();
    let output = support::modelcache().args(["serve", "--config"]).arg(&config).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && stderr.contains("sockett"), "{stderr}");
}

/// A registry that trickles one blob (2 KiB/s) fails that pull within a few
/// stall limits, with an error naming the blob, the host and both rates, and
/// leaves no temporaries; meanwhile a mount from a healthy registry gets the
/// node's only download slot, given back between attempts, and completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trickling_registry_is_cut_off_while_others_pull() {
    let Some(registry) = start_registry() else { return };
    let slow_files = model(41);
    let (slow, _slow_source) = publish(&registry, "models/trickled:v1", &slow_files);
    let (healthy, healthy_source) = publish(&registry, "models/healthy:v1", &model(43));
    let trickled = digest_of(&slow_files[0].1);
    let trickle = BlobAnswer::Trickle { bytes: 1024, every: Duration::from_millis(500) };
    let proxy = HostileBlobProxy::start(registry.port(), &trickled, trickle);
    let through_proxy = slow.replace(&registry.host(), &proxy.host());
    let daemon = Daemon::start(&format!(
        "[downloads]\nconcurrency = 1\n[registries]\ninsecure = [\"{}\", \"{}\"]\nstall-timeout = \"2s\"\nmin-rate = \"16KiB\"\n",
        registry.host(),
        proxy.host()
    ));
    let client = daemon.client();
    let started = Instant::now();
    let answer = client.put::<_, VolumeRecord>("/v1/volumes/slow/default", &mount_body(&through_proxy, 0.0)).await.unwrap();
    assert_eq!(answer.status.as_u16(), 202);
    wait_until("the trickled blob is asked for", || async { proxy.blob_gets.load(std::sync::atomic::Ordering::SeqCst) > 0 })
        .await;

    let record = client.put::<_, VolumeRecord>("/v1/volumes/healthy/default", &mount_body(&healthy, 30.0)).await.unwrap().body;
    assert_eq!(record.state(), VolumeState::Ready, "the healthy mount is not held up by the trickle: {record:?}");
    assert_eq!(read_tree(&record.path), read_tree(healthy_source.path()));
    let meanwhile: VolumeRecord = client.get("/v1/volumes/slow/default").await.unwrap();
    assert_eq!(meanwhile.state(), VolumeState::Pulling, "the healthy mount completed while the trickled one went on");

    let failed: VolumeRecord = client.get("/v1/volumes/slow/default?wait-seconds=60").await.unwrap();
    let elapsed = started.elapsed();
    assert_eq!(failed.state(), VolumeState::Failed);
    // 5 attempts of one 2 s window each, 3 s of backoff between them.
    assert!(elapsed < Duration::from_secs(20), "the trickle held on for {elapsed:?}");
    let error = failed.error().unwrap();
    assert_eq!(error.kind, ErrorKind::Unavailable);
    let message = &error.message;
    assert!(message.contains("too slow") && message.contains("below the floor of 16.0 KiB/s"), "{message}");
    assert!(message.contains(&trickled) && message.contains(&proxy.host()), "the blob and host are named: {message}");
    assert!(proxy.blob_gets.load(std::sync::atomic::Ordering::SeqCst) >= 2, "interrupted attempts were resumed");
    assert!(std::fs::read_dir(daemon.root.join("tmp")).unwrap().next().is_none(), "no temporaries left");
}

/// A registry that sends more of a blob than the manifest states, without
/// end, is cut off at once: the mount fails within seconds (not at the stall
/// limit), as data loss naming the blob and its size, with no retry, and
/// leaves no temporaries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_sending_past_the_size_is_cut_off() {
    let Some(registry) = start_registry() else { return };
    let files = model(45);
    let (reference, _source) = publish(&registry, "models/endless:v1", &files);
    let endless = digest_of(&files[0].1);
    let proxy = HostileBlobProxy::start(registry.port(), &endless, BlobAnswer::Endless);
    let through_proxy = reference.replace(&registry.host(), &proxy.host());
    let insecure = format!("insecure = [\"{}\", \"{}\"]", registry.host(), proxy.host());
    let daemon = Daemon::start(&format!("[registries]\n{insecure}\nstall-timeout = \"60s\"\n"));
    let client = daemon.client();
    let started = Instant::now();
    let answer = client.put::<_, VolumeRecord>("/v1/volumes/long/default", &mount_body(&through_proxy, 30.0)).await;
    let elapsed = started.elapsed();
    let Err(ClientError::Api { error, .. }) = answer else { panic!("the mount does not fail: {answer:?}") };
    assert!(elapsed < Duration::from_secs(10), "cut off after {elapsed:?}");
    assert_eq!(error.kind, ErrorKind::DataLoss);
    let size = files[0].1.len();
    assert!(error.message.contains(&endless) && error.message.contains(&format!("size of {size} bytes")), "{}", error.message);
    assert_eq!(proxy.blob_gets.load(std::sync::atomic::Ordering::SeqCst), 1, "not asked again");
    assert!(std::fs::read_dir(daemon.root.join("tmp")).unwrap().next().is_none(), "no temporaries left");
}

/// A request's exclude pattern that does not parse fails the mount with
/// InvalidArgument naming the pattern and the reason, before anything is
/// fetched or recorded: through the API (as the CSI node sends its volume
/// attributes), the CLI through the daemon and the CLI on its own, even
/// though the exclude plugin's fail mode is `open`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unparsable_exclude_pattern_fails_the_mount() {
    let Some(registry) = start_registry() else { return };
    let (reference, _source) = publish(&registry, "models/bad-pattern:v1", &model(41));
    let plugins = PluginDir::new();
    plugins.add("exclude-patterns", "exclude-patterns");
    plugins.configure("exclude-patterns", "[fail-mode]\nexclude = \"open\"\n");
    let daemon =
        Daemon::start(&format!("plugin-dir = {:?}\n[registries]\ninsecure = [\"{}\"]\n", plugins.path(), registry.host()));
    let client = daemon.client();

    let body = MountBody { patterns: vec!["*.md".into(), "weights/[0-9".into()], ..mount_body(&reference, 120.0) };
    let error = client.put::<_, VolumeRecord>("/v1/volumes/api/default", &body).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::InvalidArgument, "{error}");
    let message = error.to_string();
    assert!(message.contains("`weights/[0-9`") && message.contains("unclosed `[`"), "{message}");

    let through_daemon = support::modelcache()
        .args(["mount", &reference, "--volume", "cli", "--exclude", "*.safetensors", "--exclude", "a\\", "--socket"])
        .arg(&daemon.socket)
        .output()
        .unwrap();
    let local_root = tempfile::tempdir().unwrap();
    let local = support::modelcache()
        .args(["mount", &reference, "--volume", "local", "--exclude", "/", "--insecure-registry", &registry.host()])
        .args(["--plugins".as_ref(), plugins.path().as_os_str(), "--root".as_ref(), local_root.path().as_os_str()])
        .arg("--socket")
        .arg(local_root.path().join("no.sock"))
        .output()
        .unwrap();
    for (output, pattern, reason) in [(through_daemon, "`a\\`", "lone `\\`"), (local, "`/`", "matches nothing")] {
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(pattern) && stderr.contains(reason), "{stderr}");
    }

    assert!(registry.blob_gets().is_empty(), "nothing was fetched: {:?}", registry.blob_gets());
    let records: Vec<VolumeRecord> = client.get("/v1/volumes").await.unwrap();
    assert!(records.is_empty(), "nothing was recorded: {records:?}");
}
