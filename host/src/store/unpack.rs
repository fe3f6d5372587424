//! Tar layers unpacked into `unpacked/`, every entry checked against the
//! model's rules and every byte, entry and name counted against limits as
//! it is written.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::SystemTime;

use crate::archive::{ArchiveError, ArchiveReader};
use crate::durable::{publish_dir, read_only_mode, sync_dir, sync_tree};
use crate::error::ErrorKind;
use crate::link::TreeBuilder;
use crate::modelpack::{Compression, Layer, LayerFormat, Node, TarAction, TarKind, TarRules, check_tree};

use super::{Store, StoreError, io_error, statvfs};

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

/// Free space is checked again after at most this many bytes written (half
/// the room above the floor when that is less), and free inodes after this
/// many entries: a bomb stops at the floor, and a large layer far from it
/// costs a `statvfs` per 16 MiB.
const DISK_CHECK_BYTES: u64 = 16 << 20;
const DISK_CHECK_ENTRIES: u64 = 1024;
/// Bytes of entry names and link targets in one layer: what the rules keep
/// in memory while it unpacks.
const MAX_NAME_BYTES: u64 = 64 << 20;

impl Store {
    /// Whether a layer's content is in the store (a raw layer's blob, or a
    /// tar layer unpacked).
    pub fn has_layer(&self, layer: &Layer) -> bool {
        match layer.format {
            LayerFormat::Raw => self.has_blob(&layer.blob.digest),
            LayerFormat::Tar(_) => self.layout.unpacked(&layer.blob.digest).is_dir(),
        }
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
}

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
        let stats = statvfs(staging)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::modelpack::{Descriptor, ModelPath};
    use crate::store::tests::{descriptor, tmp_is_empty};

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
            annotations: Default::default(),
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
}
