//! `modelcache plugins new`: a ready-to-build policy project in Rust, Python
//! or JavaScript, with the WIT this binary speaks and one passing case.
//!
//! The project carries its own copy of `wit/policy.wit`, so it builds against
//! exactly the interface the host that wrote it checks, with nothing but the
//! language's public toolchain (wit-bindgen, componentize-py, jco).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::ValueEnum;
use modelcache::plugins::Decision;

const WIT: &str = include_str!("../../../wit/policy.wit");

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Lang {
    Rust,
    Python,
    Js,
}

#[derive(Debug, clap::Args)]
pub struct NewArgs {
    /// The policy's name: the project directory, the crate or package, and
    /// the `.wasm` the build writes. Lower-case letters, digits and dashes.
    name: String,
    #[arg(long, value_enum)]
    lang: Lang,
    /// The decision the policy makes.
    #[arg(long, default_value = "quota", value_parser = |text: &str| text.parse::<Decision>())]
    decision: Decision,
    /// Where to create the project directory (default: the current one).
    #[arg(long, default_value = ".")]
    dir: PathBuf,
}

/// A template file: where it goes in the project, and its text.
struct File {
    path: &'static str,
    text: &'static str,
}

fn files(lang: Lang, decision: Decision) -> Vec<File> {
    macro_rules! template {
        ($path:literal, $source:literal) => {
            File { path: $path, text: include_str!(concat!("../../templates/", $source)) }
        };
    }
    // Every starter accepts any settings object the same way: that part is
    // appended to each decision's source.
    macro_rules! source {
        ($path:literal, $lang:literal, $decision:literal, $settings:literal) => {
            File {
                path: $path,
                text: concat!(
                    include_str!(concat!("../../templates/", $lang, "/", $decision)),
                    include_str!(concat!("../../templates/", $lang, "/", $settings)),
                ),
            }
        };
    }
    let mut files = match (lang, decision) {
        // No starter: `new` refuses it before asking for files.
        (_, Decision::Verify) => Vec::new(),
        (Lang::Rust, Decision::Admission) => vec![source!("src/lib.rs", "rust", "admission.rs", "settings.rs")],
        (Lang::Python, Decision::Admission) => vec![source!("app.py", "python", "admission.py", "settings.py")],
        (Lang::Js, Decision::Admission) => vec![source!("policy.js", "js", "admission.js", "settings.js")],
        (Lang::Rust, Decision::Exclude) => vec![source!("src/lib.rs", "rust", "exclude.rs", "settings.rs")],
        (Lang::Rust, Decision::Quota) => vec![source!("src/lib.rs", "rust", "quota.rs", "settings.rs")],
        (Lang::Rust, Decision::Gc) => vec![source!("src/lib.rs", "rust", "gc.rs", "settings.rs")],
        (Lang::Python, Decision::Exclude) => vec![source!("app.py", "python", "exclude.py", "settings.py")],
        (Lang::Python, Decision::Quota) => vec![source!("app.py", "python", "quota.py", "settings.py")],
        (Lang::Python, Decision::Gc) => vec![source!("app.py", "python", "gc.py", "settings.py")],
        (Lang::Js, Decision::Exclude) => vec![source!("policy.js", "js", "exclude.js", "settings.js")],
        (Lang::Js, Decision::Quota) => vec![source!("policy.js", "js", "quota.js", "settings.js")],
        (Lang::Js, Decision::Gc) => vec![source!("policy.js", "js", "gc.js", "settings.js")],
    };
    files.push(match lang {
        Lang::Rust => template!("Cargo.toml", "rust/Cargo.toml"),
        Lang::Python => File { path: ".gitignore", text: "*.wasm\n__pycache__/\n" },
        Lang::Js => template!("package.json", "js/package.json"),
    });
    if lang == Lang::Js {
        files.push(File { path: ".gitignore", text: "*.wasm\nnode_modules/\n" });
    }
    if lang == Lang::Rust {
        files.push(File { path: ".gitignore", text: "/target\n" });
    }
    files.push(match decision {
        Decision::Admission => template!("cases/admission.json", "cases/admission.json"),
        Decision::Verify => return files,
        Decision::Exclude => template!("cases/exclude.json", "cases/exclude.json"),
        Decision::Quota => template!("cases/quota.json", "cases/quota.json"),
        Decision::Gc => template!("cases/gc.json", "cases/gc.json"),
    });
    files.push(File { path: "wit/policy.wit", text: WIT });
    files
}

/// The command that builds the project, and the `.wasm` it writes.
fn build(lang: Lang, name: &str, world: &str) -> (String, String) {
    match lang {
        Lang::Rust => (
            "cargo build --release --target wasm32-wasip2".to_owned(),
            format!("target/wasm32-wasip2/release/{}.wasm", name.replace('-', "_")),
        ),
        Lang::Python => {
            (format!("componentize-py -d wit -w {world} componentize app -o {name}.wasm --stub-wasi"), format!("{name}.wasm"))
        }
        Lang::Js => ("npm install && npm run build".to_owned(), format!("{name}.wasm")),
    }
}

fn readme(lang: Lang, name: &str, decision: Decision, world: &str) -> String {
    let (build, wasm) = build(lang, name, world);
    let needs = match lang {
        Lang::Rust => "Rust with the `wasm32-wasip2` target (`rustup target add wasm32-wasip2`)",
        Lang::Python => {
            "componentize-py (`pip install componentize-py`); `--stub-wasi` keeps out the \
                         filesystem and socket imports modelcache refuses"
        }
        Lang::Js => {
            "Node.js and npm; `jco componentize --disable all` keeps out the WASI imports \
                     modelcache refuses"
        }
    };
    format!(
        "# {name}\n\n\
         A modelcache {decision} policy (world `{world}` of `wit/policy.wit`, \
         the WIT package `modelcache:policy` this project was created against).\n\n\
         Needs {needs}.\n\n\
         ```sh\n\
         {build}\n\
         modelcache plugins test {wasm} cases/\n\
         ```\n\n\
         Install: copy `{wasm}` into the daemon's plugin directory as `{name}.wasm`, \
         with an optional `{name}.toml` for its settings, limits and fail modes. \
         The case format, the sandbox and every field of the WIT are described in \
         modelcache's `docs/policies.md`.\n"
    )
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|first| first.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.ends_with('-')
        && name.len() <= 64
}

pub fn new(args: &NewArgs) -> anyhow::Result<ExitCode> {
    if !valid_name(&args.name) {
        bail!("`{}` is not a valid policy name: use lower-case letters, digits and dashes, starting with a letter", args.name);
    }
    if args.decision == Decision::Verify {
        bail!(
            "there is no starter for verify: checking signatures takes real cryptography; start from modelcache's \
             plugins/verify-signatures (Rust), which verifies cosign and model-signing signatures"
        );
    }
    let world = format!("{}-policy", args.decision);
    let project = args.dir.join(&args.name);
    if project.exists() {
        bail!("{} already exists; choose another name or --dir", project.display());
    }
    // Written under a temporary name and renamed into place, so a failure
    // never leaves a half-written project behind.
    std::fs::create_dir_all(&args.dir).with_context(|| format!("creating {}", args.dir.display()))?;
    let staging = tempfile::Builder::new()
        .prefix(&format!(".{}.", args.name))
        .tempdir_in(&args.dir)
        .with_context(|| format!("creating a directory in {}", args.dir.display()))?;
    let fill = |text: &str| text.replace("{{name}}", &args.name).replace("{{world}}", &world);
    for file in files(args.lang, args.decision) {
        write(staging.path(), file.path, &fill(file.text))?;
    }
    write(staging.path(), "README.md", &readme(args.lang, &args.name, args.decision, &world))?;
    std::fs::rename(staging.path(), &project).with_context(|| format!("creating {}", project.display()))?;
    // The directory was renamed away; nothing is left for the guard to delete.
    std::mem::forget(staging);

    let (build, wasm) = build(args.lang, &args.name, &world);
    outln!("created {} ({:?} {} policy)", project.display(), args.lang, args.decision);
    outln!("  cd {}", project.display());
    outln!("  {build}");
    outln!("  modelcache plugins test {wasm} cases/");
    Ok(ExitCode::SUCCESS)
}

fn write(root: &Path, relative: &str, text: &str) -> anyhow::Result<()> {
    let path = root.join(relative);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_before_anything_is_written() {
        for good in ["max-pull", "a", "policy2"] {
            assert!(valid_name(good), "{good}");
        }
        for bad in ["", "Max", "-x", "x-", "a/b", "..", "a_b", "a b"] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn every_language_and_decision_has_its_source_a_build_file_and_a_case() {
        for lang in [Lang::Rust, Lang::Python, Lang::Js] {
            // verify has no starter (`new` says so).
            for decision in Decision::ALL.into_iter().filter(|decision| *decision != Decision::Verify) {
                let paths: Vec<&str> = files(lang, decision).iter().map(|file| file.path).collect();
                assert!(paths.contains(&"wit/policy.wit"), "{lang:?} {decision}");
                assert!(paths.contains(&format!("cases/{decision}.json").as_str()), "{lang:?} {decision}");
                assert_eq!(paths.len(), if lang == Lang::Python { 4 } else { 5 }, "{lang:?} {decision}: {paths:?}");
            }
        }
    }
}
