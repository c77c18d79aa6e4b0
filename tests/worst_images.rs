//! The worst images of `segq eval` on the embedded demo: the list does not depend on the batch size, a level that
//! keeps every weight in float lists none, two shards merged list the images (and copy the overlays) of one
//! run, and the overlays and the bits plot are written where the docs say.

mod eval_support;

use std::path::Path;

use eval_support::{scratch, segq_ok};
use segq::eval::results::EvalResults;

const LIMIT: &str = "7";

/// `segq eval` of f32 and int2 on the first demo images, keeping `worst` images per level.
fn eval(out: &Path, worst: &str, extra: &[&str]) -> EvalResults {
    let mut args = vec![
        "eval",
        "--quant",
        "f32,int2",
        "--method",
        "rtn",
        "--limit",
        LIMIT,
        "--worst-images",
        worst,
        "--set",
        "eval.samples=0",
        "--out",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    segq_ok(&args);
    EvalResults::read(&out.join("results.json")).unwrap()
}

#[test]
fn worst_list_is_independent_of_batch_size_and_overlays_are_written() {
    let dir = scratch("worst-batches");
    let one = eval(&dir.join("b1"), "3", &["--batch-size", "1"]);
    let three = eval(&dir.join("b3"), "3", &["--batch-size", "3", "--threads", "2"]);
    let int2 = one.level("int2-rtn-g32").expect("int2 row");
    assert_eq!(int2.worst_images.len(), 3, "int2 disagrees with f32 on the demo");
    assert_eq!(int2.worst_images, three.level("int2-rtn-g32").unwrap().worst_images);
    assert!(one.levels[0].worst_images.is_empty(), "the reference lists none");
    for pair in int2.worst_images.windows(2) {
        assert!(
            pair[0].loss > pair[1].loss || (pair[0].loss == pair[1].loss && pair[0].index < pair[1].index),
            "ranked worst first: {pair:?}"
        );
    }
    for (rank, worst) in int2.worst_images.iter().enumerate() {
        assert!(worst.loss > 0.0 && worst.loss <= 1.0);
        assert_eq!(worst.loss, worst.disagreeing_pixels as f64 / worst.pixels as f64);
        let overlay = worst.overlay.as_deref().expect("an overlay");
        assert_eq!(
            overlay,
            format!("samples/worst/int2-rtn-g32/{:02}_{}.png", rank + 1, worst.id)
        );
        let png = image::open(dir.join("b1").join(overlay)).unwrap();
        assert!(
            png.width() > 4 * 100 && png.height() > 100,
            "{overlay}: {}x{}",
            png.width(),
            png.height()
        );
        // Byte-identical with batch size 3: the overlay depends only on the image and the predictions.
        assert_eq!(
            std::fs::read(dir.join("b1").join(overlay)).unwrap(),
            std::fs::read(dir.join("b3").join(overlay)).unwrap(),
            "{overlay}"
        );
    }
    let pngs = std::fs::read_dir(dir.join("b1/samples/worst/int2-rtn-g32"))
        .unwrap()
        .count();
    assert_eq!(pngs, 3);
    let summary = std::fs::read_to_string(dir.join("b1/summary.md")).unwrap();
    assert!(summary.contains("## Worst images"), "{summary}");
    assert!(
        summary.contains(int2.worst_images[0].overlay.as_deref().unwrap()),
        "summary.md links the overlays: {summary}"
    );
    for plot in ["plots/miou_vs_bits.png", "plots/miou_vs_bits.svg"] {
        assert!(dir.join("b1").join(plot).is_file(), "{plot}");
    }
    let svg = std::fs::read_to_string(dir.join("b1/plots/miou_vs_bits.svg")).unwrap();
    assert!(
        svg.contains("Pareto front") && svg.contains("Agreement with the reference"),
        "{svg:.300}"
    );

    // A rerun into the same folder with a shorter list leaves no stale overlay behind; 0 turns the list off.
    let again = eval(&dir.join("b1"), "1", &[]);
    assert_eq!(again.level("int2-rtn-g32").unwrap().worst_images.len(), 1);
    assert_eq!(
        std::fs::read_dir(dir.join("b1/samples/worst/int2-rtn-g32"))
            .unwrap()
            .count(),
        1
    );
    let off = eval(&dir.join("off"), "0", &[]);
    assert!(off.levels.iter().all(|l| l.worst_images.is_empty()));
    assert!(!dir.join("off/samples/worst").exists());
}

/// A level whose every weight is kept in float predicts exactly what f32 does: its list is empty by rule (images
/// that agree everywhere are never listed).
#[test]
fn a_level_identical_to_the_reference_lists_no_image() {
    let dir = scratch("worst-identical");
    segq_ok(&[
        "eval",
        "--quant",
        "f32,int8",
        "--method",
        "rtn",
        "--skip",
        "*",
        "--limit",
        LIMIT,
        "--set",
        "eval.samples=0",
        "--out",
        dir.to_str().unwrap(),
    ]);
    let results = EvalResults::read(&dir.join("results.json")).unwrap();
    assert_eq!(results.levels.len(), 2);
    let int8 = &results.levels[1];
    assert_eq!(int8.level, segq::quant::Level::Int8);
    assert_eq!(
        int8.agreement_metrics().unwrap().pixel_agreement,
        1.0,
        "identical predictions"
    );
    assert!(int8.worst_images.is_empty(), "{:?}", int8.worst_images);
    assert!(!dir.join("samples/worst").join(&int8.label).exists());
}

#[test]
fn merged_shards_list_the_worst_images_of_one_run() {
    let dir = scratch("worst-merge");
    let whole = eval(&dir.join("whole"), "4", &[]);
    for index in 0..2 {
        eval(
            &dir.join(format!("shard-{index}")),
            "4",
            &["--shard", &format!("{index}/2")],
        );
    }
    let merged_dir = dir.join("merged");
    segq_ok(&[
        "merge",
        dir.join("shard-1").to_str().unwrap(),
        dir.join("shard-0").join("results.json").to_str().unwrap(),
        "--out",
        merged_dir.to_str().unwrap(),
    ]);
    let merged = EvalResults::read(&merged_dir.join("results.json")).unwrap();
    let (m, w) = (
        &merged.level("int2-rtn-g32").unwrap().worst_images,
        &whole.level("int2-rtn-g32").unwrap().worst_images,
    );
    assert_eq!(m.len(), 4);
    assert_eq!(m, w, "merged list equals the unsharded run's");
    // The overlays were copied from the shards under their merged rank: the same files as the unsharded run's.
    // (Some image ranks differently in its shard than in the whole run, so a copy must not depend on the rank.)
    let shard_paths: Vec<String> = (0..2)
        .flat_map(|i| {
            let part = EvalResults::read(&dir.join(format!("shard-{i}/results.json"))).unwrap();
            let level = part.level("int2-rtn-g32").unwrap().clone();
            level.worst_images.into_iter().filter_map(|w| w.overlay)
        })
        .collect();
    assert!(
        m.iter().any(|w| !shard_paths.contains(w.overlay.as_ref().unwrap())),
        "every merged rank equals its shard rank: the test would not notice a rank-dependent copy"
    );
    for worst in m {
        let overlay = worst.overlay.as_deref().unwrap();
        assert_eq!(
            std::fs::read(merged_dir.join(overlay)).unwrap(),
            std::fs::read(dir.join("whole").join(overlay)).unwrap(),
            "{overlay}"
        );
    }
    // A shard folder without its overlays: the merge lists the images without overlays and says so.
    std::fs::remove_dir_all(dir.join("shard-0/samples")).unwrap();
    std::fs::remove_dir_all(dir.join("shard-1/samples")).unwrap();
    let bare = dir.join("merged-bare");
    segq_ok(&[
        "merge",
        dir.join("shard-0").to_str().unwrap(),
        dir.join("shard-1").to_str().unwrap(),
        "--out",
        bare.to_str().unwrap(),
    ]);
    let bare_results = EvalResults::read(&bare.join("results.json")).unwrap();
    let listed = &bare_results.level("int2-rtn-g32").unwrap().worst_images;
    assert_eq!(listed.len(), 4);
    assert!(listed.iter().all(|w| w.overlay.is_none()), "{listed:?}");
}

#[test]
fn too_many_worst_images_is_an_argument_error() {
    let dir = scratch("worst-too-many");
    let stderr = eval_support::segq_fails(&["eval", "--worst-images", "33", "--out", dir.to_str().unwrap()]);
    assert!(
        stderr.contains("eval.worst_images") && stderr.contains("32"),
        "{stderr}"
    );
    assert!(!dir.join("results.json").exists());
}
