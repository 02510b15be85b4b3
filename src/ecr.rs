//! Amazon ECR: authorization tokens, repositories, tag immutability and scan results.
//!
//! The only module that talks to the AWS SDK. It knows nothing of the registry data plane:
//! the push gets credentials through [`TokenProvider::token_fn`] and the registry host and
//! repository name from [`EcrRepo`].
//!
//! Errors keep the AWS error code (`UnrecognizedClientException`, `AccessDeniedException`, ...)
//! and never contain credentials or tokens.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_ecr::config::http::HttpResponse;
use aws_sdk_ecr::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_ecr::types::{
    EncryptionConfiguration, EncryptionType, ImageIdentifier, ImageScanningConfiguration,
    ImageTagMutability, ImageTagMutabilityExclusionFilter, ImageTagMutabilityExclusionFilterType,
};
use base64::Engine as _;

use crate::oci::Digest;
use crate::spec::EcrSettings;

/// How long before a token's announced expiry it is replaced.
const REFRESH_MARGIN: Duration = Duration::from_secs(15 * 60);
/// ECR's documented token lifetime, assumed when the token's own expiry is unusable.
const TOKEN_LIFETIME: Duration = Duration::from_secs(12 * 3600);

/// Errors of the ECR module.
#[derive(Debug, thiserror::Error)]
pub enum EcrError {
    /// `target.repository` is not an ECR repository.
    #[error("invalid ECR repository {repository:?}: {reason}")]
    InvalidRepository {
        /// The repository as written.
        repository: String,
        /// What is wrong.
        reason: String,
    },
    /// No region from `--region`, `target.ecr.region`, the repository host or the AWS config.
    #[error(
        "no AWS region for ECR{}: pass --region, set target.ecr.region, use a full repository \
         host (ACCOUNT.dkr.ecr.REGION.amazonaws.com/NAME), or configure one (AWS_REGION, or \
         `region` in the AWS profile)",
        profile.as_ref().map(|p| format!(" (profile {p} has no region, or does not exist)")).unwrap_or_default()
    )]
    NoRegion {
        /// The profile asked for, if any.
        profile: Option<String>,
    },
    /// The chosen region differs from the region in the repository host.
    #[error(
        "region {region} (from {from}) does not match repository host {host}, which is in {host_region}"
    )]
    RegionMismatch {
        /// The region chosen for the API.
        region: String,
        /// Where it came from.
        from: &'static str,
        /// The repository host.
        host: String,
        /// The host's region.
        host_region: String,
    },
    /// The default credential chain found no credentials.
    #[error(
        "no AWS credentials for ECR {operation}: {message}.\nSet AWS_ACCESS_KEY_ID/\
         AWS_SECRET_ACCESS_KEY, pass --profile (or AWS_PROFILE), run `aws sso login`, or run \
         where a role is available (web identity, ECS task role, instance profile)"
    )]
    NoCredentials {
        /// ECR API operation.
        operation: &'static str,
        /// What the SDK said.
        message: String,
        /// The cause.
        #[source]
        source: BoxError,
    },
    /// AWS refused the credentials (unknown key, bad signature, expired session).
    #[error(
        "AWS refused the credentials for ECR {operation} ({code}): {message}. Check the access \
         key / profile in use, or renew the session (`aws sso login`, new STS credentials)"
    )]
    Credentials {
        /// ECR API operation.
        operation: &'static str,
        /// AWS error code.
        code: String,
        /// AWS error message.
        message: String,
        /// The cause.
        #[source]
        source: BoxError,
    },
    /// The credentials are valid but IAM does not allow the operation.
    #[error(
        "access denied for ECR {operation} ({code}): {message}. The IAM policy must allow \
         ecr:{operation} (see docs/ecr.md)"
    )]
    AccessDenied {
        /// ECR API operation (also the IAM action name after `ecr:`).
        operation: &'static str,
        /// AWS error code.
        code: String,
        /// AWS error message.
        message: String,
        /// The cause.
        #[source]
        source: BoxError,
    },
    /// The repository does not exist (and may not be created).
    #[error(
        "ECR repository {repository} does not exist in account {account}, region {region}; \
         create it, or set `target.ecr.create_repository: true` in image.yaml"
    )]
    RepositoryNotFound {
        /// Repository name.
        repository: String,
        /// Registry (account) id.
        account: String,
        /// Region.
        region: String,
    },
    /// The ECR API could not be reached.
    #[error("cannot reach the ECR API for {operation} in {region}: {message}")]
    Network {
        /// ECR API operation.
        operation: &'static str,
        /// Region.
        region: String,
        /// What failed.
        message: String,
        /// The cause.
        #[source]
        source: BoxError,
    },
    /// Any other ECR API error.
    #[error("ECR {operation} failed ({code}): {message}")]
    Api {
        /// ECR API operation.
        operation: &'static str,
        /// AWS error code (`unknown` when the answer had none).
        code: String,
        /// AWS error message.
        message: String,
        /// The cause.
        #[source]
        source: BoxError,
    },
    /// GetAuthorizationToken answered something unusable (the token is never shown).
    #[error("ECR returned an unusable authorization token: {0}")]
    BadToken(String),
    /// The lifecycle policy file cannot be read.
    #[error("cannot read ECR lifecycle policy: {0}")]
    LifecyclePolicy(#[source] std::io::Error),
    /// Immutable tags already point at other images.
    #[error(
        "repository {repository} has immutable tags, and these already point at other images: \
         {}; this image is {wanted}. Push under new tags, or remove those tags in ECR first",
        conflicts.iter().map(|(t, d)| format!("{t} -> {d}")).collect::<Vec<_>>().join(", ")
    )]
    ImmutableTags {
        /// Repository URI.
        repository: String,
        /// `(tag, digest it holds)` pairs.
        conflicts: Vec<(String, String)>,
        /// The digest being pushed.
        wanted: String,
    },
    /// The registry refused a manifest PUT with `TAG_INVALID` (immutable tag).
    #[error(
        "the registry refused tag {tag} of {repository} with TAG_INVALID ({message}): the \
         repository's tags are immutable and {tag} already points at another image; push under a \
         new tag, or delete the tag in ECR first"
    )]
    TagRejected {
        /// Repository URI.
        repository: String,
        /// The tag.
        tag: String,
        /// The registry's message.
        message: String,
    },
    /// cosign's attachment tags would go to a repository whose immutable tags refuse them.
    #[error(
        "ECR repository {repository} has {mutability} tags and its registry does not answer the \
         OCI referrers API, so the signature and SBOM would go under cosign's tags ({}), which \
         immutable tags refuse; nothing was uploaded. Push through a registry endpoint that \
         answers the referrers API (Amazon ECR's own does), or exempt cosign's tags: create the \
         repository with target.ecr `tag_immutability: IMMUTABLE_WITH_EXCLUSION` and \
         `tag_immutability_exclusion_filters: [\"sha256-*\"]`, or change it with `aws ecr \
         put-image-tag-mutability --repository-name {name} --image-tag-mutability \
         IMMUTABLE_WITH_EXCLUSION --image-tag-mutability-exclusion-filters \
         filterType=WILDCARD,filter=sha256-*`",
        tags.join(", ")
    )]
    AttachmentTagsImmutable {
        /// Repository URI.
        repository: String,
        /// Repository name (for the command).
        name: String,
        /// Its tag mutability.
        mutability: String,
        /// The tags that would be written.
        tags: Vec<String>,
    },
    /// The image scan ended without findings.
    #[error("image scan of {image} ended with {status}: {description}")]
    ScanFailed {
        /// Image URI with digest.
        image: String,
        /// Scan status.
        status: String,
        /// ECR's description.
        description: String,
    },
    /// The image scan did not finish in time.
    #[error("image scan of {image} did not finish within {}s (last status {status})", timeout.as_secs())]
    ScanTimeout {
        /// Image URI with digest.
        image: String,
        /// The time allowed.
        timeout: Duration,
        /// Last status seen.
        status: String,
    },
}

impl crate::error::HasKind for EcrError {
    fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind;
        match self {
            EcrError::InvalidRepository { .. }
            | EcrError::NoRegion { .. }
            | EcrError::RegionMismatch { .. }
            | EcrError::LifecyclePolicy(_) => ErrorKind::BadInput,
            _ => ErrorKind::Failure,
        }
    }
}

/// A boxed error cause.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

impl EcrError {
    /// The AWS error code this error carries, if any.
    pub fn aws_code(&self) -> Option<&str> {
        match self {
            Self::Credentials { code, .. }
            | Self::AccessDenied { code, .. }
            | Self::Api { code, .. } => Some(code),
            Self::RepositoryNotFound { .. } => Some("RepositoryNotFoundException"),
            _ => None,
        }
    }

    /// Error for a registry `TAG_INVALID` answer to a manifest PUT (detected by its code).
    pub fn tag_rejected(repository: &str, tag: &str, message: &str) -> Self {
        let message = message.trim().trim_end_matches('.');
        Self::TagRejected {
            repository: repository.to_string(),
            tag: tag.to_string(),
            message: if message.is_empty() {
                "no message".to_string()
            } else {
                message.to_string()
            },
        }
    }
}

/// The registry error code ECR answers a manifest PUT to an existing immutable tag with.
pub const TAG_INVALID: &str = "TAG_INVALID";
/// The registry error code ECR answers requests for a repository that does not exist with.
pub const NAME_UNKNOWN: &str = "NAME_UNKNOWN";

/// What kind of failure an AWS error code denotes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodeClass {
    /// The credentials were refused (unknown key, bad signature, expired session).
    Credentials,
    /// IAM denied the action.
    AccessDenied,
    /// Anything else.
    Other,
}

/// Classify an AWS error code.
pub fn classify_code(code: &str) -> CodeClass {
    match code {
        "UnrecognizedClientException"
        | "InvalidClientTokenId"
        | "InvalidSignatureException"
        | "SignatureDoesNotMatch"
        | "IncompleteSignature"
        | "IncompleteSignatureException"
        | "MissingAuthenticationToken"
        | "MissingAuthenticationTokenException"
        | "InvalidAccessKeyId"
        | "ExpiredToken"
        | "ExpiredTokenException"
        | "RequestExpired"
        | "AuthFailure" => CodeClass::Credentials,
        "AccessDeniedException" | "AccessDenied" | "UnauthorizedOperation" => {
            CodeClass::AccessDenied
        }
        _ => CodeClass::Other,
    }
}

/// Map an SDK error to an [`EcrError`], keeping the AWS error code.
fn map_sdk<E>(operation: &'static str, region: &str, err: SdkError<E, HttpResponse>) -> EcrError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let chain = error_chain(&err);
    if !matches!(err, SdkError::ServiceError(_) | SdkError::ResponseError(_)) {
        let source: BoxError = Box::new(err);
        return if is_missing_credentials(&chain) {
            let message = if let Some(i) = chain.find("no credentials found in chain") {
                // Keep the SDK's list of the sources it tried.
                chain[i..].trim_end().trim_end_matches('.').to_string()
            } else if chain.contains("no identity resolver") {
                "no credentials provider is configured".to_string()
            } else {
                short_cause(&chain)
            };
            EcrError::NoCredentials {
                operation,
                message,
                source,
            }
        } else if matches!(
            source.downcast_ref::<SdkError<E, HttpResponse>>(),
            Some(SdkError::DispatchFailure(_) | SdkError::TimeoutError(_))
        ) {
            EcrError::Network {
                operation,
                region: region.to_string(),
                message: short_cause(&chain),
                source,
            }
        } else {
            EcrError::Api {
                operation,
                code: "unknown".into(),
                message: short_cause(&chain),
                source,
            }
        };
    }
    // An answer the SDK could not parse (e.g. an XML error from a proxy or emulator) still
    // names its code somewhere: header, JSON `__type`, or XML `<Code>`.
    let raw = err.raw_response().map(raw_error).unwrap_or_default();
    let code =
        err.code()
            .map(str::to_string)
            .or(raw.0)
            .unwrap_or_else(|| match err.raw_response() {
                Some(r) => format!("unknown, HTTP {}", r.status().as_u16()),
                None => "unknown".into(),
            });
    let message = err
        .message()
        .map(str::to_string)
        .or(raw.1)
        .map(|m| m.trim().trim_end_matches('.').to_string())
        .unwrap_or_else(|| short_cause(&chain));
    let source: BoxError = Box::new(err);
    match classify_code(&code) {
        CodeClass::Credentials => EcrError::Credentials {
            operation,
            code,
            message,
            source,
        },
        CodeClass::AccessDenied => EcrError::AccessDenied {
            operation,
            code,
            message,
            source,
        },
        CodeClass::Other => EcrError::Api {
            operation,
            code,
            message,
            source,
        },
    }
}

/// `(code, message)` from a raw AWS error answer.
fn raw_error(resp: &HttpResponse) -> (Option<String>, Option<String>) {
    let body = resp
        .body()
        .bytes()
        .map(String::from_utf8_lossy)
        .unwrap_or_default();
    let header = resp
        .headers()
        .get("x-amzn-errortype")
        .and_then(|h| h.split(':').next())
        .filter(|c| !c.is_empty())
        .map(str::to_string);
    let json: Option<serde_json::Value> = serde_json::from_str(&body).ok();
    let json_str = |k: &str| {
        json.as_ref()
            .and_then(|j| j.get(k))
            .and_then(|v| v.as_str())
            .map(str::to_string)
    };
    let xml = |tag: &str| {
        let open = format!("<{tag}>");
        let start = body.find(&open)? + open.len();
        let end = body[start..].find(&format!("</{tag}>"))?;
        Some(body[start..start + end].trim().to_string())
    };
    let code = header
        .or_else(|| json_str("__type").map(|t| t.rsplit('#').next().unwrap_or(&t).to_string()))
        .or_else(|| json_str("code"))
        .or_else(|| xml("Code"));
    let message = json_str("message")
        .or_else(|| json_str("Message"))
        .or_else(|| xml("Message"));
    (code, message)
}

/// Whether an SDK error chain says no credentials were found.
fn is_missing_credentials(chain: &str) -> bool {
    [
        "no credentials",
        "NoCredentials",
        "no identity resolver",
        "failed to load credentials",
        "the credential provider was not enabled",
        "no providers in chain provided credentials",
    ]
    .iter()
    .any(|m| chain.contains(m))
}

/// `outer: cause: inner cause`, from Display only (an SDK error's Debug holds whole responses).
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !parts.iter().any(|p| p.contains(&t)) {
            parts.push(t);
        }
        cur = c.source();
    }
    parts.join(": ")
}

/// The innermost useful cause of an SDK error chain (`a: b: c` -> `c`, at most 300 chars).
fn short_cause(chain: &str) -> String {
    let s = chain.trim();
    if s.len() <= 300 {
        return s.to_string();
    }
    let mut end = 300;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

pub use crate::auth::Secret;

/// An ECR repository as written in `target.repository`, before account/region are known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EcrRepoRef {
    /// Registry host when given (`ACCOUNT.dkr.ecr.REGION.amazonaws.com`).
    pub host: Option<String>,
    /// Repository name inside the registry (`team/wordpress`).
    pub name: String,
    /// Account id from the host or `target.ecr.account`.
    pub account: Option<String>,
    /// Region from the host (never from settings: see [`choose_region`]).
    pub host_region: Option<String>,
}

/// Parts of an ECR registry host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EcrHost {
    /// Account id (12 digits).
    pub account: String,
    /// Region.
    pub region: String,
    /// FIPS endpoint (`dkr.ecr-fips`).
    pub fips: bool,
}

/// Parse an ECR registry host: `ACCOUNT.dkr.ecr[-fips].REGION.amazonaws.com[.cn]` (also the
/// ISO partitions and dual-stack `ACCOUNT.dkr-ecr[-fips].REGION.on.aws`). `None` if not ECR.
pub fn parse_ecr_host(host: &str) -> Option<EcrHost> {
    let host = host.to_ascii_lowercase();
    let labels: Vec<&str> = host.split('.').collect();
    let account = *labels.first()?;
    if account.len() != 12 || !account.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (fips, region, suffix) = match labels.get(1..)? {
        ["dkr", ecr @ ("ecr" | "ecr-fips"), region, suffix @ ..] => {
            (*ecr == "ecr-fips", *region, suffix.join("."))
        }
        [dkr @ ("dkr-ecr" | "dkr-ecr-fips"), region, suffix @ ..] => {
            (*dkr == "dkr-ecr-fips", *region, suffix.join("."))
        }
        _ => return None,
    };
    let known = [
        "amazonaws.com",
        "amazonaws.com.cn",
        "c2s.ic.gov",
        "sc2s.sgov.gov",
        "on.aws",
    ];
    if !known.contains(&suffix.as_str()) || !valid_region(region) {
        return None;
    }
    Some(EcrHost {
        account: account.to_string(),
        region: region.to_string(),
        fips,
    })
}

fn valid_region(r: &str) -> bool {
    !r.is_empty()
        && r.split('-').count() >= 3
        && r.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// The ECR registry host for an account and region (`amazonaws.com.cn` in China regions).
pub fn registry_host(account: &str, region: &str) -> String {
    let suffix = if region.starts_with("cn-") {
        "amazonaws.com.cn"
    } else {
        "amazonaws.com"
    };
    format!("{account}.dkr.ecr.{region}.{suffix}")
}

/// `HOST/REPOSITORY@DIGEST`, the image URI the push prints.
pub fn image_uri(host: &str, repository: &str, digest: &Digest) -> String {
    format!("{host}/{repository}@{digest}")
}

fn valid_repo_name(name: &str) -> bool {
    // ECR: (?:[a-z0-9]+(?:[._-][a-z0-9]+)*/)*[a-z0-9]+(?:[._-][a-z0-9]+)*, 2..=256 chars
    (2..=256).contains(&name.len())
        && name.split('/').all(|c| {
            !c.is_empty()
                && c.split(['.', '_', '-']).all(|p| {
                    !p.is_empty()
                        && p.bytes()
                            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
                })
        })
}

impl EcrRepoRef {
    /// Parse `target.repository`: a full `HOST/NAME` (HOST an ECR registry host) or a bare
    /// repository name, with `target.ecr.account` for bare names.
    pub fn parse(repository: &str, settings: Option<&EcrSettings>) -> Result<Self, EcrError> {
        let bad = |reason: &str| EcrError::InvalidRepository {
            repository: repository.to_string(),
            reason: reason.to_string(),
        };
        let repository_trimmed = repository.trim();
        let (host, name) = match repository_trimmed.split_once('/') {
            Some((first, rest)) if first.contains(['.', ':']) || first == "localhost" => {
                (Some(first), rest)
            }
            _ => (None, repository_trimmed),
        };
        if name.contains([':', '@']) {
            return Err(bad(
                "give the repository without a tag or digest (tags go in target.tags)",
            ));
        }
        if !valid_repo_name(name) {
            return Err(bad(
                "repository names are lowercase letters, digits and . _ - separated path components (2-256 characters)",
            ));
        }
        let settings_account = settings.and_then(|s| s.account.clone());
        match host {
            Some(h) => {
                let parsed = parse_ecr_host(h).ok_or_else(|| {
                    bad(&format!(
                        "{h} is not an Amazon ECR registry host (ACCOUNT.dkr.ecr.REGION.amazonaws.com); \
                         use --registry-endpoint to send ECR traffic elsewhere"
                    ))
                })?;
                if let Some(a) = settings_account.filter(|a| *a != parsed.account) {
                    return Err(bad(&format!(
                        "target.ecr.account {a} differs from the host's account {}",
                        parsed.account
                    )));
                }
                Ok(Self {
                    host: Some(h.to_ascii_lowercase()),
                    name: name.to_string(),
                    account: Some(parsed.account),
                    host_region: Some(parsed.region),
                })
            }
            None => {
                if let Some(a) = &settings_account {
                    if a.len() != 12 || !a.bytes().all(|b| b.is_ascii_digit()) {
                        return Err(bad(&format!(
                            "target.ecr.account {a:?} is not a 12-digit AWS account id"
                        )));
                    }
                }
                Ok(Self {
                    host: None,
                    name: name.to_string(),
                    account: settings_account,
                    host_region: None,
                })
            }
        }
    }

    /// Complete the reference with the API region and the token's registry: a bare name
    /// without `target.ecr.account` lands in the caller's default registry (the token's
    /// proxyEndpoint).
    pub fn resolve(&self, region: &str, auth: &EcrAuth) -> Result<EcrRepo, EcrError> {
        if let Some(hr) = &self.host_region {
            if hr != region {
                return Err(EcrError::RegionMismatch {
                    region: region.to_string(),
                    from: "--region / target.ecr.region",
                    host: self.host.clone().unwrap_or_default(),
                    host_region: hr.clone(),
                });
            }
        }
        let token_host = auth.registry_host();
        let token_account = parse_ecr_host(&token_host).map(|h| h.account);
        let (host, account) = match (&self.host, &self.account) {
            (Some(h), Some(a)) => (h.clone(), a.clone()),
            (None, Some(a)) if token_account.as_deref() == Some(a.as_str()) => {
                (token_host.clone(), a.clone())
            }
            (None, Some(a)) => (registry_host(a, region), a.clone()),
            (_, None) => {
                let a = token_account.ok_or_else(|| {
                    EcrError::BadToken(format!(
                        "proxyEndpoint {token_host:?} is not an ECR registry host"
                    ))
                })?;
                (token_host.clone(), a)
            }
        };
        Ok(EcrRepo {
            host,
            name: self.name.clone(),
            account,
            region: region.to_string(),
        })
    }
}

/// Pick the API region: `--region`, then `target.ecr.region`, then the repository host.
/// `None` leaves it to the AWS config (`AWS_REGION`, profile).
pub fn choose_region(
    cli: Option<&str>,
    settings: Option<&EcrSettings>,
    repo: &EcrRepoRef,
) -> Option<String> {
    cli.map(str::to_string)
        .or_else(|| settings.and_then(|s| s.region.clone()))
        .or_else(|| repo.host_region.clone())
}

/// A fully resolved ECR repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EcrRepo {
    /// Registry host: the registry name in references and the credential key.
    pub host: String,
    /// Repository name inside the registry.
    pub name: String,
    /// Registry (account) id.
    pub account: String,
    /// Region.
    pub region: String,
}

impl EcrRepo {
    /// `HOST/NAME`.
    pub fn uri(&self) -> String {
        format!("{}/{}", self.host, self.name)
    }

    /// `HOST/NAME@DIGEST`.
    pub fn image_uri(&self, digest: &Digest) -> String {
        image_uri(&self.host, &self.name, digest)
    }
}

/// Registry credentials from GetAuthorizationToken.
#[derive(Debug, Clone)]
pub struct EcrAuth {
    /// User name (always `AWS` for ECR).
    pub username: String,
    /// Password (the token's secret part).
    pub password: Secret,
    /// Registry URL of the caller's default registry (`https://ACCOUNT.dkr.ecr.REGION.amazonaws.com`).
    pub proxy_endpoint: String,
    /// Announced expiry (may be in the past on emulators: never trusted to refuse a token).
    pub expires_at: Option<SystemTime>,
}

impl EcrAuth {
    /// Decode `base64("USER:PASSWORD")`.
    pub fn decode(
        token: &str,
        proxy_endpoint: &str,
        expires_at: Option<SystemTime>,
    ) -> Result<Self, EcrError> {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(token.trim())
            .map_err(|_| EcrError::BadToken("authorizationToken is not base64".into()))?;
        let text = String::from_utf8(raw)
            .map_err(|_| EcrError::BadToken("authorizationToken is not UTF-8".into()))?;
        let (user, pass) = text
            .split_once(':')
            .ok_or_else(|| EcrError::BadToken("authorizationToken has no USER:PASSWORD".into()))?;
        if user.is_empty() || pass.is_empty() {
            return Err(EcrError::BadToken(
                "authorizationToken has an empty user or password".into(),
            ));
        }
        Ok(Self {
            username: user.to_string(),
            password: Secret::new(pass),
            proxy_endpoint: proxy_endpoint.to_string(),
            expires_at,
        })
    }

    /// The proxy endpoint's host (scheme and trailing `/` removed).
    pub fn registry_host(&self) -> String {
        let s = self.proxy_endpoint.trim();
        let s = s
            .strip_prefix("https://")
            .or_else(|| s.strip_prefix("http://"))
            .unwrap_or(s);
        s.trim_end_matches('/').to_ascii_lowercase()
    }
}

/// Whether a token fetched at `fetched_at` may still be used at `now`. A token whose announced
/// expiry is missing or already past when fetched (emulators) is assumed to live ECR's 12 h.
pub fn token_usable(
    expires_at: Option<SystemTime>,
    fetched_at: SystemTime,
    now: SystemTime,
) -> bool {
    let until = match expires_at {
        Some(exp) if exp > fetched_at => exp,
        _ => fetched_at + TOKEN_LIFETIME,
    };
    now + REFRESH_MARGIN < until
}

/// Settings applied to a repository on creation, and what was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoStatus {
    /// The repository was created by this call.
    pub created: bool,
    /// Tag mutability (`MUTABLE`, `IMMUTABLE`, `IMMUTABLE_WITH_EXCLUSION`, ...).
    pub tag_mutability: String,
    /// Wildcard filters of tags exempt from the mutability setting.
    pub exclusion_filters: Vec<String>,
    /// Scan on push.
    pub scan_on_push: bool,
    /// Repository URI (`HOST/NAME`).
    pub uri: String,
    /// Differences between image.yaml and an existing repository (settings apply on create only).
    pub warnings: Vec<String>,
}

impl RepoStatus {
    /// Whether `tag` cannot be overwritten in this repository.
    pub fn tag_is_immutable(&self, tag: &str) -> bool {
        let excluded = self
            .exclusion_filters
            .iter()
            .any(|f| wildcard_match(f, tag));
        match self.tag_mutability.as_str() {
            "IMMUTABLE" => true,
            "IMMUTABLE_WITH_EXCLUSION" => !excluded,
            "MUTABLE_WITH_EXCLUSION" => excluded,
            _ => false,
        }
    }
}

/// ECR's tag filters: `*` matches any run of characters; everything else literally.
fn wildcard_match(pattern: &str, s: &str) -> bool {
    let literal: Vec<String> = pattern.split('*').map(globset::escape).collect();
    globset::GlobBuilder::new(&literal.join("*"))
        .literal_separator(false)
        .build()
        .is_ok_and(|g| g.compile_matcher().is_match(s))
}

/// What a tag holds in the repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TagStatus {
    /// The tag does not exist.
    Absent,
    /// The tag already points at the digest being pushed.
    Same,
    /// The tag points at another image.
    Other(String),
}

/// One tag's state before a push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagState {
    /// The tag.
    pub tag: String,
    /// What it holds.
    pub status: TagStatus,
}

/// Which tags a push must write.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TagPlan {
    /// Tags to PUT the manifest under.
    pub push: Vec<String>,
    /// Tags that already point at this digest (no PUT needed; an immutable repository would
    /// refuse it).
    pub unchanged: Vec<String>,
}

/// Decide the tags to push; an immutable tag holding another digest is an error, before any
/// upload.
pub fn plan_tags(
    repo: &RepoStatus,
    states: &[TagState],
    digest: &Digest,
) -> Result<TagPlan, EcrError> {
    let mut plan = TagPlan::default();
    let mut conflicts = Vec::new();
    for s in states {
        match &s.status {
            TagStatus::Absent => plan.push.push(s.tag.clone()),
            TagStatus::Same => plan.unchanged.push(s.tag.clone()),
            TagStatus::Other(d) if repo.tag_is_immutable(&s.tag) => {
                conflicts.push((s.tag.clone(), d.clone()))
            }
            TagStatus::Other(_) => plan.push.push(s.tag.clone()),
        }
    }
    if conflicts.is_empty() {
        Ok(plan)
    } else {
        Err(EcrError::ImmutableTags {
            repository: repo.uri.clone(),
            conflicts,
            wanted: digest.to_string(),
        })
    }
}

/// Finding severities in ascending order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    /// `INFORMATIONAL`.
    Informational,
    /// `LOW`.
    Low,
    /// `MEDIUM`.
    Medium,
    /// `HIGH`.
    High,
    /// `CRITICAL`.
    Critical,
}

impl Severity {
    /// All severities, ascending.
    pub const ALL: [Severity; 5] = [
        Severity::Informational,
        Severity::Low,
        Severity::Medium,
        Severity::High,
        Severity::Critical,
    ];

    /// ECR's name (`HIGH`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Informational => "INFORMATIONAL",
            Self::Low => "LOW",
            Self::Medium => "MEDIUM",
            Self::High => "HIGH",
            Self::Critical => "CRITICAL",
        }
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Severity {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|v| v.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                format!("unknown severity {s:?}: expected one of INFORMATIONAL, LOW, MEDIUM, HIGH, CRITICAL")
            })
    }
}

/// Result of an image scan.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ScanSummary {
    /// Scan status (`COMPLETE`, or `ACTIVE` for enhanced scanning).
    pub status: String,
    /// Finding counts by severity name (`HIGH` -> 3); includes `UNDEFINED`/`UNTRIAGED` if reported.
    pub counts: BTreeMap<String, i64>,
}

impl ScanSummary {
    /// Number of findings at `severity` or above.
    pub fn at_or_above(&self, severity: Severity) -> i64 {
        self.counts
            .iter()
            .filter(|(k, _)| Severity::from_str(k).is_ok_and(|s| s >= severity))
            .map(|(_, v)| *v)
            .sum()
    }

    /// Whether findings at `severity` or above exist (`--fail-on`).
    pub fn exceeds(&self, severity: Severity) -> bool {
        self.at_or_above(severity) > 0
    }
}

impl fmt::Display for ScanSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts: Vec<String> = Severity::ALL
            .iter()
            .rev()
            .map(|s| {
                format!(
                    "{} {}",
                    s,
                    self.counts.get(s.as_str()).copied().unwrap_or(0)
                )
            })
            .collect();
        for (k, v) in &self.counts {
            if Severity::from_str(k).is_err() {
                parts.push(format!("{k} {v}"));
            }
        }
        write!(f, "scan {}: {}", self.status, parts.join(", "))
    }
}

/// Future returned by a [`TokenFn`].
pub type TokenFuture = Pin<Box<dyn Future<Output = Result<(String, Secret), EcrError>> + Send>>;

/// Credential callback for the registry client: `f(refresh)` gives `(username, password)`;
/// call it with `true` after the registry answered 401 to the previous credentials.
pub type TokenFn = Arc<dyn Fn(bool) -> TokenFuture + Send + Sync>;

struct Cached {
    auth: EcrAuth,
    fetched_at: SystemTime,
}

struct TokenInner {
    client: aws_sdk_ecr::Client,
    region: String,
    cache: tokio::sync::Mutex<Option<Cached>>,
    fetches: AtomicUsize,
}

/// Cached ECR authorization: reuses the token while valid, fetches a new one when it nears
/// expiry or on [`refresh`](TokenProvider::refresh). Cheap to clone.
#[derive(Clone)]
pub struct TokenProvider {
    inner: Arc<TokenInner>,
}

impl fmt::Debug for TokenProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenProvider")
            .field("region", &self.inner.region)
            .field("fetches", &self.fetch_count())
            .finish()
    }
}

impl TokenProvider {
    /// Current credentials: the cached token if still usable, else a new one.
    pub async fn get(&self) -> Result<EcrAuth, EcrError> {
        let mut cache = self.inner.cache.lock().await;
        if let Some(c) = cache.as_ref() {
            if token_usable(c.auth.expires_at, c.fetched_at, SystemTime::now()) {
                return Ok(c.auth.clone());
            }
        }
        self.fetch_into(&mut cache).await
    }

    /// A new token (after the registry refused the current one). Refreshes that were waiting
    /// while another one fetched share its token (many uploads meeting a 401 together).
    pub async fn refresh(&self) -> Result<EcrAuth, EcrError> {
        let seen = self.fetch_count();
        let mut cache = self.inner.cache.lock().await;
        if let Some(c) = cache.as_ref() {
            if self.fetch_count() != seen {
                return Ok(c.auth.clone());
            }
        }
        self.fetch_into(&mut cache).await
    }

    /// Number of tokens fetched so far (successful GetAuthorizationToken calls).
    pub fn fetch_count(&self) -> usize {
        self.inner.fetches.load(Ordering::SeqCst)
    }

    /// The provider as a credential callback for the registry client.
    pub fn token_fn(&self) -> TokenFn {
        let this = self.clone();
        Arc::new(move |refresh| {
            let this = this.clone();
            Box::pin(async move {
                let auth = if refresh {
                    this.refresh().await?
                } else {
                    this.get().await?
                };
                Ok((auth.username, auth.password))
            })
        })
    }

    async fn fetch_into(&self, cache: &mut Option<Cached>) -> Result<EcrAuth, EcrError> {
        let op = "GetAuthorizationToken";
        let out = self
            .inner
            .client
            .get_authorization_token()
            .send()
            .await
            .map_err(|e| map_sdk(op, &self.inner.region, e))?;
        let data = out
            .authorization_data()
            .first()
            .ok_or_else(|| EcrError::BadToken("no authorizationData in the answer".into()))?;
        let token = data
            .authorization_token()
            .ok_or_else(|| EcrError::BadToken("no authorizationToken in the answer".into()))?;
        let endpoint = data
            .proxy_endpoint()
            .ok_or_else(|| EcrError::BadToken("no proxyEndpoint in the answer".into()))?;
        let expires = data
            .expires_at()
            .and_then(|d| SystemTime::try_from(*d).ok());
        let auth = EcrAuth::decode(token, endpoint, expires)?;
        *cache = Some(Cached {
            auth: auth.clone(),
            fetched_at: SystemTime::now(),
        });
        self.inner.fetches.fetch_add(1, Ordering::SeqCst);
        Ok(auth)
    }
}

/// An ECR API client for one region.
#[derive(Clone, Debug)]
pub struct EcrClient {
    client: aws_sdk_ecr::Client,
    region: String,
}

impl EcrClient {
    /// Client from the AWS default chain (env, shared config/credentials and `profile`, SSO,
    /// web identity, ECS, IMDS) with an optional region override; else the config's region.
    /// `AWS_ENDPOINT_URL_ECR` / `AWS_ENDPOINT_URL` redirect the API (tests, VPC endpoints).
    pub async fn new(region: Option<String>, profile: Option<String>) -> Result<Self, EcrError> {
        let mut loader = aws_config::defaults(BehaviorVersion::latest());
        if let Some(p) = &profile {
            loader = loader.profile_name(p);
        }
        if let Some(r) = region {
            loader = loader.region(Region::new(r));
        }
        Self::from_sdk_config(&loader.load().await).map_err(|e| match e {
            EcrError::NoRegion { .. } => EcrError::NoRegion { profile },
            e => e,
        })
    }

    /// Client from a prepared SDK config (must have a region).
    pub fn from_sdk_config(config: &SdkConfig) -> Result<Self, EcrError> {
        let region = config
            .region()
            .map(|r| r.to_string())
            .filter(|r| !r.is_empty())
            .ok_or(EcrError::NoRegion { profile: None })?;
        Ok(Self {
            client: aws_sdk_ecr::Client::new(config),
            region,
        })
    }

    /// The API region.
    pub fn region(&self) -> &str {
        &self.region
    }

    /// The underlying SDK client (for tests and tools).
    pub fn sdk(&self) -> &aws_sdk_ecr::Client {
        &self.client
    }

    /// A cached token provider for this client's region.
    pub fn token_provider(&self) -> TokenProvider {
        TokenProvider {
            inner: Arc::new(TokenInner {
                client: self.client.clone(),
                region: self.region.clone(),
                cache: tokio::sync::Mutex::new(None),
                fetches: AtomicUsize::new(0),
            }),
        }
    }

    /// One GetAuthorizationToken call (uncached; see [`token_provider`](Self::token_provider)).
    pub async fn authorization(&self) -> Result<EcrAuth, EcrError> {
        self.token_provider().get().await
    }

    fn err<E>(&self, op: &'static str, e: SdkError<E, HttpResponse>) -> EcrError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        map_sdk(op, &self.region, e)
    }

    fn not_found(&self, repo: &EcrRepo) -> EcrError {
        EcrError::RepositoryNotFound {
            repository: repo.name.clone(),
            account: repo.account.clone(),
            region: self.region.clone(),
        }
    }

    /// Make sure the repository exists: describe it, or create it with `settings` (scan on
    /// push, tag mutability, encryption, lifecycle policy) when `create_repository` is set.
    pub async fn ensure_repository(
        &self,
        repo: &EcrRepo,
        settings: &EcrSettings,
    ) -> Result<RepoStatus, EcrError> {
        match self.describe_repository(repo).await {
            Ok(mut status) => {
                status.warnings = differences(&status, settings);
                return Ok(status);
            }
            Err(EcrError::RepositoryNotFound { .. }) if settings.creates_repository() => {}
            Err(e) => return Err(e),
        }
        // Read the policy first: a bad file must not leave a half-configured repository.
        let policy = match &settings.lifecycle_policy {
            Some(p) => Some(fs_err::read_to_string(p).map_err(EcrError::LifecyclePolicy)?),
            None => None,
        };
        let mut req = self
            .client
            .create_repository()
            .repository_name(&repo.name)
            .registry_id(&repo.account);
        if let Some(s) = settings.scan_on_push {
            req = req.image_scanning_configuration(
                ImageScanningConfiguration::builder()
                    .scan_on_push(s)
                    .build(),
            );
        }
        if let Some(m) = &settings.tag_immutability {
            req = req.image_tag_mutability(ImageTagMutability::from(m.as_str()));
        }
        for f in settings.exclusion_filters() {
            let filter = ImageTagMutabilityExclusionFilter::builder()
                .filter_type(ImageTagMutabilityExclusionFilterType::Wildcard)
                .filter(f)
                .build()
                .map_err(|e| EcrError::Api {
                    operation: "CreateRepository",
                    code: "InvalidParameter".into(),
                    message: e.to_string(),
                    source: Box::new(e),
                })?;
            req = req.image_tag_mutability_exclusion_filters(filter);
        }
        if let Some(enc) = &settings.encryption {
            let mut b = EncryptionConfiguration::builder()
                .encryption_type(EncryptionType::from(enc.as_str()));
            if let Some(k) = &settings.kms_key {
                b = b.kms_key(k);
            }
            req = req.encryption_configuration(b.build().map_err(|e| EcrError::Api {
                operation: "CreateRepository",
                code: "InvalidParameter".into(),
                message: e.to_string(),
                source: Box::new(e),
            })?);
        }
        let created = match req.send().await {
            Ok(_) => true,
            // Another push created it meanwhile.
            Err(e) if e.code() == Some("RepositoryAlreadyExistsException") => false,
            Err(e) => return Err(self.err("CreateRepository", e)),
        };
        if let (true, Some(text)) = (created, policy) {
            self.client
                .put_lifecycle_policy()
                .repository_name(&repo.name)
                .registry_id(&repo.account)
                .lifecycle_policy_text(text)
                .send()
                .await
                .map_err(|e| self.err("PutLifecyclePolicy", e))?;
        }
        let mut status = self.describe_repository(repo).await?;
        status.created = created;
        if !created {
            status.warnings = differences(&status, settings);
        }
        Ok(status)
    }

    async fn describe_repository(&self, repo: &EcrRepo) -> Result<RepoStatus, EcrError> {
        let out = self
            .client
            .describe_repositories()
            .repository_names(&repo.name)
            .registry_id(&repo.account)
            .send()
            .await;
        let out = match out {
            Ok(o) => o,
            Err(e) if e.code() == Some("RepositoryNotFoundException") => {
                return Err(self.not_found(repo))
            }
            Err(e) => return Err(self.err("DescribeRepositories", e)),
        };
        let r = out
            .repositories()
            .iter()
            .find(|r| r.repository_name() == Some(repo.name.as_str()))
            .ok_or_else(|| self.not_found(repo))?;
        Ok(RepoStatus {
            created: false,
            tag_mutability: r
                .image_tag_mutability()
                .map(|m| m.as_str().to_string())
                .unwrap_or_else(|| "MUTABLE".into()),
            exclusion_filters: r
                .image_tag_mutability_exclusion_filters()
                .iter()
                .map(|f| f.filter().to_string())
                .collect(),
            scan_on_push: r
                .image_scanning_configuration()
                .is_some_and(|c| c.scan_on_push()),
            uri: r
                .repository_uri()
                .map(str::to_string)
                .unwrap_or_else(|| repo.uri()),
            warnings: Vec::new(),
        })
    }

    /// What each tag holds now (DescribeImages per tag).
    pub async fn check_tags(
        &self,
        repo: &EcrRepo,
        tags: &[String],
        digest: &Digest,
    ) -> Result<Vec<TagState>, EcrError> {
        let mut states = Vec::with_capacity(tags.len());
        for tag in tags {
            let out = self
                .client
                .describe_images()
                .repository_name(&repo.name)
                .registry_id(&repo.account)
                .image_ids(ImageIdentifier::builder().image_tag(tag).build())
                .send()
                .await;
            let status = match out {
                Ok(o) => match o.image_details().first().and_then(|d| d.image_digest()) {
                    None => TagStatus::Absent,
                    Some(d) if d == digest.to_string() => TagStatus::Same,
                    Some(d) => TagStatus::Other(d.to_string()),
                },
                Err(e) if e.code() == Some("ImageNotFoundException") => TagStatus::Absent,
                Err(e) if e.code() == Some("RepositoryNotFoundException") => {
                    return Err(self.not_found(repo))
                }
                Err(e) => return Err(self.err("DescribeImages", e)),
            };
            states.push(TagState {
                tag: tag.clone(),
                status,
            });
        }
        Ok(states)
    }

    /// Wait for the image's scan (starting one if none exists) and summarise its findings.
    pub async fn wait_scan(
        &self,
        repo: &EcrRepo,
        digest: &Digest,
        timeout: Duration,
    ) -> Result<ScanSummary, EcrError> {
        let image = repo.image_uri(digest);
        let id = ImageIdentifier::builder()
            .image_digest(digest.to_string())
            .build();
        let start = Instant::now();
        let mut started = false;
        let mut delay = Duration::from_secs(1);
        let mut last = String::from("NOT_STARTED");
        loop {
            let out = self
                .client
                .describe_image_scan_findings()
                .repository_name(&repo.name)
                .registry_id(&repo.account)
                .image_id(id.clone())
                .send()
                .await;
            match out {
                Ok(o) => {
                    let st = o.image_scan_status();
                    last = st
                        .and_then(|s| s.status())
                        .map(|s| s.as_str().to_string())
                        .unwrap_or_else(|| "UNKNOWN".into());
                    match last.as_str() {
                        "COMPLETE" | "ACTIVE" => {
                            let counts = o
                                .image_scan_findings()
                                .and_then(|f| f.finding_severity_counts())
                                .map(|m| {
                                    m.iter()
                                        .map(|(k, v)| (k.as_str().to_string(), i64::from(*v)))
                                        .collect()
                                })
                                .unwrap_or_default();
                            return Ok(ScanSummary {
                                status: last,
                                counts,
                            });
                        }
                        "IN_PROGRESS" | "PENDING" | "UNKNOWN" => {}
                        _ => {
                            return Err(EcrError::ScanFailed {
                                image,
                                status: last,
                                description: st
                                    .and_then(|s| s.description())
                                    .unwrap_or("no description")
                                    .to_string(),
                            })
                        }
                    }
                }
                Err(e) if e.code() == Some("ScanNotFoundException") && !started => {
                    started = true;
                    match self
                        .client
                        .start_image_scan()
                        .repository_name(&repo.name)
                        .registry_id(&repo.account)
                        .image_id(id.clone())
                        .send()
                        .await
                    {
                        // Already scanned today / a scan-on-push is running / enhanced scanning
                        // (continuous): keep polling.
                        Ok(_) => continue,
                        Err(e)
                            if matches!(
                                e.code(),
                                Some("LimitExceededException" | "ValidationException")
                            ) => {}
                        Err(e) => return Err(self.err("StartImageScan", e)),
                    }
                }
                Err(e) if e.code() == Some("ScanNotFoundException") => {}
                Err(e) if e.code() == Some("RepositoryNotFoundException") => {
                    return Err(self.not_found(repo))
                }
                Err(e) => return Err(self.err("DescribeImageScanFindings", e)),
            }
            let left = timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Err(EcrError::ScanTimeout {
                    image,
                    timeout,
                    status: last,
                });
            }
            tokio::time::sleep(delay.min(left)).await;
            delay = (delay * 2).min(Duration::from_secs(10));
        }
    }
}

/// Settings of image.yaml that an existing repository does not have (applied on create only).
fn differences(status: &RepoStatus, settings: &EcrSettings) -> Vec<String> {
    let mut w = Vec::new();
    if let Some(m) = &settings.tag_immutability {
        if !status.tag_mutability.starts_with(m.as_str()) {
            w.push(format!(
                "target.ecr.tag_immutability is {m} but repository {} is {} (settings apply on create only)",
                status.uri, status.tag_mutability
            ));
        }
    }
    if let Some(s) = settings.scan_on_push {
        if s != status.scan_on_push {
            w.push(format!(
                "target.ecr.scan_on_push is {s} but repository {} has scan on push {} (settings apply on create only)",
                status.uri, status.scan_on_push
            ));
        }
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(account: Option<&str>) -> EcrSettings {
        EcrSettings {
            account: account.map(str::to_string),
            ..Default::default()
        }
    }

    #[test]
    fn parses_ecr_hosts() {
        let h = parse_ecr_host("123456789012.dkr.ecr.us-east-1.amazonaws.com").unwrap();
        assert_eq!(
            (h.account.as_str(), h.region.as_str(), h.fips),
            ("123456789012", "us-east-1", false)
        );
        let h = parse_ecr_host("123456789012.dkr.ecr.cn-north-1.amazonaws.com.cn").unwrap();
        assert_eq!(h.region, "cn-north-1");
        let h = parse_ecr_host("123456789012.dkr.ecr-fips.us-gov-west-1.amazonaws.com").unwrap();
        assert!(h.fips);
        assert_eq!(h.region, "us-gov-west-1");
        let h = parse_ecr_host("123456789012.dkr-ecr.eu-west-1.on.aws").unwrap();
        assert_eq!(h.region, "eu-west-1");
        assert!(parse_ecr_host("registry.example.com").is_none());
        assert!(parse_ecr_host("12345.dkr.ecr.us-east-1.amazonaws.com").is_none());
        assert!(parse_ecr_host("123456789012.dkr.ecr.us-east-1.example.com").is_none());
        assert!(parse_ecr_host("123456789012.dkr.ecr.amazonaws.com").is_none());
    }

    #[test]
    fn parses_repository_forms() {
        let r = EcrRepoRef::parse(
            "123456789012.dkr.ecr.us-east-1.amazonaws.com/team/wordpress",
            None,
        )
        .unwrap();
        assert_eq!(r.name, "team/wordpress");
        assert_eq!(r.account.as_deref(), Some("123456789012"));
        assert_eq!(r.host_region.as_deref(), Some("us-east-1"));
        let r = EcrRepoRef::parse("wordpress", Some(&settings(Some("210987654321")))).unwrap();
        assert_eq!((r.host, r.account.as_deref()), (None, Some("210987654321")));
        for bad in [
            "registry.example.com/wordpress",
            "123456789012.dkr.ecr.us-east-1.amazonaws.com/wordpress:latest",
            "WordPress",
            "a",
        ] {
            let e = EcrRepoRef::parse(bad, None).unwrap_err();
            assert!(e.to_string().contains(bad), "{e}");
        }
        let e = EcrRepoRef::parse("wordpress", Some(&settings(Some("42")))).unwrap_err();
        assert!(e.to_string().contains("12-digit"), "{e}");
        let e = EcrRepoRef::parse(
            "123456789012.dkr.ecr.us-east-1.amazonaws.com/wordpress",
            Some(&settings(Some("210987654321"))),
        )
        .unwrap_err();
        assert!(e.to_string().contains("differs"), "{e}");
    }

    fn auth(endpoint: &str) -> EcrAuth {
        EcrAuth {
            username: "AWS".into(),
            password: Secret::new("pw"),
            proxy_endpoint: endpoint.into(),
            expires_at: None,
        }
    }

    #[test]
    fn resolves_bare_names_and_regions() {
        let a = auth("https://123456789012.dkr.ecr.eu-west-1.amazonaws.com");
        let r = EcrRepoRef::parse("wordpress", None).unwrap();
        let repo = r.resolve("eu-west-1", &a).unwrap();
        assert_eq!(
            repo.uri(),
            "123456789012.dkr.ecr.eu-west-1.amazonaws.com/wordpress"
        );
        assert_eq!(repo.account, "123456789012");
        let r = EcrRepoRef::parse("wordpress", Some(&settings(Some("210987654321")))).unwrap();
        let repo = r.resolve("cn-north-1", &a).unwrap();
        assert_eq!(
            repo.host,
            "210987654321.dkr.ecr.cn-north-1.amazonaws.com.cn"
        );
        let r = EcrRepoRef::parse("123456789012.dkr.ecr.us-east-1.amazonaws.com/wp", None).unwrap();
        let e = r.resolve("eu-west-1", &a).unwrap_err();
        assert!(matches!(e, EcrError::RegionMismatch { .. }), "{e}");
        let s = EcrSettings {
            region: Some("us-west-2".into()),
            ..Default::default()
        };
        assert_eq!(
            choose_region(Some("eu-central-1"), Some(&s), &r).as_deref(),
            Some("eu-central-1")
        );
        assert_eq!(
            choose_region(None, Some(&s), &r).as_deref(),
            Some("us-west-2")
        );
        assert_eq!(choose_region(None, None, &r).as_deref(), Some("us-east-1"));
        let bare = EcrRepoRef::parse("wp", None).unwrap();
        assert_eq!(choose_region(None, None, &bare), None);
    }

    #[test]
    fn decodes_tokens_without_leaking_them() {
        let tok = base64::engine::general_purpose::STANDARD.encode("AWS:s3cr3t-password");
        let a = EcrAuth::decode(
            &tok,
            "https://123456789012.dkr.ecr.us-east-1.amazonaws.com/",
            None,
        )
        .unwrap();
        assert_eq!(a.username, "AWS");
        assert_eq!(a.password.expose(), "s3cr3t-password");
        assert_eq!(
            a.registry_host(),
            "123456789012.dkr.ecr.us-east-1.amazonaws.com"
        );
        let dbg = format!("{a:?} {}", a.password);
        assert!(!dbg.contains("s3cr3t"), "{dbg}");
        let bad = base64::engine::general_purpose::STANDARD.encode("no-colon-s3cr3t");
        let e = EcrAuth::decode(&bad, "x", None).unwrap_err().to_string();
        assert!(!e.contains("s3cr3t") && e.contains("USER:PASSWORD"), "{e}");
        assert!(EcrAuth::decode("!!!", "x", None).is_err());
    }

    #[test]
    fn token_validity() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let h = |n: u64| Duration::from_secs(n * 3600);
        // Announced 12 h validity: reused for hours, replaced shortly before expiry.
        assert!(token_usable(Some(t0 + h(12)), t0, t0 + h(11)));
        assert!(!token_usable(
            Some(t0 + h(12)),
            t0,
            t0 + h(12) - Duration::from_secs(60)
        ));
        // Expiry in the past when fetched (moto: 2015): assume 12 h, never refuse up front.
        let past = SystemTime::UNIX_EPOCH + Duration::from_secs(1_420_070_400);
        assert!(token_usable(Some(past), t0, t0));
        assert!(token_usable(Some(past), t0, t0 + h(11)));
        assert!(!token_usable(Some(past), t0, t0 + h(12)));
        assert!(token_usable(None, t0, t0 + h(1)));
    }

    #[test]
    fn classifies_codes() {
        for c in [
            "UnrecognizedClientException",
            "InvalidClientTokenId",
            "ExpiredTokenException",
            "InvalidSignatureException",
            "SignatureDoesNotMatch",
        ] {
            assert_eq!(classify_code(c), CodeClass::Credentials, "{c}");
        }
        assert_eq!(
            classify_code("AccessDeniedException"),
            CodeClass::AccessDenied
        );
        assert_eq!(classify_code("AccessDenied"), CodeClass::AccessDenied);
        assert_eq!(
            classify_code("RepositoryNotFoundException"),
            CodeClass::Other
        );
    }

    fn status(m: &str, filters: &[&str]) -> RepoStatus {
        RepoStatus {
            created: false,
            tag_mutability: m.into(),
            exclusion_filters: filters.iter().map(|s| s.to_string()).collect(),
            scan_on_push: false,
            uri: "123456789012.dkr.ecr.us-east-1.amazonaws.com/wp".into(),
            warnings: vec![],
        }
    }

    #[test]
    fn plans_tags_and_detects_immutable_conflicts() {
        let d = Digest::of_bytes(b"x");
        let other = Digest::of_bytes(b"y").to_string();
        let states = vec![
            TagState {
                tag: "new".into(),
                status: TagStatus::Absent,
            },
            TagState {
                tag: "same".into(),
                status: TagStatus::Same,
            },
            TagState {
                tag: "v1".into(),
                status: TagStatus::Other(other.clone()),
            },
        ];
        let p = plan_tags(&status("MUTABLE", &[]), &states, &d).unwrap();
        assert_eq!(p.push, vec!["new", "v1"]);
        assert_eq!(p.unchanged, vec!["same"]);
        let e = plan_tags(&status("IMMUTABLE", &[]), &states, &d)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("v1 -> {other}")) && e.contains(&d.to_string()),
            "{e}"
        );
        // latest excluded from immutability: may move; v1 not.
        let st = status("IMMUTABLE_WITH_EXCLUSION", &["lat*"]);
        assert!(!st.tag_is_immutable("latest") && st.tag_is_immutable("v1"));
        let st = status("MUTABLE_WITH_EXCLUSION", &["v*"]);
        assert!(st.tag_is_immutable("v1") && !st.tag_is_immutable("latest"));
        assert!(wildcard_match("a*b*c", "axxbyyc") && !wildcard_match("a*b*c", "axxc"));
        assert!(
            wildcard_match("*", "") && wildcard_match("v1", "v1") && !wildcard_match("v1", "v12")
        );
        // Only `*` is special; `?`, `[` and `.` match themselves.
        assert!(wildcard_match("v?.[1]*", "v?.[1]-rc") && !wildcard_match("v?", "v1"));
        assert!(wildcard_match("sha256-*.sig", "sha256-ab.sig"));
    }

    #[test]
    fn severities_and_summary() {
        let s = ScanSummary {
            status: "COMPLETE".into(),
            counts: [
                ("HIGH".to_string(), 2),
                ("LOW".to_string(), 5),
                ("UNDEFINED".to_string(), 1),
            ]
            .into_iter()
            .collect(),
        };
        assert!(s.exceeds(Severity::High) && s.exceeds("medium".parse().unwrap()));
        assert!(!s.exceeds(Severity::Critical));
        assert_eq!(s.at_or_above(Severity::Low), 7);
        assert_eq!(
            s.to_string(),
            "scan COMPLETE: CRITICAL 0, HIGH 2, MEDIUM 0, LOW 5, INFORMATIONAL 0, UNDEFINED 1"
        );
        assert!("severe".parse::<Severity>().is_err());
    }

    #[test]
    fn image_uris() {
        let d = Digest::of_bytes(b"m");
        assert_eq!(
            image_uri("h.example", "a/b", &d),
            format!("h.example/a/b@{d}")
        );
    }
}
