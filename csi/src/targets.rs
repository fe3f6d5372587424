//! What the shim published at each target path, kept on disk: written when
//! a publish starts (so an unpublish during the pull releases the right
//! record), removed when the unpublish is done, and read after a restart.

use std::path::{Path, PathBuf};

use modelcache_api::ids::{MountId, VolumeId};
use modelcache_api::options::ExcludeOptions;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// One publish.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Published {
    pub target: PathBuf,
    pub csi_volume_id: String,
    pub volume: VolumeId,
    pub mount_id: MountId,
    pub reference: String,
    pub options: ExcludeOptions,
    pub readonly: bool,
    /// An inline volume of one pod (kubelet's `csi.storage.k8s.io/ephemeral`),
    /// not a persistent volume.
    #[serde(default)]
    pub ephemeral: bool,
    /// Whether this shim made (or adopted) the mount at the target: saved
    /// only once it did, so a record left by an unfinished publish never
    /// vouches for a mount someone else made.
    #[serde(default)]
    pub mounted: bool,
    /// A runtime volume (no model of its own: its pod mounts models through
    /// the volume's socket); `reference` is then empty.
    #[serde(default)]
    pub runtime: bool,
}

impl Published {
    /// Whether `other` asks for the same thing (so publishing it again is a no-op).
    pub fn same_request(&self, other: &Published) -> bool {
        self.csi_volume_id == other.csi_volume_id
            && self.reference == other.reference
            && self.options == other.options
            && self.readonly == other.readonly
    }
}

/// The state directory.
#[derive(Clone, Debug)]
pub struct Targets {
    dir: PathBuf,
}

impl Targets {
    pub fn new(dir: PathBuf) -> Targets {
        Targets { dir }
    }

    fn path(&self, target: &Path) -> PathBuf {
        self.dir.join(format!("{}.json", hex::encode(Sha256::digest(target.as_os_str().as_encoded_bytes()))))
    }

    pub fn load(&self, target: &Path) -> Option<Published> {
        let bytes = std::fs::read(self.path(target)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// # Errors
    /// On I/O failure.
    pub fn save(&self, published: &Published) -> std::io::Result<()> {
        save_json(&self.dir, &self.path(&published.target), published)
    }

    /// # Errors
    /// On I/O failure other than the file being absent.
    pub fn remove(&self, target: &Path) -> std::io::Result<()> {
        remove_file(&self.path(target))
    }

    /// Every publish remembered here.
    pub fn list(&self) -> Vec<Published> {
        list_json(&self.dir)
    }
}

/// Writes `value` to `path` in `dir` atomically (temporary, fsync, rename).
pub(crate) fn save_json(dir: &Path, path: &Path, value: &impl Serialize) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut file = tempfile::NamedTempFile::new_in(dir)?;
    serde_json::to_writer_pretty(&mut file, value)?;
    file.as_file().sync_all()?;
    file.persist(path).map_err(|error| error.error)?;
    Ok(())
}

pub(crate) fn remove_file(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => Err(error),
        _ => Ok(()),
    }
}

/// The `.json` records in `dir` that parse (a temporary left by a crash
/// has another name).
pub(crate) fn list_json<T: serde::de::DeserializeOwned>(dir: &Path) -> Vec<T> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    entries
        .flatten()
        .filter(|entry| entry.path().extension().is_some_and(|extension| extension == "json"))
        .filter_map(|entry| serde_json::from_slice(&std::fs::read(entry.path()).ok()?).ok())
        .collect()
}
