//! The registry client's error type: keeps the HTTP status, the registry's error codes and the
//! repository, and knows which failures are worth retrying.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::auth::AuthError;
use crate::layout::LayoutError;
use crate::oci::{Digest, OciError};

/// One entry of a registry's JSON error body (`{"errors":[{"code":..,"message":..}]}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiError {
    /// Error code (`NAME_UNKNOWN`, `DENIED`, `MANIFEST_INVALID`, `TAG_INVALID`, ...).
    pub code: String,
    /// Human message.
    #[serde(default)]
    pub message: String,
}

/// Errors of the registry client.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The registry answered with an error status.
    #[error("{repository}: {operation}: {} (HTTP {status})", ApiErrors(.errors))]
    Api {
        /// `registry/repository` (or the registry alone).
        repository: String,
        /// What was being done (`push blob sha256:...`, `get manifest 1.0`, ...).
        operation: String,
        /// HTTP status.
        status: u16,
        /// Parsed error entries; never empty (a code is derived from the status if needed).
        errors: Vec<ApiError>,
        /// `Retry-After` of a 429/503 answer.
        retry_after: Option<Duration>,
    },
    /// The request could not be sent or the answer not read.
    #[error("{repository}: {operation}: {}", root_cause(.source))]
    Transport {
        /// `registry/repository`.
        repository: String,
        /// What was being done.
        operation: String,
        /// The cause (its URL is stripped).
        #[source]
        source: reqwest::Error,
    },
    /// The registry broke the protocol (missing Location, bad digest header, ...).
    #[error("{repository}: {operation}: {message}")]
    Protocol {
        /// `registry/repository`.
        repository: String,
        /// What was being done.
        operation: String,
        /// What went wrong.
        message: String,
    },
    /// Content did not match its digest.
    #[error("{repository}: {what} {expected}: content has digest {actual}")]
    DigestMismatch {
        /// `registry/repository`.
        repository: String,
        /// `blob` or `manifest`.
        what: &'static str,
        /// The expected digest.
        expected: Digest,
        /// What it hashed to.
        actual: Digest,
    },
    /// Storing or reading a blob in the local layout failed.
    #[error("{repository}: blob {digest}: {source}")]
    Blob {
        /// `registry/repository`.
        repository: String,
        /// The blob.
        digest: Digest,
        /// The cause.
        #[source]
        source: LayoutError,
    },
    /// The local layout failed.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// A local file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Credentials could not be found.
    #[error("credentials for {registry}: {source}")]
    Auth {
        /// The registry.
        registry: String,
        /// The cause.
        #[source]
        source: AuthError,
    },
    /// The CA file is unusable.
    #[error("CA file {path}: {reason}")]
    CaFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The HTTP client could not be built.
    #[error("cannot set up the HTTP client: {0}")]
    Client(#[source] reqwest::Error),
    /// Plain HTTP asked for a host that is neither loopback nor an insecure registry.
    #[error(
        "refusing plain HTTP to {registry} ({endpoint}): only loopback hosts and hosts named \
         with --insecure-registry may use http://"
    )]
    InsecureRefused {
        /// The registry.
        registry: String,
        /// The endpoint URL.
        endpoint: String,
    },
    /// An endpoint override is not a usable URL.
    #[error("bad endpoint {endpoint:?} for registry {registry}: {reason}")]
    BadEndpoint {
        /// The registry.
        registry: String,
        /// The URL given.
        endpoint: String,
        /// What is wrong.
        reason: String,
    },
    /// A manifest, index or config could not be parsed.
    #[error("{reference}: {source}")]
    Manifest {
        /// The image reference.
        reference: String,
        /// The cause.
        #[source]
        source: OciError,
    },
    /// The manifest's media type is not supported (e.g. Docker schema 1).
    #[error("{reference}: unsupported manifest media type {media_type:?}")]
    UnsupportedMediaType {
        /// The image reference.
        reference: String,
        /// The media type.
        media_type: String,
    },
    /// An invalid reference or tag.
    #[error(transparent)]
    Reference(#[from] crate::reference::ReferenceError),
    /// No progress for the idle timeout (`--registry-timeout`): nothing sent, answered or read.
    #[error("{repository}: {operation}: {}", StallText(.host, *.idle, *.phase))]
    Stalled {
        /// `registry/repository`.
        repository: String,
        /// What was being done.
        operation: String,
        /// The host (`host:port`) that stalled.
        host: String,
        /// How long nothing moved.
        idle: Duration,
        /// Where the exchange stood.
        phase: StallPhase,
    },
    /// A registry pointed wpimg from https to plain http (upload `Location`, redirect).
    #[error(
        "{repository}: {operation}: refusing the downgrade from {from} to {to} \
         (https to plain http; no credentials were sent)"
    )]
    Downgrade {
        /// `registry/repository`.
        repository: String,
        /// What was being done.
        operation: String,
        /// Origin of the secure side (`https://host:port`).
        from: String,
        /// Origin of the plain side (`http://host:port`).
        to: String,
    },
    /// A registry pointed wpimg at plain HTTP on a host that is neither loopback nor named with
    /// `--insecure-registry` (upload `Location`, redirect, token realm).
    #[error(
        "{repository}: {operation}: refusing plain HTTP to {to}: only loopback hosts and hosts \
         named with --insecure-registry may use http:// (no credentials were sent)"
    )]
    PlainHttpRefused {
        /// `registry/repository`.
        repository: String,
        /// What was being done.
        operation: String,
        /// The refused origin (`http://host:port`).
        to: String,
    },
    /// A manifest, config or token answer declares more bytes than wpimg accepts; nothing of it
    /// was read.
    #[error("{reference}: {what} is {size} bytes, over the limit of {limit} bytes")]
    TooLarge {
        /// The image reference (or `registry/repository`).
        reference: String,
        /// `manifest`, `config sha256:...`, `token answer`.
        what: String,
        /// The size declared (descriptor or `Content-Length`).
        size: u64,
        /// wpimg's limit for it.
        limit: u64,
    },
    /// The registry sent more than it declared (or, with no size declared, more than the limit);
    /// reading stopped there.
    #[error("{reference}: {what}: the registry sent more than {limit} bytes ({})", overlong_why(*.declared))]
    Overlong {
        /// The image reference (or `registry/repository`).
        reference: String,
        /// `manifest`, `config sha256:...`, `blob sha256:...`.
        what: String,
        /// The size declared, or the limit when none was.
        limit: u64,
        /// Whether `limit` is a declared size (descriptor or `Content-Length`).
        declared: bool,
    },
    /// An index has no entry for the wanted platform.
    #[error("{reference}: no image for platform {platform} (available: {})", .available.join(", "))]
    PlatformNotFound {
        /// The image reference.
        reference: String,
        /// The wanted platform.
        platform: String,
        /// Platforms the index offers.
        available: Vec<String>,
    },
    /// Putting the manifest under a tag failed (the registry's answer, with the tag as data).
    #[error("{source}")]
    Tagging {
        /// The tag.
        tag: String,
        /// The registry's answer (shown as this error's message).
        source: Box<RegistryError>,
    },
}

impl crate::error::HasKind for RegistryError {
    fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind;
        match self {
            Self::Reference(_)
            | Self::InsecureRefused { .. }
            | Self::BadEndpoint { .. }
            | Self::CaFile { .. } => ErrorKind::BadInput,
            Self::Tagging { source, .. } => source.kind(),
            _ => ErrorKind::Failure,
        }
    }
}

/// Where a stalled exchange stood when the idle timeout struck.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StallPhase {
    /// The request was sent (or had no body); no answer came.
    Answer,
    /// The registry stopped taking the request body after `sent` of `total` bytes.
    Upload {
        /// Bytes of the body the registry took.
        sent: u64,
        /// Size of the body, if known.
        total: Option<u64>,
    },
    /// The answer's body stopped after `received` bytes.
    Body {
        /// Bytes of the body read.
        received: u64,
    },
}

/// `2 s`, `0.5 s`.
fn seconds(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

fn overlong_why(declared: bool) -> &'static str {
    if declared {
        "the size it declared"
    } else {
        "the limit, no size declared"
    }
}

/// A [`StallPhase`] with the host and the idle time, as shown in [`RegistryError::Stalled`].
pub(crate) struct StallText<'a>(pub &'a str, pub Duration, pub StallPhase);

impl fmt::Display for StallText<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (host, idle) = (self.0, seconds(self.1));
        match self.2 {
            StallPhase::Answer => write!(f, "no answer from {host} for {idle}"),
            StallPhase::Upload { sent, total } => {
                write!(f, "{host} took no data for {idle} (after {sent}")?;
                if let Some(t) = total {
                    write!(f, " of {t}")?;
                }
                f.write_str(" bytes of the request body)")
            }
            StallPhase::Body { received } => write!(
                f,
                "no data from {host} for {idle} (after {received} bytes of the answer)"
            ),
        }
    }
}

/// The innermost cause of an error (reqwest's own message is only "error sending request").
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

struct ApiErrors<'a>(&'a [ApiError]);

impl fmt::Display for ApiErrors<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            if e.message.is_empty() {
                write!(f, "{}", e.code)?;
            } else {
                write!(f, "{}: {}", e.code, e.message)?;
            }
        }
        Ok(())
    }
}

impl RegistryError {
    /// The error for a failed request putting a manifest under `tag`.
    pub(crate) fn for_tag(self, tag: &str) -> Self {
        Self::Tagging {
            tag: tag.to_string(),
            source: Box::new(self),
        }
    }

    /// The error itself, or for [`RegistryError::Tagging`] the registry's answer.
    fn answer(&self) -> &Self {
        match self {
            Self::Tagging { source, .. } => source.answer(),
            other => other,
        }
    }

    /// Whether retrying may help: connection failures, stalls, 5xx, 408 and 429. Never auth
    /// (401/403), not-found, refused URLs or size violations.
    pub fn is_temporary(&self) -> bool {
        match self.answer() {
            Self::Api { status, errors, .. } => {
                *status >= 500
                    || *status == 429
                    || *status == 408
                    || errors
                        .iter()
                        .any(|e| e.code == "TOOMANYREQUESTS" || e.code == "UNAVAILABLE")
            }
            Self::Stalled { .. } => true,
            Self::Transport { source, .. } => {
                source.is_connect()
                    || source.is_timeout()
                    || source.is_request()
                    || source.is_body()
                    || source.is_decode()
            }
            _ => false,
        }
    }

    /// The first registry error code (`NAME_UNKNOWN`, `DENIED`, `TAG_INVALID`, ...), if any.
    pub fn code(&self) -> Option<&str> {
        match self.answer() {
            Self::Api { errors, .. } => errors.first().map(|e| e.code.as_str()),
            _ => None,
        }
    }

    /// Whether any registry error code equals `code`.
    pub fn has_code(&self, code: &str) -> bool {
        matches!(self.answer(), Self::Api { errors, .. } if errors.iter().any(|e| e.code == code))
    }

    /// The registry's error entries of an [`RegistryError::Api`] error (empty otherwise).
    pub fn api_errors(&self) -> &[ApiError] {
        match self.answer() {
            Self::Api { errors, .. } => errors,
            _ => &[],
        }
    }

    /// The tag a failed tagging request (manifest PUT under a tag) was for.
    pub fn tag(&self) -> Option<&str> {
        match self {
            Self::Tagging { tag, .. } => Some(tag),
            _ => None,
        }
    }

    /// Whether this is a [`RegistryError::Stalled`] (retried fewer times: each costs the timeout).
    pub fn is_stall(&self) -> bool {
        matches!(self.answer(), Self::Stalled { .. })
    }

    /// The HTTP status of an [`RegistryError::Api`] error.
    pub fn status(&self) -> Option<u16> {
        match self.answer() {
            Self::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The registry's `Retry-After`, if it sent one.
    pub fn retry_after(&self) -> Option<Duration> {
        match self.answer() {
            Self::Api { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// The operation text of putting the manifest `digest` under `tag`.
pub(crate) fn tag_operation(digest: &Digest, tag: &str) -> String {
    format!("tag {digest} as {tag}")
}

/// The code used when an error answer has no JSON body.
pub(crate) fn code_for_status(status: u16) -> &'static str {
    match status {
        400 => "BAD_REQUEST",
        401 => "UNAUTHORIZED",
        403 => "DENIED",
        404 => "NOT_FOUND",
        405 => "UNSUPPORTED",
        408 => "TIMEOUT",
        409 => "CONFLICT",
        413 => "SIZE_INVALID",
        416 => "RANGE_INVALID",
        429 => "TOOMANYREQUESTS",
        500..=599 => "UNAVAILABLE",
        _ => "UNKNOWN",
    }
}

/// Parse an error body: the distribution `errors` array, or the `details`/`message`/`error`
/// fields token servers use, or the first line of text.
pub(crate) fn parse_error_body(status: u16, body: &[u8]) -> Vec<ApiError> {
    #[derive(Deserialize)]
    struct Entry {
        code: Option<String>,
        message: Option<String>,
    }
    #[derive(Deserialize)]
    struct Body {
        errors: Option<Vec<Entry>>,
        details: Option<String>,
        message: Option<String>,
        error: Option<String>,
    }
    let fallback_code = code_for_status(status).to_string();
    if let Ok(b) = serde_json::from_slice::<Body>(body) {
        let mut out: Vec<ApiError> = b
            .errors
            .unwrap_or_default()
            .into_iter()
            .map(|e| ApiError {
                code: e
                    .code
                    .filter(|c| !c.is_empty())
                    .unwrap_or_else(|| fallback_code.clone()),
                message: e.message.unwrap_or_default(),
            })
            .collect();
        if out.is_empty() {
            if let Some(m) = b.details.or(b.message).or(b.error) {
                out.push(ApiError {
                    code: fallback_code.clone(),
                    message: m,
                });
            }
        }
        if !out.is_empty() {
            return out;
        }
    }
    let text = String::from_utf8_lossy(body);
    let first = text.lines().map(str::trim).find(|l| !l.is_empty());
    vec![ApiError {
        code: fallback_code,
        message: match first {
            Some(l) if !l.starts_with('<') => l.chars().take(200).collect(),
            _ => http::StatusCode::from_u16(status)
                .ok()
                .and_then(|s| s.canonical_reason())
                .unwrap_or("")
                .to_string(),
        },
    }]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(status: u16, body: &str) -> RegistryError {
        RegistryError::Api {
            repository: "127.0.0.1:5000/app".into(),
            operation: "put manifest v1".into(),
            status,
            errors: parse_error_body(status, body.as_bytes()),
            retry_after: None,
        }
    }

    #[test]
    fn json_error_bodies_keep_codes() {
        let e = api(
            400,
            r#"{"errors":[{"code":"TAG_INVALID","message":"tag invalid","detail":{"x":1}}]}"#,
        );
        assert_eq!(e.code(), Some("TAG_INVALID"));
        assert!(e.has_code("TAG_INVALID"));
        assert_eq!(
            e.to_string(),
            "127.0.0.1:5000/app: put manifest v1: TAG_INVALID: tag invalid (HTTP 400)"
        );
        assert!(!e.is_temporary());
        assert_eq!(e.tag(), None);
        assert_eq!(e.api_errors()[0].message, "tag invalid");
    }

    #[test]
    fn tagging_errors_name_their_tag() {
        let d = Digest::of_bytes(b"m");
        let e = RegistryError::Api {
            repository: "r".into(),
            operation: tag_operation(&d, "v1.2"),
            status: 400,
            errors: parse_error_body(400, br#"{"errors":[{"code":"TAG_INVALID"}]}"#),
            retry_after: None,
        };
        let shown = e.to_string();
        let e = e.for_tag("v1.2");
        assert_eq!(e.tag(), Some("v1.2"));
        assert!(e.has_code("TAG_INVALID"));
        assert_eq!(e.to_string(), shown, "the message stays the registry's");
        assert_eq!(e.status(), Some(400));
    }

    #[test]
    fn stalls_name_host_time_and_phase_and_are_temporary() {
        let stall = |phase| RegistryError::Stalled {
            repository: "127.0.0.1:5000/app".into(),
            operation: "get manifest v1".into(),
            host: "127.0.0.1:5000".into(),
            idle: Duration::from_secs(60),
            phase,
        };
        let e = stall(StallPhase::Answer);
        assert_eq!(
            e.to_string(),
            "127.0.0.1:5000/app: get manifest v1: no answer from 127.0.0.1:5000 for 60 s"
        );
        assert!(e.is_temporary() && e.is_stall());
        assert!(stall(StallPhase::Body { received: 12 })
            .to_string()
            .ends_with("no data from 127.0.0.1:5000 for 60 s (after 12 bytes of the answer)"));
        assert!(stall(StallPhase::Upload {
            sent: 5,
            total: Some(9)
        })
        .to_string()
        .ends_with(
            "127.0.0.1:5000 took no data for 60 s (after 5 of 9 bytes of the request body)"
        ));
        let big = RegistryError::TooLarge {
            reference: "r:1".into(),
            what: "manifest".into(),
            size: 9,
            limit: 4,
        };
        assert_eq!(
            big.to_string(),
            "r:1: manifest is 9 bytes, over the limit of 4 bytes"
        );
        assert!(!big.is_temporary());
    }

    #[test]
    fn bare_statuses_get_a_code() {
        let e = api(401, "");
        assert_eq!(e.code(), Some("UNAUTHORIZED"));
        assert!(e.to_string().contains("UNAUTHORIZED: Unauthorized"), "{e}");
        assert!(!e.is_temporary());
        let e = api(503, "<html>busy</html>");
        assert_eq!(e.code(), Some("UNAVAILABLE"));
        assert!(e.is_temporary());
        assert!(api(429, r#"{"details":"slow down"}"#).is_temporary());
        assert!(api(429, r#"{"details":"slow down"}"#)
            .to_string()
            .contains("slow down"));
        assert!(!api(404, r#"{"errors":[{"code":"MANIFEST_UNKNOWN"}]}"#).is_temporary());
        assert!(!api(403, r#"{"errors":[{"code":"DENIED","message":"no"}]}"#).is_temporary());
    }
}
