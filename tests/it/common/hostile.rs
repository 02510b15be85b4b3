//! A hostile registry for tests: a fake on 127.0.0.1 (hyper, as the proxy of
//! [`super::registry`]) that forwards to a real `docker-registry` whatever it does not
//! misbehave on, plus a second listener on another address — "the other host" — that records
//! the headers it receives. The fake can redirect uploads and blob reads to the other host, put
//! its token realm there, answer nothing (headers that never come), stop in the middle of a
//! body, stop reading an upload, and send more than it declares.

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{combinators::BoxBody, BodyExt, BodyStream, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Body = BoxBody<Bytes, BoxError>;

/// What the fake does with a matching request instead of forwarding it.
#[derive(Debug, Clone)]
pub enum Action {
    /// Never answer: the headers never come.
    StallHeaders,
    /// Answer `body` with its full `Content-Length`, send the first `after` bytes, then stall.
    StallBody {
        /// Content type.
        content_type: String,
        /// The whole body.
        body: Bytes,
        /// Bytes sent before stalling.
        after: usize,
    },
    /// Take `after` bytes of the request body, then stop reading it and never answer.
    StallUpload {
        /// Bytes read before stalling.
        after: u64,
    },
    /// Answer `total` filler bytes, announcing `content_length` (None: chunked, no size), and
    /// count what the connection takes in [`Hostile::flood_sent`].
    Flood {
        /// Content type.
        content_type: String,
        /// Bytes the fake is willing to send.
        total: u64,
        /// The `Content-Length` header, if any.
        content_length: Option<u64>,
    },
    /// Answer these bytes (a canned manifest or config).
    Serve {
        /// Content type.
        content_type: String,
        /// The body.
        body: Bytes,
    },
}

/// A request pattern and what to do with it; the first matching rule wins.
#[derive(Debug, Clone)]
pub struct Rule {
    /// HTTP method (empty: any).
    pub method: &'static str,
    /// The path ends with this.
    pub path_suffix: String,
    /// Only requests announcing at least this many body bytes.
    pub min_body: u64,
    /// What to do.
    pub action: Action,
}

impl Rule {
    /// `action` for `method` requests whose path ends with `path_suffix`.
    pub fn new(method: &'static str, path_suffix: impl Into<String>, action: Action) -> Self {
        Self {
            method,
            path_suffix: path_suffix.into(),
            min_body: 0,
            action,
        }
    }

    fn matches(&self, method: &str, path: &str, content_length: u64) -> bool {
        (self.method.is_empty() || self.method == method)
            && path.ends_with(&self.path_suffix)
            && content_length >= self.min_body
    }
}

/// How the fake behaves.
#[derive(Debug, Clone)]
pub struct HostileOptions {
    /// The real registry (`http://127.0.0.1:PORT`) everything unhandled is forwarded to.
    pub upstream: Option<String>,
    /// Basic credentials the other host adds itself when it forwards to the upstream (it plays
    /// a storage or upload host reached by URL, which needs none from the client).
    pub upstream_auth: Option<(String, String)>,
    /// Address of the other host's listener.
    pub other_ip: IpAddr,
    /// Point upload session `Location`s at the other host.
    pub redirect_uploads: bool,
    /// Answer blob reads (GET/HEAD `/blobs/sha256:...`) with a 307 to the other host.
    pub redirect_blob_reads: bool,
    /// Demand bearer tokens from a realm on the other host (`http://OTHER/token`), which grants
    /// them for these basic credentials.
    pub token_realm: Option<(String, String)>,
    /// Canned answers and misbehaviour.
    pub rules: Vec<Rule>,
}

impl Default for HostileOptions {
    fn default() -> Self {
        Self {
            upstream: None,
            upstream_auth: None,
            other_ip: IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)),
            redirect_uploads: false,
            redirect_blob_reads: false,
            token_realm: None,
            rules: Vec::new(),
        }
    }
}

/// Which listener saw a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The fake registry.
    Registry,
    /// The other host.
    Other,
}

/// One request seen by a listener.
#[derive(Debug, Clone)]
pub struct Seen {
    /// Which listener.
    pub side: Side,
    /// Method.
    pub method: String,
    /// Path.
    pub path: String,
    /// The `Authorization` header, if any.
    pub authorization: Option<String>,
}

struct Shared {
    opts: HostileOptions,
    me: String,
    other: String,
    seen: Mutex<Vec<Seen>>,
    tokens: Mutex<Vec<String>>,
    flood_sent: AtomicU64,
    client: reqwest::Client,
}

/// The fake registry and the other host, on their own thread and runtime; stopped on drop.
pub struct Hostile {
    /// The fake registry's address (127.0.0.1).
    pub addr: SocketAddr,
    /// The other host's address.
    pub other_addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Hostile {
    /// Start both listeners.
    pub fn start(opts: HostileOptions) -> Self {
        let main = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let other = std::net::TcpListener::bind((opts.other_ip, 0)).unwrap_or_else(|e| {
            panic!("cannot listen on {} for the other host: {e}", opts.other_ip)
        });
        for l in [&main, &other] {
            l.set_nonblocking(true).unwrap();
        }
        let addr = main.local_addr().unwrap();
        let other_addr = other.local_addr().unwrap();
        let shared = Arc::new(Shared {
            opts,
            me: format!("http://{addr}"),
            other: format!("http://{other_addr}"),
            seen: Mutex::new(Vec::new()),
            tokens: Mutex::new(Vec::new()),
            flood_sent: AtomicU64::new(0),
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
                let main = tokio::net::TcpListener::from_std(main).unwrap();
                let other = tokio::net::TcpListener::from_std(other).unwrap();
                loop {
                    let (stream, side) = tokio::select! {
                        _ = &mut rx => break,
                        acc = main.accept() => (acc, Side::Registry),
                        acc = other.accept() => (acc, Side::Other),
                    };
                    let Ok((stream, _)) = stream else { continue };
                    let sh = sh.clone();
                    tokio::spawn(async move {
                        let svc =
                            hyper::service::service_fn(move |req| handle(sh.clone(), side, req));
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                            .await;
                    });
                }
            });
            rt.shutdown_timeout(Duration::from_secs(1));
        });
        Self {
            addr,
            other_addr,
            shared,
            shutdown: Some(tx),
            thread: Some(thread),
        }
    }

    /// `127.0.0.1:PORT` of the fake registry (the registry name in references).
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// `http://HOST:PORT` of the other host.
    pub fn other_url(&self) -> String {
        self.shared.other.clone()
    }

    /// Requests seen so far by both listeners.
    pub fn seen(&self) -> Vec<Seen> {
        self.shared.seen.lock().unwrap().clone()
    }

    /// Requests seen so far by one listener.
    pub fn seen_by(&self, side: Side) -> Vec<Seen> {
        self.seen().into_iter().filter(|s| s.side == side).collect()
    }

    /// Bytes of [`Action::Flood`] bodies the connections took so far (sent or buffered).
    pub fn flood_sent(&self) -> u64 {
        self.shared.flood_sent.load(Ordering::SeqCst)
    }
}

impl Drop for Hostile {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A non-loopback IPv4 address of this machine (a host wpimg must not treat as loopback).
pub fn non_loopback_ipv4() -> Ipv4Addr {
    let mut found = None;
    // SAFETY: getifaddrs fills a list this function walks read-only and frees once.
    unsafe {
        let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
        assert_eq!(libc::getifaddrs(&mut list), 0, "getifaddrs failed");
        let mut cur = list;
        while !cur.is_null() && found.is_none() {
            let ifa = &*cur;
            if !ifa.ifa_addr.is_null() && i32::from((*ifa.ifa_addr).sa_family) == libc::AF_INET {
                let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                if !ip.is_loopback() && !ip.is_unspecified() {
                    found = Some(ip);
                }
            }
            cur = ifa.ifa_next;
        }
        libc::freeifaddrs(list);
    }
    found.expect("this machine has no non-loopback IPv4 address (needed for the other host)")
}

fn full(status: StatusCode, headers: &[(&str, String)], body: impl Into<Bytes>) -> Response<Body> {
    let mut b = Response::builder().status(status);
    for (k, v) in headers {
        b = b.header(*k, v.as_str());
    }
    b.body(Full::new(body.into()).map_err(|e| match e {}).boxed())
        .unwrap()
}

fn content_length(h: &http::HeaderMap) -> u64 {
    h.get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

async fn handle(
    sh: Arc<Shared>,
    side: Side,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    sh.seen.lock().unwrap().push(Seen {
        side,
        method: req.method().to_string(),
        path: req.uri().path().to_string(),
        authorization: req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
    });
    Ok(match side {
        Side::Registry => registry(&sh, req).await,
        Side::Other => other_host(&sh, req).await,
    })
}

/// The fake registry: rules, then the token check, then blob-read redirects, then forwarding.
async fn registry(sh: &Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let len = content_length(req.headers());
    let rule = sh
        .opts
        .rules
        .iter()
        .find(|r| r.matches(req.method().as_str(), &path, len))
        .cloned();
    if let Some(rule) = rule {
        return act(sh, rule.action, req).await;
    }
    if sh.opts.token_realm.is_some() && !has_token(sh, req.headers()) {
        let chal = format!(r#"Bearer realm="{}/token",service="hostile""#, sh.other);
        return full(
            StatusCode::UNAUTHORIZED,
            &[
                ("www-authenticate", chal),
                ("content-type", "application/json".into()),
            ],
            r#"{"errors":[{"code":"UNAUTHORIZED","message":"token required"}]}"#,
        );
    }
    let is_blob_read =
        (req.method() == "GET" || req.method() == "HEAD") && path.contains("/blobs/sha256:");
    if sh.opts.redirect_blob_reads && is_blob_read {
        let to = format!("{}{}", sh.other, req.uri());
        return full(StatusCode::TEMPORARY_REDIRECT, &[("location", to)], "");
    }
    let upload_host = if sh.opts.redirect_uploads {
        sh.other.clone()
    } else {
        sh.me.clone()
    };
    forward(sh, req, &upload_host, None).await
}

/// The other host: a token realm, or a forwarder to the upstream with its own credentials.
async fn other_host(sh: &Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    if req.uri().path() == "/token" {
        return token(sh, req.headers());
    }
    let auth = sh.opts.upstream_auth.as_ref().map(|(u, p)| {
        use base64::Engine as _;
        let b = base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"));
        format!("Basic {b}")
    });
    let me = sh.other.clone();
    forward(sh, req, &me, auth).await
}

fn has_token(sh: &Shared, h: &http::HeaderMap) -> bool {
    h.get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| sh.tokens.lock().unwrap().iter().any(|x| x == t))
}

fn token(sh: &Shared, h: &http::HeaderMap) -> Response<Body> {
    use base64::Engine as _;
    let Some((user, pass)) = &sh.opts.token_realm else {
        return full(StatusCode::NOT_FOUND, &[], "");
    };
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    );
    let given = h.get("authorization").and_then(|v| v.to_str().ok());
    if given != Some(expected.as_str()) {
        return full(
            StatusCode::UNAUTHORIZED,
            &[],
            r#"{"details":"credentials required"}"#,
        );
    }
    let t = format!("hostile-token-{}", sh.tokens.lock().unwrap().len());
    sh.tokens.lock().unwrap().push(t.clone());
    full(
        StatusCode::OK,
        &[("content-type", "application/json".into())],
        format!(r#"{{"token":"{t}","expires_in":300}}"#),
    )
}

async fn act(sh: &Arc<Shared>, action: Action, req: Request<Incoming>) -> Response<Body> {
    match action {
        Action::StallHeaders => std::future::pending().await,
        Action::StallUpload { after } => {
            let mut body = req.into_body();
            let mut read = 0u64;
            while read < after {
                match body.frame().await {
                    Some(Ok(f)) => read += f.data_ref().map_or(0, |d| d.len() as u64),
                    _ => break,
                }
            }
            std::future::pending().await
        }
        Action::StallBody {
            content_type,
            body,
            after,
        } => {
            let first = body.slice(..after.min(body.len()));
            let stream = futures_util::stream::once(async move { Ok(Frame::data(first)) })
                .chain(futures_util::stream::pending());
            Response::builder()
                .header("content-type", content_type)
                .header("content-length", body.len())
                .body(BodyExt::boxed(StreamBody::new(stream)))
                .unwrap()
        }
        Action::Flood {
            content_type,
            total,
            content_length,
        } => {
            let chunk = Bytes::from(vec![b'{'; 64 * 1024]);
            let sh = sh.clone();
            let stream = futures_util::stream::unfold(0u64, move |sent| {
                let (chunk, sh) = (chunk.clone(), sh.clone());
                async move {
                    if sent >= total {
                        return None;
                    }
                    let n = (total - sent).min(chunk.len() as u64);
                    sh.flood_sent.fetch_add(n, Ordering::SeqCst);
                    let piece = chunk.slice(..n as usize);
                    Some((Ok::<_, BoxError>(Frame::data(piece)), sent + n))
                }
            });
            let mut b = Response::builder().header("content-type", content_type);
            if let Some(n) = content_length {
                b = b.header("content-length", n);
            }
            b.body(BodyExt::boxed(StreamBody::new(stream))).unwrap()
        }
        Action::Serve { content_type, body } => {
            full(StatusCode::OK, &[("content-type", content_type)], body)
        }
    }
}

/// Forward a request to the upstream (404 without one), with `auth` instead of the client's
/// `Authorization` when given; upstream `Location`s are rewritten to `location_host`.
async fn forward(
    sh: &Arc<Shared>,
    req: Request<Incoming>,
    location_host: &str,
    auth: Option<String>,
) -> Response<Body> {
    let Some(upstream) = sh.opts.upstream.clone() else {
        return full(StatusCode::NOT_FOUND, &[], "");
    };
    let (parts, body) = req.into_parts();
    let url = format!("{upstream}{}", parts.uri);
    let method = reqwest::Method::from_bytes(parts.method.as_str().as_bytes()).unwrap();
    let mut rb = sh.client.request(method, url);
    for (k, v) in &parts.headers {
        let n = k.as_str();
        if matches!(
            n,
            "host" | "connection" | "transfer-encoding" | "keep-alive"
        ) {
            continue;
        }
        if n == "authorization" && (auth.is_some() || sh.opts.token_realm.is_some()) {
            continue;
        }
        rb = rb.header(n, v.as_bytes());
    }
    if let Some(a) = auth {
        rb = rb.header("authorization", a);
    }
    if content_length(&parts.headers) > 0 || parts.headers.contains_key("transfer-encoding") {
        let s = BodyStream::new(body).filter_map(|f| async move {
            match f {
                Ok(frame) => frame.into_data().ok().map(Ok::<_, hyper::Error>),
                Err(e) => Some(Err(e)),
            }
        });
        rb = rb.body(reqwest::Body::wrap_stream(s));
    }
    let resp = match rb.send().await {
        Ok(r) => r,
        Err(e) => return full(StatusCode::BAD_GATEWAY, &[], format!("hostile: {e}")),
    };
    let mut out = Response::builder().status(resp.status().as_u16());
    for (k, v) in resp.headers() {
        let n = k.as_str();
        if matches!(n, "connection" | "transfer-encoding" | "keep-alive") {
            continue;
        }
        if n == "location" {
            let loc = v.to_str().unwrap_or("").replace(&upstream, location_host);
            out = out.header(n, loc);
            continue;
        }
        out = out.header(n, v.as_bytes());
    }
    let stream = resp
        .bytes_stream()
        .map(|r| r.map(Frame::data).map_err(|e| Box::new(e) as BoxError));
    out.body(BodyExt::boxed(StreamBody::new(stream))).unwrap()
}
