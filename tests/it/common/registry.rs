//! Test support for registry work: a real `docker-registry` on 127.0.0.1 (optionally with
//! htpasswd auth and TLS from a throwaway CA), a recording proxy that can also demand bearer
//! tokens, behave like Amazon ECR's chunked uploads or corrupt blobs, or answer the OCI 1.1
//! referrers API (which Debian's distribution 2.8 lacks), and image builders that write test
//! images straight into an OCI layout.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, BodyStream, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};

use wpimg::layout::Layout;
use wpimg::oci::{self, Descriptor, Digest, HashingWriter};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Body = BoxBody<Bytes, BoxError>;

/// Panic unless a program is on PATH, telling how to install it.
pub fn require_tool(tool: &str, install: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{tool} is required for this test but is not installed: {install}"
    );
}

/// Run a command, panic with its output unless it succeeds; returns stdout.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_for_port(port: u16, child: &mut Child, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "docker-registry exited ({status}) before listening on port {port}:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("docker-registry did not listen on 127.0.0.1:{port} within 20 s");
}

/// A throwaway CA and a server certificate for 127.0.0.1/localhost, made with `openssl`.
pub struct TestCa {
    /// CA certificate (PEM): pass it as `ca_file`.
    pub ca_pem: PathBuf,
    /// Server certificate (PEM).
    pub cert: PathBuf,
    /// Server key (PEM).
    pub key: PathBuf,
}

impl TestCa {
    /// Create the CA and server certificate in `dir`.
    pub fn create(dir: &Path) -> Self {
        require_tool("openssl", "apt-get install openssl");
        let p = |n: &str| dir.join(n);
        run(Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
            ])
            .args(["-nodes", "-days", "2", "-subj", "/CN=wpimg test CA"])
            .args(["-addext", "basicConstraints=critical,CA:TRUE"])
            .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"])
            .arg("-keyout")
            .arg(p("ca.key"))
            .arg("-out")
            .arg(p("ca.pem")));
        run(Command::new("openssl")
            .args([
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
            ])
            .args(["-nodes", "-subj", "/CN=127.0.0.1"])
            .arg("-keyout")
            .arg(p("server.key"))
            .arg("-out")
            .arg(p("server.csr")));
        std::fs::write(
            p("ext.cnf"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=critical,CA:FALSE\n\
             keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        run(Command::new("openssl")
            .args(["x509", "-req", "-days", "2", "-set_serial", "2"])
            .arg("-in")
            .arg(p("server.csr"))
            .arg("-CA")
            .arg(p("ca.pem"))
            .arg("-CAkey")
            .arg(p("ca.key"))
            .arg("-extfile")
            .arg(p("ext.cnf"))
            .arg("-out")
            .arg(p("server.pem")));
        Self {
            ca_pem: p("ca.pem"),
            cert: p("server.pem"),
            key: p("server.key"),
        }
    }
}

/// Options of a test registry.
#[derive(Default, Clone)]
pub struct RegistryOptions {
    /// htpasswd (bcrypt) basic auth with this user and password.
    pub htpasswd: Option<(String, String)>,
    /// Serve TLS with a certificate from a throwaway CA.
    pub tls: bool,
}

/// Where a test registry sends clients elsewhere (see [`Registry::start_redirecting`]).
#[derive(Default, Clone)]
pub struct Redirects {
    /// `http.host`: the base URL the registry puts in the `Location` headers it generates
    /// (upload sessions), e.g. another host or plain `http://` in front of a TLS registry.
    pub public_url: Option<String>,
    /// The `redirect` storage middleware: blob reads answer 307 to this base URL + the blob's
    /// storage path (as a CDN in front of object storage would).
    pub blob_redirect: Option<String>,
}

/// Debian's `docker-registry` (distribution 2.8) on 127.0.0.1, killed on drop.
pub struct Registry {
    /// Its port.
    pub port: u16,
    /// Temp dir with config, storage and log.
    pub dir: tempfile::TempDir,
    /// The CA when serving TLS.
    pub ca: Option<TestCa>,
    config: PathBuf,
    child: Option<Child>,
}

impl Registry {
    /// Start a plain HTTP registry without auth.
    pub fn start() -> Self {
        Self::start_with(RegistryOptions::default())
    }

    /// Start a registry with options.
    pub fn start_with(opts: RegistryOptions) -> Self {
        Self::start_redirecting(opts, Redirects::default())
    }

    /// Start a registry with options that sends clients to other URLs.
    pub fn start_redirecting(opts: RegistryOptions, redirects: Redirects) -> Self {
        require_tool("docker-registry", "apt-get install docker-registry");
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut cfg = format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
             http:\n  addr: 127.0.0.1:{port}\n  secret: wpimg-test-secret\n",
            dir.path().join("data").display()
        );
        let ca = opts.tls.then(|| TestCa::create(dir.path()));
        if let Some(ca) = &ca {
            cfg += &format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                ca.cert.display(),
                ca.key.display()
            );
        }
        if let Some(url) = &redirects.public_url {
            cfg += &format!("  host: {url}\n");
        }
        if let Some(url) = &redirects.blob_redirect {
            cfg += &format!(
                "middleware:\n  storage:\n    - name: redirect\n      options:\n        baseurl: {url}\n"
            );
        }
        if let Some((user, pass)) = &opts.htpasswd {
            require_tool("htpasswd", "apt-get install apache2-utils");
            let line = run(Command::new("htpasswd").args(["-Bbn", user, pass]));
            let hp = dir.path().join("htpasswd");
            std::fs::write(&hp, line.trim()).unwrap();
            cfg += &format!(
                "auth:\n  htpasswd:\n    realm: wpimg-test\n    path: {}\n",
                hp.display()
            );
        }
        let config = dir.path().join("config.yml");
        std::fs::write(&config, cfg).unwrap();
        let mut r = Self {
            port,
            dir,
            ca,
            config,
            child: None,
        };
        r.restart();
        r
    }

    /// `127.0.0.1:PORT` (the registry name in references).
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Base URL (`http://` or `https://`).
    pub fn url(&self) -> String {
        let scheme = if self.ca.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// Process id of the running registry.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("registry not running").id()
    }

    /// Kill the registry (SIGKILL) and reap it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// (Re)start the registry on the same port with the same storage.
    pub fn restart(&mut self) {
        self.kill();
        let log_path = self.dir.path().join("registry.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .unwrap();
        let mut child = Command::new("docker-registry")
            .arg("serve")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start docker-registry");
        wait_for_port(self.port, &mut child, &log_path);
        self.child = Some(child);
    }

    /// The registry's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One request seen by a [`Proxy`].
#[derive(Debug, Clone)]
pub struct Logged {
    /// Method.
    pub method: String,
    /// Path.
    pub path: String,
    /// Query string.
    pub query: String,
    /// Status answered.
    pub status: u16,
    /// Request Content-Length.
    pub content_length: u64,
}

impl Logged {
    /// Whether this request moved blob data or started a blob upload (POST/PATCH/PUT on
    /// `/blobs/uploads/`), mounts excluded.
    pub fn is_upload(&self) -> bool {
        self.path.contains("/blobs/uploads/") && !self.query.contains("mount=")
    }

    /// Whether this is a mount attempt.
    pub fn is_mount(&self) -> bool {
        self.method == "POST" && self.query.contains("mount=")
    }
}

/// Credentials the token server of a [`Proxy`] accepts.
#[derive(Debug, Clone)]
pub struct TokenAuth {
    /// User.
    pub username: String,
    /// Password.
    pub password: String,
}

/// What a [`Proxy`] does besides recording.
#[derive(Debug, Clone, Default)]
pub struct ProxyMode {
    /// Demand bearer tokens issued at its own `/token` realm (anonymous tokens may only pull).
    pub token_auth: Option<TokenAuth>,
    /// Behave like Amazon ECR's chunked protocol: refuse PUT bodies over 5 MiB, PATCH parts
    /// must be >= 5 MiB and continuous, answer PATCH with 201 and a stale Range, refuse an
    /// empty final PUT after parts, answer mounts with 202 (not mounted).
    pub ecr_chunked: bool,
    /// Flip the first byte of every blob served.
    pub corrupt_blobs: bool,
    /// Answer every n-th repository request with this status (429 gets `Retry-After: 1`).
    pub flaky: Option<(u32, u16)>,
    /// Like ECR, answer requests for any repository outside this set with 404 `NAME_UNKNOWN`
    /// (None: every repository exists).
    pub known_repositories: Option<KnownRepositories>,
    /// Like an ECR repository with immutable tags: refuse a manifest PUT to a tag that already
    /// holds another digest with 400 `TAG_INVALID`.
    pub immutable_tags: bool,
    /// Answer the OCI 1.1 referrers API (`GET /v2/<name>/referrers/<digest>`, as ECR does) from
    /// the manifests with a `subject` pushed by digest through the proxy, and acknowledge them
    /// with `OCI-Subject`.
    pub referrers: bool,
}

/// The repositories an ECR-like [`Proxy`] knows, in one registry (account).
#[derive(Debug, Clone)]
pub struct KnownRepositories {
    /// Registry id (AWS account) named in `NAME_UNKNOWN` messages.
    pub account: String,
    /// Repository names.
    pub names: Vec<String>,
}

const FIVE_MIB: u64 = 5 * 1024 * 1024;

#[derive(Default)]
struct Upload {
    offset: u64,
    parts: u32,
    first_range: Option<String>,
}

struct Shared {
    upstream: String,
    me: String,
    mode: ProxyMode,
    log: Mutex<Vec<Logged>>,
    tokens: Mutex<HashMap<String, Vec<(String, String)>>>,
    uploads: Mutex<HashMap<String, Upload>>,
    violations: Mutex<Vec<String>>,
    seen: std::sync::atomic::AtomicU32,
    client: reqwest::Client,
    /// `(repository, subject digest)` → descriptors of the manifests referring to it.
    referrers: Mutex<HashMap<(String, String), Vec<serde_json::Value>>>,
}

/// A recording HTTP proxy in front of a [`Registry`], on its own thread and runtime.
pub struct Proxy {
    /// Its address.
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Proxy {
    /// Start a proxy to `upstream` (`http://127.0.0.1:PORT`).
    pub fn start(upstream: &str, mode: ProxyMode) -> Self {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std_listener.set_nonblocking(true).unwrap();
        let addr = std_listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            upstream: upstream.trim_end_matches('/').to_string(),
            me: format!("http://{addr}"),
            mode,
            log: Mutex::new(Vec::new()),
            tokens: Mutex::new(HashMap::new()),
            uploads: Mutex::new(HashMap::new()),
            violations: Mutex::new(Vec::new()),
            seen: std::sync::atomic::AtomicU32::new(0),
            referrers: Mutex::new(HashMap::new()),
            client: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
        });
        let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();
        let sh = shared.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
                loop {
                    tokio::select! {
                        _ = &mut rx => break,
                        acc = listener.accept() => {
                            let Ok((stream, _)) = acc else { continue };
                            let sh = sh.clone();
                            tokio::spawn(async move {
                                let svc = hyper::service::service_fn(move |req| {
                                    handle(sh.clone(), req)
                                });
                                let _ = hyper::server::conn::http1::Builder::new()
                                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                                    .await;
                            });
                        }
                    }
                }
            });
            rt.shutdown_timeout(Duration::from_secs(1));
        });
        Self {
            addr,
            shared,
            shutdown: Some(tx),
            thread: Some(thread),
        }
    }

    /// `127.0.0.1:PORT` of the proxy.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        self.shared.me.clone()
    }

    /// Requests seen so far.
    pub fn requests(&self) -> Vec<Logged> {
        self.shared.log.lock().unwrap().clone()
    }

    /// Forget the requests seen so far.
    pub fn clear(&self) {
        self.shared.log.lock().unwrap().clear();
    }

    /// Protocol violations the ECR mode noticed (chunks too small, gaps, ...).
    pub fn violations(&self) -> Vec<String> {
        self.shared.violations.lock().unwrap().clone()
    }

    /// The referrers recorded for `subject` in `repository` (referrers mode).
    pub fn referrers_of(&self, repository: &str, subject: &str) -> Vec<serde_json::Value> {
        self.shared
            .referrers
            .lock()
            .unwrap()
            .get(&(repository.to_string(), subject.to_string()))
            .cloned()
            .unwrap_or_default()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn full(status: StatusCode, headers: &[(&str, String)], body: impl Into<Bytes>) -> Response<Body> {
    let mut b = Response::builder().status(status);
    for (k, v) in headers {
        b = b.header(*k, v.as_str());
    }
    b.body(Full::new(body.into()).map_err(|e| match e {}).boxed())
        .unwrap()
}

fn api_error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    full(
        status,
        &[("content-type", "application/json".into())],
        format!(r#"{{"errors":[{{"code":"{code}","message":"{message}"}}]}}"#),
    )
}

async fn drain(body: Incoming) {
    let _ = body.collect().await;
}

async fn handle(sh: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let content_length = header_u64(req.headers(), "content-length");
    let resp = route(&sh, req).await;
    sh.log.lock().unwrap().push(Logged {
        method,
        path,
        query,
        status: resp.status().as_u16(),
        content_length,
    });
    Ok(resp)
}

fn header_u64(h: &http::HeaderMap, name: &str) -> u64 {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn query_params(q: &str) -> Vec<(String, String)> {
    url::form_urlencoded::parse(q.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// Repository named by a `/v2/<name>/(blobs|manifests|tags)/...` path.
fn repo_of(path: &str) -> Option<String> {
    let rest = path.strip_prefix("/v2/")?;
    ["/blobs/", "/manifests/", "/tags/", "/referrers/"]
        .iter()
        .filter_map(|m| rest.rfind(m).map(|i| rest[..i].to_string()))
        .next()
}

async fn route(sh: &Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    if let (Some((every, status)), Some(_)) = (sh.mode.flaky, repo_of(&path)) {
        let n = sh.seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        if n.is_multiple_of(every) {
            drain(req.into_body()).await;
            let status = StatusCode::from_u16(status).unwrap();
            let code = if status == StatusCode::TOO_MANY_REQUESTS {
                "TOOMANYREQUESTS"
            } else {
                "UNAVAILABLE"
            };
            let mut r = api_error(status, code, "flaky proxy says try again");
            if status == StatusCode::TOO_MANY_REQUESTS {
                r.headers_mut().insert("retry-after", "1".parse().unwrap());
            }
            return r;
        }
    }
    if let Some(ta) = &sh.mode.token_auth {
        if path == "/token" {
            let (parts, body) = req.into_parts();
            let form = if parts.method == "POST" {
                let b = body
                    .collect()
                    .await
                    .map(|c| c.to_bytes())
                    .unwrap_or_default();
                Some(String::from_utf8_lossy(&b).into_owned())
            } else {
                None
            };
            return token_endpoint(sh, ta, &parts.headers, &query, form.as_deref());
        }
        let mut needed: Vec<(String, String)> = Vec::new();
        if let Some(repo) = repo_of(&path) {
            let action = if req.method() == "GET" || req.method() == "HEAD" {
                "pull"
            } else {
                "push"
            };
            needed.push((repo.clone(), action.into()));
            if let Some((_, from)) = query_params(&query).into_iter().find(|(k, _)| k == "from") {
                needed.push((from, "pull".into()));
            }
        }
        let token = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_string);
        let granted = token.and_then(|t| sh.tokens.lock().unwrap().get(&t).cloned());
        let ok = granted.as_ref().is_some_and(|g| {
            needed.iter().all(|(r, a)| {
                g.iter()
                    .any(|(gr, ga)| gr == r && ga.split(',').any(|x| x == a))
            })
        });
        if !ok {
            let scope = needed
                .iter()
                .map(|(r, a)| {
                    if a == "push" {
                        format!("repository:{r}:pull,push")
                    } else {
                        format!("repository:{r}:pull")
                    }
                })
                .collect::<Vec<_>>()
                .join(" ");
            drain(req.into_body()).await;
            let mut chal = format!(r#"Bearer realm="{}/token",service="wpimg-test""#, sh.me);
            if !scope.is_empty() {
                chal += &format!(r#",scope="{scope}""#);
            }
            let mut r = api_error(
                StatusCode::UNAUTHORIZED,
                "UNAUTHORIZED",
                "authentication required",
            );
            r.headers_mut()
                .insert("www-authenticate", chal.parse().unwrap());
            return r;
        }
    }
    if let (Some(known), Some(repo)) = (&sh.mode.known_repositories, repo_of(&path)) {
        if !known.names.contains(&repo) {
            drain(req.into_body()).await;
            return api_error(
                StatusCode::NOT_FOUND,
                "NAME_UNKNOWN",
                &format!(
                    "The repository with name '{repo}' does not exist in the registry with id '{}'",
                    known.account
                ),
            );
        }
    }
    if sh.mode.ecr_chunked {
        if let Some(r) = ecr_rules(sh, &req, &path, &query) {
            drain(req.into_body()).await;
            return r;
        }
    }
    let pq = if sh.mode.ecr_chunked && query.contains("mount=") {
        // ECR without mounting enabled: a fresh upload session, answered 202.
        path.clone()
    } else if query.is_empty() {
        path.clone()
    } else {
        format!("{path}?{query}")
    };
    if sh.mode.referrers {
        if let Some((repo, subject)) = referrers_path(&path) {
            drain(req.into_body()).await;
            return referrers_answer(sh, &repo, &subject, &query);
        }
        if req.method() == "PUT" {
            if let Some(repo) = manifest_digest_of(&path) {
                return put_referrer(sh, req, &repo, &pq, &path).await;
            }
        }
    }
    if sh.mode.immutable_tags && req.method() == "PUT" {
        if let Some((repo, tag)) = manifest_tag_of(&path) {
            return put_immutable(sh, req, &repo, &tag, &pq, &path).await;
        }
    }
    forward(sh, req, &pq, &path).await
}

/// `(repository, subject digest)` of a `/v2/<name>/referrers/<digest>` path.
fn referrers_path(path: &str) -> Option<(String, String)> {
    let rest = path.strip_prefix("/v2/")?;
    let (repo, digest) = rest.rsplit_once("/referrers/")?;
    Some((repo.to_string(), digest.to_string()))
}

/// The repository of a `/v2/<name>/manifests/<digest>` path (None for tags).
fn manifest_digest_of(path: &str) -> Option<String> {
    let rest = path.strip_prefix("/v2/")?;
    let (repo, reference) = rest.rsplit_once("/manifests/")?;
    reference.contains(':').then(|| repo.to_string())
}

/// The referrers API's answer: an OCI index of the manifests recorded for the subject
/// (`artifactType` filter applied), as the distribution spec describes it.
fn referrers_answer(sh: &Arc<Shared>, repo: &str, subject: &str, query: &str) -> Response<Body> {
    if subject.parse::<Digest>().is_err() {
        return api_error(StatusCode::BAD_REQUEST, "DIGEST_INVALID", "invalid digest");
    }
    let wanted: Vec<String> = query_params(query)
        .into_iter()
        .filter(|(k, _)| k == "artifactType")
        .map(|(_, v)| v)
        .collect();
    let mut manifests = sh
        .referrers
        .lock()
        .unwrap()
        .get(&(repo.to_string(), subject.to_string()))
        .cloned()
        .unwrap_or_default();
    let mut headers = vec![("content-type", oci::MEDIA_TYPE_OCI_INDEX.to_string())];
    if !wanted.is_empty() {
        manifests.retain(|m| {
            m["artifactType"]
                .as_str()
                .is_some_and(|t| wanted.iter().any(|w| w == t))
        });
        headers.push(("oci-filters-applied", "artifactType".into()));
    }
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": oci::MEDIA_TYPE_OCI_INDEX,
        "manifests": manifests,
    });
    full(
        StatusCode::OK,
        &headers,
        serde_json::to_vec(&index).unwrap(),
    )
}

/// A manifest PUT by digest: forwarded; one with a `subject` is recorded as a referrer of it
/// (its `artifactType`, else its config's media type) and acknowledged with `OCI-Subject`.
async fn put_referrer(
    sh: &Arc<Shared>,
    req: Request<Incoming>,
    repo: &str,
    pq: &str,
    path: &str,
) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let raw = match body.collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) => return full(StatusCode::BAD_REQUEST, &[], format!("proxy: {e}")),
    };
    let media_type = parts
        .headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let m: serde_json::Value = serde_json::from_slice(&raw).unwrap_or_default();
    let subject = m["subject"]["digest"].as_str().map(str::to_string);
    let mut resp = forward_parts(sh, parts, Some(reqwest::Body::from(raw.clone())), pq, path).await;
    let Some(subject) = subject.filter(|_| resp.status().is_success()) else {
        return resp;
    };
    let artifact_type = m["artifactType"]
        .as_str()
        .or(m["config"]["mediaType"].as_str())
        .unwrap_or("")
        .to_string();
    let mut desc = serde_json::json!({
        "mediaType": media_type,
        "digest": Digest::of_bytes(&raw).to_string(),
        "size": raw.len(),
        "artifactType": artifact_type,
    });
    if let Some(a) = m.get("annotations").filter(|a| a.is_object()) {
        desc["annotations"] = a.clone();
    }
    let mut all = sh.referrers.lock().unwrap();
    let list = all.entry((repo.to_string(), subject.clone())).or_default();
    if !list.iter().any(|d| d["digest"] == desc["digest"]) {
        list.push(desc);
    }
    resp.headers_mut()
        .insert("oci-subject", subject.parse().unwrap());
    resp
}

/// `(repository, tag)` of a `/v2/<name>/manifests/<tag>` path (None for digests).
fn manifest_tag_of(path: &str) -> Option<(String, String)> {
    let rest = path.strip_prefix("/v2/")?;
    let (repo, reference) = rest.rsplit_once("/manifests/")?;
    (!reference.contains(':')).then(|| (repo.to_string(), reference.to_string()))
}

/// A manifest PUT to a tag of an immutable repository: refused with ECR's `TAG_INVALID` when
/// the tag holds another digest upstream, forwarded otherwise.
async fn put_immutable(
    sh: &Arc<Shared>,
    req: Request<Incoming>,
    repo: &str,
    tag: &str,
    pq: &str,
    path: &str,
) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let raw = match body.collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) => return full(StatusCode::BAD_REQUEST, &[], format!("proxy: {e}")),
    };
    let digest = Digest::of_bytes(&raw).to_string();
    let mut head = sh
        .client
        .head(format!("{}/v2/{repo}/manifests/{tag}", sh.upstream))
        .header("accept", wpimg::registry::MANIFEST_ACCEPT);
    if sh.mode.token_auth.is_none() {
        if let Some(a) = parts.headers.get("authorization") {
            head = head.header("authorization", a.as_bytes());
        }
    }
    let existing = match head.send().await {
        Ok(r) if r.status() == 200 => r
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
        Ok(_) => None,
        Err(e) => return full(StatusCode::BAD_GATEWAY, &[], format!("proxy: {e}")),
    };
    if existing.is_some_and(|d| d != digest) {
        return api_error(
            StatusCode::BAD_REQUEST,
            "TAG_INVALID",
            &format!(
                "The image tag '{tag}' already exists in the '{repo}' repository and cannot be \
                 overwritten because the repository is immutable."
            ),
        );
    }
    forward_parts(sh, parts, Some(reqwest::Body::from(raw)), pq, path).await
}

fn token_endpoint(
    sh: &Arc<Shared>,
    ta: &TokenAuth,
    headers: &http::HeaderMap,
    query: &str,
    form: Option<&str>,
) -> Response<Body> {
    use base64::Engine as _;
    let refused = || {
        full(
            StatusCode::UNAUTHORIZED,
            &[("content-type", "application/json".into())],
            r#"{"details":"incorrect username or password"}"#,
        )
    };
    // OAuth2 refresh-token grant (Docker's identity tokens): the password is the valid token.
    let mut scopes: Vec<String> = Vec::new();
    let authenticated = if let Some(form) = form {
        let f = query_params(form);
        let get = |k: &str| f.iter().find(|(fk, _)| fk == k).map(|(_, v)| v.clone());
        if get("grant_type").as_deref() != Some("refresh_token")
            || get("refresh_token").as_deref() != Some(ta.password.as_str())
        {
            return refused();
        }
        scopes.extend(
            get("scope")
                .unwrap_or_default()
                .split(' ')
                .filter(|s| !s.is_empty())
                .map(str::to_string),
        );
        true
    } else {
        let basic = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Basic "))
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
            .and_then(|b| String::from_utf8(b).ok());
        scopes.extend(
            query_params(query)
                .into_iter()
                .filter(|(k, _)| k == "scope")
                .map(|(_, v)| v),
        );
        match basic {
            Some(up) if up == format!("{}:{}", ta.username, ta.password) => true,
            Some(_) => return refused(),
            None => false,
        }
    };
    let mut grants = Vec::new();
    for v in scopes {
        let parts: Vec<&str> = v.splitn(3, ':').collect();
        if parts.len() == 3 && parts[0] == "repository" {
            let actions = if authenticated {
                parts[2].to_string()
            } else {
                "pull".to_string()
            };
            grants.push((parts[1].to_string(), actions));
        }
    }
    let mut raw = [0u8; 16];
    fastrand::fill(&mut raw);
    let token = hex::encode(raw);
    sh.tokens.lock().unwrap().insert(token.clone(), grants);
    full(
        StatusCode::OK,
        &[("content-type", "application/json".into())],
        format!(r#"{{"token":"{token}","expires_in":300}}"#),
    )
}

/// ECR-like refusals answered by the proxy itself (None: forward).
fn ecr_rules(
    sh: &Arc<Shared>,
    req: &Request<Incoming>,
    path: &str,
    query: &str,
) -> Option<Response<Body>> {
    let upload_id = path
        .split("/blobs/uploads/")
        .nth(1)
        .filter(|s| !s.is_empty())?;
    let len = header_u64(req.headers(), "content-length");
    let mut uploads = sh.uploads.lock().unwrap();
    let up = uploads.entry(upload_id.to_string()).or_default();
    let violation = |m: String| {
        sh.violations.lock().unwrap().push(m.clone());
        Some(api_error(
            StatusCode::BAD_REQUEST,
            "BLOB_UPLOAD_INVALID",
            &m,
        ))
    };
    match req.method().as_str() {
        "PATCH" => {
            if len < FIVE_MIB {
                return violation(format!("part of {len} bytes is smaller than 5 MiB"));
            }
            let range = req
                .headers()
                .get("content-range")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let start: u64 = range
                .split('-')
                .next()
                .and_then(|s| s.parse().ok())
                .unwrap_or(u64::MAX);
            if start != up.offset {
                return violation(format!(
                    "part starts at {start} (Content-Range {range:?}), expected {}",
                    up.offset
                ));
            }
            None
        }
        "PUT" if query.contains("digest=") => {
            if len > FIVE_MIB {
                return Some(api_error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "SIZE_INVALID",
                    "monolithic uploads are not supported: send parts with PATCH",
                ));
            }
            if len == 0 && up.parts > 0 {
                return violation("empty final PUT after parts".into());
            }
            None
        }
        _ => None,
    }
}

async fn forward(sh: &Arc<Shared>, req: Request<Incoming>, pq: &str, path: &str) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let has_body = header_u64(&parts.headers, "content-length") > 0
        || parts.headers.contains_key("transfer-encoding");
    let body =
        has_body.then(|| reqwest::Body::wrap_stream(BodyStream::new(body).filter_map_frames()));
    forward_parts(sh, parts, body, pq, path).await
}

async fn forward_parts(
    sh: &Arc<Shared>,
    parts: http::request::Parts,
    body: Option<reqwest::Body>,
    pq: &str,
    path: &str,
) -> Response<Body> {
    let url = format!("{}{}", sh.upstream, pq);
    let method = reqwest::Method::from_bytes(parts.method.as_str().as_bytes()).unwrap();
    let mut rb = sh.client.request(method.clone(), url);
    for (k, v) in &parts.headers {
        let n = k.as_str();
        if is_hop_by_hop(n) || n == "host" {
            continue;
        }
        if n == "authorization" && sh.mode.token_auth.is_some() {
            continue;
        }
        rb = rb.header(n, v.as_bytes());
    }
    if let Some(body) = body {
        rb = rb.body(body);
    }
    let patch_len = header_u64(&parts.headers, "content-length");
    let resp = match rb.send().await {
        Ok(r) => r,
        Err(e) => return full(StatusCode::BAD_GATEWAY, &[], format!("proxy: {e}")),
    };
    let status = resp.status().as_u16();
    let mut out = Response::builder().status(status);
    let mut ecr_patch = false;
    if sh.mode.ecr_chunked && parts.method == "PATCH" && status == 202 {
        ecr_patch = true;
        out = out.status(201);
    }
    for (k, v) in resp.headers() {
        let n = k.as_str();
        if is_hop_by_hop(n) {
            continue;
        }
        if n == "location" {
            let loc = v.to_str().unwrap_or("").replace(&sh.upstream, &sh.me);
            out = out.header(n, loc);
            continue;
        }
        if n == "range" && ecr_patch {
            continue;
        }
        out = out.header(n, v.as_bytes());
    }
    if ecr_patch {
        let id = path
            .split("/blobs/uploads/")
            .nth(1)
            .unwrap_or("")
            .to_string();
        let mut uploads = sh.uploads.lock().unwrap();
        let up = uploads.entry(id).or_default();
        up.offset += patch_len;
        up.parts += 1;
        // The Range stops advancing after the first part, as ECR's does.
        let stale = up
            .first_range
            .get_or_insert_with(|| format!("0-{}", patch_len.saturating_sub(1)))
            .clone();
        out = out.header("range", stale);
    }
    let corrupt = sh.mode.corrupt_blobs
        && parts.method == "GET"
        && path.contains("/blobs/sha256:")
        && status == 200;
    let mut first = true;
    let stream = futures_util::StreamExt::map(resp.bytes_stream(), move |r| {
        r.map(|b| {
            if corrupt && first && !b.is_empty() {
                first = false;
                let mut v = b.to_vec();
                v[0] ^= 0xff;
                Frame::data(Bytes::from(v))
            } else {
                Frame::data(b)
            }
        })
        .map_err(|e| Box::new(e) as BoxError)
    });
    out.body(BodyExt::boxed(StreamBody::new(stream))).unwrap()
}

trait FilterData {
    fn filter_map_frames(
        self,
    ) -> impl futures_util::Stream<Item = Result<Bytes, hyper::Error>> + Send + 'static;
}

impl FilterData for BodyStream<Incoming> {
    fn filter_map_frames(
        self,
    ) -> impl futures_util::Stream<Item = Result<Bytes, hyper::Error>> + Send + 'static {
        futures_util::StreamExt::filter_map(self, |f| async move {
            match f {
                Ok(frame) => frame.into_data().ok().map(Ok),
                Err(e) => Some(Err(e)),
            }
        })
    }
}

fn is_hop_by_hop(n: &str) -> bool {
    matches!(
        n,
        "connection"
            | "keep-alive"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    )
}

/// A test image written into a layout.
pub struct TestImage {
    /// Manifest descriptor.
    pub manifest: Descriptor,
    /// Config descriptor.
    pub config: Descriptor,
    /// Layer descriptors.
    pub layers: Vec<Descriptor>,
}

impl TestImage {
    /// All blobs (config first).
    pub fn blobs(&self) -> Vec<&Descriptor> {
        std::iter::once(&self.config).chain(&self.layers).collect()
    }
}

/// Write a layer of `size` pseudo-random bytes (seeded) into the layout, streaming.
pub fn random_blob(layout: &Layout, size: u64, seed: u64) -> Descriptor {
    let mut w = layout.blob_writer().unwrap();
    std::io::copy(&mut RandomReader::new(size, seed), &mut w).unwrap();
    let (d, n) = w.commit(None, Some(size)).unwrap();
    Descriptor::new(oci::MEDIA_TYPE_OCI_LAYER_GZIP, d, n)
}

/// Write config and manifest for `layers` (already in the layout) and tag the manifest.
pub fn write_image(
    layout: &Layout,
    tag: &str,
    layers: Vec<Descriptor>,
    diff_ids: Vec<Digest>,
    cmd: Option<Vec<String>>,
) -> TestImage {
    write_image_for(layout, tag, "amd64", layers, diff_ids, cmd)
}

/// Like [`write_image`] for another architecture.
pub fn write_image_for(
    layout: &Layout,
    tag: &str,
    arch: &str,
    layers: Vec<Descriptor>,
    diff_ids: Vec<Digest>,
    cmd: Option<Vec<String>>,
) -> TestImage {
    let config = serde_json::json!({
        "architecture": arch,
        "os": "linux",
        "config": {"Cmd": cmd, "Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created_by": "wpimg test"}],
    });
    let (cd, cs) = layout
        .write_blob(&serde_json::to_vec(&config).unwrap())
        .unwrap();
    let config = Descriptor::new(oci::MEDIA_TYPE_OCI_CONFIG, cd, cs);
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": oci::MEDIA_TYPE_OCI_MANIFEST,
        "config": config,
        "layers": layers,
    });
    let (md, ms) = layout
        .write_blob(&serde_json::to_vec(&manifest).unwrap())
        .unwrap();
    let manifest = Descriptor::new(oci::MEDIA_TYPE_OCI_MANIFEST, md, ms);
    layout.tag(tag, &manifest).unwrap();
    TestImage {
        manifest,
        config,
        layers,
    }
}

/// An image of random layers of the given sizes (not a valid filesystem: for registries only).
pub fn random_image(layout: &Layout, tag: &str, layer_sizes: &[u64], seed: u64) -> TestImage {
    let layers: Vec<Descriptor> = layer_sizes
        .iter()
        .enumerate()
        .map(|(i, s)| random_blob(layout, *s, seed.wrapping_mul(1000).wrapping_add(i as u64)))
        .collect();
    let diff_ids = layers.iter().map(|l| l.digest.clone()).collect();
    write_image(
        layout,
        tag,
        layers,
        diff_ids,
        Some(vec!["/bin/true".into()]),
    )
}

/// Reader of `size` pseudo-random bytes: a 1 MiB random block, each further block the same
/// xor a per-block word (incompressible enough, fast in debug builds).
pub struct RandomReader {
    base: Vec<u8>,
    seed: u64,
    pos: u64,
    size: u64,
}

impl RandomReader {
    /// `size` bytes from `seed`.
    pub fn new(size: u64, seed: u64) -> Self {
        let mut base = vec![0u8; 1 << 20];
        fastrand::Rng::with_seed(seed).fill(&mut base);
        Self {
            base,
            seed,
            pos: 0,
            size,
        }
    }
}

impl std::io::Read for RandomReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        let block_len = self.base.len() as u64;
        let block = self.pos / block_len;
        let off = (self.pos % block_len) as usize;
        let n = (out.len() as u64)
            .min(self.size - self.pos)
            .min(block_len - off as u64) as usize;
        let salt = (block.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ self.seed).to_le_bytes();
        for (i, (o, b)) in out[..n]
            .iter_mut()
            .zip(&self.base[off..off + n])
            .enumerate()
        {
            *o = b ^ salt[(off + i) % 8];
        }
        self.pos += n as u64;
        Ok(n)
    }
}

/// A valid gzip tar layer holding one file of `size` pseudo-random bytes; returns the layer
/// descriptor and its diff_id.
pub fn random_tar_layer(layout: &Layout, size: u64, seed: u64) -> (Descriptor, Digest) {
    random_tar_layer_with(layout, size, seed, flate2::Compression::fast())
}

/// [`random_tar_layer`] with a chosen gzip level (`none()` stores: fast for big layers).
pub fn random_tar_layer_with(
    layout: &Layout,
    size: u64,
    seed: u64,
    level: flate2::Compression,
) -> (Descriptor, Digest) {
    let mut w = layout.blob_writer().unwrap();
    let diff_id = {
        let gz = flate2::write::GzEncoder::new(&mut w, level);
        let mut tar = tar::Builder::new(HashingWriter::new(gz));
        let mut h = tar::Header::new_gnu();
        h.set_size(size);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        tar.append_data(
            &mut h,
            format!("data-{seed}"),
            RandomReader::new(size, seed),
        )
        .unwrap();
        let (gz, diff_id, _) = tar.into_inner().unwrap().finish();
        gz.finish().unwrap();
        diff_id
    };
    let (d, n) = w.commit(None, None).unwrap();
    (
        Descriptor::new(oci::MEDIA_TYPE_OCI_LAYER_GZIP, d, n),
        diff_id,
    )
}

/// A runnable image: one gzip layer with `/bin/echo` and the libraries it needs, whose command
/// prints `message`.
pub fn echo_image(layout: &Layout, tag: &str, message: &str) -> TestImage {
    let mut files = vec![PathBuf::from("/bin/echo")];
    let ldd = run(Command::new("ldd").arg("/bin/echo"));
    for line in ldd.lines() {
        let candidate = match line.split("=>").nth(1) {
            Some(rhs) => rhs.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = candidate.filter(|p| p.starts_with('/')) {
            files.push(PathBuf::from(p));
        }
    }
    let mut w = layout.blob_writer().unwrap();
    let diff_id = {
        let gz = flate2::write::GzEncoder::new(&mut w, flate2::Compression::fast());
        let hashing = HashingWriter::new(gz);
        let mut tar = tar::Builder::new(hashing);
        tar.mode(tar::HeaderMode::Deterministic);
        for f in &files {
            let data = std::fs::read(f).unwrap();
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o755);
            h.set_entry_type(tar::EntryType::Regular);
            tar.append_data(&mut h, f.strip_prefix("/").unwrap(), &data[..])
                .unwrap();
        }
        let hashing = tar.into_inner().unwrap();
        let (gz, diff_id, _) = hashing.finish();
        gz.finish().unwrap();
        diff_id
    };
    let (d, n) = w.commit(None, None).unwrap();
    let layer = Descriptor::new(oci::MEDIA_TYPE_OCI_LAYER_GZIP, d, n);
    write_image(
        layout,
        tag,
        vec![layer],
        vec![diff_id],
        Some(vec!["/bin/echo".into(), message.into()]),
    )
}

/// A `Reporter` that records events (and can run a hook on each).
pub struct Recorder {
    /// Events seen.
    pub events: Mutex<Vec<wpimg::events::Event>>,
    hook: Box<dyn Fn(&wpimg::events::Event) + Send + Sync>,
}

impl Recorder {
    /// A recorder without hook.
    pub fn new() -> Arc<Self> {
        Self::with_hook(|_| {})
    }

    /// A recorder calling `hook` on each event.
    pub fn with_hook(hook: impl Fn(&wpimg::events::Event) + Send + Sync + 'static) -> Arc<Self> {
        Arc::new(Self {
            events: Mutex::new(Vec::new()),
            hook: Box::new(hook),
        })
    }

    /// Notes (retries, fallbacks) seen.
    pub fn notes(&self) -> Vec<String> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter_map(|e| match e {
                wpimg::events::Event::Note { message } => Some(message.clone()),
                _ => None,
            })
            .collect()
    }
}

impl wpimg::events::Reporter for Recorder {
    fn event(&self, e: wpimg::events::Event) {
        (self.hook)(&e);
        self.events.lock().unwrap().push(e);
    }
}

/// sha256 digest of what `skopeo inspect --raw` returns for an image.
pub fn skopeo_manifest_digest(image: &str, extra: &[&str]) -> Digest {
    require_tool("skopeo", "apt-get install skopeo");
    let out = Command::new("skopeo")
        .args(["inspect", "--raw"])
        .args(extra)
        .arg(image)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "skopeo inspect {image} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Digest::of_bytes(&out.stdout)
}
