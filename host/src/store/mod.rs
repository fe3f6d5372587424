//! The content-addressed store under a root directory. Its on-disk layout,
//! and every other path under the root, is [`Layout`]'s to name.
//!
//! Nothing becomes visible under its final name before it is complete: a
//! blob is hashed as it streams into `tmp/`, its size and digest checked,
//! fsynced, made read-only and renamed into `blobs/`; trees and unpacked
//! layers are built in `tmp/`, synced and renamed into place whole (the
//! steps are [`crate::durable`]'s). A crash therefore leaves only
//! `tmp/` to clear.
//!
//! The store knows nothing of volumes or of GC's policy: references from
//! volume records, pins and the choice of what to evict live a layer above.
//! The store keeps the lease counts that garbage collection must respect,
//! and removes what the keep-set GC computes leaves out.
//!
//! | module | concern |
//! |---|---|
//! | `layout` | [`Layout`]: every path under the root |
//! | `ingest` | blobs streamed in, checked and published ([`Ingest`]) |
//! | `unpack` | tar layers unpacked within [`UnpackLimits`] |
//! | `entries` | model trees built and published whole ([`EntryKey`], [`EntryInfo`], [`EntryUsage`]) |
//! | `leases` | what GC must leave alone ([`EntryLease`], [`Hold`]) |
//! | `sweep` | eviction, the sweep of what nothing keeps ([`Keep`]), stale temporaries |
//! | `recovery` | the root lock, and start-up [`Recovery`] |
//!
//! This file holds the [`Store`] itself, its [`StoreError`] and its byte
//! and filesystem accounting.

mod entries;
mod ingest;
mod layout;
mod leases;
mod recovery;
mod sweep;
mod unpack;

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

pub use self::entries::{EntryInfo, EntryKey, EntryLayer, EntryUsage, TREE_RULES};
pub use self::ingest::Ingest;
pub use self::layout::Layout;
pub use self::leases::{EntryLease, Hold};
pub use self::recovery::Recovery;
pub use self::sweep::{EntryLayers, Keep};
pub use self::unpack::{LimitExceeded, UnpackLimits};
use crate::archive::ArchiveError;
use crate::digest::Digest;
use crate::durable::{Filesystem, FsError};
use crate::error::ErrorKind;
use crate::link::LinkError;
use crate::modelpack::TreeProblem;

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
    /// A JSON document that does not serialize, or one read that does not parse.
    #[error("{action} {}", path.display())]
    Json {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: serde_json::Error,
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
    /// A blob writer's write failed; it reports the same failure until restarted.
    #[error("write {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: Arc<io::Error>,
    },
    #[error("the blob writer stopped unexpectedly")]
    WriterGone,
    /// A blocking step (a blob writer, a publish) panicked or was cancelled.
    #[error("a blocking step of the store did not finish")]
    Blocking {
        #[source]
        source: tokio::task::JoinError,
    },
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
            StoreError::Io { .. }
            | StoreError::Json { .. }
            | StoreError::Link(_)
            | StoreError::Write { .. }
            | StoreError::WriterGone
            | StoreError::Blocking { .. } => ErrorKind::Internal,
        }
    }
}

impl From<FsError> for StoreError {
    fn from(error: FsError) -> StoreError {
        match error {
            FsError::Io { action, path, source } => StoreError::Io { action, path, source },
            FsError::Json { action, path, source } => StoreError::Json { action, path, source },
        }
    }
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StoreError + use<> {
    let path = path.to_owned();
    move |source| StoreError::Io { action, path, source }
}

/// What the store's lock guards.
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

/// The store.
#[derive(Debug)]
pub struct Store {
    layout: Layout,
    state: Mutex<State>,
    /// Serializes `record_use`'s read-modify-write of an entry's usage, so
    /// volumes finishing together do not lose each other's counts.
    usage: Mutex<()>,
    _lock: recovery::RootLock,
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
        let lock = recovery::RootLock::acquire(&layout.lock())?;
        for dir in [layout.blobs(), layout.unpacked_dir(), layout.models(), layout.tmp(), layout.records()] {
            fs::create_dir_all(&dir).map_err(io_error("create", &dir))?;
        }
        let recovery = recovery::recover(&layout)?;
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
        let stats = statvfs(self.layout.root())?;
        Ok(Filesystem { total_bytes: stats.f_blocks * stats.f_frsize, free_bytes: stats.f_bavail * stats.f_frsize })
    }

    /// Inodes of the store's filesystem: `(total, free)`; `(0, 0)` where
    /// the filesystem does not count them.
    ///
    /// # Errors
    /// When `statvfs` fails.
    pub fn inodes(&self) -> Result<(u64, u64), StoreError> {
        let stats = statvfs(self.layout.root())?;
        Ok((stats.f_files, stats.f_favail))
    }
}

fn statvfs(path: &Path) -> Result<rustix::fs::StatVfs, StoreError> {
    rustix::fs::statvfs(path).map_err(|errno| StoreError::Io { action: "statvfs", path: path.to_owned(), source: errno.into() })
}

/// Sum of file sizes below `dir`, each inode once.
fn tree_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut seen = HashSet::new();
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

// The `durable` steps reporting a `StoreError`, for the callers whose own
// errors wrap the store's (volumes, the engine's link step). New code calls
// `crate::durable` directly.

#[cfg(test)]
mod tests {
    use super::*;
    use crate::modelpack::Descriptor;

    pub(super) fn descriptor(bytes: &[u8]) -> Descriptor {
        Descriptor { digest: Digest::of(bytes), size: bytes.len() as u64, media_type: "application/octet-stream".into() }
    }

    pub(super) fn tmp_is_empty(store: &Store) -> bool {
        fs::read_dir(store.layout.tmp()).unwrap().next().is_none()
    }

    /// An error stays small enough to return by value everywhere
    /// (clippy's `result_large_err` draws the line at 128 bytes).
    #[test]
    fn errors_stay_small() {
        assert!(std::mem::size_of::<StoreError>() <= 128, "{}", std::mem::size_of::<StoreError>());
    }
}
