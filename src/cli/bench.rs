//! `segq bench`: latency of the model alone per quantization level on a synthetic input of a chosen size: warm-up,
//! then timed forward passes; median, p95, images/s, weight bytes and peak memory; per-stage times with --profile.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use candle_core::{Device, Tensor};
use clap::Args;

use super::{GlobalArgs, load_config};
use segq::eval::results::quantile;
use segq::model::{self, ModelSource};

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Model: folder, Hub id[@revision], URL, or "embedded".
    #[arg(long)]
    pub model: Option<String>,
    /// Levels, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "f32,f16,f8,int8,int8-dyn,int4,int2")]
    pub quant: Vec<String>,
    /// Methods, comma-separated (speed does not depend on the method; rtn by default).
    #[arg(long, value_delimiter = ',', default_value = "rtn")]
    pub method: Vec<String>,
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

fn parse_size(s: &str) -> Result<(usize, usize)> {
    let (w, h) = s
        .split_once(['x', 'X'])
        .ok_or_else(|| anyhow::anyhow!("--size `{s}`: expected WIDTHxHEIGHT"))?;
    let (w, h) = (w.trim().parse::<usize>()?, h.trim().parse::<usize>()?);
    if w < 32 || h < 32 {
        bail!("--size `{s}`: each side must be at least 32");
    }
    Ok((w, h))
}

pub fn run(global: &GlobalArgs, args: BenchArgs) -> Result<()> {
    let mut config = load_config(global)?;
    let threads = super::set_threads(config.eval.threads);
    if let Some(m) = &args.model {
        config.model.source = m.clone();
    }
    config.quant.levels = args.quant.clone();
    config.quant.methods = args.method.clone();
    let (w, h) = parse_size(&args.size)?;
    if args.iters == 0 || args.batch_size == 0 {
        bail!("--iters and --batch-size must be at least 1");
    }
    let source = ModelSource::parse(Some(&config.model.source))?;
    let loaded = model::load(&source)?;
    let f32_bytes = loaded.weight_bytes() as f64;
    // A deterministic, image-like input: smooth gradients in normalised units.
    let pixels: Vec<f32> = (0..args.batch_size * 3 * h * w)
        .map(|i| (((i % w) as f32 / w as f32) - 0.5) * 2.0 + ((i / w % h) as f32 / h as f32) - 0.5)
        .collect();
    let input = Tensor::from_vec(pixels, (args.batch_size, 3, h, w), &Device::Cpu)?;
    let mut rows = Vec::new();
    let requested: Vec<String> = args.quant.iter().map(|q| q.trim().to_string()).collect();
    for recipe in super::eval::recipes(&config)? {
        let recipe = match recipe {
            Ok(r) => r,
            Err((level, reason)) => {
                tracing::error!(level, reason, "skipped");
                continue;
            }
        };
        // recipes() always adds f32 first; leave it out when not asked for.
        if recipe.level.is_float_baseline()
            && !requested.iter().any(|q| {
                segq::quant::Level::parse(q)
                    .map(|l| l.is_float_baseline())
                    .unwrap_or(false)
            })
        {
            continue;
        }
        let (m, report) = model::quantize(&loaded.model, &recipe)?;
        let bytes = m.weight_bytes() as f64;
        segq::sysinfo::reset_peak_rss();
        // Working memory: the heap high-water mark during the passes above what was live before them (the source
        // model, the input, this level's weights).
        let live_before = segq::sysinfo::heap_bytes();
        segq::sysinfo::reset_peak_heap();
        for _ in 0..args.warmup {
            m.forward(&input)?;
        }
        let mut times = Vec::with_capacity(args.iters);
        let mut stages = vec![Duration::ZERO; m.config().num_encoder_blocks + 1];
        for _ in 0..args.iters {
            let start = Instant::now();
            if args.profile {
                m.forward_profiled(&input, &mut |i, d| stages[i] += d)?;
            } else {
                m.forward(&input)?;
            }
            times.push(start.elapsed().as_secs_f64() * 1000.0 / args.batch_size as f64);
        }
        let median = quantile(&times, 0.5);
        let row = serde_json::json!({
            "label": report.label,
            "median_ms": median,
            "p95_ms": quantile(&times, 0.95),
            "images_per_s": 1000.0 / median,
            "weight_bytes": bytes,
            "ratio_to_f32": bytes / f32_bytes,
            "bits_per_weight": report.bits_per_weight,
            "peak_rss_bytes": segq::sysinfo::peak_rss_bytes(),
            "working_bytes": segq::sysinfo::peak_heap_bytes().saturating_sub(live_before),
            // What inference at this level needs: its weights plus the working memory of a forward pass.
            "inference_bytes": bytes + segq::sysinfo::peak_heap_bytes().saturating_sub(live_before) as f64,
            "stage_ms": stages.iter().map(|d| d.as_secs_f64() * 1000.0 / args.iters as f64).collect::<Vec<_>>(),
        });
        tracing::info!(level = %report.label, median_ms = median, "benchmarked");
        rows.push(row);
    }
    if args.json {
        let out = serde_json::json!({
            "model": source.to_string(), "size": [w, h], "batch_size": args.batch_size, "threads": threads,
            "cpu": segq::sysinfo::cpu_model(), "kernels": segq::kernels::cpu_features(), "levels": rows,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "model: {source}; input {w}x{h}, batch {}, {threads} threads, {}",
        args.batch_size,
        segq::sysinfo::cpu_model()
    );
    println!(
        "{:<16} {:>10} {:>10} {:>10} {:>10} {:>8} {:>12} {:>12}",
        "level", "median ms", "p95 ms", "images/s", "weight MB", "ratio", "infer. MB", "peak RSS MB"
    );
    for r in &rows {
        println!(
            "{:<16} {:>10.1} {:>10.1} {:>10.2} {:>10.2} {:>8.3} {:>12.1} {:>12.1}",
            r["label"].as_str().unwrap_or(""),
            r["median_ms"].as_f64().unwrap_or(f64::NAN),
            r["p95_ms"].as_f64().unwrap_or(f64::NAN),
            r["images_per_s"].as_f64().unwrap_or(f64::NAN),
            r["weight_bytes"].as_f64().unwrap_or(f64::NAN) / 1e6,
            r["ratio_to_f32"].as_f64().unwrap_or(f64::NAN),
            r["inference_bytes"].as_f64().unwrap_or(f64::NAN) / 1e6,
            r["peak_rss_bytes"].as_f64().unwrap_or(f64::NAN) / 1e6,
        );
        if args.profile {
            let stages: Vec<String> = r["stage_ms"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .enumerate()
                        .map(|(i, v)| {
                            format!(
                                "{}: {:.1} ms",
                                if i + 1 == a.len() {
                                    "decode head".to_string()
                                } else {
                                    format!("stage {}", i + 1)
                                },
                                v.as_f64().unwrap_or(0.0)
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            println!("{:<16} {}", "", stages.join(", "));
        }
    }
    Ok(())
}
