//! End-to-end tests of `segq eval` on the embedded demo: the float scores equal the Python reference
//! (transformers + `evaluate`'s mean_iou), every promised output file is written, the printed table has its
//! columns, a level that cannot be built is refused before evaluating, and bad dataset rows are skipped and counted or stop the run
//! with the file and row named.

mod eval_support;
#[path = "support/parquet.rs"]
mod parquet_fixture;

use std::path::Path;

use eval_support::{demo_example, level, results, scratch, segq_fails, segq_ok};
use segq::eval::results::{EvalResults, LevelStatus};

fn reference() -> serde_json::Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/demo/reference_metrics.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn counts(value: &serde_json::Value) -> Vec<u64> {
    eval_support::u64s(value)
}

#[test]
fn float_scores_equal_the_python_reference() {
    let out = scratch("reference");
    segq_ok(&[
        "eval",
        "--quant",
        "f32",
        "--limit",
        "12",
        "--out",
        out.to_str().unwrap(),
        "--set",
        "eval.samples=0",
    ]);
    let results = EvalResults::read(&out.join("results.json")).unwrap();
    assert!(results.complete);
    assert_eq!(results.counts.evaluated, 12);
    assert_eq!(results.counts.skipped, 0);
    let ours = results.levels[0].metrics().expect("f32 ran");
    let reference = reference();
    let images = reference["images"].as_array().unwrap().len();
    assert_eq!(images, 12);

    // Label areas do not depend on the model: they must be identical.
    assert_eq!(ours.total_area_label, counts(&reference["total_area_label"]));
    // Predictions may differ only on the pixels whose two best logits are within 1e-3 (float summation order);
    // the reference counts them per image. Each flipped pixel moves one count between two classes.
    let near_ties: u64 = reference["per_image"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["near_tie_pixels_1e_3"].as_u64().unwrap())
        .sum();
    let moved: u64 = ours
        .total_area_pred_label
        .iter()
        .zip(counts(&reference["total_area_pred_label"]))
        .map(|(a, b)| a.abs_diff(b))
        .sum();
    assert!(
        moved <= 2 * near_ties,
        "predicted areas differ by {moved} pixel counts; only {near_ties} near-tie pixels can flip"
    );
    let intersect_moved: u64 = ours
        .total_area_intersect
        .iter()
        .zip(counts(&reference["total_area_intersect"]))
        .map(|(a, b)| a.abs_diff(b))
        .sum();
    assert!(
        intersect_moved <= near_ties,
        "intersections differ by {intersect_moved}"
    );
    eprintln!(
        "pixel counts moved vs reference: predicted {moved}, intersect {intersect_moved} (near ties: {near_ties})"
    );

    for (name, value, tolerance) in [
        ("mean_iou", ours.mean_iou, 1e-4),
        ("mean_accuracy", ours.mean_accuracy, 1e-4),
        ("overall_accuracy", ours.overall_accuracy, 1e-5),
    ] {
        let expected = reference[name].as_f64().unwrap();
        // Identical counts must give identical scores (to float rounding); otherwise the near ties bound the drift.
        let tolerance = if moved == 0 { 1e-12 } else { tolerance };
        assert!(
            (value - expected).abs() <= tolerance,
            "{name}: segq {value}, reference {expected}"
        );
    }
    for (c, (ours, theirs)) in ours
        .per_category_iou
        .iter()
        .zip(reference["per_category_iou"].as_array().unwrap())
        .enumerate()
    {
        match (ours, theirs.as_f64()) {
            (None, None) => {}
            (Some(a), Some(b)) => assert!((a - b).abs() < 1e-3, "class {c}: IoU {a} vs {b}"),
            other => panic!("class {c}: IoU defined in one and not the other: {other:?}"),
        }
    }
}

#[test]
fn writes_every_output_and_prints_the_table() {
    let out = scratch("outputs");
    let stdout = segq_ok(&[
        "eval",
        "--quant",
        "f32,int8,int4",
        "--method",
        "rtn",
        "--limit",
        "3",
        "--out",
        out.to_str().unwrap(),
    ]);
    let labels = ["f32", "int8-rtn", "int4-rtn-g64"];

    // results.json: the levels asked for, complete, every level scored.
    let json = results(&out);
    assert_eq!(json["complete"], true);
    assert_eq!(eval_support::labels(&json), labels);
    let parsed = EvalResults::read(&out.join("results.json")).unwrap();
    assert_eq!(parsed.counts.evaluated, 3);
    assert_eq!(parsed.dataset.examples_total_selected, 3);
    for level in &parsed.levels {
        assert_eq!(level.status, LevelStatus::Ok, "{}", level.label);
        assert_eq!(
            level.model_latency_ms.len(),
            3,
            "{}: one latency per image",
            level.label
        );
        let m = level.metrics().unwrap();
        assert!(
            m.mean_iou > 0.5 && m.mean_iou <= 1.0,
            "{}: mIoU {}",
            level.label,
            m.mean_iou
        );
        assert!(level.weight_bytes_memory > 0);
    }
    let f32_bytes = parsed.levels[0].weight_bytes_memory as f64;
    let int8 = &parsed.levels[1];
    let int4 = &parsed.levels[2];
    assert!(int8.agreement_metrics().unwrap().pixel_agreement > 0.95);
    assert!(int4.agreement_metrics().unwrap().pixel_agreement > 0.8);
    assert!(
        (int8.weight_bytes_memory as f64) < 0.35 * f32_bytes,
        "int8 weights are about a quarter of f32"
    );
    assert!((int4.weight_bytes_memory as f64) < (int8.weight_bytes_memory as f64) * 0.7);
    assert!(json["levels"][1]["summary"]["metrics"]["mean_iou"].is_f64());
    assert!(json["machine"]["threads"].as_u64().unwrap() >= 1);
    assert!(json["segq_version"].is_string() && json["config"]["quant"]["levels"].is_array());

    // summary.csv: header columns, one row per level.
    let csv = std::fs::read_to_string(out.join("summary.csv")).unwrap();
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    assert_eq!(header, segq::report::table::csv_columns());
    for column in [
        "level",
        "miou",
        "mean_accuracy",
        "overall_accuracy",
        "pixel_agreement_f32",
        "weight_mb",
        "images_per_s_model",
    ] {
        assert!(header.contains(&column), "summary.csv lacks {column}");
    }
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), 3);
    let miou_col = header.iter().position(|c| *c == "miou").unwrap();
    for (row, level) in rows.iter().zip(&parsed.levels) {
        assert_eq!(row[0], level.label);
        let miou: f64 = row[miou_col].parse().unwrap();
        assert_eq!(miou, level.miou(), "summary.csv and results.json agree");
    }

    // summary.md, plots, sample overlays.
    let md = std::fs::read_to_string(out.join("summary.md")).unwrap();
    assert!(
        md.contains("| level |") && labels.iter().all(|l| md.contains(l)),
        "{md}"
    );
    for plot in ["miou_vs_bits", "throughput", "class_iou_drop"] {
        for ext in ["png", "svg"] {
            let path = out.join("plots").join(format!("{plot}.{ext}"));
            assert!(
                std::fs::metadata(&path).map(|m| m.len() > 500).unwrap_or(false),
                "{}",
                path.display()
            );
        }
    }
    image::open(out.join("plots/miou_vs_bits.png")).expect("a readable PNG");
    for level in labels.iter().chain(["ground_truth"].iter()) {
        let dir = out.join("samples").join(level);
        let pngs: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .filter_map(|e| e.ok())
            .filter(|e| e.path().extension().is_some_and(|x| x == "png"))
            .collect();
        assert_eq!(pngs.len(), 3, "{}: one overlay per sample", dir.display());
        let overlay = image::open(pngs[0].path()).unwrap();
        assert!(overlay.width() > 100 && overlay.height() > 100);
    }

    // The printed table: the compact columns within 100 characters, then one row per level; summary.md has
    // every column.
    // (The last line names the output folder: a path as long as the user made it.)
    for line in stdout.lines().filter(|l| !l.starts_with("full results: ")) {
        assert!(line.chars().count() <= 100, "wider than 100 columns: {line:?}");
    }
    assert!(
        stdout.trim_end().ends_with("(plots/ and samples/ beside them)"),
        "{stdout}"
    );
    let header_line = stdout
        .lines()
        .find(|l| l.starts_with("level"))
        .unwrap_or_else(|| panic!("no table header in:\n{stdout}"));
    for column in [
        "bits/w",
        "mIoU %",
        "Δ mIoU",
        "95% CI",
        "agree mIoU %",
        "model ms",
        "memory MB",
        "status",
    ] {
        assert!(header_line.contains(column), "table lacks `{column}`:\n{stdout}");
    }
    assert!(stdout.contains("paired bootstrap over the 3 images"), "{stdout}");
    let markdown = std::fs::read_to_string(out.join("summary.md")).unwrap();
    for column in [
        "weight MB",
        "Δ mIoU 95% CI",
        "agreement mIoU 95% CI",
        "mean acc %",
        "overall acc %",
        "pixel agreement f32 %",
        "images/s pipeline",
        "inference MB",
    ] {
        assert!(markdown.contains(column), "summary.md lacks `{column}`");
    }
    // Each level's inference memory is its own: weights plus the working heap of its forward passes.
    for label in labels {
        let row = level(&json, label);
        let weights = row["weight_bytes_memory"].as_u64().unwrap();
        let working = row["working_bytes"].as_u64().unwrap();
        assert!(working > 1_000_000, "{label}: working heap {working} B");
        assert!(
            working < 400_000_000,
            "{label}: working heap {working} B is the process, not the level"
        );
        assert!(weights > 0);
    }
    for label in labels {
        let row = stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(label))
            .unwrap_or_else(|| panic!("no row for {label}:\n{stdout}"));
        assert!(row.trim_end().ends_with("ok"), "{row}");
    }
}

#[test]
fn int4_dyn_is_evaluated_and_reported_like_every_level() {
    let out = scratch("int4-dyn");
    let stdout = segq_ok(&[
        "eval",
        "--quant",
        "f32,int8-dyn,int4-dyn",
        "--limit",
        "3",
        "--out",
        out.to_str().unwrap(),
        "--set",
        "eval.samples=0",
    ]);
    let json = results(&out);
    assert_eq!(eval_support::labels(&json), ["f32", "int8-dyn-rtn", "int4-dyn-rtn"]);
    let parsed = EvalResults::read(&out.join("results.json")).unwrap();
    for level in &parsed.levels {
        assert_eq!(level.status, LevelStatus::Ok, "{}", level.label);
        assert!(stdout.contains(&level.label), "{stdout}");
    }
    let int4_dyn = &parsed.levels[2];
    let miou = int4_dyn.metrics().unwrap().mean_iou;
    assert!(miou > 0.5, "int4-dyn mIoU {miou}");
    assert!(int4_dyn.agreement_metrics().unwrap().pixel_agreement > 0.8);
    // Stored bits: 4-bit codes, one f16 scale per output channel, depthwise rows of 9 and float biases aside.
    let bits = int4_dyn.bits_per_weight;
    assert!(bits > 4.0 && bits < 5.0, "int4-dyn {bits} bits per weight");
    assert!(
        bits < parsed.levels[1].bits_per_weight / 1.5,
        "int8-dyn {}",
        parsed.levels[1].bits_per_weight
    );

    // Per-channel only: a group size is refused in one line before anything runs.
    let stderr = segq_fails(&[
        "eval",
        "--quant",
        "int4-dyn",
        "--group-size",
        "64",
        "--limit",
        "1",
        "--out",
        scratch("int4-dyn-g64").to_str().unwrap(),
    ]);
    assert!(
        stderr.contains("int4-dyn") && stderr.contains("group size 64 gives several scales per output channel"),
        "{stderr}"
    );
}

#[test]
fn a_level_that_cannot_be_built_is_refused_before_evaluating() {
    // Asked for by name and impossible (f8 has no hqq; group size 0): an argument error in seconds, with the
    // level and the reason, and no results written. (A level that fails mid-run is a failed row: see the report
    // tests.)
    let out = scratch("failed-level");
    let stderr = segq_fails(&[
        "eval",
        "--quant",
        "f32,f8,int8",
        "--method",
        "hqq",
        "--limit",
        "1",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(
        stderr.contains("f8") && stderr.contains("integer levels only"),
        "{stderr}"
    );
    let stderr = segq_fails(&[
        "eval",
        "--quant",
        "f32,int4",
        "--method",
        "rtn",
        "--group-size",
        "0",
        "--limit",
        "1",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(stderr.contains("int4") && stderr.contains("group size 0"), "{stderr}");
    assert!(!out.join("results.json").exists());
}

/// Three demo examples in Scene Parse 150's Parquet schema; row 1's JPEG is cut in half.
fn parquet_with_truncated_jpeg(dir: &Path) -> std::path::PathBuf {
    let rows: Vec<parquet_fixture::FixtureRow> = (1..=3)
        .map(|n| {
            let (mut image, label) = demo_example(n);
            if n == 2 {
                image.truncate(image.len() / 2);
            }
            parquet_fixture::FixtureRow {
                image: Some(image),
                label: Some(label),
                path: Some(format!("SYN_val_{n:08}.jpg")),
            }
        })
        .collect();
    let path = dir.join("bad.parquet");
    parquet_fixture::write_parquet_dataset(&path, &rows, 2, "image", "annotation").unwrap();
    path
}

#[test]
fn bad_examples_are_skipped_and_counted_or_named() {
    let dir = scratch("bad-rows");
    let parquet = parquet_with_truncated_jpeg(&dir);
    let out = dir.join("skip");
    segq_ok(&[
        "eval",
        "--dataset",
        parquet.to_str().unwrap(),
        "--quant",
        "f32",
        "--on-error",
        "skip",
        "--out",
        out.to_str().unwrap(),
        "--set",
        "eval.samples=0",
    ]);
    let parsed = EvalResults::read(&out.join("results.json")).unwrap();
    assert!(parsed.complete, "skipped examples are accounted for");
    assert_eq!(parsed.counts.read, 3);
    assert_eq!(parsed.counts.evaluated, 2);
    assert_eq!(parsed.counts.skipped, 1);
    assert_eq!(parsed.counts.skip_reasons.len(), 1);
    let reason = &parsed.counts.skip_reasons[0];
    assert!(
        reason.contains("bad.parquet") && reason.contains("row 1") && reason.contains("truncated"),
        "{reason}"
    );
    assert_eq!(parsed.levels[0].model_latency_ms.len(), 2);
    let md = std::fs::read_to_string(out.join("summary.md")).unwrap();
    assert!(md.contains("1 skipped"), "{md}");

    let stderr = segq_fails(&[
        "eval",
        "--dataset",
        parquet.to_str().unwrap(),
        "--quant",
        "f32",
        "--out",
        dir.join("fail").to_str().unwrap(),
    ]);
    let error = stderr
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("{stderr}"));
    assert!(
        error.contains("bad.parquet row 1") && error.contains("truncated"),
        "{error}"
    );

    // The same in the ADEChallengeData2016 layout: the error names the image file.
    let ade = dir.join("ADEChallengeData2016");
    std::fs::create_dir_all(ade.join("images/validation")).unwrap();
    std::fs::create_dir_all(ade.join("annotations/validation")).unwrap();
    for n in 1..=2 {
        let (mut image, label) = demo_example(n);
        if n == 2 {
            image.truncate(image.len() / 3);
        }
        std::fs::write(ade.join(format!("images/validation/SYN_val_{n:08}.jpg")), image).unwrap();
        std::fs::write(ade.join(format!("annotations/validation/SYN_val_{n:08}.png")), label).unwrap();
    }
    let stderr = segq_fails(&[
        "eval",
        "--dataset",
        ade.to_str().unwrap(),
        "--quant",
        "f32",
        "--out",
        dir.join("ade-fail").to_str().unwrap(),
    ]);
    assert!(
        stderr.contains("SYN_val_00000002.jpg") && stderr.contains("truncated"),
        "{stderr}"
    );
}

/// `eval.levels_at_once = 1` builds and holds one quantized level at a time (one pass over the examples each, the f32
/// model in every pass): the same rows, scores and agreement as one pass with every level, bit for bit, and every
/// level's sample overlays.
#[test]
fn levels_one_at_a_time_give_the_scores_of_one_pass() {
    let scores = |out: &Path| {
        let results = EvalResults::read(&out.join("results.json")).unwrap();
        assert!(results.complete);
        let rows: Vec<_> = results
            .levels
            .iter()
            .map(|l| {
                (
                    l.label.clone(),
                    l.method.to_string(),
                    l.bits_per_weight.to_bits(),
                    l.ratio_to_f32.to_bits(),
                    l.confusion.clone(),
                    l.agreement.clone(),
                    l.images(),
                    l.worst_images.clone(),
                )
            })
            .collect();
        (rows, results.counts.clone())
    };
    let mut outs = Vec::new();
    for at_once in ["0", "1"] {
        let out = scratch(&format!("at-once-{at_once}"));
        segq_ok(&[
            "eval",
            "--quant",
            "f32,int8,int4,int2",
            "--method",
            "rtn",
            "--limit",
            "5",
            "--batch-size",
            "2",
            "--set",
            &format!("eval.levels_at_once={at_once}"),
            "--out",
            out.to_str().unwrap(),
        ]);
        outs.push(out);
    }
    let (one_pass, grouped) = (scores(&outs[0]), scores(&outs[1]));
    assert_eq!(one_pass.0.len(), 4);
    assert_eq!(one_pass, grouped, "one level at a time changed a score");
    for level in ["f32", "int8-rtn", "int4-rtn-g64", "int2-rtn-g32"] {
        let dir = outs[1].join("samples").join(level);
        let pngs = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .count();
        assert!(pngs >= 3, "{}: {pngs} overlays", dir.display());
    }
}
