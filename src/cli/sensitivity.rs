//! `segq sensitivity`: flags -> configuration and [`SensitivitySpec`] -> [`segq::eval::sensitivity::run`] with the
//! console's progress bar and Ctrl-C -> the ranked table, `sensitivity.json`, the bar chart and the W&B run.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use super::console::{Interrupt, Progress};
use super::eval::{DatasetArgs, apply_dataset_args, set};
use super::{GlobalArgs, load_config};
use segq::eval::EvalPlan;
use segq::eval::sensitivity::{Granularity, SensitivitySpec};
use segq::preprocess::Protocol;
use segq::quant::{Level, Method};
use segq::report::ReportWriter;
use segq::report::wandb_runs::WandbPublisher;
use segq::track::TrackingMode;

/// Images measured when --limit is not given.
const DEFAULT_LIMIT: usize = 32;

#[derive(Args, Debug, Default)]
pub struct SensitivityArgs {
    /// Model (float): folder, Hub id[@revision], URL, or "embedded".
    #[arg(long)]
    pub model: Option<String>,
    #[command(flatten)]
    pub data: DatasetArgs,
    /// Levels each group is quantized to, comma-separated [default: int8,int4,int2].
    #[arg(long, value_delimiter = ',')]
    pub quant: Option<Vec<Level>>,
    /// Method: rtn or hqq [default: rtn].
    #[arg(long)]
    pub method: Option<Method>,
    /// Weights per group for int4/int2 [default: the level's].
    #[arg(long)]
    pub group_size: Option<usize>,
    /// What one group is: layer (each Linear/Conv2d), block (each encoder block, patch embedding, the decode
    /// head) or stage (each encoder stage, the decode head).
    #[arg(long, default_value = "layer")]
    pub granularity: Granularity,
    /// Quantize everything except the group instead of only the group.
    #[arg(long)]
    pub reverse: bool,
    /// Resize protocol: transformers (processor size) or mmseg (keep ratio, fit 2048x512).
    #[arg(long, value_enum)]
    pub protocol: Option<Protocol>,
    /// Output folder (sensitivity.json, plots/sensitivity.png and .svg).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// W&B mode: online, offline or disabled (default as for eval).
    #[arg(long)]
    pub wandb: Option<TrackingMode>,
    /// Show only the N worst groups in the console table (sensitivity.json has them all).
    #[arg(long, value_name = "N")]
    pub top: Option<usize>,
}

pub fn run(global: &GlobalArgs, args: SensitivityArgs) -> Result<()> {
    let mut config = load_config(global)?;
    set(&mut config.model.source, args.model.clone());
    apply_dataset_args(&mut config, &args.data);
    // eval.limit is the evaluation's: sensitivity measures --limit images, 32 unless told.
    config.eval.limit = Some(args.data.limit.unwrap_or(DEFAULT_LIMIT));
    set(&mut config.eval.protocol, args.protocol);
    set(&mut config.output.dir, args.out.clone());
    // The evaluation plan supplies the model, the dataset and its selection; its levels are not evaluated (the
    // variants come from the flags below), so segq.toml's [quant] levels, rules, recipes and searches stay out.
    config.quant.levels = vec![Level::F32];
    config.quant.skip.clear();
    config.quant.rules.clear();
    config.quant.recipes.clear();
    config.quant.auto.clear();
    let threads = super::set_threads(config.eval.threads);
    let plan = EvalPlan::from_config(&config, threads)?;
    let spec = SensitivitySpec {
        granularity: args.granularity,
        levels: args.quant.clone().unwrap_or_else(|| SensitivitySpec::default().levels),
        method: args.method.unwrap_or(Method::Rtn),
        group_size: args.group_size,
        symmetric: config.quant.symmetric,
        reverse: args.reverse,
        batch_size: plan.loader.batch_size,
    };
    // Everything that can fail without the model is checked first: the levels, the output folder, W&B.
    spec.recipes()?;
    ReportWriter::create(&plan.output_dir)?;
    let wandb = WandbPublisher::new(&config.tracking, args.wandb, &plan.output_dir, None)?;
    let _interrupt = Interrupt::install();
    let mut progress = Progress::new(global.quiet == 0);
    let report = segq::eval::sensitivity::run(&plan, &spec, &mut progress);
    progress.finish();
    let report = report?;
    let written = segq::report::sensitivity::write_all(&report, &plan.output_dir)?;
    println!("{}", segq::report::sensitivity::format_table(&report, args.top));
    if let Some(w) = wandb {
        let group = w.group(|| format!("segq-sensitivity-{}", report.created_utc.replace([':', '-'], "")));
        let run = segq::report::sensitivity::run_log(&report, &group, &w.tags());
        w.publish_runs(&[run])?;
    }
    println!(
        "sensitivity of {} groups at {} level(s) on {} images in {:.1} s: {}",
        report.groups.len(),
        report.whole_model.len(),
        report.images,
        report.timing.total_s,
        written
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}
