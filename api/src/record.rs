//! A volume's record: what it holds, how far it got, and how its tree was made.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::entry::{EntryKey, SelectionKey};
use crate::error::ErrorKind;
use crate::ids::{MountId, VolumeId};
use crate::options::{ExcludeOptions, Skip};

/// Where a volume stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VolumeState {
    /// The model is being resolved, pulled or linked.
    Pulling,
    /// The tree is complete.
    Ready,
    /// The last attempt failed; `error` says why. Asking again retries.
    Failed,
    /// The volume was released; its tree is gone.
    Released,
}

impl VolumeState {
    /// Whether the record holds its entry against garbage collection.
    pub fn holds_entry(self) -> bool {
        matches!(self, VolumeState::Pulling | VolumeState::Ready)
    }
}

/// A typed error carried in a record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct RecordError {
    pub kind: ErrorKind,
    pub message: String,
}

/// One volume's record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct VolumeRecord {
    pub volume: VolumeId,
    pub mount_id: MountId,
    /// The reference as requested.
    pub reference: String,
    pub options: ExcludeOptions,
    pub state: VolumeState,
    /// The manifest digest the reference resolved to.
    pub digest: Option<Digest>,
    pub selection: Option<SelectionKey>,
    /// Where the volume's tree is.
    pub path: PathBuf,
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// Served without fetching anything (the entry was cached).
    pub reused_from_cache: bool,
    /// Joined a pull another request had started.
    pub coalesced: bool,
    pub link_method: Option<LinkMethod>,
    pub link: Option<LinkReport>,
    /// Files left out, and why.
    pub skipped: Vec<Skip>,
    pub error: Option<RecordError>,
    /// The process that wrote the record.
    pub pid: u32,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: time::OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: time::OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub ready_at: Option<time::OffsetDateTime>,
}

impl VolumeRecord {
    /// A fresh record in `pulling` state.
    pub fn pulling(volume: VolumeId, mount_id: MountId, reference: String, options: ExcludeOptions, path: PathBuf) -> Self {
        let now = time::OffsetDateTime::now_utc();
        VolumeRecord {
            volume,
            mount_id,
            reference,
            options,
            state: VolumeState::Pulling,
            digest: None,
            selection: None,
            path,
            bytes_done: 0,
            bytes_total: 0,
            reused_from_cache: false,
            coalesced: false,
            link_method: None,
            link: None,
            skipped: Vec::new(),
            error: None,
            pid: std::process::id(),
            created_at: now,
            updated_at: now,
            ready_at: None,
        }
    }

    /// The entry the record holds, once the selection is known.
    pub fn entry(&self) -> Option<EntryKey> {
        Some(EntryKey::new(self.digest.clone()?, self.selection.clone()?))
    }
}

/// How a file reached its place, from cheapest to dearest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LinkMethod {
    Hardlink,
    Reflink,
    Copy,
}

impl LinkMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            LinkMethod::Hardlink => "hardlink",
            LinkMethod::Reflink => "reflink",
            LinkMethod::Copy => "copy",
        }
    }
}

/// What a tree copy did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct LinkReport {
    pub files: u64,
    /// Bytes of the files that got data of their own (reflinks and copies);
    /// a hardlink shares the store's. Hardlinked files are not even
    /// `stat`ed: for a 1,000-file model that was a tenth of the link step.
    /// Records written before it have none (and a `bytes` field, ignored).
    #[serde(default)]
    pub copied_bytes: u64,
    pub hardlinks: u64,
    pub reflinks: u64,
    pub copies: u64,
}

impl LinkReport {
    /// The weakest method any file needed; `None` for a tree without files.
    pub fn method(&self) -> Option<LinkMethod> {
        if self.copies > 0 {
            Some(LinkMethod::Copy)
        } else if self.reflinks > 0 {
            Some(LinkMethod::Reflink)
        } else if self.hardlinks > 0 {
            Some(LinkMethod::Hardlink)
        } else {
            None
        }
    }

    /// One more file, holding `copied_bytes` of its own (0 for a hardlink).
    pub fn count(&mut self, method: LinkMethod, copied_bytes: u64) {
        self.files += 1;
        self.copied_bytes += copied_bytes;
        match method {
            LinkMethod::Hardlink => self.hardlinks += 1,
            LinkMethod::Reflink => self.reflinks += 1,
            LinkMethod::Copy => self.copies += 1,
        }
    }
}
