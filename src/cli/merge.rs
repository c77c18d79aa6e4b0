//! `segq merge DIR...`: sums the confusion matrices and counts of sharded runs into one result, identical to an
//! unsharded run, writes the same reports (the worst images' overlays copied from the shard folders), and publishes the merged runs to W&B as an unsharded eval would.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use super::{GlobalArgs, load_config};
use segq::eval::results::EvalResults;
use segq::report::wandb_runs::WandbPublisher;
use segq::track::{TrackingMode, TrackingSettings};

#[derive(Args, Debug)]
pub struct MergeArgs {
    /// Result folders (or results.json files) of the shards.
    #[arg(required = true)]
    pub inputs: Vec<PathBuf>,
    /// Output folder for the merged results.
    #[arg(long, default_value = "segq-merged")]
    pub out: PathBuf,
    /// Merge even when some shards are missing; the result is marked incomplete.
    #[arg(long)]
    pub allow_partial: bool,
    /// Print every column of the table (summary.md always has them all).
    #[arg(long)]
    pub wide: bool,
    /// W&B mode for the merged runs: online, offline or disabled (default: WANDB_MODE, else tracking.mode, else
    /// online when an API key is found and offline otherwise). Settings: the shards' `[tracking]`, then --set
    /// tracking.KEY=VALUE and the WANDB_* variables, as for eval.
    #[arg(long)]
    pub wandb: Option<TrackingMode>,
}

/// The shards' tracking settings as recorded in their results (they ran with the same ones), else segq.toml's;
/// `--set tracking.*` given to merge applies on top either way.
fn tracking_settings(global: &GlobalArgs, merged: &EvalResults) -> Result<TrackingSettings> {
    let mut config = load_config(global)?;
    if let Some(recorded) = merged.config.get("tracking")
        && let Ok(recorded) = serde_json::from_value::<TrackingSettings>(recorded.clone())
    {
        config.tracking = recorded;
        for assignment in &global.set {
            config.set(assignment)?;
        }
    }
    Ok(config.tracking)
}

pub fn run(global: &GlobalArgs, args: MergeArgs) -> Result<()> {
    segq::eval::merge::check_out_dir(&args.out, &args.inputs)?;
    let mut parts = Vec::new();
    let mut part_dirs = Vec::new();
    for input in &args.inputs {
        let path = if input.is_dir() {
            input.join("results.json")
        } else {
            input.clone()
        };
        parts.push(EvalResults::read(&path)?);
        // Overlay paths in a results.json are relative to its folder.
        part_dirs.push(path.parent().map_or_else(PathBuf::new, PathBuf::from));
    }
    let options = segq::eval::merge::MergeOptions {
        allow_partial: args.allow_partial,
    };
    let mut merged = segq::eval::merge::merge_with(parts.clone(), options)?;
    // W&B settings are checked before anything is written, as eval checks them before evaluating.
    let wandb = WandbPublisher::new(&tracking_settings(global, &merged)?, args.wandb, &args.out, None)?;
    if args.out.join("results.json").exists() {
        tracing::warn!(out = %args.out.display(), "replacing the results already in this folder");
    }
    std::fs::create_dir_all(&args.out).map_err(|e| segq::Error::io(&args.out, e))?;
    segq::report::copy_worst_overlays(&mut merged, &parts, &part_dirs, &args.out)?;
    segq::report::write_all(&merged, &args.out)?;
    println!(
        "{}",
        segq::report::format_table(&merged, super::console::table_width(args.wide))
    );
    tracing::info!(out = %args.out.display(), parts = args.inputs.len(), complete = merged.complete, "merged");
    if let Some(wandb) = wandb {
        if !merged.complete {
            tracing::warn!(
                "W&B: the merge is incomplete, so no runs are published (they would pass for the whole run)"
            );
            return Ok(());
        }
        // The sample images stay with the shards: results.json holds scores, tables and counts only. The worst
        // images' overlays were copied here: they are logged as an unsharded eval logs them.
        let worst = segq::report::wandb_runs::worst_pictures_in(&merged, &args.out);
        wandb.publish(&merged, &[], &worst)?;
    }
    Ok(())
}
