//! [`TreeBuilder`]: a tree built name by name below one root directory,
//! never through a symlink.

use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::fs::{CWD, Mode, OFlags};

use super::walk::{Entry, is_not_a_directory, make_dir, open_dir};
use super::{At, LinkError, LinkMethod, LinkReport, Linker};

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
