//! Evaluation: pixel-count metrics, the result files every run writes, and merging of sharded runs.

pub mod merge;
pub mod metrics;
pub mod results;
