//! `modelcache du`: each entry's bytes (on disk, exclusive, shared), who
//! references it, and totals that reconcile with `du -sb` of the root.

use serde::{Deserialize, Serialize};

use super::account::{Totals, account, census};
use super::pins::Pins;
use crate::store::{EntryKey, Store, StoreError};
use crate::volumes::Volumes;

/// One line of `modelcache du`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct DuEntry {
    pub key: EntryKey,
    pub bytes_on_disk: u64,
    pub exclusive_bytes: u64,
    pub shared_bytes: u64,
    /// `volume/mount-id` of every record holding it.
    pub referenced_by: Vec<String>,
    pub pinned: bool,
    pub references: Vec<String>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_used_at: Option<time::OffsetDateTime>,
    pub use_count: u64,
}

/// `modelcache du`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct DuReport {
    pub entries: Vec<DuEntry>,
    pub totals: Totals,
}

/// Each entry of `store` with its bytes, the volumes holding it and whether
/// it is pinned, and the totals of the root (and of the volumes directory
/// when it lies outside).
///
/// # Errors
/// When the store cannot be read.
pub fn du(store: &Store, volumes: &Volumes, pins: &Pins) -> Result<DuReport, StoreError> {
    let (bytes, totals) = account(&census(store.layout(), volumes.trees()));
    let pinned = pins.digests();
    let mut entries = Vec::new();
    for key in store.entries()? {
        let usage = store.entry_usage(&key);
        let entry_bytes = bytes.get(&key).copied().unwrap_or_default();
        entries.push(DuEntry {
            bytes_on_disk: entry_bytes.on_disk,
            exclusive_bytes: entry_bytes.exclusive,
            shared_bytes: entry_bytes.shared(),
            referenced_by: volumes.holders(&key).iter().map(crate::volumes::VolumeSlot::to_string).collect(),
            pinned: pinned.contains(&key.manifest),
            references: usage.references,
            last_used_at: usage.last_used_at,
            use_count: usage.use_count,
            key,
        });
    }
    Ok(DuReport { entries, totals })
}
