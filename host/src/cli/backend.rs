//! Where a command runs: through the daemon when one answers on the socket,
//! else on the root directly (taking its lock).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use modelcache::api::client::{Client, encode};
use modelcache::api::{GcBody, InspectBody, MountBody, PinBody, PrefetchBody, PrefetchStatus};
use modelcache::engine::{Engine, EngineConfig, Inspection, MountRequest};
use modelcache::gc::{DuReport, GcReport, Pin, Trigger};
use modelcache::plugins::PluginStatus;
use modelcache::plugins::exclude::ExcludeOptions;
use modelcache::registry::RegistryConfig;
use modelcache::volumes::{MountId, VolumeId, VolumeRecord, VolumeState, Volumes};

/// Where the engine works; shared by the commands that reach it.
#[derive(Debug, Clone, clap::Args)]
pub struct RootArgs {
    /// The daemon's API socket; used when a daemon answers there.
    #[arg(long, env = "MODELCACHE_SOCKET", default_value = modelcache::daemon::config::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// The cache's root directory (without a daemon).
    #[arg(long, env = "MODELCACHE_ROOT", default_value = modelcache::daemon::config::DEFAULT_ROOT)]
    pub root: PathBuf,
    /// The policy plugin directory (without a daemon).
    #[arg(long = "plugins", env = "MODELCACHE_PLUGINS")]
    pub plugin_dir: Option<PathBuf>,
    /// Where volume trees go (without a daemon; default ROOT/volumes).
    #[arg(long, env = "MODELCACHE_VOLUMES")]
    pub volumes_dir: Option<PathBuf>,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

/// How to reach registries.
#[derive(Debug, Clone, clap::Args)]
pub struct RegistryArgs {
    /// A registry (host[:port]) to reach over plain HTTP; repeatable.
    #[arg(long = "insecure-registry", env = "MODELCACHE_INSECURE_REGISTRIES", value_delimiter = ',')]
    pub insecure: Vec<String>,
    /// The directory holding a docker config.json (default $DOCKER_CONFIG, then ~/.docker).
    #[arg(long, env = "DOCKER_CONFIG")]
    pub docker_config: Option<PathBuf>,
    /// A PEM file of CAs trusted for registries besides the system's; repeatable.
    #[arg(long = "ca-certificate", env = "MODELCACHE_CA_CERTIFICATES", value_delimiter = ',')]
    pub ca_certificates: Vec<PathBuf>,
    /// How long a blob download may go without a byte before it is resumed (default 30s).
    #[arg(long, env = "MODELCACHE_STALL_TIMEOUT", value_parser = parse_stall_timeout)]
    pub stall_timeout: Option<Duration>,
    /// Bytes per second a blob download must average, or it is resumed (default 16KiB; 0: no floor).
    #[arg(long, env = "MODELCACHE_MIN_RATE", value_parser = modelcache_policy::size::parse_size)]
    pub min_rate: Option<u64>,
}

impl RegistryArgs {
    pub fn config(&self) -> RegistryConfig {
        let defaults = RegistryConfig::default();
        RegistryConfig {
            insecure: self.insecure.clone(),
            docker_config: self.docker_config.clone(),
            ca_certificates: self.ca_certificates.clone(),
            stall_timeout: self.stall_timeout.unwrap_or(defaults.stall_timeout),
            min_rate: self.min_rate.unwrap_or(defaults.min_rate),
            ..defaults
        }
    }
}

/// A stall limit: a duration (`30s`, `2m`) of at least a second.
fn parse_stall_timeout(text: &str) -> Result<Duration, String> {
    match modelcache_policy::size::parse_duration(text)? {
        0 => Err(format!("`{text}`: the stall timeout must be at least 1s")),
        seconds => Ok(Duration::from_secs(seconds)),
    }
}

/// What a command's async runtime needs.
pub enum Threads {
    /// Talking to the daemon.
    One,
    /// The engine, a push.
    Workers,
}

/// A fresh async runtime.
pub fn runtime(threads: Threads) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = match threads {
        Threads::One => tokio::runtime::Builder::new_current_thread(),
        Threads::Workers => tokio::runtime::Builder::new_multi_thread(),
    };
    builder.enable_all().build().context("starting the async runtime")
}

/// The engine in this process, or the daemon's.
pub enum Backend {
    Local(Arc<Engine>),
    Daemon(Client),
}

impl RootArgs {
    /// A client of the daemon if one listens on the socket, else `None` (no
    /// socket, or one left behind by a daemon that is gone). A connection is
    /// enough to tell: a health request first would add a round trip to
    /// every command.
    pub fn daemon(&self) -> Option<Client> {
        std::os::unix::net::UnixStream::connect(&self.socket).ok().map(|_| Client::new(&self.socket))
    }

    /// Runs `work` through the daemon when one answers on the socket, else
    /// on the engine in this process. A client of the daemon runs on one
    /// thread: a command's own work is smaller than starting worker threads.
    pub fn with_backend<T, F>(&self, work: impl FnOnce(Backend) -> F) -> anyhow::Result<T>
    where
        F: std::future::Future<Output = anyhow::Result<T>>,
    {
        match self.daemon() {
            Some(client) => {
                tracing::debug!(socket = %self.socket.display(), "using the daemon");
                runtime(Threads::One)?.block_on(work(Backend::Daemon(client)))
            }
            // Opened before the runtime runs anything: loading plugins calls
            // `validate-settings`, whose WASI waits block on the runtime and
            // may not run on one of its own threads.
            None => {
                let runtime = runtime(Threads::Workers)?;
                let engine = {
                    let _entered = runtime.enter();
                    self.open()?
                };
                runtime.block_on(work(Backend::Local(engine)))
            }
        }
    }

    /// The engine on the root, in this process.
    pub fn open(&self) -> anyhow::Result<Arc<Engine>> {
        let mut config = EngineConfig::new(&self.root);
        config.plugin_dir.clone_from(&self.plugin_dir);
        config.volumes_dir.clone_from(&self.volumes_dir);
        config.registry = self.registry.config();
        Engine::open(config).with_context(|| format!("opening the cache at {}", self.root.display()))
    }

    /// The records, read directly: they are replaced atomically, so no lock is needed.
    pub fn records(&self) -> Vec<VolumeRecord> {
        let layout = modelcache::store::Layout::new(&self.root);
        Volumes::new(layout.records(), layout.default_volumes()).list()
    }
}

fn volume_path(volume: &VolumeId, mount_id: &MountId) -> String {
    format!("/v1/volumes/{volume}/{mount_id}")
}

impl Backend {
    /// Mounts and waits, reporting `(done, total)` about every `tick` while
    /// it pulls.
    pub async fn mount(
        &self,
        request: MountRequest,
        tick: Duration,
        mut progress: impl FnMut(u64, u64),
    ) -> anyhow::Result<VolumeRecord> {
        let record = match self {
            Backend::Local(engine) => {
                let mut handle = engine.start_mount(request.clone()).await?;
                loop {
                    tokio::select! {
                        record = handle.wait() => break record?,
                        () = tokio::time::sleep(tick) => {
                            if let Some((done, total)) = engine.progress(&request.volume, &request.mount_id) {
                                progress(done, total);
                            }
                        }
                    }
                }
            }
            Backend::Daemon(client) => {
                let path = volume_path(&request.volume, &request.mount_id);
                let body = MountBody {
                    reference: request.reference.to_string(),
                    exclude_weights: request.options.exclude_weights,
                    patterns: request.options.patterns.clone(),
                    wait_seconds: tick.as_secs_f64(),
                    requester: (!request.requester.is_empty()).then(|| request.requester.clone()),
                    credentials: request.credentials.clone(),
                };
                let mut record: VolumeRecord = client.put(&path, &body).await?.body;
                // Long polls, each answered the moment the mount ends, so
                // no time is lost between the end and the next look.
                let watch = format!("{path}?wait-seconds={}", tick.as_secs_f64());
                while record.state() == VolumeState::Pulling {
                    progress(record.bytes_done, record.bytes_total);
                    record = client.get(&watch).await?;
                }
                // Only `ready` is a mount: a volume released meanwhile is
                // reported, not printed as ready at a path that is gone.
                match (record.state(), &record.error()) {
                    (VolumeState::Ready, _) => {}
                    (_, Some(error)) => anyhow::bail!("{} ({})", error.message, error.kind),
                    (state, None) => anyhow::bail!("the volume is {state:?}, not ready; ask again"),
                }
                record
            }
        };
        Ok(record)
    }

    pub async fn unmount(&self, volume: &VolumeId, mount_id: &MountId) -> anyhow::Result<VolumeRecord> {
        Ok(match self {
            Backend::Local(engine) => engine.unmount(volume, mount_id).await?,
            Backend::Daemon(client) => client.delete(&volume_path(volume, mount_id)).await?,
        })
    }

    pub async fn status(&self, volume: &VolumeId, mount_id: &MountId) -> anyhow::Result<VolumeRecord> {
        Ok(match self {
            Backend::Local(engine) => engine.status(volume, mount_id)?,
            Backend::Daemon(client) => client.get(&volume_path(volume, mount_id)).await?,
        })
    }

    pub async fn inspect(&self, reference: &str) -> anyhow::Result<Inspection> {
        Ok(match self {
            Backend::Local(engine) => engine.inspect(reference).await?,
            Backend::Daemon(client) => client.post("/v1/inspect", &InspectBody { reference: reference.into() }).await?.body,
        })
    }

    pub async fn prefetch(&self, reference: &str, options: ExcludeOptions, pin: bool) -> anyhow::Result<PrefetchStatus> {
        Ok(match self {
            Backend::Local(engine) => {
                let done = engine.prefetch(reference, &options, pin).await?;
                PrefetchStatus {
                    state: "ready".into(),
                    reference: reference.into(),
                    key: Some(done.key.to_string()),
                    bytes: Some(done.bytes),
                    source: serde_json::to_value(done.source)?.as_str().map(str::to_owned),
                    pinned: done.pinned,
                }
            }
            Backend::Daemon(client) => {
                let body = PrefetchBody {
                    reference: reference.into(),
                    exclude_weights: options.exclude_weights,
                    patterns: options.patterns,
                    pin,
                    wait_seconds: 3600.0,
                };
                client.post("/v1/prefetch", &body).await?.body
            }
        })
    }

    pub async fn gc(&self, dry_run: bool) -> anyhow::Result<GcReport> {
        Ok(match self {
            Backend::Local(engine) => engine.gc(dry_run, Trigger::OnDemand).await?,
            Backend::Daemon(client) => client.post("/v1/gc", &GcBody { dry_run }).await?.body,
        })
    }

    pub async fn du(&self) -> anyhow::Result<DuReport> {
        Ok(match self {
            Backend::Local(engine) => engine.du()?,
            Backend::Daemon(client) => client.get("/v1/du").await?,
        })
    }

    pub async fn pin(&self, target: &str) -> anyhow::Result<Pin> {
        Ok(match self {
            Backend::Local(engine) => engine.pin(target).await?,
            Backend::Daemon(client) => client.post("/v1/pins", &PinBody { target: target.into() }).await?.body,
        })
    }

    pub async fn unpin(&self, target: &str) -> anyhow::Result<bool> {
        Ok(match self {
            Backend::Local(engine) => engine.unpin(target).await?,
            Backend::Daemon(client) => {
                let answer: serde_json::Value = client.delete(&format!("/v1/pins?target={}", encode(target))).await?;
                answer["removed"].as_bool().unwrap_or(false)
            }
        })
    }

    pub async fn pins(&self) -> anyhow::Result<Vec<Pin>> {
        Ok(match self {
            Backend::Local(engine) => engine.pins(),
            Backend::Daemon(client) => client.get("/v1/pins").await?,
        })
    }

    pub async fn plugins(&self, reload: bool) -> anyhow::Result<Vec<PluginStatus>> {
        Ok(match self {
            Backend::Local(engine) => {
                let set = if reload {
                    let engine = engine.clone();
                    tokio::task::spawn_blocking(move || engine.plugins().reload()).await?
                } else {
                    engine.plugins().current()
                };
                set.statuses().to_vec()
            }
            Backend::Daemon(client) if reload => client.post("/v1/plugins/reload", &()).await?.body,
            Backend::Daemon(client) => client.get("/v1/plugins").await?,
        })
    }
}
