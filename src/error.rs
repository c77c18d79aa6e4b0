//! The library's error type: every variant renders as one line that names the file, key, row or tensor at fault.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Model(String),
    #[error("{0}")]
    Data(String),
    #[error("{0}")]
    Quant(String),
    #[error("{0}")]
    Hub(String),
    #[error("{0}")]
    Track(String),
    #[error("{0}")]
    Report(String),
    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("interrupted")]
    Interrupted,
}

impl Error {
    /// Wraps an I/O error with the path it happened on.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
