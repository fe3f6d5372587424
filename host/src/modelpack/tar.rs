//! [`TarRules`]: what each entry of a tar layer may create, decided
//! before anything touches the disk.

use std::collections::HashSet;

use super::{ModelPath, PathProblem};

/// What one tar entry may do, decided before anything touches the disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TarAction {
    /// The archive's own root (`./`): nothing to create.
    Skip,
    Directory(ModelPath),
    File(ModelPath),
    /// A symlink at the path, with its (relative, in-tree) target as written.
    Symlink(ModelPath, String),
}

/// The kinds of tar entries, as far as the rules care.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TarKind {
    File,
    Directory,
    Symlink,
    Hardlink,
    Other,
}

/// Checks the entries of one tar layer in order: paths inside the layer's
/// path, no duplicates, nothing through a symlink, symlinks pointing inside
/// the model, and only files, directories and symlinks.
#[derive(Debug)]
pub struct TarRules<'a> {
    layer: &'a ModelPath,
    seen: HashSet<String>,
    symlinks: HashSet<String>,
    files: HashSet<String>,
}

impl<'a> TarRules<'a> {
    pub fn new(layer: &'a ModelPath) -> TarRules<'a> {
        TarRules { layer, seen: HashSet::new(), symlinks: HashSet::new(), files: HashSet::new() }
    }

    /// Judges the next entry.
    ///
    /// # Errors
    /// Why the entry (and so the layer) is refused, naming the entry.
    pub fn check(&mut self, name: &str, kind: TarKind, link_target: Option<&str>) -> Result<TarAction, String> {
        let path = match ModelPath::parse(name) {
            Ok(path) => path,
            Err(PathProblem::Empty) if kind == TarKind::Directory => return Ok(TarAction::Skip),
            Err(problem) => return Err(format!("entry `{name}` {problem}")),
        };
        if !path.is_within(self.layer) {
            return Err(format!("entry `{name}` lies outside the layer's path `{}`", self.layer));
        }
        if let Some(through) =
            path.ancestors().find(|ancestor| self.symlinks.contains(*ancestor) || self.files.contains(*ancestor))
        {
            return Err(format!("entry `{name}` would be created through `{through}`, which is not a directory"));
        }
        let repeated = self.seen.contains(path.as_str());
        let action = match kind {
            TarKind::Directory => {
                if repeated && !self.is_directory(&path) {
                    return Err(format!("entry `{name}` appears twice"));
                }
                TarAction::Directory(path.clone())
            }
            TarKind::File => {
                if repeated {
                    return Err(format!("entry `{name}` appears twice"));
                }
                self.files.insert(path.to_string());
                TarAction::File(path.clone())
            }
            TarKind::Symlink => {
                if repeated {
                    return Err(format!("entry `{name}` appears twice"));
                }
                let target = link_target.unwrap_or_default();
                check_symlink_target(&path, target).map_err(|reason| format!("symlink `{name}` -> `{target}` {reason}"))?;
                self.symlinks.insert(path.to_string());
                TarAction::Symlink(path.clone(), target.to_owned())
            }
            TarKind::Hardlink => return Err(format!("entry `{name}` is a hardlink, which model layers may not hold")),
            TarKind::Other => return Err(format!("entry `{name}` is not a regular file, directory or symlink")),
        };
        self.seen.insert(path.into_string());
        Ok(action)
    }

    fn is_directory(&self, path: &ModelPath) -> bool {
        !self.files.contains(path.as_str()) && !self.symlinks.contains(path.as_str())
    }
}

/// A symlink target must be relative and, resolved from the link's
/// directory, stay inside the model.
fn check_symlink_target(link: &ModelPath, target: &str) -> Result<(), &'static str> {
    if target.is_empty() {
        return Err("has an empty target");
    }
    if target.starts_with('/') {
        return Err("points to an absolute path");
    }
    if target.contains('\0') {
        return Err("has a NUL byte in its target");
    }
    let mut depth = link.components().count() - 1;
    for part in target.split('/') {
        match part {
            "" | "." => {}
            ".." => depth = depth.checked_sub(1).ok_or("points outside the model")?,
            _ => depth += 1,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules_check(entries: &[(&str, TarKind, Option<&str>)]) -> Result<Vec<TarAction>, String> {
        let layer = ModelPath::parse("pkg").unwrap();
        let mut rules = TarRules::new(&layer);
        entries.iter().map(|(name, kind, target)| rules.check(name, *kind, *target)).collect()
    }

    /// Tar entries stay within the layer's path; in-tree symlinks are fine.
    #[test]
    fn tar_rules_accept_a_tidy_archive() {
        let actions = rules_check(&[
            ("./", TarKind::Directory, None),
            ("pkg/", TarKind::Directory, None),
            ("pkg/lib/", TarKind::Directory, None),
            ("pkg/lib/a.py", TarKind::File, None),
            ("pkg/current", TarKind::Symlink, Some("lib/a.py")),
            ("pkg/up", TarKind::Symlink, Some("../other-layer/file")),
            ("pkg/lib/", TarKind::Directory, None),
        ])
        .unwrap();
        assert_eq!(actions[0], TarAction::Skip);
        assert_eq!(actions[3], TarAction::File(ModelPath::parse("pkg/lib/a.py").unwrap()));
    }

    /// Escapes, hardlinks, devices, duplicates and paths through symlinks
    /// are refused, each naming the entry.
    #[test]
    fn tar_rules_refuse_escapes() {
        let refused = |entries: &[(&str, TarKind, Option<&str>)], needle: &str| {
            let error = rules_check(entries).unwrap_err();
            assert!(error.contains(needle), "{error}");
        };
        refused(&[("../evil", TarKind::File, None)], "climbs out");
        refused(&[("/etc/passwd", TarKind::File, None)], "absolute");
        refused(&[("other/file", TarKind::File, None)], "outside the layer's path");
        refused(&[("pkg/link", TarKind::Symlink, Some("../../etc/passwd"))], "points outside the model");
        refused(&[("pkg/link", TarKind::Symlink, Some("/etc/passwd"))], "absolute");
        refused(&[("pkg/hard", TarKind::Hardlink, Some("/etc/passwd"))], "hardlink");
        refused(&[("pkg/dev", TarKind::Other, None)], "not a regular file");
        refused(&[("pkg/a", TarKind::File, None), ("pkg/a", TarKind::File, None)], "twice");
        refused(&[("pkg/link", TarKind::Symlink, Some(".")), ("pkg/link/file", TarKind::File, None)], "through `pkg/link`");
        refused(&[("pkg/f", TarKind::File, None), ("pkg/f/x", TarKind::File, None)], "through `pkg/f`");
    }
}
