//! Evaluation: the plan of a run (from the configuration), the runner that drives every level over a dataset and
//! reports to observers, pixel-count metrics (per dataset and per image), bootstrap confidence intervals, the
//! result files every run writes, merging of sharded runs, the quantization error report, and each level's worst
//! images.

pub mod auto;
pub mod bootstrap;
pub mod divergence;
pub mod error_report;
pub mod merge;
pub mod metrics;
pub mod per_image;
pub mod plan;
pub mod results;
pub mod runner;
pub mod sensitivity;
pub mod worst;

pub use plan::EvalPlan;
pub use runner::{EvalObserver, EvalOutput, OpenedDataset, Sample, evaluate, open_dataset};
