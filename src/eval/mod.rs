//! Evaluation: the plan of a run (from the configuration), the runner that drives every level over a dataset and
//! reports to observers, pixel-count metrics, the result files every run writes, merging of sharded runs, the
//! quantization error report, and each level's worst images.

pub mod error_report;
pub mod merge;
pub mod metrics;
pub mod plan;
pub mod results;
pub mod runner;
pub mod worst;

pub use plan::EvalPlan;
pub use runner::{EvalObserver, EvalOutput, Sample, evaluate};
