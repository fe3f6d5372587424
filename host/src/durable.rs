//! Filesystem steps that make a write atomic and durable: below the store,
//! the volume records and GC's pins, which all use them.
//!
//! A file, document or tree becomes visible under its final name only whole:
//! it is written under a temporary name on the same filesystem, flushed,
//! renamed into place, and then the directory that holds it is flushed, so
//! that the rename itself survives a crash. For a blob the sequence is
//! [`seal_file`] (fsync, mtime, read-only), a rename, [`sync_dir`]; for a
//! tree, [`sync_tree`], [`publish_dir`], [`sync_dir`]; for a JSON document,
//! [`write_json`].

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// The cache's filesystem.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Filesystem {
    pub total_bytes: u64,
    pub free_bytes: u64,
}

/// A filesystem step that failed, naming the path.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("{action} {}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A document that could not be serialized, or one read that does not parse.
    #[error("{action} {}", path.display())]
    Json {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> FsError + use<> {
    let path = path.to_owned();
    move |source| FsError::Io { action, path, source }
}

/// Writes JSON atomically: temporary beside it, fsync, rename, fsync the directory.
///
/// # Errors
/// When the value does not serialize or on I/O failure; the old document
/// (if any) is then left as it was.
pub fn write_json(path: &Path, value: &impl Serialize) -> Result<(), FsError> {
    write_json_atomically(path, value, true)
}

/// Writes JSON atomically but without waiting for the disk: readers see the
/// old or the new document, never a torn one, and after a crash either may
/// be there. For documents whose loss a crash makes harmless (a pull's
/// progress, a `pulling` record, a use count), where waiting for the disk
/// would hold up the pull or the mount they describe.
///
/// # Errors
/// As [`write_json`].
pub fn write_json_volatile(path: &Path, value: &impl Serialize) -> Result<(), FsError> {
    write_json_atomically(path, value, false)
}

fn write_json_atomically(path: &Path, value: &impl Serialize, durable: bool) -> Result<(), FsError> {
    let dir = path.parent().expect("a JSON file lives in a directory");
    // Serialized first and written whole, in one write(2): serde_json
    // writing into the file itself makes one per token.
    let json = serde_json::to_vec_pretty(value).map_err(|source| FsError::Json {
        action: "serialize",
        path: path.to_owned(),
        source,
    })?;
    let mut temp = tempfile::Builder::new().prefix(".tmp-").tempfile_in(dir).map_err(io_error("create a temporary in", dir))?;
    temp.write_all(&json).map_err(io_error("write", temp.path()))?;
    if durable {
        temp.as_file().sync_all().map_err(io_error("fsync", temp.path()))?;
    }
    temp.persist(path).map_err(|error| FsError::Io { action: "write", path: path.to_owned(), source: error.error })?;
    if durable { sync_dir(dir) } else { Ok(()) }
}

/// Reads a JSON document.
///
/// # Errors
/// When it is absent, unreadable or does not parse as a `T`.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, FsError> {
    let bytes = fs::read(path).map_err(io_error("read", path))?;
    serde_json::from_slice(&bytes).map_err(|source| FsError::Json { action: "parse", path: path.to_owned(), source })
}

/// Finishes a file about to be renamed into the store: fsync, then the
/// mtime (when given), then read-only ([`read_only_mode`]).
///
/// # Errors
/// On I/O failure, naming `path` (the file's current name).
pub fn seal_file(file: &File, path: &Path, mode: Option<u32>, mtime: Option<SystemTime>) -> Result<(), FsError> {
    file.sync_all().map_err(io_error("fsync", path))?;
    if let Some(mtime) = mtime {
        file.set_modified(mtime).map_err(io_error("set the mtime of", path))?;
    }
    file.set_permissions(fs::Permissions::from_mode(read_only_mode(mode))).map_err(io_error("make read-only", path))
}

/// Store files are read-only; executables stay executable.
pub fn read_only_mode(mode: Option<u32>) -> u32 {
    match mode {
        Some(mode) if mode & 0o111 != 0 => 0o555,
        _ => 0o444,
    }
}

/// Renames a staged directory into place; `Ok(false)` when `target` was
/// there already. A blocking step of an aborted flight runs on (nothing can
/// stop it), so the flight that retries may publish the same layer or entry
/// beside it: the loser drops its copy instead of failing the mount.
///
/// # Errors
/// When the rename fails for another reason; the staged copy is removed then too.
pub fn publish_dir(staged: PathBuf, target: &Path) -> Result<bool, FsError> {
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
            if target.is_dir() { Ok(false) } else { Err(FsError::Io { action: "publish", path: target.to_owned(), source }) }
        }
    }
}

/// Flushes a directory, so the names made or renamed in it last.
///
/// # Errors
/// On I/O failure.
pub fn sync_dir(dir: &Path) -> Result<(), FsError> {
    File::open(dir).and_then(|handle| handle.sync_all()).map_err(io_error("fsync", dir))
}

/// Flushes everything written below `dir` (one `syncfs` instead of an
/// fsync per file of a large tree).
///
/// # Errors
/// On I/O failure.
pub fn sync_tree(dir: &Path) -> Result<(), FsError> {
    let handle = File::open(dir).map_err(io_error("open", dir))?;
    rustix::fs::syncfs(&handle).map_err(|errno| FsError::Io { action: "syncfs", path: dir.to_owned(), source: errno.into() })
}

/// Removes a file or a whole directory tree, read-only parts included;
/// nothing there is not an error.
///
/// # Errors
/// On I/O failure.
pub fn remove_any(path: &Path) -> Result<(), FsError> {
    let metadata = match fs::symlink_metadata(path) {
        Ok(metadata) => metadata,
        Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => return Err(FsError::Io { action: "inspect", path: path.to_owned(), source }),
    };
    let removed = if metadata.is_dir() { fs::remove_dir_all(path) } else { fs::remove_file(path) };
    match removed {
        Err(error) if error.kind() != io::ErrorKind::NotFound => {
            Err(FsError::Io { action: "remove", path: path.to_owned(), source: error })
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
