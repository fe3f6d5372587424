//! `modelcache mount | unmount | status | ls | inspect | prefetch | push`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use modelcache::engine::MountRequest;
use modelcache::plugins::exclude::ExcludeOptions;
use modelcache::registry::{ModelRef, Registry};
use modelcache::volumes::{MountId, Origin, VolumeId, VolumeRecord};
use modelcache_api::tenancy::{RegistryCredentials, Requester, Secret};
use modelcache_policy::size::HumanBytes;

use super::backend::{RegistryArgs, RootArgs, Threads, runtime};

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
    #[command(flatten)]
    pub exclude: ExcludeArgs,
    #[command(flatten)]
    pub requester: RequesterArgs,
    /// A docker `config.json` whose credentials this mount uses before the
    /// node's (as a pod's pull secret). Sent to the daemon, never stored.
    #[arg(long, value_name = "FILE")]
    pub pull_secret: Option<PathBuf>,
    /// Print the record as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub root: RootArgs,
}

/// Who the mount is for, as the CSI driver states it for a pod; admission
/// policies decide on it. Only the admin socket may state it.
#[derive(Debug, clap::Args)]
pub struct RequesterArgs {
    /// The pod's namespace.
    #[arg(long)]
    pub namespace: Option<String>,
    /// The pod's name.
    #[arg(long)]
    pub pod: Option<String>,
    /// The pod's UID.
    #[arg(long)]
    pub pod_uid: Option<String>,
    /// The pod's service account.
    #[arg(long)]
    pub service_account: Option<String>,
}

impl RequesterArgs {
    fn requester(&self) -> Requester {
        Requester {
            namespace: self.namespace.clone(),
            pod: self.pod.clone(),
            pod_uid: self.pod_uid.clone(),
            service_account: self.service_account.clone(),
            volume: None,
        }
    }
}

/// What to leave out of a model.
#[derive(Debug, clap::Args)]
pub struct ExcludeArgs {
    /// Leave the weights out (needs an exclude plugin).
    #[arg(long)]
    pub exclude_weights: bool,
    /// A gitignore-style pattern of files to leave out; repeatable.
    #[arg(long = "exclude")]
    pub patterns: Vec<String>,
}

impl ExcludeArgs {
    fn options(&self) -> ExcludeOptions {
        ExcludeOptions { exclude_weights: self.exclude_weights, patterns: self.patterns.clone() }
    }
}

#[derive(Debug, clap::Args)]
pub struct VolumeArgs {
    #[arg(long)]
    pub volume: String,
    #[arg(long, default_value = "default")]
    pub mount_id: String,
    /// Print the record as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub root: RootArgs,
}

impl VolumeArgs {
    fn ids(&self) -> anyhow::Result<(VolumeId, MountId)> {
        Ok((VolumeId::new(&self.volume)?, MountId::new(&self.mount_id)?))
    }
}

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub root: RootArgs,
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
pub struct PrefetchArgs {
    pub reference: String,
    /// Pin the model so GC never evicts it.
    #[arg(long)]
    pub pin: bool,
    #[command(flatten)]
    pub exclude: ExcludeArgs,
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

fn print_json(value: &impl serde::Serialize) -> anyhow::Result<ExitCode> {
    outln!("{}", serde_json::to_string_pretty(value)?);
    Ok(ExitCode::SUCCESS)
}

pub fn mount(args: MountArgs) -> anyhow::Result<ExitCode> {
    let request = MountRequest {
        volume: VolumeId::new(&args.volume)?,
        mount_id: MountId::new(&args.mount_id)?,
        reference: ModelRef::parse(&args.reference)?,
        options: args.exclude.options(),
        requester: args.requester.requester(),
        credentials: match &args.pull_secret {
            Some(file) => Some(RegistryCredentials {
                docker_config_json: Some(Secret::new(
                    std::fs::read_to_string(file).with_context(|| format!("reading the pull secret {}", file.display()))?,
                )),
                ..RegistryCredentials::default()
            }),
            None => None,
        },
    };
    let record = args.root.with_backend(|backend| async move {
        let bar = progress_bar();
        let record = backend.mount(request, bar.tick(), |done, total| bar.update(done, total)).await;
        bar.finish();
        record
    })?;
    if args.json {
        return print_json(&record);
    }
    outln!(
        "{}/{}: {} ({}) ready at {}",
        record.volume,
        record.mount_id,
        record.reference,
        record.digest().map(|digest| digest.short()).unwrap_or_default(),
        record.path.display()
    );
    let source = match record.origin {
        Some(Origin::Cached) => "from the cache",
        Some(Origin::Joined) => "joined a pull under way",
        Some(Origin::Pulled) | None => "pulled",
    };
    let method = record.link_method.map(|method| method.as_str()).unwrap_or("nothing to link");
    outln!("  {} {source}, {method}, {} files left out", HumanBytes(record.bytes_total), record.skipped.len());
    if let Some(requester) = &record.requester {
        outln!("  for {requester}");
    }
    if let Some(signer) = &record.verified_by {
        outln!("  signed by {signer}");
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
    /// How often the bar wants news. A log line comes at most every 10 %,
    /// so a second is plenty; every poll is a request to the daemon, and
    /// 64 mounts polling four times a second took CPU from the pull they
    /// wait for (B3 in docs/benchmarks.md).
    fn tick(&self) -> std::time::Duration {
        match self {
            Bar::Terminal(_) => std::time::Duration::from_millis(250),
            Bar::Log(_) => std::time::Duration::from_secs(1),
        }
    }

    fn update(&self, done: u64, total: u64) {
        match self {
            Bar::Terminal(bar) => {
                bar.set_length(total);
                bar.set_position(done);
            }
            Bar::Log(last_percent) => {
                let percent = (done * 100).checked_div(total).unwrap_or(0);
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

pub fn unmount(args: VolumeArgs) -> anyhow::Result<ExitCode> {
    let (volume, mount_id) = args.ids()?;
    let record = args.root.with_backend(|backend| async move { backend.unmount(&volume, &mount_id).await })?;
    if args.json {
        return print_json(&record);
    }
    outln!("{}/{}: released ({})", record.volume, record.mount_id, record.reference);
    Ok(ExitCode::SUCCESS)
}

pub fn status(args: VolumeArgs) -> anyhow::Result<ExitCode> {
    let (volume, mount_id) = args.ids()?;
    let record = args.root.with_backend(|backend| async move { backend.status(&volume, &mount_id).await })?;
    if args.json {
        return print_json(&record);
    }
    outln!("{}", list_line(&record));
    if let Some(error) = &record.error() {
        outln!("  error ({}): {}", error.kind, error.message);
    }
    Ok(ExitCode::SUCCESS)
}

pub fn list(args: ListArgs) -> anyhow::Result<ExitCode> {
    let records = match args.root.daemon() {
        Some(client) => runtime(Threads::One)?.block_on(client.get::<Vec<VolumeRecord>>("/v1/volumes"))?,
        None => args.root.records(),
    };
    if args.json {
        return print_json(&records);
    }
    outln!(
        "{:<28} {:<10} {:<9} {:<22} {:>10} {:<9} {:<16} REFERENCE",
        "VOLUME",
        "MOUNT",
        "STATE",
        "DIGEST",
        "BYTES",
        "LINK",
        "NAMESPACE"
    );
    for record in &records {
        outln!("{}", list_line(record));
    }
    Ok(ExitCode::SUCCESS)
}

fn list_line(record: &VolumeRecord) -> String {
    let state = serde_json::to_value(record.state()).ok().and_then(|value| value.as_str().map(str::to_owned)).unwrap_or_default();
    format!(
        "{:<28} {:<10} {:<9} {:<22} {:>10} {:<9} {:<16} {}",
        record.volume.as_str(),
        record.mount_id.as_str(),
        state,
        record.digest().map(|digest| digest.short()).unwrap_or_else(|| "-".into()),
        HumanBytes(record.bytes_total).to_string(),
        record.link_method.map(|method| method.as_str()).unwrap_or("-"),
        record.requester.as_ref().and_then(|requester| requester.namespace.as_deref()).unwrap_or("-"),
        record.reference,
    )
}

pub fn inspect(args: InspectArgs) -> anyhow::Result<ExitCode> {
    let inspection = args.root.with_backend(|backend| async move { backend.inspect(&args.reference).await })?;
    if args.json {
        return print_json(&inspection);
    }
    outln!("{} -> {}", inspection.reference, inspection.digest);
    outln!("{:<48} {:>10} {:<7} MEDIA TYPE", "PATH", "SIZE", "CACHED");
    for layer in &inspection.layers {
        outln!(
            "{:<48} {:>10} {:<7} {}",
            layer.path,
            HumanBytes(layer.size).to_string(),
            if layer.cached { "yes" } else { "no" },
            layer.media_type
        );
    }
    for entry in &inspection.entries {
        outln!("cached tree: {entry}");
    }
    let signatures = &inspection.signatures;
    let referrers: Vec<&str> = signatures.referrers.iter().map(|(artifact_type, _)| artifact_type.as_str()).collect();
    outln!(
        "signatures: {} cosign; referrers: {}; signature layers: {}",
        signatures.cosign,
        if referrers.is_empty() { "none".to_owned() } else { referrers.join(", ") },
        if signatures.layers.is_empty() { "none".to_owned() } else { signatures.layers.join(", ") },
    );
    match (&signatures.trusted, &signatures.refused) {
        (Some(signer), _) => outln!("signed by: {signer}"),
        (_, Some(reason)) => outln!("not trusted: {reason}"),
        _ => outln!("no verify policy installed"),
    }
    Ok(ExitCode::SUCCESS)
}

pub fn prefetch(args: PrefetchArgs) -> anyhow::Result<ExitCode> {
    let options = args.exclude.options();
    let status = args.root.with_backend(|backend| async move { backend.prefetch(&args.reference, options, args.pin).await })?;
    if args.json {
        return print_json(&status);
    }
    match status.state.as_str() {
        "ready" => outln!(
            "{}: in the cache as {} ({}, {}){}",
            status.reference,
            status.key.unwrap_or_default(),
            HumanBytes(status.bytes.unwrap_or(0)),
            status.source.unwrap_or_default(),
            if status.pinned { ", pinned" } else { "" }
        ),
        _ => outln!("{}: still pulling", status.reference),
    }
    Ok(ExitCode::SUCCESS)
}

pub fn push(args: PushArgs) -> anyhow::Result<ExitCode> {
    let reference = ModelRef::parse(&args.reference)?;
    let registry = Registry::new(args.registry.config())?;
    let digest = runtime(Threads::Workers)?
        .block_on(modelcache::pack::push_dir(&registry, &reference, &args.dir))
        .with_context(|| format!("pushing {} as {}", args.dir.display(), reference))?;
    outln!("{reference}@{digest}");
    Ok(ExitCode::SUCCESS)
}
