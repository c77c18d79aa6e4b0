//! `segq eval`: the tool's main job. Loads the model once, builds every requested level and method, runs them all
//! over the dataset in one pass, prints the comparison table and writes results.json, summary.csv/.md, plots,
//! sample overlays and (optionally) W&B runs.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result};
use clap::Args;

use super::{GlobalArgs, load_config};
use segq::config::Config;
use segq::data::{self, Loader, LoaderOptions, OnError, Selection};
use segq::eval::results::{DatasetInfo, MachineInfo, ModelInfo};
use segq::eval::runner::{self, RunOptions, Variant};
use segq::model::{self, LoadedModel, ModelSource};
use segq::preprocess::Protocol;
use segq::quant::{Level, Method, Recipe};

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
    pub shard: Option<String>,
    /// Images per forward pass.
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// What to do with a bad example: fail (default) or skip (counted and reported).
    #[arg(long)]
    pub on_error: Option<String>,
    /// Do not map ADE-style labels (0 = other, k -> k-1).
    #[arg(long)]
    pub no_reduce_labels: bool,
}

#[derive(Args, Debug, Default)]
pub struct EvalArgs {
    /// Model: folder, Hub id[@revision], URL, or "embedded".
    #[arg(long)]
    pub model: Option<String>,
    #[command(flatten)]
    pub data: DatasetArgs,
    /// Quantization levels, comma-separated: f32,f16,bf16,f8,f8e5m2,int8,int8-dyn,int4,int2.
    #[arg(long, value_delimiter = ',')]
    pub quant: Option<Vec<String>>,
    /// Methods, comma-separated: rtn,hqq.
    #[arg(long, value_delimiter = ',')]
    pub method: Option<Vec<String>>,
    /// Weights per group for int4/int2.
    #[arg(long)]
    pub group_size: Option<usize>,
    /// Weight-name glob patterns kept in float (repeatable or comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub skip: Option<Vec<String>>,
    /// Resize protocol: transformers (processor size) or mmseg (keep ratio, fit 2048x512).
    #[arg(long, value_enum)]
    pub protocol: Option<Protocol>,
    /// Output folder.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// W&B mode: online, offline or disabled (default: WANDB_MODE, else tracking.mode, else online when an API key
    /// is found and offline otherwise).
    #[arg(long)]
    pub wandb: Option<String>,
}

/// Applies the dataset flags to the configuration.
pub fn apply_dataset_args(config: &mut Config, args: &DatasetArgs) {
    if let Some(v) = &args.dataset {
        config.dataset.source = v.clone();
    }
    if let Some(v) = &args.split {
        config.dataset.split = v.clone();
    }
    if args.limit.is_some() {
        config.eval.limit = args.limit;
    }
    if let Some(v) = args.offset {
        config.eval.offset = v;
    }
    if args.shard.is_some() {
        config.eval.shard = args.shard.clone();
    }
    if let Some(v) = args.batch_size {
        config.eval.batch_size = v;
    }
    if let Some(v) = &args.on_error {
        config.dataset.on_error = v.clone();
    }
    if args.no_reduce_labels {
        config.dataset.reduce_labels = false;
    }
}

fn apply_eval_args(config: &mut Config, args: &EvalArgs) {
    if let Some(m) = &args.model {
        config.model.source = m.clone();
    }
    apply_dataset_args(config, &args.data);
    if let Some(q) = &args.quant {
        config.quant.levels = q.clone();
    }
    if let Some(m) = &args.method {
        config.quant.methods = m.clone();
    }
    if args.group_size.is_some() {
        config.quant.group_size = args.group_size;
    }
    if let Some(s) = &args.skip {
        config.quant.skip = s.clone();
    }
    if let Some(p) = args.protocol {
        config.eval.protocol = if p == Protocol::Mmseg {
            "mmseg".into()
        } else {
            "transformers".into()
        };
    }
    if let Some(o) = &args.out {
        config.output.dir = o.clone();
    }
}

/// The recipes to evaluate: f32 first, then each level with each method that applies to it (f16/bf16 take no
/// method). Combinations a level cannot use are left out with a notice when other methods remain for it; when no
/// method applies, the level appears as a failed row with the reason.
pub fn recipes(config: &Config) -> Result<Vec<std::result::Result<Recipe, (String, String)>>> {
    let methods: Vec<Method> = config
        .quant
        .methods
        .iter()
        .map(|m| Method::parse(m))
        .collect::<segq::Result<_>>()?;
    let mut out = vec![Ok(Recipe::level_default(Level::parse("f32")?))];
    let mut seen = vec![out[0].as_ref().map(|r| r.label()).unwrap_or_default()];
    for name in &config.quant.levels {
        let level = Level::parse(name)?;
        if level.is_float_baseline() {
            continue;
        }
        let mut built = Vec::new();
        let mut errors = Vec::new();
        for method in &methods {
            match Recipe::new(
                level,
                *method,
                config.quant.group_size,
                config.quant.symmetric,
                config.quant.skip.clone(),
            ) {
                Ok(r) => built.push(r),
                Err(e) => errors.push(e.to_string()),
            }
        }
        if built.is_empty() {
            out.push(Err((level.name().to_string(), errors.join("; "))));
            continue;
        }
        for e in errors {
            tracing::info!(level = level.name(), "{e}; evaluated with the other methods");
        }
        for r in built {
            let label = r.label();
            if !seen.contains(&label) {
                seen.push(label);
                out.push(Ok(r));
            }
        }
    }
    Ok(out)
}

/// Builds the models of every recipe from the loaded float model.
pub fn build_variants(loaded: &LoadedModel, config: &Config) -> Result<Vec<Variant>> {
    let mut variants = Vec::new();
    for recipe in recipes(config)? {
        let variant = match recipe {
            Ok(recipe) => match model::quantize(&loaded.model, &recipe) {
                Ok((m, report)) => {
                    let bytes = m.weight_bytes() as u64;
                    let baseline = recipe.level.is_float_baseline();
                    // The baseline row is the model as loaded: from a quantized checkpoint that is not float, and
                    // the row must say so rather than claim 32 bits per weight.
                    let (method, bits_per_weight) = match (&loaded.recipe, baseline) {
                        (Some(header), true) => (format!("as loaded ({})", header.label), stored_bits_per_weight(&m)),
                        (None, true) => ("none".to_string(), report.bits_per_weight),
                        (_, false) => (recipe.method.name().to_string(), report.bits_per_weight),
                    };
                    Variant {
                        label: report.label.clone(),
                        level: recipe.level.name().to_string(),
                        method,
                        group_size: recipe.requested_group_size(),
                        bits_per_weight,
                        weight_bytes_memory: bytes,
                        weight_bytes_disk: Some(segq::model::checkpoint::stored_bytes(&m)),
                        load_time_s: loaded.load_time.as_secs_f64(),
                        quantize_time_s: report.seconds,
                        model: Ok(m),
                    }
                }
                Err(e) => failed_variant(
                    &recipe.label(),
                    recipe.level.name(),
                    recipe.method.name(),
                    &e.to_string(),
                ),
            },
            Err((level, reason)) => failed_variant(&level, &level, "-", &reason),
        };
        variants.push(variant);
    }
    Ok(variants)
}

fn failed_variant(label: &str, level: &str, method: &str, reason: &str) -> Variant {
    tracing::error!(level = label, reason, "level cannot be built; the others go on");
    Variant {
        label: label.to_string(),
        level: level.to_string(),
        method: method.to_string(),
        group_size: None,
        bits_per_weight: f64::NAN,
        weight_bytes_memory: 0,
        weight_bytes_disk: None,
        load_time_s: f64::NAN,
        quantize_time_s: f64::NAN,
        model: Err(reason.to_string()),
    }
}

/// Stored bits per Linear/Conv weight of a model as it is (scales and zero points included).
fn stored_bits_per_weight(m: &segq::model::segformer::Segformer) -> f64 {
    let (bits, count) = m.layers().iter().fold((0.0, 0usize), |(bits, count), l| {
        let n: usize = l.shape.iter().product();
        (bits + l.bits_per_weight * n as f64, count + n)
    });
    bits / count.max(1) as f64
}

/// Resolves the dataset source of the configuration to local files.
pub fn resolve_dataset(config: &Config) -> Result<(data::DatasetSpec, String)> {
    let d = &config.dataset;
    if d.source == "embedded" || d.source == "demo" {
        return Ok((
            data::demo_dataset()?,
            "embedded demo dataset (12 synthetic scenes, Scene Parse 150 schema)".into(),
        ));
    }
    let path = std::path::Path::new(&d.source);
    let spec = if path.exists() || d.source.contains(',') {
        data::resolve_local(&d.source, &d.split, &d.image_column, &d.label_column)?
    } else {
        let id = segq::hub::HubId::parse_dataset(&d.source, "refs/convert/parquet").ok_or_else(|| {
            anyhow::anyhow!(
                "--dataset `{}`: no such file or folder, and not a Hub dataset id ([owner/]name[@revision])",
                d.source
            )
        })?;
        let files = data::parquet::hub_parquet_files(&segq::hub::HubRepo::dataset(id), &d.subset, &d.split)?;
        data::DatasetSpec::Parquet {
            files,
            image_column: d.image_column.clone(),
            label_column: d.label_column.clone(),
        }
    };
    Ok((spec, d.source.clone()))
}

/// `--shard` as (index, count): "I/N", or "auto" from the cluster's environment.
pub fn resolve_shard(config: &Config) -> Result<Option<(usize, usize)>> {
    match config.eval.shard.as_deref() {
        None | Some("") => Ok(None),
        Some("auto") => {
            let shard = segq::eval::merge::shard_from_env()?;
            if shard.is_none() {
                tracing::warn!("--shard auto: no SLURM_ARRAY_TASK_ID or JOB_COMPLETION_INDEX; evaluating everything");
            }
            Ok(shard)
        }
        Some(s) => Ok(Some(Selection::parse_shard(s)?)),
    }
}

/// Builds the loader for the configuration; returns it with the dataset's description.
pub fn build_loader(config: &Config, shard: Option<(usize, usize)>) -> Result<(Loader, String)> {
    let (spec, description) = resolve_dataset(config)?;
    let mut label_map = std::collections::BTreeMap::new();
    for (k, v) in &config.dataset.label_map {
        label_map.insert(
            k.parse::<u8>()
                .with_context(|| format!("dataset.label_map key `{k}`"))?,
            *v,
        );
    }
    let options = LoaderOptions {
        selection: Selection {
            shard,
            offset: config.eval.offset,
            limit: config.eval.limit,
        },
        batch_size: config.eval.batch_size,
        workers: if config.dataset.workers == 0 {
            segq::sysinfo::logical_cores()
        } else {
            config.dataset.workers
        },
        prefetch_batches: 2,
        on_error: config.dataset.on_error.parse::<OnError>()?,
        labels: data::LabelOptions {
            reduce_labels: config.dataset.reduce_labels,
            ignore_index: config.dataset.ignore_index,
            label_map: (!label_map.is_empty()).then_some(label_map),
        },
    };
    Ok((Loader::new(&spec, options)?, description))
}

pub fn run(global: &GlobalArgs, args: EvalArgs) -> Result<()> {
    let mut config = load_config(global)?;
    apply_eval_args(&mut config, &args);
    config.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
    let threads = super::set_threads(config.eval.threads);
    let interrupt = Arc::new(AtomicBool::new(false));
    {
        let flag = interrupt.clone();
        let _ = ctrlc::set_handler(move || {
            if flag.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
            eprintln!("interrupt: finishing the current batch and writing partial results (Ctrl-C again to abort)");
        });
    }
    let source = ModelSource::parse(Some(&config.model.source))?;
    let loaded = model::load(&source)?;
    if let Some(header) = &loaded.recipe {
        tracing::warn!(
            recipe = %header.label,
            "the model is a quantized checkpoint: the `f32` row is this model as loaded, and other levels are \
             quantized from its dequantized weights"
        );
    }
    let shard = resolve_shard(&config)?;
    let (mut loader, dataset_description) = build_loader(&config, shard)?;
    tracing::info!(dataset = %dataset_description, examples = loader.total(), "dataset ready");
    let variants = build_variants(&loaded, &config)?;
    let layers = loaded.model.layers();
    let model_info = ModelInfo {
        source: source.to_string(),
        num_labels: loaded.model.config().num_labels(),
        class_names: loaded.class_names(),
        parameters: layers.iter().map(|l| l.parameters as u64).sum(),
        f32_weight_bytes: loaded.weight_bytes() as u64,
    };
    let dataset_info = DatasetInfo {
        source: dataset_description,
        split: config.dataset.split.clone(),
        shard,
        offset: config.eval.offset,
        limit: config.eval.limit,
        examples_total_selected: loader.total(),
    };
    let machine = MachineInfo {
        cpu_model: segq::sysinfo::cpu_model(),
        logical_cores: segq::sysinfo::logical_cores(),
        threads,
        os: std::env::consts::OS.to_string(),
    };
    let options = RunOptions {
        preprocessor: loaded.preprocessor.clone(),
        protocol: if config.eval.protocol == "mmseg" {
            Protocol::Mmseg
        } else {
            Protocol::Transformers
        },
        ignore_index: config.dataset.ignore_index,
        samples: config.eval.samples,
        interrupt,
        show_progress: std::io::IsTerminal::is_terminal(&std::io::stderr()) && global.quiet == 0,
    };
    let config_json = serde_json::to_value(&config)?;
    let output = runner::run(
        variants,
        &mut loader,
        &options,
        model_info,
        dataset_info,
        machine,
        config_json,
    )?;
    let out_dir = &config.output.dir;
    std::fs::create_dir_all(out_dir).map_err(|e| segq::Error::io(out_dir, e))?;
    let mut written = segq::report::write_all(&output.results, out_dir)?;
    written.extend(runner::save_sample_overlays(&output.samples, &out_dir.join("samples"))?);
    println!("{}", segq::report::format_table(&output.results));
    tracing::info!(out = %out_dir.display(), files = written.len(), complete = output.results.complete, "results written");
    super::track_results(&config, args.wandb.as_deref(), &output)?;
    if !output.results.complete {
        anyhow::bail!(
            "the run is incomplete (interrupted or examples unaccounted for); partial results are in {}",
            out_dir.display()
        );
    }
    Ok(())
}
