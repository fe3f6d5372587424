//! `modelcache plugins …`: what operators and policy authors run against
//! plugin files, without a daemon.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Subcommand;
use modelcache::plugins::exclude::ExcludeInput;
use modelcache::plugins::gc::GcInput;
use modelcache::plugins::quota::QuotaInput;
use modelcache::plugins::{
    CompiledCache, Decision, Plugin, PluginConfig, PluginHost, PluginStatus, Runtime, RuntimeOptions, error_chain,
};

use super::backend::RootArgs;
use super::volumes::block_on;

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
            let statuses = block_on(async { root.backend().await?.plugins(false).await })??;
            print_statuses(&statuses, json)
        }
        PluginsCommand::Reload { json, root } => {
            let statuses = block_on(async { root.backend().await?.plugins(true).await })??;
            print_statuses(&statuses, json)
        }
        PluginsCommand::Run { plugin, decision, input, settings, cache } => {
            run_one(&plugin, decision, &input, settings.as_deref(), &cache)
        }
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
        println!("{}", serde_json::to_string_pretty(statuses)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("{:<24} {:<8} {:<18} {:<14} DETAIL", "NAME", "STATE", "DECISIONS", "SHA256");
    for status in statuses {
        let decisions: Vec<&str> = status.decisions.iter().map(|decision| decision.as_str()).collect();
        let sha = status.sha256.as_deref().map(|sha| &sha[..12]).unwrap_or("-");
        println!(
            "{:<24} {:<8} {:<18} {:<14} {}",
            status.name,
            if status.loaded { "loaded" } else { "refused" },
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
    let config_path = wasm.with_extension("toml");
    let mut config = PluginConfig::load(&config_path)
        .map_err(|reason| anyhow::anyhow!("{}: {reason}", config_path.display()))?;
    if let Some(settings) = settings {
        config.settings_json = read_settings(settings)?;
    }
    let input_text = read_input(input)?;
    let plugin = Plugin::load(&runtime()?, cache.cache().as_ref(), wasm, config)
        .map_err(|error| anyhow::anyhow!(error_chain(&error)))?;
    if !plugin.serves(decision) {
        bail!("plugin `{}` does not serve the {decision} decision (it serves: {:?})", plugin.name(), plugin.decisions());
    }
    let parse_error = || format!("{}: not a valid {decision} input", input.display());
    let answer = match decision {
        Decision::Exclude => {
            let input: ExcludeInput = serde_json::from_str(&input_text).with_context(parse_error)?;
            plugin.exclude(&input).map(|skips| serde_json::json!({ "skips": skips }))
        }
        Decision::Quota => {
            let input: QuotaInput = serde_json::from_str(&input_text).with_context(parse_error)?;
            plugin.quota(&input).map(|verdict| serde_json::to_value(verdict).expect("verdicts serialize"))
        }
        Decision::Gc => {
            let input: GcInput = serde_json::from_str(&input_text).with_context(parse_error)?;
            plugin.gc(&input).map(|evict| serde_json::json!({ "evict": evict }))
        }
    };
    match answer {
        Ok(answer) => {
            println!("{}", serde_json::to_string_pretty(&answer)?);
            Ok(ExitCode::SUCCESS)
        }
        Err(cause) => {
            eprintln!("error: {decision} plugin `{}` failed: {cause}", plugin.name());
            Ok(ExitCode::FAILURE)
        }
    }
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
