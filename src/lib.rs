//! segq: quantize SegFormer semantic-segmentation models and measure what each quantization level costs
//! (mIoU, memory, speed). Data flows one way:
//! `data` (sources, shards, batches) -> `preprocess` -> `model` (float or quantized layers, `quant`, `kernels`)
//! -> `preprocess::postprocess` -> `eval` (metrics, runner) -> `report` and `track` (W&B).
//! The `segq` binary (src/main.rs + `cli`) only parses arguments, merges them with `segq.toml` and calls this library.

pub mod bench;
pub mod calib;
pub mod config;
pub mod data;
pub mod error;
pub mod eval;
pub mod hub;
pub mod interrupt;
pub mod kernels;
pub mod limits;
pub mod model;
pub mod outputs;
pub mod preprocess;
pub mod quant;
pub mod report;
pub mod secret;
pub mod segmenter;
pub mod sysinfo;
pub mod track;

pub use error::{Error, ErrorKind, Result};

/// segq's version, recorded in every result file.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
