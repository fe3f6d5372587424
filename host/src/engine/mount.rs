//! The mount flow: one task per volume slot, which resolves, ensures the
//! entry, links the volume's tree and writes the record; unmount and
//! shutdown stop it and take the slot down.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use super::access::Access;
use super::{Engine, EngineError, off_the_runtime};
use crate::durable::remove_any;
use crate::error::ErrorKind;
use crate::flight::Progress;
use crate::plugins::exclude::{ExcludeOptions, ValidatePatterns};
use crate::registry::ModelRef;
use crate::volumes::{MountId, RecordError, VolumeId, VolumeRecord, VolumeSlot, VolumeState, link_volume};
use modelcache_api::tenancy::{RegistryCredentials, Requester};

/// A request to mount a model into a volume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountRequest {
    pub volume: VolumeId,
    pub mount_id: MountId,
    pub reference: ModelRef,
    pub options: ExcludeOptions,
    /// Who asks (its `volume` is set from `volume` here).
    pub requester: Requester,
    /// A pull secret for this mount, tried before the node's credentials
    /// (if policy grants those). Never stored.
    pub credentials: Option<RegistryCredentials>,
}

impl MountRequest {
    /// The slot the request mounts into.
    pub fn slot(&self) -> VolumeSlot {
        VolumeSlot::new(self.volume.clone(), self.mount_id.clone())
    }
}

type Outcome = Option<Result<VolumeRecord, Arc<EngineError>>>;

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
pub(super) struct SlotLocks(Mutex<HashMap<VolumeSlot, Arc<tokio::sync::Mutex<()>>>>);

impl SlotLocks {
    fn of(&self, slot: &VolumeSlot) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.0.lock().unwrap_or_else(|poison| poison.into_inner());
        locks.retain(|_, lock| Arc::strong_count(lock) > 1);
        locks.entry(slot.clone()).or_default().clone()
    }

    /// Whether something holds or awaits a slot of `volume`.
    fn busy(&self, volume: &VolumeId) -> bool {
        let locks = self.0.lock().unwrap_or_else(|poison| poison.into_inner());
        locks.iter().any(|(held, lock)| held.volume == *volume && Arc::strong_count(lock) > 1)
    }
}

/// Marks a slot as being released until dropped (see `Engine::releasing`).
struct ReleaseMark<'a> {
    engine: &'a Engine,
    slot: VolumeSlot,
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
    async fn run_blocking<R: Send + 'static>(
        &mut self,
        step: &'static str,
        work: impl FnOnce() -> R + Send + 'static,
    ) -> Result<R, EngineError> {
        let held = self.0.take().expect("a mount task holds its slot");
        let (result, held) = tokio::task::spawn_blocking(move || (work(), held)).await.map_err(EngineError::join(step))?;
        self.0 = Some(held);
        Ok(result)
    }
}

/// A volume's operation in progress.
pub(super) struct ActiveMount {
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

impl Engine {
    fn active(&self) -> std::sync::MutexGuard<'_, HashMap<VolumeSlot, ActiveMount>> {
        self.active.lock().unwrap_or_else(|poison| poison.into_inner())
    }

    /// Keeps `volume`'s tree directory, made now if missing, until
    /// [`Engine::unhold`]: a volume socket serves the volume, and the
    /// directory may be bind-mounted into a pod, which sees the trees
    /// mounted through the socket appear in it. Durable (see
    /// [`crate::volumes::Volumes::hold`]). Returns the directory.
    ///
    /// # Errors
    /// When the directory or the mark cannot be made.
    pub fn hold(&self, volume: &VolumeId) -> Result<std::path::PathBuf, EngineError> {
        // Under the lock GC prunes under (see `while_idle`), so a run
        // cannot remove the directory between its check and the mark.
        let _active = self.active();
        Ok(self.volumes.hold(volume)?)
    }

    /// Lets GC prune `volume` again.
    pub fn unhold(&self, volume: &VolumeId) {
        let _active = self.active();
        self.volumes.unhold(volume);
    }

    fn releasing(&self) -> std::sync::MutexGuard<'_, HashMap<VolumeSlot, usize>> {
        self.releasing.lock().unwrap_or_else(|poison| poison.into_inner())
    }

    /// Mounts a model into a volume and waits until it is ready.
    ///
    /// # Errors
    /// An [`EngineError`] whose [`kind`](EngineError::kind) says what to do.
    pub async fn mount(self: &Arc<Self>, request: MountRequest) -> Result<VolumeRecord, EngineError> {
        self.start_mount(request).await?.wait().await
    }

    /// Starts a mount (or joins the same one under way) and returns once the
    /// admission decision admitted it.
    ///
    /// # Errors
    /// An invalid reference or requester, a refusal by admission policy
    /// (nothing written, nothing asked of a registry), or a conflict with
    /// what the volume holds.
    pub async fn start_mount(self: &Arc<Self>, mut request: MountRequest) -> Result<MountHandle, EngineError> {
        request.options.validate().map_err(|source| EngineError::Exclude { reference: request.reference.to_string(), source })?;
        request.requester.validate()?;
        request.requester.volume = Some(request.volume.to_string());
        let access =
            self.admit_requester(&request.requester, &request.reference, &request.options, request.credentials.as_ref()).await?;
        self.start_admitted(request, access)
    }

    fn start_admitted(self: &Arc<Self>, request: MountRequest, access: Access) -> Result<MountHandle, EngineError> {
        let slot = request.slot();
        let mut active = self.active();
        if let Some(running) = active.get(&slot) {
            if running.request == request {
                return Ok(MountHandle { result: running.result.clone() });
            }
            return Err(EngineError::Conflict {
                slot,
                holds: running.request.reference.to_string(),
                state: VolumeState::Pulling,
            });
        }
        if self.releasing().contains_key(&slot) {
            return Err(EngineError::Releasing { slot });
        }
        if let Some(record) = self.volumes.get(&request.volume, &request.mount_id)? {
            // A parsed reference is trimmed; a record may hold one as sent
            // (older daemons stored it so).
            let same = record.reference.trim() == request.reference.as_str() && record.options == request.options;
            match record.state() {
                VolumeState::Ready if same && record.path.is_dir() => {
                    let (_, result) = watch::channel(Some(Ok(record)));
                    return Ok(MountHandle { result });
                }
                VolumeState::Ready | VolumeState::Pulling if !same => {
                    return Err(EngineError::Conflict { slot, state: record.state(), holds: record.reference });
                }
                _ => {}
            }
        }
        // Written before the answer, so a caller that does not wait can ask
        // for the status at once.
        let mut record = VolumeRecord::pulling(
            request.volume.clone(),
            request.mount_id.clone(),
            request.reference.to_string(),
            request.options.clone(),
            self.volumes.tree(&request.volume, &request.mount_id),
        );
        record.requester = (!request.requester.is_empty()).then(|| request.requester.clone());
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
            let slot = task_request.slot();
            let outcome = engine.clone().run_mount(task_request, access, record, task_progress, hold).await.map_err(Arc::new);
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
        let running = active.get(&VolumeSlot::new(volume.clone(), mount_id.clone()))?;
        Some(MountHandle { result: running.result.clone() })
    }

    /// Bytes done and to do of a mount under way.
    pub fn progress(&self, volume: &VolumeId, mount_id: &MountId) -> Option<(u64, u64)> {
        let active = self.active();
        let running = active.get(&VolumeSlot::new(volume.clone(), mount_id.clone()))?;
        Some(running.progress.snapshot())
    }

    async fn run_mount(
        self: Arc<Self>,
        request: MountRequest,
        access: Access,
        mut record: VolumeRecord,
        progress: Arc<MountProgress>,
        mut hold: SlotHold,
    ) -> Result<VolumeRecord, EngineError> {
        // A panic fails this volume like any error (its record says so), and
        // lets its slot go instead of leaving it to look busy forever.
        match crate::flight::catch_panic(self.fill(&request, &access, &mut record, &progress, &mut hold)).await {
            Ok(()) => {
                record.set_ready();
                self.put_record(&mut record)?;
                tracing::info!(volume = %record.volume, mount_id = %record.mount_id, reference = %record.reference,
                    origin = ?record.origin, link = ?record.link_method, "volume ready");
                Ok(record)
            }
            Err(error) => {
                record.set_failed(RecordError { kind: error.kind(), message: crate::plugins::error_chain(&error) });
                if let Err(write_error) = self.put_record(&mut record) {
                    tracing::error!(volume = %record.volume, "cannot record the failure: {}", crate::plugins::error_chain(&write_error));
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
        access: &Access,
        record: &mut VolumeRecord,
        progress: &MountProgress,
        hold: &mut SlotHold,
    ) -> Result<(), EngineError> {
        let resolved = self.resolve_request(&request.reference, &request.options, access).await?;
        record.access = Some(resolved.proof);
        record.verified_by = resolved.verified_by.clone();
        record.entry = Some(resolved.key.clone());
        record.skipped = resolved.skips.clone();
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
        record.origin = Some(source);
        record.bytes_done = record.bytes_total;

        let tree = lease.tree();
        let target = record.path.clone();
        let report = hold.run_blocking("link the volume tree", move || link_volume(&tree, &target)).await??;
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
        let slot = VolumeSlot::new(volume.clone(), mount_id.clone());
        tokio::spawn(async move { engine.release(slot).await }).await.map_err(EngineError::join("release the volume"))?
    }

    async fn release(&self, slot: VolumeSlot) -> Result<VolumeRecord, EngineError> {
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
        let Some(mut record) = self.volumes.get(&slot.volume, &slot.mount_id)? else {
            return Err(EngineError::NotFound { slot });
        };
        let tree = record.path.clone();
        tokio::task::spawn_blocking(move || remove_any(&tree)).await.map_err(EngineError::join("remove the volume tree"))??;
        if record.state() != VolumeState::Released {
            record.set_released();
            self.put_record(&mut record)?;
            tracing::info!(volume = %slot.volume, mount_id = %slot.mount_id, "volume released");
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
        for (VolumeSlot { volume, mount_id }, lock) in remaining {
            let _held = lock.lock_owned().await;
            if let Ok(Some(mut record)) = self.volumes.get(&volume, &mount_id)
                && record.state() == VolumeState::Pulling
            {
                record.set_failed(RecordError {
                    kind: ErrorKind::Cancelled,
                    message: "modelcache shut down before the mount finished; ask again".into(),
                });
                if let Err(error) = self.put_record(&mut record) {
                    tracing::error!(volume = %volume, "cannot record the cancellation: {}", crate::plugins::error_chain(&error));
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
            .ok_or_else(|| EngineError::NotFound { slot: VolumeSlot::new(volume.clone(), mount_id.clone()) })?;
        if record.state() == VolumeState::Pulling
            && let Some((done, total)) = self.progress(volume, mount_id)
        {
            record.bytes_done = done;
            record.bytes_total = total.max(record.bytes_total);
        }
        Ok(record)
    }

    /// Every volume record.
    pub fn list(&self) -> Vec<VolumeRecord> {
        self.volumes.list()
    }

    /// Runs `prune` unless a mount, unmount or shutdown is working on
    /// `volume` (GC's record pruning, see [`crate::gc::Collector`]).
    pub(super) fn while_idle(&self, volume: &VolumeId, prune: &mut dyn FnMut()) {
        // Held while pruning: `start_mount` writes a volume's first record
        // under it, and every later step on the volume holds its slot, so
        // none can find its directory gone under it.
        let active = self.active();
        if active.keys().any(|slot| slot.volume == *volume) || self.slots.busy(volume) {
            return;
        }
        prune();
        drop(active);
    }
}
