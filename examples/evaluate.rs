//! Evaluate two quantization levels of the embedded demo model on the embedded demo dataset, from Rust:
//! `cargo run --release --example evaluate`. The same library calls `segq eval` makes, without the CLI.

use segq::config::Config;
use segq::eval::{EvalPlan, evaluate};
use segq::quant::{Level, Method};

fn main() -> segq::Result<()> {
    // Everything segq.toml can say, with its defaults: the embedded demo model and dataset.
    let mut config = Config::default();
    config.quant.levels = vec![Level::F32, Level::Int8, Level::Int4];
    config.quant.methods = vec![Method::Hqq];
    config.eval.limit = Some(6);
    config.eval.samples = 0;

    let plan = EvalPlan::from_config(&config, rayon::current_num_threads())?;
    // `()` observes nothing; the CLI passes a progress bar, Ctrl-C handling, report writers and W&B here.
    let output = evaluate(&plan, &mut ())?;

    let results = &output.results;
    println!("{} images, {} levels", results.counts.evaluated, results.levels.len());
    for level in &results.levels {
        // The f32 row is the reference the others agree with.
        let agreement = level
            .agreement_metrics()
            .map_or("-".to_string(), |a| format!("{:.4}", a.pixel_agreement));
        println!(
            "{:<14} {:>5.2} bits/weight  mIoU {:.4} ({:+.4} vs f32)  pixel agreement with f32 {agreement}",
            level.label,
            level.bits_per_weight,
            level.miou(),
            results.delta_miou(level),
        );
    }
    Ok(())
}
