//! optimum-quanto checkpoints of SegFormer, both ways: reading `quantization_map.json`, the two spellings of weight
//! names (transformers 5's in-memory modules, `segformer.stages.0.blocks.0.attention.q_proj`, and the Hub
//! checkpoint names segq's module tree uses, `segformer.encoder.block.0.0.attention.self.query`), the recipe a
//! loaded quanto checkpoint is labelled with, and writing a quantized model as a quanto checkpoint
//! ([`save_quanto`]). The per-weight layouts are `quant::quanto`; `checkpoint::TensorStore` reads the tensors.

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::Dtype;

use super::layers::Param;
use super::plan::Stored;
use super::segformer::Segformer;
use super::tree::{Node, Path as ModulePath};
use crate::quant::quanto::{self, QTYPE_NAMES, QType};
use crate::quant::{Level, Recipe, RecipeHeader, STORAGE_VERSION};
use crate::{Error, Result};

/// The file beside `model.safetensors` that makes a folder an optimum-quanto checkpoint.
pub const QUANTIZATION_MAP_FILE: &str = "quantization_map.json";

/// transformers 5's renamings of SegFormer modules (its `conversion_mapping.py`), as (in-memory, Hub) pairs,
/// applied after the stage prefixes.
const RENAMES: [(&str, &str); 11] = [
    (".attention.q_proj.", ".attention.self.query."),
    (".attention.k_proj.", ".attention.self.key."),
    (".attention.v_proj.", ".attention.self.value."),
    (
        ".attention.sequence_reduction.sequence_reduction.",
        ".attention.self.sr.",
    ),
    (
        ".attention.sequence_reduction.layer_norm.",
        ".attention.self.layer_norm.",
    ),
    (".attention.o_proj.", ".attention.output.dense."),
    (".mlp.fc1.", ".mlp.dense1."),
    (".mlp.fc2.", ".mlp.dense2."),
    (".layernorm_before.", ".layer_norm_1."),
    (".layernorm_after.", ".layer_norm_2."),
    ("decode_head.linear_projections.", "decode_head.linear_c."),
];

/// The Hub checkpoint name of a tensor or module named either way (Hub names come back unchanged).
pub fn hub_name(name: &str) -> String {
    // A trailing dot lets a module name (no `.weight`) match the patterns too.
    let mut s = format!("{name}.");
    if let Some(rest) = s.strip_prefix("segformer.stages.")
        && let Some((i, tail)) = rest.split_once('.')
        && i.parse::<usize>().is_ok()
    {
        let renamed = if let Some(t) = tail.strip_prefix("patch_embeddings.") {
            Some(format!("segformer.encoder.patch_embeddings.{i}.{t}"))
        } else if let Some(t) = tail.strip_prefix("blocks.") {
            Some(format!("segformer.encoder.block.{i}.{t}"))
        } else {
            tail.strip_prefix("layer_norm.")
                .map(|t| format!("segformer.encoder.layer_norm.{i}.{t}"))
        };
        if let Some(r) = renamed {
            s = r;
        }
    }
    for (memory, hub) in RENAMES {
        s = s.replace(memory, hub);
    }
    s.pop();
    s
}

/// The transformers 5 in-memory name of a tensor or module given by its Hub name (what `requantize` expects when
/// it loads into a transformers 5 model).
pub fn memory_name(name: &str) -> String {
    let mut s = format!("{name}.");
    for (memory, hub) in RENAMES {
        s = s.replace(hub, memory);
    }
    for (hub_part, memory_part) in [
        ("patch_embeddings.", "patch_embeddings."),
        ("block.", "blocks."),
        ("layer_norm.", "layer_norm."),
    ] {
        let prefix = format!("segformer.encoder.{hub_part}");
        if let Some(rest) = s.strip_prefix(&prefix)
            && let Some((i, tail)) = rest.split_once('.')
            && i.parse::<usize>().is_ok()
        {
            s = format!("segformer.stages.{i}.{memory_part}{tail}");
            break;
        }
    }
    s.pop();
    s
}

#[derive(serde::Deserialize, serde::Serialize)]
struct MapEntry {
    weights: String,
    activations: String,
}

/// Reads `quantization_map.json`: module (Hub name) -> weight qtype. Modules with weights "none" are float; an
/// entry with quantized activations or an unknown qtype is an error naming the module.
pub fn read_map(path: &Path) -> Result<BTreeMap<String, QType>> {
    let origin = path.display().to_string();
    let text = crate::limits::read_text_capped(path, super::config::MAX_CONFIG_BYTES * 4)?;
    let entries: BTreeMap<String, MapEntry> = serde_json::from_str(&text).map_err(|e| {
        Error::invalid(
            &origin,
            format!("not a quanto quantization map ({{module: {{\"weights\": qtype, \"activations\": qtype}}}}): {e}"),
        )
    })?;
    let mut map = BTreeMap::new();
    for (module, entry) in entries {
        if entry.activations != "none" {
            return Err(Error::unsupported(
                &origin,
                format!(
                    "module `{module}` quantizes activations ({}); segq reads weight-only quanto checkpoints \
                     (activations \"none\")",
                    entry.activations
                ),
            ));
        }
        if entry.weights == "none" {
            continue;
        }
        let qtype = QType::parse(&entry.weights).ok_or_else(|| {
            Error::unsupported(
                &origin,
                format!(
                    "module `{module}` has weights \"{}\", which segq does not read (it reads {QTYPE_NAMES})",
                    entry.weights
                ),
            )
        })?;
        map.insert(hub_name(&module), qtype);
    }
    Ok(map)
}

/// The recipe a loaded quanto checkpoint is labelled with: `quanto-qint4`, or `quanto-qint4+qint8` when layers
/// differ; its level is that of the qtype most layers use (ties: the narrowest), method rtn (quanto does not record
/// its optimizer).
pub fn recipe_header(map: &BTreeMap<String, QType>) -> RecipeHeader {
    let mut counts: BTreeMap<QType, usize> = BTreeMap::new();
    for q in map.values() {
        *counts.entry(*q).or_insert(0) += 1;
    }
    let names: Vec<&str> = counts.keys().map(|q| q.name()).collect();
    let dominant = counts
        .iter()
        .max_by_key(|(q, n)| (**n, std::cmp::Reverse(**q)))
        .map_or(QType::Int8, |(q, _)| *q);
    RecipeHeader {
        version: STORAGE_VERSION,
        label: format!(
            "quanto-{}",
            if names.is_empty() {
                "none".to_string()
            } else {
                names.join("+")
            }
        ),
        recipe: Recipe::level_default(dominant.level()),
    }
}

/// Refuses a recipe no quanto checkpoint can hold, before quantizing: float levels, `int8-dyn` and `int4-dyn`
/// (quanto's activation quantization is static and calibrated, not segq's dynamic per-row scheme). A mixed recipe is
/// checked level by level (quanto's map has one qtype per module, so mixed levels are fine).
pub fn check_recipe(recipe: &Recipe) -> Result<()> {
    recipe.uniform_parts().iter().try_for_each(check_uniform_recipe)
}

fn check_uniform_recipe(recipe: &Recipe) -> Result<()> {
    let level = recipe.level;
    let why = match level {
        Level::F32 | Level::F16 | Level::Bf16 => format!("{level} weights have no quanto qtype (it has {QTYPE_NAMES})"),
        Level::Int8Dyn | Level::Int4Dyn => format!(
            "{level} quantizes activations at run time per row, which quanto cannot express; use {} (weights only)",
            if level == Level::Int4Dyn { "int4" } else { "int8" }
        ),
        Level::Int8Static | Level::W8A8F8 | Level::W4A8 => format!(
            "{level} quantizes activations with calibrated scales, which segq does not write in quanto's format yet; \
             save it in segq's format (the scales are stored as `<layer>.input_scale`)"
        ),
        _ if level.int_bits() == Some(8) && !recipe.is_symmetric() => {
            "quanto's qint8 is symmetric (drop the asymmetric option)".to_string()
        }
        _ if level.int_bits() == Some(8) && recipe.group_size.is_some() => {
            "quanto's qint8 has one scale per output channel (drop --group-size)".to_string()
        }
        _ if recipe.method.scales_columns() => format!(
            "{} weights carry a scale per input column, which quanto's weight types cannot hold",
            recipe.method
        ),
        _ => return Ok(()),
    };
    Err(Error::unsupported(
        format!("--format quanto, level {}", recipe.label()),
        format!(
            "level {} cannot be written as an optimum-quanto checkpoint: {why}",
            recipe.label()
        ),
    ))
}

/// Writes `model` (quantized by `recipe`) as an optimum-quanto checkpoint folder: `model.safetensors` (the state dict
/// a transformers 5 model quantized by quanto holds, under its in-memory names: quantized weights as
/// `weight._data[._data]`, `weight._scale`, `weight._shift` plus `input_scale`/`output_scale` 1.0, the rest
/// float32), `quantization_map.json`, and the model's `config.json` and `preprocessor_config.json`. Python reloads
/// it with `requantize(model, load_file(...), json.load(...))`. Returns the bytes of the safetensors file.
pub fn save_quanto(
    model: &Segformer,
    recipe: &Recipe,
    config_json: &str,
    preprocessor_json: Option<&str>,
    dir: &Path,
) -> Result<u64> {
    check_recipe(recipe)?;
    let mut stored: Vec<super::save::StoredTensor> = Vec::new();
    let mut map: BTreeMap<String, MapEntry> = BTreeMap::new();
    let mut failure = None;
    let f32_bytes = |values: &[f32]| -> Vec<u8> { values.iter().flat_map(|v| v.to_le_bytes()).collect() };
    model.visit(&ModulePath::root(), &mut |path, leaf| {
        for (name, param) in leaf.params() {
            let full = path.pp(name);
            let memory = memory_name(full.as_str());
            match param {
                Param::Weight(w, shape) => match w.stored() {
                    Stored::F32(values) => stored.push((memory, Dtype::F32, shape.to_vec(), f32_bytes(values))),
                    Stored::Quantized(q) => {
                        let module = memory_name(path.as_str());
                        match quanto::to_quanto(&memory, &q, shape) {
                            Ok((qtype, parts)) => {
                                stored.extend(parts);
                                for scalar in ["input_scale", "output_scale"] {
                                    stored.push((format!("{module}.{scalar}"), Dtype::F32, vec![], f32_bytes(&[1.0])));
                                }
                                map.insert(
                                    module,
                                    MapEntry {
                                        weights: qtype.name().to_string(),
                                        activations: "none".to_string(),
                                    },
                                );
                            }
                            Err(e) => {
                                failure.get_or_insert(e);
                            }
                        }
                    }
                },
                Param::Vector(values) => stored.push((memory, Dtype::F32, vec![values.len()], f32_bytes(values))),
                // Quantized modules get quanto's own `input_scale` of 1.0 above (activations "none"); static
                // levels are refused by `check_recipe`.
                Param::OptionalScalar(_) | Param::Unused => {}
            }
        }
        Ok(())
    })?;
    if let Some(e) = failure {
        return Err(e);
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let map_json = serde_json::to_string_pretty(&map)
        .map_err(|e| Error::internal(format!("cannot serialise the quantization map: {e}")))?;
    let metadata = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    let bytes = super::save::write_model_files(dir, config_json, preprocessor_json, &stored, metadata)?;
    // The map last: with it the folder reads as a quanto checkpoint.
    super::save::write_atomically(&dir.join(QUANTIZATION_MAP_FILE), |out| {
        out.write_all(map_json.as_bytes())
    })?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_convert_both_ways() {
        let pairs = [
            (
                "segformer.stages.0.blocks.0.attention.q_proj.weight",
                "segformer.encoder.block.0.0.attention.self.query.weight",
            ),
            (
                "segformer.stages.1.blocks.0.attention.sequence_reduction.sequence_reduction",
                "segformer.encoder.block.1.0.attention.self.sr",
            ),
            (
                "segformer.stages.1.blocks.0.attention.sequence_reduction.layer_norm.bias",
                "segformer.encoder.block.1.0.attention.self.layer_norm.bias",
            ),
            (
                "segformer.stages.2.patch_embeddings.proj.weight._data._data",
                "segformer.encoder.patch_embeddings.2.proj.weight._data._data",
            ),
            (
                "segformer.stages.3.layer_norm.weight",
                "segformer.encoder.layer_norm.3.weight",
            ),
            (
                "segformer.stages.0.blocks.1.layernorm_after.bias",
                "segformer.encoder.block.0.1.layer_norm_2.bias",
            ),
            (
                "segformer.stages.0.blocks.0.mlp.fc2.weight",
                "segformer.encoder.block.0.0.mlp.dense2.weight",
            ),
            ("decode_head.linear_projections.3.proj", "decode_head.linear_c.3.proj"),
            ("decode_head.linear_fuse.weight", "decode_head.linear_fuse.weight"),
            (
                "segformer.stages.0.blocks.0.attention.o_proj.input_scale",
                "segformer.encoder.block.0.0.attention.output.dense.input_scale",
            ),
        ];
        for (memory, hub) in pairs {
            assert_eq!(hub_name(memory), hub);
            assert_eq!(hub_name(hub), hub);
            assert_eq!(memory_name(hub), memory);
        }
    }

    #[test]
    fn labels_name_the_qtypes() {
        let map = BTreeMap::from([("a".to_string(), QType::Int4), ("b".to_string(), QType::Int4)]);
        let header = recipe_header(&map);
        assert_eq!(header.label, "quanto-qint4");
        assert_eq!(header.recipe.level, Level::Int4);
        let map = BTreeMap::from([
            ("a".to_string(), QType::Int4),
            ("b".to_string(), QType::Int8),
            ("c".to_string(), QType::Int8),
        ]);
        let header = recipe_header(&map);
        assert_eq!(header.label, "quanto-qint4+qint8");
        assert_eq!(header.recipe.level, Level::Int8);
        let err = check_recipe(&Recipe::level_default(Level::Int8Dyn))
            .unwrap_err()
            .to_string();
        assert!(err.contains("int8-dyn quantizes activations"), "{err}");
        let err = check_recipe(&Recipe::level_default(Level::Int4Dyn))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("int4-dyn quantizes activations") && err.contains("use int4 (weights only)"),
            "{err}"
        );
        let awq = Recipe::new(Level::Int4, crate::quant::Method::Awq, Some(128), None, vec![]).unwrap();
        let err = check_recipe(&awq).unwrap_err().to_string();
        assert!(err.contains("awq weights carry a scale per input column"), "{err}");
    }
}
