//! The Hugging Face `config.json` of a SegFormer checkpoint: parsed, validated, with the family's defaults.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// `SegformerConfig` as transformers writes it; fields absent from the file take transformers' defaults (B0).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SegformerConfig {
    #[serde(default = "default_model_type")]
    pub model_type: String,
    #[serde(default = "default_num_channels")]
    pub num_channels: usize,
    #[serde(default = "default_num_encoder_blocks")]
    pub num_encoder_blocks: usize,
    #[serde(default = "default_depths")]
    pub depths: Vec<usize>,
    #[serde(default = "default_sr_ratios")]
    pub sr_ratios: Vec<usize>,
    #[serde(default = "default_hidden_sizes")]
    pub hidden_sizes: Vec<usize>,
    #[serde(default = "default_patch_sizes")]
    pub patch_sizes: Vec<usize>,
    #[serde(default = "default_strides")]
    pub strides: Vec<usize>,
    #[serde(default = "default_num_attention_heads")]
    pub num_attention_heads: Vec<usize>,
    #[serde(default = "default_mlp_ratios")]
    pub mlp_ratios: Vec<usize>,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    #[serde(default = "default_decoder_hidden_size")]
    pub decoder_hidden_size: usize,
    #[serde(default = "default_true")]
    pub reshape_last_stage: bool,
    #[serde(default)]
    pub id2label: BTreeMap<String, String>,
    #[serde(default)]
    pub num_labels: Option<usize>,
}

fn default_model_type() -> String {
    "segformer".into()
}
fn default_num_channels() -> usize {
    3
}
fn default_num_encoder_blocks() -> usize {
    4
}
fn default_depths() -> Vec<usize> {
    vec![2, 2, 2, 2]
}
fn default_sr_ratios() -> Vec<usize> {
    vec![8, 4, 2, 1]
}
fn default_hidden_sizes() -> Vec<usize> {
    vec![32, 64, 160, 256]
}
fn default_patch_sizes() -> Vec<usize> {
    vec![7, 3, 3, 3]
}
fn default_strides() -> Vec<usize> {
    vec![4, 2, 2, 2]
}
fn default_num_attention_heads() -> Vec<usize> {
    vec![1, 2, 5, 8]
}
fn default_mlp_ratios() -> Vec<usize> {
    vec![4, 4, 4, 4]
}
fn default_hidden_act() -> String {
    "gelu".into()
}
fn default_decoder_hidden_size() -> usize {
    256
}
fn default_true() -> bool {
    true
}

/// Largest `config.json` read (an ADE20K config with its 150 labels is 8 KB; 65,536 labels fit in 4 MiB).
pub const MAX_CONFIG_BYTES: u64 = 16 << 20;
/// Bounds on the config's numbers, far above every published SegFormer (B5: depths [3, 6, 40, 3], hidden sizes up
/// to 512, decoder 768) and low enough that nothing sized by them can exhaust memory before the checkpoint is
/// compared with them.
pub const MAX_ENCODER_BLOCKS: usize = 8;
pub const MAX_DEPTH: usize = 256;
pub const MAX_HIDDEN_SIZE: usize = 8192;
/// Largest patch size, stride and sr_ratio (SegFormer uses 7, 4 and 8).
pub const MAX_KERNEL: usize = 64;
pub const MAX_MLP_RATIO: usize = 64;
/// Most classes: masks store class ids as 16-bit values.
pub const MAX_LABELS: usize = 1 << 16;

/// The first key of `value` (a JSON object) that does not deserialize into `T` on its own, with serde's reason:
/// `key "depths": invalid value: integer `-1`, expected usize`. Every field of `T` must have a default, so an
/// object holding one key is a complete `T` when that key is well typed.
pub(crate) fn culprit<T: serde::de::DeserializeOwned>(value: &serde_json::Value) -> Option<String> {
    let object = value.as_object()?;
    object.iter().find_map(|(key, v)| {
        let single = serde_json::Value::Object([(key.clone(), v.clone())].into_iter().collect());
        serde_json::from_value::<T>(single)
            .err()
            .map(|e| format!("key {key:?}: {e}"))
    })
}

/// transformers' modeling code uses this eps for every LayerNorm and the BatchNorm, whatever the config's
/// `layer_norm_eps` says (that key is not read by modeling_segformer.py).
pub const NORM_EPS: f64 = 1e-5;

impl SegformerConfig {
    /// Reads and validates `config.json` (refusing a file larger than [`MAX_CONFIG_BYTES`] before reading it);
    /// errors name the file and the key at fault.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = crate::limits::read_text_capped(path, MAX_CONFIG_BYTES)?;
        Self::from_json_at(&text, &path.display().to_string())
    }

    /// Parses `config.json` text; errors name `config.json`.
    pub fn from_json(text: &str) -> Result<Self> {
        Self::from_json_at(text, "config.json")
    }

    /// Parses `config.json` text; errors name `origin` (the file it came from) and the key at fault. Every number
    /// is checked against the bounds below before anything is sized by it.
    pub fn from_json_at(text: &str, origin: &str) -> Result<Self> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| Error::invalid(origin, format!("malformed config.json: {e}")))?;
        if !value.is_object() {
            return Err(Error::invalid(origin, "config.json must be a JSON object"));
        }
        let model_type = match value.get("model_type") {
            None => "segformer",
            Some(v) => v
                .as_str()
                .ok_or_else(|| Error::invalid(origin, format!("key \"model_type\" must be a string, found {v}")))?,
        };
        if model_type != "segformer" {
            return Err(Error::unsupported(
                origin,
                format!("unsupported model_type {model_type:?} (segq supports: segformer)"),
            ));
        }
        let config: SegformerConfig = serde_json::from_value(value.clone()).map_err(|e| {
            Error::invalid(
                origin,
                format!(
                    "bad config.json: {}",
                    culprit::<SegformerConfig>(&value).unwrap_or_else(|| e.to_string())
                ),
            )
        })?;
        config.validate().map_err(|message| Error::invalid(origin, message))?;
        Ok(config)
    }

    /// The first inconsistency between the keys or number out of bounds, as text naming the key; `from_json_at`
    /// turns it into an error naming the file.
    fn validate(&self) -> std::result::Result<(), String> {
        let n = self.num_encoder_blocks;
        if n == 0 || n > MAX_ENCODER_BLOCKS {
            return Err(format!(
                "key \"num_encoder_blocks\" = {n} is out of range (1 to {MAX_ENCODER_BLOCKS})"
            ));
        }
        if self.num_channels != 3 {
            return Err(format!(
                "key \"num_channels\" = {}: segq feeds the model RGB images (3 channels)",
                self.num_channels
            ));
        }
        for (key, len) in [
            ("depths", self.depths.len()),
            ("sr_ratios", self.sr_ratios.len()),
            ("hidden_sizes", self.hidden_sizes.len()),
            ("patch_sizes", self.patch_sizes.len()),
            ("strides", self.strides.len()),
            ("num_attention_heads", self.num_attention_heads.len()),
            ("mlp_ratios", self.mlp_ratios.len()),
        ] {
            if len != n {
                return Err(format!("key \"{key}\" has {len} entries, num_encoder_blocks is {n}"));
            }
        }
        for i in 0..n {
            for (key, v, max) in [
                ("depths", self.depths[i], MAX_DEPTH),
                ("hidden_sizes", self.hidden_sizes[i], MAX_HIDDEN_SIZE),
                ("num_attention_heads", self.num_attention_heads[i], MAX_HIDDEN_SIZE),
                ("sr_ratios", self.sr_ratios[i], MAX_KERNEL),
                ("patch_sizes", self.patch_sizes[i], MAX_KERNEL),
                ("strides", self.strides[i], MAX_KERNEL),
                ("mlp_ratios", self.mlp_ratios[i], MAX_MLP_RATIO),
            ] {
                if v == 0 || v > max {
                    return Err(format!("key \"{key}\"[{i}] = {v} is out of range (1 to {max})"));
                }
            }
            let (h, heads) = (self.hidden_sizes[i], self.num_attention_heads[i]);
            if h % heads != 0 {
                return Err(format!(
                    "hidden_sizes[{i}] = {h} is not a multiple of num_attention_heads[{i}] = {heads}"
                ));
            }
        }
        let d = self.decoder_hidden_size;
        if d == 0 || d > MAX_HIDDEN_SIZE {
            return Err(format!(
                "key \"decoder_hidden_size\" = {d} is out of range (1 to {MAX_HIDDEN_SIZE})"
            ));
        }
        if !matches!(
            self.hidden_act.as_str(),
            "gelu" | "relu" | "gelu_new" | "gelu_pytorch_tanh"
        ) {
            return Err(format!("unsupported hidden_act {:?}", self.hidden_act));
        }
        let labels = self.num_labels();
        if labels == 0 {
            return Err("the model has no labels (id2label is empty and num_labels is 0)".into());
        }
        if labels > MAX_LABELS {
            let key = if self.id2label.is_empty() {
                "num_labels"
            } else {
                "id2label"
            };
            return Err(format!(
                "key \"{key}\" gives {labels} labels, more than segq's masks hold ({MAX_LABELS})"
            ));
        }
        for key in self.id2label.keys() {
            if key.parse::<usize>().is_err() {
                return Err(format!("id2label key {key:?} is not an integer"));
            }
        }
        Ok(())
    }

    /// Estimated peak bytes of one forward pass (`Segformer::forward`) on `batch` images of `height` x `width`
    /// pixels: the activations it allocates, not the weights. Saturates instead of overflowing, so any size gives a
    /// number to compare with the memory available.
    ///
    /// What is counted, in f32 values: the input twice (the NCHW pixels and their channels-last copy, both live
    /// through the encoder); during encoder stage `i` at `N_i` tokens of `C_i` channels, the outputs of the stages
    /// before it plus one block's working set, `N_i * (5 C_i + 2 M_i)` (its input, the normalised copy, query,
    /// attention context and output; Mix-FFN's `dense1` and depthwise outputs at `M_i = mlp_ratio * C_i`); in the
    /// decode head, every stage output, the logits `[B, L, N_1]` and, per image, one more copy of them (the row bands
    /// before they are gathered) and the lower stages projected to the decoder size. The head is composed
    /// (`ComposedHead`), so transformers' concatenated `4 * decoder_hidden_size` channels at `N_1` are never
    /// materialised and not counted. The result is scaled by 5/4 for what the allocator and the kernels' per-thread
    /// buffers add. Upsampling the logits back to the image size (predict, eval) is outside the forward pass.
    ///
    /// Checked against `segq bench --json`'s `working_bytes` (the heap high-water mark of the passes above what was
    /// live before them, so without the NCHW input tensor) for the embedded B0 (20 labels), f32, debug build:
    /// 512x512 batch 1 measured 31.0 MiB (34.0 with the 3 MiB input) and this gives 40.0 MiB; 512x512 batch 4,
    /// 124.5 MiB (136.5) against 160.0; 1024x1024 batch 1, 124.0 MiB (136.0) against 160.0. Without the 5/4 the
    /// counted values alone come to 32 and 128 MiB, about 6% under the measurement; with it the estimate is about
    /// 18% above.
    pub fn forward_bytes(&self, height: usize, width: usize, batch: usize) -> u64 {
        let mul = |a: u64, b: u64| a.saturating_mul(b);
        let batch = batch as u64;
        let (mut h, mut w) = (height as u64, width as u64);
        let input = mul(mul(2 * 3, mul(h, w)), batch);
        let (mut maps, mut encoder_peak, mut low_tokens, mut first_tokens) = (0u64, 0u64, 0u64, 0u64);
        for i in 0..self.num_encoder_blocks {
            let (k, s) = (self.patch_sizes[i] as u64, self.strides[i].max(1) as u64);
            let pad = k / 2;
            let out = |x: u64| (x.saturating_add(2 * pad).saturating_sub(k)) / s + 1;
            (h, w) = (out(h), out(w));
            let tokens = mul(h, w);
            let c = self.hidden_sizes[i] as u64;
            let m = mul(c, self.mlp_ratios[i] as u64);
            let block = mul(tokens, mul(5, c).saturating_add(mul(2, m)));
            encoder_peak = encoder_peak.max(mul(maps.saturating_add(block), batch));
            maps = maps.saturating_add(mul(tokens, c));
            if i == 0 {
                first_tokens = tokens;
            } else {
                low_tokens = low_tokens.saturating_add(tokens);
            }
        }
        let logits = mul(first_tokens, self.num_labels() as u64);
        let head = mul(maps.saturating_add(logits), batch)
            .saturating_add(logits)
            .saturating_add(mul(low_tokens, self.decoder_hidden_size as u64));
        let values = input.saturating_add(encoder_peak.max(head));
        // 4 bytes a value, times 5/4.
        mul(values, 5)
    }

    /// Number of output classes: `id2label`'s size, as transformers derives it.
    pub fn num_labels(&self) -> usize {
        if self.id2label.is_empty() {
            self.num_labels.unwrap_or(2)
        } else {
            self.id2label.len()
        }
    }

    /// Class names in id order; ids missing from `id2label` get `class_<id>`.
    pub fn class_names(&self) -> Vec<String> {
        (0..self.num_labels())
            .map(|i| {
                self.id2label
                    .get(&i.to_string())
                    .cloned()
                    .unwrap_or_else(|| format!("class_{i}"))
            })
            .collect()
    }

    /// The shortest input side (height or width) the encoder can run on: each stage's patch embedding (padding
    /// `patch / 2`) shrinks the map by its stride, and a stage's spatial-reduction conv (kernel = stride =
    /// `sr_ratio`, no padding) needs at least `sr_ratio` rows and columns. B0..B5 need 29.
    pub fn min_input_side(&self) -> usize {
        let fits = |side: usize| {
            let mut size = side;
            (0..self.num_encoder_blocks).all(|i| {
                let (p, s) = (self.patch_sizes[i], self.strides[i]);
                match (size + 2 * (p / 2)).checked_sub(p) {
                    Some(room) => {
                        size = room / s + 1;
                        size >= self.sr_ratios[i]
                    }
                    None => false,
                }
            })
        };
        (1..=crate::limits::MAX_INPUT_SIDE)
            .find(|&side| fits(side))
            .unwrap_or(crate::limits::MAX_INPUT_SIDE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn min_input_side_follows_strides_and_reductions() {
        let b0 = SegformerConfig::from_json(r#"{"num_labels":150}"#).unwrap();
        // Stage 1 maps 29 -> 8 rows, just enough for its 8x8 spatial-reduction conv; 28 -> 7 is not.
        assert_eq!(b0.min_input_side(), 29);
        let no_reduction = SegformerConfig::from_json(r#"{"num_labels":2,"sr_ratios":[1,1,1,1]}"#).unwrap();
        assert_eq!(no_reduction.min_input_side(), 1);
    }

    #[test]
    fn defaults_are_b0() {
        let c = SegformerConfig::from_json(r#"{"model_type":"segformer","num_labels":150}"#).unwrap();
        assert_eq!(c.hidden_sizes, vec![32, 64, 160, 256]);
        assert_eq!(c.num_labels(), 150);
    }

    #[test]
    fn rejects_other_model_types_and_bad_shapes() {
        let e = SegformerConfig::from_json(r#"{"model_type":"bert"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unsupported model_type \"bert\""), "{e}");
        let e = SegformerConfig::from_json(r#"{"hidden_sizes":[30,64,160,256],"num_attention_heads":[4,2,5,8]}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("hidden_sizes[0] = 30"), "{e}");
        let e = SegformerConfig::from_json(r#"{"depths":[2,2]}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"depths\" has 2 entries"), "{e}");
        let e = SegformerConfig::from_json("{not json").unwrap_err().to_string();
        assert!(e.starts_with("malformed config.json"), "{e}");
    }

    #[test]
    fn numbers_out_of_bounds_name_their_key() {
        for (json, key) in [
            (r#"{"depths":[1000000000,2,2,2]}"#, "depths"),
            (r#"{"depths":[4611686018427387904,2,2,2]}"#, "depths"),
            (r#"{"depths":[0,2,2,2]}"#, "depths"),
            (r#"{"depths":[-1,2,2,2]}"#, "depths"),
            (r#"{"depths":"four"}"#, "depths"),
            (r#"{"depths":[2,2,2,2,2]}"#, "depths"),
            (r#"{"strides":[4,2,2,100000]}"#, "strides"),
            (r#"{"num_labels":1000000000000}"#, "num_labels"),
            (r#"{"num_encoder_blocks":100000}"#, "num_encoder_blocks"),
            (r#"{"decoder_hidden_size":0}"#, "decoder_hidden_size"),
            (r#"{"num_channels":4}"#, "num_channels"),
            (r#"{"model_type":7}"#, "model_type"),
            ("[]", "JSON object"),
        ] {
            let e = SegformerConfig::from_json(json).unwrap_err().to_string();
            assert!(e.contains(key) && e.contains("config.json"), "{json}: {e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn forward_bytes_grow_with_the_input_and_saturate() {
        let c = SegformerConfig::from_json(super::super::embedded::CONFIG).unwrap();
        let small = c.forward_bytes(512, 512, 1);
        assert!(small > 20 << 20 && small < 80 << 20, "B0 at 512x512: {small}");
        assert!(c.forward_bytes(1024, 1024, 1) > 3 * small);
        assert!(c.forward_bytes(512, 512, 8) > 7 * small);
        assert_eq!(c.forward_bytes(usize::MAX, usize::MAX, usize::MAX), u64::MAX);
        assert!(c.forward_bytes(1, 1, 1) > 0);
    }
}
