//! The pull path against a real registry (Debian's docker-registry): one
//! download per blob however many mount, exclusion before fetching, two
//! selections of one digest, corrupt and hostile artifacts, cross-filesystem
//! volumes, quota reservations, crash recovery, and the CLI.

use crate::support;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use modelcache::engine::{Engine, EngineConfig, MountRequest};
use modelcache::error::ErrorKind;
use modelcache::link::LinkMethod;
use modelcache::plugins::exclude::ExcludeOptions;
use modelcache::registry::{ModelRef, Registry as Client, RegistryConfig};
use modelcache::volumes::{MountId, Origin, VolumeId, VolumeRecord, VolumeState};
use support::{PluginDir, Registry, Unmount, bytes, digest_of, mount_tmpfs, publish, read_tree, start_registry, tar_archive};

const MIB: usize = 1 << 20;

fn engine_with(root: &Path, insecure: &str, plugins: Option<&Path>, volumes: Option<&Path>) -> Arc<Engine> {
    Engine::open(config_with(root, insecure, plugins, volumes)).expect("engine")
}

fn config_with(root: &Path, insecure: &str, plugins: Option<&Path>, volumes: Option<&Path>) -> EngineConfig {
    let mut config = EngineConfig::new(root);
    config.registry = RegistryConfig { insecure: vec![insecure.to_owned()], ..RegistryConfig::default() };
    config.plugin_dir = plugins.map(Path::to_owned);
    config.volumes_dir = volumes.map(Path::to_owned);
    config
}

/// An engine that asks the registry what a tag names at every mount, once.
fn asking_engine(root: &Path, registry: &Registry) -> Arc<Engine> {
    let mut config = config_with(root, &registry.host(), None, None);
    config.registry.tag_ttl = Duration::ZERO;
    config.registry.attempts = 1;
    Engine::open(config).expect("engine")
}

fn engine(root: &Path, registry: &Registry) -> Arc<Engine> {
    engine_with(root, &registry.host(), None, None)
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

fn excluding(volume: &str, reference: &str, exclude_weights: bool, patterns: &[&str]) -> MountRequest {
    MountRequest {
        options: ExcludeOptions { exclude_weights, patterns: patterns.iter().map(|p| p.to_string()).collect() },
        ..request(volume, reference)
    }
}

/// A small model: weights, a config, a tokenizer file, docs.
fn small_model(seed: u64) -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("model.safetensors", bytes(seed, 3 * MIB)),
        ("weights/extra.bin", bytes(seed + 1, MIB / 2)),
        ("config.json", format!("{{\"seed\": {seed}}}").into_bytes()),
        ("tokenizer/vocab.txt", bytes(seed + 2, 4096)),
        ("docs/guide.md", b"# guide\n".to_vec()),
        ("README.md", b"read me\n".to_vec()),
        ("empty.txt", Vec::new()),
    ]
}

/// Pushes `files` as `repository:tag`; returns the reference and the tree.
fn tmp_is_empty(root: &Path) -> bool {
    std::fs::read_dir(root.join("tmp")).unwrap().next().is_none()
}

fn digests(files: &[(&str, Vec<u8>)]) -> BTreeMap<String, String> {
    files.iter().map(|(path, content)| (path.to_string(), digest_of(content))).collect()
}

/// 32 concurrent mounts of one uncached model: every volume complete and
/// byte-identical, each blob served by the registry exactly once, each volume
/// with its own ready record.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_mounts_share_one_download() {
    let Some(registry) = start_registry() else { return };
    let files = small_model(1);
    let (reference, source) = publish(&registry, "models/shared:v1", &files);
    let root = tempfile::tempdir().unwrap();
    let engine = engine(root.path(), &registry);

    let tasks: Vec<_> = (0..32)
        .map(|index| {
            let (engine, reference) = (engine.clone(), reference.clone());
            tokio::spawn(async move { engine.mount(request(&format!("vol-{index}"), &reference)).await })
        })
        .collect();
    let mut records = Vec::new();
    for task in tasks {
        records.push(task.await.unwrap().expect("every mount succeeds"));
    }

    let expected = read_tree(source.path());
    for (index, record) in records.iter().enumerate() {
        assert_eq!(record.volume.as_str(), format!("vol-{index}"));
        assert_eq!(record.state(), VolumeState::Ready);
        assert_eq!(read_tree(&record.path), expected, "{} is complete and identical", record.volume);
        let stored = engine.status(&record.volume, &record.mount_id).unwrap();
        assert_eq!(stored.state(), VolumeState::Ready);
        assert_eq!(stored.path, record.path);
    }
    let starters = records.iter().filter(|record| !matches!(record.origin, Some(Origin::Joined | Origin::Cached))).count();
    assert_eq!(starters, 1, "one request pulled, the others joined or reused");
    let gets = registry.blob_gets();
    for (path, digest) in digests(&files) {
        if path == "empty.txt" {
            continue; // an empty blob needs no request
        }
        assert_eq!(gets.get(&digest), Some(&1), "{path} ({digest}) fetched once");
    }
    assert!(tmp_is_empty(root.path()));
}

/// Mounts of one tag asking at the same moment share one tag resolution,
/// and a mount within the tag TTL after them asks nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_herd_asking_for_one_tag_resolves_it_once() {
    let Some(registry) = start_registry() else { return };
    let (reference, _source) = publish(&registry, "models/herd:v1", &small_model(7));
    // Every resolution takes 300 ms, so the 16 mounts surely overlap it.
    let proxy = support::FlakyProxy::slow_heads(registry.port(), std::time::Duration::from_millis(300));
    let through_proxy = reference.replace(&registry.host(), &proxy.host());
    let root = tempfile::tempdir().unwrap();
    let engine = engine_with(root.path(), &proxy.host(), None, None);
    let heads = || {
        proxy
            .requests
            .lock()
            .unwrap()
            .iter()
            .filter(|(line, _)| line.starts_with("HEAD ") && line.contains("/manifests/v1"))
            .count()
    };

    let tasks: Vec<_> = (0..16)
        .map(|index| {
            let (engine, reference) = (engine.clone(), through_proxy.clone());
            tokio::spawn(async move { engine.mount(request(&format!("herd-{index}"), &reference)).await })
        })
        .collect();
    for task in tasks {
        assert_eq!(task.await.unwrap().expect("every mount succeeds").state(), VolumeState::Ready);
    }
    assert_eq!(heads(), 1, "one resolution for the herd");

    engine.mount(request("late", &through_proxy)).await.unwrap();
    assert_eq!(heads(), 1, "a resolution is trusted for the tag TTL");
}

/// Within the tag TTL a moved tag still mounts what it named; an engine that
/// always asks sees the move at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tags_are_trusted_for_their_ttl() {
    let Some(registry) = start_registry() else { return };
    let (tagged, _one) = publish(&registry, "models/ttl:v1", &[("a.bin", bytes(21, 1000))]);
    let (trusting_root, asking_root) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let trusting = engine(trusting_root.path(), &registry);
    let asking = asking_engine(asking_root.path(), &registry);
    let first = trusting.mount(request("first", &tagged)).await.unwrap().digest().unwrap().clone();
    assert_eq!(asking.mount(request("first", &tagged)).await.unwrap().digest(), Some(&first));

    publish(&registry, "models/ttl:v1", &[("b.bin", bytes(22, 1000))]);
    let trusted = trusting.mount(request("second", &tagged)).await.unwrap();
    assert_eq!(trusted.digest(), Some(&first), "within the TTL the tag is not asked again");
    assert!(trusted.origin == Some(Origin::Cached) && trusted.path.join("a.bin").exists());
    let asked = asking.mount(request("second", &tagged)).await.unwrap();
    assert_ne!(asked.digest(), Some(&first));
    assert!(asked.path.join("b.bin").exists());
    // `inspect` answers what a mount would use.
    assert_eq!(trusting.inspect(&tagged).await.unwrap().digest, first);
    assert_eq!(&asking.inspect(&tagged).await.unwrap().digest, asked.digest().unwrap());
}

/// An outage costs one wait per TTL: once a mount was served from memory,
/// the mounts that follow within the TTL do not ask the registry again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_is_asked_about_once_per_ttl() {
    let Some(registry) = start_registry() else { return };
    let (tagged, _source) = publish(&registry, "models/down:v1", &[("a.bin", bytes(26, 1000))]);
    let proxy = support::FlakyProxy::start(registry.port(), usize::MAX);
    let through_proxy = tagged.replace(&registry.host(), &proxy.host());
    let heads = || {
        proxy
            .requests
            .lock()
            .unwrap()
            .iter()
            .filter(|(line, _)| line.starts_with("HEAD ") && line.contains("/manifests/v1"))
            .count()
    };
    let root = tempfile::tempdir().unwrap();
    let mut config = config_with(root.path(), &proxy.host(), None, None);
    config.registry.tag_ttl = Duration::from_secs(2);
    config.registry.attempts = 1;
    let engine = Engine::open(config).unwrap();
    let digest = engine.mount(request("before", &through_proxy)).await.unwrap().digest().unwrap().clone();
    assert_eq!(heads(), 1);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    drop(registry);

    let first = engine.mount(request("first", &through_proxy)).await.expect("served from memory");
    assert_eq!((first.digest(), heads()), (Some(&digest), 2), "the TTL ran out: asked once");
    let second = engine.mount(request("second", &through_proxy)).await.unwrap();
    assert_eq!((second.digest(), heads()), (Some(&digest), 2), "within the TTL of the fallback: not asked");
}

/// While the registry cannot be reached, a cached model still mounts by tag
/// (what the tag named when last heard of), even after a restart that
/// learns it from the volume records; a tag never heard of, or one the
/// registry said is gone, fails as unavailable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_outage_mounts_what_tags_last_named() {
    let Some(registry) = start_registry() else { return };
    let (tagged, source) = publish(&registry, "models/outage:v1", &small_model(23));
    let (deleted, _gone) = publish(&registry, "models/outage:gone", &[("g.bin", bytes(25, 100))]);
    let unknown = registry.reference("models/outage:v2");
    let root = tempfile::tempdir().unwrap();
    let engine = asking_engine(root.path(), &registry);
    let digest = engine.mount(request("before", &tagged)).await.unwrap().digest().unwrap().clone();
    let gone = engine.mount(request("gone", &deleted)).await.unwrap().digest().unwrap().clone();
    registry.delete(&format!("models/outage/manifests/{gone}"));
    let error = engine.mount(request("gone-now", &deleted)).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::NotFound, "{error}");
    let host = registry.host();
    drop(registry);

    let during = engine.mount(request("during", &tagged)).await.expect("served from what the tag last named");
    assert_eq!((during.digest(), during.origin), (Some(&digest), Some(Origin::Cached)));
    assert_eq!(read_tree(&during.path), read_tree(source.path()));
    for (volume, reference) in [("unknown", &unknown), ("deleted", &deleted)] {
        let error = engine.mount(request(volume, reference)).await.unwrap_err();
        assert_eq!(error.kind(), ErrorKind::Unavailable, "{volume}: {error}");
    }
    drop(engine);

    let mut config = config_with(root.path(), &host, None, None);
    config.registry.attempts = 1;
    let restarted = Engine::open(config).unwrap();
    let after = restarted.mount(request("after", &tagged)).await.expect("learned from the records");
    assert_eq!(after.digest(), Some(&digest));
}

/// The first caller cancelled mid-download while three others wait: the
/// three succeed, and the blob is still fetched only once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn first_caller_cancelled_others_succeed() {
    let Some(registry) = start_registry() else { return };
    let files = vec![("big.safetensors", bytes(7, 256 * MIB)), ("config.json", b"{}".to_vec())];
    let (reference, source) = publish(&registry, "models/big:v1", &files);
    let root = tempfile::tempdir().unwrap();
    let engine = engine(root.path(), &registry);

    let first = request("first", &reference);
    let _first_handle = engine.start_mount(first.clone()).await.unwrap();
    let started = Instant::now();
    loop {
        let (done, _) = engine.progress(&first.volume, &first.mount_id).unwrap_or((0, 0));
        if done > 0 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "the download never started");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let others_requests: Vec<MountRequest> = (1..=3).map(|index| request(&format!("other-{index}"), &reference)).collect();
    let mut others = Vec::new();
    for other in &others_requests {
        others.push(engine.start_mount(other.clone()).await.unwrap());
    }
    // Wait until every other request has joined the download.
    for other in &others_requests {
        while engine.progress(&other.volume, &other.mount_id).is_none_or(|(done, _)| done == 0) {
            assert!(started.elapsed() < Duration::from_secs(60), "{} never joined", other.volume);
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    let (done, total) = engine.progress(&first.volume, &first.mount_id).unwrap();
    assert!(done < total, "the download finished before the cancel; make the model larger");
    let released = engine.unmount(&first.volume, &first.mount_id).await.unwrap();
    assert_eq!(released.state(), VolumeState::Released);

    let expected = read_tree(source.path());
    for handle in &mut others {
        let record = handle.wait().await.expect("the others succeed");
        assert_eq!(record.origin, Some(Origin::Joined));
        assert_eq!(read_tree(&record.path), expected);
    }
    assert_eq!(registry.blob_gets().get(&digest_of(&files[0].1)), Some(&1));
    assert_eq!(engine.status(&first.volume, &first.mount_id).unwrap().state(), VolumeState::Released);
    assert!(!engine.volumes().tree(&first.volume, &first.mount_id).exists());
    assert!(tmp_is_empty(root.path()));
}

/// Excluded files are absent from the volume and never requested from the
/// registry; without an exclude plugin such a request is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn excluded_files_are_never_fetched() {
    let Some(registry) = start_registry() else { return };
    let files = small_model(2);
    let (reference, _source) = publish(&registry, "models/partial:v1", &files);
    let plugins = PluginDir::reference();
    let root = tempfile::tempdir().unwrap();
    let engine = engine_with(root.path(), &registry.host(), Some(plugins.path()), None);

    let record = engine.mount(excluding("light", &reference, true, &["docs/", "*.md", "!README.md"])).await.unwrap();
    let tree = read_tree(&record.path);
    let present: Vec<&str> = tree.keys().map(String::as_str).collect();
    assert_eq!(present, ["README.md", "config.json", "empty.txt", "tokenizer/vocab.txt"]);
    let skipped: Vec<(&str, &str)> = record.skipped.iter().map(|skip| (skip.path.as_str(), skip.reason.as_str())).collect();
    // In manifest order; for docs/guide.md the last matching pattern speaks.
    assert_eq!(
        skipped,
        [
            ("docs/guide.md", "matches `*.md`"),
            ("model.safetensors", "weights excluded by the request"),
            ("weights/extra.bin", "weights excluded by the request"),
        ]
    );
    let gets = registry.blob_gets();
    for (path, digest) in digests(&files) {
        let fetched = gets.get(&digest).copied().unwrap_or(0);
        let wanted = usize::from(tree.contains_key(&path) && path != "empty.txt");
        assert_eq!(fetched, wanted, "{path}");
    }

    let bare_root = tempfile::tempdir().unwrap();
    let bare = engine_with(bare_root.path(), &registry.host(), None, None);
    let error = bare.mount(excluding("x", &reference, true, &[])).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::InvalidArgument);
    let message = modelcache::plugins::error_chain(&error);
    assert!(message.contains("no plugin serves the exclude decision"), "{message}");
}

/// A plugin set answers an exclude question once per reference, manifest
/// and options; other options, or a reload, ask again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exclude_answers_are_remembered_per_plugin_set() {
    let Some(registry) = start_registry() else { return };
    let (reference, _source) = publish(&registry, "models/memo:v1", &small_model(24));
    let plugins = PluginDir::new();
    // Its own name: the call counter is the process's, shared with other tests.
    plugins.add("exclude-patterns", "memo-exclude");
    let root = tempfile::tempdir().unwrap();
    let engine = engine_with(root.path(), &registry.host(), Some(plugins.path()), None);
    let calls = || modelcache::metrics::metrics().plugin_calls.get(["memo-exclude", "exclude"]);

    let first = engine.mount(excluding("a", &reference, true, &["*.md"])).await.unwrap();
    let again = engine.mount(excluding("b", &reference, true, &["*.md"])).await.unwrap();
    assert_eq!(calls(), 1, "the second mount reuses the answer");
    assert_eq!(again.skipped, first.skipped);
    assert_eq!(read_tree(&again.path), read_tree(&first.path));

    let other = engine.mount(excluding("c", &reference, true, &[])).await.unwrap();
    assert_eq!(calls(), 2, "other options ask");
    assert!(other.skipped.len() < first.skipped.len());
    engine.plugins().reload();
    engine.mount(excluding("d", &reference, true, &["*.md"])).await.unwrap();
    assert_eq!(calls(), 3, "a reloaded set asks again");
}

/// One digest, two selections: two correct trees, no cross-contamination;
/// the partial one then costs no download at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_digest_two_selections() {
    let Some(registry) = start_registry() else { return };
    let files = small_model(3);
    let (reference, source) = publish(&registry, "models/two:v1", &files);
    let plugins = PluginDir::reference();
    let root = tempfile::tempdir().unwrap();
    let engine = engine_with(root.path(), &registry.host(), Some(plugins.path()), None);

    let (full, light) =
        tokio::join!(engine.mount(request("full", &reference)), engine.mount(excluding("light", &reference, true, &[])));
    let (full, light) = (full.unwrap(), light.unwrap());
    assert_ne!(full.selection(), light.selection());
    assert_eq!(full.selection().unwrap().as_str(), "full");
    let everything = read_tree(source.path());
    assert_eq!(read_tree(&full.path), everything);
    let mut without_weights = everything.clone();
    without_weights.remove("model.safetensors");
    without_weights.remove("weights/extra.bin");
    assert_eq!(read_tree(&light.path), without_weights);
    assert_eq!(engine.store().entries().unwrap().len(), 2);

    let before = registry.blob_gets();
    let again = engine.mount(excluding("light-2", &reference, true, &[])).await.unwrap();
    assert_eq!(again.origin, Some(Origin::Cached));
    let other_partial =
        engine.mount(excluding("docs-only", &reference, false, &["*.safetensors", "*.bin", "*.json"])).await.unwrap();
    assert!(other_partial.origin == Some(Origin::Cached) || other_partial.bytes_done == other_partial.bytes_total);
    assert_eq!(registry.blob_gets(), before, "partial trees come from stored blobs");
    assert_eq!(engine.store().entries().unwrap().len(), 3);
}

/// A blob whose bytes do not match its digest: a clear error, nothing
/// published, no temporaries left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_blob_publishes_nothing() {
    let Some(registry) = start_registry() else { return };
    let files = vec![("weights.bin", bytes(4, 2 * MIB)), ("config.json", b"{}".to_vec())];
    let (reference, _source) = publish(&registry, "models/corrupt:v1", &files);
    let digest = digest_of(&files[0].1);
    let blob = registry.blob_file(&digest);
    let mut content = std::fs::read(&blob).unwrap();
    content[MIB] ^= 0xff;
    std::fs::write(&blob, content).unwrap();

    let root = tempfile::tempdir().unwrap();
    let engine = engine(root.path(), &registry);
    let error = engine.mount(request("v", &reference)).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::DataLoss, "{error}");
    let message = modelcache::plugins::error_chain(&error);
    assert!(message.contains(&digest) && message.contains("hash to"), "{message}");
    let parsed: modelcache::digest::Digest = digest.parse().unwrap();
    assert!(!engine.store().has_blob(&parsed));
    assert!(engine.store().entries().unwrap().is_empty());
    assert!(tmp_is_empty(root.path()));
    let record = engine.status(&VolumeId::new("v").unwrap(), &MountId::default()).unwrap();
    assert_eq!(record.state(), VolumeState::Failed);
    assert_eq!(record.error().unwrap().kind, ErrorKind::DataLoss);
    assert!(!record.path.exists(), "no half-made volume");
}

/// Pushes a manifest whose layers are `(path annotation, media type, bytes)`.
async fn push_raw(registry: &Registry, name: &str, layers: &[(&str, &str, Vec<u8>)]) -> String {
    let reference = registry.reference(name);
    let model_ref = ModelRef::parse(&reference).unwrap();
    let client = Client::new(RegistryConfig { insecure: vec![registry.host()], ..RegistryConfig::default() }).unwrap();
    let mut descriptors = Vec::new();
    for (path, media_type, content) in layers {
        let digest = modelcache::digest::Digest::of(content);
        let chunk = bytes::Bytes::from(content.clone());
        client
            .push_blob(&model_ref, &digest, content.len() as u64, futures_util::stream::once(async { Ok(chunk) }))
            .await
            .unwrap();
        descriptors.push(serde_json::json!({
            "mediaType": media_type,
            "digest": digest.to_string(),
            "size": content.len(),
            "annotations": { "org.cncf.model.filepath": path },
        }));
    }
    let config = b"{}".to_vec();
    let config_digest = modelcache::digest::Digest::of(&config);
    let chunk = bytes::Bytes::from(config.clone());
    client.push_blob(&model_ref, &config_digest, 2, futures_util::stream::once(async { Ok(chunk) })).await.unwrap();
    let manifest = modelcache::pack::manifest_json(&config, descriptors);
    client.push_manifest(&model_ref, manifest).await.unwrap();
    reference
}

/// Hostile artifacts — `../` and absolute paths, duplicates, tars with
/// escaping symlinks, hardlinks or paths — are refused with the layer named,
/// and nothing is written outside the root.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_artifacts_are_refused() {
    use tar::EntryType::{Directory, Link, Regular, Symlink};
    let Some(registry) = start_registry() else { return };
    const RAW: &str = "application/vnd.cncf.model.weight.v1.raw";
    const TAR: &str = "application/vnd.cncf.model.code.v1.tar";
    let ok = || ("ok.txt", RAW, b"fine".to_vec());
    let cases: Vec<(&str, Vec<support::RawLayer<'_>>, &str)> = vec![
        ("dotdot", vec![ok(), ("../escape.txt", RAW, b"x".to_vec())], "climbs out with `..`"),
        ("absolute", vec![("/etc/cron.d/evil", RAW, b"x".to_vec())], "is absolute"),
        ("duplicate", vec![ok(), ("./ok.txt", RAW, b"y".to_vec())], "both claim `ok.txt`"),
        (
            "tar-symlink",
            vec![("pkg", TAR, tar_archive(&[("pkg/", Directory, "", b""), ("pkg/link", Symlink, "../../../outside", b"")]))],
            "points outside the model",
        ),
        ("tar-hardlink", vec![("pkg", TAR, tar_archive(&[("pkg/passwd", Link, "/etc/passwd", b"")]))], "is a hardlink"),
        ("tar-dotdot", vec![("pkg", TAR, tar_archive(&[("pkg/../../escape", Regular, "", b"evil")]))], "climbs out"),
        (
            "tar-through-symlink",
            vec![("pkg", TAR, tar_archive(&[("pkg/up", Symlink, "..", b""), ("pkg/up/planted", Regular, "", b"evil")]))],
            "through `pkg/up`",
        ),
        ("tar-elsewhere", vec![("pkg", TAR, tar_archive(&[("other/file", Regular, "", b"evil")]))], "outside the layer's path"),
    ];
    let parent = tempfile::tempdir().unwrap();
    let root = parent.path().join("root");
    let engine = engine(&root, &registry);
    for (name, layers, expected) in cases {
        let reference = push_raw(&registry, &format!("hostile/{name}:v1"), &layers).await;
        let error = engine.mount(request(name, &reference)).await.unwrap_err();
        let message = modelcache::plugins::error_chain(&error);
        assert_eq!(error.kind(), ErrorKind::InvalidArgument, "{name}: {message}");
        assert!(message.contains(expected), "{name}: {message}");
        assert!(message.contains("layer"), "{name} names the layer: {message}");
        assert!(tmp_is_empty(&root), "{name} left temporaries");
        assert!(!engine.volumes().tree(&VolumeId::new(name).unwrap(), &MountId::default()).exists());
    }
    let outside: Vec<String> = std::fs::read_dir(parent.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(outside, ["root"], "nothing was written beside the root");
    assert!(engine.store().entries().unwrap().is_empty());
    assert!(std::fs::read_dir(root.join("unpacked/sha256")).unwrap().next().is_none());
}

/// A well-formed tar layer unpacks at the model root, with in-tree symlinks,
/// and gzip and zstd variants too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tar_layers_unpack() {
    use tar::EntryType::{Directory, Regular, Symlink};
    let Some(registry) = start_registry() else { return };
    let archive = tar_archive(&[
        ("tok/", Directory, "", b""),
        ("tok/vocab.json", Regular, "", b"{\"a\": 1}"),
        ("tok/sub/merges.txt", Regular, "", b"a b"),
        ("tok/current", Symlink, "sub/merges.txt", b""),
    ]);
    let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gzip, &archive).unwrap();
    let zstd = zstd::encode_all(&archive[..], 1).unwrap();
    let reference = push_raw(
        &registry,
        "models/tars:v1",
        &[
            ("tok", "application/vnd.cncf.model.weight.config.v1.tar", archive.clone()),
            ("weights.bin", "application/vnd.cncf.model.weight.v1.raw", bytes(9, 1000)),
        ],
    )
    .await;
    let gz_reference = push_raw(
        &registry,
        "models/tars-gz:v1",
        &[("tok", "application/vnd.cncf.model.weight.config.v1.tar+gzip", gzip.finish().unwrap())],
    )
    .await;
    let zstd_reference =
        push_raw(&registry, "models/tars-zstd:v1", &[("tok", "application/vnd.cncf.model.weight.config.v1.tar+zstd", zstd)])
            .await;

    let root = tempfile::tempdir().unwrap();
    let engine = engine(root.path(), &registry);
    for (volume, reference) in [("plain", &reference), ("gz", &gz_reference), ("zstd", &zstd_reference)] {
        let record = engine.mount(request(volume, reference)).await.unwrap();
        let tree = read_tree(&record.path);
        assert_eq!(tree["tok/vocab.json"], b"{\"a\": 1}");
        assert_eq!(tree["tok/sub/merges.txt"], b"a b");
        assert_eq!(tree["tok/current"], b"-> sub/merges.txt");
        assert_eq!(std::fs::read(record.path.join("tok/current")).unwrap(), b"a b");
    }
    assert!(tmp_is_empty(root.path()));
}

/// Store and volume on different filesystems: the copy fallback serves and
/// the record says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_filesystem_volumes_are_copied() {
    skip_unless!(support::is_root(), "mounting a tmpfs needs root");
    let Some(registry) = start_registry() else { return };
    let files = small_model(5);
    let (reference, source) = publish(&registry, "models/xdev:v1", &files);
    let volumes = tempfile::tempdir().unwrap();
    assert!(mount_tmpfs(volumes.path(), "64m"), "mounting a tmpfs failed");
    let _unmount = Unmount(volumes.path().to_owned());
    let root = tempfile::tempdir().unwrap();
    let engine = engine_with(root.path(), &registry.host(), None, Some(volumes.path()));
    let record = engine.mount(request("elsewhere", &reference)).await.unwrap();
    assert_eq!(record.link_method, Some(LinkMethod::Copy));
    let link = record.link.unwrap();
    assert_eq!(link.copies, files.len() as u64);
    assert_eq!(link.copied_bytes, files.iter().map(|(_, bytes)| bytes.len() as u64).sum::<u64>());
    assert!(record.path.starts_with(volumes.path()));
    assert_eq!(read_tree(&record.path), read_tree(source.path()));
    use std::os::unix::fs::MetadataExt;
    assert_ne!(std::fs::metadata(record.path.join("config.json")).unwrap().dev(), std::fs::metadata(root.path()).unwrap().dev());
    let mode = std::fs::metadata(record.path.join("config.json")).unwrap().mode() & 0o777;
    assert_eq!(mode & 0o222, 0, "copies are read-only like the store");
}

/// An unmount that lands while the link step runs waits for that step, so
/// the tree is not put back after the volume was released; a new mount of
/// the volume then gets a whole tree. (The copy into a tmpfs makes the link
/// step long enough to land in.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmount_during_the_link_step_leaves_nothing_behind() {
    skip_unless!(support::is_root(), "mounting a tmpfs needs root");
    let Some(registry) = start_registry() else { return };
    let files = vec![("weights.bin", bytes(11, 48 * MIB))];
    let (reference, source) = publish(&registry, "models/slow-link:v1", &files);
    let volumes = tempfile::tempdir().unwrap();
    assert!(mount_tmpfs(volumes.path(), "256m"), "mounting a tmpfs failed");
    let _unmount = Unmount(volumes.path().to_owned());
    let root = tempfile::tempdir().unwrap();
    let engine = engine_with(root.path(), &registry.host(), None, Some(volumes.path()));
    engine.mount(request("warm", &reference)).await.unwrap();

    let volume_dir = volumes.path().join("cut");
    let entries = || std::fs::read_dir(&volume_dir).map(|entries| entries.count()).unwrap_or(0);
    let mounting = engine.start_mount(request("cut", &reference)).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while entries() == 0 {
        assert!(Instant::now() < deadline, "the link step never started");
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    let unmount = tokio::spawn({
        let engine = engine.clone();
        async move { engine.unmount(&VolumeId::new("cut").unwrap(), &MountId::default()).await }
    });
    // A mount of the volume while the unmount waits is told to ask again
    // (until the unmount has begun it joins the mount under way).
    loop {
        match engine.start_mount(request("cut", &reference)).await {
            Err(error) => {
                assert_eq!(error.kind(), ErrorKind::Unavailable, "{error}");
                break;
            }
            Ok(_) => assert!(!unmount.is_finished(), "no mount was refused while the unmount ran"),
        }
        tokio::task::yield_now().await;
    }
    let released = unmount.await.unwrap().unwrap();
    assert_eq!(released.state(), VolumeState::Released);
    assert_eq!(entries(), 0, "the unmount left the tree or its staging");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(entries(), 0, "the cancelled link step put the tree back after the unmount");
    drop(mounting);

    let again = engine.mount(request("cut", &reference)).await.unwrap();
    assert_eq!(again.state(), VolumeState::Ready);
    assert_eq!(read_tree(&again.path), read_tree(source.path()));
}

/// Two concurrent pulls that each fit alone but not together: exactly one
/// is admitted; the reservation is given back when the pull ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn quota_admits_one_of_two() {
    let Some(registry) = start_registry() else { return };
    let (first, _a) = publish(&registry, "models/quota-a:v1", &[("a.bin", bytes(11, 20 * MIB))]);
    let (second, _b) = publish(&registry, "models/quota-b:v1", &[("b.bin", bytes(12, 20 * MIB))]);
    let plugins = PluginDir::new();
    plugins.add("quota-watermark", "quota-watermark");
    plugins.configure("quota-watermark", "[settings]\nlimit = \"30MiB\"\n");
    let root = tempfile::tempdir().unwrap();
    let engine = engine_with(root.path(), &registry.host(), Some(plugins.path()), None);

    let (a, b) = tokio::join!(engine.mount(request("a", &first)), engine.mount(request("b", &second)));
    let outcomes = [a, b];
    let admitted = outcomes.iter().filter(|outcome| outcome.is_ok()).count();
    assert_eq!(admitted, 1, "exactly one pull is admitted: {outcomes:?}");
    let denied = outcomes.iter().find_map(|outcome| outcome.as_ref().err()).unwrap();
    assert_eq!(denied.kind(), ErrorKind::QuotaDenied);
    assert!(denied.to_string().contains("exceeds the limit of 30.0 MiB"), "{denied}");
    assert_eq!(engine.reserved_bytes(), 0);
    assert!(tmp_is_empty(root.path()));
}

/// Crash recovery: a leftover temporary, a half-built tree and a `pulling`
/// record with no live process are cleaned and reported failed at start-up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_leftovers_are_recovered() {
    let root = tempfile::tempdir().unwrap();
    drop(engine_with(root.path(), "127.0.0.1:1", None, None));
    std::fs::write(root.path().join("tmp/ingest-leftover"), b"partial").unwrap();
    let half = root.path().join(format!("models/sha256/{}/full/tree/sub", "ab".repeat(32)));
    std::fs::create_dir_all(&half).unwrap();
    std::fs::write(half.join("file"), b"x").unwrap();
    let volume = VolumeId::new("crashed").unwrap();
    let volumes = modelcache::volumes::Volumes::new(root.path().join("records"), root.path().join("volumes"));
    let mut record = VolumeRecord::pulling(
        volume.clone(),
        MountId::default(),
        "registry.local/m:1".into(),
        ExcludeOptions::default(),
        volumes.tree(&volume, &MountId::default()),
    );
    record.pid = 999_999;
    volumes.put(&mut record).unwrap();

    let engine = engine_with(root.path(), "127.0.0.1:1", None, None);
    let (recovery, failed) = engine.recovery();
    assert_eq!(recovery.temporaries, [root.path().join("tmp/ingest-leftover")]);
    assert_eq!(recovery.incomplete_entries.len(), 1);
    assert_eq!(failed.len(), 1);
    let record = engine.status(&volume, &MountId::default()).unwrap();
    assert_eq!(record.state(), VolumeState::Failed);
    assert!(record.error().unwrap().message.contains("interrupted"));
    assert!(tmp_is_empty(root.path()));
    assert!(!root.path().join(format!("models/sha256/{}/full", "ab".repeat(32))).exists());
}

/// A `modelcache mount` killed mid-download leaves a store the next run
/// recovers and completes.
#[test]
fn killed_mount_recovers() {
    let Some(registry) = start_registry() else { return };
    let files = vec![("big.bin", bytes(13, 192 * MIB))];
    let (reference, source) = publish(&registry, "models/killed:v1", &files);
    let root = tempfile::tempdir().unwrap();
    let mut child = support::modelcache()
        .args(["mount", &reference, "--volume", "v", "--root"])
        .arg(root.path())
        .args(["--insecure-registry", &registry.host()])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while std::fs::read_dir(root.path().join("tmp")).map(|mut dir| dir.next().is_none()).unwrap_or(true) {
        assert!(started.elapsed() < Duration::from_secs(60), "no download started");
        assert!(child.try_wait().unwrap().is_none(), "the mount finished before it could be killed");
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();

    let output = support::modelcache()
        .args(["mount", &reference, "--volume", "v", "--json", "--root"])
        .arg(root.path())
        .args(["--insecure-registry", &registry.host()])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let record: VolumeRecord = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(record.state(), VolumeState::Ready);
    assert_eq!(read_tree(&record.path), read_tree(source.path()));
    assert!(tmp_is_empty(root.path()));
}

/// An interrupted blob resumes with a Range request from what was written,
/// and the whole blob is verified.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_blobs_resume_with_range() {
    let Some(registry) = start_registry() else { return };
    let files = vec![("weights.bin", bytes(14, 8 * MIB))];
    let (reference, source) = publish(&registry, "models/resume:v1", &files);
    let proxy = support::FlakyProxy::start(registry.port(), 3 * MIB);
    let through_proxy = reference.replace(&registry.host(), &proxy.host());
    let root = tempfile::tempdir().unwrap();
    let engine = engine_with(root.path(), &proxy.host(), None, None);
    let record = engine.mount(request("v", &through_proxy)).await.unwrap();
    assert_eq!(read_tree(&record.path), read_tree(source.path()));

    let digest = digest_of(&files[0].1);
    let blob_requests: Vec<Option<String>> = proxy
        .requests
        .lock()
        .unwrap()
        .iter()
        .filter(|(line, _)| line.contains(&digest))
        .map(|(_, range)| range.clone())
        .collect();
    assert_eq!(blob_requests.len(), 2, "{blob_requests:?}");
    assert_eq!(blob_requests[0].as_deref(), Some("bytes=0-"));
    let resumed_from: u64 =
        blob_requests[1].as_deref().unwrap().trim_start_matches("bytes=").trim_end_matches('-').parse().unwrap();
    assert!(resumed_from > 0 && resumed_from < 8 * MIB as u64, "resumed from {resumed_from}");
}

fn cli(root: &Path, registry: &Registry, args: &[&str]) -> std::process::Output {
    support::modelcache().args(args).arg("--root").arg(root).args(["--insecure-registry", &registry.host()]).output().unwrap()
}

/// The CLI end to end: inspect, mount, mount again (no download), a
/// conflicting mount, ls, unmount twice.
#[test]
fn cli_mounts_lists_inspects_and_unmounts() {
    let Some(registry) = start_registry() else { return };
    let files = small_model(6);
    let (reference, source) = publish(&registry, "models/cli:v1", &files);
    let (other, _other_source) = publish(&registry, "models/cli-other:v1", &[("x.bin", bytes(15, 100))]);
    let root = tempfile::tempdir().unwrap();

    let output = cli(root.path(), &registry, &["inspect", &reference, "--json"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let inspection: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(inspection["layers"].as_array().unwrap().len(), files.len());
    assert!(inspection["layers"].as_array().unwrap().iter().all(|layer| layer["cached"] == false));

    let output = cli(root.path(), &registry, &["mount", &reference, "--volume", "v1"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("ready at") && stdout.contains("pulled"), "{stdout}");
    let path = root.path().join("volumes/v1/default");
    assert_eq!(read_tree(&path), read_tree(source.path()));

    let gets = registry.blob_gets();
    let output = cli(root.path(), &registry, &["mount", &reference, "--volume", "v1"]);
    assert!(output.status.success());
    assert_eq!(registry.blob_gets(), gets, "the same mount again downloads nothing");

    let output = cli(root.path(), &registry, &["mount", &other, "--volume", "v1"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("already holds") && stderr.contains(&reference), "{stderr}");

    let output = support::modelcache().args(["ls", "--json", "--root"]).arg(root.path()).output().unwrap();
    let records: Vec<VolumeRecord> = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].state(), VolumeState::Ready);
    let output = support::modelcache().args(["ls", "--root"]).arg(root.path()).output().unwrap();
    assert!(String::from_utf8_lossy(&output.stdout).contains("v1"));

    let output = cli(root.path(), &registry, &["inspect", &reference, "--json"]);
    let inspection: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert!(inspection["layers"].as_array().unwrap().iter().all(|layer| layer["cached"] == true));
    assert_eq!(inspection["entries"].as_array().unwrap().len(), 1);

    for _ in 0..2 {
        let output = cli(root.path(), &registry, &["unmount", "--volume", "v1"]);
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    }
    assert!(!path.exists());
    let output = cli(root.path(), &registry, &["unmount", "--volume", "never"]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("has no record"));
    let output = cli(root.path(), &registry, &["mount", "not a reference", "--volume", "v2"]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("not a valid model reference"));
}

/// Two processes on one root: the second waits for the root lock, then
/// serves from the cache; the store stays consistent.
#[test]
fn two_processes_share_a_root() {
    let Some(registry) = start_registry() else { return };
    let files = small_model(8);
    let (reference, source) = publish(&registry, "models/procs:v1", &files);
    let root = tempfile::tempdir().unwrap();
    let children: Vec<_> = ["p1", "p2"]
        .iter()
        .map(|volume| {
            support::modelcache()
                .args(["mount", &reference, "--volume", volume, "--root"])
                .arg(root.path())
                .args(["--insecure-registry", &registry.host()])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        let output = child.wait_with_output().unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    }
    for volume in ["p1", "p2"] {
        assert_eq!(read_tree(&root.path().join("volumes").join(volume).join("default")), read_tree(source.path()));
    }
    for (path, digest) in digests(&files) {
        if path != "empty.txt" {
            assert_eq!(registry.blob_gets().get(&digest), Some(&1), "{path}");
        }
    }
    assert!(tmp_is_empty(root.path()));
}

/// A reference pinned by digest is pulled by that digest, and the record
/// says which digest the volume holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_digests_are_honoured() {
    let Some(registry) = start_registry() else { return };
    let (tagged, _one) = publish(&registry, "models/moving:v1", &[("a.bin", bytes(16, 1000))]);
    let root = tempfile::tempdir().unwrap();
    let engine = asking_engine(root.path(), &registry);
    let first = engine.mount(request("tagged", &tagged)).await.unwrap();
    let digest = first.digest().cloned().unwrap();
    // The tag moves to another model; the pinned reference still names the first.
    publish(&registry, "models/moving:v1", &[("b.bin", bytes(17, 1000))]);
    let pinned = format!("{}/models/moving@{digest}", registry.host());
    let record = engine.mount(request("pinned", &pinned)).await.unwrap();
    assert_eq!(record.digest(), Some(&digest));
    assert!(record.path.join("a.bin").exists() && !record.path.join("b.bin").exists());
    let moved = engine.mount(request("moved", &tagged)).await.unwrap();
    assert_ne!(moved.digest(), Some(&digest));
    assert!(moved.path.join("b.bin").exists());
}

/// Errors are typed: a missing tag is not-found, a non-model artifact is
/// refused naming its type.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_typed() {
    let Some(registry) = start_registry() else { return };
    let root = tempfile::tempdir().unwrap();
    let engine = engine(root.path(), &registry);
    let error = engine.mount(request("missing", &registry.reference("models/none:v1"))).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::NotFound, "{error}");

    let reference = registry.reference("images/not-a-model:v1");
    let model_ref = ModelRef::parse(&reference).unwrap();
    let client = Client::new(RegistryConfig { insecure: vec![registry.host()], ..RegistryConfig::default() }).unwrap();
    let config = bytes::Bytes::from_static(b"{}");
    let config_digest = modelcache::digest::Digest::of(&config);
    client.push_blob(&model_ref, &config_digest, 2, futures_util::stream::once(async { Ok(config) })).await.unwrap();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest.to_string(), "size": 2 },
        "layers": [],
    });
    client.push_manifest(&model_ref, serde_json::to_vec(&manifest).unwrap().into()).await.unwrap();
    let error = engine.mount(request("image", &reference)).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::InvalidArgument, "{error}");
    assert!(error.to_string().contains("not a ModelPack model"), "{error}");
}

/// Mounts that joined a pull or a blob download started through a registry
/// that stalls do not inherit its failure: each tries once more on its own,
/// from its own registry, and succeeds. The starter fails naming the stall.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joiners_retry_on_their_own_when_the_flight_fails() {
    let Some(registry) = start_registry() else { return };
    let files = small_model(51);
    let (reference, source) = publish(&registry, "models/joined:v1", &files);
    // Another model with the same weights: it shares their download only.
    let mut sibling_files = files.clone();
    sibling_files.retain(|(path, _)| *path != "config.json");
    let (sibling, sibling_source) = publish(&registry, "models/sibling:v1", &sibling_files);
    let weights = digest_of(&files[0].1);
    let stall = support::BlobAnswer::Trickle { bytes: 64 << 10, every: Duration::from_secs(3600) };
    let proxy = support::HostileBlobProxy::start(registry.port(), &weights, stall);
    let stalled = reference.replace(&registry.host(), &proxy.host());
    let root = tempfile::tempdir().unwrap();
    let mut config = config_with(root.path(), &registry.host(), None, None);
    config.registry.insecure.push(proxy.host());
    config.registry.stall_timeout = Duration::from_secs(1);
    config.registry.attempts = 2;
    config.registry.backoff = Duration::from_millis(100);
    let engine = Engine::open(config).expect("engine");

    let starter = tokio::spawn({
        let engine = engine.clone();
        async move { engine.mount(request("stalled", &stalled)).await }
    });
    let asked = Instant::now();
    while proxy.blob_gets.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        assert!(asked.elapsed() < Duration::from_secs(30), "the weights were never asked for");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (same, other) = tokio::join!(engine.mount(request("same", &reference)), engine.mount(request("other", &sibling)));
    let same = same.expect("the mount that joined the pull tries on its own");
    let other = other.expect("the mount that joined the download tries on its own");
    assert_eq!(read_tree(&same.path), read_tree(source.path()));
    assert_eq!(read_tree(&other.path), read_tree(sibling_source.path()));

    let error = starter.await.unwrap().unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Unavailable);
    let message = modelcache::plugins::error_chain(&error);
    assert!(message.contains("stalled: no bytes for 1 s") && message.contains(&proxy.host()), "{message}");
    assert!(tmp_is_empty(root.path()));
}

/// A volume whose record file does not parse is not wedged: `ls` lists it
/// as failed (saying why), `unmount` releases it, and `mount` replaces it;
/// each broken file is kept aside once, as `<mount-id>.json.broken`.
#[test]
fn an_unreadable_record_does_not_wedge_its_volume() {
    let Some(registry) = start_registry() else { return };
    let files = small_model(21);
    let (reference, source) = publish(&registry, "models/broken-record:v1", &files);
    let root = tempfile::tempdir().unwrap();
    let output = cli(root.path(), &registry, &["mount", &reference, "--volume", "v"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let record_file = root.path().join("records/v/default.json");
    let aside = root.path().join("records/v/default.json.broken");
    let tree = root.path().join("volumes/v/default");

    // Cut short, as a torn write or a bad disk would leave it.
    let whole = std::fs::read(&record_file).unwrap();
    std::fs::write(&record_file, &whole[..whole.len() / 2]).unwrap();
    let output = support::modelcache().args(["ls", "--json", "--root"]).arg(root.path()).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let records: Vec<VolumeRecord> = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(records.len(), 1, "the volume is listed");
    assert_eq!((records[0].volume.as_str(), records[0].state()), ("v", VolumeState::Failed));
    let error = records[0].error().cloned().unwrap();
    assert_eq!(error.kind, ErrorKind::DataLoss);
    assert!(error.message.contains("unreadable") && error.message.contains("default.json"), "{}", error.message);
    let output = support::modelcache().args(["ls", "--root"]).arg(root.path()).output().unwrap();
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(table.lines().any(|line| line.starts_with("v ") && line.contains("failed")), "{table}");

    let output = cli(root.path(), &registry, &["unmount", "--volume", "v", "--json"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(!tree.exists(), "the tree is removed");
    let released: VolumeRecord = serde_json::from_slice(&std::fs::read(&record_file).unwrap()).unwrap();
    assert_eq!(released.state(), VolumeState::Released);
    assert_eq!(std::fs::read(&aside).unwrap(), &whole[..whole.len() / 2], "the broken bytes are kept aside");

    // Another shape altogether: a mount replaces it and serves the model.
    std::fs::write(&record_file, b"[\"not\", \"a record\"]").unwrap();
    let output = cli(root.path(), &registry, &["mount", &reference, "--volume", "v"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(read_tree(&tree), read_tree(source.path()));
    let ready: VolumeRecord = serde_json::from_slice(&std::fs::read(&record_file).unwrap()).unwrap();
    assert_eq!(ready.state(), VolumeState::Ready);
    assert_eq!(std::fs::read(&aside).unwrap(), b"[\"not\", \"a record\"]", "one file aside per mount id, the latest");
    let names: Vec<_> =
        std::fs::read_dir(root.path().join("records/v")).unwrap().map(|entry| entry.unwrap().file_name()).collect();
    assert_eq!(names.len(), 2, "{names:?}");
}

/// Volume trees copied onto another filesystem count in the `cache-bytes`
/// quota plugins see: a pull that fits the limit with the store's bytes
/// alone but not with the copies is denied, and the reason counts them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copied_volume_trees_count_against_quota() {
    skip_unless!(support::is_root(), "mounting a tmpfs needs root");
    let Some(registry) = start_registry() else { return };
    let (first, _) = publish(&registry, "models/copied-a:v1", &[("a.bin", bytes(31, 6 * MIB))]);
    let (second, _) = publish(&registry, "models/copied-b:v1", &[("b.bin", bytes(32, 6 * MIB))]);
    let volumes = tempfile::tempdir().unwrap();
    assert!(mount_tmpfs(volumes.path(), "64m"), "mounting a tmpfs failed");
    let _unmount = Unmount(volumes.path().to_owned());
    // 6 MiB in the store + 6 MiB copied + 6 MiB incoming > 16 MiB >= 6 + 6.
    let plugins = PluginDir::new();
    plugins.add("quota-watermark", "quota-watermark");
    plugins.configure("quota-watermark", "[settings]\nlimit = \"16MiB\"\n");
    let root = tempfile::tempdir().unwrap();
    let engine = engine_with(root.path(), &registry.host(), Some(plugins.path()), Some(volumes.path()));
    let record = engine.mount(request("copied", &first)).await.unwrap();
    assert_eq!(record.link.unwrap().copied_bytes, 6 * MIB as u64);

    let error = engine.mount(request("next", &second)).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::QuotaDenied, "{error}");
    assert!(error.to_string().contains("cache 12.0 MiB"), "{error}");

    // Released, the copy no longer counts and the pull fits.
    engine.unmount(&record.volume, &record.mount_id).await.unwrap();
    engine.mount(request("next-again", &second)).await.expect("admitted once the copy is gone");
}
