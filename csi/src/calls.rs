//! Every RPC as one log line and as metrics: the method, the volume, the
//! pod, the gRPC code and the duration, so an operator can tell from the
//! node alone why a pod is stuck in ContainerCreating or Terminating.
//!
//! Metrics (OpenMetrics text at `/metrics` when `--metrics-address` is set):
//! - `modelcache_csi_calls_total{method, code}`;
//! - `modelcache_csi_call_duration_seconds{method}` (a histogram);
//! - `modelcache_csi_published_volumes{kind}`: the targets the shim holds
//!   mounted, `ephemeral` (inline volumes) or `persistent`, counted when
//!   scraped.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tonic::{Code, Status};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    method: &'static str,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

/// The shim's metrics.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Mutex<Registry>>,
    calls: Family<CallLabels, Counter>,
    durations: Family<MethodLabels, Histogram>,
    published: Family<KindLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Metrics {
        let mut registry = Registry::with_prefix("modelcache_csi");
        let calls = Family::<CallLabels, Counter>::default();
        // 1 ms to about 2 minutes, kubelet's deadline for a call.
        let durations =
            Family::<MethodLabels, Histogram>::new_with_constructor(|| Histogram::new(exponential_buckets(0.001, 2.0, 18)));
        let published = Family::<KindLabels, Gauge>::default();
        registry.register("calls", "CSI calls answered, by method and gRPC code", calls.clone());
        registry.register("call_duration_seconds", "Time to answer a CSI call, by method", durations.clone());
        registry.register("published_volumes", "Targets the shim holds mounted, by kind", published.clone());
        Metrics { registry: Arc::new(Mutex::new(registry)), calls, durations, published }
    }
}

impl Metrics {
    /// The metrics as OpenMetrics text, with `published` (ephemeral,
    /// persistent) counted now.
    pub fn encode(&self, published: (usize, usize)) -> String {
        self.published.get_or_create(&KindLabels { kind: "ephemeral" }).set(published.0 as i64);
        self.published.get_or_create(&KindLabels { kind: "persistent" }).set(published.1 as i64);
        let mut text = String::new();
        let registry = self.registry.lock().unwrap_or_else(|poison| poison.into_inner());
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("writing to a String does not fail");
        text
    }
}

/// One call being answered; [`Call::finish`] logs and counts it.
pub struct Call {
    method: &'static str,
    volume: String,
    pod: String,
    started: Instant,
}

/// The gRPC code's name as CSI and kubelet print it (`NOT_FOUND`).
pub fn code_name(code: Code) -> String {
    let words = format!("{code:?}");
    let mut name = String::with_capacity(words.len() + 4);
    for (index, letter) in words.chars().enumerate() {
        if letter.is_ascii_uppercase() && index > 0 {
            name.push('_');
        }
        name.push(letter.to_ascii_uppercase());
    }
    name
}

impl Call {
    /// `volume` and `pod` as far as the request names them (empty if not).
    pub fn start(method: &'static str, volume: &str, pod: String) -> Call {
        Call { method, volume: volume.to_owned(), pod, started: Instant::now() }
    }

    /// Logs and counts the answer, then returns it. Calls kubelet and the
    /// sidecars repeat on a timer (probes, capabilities) log at debug.
    #[allow(clippy::result_large_err, reason = "tonic's handlers answer `Status` unboxed")]
    pub fn finish<T>(self, metrics: &Metrics, result: Result<T, Status>) -> Result<T, Status> {
        let elapsed = self.started.elapsed();
        let code = code_name(result.as_ref().err().map_or(Code::Ok, Status::code));
        metrics.calls.get_or_create(&CallLabels { method: self.method, code: code.clone() }).inc();
        metrics.durations.get_or_create(&MethodLabels { method: self.method }).observe(elapsed.as_secs_f64());
        let milliseconds = elapsed.as_millis() as u64;
        let (method, volume, pod) = (self.method, &self.volume, &self.pod);
        match &result {
            Ok(_) if !self.volume.is_empty() => {
                tracing::info!(method, volume, pod, code, duration_ms = milliseconds, "answered");
            }
            Ok(_) => tracing::debug!(method, code, duration_ms = milliseconds, "answered"),
            Err(status) => {
                tracing::warn!(method, volume, pod, code, duration_ms = milliseconds, "answered: {}", status.message());
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A call is counted by method and code, timed, and its published
    /// volumes appear by kind.
    #[test]
    fn counts_calls() {
        let metrics = Metrics::default();
        let call = Call::start("NodePublishVolume", "csi-1", "default/pod-0".into());
        assert!(call.finish(&metrics, Err::<(), _>(Status::not_found("absent"))).is_err());
        Call::start("NodePublishVolume", "csi-1", String::new()).finish(&metrics, Ok(())).unwrap();
        let text = metrics.encode((2, 1));
        assert!(text.contains(r#"modelcache_csi_calls_total{method="NodePublishVolume",code="NOT_FOUND"} 1"#), "{text}");
        assert!(text.contains(r#"modelcache_csi_calls_total{method="NodePublishVolume",code="OK"} 1"#), "{text}");
        assert!(text.contains(r#"modelcache_csi_call_duration_seconds_count{method="NodePublishVolume"} 2"#), "{text}");
        assert!(text.contains(r#"modelcache_csi_published_volumes{kind="ephemeral"} 2"#), "{text}");
        assert!(text.contains(r#"modelcache_csi_published_volumes{kind="persistent"} 1"#), "{text}");
    }

    #[test]
    fn code_names() {
        assert_eq!(code_name(Code::Ok), "OK");
        assert_eq!(code_name(Code::NotFound), "NOT_FOUND");
        assert_eq!(code_name(Code::FailedPrecondition), "FAILED_PRECONDITION");
    }
}
