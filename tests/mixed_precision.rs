//! Mixed precision: per-layer rules (`[[quant.rules]]`, `--recipe FILE`) quantize each layer as its first matching
//! rule says, save and reload bit-identically with the same bits per weight and label, and run through eval,
//! quantize and predict like uniform levels; `--quant auto:...` searches a recipe under a budget.

mod eval_support;
mod wandb_support;

use std::path::{Path, PathBuf};

use eval_support::{level, results, scratch, segq_fails, segq_ok};
use segq::model::{self, ModelSource};
use segq::preprocess::Protocol;
use segq::quant::{LayerRule, Level, Method, Recipe};
use segq::segmenter::{ModelInput, forward_inputs};

fn fixture(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(path)
}

fn tiny_a() -> model::LoadedModel {
    model::load(&ModelSource::Local(fixture("models/tiny_a"))).unwrap()
}

fn logits(model: &segq::model::segformer::Segformer, loaded: &model::LoadedModel) -> Vec<Vec<f32>> {
    ["odd_37x53.png", "wide_101x45.png"]
        .iter()
        .map(|name| {
            let image = segq::data::decode::read_rgb(&fixture(&format!("images/{name}"))).unwrap();
            let input = ModelInput::new(&image, &loaded.preprocessor, Protocol::Transformers);
            forward_inputs(model, &[&input]).unwrap().remove(0).logits.data
        })
        .collect()
}

/// The format of every layer, by name.
fn formats(model: &segq::model::segformer::Segformer) -> Vec<(String, String)> {
    model.layers().into_iter().map(|l| (l.name, l.format)).collect()
}

fn head_int8_recipe() -> Recipe {
    let mut attention = LayerRule::new("segformer.encoder.block.*.attention.*", Level::Int2);
    attention.group_size = Some(16);
    Recipe::new(Level::Int4, Method::Hqq, None, None, vec!["*.classifier".into()])
        .unwrap()
        .with_rules([LayerRule::new("decode_head.*", Level::Int8), attention])
        .unwrap()
}

#[test]
fn each_layer_gets_its_rules_level_and_a_mixed_checkpoint_reloads_bit_identical() {
    let loaded = tiny_a();
    let recipe = head_int8_recipe();
    let (quantized, report) = model::quantize(&loaded.model, &recipe).unwrap();
    for (name, format) in formats(&quantized) {
        let expected = if name.ends_with("classifier") {
            "f32"
        } else if name.starts_with("decode_head.") {
            "int8"
        } else if name.contains(".attention.") {
            "int2"
        } else {
            "int4"
        };
        assert!(format.starts_with(expected), "{name}: {format}, expected {expected}");
    }
    let bits = quantized.bits_per_weight();
    assert_eq!(report.bits_per_weight, bits);
    assert_eq!(report.label, format!("mixed-{bits:.1}b-{}", recipe.tag()));

    let dir = scratch("mixed-checkpoint");
    model::checkpoint::save_quantized(&quantized, &recipe, &loaded.config_json, None, &dir).unwrap();
    let reloaded = model::load(&ModelSource::Local(dir.clone())).unwrap();
    let header = reloaded.recipe.as_ref().expect("a quantized checkpoint");
    assert_eq!(header.recipe, recipe, "the rules are stored");
    assert_eq!(header.label, report.label);
    assert_eq!(reloaded.model.bits_per_weight(), bits);
    assert_eq!(formats(&reloaded.model), formats(&quantized));
    assert_eq!(
        logits(&reloaded.model, &loaded),
        logits(&quantized, &loaded),
        "bit-identical logits"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_one_rule_recipe_on_the_float_model_quantizes_exactly_that_layer() {
    let loaded = tiny_a();
    let target = loaded.model.layers()[3].name.clone();
    let recipe = Recipe::level_default(Level::F32)
        .with_rules([LayerRule::new(format!("{target}.weight"), Level::Int4)])
        .unwrap();
    let (quantized, report) = model::quantize(&loaded.model, &recipe).unwrap();
    assert_eq!(report.quantized_layers, 1);
    for (name, format) in formats(&quantized) {
        assert_eq!(format.starts_with("int4"), name == target, "{name}: {format}");
    }
    assert_ne!(logits(&quantized, &loaded), logits(&loaded.model, &loaded));
    // The same layer quantized within a uniform int4 model has the same codes.
    let (uniform, _) = model::quantize(&loaded.model, &Recipe::level_default(Level::Int4)).unwrap();
    let layer = |m: &segq::model::segformer::Segformer| m.layers().into_iter().find(|l| l.name == target).unwrap();
    assert_eq!(layer(&quantized).weight_bytes, layer(&uniform).weight_bytes);
}

#[test]
fn recipe_files_and_config_rules_run_through_eval_quantize_and_predict() {
    let dir = scratch("mixed-cli");
    let recipe_file = dir.join("head8.toml");
    std::fs::write(
        &recipe_file,
        "name = \"head8\"\nlevel = \"int4\"\nmethod = \"rtn\"\n\n[[rules]]\nmatch = \"decode_head.*\"\nlevel = \"int8\"\n",
    )
    .unwrap();
    let config = dir.join("segq.toml");
    std::fs::write(
        &config,
        "[quant]\nmethods = [\"rtn\"]\n\n[[quant.rules]]\nmatch = \"decode_head.linear_fuse*\"\nlevel = \"int8\"\n",
    )
    .unwrap();
    let out = dir.join("eval");
    segq_ok(&[
        "--config",
        config.to_str().unwrap(),
        "eval",
        "--quant",
        "f32,int2",
        "--recipe",
        recipe_file.to_str().unwrap(),
        "--limit",
        "2",
        "--out",
        out.to_str().unwrap(),
    ]);
    let r = results(&out);
    let labels = eval_support::labels(&r);
    assert_eq!(labels.len(), 3, "{labels:?}");
    assert_eq!(labels[0], "f32");
    // int2 with the config's rule is mixed; the recipe file's row carries its name.
    assert!(
        labels[1].starts_with("mixed-") && !labels[1].ends_with("head8"),
        "{labels:?}"
    );
    assert!(
        labels[2].starts_with("mixed-") && labels[2].ends_with("-head8"),
        "{labels:?}"
    );
    let row = level(&r, &labels[2]);
    assert_eq!(row["level"], "int4");
    assert_eq!(row["recipe"]["rules"][0]["match"], "decode_head.*");
    let bits = row["bits_per_weight"].as_f64().unwrap();
    assert!(bits > 4.0 && bits < 8.0, "{bits}");
    assert!(level(&r, &labels[1])["recipe"]["rules"][0]["level"] == "int8");
    let summary = std::fs::read_to_string(out.join("summary.md")).unwrap();
    assert!(summary.contains(&labels[2]), "{summary}");

    // quantize --recipe writes the checkpoint that predict --recipe computes on the fly.
    let checkpoint = dir.join("ckpt");
    segq_ok(&[
        "quantize",
        "--recipe",
        recipe_file.to_str().unwrap(),
        "--out",
        checkpoint.to_str().unwrap(),
    ]);
    let image = fixture("images/odd_37x53.png");
    let (a, b) = (dir.join("pred-ckpt"), dir.join("pred-recipe"));
    segq_ok(&[
        "predict",
        "--model",
        checkpoint.to_str().unwrap(),
        image.to_str().unwrap(),
        "--out",
        a.to_str().unwrap(),
        "--save-logits",
    ]);
    segq_ok(&[
        "predict",
        "--recipe",
        recipe_file.to_str().unwrap(),
        image.to_str().unwrap(),
        "--out",
        b.to_str().unwrap(),
        "--save-logits",
    ]);
    let logits_file = |d: &Path| {
        let file = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|e| e == "npy"))
            .expect("a logits file");
        std::fs::read(file).unwrap()
    };
    assert_eq!(
        logits_file(&a),
        logits_file(&b),
        "checkpoint and on-the-fly logits are identical"
    );

    // Bad recipe files are one line naming the file.
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "level = \"int4\"\n[[rules]]\nmatch = \"x\"\nlevel = \"int3\"\n").unwrap();
    let err = segq_fails(&[
        "eval",
        "--recipe",
        bad.to_str().unwrap(),
        "--limit",
        "1",
        "--out",
        dir.join("x").to_str().unwrap(),
    ]);
    assert!(err.contains("bad.toml") && err.contains("int3"), "{err}");
    let err = segq_fails(&[
        "quantize",
        "--recipe",
        recipe_file.to_str().unwrap(),
        "--quant",
        "int4",
        "--out",
        "y",
    ]);
    assert!(err.contains("--recipe") || err.contains("--quant"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn search_inputs(loaded: &model::LoadedModel) -> Vec<ModelInput> {
    ["odd_37x53.png", "wide_101x45.png", "small_23x19.png"]
        .iter()
        .map(|name| {
            let image = segq::data::decode::read_rgb(&fixture(&format!("images/{name}"))).unwrap();
            ModelInput::new(&image, &loaded.preprocessor, Protocol::Transformers)
        })
        .collect()
}

#[test]
fn searches_keep_their_budget_are_deterministic_and_name_their_rows() {
    use segq::eval::auto::{AutoSpec, search_all};
    use segq::quant::search::AutoTarget;
    let loaded = tiny_a();
    let inputs = search_inputs(&loaded);
    // Budgets around this small model's own sizes (its short rows make scales weigh more than on a B0).
    let bits_of = |level| {
        model::quantize(&loaded.model, &Recipe::level_default(level))
            .unwrap()
            .1
            .bits_per_weight
    };
    let (int2, int8) = (bits_of(Level::Int2), bits_of(Level::Int8));
    let spec = AutoSpec {
        targets: vec![
            AutoTarget::Bits(int2 + 0.05),
            AutoTarget::Bits((int2 + int8) / 2.0),
            AutoTarget::Bits(int8 + 1.0),
            AutoTarget::MaxDrop(5.0),
        ],
        method: Method::Rtn,
        group_size: None,
        batch_size: 2,
        ignore_index: 255,
    };
    let found = search_all(&loaded, &inputs, None, &spec).unwrap();
    let untimed = |found: &[(Recipe, segq::eval::auto::AutoSearch)]| {
        let mut found = found.to_vec();
        for (_, info) in &mut found {
            (info.sensitivity_s, info.search_s) = (0.0, 0.0);
        }
        found
    };
    assert_eq!(
        untimed(&found),
        untimed(&search_all(&loaded, &inputs, None, &spec).unwrap()),
        "deterministic"
    );
    for ((recipe, info), target) in found.iter().zip(&spec.targets) {
        assert_eq!(info.target, *target);
        assert_eq!(recipe.name.as_deref(), Some(target.name().as_str()));
        let (quantized, report) = model::quantize(&loaded.model, recipe).unwrap();
        assert_eq!(report.bits_per_weight, info.bits_per_weight);
        assert_eq!(quantized.bits_per_weight(), info.bits_per_weight);
        match *target {
            AutoTarget::Bits(bits) => assert!(info.bits_per_weight <= bits, "{target}: {}", info.bits_per_weight),
            AutoTarget::MaxDrop(drop) => {
                assert!(info.attempts >= 1 && info.attempts <= segq::eval::auto::MAX_ATTEMPTS);
                assert_eq!(
                    info.target_met_on_search_images,
                    info.search_images_drop <= drop,
                    "{info:?}"
                );
            }
        }
        assert!(!recipe.is_float_baseline() && recipe.is_custom());
        assert_eq!(info.layers, loaded.model.layers().len());
        assert_eq!(info.layers_per_level.values().sum::<usize>(), info.layers);
    }
    // A larger budget never predicts more damage.
    assert!(found[2].1.predicted_drop <= found[1].1.predicted_drop);
    assert!(found[1].1.predicted_drop <= found[0].1.predicted_drop);
    // Below every layer at int2 nothing fits: one line naming the target.
    let below = (int2 - 0.2).max(1.1);
    let too_small = AutoSpec {
        targets: vec![AutoTarget::Bits(below)],
        ..spec
    };
    let err = search_all(&loaded, &inputs, None, &too_small).unwrap_err().to_string();
    assert!(
        err.contains(&format!("auto:bits={below}")) && !err.contains('\n'),
        "{err}"
    );
}

#[test]
fn an_auto_row_is_evaluated_written_as_a_recipe_reused_by_recipe_and_merged_from_shards() {
    let dir = scratch("mixed-auto");
    let model = fixture("models/tiny_a");
    let run = |out: &Path, extra: &[&str]| {
        let mut args = vec![
            "eval",
            "--model",
            model.to_str().unwrap(),
            "--method",
            "rtn",
            "--limit",
            "4",
            "--set",
            "quant.auto_images=3",
            "--set",
            "eval.samples=0",
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        segq_ok(&args)
    };
    let out = dir.join("auto");
    run(&out, &["--quant", "f32,int4,auto:bits=3.5", "--wandb", "offline"]);
    let r = results(&out);
    let labels = eval_support::labels(&r);
    assert_eq!(labels.len(), 3, "{labels:?}");
    let label = &labels[2];
    assert!(
        label.starts_with("mixed-") && label.ends_with("-auto-bits3.5"),
        "{label}"
    );
    let row = level(&r, label);
    assert!(row["bits_per_weight"].as_f64().unwrap() <= 3.5);
    assert_eq!(row["auto"]["target"], "auto:bits=3.5");
    assert_eq!(row["auto"]["images"], 3);
    assert_eq!(r["config"]["quant"]["auto"][0], "auto:bits=3.5");
    let recipe_file = out.join("recipes").join(format!("{label}.toml"));
    assert!(recipe_file.exists(), "{}", recipe_file.display());
    // The row's W&B run carries the recipe and the search in its config.
    let logged = |needle: &str| {
        wandb_support::all_files(&out.join("wandb")).iter().any(|f| {
            let bytes = std::fs::read(f).unwrap();
            bytes.windows(needle.len()).any(|w| w == needle.as_bytes())
        })
    };
    assert!(
        logged("auto:bits=3.5") && logged("search_images_drop"),
        "no search in the W&B runs"
    );

    // The written recipe, given back with --recipe, is the same row with the same scores.
    let again = dir.join("again");
    run(&again, &["--quant", "f32", "--recipe", recipe_file.to_str().unwrap()]);
    let r2 = results(&again);
    let row2 = level(&r2, label);
    assert_eq!(row2["confusion"], row["confusion"]);
    assert_eq!(row2["agreement"], row["agreement"]);
    assert_eq!(row2["bits_per_weight"], row["bits_per_weight"]);

    // Shards search the same first images, so they find the same recipe and merge into the unsharded scores.
    let mut shard_dirs = Vec::new();
    for i in 0..2 {
        let shard = dir.join(format!("shard{i}"));
        run(
            &shard,
            &["--quant", "f32,int4,auto:bits=3.5", "--shard", &format!("{i}/2")],
        );
        shard_dirs.push(shard);
    }
    let merged = dir.join("merged");
    segq_ok(&[
        "merge",
        shard_dirs[0].to_str().unwrap(),
        shard_dirs[1].to_str().unwrap(),
        "--out",
        merged.to_str().unwrap(),
    ]);
    let m = results(&merged);
    assert_eq!(level(&m, label)["confusion"], row["confusion"]);
    assert_eq!(level(&m, label)["agreement"], row["agreement"]);
    assert!(merged.join("recipes").join(format!("{label}.toml")).exists());
    let _ = std::fs::remove_dir_all(&dir);
}
