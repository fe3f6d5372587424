//! Read-only bind mounts and the mount table.

use std::io;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, StatxFlags};
use rustix::mount::{MountFlags, MountPropagationFlags, UnmountFlags};

/// A line of `/proc/self/mountinfo`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountEntry {
    /// The mount's id, as `statx` reports it (`STATX_MNT_ID`).
    pub id: u64,
    /// The mounted directory, within its filesystem (for a bind mount, the
    /// source tree's path).
    pub root: PathBuf,
    pub mount_point: PathBuf,
    pub read_only: bool,
}

/// `\040`-style escapes of the mount table.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'\\' && index + 4 <= bytes.len() && bytes[index + 1..index + 4].iter().all(u8::is_ascii_digit) {
            let code =
                std::str::from_utf8(&bytes[index + 1..index + 4]).ok().and_then(|digits| u8::from_str_radix(digits, 8).ok());
            if let Some(code) = code {
                out.push(code);
                index += 4;
                continue;
            }
        }
        out.push(bytes[index]);
        index += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses mountinfo text.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let options = fields.get(5)?;
            Some(MountEntry {
                id: fields.first()?.parse().ok()?,
                root: PathBuf::from(unescape(fields.get(3)?)),
                mount_point: PathBuf::from(unescape(fields.get(4)?)),
                read_only: options.split(',').any(|option| option == "ro"),
            })
        })
        .collect()
}

/// The id of the mount `path` lies on (the topmost at a mount point);
/// `Ok(None)` on kernels before 5.8, which do not report it.
fn mount_id_of(path: &Path) -> io::Result<Option<u64>> {
    let stat = rustix::fs::statx(rustix::fs::CWD, path, AtFlags::empty(), StatxFlags::MNT_ID)?;
    Ok((stat.stx_mask & StatxFlags::MNT_ID.bits() != 0).then_some(stat.stx_mnt_id))
}

/// The mount whose root `target` is, the topmost if several are stacked;
/// `None` when `target` is no mount point (or does not exist).
///
/// Told by mount ids, not by comparing paths with the mount table: the
/// table prints resolved paths, and kubelet's directory may be reached
/// through a symlink or a non-canonical path. A comparison of strings
/// misses such a mount, mounts again over it, and then never unmounts it.
/// Kernels without `STATX_MNT_ID` compare the canonical path instead.
pub fn mount_at(target: &Path) -> Option<MountEntry> {
    let entries = || parse_mountinfo(&std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default());
    let Some(id) = mount_id_of(target).ok()? else {
        let canonical = target.canonicalize().ok()?;
        return entries().into_iter().rev().find(|entry| entry.mount_point == canonical);
    };
    let parent = match mount_id_of(&target.join("..")) {
        Ok(parent) => parent,
        Err(_) => mount_id_of(target.parent()?).ok()?,
    };
    if parent == Some(id) {
        return None;
    }
    entries().into_iter().find(|entry| entry.id == id)
}

/// Whether `a` and `b` are one directory (the same device and inode): a
/// bind mount's root is the very directory it shows.
pub fn same_directory(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.is_dir() && (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}

/// Bind-mounts `source` at `target` (which must exist), read-only, nosuid,
/// nodev, staging the mount in `stage` (see [`private_stage`]).
///
/// The mount is made read-only before it reaches `target`, then moved
/// there. Binding at `target` and remounting read-only afterwards is not
/// enough: kubelet's pods directory is a shared mount, each of its peers
/// gets its own copy of a mount when the mount is made, and a later remount
/// changes only this namespace's copy. The container runtime hands the pod
/// a peer's copy, which stayed writable, and a hardlinked tree written
/// through it corrupts the cached model for every pod. A moved mount
/// reaches every peer with the flags it has.
///
/// # Errors
/// A mount syscall's failure; a half-done mount is undone.
pub fn bind_read_only(source: &Path, target: &Path, stage: &Path) -> io::Result<()> {
    let staging = tempfile::Builder::new().prefix("bind-").tempdir_in(stage)?;
    rustix::mount::mount_bind(source, staging.path())?;
    let moved = rustix::mount::mount_remount(
        staging.path(),
        MountFlags::BIND | MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV,
        "",
    )
    .and_then(|()| rustix::mount::mount_move(staging.path(), target));
    if let Err(error) = moved {
        let _ = rustix::mount::unmount(staging.path(), UnmountFlags::DETACH);
        return Err(error.into());
    }
    Ok(())
}

/// What a runtime volume shows its pod: `models/`, the volume's tree
/// directory, where each model the pod mounts appears as `<mount-id>/`;
/// and `api/`, the directory holding the volume's socket (`api.sock`).
pub const RUNTIME_MODELS: &str = "models";
pub const RUNTIME_API: &str = "api";

/// Mounts a runtime volume at `target` (which must exist): a small
/// read-only tmpfs holding read-only binds of `trees` at `models/` and of
/// `socket_dir` at `api/`, all nosuid and nodev, staged in `stage` and
/// moved whole, as [`bind_read_only`] does and for the same reason.
///
/// Models the pod mounts later appear under `models/` as the daemon links
/// them: they are entries of the bound directory, not mounts, so they reach
/// the pod's view without any mount propagation. The socket is bound as its
/// directory, so a socket the daemon makes again after a restart is the one
/// the pod reaches.
///
/// # Errors
/// A mount syscall's failure; a half-done mount is undone.
pub fn mount_runtime(trees: &Path, socket_dir: &Path, target: &Path, stage: &Path) -> io::Result<()> {
    let staging = tempfile::Builder::new().prefix("runtime-").tempdir_in(stage)?;
    let root = staging.path();
    let flags = MountFlags::NOSUID | MountFlags::NODEV;
    let built = rustix::mount::mount("tmpfs", root, "tmpfs", flags | MountFlags::NOEXEC, c"size=64k,mode=0755")
        .map_err(io::Error::from)
        .and_then(|()| {
            for (name, source) in [(RUNTIME_MODELS, trees), (RUNTIME_API, socket_dir)] {
                let at = root.join(name);
                std::fs::create_dir(&at)?;
                rustix::mount::mount_bind(source, &at)?;
                rustix::mount::mount_remount(&at, MountFlags::BIND | MountFlags::RDONLY | flags, "")?;
            }
            rustix::mount::mount_remount(root, MountFlags::RDONLY | flags | MountFlags::NOEXEC, "")?;
            rustix::mount::mount_move(root, target)?;
            Ok(())
        });
    if built.is_err() {
        let _ = rustix::mount::unmount(root, UnmountFlags::DETACH);
    }
    built
}

/// Makes `dir` a private mount of its own, for [`bind_read_only`] to stage
/// in: under a shared mount a bind would reach the peers before it is
/// read-only, and the kernel refuses to move a mount whose parent is shared.
///
/// # Errors
/// When `dir` cannot be made or mounted.
pub fn private_stage(dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let dir = dir.canonicalize()?;
    if mount_at(&dir).is_none() {
        rustix::mount::mount_bind(&dir, &dir)?;
    }
    rustix::mount::mount_change(&dir, MountPropagationFlags::PRIVATE)?;
    Ok(())
}

/// Unmounts `target`, detaching it if it is busy.
///
/// # Errors
/// The unmount's failure.
pub fn unmount(target: &Path) -> io::Result<()> {
    match rustix::mount::unmount(target, UnmountFlags::empty()) {
        Err(rustix::io::Errno::BUSY) => rustix::mount::unmount(target, UnmountFlags::DETACH).map_err(Into::into),
        other => other.map_err(Into::into),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Mountinfo lines parse, escapes included.
    #[test]
    fn parses_mountinfo() {
        let text = "36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n\
                    700 25 8:1 /var/lib/modelcache/volumes/v/m /var/lib/kubelet/pods/p/volumes/x\\040y/mount ro,nosuid,nodev,relatime shared:1 - ext4 /dev/sda1 rw\n";
        let entries = parse_mountinfo(text);
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].root, PathBuf::from("/mnt1"));
        assert_eq!((entries[0].id, entries[1].id), (36, 700));
        assert!(!entries[0].read_only);
        assert_eq!(entries[1].mount_point, PathBuf::from("/var/lib/kubelet/pods/p/volumes/x y/mount"));
        assert_eq!(entries[1].root, PathBuf::from("/var/lib/modelcache/volumes/v/m"));
        assert!(entries[1].read_only);
    }

    /// A mount point is told by its mount id, whatever path reaches it; a
    /// directory that is no mount point, or is absent, is none.
    #[test]
    fn finds_mount_points_by_id() {
        let root = mount_at(Path::new("/proc")).expect("/proc is a mount point");
        assert_eq!(root.mount_point, PathBuf::from("/proc"));
        assert_eq!(mount_at(Path::new("/proc/../proc/")).map(|entry| entry.id), Some(root.id));
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(mount_at(dir.path()), None);
        assert_eq!(mount_at(&dir.path().join("absent")), None);
        assert!(same_directory(dir.path(), &dir.path().join(".")));
        assert!(!same_directory(dir.path(), Path::new("/proc")));
    }
}
