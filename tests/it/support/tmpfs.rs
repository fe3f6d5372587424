//! The tmpfs fixture: small filesystems mounted for a test (as root), and
//! unmounted when it ends.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Mounts a tmpfs of `size` (e.g. `64m`) at `dir`; needs root.
pub fn mount_tmpfs(dir: &Path, size: &str) -> bool {
    Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(dir)
        .status()
        .is_ok_and(|status| status.success())
}

/// Lazily unmounts what is mounted at the path, and below it, when dropped.
pub struct Unmount(pub PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-R").arg("-l").arg(&self.0).status();
    }
}
