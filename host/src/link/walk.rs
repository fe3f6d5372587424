//! [`Linker::link_tree`]: a directory tree recreated through open
//! directory handles, every name made relative to its parent's handle.

use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::fs::{AtFlags, CWD, FileType, Mode, OFlags};

use super::{At, LinkError, Linker};

/// What a tree walk found at a name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry<'a> {
    Directory,
    File,
    Symlink(&'a OsStr),
}

impl Linker {
    /// Recreates the tree under `from` at `to`, which must not exist or be
    /// an empty directory: directories made, files linked, symlinks
    /// recreated as they are (never followed).
    ///
    /// Works through directory descriptors (`linkat` relative to the open
    /// directories), as `cp -al` does: a warm mount links every file of a
    /// model, and resolving each long store path afresh cost more than the
    /// link itself.
    ///
    /// # Errors
    /// The first file or directory that could not be made.
    pub fn link_tree(&mut self, from: &Path, to: &Path) -> Result<(), LinkError> {
        let error = |action, source| LinkError::Io { action, from: from.to_owned(), to: to.to_owned(), source };
        match fs::create_dir(to) {
            Err(source) if source.kind() != io::ErrorKind::AlreadyExists => return Err(error("create directory", source)),
            _ => {}
        }
        let source = open_dir(CWD, from).map_err(|source| error("open directory", source))?;
        let target = open_dir(CWD, to).map_err(|source| error("open directory", source))?;
        self.link_dir_below(&source, from, &target, to, Path::new(""), &mut |_, _| Ok(()))
    }

    /// Links every entry of the open directory `source` (the directory
    /// `relative` below `from`) into `target`, telling `visit` each name made
    /// (relative to `from`) and what it is, before it is made.
    pub(super) fn link_dir_below(
        &mut self,
        source: &OwnedFd,
        from: &Path,
        target: &OwnedFd,
        to: &Path,
        relative: &Path,
        visit: &mut dyn FnMut(&Path, Entry<'_>) -> Result<(), LinkError>,
    ) -> Result<(), LinkError> {
        let error = |action, name: &OsStr, source: io::Error| LinkError::Io {
            action,
            from: from.join(relative).join(name),
            to: to.join(relative).join(name),
            source,
        };
        let entries =
            rustix::fs::Dir::read_from(source).map_err(|errno| error("read directory", OsStr::new(""), errno.into()))?;
        for entry in entries {
            let entry = entry.map_err(|errno| error("read directory", OsStr::new(""), errno.into()))?;
            let name = entry.file_name();
            if name == c"." || name == c".." {
                continue;
            }
            let name = OsStr::from_bytes(name.to_bytes());
            let here = relative.join(name);
            let file_type = match entry.file_type() {
                // Some filesystems leave the type out of directory entries.
                FileType::Unknown => rustix::fs::statat(source, name, AtFlags::SYMLINK_NOFOLLOW)
                    .map(|stat| FileType::from_raw_mode(stat.st_mode))
                    .map_err(|errno| error("inspect", name, errno.into()))?,
                known => known,
            };
            match file_type {
                FileType::Directory => {
                    visit(&here, Entry::Directory)?;
                    let inner_source = open_dir(source.as_fd(), name).map_err(|errno| error("open directory", name, errno))?;
                    let inner_target = make_dir(target.as_fd(), name, &mut 0).map_err(|errno| match errno.raw_os_error() {
                        Some(code) if is_not_a_directory(code) => LinkError::ThroughNonDirectory {
                            path: here.display().to_string(),
                            through: here.display().to_string(),
                        },
                        _ => error("create directory", name, errno),
                    })?;
                    self.link_dir_below(&inner_source, from, &inner_target, to, &here, visit)?;
                }
                FileType::Symlink => {
                    let destination = rustix::fs::readlinkat(source, name, Vec::new())
                        .map_err(|errno| error("read symlink", name, errno.into()))?;
                    visit(&here, Entry::Symlink(OsStr::from_bytes(destination.as_bytes())))?;
                    rustix::fs::symlinkat(destination.as_c_str(), target, name).map_err(|errno| {
                        if errno == rustix::io::Errno::EXIST {
                            LinkError::Exists { path: here.display().to_string() }
                        } else {
                            error("create symlink", name, errno.into())
                        }
                    })?;
                }
                FileType::RegularFile => {
                    visit(&here, Entry::File)?;
                    let (from_path, to_path) = (from.join(&here), to.join(&here));
                    let linked = self.link_at(
                        At { dir: source.as_fd(), name, path: &from_path },
                        At { dir: target.as_fd(), name, path: &to_path },
                    );
                    match linked {
                        Err(LinkError::Io { source, .. }) if source.kind() == io::ErrorKind::AlreadyExists => {
                            return Err(LinkError::Exists { path: here.display().to_string() });
                        }
                        other => other?,
                    };
                }
                // The store holds only files, directories and symlinks.
                _ => return Err(error("link", name, io::Error::from(io::ErrorKind::Unsupported))),
            }
        }
        Ok(())
    }
}

pub(super) fn open_dir(parent: impl AsFd, name: impl rustix::path::Arg) -> io::Result<OwnedFd> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    Ok(rustix::fs::openat(parent, name, flags, Mode::empty())?)
}

/// Opens the directory `name` in `parent`, making it first if missing
/// (counted in `made`); never through a symlink.
pub(super) fn make_dir(parent: BorrowedFd<'_>, name: &OsStr, made: &mut u64) -> io::Result<OwnedFd> {
    match rustix::fs::mkdirat(parent, name, Mode::from_raw_mode(0o755)) {
        Ok(()) => *made += 1,
        Err(rustix::io::Errno::EXIST) => {}
        Err(errno) => return Err(errno.into()),
    }
    open_dir(parent, name)
}

/// What opening a symlink or a file with `O_NOFOLLOW | O_DIRECTORY` says.
pub(super) fn is_not_a_directory(code: i32) -> bool {
    code == rustix::io::Errno::LOOP.raw_os_error() || code == rustix::io::Errno::NOTDIR.raw_os_error()
}

#[cfg(test)]
mod tests {
    use super::super::LinkMethod;
    use super::*;

    /// On one filesystem files are hardlinked and share the inode; symlinks
    /// and directories are recreated.
    #[test]
    fn links_a_tree() {
        let dir = tempfile::tempdir().unwrap();
        let from = dir.path().join("from");
        fs::create_dir_all(from.join("sub/deeper")).unwrap();
        fs::write(from.join("a.txt"), b"alpha").unwrap();
        fs::write(from.join("sub/deeper/b.bin"), b"beta").unwrap();
        std::os::unix::fs::symlink("sub/deeper/b.bin", from.join("link")).unwrap();

        let mut linker = Linker::new();
        let to = dir.path().join("to");
        linker.link_tree(&from, &to).unwrap();
        let report = linker.report();
        assert_eq!((report.files, report.hardlinks, report.copied_bytes), (2, 2, 0));
        assert_eq!(report.method(), Some(LinkMethod::Hardlink));
        use std::os::unix::fs::MetadataExt;
        assert_eq!(fs::metadata(from.join("a.txt")).unwrap().ino(), fs::metadata(to.join("a.txt")).unwrap().ino());
        assert_eq!(fs::read_link(to.join("link")).unwrap(), Path::new("sub/deeper/b.bin"));
        assert_eq!(fs::read(to.join("link")).unwrap(), b"beta");
    }
}
