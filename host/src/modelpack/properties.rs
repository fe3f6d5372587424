//! Generated hostile inputs: the kernel is the oracle for symlinks.

use std::collections::{BTreeSet, HashMap, HashSet};

use proptest::prelude::*;

use super::tree::resolve_within;
use super::*;

/// A tree of up to 12 names over a three-letter alphabet, 3 deep: each
/// a directory, a file or a symlink whose target mixes names, `.` and `..`.
fn trees() -> impl Strategy<Value = HashMap<String, Node>> {
    let name = prop::sample::select(vec!["a", "b", "c"]);
    let path = prop::collection::vec(name, 1..=3).prop_map(|parts| parts.join("/"));
    let token = prop::sample::select(vec!["a", "b", "c", ".", "..", ""]);
    let target = prop::collection::vec(token, 1..=7).prop_map(|parts| parts.join("/"));
    let node = prop_oneof![Just(Node::Directory), Just(Node::File), target.prop_map(Node::Symlink)];
    prop::collection::vec((path, node), 1..12).prop_map(|mut nodes| {
        // Shortest first; a name under a file or symlink is dropped, as
        // the tree rules would refuse it before any link is resolved.
        nodes.sort_by_key(|(path, _)| path.len());
        let mut tree: HashMap<String, Node> = HashMap::new();
        for (path, node) in nodes {
            let blocked =
                path.match_indices('/').any(|(at, _)| matches!(tree.get(&path[..at]), Some(Node::File | Node::Symlink(_))));
            if !blocked && !tree.contains_key(&path) {
                tree.insert(path, node);
            }
        }
        tree
    })
}

/// Writes `tree` under `root` with plain std calls.
fn materialise(root: &std::path::Path, tree: &HashMap<String, Node>) {
    let mut paths: Vec<&String> = tree.keys().collect();
    paths.sort_by_key(|path| path.len());
    for path in paths {
        let at = root.join(path);
        std::fs::create_dir_all(at.parent().unwrap()).unwrap();
        match &tree[path] {
            Node::Directory => std::fs::create_dir_all(&at).unwrap(),
            Node::File => std::fs::write(&at, b"").unwrap(),
            Node::Symlink(target) => std::os::unix::fs::symlink(if target.is_empty() { "." } else { target }, &at).unwrap(),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Our resolution says a symlink escapes exactly when the kernel,
    /// asked to resolve it beneath the root (`RESOLVE_BENEATH`), refuses
    /// with EXDEV; and a link that resolves in-tree for us is never
    /// refused for escaping by the kernel.
    #[test]
    fn symlink_resolution_matches_the_kernel(tree in trees()) {
        let dir = tempfile::tempdir().unwrap();
        let tree: HashMap<String, Node> = tree
            .into_iter()
            .map(|(path, node)| match node {
                Node::Symlink(target) if target.is_empty() => (path, Node::Symlink(".".into())),
                other => (path, other),
            })
            .collect();
        materialise(dir.path(), &tree);
        let root = std::fs::File::open(dir.path()).unwrap();
        let mut directories = HashSet::new();
        for path in tree.keys() {
            let mut ancestor = path.as_str();
            while let Some((parent, _)) = ancestor.rsplit_once('/') {
                directories.insert(parent);
                ancestor = parent;
            }
        }
        for (link, node) in &tree {
            let Node::Symlink(target) = node else { continue };
            let mut budget = usize::MAX;
            let ours = resolve_within(&tree, &directories, link, target, &mut budget);
            let kernel = rustix::fs::openat2(
                &root,
                link.as_str(),
                rustix::fs::OFlags::PATH | rustix::fs::OFlags::CLOEXEC,
                rustix::fs::Mode::empty(),
                rustix::fs::ResolveFlags::BENEATH,
            );
            let kernel_escapes = matches!(kernel, Err(rustix::io::Errno::XDEV));
            let ours_escapes = matches!(ours, Err(TreeProblem::Escapes { .. }));
            if !matches!(ours, Err(TreeProblem::TooManyLinks { .. } | TreeProblem::TooLong { .. })) {
                prop_assert_eq!(ours_escapes, kernel_escapes, "{} -> {}: ours {:?}, kernel {:?}", link, target, ours, kernel.map(drop));
            }
        }
    }

    /// Every path a validated model path can be is relative, normalised
    /// and free of `..`; parsing it again gives it back.
    #[test]
    fn model_paths_stay_relative(text in "[a-z./]{0,24}") {
        if let Ok(path) = ModelPath::parse(&text) {
            prop_assert!(!path.as_str().starts_with('/'));
            prop_assert!(path.components().all(|name| !name.is_empty() && name != "." && name != ".."));
            prop_assert_eq!(ModelPath::parse(path.as_str()), Ok(path.clone()));
        }
    }

    /// Whatever entries a tar layer lists, what the rules accept lies
    /// within the layer's path and never under an accepted symlink or file.
    #[test]
    fn tar_rules_keep_entries_in_the_layer(
        entries in prop::collection::vec(
            (
                prop::collection::vec(prop::sample::select(vec!["pkg", "a", "..", ".", "", "/"]), 1..5),
                prop::sample::select(vec![TarKind::File, TarKind::Directory, TarKind::Symlink, TarKind::Hardlink]),
                prop::collection::vec(prop::sample::select(vec!["a", "..", ".", "/"]), 0..5),
            ),
            0..16,
        )
    ) {
        let layer = ModelPath::parse("pkg").unwrap();
        let mut rules = TarRules::new(&layer);
        let mut blockers: Vec<ModelPath> = Vec::new();
        for (parts, kind, target) in entries {
            let name = parts.concat();
            let target = target.join("/");
            let Ok(action) = rules.check(&name, kind, Some(&target)) else { continue };
            let path = match action {
                TarAction::Skip => continue,
                TarAction::Directory(path) => path,
                TarAction::File(path) => { blockers.push(path.clone()); path }
                TarAction::Symlink(path, _) => { blockers.push(path.clone()); path }
            };
            prop_assert!(path.is_within(&layer), "{}", path);
            prop_assert!(!blockers.iter().any(|blocker| path != *blocker && path.is_within(blocker)), "{} under a file or symlink", path);
        }
    }

    /// Manifests of any shape are parsed or refused, never a panic, and
    /// an accepted one's paths are valid, distinct and not nested.
    #[test]
    fn manifests_never_panic(
        paths in prop::collection::vec("[a-z./]{0,12}", 0..6),
        media in prop::collection::vec(prop::sample::select(vec!["application/vnd.cncf.model.weight.v1.raw", "x.tar", "x.tar+gzip", "junk"]), 6),
        size in any::<u64>(),
        garbage in any::<bool>(),
    ) {
        let layers: Vec<serde_json::Value> = paths.iter().zip(&media).enumerate().map(|(index, (path, media_type))| serde_json::json!({
            "mediaType": media_type,
            "digest": if garbage && index == 0 { "sha256:zz".to_owned() } else { format!("sha256:{}", format!("{index:02x}").repeat(32)) },
            "size": size,
            "annotations": { FILEPATH_ANNOTATION: path },
        })).collect();
        let bytes = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST_MEDIA_TYPE,
            "artifactType": ARTIFACT_TYPE,
            "config": { "mediaType": CONFIG_MEDIA_TYPE, "digest": format!("sha256:{}", "e".repeat(64)), "size": 2 },
            "layers": layers,
        })).unwrap();
        if let Ok(model) = Model::parse(&Digest::of(&bytes), &bytes) {
            let mut seen = BTreeSet::new();
            for layer in &model.layers {
                prop_assert_eq!(ModelPath::parse(layer.path.as_str()), Ok(layer.path.clone()));
                prop_assert!(seen.insert(layer.path.clone()));
            }
            for layer in &model.layers {
                prop_assert!(!model.layers.iter().any(|other| other.index != layer.index && layer.path.is_within(&other.path)));
            }
        }
    }
}
