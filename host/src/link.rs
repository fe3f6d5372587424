//! Materialising files from the store: hardlinks where possible, a reflink
//! or a copy where a link cannot be made; and building trees that cannot
//! reach outside their root.
//!
//! A hardlink fails across filesystems (EXDEV), past the filesystem's link
//! limit (EMLINK) and where linking is forbidden (EPERM); then a reflink
//! (FICLONE) is tried, then a plain copy. A [`Linker`] remembers the method
//! that last worked for conditions of the whole tree (EXDEV, EPERM), so a
//! tree on another filesystem does not pay for a failed `link()` per file;
//! EMLINK is one inode's and only that file falls back. It reports the
//! weakest method it had to use.
//!
//! Every file, directory and symlink is created relative to an open
//! directory handle, and every directory on the way is opened with
//! `O_NOFOLLOW | O_DIRECTORY`: whatever symlinks a tree already holds (an
//! archive's, another layer's), no name is ever resolved through one, so
//! nothing is created outside the tree's root ([`TreeBuilder`]).

use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, CWD, FileType, Mode, OFlags};

pub use modelcache_api::record::{LinkMethod, LinkReport};

/// A file or directory that could not be materialised.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("cannot {action} `{}` to `{}`", from.display(), to.display())]
    Io {
        action: &'static str,
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A name on the way to `path` is a symlink or a file: creating `path`
    /// would follow it (perhaps out of the tree), so nothing is created.
    #[error("`{path}` would be created through `{through}`, which is not a directory")]
    ThroughNonDirectory { path: String, through: String },
    /// The name is taken already.
    #[error("`{path}` exists already")]
    Exists { path: String },
    /// A tree walk's visitor refused the name before it was made.
    #[error("`{path}` {reason}")]
    Refused { path: String, reason: String },
}

/// Links files one after another, starting each from the method that last
/// worked for the whole tree.
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

/// One side of a link: a directory handle and a name in it, with the path
/// they stand for (for messages only; never opened).
#[derive(Clone, Copy)]
struct At<'a> {
    dir: BorrowedFd<'a>,
    name: &'a OsStr,
    path: &'a Path,
}

impl Linker {
    pub fn new() -> Linker {
        Linker::default()
    }

    pub fn report(&self) -> LinkReport {
        self.report
    }

    /// Materialises the file `from` as `to` (a name in an open directory,
    /// which must not exist). Neither side's final name is followed if it
    /// is a symlink. A copy is made read-only like the store's files.
    fn link_at(&mut self, from: At<'_>, to: At<'_>) -> Result<LinkMethod, LinkError> {
        let error = |action, source| LinkError::Io { action, from: from.path.to_owned(), to: to.path.to_owned(), source };
        let mut method = self.start;
        // Set when this file's hardlink failed for a reason of its own
        // inode (EMLINK): what its fallbacks find says nothing of the next
        // file, which tries a hardlink again.
        let mut one_inode = false;
        let mut renewed = false;
        loop {
            let attempt = match method {
                LinkMethod::Hardlink => {
                    rustix::fs::linkat(from.dir, from.name, to.dir, to.name, AtFlags::empty()).map_err(io::Error::from)
                }
                LinkMethod::Reflink => reflink(from, to),
                LinkMethod::Copy => copy(from, to),
            };
            match attempt {
                Ok(()) => break,
                // The source's inode holds all the links its filesystem
                // allows (anyone can fill it: a manifest may name one blob
                // thousands of times). Give the source a fresh inode with
                // the same bytes and link that, so every later tree links
                // again instead of copying.
                Err(source)
                    if method == LinkMethod::Hardlink
                        && !renewed
                        && source.raw_os_error() == Some(rustix::io::Errno::MLINK.raw_os_error()) =>
                {
                    renewed = true;
                    if let Err(error) = renew_inode(from) {
                        tracing::debug!(from = %from.path.display(), "cannot give a full inode a fresh copy: {error}");
                        one_inode = true;
                        method = LinkMethod::Reflink;
                    }
                }
                Err(source) if method != LinkMethod::Copy && falls_back(&source) => {
                    if method == LinkMethod::Hardlink && self.start == LinkMethod::Hardlink {
                        tracing::debug!(from = %from.path.display(), to = %to.path.display(), "hardlink impossible ({source}); falling back");
                    }
                    one_inode |= source.raw_os_error() == Some(rustix::io::Errno::MLINK.raw_os_error());
                    if !one_inode {
                        self.start = if method == LinkMethod::Hardlink { LinkMethod::Reflink } else { LinkMethod::Copy };
                    }
                    method = if method == LinkMethod::Hardlink { LinkMethod::Reflink } else { LinkMethod::Copy };
                }
                Err(source) => return Err(error(method.as_str(), source)),
            }
        }
        let copied_bytes = if method == LinkMethod::Hardlink {
            0
        } else {
            rustix::fs::statat(to.dir, to.name, AtFlags::SYMLINK_NOFOLLOW).map(|stat| stat.st_size as u64).unwrap_or(0)
        };
        self.report.count(method, copied_bytes);
        Ok(method)
    }

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
    fn link_dir_below(
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

/// What a tree walk found at a name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry<'a> {
    Directory,
    File,
    Symlink(&'a OsStr),
}

/// Builds a tree under one root directory without ever following a
/// symlink: each directory on the way to a name is opened relative to its
/// parent with `O_NOFOLLOW | O_DIRECTORY`, so a symlink (or a file) where a
/// directory is expected is an error, never a way out. Paths given to it
/// are relative and free of `..` (see `modelpack::ModelPath`).
pub struct TreeBuilder {
    root: OwnedFd,
    root_path: PathBuf,
    linker: Linker,
    /// The directory the last name was made in: files come in runs.
    last: Option<(String, OwnedFd)>,
    /// Directories made for names on the way (not asked for themselves).
    made_directories: u64,
}

impl TreeBuilder {
    /// Builds below the existing directory `root`.
    ///
    /// # Errors
    /// When `root` cannot be opened as a directory.
    pub fn new(root: &Path) -> Result<TreeBuilder, LinkError> {
        let root_fd = open_dir(CWD, root).map_err(|source| LinkError::Io {
            action: "open directory",
            from: root.to_owned(),
            to: root.to_owned(),
            source,
        })?;
        Ok(TreeBuilder { root: root_fd, root_path: root.to_owned(), linker: Linker::new(), last: None, made_directories: 0 })
    }

    pub fn report(&self) -> LinkReport {
        self.linker.report()
    }

    /// Directories made so far, asked for or on the way to a name: each
    /// costs an inode, as an entry does.
    pub fn made_directories(&self) -> u64 {
        self.made_directories
    }

    /// The open directory `dir` (relative, `/`-separated; "" is the root),
    /// made with every missing parent, none followed through a symlink.
    fn directory_fd(&mut self, dir: &str) -> Result<BorrowedFd<'_>, LinkError> {
        if dir.is_empty() {
            return Ok(self.root.as_fd());
        }
        if self.last.as_ref().is_none_or(|(path, _)| path != dir) {
            let mut current: Option<OwnedFd> = None;
            let mut walked = String::new();
            for name in dir.split('/') {
                if !walked.is_empty() {
                    walked.push('/');
                }
                walked.push_str(name);
                let parent = current.as_ref().map_or(self.root.as_fd(), |fd| fd.as_fd());
                let made = &mut self.made_directories;
                let opened = make_dir(parent, OsStr::new(name), made).map_err(|source| match source.raw_os_error() {
                    Some(code) if is_not_a_directory(code) => {
                        LinkError::ThroughNonDirectory { path: dir.to_owned(), through: walked.clone() }
                    }
                    _ => LinkError::Io {
                        action: "create directory",
                        from: PathBuf::new(),
                        to: self.root_path.join(&walked),
                        source,
                    },
                })?;
                current = Some(opened);
            }
            self.last = Some((dir.to_owned(), current.expect("a directory has a name")));
        }
        Ok(self.last.as_ref().expect("just opened").1.as_fd())
    }

    /// Makes the directory `path` and its parents.
    ///
    /// # Errors
    /// A symlink or file on the way ([`LinkError::ThroughNonDirectory`]), or I/O.
    pub fn directory(&mut self, path: &str) -> Result<(), LinkError> {
        self.directory_fd(path).map(drop)
    }

    /// Materialises the file `from` (a store path) as `path`.
    ///
    /// # Errors
    /// A symlink or file on the way, a name taken, or I/O.
    pub fn link_file(&mut self, from: &Path, path: &str) -> Result<LinkMethod, LinkError> {
        let (dir, name) = split(path);
        let to_path = self.root_path.join(path);
        let from_dir = from.parent().unwrap_or(Path::new("/"));
        let from_name = from.file_name().unwrap_or_default();
        let source = open_dir(CWD, from_dir).map_err(|source| LinkError::Io {
            action: "open directory",
            from: from.to_owned(),
            to: to_path.clone(),
            source,
        })?;
        let mut linker = std::mem::take(&mut self.linker);
        let linked = self.directory_fd(dir).and_then(|target| {
            linker.link_at(
                At { dir: source.as_fd(), name: from_name, path: from },
                At { dir: target, name: OsStr::new(name), path: &to_path },
            )
        });
        self.linker = linker;
        match linked {
            Err(LinkError::Io { source, .. }) if source.kind() == io::ErrorKind::AlreadyExists => {
                Err(LinkError::Exists { path: path.to_owned() })
            }
            other => other,
        }
    }

    /// Creates the new file `path` for writing, with mode 0600 until its
    /// writer sets the final one.
    ///
    /// # Errors
    /// A symlink or file on the way, a name taken, or I/O.
    pub fn create_file(&mut self, path: &str) -> Result<fs::File, LinkError> {
        let (dir, name) = split(path);
        let to = self.root_path.join(path);
        let parent = self.directory_fd(dir)?;
        let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        match rustix::fs::openat(parent, name, flags, Mode::from_raw_mode(0o600)) {
            Ok(fd) => Ok(fs::File::from(fd)),
            Err(rustix::io::Errno::EXIST) => Err(LinkError::Exists { path: path.to_owned() }),
            Err(errno) => Err(LinkError::Io { action: "create", from: PathBuf::new(), to, source: errno.into() }),
        }
    }

    /// Creates the symlink `path` pointing at `target` (as written).
    ///
    /// # Errors
    /// A symlink or file on the way, a name taken, or I/O.
    pub fn symlink(&mut self, path: &str, target: &str) -> Result<(), LinkError> {
        let (dir, name) = split(path);
        let to = self.root_path.join(path);
        let parent = self.directory_fd(dir)?;
        match rustix::fs::symlinkat(target, parent, name) {
            Ok(()) => Ok(()),
            Err(rustix::io::Errno::EXIST) => Err(LinkError::Exists { path: path.to_owned() }),
            Err(errno) => Err(LinkError::Io { action: "create symlink", from: PathBuf::new(), to, source: errno.into() }),
        }
    }

    /// Recreates the tree under `from` at this tree's root, merging into
    /// directories that exist; `visit` is told each name first (relative,
    /// `/`-separated) and may refuse it.
    ///
    /// # Errors
    /// What `visit` refused, a name taken, or I/O.
    pub fn link_tree(
        &mut self,
        from: &Path,
        visit: &mut dyn FnMut(&Path, Entry<'_>) -> Result<(), LinkError>,
    ) -> Result<(), LinkError> {
        let source = open_dir(CWD, from).map_err(|source| LinkError::Io {
            action: "open directory",
            from: from.to_owned(),
            to: self.root_path.clone(),
            source,
        })?;
        let target = rustix::io::fcntl_dupfd_cloexec(&self.root, 0).map_err(|errno| LinkError::Io {
            action: "open directory",
            from: from.to_owned(),
            to: self.root_path.clone(),
            source: errno.into(),
        })?;
        self.last = None;
        let root_path = self.root_path.clone();
        self.linker.link_dir_below(&source, from, &target, &root_path, Path::new(""), visit)
    }
}

/// `a/b/c` → (`a/b`, `c`); `c` → (``, `c`).
fn split(path: &str) -> (&str, &str) {
    path.rsplit_once('/').unwrap_or(("", path))
}

fn open_dir(parent: impl AsFd, name: impl rustix::path::Arg) -> io::Result<OwnedFd> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    Ok(rustix::fs::openat(parent, name, flags, Mode::empty())?)
}

/// Opens the directory `name` in `parent`, making it first if missing
/// (counted in `made`); never through a symlink.
fn make_dir(parent: BorrowedFd<'_>, name: &OsStr, made: &mut u64) -> io::Result<OwnedFd> {
    match rustix::fs::mkdirat(parent, name, Mode::from_raw_mode(0o755)) {
        Ok(()) => *made += 1,
        Err(rustix::io::Errno::EXIST) => {}
        Err(errno) => return Err(errno.into()),
    }
    open_dir(parent, name)
}

/// What opening a symlink or a file with `O_NOFOLLOW | O_DIRECTORY` says.
fn is_not_a_directory(code: i32) -> bool {
    code == rustix::io::Errno::LOOP.raw_os_error() || code == rustix::io::Errno::NOTDIR.raw_os_error()
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
fn renew_inode(at: At<'_>) -> io::Result<()> {
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
fn reflink(from: At<'_>, to: At<'_>) -> io::Result<()> {
    let (source, target) = open_pair(from, to)?;
    let cloned =
        rustix::fs::ioctl_ficlone(&target, &source).map_err(io::Error::from).and_then(|()| finish_copy(&source, &target));
    if cloned.is_err() {
        drop(target);
        remove_at(to);
    }
    cloned
}

fn copy(from: At<'_>, to: At<'_>) -> io::Result<()> {
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

    /// A name that already exists is an error naming it.
    #[test]
    fn refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("a"), b"1").unwrap();
        let tree = dir.path().join("tree");
        fs::create_dir(&tree).unwrap();
        let mut builder = TreeBuilder::new(&tree).unwrap();
        builder.link_file(&dir.path().join("a"), "x/b").unwrap();
        let error = builder.link_file(&dir.path().join("a"), "x/b").unwrap_err();
        assert!(matches!(&error, LinkError::Exists { path } if path == "x/b"), "{error}");
    }

    /// Nothing is created through a symlink or a file, wherever it points:
    /// the walk refuses the name and the outside stays untouched.
    #[test]
    fn trees_are_never_built_through_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        fs::create_dir(&outside).unwrap();
        let blob = dir.path().join("blob");
        fs::write(&blob, b"weights").unwrap();
        let tree = dir.path().join("tree");
        fs::create_dir_all(tree.join("real")).unwrap();
        std::os::unix::fs::symlink(&outside, tree.join("out")).unwrap();
        std::os::unix::fs::symlink("real", tree.join("inside")).unwrap();
        fs::write(tree.join("file"), b"").unwrap();
        let mut builder = TreeBuilder::new(&tree).unwrap();
        for path in ["out/planted", "out/deeper/planted", "inside/planted", "file/planted", "real/../out/planted"] {
            let error = builder.link_file(&blob, path).unwrap_err();
            assert!(matches!(error, LinkError::ThroughNonDirectory { .. } | LinkError::Io { .. }), "{path}: {error}");
            assert!(builder.directory(path).is_err(), "{path}");
            assert!(builder.create_file(path).is_err(), "{path}");
            assert!(builder.symlink(path, "x").is_err(), "{path}");
        }
        assert!(fs::read_dir(&outside).unwrap().next().is_none(), "something was created outside the tree");
        assert!(fs::read_dir(tree.join("real")).unwrap().next().is_none());
        // The symlink itself is not replaced either.
        assert!(matches!(builder.symlink("out", "elsewhere").unwrap_err(), LinkError::Exists { .. }));
        builder.link_file(&blob, "real/deeper/file").unwrap();
        assert_eq!(fs::read(tree.join("real/deeper/file")).unwrap(), b"weights");
    }

    /// Linking a tree into one that holds a symlink where the source has a
    /// directory fails instead of following it.
    #[test]
    fn merged_trees_do_not_follow_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        fs::create_dir(&outside).unwrap();
        let from = dir.path().join("from");
        fs::create_dir_all(from.join("pkg")).unwrap();
        fs::write(from.join("pkg/planted"), b"x").unwrap();
        let tree = dir.path().join("tree");
        fs::create_dir(&tree).unwrap();
        std::os::unix::fs::symlink(&outside, tree.join("pkg")).unwrap();
        let mut builder = TreeBuilder::new(&tree).unwrap();
        let error = builder.link_tree(&from, &mut |_, _| Ok(())).unwrap_err();
        assert!(matches!(error, LinkError::ThroughNonDirectory { .. }), "{error}");
        assert!(fs::read_dir(&outside).unwrap().next().is_none());
    }

    /// A source inode at its hard-link limit gets a fresh inode (a copy of
    /// itself renamed over it) and is linked; the files after it are still
    /// hardlinked, and nothing is copied into the tree.
    #[test]
    fn a_full_inode_is_renewed() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let from = dir.path().join("from");
        fs::create_dir(&from).unwrap();
        for name in ["a", "b", "c"] {
            fs::write(from.join(name), name).unwrap();
        }
        // Fill "b"'s link count until the filesystem refuses (ext4: 65,000).
        let hoard = dir.path().join("hoard");
        fs::create_dir(&hoard).unwrap();
        let mut full = false;
        for index in 0..70_000 {
            match fs::hard_link(from.join("b"), hoard.join(index.to_string())) {
                Ok(()) => {}
                Err(error) if error.raw_os_error() == Some(rustix::io::Errno::MLINK.raw_os_error()) => {
                    full = true;
                    break;
                }
                Err(error) => panic!("{error}"),
            }
        }
        if !full {
            eprintln!("skipped: this filesystem has no hard-link limit below 70,000");
            return;
        }
        let before = fs::metadata(from.join("b")).unwrap().ino();
        let mut linker = Linker::new();
        linker.link_tree(&from, &dir.path().join("to")).unwrap();
        let report = linker.report();
        assert_eq!((report.files, report.hardlinks, report.copies + report.reflinks), (3, 3, 0), "{report:?}");
        // `b` has a fresh inode, shared with its new link; the old one
        // keeps its links and bytes.
        let renewed = fs::metadata(from.join("b")).unwrap();
        assert_ne!(renewed.ino(), before);
        assert_eq!(renewed.ino(), fs::metadata(dir.path().join("to/b")).unwrap().ino());
        assert_eq!(fs::read(dir.path().join("to/b")).unwrap(), b"b");
        assert_eq!(fs::metadata(hoard.join("0")).unwrap().ino(), before);
        assert_eq!(fs::read_dir(&from).unwrap().count(), 3, "no temporary left beside the source");
    }

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

    /// A record written before `copied-bytes` existed still reads.
    #[test]
    fn older_reports_read() {
        let report: LinkReport =
            serde_json::from_str(r#"{"files": 2, "bytes": 9, "hardlinks": 2, "reflinks": 0, "copies": 0}"#).unwrap();
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
