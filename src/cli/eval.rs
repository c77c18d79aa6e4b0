//! `segq eval`: flags -> configuration -> [`segq::eval::evaluate`] with the console's observers (progress bar,
//! Ctrl-C) and the publishers (report files, W&B) -> the results table.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use super::console::{Interrupt, Progress, Table};
use super::{GlobalArgs, load_config};
use segq::config::Config;
use segq::data::{OnError, ShardSpec};
use segq::eval::results::{EvalResults, LevelStatus};
use segq::eval::{EvalObserver, EvalPlan};
use segq::preprocess::Protocol;
use segq::quant::search::LevelSpec;
use segq::quant::{Level, Method};
use segq::report::ReportWriter;
use segq::report::wandb_runs::WandbPublisher;
use segq::track::TrackingMode;

/// Flags shared by commands that read a dataset (eval): each overrides its key in segq.toml.
#[derive(Args, Debug, Clone, Default)]
pub struct DatasetArgs {
    /// Dataset: "embedded", a Hub dataset id[@revision] (Parquet conversion), a Parquet file or folder, an
    /// ADEChallengeData2016 folder, IMAGES_DIR,MASKS_DIR, or a list file of image<TAB>mask lines.
    #[arg(long)]
    pub dataset: Option<String>,
    /// Split (validation, train, ...).
    #[arg(long)]
    pub split: Option<String>,
    /// Evaluate at most this many examples.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Skip this many examples first.
    #[arg(long)]
    pub offset: Option<usize>,
    /// Part I of N ("I/N", 0-based), or "auto" (SLURM_ARRAY_TASK_ID/COUNT or JOB_COMPLETION_INDEX).
    #[arg(long)]
    pub shard: Option<ShardSpec>,
    /// Images per forward pass.
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// What to do with a bad example: fail (default) or skip (counted and reported).
    #[arg(long)]
    pub on_error: Option<OnError>,
    /// Do not map ADE-style labels (0 = other, k -> k-1).
    #[arg(long)]
    pub no_reduce_labels: bool,
    /// Refuse images (and masks) with more pixels than this, from their header [default: 178956970, Pillow's].
    #[arg(long, value_name = "N")]
    pub max_image_pixels: Option<u64>,
    /// Keep images as stored instead of turning them upright by their EXIF Orientation tag.
    #[arg(long)]
    pub no_exif_orientation: bool,
}

/// Flags that choose calibration images (eval, quantize): each overrides its `quant.calib*` key.
#[derive(Args, Debug, Clone, Default)]
pub struct CalibArgs {
    /// Calibration images for gptq/awq and the static levels: any dataset source (default: the evaluated
    /// dataset's train split, see --calib-split).
    #[arg(long, value_name = "DATASET")]
    pub calib: Option<String>,
    /// Split of the calibration source [default: train].
    #[arg(long, value_name = "NAME")]
    pub calib_split: Option<String>,
    /// Calibration images, drawn uniformly without replacement [default: 128].
    #[arg(long, value_name = "N")]
    pub calib_size: Option<usize>,
    /// Seed of the calibration draw [default: 0].
    #[arg(long, value_name = "S")]
    pub calib_seed: Option<u64>,
    /// Allow calibration images among the evaluated ones (else they are left out of the draw; the overlap is
    /// reported).
    #[arg(long)]
    pub calib_allow_overlap: bool,
    /// Static levels' activation scales from the calibration histograms: minmax, percentile[:P], mse, entropy
    /// [default: minmax].
    #[arg(long, value_name = "METHOD")]
    pub act_calib: Option<segq::quant::act::ActCalib>,
    /// SmoothQuant migration strength (0..1) for the int8-dyn and int8-static rows.
    #[arg(long, value_name = "ALPHA")]
    pub smooth: Option<f32>,
}

pub(super) fn apply_calib_args(config: &mut Config, c: &CalibArgs) {
    if c.calib.is_some() {
        config.quant.calib = c.calib.clone();
    }
    set(&mut config.quant.calib_split, c.calib_split.clone());
    set(&mut config.quant.calib_size, c.calib_size);
    set(&mut config.quant.calib_seed, c.calib_seed);
    config.quant.calib_allow_overlap |= c.calib_allow_overlap;
    set(&mut config.quant.act_calib, c.act_calib);
    if c.smooth.is_some() {
        config.quant.smooth = c.smooth;
    }
}

#[derive(Args, Debug, Default)]
pub struct EvalArgs {
    /// Model: folder, Hub id[@revision], URL, or "embedded".
    #[arg(long)]
    pub model: Option<String>,
    #[command(flatten)]
    pub data: DatasetArgs,
    /// Quantization levels, comma-separated: f32,f16,bf16,f8,f8e5m2,int8,int8-dyn,int8-static,int4,int4-dyn,int2, the
    /// simulated w8a8-f8,w4a8 (static levels calibrate, see --calib), and mixed-precision
    /// searches auto:bits=B (best agreement within B bits per weight) or auto:max-drop=P (fewest bits within P
    /// points of agreement mIoU).
    #[arg(long, value_delimiter = ',')]
    pub quant: Option<Vec<LevelSpec>>,
    /// Methods, comma-separated: rtn, hqq, and the calibrated gptq, awq, awq+gptq (see --calib).
    #[arg(long, value_delimiter = ',')]
    pub method: Option<Vec<Method>>,
    #[command(flatten)]
    pub calib: CalibArgs,
    /// Weights per group for int4/int2.
    #[arg(long)]
    pub group_size: Option<usize>,
    /// Weight-name glob patterns kept in float (repeatable or comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub skip: Option<Vec<String>>,
    /// A recipe file (level, method, skips, [[rules]]) evaluated as a row of its own (repeatable).
    #[arg(long, value_name = "FILE.toml")]
    pub recipe: Vec<PathBuf>,
    /// With a quantized checkpoint as --model: quantize its dequantized weights again to the --quant levels
    /// (otherwise it is evaluated as loaded, alone).
    #[arg(long)]
    pub requantize: bool,
    /// Resize protocol: transformers (processor size) or mmseg (keep ratio, fit 2048x512).
    #[arg(long, value_enum)]
    pub protocol: Option<Protocol>,
    /// Output folder.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// W&B mode: online, offline or disabled (default: WANDB_MODE, else tracking.mode, else online when an API key
    /// is found and offline otherwise).
    #[arg(long)]
    pub wandb: Option<TrackingMode>,
    /// With --shard: also log this shard's partial runs to W&B, named and tagged `shard-I-of-N` (needs
    /// WANDB_RUN_GROUP or tracking.group). By default a shard logs nothing and `segq merge --wandb` publishes.
    #[arg(long)]
    pub wandb_shard_runs: bool,
    /// Continue the interrupted run whose partial results are in DIR (its configuration is reused; flags given
    /// again must agree with it). The final results equal an uninterrupted run's.
    #[arg(long, value_name = "DIR")]
    pub resume: Option<PathBuf>,
    /// Accept a selection of zero examples (an empty shard) instead of failing.
    #[arg(long)]
    pub allow_empty: bool,
    /// Resamples of the paired bootstrap over images behind the 95% intervals of Δ mIoU and agreement mIoU
    /// (0: none, and no per-image counts in results.json) [default: 1000].
    #[arg(long, value_name = "N")]
    pub bootstrap: Option<usize>,
    /// Seed of the bootstrap's draws [default: 0].
    #[arg(long, value_name = "S")]
    pub bootstrap_seed: Option<u64>,
    /// Per quantized level, list the N images that disagree most with the f32 model and save their overlays in
    /// samples/worst/<level>/ (0: off) [default: 4, eval.worst_images].
    #[arg(long, value_name = "N")]
    pub worst_images: Option<usize>,
    /// Print every column of the results table (summary.md always has them all).
    #[arg(long)]
    pub wide: bool,
}

fn apply_eval_args(config: &mut Config, args: &EvalArgs) {
    let d = &args.data;
    set(&mut config.model.source, args.model.clone());
    apply_dataset_args(config, d);
    if let Some(specs) = &args.quant {
        let (levels, auto) = LevelSpec::split(specs);
        // Searches alone still have the float model as their reference row.
        config.quant.levels = if levels.is_empty() { vec![Level::F32] } else { levels };
        config.quant.auto = auto;
    }
    set(&mut config.quant.methods, args.method.clone());
    apply_calib_args(config, &args.calib);
    set(&mut config.quant.skip, args.skip.clone());
    if !args.recipe.is_empty() {
        config.quant.recipes = args.recipe.clone();
    }
    set(&mut config.eval.protocol, args.protocol);
    set(&mut config.output.dir, args.out.clone());
    set(&mut config.eval.bootstrap_resamples, args.bootstrap);
    set(&mut config.eval.bootstrap_seed, args.bootstrap_seed);
    set(&mut config.eval.worst_images, args.worst_images);
    config.quant.group_size = args.group_size.or(config.quant.group_size);
    config.eval.allow_empty |= args.allow_empty;
    config.quant.requantize |= args.requantize;
    if args.wandb_shard_runs {
        config.tracking.shard_runs = Some(true);
    }
}

/// Applies the dataset flags (shared by the commands that read a dataset) to their keys.
pub(super) fn apply_dataset_args(config: &mut Config, d: &DatasetArgs) {
    set(&mut config.dataset.source, d.dataset.clone());
    set(&mut config.dataset.split, d.split.clone());
    set(&mut config.eval.offset, d.offset);
    set(&mut config.eval.batch_size, d.batch_size);
    set(&mut config.dataset.on_error, d.on_error);
    config.eval.limit = d.limit.or(config.eval.limit);
    config.eval.shard = d.shard.or(config.eval.shard);
    if d.no_reduce_labels {
        config.dataset.reduce_labels = false;
    }
    set(&mut config.dataset.max_image_pixels, d.max_image_pixels);
    if d.no_exif_orientation {
        config.dataset.exif_orientation = false;
    }
}

/// Overrides `slot` with a flag's value when the flag was given.
pub(super) fn set<T>(slot: &mut T, flag: Option<T>) {
    if let Some(v) = flag {
        *slot = v;
    }
}

pub fn run(global: &GlobalArgs, args: EvalArgs) -> Result<()> {
    let plan = match &args.resume {
        None => {
            let mut config = load_config(global)?;
            apply_eval_args(&mut config, &args);
            let threads = super::set_threads(config.eval.threads);
            EvalPlan::from_config(&config, threads)?
        }
        Some(dir) => {
            // The interrupted run's configuration, not segq.toml's: flags given again are checked against it.
            let partial = EvalResults::read(&dir.join("results.json"))?;
            let mut config: Config = serde_json::from_value(partial.config.clone())
                .map_err(|e| anyhow::anyhow!("{}: configuration unreadable: {e}", dir.display()))?;
            for assignment in &global.set {
                config.set(assignment)?;
            }
            if let Some(threads) = global.threads {
                config.eval.threads = threads;
            }
            apply_eval_args(&mut config, &args);
            config.output.dir = dir.clone();
            let threads = super::set_threads(config.eval.threads);
            EvalPlan::resuming(&config, threads, partial)?
        }
    };
    // Everything that can fail without the model is checked before it is loaded: the output folder, W&B.
    let reports = ReportWriter::create(&plan.output_dir)?;
    let wandb = WandbPublisher::new(
        &plan.config.tracking,
        args.wandb,
        &plan.output_dir,
        plan.loader.selection.shard,
    )?;
    let mut observers: Vec<Box<dyn EvalObserver>> = vec![
        Box::new(Progress::new(global.quiet == 0)),
        Box::new(Interrupt::install()),
        Box::new(reports),
        Box::new(Table(super::console::table_width(args.wide))),
    ];
    if let Some(w) = wandb {
        observers.push(Box::new(w));
    }
    let output = segq::eval::evaluate(&plan, &mut observers)?;
    let dir = plan.output_dir.display();
    if !output.results.complete {
        let counts = &output.results.counts;
        let why = if counts.unreadable_files > 0 {
            format!(
                "{} Parquet file(s) could not be read, so their rows are unknown (see skip_reasons)",
                counts.unreadable_files
            )
        } else {
            format!(
                "{} of {} examples counted",
                counts.evaluated + counts.skipped,
                output.results.dataset.examples_total_selected
            )
        };
        anyhow::bail!(
            "the run is incomplete: {why}; partial results are in {dir} (continue with `segq eval --resume {dir}`)"
        );
    }
    let failed: Vec<String> = output
        .results
        .levels
        .iter()
        .filter_map(|l| match &l.status {
            LevelStatus::Failed { reason } => Some(format!("{}: {reason}", l.label)),
            LevelStatus::Ok => None,
        })
        .collect();
    if !failed.is_empty() {
        anyhow::bail!(
            "level failed: {}; the other levels' results are in {dir}",
            failed.join("; ")
        );
    }
    // Last on stdout, after the table and W&B's lines: the table is a summary, the files hold everything.
    println!(
        "full results: {}, {} (plots/ and samples/ beside them)",
        plan.output_dir.join("summary.md").display(),
        plan.output_dir.join("results.json").display()
    );
    Ok(())
}
