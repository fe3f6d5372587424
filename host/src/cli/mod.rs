//! Command-line interface: argument parsing, logging, and one module per
//! command group. Errors end here as `anyhow` with their causes printed.

/// `println!` for a command's output. A reader that stops early
/// (`modelcache ls | head`) ends the command quietly instead of panicking.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(error) = writeln!(std::io::stdout().lock(), $($arg)*) {
            if error.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
            panic!("writing to stdout: {error}");
        }
    }};
}

mod backend;
mod cache;
mod plugins;
mod scaffold;
mod serve;
mod volumes;

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;

/// A node-local cache engine for ModelPack OCI model artifacts.
#[derive(Debug, Parser)]
#[command(name = "modelcache", version, about, propagate_version = true)]
struct Cli {
    /// Log format on stderr (default text; `serve` takes it from its config).
    #[arg(long, global = true, value_enum, env = "MODELCACHE_LOG_FORMAT")]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon: the API on a unix socket, metrics, GC, plugin reloads.
    Serve(serve::ServeArgs),
    /// Exit 0 when a daemon answers on the socket (for probes), else 1.
    Health(serve::HealthArgs),
    /// Mount a model into a volume (pulling it into the cache if needed).
    Mount(volumes::MountArgs),
    /// Release a volume: remove its tree and let GC collect its model.
    Unmount(volumes::VolumeArgs),
    /// A volume's record, with progress while it pulls.
    Status(volumes::VolumeArgs),
    /// List the volume records.
    Ls(volumes::ListArgs),
    /// Pull a model into the cache with no volume (optionally pinned).
    Prefetch(volumes::PrefetchArgs),
    /// Show what a reference resolves to, its files, and what is cached.
    Inspect(volumes::InspectArgs),
    /// Pack a directory as a ModelPack model (one layer per file) and push it.
    Push(volumes::PushArgs),
    /// Collect garbage: evict what the gc plugins choose among unused entries.
    Gc(cache::GcArgs),
    /// Disk use per entry (on disk, exclusive, shared) and who references it.
    Du(cache::DuArgs),
    /// Pin a model so GC never evicts it; without an argument, list the pins.
    Pin(cache::PinArgs),
    /// Remove a pin.
    Unpin(cache::PinArgs),
    /// Inspect, run and check policy plugins.
    #[command(subcommand)]
    Plugins(plugins::PluginsCommand),
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    raise_open_file_limit();
    let outcome = match cli.command {
        Command::Serve(args) => serve::run(args, cli.log_format),
        command => {
            init_logging(cli.log_format.unwrap_or(LogFormat::Text), "info");
            run(command)
        }
    };
    match outcome {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Raises the soft limit on open files to the hard one: building and
/// walking a tree holds a few directory handles per level, several trees
/// may be built at once, and a container's soft limit is often 1,024.
fn raise_open_file_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        let raised = rustix::process::Rlimit { current: limit.maximum, maximum: limit.maximum };
        if let Err(error) = setrlimit(Resource::Nofile, raised) {
            tracing::debug!("cannot raise the open-file limit: {error}");
        }
    }
}

fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Serve(_) => unreachable!("served above"),
        Command::Health(args) => serve::health(args),
        Command::Mount(args) => volumes::mount(args),
        Command::Unmount(args) => volumes::unmount(args),
        Command::Status(args) => volumes::status(args),
        Command::Prefetch(args) => volumes::prefetch(args),
        Command::Ls(args) => volumes::list(args),
        Command::Inspect(args) => volumes::inspect(args),
        Command::Push(args) => volumes::push(args),
        Command::Gc(args) => cache::gc(args),
        Command::Du(args) => cache::du(args),
        Command::Pin(args) => cache::pin(args),
        Command::Unpin(args) => cache::unpin(args),
        Command::Plugins(command) => plugins::run(command),
    }
}

/// Logs go to stderr, filtered by `MODELCACHE_LOG` (e.g. `debug`,
/// `modelcache=debug,info`), else `default_level`.
fn init_logging(format: LogFormat, default_level: &str) {
    let filter = EnvFilter::try_from_env("MODELCACHE_LOG").unwrap_or_else(|_| EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// The default place for compiled plugin components.
fn default_cache_dir() -> Option<std::path::PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| std::path::PathBuf::from(home).join(".cache")))?;
    Some(base.join("modelcache").join("components"))
}
