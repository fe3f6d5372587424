//! The plugin runtime with real compiled components: the reference policies,
//! composition, settings, reload, and hostile plugins.

use crate::support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use modelcache::plugins::exclude::{Artifact, ExcludeError, ExcludeInput, ExcludeOptions, ModelFile};
use modelcache::plugins::gc::{Candidate, GcInput};
use modelcache::plugins::quota::{Filesystem, QuotaInput, QuotaVerdict};
use modelcache::plugins::{CompiledCache, Decision, FailureCause, PluginError, PluginHost, PluginSet, Runtime, RuntimeOptions};
use support::PluginDir;

const GIB: u64 = 1 << 30;

fn runtime() -> Arc<Runtime> {
    Runtime::new(RuntimeOptions::default()).expect("plugin runtime")
}

fn host(dir: &PluginDir) -> PluginHost {
    PluginHost::open(runtime(), Some(CompiledCache::new(support::component_cache())), Some(dir.path().to_owned()))
}

fn file(path: &str, media_type: &str) -> ModelFile {
    ModelFile { path: path.into(), size: 10, media_type: media_type.into(), layer_digest: format!("sha256:{path}") }
}

fn exclude_input(exclude_weights: bool, patterns: &[&str]) -> ExcludeInput {
    ExcludeInput {
        requester: Default::default(),
        artifact: Artifact {
            reference: "registry.local/models/tiny:1".into(),
            manifest_digest: "sha256:feed".into(),
            annotations: Default::default(),
        },
        files: vec![
            file("model.safetensors", "application/vnd.cncf.model.weight.v1.raw"),
            file("config.json", "application/vnd.cncf.model.weight.config.v1.raw"),
            file("README.md", "application/vnd.cncf.model.doc.v1.raw"),
            file("docs/guide.md", "application/vnd.cncf.model.doc.v1.raw"),
            file("extra/pytorch_model.bin", "application/octet-stream"),
        ],
        options: ExcludeOptions { exclude_weights, patterns: patterns.iter().map(|p| p.to_string()).collect() },
    }
}

fn skipped(set: &PluginSet, input: &ExcludeInput) -> Vec<String> {
    set.exclude(input.clone()).expect("exclude decision").skips.into_iter().map(|skip| skip.path).collect()
}

fn quota_input(cache: u64, reserved: u64, incoming: u64) -> QuotaInput {
    QuotaInput {
        requester: Default::default(),
        reference: "registry.local/models/tiny:1".into(),
        manifest_digest: "sha256:feed".into(),
        incoming_bytes: incoming,
        cache_bytes: cache,
        reserved_bytes: reserved,
        filesystem: Filesystem { total_bytes: 100 * GIB, free_bytes: 60 * GIB },
    }
}

fn candidate(key: &str, last_used_at: u64) -> Candidate {
    Candidate {
        key: key.into(),
        manifest_digest: format!("sha256:{key}"),
        references: vec![format!("registry.local/{key}:1")],
        bytes_on_disk: 10 * GIB,
        exclusive_bytes: 10 * GIB,
        created_at: 0,
        last_used_at,
        use_count: 3,
    }
}

fn gc_input(used: u64, candidates: Vec<Candidate>) -> GcInput {
    GcInput {
        filesystem: Filesystem { total_bytes: 100 * GIB, free_bytes: 100 * GIB - used },
        cache_bytes: used,
        now: 1_000_000,
        candidates,
    }
}

/// The three reference plugins load from a directory and each makes its
/// decision through the real runtime.
#[test]
fn reference_plugins_decide() {
    let dir = PluginDir::reference();
    let host = host(&dir);
    let set = host.current();
    let loaded: Vec<(&str, Vec<Decision>)> = set.plugins().iter().map(|plugin| (plugin.name(), plugin.decisions())).collect();
    assert_eq!(
        loaded,
        [
            ("exclude-patterns", vec![Decision::Exclude]),
            ("gc-lru-watermark", vec![Decision::Gc]),
            ("quota-watermark", vec![Decision::Quota]),
        ]
    );

    assert_eq!(skipped(&set, &exclude_input(true, &[])), ["model.safetensors", "extra/pytorch_model.bin"]);
    assert_eq!(skipped(&set, &exclude_input(false, &["docs/", "!docs/keep.md"])), ["docs/guide.md"]);
    assert!(skipped(&set, &exclude_input(false, &[])).is_empty());
    let reasons = set.exclude(exclude_input(false, &["*.md"])).unwrap().skips;
    assert_eq!(reasons[0].reason, "matches `*.md`");
    assert_eq!(reasons[0].plugin, "exclude-patterns");

    // Default limit 80% of 100 GiB.
    assert_eq!(set.quota(&quota_input(50 * GIB, 10 * GIB, 20 * GIB)).verdict, QuotaVerdict::Admit);
    let QuotaVerdict::Deny { reason, plugin } = set.quota(&quota_input(50 * GIB, 10 * GIB, 21 * GIB)).verdict else {
        panic!("expected a deny")
    };
    assert_eq!(plugin.as_deref(), Some("quota-watermark"));
    assert!(reason.contains("81.0 GiB exceeds the limit of 80.0 GiB"), "{reason}");

    // 90% used: evict least recently used until under 75%.
    let decision = set.gc(gc_input(90 * GIB, vec![candidate("b", 500), candidate("a", 100), candidate("c", 900)]));
    assert_eq!(decision.keys(), ["a", "b"]);
    assert_eq!(decision.evict[0].plugin, "gc-lru-watermark");
    assert!(decision.failures.is_empty());
    assert!(set.gc(gc_input(50 * GIB, vec![candidate("a", 100)])).evict.is_empty());
}

/// Several plugins per decision: exclude unions, quota needs every admit,
/// gc unions in plugin order; `order` sets the order.
#[test]
fn plugins_compose_in_order() {
    let dir = PluginDir::new();
    dir.add("exclude-patterns", "docs-out");
    dir.configure("docs-out", "[settings]\npatterns = [\"docs/\"]\n");
    dir.add("exclude-patterns", "readme-out");
    dir.configure("readme-out", "[settings]\npatterns = [\"README.md\"]\n");
    dir.add("quota-watermark", "roomy");
    dir.configure("roomy", "[settings]\nlimit = \"90%\"\n");
    dir.add("quota-watermark", "tight");
    dir.configure("tight", "[settings]\nlimit = \"10GiB\"\n");
    dir.add("gc-lru-watermark", "ttl");
    dir.configure("ttl", "order = 1\n[settings]\nttl = \"1h\"\ngrace = \"0s\"\nhigh = \"100%\"\nlow = \"100%\"\n");
    dir.add("gc-lru-watermark", "lru");
    dir.configure("lru", "order = 2\n[settings]\ngrace = \"0s\"\n");
    let host = host(&dir);
    let set = host.current();

    let skips = set.exclude(exclude_input(false, &[])).unwrap().skips;
    let by_plugin: Vec<(&str, &str)> = skips.iter().map(|skip| (skip.path.as_str(), skip.plugin.as_str())).collect();
    assert_eq!(by_plugin, [("docs/guide.md", "docs-out"), ("README.md", "readme-out")]);

    assert_eq!(set.quota(&quota_input(GIB, 0, GIB)).verdict, QuotaVerdict::Admit);
    let QuotaVerdict::Deny { plugin, .. } = set.quota(&quota_input(5 * GIB, 0, 6 * GIB)).verdict else {
        panic!("the tight limit must deny")
    };
    assert_eq!(plugin.as_deref(), Some("tight"));

    // ttl (order 1) evicts the idle one first; lru (order 2) adds the rest
    // needed to get from 95% under 75%.
    let now = 1_000_000;
    let candidates = vec![candidate("fresh", now - 60), candidate("idle", now - 7_200), candidate("warm", now - 600)];
    let decision = set.gc(gc_input(95 * GIB, candidates));
    assert_eq!(decision.keys(), ["idle", "warm"]);
    assert_eq!((decision.evict[0].plugin.as_str(), decision.evict[1].plugin.as_str()), ("ttl", "lru"));
}

/// Invalid settings refuse that plugin with a message naming it and the
/// reason; the other plugins load and serve.
#[test]
fn invalid_settings_refuse_one_plugin() {
    let dir = PluginDir::reference();
    dir.configure("quota-watermark", "[settings]\nlimit = \"lots\"\n");
    dir.configure("exclude-patterns", "timeout = 3\n");
    let host = host(&dir);
    let set = host.current();
    let status = |name: &str| set.statuses().iter().find(|status| status.name == name).unwrap().clone();

    let quota = status("quota-watermark");
    assert!(!quota.loaded);
    let error = quota.error.unwrap();
    assert!(error.contains("quota-watermark") && error.contains("settings rejected") && error.contains("lots"), "{error}");

    let exclude = status("exclude-patterns");
    assert!(!exclude.loaded);
    assert!(exclude.error.unwrap().contains("unknown field `timeout`"));

    assert!(status("gc-lru-watermark").loaded);
    // Quota falls back to the built-in rule: 60 GiB free, keep 5 GiB.
    assert_eq!(set.quota(&quota_input(0, 0, 50 * GIB)).verdict, QuotaVerdict::Admit);
}

/// A reload whose new version is broken keeps the last good version serving
/// and reports the error; a fixed version then takes over.
#[test]
fn reload_keeps_the_last_good_version() {
    let dir = PluginDir::reference();
    let host = host(&dir);
    let before = host.current();
    let good = before.statuses().iter().find(|status| status.name == "exclude-patterns").unwrap().sha256.clone();

    std::fs::write(dir.path().join("exclude-patterns.wasm"), b"\0asm\x0d\0\x01\0 truncated").unwrap();
    let broken = host.reload();
    let status = broken.statuses().iter().find(|status| status.name == "exclude-patterns").unwrap();
    assert!(status.loaded, "the previous version keeps serving");
    assert_eq!(status.sha256, good);
    assert!(status.error.as_deref().unwrap().contains("not a WebAssembly component"), "{:?}", status.error);
    assert_eq!(skipped(&broken, &exclude_input(false, &["*.md"])), ["README.md", "docs/guide.md"]);
    // The set that was current before the reload is untouched.
    assert_eq!(skipped(&before, &exclude_input(false, &["*.md"])), ["README.md", "docs/guide.md"]);

    dir.add("hostile-policy", "exclude-patterns");
    dir.configure("exclude-patterns", "decisions = [\"exclude\"]\n");
    let fixed = host.reload();
    let status = fixed.statuses().iter().find(|status| status.name == "exclude-patterns").unwrap();
    assert!(status.loaded && status.error.is_none());
    assert_ne!(status.sha256, good);
    assert_eq!(skipped(&fixed, &exclude_input(false, &[])), ["README.md", "docs/guide.md"]);

    std::fs::remove_file(dir.path().join("exclude-patterns.wasm")).unwrap();
    std::fs::remove_file(dir.path().join("exclude-patterns.toml")).unwrap();
    let removed = host.reload();
    assert!(removed.statuses().iter().all(|status| status.name != "exclude-patterns"));
    assert!(matches!(removed.exclude(exclude_input(true, &[])), Err(ExcludeError::Unserved)));
}

/// An endless loop is stopped within twice its deadline, the fail mode
/// applies, and the other plugins keep serving.
#[test]
fn endless_loop_times_out() {
    let dir = PluginDir::reference();
    dir.add("hostile-policy", "looper");
    dir.configure("looper", "timeout-ms = 200\n[settings]\nmode = \"loop\"\n");
    let host = host(&dir);
    let set = host.current();

    let started = Instant::now();
    let decision = set.exclude(exclude_input(false, &["*.md"])).unwrap();
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_millis(400), "took {elapsed:?}");
    // Fail open: the looper skips nothing, exclude-patterns still answers.
    assert_eq!(decision.skips.iter().map(|skip| skip.path.as_str()).collect::<Vec<_>>(), ["README.md", "docs/guide.md"]);
    assert_eq!(decision.failures.len(), 1);
    assert_eq!(decision.failures[0].plugin, "looper");
    assert_eq!(decision.failures[0].cause, FailureCause::Timeout(Duration::from_millis(200)));

    // Quota fails closed by default: a deny naming the plugin and the cause.
    let QuotaVerdict::Deny { reason, plugin } = set.quota(&quota_input(0, 0, 1)).verdict else {
        panic!("a timed-out quota plugin must deny")
    };
    assert_eq!(plugin.as_deref(), Some("looper"));
    assert!(reason.contains("looper") && reason.contains("timeout"), "{reason}");

    // gc evicts nothing on a failing plugin's word.
    let decision = set.gc(gc_input(10 * GIB, vec![candidate("a", 1)]));
    assert!(decision.evict.is_empty());
    assert_eq!(decision.failures[0].cause.label(), "timeout");
}

/// A plugin asleep in WASI (`std::thread::sleep`, a blocking clock
/// pollable) is stopped at its deadline like one spinning in wasm: each
/// decision ends within a few deadlines, not after the 30 s sleep, reported
/// as a timeout, and the plugin's fail mode applies.
#[test]
fn sleeping_in_wasi_times_out() {
    let dir = PluginDir::new();
    dir.add("hostile-policy", "sleeper");
    dir.configure("sleeper", "timeout-ms = 200\n[settings]\nmode = \"sleep\"\n[fail-mode]\nexclude = \"closed\"\n");
    let host = host(&dir);
    let set = host.current();
    let timeout = FailureCause::Timeout(Duration::from_millis(200));
    let bounded = |what: &str, started: Instant| {
        let elapsed = started.elapsed();
        assert!(elapsed < Duration::from_secs(1), "{what} took {elapsed:?} under a 200 ms deadline");
    };

    // Exclude, configured closed: the decision fails, naming the timeout.
    let started = Instant::now();
    let Err(ExcludeError::Failed(failure)) = set.exclude(exclude_input(false, &[])) else {
        panic!("a closed exclude plugin that times out fails the decision")
    };
    bounded("exclude", started);
    assert_eq!((failure.plugin.as_str(), &failure.cause), ("sleeper", &timeout));

    // Quota fails closed by default: a deny naming the plugin and the timeout.
    let started = Instant::now();
    let QuotaVerdict::Deny { reason, plugin } = set.quota(&quota_input(0, 0, 1)).verdict else {
        panic!("a timed-out quota plugin must deny")
    };
    bounded("quota", started);
    assert_eq!(plugin.as_deref(), Some("sleeper"));
    assert!(reason.contains("sleeper") && reason.contains("timeout"), "{reason}");

    // GC fails open by default: nothing evicted on its word, the failure reported.
    let started = Instant::now();
    let decision = set.gc(gc_input(10 * GIB, vec![candidate("a", 1)]));
    bounded("gc", started);
    assert!(decision.evict.is_empty());
    assert_eq!(decision.failures[0].cause, timeout);
}

/// A validate-settings asleep in WASI is a timely refusal, so a start or a
/// reload is not held up by it.
#[test]
fn validate_settings_sleeping_in_wasi_times_out() {
    let dir = PluginDir::new();
    dir.add("hostile-policy", "slow-start");
    dir.configure("slow-start", "timeout-ms = 200\n[settings]\nvalidate-mode = \"sleep\"\n");
    dir.add("hostile-policy", "well");
    // The first load may compile the components; the sleep is 30 s.
    let started = Instant::now();
    let host = host(&dir);
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(10), "loading took {elapsed:?} under a 200 ms deadline");
    let set = host.current();
    let status = set.statuses().iter().find(|status| status.name == "slow-start").unwrap();
    assert!(!status.loaded);
    let error = status.error.as_deref().unwrap();
    assert!(error.contains("validate-settings failed: timeout: ran past its 200 ms deadline"), "{error}");
    assert_eq!(set.plugins().iter().map(|plugin| plugin.name()).collect::<Vec<_>>(), ["well"]);

    // A reload (compiled components now cached) validates again, as quickly.
    let started = Instant::now();
    let set = host.reload();
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(1), "reloading took {elapsed:?} under a 200 ms deadline");
    assert!(!set.statuses().iter().find(|status| status.name == "slow-start").unwrap().loaded);
}

/// A plugin that grows past its memory cap fails that call only.
#[test]
fn memory_cap_fails_the_call_only() {
    let dir = PluginDir::new();
    dir.add("hostile-policy", "grower");
    dir.configure(
        "grower",
        "decisions = [\"exclude\"]\nmemory-mib = 32\n[settings]\nmode = \"grow\"\n[fail-mode]\nexclude = \"closed\"\n",
    );
    dir.add("hostile-policy", "well");
    dir.configure("well", "decisions = [\"quota\"]\n");
    let host = host(&dir);
    let set = host.current();

    let Err(ExcludeError::Failed(failure)) = set.exclude(exclude_input(false, &[])) else {
        panic!("a closed exclude plugin that runs out of memory fails the decision")
    };
    assert_eq!(failure.cause, FailureCause::OutOfMemory(32 << 20));
    // The same plugin is called again from a fresh instance, and another
    // plugin serves meanwhile.
    assert!(matches!(set.exclude(exclude_input(false, &[])), Err(ExcludeError::Failed(_))));
    assert_eq!(set.quota(&quota_input(0, 0, 1)).verdict, QuotaVerdict::Admit);
}

/// A panic is a trap that fails that call; lies and refusals are failures too.
#[test]
fn traps_lies_and_refusals_fail_the_call() {
    let dir = PluginDir::new();
    for mode in ["panic", "lie", "refuse"] {
        dir.add("hostile-policy", mode);
        dir.configure(mode, &format!("[settings]\nmode = \"{mode}\"\n"));
    }
    let host = host(&dir);
    let set = host.current();
    let decision = set.exclude(exclude_input(false, &[])).unwrap();
    assert!(decision.skips.is_empty());
    let causes: Vec<(&str, &FailureCause)> =
        decision.failures.iter().map(|failure| (failure.plugin.as_str(), &failure.cause)).collect();
    assert!(matches!(causes[0], ("lie", FailureCause::InvalidOutput(message)) if message.contains("../not-in-the-model")));
    assert!(matches!(causes[1], ("panic", FailureCause::Trap(message)) if message.contains("unreachable")), "{causes:?}");
    assert!(matches!(causes[2], ("refuse", FailureCause::PluginError(message)) if message == "hostile policy refuses"));

    let gc = set.gc(gc_input(GIB, vec![candidate("a", 1)]));
    assert!(gc.evict.is_empty());
    assert!(
        gc.failures.iter().any(|failure| matches!(&failure.cause, FailureCause::InvalidOutput(m) if m.contains("no-such-key")))
    );
}

/// A validate-settings that loops is a refusal, not a hang.
#[test]
fn validate_settings_is_bounded_too() {
    let dir = PluginDir::new();
    dir.add("hostile-policy", "slow-start");
    dir.configure("slow-start", "timeout-ms = 50\n[settings]\nvalidate-mode = \"loop\"\n");
    let host = host(&dir);
    let set = host.current();
    let status = &set.statuses()[0];
    assert!(!status.loaded);
    assert!(status.error.as_deref().unwrap().contains("validate-settings failed: timeout"), "{status:?}");
}

const FILESYSTEM_IMPORT: &str = r#"
(component
  (import "wasi:filesystem/preopens@0.2.0" (instance (export "marker" (func))))
  (core module $m (func (export "f")))
  (core instance $i (instantiate $m))
  (func $f (canon lift (core func $i "f")))
  (instance $exports (export "decide" (func $f)))
  (export "modelcache:policy/exclude@0.1.0" (instance $exports))
)"#;

const SOCKETS_IMPORT: &str = r#"
(component
  (import "wasi:sockets/tcp@0.2.0" (instance (export "marker" (func))))
)"#;

const MAJOR_ONE: &str = r#"
(component
  (core module $m (func (export "f")))
  (core instance $i (instantiate $m))
  (func $f (canon lift (core func $i "f")))
  (instance $exports (export "decide" (func $f)))
  (export "modelcache:policy/exclude@1.0.0" (instance $exports))
  (export "modelcache:policy/settings@1.0.0" (instance $exports))
)"#;

const NOT_A_COMPONENT: &str = "(module (func (export \"decide\")))";

/// Components that import filesystem or sockets, that speak another major
/// version, or that are no component at all are refused at load with a
/// message naming the reason; the good plugins load beside them.
#[test]
fn structural_refusals() {
    let dir = PluginDir::reference();
    dir.add_wat("reads-files", FILESYSTEM_IMPORT);
    dir.add_wat("opens-sockets", SOCKETS_IMPORT);
    dir.add_wat("from-the-future", MAJOR_ONE);
    dir.add_wat("core-module", NOT_A_COMPONENT);
    let host = host(&dir);
    let set = host.current();
    let error = |name: &str| {
        let status = set.statuses().iter().find(|status| status.name == name).unwrap();
        assert!(!status.loaded, "{name} must be refused");
        status.error.clone().unwrap()
    };
    let files = error("reads-files");
    assert!(files.contains("imports `wasi:filesystem/preopens@0.2.0`") && files.contains("--stub-wasi"), "{files}");
    assert!(error("opens-sockets").contains("imports `wasi:sockets/tcp@0.2.0`"));
    let future = error("from-the-future");
    assert!(future.contains("modelcache:policy@1.0.0") && future.contains("modelcache:policy@0.1.0"), "{future}");
    assert!(error("core-module").contains("not a WebAssembly component"));
    assert_eq!(set.plugins().len(), 3);
    assert_eq!(skipped(&set, &exclude_input(true, &[])).len(), 2);
}

/// Loading goes through the same checks when called directly, returning a
/// typed error.
#[test]
fn direct_load_returns_typed_errors() {
    let dir = PluginDir::new();
    let path = dir.add_wat("future", MAJOR_ONE);
    let error = modelcache::plugins::Plugin::load(&runtime(), None, &path, Default::default()).unwrap_err();
    assert!(matches!(&error, PluginError::IncompatibleVersion { found, .. } if found == "1.0.0"));
    let path = dir.add("exclude-patterns", "exclude-patterns");
    let config = modelcache::plugins::PluginConfig { decisions: Some(vec![Decision::Gc]), ..Default::default() };
    let error = modelcache::plugins::Plugin::load(&runtime(), None, &path, config).unwrap_err();
    assert!(matches!(error, PluginError::DecisionNotExported { decision: Decision::Gc, .. }));
}

/// The runtime falls back from pooling when asked not to pool, and serves
/// the same answers either way.
#[test]
fn on_demand_allocation_serves_too() {
    let dir = PluginDir::reference();
    let runtime = Runtime::new(RuntimeOptions { pooling: false }).unwrap();
    assert_eq!(runtime.allocation(), modelcache::plugins::Allocation::OnDemand);
    let host = PluginHost::open(runtime, None, Some(dir.path().to_owned()));
    assert_eq!(skipped(&host.current(), &exclude_input(true, &[])).len(), 2);
}

/// `plugins ls` shows each plugin's decisions, or why it was refused.
#[test]
fn cli_lists_plugins() {
    let dir = PluginDir::reference();
    dir.add_wat("from-the-future", MAJOR_ONE);
    let output = support::modelcache()
        .args(["plugins", "ls", "--dir"])
        .arg(dir.path())
        .arg("--cache-dir")
        .arg(support::component_cache())
        .output()
        .unwrap();
    assert!(output.status.success());
    let stdout = String::from_utf8(output.stdout).unwrap();
    let line = |name: &str| stdout.lines().find(|line| line.starts_with(name)).unwrap_or_else(|| panic!("{stdout}"));
    assert!(line("exclude-patterns").contains("loaded") && line("exclude-patterns").contains("exclude"));
    assert!(line("quota-watermark").contains("quota"));
    assert!(line("from-the-future").contains("refused") && line("from-the-future").contains("1.0.0"));
}

/// A reader that stops early (`modelcache plugins ls | head -0`) ends the
/// command quietly: no panic, success.
#[test]
fn cli_output_into_a_closed_pipe() {
    let dir = PluginDir::reference();
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let output = support::modelcache()
        .args(["plugins", "ls", "--dir"])
        .arg(dir.path())
        .arg("--cache-dir")
        .arg(support::component_cache())
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success() && !stderr.contains("panicked"), "{:?}: {stderr}", output.status);
}

/// `plugins run` prints the JSON answer; a failing call prints its cause and
/// exits non-zero; the plugin's own output reaches the logs under its name.
#[test]
fn cli_runs_one_decision() {
    let dir = PluginDir::reference();
    let input = dir.path().join("input.json");
    std::fs::write(&input, serde_json::to_string(&exclude_input(true, &["docs/"])).unwrap()).unwrap();
    let output = support::modelcache()
        .args(["plugins", "run"])
        .arg(dir.path().join("exclude-patterns.wasm"))
        .args(["--decision", "exclude", "--input"])
        .arg(&input)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let answer: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let paths: Vec<&str> = answer["skips"].as_array().unwrap().iter().map(|skip| skip["path"].as_str().unwrap()).collect();
    assert_eq!(paths, ["model.safetensors", "docs/guide.md", "extra/pytorch_model.bin"]);

    let quota_input_path = dir.path().join("quota.json");
    std::fs::write(&quota_input_path, serde_json::to_string(&quota_input(0, 0, 90 * GIB)).unwrap()).unwrap();
    let settings = dir.path().join("limit.toml");
    std::fs::write(&settings, "limit = \"95%\"\n").unwrap();
    let output = support::modelcache()
        .args(["plugins", "run"])
        .arg(dir.path().join("quota-watermark.wasm"))
        .args(["--decision", "quota", "--input"])
        .arg(&quota_input_path)
        .arg("--settings")
        .arg(&settings)
        .output()
        .unwrap();
    let answer: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(answer["verdict"], "admit", "{}", String::from_utf8_lossy(&output.stderr));

    let chatty = dir.add("hostile-policy", "chatty");
    dir.configure("chatty", "[settings]\nmode = \"chatty\"\n");
    let output = support::modelcache()
        .args(["plugins", "run"])
        .arg(&chatty)
        .args(["--decision", "exclude", "--input"])
        .arg(&input)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.lines().any(|line| line.contains("hello from the policy's stdout") && line.contains("plugin=chatty")),
        "{stderr}"
    );
    assert!(
        stderr.lines().any(|line| line.contains("hello from the policy's stderr") && line.contains("stream=stderr")),
        "{stderr}"
    );

    let panicky = dir.add("hostile-policy", "panicky");
    dir.configure("panicky", "[settings]\nmode = \"panic\"\n");
    let output = support::modelcache()
        .args(["plugins", "run"])
        .arg(&panicky)
        .args(["--decision", "gc", "--input"])
        .arg(&input)
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("not a valid gc input"));

    let gc_input_path = dir.path().join("gc.json");
    std::fs::write(&gc_input_path, serde_json::to_string(&gc_input(GIB, vec![candidate("a", 1)])).unwrap()).unwrap();
    let output = support::modelcache()
        .args(["plugins", "run"])
        .arg(&panicky)
        .args(["--decision", "gc", "--input"])
        .arg(&gc_input_path)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("gc plugin `panicky` failed: trap"), "{stderr}");
    assert!(stderr.contains("hostile policy panics on purpose"), "the panic message reaches the log: {stderr}");
}
