//! End-to-end tests of `segq sensitivity` on the embedded demo: the report, the chart (PNG and SVG), the ranked
//! table and the W&B run (offline) are written; bad flags are one line and a non-zero exit.

mod eval_support;

use eval_support::{run_ok, scratch, segq, segq_fails};
use segq::eval::sensitivity::SensitivityReport;

#[test]
fn sensitivity_on_the_demo_writes_the_report_the_chart_the_table_and_the_wandb_run() {
    let out = scratch("sensitivity");
    let mut command = segq();
    command
        .env("WANDB_MODE", "offline")
        .env_remove("WANDB_API_KEY")
        .env_remove("WANDB_DIR")
        .args([
            "--threads",
            "2",
            "sensitivity",
            "--limit",
            "2",
            "--granularity",
            "block",
        ])
        .args(["--out", out.to_str().unwrap()]);
    let stdout = run_ok(command);

    let report = SensitivityReport::read(&out.join("sensitivity.json")).unwrap();
    assert_eq!(report.images, 2);
    assert_eq!(
        report.input_sizes,
        vec![[256, 256]],
        "the demo processor resizes to 256x256"
    );
    assert_eq!(report.groups.len(), 13, "4 patch embeddings, 8 blocks, the decode head");
    let labels: Vec<&str> = report.whole_model.iter().map(|s| s.label.as_str()).collect();
    assert_eq!(labels, ["int8-rtn", "int4-rtn-g64", "int2-rtn-g32"]);
    for g in &report.groups {
        assert_eq!(g.levels.len(), 3, "{}", g.name);
        assert!(g.parameters > 0 && !g.weights.is_empty(), "{}", g.name);
        assert!(g.weights.iter().all(|w| w.ends_with(".weight")), "{:?}", g.weights);
        for s in &g.levels {
            assert!((0.0..=1.0).contains(&s.agreement_miou), "{} {}", g.name, s.label);
            assert!(s.kl_divergence >= 0.0, "{} {}", g.name, s.label);
        }
    }
    let whole_kl: Vec<f64> = report.whole_model.iter().map(|s| s.kl_divergence).collect();
    assert!(whole_kl[0] < whole_kl[2], "int2 damages more than int8: {whole_kl:?}");
    assert_eq!(report.dataset.as_ref().unwrap().limit, Some(2));
    assert!(report.reuse.encoder_parts_skipped > 0 && report.reuse.saved_bytes > 0);
    assert!(report.timing.total_s > 0.0);

    let png = std::fs::read(out.join("plots/sensitivity.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let svg = std::fs::read_to_string(out.join("plots/sensitivity.svg")).unwrap();
    assert!(svg.contains("<svg") && svg.contains("int2-rtn-g32") && svg.contains("block.0.1"));

    // The table: caption, header, one row per group worst first, the whole model last; 100 columns at most.
    assert!(stdout.contains("Sensitivity per block"), "{stdout}");
    assert!(stdout.contains("int2 Δ") && stdout.contains("int2 KL"), "{stdout}");
    let rows: Vec<&str> = stdout
        .lines()
        .filter(|l| l.trim_start().starts_with(char::is_numeric))
        .collect();
    assert_eq!(rows.len(), 13, "{stdout}");
    let worst = report.ranked()[0]
        .name
        .strip_prefix("segformer.encoder.")
        .unwrap_or(&report.ranked()[0].name)
        .to_string();
    assert!(rows[0].contains(&worst), "{} first in\n{stdout}", worst);
    assert!(stdout.contains("(every layer)"));
    for line in stdout.lines().filter(|l| !l.contains(out.to_str().unwrap())) {
        assert!(line.chars().count() <= 100, "wider than 100 columns: {line}");
    }

    let runs: Vec<_> = std::fs::read_dir(out.join("wandb"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("offline-run-"))
        .collect();
    assert_eq!(runs.len(), 1, "one W&B run: {runs:?}");
}

#[test]
fn a_bad_granularity_or_level_is_one_line_and_a_failure() {
    for (args, needle) in [
        (vec!["sensitivity", "--granularity", "row"], "--granularity 'row'"),
        (vec!["sensitivity", "--quant", "int8,int7"], "int7"),
        (vec!["sensitivity", "--quant", "f8", "--method", "hqq"], "hqq"),
    ] {
        let stderr = segq_fails(&args);
        assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
}
