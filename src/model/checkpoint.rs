//! Reading checkpoint tensors: safetensors (single or sharded with an index), PyTorch `.bin` zip pickles, and bytes
//! embedded in the binary. Every tensor is checked by name and shape; missing and unexpected tensors are errors.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::layers::Weight;
use crate::{Error, Result};

/// The tensors of a checkpoint, consumed by name while the model is built.
pub struct TensorStore {
    origin: String,
    tensors: HashMap<String, Tensor>,
    /// Bytes of weights by their dtype in the file (e.g. "F32" -> 14.9 MB), for the load log.
    pub bytes_by_dtype: BTreeMap<String, usize>,
}

impl TensorStore {
    pub fn new(origin: impl Into<String>, tensors: HashMap<String, Tensor>) -> Self {
        let mut bytes_by_dtype = BTreeMap::new();
        for t in tensors.values() {
            *bytes_by_dtype
                .entry(format!("{:?}", t.dtype()))
                .or_insert(0) += t.elem_count() * t.dtype().size_in_bytes();
        }
        Self {
            origin: origin.into(),
            tensors,
            bytes_by_dtype,
        }
    }

    /// Loads safetensors files (all shards of one checkpoint) or a PyTorch `.bin`.
    pub fn from_files(files: &[PathBuf]) -> Result<Self> {
        let mut tensors = HashMap::new();
        for file in files {
            let loaded = read_tensor_file(file)?;
            for (name, t) in loaded {
                if tensors.insert(name.clone(), t).is_some() {
                    return Err(Error::Model(format!(
                        "{}: tensor `{name}` appears in two shards",
                        file.display()
                    )));
                }
            }
        }
        let origin = files
            .first()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        Ok(Self::new(origin, tensors))
    }

    /// Loads a safetensors file held in memory (the embedded demo model).
    pub fn from_safetensors_bytes(origin: &str, bytes: &[u8]) -> Result<Self> {
        let tensors = candle_core::safetensors::load_buffer(bytes, &Device::Cpu)
            .map_err(|e| Error::Model(format!("{origin}: cannot read safetensors: {e}")))?;
        Ok(Self::new(origin, tensors))
    }

    /// Takes a float tensor by name, converted to f32, checking its shape.
    pub fn take(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.tensors.remove(name).ok_or_else(|| {
            Error::Model(format!(
                "{}: checkpoint lacks tensor `{name}` (expected shape {shape:?})",
                self.origin
            ))
        })?;
        if t.dims() != shape {
            return Err(Error::Model(format!(
                "{}: tensor `{name}` has shape {:?}, the config expects {shape:?}",
                self.origin,
                t.dims()
            )));
        }
        Ok(if t.dtype() == DType::F32 {
            t
        } else {
            t.to_dtype(DType::F32)?
        })
    }

    /// Takes a layer weight by name: quantized when the checkpoint stores it quantized, else float.
    pub fn weight(&mut self, name: &str, shape: &[usize]) -> Result<Weight> {
        let Some(meta) = self.quant_map.remove(name) else {
            return Ok(Weight::Float(self.take(name, shape)?));
        };
        let rows = shape[0];
        let cols = shape.iter().product::<usize>() / rows.max(1);
        if (meta.rows, meta.cols) != (rows, cols) {
            return Err(Error::Model(format!(
                "{}: quantized tensor `{name}` is [{}, {}], the config expects [{rows}, {cols}]",
                self.origin, meta.rows, meta.cols
            )));
        }
        let raw = &self.raw;
        let q = QuantTensor::from_tensors(name, &meta, |part| raw.get(part).map(|(d, s, b)| (*d, s.clone(), b.as_slice())))
            .map_err(|e| Error::Model(format!("{}: {e}", self.origin)))?;
        for suffix in ["qdata", "scale", "zero"] {
            self.raw.remove(&format!("{name}.{suffix}"));
        }
        Ok(Weight::Quantized(Arc::new(q)))
    }

    /// Drops a tensor the model does not use (BatchNorm's `num_batches_tracked`).
    pub fn discard(&mut self, name: &str) {
        self.tensors.remove(name);
    }

    /// Fails if tensors are left over: a checkpoint for another architecture or configuration.
    pub fn finish(&self) -> Result<()> {
        if self.tensors.is_empty() && self.raw.is_empty() && self.quant_map.is_empty() {
            return Ok(());
        }
        let mut names: Vec<&String> = self.tensors.keys().chain(self.raw.keys()).chain(self.quant_map.keys()).collect();
        names.sort();
        let shown: Vec<String> = names.iter().take(5).map(|n| format!("`{n}`")).collect();
        Err(Error::Model(format!(
            "{}: checkpoint has {} unexpected tensor(s) for this config: {}{}",
            self.origin,
            names.len(),
            shown.join(", "),
            if names.len() > 5 { ", ..." } else { "" }
        )))
    }
}

/// Shard files listed by a `model.safetensors.index.json` (`weight_map` values), in a stable order.
pub fn shards_from_index(index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::Model(format!("{}: malformed index: {e}", index.display())))?;
    let map = value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::Model(format!("{}: index has no `weight_map`", index.display())))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files: Vec<String> = map
        .values()
        .filter_map(|v| v.as_str().map(String::from))
        .collect();
    files.sort();
    files.dedup();
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}

/// Writes a quantized model as a segq checkpoint folder: `model.safetensors` (packed codes, scales and zero points
/// for quantized weights, float32 for the rest, the recipe and per-weight layout in its metadata) plus the original
/// `config.json` and `preprocessor_config.json`. Returns the bytes of the safetensors file.
pub fn save_quantized(
    model: &super::segformer::Segformer,
    recipe: &crate::quant::Recipe,
    config_json: &str,
    preprocessor_json: Option<&str>,
    dir: &std::path::Path,
) -> Result<u64> {
    use super::segformer::StateTensor;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let state = model.state_dict();
    let mut stored: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut quantized: Vec<(String, Arc<QuantTensor>)> = Vec::new();
    for (name, entry) in state {
        match entry {
            StateTensor::Float(t) => {
                let shape = t.dims().to_vec();
                let values = t.flatten_all()?.to_vec1::<f32>()?;
                let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
                stored.push((name, Dtype::F32, shape, bytes));
            }
            StateTensor::Quantized(q) => {
                stored.extend(q.to_tensors(&name));
                quantized.push((name, q));
            }
        }
    }
    let metadata = quant::checkpoint_metadata(recipe, quantized.iter().map(|(n, q)| (n.as_str(), q.as_ref())))?;
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = stored
        .iter()
        .map(|(n, d, s, b)| {
            safetensors::tensor::TensorView::new(*d, s.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::Model(format!("tensor `{n}`: {e}")))
        })
        .collect::<Result<_>>()?;
    let path = dir.join("model.safetensors");
    safetensors::serialize_to_file(views, Some(metadata), &path).map_err(|e| Error::Model(format!("{}: {e}", path.display())))?;
    let config_path = dir.join("config.json");
    std::fs::write(&config_path, config_json).map_err(|e| Error::io(&config_path, e))?;
    if let Some(pre) = preprocessor_json {
        let p = dir.join("preprocessor_config.json");
        std::fs::write(&p, pre).map_err(|e| Error::io(&p, e))?;
    }
    Ok(std::fs::metadata(&path).map_err(|e| Error::io(&path, e))?.len())
}
