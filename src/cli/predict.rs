//! `segq predict`: flags -> configuration -> [`segq::segmenter::Segmenter`] per image -> the class-index mask PNG at
//! the image's own size, a colour overlay, and optionally the raw logits as `.npy` (float32 [num_labels, h, w] at
//! the model's output resolution).
//!
//! Outputs are named after the image (`x.jpg` -> `x.mask.png`, `x.overlay.png`, `x.logits.npy`) in one folder;
//! images sharing a name (`a/x.jpg`, `b/x.png`) get `-2`, `-3`, ... in the order given, so no output replaces
//! another of the same run, and no output may replace an input. Every file is written under a temporary name and
//! renamed, so a killed run never leaves half a PNG. A bad image stops the run (`--on-error fail`, as in eval) or is
//! skipped, counted and reported (`--on-error skip`).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use clap::Args;

use super::{GlobalArgs, load_config};
use segq::data::OnError;
use segq::model::{self, ModelSource};
use segq::outputs::{self, Input};
use segq::preprocess::Protocol;
use segq::quant::{Level, Method, Recipe};
use segq::report::overlay;
use segq::segmenter::Segmenter;

#[derive(Args, Debug)]
pub struct PredictArgs {
    /// Images to segment (JPEG or PNG).
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
    /// Model: folder, Hub id[@revision], URL, or "embedded" (default: model.source in segq.toml).
    #[arg(long)]
    pub model: Option<String>,
    /// Output folder (default: output.dir in segq.toml).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Also write the logits as <stem>.logits.npy.
    #[arg(long)]
    pub save_logits: bool,
    /// Resize protocol.
    #[arg(long, value_enum)]
    pub protocol: Option<Protocol>,
    /// Refuse images with more pixels than this, from their header [default: dataset.max_image_pixels].
    #[arg(long, value_name = "N")]
    pub max_image_pixels: Option<u64>,
    /// Keep images as stored instead of turning them upright by their EXIF Orientation tag.
    #[arg(long)]
    pub no_exif_orientation: bool,
    /// What to do with an image that cannot be read or segmented: fail (default: stop there, naming it) or skip
    /// (go on; the skipped images and their reasons are reported).
    #[arg(long, value_name = "fail|skip")]
    pub on_error: Option<OnError>,
    /// Quantize the model to this level first, as eval does (one level: f32, f16, bf16, f8, f8e5m2, int8,
    /// int8-dyn, int4, int4-dyn, int2) [default: the model as loaded].
    #[arg(long, value_name = "LEVEL")]
    pub quant: Option<Level>,
    /// Quantization method for --quant: rtn or hqq [default: rtn].
    #[arg(long, value_name = "METHOD", requires = "quant")]
    pub method: Option<Method>,
    /// Weights per group for int4/int2 [default: 64 for int4, 32 for int2].
    #[arg(long, requires = "quant")]
    pub group_size: Option<usize>,
    /// Weight-name glob patterns kept in float with --quant (repeatable or comma-separated).
    #[arg(long, value_delimiter = ',', requires = "quant")]
    pub skip: Option<Vec<String>>,
    /// A recipe file (level, method, skips, [[rules]]) instead of --quant/--method.
    #[arg(long, value_name = "FILE.toml", conflicts_with_all = ["quant", "method", "group_size", "skip"])]
    pub recipe: Option<PathBuf>,
    /// With a quantized checkpoint as --model, quantize its dequantized weights again to --quant or --recipe.
    #[arg(long)]
    pub requantize: bool,
}

/// The files written for one image.
struct Outputs {
    mask: PathBuf,
    overlay: PathBuf,
    logits: PathBuf,
}

pub fn run(global: &GlobalArgs, args: PredictArgs) -> Result<()> {
    let config = load_config(global)?;
    super::set_threads(config.eval.threads);
    let on_error = args.on_error.unwrap_or_default();
    let source = ModelSource::parse(Some(args.model.as_deref().unwrap_or(&config.model.source)))?;
    let out_dir = args.out.clone().unwrap_or(config.output.dir.clone());
    outputs::check_folder("--out", &out_dir)?;
    let plan = plan_outputs(&args.images, &out_dir, args.save_logits)?;
    if args.requantize && args.quant.is_none() && args.recipe.is_none() {
        bail!("--requantize needs --quant LEVEL or --recipe FILE (the level to quantize to)");
    }
    let recipe = match &args.recipe {
        Some(path) => Recipe::read_file(path)?,
        None => Recipe::new(
            args.quant.unwrap_or(Level::F32),
            args.method.unwrap_or(Method::Rtn),
            args.group_size,
            config.quant.symmetric,
            args.skip.clone().unwrap_or_default(),
        )?,
    };
    let protocol = args.protocol.unwrap_or(config.eval.protocol);
    // Quantizing logs its level, bits per weight and time.
    let (segmenter, _report) = Segmenter::quantized(model::load(&source)?, &recipe, args.requantize, protocol)?;
    std::fs::create_dir_all(&out_dir).map_err(|e| segq::Error::io(&out_dir, e))?;
    let num_labels = segmenter.model().config().num_labels();
    let max_image_pixels = args.max_image_pixels.unwrap_or(config.dataset.max_image_pixels);
    if max_image_pixels == 0 {
        return Err(segq::Error::config("--max-image-pixels", "--max-image-pixels must be at least 1").into());
    }
    let decode = segq::data::DecodeOptions {
        max_image_pixels,
        exif_orientation: config.dataset.exif_orientation && !args.no_exif_orientation,
    };
    let min_side = segmenter.model().config().min_input_side();
    let total = plan.len();
    let (mut predicted, mut replaced) = (0usize, 0usize);
    let mut skipped: Vec<String> = Vec::new();
    for (index, (path, names)) in plan.iter().enumerate() {
        if segq::interrupt::stop_requested() {
            tracing::warn!("stopped: {predicted} of {total} images predicted before the interruption");
            return Err(segq::Error::Interrupted.into());
        }
        let start = std::time::Instant::now();
        let names = match names {
            Ok(names) => names,
            Err(reason) => {
                let error = anyhow::anyhow!("{}: {reason}", path.display());
                handle_bad_image(on_error, error, &mut skipped, predicted, total - index - 1)?;
                continue;
            }
        };
        let segmented = segq::data::decode::read_rgb_with(path, &decode)
            .and_then(|image| {
                let (w, h) = (image.width() as usize, image.height() as usize);
                segq::preprocess::check_input_size(segmenter.preprocessor(), segmenter.protocol(), w, h, min_side)
                    .map_err(|why| segq::Error::invalid(path.display().to_string(), why))?;
                Ok(image)
            })
            .and_then(|image| segmenter.predict(&image).map(|prediction| (image, prediction)));
        let (image, prediction) = match segmented {
            Ok(done) => done,
            Err(e) => {
                handle_bad_image(on_error, naming(e, path), &mut skipped, predicted, total - index - 1)?;
                continue;
            }
        };
        // From here on a failure is the output's (disk, permissions), not the image's: it always stops the run.
        replaced += [&names.mask, &names.overlay, &names.logits]
            .iter()
            .filter(|p| p.exists())
            .count();
        overlay::write_prediction_pngs(&image, &prediction.mask, num_labels, &names.mask, &names.overlay)?;
        if args.save_logits {
            let l = &prediction.logits;
            outputs::write_atomically(&names.logits, |tmp| {
                segq::report::write_npy_f32(tmp, &l.data, &[l.classes, l.height, l.width])
            })?;
        }
        predicted += 1;
        tracing::info!(
            image = %path.display(),
            mask = %names.mask.display(),
            overlay = %names.overlay.display(),
            seconds = %format!("{:.3}", start.elapsed().as_secs_f64()),
            "segmented"
        );
    }
    if replaced > 0 {
        tracing::warn!(
            out = %out_dir.display(),
            "replaced {replaced} files an earlier run had written under the same names"
        );
    }
    if skipped.is_empty() {
        tracing::info!(out = %out_dir.display(), "{predicted} of {total} images predicted");
        return Ok(());
    }
    let summary = summarize(&skipped);
    if predicted == 0 {
        bail!("no image could be predicted: {total} of {total} skipped: {summary}");
    }
    tracing::warn!(
        out = %out_dir.display(),
        "{predicted} of {total} images predicted, {} skipped: {summary}",
        skipped.len()
    );
    Ok(())
}

/// With `fail`, returns the image's error (after saying how far the run got); with `skip`, records it and goes on.
fn handle_bad_image(
    on_error: OnError,
    error: anyhow::Error,
    skipped: &mut Vec<String>,
    predicted: usize,
    not_attempted: usize,
) -> Result<()> {
    match on_error {
        OnError::Fail => {
            if predicted > 0 || not_attempted > 0 {
                tracing::warn!(
                    "stopped at a bad image: {predicted} predicted before it, {not_attempted} not attempted \
                     (--on-error skip goes on past bad images)"
                );
            }
            Err(error)
        }
        OnError::Skip => {
            let reason = super::error_line(&error);
            tracing::warn!("skipped {reason}");
            skipped.push(reason);
            Ok(())
        }
    }
}

/// The first skip reasons, joined; the rest counted.
fn summarize(skipped: &[String]) -> String {
    const SHOWN: usize = 5;
    let mut text = skipped.iter().take(SHOWN).cloned().collect::<Vec<_>>().join("; ");
    if skipped.len() > SHOWN {
        text.push_str(&format!("; and {} more", skipped.len() - SHOWN));
    }
    text
}

/// The error with the image's path in front, unless its message already names it.
fn naming(error: segq::Error, path: &Path) -> anyhow::Error {
    let shown = path.display().to_string();
    if error.to_string().contains(&shown) {
        error.into()
    } else {
        anyhow::Error::new(error).context(shown)
    }
}

/// Output names for every image, in order: the image's file stem, with `-2`, `-3`, ... for a stem an earlier image
/// (or another image's natural name) already has, compared without case so that case-insensitive file systems
/// cannot merge them either. An image without a usable name gets its reason instead. Refuses the run when an output
/// would replace one of the images (the logits only count with `save_logits`).
fn plan_outputs(
    images: &[PathBuf],
    out_dir: &Path,
    save_logits: bool,
) -> Result<Vec<(PathBuf, std::result::Result<Outputs, String>)>> {
    let stems: Vec<Option<String>> = images.iter().map(|p| stem_of(p)).collect();
    let natural: HashSet<String> = stems.iter().flatten().map(|s| s.to_lowercase()).collect();
    let mut taken: HashSet<String> = HashSet::new();
    let mut plan = Vec::with_capacity(images.len());
    for (path, stem) in images.iter().zip(stems) {
        let Some(stem) = stem else {
            plan.push((
                path.clone(),
                Err("cannot derive an output name from this path".to_string()),
            ));
            continue;
        };
        let mut name = stem.clone();
        let mut k = 2;
        while taken.contains(&name.to_lowercase()) || (name != stem && natural.contains(&name.to_lowercase())) {
            name = format!("{stem}-{k}");
            k += 1;
        }
        taken.insert(name.to_lowercase());
        if name != stem {
            tracing::info!(image = %path.display(), "another image is also named {stem}; writing {name}.mask.png");
        }
        let names = Outputs {
            mask: out_dir.join(format!("{name}.mask.png")),
            overlay: out_dir.join(format!("{name}.overlay.png")),
            logits: out_dir.join(format!("{name}.logits.npy")),
        };
        plan.push((path.clone(), Ok(names)));
    }
    let inputs: Vec<Input<'_>> = images.iter().map(|p| Input::File(p)).collect();
    for (image, names) in plan
        .iter()
        .filter_map(|(image, names)| Some((image, names.as_ref().ok()?)))
    {
        let written = [&names.mask, &names.overlay, &names.logits];
        for output in &written[..if save_logits { 3 } else { 2 }] {
            if let Some((input, _)) = outputs::clashing_input(output, &inputs) {
                return Err(segq::Error::config(
                    format!("--out {}", out_dir.display()),
                    format!(
                        "the output for {} would replace the input {} (choose another --out)",
                        image.display(),
                        input.display()
                    ),
                )
                .into());
            }
        }
    }
    Ok(plan)
}

fn stem_of(path: &Path) -> Option<String> {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .filter(|s| !s.is_empty())
}
