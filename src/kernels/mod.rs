//! Hand-written CPU kernels (placeholder until the kernels branch lands).
pub mod dwconv;
