//! Hostile cases for a whole evaluation run: kills and signals (nothing finished is lost; `--resume` reproduces an
//! uninterrupted run exactly), settings that used to be noticed only after the evaluation (output folder, levels
//! no method builds, empty selections, absurd batch sizes), and datasets whose rows cannot all be accounted for.

mod eval_support;
mod hostile_support;
#[path = "support/parquet.rs"]
mod parquet_fixture;

use std::path::Path;
use std::time::Duration;

use hostile_support::{Outcome, scratch, segq};
use segq::eval::results::EvalResults;

/// A short, fast evaluation of the embedded demo: two levels, one image per batch, results saved after every batch.
fn eval_args(out: &Path) -> Vec<String> {
    [
        "eval",
        "--quant",
        "f32,int8",
        "--method",
        "rtn",
        "--limit",
        "6",
        "--batch-size",
        "1",
        "--set",
        "eval.samples=0",
        "--set",
        "eval.checkpoint_seconds=0",
        "--out",
        out.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn run(case: &str, args: &[String]) -> Outcome {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    segq(case, &args).run()
}

/// Everything an uninterrupted run's results.json says that does not depend on the clock.
fn assert_same_scores(a: &EvalResults, b: &EvalResults) {
    assert!(a.complete && b.complete);
    assert_eq!(
        (a.counts.read, a.counts.evaluated, a.counts.skipped),
        (b.counts.read, b.counts.evaluated, b.counts.skipped)
    );
    assert_eq!(a.dataset, b.dataset);
    assert_eq!(a.levels.len(), b.levels.len());
    for (x, y) in a.levels.iter().zip(&b.levels) {
        assert_eq!(x.label, y.label);
        assert_eq!(x.status, y.status);
        assert_eq!(x.confusion, y.confusion, "{}: confusion matrices differ", x.label);
        assert_eq!(x.agreement, y.agreement, "{}: agreement matrices differ", x.label);
        // The resumed run keeps the interrupted part's per-image counts: same images, same intervals.
        assert_eq!(x.per_image, y.per_image, "{}: per-image counts differ", x.label);
        assert_eq!(x.per_image.len() as u64, a.counts.evaluated, "{}", x.label);
        let intervals = |l: &segq::eval::results::LevelResult| {
            let s = l.summary.as_ref().expect("summaries are filled on read");
            (s.delta_miou_ci, s.agreement_miou_ci)
        };
        assert_eq!(intervals(x), intervals(y), "{}: bootstrap intervals differ", x.label);
        // The worst images rank the same (a resumed run has no overlays for those the interrupted part listed).
        let ranked = |l: &segq::eval::results::LevelResult| -> Vec<(usize, String, u64, u64)> {
            l.worst_images
                .iter()
                .map(|w| (w.index, w.id.clone(), w.pixels, w.disagreeing_pixels))
                .collect()
        };
        assert_eq!(ranked(x), ranked(y), "{}: worst images differ", x.label);
        assert_eq!(x.model_latency_ms.len(), y.model_latency_ms.len());
        let (mx, my) = (x.metrics().unwrap(), y.metrics().unwrap());
        assert_eq!(mx.mean_iou.to_bits(), my.mean_iou.to_bits(), "{}", x.label);
        assert_eq!(
            mx.overall_accuracy.to_bits(),
            my.overall_accuracy.to_bits(),
            "{}",
            x.label
        );
    }
}

fn uninterrupted(name: &str) -> EvalResults {
    let out = scratch(name).join("out");
    run(name, &eval_args(&out)).succeeded();
    EvalResults::read(&out.join("results.json")).unwrap()
}

/// Starts the run, waits for its first partial results, sends `signal`, and returns what it left.
fn interrupted(name: &str, signal: i32) -> (std::path::PathBuf, Outcome, EvalResults) {
    let out = scratch(name).join("out");
    let args = eval_args(&out);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let running = segq(name, &args).spawn();
    running.wait_for_file(&out.join("results.json"));
    running.signal(signal);
    let outcome = running.wait();
    let partial = EvalResults::read(&out.join("results.json")).unwrap();
    (out, outcome, partial)
}

#[test]
fn sigkill_loses_at_most_one_checkpoint_and_resume_equals_an_uninterrupted_run() {
    let (out, outcome, partial) = interrupted("kill", libc::SIGKILL);
    assert_eq!(outcome.signal, Some(libc::SIGKILL));
    assert!(!partial.complete, "the run finished before it was killed: {outcome:?}");
    let done = partial.counts.evaluated;
    assert!((1..6).contains(&done), "partial results count {done} examples");
    assert_eq!(partial.levels[0].model_latency_ms.len() as u64, done);

    let mut args = eval_args(&out);
    args.extend(["--resume".to_string(), out.to_str().unwrap().to_string()]);
    run("kill-resume", &args).succeeded().warns(&["resuming"]);
    let resumed = EvalResults::read(&out.join("results.json")).unwrap();
    assert_same_scores(&resumed, &uninterrupted("kill-reference"));
}

#[test]
fn sigterm_stops_like_ctrl_c_and_resume_needs_only_the_folder() {
    let (out, outcome, partial) = interrupted("term", libc::SIGTERM);
    assert!(!partial.complete);
    outcome.refused(&["incomplete", "--resume"]);
    let leftovers: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".partial") || n.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");

    // --resume DIR alone: the run's own configuration comes from its results.
    run(
        "term-resume",
        &["eval".into(), "--resume".into(), out.to_str().unwrap().into()],
    )
    .succeeded();
    let resumed = EvalResults::read(&out.join("results.json")).unwrap();
    assert_same_scores(&resumed, &uninterrupted("term-reference"));
}

#[test]
fn resume_refuses_what_is_not_the_same_unfinished_run() {
    let (out, _, _) = interrupted("resume-checks", libc::SIGKILL);
    let dir = out.to_str().unwrap().to_string();
    // A flag that changes what is computed.
    let mut args = eval_args(&out);
    args[2] = "f32,int4".into();
    args.extend(["--resume".into(), dir.clone()]);
    run("resume-other-levels", &args).refused(&["quant.levels", "--resume"]);
    // A folder without results.
    let empty = scratch("resume-empty");
    run(
        "resume-nothing",
        &["eval".into(), "--resume".into(), empty.to_str().unwrap().into()],
    )
    .refused(&["results.json"]);
    // A finished run.
    run("resume-finish", &["eval".into(), "--resume".into(), dir.clone()]).succeeded();
    run("resume-complete", &["eval".into(), "--resume".into(), dir]).refused(&["--resume", "complete"]);
}

#[test]
fn an_output_folder_that_cannot_be_written_fails_before_the_model_runs() {
    let dir = scratch("out-file");
    let file = dir.join("results-here");
    std::fs::write(&file, "not a folder").unwrap();
    let mut args = eval_args(&file);
    args[6] = "12".into();
    let outcome = run("out-is-a-file", &args);
    outcome.refused(&["results-here"]);
    assert!(outcome.elapsed < Duration::from_secs(20), "{outcome:?}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "not a folder");

    let inside_file = file.join("sub");
    run("out-inside-a-file", &eval_args(&inside_file)).refused(&["results-here"]);
    run("out-in-proc", &eval_args(Path::new("/proc/segq-out"))).refused(&["/proc/segq-out"]);
}

#[test]
fn impossible_levels_and_sizes_are_argument_errors() {
    let out = scratch("levels").join("out");
    let base = eval_args(&out);
    let with = |pairs: &[(usize, &str)]| {
        let mut args = base.clone();
        for (i, v) in pairs {
            args[*i] = v.to_string();
        }
        args
    };
    // f8 has no hqq: asked for by name, it is an error, not a quiet failed row.
    run("f8-hqq", &with(&[(2, "f32,f8"), (4, "hqq")])).refused(&["quant.levels", "f8", "integer levels only"]);
    run(
        "group-size-0",
        &[with(&[(2, "f32,int4")]), vec!["--group-size".into(), "0".into()]].concat(),
    )
    .refused(&["int4", "group size 0"]);
    run("batch-huge", &with(&[(8, "99999999999999")])).refused(&["eval.batch_size"]);
    run("batch-zero", &with(&[(8, "0")])).refused(&["eval.batch_size"]);
    // Within the cap but not within this machine's memory: refused from the model's estimate, before any batch.
    run("batch-over-memory", &with(&[(8, "4000")])).refused(&["--batch-size 4000", "needs about"]);
    assert!(!out.join("results.json").exists());
}

#[test]
fn an_empty_selection_is_an_error_unless_allowed() {
    let out = scratch("empty").join("out");
    let mut args = eval_args(&out);
    args.extend(["--offset".into(), "100".into()]);
    run("offset-past-end", &args).refused(&["no examples selected", "--allow-empty"]);
    let mut limit0 = eval_args(&out);
    limit0[6] = "0".into();
    run("limit-0", &limit0).refused(&["no examples selected"]);
    args.push("--allow-empty".into());
    run("allowed-empty", &args).succeeded();
    let results = EvalResults::read(&out.join("results.json")).unwrap();
    assert_eq!(results.counts.evaluated, 0);
    assert!(results.complete);
}

#[test]
fn a_parquet_file_that_cannot_be_read_makes_the_run_incomplete() {
    let dir = scratch("unreadable-parquet");
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let rows: Vec<parquet_fixture::FixtureRow> = (1..=3)
        .map(|n| {
            let (image, label) = eval_support::demo_example(n);
            parquet_fixture::FixtureRow {
                image: Some(image),
                label: Some(label),
                path: Some(format!("SYN_val_{n:08}.jpg")),
            }
        })
        .collect();
    parquet_fixture::write_parquet_dataset(&data.join("a.parquet"), &rows, 2, "image", "annotation").unwrap();
    std::fs::write(data.join("b.parquet"), b"PAR1 this footer is garbage PAR1").unwrap();
    let out = dir.join("out");
    let args = [
        "eval",
        "--dataset",
        data.to_str().unwrap(),
        "--quant",
        "f32",
        "--on-error",
        "skip",
        "--set",
        "eval.samples=0",
        "--out",
        out.to_str().unwrap(),
    ];
    segq("unreadable-parquet", &args)
        .run()
        .refused(&["incomplete", "Parquet file"]);
    let results = EvalResults::read(&out.join("results.json")).unwrap();
    assert!(!results.complete);
    assert_eq!(results.counts.unreadable_files, 1);
    assert_eq!(results.counts.evaluated, 3);
    assert!(
        results.counts.skip_reasons.iter().any(|r| r.contains("b.parquet")),
        "{:?}",
        results.counts
    );
}
