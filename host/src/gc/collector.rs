//! One GC run against the disk: remove stale temporaries, prune released
//! records, take the census, offer the candidates to the `gc` plugins, evict
//! what the plan honours, sweep the blobs nothing needs; and
//! runs on a timer.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use super::account::{EntryBytes, account, census};
use super::pins::Pins;
use super::plan::{self, Roots};
use super::{Eviction, GcReport, Trigger};
use crate::plugins::PluginHost;
use crate::plugins::gc::{Candidate, GcInput};
use crate::store::{EntryKey, EntryUsage, Store, StoreError};
use crate::volumes::{VolumeId, Volumes};

/// What a run reports of each candidate: its bytes and its usage.
type Facts = HashMap<EntryKey, (EntryBytes, EntryUsage)>;

/// What one GC run works with, borrowed from its owner for the run. Runs
/// must not overlap (the owner serialises them), and a run blocks: call it
/// off the async workers.
pub struct Collector<'a> {
    pub store: &'a Store,
    pub volumes: &'a Volumes,
    pub pins: &'a Pins,
    pub plugins: &'a PluginHost,
    /// Temporaries and released records untouched this long are leftovers.
    pub grace: Duration,
    /// Runs its closure for a volume unless a mount, unmount or shutdown is
    /// working on it, and keeps any from starting until the closure returns:
    /// pruning must never remove a directory a step on the volume is using.
    pub while_idle: &'a dyn Fn(&VolumeId, &mut dyn FnMut()),
    /// Called at the moment an entry is evicted, under the store's lock.
    pub on_evict: &'a dyn Fn(&EntryKey),
}

impl Collector<'_> {
    /// One run: the gc plugins choose among the entries nothing protects;
    /// chosen entries go whole, then every blob no entry needs, then stale
    /// temporaries. A dry run reports and changes nothing.
    ///
    /// # Errors
    /// On I/O failure; a failing plugin is reported, not an error.
    pub fn run(&self, dry_run: bool, trigger: Trigger) -> Result<GcReport, StoreError> {
        let before = self.store.cache_bytes();
        let temporaries = if dry_run { Vec::new() } else { self.store.remove_stale_temporaries(self.grace)? };
        let records = if dry_run { Vec::new() } else { self.prune_volumes() };
        let pinned = self.pins.digests();
        let entries = self.store.entries()?;
        let roots = Roots {
            held: entries.iter().filter(|key| self.volumes.is_held(key)).cloned().collect(),
            leased: entries.iter().filter(|key| self.store.is_entry_leased(key)).cloned().collect(),
            pinned,
        };
        let candidates = plan::candidates(&entries, &roots);
        let (bytes, _) = account(&census(self.store.layout(), self.volumes.trees()));
        let (input, mut facts) = self.offer(&candidates, &bytes, before)?;
        let offered = input.candidates.len();
        let decision = self.plugins.current().gc(input);
        let mut evicted = Vec::new();
        for planned in plan::evictions(&candidates, decision.evict) {
            let Some((entry_bytes, usage)) = facts.remove(&planned.key) else { continue };
            // The store checks its own leases under its lock, and the
            // records again as they stand then.
            let referenced = |key: &EntryKey| self.volumes.is_held(key) || roots.pinned.contains(&key.manifest);
            let done = dry_run || self.store.evict_entry(&planned.key, referenced, self.on_evict)?;
            if done {
                tracing::info!(entry = %planned.key, plugin = %planned.plugin, exclusive_bytes = entry_bytes.exclusive, dry_run,
                    "evicting");
                evicted.push(Eviction {
                    key: planned.key,
                    plugin: planned.plugin,
                    bytes_on_disk: entry_bytes.on_disk,
                    exclusive_bytes: entry_bytes.exclusive,
                    references: usage.references,
                    last_used_at: usage.last_used_at,
                });
            }
        }
        // A dry run lists the blobs unneeded now; what the chosen entries
        // would leave behind is in their exclusive bytes.
        let blobs = self.store.sweep(|entries| plan::keep(entries, &roots.pinned), dry_run)?;
        let freed_bytes = if dry_run {
            evicted.iter().map(|eviction| eviction.exclusive_bytes).sum::<u64>()
                + blobs.iter().map(|(_, bytes)| bytes).sum::<u64>()
        } else {
            before.saturating_sub(self.store.cache_bytes())
        };
        let report = GcReport {
            trigger,
            dry_run,
            candidates: offered,
            evicted,
            blobs,
            temporaries,
            records,
            freed_bytes,
            failures: decision.failures,
        };
        tracing::info!(trigger = ?trigger, dry_run, candidates = offered, evicted = report.evicted.len(),
            blobs = report.blobs.len(), freed_bytes = report.freed_bytes, "gc run");
        if !dry_run {
            let metrics = crate::metrics::metrics();
            metrics.gc_runs.inc([trigger.as_str()]);
            metrics.gc_freed_bytes.add(report.freed_bytes);
        }
        Ok(report)
    }

    /// The plugins' input for `candidates` (`cache_bytes`: the store's at
    /// the start of the run), and what the report says of each.
    fn offer(
        &self,
        candidates: &[&EntryKey],
        bytes: &HashMap<EntryKey, EntryBytes>,
        cache_bytes: u64,
    ) -> Result<(GcInput, Facts), StoreError> {
        let now = time::OffsetDateTime::now_utc();
        let mut offered = Vec::new();
        let mut facts = HashMap::new();
        for &key in candidates {
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
            facts.insert(key.clone(), (entry_bytes, usage));
        }
        let input = GcInput {
            filesystem: self.store.filesystem()?,
            cache_bytes: cache_bytes + self.volumes.copied_bytes(),
            now: now.unix_timestamp().max(0) as u64,
            candidates: offered,
        };
        Ok((input, facts))
    }

    /// Prunes every volume no mount, unmount or shutdown is working on (see
    /// [`Volumes::prune_volume`]): `released` records older than the grace
    /// and then empty volume directories.
    fn prune_volumes(&self) -> Vec<PathBuf> {
        let cutoff = std::time::SystemTime::now().checked_sub(self.grace).unwrap_or(std::time::UNIX_EPOCH).into();
        let mut removed = Vec::new();
        for volume in self.volumes.volume_ids() {
            (self.while_idle)(&volume, &mut || removed.extend(self.volumes.prune_volume(&volume, cutoff)));
        }
        removed
    }
}

/// Runs a GC every `interval` (the first one interval from now) until `run`
/// returns `None`, its owner being gone. A failed run is logged; the next
/// one comes at its time.
pub fn spawn_periodic<R, E>(
    interval: Duration,
    mut run: impl FnMut() -> Option<R> + Send + 'static,
) -> tokio::task::JoinHandle<()>
where
    R: Future<Output = Result<GcReport, E>> + Send + 'static,
    E: std::error::Error,
{
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.tick().await;
        loop {
            tick.tick().await;
            let Some(running) = run() else { return };
            if let Err(error) = running.await {
                tracing::error!("periodic gc failed: {}", crate::plugins::error_chain(&error));
            }
        }
    })
}
