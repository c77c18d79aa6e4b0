//! optimum-quanto interop: checkpoints quantized and saved by the real optimum-quanto (tests/fixtures/quanto, made
//! by scripts/make_quanto_fixtures.py) load and give quanto's logits; `save_quanto` writes checkpoints that load
//! back to the same weights; bad quanto folders give one clear error. The check with Python's `requantize`
//! (scripts/check_quanto_export.py) needs SEGQ_QUANTO_PYTHON, so it is `#[ignore]`d like the W&B reader test.

mod common;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Npy, fixtures};
use segq::model::layers::Param;
use segq::model::tree::{Node, Path as ModulePath};
use segq::model::{self, LoadedModel, ModelSource, Segformer};
use segq::quant::{Level, Method, Recipe};
use segq::segmenter::{ModelInput, forward_inputs};

const FIXTURES: [(&str, &str); 6] = [
    ("qint8", "quanto-qint8"),
    ("qfloat8_e4m3fn", "quanto-qfloat8_e4m3fn"),
    ("qfloat8_e5m2", "quanto-qfloat8_e5m2"),
    ("qint4", "quanto-qint4"),
    ("qint2", "quanto-qint2"),
    ("mixed_hqq", "quanto-qint4+qint8"),
];

fn input() -> ModelInput {
    let npy = Npy::read(&fixtures().join("quanto/input.pixel_values.npy"));
    ModelInput {
        pixels: npy.f32s(),
        height: npy.shape[1],
        width: npy.shape[2],
    }
}

fn logits(model: &Segformer) -> Vec<f32> {
    forward_inputs(model, &[&input()]).unwrap().remove(0).logits.data
}

fn load(dir: &Path) -> LoadedModel {
    model::load(&ModelSource::Local(dir.to_path_buf())).unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

/// Every Linear/Conv2d weight of a model, dequantized, by name.
fn weights(model: &Segformer) -> Vec<(String, Vec<f32>)> {
    let mut out = Vec::new();
    model
        .visit(&ModulePath::root(), &mut |path, leaf| {
            for (name, param) in leaf.params() {
                if let Param::Weight(w, _) = param {
                    out.push((path.pp(name).as_str().to_string(), w.values().into_owned()));
                }
            }
            Ok(())
        })
        .unwrap();
    out
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("segq-quanto-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn quanto_checkpoints_load_and_match_quanto_logits() {
    for (name, label) in FIXTURES {
        let dir = fixtures().join("quanto").join(name);
        let loaded = load(&dir);
        let header = loaded.recipe.as_ref().expect("a quanto checkpoint has a recipe");
        assert_eq!(header.label, label, "{name}");
        // Every Linear and Conv2d is quantized in these fixtures; bits per weight come from the stored layout.
        let bpw = loaded.model.bits_per_weight();
        assert!(bpw > 2.0 && bpw < 9.0, "{name}: {bpw} bits per weight");
        let ours = logits(&loaded.model);
        let expected = Npy::read(&dir.join("logits.npy")).f32s();
        assert_eq!(ours.len(), expected.len(), "{name}: logits size");
        let max_ref = expected.iter().fold(0f32, |m, v| m.max(v.abs()));
        let max_diff = ours.iter().zip(&expected).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            max_diff <= 1e-4 * max_ref,
            "{name}: max |segq - quanto| = {max_diff}, bound {}",
            1e-4 * max_ref
        );
    }
}

#[test]
fn dequantized_weights_are_quantos_bit_for_bit() {
    for (name, _) in FIXTURES {
        let dir = fixtures().join("quanto").join(name);
        let ours = weights(&load(&dir).model);
        let bytes = std::fs::read(dir.join("dequantized.safetensors")).unwrap();
        let reference = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(reference.len(), 3, "{name}");
        for (tensor, view) in reference.tensors() {
            let expected: Vec<f32> = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            let (_, got) = ours
                .iter()
                .find(|(n, _)| *n == tensor)
                .unwrap_or_else(|| panic!("{name}: no weight `{tensor}`"));
            let differing = got
                .iter()
                .zip(&expected)
                .filter(|(a, b)| a.to_bits() != b.to_bits())
                .count();
            assert_eq!(got.len(), expected.len(), "{name} {tensor}");
            assert_eq!(
                differing, 0,
                "{name} {tensor}: {differing} values differ from quanto's dequantization"
            );
        }
    }
}

#[test]
fn both_name_spellings_load_the_same_model() {
    // qint4 is stored under transformers 5's in-memory names; a copy renamed to the Hub names must load the same.
    let src = fixtures().join("quanto/qint4");
    let dir = temp_dir("hub-names");
    for f in ["config.json", "preprocessor_config.json"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let renamed: Vec<(String, safetensors::tensor::TensorView<'_>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (model::quanto::hub_name(&n), v))
        .collect();
    assert!(
        renamed
            .iter()
            .any(|(n, _)| n.contains("attention.self.query.weight._data._data"))
    );
    std::fs::write(
        dir.join("model.safetensors"),
        safetensors::serialize(renamed, None).unwrap(),
    )
    .unwrap();
    let map: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(src.join("quantization_map.json")).unwrap()).unwrap();
    let map: serde_json::Map<String, serde_json::Value> =
        map.into_iter().map(|(k, v)| (model::quanto::hub_name(&k), v)).collect();
    std::fs::write(dir.join("quantization_map.json"), serde_json::to_string(&map).unwrap()).unwrap();
    let a = weights(&load(&src).model);
    let b = weights(&load(&dir).model);
    assert_eq!(a, b);
    let _ = std::fs::remove_dir_all(&dir);
}

/// tiny_a quantized by segq and written with `save_quanto`, for each level quanto holds (int4/int2 per channel:
/// quanto's group sizes for tiny_a's rows are per channel or 128, which segq's per-channel groups contain).
fn exports() -> Vec<(Recipe, PathBuf, Segformer)> {
    let float = load(&fixtures().join("models/tiny_a"));
    let recipes = [
        Recipe::level_default(Level::Int8),
        Recipe::level_default(Level::F8E4m3),
        Recipe::level_default(Level::F8E5m2),
        Recipe::new(Level::Int4, Method::Rtn, Some(4096), None, vec![]).unwrap(),
        Recipe::new(
            Level::Int4,
            Method::Hqq,
            Some(4096),
            None,
            vec!["decode_head.classifier*".into()],
        )
        .unwrap(),
        Recipe::new(Level::Int2, Method::Rtn, Some(4096), Some(true), vec![]).unwrap(),
    ];
    recipes
        .into_iter()
        .map(|recipe| {
            let (quantized, _) = model::quantize(&float.model, &recipe).unwrap();
            let dir = temp_dir(&format!("export-{}", recipe.label()));
            model::quanto::save_quanto(
                &quantized,
                &recipe,
                &float.config_json,
                float.preprocessor_json.as_deref(),
                &dir,
            )
            .unwrap();
            (recipe, dir, quantized)
        })
        .collect()
}

#[test]
fn export_then_import_gives_the_same_weights() {
    for (recipe, dir, quantized) in exports() {
        let label = recipe.label();
        let back = load(&dir);
        assert!(back.recipe.as_ref().unwrap().label.starts_with("quanto-q"), "{label}");
        let (a, b) = (weights(&quantized), weights(&back.model));
        assert_eq!(a.len(), b.len());
        for ((name, x), (name_back, y)) in a.iter().zip(&b) {
            assert_eq!(name, name_back);
            if matches!(recipe.level, Level::Int4 | Level::Int2) {
                // quanto's `q * scale - shift` against segq's `(q - zero) * scale`: float rounding only.
                let scale = x.iter().fold(0f32, |m, v| m.max(v.abs()));
                let diff = x.iter().zip(y).fold(0f32, |m, (p, q)| m.max((p - q).abs()));
                assert!(diff <= 1e-6 * scale.max(1e-6), "{label} {name}: {diff}");
            } else {
                assert!(
                    x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits()),
                    "{label} {name}"
                );
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn export_refuses_what_quanto_cannot_hold() {
    let float = load(&fixtures().join("models/tiny_a"));
    let dir = temp_dir("refused");
    let save = |recipe: &Recipe| {
        let (q, _) = model::quantize(&float.model, recipe).unwrap();
        model::quanto::save_quanto(&q, recipe, &float.config_json, None, &dir)
            .unwrap_err()
            .to_string()
    };
    let err = save(&Recipe::level_default(Level::Bf16));
    assert!(
        err.contains("level bf16 cannot be written as an optimum-quanto checkpoint"),
        "{err}"
    );
    let err = save(&Recipe::level_default(Level::Int8Dyn));
    assert!(err.contains("int8-dyn quantizes activations"), "{err}");
    // int4's default groups of 64 split the first patch embedding's rows of 147, which quanto keeps per channel...
    let err = save(&Recipe::level_default(Level::Int4));
    assert!(
        err.starts_with(
            "segformer.stages.0.patch_embeddings.proj.weight: cannot be written for optimum-quanto: quanto \
             quantizes rows of 147 inputs per output channel"
        ),
        "{err}"
    );
    // ... and with that layer kept float, the 512-input spatial-reduction conv, which quanto cuts in groups of 128.
    let skip = vec!["segformer.encoder.patch_embeddings.*".to_string()];
    let err = save(&Recipe::new(Level::Int4, Method::Rtn, None, None, skip).unwrap());
    assert!(
        err.starts_with(
            "segformer.stages.0.blocks.0.attention.sequence_reduction.sequence_reduction.weight: cannot be written \
             for optimum-quanto: quanto quantizes rows of 512 inputs in groups of 128"
        ),
        "{err}"
    );
    assert!(!dir.join("quantization_map.json").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A copy of a fixture folder with `edit` applied to it; returns the load error.
fn load_error(fixture: &str, edit: impl FnOnce(&Path)) -> String {
    let src = fixtures().join("quanto").join(fixture);
    let dir = temp_dir(&format!("bad-{fixture}"));
    for entry in std::fs::read_dir(&src).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    edit(&dir);
    let err = match model::load(&ModelSource::Local(dir.clone())) {
        Ok(_) => panic!("{fixture}: the edited checkpoint loaded"),
        Err(e) => e.to_string(),
    };
    let _ = std::fs::remove_dir_all(&dir);
    err
}

fn edit_map(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("quantization_map.json");
    let mut map: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    f(&mut map);
    std::fs::write(path, map.to_string()).unwrap();
}

#[test]
fn bad_quanto_checkpoints_are_named_errors() {
    let module = "segformer.stages.0.blocks.0.attention.q_proj";
    let err = load_error("qint4", |d| edit_map(d, |m| m[module]["activations"] = "qint8".into()));
    assert!(
        err.contains(&format!("module `{module}` quantizes activations (qint8)")),
        "{err}"
    );
    let err = load_error("qint4", |d| {
        edit_map(d, |m| m[module]["weights"] = "qfloat8_e4m3fnuz".into())
    });
    assert!(
        err.contains("has weights \"qfloat8_e4m3fnuz\", which segq does not read"),
        "{err}"
    );
    let err = load_error("qint4", |d| edit_map(d, |m| m[module]["weights"] = "qint2".into()));
    assert!(
        err.contains("segformer.encoder.block.0.0.attention.self.query.weight._data._data: expected U8 [2, 8] for a qint2 weight of shape [8, 8], found U8 [4, 8]"),
        "{err}"
    );
    let err = load_error("qint4", |d| {
        edit_map(d, |m| {
            m.as_object_mut().unwrap().remove(module);
        })
    });
    assert!(
        err.contains("is part of a quanto weight, but quantization_map.json does not list module `segformer.encoder.block.0.0.attention.self.query`"),
        "{err}"
    );
    let err = load_error("qint8", |d| {
        std::fs::write(d.join("quantization_map.json"), "[1, 2]").unwrap()
    });
    assert!(err.contains("not a quanto quantization map"), "{err}");
}

/// The Python in SEGQ_QUANTO_PYTHON, once it has shown that it imports optimum-quanto; panics otherwise.
fn quanto_python() -> OsString {
    let python = std::env::var_os("SEGQ_QUANTO_PYTHON").filter(|p| !p.is_empty()).expect(
        "SEGQ_QUANTO_PYTHON is not set: point it at a Python with torch, transformers and optimum-quanto \
         (python3 -m venv /tmp/venv-quanto && /tmp/venv-quanto/bin/pip install torch transformers optimum-quanto)",
    );
    let output = Command::new(&python)
        .args([
            "-c",
            "import optimum.quanto, transformers; print(transformers.__version__)",
        ])
        .output()
        .unwrap_or_else(|e| panic!("SEGQ_QUANTO_PYTHON={}: cannot run it: {e}", python.display()));
    assert!(
        output.status.success(),
        "SEGQ_QUANTO_PYTHON={}: cannot import optimum.quanto and transformers:\n{}",
        python.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    python
}

fn write_npy(path: &Path, shape: &[usize], values: &[f32]) {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let mut header = format!(
        "{{'descr': '<f4', 'fortran_order': False, 'shape': ({},), }}",
        dims.join(", ")
    );
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend((header.len() as u16).to_le_bytes());
    bytes.extend(header.as_bytes());
    bytes.extend(values.iter().flat_map(|v| v.to_le_bytes()));
    std::fs::write(path, bytes).unwrap();
}

#[test]
#[ignore = "needs SEGQ_QUANTO_PYTHON, a Python with optimum-quanto; .ci/run runs it with --ignored"]
fn python_requantize_reloads_exports_with_segq_logits() {
    let python = quanto_python();
    let script = common::repo_root().join("scripts/check_quanto_export.py");
    let input_path = fixtures().join("quanto/input.pixel_values.npy");
    for (recipe, dir, quantized) in exports() {
        let out = forward_inputs(&quantized, &[&input()]).unwrap().remove(0).logits;
        let segq_logits = dir.join("segq_logits.npy");
        write_npy(&segq_logits, &[out.classes, out.height, out.width], &out.data);
        let status = Command::new(&python)
            .arg(&script)
            .args([dir.as_os_str(), input_path.as_os_str(), segq_logits.as_os_str()])
            .status()
            .unwrap();
        assert!(
            status.success(),
            "{}: quanto's logits differ from segq's (see above)",
            recipe.label()
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
