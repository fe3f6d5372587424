//! Volume records: one JSON file per volume and mount id, written
//! atomically, saying what the volume holds and how far it got.
//!
//! ```text
//! ROOT/records/<volume>/<mount-id>.json
//! VOLUMES/<volume>/<mount-id>/…            the volume's tree (VOLUMES defaults to ROOT/volumes)
//! ```
//!
//! A record in `pulling` or `ready` state is a garbage-collection root for
//! its entry. A record says `ready` only once its tree is complete; at
//! start-up, `pulling` records (whose process is gone: the root lock says so)
//! turn `failed`, and `ready` records whose tree is missing do too.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::error::ErrorKind;
use crate::link::{LinkMethod, LinkReport};
use crate::modelpack::SelectionKey;
use crate::plugins::exclude::{ExcludeOptions, Skip};
use crate::store::{EntryKey, StoreError, read_json, write_json, write_json_volatile};

const MAX_ID: usize = 128;

/// A name used as a file name: 1–128 of `[A-Za-z0-9._-]`, not starting with `.`.
fn check_id(kind: &'static str, text: &str) -> Result<(), VolumeError> {
    let valid = !text.is_empty()
        && text.len() <= MAX_ID
        && !text.starts_with('.')
        && text.bytes().all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'.' | b'_' | b'-'));
    if valid {
        Ok(())
    } else {
        Err(VolumeError::InvalidId { kind, id: text.to_owned() })
    }
}

/// A volume's id (the CSI volume id).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct VolumeId(String);

/// Tells mounts of one volume apart (default `default`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MountId(String);

macro_rules! id_type {
    ($type:ident, $kind:literal) => {
        impl $type {
            /// Validates an id.
            ///
            /// # Errors
            /// [`VolumeError::InvalidId`] naming the id.
            pub fn new(text: &str) -> Result<$type, VolumeError> {
                check_id($kind, text)?;
                Ok($type(text.to_owned()))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $type {
            type Error = VolumeError;

            fn try_from(text: String) -> Result<$type, VolumeError> {
                $type::new(&text)
            }
        }

        impl From<$type> for String {
            fn from(id: $type) -> String {
                id.0
            }
        }

        impl fmt::Display for $type {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

id_type!(VolumeId, "volume id");
id_type!(MountId, "mount id");

impl Default for MountId {
    fn default() -> Self {
        MountId("default".to_owned())
    }
}

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

/// What went wrong with a volume.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error("`{id}` is not a valid {kind}: use 1 to 128 of A-Z a-z 0-9 . _ - (not starting with `.`)")]
    InvalidId { kind: &'static str, id: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl VolumeError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            VolumeError::InvalidId { .. } => ErrorKind::InvalidArgument,
            VolumeError::Store(error) => error.kind(),
        }
    }
}

/// The records of a root and the directory that holds volume trees.
///
/// Keeps an index of the entries that `pulling` and `ready` records hold,
/// updated by every [`Volumes::put`] before it returns, so garbage
/// collection asks memory, not the disk, whether an entry is referenced.
#[derive(Debug)]
pub struct Volumes {
    records: PathBuf,
    trees: PathBuf,
    holding: std::sync::Mutex<std::collections::HashMap<(VolumeId, MountId), EntryKey>>,
}

impl Volumes {
    /// The records under `records`, volume trees under `trees`.
    pub fn new(records: PathBuf, trees: PathBuf) -> Volumes {
        let volumes = Volumes { records, trees, holding: Default::default() };
        for record in volumes.list() {
            volumes.index(&record);
        }
        volumes
    }

    fn index(&self, record: &VolumeRecord) {
        let mut holding = self.holding.lock().unwrap_or_else(|poison| poison.into_inner());
        let slot = (record.volume.clone(), record.mount_id.clone());
        match record.entry().filter(|_| record.state.holds_entry()) {
            Some(key) => holding.insert(slot, key),
            None => holding.remove(&slot),
        };
    }

    /// The volumes whose records hold `key` (pulling or ready).
    pub fn holders(&self, key: &EntryKey) -> Vec<(VolumeId, MountId)> {
        let holding = self.holding.lock().unwrap_or_else(|poison| poison.into_inner());
        let mut holders: Vec<_> = holding.iter().filter(|(_, held)| *held == key).map(|(slot, _)| slot.clone()).collect();
        holders.sort();
        holders
    }

    /// Whether any pulling or ready record holds `key`.
    pub fn is_held(&self, key: &EntryKey) -> bool {
        self.holding.lock().unwrap_or_else(|poison| poison.into_inner()).values().any(|held| held == key)
    }

    /// Where the tree of a volume's mount lives.
    pub fn tree(&self, volume: &VolumeId, mount_id: &MountId) -> PathBuf {
        self.trees.join(volume.as_str()).join(mount_id.as_str())
    }

    /// The directory holding every volume tree.
    pub fn trees(&self) -> &Path {
        &self.trees
    }

    fn record_path(&self, volume: &VolumeId, mount_id: &MountId) -> PathBuf {
        self.records.join(volume.as_str()).join(format!("{mount_id}.json"))
    }

    /// The record of a volume's mount, if there is one.
    ///
    /// # Errors
    /// An unreadable record.
    pub fn get(&self, volume: &VolumeId, mount_id: &MountId) -> Result<Option<VolumeRecord>, VolumeError> {
        let path = self.record_path(volume, mount_id);
        if !path.exists() {
            return Ok(None);
        }
        Ok(Some(read_json(&path)?))
    }

    /// Writes a record (atomically and durably), stamping `updated_at`.
    ///
    /// # Errors
    /// On I/O failure.
    pub fn put(&self, record: &mut VolumeRecord) -> Result<(), VolumeError> {
        self.write(record, true)
    }

    /// Writes the record of a mount under way (`pulling`: its progress, its
    /// digest): atomically, so readers see it at once, but not durably. A
    /// crash loses at most that, and recovery fails whatever `pulling` record
    /// it finds anyway; `ready` and `failed` are written by [`put`]. Two
    /// fsyncs fewer per record are most of what a warm mount waits for disks.
    ///
    /// [`put`]: Volumes::put
    ///
    /// # Errors
    /// On I/O failure.
    pub fn put_pulling(&self, record: &mut VolumeRecord) -> Result<(), VolumeError> {
        debug_assert_eq!(record.state, VolumeState::Pulling);
        self.write(record, false)
    }

    fn write(&self, record: &mut VolumeRecord, durable: bool) -> Result<(), VolumeError> {
        record.updated_at = time::OffsetDateTime::now_utc();
        let path = self.record_path(&record.volume, &record.mount_id);
        let dir = path.parent().expect("records live in a volume directory");
        fs::create_dir_all(dir).map_err(|source| StoreError::Io { action: "create", path: dir.to_owned(), source })?;
        if durable { write_json(&path, record)? } else { write_json_volatile(&path, record)? }
        self.index(record);
        Ok(())
    }

    /// Every record, by volume then mount id. Unreadable ones are logged
    /// and skipped.
    pub fn list(&self) -> Vec<VolumeRecord> {
        let mut records = Vec::new();
        for volume in fs::read_dir(&self.records).into_iter().flatten().flatten() {
            for file in fs::read_dir(volume.path()).into_iter().flatten().flatten() {
                let path = file.path();
                if path.extension().is_none_or(|ext| ext != "json") {
                    continue;
                }
                match read_json::<VolumeRecord>(&path) {
                    Ok(record) => records.push(record),
                    Err(error) => tracing::warn!(path = %path.display(), "skipping an unreadable volume record: {error}"),
                }
            }
        }
        records.sort_by(|a, b| (&a.volume, &a.mount_id).cmp(&(&b.volume, &b.mount_id)));
        records
    }

    /// After a crash: `pulling` records and `ready` records without a tree
    /// become `failed`; half-built volume trees are removed.
    ///
    /// # Errors
    /// On I/O failure.
    pub fn recover(&self) -> Result<Vec<VolumeRecord>, VolumeError> {
        let mut failed = Vec::new();
        for volume in fs::read_dir(&self.trees).into_iter().flatten().flatten() {
            for staged in fs::read_dir(volume.path()).into_iter().flatten().flatten() {
                if staged.file_name().to_string_lossy().starts_with(".tmp-") {
                    crate::store::remove_any(&staged.path())?;
                }
            }
        }
        for mut record in self.list() {
            let reason = match record.state {
                VolumeState::Pulling => "interrupted: the process that was pulling it exited",
                VolumeState::Ready if !record.path.is_dir() => "the volume's tree is missing",
                _ => continue,
            };
            record.state = VolumeState::Failed;
            record.error = Some(RecordError { kind: ErrorKind::Unavailable, message: reason.to_owned() });
            self.put(&mut record)?;
            tracing::info!(volume = %record.volume, mount_id = %record.mount_id, "{reason}; marked failed");
            failed.push(record);
        }
        Ok(failed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ids are file-name safe, and say what is wrong when they are not.
    #[test]
    fn ids_are_validated() {
        assert!(VolumeId::new("csi-0123abcd_x.y").is_ok());
        for bad in ["", ".hidden", "a/b", "..", "x y", &"v".repeat(129)] {
            let error = VolumeId::new(bad).unwrap_err();
            assert_eq!(error.kind(), ErrorKind::InvalidArgument);
            assert!(error.to_string().contains("volume id"), "{error}");
        }
        assert!(serde_json::from_str::<MountId>("\"../x\"").is_err());
    }

    /// Records round-trip, list in order, and recovery fails what was cut short.
    #[test]
    fn records_round_trip_and_recover() {
        let dir = tempfile::tempdir().unwrap();
        let volumes = Volumes::new(dir.path().join("records"), dir.path().join("trees"));
        let make = |volume: &str, state: VolumeState, tree: bool| {
            let volume = VolumeId::new(volume).unwrap();
            let path = volumes.tree(&volume, &MountId::default());
            let mut record = VolumeRecord::pulling(volume, MountId::default(), "r/m:1".into(), Default::default(), path.clone());
            record.state = state;
            if tree {
                fs::create_dir_all(&path).unwrap();
            }
            volumes.put(&mut record).unwrap();
            record
        };
        let ready = make("b-ready", VolumeState::Ready, true);
        make("a-pulling", VolumeState::Pulling, false);
        make("c-lost", VolumeState::Ready, false);
        fs::create_dir_all(dir.path().join("trees/b-ready/.tmp-half")).unwrap();

        assert_eq!(volumes.get(&ready.volume, &ready.mount_id).unwrap().unwrap().state, VolumeState::Ready);
        let names: Vec<String> = volumes.list().iter().map(|record| record.volume.to_string()).collect();
        assert_eq!(names, ["a-pulling", "b-ready", "c-lost"]);

        let failed = volumes.recover().unwrap();
        assert_eq!(failed.len(), 2);
        let states: Vec<VolumeState> = volumes.list().iter().map(|record| record.state).collect();
        assert_eq!(states, [VolumeState::Failed, VolumeState::Ready, VolumeState::Failed]);
        assert!(!dir.path().join("trees/b-ready/.tmp-half").exists());
        assert!(volumes.list()[0].error.as_ref().unwrap().message.contains("interrupted"));
    }
}
