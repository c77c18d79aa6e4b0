//! Datasets (temporary: decoding only until the data branch lands).
pub mod decode;
