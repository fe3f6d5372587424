//! The engine: mounts models into volumes, tying the other modules together.
//!
//! A mount request flows like this:
//! 1. the admission decision says whether its requester may mount it, and
//!    with which credentials (refused: no record, no registry request);
//! 2. the volume's record is checked (same request again: done; another
//!    model: conflict) and written `pulling`;
//! 3. the reference is resolved to a manifest digest once, and the requester
//!    shown able to read that manifest (remembered per credential and
//!    digest); the manifest is read from the store or fetched by digest,
//!    and parsed;
//! 4. the exclude decision picks the files; the selection names the entry;
//!    the record now holds that entry against garbage collection;
//! 5. if the entry is not cached, the request joins the entry's flight: the
//!    quota decision admits and reserves the pull's new bytes, missing blobs
//!    are fetched (each blob once, node-wide, whatever entry needs it), tar
//!    layers unpacked, and the tree built and published;
//! 6. then, per request, the entry is leased, the volume's tree is linked from
//!    it, and the record written `ready`.
//!
//! Each volume's work runs as its own task; a caller that stops waiting does
//! not stop it, and `unmount` cancels it.
//!
//! | file | what it holds |
//! |------|---------------|
//! | `mod.rs` | [`Engine`], its configuration and errors, opening, and the GC, `du` and pin calls handed to [`crate::gc`] |
//! | `mount.rs` | the mount flow: slots and their locks, progress, start, run and release, unmount, status, shutdown |
//! | `resolve.rs` | references to digests (tag memory), the parsed-manifest cache, exclude flights, `inspect` |
//! | `pull.rs` | entry → layers → blobs: the entry's flight, layer fetches and unpacks, prefetch, unpack limits |
//! | `access.rs` | the admission decision, a mount's credentials, and the proof its requester may read the manifest |
//! | `verify.rs` | the verify decision on the signatures gathered before any weight, remembered per plugin set and manifest |
//! | `quota.rs` | the quota decision and the reservations it makes |
//! | `sink.rs` | the store's [`Ingest`](crate::store::Ingest) as the registry's blob sink, so neither knows the other |

mod access;
mod mount;
mod pull;
mod quota;
mod resolve;
mod sink;
mod verify;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Semaphore;

use crate::digest::Digest;
use crate::error::ErrorKind;
use crate::flight::Flights;
use crate::gc::{Collector, DuReport, GcReport, Pin, Pins, Trigger};
use crate::modelpack::{Model, ModelError};
use crate::plugins::error::BoxError;
use crate::plugins::exclude::{ExcludeDecision, ExcludeError, ExcludeMemo, MemoKey};
use crate::plugins::{CompiledCache, PluginHost, Runtime, RuntimeOptions};
use crate::registry::{ModelRef, Registry, RegistryConfig, RegistryError, TagMemory};
use crate::store::{EntryKey, Recovery, Store, StoreError};
use crate::volumes::{VolumeError, VolumeId, VolumeRecord, VolumeSlot, VolumeState, Volumes};

pub use access::{Access, TENANT_LABELS};
pub use mount::{MountHandle, MountRequest};
pub use pull::{Prefetched, Source};
pub use resolve::{InspectedLayer, InspectedSignatures, Inspection};

/// How to run an engine.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// The store's root directory.
    pub root: PathBuf,
    /// Where volume trees go (default `ROOT/volumes`). On another filesystem
    /// files are reflinked or copied instead of hardlinked.
    pub volumes_dir: Option<PathBuf>,
    /// The policy plugin directory; `None` uses the built-in defaults.
    pub plugin_dir: Option<PathBuf>,
    pub registry: RegistryConfig,
    /// Blobs downloading at once, node-wide (default 4).
    pub download_concurrency: usize,
    /// Layers of one pull fetched at once (default 4).
    pub layer_concurrency: usize,
    /// Temporaries untouched for this long are leftovers GC removes (default 1 h).
    pub gc_grace: Duration,
    /// Layer paths that hold a model's signature (an OpenSSF model-signing
    /// bundle), fetched before any other layer for the verify decision
    /// (default `model.sig`).
    pub signature_paths: Vec<String>,
    /// How long a requester's shown access to a manifest is trusted without
    /// asking the registry again (default 5 min; zero asks every mount).
    pub access_ttl: Duration,
    pub runtime: RuntimeOptions,
    pub unpack: UnpackConfig,
}

/// What one tar layer may expand to (see [`crate::store::UnpackLimits`]).
#[derive(Clone, Debug)]
pub struct UnpackConfig {
    /// Bytes of files per layer (default 1 TiB).
    pub layer_bytes: u64,
    /// Entries per layer (default 1,000,000).
    pub layer_entries: u64,
    /// Space (and, as a share, inodes) an unpack leaves free on the store's
    /// filesystem, besides what pulls have reserved (default 5 %).
    pub keep_free: modelcache_policy::size::Limit,
}

impl Default for UnpackConfig {
    fn default() -> Self {
        UnpackConfig { layer_bytes: 1 << 40, layer_entries: 1_000_000, keep_free: modelcache_policy::size::Limit::Percent(5.0) }
    }
}

impl EngineConfig {
    pub fn new(root: impl Into<PathBuf>) -> EngineConfig {
        EngineConfig {
            root: root.into(),
            volumes_dir: None,
            plugin_dir: None,
            registry: RegistryConfig::default(),
            download_concurrency: 4,
            layer_concurrency: 4,
            gc_grace: Duration::from_secs(3600),
            access_ttl: Duration::from_secs(300),
            signature_paths: vec!["model.sig".to_owned()],
            runtime: RuntimeOptions::default(),
            unpack: UnpackConfig::default(),
        }
    }
}

/// What went wrong serving a request.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// Boxed: the registry's errors are the largest, and every engine call
    /// returns this type.
    #[error(transparent)]
    Registry(Box<RegistryError>),
    #[error(transparent)]
    InvalidReference(#[from] crate::registry::ReferenceError),
    #[error(transparent)]
    InvalidRequester(#[from] modelcache_api::tenancy::RequesterError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Volume(#[from] VolumeError),
    #[error(transparent)]
    Fs(#[from] crate::durable::FsError),
    #[error("exclude decision for {reference}")]
    Exclude {
        reference: String,
        #[source]
        source: ExcludeError,
    },
    /// An admission policy refused the mount.
    #[error("{requester} may not mount {reference}: {reason}")]
    Refused { requester: String, reference: String, reason: String },
    /// The requester's credentials do not reach the model. No source: the
    /// registry's words differ with what the cache holds, and the requester
    /// must learn nothing of that (the daemon logs them).
    #[error("{reference}: access denied: the registry refused it to the credentials this mount may use")]
    AccessDenied { reference: String },
    /// The registry could not be reached to resolve or check a tenant's
    /// mount, and no earlier answer stands in. No source, as above.
    #[error("{reference}: the registry cannot be reached to check this mount's access; ask again")]
    AccessUnavailable { reference: String },
    /// Gathering signatures took longer than a registry may.
    #[error("{reference}: reading its signatures took too long; ask again")]
    GatherTimeout { reference: String },
    /// A verify policy does not trust the model's signatures.
    #[error("{reference} is not signed by a trusted key: {reason}")]
    Unverified { reference: String, reason: String },
    #[error("quota denied pulling {reference}: {reason}")]
    QuotaDenied { reference: String, reason: String },
    #[error("volume {slot} already holds {holds} ({state:?}); release it first")]
    Conflict { slot: VolumeSlot, holds: String, state: VolumeState },
    #[error("volume {slot} has no record")]
    NotFound { slot: VolumeSlot },
    #[error("volume {slot}: the mount was cancelled")]
    Cancelled { slot: VolumeSlot },
    #[error("volume {slot} is being released; ask again once it is")]
    Releasing { slot: VolumeSlot },
    #[error("the mount was stopped before it finished (released or shut down); ask again")]
    Stopped,
    /// The node-wide download slots were closed: the engine is going away.
    #[error("no download slot: the engine is shutting down")]
    ShuttingDown(#[source] tokio::sync::AcquireError),
    /// A task the engine spawned for a step panicked or was cancelled.
    #[error("the task to {step} did not finish")]
    Join {
        step: &'static str,
        #[source]
        source: tokio::task::JoinError,
    },
    /// GC evicted an entry each time it was built, before it could be leased.
    #[error("entry {key} was evicted three times in a row before it could be linked")]
    Evicted { key: EntryKey },
    #[error("cannot start the plugin runtime")]
    Runtime(#[source] BoxError),
    #[error(transparent)]
    Panicked(#[from] crate::flight::Panicked),
    #[error(transparent)]
    Shared(Arc<EngineError>),
}

impl From<RegistryError> for EngineError {
    fn from(error: RegistryError) -> Self {
        EngineError::Registry(Box::new(error))
    }
}

impl EngineError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            EngineError::Registry(error) => error.kind(),
            EngineError::InvalidReference(_) | EngineError::InvalidRequester(_) => ErrorKind::InvalidArgument,
            EngineError::Model(error) => error.kind(),
            EngineError::Store(error) => error.kind(),
            EngineError::Volume(error) => error.kind(),
            EngineError::Fs(_) => ErrorKind::Internal,
            EngineError::Exclude { source, .. } => source.kind(),
            EngineError::QuotaDenied { .. } => ErrorKind::QuotaDenied,
            EngineError::Refused { .. } | EngineError::AccessDenied { .. } => ErrorKind::PermissionDenied,
            EngineError::AccessUnavailable { .. } => ErrorKind::Unavailable,
            EngineError::Unverified { .. } => ErrorKind::PermissionDenied,
            EngineError::GatherTimeout { .. } => ErrorKind::Unavailable,
            EngineError::Conflict { .. } => ErrorKind::Conflict,
            EngineError::NotFound { .. } => ErrorKind::NotFound,
            EngineError::Cancelled { .. } | EngineError::Stopped => ErrorKind::Cancelled,
            EngineError::Releasing { .. } => ErrorKind::Unavailable,
            EngineError::ShuttingDown(_)
            | EngineError::Join { .. }
            | EngineError::Evicted { .. }
            | EngineError::Runtime(_)
            | EngineError::Panicked(_) => ErrorKind::Internal,
            EngineError::Shared(error) => error.kind(),
        }
    }

    /// A spawned step's task that did not finish.
    fn join(step: &'static str) -> impl FnOnce(tokio::task::JoinError) -> EngineError {
        move |source| EngineError::Join { step, source }
    }
}

/// Called at the moment an entry is evicted (tests use it to check that
/// nothing in use ever is).
pub type EvictionObserver = Box<dyn Fn(&EntryKey) + Send + Sync>;

/// The engine.
pub struct Engine {
    config: EngineConfig,
    store: Arc<Store>,
    registry: Arc<Registry>,
    /// Tag resolutions under way, by reference: a herd of pods asking for
    /// one tag at once costs the registry one request, not one each.
    resolutions: Flights<(String, access::AccessKey), Digest, EngineError>,
    /// What tags named when last asked: trusted for the tag TTL, and used
    /// while the registry cannot be reached.
    tags: Arc<TagMemory>,
    /// Proofs that requesters may read manifests (see [`access`]).
    access: access::AccessMemory,
    /// The tenant names metrics label so far (bounded).
    tenants: Mutex<std::collections::HashSet<String>>,
    /// Manifests already parsed, by digest. What a digest names never
    /// changes, and parsing the manifest of a 1,000-file model is a good part
    /// of a warm mount. Used only while the store still has the manifest.
    models: Mutex<HashMap<Digest, Arc<Model>>>,
    plugins: PluginHost,
    /// Exclude decisions made, and being made (one plugin call for a herd).
    decisions: Arc<ExcludeMemo>,
    /// Keyed by the plugin set's generation too: a mount after a reload
    /// never joins a decision of the old set.
    excluding: Flights<(u64, MemoKey), ExcludeDecision, EngineError>,
    /// Verify verdicts made, and being made (one gathering for a herd).
    verdicts: verify::Verdicts,
    verifying: Flights<(u64, access::Repository, Digest), Option<crate::plugins::verify::VerifyVerdict>, EngineError>,
    volumes: Volumes,
    entries: Flights<EntryKey, pull::Built, EngineError>,
    blobs: Flights<Digest, (), EngineError>,
    /// Tar layers being unpacked, by digest (after their blob's flight).
    unpacks: Flights<Digest, (), EngineError>,
    downloads: Semaphore,
    reservations: quota::Reservations,
    active: Mutex<HashMap<VolumeSlot, mount::ActiveMount>>,
    slots: mount::SlotLocks,
    /// Slots an unmount is taking down, with how many: a mount asking
    /// meanwhile is told to ask again, rather than be answered from a
    /// record or a tree the unmount is about to remove.
    releasing: Mutex<HashMap<VolumeSlot, usize>>,
    next_mount: std::sync::atomic::AtomicU64,
    recovery: Recovery,
    failed_at_start: Vec<VolumeRecord>,
    pins: Pins,
    /// One GC run at a time; a pin waits for the run under way.
    collecting: tokio::sync::Mutex<()>,
    on_evict: Mutex<Option<EvictionObserver>>,
}

impl Engine {
    /// Opens the store (waiting for its lock), recovers it, loads the
    /// plugins and gets ready to serve.
    ///
    /// # Errors
    /// A store that cannot be opened, a bad docker config, a runtime that
    /// cannot start.
    pub fn open(config: EngineConfig) -> Result<Arc<Engine>, EngineError> {
        let (store, recovery) = Store::open(&config.root)?;
        let layout = store.layout().clone();
        let volumes = Volumes::new(layout.records(), config.volumes_dir.clone().unwrap_or_else(|| layout.default_volumes()));
        std::fs::create_dir_all(volumes.trees()).map_err(|source| StoreError::Io {
            action: "create",
            path: volumes.trees().to_owned(),
            source,
        })?;
        let failed_at_start = volumes.recover()?;
        let registry = Registry::new(config.registry.clone())?;
        let tags = Arc::new(TagMemory::new(config.registry.tag_ttl));
        let access = access::AccessMemory::new(config.access_ttl);
        // Newest first: a tag's most recent volume says what it named last.
        let mut recorded: Vec<_> = volumes.list().into_iter().filter(|record| record.ready_at.is_some()).collect();
        recorded.sort_by_key(|record| std::cmp::Reverse(record.ready_at));
        for record in recorded {
            if let (Some(digest), Ok(reference)) = (&record.digest(), ModelRef::parse(&record.reference))
                && reference.digest().is_none()
            {
                tags.recall(reference.as_str(), digest);
            }
            if let (Some(digest), Ok(reference)) = (record.digest(), ModelRef::parse(&record.reference)) {
                access.recall(&reference, record.access, digest);
            }
        }
        let runtime = Runtime::new(config.runtime).map_err(EngineError::Runtime)?;
        let plugins = PluginHost::open(runtime, Some(CompiledCache::new(layout.components())), config.plugin_dir.clone());
        Ok(Arc::new(Engine {
            downloads: Semaphore::new(config.download_concurrency.max(1)),
            config,
            store,
            registry: Arc::new(registry),
            resolutions: Flights::default(),
            tags,
            access,
            tenants: Mutex::default(),
            models: Mutex::new(HashMap::new()),
            plugins,
            decisions: Arc::default(),
            excluding: Flights::default(),
            verdicts: verify::Verdicts::default(),
            verifying: Flights::default(),
            volumes,
            entries: Flights::default(),
            blobs: Flights::default(),
            unpacks: Flights::default(),
            reservations: quota::Reservations::default(),
            active: Mutex::new(HashMap::new()),
            slots: mount::SlotLocks::default(),
            releasing: Mutex::new(HashMap::new()),
            next_mount: std::sync::atomic::AtomicU64::new(0),
            recovery,
            failed_at_start,
            pins: Pins::new(&layout),
            collecting: tokio::sync::Mutex::new(()),
            on_evict: Mutex::new(None),
        }))
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    pub fn plugins(&self) -> &PluginHost {
        &self.plugins
    }

    pub fn volumes(&self) -> &Volumes {
        &self.volumes
    }

    /// What start-up recovery cleaned.
    pub fn recovery(&self) -> (&Recovery, &[VolumeRecord]) {
        (&self.recovery, &self.failed_at_start)
    }

    /// Writes a volume record durably, off the async workers.
    fn put_record(&self, record: &mut VolumeRecord) -> Result<(), VolumeError> {
        off_the_runtime(|| self.volumes.put(record))
    }

    /// Sets the function called at each eviction.
    pub fn on_evict(&self, observer: EvictionObserver) {
        *self.on_evict.lock().unwrap_or_else(|poison| poison.into_inner()) = Some(observer);
    }

    /// One garbage collection run (see [`Collector::run`]), never two at
    /// once.
    ///
    /// # Errors
    /// On I/O failure; a failing plugin is reported, not an error.
    pub async fn gc(self: &Arc<Self>, dry_run: bool, trigger: Trigger) -> Result<GcReport, EngineError> {
        let _one_at_a_time = self.collecting.lock().await;
        let engine = self.clone();
        let run = move || {
            let on_evict = |key: &EntryKey| {
                if let Some(observer) = &*engine.on_evict.lock().unwrap_or_else(|poison| poison.into_inner()) {
                    observer(key);
                }
            };
            let while_idle = |volume: &VolumeId, prune: &mut dyn FnMut()| engine.while_idle(volume, prune);
            let collector = Collector {
                store: &engine.store,
                volumes: &engine.volumes,
                pins: &engine.pins,
                plugins: &engine.plugins,
                grace: engine.config.gc_grace,
                while_idle: &while_idle,
                on_evict: &on_evict,
            };
            collector.run(dry_run, trigger)
        };
        Ok(tokio::task::spawn_blocking(run).await.map_err(EngineError::join("collect garbage"))??)
    }

    /// Runs GC every `interval` until the engine is dropped.
    pub fn spawn_periodic_gc(self: &Arc<Self>, interval: Duration) -> tokio::task::JoinHandle<()> {
        let engine = Arc::downgrade(self);
        crate::gc::spawn_periodic(interval, move || {
            let engine = engine.upgrade()?;
            Some(async move { engine.gc(false, Trigger::Periodic).await })
        })
    }

    /// Each entry's bytes (on disk, exclusive, shared), who references it,
    /// and totals that reconcile with `du -sb` of the root.
    ///
    /// # Errors
    /// When the store cannot be read.
    pub fn du(&self) -> Result<DuReport, EngineError> {
        Ok(crate::gc::du(&self.store, &self.volumes, &self.pins)?)
    }

    /// Pins a manifest (named by a reference, resolved now, or a bare
    /// `sha256:` digest): its entries are never offered to GC.
    ///
    /// # Errors
    /// An unresolvable reference, or I/O.
    pub async fn pin(&self, target: &str) -> Result<Pin, EngineError> {
        let digest = self.resolve_target(target).await?;
        // Not while a GC run is under way: it decided with the pins it read
        // at its start, and a pin that has answered must hold from then on.
        let _no_gc_run = self.collecting.lock().await;
        Ok(self.pins.pin(&digest, target)?)
    }

    /// Removes a pin; `false` when there was none.
    ///
    /// # Errors
    /// An unresolvable reference, or I/O.
    pub async fn unpin(&self, target: &str) -> Result<bool, EngineError> {
        let digest = self.resolve_target(target).await?;
        Ok(self.pins.unpin(&digest)?)
    }

    pub fn pins(&self) -> Vec<Pin> {
        self.pins.list()
    }
}

/// Runs blocking file work (a record's write and fsyncs) from async code
/// without stalling the tasks queued on the same worker: a record's fsyncs
/// must never hold up the network tasks behind them (B3 in
/// docs/benchmarks.md measures a herd of mounts finishing together).
/// Outside a multi-threaded runtime it just runs.
fn off_the_runtime<R>(work: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current().map(|handle| handle.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(work),
        _ => work(),
    }
}
