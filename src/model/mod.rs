//! Models: where a checkpoint comes from (`ModelSource`), loading it with its configs (`load`), quantizing it
//! (`quantize`), and the SegFormer network built from float or quantized layers. A new model family adds a folder
//! here behind `LoadedModel`.
//!
//! - [`segformer`]: the module tree and its forward pass; [`layers`]: its leaves; [`tree`]: the one walk over it.
//! - [`plan`]: the kernel each part runs, decided once by `Segformer::prepare`, which `load` and `quantize` end in.
//! - [`checkpoint`]: reading checkpoint files; [`save`]: writing them; [`quanto`]: optimum-quanto checkpoints.
//! - [`tokens`]: the activation type layers pass along (channels-last, plain `Vec<f32>`).

pub mod checkpoint;
pub mod config;
pub mod layers;
pub mod plan;
pub mod probe;
pub mod quanto;
pub mod save;
pub mod segformer;
pub mod tokens;
pub mod tree;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use checkpoint::{StoredWeight, TensorStore};
use config::SegformerConfig;
use layers::ParamMut;
use plan::MatMul;
pub use segformer::Segformer;
use tree::{NodeMut, Path as ModulePath};

use crate::hub::{self, HubId, HubRepo};
use crate::preprocess::PreprocessorConfig;
use crate::quant::Level;
use crate::{Error, Result};

/// The demo model shipped in the repository (a SegFormer-B0 trained on synthetic scenes, 20 classes).
pub mod embedded {
    pub const CONFIG: &str = include_str!("../../assets/demo/model/config.json");
    pub const PREPROCESSOR: &str = include_str!("../../assets/demo/model/preprocessor_config.json");
    pub const WEIGHTS: &[u8] = include_bytes!("../../assets/demo/model/model.safetensors");
}

/// Where `--model` points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// The demo model compiled into the binary.
    Embedded,
    /// A folder with `config.json` and weights, or a checkpoint file with `config.json` beside it.
    Local(PathBuf),
    /// A Hugging Face Hub repo id with optional `@revision`.
    Hub(HubId),
    /// An http(s) URL to a checkpoint file with `config.json` beside it.
    Url(String),
}

impl ModelSource {
    /// Interprets `--model`: no value or "embedded" is the demo; an existing path is local; `http(s)://` is a URL;
    /// `owner/name[@rev]` is a Hub id.
    pub fn parse(value: Option<&str>) -> Result<Self> {
        let Some(v) = value.map(str::trim).filter(|v| !v.is_empty()) else {
            return Ok(Self::Embedded);
        };
        if v == "embedded" || v == "demo" {
            return Ok(Self::Embedded);
        }
        if v.starts_with("http://") || v.starts_with("https://") {
            return Ok(Self::Url(v.to_string()));
        }
        let path = Path::new(v);
        if path.exists() || v.starts_with('.') || v.starts_with('/') || v.starts_with('~') {
            return Ok(Self::Local(path.to_path_buf()));
        }
        HubId::parse(v).map(Self::Hub).ok_or_else(|| {
            Error::config(
                "--model",
                format!("--model `{v}`: no such file or folder, and not a Hub repo id (owner/name[@revision])"),
            )
        })
    }
}

impl fmt::Display for ModelSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Embedded => write!(
                f,
                "embedded demo model (SegFormer-B0 architecture, 20 synthetic classes)"
            ),
            Self::Local(p) => write!(f, "{}", p.display()),
            Self::Hub(id) => write!(f, "hf://{}@{}", id.repo, id.revision),
            Self::Url(u) => write!(f, "{u}"),
        }
    }
}

/// The files of a checkpoint on disk.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    pub config: PathBuf,
    pub preprocessor: Option<PathBuf>,
    pub weights: Vec<PathBuf>,
    /// `quantization_map.json` of an optimum-quanto checkpoint (local folders only).
    pub quanto_map: Option<PathBuf>,
}

/// A loaded model with everything needed to run and describe it.
pub struct LoadedModel {
    pub model: Segformer,
    pub preprocessor: PreprocessorConfig,
    pub source: ModelSource,
    /// `config.json` and `preprocessor_config.json` as read (copied into quantized checkpoints).
    pub config_json: String,
    pub preprocessor_json: Option<String>,
    pub load_time: Duration,
    pub bytes_by_dtype: BTreeMap<String, usize>,
    /// The quantization recipe when the checkpoint was written by `segq quantize`.
    pub recipe: Option<crate::quant::RecipeHeader>,
}

impl LoadedModel {
    pub fn class_names(&self) -> Vec<String> {
        self.model.config().class_names()
    }

    /// Bytes of all Linear/Conv weights as currently stored (float or quantized).
    pub fn weight_bytes(&self) -> usize {
        self.model.weight_bytes()
    }
}

/// Finds the checkpoint files of a local folder or file.
pub fn local_files(path: &Path) -> Result<ModelFiles> {
    if !path.exists() {
        return Err(Error::io(
            path,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder"),
        ));
    }
    let (dir, explicit) = if path.is_dir() {
        (path.to_path_buf(), None)
    } else {
        (
            path.parent().unwrap_or(Path::new(".")).to_path_buf(),
            Some(path.to_path_buf()),
        )
    };
    let config = dir.join("config.json");
    if !config.exists() {
        return Err(Error::not_found(
            dir.display().to_string(),
            "no config.json in this folder",
        ));
    }
    let weights = match explicit {
        Some(file) => vec![file],
        None => {
            let single = dir.join("model.safetensors");
            let index = dir.join("model.safetensors.index.json");
            let bin = dir.join("pytorch_model.bin");
            if single.exists() {
                vec![single]
            } else if index.exists() {
                checkpoint::shards_from_index(&index)?
            } else if bin.exists() {
                vec![bin]
            } else {
                return Err(Error::not_found(
                    dir.display().to_string(),
                    "no weights (expected model.safetensors, model.safetensors.index.json or pytorch_model.bin)",
                ));
            }
        }
    };
    let preprocessor = Some(dir.join("preprocessor_config.json")).filter(|p| p.exists());
    let quanto_map = Some(dir.join(quanto::QUANTIZATION_MAP_FILE)).filter(|p| p.exists());
    Ok(ModelFiles {
        config,
        preprocessor,
        weights,
        quanto_map,
    })
}

fn hub_files(id: &HubId) -> Result<ModelFiles> {
    let repo = HubRepo::model(id.clone());
    let config = repo.get("config.json")?;
    let preprocessor = repo.get("preprocessor_config.json").ok();
    let weights = match repo.get("model.safetensors") {
        Ok(p) => vec![p],
        Err(first) => match repo.get("model.safetensors.index.json") {
            Ok(index) => {
                let names = checkpoint::shards_from_index(&index)?;
                names
                    .iter()
                    .map(|p| repo.get(&p.file_name().unwrap_or_default().to_string_lossy()))
                    .collect::<Result<Vec<_>>>()?
            }
            Err(_) => match repo.get("pytorch_model.bin") {
                Ok(p) => vec![p],
                Err(_) => return Err(first),
            },
        },
    };
    Ok(ModelFiles {
        config,
        preprocessor,
        weights,
        quanto_map: None,
    })
}

fn url_files(url: &str) -> Result<ModelFiles> {
    let base = url.rsplit_once('/').map(|(b, _)| b).unwrap_or(url);
    let weights = vec![hub::fetch_url(url)?];
    let config = hub::fetch_url(&format!("{base}/config.json"))?;
    // Optional: only its absence (404) is passed over; a bad answer, the size cap or a stop request is an error.
    let preprocessor = match hub::fetch_url(&format!("{base}/preprocessor_config.json")) {
        Ok(path) => Some(path),
        Err(e) if e.kind() == crate::ErrorKind::NotFound => None,
        Err(e) => return Err(e),
    };
    Ok(ModelFiles {
        config,
        preprocessor,
        weights,
        quanto_map: None,
    })
}

/// Loads a model from any source, logging where from, how long it took, weight bytes by dtype and peak memory.
///
/// Nothing is sized by an input before it is checked: `config.json` against fixed bounds, the checkpoint's size
/// against the memory available (from its header), then the config's numbers against the checkpoint's tensor names
/// and shapes (a lying `config.json` is named with its key), and the processor's input size against the memory a
/// forward pass at that size needs.
pub fn load(source: &ModelSource) -> Result<LoadedModel> {
    let start = Instant::now();
    let (config_json, config_origin, preprocessor_json, preprocessor_origin, mut store) = match source {
        ModelSource::Embedded => (
            embedded::CONFIG.to_string(),
            "embedded config.json".to_string(),
            Some(embedded::PREPROCESSOR.to_string()),
            "embedded preprocessor_config.json".to_string(),
            TensorStore::from_safetensors_bytes("embedded model.safetensors", embedded::WEIGHTS)?,
        ),
        other => {
            let files = match other {
                ModelSource::Local(p) => local_files(p)?,
                ModelSource::Hub(id) => hub_files(id)?,
                ModelSource::Url(u) => url_files(u)?,
                ModelSource::Embedded => unreachable!("handled above"),
            };
            let config_json = crate::limits::read_text_capped(&files.config, config::MAX_CONFIG_BYTES)?;
            let pre = match &files.preprocessor {
                Some(p) => Some(crate::limits::read_text_capped(p, config::MAX_CONFIG_BYTES)?),
                None => None,
            };
            let config_origin = files.config.display().to_string();
            let pre_origin = files
                .preprocessor
                .as_ref()
                .map_or_else(String::new, |p| p.display().to_string());
            // Validate the configs before reading weights, naming the file on error.
            SegformerConfig::from_json_at(&config_json, &config_origin)?;
            if let Some(text) = &pre {
                PreprocessorConfig::from_json(text).map_err(|e| e.within(&pre_origin))?;
            }
            let store = match &files.quanto_map {
                Some(map) => TensorStore::from_quanto_files(&files.weights, quanto::read_map(map)?)?,
                None => TensorStore::from_files(&files.weights)?,
            };
            (config_json, config_origin, pre, pre_origin, store)
        }
    };
    let config = SegformerConfig::from_json_at(&config_json, &config_origin)?;
    let preprocessor = match &preprocessor_json {
        Some(text) => PreprocessorConfig::from_json(text).map_err(|e| e.within(&preprocessor_origin))?,
        None => {
            tracing::warn!(source = %source, "no preprocessor_config.json: using SegformerImageProcessor defaults (512x512)");
            PreprocessorConfig::default()
        }
    };
    check_config_against_checkpoint(&config, &config_origin, &store)?;
    if preprocessor.do_resize {
        let size = preprocessor.size;
        let what = if preprocessor_origin.is_empty() {
            "preprocessor size (default)".to_string()
        } else {
            format!("{preprocessor_origin}: size")
        };
        check_forward_memory(&config, size.height, size.width, 1, &what)?;
    }
    let bytes_by_dtype = store.bytes_by_dtype.clone();
    let recipe = store.recipe.take();
    let mut model = from_store(&config, &mut store)?;
    drop(store);
    // int8-dyn checkpoints store plain int8 codes: the plan packs them for the W8A8 GEMM as `quantize` does.
    model.prepare(recipe.as_ref().map_or(Level::F32, |r| r.recipe.level))?;
    let load_time = start.elapsed();
    let by_dtype: Vec<String> = bytes_by_dtype
        .iter()
        .map(|(k, v)| format!("{k} {}", crate::limits::human_bytes(*v as u64)))
        .collect();
    tracing::info!(
        "model loaded in {:.2} s: {source} ({}{}), peak RSS {:.0} MB",
        load_time.as_secs_f64(),
        by_dtype.join(", "),
        recipe
            .as_ref()
            .map_or(String::new(), |r| format!(", quantized {}", r.label)),
        crate::sysinfo::peak_rss_bytes() as f64 / 1e6,
    );
    Ok(LoadedModel {
        model,
        preprocessor,
        source: source.clone(),
        config_json,
        preprocessor_json,
        load_time,
        bytes_by_dtype,
        recipe,
    })
}

/// The model's `config.json` alone, validated, when it is at hand without downloading (the embedded model, a local
/// folder or file): lets a command refuse sizes in milliseconds, before loading weights. `None` for Hub and URL
/// sources.
pub fn local_config(source: &ModelSource) -> Result<Option<SegformerConfig>> {
    match source {
        ModelSource::Embedded => SegformerConfig::from_json_at(embedded::CONFIG, "embedded config.json").map(Some),
        ModelSource::Local(p) => SegformerConfig::from_file(&local_files(p)?.config).map(Some),
        ModelSource::Hub(_) | ModelSource::Url(_) => Ok(None),
    }
}

/// Refuses a forward pass of `config` on `batch` images of `height` x `width` when its estimated peak memory
/// ([`SegformerConfig::forward_bytes`]) plus the input's is more than the machine has; `what` names the flag, key or
/// file the size came from (`--batch-size`, `preprocessor_config.json: size`). Also refuses sides above
/// [`crate::limits::MAX_INPUT_SIDE`] and batches above [`crate::limits::MAX_BATCH_SIZE`]. Every refusal states the
/// estimate. Computes nothing large: call it before allocating the batch.
pub fn check_forward_memory(
    config: &SegformerConfig,
    height: usize,
    width: usize,
    batch: usize,
    what: &str,
) -> Result<()> {
    use crate::limits::{MAX_BATCH_SIZE, MAX_INPUT_SIDE, human_bytes};
    let bytes = config.forward_bytes(height, width, batch);
    let estimate = format!(
        "a forward pass on {batch} image(s) of {width}x{height} needs about {}",
        human_bytes(bytes)
    );
    if height == 0 || width == 0 || batch == 0 {
        return Err(Error::config(
            what,
            format!("{what}: sizes and batch must be at least 1"),
        ));
    }
    if height.max(width) > MAX_INPUT_SIDE {
        return Err(Error::unsupported(
            what,
            format!(
                "{what}: {width}x{height} is larger than segq accepts ({MAX_INPUT_SIDE} pixels a side); {estimate}"
            ),
        ));
    }
    if batch > MAX_BATCH_SIZE {
        return Err(Error::unsupported(
            what,
            format!("{what}: a batch of {batch} is more than segq accepts ({MAX_BATCH_SIZE}); {estimate}"),
        ));
    }
    crate::limits::check_fits_in_memory(what, bytes, &format!("{estimate}; use a smaller batch or input size"))
}

/// Compares the numbers of `config.json` (read from `origin`) with the checkpoint before anything is sized by them:
/// the stages, the blocks of each stage and the sizes the key tensors' shapes give (hidden sizes, patch sizes, MLP
/// and reduction ratios, decoder size, labels). A lying config is named with its key; a checkpoint without the key
/// tensors is named with the first one it lacks. What the shapes cannot tell (strides, heads) is bounded by
/// `SegformerConfig`'s validation. Once this passes, the model the config describes is no larger than the
/// checkpoint.
fn check_config_against_checkpoint(config: &SegformerConfig, origin: &str, store: &TensorStore) -> Result<()> {
    const ENCODER: &str = "segformer.encoder";
    let lie = |message: String| Error::invalid(origin, message);
    let lacks = |name: &str, why: &str| {
        Error::not_found(
            store.origin(),
            format!("checkpoint lacks tensor `{name}` ({why}, as {origin} describes the model)"),
        )
    };
    // The tensor's shape when it differs from `expected` (compared as `[rows, cols]` for a quantized weight).
    // A quantized weight is compared as `[rows, cols]`; a grouped quanto weight, whose rows are not stored, by its
    // element count.
    let differs = |name: &str, expected: &[usize]| -> Option<(Vec<usize>, Vec<usize>)> {
        let found = store.shape_of(name)?;
        let expected = if found.len() == 2 && expected.len() == 4 {
            vec![expected[0], expected[1..].iter().product()]
        } else if found.len() == 1 && expected.len() > 1 {
            vec![expected.iter().product()]
        } else {
            expected.to_vec()
        };
        (found != expected).then_some((found, expected))
    };
    let mismatch = |key: String, name: &str, (found, expected): (Vec<usize>, Vec<usize>)| {
        lie(format!(
            "{key}, but tensor `{name}` has shape {found:?}, the config expects {expected:?}"
        ))
    };
    let index = |rest: &str| rest.split('.').next().and_then(|i| i.parse::<usize>().ok());
    let mut stages = 0usize;
    let mut blocks: BTreeMap<usize, usize> = BTreeMap::new();
    for name in store.names() {
        if let Some(i) = name
            .strip_prefix(ENCODER)
            .and_then(|r| r.strip_prefix(".patch_embeddings."))
            .and_then(index)
        {
            stages = stages.max(i.saturating_add(1));
        }
        if let Some(rest) = name.strip_prefix(ENCODER).and_then(|r| r.strip_prefix(".block.")) {
            let mut parts = rest.splitn(3, '.');
            if let (Some(Ok(i)), Some(Ok(j))) = (
                parts.next().map(str::parse::<usize>),
                parts.next().map(str::parse::<usize>),
            ) {
                let count = blocks.entry(i).or_insert(0);
                *count = (*count).max(j.saturating_add(1));
            }
        }
    }
    let n = config.num_encoder_blocks;
    if stages > 0 && stages != n {
        return Err(lie(format!(
            "key \"num_encoder_blocks\" = {n}, but the checkpoint has patch embeddings for {stages} stage(s)"
        )));
    }
    for i in 0..n {
        let (hidden, patch) = (config.hidden_sizes[i], config.patch_sizes[i]);
        let in_channels = if i == 0 {
            config.num_channels
        } else {
            config.hidden_sizes[i - 1]
        };
        let proj = format!("{ENCODER}.patch_embeddings.{i}.proj.weight");
        if store.shape_of(&proj).is_none() {
            return Err(lacks(&proj, &format!("stage {i}'s patch embedding")));
        }
        if let Some(d) = differs(&proj, &[hidden, in_channels, patch, patch]) {
            let key = if d.0.first() != Some(&hidden) {
                format!("key \"hidden_sizes\"[{i}] = {hidden}")
            } else {
                format!("key \"patch_sizes\"[{i}] = {patch}")
            };
            return Err(mismatch(key, &proj, d));
        }
        let depth = config.depths[i];
        let found = blocks.get(&i).copied().unwrap_or(0);
        if found != depth {
            let detail = if found < depth {
                format!("the checkpoint lacks tensor `{ENCODER}.block.{i}.{found}.*`")
            } else {
                format!("unexpected tensor(s) `{ENCODER}.block.{i}.{depth}.*`")
            };
            return Err(lie(format!(
                "key \"depths\"[{i}] = {depth}, but the checkpoint has {found} block(s) in stage {i}: {detail}"
            )));
        }
        let dense1 = format!("{ENCODER}.block.{i}.0.mlp.dense1.weight");
        if store.shape_of(&dense1).is_none() {
            return Err(lacks(&dense1, &format!("stage {i}'s first Mix-FFN")));
        }
        let ratio = config.mlp_ratios[i];
        if let Some(d) = differs(&dense1, &[hidden * ratio, hidden]) {
            return Err(mismatch(format!("key \"mlp_ratios\"[{i}] = {ratio}"), &dense1, d));
        }
        let sr = format!("{ENCODER}.block.{i}.0.attention.self.sr.weight");
        let ratio = config.sr_ratios[i];
        let key = format!("key \"sr_ratios\"[{i}] = {ratio}");
        match store.shape_of(&sr) {
            None if ratio > 1 => {
                return Err(lie(format!(
                    "{key}, but the checkpoint lacks tensor `{sr}` (it has no spatial reduction)"
                )));
            }
            Some(found) if ratio == 1 => {
                return Err(lie(format!(
                    "{key} (no spatial reduction), but the checkpoint has tensor `{sr}` of shape {found:?}"
                )));
            }
            _ => {
                if ratio > 1
                    && let Some(d) = differs(&sr, &[hidden, hidden, ratio, ratio])
                {
                    return Err(mismatch(key, &sr, d));
                }
            }
        }
    }
    let fuse = "decode_head.linear_fuse.weight";
    let shape = store
        .shape_of(fuse)
        .ok_or_else(|| lacks(fuse, "the decode head's fusion"))?;
    let d = config.decoder_hidden_size;
    if first_dim_differs(&shape, d, d * d * n) {
        let key = format!("key \"decoder_hidden_size\" = {d}");
        return Err(mismatch(
            key,
            fuse,
            differs(fuse, &[d, d * n, 1, 1]).unwrap_or_default(),
        ));
    }
    let classifier = "decode_head.classifier.weight";
    let shape = store
        .shape_of(classifier)
        .ok_or_else(|| lacks(classifier, "the classifier"))?;
    let labels = config.num_labels();
    if first_dim_differs(&shape, labels, labels * d) {
        let key = if config.id2label.is_empty() {
            format!("key \"num_labels\" = {labels}")
        } else {
            format!("key \"id2label\" gives {labels} labels")
        };
        let d = differs(classifier, &[labels, d, 1, 1]).unwrap_or_default();
        return Err(mismatch(key, classifier, d));
    }
    Ok(())
}

/// Whether a stored weight's first dimension is not `rows`; a one-dimensional shape (a grouped quanto weight, whose
/// rows are not stored) is compared by its element count with `elements`.
fn first_dim_differs(shape: &[usize], rows: usize, elements: usize) -> bool {
    match shape {
        [total] => *total != elements,
        _ => shape.first() != Some(&rows),
    }
}

/// Builds the model of `config` from a checkpoint's tensors, checking every name and shape; leftover tensors are
/// errors. The model is not prepared yet.
fn from_store(config: &SegformerConfig, store: &mut TensorStore) -> Result<Segformer> {
    let mut model = Segformer::new(config);
    model.visit_mut(&ModulePath::root(), &mut |path, leaf| {
        for (name, param) in leaf.params_mut() {
            let name = path.pp(name);
            match param {
                ParamMut::Weight(weight, shape) => {
                    *weight = match store.weight(name.as_str(), shape)? {
                        StoredWeight::Float(values) => MatMul::F32(Arc::new(values)),
                        StoredWeight::Quantized(q) => MatMul::Dequant(Arc::new(q)),
                    }
                }
                ParamMut::Vector(values) => {
                    *values = store.take(name.as_str(), &[values.len()])?;
                }
                ParamMut::OptionalScalar(value) => *value = store.take_scale(name.as_str())?,
                ParamMut::Unused => store.discard(name.as_str()),
            }
        }
        Ok(())
    })?;
    store.finish()?;
    Ok(model)
}

/// What quantizing a model did, for logs, `segq inspect` and error reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct QuantizeReport {
    pub label: String,
    pub quantized_layers: usize,
    /// Layers kept in float by `--skip` patterns.
    pub skipped_layers: Vec<String>,
    pub seconds: f64,
    /// sqrt(sum ||W - deq(Q(W))||^2 / sum ||W||^2) over the quantized weights.
    pub weight_rel_error: f64,
    /// Stored bits per weight over all Linear/Conv weights (float ones count 32).
    pub bits_per_weight: f64,
    /// Layers a calibrated method could not quantize itself (no statistics: depthwise convolutions), with the method
    /// used instead.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub fallbacks: Vec<crate::quant::Fallback>,
}

/// [`quantize`] for a level with static activations (`int8-static`, `w8a8-f8`, `w4a8`;
/// [`crate::quant::Level::needs_calibration`]): the input scale of every Linear and dense convolution is set from
/// `stats` (histograms captured on a calibration set, [`crate::quant::Level::stats_needs`]) by `calib` for the
/// level's activation format, then the weights are quantized by `recipe` and the model prepared. `model` is not
/// changed. Errors when the level has no static activations, or when a quantized layer has no statistics.
pub fn quantize_static(
    model: &Segformer,
    recipe: &crate::quant::Recipe,
    stats: &crate::quant::ModelStats,
    calib: crate::quant::act::ActCalib,
) -> Result<(Segformer, QuantizeReport)> {
    let level = recipe.level;
    if level.static_activations().is_none() {
        return Err(Error::invalid(
            format!("level {level}"),
            format!("{level} has no static activation scales to calibrate (int8-static, w8a8-f8 and w4a8 have)"),
        ));
    }
    quantize_calibrated(
        model,
        recipe,
        Some(Calibrated {
            stats,
            act_calib: calib,
        }),
    )
}

/// Returns a copy of `model` whose Linear and Conv2d weights are quantized by `recipe` (the float model is not
/// changed; weights are shared until replaced), prepared for the recipe's level. Layers run in parallel; each error
/// names its weight. A static level needs the model's input scales set first ([`quantize_static`]).
pub fn quantize(model: &Segformer, recipe: &crate::quant::Recipe) -> Result<(Segformer, QuantizeReport)> {
    quantize_calibrated(model, recipe, None)
}

/// What calibration gives quantization: the statistics of the model's layer inputs (`calib::calibrate`) and how a
/// static level's activation scales are chosen from them.
#[derive(Debug, Clone, Copy)]
pub struct Calibrated<'a> {
    pub stats: &'a crate::quant::ModelStats,
    pub act_calib: crate::quant::act::ActCalib,
}

/// [`quantize`] with calibration, which the calibrated methods and the static levels need: a layer without
/// statistics (a depthwise convolution) falls back to a calibration-free method, listed in the report; a static
/// level's input scales are set from the statistics. Without calibration such a recipe is an error.
pub fn quantize_calibrated(
    model: &Segformer,
    recipe: &crate::quant::Recipe,
    calibrated: Option<Calibrated<'_>>,
) -> Result<(Segformer, QuantizeReport)> {
    use rayon::prelude::*;

    let start = Instant::now();
    let stats = calibrated.map(|c| c.stats);
    let mut out = model.clone();
    if let Some(format) = recipe.level.static_activations() {
        let Some(c) = calibrated else {
            return Err(Error::config(
                recipe.label(),
                format!(
                    "{} fixes activation scales from calibration: calibrate with `segq eval` or `segq quantize` \
                     --calib DATASET (see docs/quantization.md)",
                    recipe.level
                ),
            ));
        };
        let set = out.set_activation_scales(c.stats, c.act_calib, format)?;
        tracing::info!(level = %recipe.level, calib = %c.act_calib, layers = set, "static activation scales calibrated");
    }
    if recipe.is_float_baseline() {
        let report = QuantizeReport {
            label: recipe.label(),
            quantized_layers: 0,
            skipped_layers: Vec::new(),
            seconds: 0.0,
            weight_rel_error: 0.0,
            bits_per_weight: 32.0,
            fallbacks: Vec::new(),
        };
        return Ok((out, report));
    }
    if stats.is_none()
        && let Some(part) = recipe.uniform_parts().iter().find(|r| r.method.needs_calibration())
    {
        return Err(Error::config(
            recipe.label(),
            format!(
                "{} needs calibration statistics: calibrate with `segq eval` or `segq quantize` --calib DATASET (see \
                 docs/quantization.md; `segq quantize --out DIR` saves a checkpoint any command loads)",
                part.method
            ),
        ));
    }
    let mut jobs: Vec<(String, Vec<f32>, usize, usize, crate::quant::Recipe)> = Vec::new();
    let mut skipped = Vec::new();
    out.for_each_weight_mut(&mut |name, shape, weight| {
        let name = name.as_str();
        match recipe.for_weight(name) {
            None => skipped.push(name.to_string()),
            Some(uniform) => {
                let rows = shape[0];
                let cols = shape.iter().product::<usize>() / rows.max(1);
                jobs.push((name.to_string(), weight.values().into_owned(), rows, cols, uniform));
            }
        }
        Ok(())
    })?;
    type Quantized = (
        String,
        crate::quant::QuantTensor,
        Option<crate::quant::Fallback>,
        f64,
        f64,
    );
    let results: Vec<Quantized> = jobs
        .par_iter()
        .map(|(name, data, rows, cols, uniform)| {
            let layer_stats = stats.and_then(|s| s.get(name));
            let (q, fallback) =
                crate::quant::quantize_weight_with(name, data, *rows, *cols, uniform, layer_stats, true)?;
            let deq = q.dequantize();
            let err: f64 = data.iter().zip(&deq).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
            let norm: f64 = data.iter().map(|a| (*a as f64).powi(2)).sum();
            Ok((name.clone(), q, fallback, err, norm))
        })
        .collect::<Result<Vec<_>>>()?;
    let (mut err, mut norm) = (0.0, 0.0);
    let mut fallbacks = Vec::new();
    let mut by_name: std::collections::HashMap<String, crate::quant::QuantTensor> = std::collections::HashMap::new();
    for (name, q, fallback, e, n) in results {
        err += e;
        norm += n;
        fallbacks.extend(fallback);
        by_name.insert(name, q);
    }
    if !fallbacks.is_empty() {
        tracing::info!(
            "{}: {} layers without calibration statistics quantized by {} instead ({})",
            recipe.label(),
            fallbacks.len(),
            fallbacks[0].method,
            fallbacks
                .iter()
                .take(3)
                .map(|f| f.layer.as_str())
                .collect::<Vec<_>>()
                .join(", ")
                + if fallbacks.len() > 3 { ", ..." } else { "" }
        );
    }
    let quantized_layers = by_name.len();
    out.for_each_weight_mut(&mut |name, _, weight| {
        if let Some(q) = by_name.remove(name.as_str()) {
            *weight = MatMul::Dequant(Arc::new(q));
        }
        Ok(())
    })?;
    let w8a8 = out.prepare(recipe.level)?;
    if w8a8 > 0 {
        tracing::info!(recipe = %recipe.label(), packed = w8a8, "weights packed for the int8 dynamic GEMM");
    }
    let bits_per_weight = out.bits_per_weight();
    let report = QuantizeReport {
        label: recipe.label_with_bits(bits_per_weight),
        quantized_layers,
        skipped_layers: skipped,
        seconds: start.elapsed().as_secs_f64(),
        weight_rel_error: if norm > 0.0 { (err / norm).sqrt() } else { 0.0 },
        bits_per_weight,
        fallbacks,
    };
    tracing::info!(
        "quantized {}: {:.2} bits/weight, weight error {:.4}, {:.2} s ({} layers{})",
        report.label,
        report.bits_per_weight,
        report.weight_rel_error,
        report.seconds,
        report.quantized_layers,
        if report.skipped_layers.is_empty() {
            String::new()
        } else {
            format!(", {} kept float", report.skipped_layers.len())
        }
    );
    Ok((out, report))
}
