//! The one secret policy: credentials (the W&B API key, the Hugging Face token) are read from the environment or
//! their tools' own files only, held in [`Secret`] (redacted in `Debug`/`Display`), and refused in segq.toml under
//! any of the names in [`SECRET_KEYS`].

use std::fmt;

/// Config keys that would hold a credential, in any section (compared case-insensitively). segq.toml and `--set`
/// refuse them, so keys never end up in files that get committed and shared.
pub const SECRET_KEYS: &[&str] = &[
    "api_key",
    "wandb_api_key",
    "key",
    "token",
    "hf_token",
    "password",
    "secret",
];

/// Why segq.toml may not hold a credential, and where to put it instead.
pub const SECRET_IN_CONFIG_MESSAGE: &str = "segq never reads keys from its config file (files get shared and \
     committed): set WANDB_API_KEY / HF_TOKEN in the environment, or use `wandb login` / `huggingface-cli login`";

/// True when `key` (the last part of a config key) names a credential.
pub fn is_secret_key(key: &str) -> bool {
    SECRET_KEYS.contains(&key.to_ascii_lowercase().as_str())
}

/// A credential whose `Debug` and `Display` are redacted; read it only through [`Secret::expose`] where it is sent.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The credential itself, for the one place that sends it (an Authorization header, the Hub client).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_are_redacted() {
        let secret = Secret::new("abc123-very-secret");
        assert!(!format!("{secret:?}").contains("abc123"));
        assert!(!format!("{secret}").contains("abc123"));
        assert!(!format!("{:?}", Some(&secret)).contains("abc123"));
        assert_eq!(secret.expose(), "abc123-very-secret");
    }

    #[test]
    fn secret_keys_are_case_insensitive() {
        assert!(is_secret_key("API_KEY") && is_secret_key("hf_token") && !is_secret_key("project"));
    }
}
