//! The engine: mounts models into volumes, tying the other modules together.
//!
//! A mount request flows like this:
//! 1. the volume's record is checked (same request again: done; another
//!    model: conflict) and written `pulling`;
//! 2. the reference is resolved to a manifest digest once; the manifest is
//!    read from the store or fetched by digest, and parsed;
//! 3. the exclude decision picks the files; the selection names the entry;
//!    the record now holds that entry against garbage collection;
//! 4. if the entry is not cached, the request joins the entry's flight: the
//!    quota decision admits and reserves the pull's new bytes, missing blobs
//!    are fetched (each blob once, node-wide, whatever entry needs it), tar
//!    layers unpacked, and the tree built and published;
//! 5. then, per request, the entry is leased, the volume's tree is linked from
//!    it, and the record written `ready`.
//!
//! Each volume's work runs as its own task; a caller that stops waiting does
//! not stop it, and `unmount` cancels it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::TryStreamExt;
use serde::Serialize;
use tokio::sync::{Semaphore, watch};

use crate::digest::Digest;
use crate::error::ErrorKind;
use crate::flight::{Flights, Progress};
use crate::gc::{DuEntry, DuReport, Eviction, GcReport, Pin, Pins, Trigger};
use crate::link::{LinkReport, Linker};
use crate::modelpack::{Layer, LayerFormat, Model, ModelError, Selection};
use crate::plugins::exclude::{
    Artifact, ExcludeDecision, ExcludeError, ExcludeInput, ExcludeMemo, ExcludeOptions, MemoKey, ModelFile, Skip,
};
use crate::plugins::gc::{Candidate, GcInput};
use crate::plugins::quota::{QuotaInput, QuotaVerdict};
use crate::plugins::{CompiledCache, PluginHost, Runtime, RuntimeOptions};
use crate::registry::{DownloadSlot, ModelRef, Registry, RegistryConfig, RegistryError, TagMemory};
use crate::store::{EntryKey, EntryLease, Hold, Recovery, Store, StoreError, UnpackLimits, remove_any, sync_dir, sync_tree};
use crate::volumes::{MountId, RecordError, VolumeError, VolumeId, VolumeRecord, VolumeState, Volumes};

/// How often a waiting mount writes its progress into its record.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);

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
    pub runtime: RuntimeOptions,
    pub unpack: UnpackConfig,
}

/// What one tar layer may expand to (see [`UnpackLimits`]).
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
            runtime: RuntimeOptions::default(),
            unpack: UnpackConfig::default(),
        }
    }
}

/// A request to mount a model into a volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountRequest {
    pub volume: VolumeId,
    pub mount_id: MountId,
    pub reference: String,
    pub options: ExcludeOptions,
}

/// What went wrong serving a request.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Volume(#[from] VolumeError),
    #[error("exclude decision for {reference}: {source}")]
    Exclude {
        reference: String,
        #[source]
        source: ExcludeError,
    },
    #[error("quota denied pulling {reference}: {reason}")]
    QuotaDenied { reference: String, reason: String },
    #[error("volume {volume}/{mount_id} already holds {holds} ({state:?}); release it first")]
    Conflict { volume: VolumeId, mount_id: MountId, holds: String, state: VolumeState },
    #[error("volume {volume}/{mount_id} has no record")]
    NotFound { volume: VolumeId, mount_id: MountId },
    #[error("volume {volume}/{mount_id}: the mount was cancelled")]
    Cancelled { volume: VolumeId, mount_id: MountId },
    #[error("volume {volume}/{mount_id} is being released; ask again once it is")]
    Releasing { volume: VolumeId, mount_id: MountId },
    #[error("the mount was stopped before it finished (released or shut down); ask again")]
    Stopped,
    #[error("plugin runtime: {0}")]
    Runtime(String),
    #[error(transparent)]
    Panicked(#[from] crate::flight::Panicked),
    #[error(transparent)]
    Shared(Arc<EngineError>),
}

impl EngineError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            EngineError::Registry(error) => error.kind(),
            EngineError::Model(error) => error.kind(),
            EngineError::Store(error) => error.kind(),
            EngineError::Volume(error) => error.kind(),
            EngineError::Exclude { source, .. } => source.kind(),
            EngineError::QuotaDenied { .. } => ErrorKind::QuotaDenied,
            EngineError::Conflict { .. } => ErrorKind::Conflict,
            EngineError::NotFound { .. } => ErrorKind::NotFound,
            EngineError::Cancelled { .. } | EngineError::Stopped => ErrorKind::Cancelled,
            EngineError::Releasing { .. } => ErrorKind::Unavailable,
            EngineError::Runtime(_) | EngineError::Panicked(_) => ErrorKind::Internal,
            EngineError::Shared(error) => error.kind(),
        }
    }
}

fn join_error(error: tokio::task::JoinError) -> EngineError {
    EngineError::Store(StoreError::Io {
        action: "run a blocking step",
        path: PathBuf::new(),
        source: std::io::Error::other(error.to_string()),
    })
}

/// How a request got its entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    /// It was in the cache.
    Cached,
    /// This request started the pull.
    Pulled,
    /// It joined a pull another request had started.
    Joined,
}

/// What a prefetch did.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Prefetched {
    pub key: EntryKey,
    pub bytes: u64,
    pub source: Source,
    pub pinned: bool,
}

struct Resolved {
    reference: ModelRef,
    model: Arc<Model>,
    selection: Selection,
    key: EntryKey,
    skips: Vec<Skip>,
    _holds: [Hold; 2],
}

impl Resolved {
    /// Bytes of the selected layers.
    fn bytes(&self) -> u64 {
        self.selection.layers(&self.model).map(|layer| layer.blob.size).sum()
    }
}

/// What building an entry fetched.
#[derive(Clone, Copy, Debug)]
struct Built {
    fetched_bytes: u64,
}

type Outcome = Option<Result<VolumeRecord, Arc<EngineError>>>;

/// A volume's place: its id and mount id.
type Slot = (VolumeId, MountId);

/// One lock per volume slot, so that what happens to a volume happens in
/// order. A mount task holds its slot for its whole run; unmount and shutdown
/// take it before they touch the tree, so they wait for the task they
/// cancelled (and a mount asking during an unmount is refused, see
/// `Engine::releasing`). Aborting a task cannot stop a blocking step it
/// started, so the link step carries the hold onto its thread (see
/// [`SlotHold::run_blocking`]): an unmount during it waits for it instead of
/// the link putting the tree back afterwards. Locks live only while
/// something holds or awaits them.
#[derive(Default)]
struct SlotLocks(Mutex<HashMap<Slot, Arc<tokio::sync::Mutex<()>>>>);

impl SlotLocks {
    fn of(&self, slot: &Slot) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.0.lock().unwrap_or_else(|poison| poison.into_inner());
        locks.retain(|_, lock| Arc::strong_count(lock) > 1);
        locks.entry(slot.clone()).or_default().clone()
    }

    /// Whether something holds or awaits a slot of `volume`.
    fn busy(&self, volume: &VolumeId) -> bool {
        let locks = self.0.lock().unwrap_or_else(|poison| poison.into_inner());
        locks.iter().any(|((held, _), lock)| held == volume && Arc::strong_count(lock) > 1)
    }
}

/// Marks a slot as being released until dropped (see `Engine::releasing`).
struct ReleaseMark<'a> {
    engine: &'a Engine,
    slot: Slot,
}

impl Drop for ReleaseMark<'_> {
    fn drop(&mut self) {
        let mut releasing = self.engine.releasing();
        if let Some(count) = releasing.get_mut(&self.slot) {
            *count -= 1;
            if *count == 0 {
                releasing.remove(&self.slot);
            }
        }
    }
}

/// A mount task's hold on its slot.
struct SlotHold(Option<tokio::sync::OwnedMutexGuard<()>>);

impl SlotHold {
    /// Runs `work` on a blocking thread that keeps the slot until `work`
    /// returns, even if this task is aborted meanwhile.
    async fn run_blocking<R: Send + 'static>(&mut self, work: impl FnOnce() -> R + Send + 'static) -> Result<R, EngineError> {
        let held = self.0.take().expect("a mount task holds its slot");
        let (result, held) = tokio::task::spawn_blocking(move || (work(), held)).await.map_err(join_error)?;
        self.0 = Some(held);
        Ok(result)
    }
}

/// A volume's operation in progress.
struct ActiveMount {
    id: u64,
    request: MountRequest,
    result: watch::Receiver<Outcome>,
    abort: tokio::task::AbortHandle,
    progress: Arc<MountProgress>,
}

/// How far one mount is: the model's selected bytes, of which those already
/// stored count as done, plus what its entry's flight has fetched.
#[derive(Debug, Default)]
struct MountProgress {
    bytes_total: std::sync::atomic::AtomicU64,
    flight: Mutex<Option<Arc<Progress>>>,
}

impl MountProgress {
    /// `(done, total)`; nothing is done before the flight knows what it fetches.
    fn snapshot(&self) -> (u64, u64) {
        let total = self.bytes_total.load(std::sync::atomic::Ordering::Relaxed);
        let flight = self.flight.lock().unwrap_or_else(|poison| poison.into_inner());
        let done = flight
            .as_ref()
            .and_then(|flight| flight.total().map(|fetching| total.saturating_sub(fetching) + flight.done()))
            .unwrap_or(0);
        (done.min(total), total)
    }
}

/// A mount under way (or done), to wait for.
pub struct MountHandle {
    result: watch::Receiver<Outcome>,
}

impl MountHandle {
    /// Waits for the mount to finish.
    ///
    /// # Errors
    /// Why the mount failed.
    pub async fn wait(&mut self) -> Result<VolumeRecord, EngineError> {
        match self.result.wait_for(Option::is_some).await {
            Ok(outcome) => outcome.clone().expect("waited for an outcome").map_err(EngineError::Shared),
            Err(_) => Err(EngineError::Stopped),
        }
    }
}

/// Bytes admitted by the quota decision and not yet in the cache.
#[derive(Debug, Default)]
struct Reservations {
    bytes: Mutex<u64>,
    /// Serialises decisions, so two pulls never pass on the same free space.
    deciding: tokio::sync::Mutex<()>,
}

struct Reservation<'a> {
    reservations: &'a Reservations,
    bytes: u64,
}

impl Reservation<'_> {
    /// The bytes are in the cache now and counted there.
    fn consume(&mut self, bytes: u64) {
        let bytes = bytes.min(self.bytes);
        self.bytes -= bytes;
        let mut reserved = self.reservations.bytes.lock().unwrap_or_else(|poison| poison.into_inner());
        *reserved -= bytes;
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        let bytes = self.bytes;
        self.consume(bytes);
    }
}

/// Per layer of `model`: its path, size, type, digest and whether it is cached.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct InspectedLayer {
    pub path: String,
    pub size: u64,
    pub media_type: String,
    pub digest: Digest,
    pub cached: bool,
}

/// What `inspect` reports of a reference.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Inspection {
    pub reference: String,
    pub digest: Digest,
    pub artifact_type: String,
    pub layers: Vec<InspectedLayer>,
    /// Cached trees of this manifest.
    pub entries: Vec<EntryKey>,
}

/// The engine.
pub struct Engine {
    config: EngineConfig,
    store: Arc<Store>,
    registry: Arc<Registry>,
    /// Tag resolutions under way, by reference: a herd of pods asking for
    /// one tag at once costs the registry one request, not one each.
    resolutions: Flights<String, Digest, EngineError>,
    /// What tags named when last asked: trusted for the tag TTL, and used
    /// while the registry cannot be reached.
    tags: Arc<TagMemory>,
    /// Manifests already parsed, by digest. What a digest names never
    /// changes, and parsing the manifest of a 1,000-file model is a good part
    /// of a warm mount. Used only while the store still has the manifest.
    models: Mutex<HashMap<Digest, Arc<Model>>>,
    plugins: PluginHost,
    /// Exclude decisions made, and being made (one plugin call for a herd).
    decisions: Arc<ExcludeMemo>,
    /// Keyed by the plugin set too (its address, alive while its flight
    /// runs): a mount after a reload never joins a decision of the old set.
    excluding: Flights<(usize, MemoKey), ExcludeDecision, EngineError>,
    volumes: Volumes,
    entries: Flights<EntryKey, Built, EngineError>,
    blobs: Flights<Digest, (), EngineError>,
    /// Tar layers being unpacked, by digest (after their blob's flight).
    unpacks: Flights<Digest, (), EngineError>,
    downloads: Semaphore,
    reservations: Reservations,
    active: Mutex<HashMap<Slot, ActiveMount>>,
    slots: SlotLocks,
    /// Slots an unmount is taking down, with how many: a mount asking
    /// meanwhile is told to ask again, rather than be answered from a
    /// record or a tree the unmount is about to remove.
    releasing: Mutex<HashMap<Slot, usize>>,
    next_mount: std::sync::atomic::AtomicU64,
    recovery: Recovery,
    failed_at_start: Vec<VolumeRecord>,
    pins: Pins,
    /// One GC run at a time; a pin waits for the run under way.
    collecting: tokio::sync::Mutex<()>,
    on_evict: Mutex<Option<EvictionObserver>>,
}

/// Called at the moment an entry is evicted (tests use it to check that
/// nothing in use ever is).
pub type EvictionObserver = Box<dyn Fn(&EntryKey) + Send + Sync>;

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
        // Newest first: a tag's most recent volume says what it named last.
        let mut recorded: Vec<_> = volumes.list().into_iter().filter(|record| record.ready_at.is_some()).collect();
        recorded.sort_by_key(|record| std::cmp::Reverse(record.ready_at));
        for record in recorded {
            if let (Some(digest), Ok(reference)) = (&record.digest, ModelRef::parse(&record.reference))
                && reference.digest().is_none()
            {
                tags.recall(reference.as_str(), digest);
            }
        }
        let runtime = Runtime::new(config.runtime).map_err(|error| EngineError::Runtime(error.to_string()))?;
        let plugins = PluginHost::open(runtime, Some(CompiledCache::new(layout.components())), config.plugin_dir.clone());
        Ok(Arc::new(Engine {
            downloads: Semaphore::new(config.download_concurrency.max(1)),
            config,
            store,
            registry: Arc::new(registry),
            resolutions: Flights::default(),
            tags,
            models: Mutex::new(HashMap::new()),
            plugins,
            decisions: Arc::default(),
            excluding: Flights::default(),
            volumes,
            entries: Flights::default(),
            blobs: Flights::default(),
            unpacks: Flights::default(),
            reservations: Reservations::default(),
            active: Mutex::new(HashMap::new()),
            slots: SlotLocks::default(),
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

    fn active(&self) -> std::sync::MutexGuard<'_, HashMap<Slot, ActiveMount>> {
        self.active.lock().unwrap_or_else(|poison| poison.into_inner())
    }

    /// Mounts a model into a volume and waits until it is ready.
    ///
    /// # Errors
    /// An [`EngineError`] whose [`kind`](EngineError::kind) says what to do.
    pub async fn mount(self: &Arc<Self>, request: MountRequest) -> Result<VolumeRecord, EngineError> {
        self.start_mount(request)?.wait().await
    }

    /// Starts a mount (or joins the same one under way) and returns at once.
    ///
    /// # Errors
    /// An invalid reference, or a conflict with what the volume holds.
    pub fn start_mount(self: &Arc<Self>, request: MountRequest) -> Result<MountHandle, EngineError> {
        ModelRef::parse(&request.reference)?;
        request.options.validate().map_err(|source| EngineError::Exclude { reference: request.reference.clone(), source })?;
        let slot = (request.volume.clone(), request.mount_id.clone());
        let mut active = self.active();
        if let Some(running) = active.get(&slot) {
            if running.request == request {
                return Ok(MountHandle { result: running.result.clone() });
            }
            return Err(EngineError::Conflict {
                volume: request.volume,
                mount_id: request.mount_id,
                holds: running.request.reference.clone(),
                state: VolumeState::Pulling,
            });
        }
        if self.releasing().contains_key(&slot) {
            return Err(EngineError::Releasing { volume: request.volume, mount_id: request.mount_id });
        }
        if let Some(record) = self.volumes.get(&request.volume, &request.mount_id)? {
            let same = record.reference == request.reference && record.options == request.options;
            match record.state {
                VolumeState::Ready if same && record.path.is_dir() => {
                    let (_, result) = watch::channel(Some(Ok(record)));
                    return Ok(MountHandle { result });
                }
                VolumeState::Ready | VolumeState::Pulling if !same => {
                    return Err(EngineError::Conflict {
                        volume: request.volume,
                        mount_id: request.mount_id,
                        holds: record.reference,
                        state: record.state,
                    });
                }
                _ => {}
            }
        }
        // Written before the answer, so a caller that does not wait can ask
        // for the status at once.
        let mut record = VolumeRecord::pulling(
            request.volume.clone(),
            request.mount_id.clone(),
            request.reference.clone(),
            request.options.clone(),
            self.volumes.tree(&request.volume, &request.mount_id),
        );
        off_the_runtime(|| self.volumes.put_pulling(&mut record))?;
        let id = self.next_mount.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let slot_lock = self.slots.of(&slot);
        let (sender, result) = watch::channel(None);
        let engine = self.clone();
        let task_request = request.clone();
        let progress = Arc::new(MountProgress::default());
        let task_progress = progress.clone();
        let task = tokio::spawn(async move {
            let hold = SlotHold(Some(slot_lock.lock_owned().await));
            let outcome = engine.clone().run_mount(task_request.clone(), record, task_progress, hold).await.map_err(Arc::new);
            let slot = (task_request.volume, task_request.mount_id);
            let mut active = engine.active();
            if active.get(&slot).is_some_and(|running| running.id == id) {
                active.remove(&slot);
            }
            drop(active);
            let _ = sender.send(Some(outcome));
        });
        active.insert(slot, ActiveMount { id, request, result: result.clone(), abort: task.abort_handle(), progress });
        Ok(MountHandle { result })
    }

    /// The mount of `volume`/`mount_id` under way, to wait for; `None` when
    /// none is running.
    pub fn running(&self, volume: &VolumeId, mount_id: &MountId) -> Option<MountHandle> {
        let active = self.active();
        let running = active.get(&(volume.clone(), mount_id.clone()))?;
        Some(MountHandle { result: running.result.clone() })
    }

    /// Bytes done and to do of a mount under way.
    pub fn progress(&self, volume: &VolumeId, mount_id: &MountId) -> Option<(u64, u64)> {
        let active = self.active();
        let running = active.get(&(volume.clone(), mount_id.clone()))?;
        Some(running.progress.snapshot())
    }

    async fn run_mount(
        self: Arc<Self>,
        request: MountRequest,
        mut record: VolumeRecord,
        progress: Arc<MountProgress>,
        mut hold: SlotHold,
    ) -> Result<VolumeRecord, EngineError> {
        // A panic fails this volume like any error (its record says so), and
        // lets its slot go instead of leaving it to look busy forever.
        match crate::flight::catch_panic(self.fill(&request, &mut record, &progress, &mut hold)).await {
            Ok(()) => {
                record.state = VolumeState::Ready;
                record.error = None;
                record.ready_at = Some(time::OffsetDateTime::now_utc());
                self.put_record(&mut record)?;
                tracing::info!(volume = %record.volume, mount_id = %record.mount_id, reference = %record.reference,
                    reused = record.reused_from_cache, coalesced = record.coalesced, link = ?record.link_method, "volume ready");
                Ok(record)
            }
            Err(error) => {
                record.state = VolumeState::Failed;
                record.error = Some(RecordError { kind: error.kind(), message: crate::plugins::error_chain(&error) });
                if let Err(write_error) = self.put_record(&mut record) {
                    tracing::error!(volume = %record.volume, "cannot record the failure: {write_error}");
                }
                tracing::warn!(volume = %record.volume, mount_id = %record.mount_id, reference = %record.reference,
                    "mount failed: {}", crate::plugins::error_chain(&error));
                Err(error)
            }
        }
    }

    /// Everything but the record's final state.
    async fn fill(
        self: &Arc<Self>,
        request: &MountRequest,
        record: &mut VolumeRecord,
        progress: &MountProgress,
        hold: &mut SlotHold,
    ) -> Result<(), EngineError> {
        let resolved = self.resolve_request(&request.reference, &request.options).await?;
        record.digest = Some(resolved.key.manifest.clone());
        record.skipped = resolved.skips.clone();
        record.selection = Some(resolved.key.selection.clone());
        record.bytes_total = resolved.bytes();
        progress.bytes_total.store(record.bytes_total, std::sync::atomic::Ordering::Relaxed);
        // From here the record holds the entry too, and keeps holding it
        // once ready.
        off_the_runtime(|| self.volumes.put_pulling(record))?;

        let (lease, source) = self
            .ensure_entry(
                &resolved,
                |flight| {
                    *progress.flight.lock().unwrap_or_else(|poison| poison.into_inner()) = Some(flight.clone());
                },
                |_| {
                    record.bytes_done = progress.snapshot().0;
                    off_the_runtime(|| self.volumes.put_pulling(record))
                },
            )
            .await?;
        record.reused_from_cache = source == Source::Cached;
        record.coalesced = source == Source::Joined;
        record.bytes_done = record.bytes_total;

        let tree = lease.tree();
        let target = record.path.clone();
        let report = hold.run_blocking(move || link_volume(&tree, &target)).await??;
        let metrics = crate::metrics::metrics();
        for (method, files) in [("hardlink", report.hardlinks), ("reflink", report.reflinks), ("copy", report.copies)] {
            if files > 0 {
                metrics.linked_files.add([method], files);
            }
        }
        record.link_method = report.method();
        record.link = Some(report);
        off_the_runtime(|| self.store.record_use(&resolved.key, resolved.reference.as_str()))?;
        drop(lease);
        Ok(())
    }

    /// A reference and options turned into a model, a selection and the entry
    /// that serves it; the manifest and the entry are held against GC from
    /// the moment they are known.
    async fn resolve_request(&self, reference: &str, options: &ExcludeOptions) -> Result<Resolved, EngineError> {
        let reference = ModelRef::parse(reference)?;
        let digest = self.resolve(&reference).await?;
        let manifest_hold = self.store.hold(None, std::slice::from_ref(&digest));
        let model = self.model(&reference, &digest).await?;
        let decision = self.exclude(&reference, &model, options).await?;
        let selection = model.select(decision.skips.iter().map(|skip| skip.path.as_str()));
        let key = EntryKey::new(digest, selection.key().clone());
        let entry_hold = self.store.hold(Some(&key), &[]);
        Ok(Resolved { reference, model, selection, key, skips: decision.skips, _holds: [manifest_hold, entry_hold] })
    }

    /// The entry, leased: cached, or built by the flight this request joins.
    /// `joined` sees the flight's progress; `tick` runs every second while
    /// it goes on.
    async fn ensure_entry(
        self: &Arc<Self>,
        resolved: &Resolved,
        mut joined: impl FnMut(&Arc<Progress>),
        mut tick: impl FnMut(&Progress) -> Result<(), VolumeError>,
    ) -> Result<(EntryLease, Source), EngineError> {
        let metrics = crate::metrics::metrics();
        let key = &resolved.key;
        if let Some(lease) = self.store.lease_entry(key) {
            metrics.cache_hits.inc();
            return Ok((lease, Source::Cached));
        }
        // GC may evict a finished entry before this request leases it (only
        // when no record holds it, so rarely): build it again, a few times.
        // One of those may instead be a joiner's own try (`joiner_retries`).
        let mut retried = false;
        for _ in 0..3 {
            let engine = self.clone();
            let (reference, model, selection, flight_key) =
                (resolved.reference.clone(), resolved.model.clone(), resolved.selection.clone(), key.clone());
            let mut ticket = self.entries.join(key.clone(), move |progress| async move {
                engine.build_entry(&reference, &model, &selection, &flight_key, progress).await
            });
            joined(ticket.progress());
            let mut interval = tokio::time::interval(PROGRESS_INTERVAL);
            interval.tick().await;
            let built = loop {
                tokio::select! {
                    built = ticket.wait() => break built,
                    _ = interval.tick() => tick(ticket.progress())?,
                }
            };
            let built = match built {
                Err(error) if ticket.coalesced() && !retried && joiner_retries(&error) => {
                    tracing::info!(reference = %resolved.reference,
                        "the pull this mount joined failed ({error}); trying on its own");
                    retried = true;
                    continue;
                }
                built => built.map_err(EngineError::Shared)?,
            };
            let source = if ticket.coalesced() {
                Source::Joined
            } else if built.fetched_bytes == 0 {
                Source::Cached
            } else {
                Source::Pulled
            };
            if let Some(lease) = self.store.lease_entry(key) {
                match source {
                    Source::Cached => metrics.cache_hits.inc(),
                    Source::Pulled => metrics.cache_misses.inc(),
                    Source::Joined => metrics.coalesced_waiters.inc(),
                }
                return Ok((lease, source));
            }
        }
        Err(EngineError::Store(StoreError::Io {
            action: "keep the entry long enough to link",
            path: self.store.layout().entry(key),
            source: std::io::Error::other("evicted three times in a row"),
        }))
    }

    /// Pulls a model into the cache with no volume, so a node is warm before
    /// pods land; `pin` keeps it from GC.
    ///
    /// # Errors
    /// As a mount's.
    pub async fn prefetch(
        self: &Arc<Self>,
        reference: &str,
        options: &ExcludeOptions,
        pin: bool,
    ) -> Result<Prefetched, EngineError> {
        options.validate().map_err(|source| EngineError::Exclude { reference: reference.to_owned(), source })?;
        let resolved = self.resolve_request(reference, options).await?;
        if pin {
            // As `pin`: not while a GC run decides with older pins.
            let _no_gc_run = self.collecting.lock().await;
            self.pins.pin(&resolved.key.manifest, reference)?;
        }
        let (lease, source) = self.ensure_entry(&resolved, |_| {}, |_| Ok(())).await?;
        drop(lease);
        Ok(Prefetched { key: resolved.key.clone(), bytes: resolved.bytes(), source, pinned: pin })
    }

    /// The shared part of a mount: admit, fetch, unpack, build.
    async fn build_entry(
        self: Arc<Self>,
        reference: &ModelRef,
        model: &Arc<Model>,
        selection: &Selection,
        key: &EntryKey,
        progress: Arc<Progress>,
    ) -> Result<Built, EngineError> {
        if self.store.has_entry(key) {
            return Ok(Built { fetched_bytes: 0 });
        }
        let built = self.clone().pull_entry(reference, model, selection, key, progress).await;
        // A pull is a build that had to fetch (or failed trying); a new
        // selection of stored blobs is not one.
        let metrics = crate::metrics::metrics();
        match &built {
            Ok(built) if built.fetched_bytes == 0 => {}
            Ok(_) => {
                metrics.pulls_started.inc();
                metrics.pulls_succeeded.inc();
            }
            Err(error) => {
                metrics.pulls_started.inc();
                metrics.pulls_failed.inc([error.kind().as_str()]);
            }
        }
        built
    }

    async fn pull_entry(
        self: Arc<Self>,
        reference: &ModelRef,
        model: &Arc<Model>,
        selection: &Selection,
        key: &EntryKey,
        progress: Arc<Progress>,
    ) -> Result<Built, EngineError> {
        let layers: Vec<&Layer> = selection.layers(model).collect();
        let mut needed: Vec<Digest> = layers.iter().map(|layer| layer.blob.digest.clone()).collect();
        needed.push(model.digest.clone());
        let _hold = self.store.hold(Some(key), &needed);
        let missing: Vec<Layer> =
            layers.iter().filter(|layer| !self.store.has_layer(layer)).map(|layer| (*layer).clone()).collect();
        // The same bytes may be both a raw file and an archive of one model:
        // fetched and counted once, and the archive kept after unpacking.
        let raw: std::collections::HashSet<&Digest> =
            layers.iter().filter(|layer| layer.format == LayerFormat::Raw).map(|layer| &layer.blob.digest).collect();
        let mut counted = std::collections::HashSet::new();
        let incoming: u64 = missing
            .iter()
            .filter(|layer| !self.store.has_blob(&layer.blob.digest) && counted.insert(&layer.blob.digest))
            .map(|layer| layer.blob.size)
            .sum();
        progress.set_total(incoming);
        let reservation = Mutex::new(self.admit(reference, model, incoming).await?);

        futures_util::stream::iter(missing.iter().map(Ok::<_, EngineError>))
            .try_for_each_concurrent(self.config.layer_concurrency.max(1), |layer| {
                let engine = self.clone();
                let progress = progress.clone();
                let reservation = &reservation;
                let keep_archive = raw.contains(&layer.blob.digest);
                async move {
                    engine.ensure_layer(reference, layer, &progress, keep_archive).await?;
                    reservation.lock().unwrap_or_else(|poison| poison.into_inner()).consume(layer.blob.size);
                    Ok(())
                }
            })
            .await?;

        let store = self.store.clone();
        let (model, selection, key) = (model.clone(), selection.clone(), key.clone());
        tokio::task::spawn_blocking(move || store.build_entry(&key, &model, &selection)).await.map_err(join_error)??;
        Ok(Built { fetched_bytes: incoming })
    }

    /// Makes one layer's content present: its blob fetched (once node-wide,
    /// whoever asks) and, for archives, unpacked (likewise once).
    async fn ensure_layer(
        self: &Arc<Self>,
        reference: &ModelRef,
        layer: &Layer,
        progress: &Arc<Progress>,
        keep_archive: bool,
    ) -> Result<(), EngineError> {
        if self.store.has_layer(layer) {
            return Ok(());
        }
        // A joiner whose download failed for its starter's reasons tries
        // once on its own (`joiner_retries`).
        let mut retried = false;
        while !self.store.has_blob(&layer.blob.digest) {
            let engine = self.clone();
            let (flight_reference, blob) = (reference.clone(), layer.blob.clone());
            let (mode, mtime) = (layer.mode, layer.mtime);
            let mut ticket = self.blobs.join(layer.blob.digest.clone(), move |blob_progress| async move {
                engine.fetch_blob(&flight_reference, &blob, mode, mtime, &blob_progress).await
            });
            ticket.progress().forward_to(progress);
            match ticket.wait().await {
                Err(error) if ticket.coalesced() && !retried && joiner_retries(&error) => {
                    tracing::info!(reference = %reference, blob = %layer.blob.digest.short(),
                        "the download this pull joined failed ({error}); trying on its own");
                    // The failed flight's bytes went with its temporary.
                    progress.take_back(ticket.progress().done());
                    retried = true;
                }
                other => {
                    other.map_err(EngineError::Shared)?;
                    break;
                }
            }
        }
        if matches!(layer.format, LayerFormat::Tar(_)) {
            let engine = self.clone();
            let owned = layer.clone();
            let mut ticket = self.unpacks.join(layer.blob.digest.clone(), move |_| async move {
                let limits = engine.unpack_limits()?;
                let store = engine.store.clone();
                tokio::task::spawn_blocking(move || store.unpack(&owned, &limits, keep_archive)).await.map_err(join_error)??;
                Ok(())
            });
            ticket.wait().await.map_err(EngineError::Shared)?;
        }
        Ok(())
    }

    async fn fetch_blob(
        &self,
        reference: &ModelRef,
        blob: &crate::modelpack::Descriptor,
        mode: Option<u32>,
        mtime: Option<std::time::SystemTime>,
        progress: &Progress,
    ) -> Result<(), EngineError> {
        if self.store.has_blob(&blob.digest) {
            return Ok(());
        }
        let mut slot = DownloadSlot::acquire(&self.downloads)
            .await
            .map_err(|_| EngineError::Runtime("the engine is shutting down".into()))?;
        let mut ingest = self.store.ingest(blob)?;
        self.registry.fetch_blob(reference, blob, &mut ingest, progress, &mut slot).await?;
        ingest.commit(mode, mtime).await?;
        Ok(())
    }

    /// What an unpack may take now: the configured per-layer limits, and
    /// the floor of free space and inodes, raised by what pulls reserved.
    fn unpack_limits(&self) -> Result<UnpackLimits, EngineError> {
        let config = &self.config.unpack;
        let filesystem = self.store.filesystem()?;
        let (total_inodes, _) = self.store.inodes()?;
        let inode_floor = match config.keep_free {
            modelcache_policy::size::Limit::Percent(percent) => (total_inodes as f64 * percent / 100.0) as u64,
            modelcache_policy::size::Limit::Bytes(_) => 0,
        };
        Ok(UnpackLimits {
            max_bytes: config.layer_bytes,
            max_entries: config.layer_entries,
            keep_free_bytes: config.keep_free.bytes_of(filesystem.total_bytes).saturating_add(self.reserved_bytes()),
            keep_free_inodes: inode_floor,
        })
    }

    /// The quota decision for a pull adding `incoming` bytes, and the
    /// reservation that holds them until the pull ends.
    async fn admit(self: &Arc<Self>, reference: &ModelRef, model: &Model, incoming: u64) -> Result<Reservation<'_>, EngineError> {
        let reservations = &self.reservations;
        if incoming == 0 {
            return Ok(Reservation { reservations, bytes: 0 });
        }
        let _one_at_a_time = reservations.deciding.lock().await;
        let mut verdict = self.quota(reference, model, incoming).await?;
        if matches!(verdict, QuotaVerdict::Deny { .. }) {
            // Make room if GC can, then ask once more.
            let report = self.gc(false, Trigger::QuotaDenied).await?;
            if !report.evicted.is_empty() || !report.blobs.is_empty() {
                verdict = self.quota(reference, model, incoming).await?;
            }
        }
        match verdict {
            QuotaVerdict::Admit => {
                *reservations.bytes.lock().unwrap_or_else(|poison| poison.into_inner()) += incoming;
                Ok(Reservation { reservations, bytes: incoming })
            }
            QuotaVerdict::Deny { reason, .. } => Err(EngineError::QuotaDenied { reference: reference.to_string(), reason }),
        }
    }

    async fn quota(&self, reference: &ModelRef, model: &Model, incoming: u64) -> Result<QuotaVerdict, EngineError> {
        let input = QuotaInput {
            reference: reference.to_string(),
            manifest_digest: model.digest.to_string(),
            incoming_bytes: incoming,
            cache_bytes: self.store.cache_bytes() + self.volumes.copied_bytes(),
            reserved_bytes: *self.reservations.bytes.lock().unwrap_or_else(|poison| poison.into_inner()),
            filesystem: self.store.filesystem()?,
        };
        let plugins = self.plugins.current();
        let decision = tokio::task::spawn_blocking(move || plugins.quota(&input)).await.map_err(join_error)?;
        Ok(decision.verdict)
    }

    /// Bytes admitted and not yet in the cache.
    pub fn reserved_bytes(&self) -> u64 {
        *self.reservations.bytes.lock().unwrap_or_else(|poison| poison.into_inner())
    }

    /// The manifest of `digest`: from the store, or fetched by digest, checked
    /// to be a model, then stored.
    async fn model(&self, reference: &ModelRef, digest: &Digest) -> Result<Arc<Model>, EngineError> {
        if self.store.has_blob(digest) {
            let parsed = self.models.lock().unwrap_or_else(|poison| poison.into_inner()).get(digest).cloned();
            if let Some(model) = parsed {
                return Ok(model);
            }
            let model = Arc::new(Model::parse(digest, &self.store.read_blob(digest)?)?);
            self.remember_model(&model);
            return Ok(model);
        }
        let bytes = self.registry.fetch_manifest(reference, digest).await?;
        let model = Arc::new(Model::parse(digest, &bytes)?);
        self.store.put_blob(digest, &bytes)?;
        self.remember_model(&model);
        Ok(model)
    }

    fn remember_model(&self, model: &Arc<Model>) {
        let mut parsed = self.models.lock().unwrap_or_else(|poison| poison.into_inner());
        // 64: more than the models one node serves.
        crate::memo::insert_bounded(&mut parsed, 64, model.digest.clone(), model.clone());
    }

    /// The exclude decision for this model and these options: remembered,
    /// or asked of the plugins once for all the mounts asking at once.
    async fn exclude(
        &self,
        reference: &ModelRef,
        model: &Model,
        options: &ExcludeOptions,
    ) -> Result<ExcludeDecision, EngineError> {
        let plugins = self.plugins.current();
        let memo_key = (reference.to_string(), model.digest.to_string(), options.clone());
        if let Some(decision) = self.decisions.get(&plugins, &memo_key) {
            return Ok(decision);
        }
        let decisions = self.decisions.clone();
        let flight_key = (Arc::as_ptr(&plugins) as usize, memo_key.clone());
        let mut ticket = self.excluding.join(flight_key, |_| {
            let input = ExcludeInput {
                artifact: Artifact {
                    reference: reference.to_string(),
                    manifest_digest: model.digest.to_string(),
                    annotations: model.annotations.clone(),
                },
                files: model
                    .layers
                    .iter()
                    .map(|layer| ModelFile {
                        path: layer.path.to_string(),
                        size: layer.blob.size,
                        media_type: layer.blob.media_type.clone(),
                        layer_digest: layer.blob.digest.to_string(),
                    })
                    .collect(),
                options: options.clone(),
            };
            let reference = reference.to_string();
            async move {
                let asked = plugins.clone();
                let decision = tokio::task::spawn_blocking(move || asked.exclude(input))
                    .await
                    .map_err(join_error)?
                    .map_err(|source| EngineError::Exclude { reference, source })?;
                decisions.put(&plugins, memo_key, &decision);
                Ok(decision)
            }
        });
        ticket.wait().await.map_err(EngineError::Shared)
    }

    /// Releases a volume: cancels its mount if one is under way, removes its
    /// tree and marks the record released. Releasing twice is fine.
    ///
    /// # Errors
    /// [`EngineError::NotFound`] when the volume never had a record.
    pub async fn unmount(self: &Arc<Self>, volume: &VolumeId, mount_id: &MountId) -> Result<VolumeRecord, EngineError> {
        // Runs to the end even when the caller goes away (a client hanging up
        // drops this future): stopped halfway, it would leave a `pulling`
        // record with no task behind it, holding its entry against GC.
        let engine = self.clone();
        let slot = (volume.clone(), mount_id.clone());
        tokio::spawn(async move { engine.release(slot).await }).await.map_err(join_error)?
    }

    fn releasing(&self) -> std::sync::MutexGuard<'_, HashMap<Slot, usize>> {
        self.releasing.lock().unwrap_or_else(|poison| poison.into_inner())
    }

    async fn release(&self, slot: Slot) -> Result<VolumeRecord, EngineError> {
        let lock = self.slots.of(&slot);
        {
            // One step with the task's removal, so no mount slips in between.
            let mut active = self.active();
            if let Some(running) = active.remove(&slot) {
                running.abort.abort();
            }
            *self.releasing().entry(slot.clone()).or_default() += 1;
        }
        let _marked = ReleaseMark { engine: self, slot: slot.clone() };
        // Once held, the task is gone, link step included.
        let _held = lock.lock_owned().await;
        let (volume, mount_id) = slot;
        let Some(mut record) = self.volumes.get(&volume, &mount_id)? else {
            return Err(EngineError::NotFound { volume, mount_id });
        };
        let tree = record.path.clone();
        tokio::task::spawn_blocking(move || remove_any(&tree)).await.map_err(join_error)??;
        if record.state != VolumeState::Released {
            if record.state == VolumeState::Pulling {
                record.error = Some(RecordError { kind: ErrorKind::Cancelled, message: "released while pulling".into() });
            }
            record.state = VolumeState::Released;
            self.put_record(&mut record)?;
            tracing::info!(volume = %volume, mount_id = %mount_id, "volume released");
        }
        Ok(record)
    }

    /// Mounts under way.
    pub fn active_mounts(&self) -> usize {
        self.active().len()
    }

    /// Waits up to `timeout` for the mounts under way, then cancels the rest
    /// (their records say so, so a client knows to ask again) and waits a
    /// little for their pulls to let go of their temporaries. Returns how
    /// many were cancelled.
    pub async fn shutdown(&self, timeout: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.active_mounts() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let remaining: Vec<_> = self.active().drain().collect();
        let cancelled = remaining.len();
        // Every task is stopped first, so their link steps end together.
        let remaining: Vec<_> = remaining
            .into_iter()
            .map(|(slot, running)| {
                running.abort.abort();
                let lock = self.slots.of(&slot);
                (slot, lock)
            })
            .collect();
        for ((volume, mount_id), lock) in remaining {
            let _held = lock.lock_owned().await;
            if let Ok(Some(mut record)) = self.volumes.get(&volume, &mount_id) {
                if record.state == VolumeState::Pulling {
                    record.state = VolumeState::Failed;
                    record.error = Some(RecordError {
                        kind: ErrorKind::Cancelled,
                        message: "modelcache shut down before the mount finished; ask again".into(),
                    });
                    if let Err(error) = self.put_record(&mut record) {
                        tracing::error!(volume = %volume, "cannot record the cancellation: {error}");
                    }
                }
            }
            tracing::info!(volume = %volume, mount_id = %mount_id, "mount cancelled by shutdown");
        }
        // Aborted flights unwind and drop their temporaries; blocking steps
        // finish on their own threads.
        let settle = tokio::time::Instant::now() + Duration::from_secs(5);
        while !(self.entries.is_empty() && self.blobs.is_empty()) && tokio::time::Instant::now() < settle {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        cancelled
    }

    /// A volume's record, with live progress while it pulls.
    ///
    /// # Errors
    /// [`EngineError::NotFound`] when there is no record.
    pub fn status(&self, volume: &VolumeId, mount_id: &MountId) -> Result<VolumeRecord, EngineError> {
        let mut record = self
            .volumes
            .get(volume, mount_id)?
            .ok_or_else(|| EngineError::NotFound { volume: volume.clone(), mount_id: mount_id.clone() })?;
        if record.state == VolumeState::Pulling {
            if let Some((done, total)) = self.progress(volume, mount_id) {
                record.bytes_done = done;
                record.bytes_total = total.max(record.bytes_total);
            }
        }
        Ok(record)
    }

    /// Every volume record.
    pub fn list(&self) -> Vec<VolumeRecord> {
        self.volumes.list()
    }

    /// What a reference resolves to (as a mount would resolve it now), its
    /// files and what of them is cached. Writes nothing.
    ///
    /// # Errors
    /// Registry and manifest errors.
    pub async fn inspect(&self, reference: &str) -> Result<Inspection, EngineError> {
        let reference = ModelRef::parse(reference)?;
        let digest = self.resolve(&reference).await?;
        let model = if self.store.has_blob(&digest) {
            Model::parse(&digest, &self.store.read_blob(&digest)?)?
        } else {
            Model::parse(&digest, &self.registry.fetch_manifest(&reference, &digest).await?)?
        };
        let layers = model
            .layers
            .iter()
            .map(|layer| InspectedLayer {
                path: layer.path.to_string(),
                size: layer.blob.size,
                media_type: layer.blob.media_type.clone(),
                digest: layer.blob.digest.clone(),
                cached: self.store.has_layer(layer),
            })
            .collect();
        let entries = self.store.entries()?.into_iter().filter(|key| key.manifest == digest).collect();
        Ok(Inspection { reference: reference.to_string(), digest, artifact_type: model.artifact_type, layers, entries })
    }
}

impl Engine {
    /// The digest `reference` names: what the registry said less than the
    /// tag TTL ago, else one registry request for all the callers asking
    /// about the same reference at once (a caller that joins gets the
    /// answer to a request sent at most one round trip before its own
    /// arrival), else, when the registry cannot be reached, what the tag
    /// named when last heard of ([`TagMemory`]).
    async fn resolve(&self, reference: &ModelRef) -> Result<Digest, EngineError> {
        if let Some(digest) = reference.digest() {
            return Ok(digest);
        }
        if let Some(digest) = self.tags.fresh(reference) {
            return Ok(digest);
        }
        let (registry, tags) = (self.registry.clone(), self.tags.clone());
        let owned = reference.clone();
        let mut ticket = self.resolutions.join(reference.to_string(), move |_| async move {
            match registry.resolve(&owned).await {
                Ok(digest) => {
                    tags.remember(&owned, &digest);
                    Ok(digest)
                }
                Err(error) => {
                    // Gone or refused: never to be served from memory.
                    if matches!(error.kind(), ErrorKind::NotFound | ErrorKind::PermissionDenied) {
                        tags.forget(&owned);
                    }
                    Err(error.into())
                }
            }
        });
        match ticket.wait().await {
            Ok(digest) => Ok(digest),
            Err(error) if error.kind() == ErrorKind::Unavailable => match self.tags.fall_back(reference) {
                Some(digest) => {
                    tracing::warn!(%reference, %digest, "serving what the tag named when last heard of: {}", crate::plugins::error_chain(&*error));
                    Ok(digest)
                }
                None => Err(EngineError::Shared(error)),
            },
            Err(error) => Err(EngineError::Shared(error)),
        }
    }

    /// Writes a volume record durably, off the async workers.
    fn put_record(&self, record: &mut VolumeRecord) -> Result<(), VolumeError> {
        off_the_runtime(|| self.volumes.put(record))
    }

    /// Sets the function called at each eviction.
    pub fn on_evict(&self, observer: EvictionObserver) {
        *self.on_evict.lock().unwrap_or_else(|poison| poison.into_inner()) = Some(observer);
    }

    fn protected(&self, key: &EntryKey, pinned: &std::collections::HashSet<Digest>) -> bool {
        self.volumes.is_held(key) || self.store.is_entry_leased(key) || pinned.contains(&key.manifest)
    }

    /// One garbage collection run: the gc plugins choose among the entries
    /// nothing protects; chosen entries go whole, then every blob no entry
    /// needs, then stale temporaries. A dry run reports and changes nothing.
    ///
    /// # Errors
    /// On I/O failure; a failing plugin is reported, not an error.
    pub async fn gc(self: &Arc<Self>, dry_run: bool, trigger: Trigger) -> Result<GcReport, EngineError> {
        let _one_at_a_time = self.collecting.lock().await;
        let engine = self.clone();
        tokio::task::spawn_blocking(move || engine.collect(dry_run, trigger)).await.map_err(join_error)?
    }

    fn collect(&self, dry_run: bool, trigger: Trigger) -> Result<GcReport, EngineError> {
        let before = self.store.cache_bytes();
        let temporaries = if dry_run { Vec::new() } else { self.store.remove_stale_temporaries(self.config.gc_grace)? };
        let records = if dry_run { Vec::new() } else { self.prune_volumes() };
        let pinned = self.pins.digests();
        let entries = self.store.entries()?;
        let candidates = crate::gc::candidates(&entries, |key| self.protected(key, &pinned));
        let (bytes, _) = crate::gc::account(&crate::gc::census(self.store.layout(), self.volumes.trees()));
        let now = time::OffsetDateTime::now_utc();
        let mut offered = Vec::new();
        let mut facts = HashMap::new();
        for key in candidates {
            let info = self.store.entry_info(key)?;
            let usage = self.store.entry_usage(key);
            let entry_bytes = bytes.get(key).copied().unwrap_or_default();
            offered.push(Candidate {
                key: key.to_string(),
                manifest_digest: key.manifest.to_string(),
                references: usage.references.clone(),
                bytes_on_disk: entry_bytes.on_disk,
                exclusive_bytes: entry_bytes.exclusive,
                created_at: info.created_at.unix_timestamp().max(0) as u64,
                last_used_at: usage.last_used_at.unwrap_or(info.created_at).unix_timestamp().max(0) as u64,
                use_count: usage.use_count,
            });
            facts.insert(key.to_string(), (key.clone(), entry_bytes, usage));
        }
        let input = GcInput {
            filesystem: self.store.filesystem()?,
            cache_bytes: before + self.volumes.copied_bytes(),
            now: now.unix_timestamp().max(0) as u64,
            candidates: offered,
        };
        let candidates = input.candidates.len();
        let decision = self.plugins.current().gc(input);
        let mut evicted = Vec::new();
        for choice in decision.evict {
            let Some((key, entry_bytes, usage)) = facts.remove(&choice.key) else { continue };
            // The store checks its own leases under its lock.
            let referenced = |key: &EntryKey| self.volumes.is_held(key) || pinned.contains(&key.manifest);
            let done = dry_run
                || self.store.evict_entry(&key, referenced, |key| {
                    if let Some(observer) = &*self.on_evict.lock().unwrap_or_else(|poison| poison.into_inner()) {
                        observer(key);
                    }
                })?;
            if done {
                tracing::info!(entry = %key, plugin = %choice.plugin, exclusive_bytes = entry_bytes.exclusive, dry_run, "evicting");
                evicted.push(Eviction {
                    key,
                    plugin: choice.plugin,
                    bytes_on_disk: entry_bytes.on_disk,
                    exclusive_bytes: entry_bytes.exclusive,
                    references: usage.references,
                    last_used_at: usage.last_used_at,
                });
            }
        }
        // A dry run lists the blobs unneeded now; what the chosen entries
        // would leave behind is in their exclusive bytes.
        let keep = |entries: &[crate::store::EntryLayers]| crate::store::Keep {
            blobs: crate::gc::needed_blobs(entries.iter().map(|entry| (&entry.key, &entry.blobs[..])), &pinned),
            unpacked: crate::gc::needed_blobs(entries.iter().map(|entry| (&entry.key, &entry.unpacked[..])), &pinned),
        };
        let blobs = self.store.sweep(keep, dry_run)?;
        let freed_bytes = if dry_run {
            evicted.iter().map(|eviction| eviction.exclusive_bytes).sum::<u64>()
                + blobs.iter().map(|(_, bytes)| bytes).sum::<u64>()
        } else {
            before.saturating_sub(self.store.cache_bytes())
        };
        let report = GcReport {
            trigger,
            dry_run,
            candidates,
            evicted,
            blobs,
            temporaries,
            records,
            freed_bytes,
            failures: decision.failures,
        };
        tracing::info!(trigger = ?trigger, dry_run, candidates, evicted = report.evicted.len(), blobs = report.blobs.len(),
            freed_bytes = report.freed_bytes, "gc run");
        if !dry_run {
            let metrics = crate::metrics::metrics();
            let trigger =
                serde_json::to_value(trigger).ok().and_then(|value| value.as_str().map(str::to_owned)).unwrap_or_default();
            metrics.gc_runs.inc([&trigger]);
            metrics.gc_freed_bytes.add(report.freed_bytes);
        }
        Ok(report)
    }

    /// Prunes every volume no mount, unmount or shutdown is working on (see
    /// [`Volumes::prune_volume`]): `released` records older than the GC
    /// grace and then empty volume directories.
    fn prune_volumes(&self) -> Vec<PathBuf> {
        let cutoff = std::time::SystemTime::now().checked_sub(self.config.gc_grace).unwrap_or(std::time::UNIX_EPOCH).into();
        let mut removed = Vec::new();
        for volume in self.volumes.volume_ids() {
            // Held while pruning: `start_mount` writes a volume's first
            // record under it, and every later step on the volume holds its
            // slot, so none can find its directory gone under it.
            let active = self.active();
            if active.keys().any(|(held, _)| *held == volume) || self.slots.busy(&volume) {
                continue;
            }
            removed.extend(self.volumes.prune_volume(&volume, cutoff));
        }
        removed
    }

    /// Runs GC every `interval` until the engine is dropped.
    pub fn spawn_periodic_gc(self: &Arc<Self>, interval: Duration) -> tokio::task::JoinHandle<()> {
        let engine = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(engine) = engine.upgrade() else { return };
                if let Err(error) = engine.gc(false, Trigger::Periodic).await {
                    tracing::error!("periodic gc failed: {}", crate::plugins::error_chain(&error));
                }
            }
        })
    }

    /// Each entry's bytes (on disk, exclusive, shared), who references it,
    /// and totals that reconcile with `du -sb` of the root.
    ///
    /// # Errors
    /// When the store cannot be read.
    pub fn du(&self) -> Result<DuReport, EngineError> {
        let (bytes, totals) = crate::gc::account(&crate::gc::census(self.store.layout(), self.volumes.trees()));
        let pinned = self.pins.digests();
        let mut entries = Vec::new();
        for key in self.store.entries()? {
            let usage = self.store.entry_usage(&key);
            let entry_bytes = bytes.get(&key).copied().unwrap_or_default();
            entries.push(DuEntry {
                bytes_on_disk: entry_bytes.on_disk,
                exclusive_bytes: entry_bytes.exclusive,
                shared_bytes: entry_bytes.shared(),
                referenced_by: self
                    .volumes
                    .holders(&key)
                    .into_iter()
                    .map(|(volume, mount)| format!("{volume}/{mount}"))
                    .collect(),
                pinned: pinned.contains(&key.manifest),
                references: usage.references,
                last_used_at: usage.last_used_at,
                use_count: usage.use_count,
                key,
            });
        }
        Ok(DuReport { entries, totals })
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

    async fn resolve_target(&self, target: &str) -> Result<Digest, EngineError> {
        if let Ok(digest) = target.parse::<Digest>() {
            return Ok(digest);
        }
        self.resolve(&ModelRef::parse(target)?).await
    }
}

/// Whether a caller that joined a flight it did not start tries once on its
/// own after that flight failed. A flight fetches from its starter's
/// reference: another registry or repository than the joiner's, maybe, which
/// stalled, was down, lacked the blob, refused its starter or sent wrong
/// bytes (Unavailable, NotFound, PermissionDenied, DataLoss); Cancelled is a
/// flight stopped for its own reasons. Those say nothing of the joiner's own
/// source. The rest (quota, a layer that breaks the rules, the node's own
/// I/O, a bug) would fail the joiner the same way, so it is shared.
fn joiner_retries(error: &EngineError) -> bool {
    matches!(
        error.kind(),
        ErrorKind::Unavailable | ErrorKind::Cancelled | ErrorKind::NotFound | ErrorKind::PermissionDenied | ErrorKind::DataLoss
    )
}

/// Runs blocking file work (a record's write and fsyncs) from async code
/// without stalling the tasks queued on the same worker: with 64 mounts
/// finishing together, their fsyncs ran one after another on the two
/// workers, and the network tasks waited behind them (B3 in
/// docs/benchmarks.md). Outside a multi-threaded runtime it just runs.
fn off_the_runtime<R>(work: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current().map(|handle| handle.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(work),
        _ => work(),
    }
}

/// Links `tree` into a staging directory beside `target` and renames it
/// into place, so a volume's tree is never seen half-made.
fn link_volume(tree: &Path, target: &Path) -> Result<LinkReport, EngineError> {
    use std::os::unix::fs::PermissionsExt;
    let io = |action: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source| EngineError::Store(StoreError::Io { action, path, source })
    };
    let parent = target.parent().expect("a volume tree lives in its volume's directory");
    std::fs::create_dir_all(parent).map_err(io("create", parent))?;
    // A tree left by an earlier, failed attempt is ours to replace.
    remove_any(target)?;
    let staging = tempfile::Builder::new().prefix(".tmp-").tempdir_in(parent).map_err(io("create a temporary in", parent))?;
    std::fs::set_permissions(staging.path(), std::fs::Permissions::from_mode(0o755)).map_err(io("chmod", staging.path()))?;
    let mut linker = Linker::new();
    linker.link_tree(tree, staging.path()).map_err(StoreError::from)?;
    let report = linker.report();
    // Copies and reflinks carry data of their own, possibly on another
    // filesystem than the records: flushed before the tree is published, or
    // a crash could leave a `ready` record over empty files.
    let copied = report.copies + report.reflinks > 0;
    if copied {
        sync_tree(staging.path())?;
    }
    let staged = staging.keep();
    if let Err(source) = std::fs::rename(&staged, target) {
        let _ = std::fs::remove_dir_all(&staged);
        return Err(EngineError::Store(StoreError::Io { action: "publish", path: target.to_owned(), source }));
    }
    // Hard links are metadata on the records' own filesystem: the durable
    // `ready` record that follows is their commit point, as journaling
    // filesystems persist metadata in order. Where a crash loses the tree
    // anyway, recovery finds a ready record without its tree and fails it,
    // and the next mount makes it again.
    if copied {
        sync_dir(parent)?;
    }
    Ok(report)
}
