//! Saving a model: its state dict (every tensor under its checkpoint name, from the model's one walk) and segq's
//! quantized checkpoint folders, which `model::load` reads back through `checkpoint`.

use std::borrow::Cow;
use std::io::Write;
use std::path::Path;

use safetensors::Dtype;

use super::layers::Param;
use super::plan::Stored;
use super::segformer::Segformer;
use super::tree::{Node, Path as ModulePath};
use crate::quant::{self, QuantTensor, Recipe};
use crate::{Error, Result};

/// One entry of [`state_dict`], borrowed from the model where it can be.
pub enum StateTensor<'a> {
    Float { shape: Vec<usize>, values: &'a [f32] },
    Quantized(Cow<'a, QuantTensor>),
}

/// Every tensor of the model under its checkpoint name, in checkpoint order: what a saved checkpoint holds.
pub fn state_dict(model: &Segformer) -> Vec<(String, StateTensor<'_>)> {
    let mut out = Vec::new();
    // The visitor cannot fail.
    let _ = model.visit(&ModulePath::root(), &mut |path, leaf| {
        for (name, param) in leaf.params() {
            let name = path.pp(name).as_str().to_string();
            match param {
                Param::Weight(w, shape) => out.push((
                    name,
                    match w.stored() {
                        Stored::F32(values) => StateTensor::Float {
                            shape: shape.to_vec(),
                            values,
                        },
                        Stored::Quantized(q) => StateTensor::Quantized(q),
                    },
                )),
                Param::Vector(values) => out.push((
                    name,
                    StateTensor::Float {
                        shape: vec![values.len()],
                        values,
                    },
                )),
                // A calibrated input scale as a scalar (shape `[]`), as optimum-quanto stores `input_scale`.
                Param::OptionalScalar(Some(value)) => out.push((
                    name,
                    StateTensor::Float {
                        shape: Vec::new(),
                        values: std::slice::from_ref(value),
                    },
                )),
                Param::OptionalScalar(None) | Param::Unused => {}
            }
        }
        Ok(())
    });
    out
}

/// Writes a quantized model as a segq checkpoint folder: `model.safetensors` (packed codes, scales and zero points
/// for quantized weights, float32 for the rest, the recipe and per-weight layout in its metadata) plus the original
/// `config.json` and `preprocessor_config.json`. Returns the bytes of the safetensors file.
pub fn save_quantized(
    model: &Segformer,
    recipe: &Recipe,
    config_json: &str,
    preprocessor_json: Option<&str>,
    dir: &Path,
) -> Result<u64> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut stored: Vec<StoredTensor> = Vec::new();
    let mut quantized: Vec<(String, Cow<'_, QuantTensor>)> = Vec::new();
    for (name, entry) in state_dict(model) {
        match entry {
            StateTensor::Float { shape, values } => {
                let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
                stored.push((name, Dtype::F32, shape, bytes));
            }
            StateTensor::Quantized(q) => {
                stored.extend(q.to_tensors(&name));
                quantized.push((name, q));
            }
        }
    }
    let label = recipe.label_with_bits(model.bits_per_weight());
    let metadata = quant::checkpoint_metadata(recipe, &label, quantized.iter().map(|(n, q)| (n.as_str(), q.as_ref())))?;
    // A quanto map left by an earlier `--format quanto` would make the folder read as a quanto checkpoint.
    let stale_map = dir.join(super::quanto::QUANTIZATION_MAP_FILE);
    if stale_map.exists() {
        std::fs::remove_file(&stale_map).map_err(|e| Error::io(&stale_map, e))?;
    }
    write_model_files(dir, config_json, preprocessor_json, &stored, metadata)
}

/// A tensor as written: name, dtype, shape and little-endian bytes.
pub(super) type StoredTensor = (String, Dtype, Vec<usize>, Vec<u8>);

/// Writes the files every checkpoint folder holds, each atomically: `config.json` and `preprocessor_config.json`
/// first (a folder with weights but no config.json would look complete to a reader), then `model.safetensors` with
/// `stored` and `metadata`. Returns the bytes of the safetensors file.
pub(super) fn write_model_files(
    dir: &Path,
    config_json: &str,
    preprocessor_json: Option<&str>,
    stored: &[StoredTensor],
    metadata: std::collections::HashMap<String, String>,
) -> Result<u64> {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = stored
        .iter()
        .map(|(n, d, s, b)| {
            safetensors::tensor::TensorView::new(*d, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::invalid(format!("tensor `{n}`"), e.to_string()))
        })
        .collect::<Result<_>>()?;
    write_atomically(&dir.join("config.json"), |out| out.write_all(config_json.as_bytes()))?;
    if let Some(pre) = preprocessor_json {
        write_atomically(&dir.join("preprocessor_config.json"), |out| {
            out.write_all(pre.as_bytes())
        })?;
    }
    let path = dir.join("model.safetensors");
    write_atomically(&path, |out| write_safetensors(out, &views, metadata))?;
    Ok(std::fs::metadata(&path).map_err(|e| Error::io(&path, e))?.len())
}

/// Writes `path` through `fill` atomically ([`crate::outputs::write_atomically`]), flushed and synced before the
/// rename, so a reader (or a run killed half-way) never sees half a file. The file is created as every other file
/// segq writes (mode 0666 less the umask: 0644 usually), not 0600 as a temporary-file library would make it.
pub(crate) fn write_atomically(path: &Path, fill: impl FnOnce(&mut dyn Write) -> std::io::Result<()>) -> Result<()> {
    crate::outputs::write_atomically(path, |temporary| {
        let file = std::fs::File::create(temporary).map_err(|e| Error::io(temporary, e))?;
        let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
        fill(&mut out)
            .and_then(|()| out.into_inner().map_err(|e| e.into_error())?.sync_all())
            .map_err(|e| Error::io(temporary, e))
    })
}

/// The safetensors format, streamed: 8 bytes of header length (little endian), the JSON header (tensor dtypes,
/// shapes and data offsets, then `__metadata__`) padded with spaces to a multiple of 8, then the tensors' bytes,
/// widest dtype first (as the safetensors library orders them) so every tensor starts aligned to its element size.
pub(crate) fn write_safetensors(
    out: &mut dyn Write,
    views: &[(String, safetensors::tensor::TensorView<'_>)],
    metadata: std::collections::HashMap<String, String>,
) -> std::io::Result<()> {
    let mut order: Vec<&(String, safetensors::tensor::TensorView<'_>)> = views.iter().collect();
    order.sort_by_key(|(_, view)| std::cmp::Reverse(view.dtype().bitsize()));
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, view) in &order {
        let end = offset + view.data().len();
        header.insert(
            name.clone(),
            serde_json::json!({ "dtype": view.dtype(), "shape": view.shape(), "data_offsets": [offset, end] }),
        );
        offset = end;
    }
    header.insert("__metadata__".into(), serde_json::json!(metadata));
    let mut text = serde_json::to_vec(&header).map_err(std::io::Error::other)?;
    text.resize(text.len().next_multiple_of(8), b' ');
    out.write_all(&(text.len() as u64).to_le_bytes())?;
    out.write_all(&text)?;
    for (_, view) in &order {
        out.write_all(view.data())?;
    }
    Ok(())
}

/// Bytes of tensor data a checkpoint of `model` holds as `save_quantized` writes it (the file adds only its JSON
/// header): float tensors as f32, quantized weights as packed codes, scales and zero points.
pub fn stored_bytes(model: &Segformer) -> u64 {
    state_dict(model)
        .iter()
        .map(|(_, t)| match t {
            StateTensor::Float { values, .. } => std::mem::size_of_val(*values) as u64,
            // `weight_bytes` counts exactly what `to_tensors` stores: codes, scales, zero points.
            StateTensor::Quantized(q) => q.weight_bytes() as u64,
        })
        .sum()
}
