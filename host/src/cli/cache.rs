//! `modelcache gc | du | pin | unpin`: what the cache holds and what it gives back.

use std::process::ExitCode;

use modelcache_policy::size::HumanBytes;

use super::backend::RootArgs;

#[derive(Debug, clap::Args)]
pub struct GcArgs {
    /// Report what would be freed and why, and change nothing.
    #[arg(long)]
    pub dry_run: bool,
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub root: RootArgs,
}

#[derive(Debug, clap::Args)]
pub struct DuArgs {
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub root: RootArgs,
}

#[derive(Debug, clap::Args)]
pub struct PinArgs {
    /// A reference (resolved now) or a bare `sha256:` manifest digest; none lists the pins.
    pub target: Option<String>,
    #[command(flatten)]
    pub root: RootArgs,
}

pub fn gc(args: GcArgs) -> anyhow::Result<ExitCode> {
    let report = args.root.with_backend(|backend| async move { backend.gc(args.dry_run).await })?;
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    let verb = if report.dry_run { "would evict" } else { "evicted" };
    for eviction in &report.evicted {
        let last_used = eviction
            .last_used_at
            .and_then(|at| at.format(&time::format_description::well_known::Rfc3339).ok())
            .unwrap_or_else(|| "never".into());
        outln!(
            "{verb} {} ({} exclusive of {}; chosen by {}; last used {last_used}; {})",
            eviction.key,
            HumanBytes(eviction.exclusive_bytes),
            HumanBytes(eviction.bytes_on_disk),
            eviction.plugin,
            if eviction.references.is_empty() { "no reference".to_owned() } else { eviction.references.join(", ") },
        );
    }
    for (digest, bytes) in &report.blobs {
        outln!(
            "{} unneeded blob {} ({})",
            if report.dry_run { "would remove" } else { "removed" },
            digest.short(),
            HumanBytes(*bytes)
        );
    }
    for path in &report.records {
        outln!("pruned {}", path.display());
    }
    for failure in &report.failures {
        outln!("plugin failure: {failure}");
    }
    outln!(
        "{} of {} candidates; {} {}",
        report.evicted.len(),
        report.candidates,
        if report.dry_run { "would free" } else { "freed" },
        HumanBytes(report.freed_bytes)
    );
    Ok(ExitCode::SUCCESS)
}

pub fn du(args: DuArgs) -> anyhow::Result<ExitCode> {
    let report = args.root.with_backend(|backend| async move { backend.du().await })?;
    if args.json {
        outln!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    outln!("{:<88} {:>10} {:>10} {:>10}  REFERENCED BY", "ENTRY", "ON DISK", "EXCLUSIVE", "SHARED");
    for entry in &report.entries {
        let mut holders = entry.referenced_by.join(", ");
        if entry.pinned {
            holders = if holders.is_empty() { "pinned".into() } else { format!("{holders} (pinned)") };
        }
        outln!(
            "{:<88} {:>10} {:>10} {:>10}  {}",
            entry.key.to_string(),
            HumanBytes(entry.bytes_on_disk).to_string(),
            HumanBytes(entry.exclusive_bytes).to_string(),
            HumanBytes(entry.shared_bytes).to_string(),
            if holders.is_empty() { "-".into() } else { holders },
        );
    }
    let totals = report.totals;
    outln!(
        "entries {} + unreferenced blobs {} + volume copies {} + metadata {} = {} ({} bytes, each inode once)",
        HumanBytes(totals.entries),
        HumanBytes(totals.unreferenced),
        HumanBytes(totals.volume_copies),
        HumanBytes(totals.metadata),
        HumanBytes(totals.total),
        totals.total
    );
    Ok(ExitCode::SUCCESS)
}

pub fn pin(args: PinArgs) -> anyhow::Result<ExitCode> {
    let target = &args.target;
    args.root.with_backend(|backend| async move {
        match target {
            Some(target) => {
                let pin = backend.pin(target).await?;
                outln!("pinned {} ({})", pin.digest, pin.reference);
            }
            None => {
                for pin in backend.pins().await? {
                    outln!("{} {}", pin.digest, pin.reference);
                }
            }
        }
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

pub fn unpin(args: PinArgs) -> anyhow::Result<ExitCode> {
    let Some(target) = args.target.clone() else {
        anyhow::bail!("name what to unpin: a reference or a sha256: digest");
    };
    let unpinning = &target;
    if args.root.with_backend(|backend| async move { backend.unpin(unpinning).await })? {
        outln!("unpinned {target}");
    } else {
        outln!("{target} was not pinned");
    }
    Ok(ExitCode::SUCCESS)
}
