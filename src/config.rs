//! `segq.toml`, the Rust-native counterpart of a Python pipeline's `config.py`: the schema, its defaults, and the
//! merge order defaults < file < `--set` < dedicated flags (W&B's and the Hub's own environment variables apply to
//! their sections). Unknown keys and bad values name the key and file line.
//! The file never holds secrets: a W&B or Hub key in it is refused.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::data::{OnError, ShardSpec};
use crate::preprocess::Protocol;
use crate::quant::search::AutoTarget;
use crate::quant::{LayerRule, Level, Method};
use crate::track::TrackingSettings;
use crate::{Error, Result};

/// The whole configuration; every key has a default, so an empty file is valid.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub model: ModelConfig,
    pub dataset: DatasetConfig,
    pub quant: QuantConfig,
    pub eval: EvalConfig,
    pub output: OutputConfig,
    pub tracking: TrackingSettings,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// "embedded" (the demo model), a local folder or checkpoint file, a Hub id `owner/name[@revision]`, or a URL.
    pub source: String,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            source: "embedded".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DatasetConfig {
    /// "embedded" (the demo set), a Hub dataset id, a Parquet file or folder, an ADEChallengeData2016 folder,
    /// "IMAGES_DIR,MASKS_DIR", or a list file of `image<TAB>mask` lines.
    pub source: String,
    pub split: String,
    /// Hub Parquet conversion config name (Scene Parse 150: `scene_parsing`).
    pub subset: String,
    pub image_column: String,
    pub label_column: String,
    /// ADE20K convention: 0 is "other" (ignored), k becomes class k-1.
    pub reduce_labels: bool,
    pub ignore_index: u8,
    /// Raw label value -> label value, applied before `reduce_labels` (e.g. Cityscapes ids to train ids).
    pub label_map: BTreeMap<String, u8>,
    /// "fail" stops at the first bad example; "skip" counts and reports it.
    pub on_error: OnError,
    /// Decoding threads (0 = one per core).
    pub workers: usize,
    /// Images and masks with more pixels are refused from their header (Pillow's decompression-bomb limit).
    pub max_image_pixels: u64,
    /// Turn images and masks upright by their EXIF Orientation tag, as `datasets` and transformers do.
    pub exif_orientation: bool,
}

impl Default for DatasetConfig {
    fn default() -> Self {
        Self {
            source: "embedded".into(),
            split: "validation".into(),
            subset: "scene_parsing".into(),
            image_column: "image".into(),
            label_column: "annotation".into(),
            reduce_labels: true,
            ignore_index: 255,
            label_map: BTreeMap::new(),
            on_error: OnError::Fail,
            workers: 0,
            max_image_pixels: crate::limits::DEFAULT_MAX_IMAGE_PIXELS,
            exif_orientation: true,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct QuantConfig {
    /// Levels to evaluate: f32, f16, bf16, f8 (float8), f8e5m2, int8, int8-dyn, int8-static, int4, int4-dyn, int2,
    /// w8a8-f8, w4a8.
    pub levels: Vec<Level>,
    /// Methods to compare at each quantized level: rtn, hqq, gptq, awq, awq+gptq.
    pub methods: Vec<Method>,
    /// Weights per group for int4/int2 (default 64 for int4, 32 for int2).
    pub group_size: Option<usize>,
    /// Symmetric (no zero point) instead of affine for int4/int2.
    pub symmetric: Option<bool>,
    /// Glob patterns over weight names kept in float (mixed precision), e.g. "decode_head.classifier".
    pub skip: Vec<String>,
    /// Per-layer rules applied to every quantized level (`[[quant.rules]]`: match, level, method, group_size,
    /// symmetric); the first matching rule wins.
    pub rules: Vec<LayerRule>,
    /// Recipe files (`--recipe FILE.toml`) evaluated as rows of their own, after the levels.
    pub recipes: Vec<PathBuf>,
    /// Mixed-precision searches (`--quant auto:bits=3.5`, `auto:max-drop=0.5`), each evaluated as a row.
    pub auto: Vec<AutoTarget>,
    /// Images the search measures per-layer sensitivity on: the first N of the selection (before sharding).
    pub auto_images: usize,
    /// A quantized checkpoint is evaluated as loaded, alone; true quantizes its dequantized weights again to the
    /// levels asked for (rows marked `requantized from ...`). Pass the float model to compare levels properly.
    pub requantize: bool,
    /// Calibration images for the calibrated methods (gptq, awq, awq+gptq) and static levels: a dataset source as
    /// `dataset.source` takes it; unset: the evaluated dataset's `calib_split`.
    pub calib: Option<String>,
    /// The split of the calibration source.
    pub calib_split: String,
    /// Images drawn (uniformly, without replacement) from the calibration source.
    pub calib_size: usize,
    /// Seed of that draw.
    pub calib_seed: u64,
    /// Allow drawing calibration images among the evaluated ones (else they are left out of the draw).
    pub calib_allow_overlap: bool,
    /// Keep calibration statistics in segq's cache folder and reuse them for the same model and images.
    pub calib_cache: bool,
    /// How the static levels (int8-static, w8a8-f8, w4a8) choose their activation scales from the calibration
    /// histograms: minmax, percentile[:P], mse, entropy.
    pub act_calib: crate::quant::act::ActCalib,
    /// SmoothQuant migration strength (0..1) for the int8-dyn and int8-static rows; unset: none.
    pub smooth: Option<f32>,
}

impl QuantConfig {
    /// The calibration request these keys describe.
    pub fn calib_spec(&self) -> crate::calib::CalibSpec {
        crate::calib::CalibSpec {
            source: self.calib.clone(),
            split: self.calib_split.clone(),
            size: self.calib_size,
            seed: self.calib_seed,
            allow_overlap: self.calib_allow_overlap,
            cache: self.calib_cache,
        }
    }
}

impl Default for QuantConfig {
    fn default() -> Self {
        Self {
            levels: vec![
                Level::F32,
                Level::F16,
                Level::F8E4m3,
                Level::Int8,
                Level::Int4,
                Level::Int2,
            ],
            methods: vec![Method::Rtn, Method::Hqq],
            group_size: None,
            symmetric: None,
            skip: Vec::new(),
            rules: Vec::new(),
            recipes: Vec::new(),
            auto: Vec::new(),
            auto_images: 32,
            requantize: false,
            calib: None,
            calib_split: "train".into(),
            calib_size: 128,
            calib_seed: 0,
            calib_allow_overlap: false,
            calib_cache: true,
            act_calib: crate::quant::act::ActCalib::default(),
            smooth: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    pub batch_size: usize,
    /// Evaluate at most this many examples after the offset (shards then split this window).
    pub limit: Option<usize>,
    pub offset: usize,
    /// "I/N" (0-based part I of N) or "auto" (Slurm array / Kubernetes indexed job variables).
    pub shard: Option<ShardSpec>,
    /// "transformers" (resize to the processor size) or "mmseg" (keep-ratio fit to 2048x512).
    pub protocol: Protocol,
    /// Compute threads (0 = one per core).
    pub threads: usize,
    /// Images per level saved as overlays.
    pub samples: usize,
    /// Seconds between partial `results.json` writes during a run (0: after every batch), so that a killed run
    /// loses at most this much work and `--resume` continues from it.
    pub checkpoint_seconds: u64,
    /// Accept a selection of zero examples (an empty shard, an offset past the end) instead of failing.
    pub allow_empty: bool,
    /// Quantized levels held in memory at once (0: all). Fewer means one pass over the examples per group of
    /// levels, the f32 model running in every pass for agreement: memory bounded by the f32 model plus that many
    /// levels, time up by the f32 forward passes repeated. Checkpoints and --resume need a single pass.
    pub levels_at_once: usize,
    /// Resamples of the paired bootstrap over images behind the 95% intervals of Δ mIoU and agreement mIoU (0: no
    /// intervals, and no per-image counts in results.json).
    pub bootstrap_resamples: usize,
    /// Seed of the bootstrap's draws: the same seed, resamples and images give the same intervals.
    pub bootstrap_seed: u64,
    /// Per quantized level, the images whose prediction disagrees most with the reference's, listed in
    /// results.json and saved as overlays in `samples/worst/<level>/` (0: off).
    pub worst_images: usize,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self {
            batch_size: 4,
            limit: None,
            offset: 0,
            shard: None,
            protocol: Protocol::Transformers,
            threads: 0,
            samples: 3,
            checkpoint_seconds: 120,
            allow_empty: false,
            levels_at_once: 0,
            bootstrap_resamples: 1000,
            bootstrap_seed: 0,
            worst_images: 4,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OutputConfig {
    pub dir: PathBuf,
}

impl Default for OutputConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("segq-out"),
        }
    }
}

fn find_secret(table: &toml::Table, path: &str) -> Option<String> {
    for (k, v) in table {
        let here = if path.is_empty() {
            k.clone()
        } else {
            format!("{path}.{k}")
        };
        if crate::secret::is_secret_key(k) {
            return Some(here);
        }
        if let toml::Value::Table(t) = v
            && let Some(found) = find_secret(t, &here)
        {
            return Some(found);
        }
    }
    None
}

impl Config {
    /// Parses `segq.toml` text; `origin` names the file in errors ("segq.toml line 7: unknown field ...").
    pub fn from_toml(text: &str, origin: &str) -> Result<Self> {
        let table: toml::Table = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| crate::error::line_of(text, s.start)).unwrap_or(0);
            Error::config(format!("{origin} line {line}"), e.message())
        })?;
        if let Some(key) = find_secret(&table, "") {
            let message = format!(
                "{origin}: key `{key}` looks like a secret; {}",
                crate::secret::SECRET_IN_CONFIG_MESSAGE
            );
            return Err(Error::config(key, message));
        }
        let config: Config = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| crate::error::line_of(text, s.start)).unwrap_or(0);
            Error::config(format!("{origin} line {line}"), e.message().trim())
        })?;
        config.validate().map_err(|e| e.within(origin))?;
        Ok(config)
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_toml(&text, &path.display().to_string())
    }

    /// Loads `path` if given, else `./segq.toml` if present, else defaults.
    pub fn load(path: Option<&Path>) -> Result<(Self, Option<PathBuf>)> {
        match path {
            Some(p) => Ok((Self::from_file(p)?, Some(p.to_path_buf()))),
            None => {
                let default = Path::new("segq.toml");
                if default.exists() {
                    Ok((Self::from_file(default)?, Some(default.to_path_buf())))
                } else {
                    Ok((Self::default(), None))
                }
            }
        }
    }

    /// Applies `section.key=value` overrides (value in TOML syntax, bare strings allowed), re-validating the result.
    pub fn set(&mut self, assignment: &str) -> Result<()> {
        let (key, raw) = assignment
            .split_once('=')
            .ok_or_else(|| Error::config(format!("--set `{assignment}`"), "expected section.key=value"))?;
        let key = key.trim();
        let (section, field) = key
            .split_once('.')
            .ok_or_else(|| Error::config(format!("--set `{key}`"), "expected section.key (e.g. eval.batch_size)"))?;
        if crate::secret::is_secret_key(field) {
            return Err(Error::config(
                format!("--set `{key}`"),
                "secrets are read from the environment only",
            ));
        }
        let value: toml::Value = toml::from_str::<toml::Table>(&format!("v = {}", raw.trim()))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(raw.trim().to_string()));
        let mut table = toml::Table::try_from(&*self).map_err(|e| Error::internal(e.to_string()))?;
        let section_table = table
            .get_mut(section)
            .and_then(|s| s.as_table_mut())
            .ok_or_else(|| Error::config(format!("--set `{key}`"), format!("unknown section `{section}`")))?;
        section_table.insert(field.to_string(), value);
        let merged: Config = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| Error::config(format!("--set `{key}`"), e.message().trim()))?;
        merged.validate().map_err(|e| e.within(format_args!("--set `{key}`")))?;
        *self = merged;
        Ok(())
    }

    /// Checks values that serde's types cannot.
    pub fn validate(&self) -> Result<()> {
        if self.eval.batch_size == 0 {
            return Err(Error::config("eval.batch_size", "eval.batch_size must be at least 1"));
        }
        if self.eval.batch_size > crate::limits::MAX_BATCH_SIZE {
            return Err(Error::config(
                "eval.batch_size",
                format!(
                    "eval.batch_size (--batch-size) = {} is more than the {} segq accepts",
                    self.eval.batch_size,
                    crate::limits::MAX_BATCH_SIZE
                ),
            ));
        }
        if let Some(alpha) = self.quant.smooth
            && !(0.0..=1.0).contains(&alpha)
        {
            return Err(Error::config(
                "quant.smooth",
                format!("quant.smooth = {alpha}: SmoothQuant's migration strength is between 0 and 1"),
            ));
        }
        if self.quant.calib_size == 0 {
            return Err(Error::config(
                "quant.calib_size",
                "quant.calib_size must be at least 1 (the images calibration draws)",
            ));
        }
        if !self.quant.auto.is_empty() && self.quant.auto_images == 0 {
            return Err(Error::config(
                "quant.auto_images",
                "quant.auto_images must be at least 1 (the images the search measures layers on)",
            ));
        }
        if self.eval.worst_images > crate::eval::worst::MAX_WORST_IMAGES {
            return Err(Error::config(
                "eval.worst_images",
                format!(
                    "eval.worst_images (--worst-images) = {} is more than the {} segq keeps in memory per level",
                    self.eval.worst_images,
                    crate::eval::worst::MAX_WORST_IMAGES
                ),
            ));
        }
        if self.quant.levels.is_empty() {
            return Err(Error::config("quant.levels", "quant.levels is empty"));
        }
        if self.eval.bootstrap_resamples > crate::eval::bootstrap::MAX_RESAMPLES {
            return Err(Error::config(
                "eval.bootstrap_resamples",
                format!(
                    "eval.bootstrap_resamples (--bootstrap) = {} is more than the {} segq draws",
                    self.eval.bootstrap_resamples,
                    crate::eval::bootstrap::MAX_RESAMPLES
                ),
            ));
        }
        if self.dataset.max_image_pixels == 0 {
            return Err(Error::config(
                "dataset.max_image_pixels",
                "dataset.max_image_pixels must be at least 1",
            ));
        }
        self.label_map()?;
        Ok(())
    }

    /// `dataset.label_map` with its keys parsed as label values.
    pub fn label_map(&self) -> Result<BTreeMap<u8, u8>> {
        self.dataset
            .label_map
            .iter()
            .map(|(k, v)| {
                let key = k.parse::<u8>().map_err(|_| {
                    let message = format!("dataset.label_map key \"{k}\" is not a label value 0..255");
                    Error::config("dataset.label_map", message)
                })?;
                Ok((key, *v))
            })
            .collect()
    }

    /// The merged configuration as TOML, for `segq config show` (it holds no secrets by construction).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }
}

/// The commented file `segq config init` writes.
pub const DEFAULT_FILE: &str = r#"# segq.toml: what `segq eval` (and predict, quantize, bench) run on. Every key can be overridden on the
# command line (dedicated flags, or --set section.key=value). Secrets never go here: W&B reads WANDB_API_KEY or
# ~/.netrc, the Hub reads HF_TOKEN.

[model]
# "embedded" (the demo model in the binary), a local folder with config.json + weights, a Hub repo id
# with optional @revision (e.g. "nvidia/segformer-b0-finetuned-ade-512-512"), or an http(s) URL.
source = "embedded"

[dataset]
# "embedded" (12 demo images), a Hub dataset id (e.g. "scene_parse_150", read from its Parquet conversion),
# a Parquet file or folder, an ADEChallengeData2016 folder, "IMAGES_DIR,MASKS_DIR", or a list file of image<TAB>mask.
source = "embedded"
split = "validation"
subset = "scene_parsing"      # Hub Parquet config name
image_column = "image"
label_column = "annotation"
reduce_labels = true          # ADE20K: 0 = other (ignored), k -> class k-1
ignore_index = 255
label_map = {}                # raw value -> label, before reduce_labels, e.g. { "7" = 0, "8" = 1 }
on_error = "fail"             # or "skip": count and report bad examples
workers = 0                   # decoding threads, 0 = one per core
max_image_pixels = 178956970  # larger images (and masks) are refused from their header, as Pillow refuses them
exif_orientation = true       # turn images and masks upright by their EXIF tag, as datasets/transformers do

[quant]
levels = ["f32", "f16", "f8", "int8", "int4", "int2"]   # also bf16, f8e5m2, int8-dyn, int8-static, int4-dyn, w8a8-f8, w4a8
methods = ["rtn", "hqq"]      # also gptq, awq, awq+gptq (calibrated: see calib below)
# group_size = 64             # int4 default 64, int2 default 32
# symmetric = false
skip = []                     # weight-name globs kept in float, e.g. ["decode_head.classifier"]
rules = []                    # per-layer levels, first match wins, e.g. [{ match = "decode_head.*", level = "int8" }]
recipes = []                  # recipe files (--recipe) evaluated as rows of their own
auto = []                     # mixed-precision searches, e.g. ["bits=3.5", "max-drop=0.5"] (--quant auto:bits=3.5)
auto_images = 32              # images the search measures per-layer sensitivity on (first of the selection)
requantize = false            # quantize a quantized checkpoint again (--requantize); else it is evaluated as loaded
# calib = "path/or/hub-id"    # calibration images for gptq/awq and static levels (--calib); default: the dataset's calib_split
calib_split = "train"         # split of the calibration source
calib_size = 128              # calibration images, drawn uniformly without replacement (--calib-size)
calib_seed = 0                # seed of that draw (--calib-seed)
calib_allow_overlap = false   # allow calibrating on evaluated images (--calib-allow-overlap); else they are excluded
calib_cache = true            # reuse calibration statistics of the same model and images (~/.cache/segq/calib)
act_calib = "minmax"          # static levels' activation scales: minmax, percentile[:P], mse, entropy (--act-calib)
# smooth = 0.5                # SmoothQuant strength for int8-dyn and int8-static (--smooth)

[eval]
batch_size = 4
# limit = 100
offset = 0
# shard = "0/4"               # or "auto": SLURM_ARRAY_TASK_ID / JOB_COMPLETION_INDEX
protocol = "transformers"     # or "mmseg": keep-ratio resize to fit 2048x512
threads = 0                   # 0 = one per core
samples = 3                   # overlay images saved per level
checkpoint_seconds = 120      # partial results.json written this often (0 = every batch); see --resume
allow_empty = false           # true: a selection of zero examples is not an error
levels_at_once = 0            # quantized levels held at once (0 = all); fewer: one pass per group, f32 rerun
bootstrap_resamples = 1000    # paired bootstrap over images for 95% intervals of Δ mIoU (0 = off); --bootstrap
bootstrap_seed = 0            # the bootstrap's seed; --bootstrap-seed
worst_images = 4              # per level, the images that disagree most with f32: listed + overlays (0 = off)

[output]
dir = "segq-out"

[tracking]
# mode = "offline"            # online | offline | disabled; WANDB_MODE overrides
# project = "segq"
# entity = "my-team"
# name = "b0"                 # run names: <name>-<level>-<method>; WANDB_NAME overrides
# group = "b0-ade"
# tags = ["b0"]
# dir = "segq-out"            # run folders go in <dir>/wandb/; unset: the output folder (output.dir)
# base_url = "https://api.wandb.ai"
# connect_timeout_s = 10
# http_timeout_s = 30         # one try of one request; WANDB_HTTP_TIMEOUT overrides
# retry_budget_s = 30         # time all uploads may lose to failures before the rest stays offline
# shard_runs = false          # a shard of a sharded eval logs its partial runs too (else only segq merge logs)
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_file_parses_to_defaults() {
        let c = Config::from_toml(DEFAULT_FILE, "segq.toml").unwrap();
        assert_eq!(c, Config::default());
    }

    #[test]
    fn bootstrap_keys_set_and_bounded() {
        let mut config = Config::default();
        config.set("eval.bootstrap_resamples=2000").unwrap();
        config.set("eval.bootstrap_seed=7").unwrap();
        assert_eq!((config.eval.bootstrap_resamples, config.eval.bootstrap_seed), (2000, 7));
        let error = config.set("eval.bootstrap_resamples=100001").unwrap_err().to_string();
        assert!(
            error.contains("eval.bootstrap_resamples") && error.contains("100000"),
            "{error}"
        );
        assert_eq!(config.eval.bootstrap_resamples, 2000, "a refused value changes nothing");
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let e = Config::from_toml("[eval]\nbatch_size = 2\nbatchsize = 3\n", "my.toml")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("my.toml line 3:"), "{e}");
        assert!(e.contains("batchsize"), "{e}");
    }

    #[test]
    fn bad_value_names_line() {
        let e = Config::from_toml("[eval]\n\nbatch_size = \"two\"\n", "c.toml")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("c.toml line 3:"), "{e}");
        let e = Config::from_toml("[eval]\nbatch_size = 0\n", "c.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("eval.batch_size must be at least 1"), "{e}");
    }

    #[test]
    fn refuses_secrets() {
        let e = Config::from_toml("[tracking]\napi_key = \"abc123\"\n", "c.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("tracking.api_key") && !e.contains("abc123"), "{e}");
    }

    #[test]
    fn set_overrides_any_key() {
        let mut c = Config::default();
        c.set("eval.batch_size=8").unwrap();
        c.set("quant.levels=[\"int4\"]").unwrap();
        c.set("dataset.split=train").unwrap();
        assert_eq!(c.eval.batch_size, 8);
        assert_eq!(c.quant.levels, vec![Level::Int4]);
        c.set("quant.levels=[\"fp8\", \"int8-dyn\"]").unwrap();
        assert_eq!(c.quant.levels, vec![Level::F8E4m3, Level::Int8Dyn]);
        c.set("eval.shard=auto").unwrap();
        assert_eq!(c.eval.shard, Some(ShardSpec::Auto));
        c.set("tracking.mode=dryrun").unwrap();
        assert_eq!(c.tracking.mode, Some(crate::track::TrackingMode::Offline));
        assert_eq!(c.dataset.split, "train");
        assert!(c.set("eval.nope=1").unwrap_err().to_string().contains("nope"));
        assert!(c.set("eval.batch_size=0").is_err());
        let e = c.set("quant.levels=[\"int3\"]").unwrap_err().to_string();
        assert!(e.contains("quant.levels") && e.contains("int3"), "{e}");
        let e = c.set("dataset.on_error=ignore").unwrap_err().to_string();
        assert!(e.contains("dataset.on_error") && e.contains("ignore"), "{e}");
        let e = Config::from_toml("[eval]\nprotocol = \"paper\"\n", "c.toml")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("c.toml line 2:") && e.contains("paper"), "{e}");
    }
}
