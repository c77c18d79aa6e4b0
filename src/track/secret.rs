//! The W&B API key: where it may come from (environment, netrc); held in [`Secret`] like every credential.

use std::path::PathBuf;

pub use crate::secret::Secret;

/// Where a key was found, for a log line that says so without showing it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeySource {
    Env,
    Netrc(PathBuf),
}

/// Finds the API key for `base_url`: `WANDB_API_KEY`, else the netrc entry (`$NETRC`, else `~/.netrc`) whose
/// `machine` is the API host (with or without its port). `env` is the environment lookup (injected for tests).
pub fn find_api_key(base_url: &str, env: &dyn Fn(&str) -> Option<String>) -> Option<(Secret, KeySource)> {
    if let Some(key) = env("WANDB_API_KEY")
        .map(|k| k.trim().to_string())
        .filter(|k| !k.is_empty())
    {
        return Some((Secret::new(key), KeySource::Env));
    }
    let path = match env("NETRC").filter(|p| !p.is_empty()) {
        Some(path) => PathBuf::from(path),
        None => PathBuf::from(env("HOME")?).join(".netrc"),
    };
    let contents = std::fs::read_to_string(&path).ok()?;
    let (host_port, host) = api_host(base_url);
    let password = netrc_password(&contents, &host_port).or_else(|| netrc_password(&contents, &host))?;
    Some((Secret::new(password), KeySource::Netrc(path)))
}

/// The authority of a URL (`host:port`) and the bare host name.
pub fn api_host(base_url: &str) -> (String, String) {
    let without_scheme = base_url.split_once("://").map_or(base_url, |(_, rest)| rest);
    let authority = without_scheme.split(['/', '?', '#']).next().unwrap_or("");
    let authority = authority.rsplit_once('@').map_or(authority, |(_, host)| host);
    let host = if let Some(bracketed) = authority.strip_prefix('[') {
        bracketed.split(']').next().unwrap_or("").to_string()
    } else {
        authority.split(':').next().unwrap_or("").to_string()
    };
    (authority.to_string(), host)
}

/// The `password` of the netrc `machine` entry for `host` (W&B stores the key there, login `user`).
fn netrc_password(contents: &str, host: &str) -> Option<String> {
    let mut tokens = contents.split_whitespace();
    let mut in_entry = false;
    while let Some(token) = tokens.next() {
        match token {
            "machine" => in_entry = tokens.next() == Some(host),
            "default" => in_entry = false,
            "password" => {
                let value = tokens.next();
                if in_entry {
                    return value.map(str::to_string);
                }
            }
            "login" | "account" => {
                tokens.next();
            }
            _ => {}
        }
    }
    None
}

/// True for `http://` URLs that point at this machine, the only place a key may travel unencrypted.
pub fn is_loopback(base_url: &str) -> bool {
    let (_, host) = api_host(base_url);
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Refuses to send a key anywhere but over HTTPS or to a loopback address; `key` names the setting the address came
/// from (`WANDB_BASE_URL` or `tracking.base_url`).
pub fn check_transport(base_url: &str, key: &str) -> crate::Result<()> {
    let lower = base_url.to_ascii_lowercase();
    if lower.starts_with("https://") || (lower.starts_with("http://") && is_loopback(base_url)) {
        Ok(())
    } else {
        Err(crate::Error::config(
            key,
            format!(
                "{key} {base_url}: the W&B API key is only sent over https:// (plain http only to a loopback \
                 address)"
            ),
        ))
    }
}

/// Says where the key came from, never what it is.
pub fn describe_source(source: &KeySource) -> String {
    match source {
        KeySource::Env => "WANDB_API_KEY".to_string(),
        KeySource::Netrc(path) => path.display().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_key_wins_over_netrc() {
        let env = |name: &str| (name == "WANDB_API_KEY").then(|| " k1 \n".to_string());
        let (key, source) = find_api_key("https://api.wandb.ai", &env).unwrap();
        assert_eq!(key.expose(), "k1");
        assert_eq!(source, KeySource::Env);
    }

    #[test]
    fn netrc_entry_for_the_api_host() {
        let dir = std::env::temp_dir().join(format!("segq-netrc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("netrc");
        std::fs::write(
            &path,
            "machine other.host login user password nope\n\
             machine api.wandb.ai\n  login user\n  password k2\n\
             machine localhost:8080 login user password k3\n",
        )
        .unwrap();
        let netrc = path.to_string_lossy().to_string();
        let env = move |name: &str| (name == "NETRC").then(|| netrc.clone());
        assert_eq!(find_api_key("https://api.wandb.ai", &env).unwrap().0.expose(), "k2");
        assert_eq!(find_api_key("http://localhost:8080/", &env).unwrap().0.expose(), "k3");
        assert!(find_api_key("https://example.com", &env).is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn hosts_and_transport() {
        let allowed = |url: &str| check_transport(url, "tracking.base_url").is_ok();
        assert_eq!(
            api_host("https://api.wandb.ai/x"),
            ("api.wandb.ai".into(), "api.wandb.ai".into())
        );
        assert_eq!(api_host("http://[::1]:9000"), ("[::1]:9000".into(), "::1".into()));
        assert!(allowed("https://api.wandb.ai"));
        assert!(allowed("http://127.0.0.1:5000"));
        assert!(allowed("http://localhost"));
        assert!(allowed("http://[::1]:9000"));
        assert!(!allowed("http://wandb.example.com"));
        assert!(!allowed("http://127.0.0.1.evil.com"));
        assert!(!allowed("ftp://127.0.0.1"));
    }
}
