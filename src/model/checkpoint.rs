//! Reading checkpoint tensors: safetensors (single or sharded with an index), PyTorch `.bin` zip pickles, and bytes
//! embedded in the binary. Every tensor is checked by name and shape; missing and unexpected tensors are errors.
//! This module knows nothing of the model: `model::load` walks the model's tree and takes each tensor by name.
//! Writing checkpoints is `model::save` (re-exported here for existing callers).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::DType;
use safetensors::{Dtype, SafeTensors};

use crate::quant::{self, QuantTensor, QuantTensorMeta, RecipeHeader};
use crate::{Error, Result};

pub use super::save::{save_quantized, stored_bytes};

/// A stored tensor's raw form: dtype, shape, little-endian bytes (the parts of quantized weights).
type RawTensor = (Dtype, Vec<usize>, Vec<u8>);

/// A layer weight as the checkpoint holds it.
pub enum StoredWeight {
    /// Converted to f32, row-major.
    Float(Vec<f32>),
    Quantized(QuantTensor),
}

/// A float tensor of the checkpoint, converted to f32 when read (once: the model keeps these values).
struct FloatTensor {
    shape: Vec<usize>,
    values: Vec<f32>,
}

/// The tensors of a checkpoint, consumed by name while the model is built.
pub struct TensorStore {
    origin: String,
    tensors: HashMap<String, FloatTensor>,
    /// Parts of quantized weights (`<name>.qdata`, `.scale`, `.zero`), kept as stored.
    raw: HashMap<String, RawTensor>,
    quant_map: BTreeMap<String, QuantTensorMeta>,
    /// The recipe of a quantized checkpoint (from its metadata).
    pub recipe: Option<RecipeHeader>,
    /// Bytes of weights by their dtype in the file (e.g. "F32" -> 14.9 MB), for the load log.
    pub bytes_by_dtype: BTreeMap<String, usize>,
}

impl TensorStore {
    fn empty(origin: impl Into<String>) -> Self {
        Self {
            origin: origin.into(),
            tensors: HashMap::new(),
            raw: HashMap::new(),
            quant_map: BTreeMap::new(),
            recipe: None,
            bytes_by_dtype: BTreeMap::new(),
        }
    }

    fn count(&mut self, dtype: String, bytes: usize) {
        *self.bytes_by_dtype.entry(dtype.to_uppercase()).or_insert(0) += bytes;
    }

    /// Adds a tensor stored as `dtype` (counted in the file's bytes by dtype), already converted to f32.
    fn insert(&mut self, origin: &str, name: String, dtype: DType, shape: Vec<usize>, values: Vec<f32>) -> Result<()> {
        self.count(format!("{dtype:?}"), values.len() * dtype.size_in_bytes());
        if self
            .tensors
            .insert(name.clone(), FloatTensor { shape, values })
            .is_some()
        {
            return Err(Error::invalid(origin, format!("tensor `{name}` appears twice")));
        }
        Ok(())
    }

    /// Loads safetensors files (all shards of one checkpoint, float or quantized by segq) or a PyTorch `.bin`.
    pub fn from_files(files: &[PathBuf]) -> Result<Self> {
        let origin = files.first().map(|p| p.display().to_string()).unwrap_or_default();
        let mut store = Self::empty(origin);
        for file in files {
            let name = file.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            let shown = file.display().to_string();
            if !file.exists() {
                return Err(Error::io(
                    file,
                    std::io::Error::new(std::io::ErrorKind::NotFound, "file not found"),
                ));
            }
            if name.ends_with(".safetensors") {
                let bytes = std::fs::read(file).map_err(|e| Error::io(file, e))?;
                store.add_safetensors(&shown, &bytes)?;
            } else if name.ends_with(".bin") || name.ends_with(".pt") || name.ends_with(".pth") {
                let tensors = candle_core::pickle::read_all(file)
                    .map_err(|e| Error::invalid(&shown, format!("cannot read PyTorch checkpoint: {e}")))?;
                for (n, t) in tensors {
                    let (dtype, shape) = (t.dtype(), t.dims().to_vec());
                    let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                    store.insert(&shown, n, dtype, shape, values)?;
                }
            } else {
                return Err(Error::unsupported(
                    &shown,
                    "unknown checkpoint format (expected .safetensors or .bin)",
                ));
            }
        }
        Ok(store)
    }

    /// Loads a safetensors file held in memory (the embedded demo model).
    pub fn from_safetensors_bytes(origin: &str, bytes: &[u8]) -> Result<Self> {
        let mut store = Self::empty(origin);
        store.add_safetensors(origin, bytes)?;
        Ok(store)
    }

    fn add_safetensors(&mut self, origin: &str, bytes: &[u8]) -> Result<()> {
        let (_, metadata) = SafeTensors::read_metadata(bytes)
            .map_err(|e| Error::invalid(origin, format!("cannot read safetensors: {e}")))?;
        let st = SafeTensors::deserialize(bytes)
            .map_err(|e| Error::invalid(origin, format!("cannot read safetensors: {e}")))?;
        let mut quantized_parts = std::collections::HashSet::new();
        if let Some(meta) = metadata.metadata()
            && meta.contains_key(quant::RECIPE_METADATA_KEY)
        {
            let (header, map) = quant::read_checkpoint_metadata(origin, meta)?;
            for name in map.keys() {
                for suffix in ["qdata", "scale", "zero"] {
                    quantized_parts.insert(format!("{name}.{suffix}"));
                }
            }
            self.quant_map.extend(map);
            self.recipe = Some(header);
        }
        for (name, view) in st.tensors() {
            let data = view.data();
            if quantized_parts.contains(&name) {
                self.count(format!("{:?}", view.dtype()), data.len());
                self.raw
                    .insert(name, (view.dtype(), view.shape().to_vec(), data.to_vec()));
                continue;
            }
            let dtype = match view.dtype() {
                Dtype::F32 => DType::F32,
                Dtype::F16 => DType::F16,
                Dtype::BF16 => DType::BF16,
                Dtype::F64 => DType::F64,
                Dtype::I64 => DType::I64,
                Dtype::U8 => DType::U8,
                Dtype::U32 => DType::U32,
                other => {
                    return Err(Error::unsupported(
                        origin,
                        format!("tensor `{name}` has unsupported dtype {other:?}"),
                    ));
                }
            };
            self.insert(origin, name, dtype, view.shape().to_vec(), f32_values(dtype, data))?;
        }
        Ok(())
    }

    /// Takes a float tensor by name (its f32 values, row-major), checking its shape.
    pub fn take(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let t = self.tensors.remove(name).ok_or_else(|| {
            Error::not_found(
                &self.origin,
                format!("checkpoint lacks tensor `{name}` (expected shape {shape:?})"),
            )
        })?;
        if t.shape != shape {
            return Err(Error::invalid(
                &self.origin,
                format!("tensor `{name}` has shape {:?}, the config expects {shape:?}", t.shape),
            ));
        }
        Ok(t.values)
    }

    /// Takes a layer weight by name: quantized when the checkpoint stores it quantized, else float.
    pub fn weight(&mut self, name: &str, shape: &[usize]) -> Result<StoredWeight> {
        let Some(meta) = self.quant_map.remove(name) else {
            return Ok(StoredWeight::Float(self.take(name, shape)?));
        };
        let rows = shape[0];
        let cols = shape.iter().product::<usize>() / rows.max(1);
        if (meta.rows, meta.cols) != (rows, cols) {
            return Err(Error::invalid(
                &self.origin,
                format!(
                    "quantized tensor `{name}` is [{}, {}], the config expects [{rows}, {cols}]",
                    meta.rows, meta.cols
                ),
            ));
        }
        let raw = &self.raw;
        let q = QuantTensor::from_tensors(name, &meta, |part| {
            raw.get(part).map(|(d, s, b)| (*d, s.clone(), b.as_slice()))
        })
        .map_err(|e| e.within(&self.origin))?;
        for suffix in ["qdata", "scale", "zero"] {
            self.raw.remove(&format!("{name}.{suffix}"));
        }
        Ok(StoredWeight::Quantized(q))
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
        let mut names: Vec<&String> = self
            .tensors
            .keys()
            .chain(self.raw.keys())
            .chain(self.quant_map.keys())
            .collect();
        names.sort();
        let shown: Vec<String> = names.iter().take(5).map(|n| format!("`{n}`")).collect();
        Err(Error::invalid(
            &self.origin,
            format!(
                "checkpoint has {} unexpected tensor(s) for this config: {}{}",
                names.len(),
                shown.join(", "),
                if names.len() > 5 { ", ..." } else { "" }
            ),
        ))
    }
}

/// Little-endian values of `dtype` converted to f32 as candle's `to_dtype` converts them (exact for f16 and bf16,
/// round to nearest for f64, `as` for integers).
fn f32_values(dtype: DType, data: &[u8]) -> Vec<f32> {
    fn each<const N: usize>(data: &[u8], f: impl Fn([u8; N]) -> f32) -> Vec<f32> {
        data.chunks_exact(N)
            .map(|b| f(b.try_into().unwrap_or([0; N])))
            .collect()
    }
    match dtype {
        DType::F16 => each(data, |b| half::f16::from_le_bytes(b).to_f32()),
        DType::BF16 => each(data, |b| half::bf16::from_le_bytes(b).to_f32()),
        DType::F64 => each(data, |b| f64::from_le_bytes(b) as f32),
        DType::I64 => each(data, |b| i64::from_le_bytes(b) as f32),
        DType::U32 => each(data, |b| u32::from_le_bytes(b) as f32),
        DType::U8 => data.iter().map(|&b| b as f32).collect(),
        _ => each(data, f32::from_le_bytes),
    }
}

/// Shard files listed by a `model.safetensors.index.json` (`weight_map` values), in a stable order.
pub fn shards_from_index(index: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::invalid(index.display().to_string(), format!("malformed index: {e}")))?;
    let map = value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::invalid(index.display().to_string(), "index has no `weight_map`"))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files: Vec<String> = map.values().filter_map(|v| v.as_str().map(String::from)).collect();
    files.sort();
    files.dedup();
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    /// Reading a dtype straight to f32 gives the values candle's `to_dtype` gave when the store held tensors.
    #[test]
    fn f32_values_convert_as_candle_does() {
        let v: Vec<f64> = vec![0.1, -3.75, 65504.0, 1e-8, -0.0, 123456.789, 2.5e38, 7.0];
        let t = Tensor::new(v.as_slice(), &Device::Cpu).unwrap();
        for dtype in [
            DType::F64,
            DType::F32,
            DType::F16,
            DType::BF16,
            DType::I64,
            DType::U32,
            DType::U8,
        ] {
            let typed = t.abs().unwrap().to_dtype(dtype).unwrap();
            let bytes: Vec<u8> = match dtype {
                DType::F64 => typed
                    .to_vec1::<f64>()
                    .unwrap()
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect(),
                DType::F32 => typed
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect(),
                DType::F16 => typed
                    .to_vec1::<half::f16>()
                    .unwrap()
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect(),
                DType::BF16 => typed
                    .to_vec1::<half::bf16>()
                    .unwrap()
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect(),
                DType::I64 => typed
                    .to_vec1::<i64>()
                    .unwrap()
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect(),
                DType::U32 => typed
                    .to_vec1::<u32>()
                    .unwrap()
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect(),
                _ => typed.to_vec1::<u8>().unwrap(),
            };
            let want = typed.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap();
            let got = f32_values(dtype, &bytes);
            assert_eq!(
                got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                "{dtype:?}"
            );
        }
    }
}
