//! Releases the daemon still owes. An unpublish that cannot reach the
//! daemon still takes the mount away and answers OK: kubelet would retry an
//! error for ever and the pod would stay Terminating, hanging node drains.
//! The release is kept here, durably, and retried when the shim starts and
//! periodically until the daemon confirms it.

use std::path::PathBuf;
use std::time::Duration;

use modelcache_api::error::ErrorKind;
use modelcache_api::ids::{MountId, VolumeId};
use modelcache_api::protocol::VolumeSocket;
use modelcache_api::record::{VolumeRecord, VolumeState};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::service::Shim;
use crate::targets::{Published, list_json, remove_file, save_json};

/// One release the daemon has not confirmed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Release {
    pub volume: VolumeId,
    pub mount_id: MountId,
    /// The target it was published at, for the logs and the target's lock.
    pub target: PathBuf,
    pub csi_volume_id: String,
    /// A runtime volume's: its socket is closed and every record of the
    /// volume released, rather than one record.
    #[serde(default)]
    pub runtime: bool,
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

/// How long a release waits for the daemon before it is owed instead.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(10);

impl Shim {
    /// Releases `published`'s record; when the daemon does not confirm,
    /// the release is owed (kept and retried, see [`crate::releases`]).
    ///
    /// # Errors
    /// When the daemon did not confirm and the owed release cannot be kept.
    pub(crate) async fn release(&self, published: &Published) -> std::io::Result<()> {
        let owed = Release {
            volume: published.volume.clone(),
            mount_id: published.mount_id.clone(),
            target: published.target.clone(),
            csi_volume_id: published.csi_volume_id.clone(),
            runtime: published.runtime,
        };
        let error = match self.release_at_daemon(&owed).await {
            Ok(()) => return Ok(()),
            Err(error) => error,
        };
        self.releases.add(&owed)?;
        tracing::warn!(
            volume = %owed.csi_volume_id, target = %owed.target.display(),
            "the daemon did not confirm the release ({error}); retried until it does"
        );
        Ok(())
    }

    /// Releases at the daemon what `owed` holds: its record; for a runtime
    /// volume, its socket (first, so nothing mounts through it meanwhile)
    /// and every record of the volume.
    pub(crate) async fn release_at_daemon(&self, owed: &Release) -> Result<(), String> {
        if !owed.runtime {
            return self.delete_record(&owed.path()).await;
        }
        self.close_socket(&owed.volume).await?;
        self.release_volume(&owed.volume).await
    }

    /// Closes `volume`'s socket; whether the daemon served one.
    pub(crate) async fn close_socket(&self, volume: &VolumeId) -> Result<bool, String> {
        let path = format!("/v1/volume-sockets/{volume}");
        match tokio::time::timeout(RELEASE_TIMEOUT, self.daemon.delete::<VolumeSocket>(&path)).await {
            Ok(Ok(_)) => Ok(true),
            Ok(Err(error)) if error.kind() == ErrorKind::NotFound => Ok(false),
            Ok(Err(error)) => Err(modelcache_api::error::chain(&error)),
            Err(_) => Err(format!("closing the volume's socket: no answer in {} s", RELEASE_TIMEOUT.as_secs())),
        }
    }

    /// Releases every record of `volume` not yet released.
    pub(crate) async fn release_volume(&self, volume: &VolumeId) -> Result<(), String> {
        let records = match tokio::time::timeout(RELEASE_TIMEOUT, self.daemon.get::<Vec<VolumeRecord>>("/v1/volumes")).await {
            Ok(Ok(records)) => records,
            Ok(Err(error)) => return Err(modelcache_api::error::chain(&error)),
            Err(_) => return Err(format!("listing the volume's records: no answer in {} s", RELEASE_TIMEOUT.as_secs())),
        };
        for record in records.iter().filter(|record| record.volume == *volume && record.state() != VolumeState::Released) {
            self.delete_record(&record_path(&record.volume, &record.mount_id)).await?;
        }
        Ok(())
    }

    /// Deletes a record at the daemon, bounded in time: a daemon that
    /// accepts and never answers must not hold up a pod's termination.
    /// A record the daemon does not know counts as released.
    pub(crate) async fn delete_record(&self, path: &str) -> Result<(), String> {
        match tokio::time::timeout(RELEASE_TIMEOUT, self.daemon.delete::<VolumeRecord>(path)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(error)) if error.kind() == ErrorKind::NotFound => Ok(()),
            Ok(Err(error)) => Err(modelcache_api::error::chain(&error)),
            Err(_) => Err(format!("no answer in {} s", RELEASE_TIMEOUT.as_secs())),
        }
    }

    /// Retries every owed release once; those the daemon confirms (or no
    /// longer knows) are forgotten.
    pub async fn retry_releases(&self) {
        for owed in self.releases.list() {
            let lock = self.lock(&owed.target);
            let _one_at_a_time = lock.lock().await;
            // Published again meanwhile: the record is wanted.
            let superseded = self
                .targets
                .load(&owed.target)
                .is_some_and(|published| published.volume == owed.volume && published.mount_id == owed.mount_id);
            if !superseded {
                match self.release_at_daemon(&owed).await {
                    Ok(()) => {
                        tracing::info!(volume = %owed.csi_volume_id, target = %owed.target.display(), "released an owed record")
                    }
                    Err(error) => {
                        tracing::debug!(volume = %owed.csi_volume_id, "an owed release is still not confirmed: {error}");
                        continue;
                    }
                }
            }
            if let Err(error) = self.releases.remove(&owed.volume, &owed.mount_id) {
                tracing::warn!(volume = %owed.csi_volume_id, "forgetting a done release: {error}");
            }
        }
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
            runtime: false,
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
