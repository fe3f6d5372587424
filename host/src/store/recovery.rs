//! Opening a root: the lock that keeps one process per root, and recovery
//! from whatever a previous process left behind.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::durable::{read_json, remove_any};

use super::{EntryInfo, Layout, StoreError, TREE_RULES, io_error};

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

/// The root lock: held for the life of the [`Store`](super::Store).
#[derive(Debug)]
pub(super) struct RootLock {
    _file: File,
}

impl RootLock {
    pub(super) fn acquire(path: &Path) -> Result<RootLock, StoreError> {
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

/// Empties `tmp/` and removes entry directories without a complete tree
/// or built under older tree rules.
pub(super) fn recover(layout: &Layout) -> Result<Recovery, StoreError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::Digest;
    use crate::modelpack::SelectionKey;
    use crate::store::tests::tmp_is_empty;
    use crate::store::{EntryKey, Store};

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
}
