//! `segq inspect`: the model's configuration and, per layer, its kind, shape, parameters, format and bytes.

use anyhow::Result;
use clap::Args;

use super::{GlobalArgs, load_config};
use segq::model::{self, ModelSource};
use segq::quant::{Level, Method};

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// Model: folder, Hub id[@revision], URL, or "embedded" (default: model.source in segq.toml).
    #[arg(long)]
    pub model: Option<String>,
    /// Show what each layer becomes at this quantization level (e.g. int4).
    #[arg(long)]
    pub quant: Option<Level>,
    /// Quantization method for --quant.
    #[arg(long, default_value = "rtn")]
    pub method: Method,
    #[arg(long)]
    pub group_size: Option<usize>,
    /// Weight-name glob patterns kept in float.
    #[arg(long, value_delimiter = ',')]
    pub skip: Option<Vec<String>>,
    /// Show what each layer becomes under a recipe file (level, method, skips, [[rules]]) instead of --quant.
    #[arg(long, value_name = "FILE.toml", conflicts_with_all = ["quant", "group_size", "skip"])]
    pub recipe: Option<std::path::PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(global: &GlobalArgs, args: InspectArgs) -> Result<()> {
    let config = load_config(global)?;
    super::set_threads(config.eval.threads);
    let source = ModelSource::parse(Some(args.model.as_deref().unwrap_or(&config.model.source)))?;
    let mut loaded = model::load(&source)?;
    let f32_bytes: usize = loaded.model.layers().iter().map(|l| l.parameters * 4).sum();
    let recipe = match (&args.recipe, args.quant) {
        (Some(path), _) => Some(segq::quant::Recipe::read_file(path)?),
        (None, Some(level)) => Some(
            segq::quant::Recipe::new(
                level,
                args.method,
                args.group_size.or(config.quant.group_size),
                config.quant.symmetric,
                args.skip.clone().unwrap_or_else(|| config.quant.skip.clone()),
            )?
            .with_rules(config.quant.rules.iter().cloned())?,
        ),
        (None, None) => None,
    };
    if let Some(recipe) = recipe {
        let (quantized, _) = model::quantize(&loaded.model, &recipe)?;
        loaded.model = quantized;
    }
    let layers = loaded.model.layers();
    let total_params: usize = layers.iter().map(|l| l.parameters).sum();
    let total_bytes = loaded.model.weight_bytes();
    if args.json {
        let value = serde_json::json!({
            "source": source.to_string(),
            "config": loaded.model.config(),
            "preprocessor": loaded.preprocessor,
            "layers": layers,
            "total_parameters": total_params,
            "total_weight_bytes": total_bytes,
            "f32_weight_bytes": f32_bytes,
        });
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    let c = loaded.model.config();
    println!("model: {source}");
    println!(
        "segformer: hidden sizes {:?}, depths {:?}, heads {:?}, sr ratios {:?}, decoder {}, {} labels",
        c.hidden_sizes,
        c.depths,
        c.num_attention_heads,
        c.sr_ratios,
        c.decoder_hidden_size,
        c.num_labels()
    );
    println!(
        "input: {}x{} (width x height), mean {:?}, std {:?}",
        loaded.preprocessor.size.width,
        loaded.preprocessor.size.height,
        loaded.preprocessor.image_mean,
        loaded.preprocessor.image_std
    );
    let name_w = layers.iter().map(|l| l.name.len()).max().unwrap_or(10).max(5);
    println!(
        "{:<name_w$}  {:<7} {:<18} {:>10} {:<12} {:>6} {:>12}",
        "layer", "kind", "shape", "params", "format", "bits", "bytes"
    );
    for l in &layers {
        println!(
            "{:<name_w$}  {:<7} {:<18} {:>10} {:<12} {:>6.2} {:>12}",
            l.name,
            l.kind,
            format!("{:?}", l.shape),
            l.parameters,
            l.format,
            l.bits_per_weight,
            l.weight_bytes + l.bias_bytes
        );
    }
    println!(
        "total: {} layers, {} parameters in Linear/Conv layers, {:.3} MB of weights and biases ({:.3} MB in f32, ratio {:.3}, {:.3} MB saved)",
        layers.len(),
        total_params,
        total_bytes as f64 / 1e6,
        f32_bytes as f64 / 1e6,
        total_bytes as f64 / f32_bytes.max(1) as f64,
        (f32_bytes as f64 - total_bytes as f64) / 1e6
    );
    Ok(())
}
