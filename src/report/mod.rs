//! Reports (temporary: overlays only until the metrics branch lands).
pub mod overlay;
