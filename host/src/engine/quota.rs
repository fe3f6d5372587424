//! The quota decision for a pull's new bytes, and the
//! reservation that counts them until they are in the cache. Decisions are
//! made one at a time, so two pulls never pass on the same free space; a
//! denial first asks GC to make room, then asks once more.

use std::sync::{Arc, Mutex};

use super::{Engine, EngineError};
use crate::gc::Trigger;
use crate::modelpack::Model;
use crate::plugins::quota::{QuotaInput, QuotaVerdict};
use crate::registry::ModelRef;
use modelcache_api::tenancy::Requester;

/// Bytes admitted by the quota decision and not yet in the cache.
#[derive(Debug, Default)]
pub(super) struct Reservations {
    bytes: Mutex<u64>,
    /// Serialises decisions, so two pulls never pass on the same free space.
    deciding: tokio::sync::Mutex<()>,
}

/// One pull's admitted bytes, given back as they land in the cache and, for
/// what is left, when the pull ends.
pub(super) struct Reservation<'a> {
    reservations: &'a Reservations,
    bytes: u64,
}

impl Reservation<'_> {
    /// The bytes are in the cache now and counted there.
    pub(super) fn consume(&mut self, bytes: u64) {
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

impl Engine {
    /// The quota decision for a pull adding `incoming` bytes, and the
    /// reservation that holds them until the pull ends.
    pub(super) async fn admit(
        self: &Arc<Self>,
        requester: &Requester,
        reference: &ModelRef,
        model: &Model,
        incoming: u64,
    ) -> Result<Reservation<'_>, EngineError> {
        let reservations = &self.reservations;
        if incoming == 0 {
            return Ok(Reservation { reservations, bytes: 0 });
        }
        let _one_at_a_time = reservations.deciding.lock().await;
        let mut verdict = self.quota(requester, reference, model, incoming).await?;
        if matches!(verdict, QuotaVerdict::Deny { .. }) {
            // Make room if GC can, then ask once more.
            let report = self.gc(false, Trigger::QuotaDenied).await?;
            if !report.evicted.is_empty() || !report.blobs.is_empty() {
                verdict = self.quota(requester, reference, model, incoming).await?;
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

    async fn quota(
        &self,
        requester: &Requester,
        reference: &ModelRef,
        model: &Model,
        incoming: u64,
    ) -> Result<QuotaVerdict, EngineError> {
        let input = QuotaInput {
            requester: requester.clone(),
            reference: reference.to_string(),
            manifest_digest: model.digest.to_string(),
            incoming_bytes: incoming,
            cache_bytes: self.store.cache_bytes() + self.volumes.copied_bytes(),
            reserved_bytes: *self.reservations.bytes.lock().unwrap_or_else(|poison| poison.into_inner()),
            filesystem: self.store.filesystem()?,
        };
        let plugins = self.plugins.current();
        let decision = tokio::task::spawn_blocking(move || plugins.quota(&input))
            .await
            .map_err(EngineError::join("ask the quota decision"))?;
        Ok(decision.verdict)
    }

    /// Bytes admitted and not yet in the cache.
    pub fn reserved_bytes(&self) -> u64 {
        *self.reservations.bytes.lock().unwrap_or_else(|poison| poison.into_inner())
    }
}
