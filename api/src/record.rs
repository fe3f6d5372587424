//! A volume's record: what it holds, how far it got, and how its tree was made.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::entry::{EntryKey, SelectionKey};
use crate::error::ErrorKind;
use crate::ids::{MountId, VolumeId};
use crate::options::{ExcludeOptions, Skip};
use crate::tenancy::Requester;

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

/// How a volume got its entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Origin {
    /// It was in the cache.
    Cached,
    /// This request started the pull.
    Pulled,
    /// It joined a pull another request had started.
    Joined,
}

/// A record's state, with the error that belongs to it: a failed record
/// always says why, and only a failed or released record carries an error.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Standing {
    Pulling,
    Ready,
    Failed(RecordError),
    /// Released; the error says why a pull it cut short stopped, or how the
    /// failed attempt before the release ended.
    Released(Option<RecordError>),
}

/// How a mount's requester was shown able to read the manifest it got
/// (the registry's answer to it, or one remembered).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Proof {
    /// The registry serves the manifest without credentials.
    Public,
    /// The node's own credentials reach it (a policy granted their use).
    Node,
    /// The mount's pull secret reaches it.
    PullSecret,
}

/// One volume's record.
///
/// On the wire (files and the API) it is [`wire::Record`]: the state and
/// error as two fields, the entry as `digest` and `selection`, and the
/// origin also as the `reused-from-cache` and `coalesced` flags older
/// readers know.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "wire::Record", from = "wire::Record")]
pub struct VolumeRecord {
    pub volume: VolumeId,
    pub mount_id: MountId,
    /// The reference as requested.
    pub reference: String,
    pub options: ExcludeOptions,
    /// Who asked for the mount.
    pub requester: Option<Requester>,
    /// How the requester was shown able to read the manifest, once it was.
    pub access: Option<Proof>,
    /// Whom verify policy found the model signed by (none: no verify policy).
    pub verified_by: Option<String>,
    standing: Standing,
    /// The tree the volume holds (the manifest the reference resolved to and
    /// the selection of its files), once resolved.
    pub entry: Option<EntryKey>,
    /// Where the volume's tree is.
    pub path: PathBuf,
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// How the entry was got, once it was.
    pub origin: Option<Origin>,
    pub link_method: Option<LinkMethod>,
    pub link: Option<LinkReport>,
    /// Files left out, and why.
    pub skipped: Vec<Skip>,
    /// The process that wrote the record.
    pub pid: u32,
    pub created_at: time::OffsetDateTime,
    pub updated_at: time::OffsetDateTime,
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
            requester: None,
            access: None,
            verified_by: None,
            standing: Standing::Pulling,
            entry: None,
            path,
            bytes_done: 0,
            bytes_total: 0,
            origin: None,
            link_method: None,
            link: None,
            skipped: Vec::new(),
            pid: std::process::id(),
            created_at: now,
            updated_at: now,
            ready_at: None,
        }
    }

    pub fn state(&self) -> VolumeState {
        match self.standing {
            Standing::Pulling => VolumeState::Pulling,
            Standing::Ready => VolumeState::Ready,
            Standing::Failed(_) => VolumeState::Failed,
            Standing::Released(_) => VolumeState::Released,
        }
    }

    /// Why the record failed (or, released, how its last attempt ended).
    pub fn error(&self) -> Option<&RecordError> {
        match &self.standing {
            Standing::Failed(error) | Standing::Released(Some(error)) => Some(error),
            Standing::Pulling | Standing::Ready | Standing::Released(None) => None,
        }
    }

    /// The tree is complete.
    pub fn set_ready(&mut self) {
        self.standing = Standing::Ready;
        self.ready_at = Some(time::OffsetDateTime::now_utc());
    }

    /// The attempt failed, for `error`.
    pub fn set_failed(&mut self, error: RecordError) {
        self.standing = Standing::Failed(error);
    }

    /// Back to `pulling`, as a new attempt starts.
    pub fn set_pulling(&mut self) {
        self.standing = Standing::Pulling;
    }

    /// The volume was released: a pull still running is cut short
    /// (`cancelled`), a failure is kept.
    pub fn set_released(&mut self) {
        let error = match std::mem::replace(&mut self.standing, Standing::Released(None)) {
            Standing::Pulling => Some(RecordError { kind: ErrorKind::Cancelled, message: "released while pulling".to_owned() }),
            Standing::Failed(error) | Standing::Released(Some(error)) => Some(error),
            Standing::Ready | Standing::Released(None) => None,
        };
        self.standing = Standing::Released(error);
    }

    /// The manifest digest the reference resolved to.
    pub fn digest(&self) -> Option<&Digest> {
        self.entry.as_ref().map(|entry| &entry.manifest)
    }

    /// The selection of the manifest's files the volume holds.
    pub fn selection(&self) -> Option<&SelectionKey> {
        self.entry.as_ref().map(|entry| &entry.selection)
    }

    /// The entry the record holds, once the selection is known.
    pub fn entry(&self) -> Option<EntryKey> {
        self.entry.clone()
    }
}

/// The record as files and the API spell it.
pub mod wire {
    use super::*;

    #[derive(Clone, Debug, Serialize, Deserialize)]
    #[serde(rename_all = "kebab-case")]
    pub struct Record {
        pub volume: VolumeId,
        pub mount_id: MountId,
        pub reference: String,
        pub options: ExcludeOptions,
        /// Absent from records written before it, and for the operator's.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub requester: Option<Requester>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub access: Option<Proof>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub verified_by: Option<String>,
        pub state: VolumeState,
        pub digest: Option<Digest>,
        pub selection: Option<SelectionKey>,
        pub path: PathBuf,
        pub bytes_done: u64,
        pub bytes_total: u64,
        /// Absent from records written before it: the two flags then say.
        #[serde(default)]
        pub origin: Option<Origin>,
        pub reused_from_cache: bool,
        pub coalesced: bool,
        pub link_method: Option<LinkMethod>,
        pub link: Option<LinkReport>,
        pub skipped: Vec<Skip>,
        pub error: Option<RecordError>,
        pub pid: u32,
        #[serde(with = "time::serde::rfc3339")]
        pub created_at: time::OffsetDateTime,
        #[serde(with = "time::serde::rfc3339")]
        pub updated_at: time::OffsetDateTime,
        #[serde(with = "time::serde::rfc3339::option")]
        pub ready_at: Option<time::OffsetDateTime>,
    }

    impl From<VolumeRecord> for Record {
        fn from(record: VolumeRecord) -> Record {
            let state = record.state();
            let error = record.error().cloned();
            let (digest, selection) = match record.entry {
                Some(EntryKey { manifest, selection }) => (Some(manifest), Some(selection)),
                None => (None, None),
            };
            Record {
                volume: record.volume,
                mount_id: record.mount_id,
                reference: record.reference,
                options: record.options,
                requester: record.requester,
                access: record.access,
                verified_by: record.verified_by,
                state,
                digest,
                selection,
                path: record.path,
                bytes_done: record.bytes_done,
                bytes_total: record.bytes_total,
                origin: record.origin,
                reused_from_cache: record.origin == Some(Origin::Cached),
                coalesced: record.origin == Some(Origin::Joined),
                link_method: record.link_method,
                link: record.link,
                skipped: record.skipped,
                error,
                pid: record.pid,
                created_at: record.created_at,
                updated_at: record.updated_at,
                ready_at: record.ready_at,
            }
        }
    }

    /// Reads what any version wrote: a failed record without an error says
    /// so in one, an error beside a pulling or ready state is dropped, and a
    /// digest without a selection names no entry.
    impl From<Record> for VolumeRecord {
        fn from(record: Record) -> VolumeRecord {
            let standing = match (record.state, record.error) {
                (VolumeState::Pulling, _) => Standing::Pulling,
                (VolumeState::Ready, _) => Standing::Ready,
                (VolumeState::Failed, Some(error)) => Standing::Failed(error),
                (VolumeState::Failed, None) => Standing::Failed(RecordError {
                    kind: ErrorKind::Internal,
                    message: "the record says failed without saying why".to_owned(),
                }),
                (VolumeState::Released, error) => Standing::Released(error),
            };
            let entry = match (record.digest, record.selection) {
                (Some(manifest), Some(selection)) => Some(EntryKey { manifest, selection }),
                _ => None,
            };
            let origin = record.origin.or(if record.reused_from_cache {
                Some(Origin::Cached)
            } else if record.coalesced {
                Some(Origin::Joined)
            } else {
                None
            });
            VolumeRecord {
                volume: record.volume,
                mount_id: record.mount_id,
                reference: record.reference,
                options: record.options,
                requester: record.requester,
                access: record.access,
                verified_by: record.verified_by,
                standing,
                entry,
                path: record.path,
                bytes_done: record.bytes_done,
                bytes_total: record.bytes_total,
                origin,
                link_method: record.link_method,
                link: record.link,
                skipped: record.skipped,
                pid: record.pid,
                created_at: record.created_at,
                updated_at: record.updated_at,
                ready_at: record.ready_at,
            }
        }
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
    /// a hardlink shares the store's, and is not `stat`ed to count it (the
    /// link step costs one `linkat` per file). Absent from older records.
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

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> VolumeRecord {
        let volume = VolumeId::new("v").unwrap();
        VolumeRecord::pulling(volume, MountId::default(), "r/m:1".into(), ExcludeOptions::default(), "/t".into())
    }

    /// Only a failed or released record carries an error; a release cuts a
    /// pull short as cancelled and keeps an earlier failure.
    #[test]
    fn errors_belong_to_failed_and_released_states() {
        let mut pulling = record();
        assert_eq!((pulling.state(), pulling.error()), (VolumeState::Pulling, None));
        pulling.set_released();
        assert_eq!(pulling.error().map(|error| error.kind), Some(ErrorKind::Cancelled));
        let mut failed = record();
        failed.set_failed(RecordError { kind: ErrorKind::NotFound, message: "gone".into() });
        failed.set_released();
        assert_eq!((failed.state(), failed.error().map(|error| error.kind)), (VolumeState::Released, Some(ErrorKind::NotFound)));
        let mut ready = record();
        ready.set_failed(RecordError { kind: ErrorKind::Internal, message: "x".into() });
        ready.set_ready();
        assert_eq!((ready.state(), ready.error()), (VolumeState::Ready, None));
    }

    /// The wire form keeps the fields older readers and writers use: a
    /// record round-trips, and one without `origin` reads it from the flags.
    #[test]
    fn the_wire_form_is_compatible() {
        let mut ready = record();
        ready.entry = Some(EntryKey::new(Digest::of(b"m"), SelectionKey::full()));
        ready.origin = Some(Origin::Joined);
        ready.set_ready();
        let mut json: serde_json::Value = serde_json::to_value(&ready).unwrap();
        assert_eq!((json["coalesced"].as_bool(), json["reused-from-cache"].as_bool()), (Some(true), Some(false)));
        assert_eq!(json["selection"], "full");
        assert_eq!(serde_json::from_value::<VolumeRecord>(json.clone()).unwrap(), ready);
        json.as_object_mut().unwrap().remove("origin");
        json["coalesced"] = false.into();
        json["reused-from-cache"] = true.into();
        assert_eq!(serde_json::from_value::<VolumeRecord>(json).unwrap().origin, Some(Origin::Cached));
    }
}
