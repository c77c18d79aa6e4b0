//! `segq merge DIR...`: sums the confusion matrices and counts of sharded runs into one result, identical to an
//! unsharded run, and writes the same reports.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use super::GlobalArgs;
use segq::eval::results::EvalResults;

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
}

pub fn run(_global: &GlobalArgs, args: MergeArgs) -> Result<()> {
    segq::eval::merge::check_out_dir(&args.out, &args.inputs)?;
    let mut parts = Vec::new();
    for input in &args.inputs {
        let path = if input.is_dir() {
            input.join("results.json")
        } else {
            input.clone()
        };
        parts.push(EvalResults::read(&path)?);
    }
    let options = segq::eval::merge::MergeOptions {
        allow_partial: args.allow_partial,
    };
    let merged = segq::eval::merge::merge_with(parts, options)?;
    if args.out.join("results.json").exists() {
        tracing::warn!(out = %args.out.display(), "replacing the results already in this folder");
    }
    std::fs::create_dir_all(&args.out).map_err(|e| segq::Error::io(&args.out, e))?;
    segq::report::write_all(&merged, &args.out)?;
    println!(
        "{}",
        segq::report::format_table(&merged, super::console::table_width(args.wide))
    );
    tracing::info!(out = %args.out.display(), parts = args.inputs.len(), complete = merged.complete, "merged");
    Ok(())
}
