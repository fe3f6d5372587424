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
//!
//! | module | concern |
//! |---|---|
//! | `walk` | [`Linker::link_tree`]: a directory tree recreated through open directory handles ([`Entry`]) |
//! | `tree` | [`TreeBuilder`]: names made one by one below a root, never through a symlink |
//! | `copy` | the fallbacks: a reflink, a copy, a full inode renewed |
//!
//! This file holds the [`Linker`]'s fallback chain and the [`LinkError`].

mod copy;
mod tree;
mod walk;

use std::ffi::OsStr;
use std::io;
use std::os::fd::BorrowedFd;
use std::path::{Path, PathBuf};

use rustix::fs::AtFlags;

use self::copy::{copy, reflink, renew_inode};
pub use self::tree::TreeBuilder;
pub use self::walk::Entry;
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

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

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
