//! Garbage collection against a real registry: a stress run of mounts,
//! unmounts and GC; a GC killed mid-run; the LRU watermark policy on a small
//! tmpfs; failing gc plugins; pins, dry runs, `du`, and the quota and
//! periodic triggers.

use crate::support;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use modelcache::engine::{Engine, EngineConfig, MountRequest};
use modelcache::gc::Trigger;
use modelcache::plugins::exclude::ExcludeOptions;
use modelcache::registry::{ModelRef, RegistryConfig};
use modelcache::store::EntryKey;
use modelcache::volumes::{MountId, Origin, VolumeId, VolumeState};
use support::{PluginDir, Registry, Unmount, bytes, mount_tmpfs, push, read_tree, start_registry, write_tree};

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;

fn engine(root: &Path, registry: &Registry, plugins: Option<&Path>) -> Arc<Engine> {
    let mut config = EngineConfig::new(root);
    config.registry = RegistryConfig { insecure: vec![registry.host()], ..RegistryConfig::default() };
    config.plugin_dir = plugins.map(Path::to_owned);
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

/// A plugin directory whose gc policy evicts every candidate at once.
fn evict_everything() -> PluginDir {
    let plugins = PluginDir::new();
    plugins.add("gc-lru-watermark", "gc-lru-watermark");
    plugins.configure("gc-lru-watermark", "[settings]\nhigh = \"0%\"\nlow = \"0%\"\ngrace = \"0s\"\n");
    plugins
}

/// Models to mount, published under `models/<prefix>-<n>:v1`.
struct Models {
    references: Vec<String>,
    trees: Vec<BTreeMap<String, Vec<u8>>>,
    _dirs: Vec<tempfile::TempDir>,
}

fn publish_models(registry: &Registry, prefix: &str, count: usize, files: usize, size: usize) -> Models {
    let mut models = Models { references: Vec::new(), trees: Vec::new(), _dirs: Vec::new() };
    for index in 0..count {
        let dir = tempfile::tempdir().unwrap();
        let contents: Vec<(String, Vec<u8>)> =
            (0..files).map(|file| (format!("part-{file:03}.bin"), bytes((index * 1000 + file) as u64 + 1, size))).collect();
        let borrowed: Vec<(&str, Vec<u8>)> = contents.iter().map(|(path, content)| (path.as_str(), content.clone())).collect();
        write_tree(dir.path(), &borrowed);
        let reference = registry.reference(&format!("models/{prefix}-{index}:v1"));
        push(registry, dir.path(), &reference);
        models.trees.push(read_tree(dir.path()));
        models.references.push(reference);
        models._dirs.push(dir);
    }
    models
}

struct Rng(u64);

impl Rng {
    fn below(&mut self, bound: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % bound as u64) as usize
    }
}

/// Stress: tasks mount and unmount random models while GC runs every few
/// milliseconds, over 2,000 operations. Every eviction is checked at the
/// moment it happens against the volumes the test knows are ready; every
/// volume is whole the moment it is ready (a link step that raced GC would
/// leave holes); at the end every ready volume's files are intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stress_gc_never_takes_what_is_used() {
    let Some(registry) = start_registry() else { return };
    let models = Arc::new(publish_models(&registry, "stress", 5, 3, 24 * KIB));
    let plugins = evict_everything();
    let root = tempfile::tempdir().unwrap();
    let engine = engine(root.path(), &registry, Some(plugins.path()));

    let ready: Arc<Mutex<HashMap<EntryKey, usize>>> = Arc::default();
    let violations: Arc<Mutex<Vec<String>>> = Arc::default();
    let evictions = Arc::new(Mutex::new(0usize));
    {
        // Runs under the store's lock: it may not call into the store.
        let (ready, violations, evictions) = (ready.clone(), violations.clone(), evictions.clone());
        engine.on_evict(Box::new(move |key| {
            *evictions.lock().unwrap() += 1;
            if ready.lock().unwrap().get(key).copied().unwrap_or(0) > 0 {
                violations.lock().unwrap().push(format!("evicted {key} while a ready volume used it"));
            }
        }));
    }

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let collector = {
        let (engine, stop) = (engine.clone(), stop.clone());
        tokio::spawn(async move {
            let mut runs = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                engine.gc(false, Trigger::Periodic).await.expect("gc run");
                runs += 1;
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            runs
        })
    };

    const TASKS: usize = 8;
    const OPERATIONS: usize = 260;
    let workers: Vec<_> = (0..TASKS)
        .map(|task| {
            let (engine, models, ready) = (engine.clone(), models.clone(), ready.clone());
            tokio::spawn(async move {
                let mut rng = Rng(task as u64 * 7919 + 17);
                let mut mounted: HashMap<usize, (usize, EntryKey)> = HashMap::new();
                for _ in 0..OPERATIONS {
                    let slot = rng.below(3);
                    let volume = VolumeId::new(&format!("t{task}-v{slot}")).unwrap();
                    if let Some((_, key)) = mounted.remove(&slot) {
                        // No longer counted as used before the release starts.
                        *ready.lock().unwrap().get_mut(&key).unwrap() -= 1;
                        engine.unmount(&volume, &MountId::default()).await.expect("unmount");
                    } else {
                        let model = rng.below(models.references.len());
                        let record = engine.mount(request(volume.as_str(), &models.references[model])).await.expect("mount");
                        // A link step never runs from a half-deleted tree:
                        // every volume is whole the moment it is ready.
                        assert_eq!(read_tree(&record.path), models.trees[model], "{volume} whole when ready");
                        let key = record.entry().unwrap();
                        *ready.lock().unwrap().entry(key.clone()).or_default() += 1;
                        mounted.insert(slot, (model, key));
                    }
                }
                mounted.into_iter().map(|(slot, (model, _))| (format!("t{task}-v{slot}"), model)).collect::<Vec<_>>()
            })
        })
        .collect();
    let mut still_mounted = Vec::new();
    for worker in workers {
        still_mounted.extend(worker.await.unwrap());
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let runs = collector.await.unwrap();

    assert!(violations.lock().unwrap().is_empty(), "{:?}", violations.lock().unwrap());
    // How many entries GC finds unused depends on scheduling (9 to 25 seen
    // on 2 cores, the fewer the busier the machine); what matters is that
    // evictions raced the mounts at all.
    assert!(
        *evictions.lock().unwrap() >= 5,
        "GC must really have evicted: {} evictions in {runs} runs",
        evictions.lock().unwrap()
    );
    for (volume, model) in still_mounted {
        let record = engine.status(&VolumeId::new(&volume).unwrap(), &MountId::default()).unwrap();
        assert_eq!(record.state(), VolumeState::Ready);
        assert_eq!(read_tree(&record.path), models.trees[model], "{volume} is intact");
        // Its manifest is in the store again even if GC took it between
        // mounts: a parse kept in memory never stands in for the blob.
        let layout = modelcache::store::Layout::new(root.path());
        assert!(layout.blob(record.digest().unwrap()).exists(), "{volume}: manifest missing from the store");
    }
    // Re-pulls after evictions prove the cycle ran: more blob GETs than blobs.
    let gets: usize = registry.blob_gets().values().sum();
    assert!(gets > 5 * 3, "{gets} blob requests");
}

/// Checks that the store is consistent: every entry's tree is complete and
/// every file matches its layer's digest; every blob matches its name.
fn assert_consistent(root: &Path) {
    let (store, recovery) = modelcache::store::Store::open(root).unwrap();
    drop(recovery);
    assert!(std::fs::read_dir(root.join("tmp")).unwrap().next().is_none());
    for key in store.entries().unwrap() {
        let info = store.entry_info(&key).unwrap();
        for layer in info.layers {
            let file = store.layout().tree(&key).join(&layer.path);
            let content = std::fs::read(&file).unwrap_or_else(|error| panic!("{}: {error}", file.display()));
            assert_eq!(modelcache::digest::Digest::of(&content), layer.digest, "{}", file.display());
        }
    }
    for blob in std::fs::read_dir(store.layout().blobs()).unwrap().flatten() {
        let content = std::fs::read(blob.path()).unwrap();
        assert_eq!(modelcache::digest::Digest::of(&content).hex(), blob.file_name().to_string_lossy());
    }
}

fn cli(root: &Path, registry: &Registry, plugins: &Path, args: &[&str]) -> std::process::Command {
    let mut command = support::modelcache();
    command.args(args).arg("--root").arg(root).arg("--plugins").arg(plugins).args(["--insecure-registry", &registry.host()]);
    command
}

/// A `modelcache gc` killed at random moments leaves a store the next
/// start finds consistent, and a later run completes.
#[test]
fn killed_gc_restarts_consistent() {
    let Some(registry) = start_registry() else { return };
    let models = publish_models(&registry, "killed", 6, 40, 16 * KIB);
    let plugins = evict_everything();
    let root = tempfile::tempdir().unwrap();
    let mut rng = Rng(42);
    for round in 0..5 {
        for (index, reference) in models.references.iter().enumerate() {
            let volume = format!("r{round}-m{index}");
            for args in [&["mount", reference.as_str(), "--volume", &volume][..], &["unmount", "--volume", &volume]] {
                let output = cli(root.path(), &registry, plugins.path(), args).output().unwrap();
                assert!(output.status.success(), "{args:?}: {}", String::from_utf8_lossy(&output.stderr));
            }
        }
        let mut child = cli(root.path(), &registry, plugins.path(), &["gc"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(rng.below(120) as u64));
        let _ = child.kill();
        child.wait().unwrap();
        assert_consistent(root.path());
    }
    let output = cli(root.path(), &registry, plugins.path(), &["gc"]).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_consistent(root.path());
    let (store, _) = modelcache::store::Store::open(root.path()).unwrap();
    assert!(store.entries().unwrap().is_empty());
    assert!(std::fs::read_dir(store.layout().blobs()).unwrap().next().is_none(), "every unneeded blob went");
}

fn used_percent(path: &Path) -> f64 {
    let stats = rustix::fs::statvfs(path).unwrap();
    let total = (stats.f_blocks * stats.f_frsize) as f64;
    let free = (stats.f_bavail * stats.f_frsize) as f64;
    (total - free) * 100.0 / total
}

/// `gc-lru-watermark` on a small tmpfs: above the high watermark GC frees
/// down to the low one, least recently *used* first (not oldest created).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lru_watermark_frees_to_the_low_mark() {
    skip_unless!(support::is_root(), "mounting a tmpfs needs root");
    let Some(registry) = start_registry() else { return };
    let models = publish_models(&registry, "lru", 4, 1, 18 * MIB);
    let root = tempfile::tempdir().unwrap();
    assert!(mount_tmpfs(root.path(), "100m"), "mounting a tmpfs failed");
    let _unmount = Unmount(root.path().to_owned());
    let plugins = PluginDir::new();
    plugins.add("gc-lru-watermark", "gc-lru-watermark");
    plugins.configure("gc-lru-watermark", "[settings]\nhigh = \"60%\"\nlow = \"40%\"\ngrace = \"0s\"\n");
    let engine = engine(root.path(), &registry, Some(plugins.path()));

    // Created 0, 1, 2, 3; last used 1, 2, 3, 0 (whole seconds apart).
    let mut keys = Vec::new();
    for (index, reference) in models.references.iter().enumerate() {
        let record = engine.mount(request(&format!("m{index}"), reference)).await.unwrap();
        keys.push(record.entry().unwrap());
        engine.unmount(&record.volume, &record.mount_id).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    let again = engine.mount(request("m0-again", &models.references[0])).await.unwrap();
    assert_eq!(again.origin, Some(Origin::Cached));
    engine.unmount(&again.volume, &again.mount_id).await.unwrap();

    let before = used_percent(root.path());
    assert!(before > 60.0, "the tmpfs must start above the high watermark ({before:.1}%)");
    let report = engine.gc(false, Trigger::OnDemand).await.unwrap();
    let evicted: Vec<&EntryKey> = report.evicted.iter().map(|eviction| &eviction.key).collect();
    assert_eq!(evicted, [&keys[1], &keys[2]], "least recently used first");
    let after = used_percent(root.path());
    assert!(after <= 40.0, "freed down to the low watermark: {before:.1}% -> {after:.1}%");
    assert_eq!(engine.store().entries().unwrap().len(), 2);
}

/// A gc plugin that traps or runs out of time evicts nothing; the run
/// reports why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_gc_plugins_evict_nothing() {
    let Some(registry) = start_registry() else { return };
    let models = publish_models(&registry, "failing", 2, 2, 8 * KIB);
    let plugins = PluginDir::new();
    plugins.add("hostile-policy", "panicky");
    plugins.configure("panicky", "decisions = [\"gc\"]\n[settings]\nmode = \"panic\"\n");
    plugins.add("hostile-policy", "slow");
    plugins.configure("slow", "decisions = [\"gc\"]\ntimeout-ms = 50\n[settings]\nmode = \"loop\"\n");
    let root = tempfile::tempdir().unwrap();
    let engine = engine(root.path(), &registry, Some(plugins.path()));
    for (index, reference) in models.references.iter().enumerate() {
        let record = engine.mount(request(&format!("v{index}"), reference)).await.unwrap();
        engine.unmount(&record.volume, &record.mount_id).await.unwrap();
    }
    let report = engine.gc(false, Trigger::OnDemand).await.unwrap();
    assert_eq!(report.candidates, 2);
    assert!(report.evicted.is_empty());
    let causes: Vec<&str> = report.failures.iter().map(|failure| failure.cause.label()).collect();
    assert_eq!(causes, ["trap", "timeout"]);
    assert_eq!(engine.store().entries().unwrap().len(), 2);
}

/// A pin asked for during a GC run answers only once the run is over: the
/// run chose with the pins it read at its start, and a pin that has answered
/// must hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pin_waits_for_the_gc_run_under_way() {
    let Some(registry) = start_registry() else { return };
    let models = publish_models(&registry, "pin-during", 1, 1, 8 * KIB);
    let plugins = PluginDir::new();
    plugins.add("hostile-policy", "slow");
    plugins.configure("slow", "decisions = [\"gc\"]\ntimeout-ms = 1000\n[settings]\nmode = \"loop\"\n");
    let root = tempfile::tempdir().unwrap();
    let engine = engine(root.path(), &registry, Some(plugins.path()));
    let record = engine.mount(request("v", &models.references[0])).await.unwrap();
    engine.unmount(&record.volume, &record.mount_id).await.unwrap();

    let run = tokio::spawn({
        let engine = engine.clone();
        async move { engine.gc(false, Trigger::OnDemand).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!run.is_finished(), "the gc run should still be deciding");
    // The run's plugin loops until its 1 s deadline: a pin that did not
    // wait answers in milliseconds.
    let asked = Instant::now();
    engine.pin(&models.references[0]).await.unwrap();
    assert!(asked.elapsed() >= Duration::from_millis(500), "the pin answered during the gc run ({:?})", asked.elapsed());
    assert_eq!(run.await.unwrap().unwrap().candidates, 1);
}

/// Pins keep entries from GC; a dry run changes nothing; `du` names who
/// references what and its total matches `du -sb` of the root.
#[test]
fn pins_dry_runs_and_du() {
    let Some(registry) = start_registry() else { return };
    let models = publish_models(&registry, "pins", 3, 2, 64 * KIB);
    let plugins = evict_everything();
    let root = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let output = cli(root.path(), &registry, plugins.path(), args).output().unwrap();
        assert!(output.status.success(), "{args:?}: {}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8(output.stdout).unwrap()
    };
    for (index, reference) in models.references.iter().enumerate() {
        run(&["mount", reference, "--volume", &format!("v{index}")]);
    }
    run(&["unmount", "--volume", "v1"]);
    run(&["unmount", "--volume", "v2"]);
    let pinned = run(&["pin", &models.references[2]]);
    assert!(pinned.starts_with("pinned sha256:"), "{pinned}");
    assert!(run(&["pin"]).contains(&models.references[2]));

    let du: serde_json::Value = serde_json::from_str(&run(&["du", "--json"])).unwrap();
    let entries = du["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 3);
    let referenced: Vec<&serde_json::Value> =
        entries.iter().filter(|entry| !entry["referenced-by"].as_array().unwrap().is_empty()).collect();
    assert_eq!(referenced.len(), 1);
    assert_eq!(referenced[0]["referenced-by"][0], "v0/default");
    for entry in entries {
        let on_disk = entry["bytes-on-disk"].as_u64().unwrap();
        assert_eq!(on_disk, 2 * 64 * KIB as u64);
        // A referenced entry shares its files with its volume.
        let expected_exclusive = if entry["referenced-by"].as_array().unwrap().is_empty() { on_disk } else { 0 };
        assert_eq!(entry["exclusive-bytes"].as_u64().unwrap(), expected_exclusive, "{entry}");
    }
    let output = std::process::Command::new("du").args(["-sb"]).arg(root.path()).output().unwrap();
    let du_total: u64 = String::from_utf8_lossy(&output.stdout).split_whitespace().next().unwrap().parse().unwrap();
    let totals = &du["totals"];
    assert_eq!(totals["total"].as_u64().unwrap(), du_total, "reconciles with du -sb");
    let parts: u64 =
        ["entries", "unreferenced", "volume-copies", "metadata"].iter().map(|part| totals[part].as_u64().unwrap()).sum();
    assert_eq!(parts, du_total);
    assert!(run(&["du"]).contains("v0/default"));

    let dry = run(&["gc", "--dry-run"]);
    assert!(dry.contains("would evict") && dry.contains("chosen by gc-lru-watermark"), "{dry}");
    assert!(dry.contains("1 of 1 candidates"), "only the unpinned, unreferenced entry: {dry}");
    let (store, _) = modelcache::store::Store::open(root.path()).unwrap();
    assert_eq!(store.entries().unwrap().len(), 3, "a dry run changes nothing");
    drop(store);

    let done = run(&["gc"]);
    assert!(done.contains("evicted") && done.contains("1 of 1 candidates"), "{done}");
    run(&["unpin", &models.references[2]]);
    let done = run(&["gc"]);
    assert!(done.contains("1 of 1 candidates"), "{done}");
    let (store, _) = modelcache::store::Store::open(root.path()).unwrap();
    let left = store.entries().unwrap();
    assert_eq!(left.len(), 1, "only the referenced entry stays");
}

/// A quota deny triggers GC, and quota is asked once more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quota_deny_runs_gc_then_asks_again() {
    let Some(registry) = start_registry() else { return };
    let models = publish_models(&registry, "room", 2, 1, 12 * MIB);
    let plugins = evict_everything();
    plugins.add("quota-watermark", "quota-watermark");
    plugins.configure("quota-watermark", "[settings]\nlimit = \"20MiB\"\n");
    let root = tempfile::tempdir().unwrap();
    let engine = engine(root.path(), &registry, Some(plugins.path()));
    let first = engine.mount(request("a", &models.references[0])).await.unwrap();
    let first_key = first.entry().unwrap();
    engine.unmount(&first.volume, &first.mount_id).await.unwrap();
    let second = engine.mount(request("b", &models.references[1])).await.expect("admitted after GC made room");
    assert_eq!(second.state(), VolumeState::Ready);
    assert!(!engine.store().has_entry(&first_key), "the unused model made room");
}

/// Periodic GC collects an unused entry without being asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn periodic_gc_collects() {
    let Some(registry) = start_registry() else { return };
    let models = publish_models(&registry, "periodic", 1, 1, 8 * KIB);
    let plugins = evict_everything();
    let root = tempfile::tempdir().unwrap();
    let engine = engine(root.path(), &registry, Some(plugins.path()));
    let record = engine.mount(request("v", &models.references[0])).await.unwrap();
    let key = record.entry().unwrap();
    let periodic = engine.spawn_periodic_gc(Duration::from_millis(50));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(engine.store().has_entry(&key), "referenced entries stay");
    engine.unmount(&record.volume, &record.mount_id).await.unwrap();
    let started = Instant::now();
    while engine.store().has_entry(&key) {
        assert!(started.elapsed() < Duration::from_secs(10), "the periodic run never collected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    periodic.abort();
}

/// A GC run prunes released records older than the GC grace and the volume
/// directories they leave empty; ready and younger released volumes keep
/// theirs, and a pruned volume can be mounted again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gc_prunes_released_records_and_empty_volume_directories() {
    let Some(registry) = start_registry() else { return };
    let models = publish_models(&registry, "prune", 1, 1, 8 * KIB);
    let reference = &models.references[0];
    let root = tempfile::tempdir().unwrap();
    let mut config = EngineConfig::new(root.path());
    config.registry = RegistryConfig { insecure: vec![registry.host()], ..RegistryConfig::default() };
    config.gc_grace = Duration::from_secs(1);
    let engine = Engine::open(config).expect("engine");
    for volume in ["old", "kept", "young"] {
        engine.mount(request(volume, reference)).await.unwrap();
    }
    let old = VolumeId::new("old").unwrap();
    engine.unmount(&old, &MountId::default()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    engine.unmount(&VolumeId::new("young").unwrap(), &MountId::default()).await.unwrap();

    let report = engine.gc(false, Trigger::OnDemand).await.unwrap();
    let (records, volumes) = (root.path().join("records"), root.path().join("volumes"));
    let mut pruned = report.records.clone();
    pruned.sort();
    assert_eq!(pruned, [records.join("old"), records.join("old/default.json"), volumes.join("old"), volumes.join("young")]);
    assert!(!records.join("old").exists() && !volumes.join("old").exists());
    let listed: Vec<_> = engine.list().into_iter().map(|record| (record.volume.to_string(), record.state())).collect();
    assert_eq!(listed, [("kept".to_owned(), VolumeState::Ready), ("young".to_owned(), VolumeState::Released)]);
    assert_eq!(read_tree(&volumes.join("kept/default")), models.trees[0]);

    let dry = engine.gc(true, Trigger::OnDemand).await.unwrap();
    assert!(dry.records.is_empty(), "a dry run prunes nothing");
    let again = engine.mount(request("old", reference)).await.unwrap();
    assert_eq!(read_tree(&again.path), models.trees[0]);
}
