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

    /// Takes a layer weight by name: float as stored.
    pub fn weight(&mut self, name: &str, shape: &[usize]) -> Result<Weight> {
        Ok(Weight::Float(self.take(name, shape)?))
    }

    /// Drops a tensor the model does not use (BatchNorm's `num_batches_tracked`).
    pub fn discard(&mut self, name: &str) {
        self.tensors.remove(name);
    }

    /// Fails if tensors are left over: a checkpoint for another architecture or configuration.
    pub fn finish(&self) -> Result<()> {
        if self.tensors.is_empty() {
            return Ok(());
        }
        let mut names: Vec<&String> = self.tensors.keys().collect();
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

fn read_tensor_file(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    if !path.exists() {
        return Err(Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "file not found"),
        ));
    }
    if name.ends_with(".safetensors") {
        let map = candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| {
            Error::Model(format!("{}: cannot read safetensors: {e}", path.display()))
        })?;
        Ok(map.into_iter().collect())
    } else if name.ends_with(".bin") || name.ends_with(".pt") || name.ends_with(".pth") {
        candle_core::pickle::read_all(path).map_err(|e| {
            Error::Model(format!(
                "{}: cannot read PyTorch checkpoint: {e}",
                path.display()
            ))
        })
    } else {
        Err(Error::Model(format!(
            "{}: unknown checkpoint format (expected .safetensors or .bin)",
            path.display()
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
