//! Reading checkpoint tensors: safetensors (single or sharded with an index), PyTorch `.bin` zip pickles, and bytes
//! embedded in the binary. Every tensor is checked by name and shape; missing and unexpected tensors are errors.
//! This module knows nothing of the model: `model::load` walks the model's tree and takes each tensor by name.
//! Writing checkpoints is `model::save` (re-exported here for existing callers).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::DType;
use safetensors::{Dtype, SafeTensors};

use crate::quant::quanto::QType;
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
    /// Tensors found holding NaN or infinite values (each warned about once, the first few by name).
    non_finite_tensors: usize,
    /// An optimum-quanto checkpoint: its quantized modules (Hub names) while the files are read.
    quanto_modules: Option<BTreeMap<String, QType>>,
    /// The quanto weights (`<module>.weight`, Hub names) not yet taken; their parts are in `raw`.
    quanto: BTreeMap<String, QType>,
}

/// The parts quanto stores a quantized weight as, under `<module>.weight.`.
const QUANTO_PARTS: [&str; 4] = ["_data", "_data._data", "_scale", "_shift"];

/// Tensors with non-finite values named one by one in warnings; past this many, one summary line follows.
const NON_FINITE_WARNINGS: usize = 8;

impl TensorStore {
    fn empty(origin: impl Into<String>) -> Self {
        Self {
            origin: origin.into(),
            tensors: HashMap::new(),
            raw: HashMap::new(),
            quant_map: BTreeMap::new(),
            recipe: None,
            bytes_by_dtype: BTreeMap::new(),
            non_finite_tensors: 0,
            quanto_modules: None,
            quanto: BTreeMap::new(),
        }
    }

    /// Loads the safetensors files of an optimum-quanto checkpoint whose `quantization_map.json` gave `map` (module
    /// -> qtype, Hub names). Tensor names may be transformers 5's in-memory names or the Hub's; they are kept under
    /// the Hub names. The recipe is labelled from the map (`quanto-qint4`).
    pub fn from_quanto_files(files: &[PathBuf], map: BTreeMap<String, QType>) -> Result<Self> {
        let header = super::quanto::recipe_header(&map);
        let mut store = Self::read_files(files, Some(map))?;
        if let Some(modules) = store.quanto_modules.take() {
            store.quanto = modules.into_iter().map(|(m, q)| (format!("{m}.weight"), q)).collect();
        }
        store.recipe = Some(header);
        Ok(store)
    }

    /// Sorts one tensor of a quanto checkpoint, named `hub` (Hub spelling): `Some(true)` for a part of a quantized
    /// weight (kept raw), `Some(false)` for a quantized module's activation scale (dropped: activations are not
    /// quantized), `None` for a float tensor.
    fn quanto_role(&self, origin: &str, hub: &str) -> Result<Option<bool>> {
        let Some(modules) = &self.quanto_modules else {
            return Ok(None);
        };
        for part in QUANTO_PARTS {
            if let Some(module) = hub.strip_suffix(&format!(".weight.{part}")) {
                if !modules.contains_key(module) {
                    return Err(Error::invalid(
                        origin,
                        format!(
                            "tensor `{hub}` is part of a quanto weight, but {} does not list module `{module}`",
                            super::quanto::QUANTIZATION_MAP_FILE
                        ),
                    ));
                }
                return Ok(Some(true));
            }
        }
        for scalar in ["input_scale", "output_scale"] {
            if let Some(module) = hub.strip_suffix(&format!(".{scalar}"))
                && modules.contains_key(module)
            {
                return Ok(Some(false));
            }
        }
        Ok(None)
    }

    /// Warns (once per tensor) that `name` holds `count` NaN or infinite values. transformers loads such a
    /// checkpoint silently, and so does segq, so that `inspect` can still show it; but every logit it computes
    /// will be NaN, so the user is told which tensor is at fault.
    fn note_non_finite(&mut self, name: &str, count: usize) {
        if count == 0 {
            return;
        }
        self.non_finite_tensors += 1;
        if self.non_finite_tensors <= NON_FINITE_WARNINGS {
            tracing::warn!(
                file = %self.origin,
                tensor = name,
                count,
                "tensor `{name}` holds {count} NaN or infinite value(s): the model's outputs will be NaN"
            );
        }
    }

    fn count(&mut self, dtype: String, bytes: usize) {
        *self.bytes_by_dtype.entry(dtype.to_uppercase()).or_insert(0) += bytes;
    }

    /// Adds a tensor stored as `dtype` (counted in the file's bytes by dtype), already converted to f32.
    fn insert(&mut self, origin: &str, name: String, dtype: DType, shape: Vec<usize>, values: Vec<f32>) -> Result<()> {
        self.count(format!("{dtype:?}"), values.len() * dtype.size_in_bytes());
        self.note_non_finite(&name, values.iter().filter(|v| !v.is_finite()).count());
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
        Self::read_files(files, None)
    }

    fn read_files(files: &[PathBuf], quanto_modules: Option<BTreeMap<String, QType>>) -> Result<Self> {
        let origin = files.first().map(|p| p.display().to_string()).unwrap_or_default();
        check_checkpoint_memory(&origin, files)?;
        let mut store = Self::empty(origin);
        store.quanto_modules = quanto_modules;
        for file in files {
            let name = file.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            let shown = file.display().to_string();
            if !file.exists() {
                return Err(Error::io(
                    file,
                    std::io::Error::new(std::io::ErrorKind::NotFound, "file not found"),
                ));
            }
            if store.quanto_modules.is_some() && !name.ends_with(".safetensors") {
                return Err(Error::unsupported(
                    &shown,
                    "optimum-quanto checkpoints are read from safetensors (save_file(model.state_dict()))",
                ));
            }
            if name.ends_with(".safetensors") {
                let bytes = std::fs::read(file).map_err(|e| Error::io(file, e))?;
                store.add_safetensors(&shown, &bytes)?;
            } else if name.ends_with(".bin") || name.ends_with(".pt") || name.ends_with(".pth") {
                check_pickle_sizes(file, &shown)?;
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
        let (_, metadata) = SafeTensors::read_metadata(bytes).map_err(|e| {
            let why = describe_bad_header(bytes).unwrap_or_else(|| e.to_string());
            Error::invalid(origin, format!("cannot read safetensors: {why}"))
        })?;
        let st = SafeTensors::deserialize(bytes)
            .map_err(|e| Error::invalid(origin, format!("cannot read safetensors: {e}")))?;
        let mut quantized_parts = std::collections::HashSet::new();
        if let Some(meta) = metadata.metadata()
            && meta.contains_key(quant::RECIPE_METADATA_KEY)
        {
            let (header, map) = quant::read_checkpoint_metadata(origin, meta)?;
            for name in map.keys() {
                for suffix in ["qdata", "scale", "zero", "col_scale"] {
                    quantized_parts.insert(format!("{name}.{suffix}"));
                }
            }
            self.quant_map.extend(map);
            self.recipe = Some(header);
        }
        for (name, view) in st.tensors() {
            let data = view.data();
            let name = if self.quanto_modules.is_some() {
                super::quanto::hub_name(&name)
            } else {
                name
            };
            match self.quanto_role(origin, &name)? {
                Some(true) => {
                    self.count(format!("{:?}", view.dtype()), data.len());
                    if self
                        .raw
                        .insert(name.clone(), (view.dtype(), view.shape().to_vec(), data.to_vec()))
                        .is_some()
                    {
                        return Err(Error::invalid(origin, format!("tensor `{name}` appears twice")));
                    }
                    continue;
                }
                Some(false) => continue,
                None => {}
            }
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

    /// The shape of a tensor the checkpoint holds under `name`: a float tensor's own shape, or `[rows, cols]` of a
    /// quantized weight (its metadata's layout); `None` when there is no such tensor.
    /// A quanto int4/int2 weight stored with groups is `[total elements]`: its rows are not stored (quanto takes
    /// them from the model), and two-dimensional packed data does not tell a grouped weight from a per-channel one.
    pub fn shape_of(&self, name: &str) -> Option<Vec<usize>> {
        if let Some(qtype) = self.quanto.get(name) {
            let raw_shape = |part: &str| self.raw.get(&format!("{name}.{part}")).map(|r| r.1.clone());
            if qtype.format().is_int() && qtype.format() != quant::Format::Int8 {
                let data = raw_shape("_data._data")?;
                let groups: usize = raw_shape("_scale")?.iter().product();
                return Some(if data.len() > 2 {
                    std::iter::once(groups).chain(data[1..].iter().copied()).collect()
                } else {
                    vec![groups * data.get(1).copied().unwrap_or(1)]
                });
            }
            return raw_shape("_data");
        }
        match self.quant_map.get(name) {
            Some(meta) => Some(vec![meta.rows, meta.cols]),
            None => self.tensors.get(name).map(|t| t.shape.clone()),
        }
    }

    /// Names of the tensors (float tensors and quantized weights, not the parts these are stored as), in no order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors
            .keys()
            .chain(self.quant_map.keys())
            .chain(self.quanto.keys())
            .map(String::as_str)
    }

    /// The file (or first shard) the tensors came from, for errors.
    pub fn origin(&self) -> &str {
        &self.origin
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

    /// Takes an optional scalar (a layer's calibrated `input_scale`, shape `[]`): `None` when the checkpoint has
    /// none; an error for another shape or a value that is not a finite scale >= 0.
    pub fn take_scale(&mut self, name: &str) -> Result<Option<f32>> {
        if !self.tensors.contains_key(name) {
            return Ok(None);
        }
        let value = self.take(name, &[])?.first().copied().unwrap_or(f32::NAN);
        if !(value.is_finite() && value >= 0.0) {
            return Err(Error::invalid(
                &self.origin,
                format!("tensor `{name}` is {value} (an activation scale must be finite and >= 0)"),
            ));
        }
        Ok(Some(value))
    }

    /// Takes a layer weight by name: quantized when the checkpoint stores it quantized, else float.
    pub fn weight(&mut self, name: &str, shape: &[usize]) -> Result<StoredWeight> {
        if let Some(qtype) = self.quanto.remove(name) {
            let raw = &self.raw;
            let q = quant::quanto::from_quanto(name, qtype, shape, |part| {
                raw.get(part).map(|(d, s, b)| (*d, s.clone(), b.as_slice()))
            })
            .map_err(|e| e.within(&self.origin))?;
            for part in QUANTO_PARTS {
                self.raw.remove(&format!("{name}.{part}"));
            }
            for (suffix, params) in [("_scale", &q.scales), ("_shift", &q.zeros)] {
                self.note_non_finite(
                    &format!("{name}.{suffix}"),
                    params.iter().filter(|v| !v.is_finite()).count(),
                );
            }
            return Ok(StoredWeight::Quantized(q));
        }
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
        for suffix in ["qdata", "scale", "zero", "col_scale"] {
            self.raw.remove(&format!("{name}.{suffix}"));
        }
        for (suffix, params) in [("scale", &q.scales), ("zero", &q.zeros)] {
            self.note_non_finite(
                &format!("{name}.{suffix}"),
                params.iter().filter(|v| !v.is_finite()).count(),
            );
        }
        Ok(StoredWeight::Quantized(q))
    }

    /// Drops a tensor the model does not use (BatchNorm's `num_batches_tracked`).
    pub fn discard(&mut self, name: &str) {
        self.tensors.remove(name);
    }

    /// Fails if tensors are left over: a checkpoint for another architecture or configuration.
    pub fn finish(&self) -> Result<()> {
        if self.non_finite_tensors > NON_FINITE_WARNINGS {
            tracing::warn!(
                file = %self.origin,
                "{} more tensors hold NaN or infinite values",
                self.non_finite_tensors - NON_FINITE_WARNINGS
            );
        }
        if self.tensors.is_empty() && self.raw.is_empty() && self.quant_map.is_empty() && self.quanto.is_empty() {
            return Ok(());
        }
        let mut names: Vec<&String> = self
            .tensors
            .keys()
            .chain(self.raw.keys())
            .chain(self.quant_map.keys())
            .chain(self.quanto.keys())
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

/// Which tensor of a safetensors header is at fault, for the errors where the safetensors library names none (a
/// shape that does not match its data offsets, offsets past the end of the file, gaps or overlaps).
fn describe_bad_header(bytes: &[u8]) -> Option<String> {
    let n = usize::try_from(u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?)).ok()?;
    let header = bytes.get(8..8usize.checked_add(n)?)?;
    let data_len = (bytes.len() - 8 - n) as u64;
    let serde_json::Value::Object(entries) = serde_json::from_slice(header).ok()? else {
        return None;
    };
    let mut spans = Vec::new();
    for (name, info) in &entries {
        if name == "__metadata__" {
            continue;
        }
        let dtype = info.get("dtype").and_then(|d| d.as_str()).unwrap_or("?");
        let bits: u64 = match dtype {
            "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" | "F8_E8M0" => 8,
            "U16" | "I16" | "F16" | "BF16" => 16,
            "U32" | "I32" | "F32" => 32,
            "U64" | "I64" | "F64" => 64,
            "F4" => 4,
            "F6_E2M3" | "F6_E3M2" => 6,
            _ => return Some(format!("tensor `{name}` has unknown dtype {dtype:?}")),
        };
        let shape: Vec<u64> = info
            .get("shape")
            .and_then(|s| s.as_array())
            .map(|dims| dims.iter().map(|d| d.as_u64().unwrap_or(u64::MAX)).collect())
            .unwrap_or_default();
        let offsets: Vec<u64> = info
            .get("data_offsets")
            .and_then(|o| o.as_array())
            .map(|o| o.iter().map(|v| v.as_u64().unwrap_or(u64::MAX)).collect())
            .unwrap_or_default();
        let [start, end] = offsets[..] else {
            return Some(format!("tensor `{name}` has no valid data_offsets"));
        };
        let needed = shape
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .and_then(|e| e.checked_mul(bits))
            .map(|b| b.div_ceil(8));
        if end < start || end > data_len {
            return Some(format!(
                "tensor `{name}` has data_offsets [{start}, {end}] outside the file's {data_len} bytes of data"
            ));
        }
        if needed != Some(end - start) {
            return Some(format!(
                "tensor `{name}` of {dtype} {shape:?} needs {} bytes, its data_offsets [{start}, {end}] hold {}",
                needed.map_or_else(|| "more than 2^64".to_string(), |b| b.to_string()),
                end - start
            ));
        }
        spans.push((start, end, name));
    }
    spans.sort();
    let mut at = 0;
    for (start, end, name) in spans {
        if start != at {
            return Some(format!(
                "tensor `{name}` starts at offset {start}, where the data before it ends at {at} (overlap or gap)"
            ));
        }
        at = end;
    }
    (at != data_len).then(|| format!("the tensors' data ends at {at}, the file holds {data_len} bytes of data"))
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
    let text = crate::limits::read_text_capped(index, super::config::MAX_CONFIG_BYTES * 4)?;
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
    // Shards sit beside the index: a path elsewhere (`../x`, `/etc/x`) is not a shard of this checkpoint.
    if let Some(bad) = files
        .iter()
        .find(|f| f.is_empty() || f.contains(['/', '\\']) || f.as_str() == "..")
    {
        return Err(Error::invalid(
            index.display().to_string(),
            format!("weight_map names shard \"{bad}\", which is not a file name beside the index"),
        ));
    }
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}

/// Refuses a PyTorch checkpoint a tensor of which claims more bytes than the whole file holds (PyTorch stores
/// tensors uncompressed): the reader would allocate what the pickle claims before reading it.
fn check_pickle_sizes(file: &Path, shown: &str) -> Result<()> {
    let len = std::fs::metadata(file).map_err(|e| Error::io(file, e))?.len();
    let infos = candle_core::pickle::read_pth_tensor_info(file, false, None)
        .map_err(|e| Error::invalid(shown, format!("cannot read PyTorch checkpoint: {e}")))?;
    for info in infos {
        let bytes = info
            .layout
            .dims()
            .iter()
            .try_fold(info.dtype.size_in_bytes() as u64, |a, &d| a.checked_mul(d as u64))
            .and_then(|b| b.checked_add(info.layout.start_offset() as u64 * info.dtype.size_in_bytes() as u64));
        if bytes.is_none_or(|b| b > len) {
            return Err(Error::invalid(
                shown,
                format!(
                    "tensor `{}` claims shape {:?} of {:?}, more than the file's {len} bytes hold",
                    info.name,
                    info.layout.dims(),
                    info.dtype
                ),
            ));
        }
    }
    Ok(())
}

/// Refuses a checkpoint whose loading would need more memory than the machine has, before reading it: a
/// safetensors file takes its own size while it is read plus an f32 copy of each float tensor (from its header);
/// a PyTorch `.bin` is counted at three times its size (stored tensors, their f32 copies, the values kept).
fn check_checkpoint_memory(origin: &str, files: &[PathBuf]) -> Result<()> {
    let mut largest_file = 0u64;
    let mut kept = 0u64;
    for file in files {
        let Ok(meta) = std::fs::metadata(file) else {
            continue; // the read reports it
        };
        let len = meta.len();
        largest_file = largest_file.max(len);
        let name = file.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        kept = kept.saturating_add(if name.ends_with(".safetensors") {
            safetensors_loaded_bytes(file, len)?
        } else {
            len.saturating_mul(2)
        });
    }
    crate::limits::check_fits_in_memory(
        origin,
        largest_file.saturating_add(kept),
        "the checkpoint is larger than this machine can load",
    )
}

/// Bytes the tensors of safetensors file `path` (of `len` bytes) take once loaded, from its header alone: float
/// tensors as f32, quantized parts as stored. A header that cannot be read counts as the file's size (reading the
/// file then reports what is wrong with it).
fn safetensors_loaded_bytes(path: &Path, len: u64) -> Result<u64> {
    use std::io::Read;
    let shown = || path.display().to_string();
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut n = [0u8; 8];
    if file.read_exact(&mut n).is_err() {
        return Err(Error::invalid(
            shown(),
            format!("cannot read safetensors: the file is {len} bytes, too short for a header"),
        ));
    }
    let n = u64::from_le_bytes(n);
    if n > len.saturating_sub(8) || n > MAX_SAFETENSORS_HEADER {
        return Err(Error::invalid(
            shown(),
            format!("cannot read safetensors: the header claims {n} bytes, the file has {len}"),
        ));
    }
    let mut header = Vec::with_capacity(n as usize);
    (&mut file)
        .take(n)
        .read_to_end(&mut header)
        .map_err(|e| Error::io(path, e))?;
    let Ok(serde_json::Value::Object(entries)) = serde_json::from_slice::<serde_json::Value>(&header) else {
        return Ok(len);
    };
    let quantized: std::collections::HashSet<String> = entries
        .get("__metadata__")
        .and_then(|m| m.get(quant::MAP_METADATA_KEY))
        .and_then(|m| m.as_str())
        .and_then(|m| serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(m).ok())
        .map(|map| {
            map.keys()
                .flat_map(|k| ["qdata", "scale", "zero"].map(|s| format!("{k}.{s}")))
                .collect()
        })
        .unwrap_or_default();
    let mut total = 0u64;
    for (name, info) in &entries {
        if name == "__metadata__" {
            continue;
        }
        let stored = info
            .get("data_offsets")
            .and_then(|o| o.as_array())
            .and_then(|o| Some(o.get(1)?.as_u64()?.saturating_sub(o.first()?.as_u64()?)))
            .unwrap_or(0);
        let elements = info
            .get("shape")
            .and_then(|s| s.as_array())
            .map(|dims| {
                dims.iter()
                    .map(|d| d.as_u64().unwrap_or(u64::MAX))
                    .fold(1u64, u64::saturating_mul)
            })
            .unwrap_or(0);
        // A header that lies about shapes is refused when the file is read; here it must not inflate the estimate:
        // converting to f32 at most quadruples a tensor's stored bytes (u8 -> f32).
        let stored = stored.min(len);
        total = total.saturating_add(if quantized.contains(name) {
            stored
        } else {
            elements.saturating_mul(4).min(stored.saturating_mul(4))
        });
    }
    Ok(total.min(len.saturating_mul(4)))
}

/// safetensors' own cap on the JSON header (100 MB).
const MAX_SAFETENSORS_HEADER: u64 = 100_000_000;

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    /// A weight with column scales (AWQ) saves its `col_scale` beside its codes and loads back to the same logits.
    #[test]
    fn weights_with_column_scales_reload_bit_identical() {
        use crate::model::plan::MatMul;
        use crate::model::{self, ModelSource};
        use crate::quant::{Level, Recipe};
        use std::sync::Arc;
        let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/tiny_a");
        let loaded = model::load(&ModelSource::Local(fixture)).unwrap();
        let recipe = Recipe::level_default(Level::Int4);
        let (mut q, _) = model::quantize(&loaded.model, &recipe).unwrap();
        let mut scaled = 0;
        q.for_each_weight_mut(&mut |path, _, weight| {
            if let MatMul::Dequant(t) = weight
                && path.as_str().ends_with("attention.self.query")
            {
                let mut t = (**t).clone();
                t.col_scales = (0..t.cols).map(|j| [0.5, 2.0, 0.75][j % 3]).collect();
                *weight = MatMul::Dequant(Arc::new(t));
                scaled += 1;
            }
            Ok(())
        })
        .unwrap();
        assert_eq!(scaled, 4, "one query per stage");
        q.prepare(Level::Int4).unwrap();
        let v: Vec<f32> = (0..3 * 40 * 36).map(|i| (i * 31 % 97) as f32 / 97.0 - 0.5).collect();
        let pixels = Tensor::from_vec(v, (1, 3, 40, 36), &Device::Cpu).unwrap();
        let logits = |m: &crate::model::Segformer| m.forward(&pixels).unwrap().flatten_all().unwrap().to_vec1::<f32>();
        let dir = std::env::temp_dir().join(format!("segq-col-scales-{}", std::process::id()));
        save_quantized(
            &q,
            &recipe,
            &loaded.config_json,
            loaded.preprocessor_json.as_deref(),
            &dir,
        )
        .unwrap();
        let back = model::load(&ModelSource::Local(dir.clone()));
        std::fs::remove_dir_all(&dir).ok();
        let back = back.unwrap();
        assert_eq!(logits(&back.model).unwrap(), logits(&q).unwrap());
        let awq_layers = back
            .model
            .layers()
            .iter()
            .filter(|l| l.format.ends_with("-awq"))
            .count();
        assert_eq!(awq_layers, 4);
    }

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
