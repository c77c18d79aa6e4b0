//! The library's error type: the kind of failure (not found, unsupported, shape mismatch, bad configuration,
//! invalid input, I/O, network, ...) with the name of what it happened to. Every variant renders as one line that
//! names the file, key, row, tensor or URL; `segq` prints it as `error: <that line>`.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Variants with a name (`what`, `key`, `origin`, `target`) and a message render as `name: message`, or as the
/// message alone when it already mentions the name ("eval.batch_size must be at least 1").
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing `path` failed.
    #[error("{}: {}", path.display(), IoCause(source))]
    Io { path: PathBuf, source: std::io::Error },
    /// Something named does not exist: a file or folder, a dataset split, a column, a tensor, a metadata key, a
    /// Hub repo or file (including one missing from the cache while offline).
    #[error("{}", Named(what, message))]
    NotFound { what: String, message: String },
    /// The input exists and is well formed, but this build cannot handle it: a file type, a format version, a
    /// level, method or mode name it does not know, a combination of options.
    #[error("{}", Named(what, reason))]
    Unsupported { what: String, reason: String },
    /// A tensor or image has another shape than the one it must have.
    #[error("{name}: expected shape {expected:?}, found {found:?}")]
    ShapeMismatch {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    /// A setting is wrong; `key` is the segq.toml key, command-line flag or environment variable (with the file
    /// and line when it comes from a file).
    #[error("{}", Named(key, message))]
    Config { key: String, message: String },
    /// Input data is corrupt or inconsistent; `origin` names the file and, where there is one, the row, tensor
    /// or entry.
    #[error("{}", Named(origin, message))]
    Invalid { origin: String, message: String },
    /// A request to a server failed or got an unusable answer; `target` names the URL, Hub repo or operation.
    #[error("{}", Named(target, message))]
    Network { target: String, message: String },
    /// An output file could not be produced for a reason other than plain I/O (encoding, drawing).
    #[error("{path}: {message}")]
    Write { path: PathBuf, message: String },
    /// Not the input's fault: a bug in segq (a state its own code should never reach), or the system refusing it a
    /// resource (a thread).
    #[error("internal: {message}")]
    Internal { message: String },
    #[error("tensor computation failed: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("interrupted")]
    Interrupted,
}

/// What went wrong, without the details: for callers (and tests) that branch on the failure. Kinds may be added,
/// hence `non_exhaustive`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A missing file (an I/O error of kind `NotFound` too) or anything else named that does not exist.
    NotFound,
    Io,
    Unsupported,
    ShapeMismatch,
    Config,
    Invalid,
    Network,
    Write,
    Internal,
    /// A tensor operation (candle) failed.
    Compute,
    Interrupted,
}

impl Error {
    /// What went wrong. An I/O error caused by a missing file is [`ErrorKind::NotFound`], so that "does not exist"
    /// is one kind whichever way it was detected.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => ErrorKind::NotFound,
            Error::Io { .. } => ErrorKind::Io,
            Error::NotFound { .. } => ErrorKind::NotFound,
            Error::Unsupported { .. } => ErrorKind::Unsupported,
            Error::ShapeMismatch { .. } => ErrorKind::ShapeMismatch,
            Error::Config { .. } => ErrorKind::Config,
            Error::Invalid { .. } => ErrorKind::Invalid,
            Error::Network { .. } => ErrorKind::Network,
            Error::Write { .. } => ErrorKind::Write,
            Error::Internal { .. } => ErrorKind::Internal,
            Error::Candle(_) => ErrorKind::Compute,
            Error::Interrupted => ErrorKind::Interrupted,
        }
    }

    /// Puts `origin` (the file or flag a value came from) in front of the line, keeping the kind and the name:
    /// "c.toml: eval.batch_size must be at least 1". I/O and write errors, which name their path, tensor
    /// computation errors and interruptions come back unchanged.
    pub fn within(self, origin: impl std::fmt::Display) -> Error {
        let prefix = |line: &dyn std::fmt::Display| one_line(format!("{origin}: {line}"));
        match self {
            Error::NotFound { what, message } => Error::NotFound {
                message: prefix(&Named(&what, &message)),
                what,
            },
            Error::Unsupported { what, reason } => Error::Unsupported {
                reason: prefix(&Named(&what, &reason)),
                what,
            },
            Error::ShapeMismatch { name, expected, found } => Error::ShapeMismatch {
                name: prefix(&name),
                expected,
                found,
            },
            Error::Config { key, message } => Error::Config {
                message: prefix(&Named(&key, &message)),
                key,
            },
            Error::Invalid { origin: inner, message } => Error::Invalid {
                message: prefix(&Named(&inner, &message)),
                origin: inner,
            },
            Error::Network { target, message } => Error::Network {
                message: prefix(&Named(&target, &message)),
                target,
            },
            Error::Internal { message } => Error::Internal {
                message: prefix(&message),
            },
            other @ (Error::Io { .. } | Error::Write { .. } | Error::Candle(_) | Error::Interrupted) => other,
        }
    }

    /// Wraps an I/O error with the path it happened on.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// `what` (e.g. "dataset /data/ade") does not exist; `message` says where it was looked for.
    pub fn not_found(what: impl Into<String>, message: impl Into<String>) -> Self {
        Error::NotFound {
            what: one_line(what.into()),
            message: one_line(message.into()),
        }
    }

    pub fn unsupported(what: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Unsupported {
            what: one_line(what.into()),
            reason: one_line(reason.into()),
        }
    }

    pub fn shape_mismatch(name: impl Into<String>, expected: &[usize], found: &[usize]) -> Self {
        Error::ShapeMismatch {
            name: one_line(name.into()),
            expected: expected.to_vec(),
            found: found.to_vec(),
        }
    }

    /// `key`: the segq.toml key, flag or environment variable at fault, as the user wrote it.
    pub fn config(key: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Config {
            key: one_line(key.into()),
            message: one_line(message.into()),
        }
    }

    /// `origin`: the file, plus the row, tensor or entry where there is one.
    pub fn invalid(origin: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Invalid {
            origin: one_line(origin.into()),
            message: one_line(message.into()),
        }
    }

    pub fn network(target: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Network {
            target: one_line(target.into()),
            message: one_line(message.into()),
        }
    }

    pub fn write(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Write {
            path: path.into(),
            message: one_line(message.into()),
        }
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Error::Internal {
            message: one_line(message.into()),
        }
    }
}

/// Renders `name: message`, or the message alone when it already mentions `name` ("eval.batch_size must be at
/// least 1") or there is no name, so that a sentence written around the name reads as written and the name is
/// never shown twice.
struct Named<'a>(&'a str, &'a str);

impl std::fmt::Display for Named<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Named(name, message) = *self;
        if name.is_empty() || message.contains(name) {
            f.write_str(message)
        } else {
            write!(f, "{name}: {message}")
        }
    }
}

/// An I/O error's cause as the rest of segq words it: a missing file is "no such file or folder" whichever call
/// found it, and the OS's "(os error N)" is left out (the text already says it).
pub(crate) struct IoCause<'a>(pub(crate) &'a std::io::Error);

impl std::fmt::Display for IoCause<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.kind() == std::io::ErrorKind::NotFound && self.0.raw_os_error().is_some() {
            return f.write_str("no such file or folder");
        }
        let text = self.0.to_string();
        let text = match text.rfind(" (os error ") {
            Some(at) if text.ends_with(')') => &text[..at],
            _ => &text,
        };
        let mut chars = text.chars();
        match chars.next() {
            // "Permission denied" -> "permission denied", as segq's own causes read; "EOF ..." stays as written.
            Some(first) if chars.clone().next().is_some_and(char::is_lowercase) => {
                write!(f, "{}{}", first.to_lowercase(), chars.as_str())
            }
            _ => f.write_str(text),
        }
    }
}

/// The 1-based line of byte `offset` in `text`, for errors that name the line of a TOML file.
pub(crate) fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].bytes().filter(|b| *b == b'\n').count() + 1
}

/// Joins the lines of a message that quotes another library's multi-line error, so the error stays one line.
fn one_line(text: String) -> String {
    if !text.contains(['\n', '\r']) {
        return text;
    }
    // A lone carriage return (quoted from input by serde) breaks a terminal line as surely as a newline.
    text.split(['\n', '\r'])
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_is_one_line_naming_what_failed() {
        let missing = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder");
        let denied = std::io::Error::new(std::io::ErrorKind::PermissionDenied, "permission denied");
        let cases = [
            (
                Error::io("data/a.parquet", denied),
                ErrorKind::Io,
                "data/a.parquet: permission denied",
            ),
            (
                Error::io("model/config.json", missing),
                ErrorKind::NotFound,
                "model/config.json: no such file or folder",
            ),
            (
                Error::not_found("dataset /data/ade", "no such file or folder"),
                ErrorKind::NotFound,
                "dataset /data/ade: no such file or folder",
            ),
            (
                Error::unsupported("b.safetensors", "quantization storage version 9 is not supported"),
                ErrorKind::Unsupported,
                "b.safetensors: quantization storage version 9 is not supported",
            ),
            (
                Error::shape_mismatch("decode_head.classifier.weight", &[150, 256], &[19, 256]),
                ErrorKind::ShapeMismatch,
                "decode_head.classifier.weight: expected shape [150, 256], found [19, 256]",
            ),
            (
                Error::config("segq.toml line 3", "unknown field `batchsize`"),
                ErrorKind::Config,
                "segq.toml line 3: unknown field `batchsize`",
            ),
            (
                Error::config("eval.batch_size", "eval.batch_size must be at least 1"),
                ErrorKind::Config,
                "eval.batch_size must be at least 1",
            ),
            (
                Error::invalid("val.parquet row 7", "image: JPEG is truncated"),
                ErrorKind::Invalid,
                "val.parquet row 7: image: JPEG is truncated",
            ),
            (
                Error::network("UpsertBucket: POST https://api.wandb.ai/graphql", "HTTP 401: denied"),
                ErrorKind::Network,
                "UpsertBucket: POST https://api.wandb.ai/graphql: HTTP 401: denied",
            ),
            (
                Error::write("plots/miou.png", "cannot draw plot: no font"),
                ErrorKind::Write,
                "plots/miou.png: cannot draw plot: no font",
            ),
            (
                Error::internal("an input got no logits"),
                ErrorKind::Internal,
                "internal: an input got no logits",
            ),
            (
                Error::Candle(candle_core::Error::Msg("matmul".into())),
                ErrorKind::Compute,
                "tensor computation failed: matmul",
            ),
            (Error::Interrupted, ErrorKind::Interrupted, "interrupted"),
        ];
        for (error, kind, text) in cases {
            assert_eq!(error.kind(), kind, "{error}");
            assert_eq!(error.to_string(), text);
        }
    }

    #[test]
    fn within_puts_the_origin_first_and_keeps_kind_and_name() {
        let e = Error::config("eval.batch_size", "eval.batch_size must be at least 1").within("c.toml");
        assert_eq!(e.to_string(), "c.toml: eval.batch_size must be at least 1");
        assert!(
            matches!(&e, Error::Config { key, .. } if key == "eval.batch_size"),
            "{e:?}"
        );
        let e = Error::invalid("level \"int8\"", "confusion matrix has 9 labels").within("r.json");
        assert_eq!(e.to_string(), "r.json: level \"int8\": confusion matrix has 9 labels");
        assert_eq!(e.kind(), ErrorKind::Invalid);
        let e = Error::io("a.json", std::io::Error::other("disk full")).within("ignored");
        assert_eq!(e.to_string(), "a.json: disk full");
    }

    #[test]
    fn os_errors_read_as_segq_words_them() {
        let missing = std::io::Error::from_raw_os_error(2);
        assert_eq!(Error::io("x.png", missing).to_string(), "x.png: no such file or folder");
        let denied = std::io::Error::from_raw_os_error(13);
        assert_eq!(Error::io("out", denied).to_string(), "out: permission denied");
        let custom = std::io::Error::other("EOF while reading");
        assert_eq!(Error::io("a", custom).to_string(), "a: EOF while reading");
    }

    #[test]
    fn quoted_multi_line_messages_become_one_line() {
        let e = Error::invalid("a.json", "expected value\n  at line 1\r\n");
        assert_eq!(e.to_string(), "a.json: expected value at line 1");
        let e = Error::config("--set `eval.x`\n", "bad");
        assert_eq!(e.to_string(), "--set `eval.x`: bad");
    }
}
