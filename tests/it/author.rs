//! The policy author's kit, through the real binary: fixture cases, the
//! example policy in Rust, Python and JavaScript built from source, refused
//! unstubbed builds, `plugins new` projects built and tested, `plugins bench`.
//!
//! Python needs `componentize-py` on PATH and JavaScript needs `npm`; the
//! tests that need them skip with the reason otherwise (CI installs both).

use crate::support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use support::{modelcache, plugin_wasm};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the repository").to_owned()
}

fn wit_dir() -> PathBuf {
    repo().join("wit")
}

fn has(tool: &str) -> bool {
    Command::new(tool).arg("--version").output().is_ok_and(|output| output.status.success())
}

fn run(command: &mut Command) -> Output {
    let output = command.output().unwrap_or_else(|error| panic!("running {command:?}: {error}"));
    assert!(
        output.status.success(),
        "{command:?} failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// `modelcache plugins test WASM CASES`, with a compiled cache of its own.
fn plugins_test(wasm: &Path, cases: &Path, cache: &Path) -> (bool, String, String) {
    let output = modelcache()
        .args(["plugins", "test"])
        .arg(wasm)
        .arg(cases)
        .arg("--cache-dir")
        .arg(cache)
        .output()
        .expect("running modelcache plugins test");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    (output.status.success(), stdout, stderr)
}

/// Asserts a `plugins test` run passed all of `expected` cases.
fn assert_all_pass(wasm: &Path, cases: &Path, cache: &Path, expected: usize) -> String {
    let (ok, stdout, stderr) = plugins_test(wasm, cases, cache);
    assert!(ok, "{} against {}:\n{stdout}{stderr}", wasm.display(), cases.display());
    assert_eq!(stdout.matches("\nPASS  ").count(), expected, "{stdout}");
    assert!(stdout.ends_with(&format!("{expected} passed, 0 failed\n")), "{stdout}");
    stdout
}

/// Copies a compiled Rust policy under its plugin name (`max_pull.wasm` → `max-pull.wasm`).
fn named(wasm: &Path, name: &str, dir: &Path) -> PathBuf {
    let target = dir.join(format!("{name}.wasm"));
    std::fs::copy(wasm, &target).expect("copying a component");
    target
}

fn componentize_py(app_dir: &Path, world: &str, out: &Path, stub_wasi: bool) -> Output {
    let mut command = Command::new("componentize-py");
    command.arg("-d").arg(wit_dir()).args(["-w", world, "componentize", "app", "-o"]).arg(out);
    if stub_wasi {
        command.arg("--stub-wasi");
    }
    run(command.current_dir(app_dir))
}

/// The max-pull JavaScript example's toolchain, installed once from its lock file.
fn js_toolchain() -> PathBuf {
    static INSTALLED: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    let dir = repo().join("plugins/max-pull/js");
    INSTALLED.get_or_init(|| {
        if !dir.join("node_modules/.bin/jco").exists() {
            run(Command::new("npm").args(["install", "--no-audit", "--no-fund", "--prefer-offline"]).current_dir(&dir));
        }
    });
    dir.join("node_modules")
}

fn jco_componentize(source: &Path, wit: &Path, world: &str, out: &Path, disable_all: bool) -> Output {
    let mut command = Command::new(js_toolchain().join(".bin/jco"));
    command.arg("componentize").arg(source).arg("--wit").arg(wit).args(["--world-name", world, "--out"]).arg(out);
    if disable_all {
        command.args(["--disable", "all"]);
    }
    run(&mut command)
}

#[test]
fn the_reference_plugins_pass_the_cases_they_ship() {
    let cache = tempfile::tempdir().unwrap();
    for (name, cases) in [("exclude-patterns", 7), ("quota-watermark", 4), ("gc-lru-watermark", 4)] {
        let wasm = plugin_wasm(name);
        assert_all_pass(&wasm, &repo().join("plugins").join(name).join("cases"), cache.path(), cases);
    }
}

#[test]
fn expected_failures_pass_only_with_the_right_cause() {
    let cache = tempfile::tempdir().unwrap();
    let hostile = plugin_wasm("hostile-policy");
    let stdout = assert_all_pass(&hostile, &repo().join("tests/hostile-policy/cases"), cache.path(), 4);
    assert!(stdout.contains("PASS  a policy that never returns is stopped at its deadline"), "{stdout}");

    // The same looping policy, expected to answer: a failing case naming the timeout.
    let dir = tempfile::tempdir().unwrap();
    let case = std::fs::read_to_string(repo().join("tests/hostile-policy/cases/failures.json")).unwrap();
    let mut cases: serde_json::Value = serde_json::from_str(&case).unwrap();
    let looping = cases.as_array_mut().unwrap().swap_remove(0);
    let mut wrong = looping.clone();
    wrong.as_object_mut().unwrap().remove("expect-failure");
    wrong["expect"] = serde_json::json!({ "verdict": "admit" });
    let mut wrong_cause = looping;
    wrong_cause["expect-failure"] = serde_json::json!({ "cause": "trap" });
    std::fs::write(dir.path().join("cases.json"), serde_json::to_string(&[wrong, wrong_cause]).unwrap()).unwrap();
    let (ok, stdout, _) = plugins_test(&hostile, &dir.path().join("cases.json"), cache.path());
    assert!(!ok, "{stdout}");
    assert!(stdout.contains("but: timeout: ran past its 50 ms deadline"), "{stdout}");
    assert!(stdout.contains("expected a failure with cause `trap`\n      but: cause `timeout`"), "{stdout}");
    assert!(stdout.ends_with("0 passed, 2 failed\n"), "{stdout}");
}

#[test]
fn a_wrong_expectation_fails_the_run_and_shows_a_diff() {
    let cache = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let wasm = named(&plugin_wasm("max-pull"), "max-pull", dir.path());
    let deny = std::fs::read_to_string(repo().join("plugins/max-pull/cases/deny.json")).unwrap();
    let mut case: serde_json::Value = serde_json::from_str(&deny).unwrap();
    case["name"] = "expects the wrong reason".into();
    case["expect"]["reason"] = "too big".into();
    std::fs::write(dir.path().join("wrong.json"), case.to_string()).unwrap();

    let (ok, stdout, _) = plugins_test(&wasm, &dir.path().join("wrong.json"), cache.path());
    assert!(!ok, "a wrong expectation must fail the run:\n{stdout}");
    assert!(stdout.contains("FAIL  expects the wrong reason"), "{stdout}");
    assert!(stdout.contains("--- expected\n") && stdout.contains("+++ actual\n"), "{stdout}");
    assert!(stdout.contains("-  \"reason\": \"too big\","), "{stdout}");
    assert!(
        stdout.contains("+  \"reason\": \"registry.example/models/llama:8b would add 1001 bytes; this node allows at most 1000 bytes per pull\","),
        "{stdout}"
    );
    assert!(stdout.ends_with("0 passed, 1 failed\n"), "{stdout}");

    // The same file, once right, passes: the diff was about the answer only.
    let (ok, stdout, _) = plugins_test(&wasm, &repo().join("plugins/max-pull/cases/deny.json"), cache.path());
    assert!(ok, "{stdout}");
}

#[test]
fn max_pull_passes_the_same_cases_in_rust() {
    let dir = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let wasm = named(&plugin_wasm("max-pull"), "max-pull", dir.path());
    assert_all_pass(&wasm, &repo().join("plugins/max-pull/cases"), cache.path(), 7);
}

#[test]
fn max_pull_passes_the_same_cases_in_python_and_loads_from_the_cache_the_second_time() {
    skip_unless!(has("componentize-py"), "componentize-py is not installed (`pip install componentize-py`)");
    let dir = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let wasm = dir.path().join("max-pull.wasm");
    componentize_py(&repo().join("plugins/max-pull/python"), "quota-policy", &wasm, true);

    let cases = repo().join("plugins/max-pull/cases");
    let first = assert_all_pass(&wasm, &cases, cache.path(), 7);
    assert!(first.lines().next().unwrap().contains("compiled, now cached"), "{first}");
    let second = assert_all_pass(&wasm, &cases, cache.path(), 7);
    assert!(second.lines().next().unwrap().contains("from the compiled cache"), "{second}");
}

#[test]
fn max_pull_passes_the_same_cases_in_javascript() {
    skip_unless!(has("npm"), "npm is not installed");
    let dir = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let wasm = dir.path().join("max-pull.wasm");
    jco_componentize(&repo().join("plugins/max-pull/js/policy.js"), &wit_dir(), "quota-policy", &wasm, true);
    assert_all_pass(&wasm, &repo().join("plugins/max-pull/cases"), cache.path(), 7);
}

#[test]
fn unstubbed_python_and_javascript_builds_are_refused_with_the_fix() {
    skip_unless!(has("componentize-py"), "componentize-py is not installed (`pip install componentize-py`)");
    skip_unless!(has("npm"), "npm is not installed");
    let dir = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let cases = repo().join("plugins/max-pull/cases");

    let python = dir.path().join("max-pull-py.wasm");
    componentize_py(&repo().join("plugins/max-pull/python"), "quota-policy", &python, false);
    let (ok, stdout, stderr) = plugins_test(&python, &cases, cache.path());
    assert!(!ok, "{stdout}");
    assert!(stderr.contains("plugin `max-pull-py` imports `wasi:"), "{stderr}");
    assert!(stderr.contains("componentize-py ... componentize --stub-wasi"), "{stderr}");

    let js = dir.path().join("max-pull-js.wasm");
    jco_componentize(&repo().join("plugins/max-pull/js/policy.js"), &wit_dir(), "quota-policy", &js, false);
    let (ok, stdout, stderr) = plugins_test(&js, &cases, cache.path());
    assert!(!ok, "{stdout}");
    assert!(stderr.contains("plugin `max-pull-js` imports `wasi:"), "{stderr}");
    assert!(stderr.contains("jco componentize ... --disable all"), "{stderr}");
}

/// `plugins new NAME --lang LANG --decision DECISION` in `dir`; the project.
fn new_project(dir: &Path, name: &str, lang: &str, decision: &str) -> PathBuf {
    let output = run(modelcache().args(["plugins", "new", name, "--lang", lang, "--decision", decision, "--dir"]).arg(dir));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("modelcache plugins test"), "{stdout}");
    let project = dir.join(name);
    assert!(project.join("wit/policy.wit").is_file() && project.join("README.md").is_file());
    assert_eq!(
        std::fs::read_to_string(project.join("wit/policy.wit")).unwrap(),
        std::fs::read_to_string(wit_dir().join("policy.wit")).unwrap(),
        "the project builds against the WIT this host speaks"
    );
    project
}

#[test]
fn new_rust_projects_build_and_pass_their_case() {
    let dir = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    // Reused across runs, so only the first run compiles wit-bindgen.
    let target = support::target_dir().join("plugins-new-rust");
    for decision in ["exclude", "quota", "gc"] {
        let name = format!("starter-{decision}");
        let project = new_project(dir.path(), &name, "rust", decision);
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        run(Command::new(cargo)
            .args(["build", "--release", "--target", "wasm32-wasip2"])
            .env("CARGO_TARGET_DIR", &target)
            .current_dir(&project));
        let wasm = named(&target.join(format!("wasm32-wasip2/release/starter_{decision}.wasm")), &name, dir.path());
        assert_all_pass(&wasm, &project.join("cases"), cache.path(), 1);
    }
}

#[test]
fn new_python_projects_build_and_pass_their_case() {
    skip_unless!(has("componentize-py"), "componentize-py is not installed (`pip install componentize-py`)");
    let dir = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    for decision in ["exclude", "quota", "gc"] {
        let name = format!("starter-{decision}");
        let project = new_project(dir.path(), &name, "python", decision);
        // The build command the project's README gives.
        run(Command::new("componentize-py")
            .args(["-d", "wit", "-w", &format!("{decision}-policy"), "componentize", "app", "-o"])
            .arg(format!("{name}.wasm"))
            .arg("--stub-wasi")
            .current_dir(&project));
        assert_all_pass(&project.join(format!("{name}.wasm")), &project.join("cases"), cache.path(), 1);
    }
}

#[test]
fn new_javascript_projects_build_and_pass_their_case() {
    skip_unless!(has("npm"), "npm is not installed");
    let dir = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    for decision in ["exclude", "quota", "gc"] {
        let name = format!("starter-{decision}");
        let project = new_project(dir.path(), &name, "js", decision);
        // The example's toolchain stands in for `npm install`: the same
        // pinned packages, without fetching them once per project.
        std::os::unix::fs::symlink(js_toolchain(), project.join("node_modules")).unwrap();
        run(Command::new("npm").args(["run", "build"]).current_dir(&project));
        assert_all_pass(&project.join(format!("{name}.wasm")), &project.join("cases"), cache.path(), 1);
    }
}

#[test]
fn new_refuses_bad_names_and_existing_directories_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let output = modelcache().args(["plugins", "new", "../escape", "--lang", "rust", "--dir"]).arg(dir.path()).output().unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("`../escape` is not a valid policy name"));
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "nothing written");

    new_project(dir.path(), "taken", "python", "quota");
    let output = modelcache().args(["plugins", "new", "taken", "--lang", "js", "--dir"]).arg(dir.path()).output().unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("taken already exists"));
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|entry| entry.unwrap().file_name()).collect();
    assert_eq!(names, ["taken"], "no staging directory left behind");
    assert!(!dir.path().join("taken/package.json").exists(), "the existing project is untouched");
}

#[test]
fn bench_prints_the_median_and_p99_of_a_case() {
    let cache = tempfile::tempdir().unwrap();
    let output = run(modelcache()
        .args(["plugins", "bench"])
        .arg(plugin_wasm("quota-watermark"))
        .arg("--input")
        .arg(repo().join("plugins/quota-watermark/cases/quota.json"))
        .args(["--seconds", "0.2", "--cache-dir"])
        .arg(cache.path()));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let field = |name: &str| -> f64 {
        let line = stdout.lines().find(|line| line.starts_with(name)).unwrap_or_else(|| panic!("no {name} in:\n{stdout}"));
        let mut words = line[name.len()..].split_whitespace();
        let value: f64 = words.next().unwrap().parse().unwrap_or_else(|_| panic!("{name} is not a number in:\n{stdout}"));
        match words.next() {
            Some("ms") => value * 1e3,
            _ => value,
        }
    };
    assert!(field("calls") >= 10.0, "{stdout}");
    let (median, p99) = (field("median"), field("p99"));
    assert!(median > 0.0 && p99 >= median, "{stdout}");
    assert!(stdout.contains("decision   quota"), "{stdout}");
}
