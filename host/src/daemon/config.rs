//! `modelcache serve --config FILE`: the daemon's TOML configuration. Every
//! key is optional; `docs/modelcache.toml` lists them all with their
//! defaults. A bad file fails at start with the key and the reason.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::engine::EngineConfig;
use crate::registry::{Mirror, RegistryConfig};

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{}: {key}: {reason}", path.display())]
pub struct ConfigError {
    pub path: PathBuf,
    pub key: String,
    pub reason: String,
}

/// How logs are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// The daemon's configuration, defaults filled in.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub engine: EngineConfig,
    /// `None` when periodic GC is off.
    pub gc_interval: Option<Duration>,
    pub socket: PathBuf,
    pub socket_mode: u32,
    pub volume_sockets: PathBuf,
    pub metrics_address: Option<SocketAddr>,
    pub log_format: LogFormat,
    pub log_level: String,
    pub shutdown_timeout: Duration,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct Raw {
    root: Option<PathBuf>,
    plugin_dir: Option<PathBuf>,
    volumes_dir: Option<PathBuf>,
    #[serde(default)]
    downloads: RawDownloads,
    #[serde(default)]
    registries: RawRegistries,
    #[serde(default)]
    verify: RawVerify,
    #[serde(default)]
    gc: RawGc,
    #[serde(default)]
    api: RawApi,
    #[serde(default)]
    metrics: RawMetrics,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    shutdown: RawShutdown,
    #[serde(default)]
    unpack: RawUnpack,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawUnpack {
    layer_bytes: Option<String>,
    layer_entries: Option<u64>,
    keep_free: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawDownloads {
    concurrency: Option<usize>,
    layer_concurrency: Option<usize>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawRegistries {
    #[serde(default)]
    insecure: Vec<String>,
    docker_config: Option<PathBuf>,
    #[serde(default)]
    ca_certificates: Vec<PathBuf>,
    #[serde(default)]
    mirrors: BTreeMap<String, RawMirror>,
    tag_ttl: Option<String>,
    access_ttl: Option<String>,
    stall_timeout: Option<String>,
    min_rate: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawVerify {
    signature_paths: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawMirror {
    endpoints: Vec<String>,
    #[serde(default = "yes")]
    resolve: bool,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawGc {
    interval: Option<String>,
    grace: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawApi {
    socket: Option<PathBuf>,
    mode: Option<String>,
    volume_sockets: Option<PathBuf>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawMetrics {
    address: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawLog {
    format: Option<LogFormat>,
    level: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawShutdown {
    timeout: Option<String>,
}

/// Defaults, as `docs/modelcache.toml` states them.
pub const DEFAULT_ROOT: &str = "/var/lib/modelcache";
pub use modelcache_api::DEFAULT_SOCKET;
pub const DEFAULT_VOLUME_SOCKETS: &str = "/run/modelcache/volumes";
const DEFAULT_GC_INTERVAL: &str = "10m";
const DEFAULT_GC_GRACE: &str = "1h";
const DEFAULT_SHUTDOWN: &str = "30s";

impl ServeConfig {
    /// Reads and checks `path`.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the key and the reason.
    pub fn load(path: &Path) -> Result<ServeConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError {
            path: path.to_owned(),
            key: "(file)".into(),
            reason: error.to_string(),
        })?;
        ServeConfig::parse(&text).map_err(|(key, reason)| ConfigError { path: path.to_owned(), key, reason })
    }

    /// Parses configuration text; the error is `(key, reason)`.
    ///
    /// # Errors
    /// Unknown keys, wrong types, values out of range.
    pub fn parse(text: &str) -> Result<ServeConfig, (String, String)> {
        let raw: Raw = toml::from_str(text).map_err(|error| {
            let line = error.span().map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1);
            let key = line.map(|line| format!("line {line}")).unwrap_or_else(|| "(syntax)".into());
            (key, error.message().to_owned())
        })?;
        let duration = |key: &str, value: Option<&str>, default: &str| -> Result<Duration, (String, String)> {
            let text = value.unwrap_or(default);
            if text.trim() == "0" {
                return Ok(Duration::ZERO);
            }
            modelcache_policy::size::parse_duration(text).map(Duration::from_secs).map_err(|reason| (key.to_owned(), reason))
        };
        let positive = |key: &str, value: Option<usize>| -> Result<usize, (String, String)> {
            match value {
                None => Ok(4),
                Some(0) => Err((key.to_owned(), "must be at least 1".into())),
                Some(count) => Ok(count),
            }
        };

        let mut mirrors = BTreeMap::new();
        for (host, mirror) in raw.registries.mirrors {
            let key = format!("registries.mirrors.\"{host}\".endpoints");
            if mirror.endpoints.is_empty() {
                return Err((key, "lists no endpoint".into()));
            }
            let parsed = mirror
                .endpoints
                .iter()
                .map(|endpoint| Mirror::parse(endpoint, mirror.resolve))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|reason| (key.clone(), reason))?;
            mirrors.insert(host, parsed);
        }

        let mut engine = EngineConfig::new(raw.root.unwrap_or_else(|| PathBuf::from(DEFAULT_ROOT)));
        engine.plugin_dir = raw.plugin_dir;
        engine.volumes_dir = raw.volumes_dir;
        engine.download_concurrency = positive("downloads.concurrency", raw.downloads.concurrency)?;
        engine.layer_concurrency = positive("downloads.layer-concurrency", raw.downloads.layer_concurrency)?;
        engine.gc_grace = duration("gc.grace", raw.gc.grace.as_deref(), DEFAULT_GC_GRACE)?;
        if let Some(text) = raw.unpack.layer_bytes.as_deref() {
            engine.unpack.layer_bytes =
                modelcache_policy::size::parse_size(text).map_err(|reason| ("unpack.layer-bytes".to_owned(), reason))?;
        }
        if let Some(entries) = raw.unpack.layer_entries {
            engine.unpack.layer_entries = entries;
        }
        if let Some(text) = raw.unpack.keep_free.as_deref() {
            engine.unpack.keep_free =
                modelcache_policy::size::Limit::parse(text).map_err(|reason| ("unpack.keep-free".to_owned(), reason))?;
        }
        let defaults = RegistryConfig::default();
        let tag_ttl = match raw.registries.tag_ttl.as_deref() {
            None => defaults.tag_ttl,
            text => duration("registries.tag-ttl", text, "")?,
        };
        if let Some(paths) = raw.verify.signature_paths {
            engine.signature_paths = paths;
        }
        if let Some(text) = raw.registries.access_ttl.as_deref() {
            engine.access_ttl = duration("registries.access-ttl", Some(text), "")?;
        }
        let stall_timeout = match raw.registries.stall_timeout.as_deref() {
            None => defaults.stall_timeout,
            text => Some(duration("registries.stall-timeout", text, "")?)
                .filter(|timeout| !timeout.is_zero())
                .ok_or_else(|| ("registries.stall-timeout".to_owned(), "must be at least 1s".to_owned()))?,
        };
        let min_rate = match raw.registries.min_rate.as_deref() {
            None => defaults.min_rate,
            Some(text) => modelcache_policy::size::parse_size(text)
                .map_err(|reason| ("registries.min-rate".to_owned(), format!("{reason} (bytes per second)")))?,
        };
        engine.registry = RegistryConfig {
            insecure: raw.registries.insecure,
            docker_config: raw.registries.docker_config,
            ca_certificates: raw.registries.ca_certificates,
            mirrors,
            tag_ttl,
            stall_timeout,
            min_rate,
            ..defaults
        };
        let gc_interval = duration("gc.interval", raw.gc.interval.as_deref(), DEFAULT_GC_INTERVAL)?;
        let mode_text = raw.api.mode.unwrap_or_else(|| "0600".into());
        let socket_mode = u32::from_str_radix(mode_text.trim_start_matches("0o"), 8)
            .ok()
            .filter(|mode| *mode <= 0o777)
            .ok_or_else(|| ("api.mode".to_owned(), format!("`{mode_text}` is not an octal file mode like \"0600\"")))?;
        let metrics_address = raw
            .metrics
            .address
            .map(|address| {
                address
                    .parse::<SocketAddr>()
                    .map_err(|_| ("metrics.address".to_owned(), format!("`{address}` is not an ip:port address")))
            })
            .transpose()?;
        let level = raw.log.level.unwrap_or_else(|| "info".into());
        tracing_subscriber::EnvFilter::try_new(&level).map_err(|error| ("log.level".to_owned(), error.to_string()))?;
        Ok(ServeConfig {
            engine,
            gc_interval: (!gc_interval.is_zero()).then_some(gc_interval),
            socket: raw.api.socket.unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET)),
            socket_mode,
            volume_sockets: raw.api.volume_sockets.unwrap_or_else(|| PathBuf::from(DEFAULT_VOLUME_SOCKETS)),
            metrics_address,
            log_format: raw.log.format.unwrap_or_default(),
            log_level: level,
            shutdown_timeout: duration("shutdown.timeout", raw.shutdown.timeout.as_deref(), DEFAULT_SHUTDOWN)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The documented example holds every key at its default value.
    #[test]
    fn the_documented_example_is_the_defaults() {
        let example = ServeConfig::parse(include_str!("../../../docs/modelcache.toml")).expect("the example parses");
        let empty = ServeConfig::parse("").unwrap();
        assert_eq!(format!("{:?}", example), format!("{:?}", empty));
        assert_eq!(empty.gc_interval, Some(Duration::from_secs(600)));
        assert_eq!(empty.socket_mode, 0o600);
        assert_eq!(empty.engine.download_concurrency, 4);
        assert_eq!(empty.shutdown_timeout, Duration::from_secs(30));
        assert_eq!(empty.engine.registry.tag_ttl, Duration::from_secs(30));
        assert_eq!((empty.engine.registry.stall_timeout, empty.engine.registry.min_rate), (Duration::from_secs(30), 16 << 10));
    }

    /// Every key is read.
    #[test]
    fn every_key() {
        let config = ServeConfig::parse(
            r#"
            root = "/data/cache"
            plugin-dir = "/etc/modelcache/plugins"
            volumes-dir = "/data/volumes"
            [downloads]
            concurrency = 8
            layer-concurrency = 2
            [registries]
            insecure = ["registry.local:5000"]
            docker-config = "/root/.docker"
            tag-ttl = "0"
            access-ttl = "10m"
            stall-timeout = "2m"
            min-rate = "1MiB"
            [registries.mirrors."registry.local:5000"]
            endpoints = ["http://127.0.0.1:65001", "https://mirror.local"]
            resolve = false
            [gc]
            interval = "0"
            grace = "30m"
            [api]
            socket = "/tmp/mc.sock"
            mode = "0660"
            volume-sockets = "/tmp/volumes"
            [metrics]
            address = "127.0.0.1:9464"
            [log]
            format = "json"
            level = "debug"
            [shutdown]
            timeout = "5s"
            "#,
        )
        .unwrap();
        assert_eq!(config.engine.root, PathBuf::from("/data/cache"));
        assert_eq!(config.engine.download_concurrency, 8);
        assert_eq!(config.engine.layer_concurrency, 2);
        let mirrors = &config.engine.registry.mirrors["registry.local:5000"];
        assert_eq!(mirrors[0], Mirror { host: "127.0.0.1:65001".into(), plain_http: true, resolve: false });
        assert!(!mirrors[1].plain_http);
        assert_eq!(config.engine.registry.tag_ttl, Duration::ZERO);
        assert_eq!(config.engine.access_ttl, Duration::from_secs(600));
        assert_eq!((config.engine.registry.stall_timeout, config.engine.registry.min_rate), (Duration::from_secs(120), 1 << 20));
        assert_eq!(config.gc_interval, None);
        assert_eq!(config.engine.gc_grace, Duration::from_secs(1800));
        assert_eq!(config.socket_mode, 0o660);
        assert_eq!(config.metrics_address, Some("127.0.0.1:9464".parse().unwrap()));
        assert_eq!(config.log_format, LogFormat::Json);
        assert_eq!(config.shutdown_timeout, Duration::from_secs(5));
    }

    /// Bad values are refused naming the key.
    #[test]
    fn errors_name_the_key() {
        let key = |text: &str| ServeConfig::parse(text).unwrap_err();
        assert_eq!(key("[gc]\ninterval = \"soon\"").0, "gc.interval");
        assert_eq!(key("[api]\nmode = \"rwx\"").0, "api.mode");
        assert_eq!(key("[metrics]\naddress = \"localhost\"").0, "metrics.address");
        assert_eq!(key("[downloads]\nconcurrency = 0").0, "downloads.concurrency");
        assert_eq!(key("[registries]\nstall-timeout = \"0\"").0, "registries.stall-timeout");
        assert_eq!(key("[registries]\nmin-rate = \"fast\"").0, "registries.min-rate");
        assert_eq!(key("[registries.mirrors.\"r\"]\nendpoints = [\"ftp://m\"]").0, "registries.mirrors.\"r\".endpoints");
        let (line, reason) = key("\n[gc]\nintervl = \"1m\"");
        assert_eq!(line, "line 3");
        assert!(reason.contains("intervl"), "{reason}");
        assert_eq!(key("[log]\nlevel = \"=^_^=\"").0, "log.level");
    }
}
