//! Attacks on the real `modelcache` binary with artifacts built by hand and
//! pushed to a real registry: trees that try to reach outside the root, and
//! layers that try to exhaust the node (docs/security.md has the threat
//! model these tests prove).

use crate::support;

use std::path::{Path, PathBuf};
use std::process::Output;

use support::{Registry, Unmount, bytes, mount_tmpfs, push_layers, start_registry, tar_archive};
use tar::EntryType::{Directory, Link, Regular, Symlink};

const RAW: &str = "application/vnd.cncf.model.weight.v1.raw";
const TAR: &str = "application/vnd.cncf.model.code.v1.tar";
const TAR_ZSTD: &str = "application/vnd.cncf.model.dataset.v1.tar+zstd";

/// `modelcache mount` straight on `root` (no daemon).
fn mount(root: &Path, registry: &Registry, reference: &str, volume: &str) -> Output {
    support::modelcache()
        .args(["mount", reference, "--volume", volume, "--root"])
        .arg(root)
        .args(["--insecure-registry", &registry.host()])
        .output()
        .unwrap()
}

/// What a mount said on stderr, for assertions.
fn said(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Every path below `dir` (not following symlinks), with its metadata.
fn walk(dir: &Path) -> Vec<(PathBuf, std::fs::Metadata)> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let metadata = entry.path().symlink_metadata().unwrap();
            if metadata.is_dir() {
                stack.push(entry.path());
            }
            found.push((entry.path(), metadata));
        }
    }
    found
}

/// Nothing a volume can reach under `root` is writable but by its owner,
/// root: no store or volume file is writable at all, no directory by group
/// or others, nothing is setuid or setgid.
fn assert_nothing_writable(root: &Path) {
    use std::os::unix::fs::PermissionsExt;
    for (path, metadata) in walk(root) {
        let mode = metadata.permissions().mode();
        let relative = path.strip_prefix(root).unwrap();
        let top = relative.components().next().unwrap().as_os_str().to_string_lossy().into_owned();
        assert_eq!(mode & 0o6000, 0, "{} is setuid or setgid", path.display());
        if metadata.is_file() && ["blobs", "unpacked", "models", "volumes"].contains(&top.as_str()) {
            let own_file = relative.file_name().is_some_and(|name| name == "entry.json" || name == "usage.json");
            if !own_file {
                assert_eq!(mode & 0o222, 0, "{} is writable ({mode:o})", path.display());
            }
        }
        if metadata.is_dir() {
            assert_eq!(mode & 0o022, 0, "{} is writable by others ({mode:o})", path.display());
        }
    }
}

/// Artifacts that try, alone and together, to make the tree reach outside
/// the root — symlink chains that count as inside by their text, an
/// unpacked layer reused at another path with files under its symlinks,
/// links across layers, hardlinks, absolute and `..` targets, nesting past
/// 128 names — are refused in every order, cold and warm; well-formed ones
/// (128 deep, in-tree links, one blob both a file and an archive) mount. Nothing is
/// ever created outside the root, and nothing under it is writable.
#[test]
fn crafted_trees_stay_inside_the_root() {
    let Some(registry) = start_registry() else { return };
    let benign = tar_archive(&[
        ("pkg/", Directory, "", b""),
        ("pkg/inner/", Directory, "", b""),
        ("pkg/inner/file", Regular, "", b"in the tree"),
        ("pkg/link", Symlink, "inner", b""),
        ("pkg/up", Symlink, "../w.bin", b""),
    ]);
    // `l1` is `pkg` itself: by its text `esc` climbs five and descends five;
    // resolved, it climbs five levels above `pkg`.
    let chain = tar_archive(&[("pkg/l1", Symlink, ".", b""), ("pkg/esc", Symlink, "l1/l1/l1/l1/l1/../../../../../outside", b"")]);
    // The deepest a path may be (128 names), and deeper.
    let deep_name = format!("deep/{}file", "d/".repeat(126));
    let deep_tar = |name: &str| {
        let mut builder = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_gnu();
        header.set_size(13);
        header.set_mode(0o644);
        builder.append_data(&mut header, name, &b"at the bottom"[..]).unwrap();
        builder.into_inner().unwrap()
    };
    let deep = deep_tar(&deep_name);
    let too_deep = deep_tar(&format!("deep/{}file", "d/".repeat(300)));
    let weights = bytes(1, 4096);
    let cases: Vec<(&str, Vec<support::RawLayer<'_>>, Option<&str>)> = vec![
        ("benign", vec![("pkg", TAR, benign.clone()), ("w.bin", RAW, weights.clone())], None),
        // The same archive, given another path, with a file under its symlink.
        ("reuse", vec![("other", TAR, benign.clone()), ("pkg/link/planted", RAW, weights.clone())], Some("outside the")),
        ("chain", vec![("pkg", TAR, chain.clone())], Some("resolves outside the model")),
        ("chain-reuse", vec![("other", TAR, chain.clone()), ("pkg/esc/planted", RAW, weights.clone())], Some("outside the")),
        // Each layer alone stays inside; together `up` climbs out through `shallow`.
        (
            "across-layers",
            vec![
                ("a", TAR, tar_archive(&[("a/b/c/shallow", Symlink, "../../..", b"")])),
                ("x", TAR, tar_archive(&[("x/y/z/up", Symlink, "../../../a/b/c/shallow/..", b"")])),
            ],
            Some("resolves outside the model"),
        ),
        ("hardlink", vec![("pkg", TAR, tar_archive(&[("pkg/passwd", Link, "/etc/passwd", b"")]))], Some("hardlink")),
        ("absolute", vec![("pkg", TAR, tar_archive(&[("pkg/abs", Symlink, "/etc/passwd", b"")]))], Some("absolute")),
        ("dotdot", vec![("pkg", TAR, tar_archive(&[("pkg/up", Symlink, "../../outside", b"")]))], Some("outside the model")),
        ("deep", vec![("deep", TAR, deep)], None),
        ("file-and-archive", vec![("pkg", TAR, benign.clone()), ("copy.tar", RAW, benign.clone())], None),
        ("too-deep", vec![("deep", TAR, too_deep)], Some("nested more than 128 directories deep")),
    ];
    let references: Vec<(String, Option<&str>, &str)> = cases
        .iter()
        .map(|(name, layers, refused)| (push_layers(&registry, &format!("crafted/{name}:v1"), layers), *refused, *name))
        .collect();

    let parent = tempfile::tempdir().unwrap();
    let outside = parent.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    let orders: Vec<(&str, Vec<usize>)> =
        vec![("a", (0..references.len()).chain(0..references.len()).collect()), ("b", (0..references.len()).rev().collect())];
    for (root_name, order) in orders {
        let root = parent.path().join(root_name);
        for (round, index) in order.into_iter().enumerate() {
            let (reference, refused, name) = &references[index];
            let volume = format!("{name}-{round}");
            let output = mount(&root, &registry, reference, &volume);
            match refused {
                Some(expected) => {
                    assert!(!output.status.success(), "{name} was mounted");
                    assert!(said(&output).contains(expected), "{name}: {}", said(&output));
                    assert!(!root.join("volumes").join(&volume).join("default").exists(), "{name} left a tree");
                }
                None => assert!(output.status.success(), "{name}: {}", said(&output)),
            }
            assert!(std::fs::read_dir(root.join("tmp")).unwrap().next().is_none(), "{name} left temporaries");
            assert!(std::fs::read_dir(&outside).unwrap().next().is_none(), "{name} created something outside the root");
        }
        let volume = |name: &str| root.join("volumes").join(format!("{name}-0")).join("default");
        if root_name == "a" {
            let tree = volume("benign");
            assert_eq!(std::fs::read(tree.join("pkg/link/file")).unwrap(), b"in the tree");
            assert_eq!(std::fs::read(tree.join("pkg/up")).unwrap(), weights);
            let tree = root.join("volumes").join(format!("deep-{}", 8)).join("default");
            assert_eq!(std::fs::read(tree.join(&deep_name)).unwrap(), b"at the bottom");
            let tree = root.join("volumes").join(format!("file-and-archive-{}", 9)).join("default");
            assert_eq!(std::fs::read(tree.join("copy.tar")).unwrap(), benign);
            assert_eq!(std::fs::read(tree.join("pkg/inner/file")).unwrap(), b"in the tree");
        }
        assert_nothing_writable(&root);
    }
    let beside: Vec<String> = std::fs::read_dir(parent.path())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let mut beside = beside;
    beside.sort();
    assert_eq!(beside, ["a", "b", "outside"], "nothing was written beside the roots");
}

/// The daemon's peak resident memory, from /proc.
fn peak_rss_bytes(daemon: &support::Daemon) -> u64 {
    let pid = daemon.child.as_ref().unwrap().id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|line| line.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

fn free_bytes(path: &Path) -> u64 {
    let stats = rustix::fs::statvfs(path).unwrap();
    stats.f_bavail * stats.f_frsize
}

/// zstd at level 1 of a tar stream written by `write`.
fn zstd_tar(write: impl FnOnce(&mut zstd::Encoder<'static, Vec<u8>>)) -> Vec<u8> {
    let mut encoder = zstd::Encoder::new(Vec::new(), 1).unwrap();
    write(&mut encoder);
    encoder.finish().unwrap()
}

fn write_header(out: &mut impl std::io::Write, name: &str, kind: tar::EntryType, size: u64) {
    let mut header = tar::Header::new_gnu();
    header.as_gnu_mut().unwrap().name[..name.len()].copy_from_slice(name.as_bytes());
    header.set_entry_type(kind);
    header.set_size(size);
    header.set_mode(0o644);
    header.set_cksum();
    out.write_all(header.as_bytes()).unwrap();
}

/// Layers that expand past the disk — a tar+zstd file four times the free
/// space of a small tmpfs root, a long-name header declaring (and holding) a
/// gigabyte, a million empty entries on a filesystem of few inodes — are
/// each refused with the layer and the limit named, while the daemon's
/// memory stays small; the space and inodes come back, and a normal model
/// mounts afterwards.
#[test]
fn decompression_bombs_are_refused() {
    use std::io::Write;
    skip_unless!(support::is_root(), "needs root to mount a tmpfs");
    let Some(registry) = start_registry() else { return };
    let parent = tempfile::tempdir().unwrap();
    let root = parent.path().join("root");
    std::fs::create_dir(&root).unwrap();
    skip_unless!(mount_tmpfs(&root, "96m,nr_inodes=20000"), "cannot mount a tmpfs");
    let _unmount = Unmount(root.clone());
    let free = free_bytes(&root);

    let expanding = zstd_tar(|out| {
        write_header(out, "pkg/zeros", Regular, 4 * free);
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..((4 * free) >> 20) {
            out.write_all(&zeros).unwrap();
        }
        out.write_all(&[0u8; 1024]).unwrap();
    });
    let long_name = zstd_tar(|out| {
        write_header(out, "././@LongLink", tar::EntryType::GNULongName, 1 << 30);
        let name = vec![b'a'; 1 << 20];
        for _ in 0..1024 {
            out.write_all(&name).unwrap();
        }
        write_header(out, "pkg/short", Regular, 0);
        out.write_all(&[0u8; 1024]).unwrap();
    });
    let many = zstd_tar(|out| {
        write_header(out, "pkg/", Directory, 0);
        for index in 0..1_000_000 {
            write_header(out, &format!("pkg/{index}"), Regular, 0);
        }
        out.write_all(&[0u8; 1024]).unwrap();
    });
    let bombs = [
        ("expands", expanding, "free on the store's filesystem"),
        ("long-name", long_name, "GNU long-name header of 1073741824 bytes"),
        ("many", many, "free inodes"),
    ];
    let daemon = support::Daemon::start_at(&root, &format!("[registries]\ninsecure = [\"{}\"]\n", registry.host()));
    let inodes = || rustix::fs::statvfs(&root).unwrap().f_favail;
    let inodes_before = inodes();
    for (name, layer, expected) in bombs {
        let compressed = layer.len() as u64;
        let reference = push_layers(&registry, &format!("bombs/{name}:v1"), &[("pkg", TAR_ZSTD, layer)]);
        let output =
            support::modelcache().args(["mount", &reference, "--volume", name, "--socket"]).arg(&daemon.socket).output().unwrap();
        let message = said(&output);
        assert!(!output.status.success(), "{name} was mounted");
        assert!(message.contains(expected), "{name}: {message}");
        assert!(message.contains("layer 0") && message.contains("`pkg`"), "{name} names the layer: {message}");
        assert!(std::fs::read_dir(root.join("tmp")).unwrap().next().is_none(), "{name} left temporaries");
        // What is left is the compressed archive (until GC), nothing unpacked.
        assert!(free_bytes(&root) + compressed + (2 << 20) >= free, "{name}: the space did not come back");
        assert!(inodes() + 64 >= inodes_before, "{name}: the inodes did not come back");
    }
    let peak = peak_rss_bytes(&daemon);
    assert!(peak < 300 << 20, "the daemon peaked at {} MiB", peak >> 20);

    let fine = push_layers(&registry, "bombs/fine:v1", &[("w.bin", RAW, bytes(3, 1 << 20))]);
    let output =
        support::modelcache().args(["mount", &fine, "--volume", "fine", "--socket"]).arg(&daemon.socket).output().unwrap();
    assert!(output.status.success(), "{}", said(&output));
}
