//! [`check_tree`]: a built tree's shape and its symlinks, resolved the
//! way the kernel resolves them, checked to stay within the tree.

use std::collections::{HashMap, HashSet};

/// What a built tree holds at a path, as far as the symlink rules care.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Node {
    Directory,
    File,
    /// A symlink, with its target as written.
    Symlink(String),
}

/// Symlinks followed in one resolution before it counts as a loop, as the
/// kernel's own limit.
pub const MAX_SYMLINK_HOPS: usize = 40;
/// Names walked in one resolution (targets included) before giving up: a
/// chain of long targets must not cost unbounded work.
const MAX_RESOLUTION_STEPS: usize = 4096;

/// Why a built tree is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TreeProblem {
    #[error("symlink `{link}` -> `{target}` resolves outside the model")]
    Escapes { link: String, target: String },
    #[error("symlink `{link}` -> `{target}` does not resolve within {MAX_SYMLINK_HOPS} links (a loop?)")]
    TooManyLinks { link: String, target: String },
    #[error("symlink `{link}` -> `{target}` takes more than {MAX_RESOLUTION_STEPS} names to resolve")]
    TooLong { link: String, target: String },
    #[error("`{path}` lies under `{through}`, which is not a directory")]
    Through { path: String, through: String },
}

/// Checks a whole tree as built: nothing lies under a symlink or a file,
/// and every symlink, resolved the way the kernel resolves it (through the
/// other symlinks of the tree, `..` taken after them), stays inside the
/// tree. A target that names nothing (a file of a layer left out) is fine:
/// it resolves nowhere. `nodes` maps `/`-separated relative paths to what
/// stands there; directories that only hold other nodes may be left out.
///
/// # Errors
/// The first [`TreeProblem`], naming the symlink or path.
pub fn check_tree(nodes: &HashMap<String, Node>) -> Result<(), TreeProblem> {
    let mut directories = HashSet::new();
    for path in nodes.keys() {
        let mut ancestor = path.as_str();
        while let Some((parent, _)) = ancestor.rsplit_once('/') {
            if matches!(nodes.get(parent), Some(Node::File | Node::Symlink(_))) {
                return Err(TreeProblem::Through { path: path.clone(), through: parent.to_owned() });
            }
            if !directories.insert(parent) {
                break;
            }
            ancestor = parent;
        }
    }
    // Names walked over the whole tree: a few per link in any real model;
    // many links into one long chain must not cost a link × chain walk.
    let mut budget = 64 * nodes.len() + MAX_RESOLUTION_STEPS;
    for (link, node) in nodes {
        if let Node::Symlink(target) = node {
            resolve_within(nodes, &directories, link, target, &mut budget)?;
        }
    }
    Ok(())
}

/// Resolves the symlink `link` -> `target` over `nodes`, failing when any
/// step climbs above the root; each name walked spends one of `budget`.
pub(super) fn resolve_within(
    nodes: &HashMap<String, Node>,
    directories: &HashSet<&str>,
    link: &str,
    target: &str,
    budget: &mut usize,
) -> Result<(), TreeProblem> {
    let problem = |make: fn(String, String) -> TreeProblem| make(link.to_owned(), target.to_owned());
    if target.starts_with('/') {
        return Err(problem(|link, target| TreeProblem::Escapes { link, target }));
    }
    // Where the walk stands, as a path kept in step with its names.
    let mut here = link.rsplit_once('/').map_or(String::new(), |(parent, _)| parent.to_owned());
    let mut pending: std::collections::VecDeque<&str> = target.split('/').collect();
    let (mut hops, mut steps) = (0, 0);
    while let Some(name) = pending.pop_front() {
        steps += 1;
        if steps > MAX_RESOLUTION_STEPS || *budget == 0 {
            return Err(problem(|link, target| TreeProblem::TooLong { link, target }));
        }
        *budget -= 1;
        match name {
            "" | "." => {}
            ".." => {
                if here.is_empty() {
                    return Err(problem(|link, target| TreeProblem::Escapes { link, target }));
                }
                here.truncate(here.rfind('/').unwrap_or(0));
            }
            name => {
                let parent_length = here.len();
                if !here.is_empty() {
                    here.push('/');
                }
                here.push_str(name);
                match nodes.get(&here) {
                    Some(Node::Symlink(next)) => {
                        hops += 1;
                        if hops > MAX_SYMLINK_HOPS {
                            return Err(problem(|link, target| TreeProblem::TooManyLinks { link, target }));
                        }
                        if next.starts_with('/') {
                            return Err(problem(|link, target| TreeProblem::Escapes { link, target }));
                        }
                        here.truncate(parent_length);
                        for part in next.split('/').rev() {
                            pending.push_front(part);
                        }
                    }
                    // A file with names after it, or a name nothing holds:
                    // the kernel stops there (ENOTDIR, ENOENT).
                    Some(Node::File) if pending.iter().any(|part| !part.is_empty() && *part != ".") => return Ok(()),
                    Some(_) => {}
                    None if directories.contains(here.as_str()) => {}
                    None => return Ok(()),
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(entries: &[(&str, Option<&str>)]) -> HashMap<String, Node> {
        entries
            .iter()
            .map(|(path, target)| {
                let node = match target {
                    None => Node::File,
                    Some("/") => Node::Directory,
                    Some(target) => Node::Symlink((*target).to_owned()),
                };
                ((*path).to_owned(), node)
            })
            .collect()
    }

    /// Symlinks are resolved through each other, as the kernel does: a
    /// target that counts as inside by its text but climbs out through
    /// another link is refused; in-tree chains and dangling links pass.
    #[test]
    fn trees_resolve_symlinks_physically() {
        let escapes = |entries: &[(&str, Option<&str>)]| matches!(check_tree(&tree(entries)), Err(TreeProblem::Escapes { .. }));
        // `l1` is `pkg` itself, so `l1/../..` is the model's parent.
        assert!(escapes(&[("pkg/l1", Some(".")), ("pkg/l2", Some("l1/../.."))]));
        // Through a link in another layer: `shallow` is the root itself.
        assert!(escapes(&[("a/b/c/shallow", Some("../../..")), ("x/y/z/up", Some("../../../a/b/c/shallow/.."))]));
        assert!(escapes(&[("pkg/abs", Some("/etc/passwd"))]));
        assert!(escapes(&[("pkg/hop", Some("../other")), ("other", Some("../.."))]));
        assert!(escapes(&[("top", Some(".."))]));
        let fine = |entries: &[(&str, Option<&str>)]| check_tree(&tree(entries));
        assert_eq!(fine(&[("pkg/lib/a.py", None), ("pkg/current", Some("lib/a.py")), ("pkg/up", Some("../other/file"))]), Ok(()));
        assert_eq!(fine(&[("pkg/l1", Some(".")), ("pkg/l2", Some("l1/l1/l1/../x"))]), Ok(()));
        assert_eq!(fine(&[("pkg/dangling", Some("nothing/../../x"))]), Ok(()));
        assert_eq!(fine(&[("w.bin", None), ("pkg/via-file", Some("../w.bin/../../.."))]), Ok(()));
        assert!(matches!(
            fine(&[("pkg/a", Some("b")), ("pkg/b", Some("a"))]),
            Err(TreeProblem::TooManyLinks { .. }) | Err(TreeProblem::TooLong { .. })
        ));
        assert!(matches!(fine(&[("pkg/link", Some(".")), ("pkg/link/file", None)]), Err(TreeProblem::Through { .. })));
        assert!(matches!(fine(&[("w.bin", None), ("w.bin/inner", None)]), Err(TreeProblem::Through { .. })));
    }
}
