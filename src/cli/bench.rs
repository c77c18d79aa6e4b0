//! `segq bench`: flags -> [`segq::bench::run`] -> a table (or JSON) of latency, throughput and memory per level.

use anyhow::Result;
use clap::Args;

use super::{GlobalArgs, load_config};
use segq::bench::{BenchPlan, BenchReport};
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
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(global: &GlobalArgs, args: BenchArgs) -> Result<()> {
    let config = load_config(global)?;
    super::set_threads(config.eval.threads);
    let (width, height) = segq::bench::parse_size(&args.size)?;
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
    let plan = BenchPlan {
        model: ModelSource::parse(Some(args.model.as_deref().unwrap_or(&config.model.source)))?,
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
