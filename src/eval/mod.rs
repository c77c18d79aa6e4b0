//! Evaluation: pixel-count metrics, the runner that drives every level over a dataset, the result files every
//! run writes, and merging of sharded runs.

pub mod merge;
pub mod metrics;
pub mod results;
pub mod runner;
