//! `segq bench`: flags -> [`segq::bench::run`] -> a table (or JSON) of latency, throughput and memory per level;
//! with `--image`, flags -> [`segq::bench::run_pipeline`] -> the predict pipeline's time per stage on those images.

use anyhow::Result;
use clap::Args;

use super::{GlobalArgs, load_config};
use segq::bench::{BenchPlan, BenchReport, PipelinePlan, PipelineReport, PipelineRow};
use segq::model::ModelSource;
use segq::quant::{Level, Method, SweepSpec};

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Model: folder, Hub id[@revision], URL, or "embedded".
    #[arg(long)]
    pub model: Option<String>,
    /// Levels, comma-separated (also int8-static, and the simulated w8a8-f8 and w4a8: their activation scales are
    /// calibrated on the bench's own input).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "f32,f16,f8,int8,int8-dyn,int4,int4-dyn,int2"
    )]
    pub quant: Vec<Level>,
    /// Methods, comma-separated (speed does not depend on the method; rtn by default).
    #[arg(long, value_delimiter = ',', default_value = "rtn")]
    pub method: Vec<Method>,
    /// Input size WIDTHxHEIGHT.
    #[arg(long, default_value = "512x512")]
    pub size: String,
    #[arg(long, default_value_t = 1)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    #[arg(long, default_value_t = 10)]
    pub iters: usize,
    /// Per-stage times (each encoder stage, the decode head).
    #[arg(long)]
    pub profile: bool,
    /// Time the whole predict pipeline on this image file instead of the model alone on a synthetic input
    /// (repeatable): median ms of decoding, preprocessing, batching, the forward pass, postprocessing (upsampling +
    /// argmax) and PNG writing, and the fixed part (all but the forward pass) as a percentage of the forward pass.
    /// The input size is the model's own (--size and --batch-size do not apply).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["size", "batch_size", "profile"])]
    pub image: Vec<std::path::PathBuf>,
    /// Resize protocol for --image [default: eval.protocol].
    #[arg(long, value_enum, requires = "image")]
    pub protocol: Option<segq::preprocess::Protocol>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(global: &GlobalArgs, args: BenchArgs) -> Result<()> {
    let config = load_config(global)?;
    super::set_threads(config.eval.threads);
    let mut recipes = SweepSpec {
        levels: &args.quant,
        methods: &args.method,
        group_size: config.quant.group_size,
        symmetric: config.quant.symmetric,
        skip: &config.quant.skip,
        rules: &config.quant.rules,
    }
    .recipes();
    // The sweep always starts with f32 (eval's reference); bench times it only when asked.
    if !args.quant.iter().any(|l| l.is_float_baseline()) {
        recipes = recipes.split_off(1);
    }
    let model = ModelSource::parse(Some(args.model.as_deref().unwrap_or(&config.model.source)))?;
    if !args.image.is_empty() {
        let plan = PipelinePlan {
            model,
            recipes,
            images: args.image,
            protocol: args.protocol.unwrap_or(config.eval.protocol),
            decode: segq::data::DecodeOptions {
                max_image_pixels: config.dataset.max_image_pixels,
                exif_orientation: config.dataset.exif_orientation,
            },
            warmup: args.warmup,
            iters: args.iters,
        };
        // Outputs are written as `segq predict` writes them, into a scratch folder removed afterwards.
        let scratch = std::env::temp_dir().join(format!("segq-bench-pipeline-{}", std::process::id()));
        std::fs::create_dir_all(&scratch).map_err(|e| segq::Error::io(&scratch, e))?;
        let (mask, overlay) = (scratch.join("image.mask.png"), scratch.join("image.overlay.png"));
        let write = |image: &image::RgbImage, prediction: &[u16], num_labels: usize| {
            segq::report::overlay::write_prediction_pngs(image, prediction, num_labels, &mask, &overlay)
        };
        let report = segq::bench::run_pipeline(&plan, &write);
        let _ = std::fs::remove_dir_all(&scratch);
        let report = report?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            print_pipeline_table(&report);
        }
        return Ok(());
    }
    let (width, height) = segq::bench::parse_size(&args.size)?;
    let plan = BenchPlan {
        model,
        recipes,
        width,
        height,
        batch_size: args.batch_size,
        warmup: args.warmup,
        iters: args.iters,
        profile: args.profile,
    };
    let report = segq::bench::run(&plan)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report, args.profile);
    }
    Ok(())
}

fn print_table(report: &BenchReport, profile: bool) {
    println!(
        "model: {}; input {}x{}, batch {}, {} threads, {}",
        report.model, report.size[0], report.size[1], report.batch_size, report.threads, report.cpu
    );
    println!(
        "{:<16} {:>10} {:>10} {:>10} {:>10} {:>8} {:>12} {:>12}",
        "level", "median ms", "p95 ms", "images/s", "weight MB", "ratio", "infer. MB", "peak RSS MB"
    );
    for r in &report.levels {
        println!(
            "{:<16} {:>10.1} {:>10.1} {:>10.2} {:>10.2} {:>8.3} {:>12.1} {:>12.1}{}",
            r.label,
            r.median_ms,
            r.p95_ms,
            r.images_per_s,
            r.weight_bytes / 1e6,
            r.ratio_to_f32,
            r.inference_bytes / 1e6,
            r.peak_rss_bytes as f64 / 1e6,
            if r.simulated { "  simulated" } else { "" },
        );
        if profile {
            let last = r.stage_ms.len().saturating_sub(1);
            let stages: Vec<String> = r
                .stage_ms
                .iter()
                .enumerate()
                .map(|(i, ms)| match i == last {
                    true => format!("decode head: {ms:.1} ms"),
                    false => format!("stage {}: {ms:.1} ms", i + 1),
                })
                .collect();
            println!("{:<16} {}", "", stages.join(", "));
        }
    }
}

fn print_pipeline_table(report: &PipelineReport) {
    println!("model: {}", report.model);
    println!(
        "predict pipeline, median ms per stage, {} threads, {}",
        report.threads, report.cpu
    );
    // Images go in a legend above the table so that it fits a 100-column terminal; rows name theirs by number
    // when there are several.
    let mut firsts: Vec<&PipelineRow> = Vec::new();
    for r in &report.rows {
        if !firsts.iter().any(|f| f.image == r.image) {
            firsts.push(r);
        }
    }
    let several = firsts.len() > 1;
    for (n, r) in firsts.iter().enumerate() {
        let number = if several { format!(" {}", n + 1) } else { String::new() };
        println!(
            "image{number}: {} ({}x{}), model input {}x{}",
            r.image, r.image_size[0], r.image_size[1], r.input_size[0], r.input_size[1]
        );
    }
    println!(
        "{:<14} {:>7} {:>8} {:>8} {:>8} {:>8} {:>7} {:>8} {:>7} {:>8}{}",
        "level",
        "decode",
        "preproc",
        "batching",
        "forward",
        "postproc",
        "PNGs",
        "total",
        "fixed",
        "fixed %",
        if several { "  image" } else { "" }
    );
    for r in &report.rows {
        let s = &r.stages;
        let image = match several {
            true => format!(
                "  {:>5}",
                firsts.iter().position(|f| f.image == r.image).map_or(0, |n| n + 1)
            ),
            false => String::new(),
        };
        println!(
            "{:<14} {:>7.2} {:>8.2} {:>8.2} {:>8.1} {:>8.2} {:>7.2} {:>8.1} {:>7.2} {:>7.1}%{image}",
            r.label,
            s.decode_ms,
            s.preprocess_ms,
            s.batching_ms,
            s.forward_ms,
            s.postprocess_ms,
            s.write_ms,
            r.total_ms,
            r.fixed_ms,
            r.fixed_percent_of_forward,
        );
    }
}
