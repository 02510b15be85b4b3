//! Image references (`registry/repository[:tag][@digest]`) with Docker's defaults.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use crate::oci::Digest;

/// Registry name used when a reference names none.
pub const DOCKER_HUB: &str = "docker.io";
/// API host of Docker Hub.
pub const DOCKER_HUB_API_HOST: &str = "registry-1.docker.io";
/// Tag used when a reference names neither tag nor digest.
pub const DEFAULT_TAG: &str = "latest";

/// An invalid image reference.
#[derive(Debug, thiserror::Error)]
#[error("invalid image reference {reference:?}: {reason}")]
pub struct ReferenceError {
    /// The reference as given.
    pub reference: String,
    /// What is wrong with it.
    pub reason: String,
}

impl crate::error::HasKind for ReferenceError {
    fn kind(&self) -> crate::error::ErrorKind {
        crate::error::ErrorKind::BadInput
    }
}

/// An image of an OCI layout directory: `oci:DIR[:REF]` (`REF` is a `NAME:TAG` ref of its
/// `index.json`; without it, the layout's only image).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayoutRef {
    /// The layout directory.
    pub dir: std::path::PathBuf,
    /// The ref, if given.
    pub reference: Option<String>,
}

impl LayoutRef {
    /// Parse `oci:DIR[:REF]`; `None` when `s` does not start with `oci:`.
    pub fn parse(s: &str) -> Option<Self> {
        let rest = s.strip_prefix("oci:")?;
        Some(match rest.split_once(':') {
            Some((dir, r)) if !r.is_empty() => Self {
                dir: dir.into(),
                reference: Some(r.to_string()),
            },
            _ => Self {
                dir: rest.trim_end_matches(':').into(),
                reference: None,
            },
        })
    }
}

/// A parsed image reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    /// Registry name (`docker.io`, `ghcr.io`, `127.0.0.1:5000`, ...); also the credentials key.
    pub registry: String,
    /// Repository path (`library/debian`).
    pub repository: String,
    /// Tag, if given.
    pub tag: Option<String>,
    /// Digest, if given.
    pub digest: Option<Digest>,
}

impl Reference {
    /// Parse a reference (same as `FromStr`).
    pub fn parse(s: &str) -> Result<Self, ReferenceError> {
        s.parse()
    }

    /// Host (and port) to send API requests to (`registry-1.docker.io` for Docker Hub).
    pub fn api_host(&self) -> &str {
        api_host(&self.registry)
    }

    /// The tag or digest to address the manifest with: the digest if present, else the tag,
    /// else `latest`.
    pub fn manifest_reference(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => DEFAULT_TAG.to_string(),
        }
    }

    /// `registry/repository`, the key used to remember where blobs came from.
    pub fn repo_path(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// The same repository with another tag (and no digest).
    pub fn with_tag(&self, tag: &str) -> Result<Self, ReferenceError> {
        validate_tag(tag).map_err(|reason| ReferenceError {
            reference: format!("{}:{tag}", self.repo_path()),
            reason,
        })?;
        Ok(Self {
            tag: Some(tag.to_string()),
            digest: None,
            ..self.clone()
        })
    }

    /// The same repository addressed by digest (the tag is kept for display).
    pub fn with_digest(&self, digest: Digest) -> Self {
        Self {
            digest: Some(digest),
            ..self.clone()
        }
    }

    /// Whether the registry host is a loopback address.
    pub fn is_loopback(&self) -> bool {
        is_loopback_host(&self.registry)
    }
}

impl FromStr for Reference {
    type Err = ReferenceError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason: &str| ReferenceError {
            reference: s.to_string(),
            reason: reason.to_string(),
        };
        if s.is_empty() {
            return Err(err("empty reference"));
        }
        if s.len() > 512 {
            return Err(err("too long"));
        }
        let (name_tag, digest) = match s.split_once('@') {
            Some((n, d)) => (
                n,
                Some(
                    d.parse::<Digest>()
                        .map_err(|_| err("digest must be sha256:<64 lowercase hex digits>"))?,
                ),
            ),
            None => (s, None),
        };
        let (name, tag) = match name_tag.rfind(':') {
            Some(i) if !name_tag[i + 1..].contains('/') => {
                (&name_tag[..i], Some(name_tag[i + 1..].to_string()))
            }
            _ => (name_tag, None),
        };
        if let Some(t) = &tag {
            validate_tag(t).map_err(|r| err(&r))?;
        }
        let (registry, repository) = match name.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_string(), rest.to_string())
            }
            _ => (DOCKER_HUB.to_string(), name.to_string()),
        };
        if registry.is_empty() {
            return Err(err("empty registry name"));
        }
        if !registry
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b".-:[]_".contains(&b))
        {
            return Err(err("invalid registry host"));
        }
        let registry = if registry == "index.docker.io" {
            DOCKER_HUB.to_string()
        } else {
            registry
        };
        let repository = if registry == DOCKER_HUB && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        validate_repository(&repository).map_err(|r| err(&r))?;
        Ok(Self {
            registry,
            repository,
            tag,
            digest,
        })
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// A URL as it may be shown: without user name or password.
pub fn url_without_credentials(url: &url::Url) -> String {
    let mut u = url.clone();
    let _ = u.set_username("");
    let _ = u.set_password(None);
    u.to_string()
}

/// API host for a registry name (`docker.io` → `registry-1.docker.io`).
pub fn api_host(registry: &str) -> &str {
    if registry == DOCKER_HUB {
        DOCKER_HUB_API_HOST
    } else {
        registry
    }
}

/// Whether `host` (optionally with `:port`, IPv6 in brackets) is a loopback host.
pub fn is_loopback_host(host: &str) -> bool {
    let h = strip_port(host);
    if h.eq_ignore_ascii_case("localhost") {
        return true;
    }
    h.trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
        .is_ok_and(|ip| ip.is_loopback())
}

/// `host` without a trailing `:port` (IPv6 literals keep their brackets).
pub fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return match rest.find(']') {
            Some(i) => &host[..i + 2],
            None => host,
        };
    }
    match host.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') && p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

/// What a tag may be.
pub const TAG_RULE: &str = "up to 128 of [A-Za-z0-9_.-], not starting with . or -";

/// Check a tag: `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
pub fn validate_tag(tag: &str) -> Result<(), String> {
    let ok = !tag.is_empty()
        && tag.len() <= 128
        && tag
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_')
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!("invalid tag {tag:?}: {TAG_RULE}"))
    }
}

/// Check a repository path: `/`-separated lowercase components joined by `.`, `_`, `__` or `-`.
pub fn validate_repository(repo: &str) -> Result<(), String> {
    if repo.is_empty() {
        return Err("empty repository name".into());
    }
    if repo.len() > 255 {
        return Err("repository name longer than 255 characters".into());
    }
    for comp in repo.split('/') {
        if !valid_component(comp) {
            return Err(format!(
                "invalid repository component {comp:?}: lowercase letters and digits, \
                 separated by '.', '_', '__' or '-'"
            ));
        }
    }
    Ok(())
}

fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_defaults() {
        let r: Reference = "debian".parse().unwrap();
        assert_eq!(r.registry, "docker.io");
        assert_eq!(r.repository, "library/debian");
        assert_eq!(r.tag, None);
        assert_eq!(r.manifest_reference(), "latest");
        assert_eq!(r.api_host(), "registry-1.docker.io");
        let r: Reference = "user/app:1.2".parse().unwrap();
        assert_eq!(r.repository, "user/app");
        assert_eq!(r.tag.as_deref(), Some("1.2"));
        let r: Reference = "index.docker.io/debian:12".parse().unwrap();
        assert_eq!(r.to_string(), "docker.io/library/debian:12");
    }

    #[test]
    fn registries_ports_digests() {
        let d = "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";
        let r: Reference = format!("127.0.0.1:5000/a/b-c:v1@{d}").parse().unwrap();
        assert_eq!(r.registry, "127.0.0.1:5000");
        assert_eq!(r.repository, "a/b-c");
        assert_eq!(r.tag.as_deref(), Some("v1"));
        assert_eq!(r.manifest_reference(), d);
        assert!(r.is_loopback());
        assert_eq!(r.to_string(), format!("127.0.0.1:5000/a/b-c:v1@{d}"));
        let r: Reference = "localhost/x".parse().unwrap();
        assert_eq!(r.registry, "localhost");
        let r: Reference = "123.dkr.ecr.us-east-1.amazonaws.com/team/app:7"
            .parse()
            .unwrap();
        assert_eq!(r.api_host(), "123.dkr.ecr.us-east-1.amazonaws.com");
        assert!(!r.is_loopback());
    }

    #[test]
    fn errors_quote_the_reference() {
        for bad in [
            "",
            "UPPER/case",
            "a//b",
            "x:",
            "x:-tag",
            "a/b@sha256:12",
            "a__-b",
        ] {
            let e = bad.parse::<Reference>().unwrap_err();
            assert!(e.to_string().contains(&format!("{bad:?}")), "{bad}: {e}");
        }
    }

    #[test]
    fn urls_are_shown_without_credentials() {
        let u = url::Url::parse("https://user:s3cret@mirror.example:5000/v2/").unwrap();
        let shown = url_without_credentials(&u);
        assert_eq!(shown, "https://mirror.example:5000/v2/");
        assert!(!shown.contains("s3cret"));
    }

    #[test]
    fn layout_refs() {
        let l = LayoutRef::parse("oci:/x:app:v1").unwrap();
        assert_eq!(l.dir, std::path::PathBuf::from("/x"));
        assert_eq!(l.reference.as_deref(), Some("app:v1"));
        assert_eq!(LayoutRef::parse("oci:/x:").unwrap().reference, None);
        assert_eq!(
            LayoutRef::parse("oci:d").unwrap().dir,
            std::path::PathBuf::from("d")
        );
        assert!(LayoutRef::parse("docker://x").is_none());
    }

    #[test]
    fn loopback_hosts() {
        assert!(is_loopback_host("localhost:5000"));
        assert!(is_loopback_host("127.0.0.1"));
        assert!(is_loopback_host("127.1.2.3:80"));
        assert!(is_loopback_host("[::1]:5000"));
        assert!(!is_loopback_host("10.0.0.1:5000"));
        assert!(!is_loopback_host("example.com"));
        assert_eq!(strip_port("[::1]:5000"), "[::1]");
        assert_eq!(strip_port("host:1"), "host");
    }
}
