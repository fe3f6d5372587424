//! The fallbacks when a hardlink cannot be made: a copy-on-write clone,
//! a plain copy, and a full inode renewed so it can be linked again. Each
//! gives its result the source's mode and mtime, and leaves nothing behind
//! when it fails.

use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;

use rustix::fs::{AtFlags, Mode, OFlags};

use super::At;

/// Opens both sides of a clone or copy: the source for reading, the target
/// new, neither through a symlink.
fn open_pair(from: At<'_>, to: At<'_>) -> io::Result<(fs::File, fs::File)> {
    let source = rustix::fs::openat(from.dir, from.name, OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty())?;
    let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let target = rustix::fs::openat(to.dir, to.name, flags, Mode::from_raw_mode(0o600))?;
    Ok((fs::File::from(source), fs::File::from(target)))
}

/// Replaces the file `at` by a copy of itself (same bytes, mode and mtime,
/// flushed, renamed over it): a new inode, with one link.
pub(super) fn renew_inode(at: At<'_>) -> io::Result<()> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let temporary = format!(".renew-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
    let temporary = OsStr::new(&temporary);
    let copy_at = At { dir: at.dir, name: temporary, path: at.path };
    copy(at, copy_at)?;
    let renamed = rustix::fs::openat(at.dir, temporary, OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty())
        .and_then(|fd| rustix::fs::fsync(&fd))
        .and_then(|()| rustix::fs::renameat(at.dir, temporary, at.dir, at.name));
    if let Err(errno) = renamed {
        remove_at(copy_at);
        return Err(errno.into());
    }
    Ok(())
}

fn remove_at(to: At<'_>) {
    let _ = rustix::fs::unlinkat(to.dir, to.name, AtFlags::empty());
}

/// A copy-on-write clone (btrfs, XFS with reflink, bcachefs …).
pub(super) fn reflink(from: At<'_>, to: At<'_>) -> io::Result<()> {
    let (source, target) = open_pair(from, to)?;
    let cloned =
        rustix::fs::ioctl_ficlone(&target, &source).map_err(io::Error::from).and_then(|()| finish_copy(&source, &target));
    if cloned.is_err() {
        drop(target);
        remove_at(to);
    }
    cloned
}

pub(super) fn copy(from: At<'_>, to: At<'_>) -> io::Result<()> {
    let (mut source, mut target) = open_pair(from, to)?;
    let copied = io::copy(&mut source, &mut target).and_then(|_| finish_copy(&source, &target));
    if copied.is_err() {
        drop(target);
        remove_at(to);
    }
    copied
}

/// Gives a clone or copy the source's mode and mtime, so it reads like a link.
fn finish_copy(source: &fs::File, target: &fs::File) -> io::Result<()> {
    let metadata = source.metadata()?;
    target.set_modified(metadata.modified()?)?;
    target.set_permissions(fs::Permissions::from_mode(metadata.permissions().mode() & 0o7777))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use rustix::fs::CWD;

    use super::super::walk::open_dir;
    use super::*;

    /// The copy fallback keeps mode and mtime.
    #[test]
    fn copies_keep_mode_and_mtime() {
        let dir = tempfile::tempdir().unwrap();
        let from = dir.path().join("from");
        fs::write(&from, b"data").unwrap();
        fs::set_permissions(&from, fs::Permissions::from_mode(0o444)).unwrap();
        let to = dir.path().join("to");
        let parent = open_dir(CWD, dir.path()).unwrap();
        copy(
            At { dir: parent.as_fd(), name: OsStr::new("from"), path: &from },
            At { dir: parent.as_fd(), name: OsStr::new("to"), path: &to },
        )
        .unwrap();
        let (a, b) = (fs::metadata(&from).unwrap(), fs::metadata(&to).unwrap());
        assert_eq!(b.permissions().mode() & 0o777, 0o444);
        assert_eq!(a.modified().unwrap(), b.modified().unwrap());
        assert_eq!(fs::read(&to).unwrap(), b"data");
    }
}
