//! Registry credentials: static, Docker's `config.json` (`auths`, `credHelpers`, `credsStore`)
//! and the `docker-credential-*` helper protocol.
//!
//! Secrets live in [`Secret`], whose `Debug` and `Display` never show the value; credential
//! helpers get the server URL on stdin, never as an argument.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use base64::Engine as _;
use futures_util::future::BoxFuture;
use serde::Deserialize;

use crate::reference::DOCKER_HUB;

/// Server URL Docker uses for Docker Hub credentials.
pub const DOCKER_HUB_AUTH_KEY: &str = "https://index.docker.io/v1/";

/// A secret string (password, token): `Debug` and `Display` print `***`.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    /// Wrap a secret.
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    /// The secret value; only for building an `Authorization` header or helper stdin.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether the secret is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl From<String> for Secret {
    fn from(s: String) -> Self {
        Self(s)
    }
}

/// Credentials for one registry.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Credential {
    /// No credentials (anonymous token or no auth at all).
    #[default]
    Anonymous,
    /// Username and password (HTTP basic, or basic at the token realm).
    Basic {
        /// User name (not secret).
        username: String,
        /// Password or token.
        password: Secret,
    },
    /// An OAuth2 refresh token (`identitytoken` in config.json, helper user `<token>`).
    IdentityToken(Secret),
}

impl Credential {
    /// Basic credentials.
    pub fn basic(username: impl Into<String>, password: impl Into<String>) -> Self {
        Self::Basic {
            username: username.into(),
            password: Secret::new(password.into()),
        }
    }

    /// Whether this is [`Credential::Anonymous`].
    pub fn is_anonymous(&self) -> bool {
        matches!(self, Self::Anonymous)
    }

    /// The value of an `Authorization: Basic` header, for basic credentials.
    pub fn basic_header(&self) -> Option<Secret> {
        match self {
            Self::Basic { username, password } => Some(Secret::new(format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD
                    .encode(format!("{username}:{}", password.expose()))
            ))),
            _ => None,
        }
    }
}

/// Errors while finding credentials.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// config.json could not be read.
    #[error("cannot read Docker config {path}: {source}")]
    ConfigRead {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// config.json is not valid JSON of the expected shape (values are never quoted).
    #[error("invalid Docker config {path}: {reason}")]
    ConfigParse {
        /// The file.
        path: PathBuf,
        /// Position and kind of the problem.
        reason: String,
    },
    /// An `auths` entry cannot be decoded.
    #[error("invalid auths entry for {registry} in {path}: {reason}")]
    BadAuthEntry {
        /// The file.
        path: PathBuf,
        /// The registry key.
        registry: String,
        /// What is wrong.
        reason: String,
    },
    /// A credential helper could not be started.
    #[error("cannot run credential helper docker-credential-{helper}: {source}")]
    HelperSpawn {
        /// Helper name (after `docker-credential-`).
        helper: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A credential helper failed.
    #[error("credential helper docker-credential-{helper} failed for {registry}: {message}")]
    Helper {
        /// Helper name.
        helper: String,
        /// The registry asked for.
        registry: String,
        /// What it said (first line).
        message: String,
    },
    /// The password could not be read from standard input.
    #[error("cannot read the password from standard input: {0}")]
    Stdin(#[source] io::Error),
    /// The password read from standard input is empty.
    #[error("the password read from standard input is empty")]
    EmptyPassword,
    /// A caller-supplied credential provider failed (e.g. fetching an ECR token).
    #[error("cannot get credentials for {registry}: {source}")]
    Provider {
        /// The registry.
        registry: String,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// A source of credentials for registries. `refresh` is true after the registry refused the
/// credentials returned before (401), so a provider with expiring tokens can fetch a new one.
pub trait CredentialProvider: Send + Sync {
    /// Credentials for `registry` (a reference's registry name).
    fn credential<'a>(
        &'a self,
        registry: &'a str,
        refresh: bool,
    ) -> BoxFuture<'a, Result<Credential, AuthError>>;
}

/// Shared credential provider handle.
pub type SharedCredentialProvider = Arc<dyn CredentialProvider>;

/// The same credentials always (`--username` + `--password-stdin`).
#[derive(Debug, Clone)]
pub struct StaticCredential(pub Credential);

impl CredentialProvider for StaticCredential {
    fn credential<'a>(
        &'a self,
        _registry: &'a str,
        _refresh: bool,
    ) -> BoxFuture<'a, Result<Credential, AuthError>> {
        Box::pin(async move { Ok(self.0.clone()) })
    }
}

/// Credentials from Docker's config.json and credential helpers, read at each call.
#[derive(Debug, Clone, Default)]
pub struct DockerConfigProvider {
    /// Config directory (default: `$DOCKER_CONFIG` or `~/.docker`).
    pub dir: Option<PathBuf>,
    /// `PATH` used to find `docker-credential-*` helpers (default: the process `PATH`).
    pub helper_path: Option<OsString>,
}

impl CredentialProvider for DockerConfigProvider {
    fn credential<'a>(
        &'a self,
        registry: &'a str,
        _refresh: bool,
    ) -> BoxFuture<'a, Result<Credential, AuthError>> {
        let this = self.clone();
        let registry = registry.to_string();
        Box::pin(async move {
            let reg = registry.clone();
            tokio::task::spawn_blocking(move || {
                let dir = match this.dir.clone().or_else(docker_config_dir) {
                    Some(d) => d,
                    None => return Ok(Credential::Anonymous),
                };
                let mut cfg = DockerConfig::load(&dir.join("config.json"))?;
                cfg.helper_path = this.helper_path.clone();
                cfg.credential_for(&reg)
            })
            .await
            .map_err(|e| AuthError::Provider {
                registry,
                source: Box::new(e),
            })?
        })
    }
}

/// Docker's config directory: `$DOCKER_CONFIG`, else `$HOME/.docker`.
pub fn docker_config_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("DOCKER_CONFIG").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d));
    }
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|h| PathBuf::from(h).join(".docker"))
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ConfigFile {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
    #[serde(default)]
    cred_helpers: BTreeMap<String, String>,
    #[serde(default)]
    creds_store: Option<String>,
}

#[derive(Default, Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    identitytoken: Option<String>,
}

impl fmt::Debug for AuthEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AuthEntry(***)")
    }
}

/// A loaded Docker `config.json`.
#[derive(Debug)]
pub struct DockerConfig {
    path: PathBuf,
    file: ConfigFile,
    /// `PATH` used to find `docker-credential-*` helpers (default: the process `PATH`).
    pub helper_path: Option<OsString>,
}

impl DockerConfig {
    /// Load a config file; a missing file is an empty config.
    pub fn load(path: &Path) -> Result<Self, AuthError> {
        let file = match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| AuthError::ConfigParse {
                path: path.to_path_buf(),
                reason: format!(
                    "{:?} error at line {} column {}",
                    e.classify(),
                    e.line(),
                    e.column()
                ),
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => ConfigFile::default(),
            Err(source) => {
                return Err(AuthError::ConfigRead {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        Ok(Self {
            path: path.to_path_buf(),
            file,
            helper_path: None,
        })
    }

    /// Credentials for a registry: its `credHelpers` entry, else `credsStore`, else `auths`,
    /// else anonymous.
    pub fn credential_for(&self, registry: &str) -> Result<Credential, AuthError> {
        let server_url = helper_server_url(registry);
        let helper = self
            .file
            .cred_helpers
            .iter()
            .find(|(k, _)| registry_key_matches(k, registry))
            .map(|(_, v)| v.clone());
        if let Some(h) = helper {
            return Ok(
                helper_get(&h, &server_url, registry, self.helper_path.as_ref())?
                    .unwrap_or_default(),
            );
        }
        if let Some(store) = self.file.creds_store.as_deref().filter(|s| !s.is_empty()) {
            if let Some(c) = helper_get(store, &server_url, registry, self.helper_path.as_ref())? {
                return Ok(c);
            }
        }
        let Some((key, entry)) = self
            .file
            .auths
            .iter()
            .find(|(k, _)| registry_key_matches(k, registry))
        else {
            return Ok(Credential::Anonymous);
        };
        let bad = |reason: &str| AuthError::BadAuthEntry {
            path: self.path.clone(),
            registry: key.clone(),
            reason: reason.to_string(),
        };
        if let Some(tok) = entry.identitytoken.as_deref().filter(|t| !t.is_empty()) {
            return Ok(Credential::IdentityToken(Secret::new(tok)));
        }
        if let Some(auth) = entry.auth.as_deref().filter(|a| !a.is_empty()) {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(auth.trim())
                .map_err(|_| bad("\"auth\" is not valid base64"))?;
            let text = String::from_utf8(raw).map_err(|_| bad("\"auth\" is not UTF-8"))?;
            let (u, p) = text
                .split_once(':')
                .ok_or_else(|| bad("\"auth\" is not base64 of user:password"))?;
            return Ok(Credential::basic(u, p));
        }
        match (&entry.username, &entry.password) {
            (Some(u), Some(p)) if !u.is_empty() => Ok(Credential::basic(u.clone(), p.clone())),
            _ => Ok(Credential::Anonymous),
        }
    }
}

/// The server URL Docker hands to credential helpers for a registry.
pub fn helper_server_url(registry: &str) -> String {
    if registry == DOCKER_HUB {
        DOCKER_HUB_AUTH_KEY.to_string()
    } else {
        registry.to_string()
    }
}

/// Whether a config.json key (`host`, `https://host/v1/`, ...) names `registry`.
fn registry_key_matches(key: &str, registry: &str) -> bool {
    let k = key
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    let host = k.split('/').next().unwrap_or(k);
    if registry == DOCKER_HUB {
        matches!(
            host,
            "docker.io" | "index.docker.io" | "registry-1.docker.io"
        )
    } else {
        host.eq_ignore_ascii_case(registry)
    }
}

#[derive(Deserialize)]
struct HelperOutput {
    #[serde(rename = "Username", default)]
    username: String,
    #[serde(rename = "Secret", default)]
    secret: String,
}

/// Run `docker-credential-HELPER get` with the server URL on stdin. `Ok(None)` when the helper
/// has no credentials for it.
pub fn helper_get(
    helper: &str,
    server_url: &str,
    registry: &str,
    path_env: Option<&OsString>,
) -> Result<Option<Credential>, AuthError> {
    let spawn_err = |source| AuthError::HelperSpawn {
        helper: helper.to_string(),
        source,
    };
    let mut cmd = Command::new(format!("docker-credential-{helper}"));
    cmd.arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(p) = path_env {
        cmd.env("PATH", p);
    }
    let mut child = cmd.spawn().map_err(spawn_err)?;
    if let Some(mut stdin) = child.stdin.take() {
        // A helper that exits early closes its stdin; its exit status tells what happened.
        let _ = stdin.write_all(server_url.as_bytes());
    }
    let out = child.wait_with_output().map_err(spawn_err)?;
    if !out.status.success() {
        let text = String::from_utf8_lossy(if out.stdout.is_empty() {
            &out.stderr
        } else {
            &out.stdout
        })
        .to_string();
        if text.to_ascii_lowercase().contains("credentials not found") {
            return Ok(None);
        }
        let first = text.lines().next().unwrap_or("").trim();
        let message = if first.is_empty() {
            format!("exit status {}", out.status)
        } else {
            first.chars().take(200).collect()
        };
        return Err(AuthError::Helper {
            helper: helper.to_string(),
            registry: registry.to_string(),
            message,
        });
    }
    let parsed: HelperOutput =
        serde_json::from_slice(&out.stdout).map_err(|e| AuthError::Helper {
            helper: helper.to_string(),
            registry: registry.to_string(),
            message: format!(
                "unexpected output ({:?} error at line {} column {})",
                e.classify(),
                e.line(),
                e.column()
            ),
        })?;
    if parsed.secret.is_empty() {
        return Ok(None);
    }
    if parsed.username == "<token>" {
        return Ok(Some(Credential::IdentityToken(Secret::new(parsed.secret))));
    }
    Ok(Some(Credential::Basic {
        username: parsed.username,
        password: Secret::new(parsed.secret),
    }))
}

/// Read a password from a reader (`--password-stdin`), dropping the trailing newline.
pub fn read_password(mut r: impl Read) -> Result<Secret, AuthError> {
    let mut s = String::new();
    r.read_to_string(&mut s).map_err(AuthError::Stdin)?;
    let trimmed = s.trim_end_matches(['\n', '\r']);
    if trimmed.is_empty() {
        return Err(AuthError::EmptyPassword);
    }
    Ok(Secret::new(trimmed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn secrets_are_redacted() {
        let c = Credential::basic("u", "hunter2");
        assert!(!format!("{c:?}").contains("hunter2"));
        let t = Credential::IdentityToken(Secret::new("tok-123"));
        assert!(!format!("{t:?}").contains("tok-123"));
        assert_eq!(Secret::new("x").to_string(), "***");
        assert_eq!(
            c.basic_header().unwrap().expose(),
            "Basic dTpodW50ZXIy" // base64("u:hunter2")
        );
    }

    #[test]
    fn auths_entries_and_hub_keys() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.json");
        std::fs::write(
            &p,
            r#"{"auths":{
                "https://index.docker.io/v1/":{"auth":"aHViOnB3"},
                "reg.example.com:5000":{"username":"u","password":"p"},
                "https://tok.example.com":{"identitytoken":"refresh"},
                "bad.example.com":{"auth":"!!!"}}}"#,
        )
        .unwrap();
        let cfg = DockerConfig::load(&p).unwrap();
        assert_eq!(
            cfg.credential_for("docker.io").unwrap(),
            Credential::basic("hub", "pw")
        );
        assert_eq!(
            cfg.credential_for("reg.example.com:5000").unwrap(),
            Credential::basic("u", "p")
        );
        assert!(matches!(
            cfg.credential_for("tok.example.com").unwrap(),
            Credential::IdentityToken(_)
        ));
        assert_eq!(
            cfg.credential_for("other.example.com").unwrap(),
            Credential::Anonymous
        );
        let e = cfg.credential_for("bad.example.com").unwrap_err();
        assert!(e.to_string().contains("bad.example.com"), "{e}");
        assert!(!e.to_string().contains("!!!"), "{e}");
    }

    #[test]
    fn parse_errors_do_not_quote_values() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.json");
        std::fs::write(&p, r#"{"auths":{"h":{"auth":"sekrit", "password": 5}}}"#).unwrap();
        let e = DockerConfig::load(&p).unwrap_err().to_string();
        assert!(e.contains("config.json"), "{e}");
        assert!(!e.contains("sekrit"), "{e}");
    }

    fn write_helper(dir: &Path, name: &str, body: &str) {
        let p = dir.join(format!("docker-credential-{name}"));
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn credential_helpers_and_store() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        // Answers only for the server URL it is given on stdin, never via arguments.
        write_helper(
            &bin,
            "fake",
            r#"[ "$1" = get ] || exit 3
read url
case "$url" in
  reg.example.com) echo '{"ServerURL":"reg.example.com","Username":"alice","Secret":"s3cret"}';;
  tok.example.com) echo '{"ServerURL":"tok.example.com","Username":"<token>","Secret":"rt"}';;
  *) echo "credentials not found in native keychain"; exit 1;;
esac"#,
        );
        write_helper(&bin, "broken", "echo 'boom: store locked' >&2; exit 2");
        let p = dir.path().join("config.json");
        std::fs::write(
            &p,
            r#"{"credsStore":"fake","credHelpers":{"broken.example.com":"broken"},
                "auths":{"fallback.example.com":{"auth":"YTpi"}}}"#,
        )
        .unwrap();
        let mut cfg = DockerConfig::load(&p).unwrap();
        cfg.helper_path = Some(bin.into_os_string());
        assert_eq!(
            cfg.credential_for("reg.example.com").unwrap(),
            Credential::basic("alice", "s3cret")
        );
        assert!(matches!(
            cfg.credential_for("tok.example.com").unwrap(),
            Credential::IdentityToken(_)
        ));
        // Not in the store: falls back to auths, then anonymous.
        assert_eq!(
            cfg.credential_for("fallback.example.com").unwrap(),
            Credential::basic("a", "b")
        );
        assert_eq!(
            cfg.credential_for("none.example.com").unwrap(),
            Credential::Anonymous
        );
        let e = cfg.credential_for("broken.example.com").unwrap_err();
        assert!(e.to_string().contains("boom: store locked"), "{e}");
        assert!(e.to_string().contains("docker-credential-broken"), "{e}");
    }

    #[test]
    fn password_from_stdin() {
        assert_eq!(read_password(&b"pw\n"[..]).unwrap().expose(), "pw");
        assert!(matches!(
            read_password(&b"\n"[..]),
            Err(AuthError::EmptyPassword)
        ));
    }
}
