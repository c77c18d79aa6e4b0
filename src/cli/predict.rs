//! `segq predict`: flags -> configuration -> [`segq::segmenter::Segmenter`] per image -> the class-index mask PNG at
//! the image's own size, a colour overlay, and optionally the raw logits as `.npy` (float32 [num_labels, h, w] at
//! the model's output resolution).

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use clap::Args;

use super::{GlobalArgs, load_config};
use segq::model::{self, ModelSource};
use segq::preprocess::Protocol;
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
}

pub fn run(global: &GlobalArgs, args: PredictArgs) -> Result<()> {
    let config = load_config(global)?;
    super::set_threads(config.eval.threads);
    let source = ModelSource::parse(Some(args.model.as_deref().unwrap_or(&config.model.source)))?;
    let out_dir = args.out.unwrap_or(config.output.dir.clone());
    let segmenter = Segmenter::from_loaded(model::load(&source)?, args.protocol.unwrap_or(config.eval.protocol));
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
    for path in &args.images {
        let start = std::time::Instant::now();
        let image = segq::data::decode::read_rgb_with(path, &decode)?;
        let (w, h) = (image.width() as usize, image.height() as usize);
        segq::preprocess::check_input_size(segmenter.preprocessor(), segmenter.protocol(), w, h, min_side)
            .map_err(|why| segq::Error::invalid(path.display().to_string(), why))?;
        let prediction = segmenter.predict(&image)?;
        let stem = stem_of(path)?;
        let (w, h) = (prediction.width as u32, prediction.height as u32);
        let mask_path = out_dir.join(format!("{stem}.mask.png"));
        overlay::save_mask_png(&prediction.mask, w, h, num_labels, &mask_path)?;
        let overlay_path = out_dir.join(format!("{stem}.overlay.png"));
        overlay::overlay(&image, &prediction.mask, 0.5)?
            .save(&overlay_path)
            .map_err(|e| segq::Error::write(&overlay_path, format!("cannot write: {e}")))?;
        if args.save_logits {
            let l = &prediction.logits;
            let npy = out_dir.join(format!("{stem}.logits.npy"));
            segq::report::write_npy_f32(&npy, &l.data, &[l.classes, l.height, l.width])?;
        }
        tracing::info!(
            image = %path.display(),
            mask = %mask_path.display(),
            overlay = %overlay_path.display(),
            seconds = start.elapsed().as_secs_f64(),
            "segmented"
        );
    }
    Ok(())
}

fn stem_of(path: &Path) -> Result<String> {
    match path.file_stem().and_then(|s| s.to_str()) {
        Some(s) if !s.is_empty() => Ok(s.to_string()),
        _ => bail!("{}: cannot derive an output name from this path", path.display()),
    }
}
