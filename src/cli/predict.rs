//! `segq predict`: per image, the class-index mask PNG at the image's own size, a colour overlay, and optionally the
//! raw logits as `.npy` (float32 [num_labels, h, w] at the model's output resolution).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;

use super::{GlobalArgs, load_config};
use segq::model::{self, ModelSource};
use segq::preprocess::{self, Protocol};

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
}

pub fn run(global: &GlobalArgs, args: PredictArgs) -> Result<()> {
    let config = load_config(global)?;
    super::set_threads(config.eval.threads);
    let source = ModelSource::parse(Some(args.model.as_deref().unwrap_or(&config.model.source)))?;
    let out_dir = args.out.unwrap_or(config.output.dir.clone());
    let protocol = args.protocol.unwrap_or(if config.eval.protocol == "mmseg" {
        Protocol::Mmseg
    } else {
        Protocol::Transformers
    });
    let loaded = model::load(&source)?;
    std::fs::create_dir_all(&out_dir).map_err(|e| segq::Error::io(&out_dir, e))?;
    for path in &args.images {
        let start = std::time::Instant::now();
        let image = segq::data::decode::read_rgb(path)?;
        let (w, h) = (image.width() as usize, image.height() as usize);
        let pixels = preprocess::preprocess(&image, &loaded.preprocessor, protocol);
        let (in_w, in_h) = preprocess::target_size(&loaded.preprocessor, protocol, w, h);
        let input = preprocess::batch_tensor(vec![pixels], in_h, in_w)?;
        let logits = loaded.model.forward(&input)?;
        let (_, c, lh, lw) = logits.dims4()?;
        let flat = logits.flatten_all()?.to_vec1::<f32>()?;
        let mask = preprocess::upsample_argmax(&flat, c, lh, lw, h, w);
        let stem = stem_of(path)?;
        let mask_path = out_dir.join(format!("{stem}.mask.png"));
        segq::report::overlay::save_mask_png(
            &mask,
            w as u32,
            h as u32,
            loaded.model.config().num_labels(),
            &mask_path,
        )?;
        let overlay = segq::report::overlay::overlay(&image, &mask, 0.5)?;
        let overlay_path = out_dir.join(format!("{stem}.overlay.png"));
        overlay
            .save(&overlay_path)
            .with_context(|| format!("{}: cannot write", overlay_path.display()))?;
        if args.save_logits {
            let npy = out_dir.join(format!("{stem}.logits.npy"));
            write_npy_f32(&npy, &flat, &[c, lh, lw])?;
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

/// Writes a little-endian float32 C-order `.npy` (format version 1.0).
pub fn write_npy_f32(path: &Path, data: &[f32], shape: &[usize]) -> Result<()> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape_str = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape_str}, }}");
    // Magic (6) + version (2) + length (2) + header + newline must be a multiple of 64.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = Vec::with_capacity(10 + header.len() + data.len() * 4);
    bytes.extend_from_slice(b"\x93NUMPY\x01\x00");
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    for v in data {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    std::fs::write(path, bytes).map_err(|e| segq::Error::io(path, e))?;
    Ok(())
}
