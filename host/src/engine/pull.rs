//! The pull: an entry built from its layers, each layer's blob fetched once
//! node-wide and, for archives, unpacked once; a caller that joined a
//! failed flight for its starter's reasons tries once on its own. Prefetch
//! and the unpack limits live here too.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::TryStreamExt;
use serde::Serialize;

use super::access::Access;
use super::resolve::Resolved;
use super::{Engine, EngineError};
use crate::digest::Digest;
use crate::error::ErrorKind;
use crate::flight::Progress;
use crate::modelpack::{Layer, LayerFormat, Model, Selection};
use crate::plugins::exclude::{ExcludeOptions, ValidatePatterns};
use crate::registry::{Credential, DownloadSlot, ModelRef};
use crate::store::{EntryKey, EntryLease, UnpackLimits};
use crate::volumes::VolumeError;
use modelcache_api::tenancy::Requester;

/// How often a waiting mount writes its progress into its record.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);

/// How a request got its entry (a record's origin).
pub use crate::volumes::Origin as Source;

/// What a prefetch did.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Prefetched {
    pub key: EntryKey,
    pub bytes: u64,
    pub source: Source,
    pub pinned: bool,
}

/// What building an entry fetched.
#[derive(Clone, Copy, Debug)]
pub(super) struct Built {
    fetched_bytes: u64,
}

/// Whether a caller that joined a flight it did not start tries once on its
/// own after that flight failed. A flight fetches from its starter's
/// reference: another registry or repository than the joiner's, maybe, which
/// stalled, was down, lacked the blob, refused its starter or sent wrong
/// bytes (Unavailable, NotFound, PermissionDenied, DataLoss); Cancelled is a
/// flight stopped for its own reasons. Those say nothing of the joiner's own
/// source. A quota denial was its starter's requester's: the joiner asks for
/// itself (and never sees the starter's reference in a refusal). The rest (a
/// layer that breaks the rules, the node's own I/O, a bug) would fail the
/// joiner the same way, so it is shared.
fn joiner_retries(error: &EngineError) -> bool {
    matches!(
        error.kind(),
        ErrorKind::Unavailable
            | ErrorKind::Cancelled
            | ErrorKind::NotFound
            | ErrorKind::PermissionDenied
            | ErrorKind::DataLoss
            | ErrorKind::QuotaDenied
    )
}

/// Whose pull a flight makes: the credential its downloads use and the
/// requester its quota decision names.
#[derive(Clone, Copy)]
struct Asking<'a> {
    credential: &'a Credential,
    requester: &'a Requester,
}

impl Engine {
    /// The entry, leased: cached, or built by the flight this request joins.
    /// `joined` sees the flight's progress; `tick` runs every second while
    /// it goes on.
    pub(super) async fn ensure_entry(
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
            // A flight fetches with its starter's credential and answers to
            // its requester's quota; a joiner was shown able to read the
            // manifest on its own (`Engine::authorize`).
            let (credential, requester) = (resolved.credential.clone(), resolved.requester.clone());
            let mut ticket = self.entries.join(key.clone(), move |progress| async move {
                let asking = Asking { credential: &credential, requester: &requester };
                engine.build_entry(&reference, &model, &selection, &flight_key, progress, asking).await
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
                        "the pull this mount joined failed ({}); trying on its own", crate::plugins::error_chain(&error));
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
        Err(EngineError::Evicted { key: key.clone() })
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
        let reference = ModelRef::parse(reference)?;
        options.validate().map_err(|source| EngineError::Exclude { reference: reference.to_string(), source })?;
        let resolved = self.resolve_request(&reference, options, &Access::operator()).await?;
        if pin {
            // As `pin`: not while a GC run decides with older pins.
            let _no_gc_run = self.collecting.lock().await;
            self.pins.pin(&resolved.key.manifest, reference.as_str())?;
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
        asking: Asking<'_>,
    ) -> Result<Built, EngineError> {
        if self.store.has_entry(key) {
            return Ok(Built { fetched_bytes: 0 });
        }
        let built = self.clone().pull_entry(reference, model, selection, key, progress, asking).await;
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
        asking: Asking<'_>,
    ) -> Result<Built, EngineError> {
        let layers: Vec<&Layer> = selection.layers(model).collect();
        let mut needed: Vec<Digest> = layers.iter().map(|layer| layer.blob.digest.clone()).collect();
        needed.push(model.digest.clone());
        let _hold = self.store.hold(Some(key), &needed);
        let missing: Vec<Layer> =
            layers.iter().filter(|layer| !self.store.has_layer(layer)).map(|layer| (*layer).clone()).collect();
        // The same bytes may be both a raw file and an archive of one model:
        // fetched and counted once, and the archive kept after unpacking.
        let raw: HashSet<&Digest> =
            layers.iter().filter(|layer| layer.format == LayerFormat::Raw).map(|layer| &layer.blob.digest).collect();
        let mut counted = HashSet::new();
        let incoming: u64 = missing
            .iter()
            .filter(|layer| !self.store.has_blob(&layer.blob.digest) && counted.insert(&layer.blob.digest))
            .map(|layer| layer.blob.size)
            .sum();
        progress.set_total(incoming);
        let reservation = Mutex::new(self.admit(asking.requester, reference, model, incoming).await?);

        futures_util::stream::iter(missing.iter().map(Ok::<_, EngineError>))
            .try_for_each_concurrent(self.config.layer_concurrency.max(1), |layer| {
                let engine = self.clone();
                let progress = progress.clone();
                let reservation = &reservation;
                let keep_archive = raw.contains(&layer.blob.digest);
                async move {
                    engine.ensure_layer(reference, layer, &progress, keep_archive, asking.credential).await?;
                    reservation.lock().unwrap_or_else(|poison| poison.into_inner()).consume(layer.blob.size);
                    Ok(())
                }
            })
            .await?;

        let store = self.store.clone();
        let (model, selection, key) = (model.clone(), selection.clone(), key.clone());
        tokio::task::spawn_blocking(move || store.build_entry(&key, &model, &selection))
            .await
            .map_err(EngineError::join("build the entry"))??;
        Ok(Built { fetched_bytes: incoming })
    }

    /// Makes one layer's content present: its blob fetched (once node-wide,
    /// whoever asks) and, for archives, unpacked (likewise once).
    pub(super) async fn ensure_layer(
        self: &Arc<Self>,
        reference: &ModelRef,
        layer: &Layer,
        progress: &Arc<Progress>,
        keep_archive: bool,
        credential: &Credential,
    ) -> Result<(), EngineError> {
        if self.store.has_layer(layer) {
            return Ok(());
        }
        // A joiner whose download failed for its starter's reasons tries
        // once on its own (`joiner_retries`).
        let mut retried = false;
        while !self.store.has_blob(&layer.blob.digest) {
            let engine = self.clone();
            let (flight_reference, blob, credential) = (reference.clone(), layer.blob.clone(), credential.clone());
            let (mode, mtime) = (layer.mode, layer.mtime);
            let mut ticket = self.blobs.join(layer.blob.digest.clone(), move |blob_progress| async move {
                engine.fetch_blob(&flight_reference, &blob, mode, mtime, &blob_progress, &credential).await
            });
            ticket.progress().forward_to(progress);
            match ticket.wait().await {
                Err(error) if ticket.coalesced() && !retried && joiner_retries(&error) => {
                    tracing::info!(reference = %reference, blob = %layer.blob.digest.short(),
                        "the download this pull joined failed ({}); trying on its own", crate::plugins::error_chain(&error));
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
                tokio::task::spawn_blocking(move || store.unpack(&owned, &limits, keep_archive))
                    .await
                    .map_err(EngineError::join("unpack the layer"))??;
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
        credential: &Credential,
    ) -> Result<(), EngineError> {
        if self.store.has_blob(&blob.digest) {
            return Ok(());
        }
        let mut slot = DownloadSlot::acquire(&self.downloads).await.map_err(EngineError::ShuttingDown)?;
        let mut ingest = self.store.ingest(blob)?;
        self.registry.fetch_blob(reference, blob, &mut ingest, progress, &mut slot, credential).await?;
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
}
