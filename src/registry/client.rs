//! The HTTP side of the client: options, endpoints (TLS/plain HTTP), auth challenges and token
//! caching per repository scope, retries with backoff.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use http::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{HeaderValue, StatusCode};
use serde::Deserialize;
use url::Url;

use crate::oci::Digest;

use super::error::{parse_error_body, RegistryError};
use super::guard::{self, Activity, ProgressBody};
use crate::auth::{
    Credential, DockerConfigProvider, Secret, SharedCredentialProvider, StaticCredential,
};
use crate::events::{Event, SharedReporter};
use crate::reference::{api_host, url_without_credentials};

/// Smallest chunk for chunked uploads (Amazon ECR's minimum part size); also the default.
pub const MIN_CHUNK_SIZE: u64 = 5 * 1024 * 1024;
/// Default number of concurrent blob transfers.
pub const DEFAULT_JOBS: usize = 4;
/// Accept header for manifests: OCI and Docker schema 2, images and indexes.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
    application/vnd.oci.image.index.v1+json, \
    application/vnd.docker.distribution.manifest.v2+json, \
    application/vnd.docker.distribution.manifest.list.v2+json";
const ERROR_BODY_LIMIT: usize = 64 * 1024;
/// Default idle timeout of registry requests (`--registry-timeout`).
pub const DEFAULT_REGISTRY_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest manifest or index wpimg reads.
pub const MAX_MANIFEST_BYTES: u64 = 4 << 20;
/// Largest image config wpimg reads.
pub const MAX_CONFIG_BYTES: u64 = 8 << 20;
/// Largest token-server answer wpimg reads.
pub const MAX_TOKEN_BYTES: u64 = 1 << 20;
/// Attempts in total for a stalled request (each already cost the idle timeout).
const STALL_ATTEMPTS: u32 = 3;

/// When and how often to retry temporary failures.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Attempts in total (1 = no retry).
    pub max_attempts: u32,
    /// Delay before the first retry; doubled for each further one.
    pub initial_backoff: Duration,
    /// Upper bound of the doubled delay.
    pub max_backoff: Duration,
    /// Upper bound for a registry's `Retry-After`.
    pub max_retry_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(15),
            max_retry_after: Duration::from_secs(60),
        }
    }
}

impl RetryPolicy {
    /// Never retry.
    pub fn none() -> Self {
        Self {
            max_attempts: 1,
            ..Self::default()
        }
    }

    /// Delay before retry number `attempt` (1-based).
    pub fn delay(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        if let Some(ra) = retry_after {
            return ra.min(self.max_retry_after);
        }
        let exp = self
            .initial_backoff
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
        let base = exp.min(self.max_backoff);
        // Up to 25% jitter so concurrent transfers do not retry in lockstep.
        let jitter = base.mul_f64(fastrand::f64() * 0.25);
        base + jitter
    }
}

/// Which failures [`Client::send`] retries itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Retry {
    /// None (a request whose body cannot be sent again, or that its caller retries).
    Never,
    /// Temporary ones (connection errors, stalls, 5xx, 408, 429).
    Temporary,
    /// Temporary ones except stalls: the request is part of an operation that
    /// [`Client::with_retries`] retries as a whole, so a stall costs the idle timeout only as
    /// often as the operation is tried.
    InOperation,
}

/// Options of a [`Client`].
#[derive(Clone)]
pub struct ClientOptions {
    /// Hosts (`host` or `host:port`) that may be reached over plain HTTP besides loopback.
    pub insecure_hosts: Vec<String>,
    /// Extra PEM CA certificates trusted besides the system roots.
    pub ca_file: Option<PathBuf>,
    /// Concurrent blob transfers (at least 1).
    pub jobs: usize,
    /// Chunk size of chunked uploads (raised to [`MIN_CHUNK_SIZE`] if smaller).
    pub chunk_size: u64,
    /// Always use chunked uploads instead of monolithic ones.
    pub force_chunked: bool,
    /// Registry name → base URL (`http://127.0.0.1:5000`) to send its requests to.
    pub endpoint_overrides: HashMap<String, Url>,
    /// Registry name → credentials, overriding the default provider.
    pub credentials: HashMap<String, SharedCredentialProvider>,
    /// Credentials for other registries (default: Docker's config.json and helpers).
    pub default_credentials: Option<SharedCredentialProvider>,
    /// Retry policy for temporary failures.
    pub retry: RetryPolicy,
    /// A request fails as stalled when nothing moves for this long: no byte of its body taken,
    /// no answer, no byte of the answer's body (an idle timeout: large transfers are not cut).
    pub idle_timeout: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            insecure_hosts: Vec::new(),
            ca_file: None,
            jobs: DEFAULT_JOBS,
            chunk_size: MIN_CHUNK_SIZE,
            force_chunked: false,
            endpoint_overrides: HashMap::new(),
            credentials: HashMap::new(),
            default_credentials: None,
            retry: RetryPolicy::default(),
            idle_timeout: DEFAULT_REGISTRY_TIMEOUT,
        }
    }
}

impl ClientOptions {
    /// Use fixed credentials for one registry.
    pub fn with_credential(mut self, registry: &str, credential: Credential) -> Self {
        self.credentials
            .insert(registry.to_string(), Arc::new(StaticCredential(credential)));
        self
    }

    /// Use a credential provider (e.g. one that refreshes an ECR token) for one registry.
    pub fn with_provider(mut self, registry: &str, provider: SharedCredentialProvider) -> Self {
        self.credentials.insert(registry.to_string(), provider);
        self
    }

    /// Send a registry's requests to another base URL (its name stays the same).
    pub fn with_endpoint(mut self, registry: &str, endpoint: Url) -> Self {
        self.endpoint_overrides
            .insert(registry.to_string(), endpoint);
        self
    }
}

impl fmt::Debug for ClientOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientOptions")
            .field("insecure_hosts", &self.insecure_hosts)
            .field("ca_file", &self.ca_file)
            .field("jobs", &self.jobs)
            .field("chunk_size", &self.chunk_size)
            .field("force_chunked", &self.force_chunked)
            .field("endpoint_overrides", &self.endpoint_overrides)
            .field("credentials", &self.credentials.keys().collect::<Vec<_>>())
            .field("retry", &self.retry)
            .field("idle_timeout", &self.idle_timeout)
            .finish_non_exhaustive()
    }
}

/// How a registry wants to be authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Challenge {
    Basic,
    Bearer { realm: Url, service: Option<String> },
}

struct CachedToken {
    token: Secret,
    expires: Instant,
}

#[derive(Default)]
struct State {
    endpoints: HashMap<String, Url>,
    challenges: HashMap<String, Challenge>,
    tokens: HashMap<(String, String), CachedToken>,
    credentials: HashMap<String, Credential>,
    chunked: HashSet<String>,
    streamed: HashSet<Digest>,
    /// Upload sessions in progress, by id: discarded when a push is interrupted.
    open_uploads: HashMap<u64, (Repo, Url)>,
    next_upload: u64,
}

/// How long an interrupted push lets the registry notice its dropped uploads before it
/// discards their sessions.
const DISCARD_SETTLE: Duration = Duration::from_millis(500);

/// A repository on a resolved endpoint.
#[derive(Debug, Clone)]
pub(crate) struct Repo {
    pub registry: String,
    pub repository: String,
    pub base: Url,
    /// `registry/repository`, used in errors.
    pub name: String,
}

impl Repo {
    /// `<base>/v2/<repository>/<rest>`.
    pub fn url(&self, rest: &str) -> Result<Url, RegistryError> {
        let s = format!(
            "{}/v2/{}/{}",
            self.base.as_str().trim_end_matches('/'),
            self.repository,
            rest
        );
        Url::parse(&s).map_err(|e| self.protocol("build URL", format!("bad URL {s:?}: {e}")))
    }

    /// Resolve a `Location` header against this repository's endpoint.
    pub fn resolve_location(
        &self,
        op: &str,
        loc: Option<&HeaderValue>,
    ) -> Result<Url, RegistryError> {
        let loc = loc
            .and_then(|v| v.to_str().ok())
            .filter(|s| !s.is_empty())
            .ok_or_else(|| self.protocol(op, "answer has no Location header".into()))?;
        self.base
            .join(loc)
            .map_err(|e| self.protocol(op, format!("bad Location header: {e}")))
    }

    pub fn protocol(&self, op: &str, message: String) -> RegistryError {
        RegistryError::Protocol {
            repository: self.name.clone(),
            operation: op.to_string(),
            message,
        }
    }

    /// Token scope for pulling.
    pub fn pull_scope(&self) -> String {
        format!("repository:{}:pull", self.repository)
    }

    /// Token scope for pushing.
    pub fn push_scope(&self) -> String {
        format!("repository:{}:pull,push", self.repository)
    }
}

/// A distribution-API client (push, pull, inspect) for any number of registries.
pub struct Client {
    pub(crate) http: reqwest::Client,
    pub(crate) opts: ClientOptions,
    default_provider: SharedCredentialProvider,
    state: Mutex<State>,
    requests: AtomicU64,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("opts", &self.opts)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Build a client (reads the CA file, if any).
    pub fn new(mut opts: ClientOptions) -> Result<Self, RegistryError> {
        opts.jobs = opts.jobs.max(1);
        opts.chunk_size = opts.chunk_size.max(MIN_CHUNK_SIZE);
        opts.retry.max_attempts = opts.retry.max_attempts.max(1);
        opts.idle_timeout = opts.idle_timeout.max(Duration::from_millis(100));
        let mut b = reqwest::Client::builder()
            .user_agent(concat!("wpimg/", env!("CARGO_PKG_VERSION")))
            .redirect(guard::redirect_policy(opts.insecure_hosts.clone()))
            .connect_timeout(opts.idle_timeout.min(Duration::from_secs(30)))
            .tcp_keepalive(Duration::from_secs(30))
            .pool_idle_timeout(Duration::from_secs(60));
        if let Some(ca) = &opts.ca_file {
            let pem = fs_err::read(ca).map_err(|source| RegistryError::Io {
                path: ca.clone(),
                source,
            })?;
            let certs =
                reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| RegistryError::CaFile {
                    path: ca.clone(),
                    reason: e.to_string(),
                })?;
            if certs.is_empty() {
                return Err(RegistryError::CaFile {
                    path: ca.clone(),
                    reason: "no PEM certificate in it".into(),
                });
            }
            b = b.tls_certs_merge(certs);
        }
        let http = b.build().map_err(RegistryError::Client)?;
        let default_provider = opts
            .default_credentials
            .clone()
            .unwrap_or_else(|| Arc::new(DockerConfigProvider::default()));
        Ok(Self {
            http,
            opts,
            default_provider,
            state: Mutex::new(State::default()),
            requests: AtomicU64::new(0),
        })
    }

    /// HTTP requests sent so far (including token requests and retries).
    pub fn requests_sent(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain caches behind: keep using them.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `host` may be reached over plain HTTP.
    pub fn plain_http_allowed(&self, host: &str) -> bool {
        guard::plain_http_allowed(&self.opts.insecure_hosts, host)
    }

    pub(crate) fn uses_chunked(&self, registry: &str) -> bool {
        self.opts.force_chunked || self.state().chunked.contains(registry)
    }

    /// Record a blob uploaded by a streaming upload (reported as uploaded, not skipped).
    pub(crate) fn mark_streamed(&self, digest: &Digest) {
        self.state().streamed.insert(digest.clone());
    }

    pub(crate) fn was_streamed(&self, digest: &Digest) -> bool {
        self.state().streamed.contains(digest)
    }

    /// Remember an upload session until [`Client::close_upload`]; returns its id.
    pub(crate) fn open_upload(&self, repo: &Repo, session: &Url) -> u64 {
        let mut st = self.state();
        st.next_upload += 1;
        let id = st.next_upload;
        st.open_uploads.insert(id, (repo.clone(), session.clone()));
        id
    }

    /// The session moved (a new `Location` after a chunk).
    pub(crate) fn move_upload(&self, id: u64, session: &Url) {
        if let Some(open) = self.state().open_uploads.get_mut(&id) {
            open.1 = session.clone();
        }
    }

    /// The upload is over (done, or failed and abandoned).
    pub(crate) fn close_upload(&self, id: u64) {
        self.state().open_uploads.remove(&id);
    }

    /// Tell the registry to discard every upload session still open (after an interrupted
    /// push dropped its requests); each within the idle timeout.
    pub async fn discard_open_uploads(&self) {
        let open: Vec<(Repo, Url)> = self.state().open_uploads.drain().map(|(_, o)| o).collect();
        if open.is_empty() {
            return;
        }
        // The registry must see the dropped uploads end first: a session still being written
        // to survives its DELETE (distribution 2.8 rewrites it when the broken upload ends).
        tokio::time::sleep(DISCARD_SETTLE).await;
        let discards = open
            .into_iter()
            .map(|(repo, session)| async move { self.discard_upload(&repo, session).await });
        futures_util::future::join_all(discards).await;
    }

    pub(crate) fn set_chunked(&self, registry: &str) {
        self.state().chunked.insert(registry.to_string());
    }

    /// Base URL for a registry: an override, else `https://host`, or `http://host` for loopback
    /// and insecure hosts that do not speak TLS.
    pub(crate) async fn endpoint(&self, registry: &str) -> Result<Url, RegistryError> {
        if let Some(u) = self.state().endpoints.get(registry) {
            return Ok(u.clone());
        }
        let url = if let Some(u) = self.opts.endpoint_overrides.get(registry) {
            let bad = |reason: &str| RegistryError::BadEndpoint {
                registry: registry.to_string(),
                endpoint: url_without_credentials(u),
                reason: reason.to_string(),
            };
            let host = u.host_str().ok_or_else(|| bad("no host"))?;
            let host_port = match u.port() {
                Some(p) => format!("{host}:{p}"),
                None => host.to_string(),
            };
            match u.scheme() {
                "https" => {}
                "http" if self.plain_http_allowed(&host_port) => {}
                "http" => {
                    return Err(RegistryError::InsecureRefused {
                        registry: registry.to_string(),
                        endpoint: url_without_credentials(u),
                    })
                }
                _ => return Err(bad("scheme must be http or https")),
            }
            u.clone()
        } else {
            let host = api_host(registry);
            let https =
                Url::parse(&format!("https://{host}")).map_err(|e| RegistryError::BadEndpoint {
                    registry: registry.to_string(),
                    endpoint: format!("https://{host}"),
                    reason: e.to_string(),
                })?;
            if self.plain_http_allowed(host) && !self.speaks_tls(&https).await {
                let mut http = https.clone();
                let _ = http.set_scheme("http");
                http
            } else {
                https
            }
        };
        self.state()
            .endpoints
            .insert(registry.to_string(), url.clone());
        Ok(url)
    }

    async fn speaks_tls(&self, https: &Url) -> bool {
        let Ok(u) = https.join("/v2/") else {
            return false;
        };
        self.requests.fetch_add(1, Ordering::Relaxed);
        match self
            .http
            .get(u)
            .timeout(Duration::from_secs(10))
            .send()
            .await
        {
            Ok(_) => true,
            Err(e) => {
                // A certificate problem means TLS is spoken: stay on https so the user sees it.
                let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(&e);
                while let Some(c) = cur {
                    if c.to_string().to_ascii_lowercase().contains("certificate") {
                        return true;
                    }
                    cur = c.source();
                }
                false
            }
        }
    }

    pub(crate) async fn repo(
        &self,
        registry: &str,
        repository: &str,
    ) -> Result<Repo, RegistryError> {
        Ok(Repo {
            registry: registry.to_string(),
            repository: repository.to_string(),
            base: self.endpoint(registry).await?,
            name: format!("{registry}/{repository}"),
        })
    }

    async fn credential(&self, registry: &str, refresh: bool) -> Result<Credential, RegistryError> {
        if !refresh {
            if let Some(c) = self.state().credentials.get(registry) {
                return Ok(c.clone());
            }
        }
        let provider = self
            .opts
            .credentials
            .get(registry)
            .cloned()
            .unwrap_or_else(|| self.default_provider.clone());
        let c = provider
            .credential(registry, refresh)
            .await
            .map_err(|source| RegistryError::Auth {
                registry: registry.to_string(),
                source,
            })?;
        self.state()
            .credentials
            .insert(registry.to_string(), c.clone());
        Ok(c)
    }

    async fn authorization(
        &self,
        repo: &Repo,
        scopes: &[String],
        refresh: bool,
        reporter: &SharedReporter,
    ) -> Result<Option<Secret>, RegistryError> {
        let challenge = self.state().challenges.get(&repo.registry).cloned();
        match challenge {
            None => Ok(None),
            Some(Challenge::Basic) => Ok(self
                .credential(&repo.registry, refresh)
                .await?
                .basic_header()),
            Some(Challenge::Bearer { realm, service }) => {
                let key = (repo.registry.clone(), scopes.join(" "));
                if !refresh {
                    if let Some(t) = self.state().tokens.get(&key) {
                        if t.expires > Instant::now() {
                            return Ok(Some(Secret::new(format!("Bearer {}", t.token.expose()))));
                        }
                    }
                }
                let (token, ttl) = self
                    .fetch_token(repo, &realm, service.as_deref(), scopes, refresh, reporter)
                    .await?;
                let header = Secret::new(format!("Bearer {}", token.expose()));
                self.state().tokens.insert(
                    key,
                    CachedToken {
                        token,
                        expires: Instant::now() + ttl,
                    },
                );
                Ok(Some(header))
            }
        }
    }

    async fn fetch_token(
        &self,
        repo: &Repo,
        realm: &Url,
        service: Option<&str>,
        scopes: &[String],
        refresh: bool,
        reporter: &SharedReporter,
    ) -> Result<(Secret, Duration), RegistryError> {
        let op = format!("get token from {}", guard::origin(realm));
        // Credentials go to a realm over https, or over plain HTTP to a host allowed it.
        if realm.scheme() != "https" && !self.plain_http_allowed(&guard::host_port(realm)) {
            return Err(RegistryError::PlainHttpRefused {
                repository: repo.name.clone(),
                operation: op,
                to: format!("{} (token realm)", guard::origin(realm)),
            });
        }
        self.with_retries(&op, reporter, || async {
            // Credentials the realm refuses are refreshed once.
            let mut refreshed = refresh;
            loop {
                let cred = self.credential(&repo.registry, refreshed).await?;
                let rb = self.token_request(&cred, realm, service, scopes);
                match self.token_exchange(rb, repo, &op).await {
                    Err(e)
                        if matches!(e.status(), Some(401 | 403))
                            && !refreshed
                            && !cred.is_anonymous() =>
                    {
                        refreshed = true;
                    }
                    outcome => return outcome,
                }
            }
        })
        .await
    }

    /// The token request for `cred`: an OAuth2 refresh-token POST for identity tokens, else a
    /// GET with basic credentials (none when anonymous).
    fn token_request(
        &self,
        cred: &Credential,
        realm: &Url,
        service: Option<&str>,
        scopes: &[String],
    ) -> reqwest::RequestBuilder {
        if let Credential::IdentityToken(rt) = cred {
            let mut form = url::form_urlencoded::Serializer::new(String::new());
            form.append_pair("grant_type", "refresh_token")
                .append_pair("client_id", "wpimg")
                .append_pair("refresh_token", rt.expose())
                .append_pair("scope", &scopes.join(" "));
            if let Some(s) = service {
                form.append_pair("service", s);
            }
            return self
                .http
                .post(realm.clone())
                .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
                .body(form.finish());
        }
        let mut u = realm.clone();
        {
            let mut q = u.query_pairs_mut();
            if let Some(s) = service {
                q.append_pair("service", s);
            }
            for s in scopes {
                q.append_pair("scope", s);
            }
        }
        let mut rb = self.http.get(u);
        if let Some(h) = cred.basic_header() {
            rb = rb.header(AUTHORIZATION, sensitive(&h));
        }
        rb
    }

    /// Send a token request and read its answer (at most [`MAX_TOKEN_BYTES`]): the token and
    /// how long to keep it.
    async fn token_exchange(
        &self,
        rb: reqwest::RequestBuilder,
        repo: &Repo,
        op: &str,
    ) -> Result<(Secret, Duration), RegistryError> {
        #[derive(Deserialize)]
        struct TokenAnswer {
            token: Option<String>,
            access_token: Option<String>,
            expires_in: Option<u64>,
        }
        let req = rb.build().map_err(|e| {
            guard::transport_error(&repo.name, op, &guard::host_port(&repo.base), e)
        })?;
        let host = guard::host_port(req.url());
        let resp = self.execute(req, &repo.name, op).await?;
        let resp = expect_status(resp, &[200], &repo.name, op).await?;
        let what = format!("token answer of {host}");
        let bound = guard::Bound::new(&repo.name, what, None, MAX_TOKEN_BYTES)?;
        let body = bound.read(resp, &repo.name, op).await?;
        let t: TokenAnswer = serde_json::from_slice(&body).map_err(|e| {
            repo.protocol(
                op,
                format!("token answer is not the expected JSON (line {})", e.line()),
            )
        })?;
        let token = t
            .token
            .filter(|t| !t.is_empty())
            .or(t.access_token.filter(|t| !t.is_empty()))
            .ok_or_else(|| repo.protocol(op, "token answer has no token".into()))?;
        let ttl = Duration::from_secs(t.expires_in.unwrap_or(60).max(60) - 10);
        Ok((Secret::new(token), ttl))
    }

    /// Attempts in total for a failure: the policy's, fewer for stalls.
    fn attempts_for(&self, err: &RegistryError) -> u32 {
        if err.is_stall() {
            self.opts.retry.max_attempts.min(STALL_ATTEMPTS)
        } else {
            self.opts.retry.max_attempts
        }
    }

    /// Run `once` until it succeeds or fails for good: temporary failures (connection errors,
    /// stalls, 5xx, 408, 429 with its `Retry-After`) are retried with backoff up to the policy's
    /// attempts, each retry reported as a note naming `op`; anything else is returned at once.
    /// Requests made by `once` leave stalls to it ([`Retry::InOperation`]).
    pub(crate) async fn with_retries<T, F, Fut>(
        &self,
        op: &str,
        reporter: &SharedReporter,
        once: F,
    ) -> Result<T, RegistryError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, RegistryError>>,
    {
        self.retrying(op, reporter, true, once).await
    }

    /// [`Client::with_retries`], leaving stalls to an enclosing operation unless `stalls`.
    async fn retrying<T, F, Fut>(
        &self,
        op: &str,
        reporter: &SharedReporter,
        stalls: bool,
        mut once: F,
    ) -> Result<T, RegistryError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, RegistryError>>,
    {
        let mut attempt = 1;
        loop {
            match once().await {
                Err(e)
                    if e.is_temporary()
                        && (stalls || !e.is_stall())
                        && attempt < self.attempts_for(&e) =>
                {
                    self.pause(attempt, op, &e, reporter).await;
                    attempt += 1;
                }
                outcome => return outcome,
            }
        }
    }

    /// Report a retry of `op` and wait before it.
    pub(crate) async fn pause(
        &self,
        attempt: u32,
        op: &str,
        err: &RegistryError,
        reporter: &SharedReporter,
    ) {
        let d = self.opts.retry.delay(attempt, err.retry_after());
        reporter.event(Event::Note {
            message: format!(
                "retrying {op} in {:.1}s (attempt {}/{}): {err}",
                d.as_secs_f64(),
                attempt + 1,
                self.attempts_for(err)
            ),
        });
        tokio::time::sleep(d).await;
    }

    /// Send one request under the idle timeout ([`ClientOptions::idle_timeout`]): it fails as
    /// stalled when its body stops being taken or no answer comes; the answer's body is read
    /// under the same timeout. `repository` and `op` name the request in errors.
    pub(crate) async fn execute(
        &self,
        mut req: reqwest::Request,
        repository: &str,
        op: &str,
    ) -> Result<reqwest::Response, RegistryError> {
        let host = guard::host_port(req.url());
        let limit = self.opts.idle_timeout;
        let total = req
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .or_else(|| {
                req.body()
                    .map_or(Some(0), |b| http_body::Body::size_hint(b).exact())
            });
        let activity = Activity::new(total);
        if let Some(body) = req.body_mut().take() {
            let counted = ProgressBody::new(body, activity.clone());
            *req.body_mut() = Some(reqwest::Body::wrap(counted));
        }
        self.requests.fetch_add(1, Ordering::Relaxed);
        tokio::select! {
            r = self.http.execute(req) => r
                .map(|resp| guard::idle_response(resp, limit))
                .map_err(|e| guard::transport_error(repository, op, &host, e)),
            phase = activity.stalled(limit) => Err(RegistryError::Stalled {
                repository: repository.to_string(),
                operation: op.to_string(),
                host,
                idle: limit,
                phase,
            }),
        }
    }

    /// Whether a request to `url` for `repo` carries the registry's credentials: yes for the
    /// registry's own origin; no for any other (an upload `Location` elsewhere), which must
    /// pass [`guard::check_hop`]: no https→http downgrade, plain HTTP only to allowed hosts.
    pub(crate) fn credentials_go_to(
        &self,
        repo: &Repo,
        url: &Url,
        op: &str,
    ) -> Result<bool, RegistryError> {
        if guard::same_origin(url, &repo.base) {
            return Ok(true);
        }
        guard::check_hop(&self.opts.insecure_hosts, &repo.base, url)
            .map_err(|r| r.into_error(&repo.name, op))?;
        Ok(false)
    }

    /// Send a request built by `build` (called again for each attempt), answering auth
    /// challenges and retrying the failures `retry` names (an answer still temporary after the
    /// last attempt is returned as its error). Credentials go only to the registry's own
    /// origin, and only its own answers may ask for them.
    pub(crate) async fn send<F>(
        &self,
        repo: &Repo,
        scopes: &[String],
        op: &str,
        retry: Retry,
        reporter: &SharedReporter,
        build: F,
    ) -> Result<reqwest::Response, RegistryError>
    where
        F: Fn(&reqwest::Client) -> Result<reqwest::RequestBuilder, RegistryError>,
    {
        let once = || async {
            let resp = self.send_once(repo, scopes, op, reporter, &build).await?;
            let status = resp.status();
            if status.is_server_error()
                || status == StatusCode::TOO_MANY_REQUESTS
                || status == StatusCode::REQUEST_TIMEOUT
            {
                return Err(error_from_response(resp, &repo.name, op).await);
            }
            Ok(resp)
        };
        match retry {
            Retry::Never => self.send_once(repo, scopes, op, reporter, &build).await,
            Retry::Temporary => self.retrying(op, reporter, true, once).await,
            Retry::InOperation => self.retrying(op, reporter, false, once).await,
        }
    }

    /// One request, answering the registry's auth challenges (learning the challenge, adding
    /// scopes it names, refreshing refused credentials once).
    async fn send_once<F>(
        &self,
        repo: &Repo,
        scopes: &[String],
        op: &str,
        reporter: &SharedReporter,
        build: &F,
    ) -> Result<reqwest::Response, RegistryError>
    where
        F: Fn(&reqwest::Client) -> Result<reqwest::RequestBuilder, RegistryError>,
    {
        let mut scopes: Vec<String> = scopes.to_vec();
        let mut auth_rounds = 0;
        let mut refresh = false;
        let mut refreshed = false;
        let mut retried_unauthenticated = false;
        loop {
            let mut req = build(&self.http)?.build().map_err(|e| {
                guard::transport_error(&repo.name, op, &guard::host_port(&repo.base), e)
            })?;
            let own = self.credentials_go_to(repo, req.url(), op)?;
            let auth = if own {
                self.authorization(repo, &scopes, refresh, reporter).await?
            } else {
                None
            };
            refresh = false;
            if let Some(a) = &auth {
                req.headers_mut().insert(AUTHORIZATION, sensitive(a));
            }
            let resp = self.execute(req, &repo.name, op).await?;
            let from_registry = own && guard::same_origin(resp.url(), &repo.base);
            if resp.status() != StatusCode::UNAUTHORIZED || !from_registry || auth_rounds >= 4 {
                return Ok(resp);
            }
            let parsed = resp
                .headers()
                .get_all(WWW_AUTHENTICATE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .find_map(parse_www_authenticate);
            let Some((ch, scope)) = parsed else {
                return Err(error_from_response(resp, &repo.name, op).await);
            };
            auth_rounds += 1;
            for s in scope
                .iter()
                .flat_map(|s| s.split(' '))
                .filter(|s| !s.is_empty())
            {
                // Same resource already asked for (maybe with more actions): keep ours.
                let resource = s.rsplit_once(':').map_or(s, |(r, _)| r);
                if !scopes
                    .iter()
                    .any(|x| x.rsplit_once(':').map_or(x.as_str(), |(r, _)| r) == resource)
                {
                    scopes.push(s.to_string());
                }
            }
            let known = self.state().challenges.get(&repo.registry).cloned();
            if known.as_ref() != Some(&ch) {
                self.state().challenges.insert(repo.registry.clone(), ch);
                continue;
            }
            if auth.is_none() && !retried_unauthenticated {
                // Another transfer learnt the challenge while this request was underway.
                retried_unauthenticated = true;
                continue;
            }
            if !refreshed {
                // Our credentials or token were refused: ask the provider for fresh ones.
                refreshed = true;
                refresh = true;
                continue;
            }
            return Err(error_from_response(resp, &repo.name, op).await);
        }
    }
}

/// A header value marked sensitive (hyper keeps it out of its debug output).
fn sensitive(s: &Secret) -> HeaderValue {
    let mut v = HeaderValue::from_str(s.expose()).unwrap_or_else(|_| HeaderValue::from_static(""));
    v.set_sensitive(true);
    v
}

/// Turn an error answer into a [`RegistryError::Api`], reading at most 64 KiB of its body.
pub(crate) async fn error_from_response(
    mut resp: reqwest::Response,
    repository: &str,
    op: &str,
) -> RegistryError {
    let status = resp.status().as_u16();
    let retry_after = resp
        .headers()
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let mut body = Vec::new();
    while body.len() < ERROR_BODY_LIMIT {
        match resp.chunk().await {
            Ok(Some(c)) => body.extend_from_slice(&c),
            _ => break,
        }
    }
    RegistryError::Api {
        repository: repository.to_string(),
        operation: op.to_string(),
        status,
        errors: parse_error_body(status, &body),
        retry_after,
    }
}

/// Check an answer's status; turn anything else into an error.
pub(crate) async fn expect_status(
    resp: reqwest::Response,
    ok: &[u16],
    repository: &str,
    op: &str,
) -> Result<reqwest::Response, RegistryError> {
    if ok.contains(&resp.status().as_u16()) {
        Ok(resp)
    } else {
        Err(error_from_response(resp, repository, op).await)
    }
}

/// Parse a `WWW-Authenticate` value into a challenge and the scope it names.
pub(crate) fn parse_www_authenticate(v: &str) -> Option<(Challenge, Option<String>)> {
    let v = v.trim();
    let (scheme, rest) = v.split_once(' ').unwrap_or((v, ""));
    let params = parse_auth_params(rest);
    let get = |k: &str| {
        params
            .iter()
            .find(|(pk, _)| pk.eq_ignore_ascii_case(k))
            .map(|(_, pv)| pv.clone())
    };
    if scheme.eq_ignore_ascii_case("basic") {
        Some((Challenge::Basic, None))
    } else if scheme.eq_ignore_ascii_case("bearer") {
        let realm = Url::parse(&get("realm")?).ok()?;
        if realm.scheme() != "https" && realm.scheme() != "http" {
            return None;
        }
        Some((
            Challenge::Bearer {
                realm,
                service: get("service"),
            },
            get("scope"),
        ))
    } else {
        None
    }
}

fn parse_auth_params(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        while i < b.len() && (b[i] == b',' || b[i] == b' ') {
            i += 1;
        }
        let ks = i;
        while i < b.len() && b[i] != b'=' && b[i] != b',' {
            i += 1;
        }
        let key = s[ks..i].trim().to_string();
        if i >= b.len() || b[i] != b'=' {
            continue;
        }
        i += 1;
        let mut val = String::new();
        if i < b.len() && b[i] == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' && i + 1 < b.len() {
                    i += 1;
                }
                let ch_len = s[i..].chars().next().map_or(1, char::len_utf8);
                val.push_str(&s[i..i + ch_len]);
                i += ch_len;
            }
            i += 1;
        } else {
            let vs = i;
            while i < b.len() && b[i] != b',' {
                i += 1;
            }
            val = s[vs..i].trim().to_string();
        }
        if !key.is_empty() {
            out.push((key, val));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn www_authenticate_bearer_and_basic() {
        let (c, scope) = parse_www_authenticate(
            r#"Bearer realm="https://auth.example.com/token",service="registry.example.com",scope="repository:a/b:pull,push""#,
        )
        .unwrap();
        assert_eq!(
            c,
            Challenge::Bearer {
                realm: Url::parse("https://auth.example.com/token").unwrap(),
                service: Some("registry.example.com".into())
            }
        );
        assert_eq!(scope.as_deref(), Some("repository:a/b:pull,push"));
        let (c, _) = parse_www_authenticate(r#"Basic realm="Registry Realm""#).unwrap();
        assert_eq!(c, Challenge::Basic);
        assert!(parse_www_authenticate("Negotiate").is_none());
        assert!(parse_www_authenticate(r#"Bearer realm="file:///etc/passwd""#).is_none());
    }

    #[test]
    fn backoff_doubles_and_honours_retry_after() {
        let p = RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(350),
            max_retry_after: Duration::from_secs(2),
        };
        let d1 = p.delay(1, None);
        let d2 = p.delay(2, None);
        let d5 = p.delay(5, None);
        assert!(d1 >= Duration::from_millis(100) && d1 <= Duration::from_millis(125));
        assert!(d2 >= Duration::from_millis(200) && d2 <= Duration::from_millis(250));
        assert!(d5 <= Duration::from_millis(350 * 5 / 4));
        assert_eq!(
            p.delay(1, Some(Duration::from_secs(1))),
            Duration::from_secs(1)
        );
        assert_eq!(
            p.delay(1, Some(Duration::from_secs(99))),
            Duration::from_secs(2)
        );
    }

    #[test]
    fn plain_http_only_for_loopback_and_insecure() {
        let c = Client::new(ClientOptions {
            insecure_hosts: vec!["reg.lan:5000".into(), "other.lan".into()],
            ..Default::default()
        })
        .unwrap();
        assert!(c.plain_http_allowed("127.0.0.1:5000"));
        assert!(c.plain_http_allowed("localhost"));
        assert!(c.plain_http_allowed("reg.lan:5000"));
        assert!(c.plain_http_allowed("other.lan:443"));
        assert!(!c.plain_http_allowed("reg.lan:6000"));
        assert!(!c.plain_http_allowed("ghcr.io"));
    }

    #[tokio::test]
    async fn http_override_for_remote_host_is_refused() {
        let c = Client::new(ClientOptions::default().with_endpoint(
            "123.dkr.ecr.us-east-1.amazonaws.com",
            Url::parse("http://10.1.2.3:5000").unwrap(),
        ))
        .unwrap();
        let e = c
            .endpoint("123.dkr.ecr.us-east-1.amazonaws.com")
            .await
            .unwrap_err();
        assert!(matches!(e, RegistryError::InsecureRefused { .. }), "{e}");
        let c = Client::new(ClientOptions::default().with_endpoint(
            "123.dkr.ecr.us-east-1.amazonaws.com",
            Url::parse("http://127.0.0.1:5000").unwrap(),
        ))
        .unwrap();
        let u = c
            .endpoint("123.dkr.ecr.us-east-1.amazonaws.com")
            .await
            .unwrap();
        assert_eq!(u.as_str(), "http://127.0.0.1:5000/");
    }
}
