//! Releases the daemon still owes. An unpublish that cannot reach the
//! daemon still takes the mount away and answers OK: kubelet would retry an
//! error for ever and the pod would stay Terminating, hanging node drains.
//! The release is kept here, durably, and retried when the shim starts and
//! periodically until the daemon confirms it.

use std::path::PathBuf;

use modelcache_api::ids::{MountId, VolumeId};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::targets::{list_json, remove_file, save_json};

/// One release the daemon has not confirmed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Release {
    pub volume: VolumeId,
    pub mount_id: MountId,
    /// The target it was published at, for the logs and the target's lock.
    pub target: PathBuf,
    pub csi_volume_id: String,
}

impl Release {
    /// The daemon's path for the record.
    pub fn path(&self) -> String {
        record_path(&self.volume, &self.mount_id)
    }
}

/// The daemon's API path for a volume's mount record.
pub fn record_path(volume: &VolumeId, mount_id: &MountId) -> String {
    format!("/v1/volumes/{volume}/{mount_id}")
}

/// The state directory's owed releases, one file per record.
#[derive(Clone, Debug)]
pub struct Releases {
    dir: PathBuf,
}

impl Releases {
    pub fn new(dir: PathBuf) -> Releases {
        Releases { dir }
    }

    fn file(&self, volume: &VolumeId, mount_id: &MountId) -> PathBuf {
        let key = format!("{volume}/{mount_id}");
        self.dir.join(format!("{}.json", hex::encode(Sha256::digest(key.as_bytes()))))
    }

    /// # Errors
    /// On I/O failure.
    pub fn add(&self, release: &Release) -> std::io::Result<()> {
        save_json(&self.dir, &self.file(&release.volume, &release.mount_id), release)
    }

    /// Forgets the release of one record: confirmed, or superseded by a new
    /// publish of it.
    ///
    /// # Errors
    /// On I/O failure other than there being none.
    pub fn remove(&self, volume: &VolumeId, mount_id: &MountId) -> std::io::Result<()> {
        remove_file(&self.file(volume, mount_id))
    }

    pub fn list(&self) -> Vec<Release> {
        list_json(&self.dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A release survives a restart (a new `Releases` on the directory) and
    /// is forgotten by its record's ids.
    #[test]
    fn kept_until_removed() {
        let dir = tempfile::tempdir().unwrap();
        let release = Release {
            volume: VolumeId::new("csi-1").unwrap(),
            mount_id: MountId::new("target-ab").unwrap(),
            target: PathBuf::from("/pods/p/mount"),
            csi_volume_id: "csi-1".into(),
        };
        Releases::new(dir.path().join("releases")).add(&release).unwrap();
        let reopened = Releases::new(dir.path().join("releases"));
        assert_eq!(reopened.list(), std::slice::from_ref(&release));
        assert_eq!(release.path(), "/v1/volumes/csi-1/target-ab");
        reopened.remove(&release.volume, &release.mount_id).unwrap();
        reopened.remove(&release.volume, &release.mount_id).unwrap();
        assert!(reopened.list().is_empty());
    }
}
