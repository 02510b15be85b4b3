//! Publishing: where a push goes ([`PushTarget`]: a registry or Amazon ECR, one tag rule) and
//! the ECR side of it (repository, tag immutability, token, scan) around the registry client's
//! push; ECR credentials for pulls and the cache repository.

mod attach;
mod target;

pub use attach::{AttachReport, Attachments, SbomAttachment, SignatureAttachment};
pub use target::{index_entries, push_tags, PushDetails, PushOutcome, PushTarget, TargetKind};

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use serde::Serialize;

use crate::auth::{
    AuthError, Credential, CredentialProvider, DockerConfigProvider, SharedCredentialProvider,
};
use crate::ecr::{self, EcrClient, EcrError, EcrRepoRef, ScanSummary, Severity, TokenFn};
use crate::events::{Event, SharedReporter};
use crate::layout::Layout;
use crate::oci::Descriptor;
use crate::reference::Reference;
use crate::registry::{Client, ClientOptions, PushReport, RegistryError};
use crate::spec::EcrSettings;

/// Errors of a push.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The ECR API refused or failed.
    #[error(transparent)]
    Ecr(#[from] EcrError),
    /// The registry data plane failed.
    #[error(transparent)]
    Registry(#[from] Box<RegistryError>),
    /// Scan findings at or above `--fail-on`.
    #[error("image scan found {count} finding(s) at or above {severity:?}: {summary}")]
    Findings {
        /// Threshold.
        severity: Severity,
        /// Findings at or above it.
        count: i64,
        /// The whole summary.
        summary: String,
    },
    /// The registry answered `NAME_UNKNOWN` for a repository the ECR API says exists.
    #[error(
        "the registry does not know ECR repository {repository} (NAME_UNKNOWN) although the ECR \
         API reports that it exists (deleted meanwhile, or a registry host or --registry-endpoint \
         of another account or region)"
    )]
    RepositoryUnknown {
        /// Repository URI.
        repository: String,
        /// The registry's answer.
        #[source]
        source: Box<RegistryError>,
    },
    /// The destination cannot be a registry reference.
    #[error("ECR repository {0:?} is not a valid reference")]
    BadRepository(String),
    /// Signing or attaching failed.
    #[error("attaching the signature and SBOM")]
    Attach(#[source] Box<crate::sign::SignError>),
    /// An SBOM of the layout could not be read.
    #[error("reading the SBOM to attach")]
    Sbom(#[source] Box<crate::sbom::SbomError>),
}

impl crate::error::HasKind for PublishError {
    fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind;
        match self {
            PublishError::Ecr(e) => e.kind(),
            PublishError::Registry(e) => e.kind(),
            PublishError::Findings { .. } => ErrorKind::Findings,
            PublishError::BadRepository(_) => ErrorKind::BadInput,
            PublishError::Attach(e) => e.kind(),
            PublishError::RepositoryUnknown { .. } | PublishError::Sbom(_) => ErrorKind::Failure,
        }
    }
}

/// Options of an ECR push.
#[derive(Clone, Default)]
pub struct EcrPushOptions {
    /// `target.repository` or `--to` (full ECR URI or a bare repository name).
    pub repository: String,
    /// Tags.
    pub tags: Vec<String>,
    /// `target.ecr` settings.
    pub settings: EcrSettings,
    /// `--region`.
    pub region: Option<String>,
    /// `--profile`.
    pub profile: Option<String>,
    /// Registry client options (jobs, chunking, TLS).
    pub client: ClientOptions,
    /// `--registry-endpoint`: send the ECR registry's requests here (mirror or test registry).
    pub registry_endpoint: Option<url::Url>,
    /// `--wait-scan` timeout.
    pub wait_scan: Option<Duration>,
    /// `--fail-on`.
    pub fail_on: Option<Severity>,
}

/// What an ECR push did.
#[derive(Debug, Serialize)]
pub struct EcrPushReport {
    /// `HOST/REPO@sha256:...` for task definitions.
    pub image_uri: String,
    /// Whether the repository was created.
    pub repository_created: bool,
    /// Settings of an existing repository that differ from image.yaml.
    pub warnings: Vec<String>,
    /// Tags that already pointed at this digest.
    pub unchanged_tags: Vec<String>,
    /// The registry push (absent when every tag already held this image).
    pub push: Option<PushReport>,
    /// Scan result with `--wait-scan`.
    pub scan: Option<ScanSummary>,
}

/// Credentials for the registry from ECR tokens, refreshed on a 401.
struct EcrTokens(TokenFn);

impl CredentialProvider for EcrTokens {
    fn credential<'a>(
        &'a self,
        registry: &'a str,
        refresh: bool,
    ) -> BoxFuture<'a, Result<Credential, AuthError>> {
        let f = (self.0)(refresh);
        Box::pin(async move {
            let (username, password) = f.await.map_err(|e| AuthError::Provider {
                registry: registry.to_string(),
                source: Box::new(e),
            })?;
            Ok(Credential::Basic { username, password })
        })
    }
}

/// Credentials for pulling from an ECR registry (base images of a build): ECR tokens from the
/// AWS SDK default chain for the registry's region, fetched on first use and refreshed on a 401;
/// when the SDK has no usable credentials (or the API refuses), the `fallback` provider's
/// (Docker config) credentials, if it has any.
pub struct EcrPullCredentials {
    region: String,
    profile: Option<String>,
    tokens: tokio::sync::OnceCell<TokenFn>,
    fallback: SharedCredentialProvider,
}

impl EcrPullCredentials {
    /// Tokens from an ECR API client built lazily from the default chain for `region`.
    pub fn new(region: &str, profile: Option<String>, fallback: SharedCredentialProvider) -> Self {
        Self {
            region: region.to_string(),
            profile,
            tokens: tokio::sync::OnceCell::new(),
            fallback,
        }
    }

    /// Tokens from an existing ECR API client (custom SDK configuration).
    pub fn with_client(client: &EcrClient, fallback: SharedCredentialProvider) -> Self {
        Self {
            region: client.region().to_string(),
            profile: None,
            tokens: tokio::sync::OnceCell::new_with(Some(client.token_provider().token_fn())),
            fallback,
        }
    }

    async fn token(&self, refresh: bool) -> Result<Credential, EcrError> {
        let f = self
            .tokens
            .get_or_try_init(|| async {
                let c = EcrClient::new(Some(self.region.clone()), self.profile.clone()).await?;
                Ok::<_, EcrError>(c.token_provider().token_fn())
            })
            .await?;
        let (username, password) = f(refresh).await?;
        Ok(Credential::Basic { username, password })
    }
}

impl CredentialProvider for EcrPullCredentials {
    fn credential<'a>(
        &'a self,
        registry: &'a str,
        refresh: bool,
    ) -> BoxFuture<'a, Result<Credential, AuthError>> {
        Box::pin(async move {
            match self.token(refresh).await {
                Ok(c) => Ok(c),
                Err(e) => match self.fallback.credential(registry, refresh).await {
                    Ok(c) if !c.is_anonymous() => Ok(c),
                    _ => Err(AuthError::Provider {
                        registry: registry.to_string(),
                        source: Box::new(e),
                    }),
                },
            }
        })
    }
}

/// Registry client options that pull from `registry` with [`EcrPullCredentials`] when it is an
/// ECR host (`ACCOUNT.dkr.ecr.REGION.amazonaws.com`) without credentials of its own yet; Docker
/// config credentials (or `default_credentials`) stay the fallback.
pub fn with_ecr_pull_credentials(
    opts: ClientOptions,
    registry: &str,
    profile: Option<String>,
) -> ClientOptions {
    let Some(host) = ecr::parse_ecr_host(registry) else {
        return opts;
    };
    if opts.credentials.contains_key(registry) {
        return opts;
    }
    let fallback = opts
        .default_credentials
        .clone()
        .unwrap_or_else(|| Arc::new(DockerConfigProvider::default()));
    let provider = EcrPullCredentials::new(&host.region, profile, fallback);
    opts.with_provider(registry, Arc::new(provider))
}

/// Push `manifest` from `layout` to ECR with its `attachments`: ensure the repository, check
/// immutable tags (the image's, and cosign's attachment tags when the registry has no referrers
/// API) before uploading anything, push with an ECR token, attach, then optionally wait for
/// the scan. Returns the push's report and what was attached.
pub async fn push_to_ecr(
    layout: &Layout,
    manifest: &Descriptor,
    opts: EcrPushOptions,
    attachments: &Attachments,
    rep: &SharedReporter,
) -> Result<(EcrPushReport, Option<AttachReport>), PublishError> {
    let repo_ref = EcrRepoRef::parse(&opts.repository, Some(&opts.settings))?;
    let region = ecr::choose_region(opts.region.as_deref(), Some(&opts.settings), &repo_ref);
    let client = EcrClient::new(region, opts.profile.clone()).await?;
    let tokens = client.token_provider();
    let auth = tokens.get().await?;
    let repo = repo_ref.resolve(client.region(), &auth)?;
    let status = client.ensure_repository(&repo, &opts.settings).await?;
    if status.created {
        rep.event(Event::Note {
            message: format!("created ECR repository {}", status.uri),
        });
    }
    for w in &status.warnings {
        rep.event(Event::Warning { message: w.clone() });
    }
    let states = client
        .check_tags(&repo, &opts.tags, &manifest.digest)
        .await?;
    let plan = ecr::plan_tags(&status, &states, &manifest.digest)?;
    let image_uri = repo.image_uri(&manifest.digest);
    if !plan.unchanged.is_empty() {
        rep.event(Event::Note {
            message: format!(
                "{} already holds {} under tag(s) {}",
                repo.uri(),
                manifest.digest,
                plan.unchanged.join(", ")
            ),
        });
    }
    let registry = ecr_registry(&opts, &repo, &tokens)?;
    let dest: Reference = repo
        .uri()
        .parse()
        .map_err(|_| PublishError::BadRepository(repo.uri()))?;
    let mode = match attachments.is_empty() {
        true => None,
        false => {
            let mode = attachments
                .mode(&registry, &dest, &manifest.digest, rep)
                .await?;
            check_attachment_tags(&status, &repo, attachments, mode, &manifest.digest)?;
            Some(mode)
        }
    };
    let push = if plan.push.is_empty() && !plan.unchanged.is_empty() {
        None
    } else {
        let report = registry
            .push_image(layout, manifest, &dest, &plan.push, rep)
            .await
            .map_err(|e| registry_failure(&repo.uri(), e))?;
        Some(report)
    };
    let attached = match mode {
        Some(m) => Some(
            attachments
                .push(&registry, layout, &dest, manifest, m, rep)
                .await?,
        ),
        None => None,
    };
    let scan = match opts.wait_scan {
        Some(timeout) => {
            let s = wait_scans(&client, &repo, layout, manifest, timeout).await?;
            if let Some(sev) = opts.fail_on {
                if s.exceeds(sev) {
                    return Err(PublishError::Findings {
                        severity: sev,
                        count: s.at_or_above(sev),
                        summary: s.to_string(),
                    });
                }
            }
            Some(s)
        }
        None => None,
    };
    let report = EcrPushReport {
        image_uri,
        repository_created: status.created,
        warnings: status.warnings.clone(),
        unchanged_tags: plan.unchanged,
        push,
        scan,
    };
    Ok((report, attached))
}

/// The registry client of an ECR push: ECR tokens for the repository's host, and
/// `--registry-endpoint` when given.
fn ecr_registry(
    opts: &EcrPushOptions,
    repo: &ecr::EcrRepo,
    tokens: &ecr::TokenProvider,
) -> Result<Client, PublishError> {
    let mut copts = opts
        .client
        .clone()
        .with_provider(&repo.host, Arc::new(EcrTokens(tokens.token_fn())));
    if let Some(url) = &opts.registry_endpoint {
        copts = copts.with_endpoint(&repo.host, url.clone());
    }
    Client::new(copts).map_err(|e| PublishError::Registry(Box::new(e)))
}

/// Under cosign's tag scheme, a repository whose tags are immutable would refuse the
/// attachment tags (a second signature, a new SBOM): refuse before uploading anything.
fn check_attachment_tags(
    status: &ecr::RepoStatus,
    repo: &ecr::EcrRepo,
    attachments: &Attachments,
    mode: crate::sign::remote::AttachMode,
    top: &crate::oci::Digest,
) -> Result<(), EcrError> {
    if mode != crate::sign::remote::AttachMode::Tags {
        return Ok(());
    }
    let tags = attachments.tags(top);
    if tags.iter().any(|t| status.tag_is_immutable(t)) {
        return Err(EcrError::AttachmentTagsImmutable {
            repository: repo.uri(),
            name: repo.name.clone(),
            mutability: status.tag_mutability.clone(),
            tags,
        });
    }
    Ok(())
}

/// The scan of the pushed image; of an index, every platform's image's scans added up (ECR
/// scans images, not indexes).
async fn wait_scans(
    client: &EcrClient,
    repo: &ecr::EcrRepo,
    layout: &Layout,
    manifest: &Descriptor,
    timeout: Duration,
) -> Result<ScanSummary, EcrError> {
    let entries = index_entries(layout, manifest);
    if entries.is_empty() {
        return client.wait_scan(repo, &manifest.digest, timeout).await;
    }
    let mut all = ScanSummary {
        status: String::new(),
        counts: Default::default(),
    };
    for e in &entries {
        let s = client.wait_scan(repo, &e.digest, timeout).await?;
        all.status = s.status;
        for (severity, n) in s.counts {
            *all.counts.entry(severity).or_default() += n;
        }
    }
    Ok(all)
}

/// Turn a registry error of an ECR push into a helpful one, by ECR's error codes.
fn registry_failure(repository: &str, e: RegistryError) -> PublishError {
    match e.tag() {
        Some(tag) if e.has_code(ecr::TAG_INVALID) => {
            let said: Vec<&str> = e
                .api_errors()
                .iter()
                .filter(|a| a.code == ecr::TAG_INVALID && !a.message.is_empty())
                .map(|a| a.message.as_str())
                .collect();
            PublishError::Ecr(EcrError::tag_rejected(repository, tag, &said.join("; ")))
        }
        _ if e.has_code(ecr::NAME_UNKNOWN) => PublishError::RepositoryUnknown {
            repository: repository.to_string(),
            source: Box::new(e),
        },
        _ => PublishError::Registry(Box::new(e)),
    }
}

/// Resolve an ECR repository (full URI or bare name) and credentials for its registry, making
/// sure it exists (created with `settings` when they allow it). Used for `--cache-repo` with
/// `--ecr`.
pub async fn ecr_repository_access(
    repository: &str,
    settings: &EcrSettings,
    region: Option<&str>,
    profile: Option<String>,
) -> Result<(Reference, Arc<dyn CredentialProvider>), PublishError> {
    let repo_ref = EcrRepoRef::parse(repository, Some(settings))?;
    let region = ecr::choose_region(region, Some(settings), &repo_ref);
    let client = EcrClient::new(region, profile).await?;
    let tokens = client.token_provider();
    let auth = tokens.get().await?;
    let repo = repo_ref.resolve(client.region(), &auth)?;
    client.ensure_repository(&repo, settings).await?;
    let reference: Reference = repo
        .uri()
        .parse()
        .map_err(|_| PublishError::BadRepository(repo.uri()))?;
    Ok((reference, Arc::new(EcrTokens(tokens.token_fn()))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ecr_pull_credentials_only_for_ecr_hosts_without_own_credentials() {
        let ecr_host = "123456789012.dkr.ecr.eu-west-1.amazonaws.com";
        let o = with_ecr_pull_credentials(ClientOptions::default(), ecr_host, None);
        assert!(o.credentials.contains_key(ecr_host));
        let o = with_ecr_pull_credentials(ClientOptions::default(), "127.0.0.1:5000", None);
        assert!(o.credentials.is_empty());
        let own: SharedCredentialProvider =
            Arc::new(crate::auth::StaticCredential(Credential::Anonymous));
        let o = ClientOptions::default().with_provider(ecr_host, own.clone());
        let o = with_ecr_pull_credentials(o, ecr_host, None);
        assert!(Arc::ptr_eq(&o.credentials[ecr_host], &own));
    }
}
