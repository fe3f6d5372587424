//! Materialising files from the store: hardlinks where possible, a reflink
//! or a copy where a link cannot be made.
//!
//! A hardlink fails across filesystems (EXDEV), past the filesystem's link
//! limit (EMLINK) and where linking is forbidden (EPERM); then a reflink
//! (FICLONE) is tried, then a plain copy. A [`Linker`] remembers the method
//! that last worked, so a tree on another filesystem does not pay for a
//! failed `link()` per file, and reports the weakest method it had to use.

use std::fs;
use std::io;
use std::ffi::OsStr;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

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

/// A file or directory that could not be materialised.
#[derive(Debug, thiserror::Error)]
#[error("cannot {action} `{}` to `{}`", from.display(), to.display())]
pub struct LinkError {
    pub action: &'static str,
    pub from: PathBuf,
    pub to: PathBuf,
    #[source]
    pub source: io::Error,
}

/// What a tree copy did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct LinkReport {
    pub files: u64,
    /// Bytes of the files that got data of their own (reflinks and copies);
    /// a hardlink shares the store's. Hardlinked files are not even
    /// `stat`ed: for a 1,000-file model that was a tenth of the link step.
    /// Records written before it have none (and a `bytes` field, ignored).
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
    fn count(&mut self, method: LinkMethod, copied_bytes: u64) {
        self.files += 1;
        self.copied_bytes += copied_bytes;
        match method {
            LinkMethod::Hardlink => self.hardlinks += 1,
            LinkMethod::Reflink => self.reflinks += 1,
            LinkMethod::Copy => self.copies += 1,
        }
    }
}

/// Links files one after another, starting each from the method that last
/// worked.
#[derive(Debug)]
pub struct Linker {
    start: LinkMethod,
    report: LinkReport,
}

impl Default for Linker {
    fn default() -> Self {
        Linker { start: LinkMethod::Hardlink, report: LinkReport::default() }
    }
}

impl Linker {
    pub fn new() -> Linker {
        Linker::default()
    }

    pub fn report(&self) -> LinkReport {
        self.report
    }

    /// Materialises the file `from` at `to` (which must not exist).
    /// A copy is made read-only like the store's files.
    ///
    /// # Errors
    /// The last method's failure, naming both paths.
    pub fn link_file(&mut self, from: &Path, to: &Path) -> Result<LinkMethod, LinkError> {
        let error = |action, source| LinkError { action, from: from.to_owned(), to: to.to_owned(), source };
        let mut method = self.start;
        loop {
            let attempt = match method {
                LinkMethod::Hardlink => fs::hard_link(from, to),
                LinkMethod::Reflink => reflink(from, to),
                LinkMethod::Copy => copy(from, to),
            };
            match attempt {
                Ok(()) => break,
                Err(source) if method != LinkMethod::Copy && falls_back(&source) => {
                    let next = if method == LinkMethod::Hardlink { LinkMethod::Reflink } else { LinkMethod::Copy };
                    if method == LinkMethod::Hardlink && self.start == LinkMethod::Hardlink {
                        tracing::debug!(from = %from.display(), to = %to.display(), "hardlink impossible ({source}); falling back");
                    }
                    method = next;
                }
                Err(source) => return Err(error(method.as_str(), source)),
            }
        }
        // EMLINK is about one inode: keep trying hardlinks for the next file.
        // EXDEV and EPERM hold for the whole tree: start from what worked.
        let mut copied_bytes = 0;
        if method != LinkMethod::Hardlink {
            self.start = method;
            copied_bytes = fs::symlink_metadata(to).map(|metadata| metadata.len()).unwrap_or(0);
        }
        self.report.count(method, copied_bytes);
        Ok(method)
    }

    /// Recreates the tree under `from` below `to`: directories made, files
    /// linked, symlinks recreated as they are. Directories that exist are
    /// merged into; files must not exist.
    ///
    /// Works through directory descriptors (`linkat`, `statat` relative to
    /// the open directories), as `cp -al` does: a warm mount links every file
    /// of a model, and resolving each long store path afresh cost more than
    /// the link itself.
    ///
    /// # Errors
    /// The first file or directory that could not be made.
    pub fn link_tree(&mut self, from: &Path, to: &Path) -> Result<(), LinkError> {
        let error = |action, source| LinkError { action, from: from.to_owned(), to: to.to_owned(), source };
        create_dir(to).map_err(|source| error("create directory", source))?;
        let source = open_dir(from).map_err(|source| error("open directory", source))?;
        let target = open_dir(to).map_err(|source| error("open directory", source))?;
        self.link_dir(&source, from, &target, to)
    }

    fn link_dir(&mut self, source: &OwnedFd, from: &Path, target: &OwnedFd, to: &Path) -> Result<(), LinkError> {
        use rustix::fs::{AtFlags, FileType};
        let paths = |name: &OsStr| (from.join(name), to.join(name));
        let error = |action, name: &OsStr, source: io::Error| {
            let (from, to) = paths(name);
            LinkError { action, from, to, source }
        };
        let entries = rustix::fs::Dir::read_from(source).map_err(|errno| error("read directory", OsStr::new(""), errno.into()))?;
        for entry in entries {
            let entry = entry.map_err(|errno| error("read directory", OsStr::new(""), errno.into()))?;
            let name = entry.file_name();
            if name == c"." || name == c".." {
                continue;
            }
            let name_os = OsStr::from_bytes(name.to_bytes());
            let file_type = match entry.file_type() {
                // Some filesystems leave the type out of directory entries.
                FileType::Unknown => rustix::fs::statat(source, name, AtFlags::SYMLINK_NOFOLLOW)
                    .map(|stat| FileType::from_raw_mode(stat.st_mode))
                    .map_err(|errno| error("inspect", name_os, errno.into()))?,
                known => known,
            };
            match file_type {
                FileType::Directory => {
                    let (source_path, target_path) = paths(name_os);
                    self.link_tree(&source_path, &target_path)?;
                }
                FileType::Symlink => {
                    let destination = rustix::fs::readlinkat(source, name, Vec::new())
                        .map_err(|errno| error("read symlink", name_os, errno.into()))?;
                    rustix::fs::symlinkat(destination.as_c_str(), target, name)
                        .map_err(|errno| error("create symlink", name_os, errno.into()))?;
                }
                _ if self.start == LinkMethod::Hardlink => {
                    match rustix::fs::linkat(source, name, target, name, AtFlags::empty()) {
                        Ok(()) => {
                            self.report.count(LinkMethod::Hardlink, 0);
                        }
                        // The path-based walk of the fallbacks decides what is next.
                        Err(errno) if falls_back(&errno.into()) => {
                            let (source_path, target_path) = paths(name_os);
                            self.link_file(&source_path, &target_path)?;
                        }
                        Err(errno) => return Err(error("hardlink", name_os, errno.into())),
                    }
                }
                _ => {
                    let (source_path, target_path) = paths(name_os);
                    self.link_file(&source_path, &target_path)?;
                }
            }
        }
        Ok(())
    }
}

fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    use rustix::fs::{Mode, OFlags};
    Ok(rustix::fs::open(path, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())?)
}

fn create_dir(path: &Path) -> io::Result<()> {
    match fs::create_dir(path) {
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists && path.is_dir() => Ok(()),
        other => other,
    }
}

fn falls_back(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(code) if code == rustix::io::Errno::XDEV.raw_os_error()
            || code == rustix::io::Errno::MLINK.raw_os_error()
            || code == rustix::io::Errno::PERM.raw_os_error()
            || code == rustix::io::Errno::OPNOTSUPP.raw_os_error()
            || code == rustix::io::Errno::NOSYS.raw_os_error()
            || code == rustix::io::Errno::INVAL.raw_os_error()
    )
}

/// A copy-on-write clone (btrfs, XFS with reflink, bcachefs …).
fn reflink(from: &Path, to: &Path) -> io::Result<()> {
    let source = fs::File::open(from)?;
    let target = fs::OpenOptions::new().write(true).create_new(true).open(to)?;
    let cloned = rustix::fs::ioctl_ficlone(&target, &source).map_err(io::Error::from);
    if let Err(error) = cloned {
        drop(target);
        let _ = fs::remove_file(to);
        return Err(error);
    }
    finish_copy(&source, &target)
}

fn copy(from: &Path, to: &Path) -> io::Result<()> {
    let mut source = fs::File::open(from)?;
    let mut target = fs::OpenOptions::new().write(true).create_new(true).open(to)?;
    let copied = io::copy(&mut source, &mut target).and_then(|_| finish_copy(&source, &target));
    if copied.is_err() {
        let _ = fs::remove_file(to);
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

    /// A file that already exists is an error naming both paths.
    #[test]
    fn refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a"), b"1").unwrap();
        fs::write(dir.path().join("b"), b"2").unwrap();
        let error = Linker::new().link_file(&dir.path().join("a"), &dir.path().join("b")).unwrap_err();
        assert!(error.to_string().contains("/a` to `") && error.to_string().ends_with("/b`"), "{error}");
    }

    /// The copy fallback keeps mode and mtime.
    #[test]
    fn copies_keep_mode_and_mtime() {
        let dir = tempfile::tempdir().unwrap();
        let from = dir.path().join("from");
        fs::write(&from, b"data").unwrap();
        fs::set_permissions(&from, fs::Permissions::from_mode(0o444)).unwrap();
        let to = dir.path().join("to");
        copy(&from, &to).unwrap();
        let (a, b) = (fs::metadata(&from).unwrap(), fs::metadata(&to).unwrap());
        assert_eq!(b.permissions().mode() & 0o777, 0o444);
        assert_eq!(a.modified().unwrap(), b.modified().unwrap());
        assert_eq!(fs::read(&to).unwrap(), b"data");
    }

    /// A record written before `copied-bytes` existed still reads.
    #[test]
    fn older_reports_read() {
        let report: LinkReport = serde_json::from_str(r#"{"files": 2, "bytes": 9, "hardlinks": 2, "reflinks": 0, "copies": 0}"#).unwrap();
        assert_eq!((report.files, report.hardlinks, report.copied_bytes), (2, 2, 0));
    }

    /// Reports name the weakest method used.
    #[test]
    fn report_method_is_the_weakest() {
        let mut report = LinkReport::default();
        assert_eq!(report.method(), None);
        report.count(LinkMethod::Hardlink, 0);
        report.count(LinkMethod::Copy, 4);
        report.count(LinkMethod::Reflink, 4);
        assert_eq!(report.method(), Some(LinkMethod::Copy));
        assert_eq!((report.files, report.copied_bytes), (3, 8));
    }
}
