//! `segq quantize`: flags -> configuration -> a quantized checkpoint folder that `--model DIR` loads directly
//! ([`segq::model::checkpoint::save_quantized`]), and/or the error report of every recipe against f32
//! ([`segq::eval::error_report`], used by scripts/compare_quanto.py).

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use clap::Args;

use super::{GlobalArgs, load_config};
use segq::model::{self, ModelSource};
use segq::outputs::{self, Input};
use segq::preprocess::Protocol;
use segq::quant::{Level, Method, Recipe, SweepSpec};

#[derive(Args, Debug)]
pub struct QuantizeArgs {
    /// Model: folder, Hub id[@revision], URL, or "embedded".
    #[arg(long)]
    pub model: Option<String>,
    /// Quantization levels, comma-separated (one level with --out).
    #[arg(long, value_delimiter = ',', required_unless_present = "recipe")]
    pub quant: Vec<Level>,
    /// A recipe file (level, method, skips, [[rules]]) instead of --quant/--method.
    #[arg(long, value_name = "FILE.toml", conflicts_with_all = ["quant", "method", "group_size", "skip"])]
    pub recipe: Option<PathBuf>,
    /// Methods, comma-separated (one method with --out): rtn, hqq, gptq, awq, awq+gptq (the last three calibrate,
    /// see --calib).
    #[arg(long, value_delimiter = ',', default_value = "rtn")]
    pub method: Vec<Method>,
    #[command(flatten)]
    pub calib: super::eval::CalibArgs,
    #[arg(long)]
    pub group_size: Option<usize>,
    /// Weight-name glob patterns kept in float.
    #[arg(long, value_delimiter = ',')]
    pub skip: Option<Vec<String>>,
    /// Write the quantized checkpoint folder here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Format of the --out folder: segq's own, or an optimum-quanto checkpoint (state dict with transformers 5's
    /// in-memory names + quantization_map.json) that Python reloads with `requantize`.
    #[arg(long, value_enum, default_value = "segq")]
    pub format: CheckpointFormat,
    /// Write a JSON report of each recipe's weight and logits error against f32.
    #[arg(long)]
    pub error_report: Option<PathBuf>,
    /// Images for the logits error (with --error-report).
    #[arg(long, num_args = 1..)]
    pub images: Vec<PathBuf>,
}

/// What `--out` writes.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckpointFormat {
    /// segq's quantized checkpoint (`--model DIR` loads it).
    Segq,
    /// An optimum-quanto checkpoint (`--model DIR` loads it too).
    Quanto,
}

pub fn run(global: &GlobalArgs, args: QuantizeArgs) -> Result<()> {
    let mut config = load_config(global)?;
    super::eval::apply_calib_args(&mut config, &args.calib);
    super::set_threads(config.eval.threads);
    if args.out.is_none() && args.error_report.is_none() {
        bail!("nothing to do: give --out DIR (a quantized checkpoint) and/or --error-report FILE");
    }
    let skip = args.skip.clone().unwrap_or_else(|| config.quant.skip.clone());
    let recipes = match &args.recipe {
        Some(path) => vec![Recipe::read_file(path)?],
        None => SweepSpec {
            levels: &args.quant,
            methods: &args.method,
            group_size: args.group_size.or(config.quant.group_size),
            symmetric: config.quant.symmetric,
            skip: &skip,
            rules: &config.quant.rules,
        }
        .recipes()
        .into_iter()
        .skip(1) // the f32 baseline
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|failed| segq::Error::config("--quant", failed.reason))?,
    };
    if recipes.iter().all(Recipe::is_float_baseline) {
        bail!("--quant names no quantized level (f32 is the unquantized model)");
    }
    if args.out.is_some() && recipes.len() != 1 {
        bail!(
            "--out writes one checkpoint: give one level and one method (got {})",
            recipes.len()
        );
    }
    if args.format == CheckpointFormat::Quanto {
        if args.out.is_none() {
            bail!("--format quanto is the format of --out: give --out DIR");
        }
        // Before loading and quantizing: a level quanto cannot hold fails in milliseconds.
        model::quanto::check_recipe(&recipes[0])?;
    }
    let source = ModelSource::parse(Some(args.model.as_deref().unwrap_or(&config.model.source)))?;
    check_outputs(&source, &args)?;
    let loaded = model::load(&source)?;
    // The calibrated methods' statistics, from `--calib` (default: the configured dataset's train split).
    let calibration = match segq::calib::needs_of(&recipes, config.quant.smooth) {
        None => None,
        Some(_) => {
            let plan = segq::eval::plan::EvalPlan::from_config(&config, config.eval.threads)?;
            segq::eval::runner::calibrate_for(&loaded, &plan, &recipes, &plan.loader, None)?
        }
    };
    if let Some(out) = &args.out {
        if out.join("model.safetensors").exists() {
            tracing::warn!(out = %out.display(), "replacing the checkpoint already in this folder");
        }
        let (quantized, report) = match &calibration {
            Some(c) => c.quantize(&loaded.model, &recipes[0])?,
            None => model::quantize(&loaded.model, &recipes[0])?,
        };
        let save = match args.format {
            CheckpointFormat::Segq => model::checkpoint::save_quantized,
            CheckpointFormat::Quanto => model::quanto::save_quanto,
        };
        let bytes = save(
            &quantized,
            &recipes[0],
            &loaded.config_json,
            loaded.preprocessor_json.as_deref(),
            out,
        )?;
        tracing::info!(
            out = %out.display(),
            recipe = %report.label,
            disk_bytes = bytes,
            ratio_to_f32 = bytes as f64 / loaded.weight_bytes() as f64,
            bits_per_weight = report.bits_per_weight,
            "quantized checkpoint written"
        );
    }
    if let Some(path) = &args.error_report {
        let images = args
            .images
            .iter()
            .map(|p| segq::data::decode::read_rgb(p))
            .collect::<segq::Result<Vec<_>>>()?;
        let names = args.images.iter().map(|p| p.display().to_string()).collect();
        let report = segq::eval::error_report::error_report(
            &loaded,
            &recipes,
            calibration.as_ref(),
            &images,
            names,
            Protocol::Transformers,
        )?;
        let json = serde_json::to_string_pretty(&report)?;
        outputs::write_atomically(path, |tmp| {
            std::fs::write(tmp, &json).map_err(|e| segq::Error::io(path, e))
        })?;
        tracing::info!(path = %path.display(), recipes = recipes.len(), "error report written");
    }
    Ok(())
}

/// Refuses a `--out` folder or `--error-report` file that would replace the input model (its folder, or the folder
/// of a checkpoint file) or one of `--images`.
fn check_outputs(source: &ModelSource, args: &QuantizeArgs) -> Result<()> {
    let model_folder = match source {
        ModelSource::Local(p) if p.is_file() => Some(
            p.parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new(".")),
        ),
        ModelSource::Local(p) => Some(p.as_path()),
        _ => None,
    };
    let mut inputs: Vec<Input<'_>> = model_folder.into_iter().map(Input::Folder).collect();
    if let Some(out) = &args.out {
        outputs::check_folder("--out", out)?;
        outputs::check_not_input("--out", out, &inputs)?;
    }
    if let Some(report) = &args.error_report {
        inputs.extend(args.images.iter().map(|p| Input::File(p)));
        outputs::check_not_input("--error-report", report, &inputs)?;
    }
    Ok(())
}
