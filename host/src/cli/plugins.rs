//! `modelcache plugins …`: what operators and policy authors run against
//! plugin files, without a daemon.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Subcommand;
use modelcache::plugins::admission::AdmissionInput;
use modelcache::plugins::cases::{self, Case, Verdict};
use modelcache::plugins::exclude::ExcludeInput;
use modelcache::plugins::gc::GcInput;
use modelcache::plugins::quota::QuotaInput;
use modelcache::plugins::verify::VerifyInput;
use modelcache::plugins::{
    CompiledCache, CompiledPlugin, Decision, Plugin, PluginConfig, PluginHost, PluginStatus, Runtime, RuntimeOptions, error_chain,
};
use serde_json::Value;

use super::backend::RootArgs;

#[derive(Debug, Subcommand)]
pub enum PluginsCommand {
    /// List plugins: decisions served, loaded or refused and why. With
    /// `--dir`, loads that directory here; without, asks the daemon.
    Ls {
        /// A plugin directory (`NAME.wasm` and optional `NAME.toml`) to load here.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        cache: CacheArgs,
        #[command(flatten)]
        root: RootArgs,
    },
    /// Make the daemon (or the engine on the root) load its plugin directory again.
    Reload {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        root: RootArgs,
    },
    /// Run one decision of one plugin on a JSON input and print the JSON answer.
    Run {
        /// The plugin's `.wasm` file; its `NAME.toml` beside it is used if present.
        plugin: PathBuf,
        #[arg(long, value_parser = parse_decision)]
        decision: Decision,
        /// The input as JSON (`-` reads standard input).
        #[arg(long)]
        input: PathBuf,
        /// Settings to use instead of those in `NAME.toml` (`.json`, or a TOML table).
        #[arg(long)]
        settings: Option<PathBuf>,
        #[command(flatten)]
        cache: CacheArgs,
    },
    /// Run fixture cases (a case file, or a directory of them) through the
    /// real runtime; a line per case, a diff on mismatch, non-zero exit on
    /// any failure. The case format is in docs/policies.md.
    Test {
        /// The plugin's `.wasm` file; its `NAME.toml` beside it gives the
        /// defaults a case does not set.
        plugin: PathBuf,
        /// Case files (`.json`) or directories of them.
        #[arg(required = true)]
        cases: Vec<PathBuf>,
        #[command(flatten)]
        cache: CacheArgs,
    },
    /// Time one decision: per-call median and p99 (fresh instance, input
    /// lowered, call, answer checked — what the engine pays per decision).
    Bench {
        plugin: PathBuf,
        /// A case file (its decision, settings and input are used), or a bare
        /// input with `--decision`.
        #[arg(long)]
        input: PathBuf,
        #[arg(long, value_parser = parse_decision)]
        decision: Option<Decision>,
        /// Settings to use instead of those in `NAME.toml` or the case.
        #[arg(long)]
        settings: Option<PathBuf>,
        /// How long to keep calling, in seconds (at least 10 calls are made).
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        /// The per-call deadline instead of the one in `NAME.toml` or the case.
        #[arg(long)]
        timeout_ms: Option<u64>,
        /// The memory cap instead of the one in `NAME.toml` or the case.
        #[arg(long)]
        memory_mib: Option<u64>,
        #[command(flatten)]
        cache: CacheArgs,
    },
    /// Write a ready-to-build policy project with one passing case.
    New(super::scaffold::NewArgs),
}

#[derive(Debug, clap::Args)]
pub struct CacheArgs {
    /// Where compiled components are cached (default: ~/.cache/modelcache/components).
    #[arg(long, global = true)]
    cache_dir: Option<PathBuf>,
    /// Compile every component afresh.
    #[arg(long, global = true)]
    no_cache: bool,
}

impl CacheArgs {
    fn cache(&self) -> Option<CompiledCache> {
        if self.no_cache {
            return None;
        }
        self.cache_dir.clone().or_else(super::default_cache_dir).map(CompiledCache::new)
    }
}

fn parse_decision(text: &str) -> Result<Decision, String> {
    text.parse()
}

pub fn run(command: PluginsCommand) -> anyhow::Result<ExitCode> {
    match command {
        PluginsCommand::Ls { dir: Some(dir), json, cache, .. } => list(&dir, json, &cache),
        PluginsCommand::Ls { dir: None, json, root, .. } => {
            let statuses = root.with_backend(|backend| async move { backend.plugins(false).await })?;
            print_statuses(&statuses, json)
        }
        PluginsCommand::Reload { json, root } => {
            let statuses = root.with_backend(|backend| async move { backend.plugins(true).await })?;
            print_statuses(&statuses, json)
        }
        PluginsCommand::Run { plugin, decision, input, settings, cache } => {
            run_one(&plugin, decision, &input, settings.as_deref(), &cache)
        }
        PluginsCommand::Test { plugin, cases, cache } => test(&plugin, &cases, &cache),
        PluginsCommand::Bench { plugin, input, decision, settings, seconds, timeout_ms, memory_mib, cache } => {
            let limits = (timeout_ms, memory_mib);
            bench(&plugin, &input, decision, settings.as_deref(), limits, seconds, &cache)
        }
        PluginsCommand::New(args) => super::scaffold::new(&args),
    }
}

fn runtime() -> anyhow::Result<std::sync::Arc<Runtime>> {
    Runtime::new(RuntimeOptions::default()).map_err(|error| anyhow::anyhow!(error)).context("starting the plugin runtime")
}

fn list(dir: &Path, json: bool, cache: &CacheArgs) -> anyhow::Result<ExitCode> {
    if !dir.is_dir() {
        bail!("plugin directory {} does not exist", dir.display());
    }
    let host = PluginHost::open(runtime()?, cache.cache(), Some(dir.to_owned()));
    print_statuses(host.current().statuses(), json)
}

fn print_statuses(statuses: &[PluginStatus], json: bool) -> anyhow::Result<ExitCode> {
    if json {
        outln!("{}", serde_json::to_string_pretty(statuses)?);
        return Ok(ExitCode::SUCCESS);
    }
    outln!("{:<24} {:<8} {:<8} {:<28} {:<14} DETAIL", "NAME", "STATE", "WIT", "DECISIONS", "SHA256");
    for status in statuses {
        let decisions: Vec<&str> = status.decisions.iter().map(|decision| decision.as_str()).collect();
        let sha = status.sha256.as_deref().map(|sha| &sha[..12]).unwrap_or("-");
        outln!(
            "{:<24} {:<8} {:<8} {:<28} {:<14} {}",
            status.name,
            if status.loaded { "loaded" } else { "refused" },
            status.policy_version.as_deref().unwrap_or("-"),
            if decisions.is_empty() { "-".to_owned() } else { decisions.join(",") },
            sha,
            status.error.as_deref().unwrap_or(""),
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn run_one(
    wasm: &Path,
    decision: Decision,
    input: &Path,
    settings: Option<&Path>,
    cache: &CacheArgs,
) -> anyhow::Result<ExitCode> {
    let mut config = plugin_config(wasm)?;
    if let Some(settings) = settings {
        config.settings_json = read_settings(settings)?;
    }
    let input_text = read_input(input)?;
    let input: Value = serde_json::from_str(&input_text).with_context(|| format!("{}: not JSON", input.display()))?;
    let plugin =
        Plugin::load(&runtime()?, cache.cache().as_ref(), wasm, config).map_err(|error| anyhow::anyhow!(error_chain(&error)))?;
    match cases::call(&plugin, decision, input) {
        Ok(answer) => {
            outln!("{}", serde_json::to_string_pretty(&answer)?);
            Ok(ExitCode::SUCCESS)
        }
        Err(error) => {
            eprintln!("error: {decision} plugin `{}` failed: {}", plugin.name(), error_chain(&error));
            Ok(ExitCode::FAILURE)
        }
    }
}

/// The plugin's `NAME.toml` beside its `.wasm`, defaults when absent.
fn plugin_config(wasm: &Path) -> anyhow::Result<PluginConfig> {
    let path = wasm.with_extension("toml");
    PluginConfig::load(&path).map_err(|reason| anyhow::anyhow!("{}: {reason}", path.display()))
}

fn compile(runtime: &Runtime, wasm: &Path, cache: &CacheArgs) -> anyhow::Result<CompiledPlugin> {
    CompiledPlugin::load(runtime, cache.cache().as_ref(), wasm).map_err(|error| anyhow::anyhow!(error_chain(&error)))
}

fn test(wasm: &Path, paths: &[PathBuf], cache: &CacheArgs) -> anyhow::Result<ExitCode> {
    let mut all = Vec::new();
    for path in paths {
        all.extend(cases::load(path)?);
    }
    let base = plugin_config(wasm)?;
    let runtime = runtime()?;
    let compiled = compile(&runtime, wasm, cache)?;
    outln!(
        "{}: {} case{} (sha256 {}, loaded in {})",
        wasm.display(),
        all.len(),
        if all.len() == 1 { "" } else { "s" },
        &compiled.sha256[..12],
        load_summary(&compiled),
    );
    let mut failed = 0;
    for case in &all {
        let outcome = case.run(&runtime, &compiled, &base);
        let elapsed = format!("{:.1} ms", outcome.elapsed.as_secs_f64() * 1e3);
        if matches!(outcome.verdict, Verdict::Pass) {
            outln!("PASS  {}  ({elapsed})", case.name);
            continue;
        }
        failed += 1;
        outln!("FAIL  {}  ({elapsed})  {}", case.name, case.file.display());
        for line in explain(&outcome.verdict).lines() {
            outln!("      {line}");
        }
    }
    outln!("{} passed, {failed} failed", all.len() - failed);
    Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

fn load_summary(compiled: &CompiledPlugin) -> String {
    let how = match compiled.cache {
        Some(modelcache::plugins::cache::CacheOutcome::Hit) => "from the compiled cache",
        Some(modelcache::plugins::cache::CacheOutcome::Miss) => "compiled, now cached",
        None => "compiled, not cached",
    };
    format!("{:.0} ms, {how}", compiled.elapsed.as_secs_f64() * 1e3)
}

/// Why a case failed, for people: a unified diff of the answers, or what was
/// expected against what happened.
fn explain(verdict: &Verdict) -> String {
    match verdict {
        Verdict::Pass => String::new(),
        Verdict::WrongAnswer { expected, actual } => {
            let expected = pretty(expected);
            let actual = pretty(actual);
            similar::TextDiff::from_lines(&expected, &actual)
                .unified_diff()
                .context_radius(3)
                .header("expected", "actual")
                .to_string()
        }
        Verdict::UnexpectedAnswer { expected, actual } => {
            format!("expected a failure with cause `{}`, but the call answered:\n{}", expected.cause, pretty(actual))
        }
        Verdict::UnexpectedFailure { expected, actual } => format!("expected {expected}\nbut: {actual}"),
    }
}

fn pretty(value: &Value) -> String {
    serde_json::to_string_pretty(value).expect("JSON values serialize") + "\n"
}

fn bench(
    wasm: &Path,
    input: &Path,
    decision: Option<Decision>,
    settings: Option<&Path>,
    (timeout_ms, memory_mib): (Option<u64>, Option<u64>),
    seconds: f64,
    cache: &CacheArgs,
) -> anyhow::Result<ExitCode> {
    let mut config = plugin_config(wasm)?;
    let text = read_input(input)?;
    let value: Value = serde_json::from_str(&text).with_context(|| format!("{}: not JSON", input.display()))?;
    // A case file carries its decision and settings; a bare input needs --decision.
    let is_case_file = value.is_array() || (value.get("decision").is_some() && value.get("input").is_some());
    let (decision, value) = if is_case_file {
        // The first case of the file.
        let case: Vec<Case> = cases::load(input)?;
        let case = case.into_iter().next().context("the case file holds no case")?;
        config = case.config(&config);
        (decision.unwrap_or(case.decision), case.input().clone())
    } else {
        (decision.context("--decision is required when --input is not a case file")?, value)
    };
    if let Some(settings) = settings {
        config.settings_json = read_settings(settings)?;
    }
    if let Some(timeout_ms) = timeout_ms {
        config.limits.timeout = std::time::Duration::from_millis(timeout_ms);
    }
    if let Some(memory_mib) = memory_mib {
        config.limits.memory_bytes = memory_mib << 20;
    }
    let runtime = runtime()?;
    let compiled = compile(&runtime, wasm, cache)?;
    let plugin = Plugin::new(&runtime, &compiled, config).map_err(|error| anyhow::anyhow!(error_chain(&error)))?;
    let mut call = decision_call(&plugin, decision, value)?;
    // One call first: a failing decision is reported, not timed.
    call().map_err(|cause| anyhow::anyhow!("{decision} plugin `{}` failed: {cause}", plugin.name()))?;
    let budget = std::time::Duration::from_secs_f64(seconds.max(0.0));
    let started = std::time::Instant::now();
    let mut samples = Vec::new();
    while samples.len() < 10 || (started.elapsed() < budget && samples.len() < 1_000_000) {
        let call_started = std::time::Instant::now();
        call().map_err(|cause| anyhow::anyhow!("{decision} plugin `{}` failed: {cause}", plugin.name()))?;
        samples.push(call_started.elapsed());
    }
    samples.sort();
    let at = |quantile: f64| samples[((samples.len() - 1) as f64 * quantile).round() as usize];
    outln!("plugin     {} (sha256 {})", wasm.display(), &compiled.sha256[..12]);
    outln!("load       {}", load_summary(&compiled));
    outln!("allocator  {:?}", runtime.allocation());
    outln!("decision   {decision}");
    outln!("calls      {}", samples.len());
    outln!("median     {}", micros(at(0.5)));
    outln!("p99        {}", micros(at(0.99)));
    outln!("min        {}", micros(samples[0]));
    Ok(ExitCode::SUCCESS)
}

fn micros(duration: std::time::Duration) -> String {
    let micros = duration.as_secs_f64() * 1e6;
    if micros >= 10_000.0 { format!("{:.1} ms", micros / 1e3) } else { format!("{micros:.1} µs") }
}

type DecisionCall<'a> = Box<dyn FnMut() -> Result<(), modelcache::plugins::FailureCause> + 'a>;

/// One decision on a parsed input, as the engine makes it (the typed input
/// lowered afresh each call), without re-parsing JSON per call.
fn decision_call(plugin: &Plugin, decision: Decision, input: Value) -> anyhow::Result<DecisionCall<'_>> {
    let shape = || format!("not a valid {decision} input");
    Ok(match decision {
        Decision::Admission => {
            let input: AdmissionInput = serde_json::from_value(input).with_context(shape)?;
            Box::new(move || plugin.admission(&input).map(drop))
        }
        Decision::Verify => {
            let input: VerifyInput = serde_json::from_value(input).with_context(shape)?;
            Box::new(move || plugin.verify(&input).map(drop))
        }
        Decision::Exclude => {
            let input: ExcludeInput = serde_json::from_value(input).with_context(shape)?;
            Box::new(move || plugin.exclude(&input).map(drop))
        }
        Decision::Quota => {
            let input: QuotaInput = serde_json::from_value(input).with_context(shape)?;
            Box::new(move || plugin.quota(&input).map(drop))
        }
        Decision::Gc => {
            let input: GcInput = serde_json::from_value(input).with_context(shape)?;
            Box::new(move || plugin.gc(&input).map(drop))
        }
    })
}

fn read_input(path: &Path) -> anyhow::Result<String> {
    if path == Path::new("-") {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text).context("reading the input from standard input")?;
        return Ok(text);
    }
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// Settings as the JSON a plugin receives: a `.json` file as it is, any
/// other file as a TOML table.
fn read_settings(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let value: serde_json::Value = if path.extension().is_some_and(|ext| ext == "json") {
        serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?
    } else {
        let table: toml::Table = toml::from_str(&text).with_context(|| format!("{}: not a TOML table", path.display()))?;
        serde_json::to_value(table)?
    };
    Ok(value.to_string())
}
