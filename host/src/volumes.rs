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
//!
//! A record file that does not parse (truncated, garbage, another shape, or
//! naming another volume) reads as a `failed` record with a `data-loss` error
//! saying so, so it never wedges its volume: a mount replaces it, an unmount
//! releases it, `ls` and `status` show it. The first write over it keeps the
//! broken bytes aside as `<mount-id>.json.broken` (one per mount id, replaced
//! each time) for the operator to look at.
//!
//! Pruning ([`Volumes::prune_volume`], run by garbage collection): `released`
//! records and set-aside broken records older than the GC grace are removed,
//! then the volume's record and tree directories if they are empty.
//!
//! A volume's tree is put in place whole by [`link_volume`]: linked from its
//! entry into a staging directory, then renamed in.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

pub use modelcache_api::ids::{IdError, MountId, VolumeId};
pub use modelcache_api::record::{Origin, RecordError, VolumeRecord, VolumeState};

use crate::durable::{FsError, remove_any, sync_dir, sync_tree, write_json, write_json_volatile};
use crate::error::ErrorKind;
use crate::link::{LinkReport, Linker};
use crate::store::{EntryKey, StoreError};
use modelcache_api::options::ExcludeOptions;

/// What a record file that does not parse reads as: a `failed` record of
/// the volume whose error says why, so the volume can be mounted again
/// or released like any failed one.
fn unreadable_record(volume: VolumeId, mount_id: MountId, tree: PathBuf, reason: String) -> VolumeRecord {
    let mut record = VolumeRecord::pulling(volume, mount_id, String::new(), ExcludeOptions::default(), tree);
    record.set_failed(RecordError { kind: ErrorKind::DataLoss, message: reason });
    record
}

/// What went wrong with a volume.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    #[error(transparent)]
    InvalidId(#[from] IdError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Fs(#[from] FsError),
}

impl VolumeError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            VolumeError::InvalidId(_) => ErrorKind::InvalidArgument,
            VolumeError::Store(error) => error.kind(),
            VolumeError::Fs(_) => ErrorKind::Internal,
        }
    }
}

/// The marker of a held volume, in its record directory (see [`Volumes::hold`]).
const HELD: &str = ".held";

/// The records of a root and the directory that holds volume trees.
///
/// Keeps an index of the entries that `pulling` and `ready` records hold,
/// updated by every [`Volumes::put`] before it returns, so garbage
/// collection asks memory, not the disk, whether an entry is referenced.
#[derive(Debug)]
pub struct Volumes {
    records: PathBuf,
    trees: PathBuf,
    holding: std::sync::Mutex<std::collections::HashMap<VolumeSlot, EntryKey>>,
    /// Copied bytes of each `ready` volume (see [`Volumes::copied_bytes`]).
    copied: std::sync::Mutex<std::collections::HashMap<VolumeSlot, u64>>,
    /// Slots whose record file [`Volumes::get`] found unreadable: the next
    /// write keeps the broken file aside before replacing it.
    unreadable: std::sync::Mutex<std::collections::HashSet<VolumeSlot>>,
}

impl Volumes {
    /// The records under `records`, volume trees under `trees`.
    pub fn new(records: PathBuf, trees: PathBuf) -> Volumes {
        let volumes =
            Volumes { records, trees, holding: Default::default(), copied: Default::default(), unreadable: Default::default() };
        for record in volumes.list() {
            volumes.index(&record);
        }
        volumes
    }

    fn index(&self, record: &VolumeRecord) {
        let mut holding = self.holding.lock().unwrap_or_else(|poison| poison.into_inner());
        let slot = VolumeSlot::new(record.volume.clone(), record.mount_id.clone());
        match record.entry().filter(|_| record.state().holds_entry()) {
            Some(key) => holding.insert(slot.clone(), key),
            None => holding.remove(&slot),
        };
        drop(holding);
        let mut copied = self.copied.lock().unwrap_or_else(|poison| poison.into_inner());
        match record.link.map(|link| link.copied_bytes).filter(|bytes| record.state() == VolumeState::Ready && *bytes > 0) {
            Some(bytes) => copied.insert(slot, bytes),
            None => copied.remove(&slot),
        };
    }

    /// Bytes that `ready` volume trees hold of their own: files copied or
    /// reflinked into them (a volume directory on another filesystem than
    /// the store) rather than hardlinked to the store's. Kept current by
    /// every write, so a quota decision adds them to the store's bytes
    /// without walking the trees. A reflink is counted whole, as it may come
    /// to own all its blocks.
    pub fn copied_bytes(&self) -> u64 {
        self.copied.lock().unwrap_or_else(|poison| poison.into_inner()).values().sum()
    }

    /// The volumes whose records hold `key` (pulling or ready).
    pub fn holders(&self, key: &EntryKey) -> Vec<VolumeSlot> {
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

    /// The record of a volume's mount, if there is one. A record file that
    /// does not parse reads as a `failed` record saying so (see the module
    /// documentation) and is logged.
    ///
    /// # Errors
    /// A record file that cannot be read.
    pub fn get(&self, volume: &VolumeId, mount_id: &MountId) -> Result<Option<VolumeRecord>, VolumeError> {
        let path = self.record_path(volume, mount_id);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StoreError::Io { action: "read", path, source }.into()),
        };
        match parse_record(&bytes, volume, mount_id) {
            Ok(record) => Ok(Some(record)),
            Err(reason) => {
                let reason = format!("the volume's record {} is unreadable: {reason}", path.display());
                tracing::warn!(volume = %volume, mount_id = %mount_id, "{reason}; it reads as failed until replaced");
                let slot = VolumeSlot::new(volume.clone(), mount_id.clone());
                self.unreadable.lock().unwrap_or_else(|poison| poison.into_inner()).insert(slot);
                Ok(Some(unreadable_record(volume.clone(), mount_id.clone(), self.tree(volume, mount_id), reason)))
            }
        }
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
        debug_assert_eq!(record.state(), VolumeState::Pulling);
        self.write(record, false)
    }

    fn write(&self, record: &mut VolumeRecord, durable: bool) -> Result<(), VolumeError> {
        record.updated_at = time::OffsetDateTime::now_utc();
        let path = self.record_path(&record.volume, &record.mount_id);
        let dir = path.parent().expect("records live in a volume directory");
        fs::create_dir_all(dir).map_err(|source| StoreError::Io { action: "create", path: dir.to_owned(), source })?;
        let slot = VolumeSlot::new(record.volume.clone(), record.mount_id.clone());
        if self.unreadable.lock().unwrap_or_else(|poison| poison.into_inner()).remove(&slot) {
            set_aside(&path, &broken_path(&path));
        }
        if durable {
            write_json(&path, record)?
        } else {
            write_json_volatile(&path, record)?
        }
        self.index(record);
        Ok(())
    }

    /// Every record, by volume then mount id. A record file that does not
    /// parse is listed as the `failed` record [`Volumes::get`] reads it as;
    /// a file whose name is not a volume's and mount id's is logged and
    /// skipped.
    pub fn list(&self) -> Vec<VolumeRecord> {
        let mut records = Vec::new();
        for volume_dir in fs::read_dir(&self.records).into_iter().flatten().flatten() {
            let Ok(volume) = VolumeId::new(&volume_dir.file_name().to_string_lossy()) else { continue };
            for file in fs::read_dir(volume_dir.path()).into_iter().flatten().flatten() {
                let path = file.path();
                if path.extension().is_none_or(|ext| ext != "json") {
                    continue;
                }
                let name = file.file_name().to_string_lossy().into_owned();
                let Ok(mount_id) = MountId::new(name.strip_suffix(".json").unwrap_or_default()) else {
                    tracing::warn!(path = %path.display(), "skipping a file that is not a volume record");
                    continue;
                };
                let record = match fs::read(&path) {
                    Ok(bytes) => parse_record(&bytes, &volume, &mount_id).unwrap_or_else(|reason| {
                        let reason = format!("the volume's record {} is unreadable: {reason}", path.display());
                        tracing::warn!(volume = %volume, mount_id = %mount_id, "{reason}");
                        unreadable_record(volume.clone(), mount_id.clone(), self.tree(&volume, &mount_id), reason)
                    }),
                    Err(error) => {
                        tracing::warn!(path = %path.display(), "skipping a volume record that cannot be read: {error}");
                        continue;
                    }
                };
                records.push(record);
            }
        }
        records.sort_by(|a, b| (&a.volume, &a.mount_id).cmp(&(&b.volume, &b.mount_id)));
        records
    }

    /// The volumes that have a record directory or a tree directory.
    pub fn volume_ids(&self) -> Vec<VolumeId> {
        let mut ids: Vec<VolumeId> = [&self.records, &self.trees]
            .into_iter()
            .flat_map(|dir| fs::read_dir(dir).into_iter().flatten().flatten())
            .filter_map(|entry| VolumeId::new(&entry.file_name().to_string_lossy()).ok())
            .collect();
        ids.sort();
        ids.dedup();
        ids
    }

    /// Marks `volume` held, durably (`records/VOLUME/.held`, a name no
    /// record has): [`Volumes::prune_volume`] keeps its tree directory
    /// while it is empty, whichever process runs GC. Makes that directory
    /// (0755: a pod that is not root reads it through a bind mount) and
    /// returns it.
    ///
    /// # Errors
    /// On I/O failure.
    pub fn hold(&self, volume: &VolumeId) -> Result<PathBuf, VolumeError> {
        use std::os::unix::fs::PermissionsExt as _;
        let io = |action: &'static str, path: &Path| {
            let path = path.to_owned();
            move |source| VolumeError::Fs(FsError::Io { action, path, source })
        };
        let records = self.records.join(volume.as_str());
        fs::create_dir_all(&records).map_err(io("make", &records))?;
        let marker = records.join(HELD);
        fs::write(&marker, b"").map_err(io("write", &marker))?;
        let trees = self.trees.join(volume.as_str());
        fs::create_dir_all(&trees).map_err(io("make", &trees))?;
        fs::set_permissions(&trees, fs::Permissions::from_mode(0o755)).map_err(io("set the mode of", &trees))?;
        Ok(trees)
    }

    /// Lets [`Volumes::prune_volume`] remove `volume`'s empty directories again.
    pub fn unhold(&self, volume: &VolumeId) {
        let _ = fs::remove_file(self.records.join(volume.as_str()).join(HELD));
    }

    /// Prunes one volume: removes its `released` records last written
    /// before `cutoff`, its set-aside broken records and stale record
    /// temporaries last modified before it, then its record directory and
    /// its tree directory if they are empty. Returns what it removed. The
    /// caller makes sure no mount or unmount of the volume runs meanwhile
    /// (they create these directories and count on them staying).
    pub fn prune_volume(&self, volume: &VolumeId, cutoff: time::OffsetDateTime) -> Vec<PathBuf> {
        let mut removed = Vec::new();
        let dir = self.records.join(volume.as_str());
        for file in fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = file.path();
            let name = file.file_name().to_string_lossy().into_owned();
            let modified = || file.metadata().and_then(|metadata| metadata.modified()).map(time::OffsetDateTime::from);
            // A file written since the cutoff is not stale, whatever it
            // says: one `stat`, so GC runs do not parse every live record.
            let old = modified().is_ok_and(|modified| modified < cutoff);
            let stale = if !old {
                false
            } else if let Some(mount_id) = name.strip_suffix(".json") {
                // Only a record that parses and says `released`: anything
                // else still tells its volume's story.
                let released =
                    MountId::new(mount_id).ok().and_then(|mount_id| parse_record(&fs::read(&path).ok()?, volume, &mount_id).ok());
                released.is_some_and(|record| record.state() == VolumeState::Released && record.updated_at < cutoff)
            } else {
                name.ends_with(".json.broken") || name.starts_with(".tmp-")
            };
            if !stale {
                continue;
            }
            match fs::remove_file(&path) {
                Ok(()) => removed.push(path),
                Err(error) => tracing::warn!(path = %path.display(), "cannot prune: {error}"),
            }
        }
        // A held volume's directories stay (the marker keeps its record
        // directory from being empty).
        let held = dir.join(HELD).exists();
        for empty in [dir, self.trees.join(volume.as_str())].into_iter().filter(|_| !held) {
            // Fails unless empty, which is the point.
            if fs::remove_dir(&empty).is_ok() {
                removed.push(empty);
            }
        }
        if !removed.is_empty() {
            tracing::info!(volume = %volume, removed = removed.len(), "pruned released records and empty volume directories");
        }
        removed
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
                    remove_any(&staged.path())?;
                }
            }
        }
        for mut record in self.list() {
            let reason = match record.state() {
                VolumeState::Pulling => "interrupted: the process that was pulling it exited",
                VolumeState::Ready if !record.path.is_dir() => "the volume's tree is missing",
                _ => continue,
            };
            record.set_failed(RecordError { kind: ErrorKind::Unavailable, message: reason.to_owned() });
            self.put(&mut record)?;
            tracing::info!(volume = %record.volume, mount_id = %record.mount_id, "{reason}; marked failed");
            failed.push(record);
        }
        Ok(failed)
    }
}

/// A record file's bytes as the record of `volume`/`mount_id`, or why not.
fn parse_record(bytes: &[u8], volume: &VolumeId, mount_id: &MountId) -> Result<VolumeRecord, String> {
    let record: VolumeRecord = serde_json::from_slice(bytes).map_err(|error| format!("it does not parse ({error})"))?;
    if record.volume != *volume || record.mount_id != *mount_id {
        return Err(format!("it is the record of {}/{}", record.volume, record.mount_id));
    }
    Ok(record)
}

/// Where an unreadable record file is kept once a write replaces it.
fn broken_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(".broken");
    path.with_file_name(name)
}

/// Moves the unreadable record at `path` to `aside`, dated now so pruning
/// keeps it for a whole GC grace. Best effort: the write that follows
/// replaces the record either way.
fn set_aside(path: &Path, aside: &Path) {
    let moved = fs::rename(path, aside)
        .and_then(|()| fs::File::options().write(true).open(aside)?.set_modified(std::time::SystemTime::now()));
    match moved {
        Ok(()) => {
            tracing::warn!(path = %path.display(), aside = %aside.display(), "replacing an unreadable volume record; kept aside");
        }
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => tracing::warn!(path = %path.display(), "cannot keep the unreadable volume record aside: {error}"),
    }
}

/// A volume's place: its id and the mount id that tells its mounts apart.
/// What happens to one slot happens in order (the engine keeps one lock per
/// slot).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VolumeSlot {
    pub volume: VolumeId,
    pub mount_id: MountId,
}

impl VolumeSlot {
    pub fn new(volume: VolumeId, mount_id: MountId) -> VolumeSlot {
        VolumeSlot { volume, mount_id }
    }
}

impl fmt::Display for VolumeSlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.volume, self.mount_id)
    }
}

/// Links `tree` into a staging directory beside `target` and renames it
/// into place, so a volume's tree is never seen half-made.
///
/// # Errors
/// On I/O failure, or a tree the linker refuses; `target` is then absent.
pub fn link_volume(tree: &Path, target: &Path) -> Result<LinkReport, VolumeError> {
    use std::os::unix::fs::PermissionsExt;
    let io = |action: &'static str, path: &Path| {
        let path = path.to_owned();
        move |source| VolumeError::Store(StoreError::Io { action, path, source })
    };
    let parent = target.parent().expect("a volume tree lives in its volume's directory");
    fs::create_dir_all(parent).map_err(io("create", parent))?;
    // A tree left by an earlier, failed attempt is ours to replace.
    remove_any(target)?;
    let staging = tempfile::Builder::new().prefix(".tmp-").tempdir_in(parent).map_err(io("create a temporary in", parent))?;
    fs::set_permissions(staging.path(), fs::Permissions::from_mode(0o755)).map_err(io("chmod", staging.path()))?;
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
    if let Err(source) = fs::rename(&staged, target) {
        let _ = fs::remove_dir_all(&staged);
        return Err(VolumeError::Store(StoreError::Io { action: "publish", path: target.to_owned(), source }));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::LinkReport;

    fn set_state(record: &mut VolumeRecord, state: VolumeState) {
        match state {
            VolumeState::Pulling => record.set_pulling(),
            VolumeState::Ready => record.set_ready(),
            VolumeState::Failed => record.set_failed(RecordError { kind: ErrorKind::Internal, message: "failed".into() }),
            VolumeState::Released => record.set_released(),
        }
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
            set_state(&mut record, state);
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

        assert_eq!(volumes.get(&ready.volume, &ready.mount_id).unwrap().unwrap().state(), VolumeState::Ready);
        let names: Vec<String> = volumes.list().iter().map(|record| record.volume.to_string()).collect();
        assert_eq!(names, ["a-pulling", "b-ready", "c-lost"]);

        let failed = volumes.recover().unwrap();
        assert_eq!(failed.len(), 2);
        let states: Vec<VolumeState> = volumes.list().iter().map(|record| record.state()).collect();
        assert_eq!(states, [VolumeState::Failed, VolumeState::Ready, VolumeState::Failed]);
        assert!(!dir.path().join("trees/b-ready/.tmp-half").exists());
        assert!(volumes.list()[0].error().unwrap().message.contains("interrupted"));
    }

    fn ready(volumes: &Volumes, volume: &str, copied_bytes: u64) -> VolumeRecord {
        let volume = VolumeId::new(volume).unwrap();
        let path = volumes.tree(&volume, &MountId::default());
        fs::create_dir_all(&path).unwrap();
        let mut record = VolumeRecord::pulling(volume, MountId::default(), "r/m:1".into(), Default::default(), path);
        record.set_ready();
        record.link = Some(LinkReport { files: 1, copied_bytes, copies: 1, ..LinkReport::default() });
        volumes.put(&mut record).unwrap();
        record
    }

    /// A record file that does not parse, or that is another volume's,
    /// reads and lists as a failed record saying so; the write that
    /// replaces it keeps the broken bytes aside, one file per mount id.
    #[test]
    fn unreadable_records_read_as_failed_and_are_kept_aside() {
        let dir = tempfile::tempdir().unwrap();
        let volumes = Volumes::new(dir.path().join("records"), dir.path().join("trees"));
        let mut record = ready(&volumes, "v", 0);
        let file = dir.path().join("records/v/default.json");
        let aside = dir.path().join("records/v/default.json.broken");
        let mut other = record.clone();
        other.volume = VolumeId::new("w").unwrap();
        let other = serde_json::to_vec(&other).unwrap();
        for broken in [b"{\"volume\": \"v\", \"mount-".to_vec(), b"\x00\xff garbage".to_vec(), b"[1, 2]".to_vec(), other] {
            fs::write(&file, &broken).unwrap();
            for read in [volumes.get(&record.volume, &record.mount_id).unwrap().unwrap(), volumes.list().remove(0)] {
                assert_eq!(read.state(), VolumeState::Failed);
                assert_eq!((read.volume.as_str(), read.mount_id.as_str()), ("v", "default"));
                assert_eq!(read.path, record.path);
                let error = read.error().unwrap().clone();
                assert_eq!(error.kind, ErrorKind::DataLoss);
                assert!(error.message.contains("unreadable") && error.message.contains("default.json"), "{}", error.message);
            }
            volumes.put(&mut record).unwrap();
            assert_eq!(volumes.get(&record.volume, &record.mount_id).unwrap().unwrap(), record);
            assert_eq!(fs::read(&aside).unwrap(), broken);
        }
        // A write over a record nobody found broken keeps nothing aside.
        fs::remove_file(&aside).unwrap();
        volumes.put(&mut record).unwrap();
        assert!(!aside.exists());
    }

    /// Pruning removes released records and set-aside ones older than the
    /// cutoff, then the volume's directories once empty; anything younger,
    /// or in another state, stays.
    #[test]
    fn pruning_removes_old_released_records_and_empty_directories() {
        let dir = tempfile::tempdir().unwrap();
        let volumes = Volumes::new(dir.path().join("records"), dir.path().join("trees"));
        for name in ["gone", "young", "failed"] {
            let mut record = ready(&volumes, name, 0);
            fs::remove_dir(&record.path).unwrap();
            set_state(&mut record, if name == "failed" { VolumeState::Failed } else { VolumeState::Released });
            volumes.put(&mut record).unwrap();
        }
        fs::write(dir.path().join("records/gone/x.json.broken"), b"old").unwrap();
        let later = time::OffsetDateTime::now_utc() + time::Duration::seconds(5);
        let records = dir.path().join("records");
        let trees = dir.path().join("trees");

        let removed = volumes.prune_volume(&VolumeId::new("gone").unwrap(), later);
        assert_eq!(removed.len(), 4, "{removed:?}");
        assert!(!records.join("gone").exists() && !trees.join("gone").exists());

        let earlier = time::OffsetDateTime::now_utc() - time::Duration::hours(1);
        assert_eq!(volumes.prune_volume(&VolumeId::new("young").unwrap(), earlier), [trees.join("young")]);
        assert!(records.join("young/default.json").exists());

        let removed = volumes.prune_volume(&VolumeId::new("failed").unwrap(), later);
        assert_eq!(removed, [trees.join("failed")], "a failed record stays, only the empty tree directory goes");
        assert_eq!(volumes.volume_ids().iter().map(VolumeId::as_str).collect::<Vec<_>>(), ["failed", "young"]);
    }

    /// A held volume keeps its empty directories through pruning (its old
    /// released records still go); unheld, they are pruned.
    #[test]
    fn held_volumes_keep_their_directories() {
        let dir = tempfile::tempdir().unwrap();
        let volumes = Volumes::new(dir.path().join("records"), dir.path().join("trees"));
        let volume = VolumeId::new("held").unwrap();
        let mut record = ready(&volumes, "held", 0);
        fs::remove_dir(&record.path).unwrap();
        set_state(&mut record, VolumeState::Released);
        volumes.put(&mut record).unwrap();
        let trees = volumes.hold(&volume).unwrap();
        assert!(trees.is_dir());
        let later = time::OffsetDateTime::now_utc() + time::Duration::seconds(5);
        assert_eq!(volumes.prune_volume(&volume, later), [dir.path().join("records/held/default.json")]);
        assert!(trees.is_dir(), "a held volume's empty tree directory stays");
        assert!(volumes.list().is_empty(), "the mark is no record");
        volumes.unhold(&volume);
        assert_eq!(volumes.prune_volume(&volume, later).len(), 2);
        assert!(!trees.exists());
    }

    /// The copied bytes of ready volumes are counted, and stop counting once
    /// a volume is released, fails or is replaced by hard links.
    #[test]
    fn copied_bytes_of_ready_volumes_are_counted() {
        let dir = tempfile::tempdir().unwrap();
        let volumes = Volumes::new(dir.path().join("records"), dir.path().join("trees"));
        let mut a = ready(&volumes, "a", 1000);
        ready(&volumes, "b", 24);
        ready(&volumes, "c", 0);
        assert_eq!(volumes.copied_bytes(), 1024);
        assert_eq!(Volumes::new(dir.path().join("records"), dir.path().join("trees")).copied_bytes(), 1024, "rebuilt at start");
        a.set_released();
        volumes.put(&mut a).unwrap();
        assert_eq!(volumes.copied_bytes(), 24);
    }
}
