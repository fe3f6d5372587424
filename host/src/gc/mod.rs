//! Garbage collection: give disk back without touching what a volume uses or
//! a pull is writing.
//!
//! Roots are the entries held by `pulling` and `ready` volume records (an
//! in-memory index of the records, updated before a record write returns),
//! the entries and blobs held by pulls and link steps (store holds), and the
//! manifests operators pinned. Everything else is a candidate; the `gc`
//! plugins choose which candidates go. An entry goes whole, checked and
//! moved out of `models/` under the lock holds are taken with; then every
//! blob and unpacked layer no remaining entry needs and no pull holds goes
//! too, and temporaries older than a grace period.
//!
//! | file | what it holds |
//! |------|---------------|
//! | [`plan`] | the pure decisions: candidates from entries and roots, the plugins' choices honoured, the blobs to keep |
//! | [`account`](mod@account) | the census of inodes and the pure accounting of each entry's bytes |
//! | [`collector`] | one run against the disk: census, plugin decision, eviction, sweep, record pruning; periodic runs |
//! | [`du`](mod@du) | `modelcache du`: each entry's bytes and who holds it |
//! | [`pins`] | manifests an operator pinned |
//!
//! The accounting is pure: [`account()`] turns a census of inodes (size, link
//! count, who links them) into each entry's bytes on disk and exclusive bytes
//! — what deleting it actually frees, each inode counted once, shared blobs
//! and files a volume still links not counted — and into `du` totals that
//! reconcile with a `du -sb` of the root.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::store::EntryKey;

pub mod account;
pub mod collector;
pub mod du;
pub mod pins;
pub mod plan;

pub use account::{EntryBytes, Inode, Owner, Totals, account, by_key, census};
pub use collector::{Collector, spawn_periodic};
pub use du::{DuEntry, DuReport, du};
pub use pins::{Pin, Pins};
pub use plan::{Planned, Roots, candidates, evictions, needed_blobs};

/// Why a GC run happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Trigger {
    Periodic,
    QuotaDenied,
    OnDemand,
}

impl Trigger {
    /// The trigger as it is written in reports and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Periodic => "periodic",
            Trigger::QuotaDenied => "quota-denied",
            Trigger::OnDemand => "on-demand",
        }
    }
}

/// One entry a run evicted (or would).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Eviction {
    pub key: EntryKey,
    /// The plugin that chose it.
    pub plugin: String,
    pub bytes_on_disk: u64,
    pub exclusive_bytes: u64,
    pub references: Vec<String>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_used_at: Option<time::OffsetDateTime>,
}

/// What a run did (or, dry, would do).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct GcReport {
    pub trigger: Trigger,
    pub dry_run: bool,
    pub candidates: usize,
    pub evicted: Vec<Eviction>,
    /// Blobs and unpacked layers nothing needs any more, with their bytes.
    pub blobs: Vec<(Digest, u64)>,
    pub temporaries: Vec<PathBuf>,
    /// Released volume records and empty volume directories pruned (see
    /// `Volumes::prune_volume`); a dry run prunes nothing.
    #[serde(default)]
    pub records: Vec<PathBuf>,
    /// Bytes the cache shrank by (for a dry run: would shrink by, at least).
    pub freed_bytes: u64,
    pub failures: Vec<crate::plugins::PluginFailure>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A trigger's label is the name reports serialise it as.
    #[test]
    fn trigger_labels_match_reports() {
        for trigger in [Trigger::Periodic, Trigger::QuotaDenied, Trigger::OnDemand] {
            assert_eq!(serde_json::to_value(trigger).unwrap(), trigger.as_str());
        }
    }
}
