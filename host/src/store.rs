//! The content-addressed store under a root directory.
//!
//! ```text
//! ROOT/lock                                one process per root (flock)
//! ROOT/blobs/sha256/<hex>                  verified blobs: raw layers, manifests, configs (0444)
//! ROOT/unpacked/sha256/<hex>/…             tar layers, unpacked (files 0444)
//! ROOT/models/sha256/<hex>/<selection>/    one entry: a model tree for one selection
//!     tree/…                               hardlinks into blobs/ and unpacked/
//!     entry.json                           what the tree holds (written before publishing)
//!     usage.json                           last use, use count, references seen
//! ROOT/tmp/                                everything being written; emptied at start-up
//! ```
//!
//! Nothing becomes visible under its final name before it is complete: a
//! blob is hashed as it streams into `tmp/`, its size and digest checked,
//! fsynced, made read-only and renamed into `blobs/`; trees and unpacked
//! layers are built in `tmp/`, synced and renamed into place whole. A crash
//! therefore leaves only `tmp/` to clear.
//!
//! The store knows nothing of volumes: references from volume records and
//! leases taken by pulls and link steps live a layer above; the store only
//! keeps the lease counts that garbage collection must respect.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, BufReader, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tokio::sync::{mpsc, oneshot};

use crate::archive::{ArchiveError, ArchiveReader};
use crate::digest::Digest;
use crate::error::ErrorKind;
use crate::link::{Entry, LinkError, TreeBuilder};
use crate::modelpack::{
    Compression, Descriptor, Layer, LayerFormat, Model, ModelPath, Node, Selection, SelectionKey, TarAction, TarKind, TarRules,
    TreeProblem, check_tree,
};
use crate::plugins::quota::Filesystem;
pub use modelcache_api::entry::EntryKey;

/// Bytes buffered by a blob writer before each `write(2)`.
const WRITE_BUFFER: usize = 1 << 20;
/// Chunks in flight between the network task and a blob writer: enough to
/// keep both busy. Each chunk may pin a whole read buffer of the HTTP client,
/// so more of them cost memory, not speed (64 held ~30 MiB more at peak
/// during a 1 GiB pull than 8 do; docs/benchmarks.md, B6).
const CHANNEL_CHUNKS: usize = 8;

/// Where everything lives under the root.
#[derive(Clone, Debug)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    pub fn new(root: impl Into<PathBuf>) -> Layout {
        Layout { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn blobs(&self) -> PathBuf {
        self.root.join("blobs/sha256")
    }

    pub fn blob(&self, digest: &Digest) -> PathBuf {
        self.blobs().join(digest.hex())
    }

    pub fn unpacked_dir(&self) -> PathBuf {
        self.root.join("unpacked/sha256")
    }

    pub fn unpacked(&self, digest: &Digest) -> PathBuf {
        self.unpacked_dir().join(digest.hex())
    }

    pub fn models(&self) -> PathBuf {
        self.root.join("models/sha256")
    }

    pub fn entry(&self, key: &EntryKey) -> PathBuf {
        self.models().join(key.manifest.hex()).join(key.selection.as_str())
    }

    pub fn tree(&self, key: &EntryKey) -> PathBuf {
        self.entry(key).join("tree")
    }

    pub fn tmp(&self) -> PathBuf {
        self.root.join("tmp")
    }

    pub fn records(&self) -> PathBuf {
        self.root.join("records")
    }

    pub fn components(&self) -> PathBuf {
        self.root.join("components")
    }

    pub fn default_volumes(&self) -> PathBuf {
        self.root.join("volumes")
    }

    fn lock(&self) -> PathBuf {
        self.root.join("lock")
    }
}

/// What went wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{action} {}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("blob {digest}: received {actual} bytes, the manifest says {expected}")]
    SizeMismatch { digest: Digest, expected: u64, actual: u64 },
    #[error("blob {digest}: the bytes received hash to {actual}; nothing was stored")]
    DigestMismatch { digest: Digest, actual: Digest },
    #[error("layer {index} ({digest}) at `{path}`: {reason}")]
    Unpack { index: usize, digest: Digest, path: String, reason: String },
    /// Unpacking went past a limit: the layer, the limit and what it guards.
    #[error("layer {index} ({digest}) at `{path}`: {limit}")]
    UnpackLimit { index: usize, digest: Digest, path: String, limit: LimitExceeded },
    #[error("layer {index} ({digest}) at `{path}`")]
    Archive {
        index: usize,
        digest: Digest,
        path: String,
        #[source]
        source: ArchiveError,
    },
    /// The tree the selected layers make together breaks the tree rules.
    #[error("model tree {key}")]
    Tree {
        key: EntryKey,
        #[source]
        source: TreeProblem,
    },
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error("the blob writer stopped unexpectedly")]
    WriterGone,
}

impl StoreError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            StoreError::SizeMismatch { .. } | StoreError::DigestMismatch { .. } => ErrorKind::DataLoss,
            // The archive broke the model's layout rules: not servable as asked.
            StoreError::Unpack { .. } | StoreError::Tree { .. } | StoreError::Archive { .. } => ErrorKind::InvalidArgument,
            // A name made twice, or made through a symlink: the layers
            // contradict each other.
            StoreError::Link(LinkError::Exists { .. } | LinkError::ThroughNonDirectory { .. } | LinkError::Refused { .. }) => {
                ErrorKind::InvalidArgument
            }
            StoreError::UnpackLimit { limit, .. } => limit.kind(),
            StoreError::Io { .. } | StoreError::Link(_) | StoreError::WriterGone => ErrorKind::Internal,
        }
    }
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StoreError + use<> {
    let path = path.to_owned();
    move |source| StoreError::Io { action, path, source }
}

/// What unpacking one tar layer may take. Counted as it is written, so a
/// small compressed layer cannot expand past them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnpackLimits {
    /// Bytes of the layer's files.
    pub max_bytes: u64,
    /// Entries (files, directories, symlinks).
    pub max_entries: u64,
    /// Unpacking stops before the store's filesystem has less free.
    pub keep_free_bytes: u64,
    /// Likewise for inodes (filesystems that count them).
    pub keep_free_inodes: u64,
}

impl UnpackLimits {
    /// No limit but the disk itself.
    pub const NONE: UnpackLimits =
        UnpackLimits { max_bytes: u64::MAX, max_entries: u64::MAX, keep_free_bytes: 0, keep_free_inodes: 0 };
}

/// A limit an unpack went past.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LimitExceeded {
    #[error("unpacks to more than {limit} bytes of files, the per-layer limit")]
    Bytes { limit: u64 },
    #[error("holds more than {limit} entries (headers and directories made included), the per-layer limit")]
    Entries { limit: u64 },
    #[error("holds more than {limit} bytes of entry names and link targets")]
    Names { limit: u64 },
    #[error(
        "unpacking it would leave less than {keep_free} bytes free on the store's filesystem (its floor plus what other pulls reserved)"
    )]
    Disk { keep_free: u64 },
    #[error("unpacking it would leave fewer than {keep_free} free inodes on the store's filesystem")]
    Inodes { keep_free: u64 },
}

impl LimitExceeded {
    pub fn kind(&self) -> ErrorKind {
        match self {
            // The artifact is at fault, wherever it is pulled.
            LimitExceeded::Bytes { .. } | LimitExceeded::Entries { .. } | LimitExceeded::Names { .. } => {
                ErrorKind::InvalidArgument
            }
            // This node has no room for it now.
            LimitExceeded::Disk { .. } | LimitExceeded::Inodes { .. } => ErrorKind::QuotaDenied,
        }
    }
}

/// What start-up recovery removed.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Recovery {
    /// Temporaries and half-built trees found in `tmp/`.
    pub temporaries: Vec<PathBuf>,
    /// Entry directories without a complete tree, or built under older
    /// tree rules (rebuilt from their layers, and checked, when next asked for).
    pub incomplete_entries: Vec<PathBuf>,
}

/// The version of the rules an entry's tree was built and checked under
/// (`EntryInfo::rules`). Raised when the rules grow stricter: trees built
/// before are removed at start-up, so none is served unchecked.
pub const TREE_RULES: u32 = 1;

/// What an entry holds, written once when it is built.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct EntryInfo {
    pub key: EntryKey,
    /// The [`TREE_RULES`] the tree was checked under; 0 before they existed.
    #[serde(default)]
    pub rules: u32,
    pub layers: Vec<EntryLayer>,
    /// Bytes of the selected layers as the manifest states them.
    pub bytes: u64,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: time::OffsetDateTime,
}

/// One layer of an entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct EntryLayer {
    pub digest: Digest,
    pub path: String,
    pub size: u64,
    /// Whether the layer is an unpacked archive (else the blob is the file).
    pub unpacked: bool,
}

/// How an entry has been used, rewritten on every use.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct EntryUsage {
    #[serde(with = "time::serde::rfc3339::option", default)]
    pub last_used_at: Option<time::OffsetDateTime>,
    pub use_count: u64,
    /// References that resolved to this entry's manifest, most recent last.
    pub references: Vec<String>,
}

/// The root lock: held for the life of the [`Store`].
#[derive(Debug)]
struct RootLock {
    _file: File,
}

impl RootLock {
    fn acquire(path: &Path) -> Result<RootLock, StoreError> {
        let mut file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(io_error("open the lock file", path))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                tracing::info!(lock = %path.display(), holder = holder.trim(), "waiting for another modelcache process to release the root");
                file.lock().map_err(io_error("lock", path))?;
            }
            Err(fs::TryLockError::Error(source)) => return Err(StoreError::Io { action: "lock", path: path.to_owned(), source }),
        }
        file.set_len(0).map_err(io_error("write the lock file", path))?;
        let _ = writeln!(file, "pid {}", std::process::id());
        Ok(RootLock { _file: file })
    }
}

#[derive(Debug, Default)]
struct State {
    /// Entries held by pulls and link steps.
    entry_leases: HashMap<EntryKey, usize>,
    /// Blobs held by pulls that are fetching or using them.
    blob_leases: HashMap<Digest, usize>,
    /// Bytes of `blobs/` and `unpacked/`.
    cache_bytes: u64,
    /// Staging directories in `tmp/` that work in progress is filling.
    live: HashSet<PathBuf>,
}

/// Marks a staging directory in `tmp/` as in use until dropped. The stale
/// sweep judges a temporary by its own mtime, and a staging directory's own
/// mtime stops changing once its first entry exists (the rest happens
/// below): without this, an unpack longer than the GC grace was deleted
/// under its feet.
struct Live<'a> {
    store: &'a Store,
    path: PathBuf,
}

impl Drop for Live<'_> {
    fn drop(&mut self) {
        self.store.state().live.remove(&self.path);
    }
}

/// The store.
#[derive(Debug)]
pub struct Store {
    layout: Layout,
    state: Mutex<State>,
    /// Serializes `record_use`'s read-modify-write of an entry's usage, so
    /// volumes finishing together do not lose each other's counts.
    usage: Mutex<()>,
    _lock: RootLock,
}

impl Store {
    /// Opens (creating if needed) the store at `root`, waits for the root
    /// lock, and recovers from whatever a previous process left behind.
    ///
    /// # Errors
    /// When the directories cannot be created or read.
    pub fn open(root: &Path) -> Result<(Arc<Store>, Recovery), StoreError> {
        let layout = Layout::new(root);
        fs::create_dir_all(root).map_err(io_error("create the root", root))?;
        let lock = RootLock::acquire(&layout.lock())?;
        for dir in [layout.blobs(), layout.unpacked_dir(), layout.models(), layout.tmp(), layout.records()] {
            fs::create_dir_all(&dir).map_err(io_error("create", &dir))?;
        }
        let recovery = recover(&layout)?;
        let cache_bytes = tree_bytes(&layout.blobs()) + tree_bytes(&layout.unpacked_dir());
        let store =
            Store { layout, state: Mutex::new(State { cache_bytes, ..State::default() }), usage: Mutex::new(()), _lock: lock };
        Ok((Arc::new(store), recovery))
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poison| poison.into_inner())
    }

    /// Bytes the cache holds.
    pub fn cache_bytes(&self) -> u64 {
        self.state().cache_bytes
    }

    /// The filesystem that holds the store.
    ///
    /// # Errors
    /// When `statvfs` fails.
    pub fn filesystem(&self) -> Result<Filesystem, StoreError> {
        let stats = self.statvfs()?;
        Ok(Filesystem { total_bytes: stats.f_blocks * stats.f_frsize, free_bytes: stats.f_bavail * stats.f_frsize })
    }

    /// Inodes of the store's filesystem: `(total, free)`; `(0, 0)` where
    /// the filesystem does not count them.
    ///
    /// # Errors
    /// When `statvfs` fails.
    pub fn inodes(&self) -> Result<(u64, u64), StoreError> {
        let stats = self.statvfs()?;
        Ok((stats.f_files, stats.f_favail))
    }

    fn statvfs(&self) -> Result<rustix::fs::StatVfs, StoreError> {
        let root = self.layout.root();
        rustix::fs::statvfs(root).map_err(|errno| StoreError::Io {
            action: "statvfs",
            path: root.to_owned(),
            source: errno.into(),
        })
    }

    pub fn has_blob(&self, digest: &Digest) -> bool {
        self.layout.blob(digest).is_file()
    }

    /// Whether a layer's content is in the store (a raw layer's blob, or a
    /// tar layer unpacked).
    pub fn has_layer(&self, layer: &Layer) -> bool {
        match layer.format {
            LayerFormat::Raw => self.has_blob(&layer.blob.digest),
            LayerFormat::Tar(_) => self.layout.unpacked(&layer.blob.digest).is_dir(),
        }
    }

    /// Reads a stored blob (manifests and configs: small).
    ///
    /// # Errors
    /// When it is not stored or unreadable.
    pub fn read_blob(&self, digest: &Digest) -> Result<Vec<u8>, StoreError> {
        let path = self.layout.blob(digest);
        fs::read(&path).map_err(io_error("read", &path))
    }

    /// Stores `bytes` (already verified to hash to `digest`) as a blob.
    ///
    /// # Errors
    /// On I/O failure.
    pub fn put_blob(&self, digest: &Digest, bytes: &[u8]) -> Result<(), StoreError> {
        if Digest::of(bytes) != *digest {
            return Err(StoreError::DigestMismatch { digest: digest.clone(), actual: Digest::of(bytes) });
        }
        if self.has_blob(digest) {
            return Ok(());
        }
        let mut file = self.temp_file("blob")?;
        file.write_all(bytes).map_err(io_error("write", file.path()))?;
        self.publish_blob(file, digest, bytes.len() as u64, None, None)
    }

    fn live(&self, path: &Path) -> Live<'_> {
        self.state().live.insert(path.to_owned());
        Live { store: self, path: path.to_owned() }
    }

    fn temp_file(&self, purpose: &str) -> Result<tempfile::NamedTempFile, StoreError> {
        let tmp = self.layout.tmp();
        tempfile::Builder::new().prefix(&format!("{purpose}-")).tempfile_in(&tmp).map_err(io_error("create a temporary in", &tmp))
    }

    /// fsync, read-only, mtime, rename into `blobs/`, fsync the directory.
    fn publish_blob(
        &self,
        file: tempfile::NamedTempFile,
        digest: &Digest,
        size: u64,
        mode: Option<u32>,
        mtime: Option<SystemTime>,
    ) -> Result<(), StoreError> {
        let target = self.layout.blob(digest);
        let handle = file.as_file();
        handle.sync_all().map_err(io_error("fsync", file.path()))?;
        if let Some(mtime) = mtime {
            handle.set_modified(mtime).map_err(io_error("set the mtime of", file.path()))?;
        }
        handle
            .set_permissions(fs::Permissions::from_mode(read_only_mode(mode)))
            .map_err(io_error("make read-only", file.path()))?;
        {
            // The blob may be there already: a flight aborted while its
            // blocking step ran on (nothing stops one) and the flight that
            // retried can both get here. Same digest, same bytes: the second
            // drops its copy and does not count the bytes again.
            let mut state = self.state();
            if target.exists() {
                return Ok(());
            }
            file.persist(&target).map_err(|error| StoreError::Io {
                action: "publish",
                path: target.clone(),
                source: error.error,
            })?;
            state.cache_bytes += size;
        }
        sync_dir(&self.layout.blobs())
    }

    /// Starts writing the blob `blob`; the bytes are hashed and written on a
    /// blocking thread, away from the network task that feeds them.
    ///
    /// # Errors
    /// When the temporary cannot be created.
    pub fn ingest(self: &Arc<Self>, blob: &Descriptor) -> Result<Ingest, StoreError> {
        let temp = self.temp_file("ingest")?;
        let file = temp.reopen().map_err(io_error("open", temp.path()))?;
        let (sender, receiver) = mpsc::channel(CHANNEL_CHUNKS);
        let limit = blob.size;
        let writer = tokio::task::spawn_blocking(move || run_writer(file, limit, receiver));
        Ok(Ingest { store: self.clone(), blob: blob.clone(), temp: Some(temp), sender: Some(sender), writer: Some(writer) })
    }

    /// Unpacks the stored archive of `layer` into `unpacked/`, checking every
    /// entry against the model's rules and `limits` as it is written, then
    /// drops the archive unless `keep_archive` (the same bytes are also a
    /// raw layer of the model being pulled).
    ///
    /// # Errors
    /// A refused entry (naming it), a limit passed, or I/O; nothing is
    /// published then and the partial tree is removed.
    pub fn unpack(&self, layer: &Layer, limits: &UnpackLimits, keep_archive: bool) -> Result<(), StoreError> {
        let LayerFormat::Tar(compression) = layer.format else {
            return Ok(());
        };
        let target = self.layout.unpacked(&layer.blob.digest);
        if target.is_dir() {
            return Ok(());
        }
        let archive = self.layout.blob(&layer.blob.digest);
        let staging = tempfile::Builder::new()
            .prefix("unpack-")
            .tempdir_in(self.layout.tmp())
            .map_err(io_error("create a temporary in", &self.layout.tmp()))?;
        let _live = self.live(staging.path());
        // Another unpack of this layer (see `publish_dir`) may publish it,
        // and drop the archive, while this one reads.
        let bytes = match unpack_archive(&archive, compression, layer, staging.path(), limits).and_then(|bytes| {
            sync_tree(staging.path())?;
            Ok(bytes)
        }) {
            Err(_) if target.is_dir() => return Ok(()),
            outcome => outcome?,
        };
        if !publish_dir(staging.keep(), &target)? {
            return Ok(());
        }
        sync_dir(&self.layout.unpacked_dir())?;
        let mut state = self.state();
        state.cache_bytes += bytes;
        // Another pull holding the digest may need the archive as a raw
        // file; GC drops it once no entry uses it raw.
        let held_elsewhere = state.blob_leases.get(&layer.blob.digest).is_some_and(|count| *count > 1);
        if !keep_archive && !held_elsewhere {
            fs::remove_file(&archive).map_err(io_error("remove", &archive))?;
            state.cache_bytes = state.cache_bytes.saturating_sub(layer.blob.size);
        }
        Ok(())
    }

    pub fn has_entry(&self, key: &EntryKey) -> bool {
        self.layout.entry(key).join("entry.json").is_file()
    }

    /// Builds the tree of `key` from stored layers and publishes it whole.
    /// Every selected layer must be stored.
    ///
    /// The tree is built under a directory handle without following any
    /// symlink (see [`TreeBuilder`]); an unpacked layer may be reused from
    /// another manifest, so its names are checked against the path *this*
    /// manifest gives the layer; and the finished tree is checked whole
    /// ([`check_tree`]): no symlink resolves outside it, through any other.
    ///
    /// # Errors
    /// A layer or tree breaking the rules, a link or I/O failure; nothing
    /// is published then.
    pub fn build_entry(&self, key: &EntryKey, model: &Model, selection: &Selection) -> Result<EntryInfo, StoreError> {
        let staging = tempfile::Builder::new()
            .prefix("entry-")
            .tempdir_in(self.layout.tmp())
            .map_err(io_error("create a temporary in", &self.layout.tmp()))?;
        let _live = self.live(staging.path());
        let tree = staging.path().join("tree");
        fs::create_dir(&tree).map_err(io_error("create", &tree))?;
        let mut builder = TreeBuilder::new(&tree)?;
        let mut nodes = HashMap::new();
        let mut layers = Vec::new();
        for layer in selection.layers(model) {
            match layer.format {
                LayerFormat::Raw => {
                    builder.link_file(&self.layout.blob(&layer.blob.digest), layer.path.as_str())?;
                    nodes.insert(layer.path.to_string(), Node::File);
                }
                LayerFormat::Tar(_) => {
                    let mut visit = |name: &Path, entry: Entry<'_>| {
                        let name = name.to_string_lossy();
                        let within = ModelPath::parse(&name).is_ok_and(|path| path.is_within(&layer.path));
                        let on_the_way = entry == Entry::Directory && layer.path.ancestors().any(|ancestor| ancestor == name);
                        if !within && !on_the_way {
                            let reason = "lies outside the path this manifest gives the layer".to_owned();
                            return Err(LinkError::Refused { path: name.into_owned(), reason });
                        }
                        let node = match entry {
                            Entry::Directory => Node::Directory,
                            Entry::File => Node::File,
                            Entry::Symlink(target) => Node::Symlink(target.to_string_lossy().into_owned()),
                        };
                        nodes.insert(name.into_owned(), node);
                        Ok(())
                    };
                    match builder.link_tree(&self.layout.unpacked(&layer.blob.digest), &mut visit) {
                        Err(LinkError::Refused { path, reason }) => {
                            return Err(StoreError::Unpack {
                                index: layer.index,
                                digest: layer.blob.digest.clone(),
                                path: layer.path.to_string(),
                                reason: format!("the unpacked layer holds `{path}`, which {reason}"),
                            });
                        }
                        linked => linked?,
                    }
                }
            }
            layers.push(EntryLayer {
                digest: layer.blob.digest.clone(),
                path: layer.path.to_string(),
                size: layer.blob.size,
                unpacked: layer.format != LayerFormat::Raw,
            });
        }
        check_tree(&nodes).map_err(|source| StoreError::Tree { key: key.clone(), source })?;
        let info = EntryInfo {
            key: key.clone(),
            rules: TREE_RULES,
            bytes: layers.iter().map(|layer| layer.size).sum(),
            layers,
            created_at: time::OffsetDateTime::now_utc(),
        };
        write_json(&staging.path().join("entry.json"), &info)?;
        sync_tree(staging.path())?;
        let target = self.layout.entry(key);
        let parent = target.parent().expect("entries live in a manifest directory");
        // Under the lock a sweep reads entries with: it sees this entry's
        // blobs as needed, or still held by the pull building it. And under
        // the one eviction removes an emptied manifest directory with.
        let published = {
            let _state = self.state();
            fs::create_dir_all(parent).map_err(io_error("create", parent))?;
            publish_dir(staging.keep(), &target)?
        };
        if !published {
            return self.entry_info(key);
        }
        sync_dir(parent)?;
        Ok(info)
    }

    /// What the entry holds.
    ///
    /// # Errors
    /// When the entry is absent or its `entry.json` unreadable.
    pub fn entry_info(&self, key: &EntryKey) -> Result<EntryInfo, StoreError> {
        read_json(&self.layout.entry(key).join("entry.json"))
    }

    /// How the entry has been used; defaults when never used.
    pub fn entry_usage(&self, key: &EntryKey) -> EntryUsage {
        read_json(&self.layout.entry(key).join("usage.json")).unwrap_or_default()
    }

    /// Records one use of the entry by a volume of `reference`.
    ///
    /// # Errors
    /// On I/O failure.
    pub fn record_use(&self, key: &EntryKey, reference: &str) -> Result<EntryUsage, StoreError> {
        let _serial = self.usage.lock().unwrap_or_else(|poison| poison.into_inner());
        let mut usage = self.entry_usage(key);
        usage.last_used_at = Some(time::OffsetDateTime::now_utc());
        usage.use_count += 1;
        usage.references.retain(|seen| seen != reference);
        usage.references.push(reference.to_owned());
        // Keep the list short: the most recent references are what matter.
        let excess = usage.references.len().saturating_sub(16);
        usage.references.drain(..excess);
        // Not waited for: a crash loses at most a use, which only ages the
        // entry a little for GC's least-recently-used order.
        write_json_volatile(&self.layout.entry(key).join("usage.json"), &usage)?;
        Ok(usage)
    }

    /// Every complete entry.
    ///
    /// # Errors
    /// When `models/` cannot be read.
    pub fn entries(&self) -> Result<Vec<EntryKey>, StoreError> {
        let mut keys = Vec::new();
        let models = self.layout.models();
        for manifest in fs::read_dir(&models).map_err(io_error("read", &models))?.flatten() {
            let Ok(digest) = format!("sha256:{}", manifest.file_name().to_string_lossy()).parse::<Digest>() else {
                continue;
            };
            for selection in fs::read_dir(manifest.path()).into_iter().flatten().flatten() {
                if let Some(selection) = SelectionKey::parse(&selection.file_name().to_string_lossy()) {
                    let key = EntryKey::new(digest.clone(), selection);
                    if self.has_entry(&key) {
                        keys.push(key);
                    }
                }
            }
        }
        keys.sort();
        Ok(keys)
    }

    /// Holds `key` against garbage collection while the lease lives. `None`
    /// when the entry is not (or no longer) complete: build it again.
    pub fn lease_entry(self: &Arc<Self>, key: &EntryKey) -> Option<EntryLease> {
        let mut state = self.state();
        // Checked under the lock GC takes to evict, so an entry is either
        // leased before GC looks or found gone after.
        if !self.has_entry(key) {
            return None;
        }
        *state.entry_leases.entry(key.clone()).or_default() += 1;
        Some(EntryLease { store: self.clone(), key: key.clone() })
    }

    /// Holds an entry that may not exist yet (being selected or built) and
    /// the blobs a pull needs, against garbage collection.
    pub fn hold(self: &Arc<Self>, key: Option<&EntryKey>, blobs: &[Digest]) -> Hold {
        let mut state = self.state();
        if let Some(key) = key {
            *state.entry_leases.entry(key.clone()).or_default() += 1;
        }
        for digest in blobs {
            *state.blob_leases.entry(digest.clone()).or_default() += 1;
        }
        Hold { store: self.clone(), key: key.cloned(), blobs: blobs.to_vec() }
    }

    /// Whether an entry is leased or held now.
    pub fn is_entry_leased(&self, key: &EntryKey) -> bool {
        self.state().entry_leases.contains_key(key)
    }

    /// Evicts an entry whole, unless it is leased or `protected` says so.
    /// The check and the rename out of `models/` happen under the lock that
    /// leases take, so a link step either holds the entry first or finds it
    /// gone and builds it again; it never sees a half-deleted tree.
    /// `observe` runs at the moment of eviction, still under that lock;
    /// neither closure may call back into the store.
    ///
    /// # Errors
    /// On I/O failure (the entry then stays or is already whole in `tmp/`).
    pub fn evict_entry(
        &self,
        key: &EntryKey,
        protected: impl Fn(&EntryKey) -> bool,
        observe: impl Fn(&EntryKey),
    ) -> Result<bool, StoreError> {
        let trash = {
            let state = self.state();
            if state.entry_leases.contains_key(key) || protected(key) || !self.has_entry(key) {
                return Ok(false);
            }
            let trash = self.layout.tmp().join(format!("trash-{}-{}", key.manifest.hex(), key.selection));
            remove_any(&trash)?;
            let entry = self.layout.entry(key);
            fs::rename(&entry, &trash).map_err(io_error("evict", &entry))?;
            observe(key);
            // The manifest's directory goes with its last entry, under the
            // lock a build creates it with.
            let _ = fs::remove_dir(self.layout.models().join(key.manifest.hex()));
            trash
        };
        remove_any(&trash)?;
        Ok(true)
    }

    /// Blobs and unpacked layers that no entry uses, `pinned` does not name
    /// and no pull holds: removed (or, for a dry run, only listed) with their
    /// sizes. What entries need is read under the lock entries are published
    /// with, so an entry published meanwhile keeps its blobs.
    ///
    /// # Errors
    /// On I/O failure.
    pub fn sweep(&self, pinned: &HashSet<Digest>, dry_run: bool) -> Result<Vec<(Digest, u64)>, StoreError> {
        let mut trash = Vec::new();
        let mut swept = Vec::new();
        {
            let mut state = self.state();
            // A tar layer's entry needs it unpacked, not its archive; a raw
            // layer's needs the blob.
            let (mut raw, mut unpacked) = (Vec::new(), Vec::new());
            for key in self.entries()? {
                let info = self.entry_info(&key)?;
                let (archives, files): (Vec<_>, Vec<_>) = info.layers.into_iter().partition(|layer| layer.unpacked);
                raw.push((key.clone(), files.into_iter().map(|layer| layer.digest).collect::<Vec<_>>()));
                unpacked.push((key, archives.into_iter().map(|layer| layer.digest).collect::<Vec<_>>()));
            }
            let needed_raw = crate::gc::needed_blobs(raw.iter().map(|(key, digests)| (key, &digests[..])), pinned);
            let needed_unpacked = crate::gc::needed_blobs(unpacked.iter().map(|(key, digests)| (key, &digests[..])), pinned);
            for (dir, kind, needed) in
                [(self.layout.blobs(), "blob", &needed_raw), (self.layout.unpacked_dir(), "unpacked", &needed_unpacked)]
            {
                for item in fs::read_dir(&dir).map_err(io_error("read", &dir))?.flatten() {
                    let Ok(digest) = format!("sha256:{}", item.file_name().to_string_lossy()).parse::<Digest>() else {
                        continue;
                    };
                    if needed.contains(&digest) || state.blob_leases.contains_key(&digest) {
                        continue;
                    }
                    let path = item.path();
                    let bytes =
                        if kind == "unpacked" { tree_bytes(&path) } else { item.metadata().map(|m| m.len()).unwrap_or(0) };
                    swept.push((digest.clone(), bytes));
                    if dry_run {
                        continue;
                    }
                    // Out of its place under the lock; removed after it.
                    let target = self.layout.tmp().join(format!("trash-{kind}-{}", digest.hex()));
                    remove_any(&target)?;
                    fs::rename(&path, &target).map_err(io_error("evict", &path))?;
                    state.cache_bytes = state.cache_bytes.saturating_sub(bytes);
                    trash.push(target);
                }
            }
        }
        for path in trash {
            remove_any(&path)?;
        }
        Ok(swept)
    }

    /// Removes what has sat in `tmp/` unchanged for longer than `grace`:
    /// what a crashed or cancelled step left, never what is being written.
    ///
    /// # Errors
    /// On I/O failure.
    pub fn remove_stale_temporaries(&self, grace: std::time::Duration) -> Result<Vec<PathBuf>, StoreError> {
        let tmp = self.layout.tmp();
        let mut removed = Vec::new();
        for item in fs::read_dir(&tmp).map_err(io_error("read", &tmp))?.flatten() {
            let stale = item
                .metadata()
                .and_then(|metadata| metadata.modified())
                .is_ok_and(|modified| modified.elapsed().is_ok_and(|age| age > grace))
                && !self.state().live.contains(&item.path());
            if stale {
                remove_any(&item.path())?;
                removed.push(item.path());
            }
        }
        Ok(removed)
    }
}

/// An entry held against eviction.
#[derive(Debug)]
pub struct EntryLease {
    store: Arc<Store>,
    key: EntryKey,
}

impl EntryLease {
    pub fn key(&self) -> &EntryKey {
        &self.key
    }

    pub fn tree(&self) -> PathBuf {
        self.store.layout.tree(&self.key)
    }
}

impl Drop for EntryLease {
    fn drop(&mut self) {
        release(&mut self.store.state(), Some(&self.key), &[]);
    }
}

/// An entry (maybe not built yet) and blobs held against eviction.
#[derive(Debug)]
pub struct Hold {
    store: Arc<Store>,
    key: Option<EntryKey>,
    blobs: Vec<Digest>,
}

impl Drop for Hold {
    fn drop(&mut self) {
        release(&mut self.store.state(), self.key.as_ref(), &self.blobs);
    }
}

fn release(state: &mut State, key: Option<&EntryKey>, blobs: &[Digest]) {
    if let Some(count) = key.and_then(|key| state.entry_leases.get_mut(key)) {
        *count -= 1;
        if *count == 0 {
            state.entry_leases.remove(key.expect("counted a key"));
        }
    }
    for digest in blobs {
        if let Some(count) = state.blob_leases.get_mut(digest) {
            *count -= 1;
            if *count == 0 {
                state.blob_leases.remove(digest);
            }
        }
    }
}

/// A blob being written. Dropped before [`Ingest::commit`], it leaves nothing.
#[derive(Debug)]
pub struct Ingest {
    store: Arc<Store>,
    blob: Descriptor,
    temp: Option<tempfile::NamedTempFile>,
    sender: Option<mpsc::Sender<Command>>,
    writer: Option<tokio::task::JoinHandle<io::Result<Written>>>,
}

#[derive(Debug)]
enum Command {
    Data(Bytes),
    Position(oneshot::Sender<io::Result<u64>>),
    Restart(oneshot::Sender<io::Result<()>>),
}

#[derive(Debug)]
struct Written {
    bytes: u64,
    digest: Digest,
}

impl Ingest {
    fn sender(&self) -> Result<&mpsc::Sender<Command>, StoreError> {
        self.sender.as_ref().ok_or(StoreError::WriterGone)
    }

    /// Appends bytes.
    ///
    /// # Errors
    /// When the writer has stopped (its error surfaces at `position` or `commit`).
    pub async fn write(&mut self, bytes: Bytes) -> Result<(), StoreError> {
        self.sender()?.send(Command::Data(bytes)).await.map_err(|_| StoreError::WriterGone)
    }

    /// Bytes written and hashed so far (waits for the writer to catch up).
    ///
    /// # Errors
    /// The writer's I/O error, or more bytes than the manifest states.
    pub async fn position(&mut self) -> Result<u64, StoreError> {
        let (reply, answer) = oneshot::channel();
        self.sender()?.send(Command::Position(reply)).await.map_err(|_| StoreError::WriterGone)?;
        let path = self.temp_path();
        answer.await.map_err(|_| StoreError::WriterGone)?.map_err(io_error("write", &path))
    }

    /// Starts over from byte 0.
    ///
    /// # Errors
    /// The writer's I/O error.
    pub async fn restart(&mut self) -> Result<(), StoreError> {
        let (reply, answer) = oneshot::channel();
        self.sender()?.send(Command::Restart(reply)).await.map_err(|_| StoreError::WriterGone)?;
        let path = self.temp_path();
        answer.await.map_err(|_| StoreError::WriterGone)?.map_err(io_error("truncate", &path))
    }

    fn temp_path(&self) -> PathBuf {
        self.temp.as_ref().map(|temp| temp.path().to_owned()).unwrap_or_default()
    }

    /// Checks size and digest and publishes the blob with the layer's mode
    /// and mtime. On any failure nothing is published and the temporary goes.
    ///
    /// # Errors
    /// [`StoreError::SizeMismatch`], [`StoreError::DigestMismatch`] or I/O.
    pub async fn commit(mut self, mode: Option<u32>, mtime: Option<SystemTime>) -> Result<(), StoreError> {
        self.sender.take();
        let writer = self.writer.take().ok_or(StoreError::WriterGone)?;
        let path = self.temp_path();
        let written = writer.await.map_err(|_| StoreError::WriterGone)?.map_err(io_error("write", &path))?;
        let digest = self.blob.digest.clone();
        if written.bytes != self.blob.size {
            return Err(StoreError::SizeMismatch { digest, expected: self.blob.size, actual: written.bytes });
        }
        if written.digest != digest {
            return Err(StoreError::DigestMismatch { digest, actual: written.digest });
        }
        let temp = self.temp.take().ok_or(StoreError::WriterGone)?;
        let store = self.store.clone();
        let size = self.blob.size;
        tokio::task::spawn_blocking(move || store.publish_blob(temp, &digest, size, mode, mtime))
            .await
            .map_err(|_| StoreError::WriterGone)?
    }
}

/// The blocking side of an [`Ingest`]: hash, buffer, write.
fn run_writer(mut file: File, limit: u64, mut receiver: mpsc::Receiver<Command>) -> io::Result<Written> {
    let mut hasher = Sha256::new();
    let mut buffer = Vec::with_capacity(WRITE_BUFFER);
    let mut bytes = 0u64;
    let mut failure: Option<io::Error> = None;
    while let Some(command) = receiver.blocking_recv() {
        match command {
            Command::Data(chunk) => {
                if failure.is_some() {
                    continue;
                }
                bytes += chunk.len() as u64;
                if bytes > limit {
                    // Counted, not kept: the commit reports the size mismatch.
                    continue;
                }
                hasher.update(&chunk);
                // A large chunk (the HTTP client hands over whole reads, often
                // hundreds of KiB) goes to the file as it is: copying it into
                // the buffer first cost 4 % of a pull's CPU.
                let written = if chunk.len() >= WRITE_BUFFER / 4 {
                    file.write_all(&buffer).and_then(|()| file.write_all(&chunk))
                } else {
                    buffer.extend_from_slice(&chunk);
                    if buffer.len() < WRITE_BUFFER {
                        continue;
                    }
                    file.write_all(&buffer)
                };
                buffer.clear();
                if let Err(error) = written {
                    failure = Some(error);
                }
            }
            Command::Position(reply) => {
                let answer = match failure.take() {
                    Some(error) => Err(error),
                    None => file.write_all(&buffer).map(|()| bytes),
                };
                buffer.clear();
                let _ = reply.send(match answer {
                    Ok(bytes) => Ok(bytes),
                    Err(error) => {
                        let copy = io::Error::new(error.kind(), error.to_string());
                        failure = Some(error);
                        Err(copy)
                    }
                });
            }
            Command::Restart(reply) => {
                buffer.clear();
                bytes = 0;
                hasher = Sha256::new();
                failure = None;
                let _ = reply.send(file.set_len(0).and_then(|()| {
                    use std::io::Seek;
                    file.seek(io::SeekFrom::Start(0)).map(drop)
                }));
            }
        }
    }
    if let Some(error) = failure {
        return Err(error);
    }
    file.write_all(&buffer)?;
    Ok(Written { bytes, digest: Digest::from_hasher(hasher) })
}

impl Drop for Ingest {
    fn drop(&mut self) {
        // The temporary file goes with `temp`; the writer ends when the
        // channel closes and writes only into the unlinked file.
        self.sender.take();
    }
}

/// Free space is checked again after at most this many bytes written (half
/// the room above the floor when that is less), and free inodes after this
/// many entries: a bomb stops at the floor, and a large layer far from it
/// costs a `statvfs` per 16 MiB.
const DISK_CHECK_BYTES: u64 = 16 << 20;
const DISK_CHECK_ENTRIES: u64 = 1024;
/// Bytes of entry names and link targets in one layer: what the rules keep
/// in memory while it unpacks.
const MAX_NAME_BYTES: u64 = 64 << 20;

/// Unpacks `archive` into `staging`; returns the bytes of the files made.
fn unpack_archive(
    archive: &Path,
    compression: Compression,
    layer: &Layer,
    staging: &Path,
    limits: &UnpackLimits,
) -> Result<u64, StoreError> {
    let refuse = |reason: String| StoreError::Unpack {
        index: layer.index,
        digest: layer.blob.digest.clone(),
        path: layer.path.to_string(),
        reason,
    };
    let over = |limit: LimitExceeded| StoreError::UnpackLimit {
        index: layer.index,
        digest: layer.blob.digest.clone(),
        path: layer.path.to_string(),
        limit,
    };
    let unreadable = |source: ArchiveError| StoreError::Archive {
        index: layer.index,
        digest: layer.blob.digest.clone(),
        path: layer.path.to_string(),
        source,
    };
    let file = File::open(archive).map_err(io_error("open", archive))?;
    let reader: Box<dyn Read> = match compression {
        Compression::None => Box::new(BufReader::new(file)),
        Compression::Gzip => Box::new(flate2::read::GzDecoder::new(BufReader::new(file))),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::new(file).map_err(io_error("decompress", archive))?),
    };
    let mut tar = ArchiveReader::new(reader);
    let mut rules = TarRules::new(&layer.path);
    let mut builder = TreeBuilder::new(staging)?;
    let mut nodes = HashMap::new();
    let (mut bytes, mut entries, mut name_bytes) = (0u64, 0u64, 0u64);
    // Returns how many bytes may be written before the next look: half
    // the room left above the floor, so the checks close in on it.
    let check_disk = |inodes: bool| -> Result<u64, StoreError> {
        let stats = rustix::fs::statvfs(staging).map_err(|errno| StoreError::Io {
            action: "statvfs",
            path: staging.to_owned(),
            source: errno.into(),
        })?;
        let free = stats.f_bavail.saturating_mul(stats.f_frsize);
        if free < limits.keep_free_bytes {
            return Err(over(LimitExceeded::Disk { keep_free: limits.keep_free_bytes }));
        }
        // Filesystems that do not count inodes report none at all.
        if inodes && stats.f_files > 0 && stats.f_favail < limits.keep_free_inodes {
            return Err(over(LimitExceeded::Inodes { keep_free: limits.keep_free_inodes }));
        }
        Ok(((free - limits.keep_free_bytes) / 2).clamp(64 << 10, DISK_CHECK_BYTES))
    };
    let mut next_disk_check = check_disk(true)?;
    let mut next_inode_check = DISK_CHECK_ENTRIES;
    let mut buffer = vec![0u8; 256 << 10];
    while let Some(entry) = tar.next_entry().map_err(unreadable)? {
        let kind = entry.kind;
        let name = String::from_utf8(entry.name).map_err(|_| refuse("an entry name is not UTF-8".into()))?;
        let target = entry
            .link
            .map(String::from_utf8)
            .transpose()
            .map_err(|_| refuse(format!("entry `{name}` has a link target that is not UTF-8")))?;
        if kind != TarKind::File && entry.size > 0 {
            return Err(refuse(format!("entry `{name}` is not a file but carries {} bytes of data", entry.size)));
        }
        name_bytes += (name.len() + target.as_ref().map_or(0, String::len)) as u64;
        if name_bytes > MAX_NAME_BYTES {
            return Err(over(LimitExceeded::Names { limit: MAX_NAME_BYTES }));
        }
        let action = rules.check(&name, kind, target.as_deref()).map_err(refuse)?;
        // A directory made on the way to a name is an inode like an entry;
        // headers that make nothing (`./`, extensions; up to three for one
        // entry) are work to read, bounded likewise.
        // Directories are counted by the builder, which makes them.
        entries += u64::from(matches!(action, TarAction::File(_) | TarAction::Symlink(..)));
        if tar.headers() > limits.max_entries.saturating_mul(3) {
            return Err(over(LimitExceeded::Entries { limit: limits.max_entries }));
        }
        match action {
            TarAction::Skip => {}
            TarAction::Directory(path) => {
                builder.directory(path.as_str())?;
                nodes.insert(path.to_string(), Node::Directory);
            }
            TarAction::File(path) => {
                if bytes.saturating_add(entry.size) > limits.max_bytes {
                    return Err(over(LimitExceeded::Bytes { limit: limits.max_bytes }));
                }
                let mut file = builder.create_file(path.as_str())?;
                let written_path = || staging.join(path.as_str());
                let mut data = tar.data();
                loop {
                    let read = data.read(&mut buffer).map_err(|error| refuse(format!("entry `{name}`: {error}")))?;
                    if read == 0 {
                        break;
                    }
                    file.write_all(&buffer[..read]).map_err(|source| {
                        // Something else filled the disk between two looks.
                        if source.raw_os_error() == Some(rustix::io::Errno::NOSPC.raw_os_error()) {
                            over(LimitExceeded::Disk { keep_free: limits.keep_free_bytes })
                        } else {
                            StoreError::Io { action: "write", path: written_path(), source }
                        }
                    })?;
                    bytes += read as u64;
                    if bytes >= next_disk_check {
                        next_disk_check = bytes + check_disk(false)?;
                    }
                }
                if let Some(mtime) = entry.mtime {
                    let _ = file.set_modified(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(mtime));
                }
                file.set_permissions(fs::Permissions::from_mode(read_only_mode(entry.mode)))
                    .map_err(io_error("make read-only", &written_path()))?;
                nodes.insert(path.to_string(), Node::File);
            }
            TarAction::Symlink(path, destination) => {
                builder.symlink(path.as_str(), &destination)?;
                nodes.insert(path.to_string(), Node::Symlink(destination));
            }
        }
        // Counted once made: one name may have made up to 128 directories.
        if entries + builder.made_directories() > limits.max_entries {
            return Err(over(LimitExceeded::Entries { limit: limits.max_entries }));
        }
        let work = tar.headers() + builder.made_directories();
        if work >= next_inode_check {
            next_inode_check = work + DISK_CHECK_ENTRIES;
            check_disk(true)?;
        }
    }
    // The layer alone must already keep its symlinks inside the model; the
    // whole tree is checked again when an entry is built from it.
    check_tree(&nodes).map_err(|problem| refuse(problem.to_string()))?;
    Ok(bytes)
}

/// Store files are read-only; executables stay executable.
fn read_only_mode(mode: Option<u32>) -> u32 {
    match mode {
        Some(mode) if mode & 0o111 != 0 => 0o555,
        _ => 0o444,
    }
}

/// Empties `tmp/` and removes entry directories without `entry.json`.
fn recover(layout: &Layout) -> Result<Recovery, StoreError> {
    let mut recovery = Recovery::default();
    let tmp = layout.tmp();
    for entry in fs::read_dir(&tmp).map_err(io_error("read", &tmp))?.flatten() {
        let path = entry.path();
        // What cannot be removed now is left for the next sweep: a
        // leftover must not keep the store from opening.
        if let Err(error) = remove_any(&path) {
            tracing::warn!("cannot remove a leftover temporary: {error}");
        }
        recovery.temporaries.push(path);
    }
    let models = layout.models();
    for manifest in fs::read_dir(&models).map_err(io_error("read", &models))?.flatten() {
        for selection in fs::read_dir(manifest.path()).into_iter().flatten().flatten() {
            let path = selection.path();
            let current = read_json::<EntryInfo>(&path.join("entry.json")).is_ok_and(|info| info.rules >= TREE_RULES);
            if !current || !path.join("tree").is_dir() {
                remove_any(&path)?;
                recovery.incomplete_entries.push(path);
            }
        }
    }
    if !recovery.temporaries.is_empty() || !recovery.incomplete_entries.is_empty() {
        tracing::info!(
            temporaries = recovery.temporaries.len(),
            incomplete_entries = recovery.incomplete_entries.len(),
            "recovered the store from an earlier run"
        );
    }
    Ok(recovery)
}

/// Removes a file or a whole directory tree, read-only parts included.
pub(crate) fn remove_any(path: &Path) -> Result<(), StoreError> {
    let metadata = match fs::symlink_metadata(path) {
        Ok(metadata) => metadata,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => return Err(StoreError::Io { action: "inspect", path: path.to_owned(), source }),
    };
    let removed = if metadata.is_dir() { fs::remove_dir_all(path) } else { fs::remove_file(path) };
    match removed {
        Err(error) if error.kind() != io::ErrorKind::NotFound => {
            Err(StoreError::Io { action: "remove", path: path.to_owned(), source: error })
        }
        _ => Ok(()),
    }
}

/// Sum of file sizes below `dir`, each inode once.
pub(crate) fn tree_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut seen = std::collections::HashSet::new();
    let mut total = 0;
    let mut stack = vec![dir.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
            let Ok(metadata) = entry.metadata() else { continue };
            if metadata.is_dir() {
                stack.push(entry.path());
            } else if metadata.is_file() && seen.insert((metadata.dev(), metadata.ino())) {
                total += metadata.len();
            }
        }
    }
    total
}

pub(crate) fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir).and_then(|handle| handle.sync_all()).map_err(io_error("fsync", dir))
}

/// Flushes everything written below `dir` (one `syncfs` instead of an
/// fsync per file of a large tree).
pub(crate) fn sync_tree(dir: &Path) -> Result<(), StoreError> {
    let handle = File::open(dir).map_err(io_error("open", dir))?;
    rustix::fs::syncfs(&handle).map_err(|errno| StoreError::Io { action: "syncfs", path: dir.to_owned(), source: errno.into() })
}

/// Writes JSON atomically: temporary beside it, fsync, rename, fsync the directory.
pub(crate) fn write_json(path: &Path, value: &impl Serialize) -> Result<(), StoreError> {
    write_json_atomically(path, value, true)
}

/// Writes JSON atomically but without waiting for the disk: readers see the
/// old or the new document, never a torn one, and after a crash either may
/// be there. For documents whose loss a crash makes harmless (a pull's
/// progress, a `pulling` record, a use count), where fsyncs slowed the pull
/// or the mount they describe.
pub(crate) fn write_json_volatile(path: &Path, value: &impl Serialize) -> Result<(), StoreError> {
    write_json_atomically(path, value, false)
}

fn write_json_atomically(path: &Path, value: &impl Serialize, durable: bool) -> Result<(), StoreError> {
    let dir = path.parent().expect("a JSON file lives in a directory");
    // Serialized first and written whole: straight into the file, serde_json
    // makes one write(2) per token (hundreds for a volume record).
    let json = serde_json::to_vec_pretty(value).map_err(|error| StoreError::Io {
        action: "serialize",
        path: path.to_owned(),
        source: error.into(),
    })?;
    let mut temp = tempfile::Builder::new().prefix(".tmp-").tempfile_in(dir).map_err(io_error("create a temporary in", dir))?;
    temp.write_all(&json).map_err(io_error("write", temp.path()))?;
    if durable {
        temp.as_file().sync_all().map_err(io_error("fsync", temp.path()))?;
    }
    temp.persist(path).map_err(|error| StoreError::Io { action: "write", path: path.to_owned(), source: error.error })?;
    if durable { sync_dir(dir) } else { Ok(()) }
}

/// Renames a staged directory into place; `Ok(false)` when `target` was
/// there already. A blocking step of an aborted flight runs on (nothing can
/// stop it), so the flight that retries may publish the same layer or entry
/// beside it: the loser drops its copy instead of failing the mount.
fn publish_dir(staged: PathBuf, target: &Path) -> Result<bool, StoreError> {
    use rustix::fs::{CWD, RenameFlags, renameat_with};
    // NOREPLACE: a plain rename onto an empty directory succeeds, and an
    // empty layer published twice would then count as published twice.
    let renamed = match renameat_with(CWD, &staged, CWD, target, RenameFlags::NOREPLACE) {
        Err(rustix::io::Errno::INVAL) => fs::rename(&staged, target),
        other => other.map_err(io::Error::from),
    };
    match renamed {
        Ok(()) => Ok(true),
        Err(source) => {
            let _ = fs::remove_dir_all(&staged);
            if target.is_dir() { Ok(false) } else { Err(StoreError::Io { action: "publish", path: target.to_owned(), source }) }
        }
    }
}

pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, StoreError> {
    let bytes = fs::read(path).map_err(io_error("read", path))?;
    serde_json::from_slice(&bytes).map_err(|error| StoreError::Io {
        action: "parse",
        path: path.to_owned(),
        source: error.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn descriptor(bytes: &[u8]) -> Descriptor {
        Descriptor { digest: Digest::of(bytes), size: bytes.len() as u64, media_type: "application/octet-stream".into() }
    }

    fn tmp_is_empty(store: &Store) -> bool {
        fs::read_dir(store.layout.tmp()).unwrap().next().is_none()
    }

    /// A blob streamed in chunks is hashed, checked and published read-only.
    #[tokio::test(flavor = "multi_thread")]
    async fn ingest_publishes_verified_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path()).unwrap();
        let content: Vec<u8> = (0..3 * WRITE_BUFFER + 5).map(|index| (index * 31 % 251) as u8).collect();
        let blob = descriptor(&content);
        let mut ingest = store.ingest(&blob).unwrap();
        // Small chunks are buffered, large ones written as they come: in order.
        let (mut rest, mut sizes) = (&content[..], [100_000, 300_000, 7, WRITE_BUFFER].into_iter().cycle());
        while !rest.is_empty() {
            let (chunk, after) = rest.split_at(sizes.next().unwrap().min(rest.len()));
            ingest.write(Bytes::copy_from_slice(chunk)).await.unwrap();
            rest = after;
        }
        assert_eq!(ingest.position().await.unwrap(), content.len() as u64);
        ingest.commit(None, None).await.unwrap();
        let path = store.layout.blob(&blob.digest);
        assert!(fs::read(&path).unwrap() == content, "the published bytes differ from those streamed");
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o444);
        assert_eq!(store.cache_bytes(), content.len() as u64);
        assert!(tmp_is_empty(&store));
    }

    /// Wrong bytes, too many bytes or too few publish nothing and leave no
    /// temporary behind.
    #[tokio::test(flavor = "multi_thread")]
    async fn mismatches_publish_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path()).unwrap();
        let blob = descriptor(b"expected");
        for sent in [&b"EXPECTED"[..], b"expected and more", b"exp"] {
            let mut ingest = store.ingest(&blob).unwrap();
            ingest.write(Bytes::copy_from_slice(sent)).await.unwrap();
            let error = ingest.commit(None, None).await.unwrap_err();
            assert_eq!(error.kind(), ErrorKind::DataLoss, "{error}");
            assert!(!store.has_blob(&blob.digest));
            assert!(tmp_is_empty(&store));
        }
    }

    /// A restart forgets what was written; a dropped ingest leaves nothing.
    #[tokio::test(flavor = "multi_thread")]
    async fn restart_and_drop() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path()).unwrap();
        let blob = descriptor(b"abcdef");
        let mut ingest = store.ingest(&blob).unwrap();
        ingest.write(Bytes::from_static(b"zzz")).await.unwrap();
        ingest.restart().await.unwrap();
        assert_eq!(ingest.position().await.unwrap(), 0);
        ingest.write(Bytes::from_static(b"abc")).await.unwrap();
        assert_eq!(ingest.position().await.unwrap(), 3);
        ingest.write(Bytes::from_static(b"def")).await.unwrap();
        ingest.commit(Some(0o755), None).await.unwrap();
        assert_eq!(fs::metadata(store.layout.blob(&blob.digest)).unwrap().permissions().mode() & 0o777, 0o555);

        let other = descriptor(b"never finished");
        let mut ingest = store.ingest(&other).unwrap();
        ingest.write(Bytes::from_static(b"never")).await.unwrap();
        drop(ingest);
        assert!(tmp_is_empty(&store));
    }

    /// Start-up recovery clears temporaries and incomplete entries.
    #[test]
    fn recovery_clears_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        drop(Store::open(dir.path()).unwrap());
        let layout = Layout::new(dir.path());
        fs::write(layout.tmp().join("ingest-left"), b"x").unwrap();
        fs::create_dir_all(layout.tmp().join("entry-half/tree/a")).unwrap();
        let key = EntryKey::new(Digest::of(b"m"), SelectionKey::parse("full").unwrap());
        fs::create_dir_all(layout.tree(&key)).unwrap();
        // Built under older (no) tree rules, and under the current ones.
        let entry = |key: &EntryKey, rules: Option<u32>| {
            fs::create_dir_all(layout.tree(key)).unwrap();
            let mut info = serde_json::json!({ "key": key, "layers": [], "bytes": 0, "created-at": "2026-01-01T00:00:00Z" });
            if let Some(rules) = rules {
                info["rules"] = rules.into();
            }
            fs::write(layout.entry(key).join("entry.json"), info.to_string()).unwrap();
        };
        let older = EntryKey::new(Digest::of(b"older"), SelectionKey::parse("full").unwrap());
        let current = EntryKey::new(Digest::of(b"current"), SelectionKey::parse("full").unwrap());
        entry(&older, None);
        entry(&current, Some(TREE_RULES));
        let (store, recovery) = Store::open(dir.path()).unwrap();
        assert_eq!(recovery.temporaries.len(), 2);
        let mut incomplete = recovery.incomplete_entries.clone();
        incomplete.sort();
        let mut expected = vec![layout.entry(&key), layout.entry(&older)];
        expected.sort();
        assert_eq!(incomplete, expected);
        assert!(tmp_is_empty(&store));
        assert!(!layout.entry(&key).exists() && !layout.entry(&older).exists());
        assert_eq!(store.entries().unwrap(), [current]);
    }

    /// A tar layer stored as a blob, ready to unpack at `pkg`.
    fn tar_layer(store: &Store, entries: &[(&str, &[u8])]) -> Layer {
        let mut builder = tar::Builder::new(Vec::new());
        for (name, content) in entries {
            let mut header = tar::Header::new_gnu();
            header.set_size(content.len() as u64);
            header.set_mode(0o644);
            builder.append_data(&mut header, name, *content).unwrap();
        }
        let bytes = builder.into_inner().unwrap();
        let blob = Descriptor { media_type: "application/vnd.cncf.model.code.v1.tar".into(), ..descriptor(&bytes) };
        store.put_blob(&blob.digest, &bytes).unwrap();
        Layer {
            index: 0,
            blob,
            path: ModelPath::parse("pkg").unwrap(),
            format: LayerFormat::Tar(Compression::None),
            mode: None,
            mtime: None,
        }
    }

    /// Directories made on the way to a name count as entries (each is an
    /// inode), as do headers that make nothing; a layer past the limit is
    /// refused, naming the limit, and leaves nothing.
    #[test]
    fn unpack_limits_count_every_inode() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path()).unwrap();
        let limits = UnpackLimits { max_entries: 20, ..UnpackLimits::NONE };
        // Two entries, each 15 directories deep: 32 inodes.
        let deep = format!("pkg/{}", "d/".repeat(15));
        let layer = tar_layer(&store, &[(&format!("{deep}a"), b"1"), (&format!("pkg/e/{}b", "d/".repeat(14)), b"2")]);
        let error = store.unpack(&layer, &limits, false).unwrap_err();
        assert!(matches!(&error, StoreError::UnpackLimit { limit: LimitExceeded::Entries { limit: 20 }, .. }), "{error}");
        assert!(error.to_string().contains("more than 20 entries"), "{error}");
        assert!(tmp_is_empty(&store));
        assert!(!store.layout.unpacked(&layer.blob.digest).exists());
        // Within the limit, the same layer unpacks and drops its archive.
        let roomy = UnpackLimits { max_entries: 40, ..UnpackLimits::NONE };
        store.unpack(&layer, &roomy, false).unwrap();
        assert_eq!(fs::read(store.layout.unpacked(&layer.blob.digest).join(format!("{deep}a"))).unwrap(), b"1");
        assert!(!store.has_blob(&layer.blob.digest));

        let bytes_limit = UnpackLimits { max_bytes: 4, ..UnpackLimits::NONE };
        let large = tar_layer(&store, &[("pkg/a", b"abc"), ("pkg/b", b"def")]);
        let error = store.unpack(&large, &bytes_limit, false).unwrap_err();
        assert!(matches!(&error, StoreError::UnpackLimit { limit: LimitExceeded::Bytes { limit: 4 }, .. }), "{error}");
        assert!(tmp_is_empty(&store));
    }

    /// Volumes that finish together each count: no use is lost to a race
    /// between their read-modify-writes.
    #[test]
    fn concurrent_uses_all_count() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path()).unwrap();
        let key = EntryKey::new(Digest::of(b"m"), SelectionKey::parse("full").unwrap());
        fs::create_dir_all(store.layout.entry(&key)).unwrap();
        std::thread::scope(|scope| {
            for thread in 0..8 {
                let (store, key) = (&store, &key);
                scope.spawn(move || {
                    for _ in 0..10 {
                        store.record_use(key, &format!("r/m:{thread}")).unwrap();
                    }
                });
            }
        });
        let usage = store.entry_usage(&key);
        assert_eq!(usage.use_count, 80);
        assert_eq!(usage.references.len(), 8);
    }

    /// A blob published twice (a retry beside a step of an aborted flight
    /// that ran on) is stored and counted once, with no temporary left.
    #[test]
    fn a_blob_published_twice_counts_once() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path()).unwrap();
        let bytes = b"weights";
        let digest = Digest::of(bytes);
        for _ in 0..2 {
            let mut file = store.temp_file("blob").unwrap();
            file.write_all(bytes).unwrap();
            store.publish_blob(file, &digest, bytes.len() as u64, None, None).unwrap();
        }
        assert_eq!(store.cache_bytes(), bytes.len() as u64);
        assert_eq!(store.read_blob(&digest).unwrap(), bytes);
        assert!(tmp_is_empty(&store));
    }

    /// A staged directory whose target appeared meanwhile is dropped, not
    /// an error; one that cannot be published for another reason is both
    /// dropped and an error naming the target.
    #[test]
    fn staged_directories_publish_once() {
        let dir = tempfile::tempdir().unwrap();
        let stage = |name: &str| {
            let staged = dir.path().join(name);
            fs::create_dir_all(staged.join("sub")).unwrap();
            fs::write(staged.join("sub/file"), name).unwrap();
            staged
        };
        let target = dir.path().join("published");
        assert!(publish_dir(stage("first"), &target).unwrap());
        assert!(!publish_dir(stage("second"), &target).unwrap());
        let empty = dir.path().join("empty");
        fs::create_dir(dir.path().join("empty-staged")).unwrap();
        fs::create_dir(dir.path().join("empty-again")).unwrap();
        assert!(publish_dir(dir.path().join("empty-staged"), &empty).unwrap());
        assert!(!publish_dir(dir.path().join("empty-again"), &empty).unwrap(), "an empty target counts as there");
        assert!(!dir.path().join("second").exists());
        assert_eq!(fs::read_to_string(target.join("sub/file")).unwrap(), "first");
        let nowhere = dir.path().join("missing/published");
        let error = publish_dir(stage("third"), &nowhere).unwrap_err();
        assert!(error.to_string().contains("missing/published"), "{error}");
        assert!(!dir.path().join("third").exists());
    }

    /// The stale sweep leaves a staging directory that work is filling,
    /// however old its own mtime, and takes it once the work let go.
    #[test]
    fn live_staging_is_not_stale() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = Store::open(dir.path()).unwrap();
        let staging = tempfile::Builder::new().prefix("unpack-").tempdir_in(store.layout.tmp()).unwrap().keep();
        let two_hours_ago = SystemTime::now() - std::time::Duration::from_secs(7200);
        File::open(&staging).unwrap().set_modified(two_hours_ago).unwrap();
        let hour = std::time::Duration::from_secs(3600);
        let live = store.live(&staging);
        assert!(store.remove_stale_temporaries(hour).unwrap().is_empty());
        assert!(staging.is_dir());
        drop(live);
        assert_eq!(store.remove_stale_temporaries(hour).unwrap(), [staging.clone()]);
        assert!(!staging.exists());
    }

    /// Entry keys print and parse back; junk does not parse.
    #[test]
    fn entry_keys_round_trip() {
        let key = EntryKey::new(Digest::of(b"m"), SelectionKey::parse("part-0123456789abcdef").unwrap());
        assert_eq!(EntryKey::parse(&key.to_string()), Some(key));
        assert_eq!(EntryKey::parse("sha256:00/full"), None);
        assert_eq!(EntryKey::parse("nothing"), None);
    }

    /// JSON files are replaced atomically, with nothing left beside them.
    #[test]
    fn json_is_written_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("value.json");
        write_json(&path, &vec![1, 2, 3]).unwrap();
        write_json(&path, &vec![4]).unwrap();
        assert_eq!(read_json::<Vec<u32>>(&path).unwrap(), [4]);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
