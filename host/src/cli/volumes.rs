//! `modelcache mount | unmount | ls | inspect | push`: the engine on a root
//! directory, without a daemon.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use modelcache::engine::{Engine, EngineConfig, MountRequest};
use modelcache::plugins::exclude::ExcludeOptions;
use modelcache::registry::{ModelRef, Registry, RegistryConfig};
use modelcache::volumes::{MountId, VolumeId, VolumeRecord, Volumes};
use modelcache_policy::size::HumanBytes;

/// Where the engine works; shared by the commands that open it.
#[derive(Debug, Clone, clap::Args)]
pub struct RootArgs {
    /// The cache's root directory.
    #[arg(long, env = "MODELCACHE_ROOT", default_value = "/var/lib/modelcache")]
    pub root: PathBuf,
    /// The policy plugin directory (NAME.wasm + NAME.toml).
    #[arg(long = "plugins", env = "MODELCACHE_PLUGINS")]
    pub plugin_dir: Option<PathBuf>,
    /// Where volume trees go (default ROOT/volumes).
    #[arg(long, env = "MODELCACHE_VOLUMES")]
    pub volumes_dir: Option<PathBuf>,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

/// How to reach registries.
#[derive(Debug, Clone, clap::Args)]
pub struct RegistryArgs {
    /// A registry (host[:port]) to reach over plain HTTP; repeatable.
    #[arg(long = "insecure-registry", env = "MODELCACHE_INSECURE_REGISTRIES", value_delimiter = ',')]
    pub insecure: Vec<String>,
    /// The directory holding a docker config.json (default $DOCKER_CONFIG, then ~/.docker).
    #[arg(long, env = "DOCKER_CONFIG")]
    pub docker_config: Option<PathBuf>,
}

impl RegistryArgs {
    pub fn config(&self) -> RegistryConfig {
        RegistryConfig { insecure: self.insecure.clone(), docker_config: self.docker_config.clone(), ..RegistryConfig::default() }
    }
}

impl RootArgs {
    pub fn open(&self) -> anyhow::Result<Arc<Engine>> {
        let mut config = EngineConfig::new(&self.root);
        config.plugin_dir.clone_from(&self.plugin_dir);
        config.volumes_dir.clone_from(&self.volumes_dir);
        config.registry = self.registry.config();
        Engine::open(config).with_context(|| format!("opening the cache at {}", self.root.display()))
    }
}

#[derive(Debug, clap::Args)]
pub struct MountArgs {
    /// The model reference: registry/repository:tag or …@sha256:….
    pub reference: String,
    /// The volume to fill.
    #[arg(long)]
    pub volume: String,
    /// Tells several mounts of one volume apart.
    #[arg(long, default_value = "default")]
    pub mount_id: String,
    /// Leave the weights out (needs an exclude plugin).
    #[arg(long)]
    pub exclude_weights: bool,
    /// A gitignore-style pattern of files to leave out; repeatable.
    #[arg(long = "exclude")]
    pub patterns: Vec<String>,
    /// Print the record as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub root: RootArgs,
}

#[derive(Debug, clap::Args)]
pub struct UnmountArgs {
    #[arg(long)]
    pub volume: String,
    #[arg(long, default_value = "default")]
    pub mount_id: String,
    #[command(flatten)]
    pub root: RootArgs,
}

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    #[arg(long)]
    pub json: bool,
    /// The cache's root directory.
    #[arg(long, env = "MODELCACHE_ROOT", default_value = "/var/lib/modelcache")]
    pub root: PathBuf,
}

#[derive(Debug, clap::Args)]
pub struct InspectArgs {
    pub reference: String,
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub root: RootArgs,
}

#[derive(Debug, clap::Args)]
pub struct PushArgs {
    /// The directory to pack, one layer per file.
    pub dir: PathBuf,
    /// Where to push it: registry/repository:tag.
    pub reference: String,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the async runtime")
}

/// Runs one future to completion on a fresh runtime.
pub fn block_on<T>(future: impl std::future::Future<Output = T>) -> anyhow::Result<T> {
    Ok(runtime()?.block_on(future))
}

pub fn mount(args: MountArgs) -> anyhow::Result<ExitCode> {
    let request = MountRequest {
        volume: VolumeId::new(&args.volume)?,
        mount_id: MountId::new(&args.mount_id)?,
        reference: args.reference.clone(),
        options: ExcludeOptions { exclude_weights: args.exclude_weights, patterns: args.patterns.clone() },
    };
    let engine = args.root.open()?;
    let record = runtime()?.block_on(async {
        let mut handle = engine.start_mount(request.clone())?;
        let bar = progress_bar();
        let waited = async {
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                if let Some((done, total)) = engine.progress(&request.volume, &request.mount_id) {
                    bar.update(done, total);
                }
            }
        };
        tokio::select! {
            record = handle.wait() => { bar.finish(); record }
            () = waited => unreachable!("the progress loop never ends"),
        }
    })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&record)?);
    } else {
        println!(
            "{}/{}: {} ({}) ready at {}",
            record.volume,
            record.mount_id,
            record.reference,
            record.digest.as_ref().map(|digest| digest.short()).unwrap_or_default(),
            record.path.display()
        );
        let source = if record.reused_from_cache {
            "from the cache"
        } else if record.coalesced {
            "joined a pull under way"
        } else {
            "pulled"
        };
        let method = record.link_method.map(|method| method.as_str()).unwrap_or("nothing to link");
        println!("  {} {source}, {method}, {} files left out", HumanBytes(record.bytes_total), record.skipped.len());
    }
    Ok(ExitCode::SUCCESS)
}

/// A progress bar on a terminal, a log line per 10% otherwise.
enum Bar {
    Terminal(indicatif::ProgressBar),
    Log(std::cell::Cell<u64>),
}

fn progress_bar() -> Bar {
    if std::io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
                .expect("a valid template")
                .progress_chars("=> "),
        );
        Bar::Terminal(bar)
    } else {
        Bar::Log(std::cell::Cell::new(0))
    }
}

impl Bar {
    fn update(&self, done: u64, total: u64) {
        match self {
            Bar::Terminal(bar) => {
                bar.set_length(total);
                bar.set_position(done);
            }
            Bar::Log(last_percent) => {
                let percent = if total == 0 { 0 } else { done * 100 / total };
                if percent >= last_percent.get() + 10 {
                    last_percent.set(percent - percent % 10);
                    tracing::info!("pulled {} of {} ({percent}%)", HumanBytes(done), HumanBytes(total));
                }
            }
        }
    }

    fn finish(&self) {
        if let Bar::Terminal(bar) = self {
            bar.finish_and_clear();
        }
    }
}

pub fn unmount(args: UnmountArgs) -> anyhow::Result<ExitCode> {
    let volume = VolumeId::new(&args.volume)?;
    let mount_id = MountId::new(&args.mount_id)?;
    let engine = args.root.open()?;
    let record = block_on(engine.unmount(&volume, &mount_id))??;
    println!("{}/{}: released ({})", record.volume, record.mount_id, record.reference);
    Ok(ExitCode::SUCCESS)
}

/// Reads the records without the root lock: they are replaced atomically.
pub fn list(args: ListArgs) -> anyhow::Result<ExitCode> {
    let layout = modelcache::store::Layout::new(&args.root);
    let records = Volumes::new(layout.records(), layout.default_volumes()).list();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&records)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("{:<28} {:<10} {:<9} {:<22} {:>10} {:<9} REFERENCE", "VOLUME", "MOUNT", "STATE", "DIGEST", "BYTES", "LINK");
    for record in &records {
        println!("{}", list_line(record));
    }
    Ok(ExitCode::SUCCESS)
}

fn list_line(record: &VolumeRecord) -> String {
    let state = serde_json::to_value(record.state).ok().and_then(|value| value.as_str().map(str::to_owned)).unwrap_or_default();
    format!(
        "{:<28} {:<10} {:<9} {:<22} {:>10} {:<9} {}",
        record.volume.as_str(),
        record.mount_id.as_str(),
        state,
        record.digest.as_ref().map(|digest| digest.short()).unwrap_or_else(|| "-".into()),
        HumanBytes(record.bytes_total).to_string(),
        record.link_method.map(|method| method.as_str()).unwrap_or("-"),
        record.reference,
    )
}

pub fn inspect(args: InspectArgs) -> anyhow::Result<ExitCode> {
    let engine = args.root.open()?;
    let inspection = block_on(engine.inspect(&args.reference))??;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&inspection)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("{} -> {}", inspection.reference, inspection.digest);
    println!("{:<48} {:>10} {:<7} MEDIA TYPE", "PATH", "SIZE", "CACHED");
    for layer in &inspection.layers {
        println!(
            "{:<48} {:>10} {:<7} {}",
            layer.path,
            HumanBytes(layer.size).to_string(),
            if layer.cached { "yes" } else { "no" },
            layer.media_type
        );
    }
    for entry in &inspection.entries {
        println!("cached tree: {entry}");
    }
    Ok(ExitCode::SUCCESS)
}

pub fn push(args: PushArgs) -> anyhow::Result<ExitCode> {
    let reference = ModelRef::parse(&args.reference)?;
    let registry = Registry::new(args.registry.config())?;
    let digest = runtime()?
        .block_on(modelcache::pack::push_dir(&registry, &reference, &args.dir))
        .with_context(|| format!("pushing {} as {}", args.dir.display(), reference))?;
    println!("{reference}@{digest}");
    Ok(ExitCode::SUCCESS)
}
