//! Read-only bind mounts and the mount table.

use std::io;
use std::path::{Path, PathBuf};

use rustix::mount::{MountFlags, MountPropagationFlags, UnmountFlags};

/// A line of `/proc/self/mountinfo`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountEntry {
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
                root: PathBuf::from(unescape(fields.get(3)?)),
                mount_point: PathBuf::from(unescape(fields.get(4)?)),
                read_only: options.split(',').any(|option| option == "ro"),
            })
        })
        .collect()
}

/// The mount at `target`, the topmost if several are stacked.
pub fn mount_at(target: &Path) -> Option<MountEntry> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    parse_mountinfo(&text).into_iter().rev().find(|entry| entry.mount_point == target)
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
        assert!(!entries[0].read_only);
        assert_eq!(entries[1].mount_point, PathBuf::from("/var/lib/kubelet/pods/p/volumes/x y/mount"));
        assert_eq!(entries[1].root, PathBuf::from("/var/lib/modelcache/volumes/v/m"));
        assert!(entries[1].read_only);
    }
}
