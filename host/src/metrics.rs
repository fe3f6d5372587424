//! Process-wide counters, gauges and histograms, rendered in the Prometheus
//! text exposition format.
//!
//! One registry per process (like Prometheus' default registry): the engine,
//! the registry client and the plugin runtime count into [`metrics()`]
//! wherever the event happens, and the daemon renders it on scrape.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn add(&self, value: u64) {
        self.0.fetch_add(value, Ordering::Relaxed);
    }

    pub fn inc(&self) {
        self.add(1);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Counters by label values.
#[derive(Debug)]
pub struct CounterVec<const N: usize> {
    labels: [&'static str; N],
    values: Mutex<BTreeMap<[String; N], u64>>,
}

impl<const N: usize> CounterVec<N> {
    const fn new(labels: [&'static str; N]) -> Self {
        CounterVec { labels, values: Mutex::new(BTreeMap::new()) }
    }

    pub fn add(&self, values: [&str; N], amount: u64) {
        let key = values.map(str::to_owned);
        *self.values.lock().unwrap_or_else(|poison| poison.into_inner()).entry(key).or_default() += amount;
    }

    pub fn inc(&self, values: [&str; N]) {
        self.add(values, 1);
    }

    pub fn get(&self, values: [&str; N]) -> u64 {
        let key = values.map(str::to_owned);
        self.values.lock().unwrap_or_else(|poison| poison.into_inner()).get(&key).copied().unwrap_or(0)
    }
}

/// Latency buckets in seconds: 50 µs to 10 s.
const BUCKETS: [f64; 12] = [0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.1, 1.0, 10.0];

#[derive(Debug, Default, Clone)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

/// Histograms by label values.
#[derive(Debug)]
pub struct HistogramVec<const N: usize> {
    labels: [&'static str; N],
    values: Mutex<BTreeMap<[String; N], Histogram>>,
}

impl<const N: usize> HistogramVec<N> {
    const fn new(labels: [&'static str; N]) -> Self {
        HistogramVec { labels, values: Mutex::new(BTreeMap::new()) }
    }

    pub fn observe(&self, values: [&str; N], duration: Duration) {
        let seconds = duration.as_secs_f64();
        let key = values.map(str::to_owned);
        let mut map = self.values.lock().unwrap_or_else(|poison| poison.into_inner());
        let histogram = map.entry(key).or_default();
        for (bound, count) in BUCKETS.iter().zip(histogram.counts.iter_mut()) {
            if seconds <= *bound {
                *count += 1;
            }
        }
        histogram.count += 1;
        histogram.sum += seconds;
    }
}

/// Every metric modelcache exports.
#[derive(Debug)]
pub struct Metrics {
    pub pulls_started: Counter,
    pub pulls_succeeded: Counter,
    pub pulls_failed: CounterVec<1>,
    pub downloaded_bytes: Counter,
    pub cache_hits: Counter,
    pub cache_misses: Counter,
    pub coalesced_waiters: Counter,
    pub linked_files: CounterVec<1>,
    pub gc_runs: CounterVec<1>,
    pub gc_freed_bytes: Counter,
    pub plugin_calls: CounterVec<2>,
    pub plugin_failures: CounterVec<3>,
    pub plugin_seconds: HistogramVec<2>,
    /// By tenant (a name admission policy gave, bounded; else `other`)
    /// and outcome (`admitted`, `refused`).
    pub admissions: CounterVec<2>,
    /// Mounts by the verify decision's outcome (`trusted`, `refused`,
    /// `failed-open`: every verify plugin failed and its fail mode let the
    /// mount go on).
    pub verifications: CounterVec<1>,
}

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

impl Metrics {
    /// Every metric at zero, with its label names.
    fn new() -> Metrics {
        Metrics {
            pulls_started: Counter::default(),
            pulls_succeeded: Counter::default(),
            pulls_failed: CounterVec::new(["kind"]),
            downloaded_bytes: Counter::default(),
            cache_hits: Counter::default(),
            cache_misses: Counter::default(),
            coalesced_waiters: Counter::default(),
            linked_files: CounterVec::new(["method"]),
            gc_runs: CounterVec::new(["trigger"]),
            gc_freed_bytes: Counter::default(),
            plugin_calls: CounterVec::new(["plugin", "decision"]),
            plugin_failures: CounterVec::new(["plugin", "decision", "cause"]),
            plugin_seconds: HistogramVec::new(["plugin", "decision"]),
            admissions: CounterVec::new(["tenant", "outcome"]),
            verifications: CounterVec::new(["outcome"]),
        }
    }
}

/// Values the renderer asks for at scrape time.
#[derive(Clone, Copy, Debug, Default)]
pub struct Gauges {
    pub store_bytes: u64,
    pub reserved_bytes: u64,
    pub active_mounts: u64,
}

fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn labels<const N: usize>(names: &[&str; N], values: &[String; N], extra: Option<(&str, &str)>) -> String {
    let mut parts: Vec<String> = names.iter().zip(values).map(|(name, value)| format!("{name}=\"{}\"", escape(value))).collect();
    if let Some((name, value)) = extra {
        parts.push(format!("{name}=\"{value}\""));
    }
    if parts.is_empty() { String::new() } else { format!("{{{}}}", parts.join(",")) }
}

impl Metrics {
    /// The Prometheus text format.
    pub fn render(&self, gauges: Gauges) -> String {
        let mut out = String::new();
        let mut scalar = |name: &str, kind: &str, help: &str, value: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
        };
        scalar(
            "modelcache_pulls_started_total",
            "counter",
            "Entry pulls started (cache misses that began a download).",
            self.pulls_started.get(),
        );
        scalar("modelcache_pulls_succeeded_total", "counter", "Entry pulls that completed.", self.pulls_succeeded.get());
        scalar(
            "modelcache_downloaded_bytes_total",
            "counter",
            "Blob bytes received from registries.",
            self.downloaded_bytes.get(),
        );
        scalar("modelcache_cache_hits_total", "counter", "Mounts served from a cached entry.", self.cache_hits.get());
        scalar("modelcache_cache_misses_total", "counter", "Mounts that started a pull.", self.cache_misses.get());
        scalar(
            "modelcache_coalesced_waiters_total",
            "counter",
            "Mounts that joined a pull another request started.",
            self.coalesced_waiters.get(),
        );
        scalar("modelcache_gc_freed_bytes_total", "counter", "Bytes garbage collection gave back.", self.gc_freed_bytes.get());
        scalar("modelcache_store_bytes", "gauge", "Bytes in the content-addressed store.", gauges.store_bytes);
        scalar("modelcache_reserved_bytes", "gauge", "Bytes admitted by quota and not yet stored.", gauges.reserved_bytes);
        scalar("modelcache_active_mounts", "gauge", "Mounts under way.", gauges.active_mounts);
        self.render_vec(&mut out, "modelcache_pulls_failed_total", "Entry pulls that failed, by error kind.", &self.pulls_failed);
        self.render_vec(
            &mut out,
            "modelcache_linked_files_total",
            "Files placed into volumes, by link method.",
            &self.linked_files,
        );
        self.render_vec(&mut out, "modelcache_gc_runs_total", "Garbage collection runs, by trigger.", &self.gc_runs);
        self.render_vec(&mut out, "modelcache_plugin_calls_total", "Plugin calls, by plugin and decision.", &self.plugin_calls);
        self.render_vec(
            &mut out,
            "modelcache_plugin_failures_total",
            "Failed plugin calls, by plugin, decision and cause.",
            &self.plugin_failures,
        );
        self.render_vec(
            &mut out,
            "modelcache_admissions_total",
            "Mount requests admitted or refused by admission policy, by tenant and outcome.",
            &self.admissions,
        );
        self.render_vec(
            &mut out,
            "modelcache_verifications_total",
            "Mounts judged by verify policy, by outcome (the signer is in each volume's record).",
            &self.verifications,
        );
        let name = "modelcache_plugin_call_seconds";
        let _ = writeln!(out, "# HELP {name} Plugin call latency (instantiate and call).\n# TYPE {name} histogram");
        for (values, histogram) in self.plugin_seconds.values.lock().unwrap_or_else(|poison| poison.into_inner()).iter() {
            for (bound, count) in BUCKETS.iter().zip(histogram.counts) {
                let le = bound.to_string();
                let _ = writeln!(out, "{name}_bucket{} {count}", labels(&self.plugin_seconds.labels, values, Some(("le", &le))));
            }
            let _ = writeln!(
                out,
                "{name}_bucket{} {}",
                labels(&self.plugin_seconds.labels, values, Some(("le", "+Inf"))),
                histogram.count
            );
            let _ = writeln!(out, "{name}_sum{} {}", labels(&self.plugin_seconds.labels, values, None), histogram.sum);
            let _ = writeln!(out, "{name}_count{} {}", labels(&self.plugin_seconds.labels, values, None), histogram.count);
        }
        out
    }

    fn render_vec<const N: usize>(&self, out: &mut String, name: &str, help: &str, vec: &CounterVec<N>) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for (values, value) in vec.values.lock().unwrap_or_else(|poison| poison.into_inner()).iter() {
            let _ = writeln!(out, "{name}{} {value}", labels(&vec.labels, values, None));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counters, labelled counters and histograms render in the text format.
    #[test]
    fn renders_the_text_format() {
        let metrics = Metrics::new();
        metrics.downloaded_bytes.add(42);
        metrics.linked_files.add(["hardlink"], 3);
        metrics.plugin_calls.inc(["quota-\"x\"", "quota"]);
        metrics.plugin_seconds.observe(["q", "quota"], Duration::from_micros(300));
        let text = metrics.render(Gauges { store_bytes: 7, ..Gauges::default() });
        assert!(text.contains("modelcache_downloaded_bytes_total 42\n"));
        assert!(text.contains("modelcache_store_bytes 7\n"));
        assert!(text.contains("modelcache_linked_files_total{method=\"hardlink\"} 3\n"));
        assert!(text.contains("modelcache_plugin_calls_total{plugin=\"quota-\\\"x\\\"\",decision=\"quota\"} 1\n"));
        assert!(text.contains("modelcache_plugin_call_seconds_bucket{plugin=\"q\",decision=\"quota\",le=\"0.0005\"} 1\n"));
        assert!(text.contains("modelcache_plugin_call_seconds_bucket{plugin=\"q\",decision=\"quota\",le=\"0.00025\"} 0\n"));
        assert!(text.contains("modelcache_plugin_call_seconds_count{plugin=\"q\",decision=\"quota\"} 1\n"));
    }
}
