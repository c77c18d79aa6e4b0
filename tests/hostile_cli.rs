//! Hostile-input suite of the command line: outputs that would destroy inputs (quantize, merge, predict), same-named
//! images, bad images among good ones, outputs that are files, absurd thread and worker counts, bad flags and keys,
//! and the console's error line (one line, no colour codes, each cause once). Every refused case proves with
//! `snapshot` that nothing on disk changed.

mod hostile_support;

use std::path::{Path, PathBuf};

use hostile_support::*;

const TINY: &str = "models/tiny_c";

fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A writable copy of the tiny model in `dir/model`.
fn model_copy(dir: &Path) -> PathBuf {
    let model = dir.join("model");
    std::fs::create_dir_all(&model).unwrap();
    for entry in std::fs::read_dir(fixtures().join(TINY)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), model.join(entry.file_name())).unwrap();
    }
    model
}

fn image(name: &str) -> PathBuf {
    fixtures().join("images").join(name)
}

fn error_line(outcome: &Outcome) -> String {
    outcome
        .stderr
        .lines()
        .find(|l| l.starts_with("error"))
        .unwrap_or_default()
        .to_string()
}

/// No part of the line (between ": ") is said twice, and `once` occurs exactly once.
fn said_once(outcome: &Outcome, once: &[&str]) {
    let line = error_line(outcome);
    let parts: Vec<&str> = line.split(": ").map(str::trim).filter(|p| p.len() > 2).collect();
    for (i, part) in parts.iter().enumerate() {
        assert!(!parts[i + 1..].contains(part), "{part:?} said twice in {line:?}");
    }
    for text in once {
        assert_eq!(line.matches(text).count(), 1, "{text:?} should occur once in {line:?}");
    }
    assert!(!line.contains("os error"), "{line}");
}

// ---- quantize: --out never replaces the input model ----

#[test]
fn quantize_out_is_the_model_folder() {
    let dir = scratch("q-same");
    let model = model_copy(&dir);
    let before = snapshot(&dir);
    let outcome = segq(
        "q-same",
        &["quantize", "--model", s(&model), "--quant", "int8", "--out", s(&model)],
    )
    .run();
    outcome.refused(&["--out", s(&model), "input"]);
    said_once(&outcome, &[]);
    assert_eq!(snapshot(&dir), before);
}

#[test]
fn quantize_out_inside_the_model_folder() {
    let dir = scratch("q-inside");
    let model = model_copy(&dir);
    let before = snapshot(&dir);
    let out = model.join("int8");
    segq(
        "q-inside",
        &["quantize", "--model", s(&model), "--quant", "int8", "--out", s(&out)],
    )
    .run()
    .refused(&["--out", "is inside the input"]);
    assert_eq!(snapshot(&dir), before);
    assert!(!out.exists());
}

#[test]
fn quantize_out_through_a_symlink_to_the_model_folder() {
    let dir = scratch("q-link");
    let model = model_copy(&dir);
    let link = dir.join("link");
    std::os::unix::fs::symlink(&model, &link).unwrap();
    let before = snapshot(&model);
    segq(
        "q-link",
        &["quantize", "--model", s(&model), "--quant", "int4", "--out", s(&link)],
    )
    .run()
    .refused(&["--out", s(&link)]);
    // Also spelled with `..` through a folder that does not exist yet.
    let dotted = dir.join("new/../model");
    segq(
        "q-link-dots",
        &["quantize", "--model", s(&model), "--quant", "int4", "--out", s(&dotted)],
    )
    .run()
    .refused(&["--out"]);
    assert_eq!(snapshot(&model), before);
}

#[test]
fn quantize_model_given_as_its_weights_file() {
    let dir = scratch("q-file");
    let model = model_copy(&dir);
    let weights = model.join("model.safetensors");
    let before = snapshot(&dir);
    segq(
        "q-file",
        &[
            "quantize",
            "--model",
            s(&weights),
            "--quant",
            "int8",
            "--out",
            s(&model),
        ],
    )
    .run()
    .refused(&["--out", s(&model)]);
    assert_eq!(snapshot(&dir), before);
}

#[test]
fn quantize_error_report_onto_the_weights() {
    let dir = scratch("q-report");
    let model = model_copy(&dir);
    let weights = model.join("model.safetensors");
    let before = snapshot(&dir);
    segq(
        "q-report",
        &[
            "quantize",
            "--model",
            s(&model),
            "--quant",
            "int8",
            "--error-report",
            s(&weights),
        ],
    )
    .run()
    .refused(&["--error-report", "model.safetensors"]);
    assert_eq!(snapshot(&dir), before);
}

#[test]
fn quantize_out_is_a_file() {
    let dir = scratch("q-outfile");
    let model = model_copy(&dir);
    let file = dir.join("taken.txt");
    std::fs::write(&file, "keep me").unwrap();
    let before = snapshot(&dir);
    segq(
        "q-outfile",
        &["quantize", "--model", s(&model), "--quant", "int8", "--out", s(&file)],
    )
    .run()
    .refused(&["--out", "taken.txt", "not a folder"]);
    assert_eq!(snapshot(&dir), before);
}

#[test]
fn quantize_unknown_level_names_it_once() {
    let dir = scratch("q-level");
    let model = model_copy(&dir);
    let before = snapshot(&dir);
    let outcome = segq(
        "q-level",
        &["quantize", "--model", s(&model), "--quant", "int7", "--out", "q"],
    )
    .run();
    outcome.refused(&["--quant", "int7"]);
    said_once(&outcome, &["int7", "--quant"]);
    assert_eq!(snapshot(&dir), before);
}

#[test]
fn quantize_again_into_its_own_output_replaces_it_and_says_so() {
    let dir = scratch("q-again");
    let model = model_copy(&dir);
    let out = dir.join("int8");
    let args = ["quantize", "--model", s(&model), "--quant", "int8", "--out", s(&out)];
    segq("q-again-1", &args).run().succeeded();
    let source = snapshot(&model);
    segq("q-again-2", &args)
        .run()
        .succeeded()
        .warns(&["replacing the checkpoint"]);
    assert_eq!(snapshot(&model), source);
    segq("q-again-load", &["inspect", "--model", s(&out)]).run().succeeded();
}

// ---- merge: --out never replaces a shard ----

/// Three shard folders with a results.json each (never parsed: the output check comes first).
fn shards(dir: &Path) -> Vec<PathBuf> {
    (0..3)
        .map(|i| {
            let shard = dir.join(format!("s{i}"));
            std::fs::create_dir_all(&shard).unwrap();
            std::fs::write(shard.join("results.json"), format!("{{\"shard\": {i}}}")).unwrap();
            shard
        })
        .collect()
}

#[test]
fn merge_out_is_an_input_folder() {
    let dir = scratch("m-folder");
    let parts = shards(&dir);
    let before = snapshot(&dir);
    let outcome = segq(
        "m-folder",
        &["merge", s(&parts[0]), s(&parts[1]), s(&parts[2]), "--out", s(&parts[0])],
    )
    .run();
    outcome.refused(&["--out", s(&parts[0])]);
    said_once(&outcome, &[]);
    assert_eq!(snapshot(&dir), before);
}

#[test]
fn merge_out_is_the_folder_of_an_input_file() {
    let dir = scratch("m-file");
    let parts = shards(&dir);
    let files: Vec<PathBuf> = parts.iter().map(|p| p.join("results.json")).collect();
    let before = snapshot(&dir);
    segq(
        "m-file",
        &["merge", s(&files[0]), s(&files[1]), s(&files[2]), "--out", s(&parts[1])],
    )
    .run()
    .refused(&["--out", "s1"]);
    // Relative spelling, run from the shards' parent folder.
    segq(
        "m-file-rel",
        &["merge", "s0/results.json", "s1/results.json", "--out", "./s0/"],
    )
    .current_dir(&dir)
    .run()
    .refused(&["--out"]);
    assert_eq!(snapshot(&dir), before);
}

#[test]
fn merge_out_inside_an_input_folder() {
    let dir = scratch("m-inside");
    let parts = shards(&dir);
    let before = snapshot(&dir);
    segq(
        "m-inside",
        &[
            "merge",
            s(&parts[0]),
            s(&parts[1]),
            "--out",
            s(&parts[1].join("merged")),
        ],
    )
    .run()
    .refused(&["--out", "is inside the input"]);
    assert_eq!(snapshot(&dir), before);
}

#[test]
fn merge_missing_input_says_so_once() {
    let dir = scratch("m-missing");
    let missing = dir.join("nope");
    let outcome = segq("m-missing", &["merge", s(&missing), "--out", s(&dir.join("m"))]).run();
    outcome.refused(&["nope", "no such file or folder"]);
    said_once(&outcome, &["no such file or folder"]);
    assert!(!dir.join("m").exists());
}

// ---- predict: names, bad images, outputs ----

/// `dir/name` as a copy of the fixture image `fixture`.
fn place(dir: &Path, name: &str, fixture: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::copy(image(fixture), &path).unwrap();
    path
}

/// `predict --model tiny --out OUT EXTRA... IMAGES...`.
fn predict_args(out: &Path, images: &[PathBuf], extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = ["predict", "--model", s(&fixtures().join(TINY)), "--out", s(out)]
        .map(String::from)
        .into();
    args.extend(extra.iter().map(|e| e.to_string()));
    args.extend(images.iter().map(|p| s(p).to_string()));
    args
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

#[test]
fn predict_same_named_images_get_separate_outputs() {
    let dir = scratch("p-same");
    let images = [
        place(&dir, "a/x.png", "odd_37x53.png"),
        place(&dir, "b/x.png", "wide_101x45.png"),
        place(&dir, "c/X.jpg", "photo_61x47.jpg"),
    ];
    let out = dir.join("out");
    segq("p-same", &strs(&predict_args(&out, &images, &[])))
        .run()
        .succeeded();
    let sizes: Vec<(u32, u32)> = ["x", "x-2", "X-3"]
        .iter()
        .map(|n| image::image_dimensions(out.join(format!("{n}.mask.png"))).unwrap())
        .collect();
    assert_eq!(sizes, [(37, 53), (101, 45), (61, 47)]);
    assert_ne!(
        std::fs::read(out.join("x.overlay.png")).unwrap(),
        std::fs::read(out.join("x-2.overlay.png")).unwrap()
    );
}

#[test]
fn predict_generated_names_avoid_other_images_names() {
    let dir = scratch("p-names");
    let images = [
        place(&dir, "a/x.png", "odd_37x53.png"),
        place(&dir, "b/x.png", "wide_101x45.png"),
        place(&dir, "x-2.png", "small_23x19.png"),
    ];
    let out = dir.join("out");
    segq("p-names", &strs(&predict_args(&out, &images, &[])))
        .run()
        .succeeded();
    let size = |n: &str| image::image_dimensions(out.join(format!("{n}.mask.png"))).unwrap();
    assert_eq!(size("x"), (37, 53));
    assert_eq!(size("x-3"), (101, 45));
    assert_eq!(size("x-2"), (23, 19));
}

/// good.png, bad.png (not an image), good2.png.
fn good_bad_good(dir: &Path) -> [PathBuf; 3] {
    let good = place(dir, "good.png", "odd_37x53.png");
    let bad = dir.join("bad.png");
    std::fs::write(&bad, b"not a png at all").unwrap();
    let good2 = place(dir, "good2.png", "small_23x19.png");
    [good, bad, good2]
}

#[test]
fn predict_skips_a_bad_image_and_reports_it() {
    let dir = scratch("p-skip");
    let images = good_bad_good(&dir);
    let out = dir.join("out");
    segq("p-skip", &strs(&predict_args(&out, &images, &["--on-error", "skip"])))
        .run()
        .succeeded()
        .warns(&["2 of 3 images predicted, 1 skipped", "bad.png"]);
    assert!(out.join("good.mask.png").exists() && out.join("good2.mask.png").exists());
    assert!(!out.join("bad.mask.png").exists());
}

#[test]
fn predict_fails_at_a_bad_image_by_default_and_goes_no_further() {
    let dir = scratch("p-fail");
    let images = good_bad_good(&dir);
    let out = dir.join("out");
    for (case, extra) in [("p-fail", &[][..]), ("p-fail-flag", &["--on-error", "fail"][..])] {
        let _ = std::fs::remove_dir_all(&out);
        segq(case, &strs(&predict_args(&out, &images, extra)))
            .run()
            .refused(&["bad.png"])
            .warns(&["1 predicted before it, 1 not attempted"]);
        assert!(out.join("good.mask.png").exists());
        assert!(!out.join("good2.mask.png").exists() && !out.join("bad.mask.png").exists());
    }
}

#[test]
fn predict_with_every_image_bad_fails_even_with_skip() {
    let dir = scratch("p-allbad");
    let bad = dir.join("bad.png");
    std::fs::write(&bad, b"nope").unwrap();
    let missing = dir.join("missing.jpg");
    let images = [bad, missing];
    let outcome = segq(
        "p-allbad",
        &strs(&predict_args(&dir.join("out"), &images, &["--on-error", "skip"])),
    )
    .run();
    outcome.refused(&["no image could be predicted", "bad.png", "missing.jpg"]);
    said_once(&outcome, &["missing.jpg"]);
}

#[test]
fn predict_into_an_out_that_is_a_file() {
    let dir = scratch("p-outfile");
    let images = [place(&dir, "x.png", "odd_37x53.png")];
    let file = dir.join("out.txt");
    std::fs::write(&file, "keep me").unwrap();
    let before = snapshot(&dir);
    segq("p-outfile", &strs(&predict_args(&file, &images, &[])))
        .run()
        .refused(&["--out", "out.txt", "not a folder"]);
    assert_eq!(snapshot(&dir), before);
}

#[test]
fn predict_never_writes_over_an_input_image() {
    let dir = scratch("p-input");
    // a.png's mask would be out/a.mask.png, which is also an input.
    let images = [
        place(&dir, "a.png", "odd_37x53.png"),
        place(&dir, "out/a.mask.png", "small_23x19.png"),
    ];
    let before = snapshot(&dir);
    segq("p-input", &strs(&predict_args(&dir.join("out"), &images, &[])))
        .run()
        .refused(&["a.mask.png", "input"]);
    assert_eq!(snapshot(&dir), before);
}

#[test]
fn predict_leaves_only_finished_files() {
    let dir = scratch("p-atomic");
    let images = [place(&dir, "x.png", "wide_101x45.png")];
    let out = dir.join("out");
    segq("p-atomic", &strs(&predict_args(&out, &images, &["--save-logits"])))
        .run()
        .succeeded();
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["x.logits.npy", "x.mask.png", "x.overlay.png"]);
}

#[test]
fn predict_missing_image_names_it_once() {
    let dir = scratch("p-missing");
    let images = [dir.join("nope.jpg")];
    let outcome = segq("p-missing", &strs(&predict_args(&dir.join("out"), &images, &[]))).run();
    outcome.refused(&["nope.jpg", "no such file or folder"]);
    said_once(&outcome, &["nope.jpg", "no such file or folder"]);
}

// ---- threads and workers ----

#[test]
fn a_hundred_thousand_threads_are_clamped() {
    let tiny = fixtures().join(TINY);
    segq("t-threads", &["--threads", "100000", "inspect", "--model", s(&tiny)])
        .run()
        .succeeded()
        .warns(&["--threads = 100000", "using 256"]);
    segq(
        "t-threads-set",
        &["inspect", "--model", s(&tiny), "--set", "eval.threads=100000"],
    )
    .run()
    .succeeded()
    .warns(&["eval.threads = 100000"]);
}

#[test]
fn a_hundred_thousand_workers_are_clamped() {
    let dir = scratch("t-workers");
    let tiny = fixtures().join(TINY);
    let out = dir.join("out");
    let args = [
        "eval",
        "--model",
        s(&tiny),
        "--limit",
        "2",
        "--quant",
        "f32",
        "--method",
        "rtn",
        "--wandb",
        "disabled",
        "--out",
        s(&out),
        "--set",
        "dataset.workers=100000",
    ];
    segq("t-workers", &args)
        .run()
        .succeeded()
        .warns(&["dataset.workers = 100000"]);
    assert!(out.join("results.json").exists());
}

#[test]
fn zero_threads_means_one_per_core() {
    segq(
        "t-zero",
        &["--threads", "0", "inspect", "--model", s(&fixtures().join(TINY))],
    )
    .run()
    .succeeded();
}

#[test]
fn threads_that_are_not_a_number() {
    let outcome = segq("t-abc", &["--threads", "abc", "inspect"]).run();
    outcome.refused(&["--threads", "abc"]);
    said_once(&outcome, &["--threads"]);
}

// ---- flags, keys, models and the error line ----

#[test]
fn unknown_set_key() {
    let outcome = segq("k-set", &["inspect", "--set", "eval.nosuch=3"]).run();
    outcome.refused(&["eval.nosuch"]);
    said_once(&outcome, &[]);
}

#[test]
fn missing_model_folder() {
    let outcome = segq("k-model", &["inspect", "--model", "./no/such/model"]).run();
    outcome.refused(&["no/such/model", "no such file or folder"]);
    said_once(&outcome, &["no/such/model"]);
}

#[test]
fn bad_shard_value_names_the_flag_once() {
    let outcome = segq("k-shard", &["eval", "--shard", "5/2"]).run();
    outcome.refused(&["--shard", "5/2"]);
    said_once(&outcome, &["--shard"]);
}

#[test]
fn value_outside_a_fixed_list() {
    let outcome = segq("k-protocol", &["predict", "--protocol", "foo", "x.png"]).run();
    outcome.refused(&["--protocol", "foo", "transformers"]);
    said_once(&outcome, &["foo"]);
}

#[test]
fn no_colour_codes_when_stderr_is_not_a_terminal() {
    // Without NO_COLOR: stderr is a pipe here, so info lines and the error carry no escape codes either.
    let dir = scratch("c-ansi");
    let images = [dir.join("missing.png")];
    for (case, extra) in [("c-ansi", &[][..]), ("c-ansi-v", &["-v"][..])] {
        let outcome = segq(case, &strs(&predict_args(&dir.join("out"), &images, extra)))
            .env_remove("NO_COLOR")
            .run();
        outcome.refused(&["missing.png"]);
        assert!(outcome.stderr.contains("INFO"), "{}", outcome.stderr);
        assert!(!outcome.stderr.contains('\u{1b}'), "{:?}", outcome.stderr);
    }
}

#[test]
fn every_refusal_is_one_clean_line() {
    let dir = scratch("c-table");
    std::fs::write(dir.join("bad.toml"), "not toml [").unwrap();
    let cases: [&[&str]; 7] = [
        &["inspect", "--config", "bad.toml"],
        &["inspect", "--config", "missing.toml"],
        &["inspect", "--set", "nosuch.x=3"],
        &["inspect", "--set", "eval.batch_size=0"],
        &["eval", "--on-error", "maybe"],
        &["eval", "--method", "foo"],
        &["quantize", "--quant", "int8"],
    ];
    for (i, args) in cases.iter().enumerate() {
        let outcome = segq(&format!("c-table-{i}"), args).current_dir(&dir).run();
        outcome.refused(&[]);
        said_once(&outcome, &[]);
    }
}
