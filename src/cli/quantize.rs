//! `segq quantize`: writes a quantized checkpoint folder that `--model DIR` loads directly, and/or an error report
//! (weight and logits error of every recipe against f32) used by scripts/compare_quanto.py.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Args;

use super::{GlobalArgs, load_config};
use segq::model::{self, ModelSource};
use segq::preprocess::{self, Protocol};

#[derive(Args, Debug)]
pub struct QuantizeArgs {
    /// Model: folder, Hub id[@revision], URL, or "embedded".
    #[arg(long)]
    pub model: Option<String>,
    /// Quantization levels, comma-separated (one level with --out).
    #[arg(long, value_delimiter = ',', required = true)]
    pub quant: Vec<String>,
    /// Methods, comma-separated (one method with --out).
    #[arg(long, value_delimiter = ',', default_value = "rtn")]
    pub method: Vec<String>,
    #[arg(long)]
    pub group_size: Option<usize>,
    /// Weight-name glob patterns kept in float.
    #[arg(long, value_delimiter = ',')]
    pub skip: Option<Vec<String>>,
    /// Write the quantized checkpoint folder here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Write a JSON report of each recipe's weight and logits error against f32.
    #[arg(long)]
    pub error_report: Option<PathBuf>,
    /// Images for the logits error (with --error-report).
    #[arg(long, num_args = 1..)]
    pub images: Vec<PathBuf>,
}

pub fn run(global: &GlobalArgs, args: QuantizeArgs) -> Result<()> {
    let mut config = load_config(global)?;
    super::set_threads(config.eval.threads);
    if let Some(m) = &args.model {
        config.model.source = m.clone();
    }
    config.quant.levels = args.quant.clone();
    config.quant.methods = args.method.clone();
    config.quant.group_size = args.group_size.or(config.quant.group_size);
    if let Some(s) = &args.skip {
        config.quant.skip = s.clone();
    }
    if args.out.is_none() && args.error_report.is_none() {
        bail!("nothing to do: give --out DIR (a quantized checkpoint) and/or --error-report FILE");
    }
    let source = ModelSource::parse(Some(&config.model.source))?;
    let loaded = model::load(&source)?;
    let recipes: Vec<_> = super::eval::recipes(&config)?
        .into_iter()
        .skip(1) // the f32 baseline
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|(level, reason)| anyhow::anyhow!("{level}: {reason}"))?;
    if recipes.is_empty() {
        bail!("--quant names no quantized level (f32 is the unquantized model)");
    }
    if let Some(out) = &args.out {
        if recipes.len() != 1 {
            bail!(
                "--out writes one checkpoint: give one level and one method (got {})",
                recipes.len()
            );
        }
        let recipe = &recipes[0];
        let (quantized, report) = model::quantize(&loaded.model, recipe)?;
        let bytes = segq::model::checkpoint::save_quantized(
            &quantized,
            recipe,
            &loaded.config_json,
            loaded.preprocessor_json.as_deref(),
            out,
        )?;
        let f32_bytes = loaded.weight_bytes();
        tracing::info!(
            out = %out.display(),
            recipe = %report.label,
            disk_bytes = bytes,
            ratio_to_f32 = bytes as f64 / f32_bytes as f64,
            bits_per_weight = report.bits_per_weight,
            "quantized checkpoint written"
        );
    }
    if let Some(path) = &args.error_report {
        let mut inputs = Vec::new();
        for image in &args.images {
            let img = segq::data::decode::read_rgb(image)?;
            let (w, h) = preprocess::target_size(
                &loaded.preprocessor,
                Protocol::Transformers,
                img.width() as usize,
                img.height() as usize,
            );
            let px = preprocess::preprocess(&img, &loaded.preprocessor, Protocol::Transformers);
            inputs.push(preprocess::batch_tensor(vec![px], h, w)?);
        }
        let reference: Vec<Vec<f32>> = inputs
            .iter()
            .map(|x| Ok(loaded.model.forward(x)?.flatten_all()?.to_vec1::<f32>()?))
            .collect::<segq::Result<_>>()?;
        let num_labels = loaded.model.config().num_labels();
        let mut rows = Vec::new();
        for recipe in &recipes {
            let (quantized, report) = model::quantize(&loaded.model, recipe)?;
            let (mut err, mut norm, mut agree, mut pixels) = (0f64, 0f64, 0usize, 0usize);
            for (x, r) in inputs.iter().zip(&reference) {
                let q = quantized.forward(x)?.flatten_all()?.to_vec1::<f32>()?;
                err += q.iter().zip(r).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>();
                norm += r.iter().map(|a| (*a as f64).powi(2)).sum::<f64>();
                let plane = r.len() / num_labels;
                for p in 0..plane {
                    let argmax = |v: &[f32]| {
                        (0..num_labels).fold(0, |best, c| {
                            if v[c * plane + p] > v[best * plane + p] {
                                c
                            } else {
                                best
                            }
                        })
                    };
                    agree += usize::from(argmax(&q) == argmax(r));
                    pixels += 1;
                }
            }
            rows.push(serde_json::json!({
                "label": report.label,
                "level": recipe.level.name(),
                "method": recipe.method.name(),
                "bits_per_weight": report.bits_per_weight,
                "weight_rel_error": report.weight_rel_error,
                "logits_rel_error": if norm > 0.0 { (err / norm).sqrt() } else { f64::NAN },
                "pixel_agreement": if pixels > 0 { agree as f64 / pixels as f64 } else { f64::NAN },
                "quantized_layers": report.quantized_layers,
            }));
        }
        let json = serde_json::json!({ "model": source.to_string(), "images": args.images, "recipes": rows });
        std::fs::write(path, serde_json::to_string_pretty(&json)?).map_err(|e| segq::Error::io(path, e))?;
        tracing::info!(path = %path.display(), recipes = recipes.len(), "error report written");
    }
    Ok(())
}
