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

/// transformers' modeling code uses this eps for every LayerNorm and the BatchNorm, whatever the config's
/// `layer_norm_eps` says (that key is not read by modeling_segformer.py).
pub const NORM_EPS: f64 = 1e-5;

impl SegformerConfig {
    /// Reads and validates `config.json`; errors name the file and the key at fault.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json_at(&text, &path.display().to_string())
    }

    /// Parses `config.json` text; errors name `config.json`.
    pub fn from_json(text: &str) -> Result<Self> {
        Self::from_json_at(text, "config.json")
    }

    /// Parses `config.json` text; errors name `origin` (the file it came from).
    pub fn from_json_at(text: &str, origin: &str) -> Result<Self> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| Error::invalid(origin, format!("malformed config.json: {e}")))?;
        let model_type = value.get("model_type").and_then(|v| v.as_str()).unwrap_or("segformer");
        if model_type != "segformer" {
            return Err(Error::unsupported(
                origin,
                format!("unsupported model_type \"{model_type}\" (segq supports: segformer)"),
            ));
        }
        let config: SegformerConfig =
            serde_json::from_value(value).map_err(|e| Error::invalid(origin, format!("bad config.json: {e}")))?;
        config.validate().map_err(|message| Error::invalid(origin, message))?;
        Ok(config)
    }

    /// The first inconsistency between the keys, as text; `from_json_at` turns it into an error naming the file.
    fn validate(&self) -> std::result::Result<(), String> {
        let n = self.num_encoder_blocks;
        if n == 0 {
            return Err("num_encoder_blocks must be at least 1".into());
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
            if len < n {
                return Err(format!("key \"{key}\" has {len} entries, num_encoder_blocks is {n}"));
            }
        }
        for i in 0..n {
            let (h, heads) = (self.hidden_sizes[i], self.num_attention_heads[i]);
            if heads == 0 || h % heads != 0 {
                return Err(format!(
                    "hidden_sizes[{i}] = {h} is not a multiple of num_attention_heads[{i}] = {heads}"
                ));
            }
            for (key, v) in [
                ("sr_ratios", self.sr_ratios[i]),
                ("patch_sizes", self.patch_sizes[i]),
                ("strides", self.strides[i]),
                ("mlp_ratios", self.mlp_ratios[i]),
            ] {
                if v == 0 {
                    return Err(format!("key \"{key}\"[{i}] must be at least 1"));
                }
            }
        }
        if !matches!(
            self.hidden_act.as_str(),
            "gelu" | "relu" | "gelu_new" | "gelu_pytorch_tanh"
        ) {
            return Err(format!("unsupported hidden_act \"{}\"", self.hidden_act));
        }
        if self.num_labels() == 0 {
            return Err("the model has no labels (id2label is empty and num_labels unset)".into());
        }
        for key in self.id2label.keys() {
            if key.parse::<usize>().is_err() {
                return Err(format!("id2label key \"{key}\" is not an integer"));
            }
        }
        Ok(())
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
}
