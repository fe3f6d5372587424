//! Policy cost: median and p99 of one decision (fresh instance + call) for
//! each reference plugin, with the pooling allocator and with on-demand
//! allocation, beside the same policy compiled natively as the reference.
//!
//! `cargo bench --bench policy` (add `-- --quick` for a smoke run).
//! Goals: exclude over 100 files ≤ 150 µs median; gc over 100,000 candidates
//! ≤ 200 ms median. Neither is on a warm mount's path: an exclude answer is
//! remembered, and GC runs on a schedule (`scripts/bench` counts the plugin
//! calls of warm mounts: none).

#[path = "../../tests/it/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use modelcache::plugins::exclude::{Artifact, ExcludeInput, ExcludeOptions, ModelFile};
use modelcache::plugins::gc::{Candidate, GcInput};
use modelcache::plugins::quota::{Filesystem, QuotaInput};
use modelcache::plugins::{CompiledCache, Plugin, PluginConfig, Runtime, RuntimeOptions};

const GIB: u64 = 1 << 30;

/// A benchmark row: its label, the plugin, iterations, the call through
/// the plugin and the same decision made natively.
type Row<'a> = (&'a str, Plugin, usize, Box<dyn Fn(&Plugin) + 'a>, Box<dyn Fn() + 'a>);

fn exclude_input() -> ExcludeInput {
    let files = (0..100)
        .map(|index| {
            let (path, media_type) = match index % 4 {
                0 => (format!("model-{index:05}-of-00100.safetensors"), "application/vnd.cncf.model.weight.v1.raw"),
                1 => (format!("configs/layer-{index}.json"), "application/vnd.cncf.model.weight.config.v1.raw"),
                2 => (format!("docs/part-{index}.md"), "application/vnd.cncf.model.doc.v1.raw"),
                _ => (format!("code/module_{index}.py"), "application/vnd.cncf.model.code.v1.raw"),
            };
            ModelFile { path, size: 1 << 20, media_type: media_type.into(), layer_digest: format!("sha256:{index:064x}") }
        })
        .collect();
    ExcludeInput {
        requester: Default::default(),
        artifact: Artifact {
            reference: "registry.local/models/bench:1".into(),
            manifest_digest: format!("sha256:{:064x}", 1),
            annotations: Default::default(),
        },
        files,
        options: ExcludeOptions { exclude_weights: true, patterns: vec!["docs/".into(), "!docs/part-2.md".into()] },
    }
}

fn quota_input() -> QuotaInput {
    QuotaInput {
        requester: Default::default(),
        reference: "registry.local/models/bench:1".into(),
        manifest_digest: format!("sha256:{:064x}", 1),
        incoming_bytes: 10 * GIB,
        cache_bytes: 300 * GIB,
        reserved_bytes: 20 * GIB,
        filesystem: Filesystem { total_bytes: 1000 * GIB, free_bytes: 600 * GIB },
    }
}

fn gc_input() -> GcInput {
    let candidates = (0..100_000u64)
        .map(|index| Candidate {
            key: format!("sha256:{index:064x}/full"),
            manifest_digest: format!("sha256:{index:064x}"),
            references: vec![format!("registry.local/models/m{index}:v1")],
            bytes_on_disk: GIB,
            exclusive_bytes: GIB / 2,
            created_at: 1_000,
            last_used_at: 1_000_000 + (index * 7_919) % 100_000,
            use_count: index % 13,
        })
        .collect();
    GcInput {
        filesystem: Filesystem { total_bytes: 200_000 * GIB, free_bytes: 10_000 * GIB },
        cache_bytes: 100_000 * GIB,
        now: 2_000_000,
        candidates,
    }
}

struct Stats {
    median: Duration,
    p99: Duration,
}

fn measure(iterations: usize, mut call: impl FnMut()) -> Stats {
    for _ in 0..iterations.div_ceil(10).max(1) {
        call();
    }
    let mut samples: Vec<Duration> = (0..iterations)
        .map(|_| {
            let started = Instant::now();
            call();
            started.elapsed()
        })
        .collect();
    samples.sort();
    Stats { median: samples[samples.len() / 2], p99: samples[(samples.len() * 99 / 100).min(samples.len() - 1)] }
}

fn micros(duration: Duration) -> String {
    format!("{:.1} µs", duration.as_secs_f64() * 1e6)
}

fn main() {
    let quick = std::env::args().any(|arg| arg == "--quick");
    let scale = if quick { 10 } else { 1 };
    let exclude = exclude_input();
    let quota = quota_input();
    let gc = gc_input();

    println!("policy cost per decision (fresh instance + call){}", if quick { " [quick]" } else { "" });
    println!("{:<20} {:<10} {:>12} {:>12} {:>12} {:>12}", "decision", "allocator", "median", "p99", "native", "vs native");
    let cache = CompiledCache::new(support::component_cache());
    for pooling in [true, false] {
        let runtime = Runtime::new(RuntimeOptions { pooling }).expect("runtime");
        // Generous limits: the benchmark measures, it does not enforce.
        let load = |name: &str| {
            let mut config = PluginConfig::default();
            config.limits.timeout = Duration::from_secs(10);
            config.limits.memory_bytes = 1 << 30;
            Plugin::load(&runtime, Some(&cache), &support::plugin_wasm(name), config).expect("plugin")
        };
        let allocator = format!("{:?}", runtime.allocation());
        let rows: [Row<'_>; 3] = [
            (
                "exclude/100 files",
                load("exclude-patterns"),
                5_000 / scale,
                Box::new(|plugin| drop(plugin.exclude(&exclude).expect("exclude"))),
                Box::new(native::exclude(&exclude)),
            ),
            (
                "quota",
                load("quota-watermark"),
                5_000 / scale,
                Box::new(|plugin| drop(plugin.quota(&quota).expect("quota"))),
                Box::new(native::quota(&quota)),
            ),
            (
                "gc/100k candidates",
                load("gc-lru-watermark"),
                30 / scale.min(10) + 3,
                Box::new(|plugin| drop(plugin.gc(&gc).expect("gc"))),
                Box::new(native::gc(&gc)),
            ),
        ];
        let only = std::env::var("MODELCACHE_BENCH_ONLY").ok();
        for (label, plugin, iterations, call, native_call) in rows {
            if only.as_deref().is_some_and(|only| !label.starts_with(only)) {
                continue;
            }
            let wasm = measure(iterations, || call(&plugin));
            let native = measure(iterations, native_call);
            println!(
                "{label:<20} {allocator:<10} {:>12} {:>12} {:>12} {:>11.1}x",
                micros(wasm.median),
                micros(wasm.p99),
                micros(native.median),
                wasm.median.as_secs_f64() / native.median.as_secs_f64().max(1e-9),
            );
        }
    }
    println!("goals: exclude/100 files median <= 150 µs; gc/100k candidates median <= 200000 µs");
}

/// The same policies compiled natively: the floor the sandbox is compared to.
mod native {
    use super::*;

    pub fn exclude(input: &ExcludeInput) -> impl Fn() + '_ {
        use exclude_patterns::exports::modelcache::policy::exclude as wit;
        let request = wit::Request {
            requester: exclude_patterns::modelcache::policy::types::Requester {
                namespace: None,
                pod: None,
                pod_uid: None,
                service_account: None,
                volume: None,
            },
            artifact: wit::Artifact {
                reference: input.artifact.reference.clone(),
                manifest_digest: input.artifact.manifest_digest.clone(),
                annotations: vec![],
            },
            files: input
                .files
                .iter()
                .map(|file| wit::ModelFile {
                    path: file.path.clone(),
                    size: file.size,
                    media_type: file.media_type.clone(),
                    layer_digest: file.layer_digest.clone(),
                })
                .collect(),
            options: exclude_patterns::modelcache::policy::types::Options {
                exclude_weights: input.options.exclude_weights,
                patterns: input.options.patterns.clone(),
            },
            settings: "{}".into(),
        };
        move || drop(std::hint::black_box(exclude_patterns::decide(&request)))
    }

    pub fn quota(input: &QuotaInput) -> impl Fn() + '_ {
        use quota_watermark::exports::modelcache::policy::quota as wit;
        use quota_watermark::modelcache::policy::types::Filesystem;
        let request = wit::Request {
            requester: quota_watermark::modelcache::policy::types::Requester {
                namespace: None,
                pod: None,
                pod_uid: None,
                service_account: None,
                volume: None,
            },
            reference: input.reference.clone(),
            manifest_digest: input.manifest_digest.clone(),
            incoming_bytes: input.incoming_bytes,
            cache_bytes: input.cache_bytes,
            reserved_bytes: input.reserved_bytes,
            filesystem: Filesystem { total_bytes: input.filesystem.total_bytes, free_bytes: input.filesystem.free_bytes },
            settings: "{}".into(),
        };
        move || drop(std::hint::black_box(quota_watermark::decide(&request)))
    }

    pub fn gc(input: &GcInput) -> impl Fn() + '_ {
        use gc_lru_watermark::exports::modelcache::policy::gc as wit;
        use gc_lru_watermark::modelcache::policy::types::Filesystem;
        let request = wit::Request {
            filesystem: Filesystem { total_bytes: input.filesystem.total_bytes, free_bytes: input.filesystem.free_bytes },
            cache_bytes: input.cache_bytes,
            now: input.now,
            candidates: input
                .candidates
                .iter()
                .map(|candidate| wit::Candidate {
                    key: candidate.key.clone(),
                    manifest_digest: candidate.manifest_digest.clone(),
                    references: candidate.references.clone(),
                    bytes_on_disk: candidate.bytes_on_disk,
                    exclusive_bytes: candidate.exclusive_bytes,
                    created_at: candidate.created_at,
                    last_used_at: candidate.last_used_at,
                    use_count: candidate.use_count,
                })
                .collect(),
            settings: "{}".into(),
        };
        // The clone stands for what lowering the input into the guest costs.
        move || drop(std::hint::black_box(gc_lru_watermark::decide(request.clone())))
    }
}
