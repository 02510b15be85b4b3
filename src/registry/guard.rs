//! What a registry may make wpimg do: where requests may go (credentials stay with their origin,
//! no https→http downgrade, plain HTTP only to allowed hosts), how long nothing may move (the
//! idle timeout of every request, while sending, waiting and reading) and how much may be read.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::time::{Instant, Sleep};
use url::Url;

use super::error::{RegistryError, StallPhase};
use crate::reference::{is_loopback_host, strip_port};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Largest piece of a request body handed to the connection at once, so that progress (and
/// its absence) is seen while a large part is being sent (the size of the layout's file reads:
/// smaller pieces cost push throughput).
const FRAME: usize = 256 * 1024;
/// Redirects followed for one request.
const MAX_REDIRECTS: usize = 10;

/// `host:port` of a URL (`host` alone for the scheme's default port).
pub(crate) fn host_port(u: &Url) -> String {
    let host = u.host_str().unwrap_or("");
    match u.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.to_string(),
    }
}

/// `scheme://host:port` of a URL: what errors show (paths and queries may carry session state).
pub(crate) fn origin(u: &Url) -> String {
    format!("{}://{}", u.scheme(), host_port(u))
}

/// Same scheme, host and port.
pub(crate) fn same_origin(a: &Url, b: &Url) -> bool {
    a.scheme() == b.scheme()
        && a.host_str() == b.host_str()
        && a.port_or_known_default() == b.port_or_known_default()
}

/// Whether `host` (`host` or `host:port`) may be reached over plain HTTP: loopback, or named
/// (with or without its port) in `insecure_hosts`.
pub(crate) fn plain_http_allowed(insecure_hosts: &[String], host: &str) -> bool {
    is_loopback_host(host)
        || insecure_hosts
            .iter()
            .any(|h| h == host || h == strip_port(host))
}

/// Why a URL a registry sent wpimg to is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Refusal {
    /// From https to plain http.
    #[error("refusing the downgrade from {from} to {to}")]
    Downgrade { from: String, to: String },
    /// Plain http to a host that is not allowed it.
    #[error("refusing plain HTTP to {to}")]
    PlainHttp { to: String },
    /// Not http or https.
    #[error("refusing the URL scheme of {to}")]
    Scheme { to: String },
    /// Redirect loop or chain.
    #[error("more than {MAX_REDIRECTS} redirects")]
    TooManyRedirects,
}

impl Refusal {
    /// The registry error for a refusal met while doing `operation` on `repository`.
    pub(crate) fn into_error(self, repository: &str, operation: &str) -> RegistryError {
        let (repository, operation) = (repository.to_string(), operation.to_string());
        match self {
            Self::Downgrade { from, to } => RegistryError::Downgrade {
                repository,
                operation,
                from,
                to,
            },
            Self::PlainHttp { to } => RegistryError::PlainHttpRefused {
                repository,
                operation,
                to,
            },
            other => RegistryError::Protocol {
                repository,
                operation,
                message: other.to_string(),
            },
        }
    }
}

/// Check a URL wpimg is sent to from `from` (the registry's endpoint, or the previous hop of a
/// redirect): no downgrade from https to http, plain http only to allowed hosts.
pub(crate) fn check_hop(insecure_hosts: &[String], from: &Url, to: &Url) -> Result<(), Refusal> {
    match to.scheme() {
        "https" => Ok(()),
        "http" if from.scheme() == "https" => Err(Refusal::Downgrade {
            from: origin(from),
            to: origin(to),
        }),
        "http" if plain_http_allowed(insecure_hosts, &host_port(to)) => Ok(()),
        "http" => Err(Refusal::PlainHttp { to: origin(to) }),
        _ => Err(Refusal::Scheme { to: origin(to) }),
    }
}

/// The client's redirect rule: at most [`MAX_REDIRECTS`] hops, each passing [`check_hop`].
/// reqwest itself drops `Authorization` on a hop to another scheme, host or port.
pub(crate) fn redirect_policy(insecure_hosts: Vec<String>) -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(move |attempt| {
        if attempt.previous().len() > MAX_REDIRECTS {
            return attempt.error(Refusal::TooManyRedirects);
        }
        let refusal = attempt
            .previous()
            .last()
            .and_then(|from| check_hop(&insecure_hosts, from, attempt.url()).err());
        match refusal {
            Some(r) => attempt.error(r),
            None => attempt.follow(),
        }
    })
}

/// Marker error of a response body that stopped moving (found again by [`transport_error`]).
#[derive(Debug, thiserror::Error)]
#[error("no data for {idle:?} after {received} bytes")]
pub(crate) struct BodyStalled {
    idle: Duration,
    received: u64,
}

/// Turn a reqwest error of `operation` on `repository` (talking to `host`) into a registry
/// error: a stalled body, a refused redirect, or a transport failure (its URL stripped).
pub(crate) fn transport_error(
    repository: &str,
    operation: &str,
    host: &str,
    e: reqwest::Error,
) -> RegistryError {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(c) = cur {
        if let Some(s) = c.downcast_ref::<BodyStalled>() {
            return RegistryError::Stalled {
                repository: repository.to_string(),
                operation: operation.to_string(),
                host: host.to_string(),
                idle: s.idle,
                phase: StallPhase::Body {
                    received: s.received,
                },
            };
        }
        if let Some(r) = c.downcast_ref::<Refusal>() {
            return r.clone().into_error(repository, operation);
        }
        cur = c.source();
    }
    RegistryError::Transport {
        repository: repository.to_string(),
        operation: operation.to_string(),
        source: e.without_url(),
    }
}

/// Progress of one request: when a byte last moved, how much of the body was sent.
pub(crate) struct Activity {
    start: Instant,
    last_ms: AtomicU64,
    sent: AtomicU64,
    total: Option<u64>,
}

impl Activity {
    /// Start counting now, for a request body of `total` bytes (if known).
    pub fn new(total: Option<u64>) -> Arc<Self> {
        Arc::new(Self {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            total,
        })
    }

    fn sent(&self, n: usize) {
        self.sent.fetch_add(n as u64, Ordering::Relaxed);
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Resolves once nothing moved for `limit`; says where the request stood.
    pub async fn stalled(&self, limit: Duration) -> StallPhase {
        loop {
            let last = self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let deadline = last + limit;
            if Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep_until(deadline).await;
        }
        let sent = self.sent.load(Ordering::Relaxed);
        match self.total {
            Some(t) if sent >= t => StallPhase::Answer,
            None if sent == 0 => StallPhase::Answer,
            total => StallPhase::Upload { sent, total },
        }
    }
}

/// A request body handed over in pieces of at most [`FRAME`] bytes, each counted in an
/// [`Activity`].
pub(crate) struct ProgressBody {
    inner: reqwest::Body,
    pending: Bytes,
    activity: Arc<Activity>,
}

impl ProgressBody {
    pub fn new(inner: reqwest::Body, activity: Arc<Activity>) -> Self {
        Self {
            inner,
            pending: Bytes::new(),
            activity,
        }
    }

    fn piece(&mut self) -> Bytes {
        let n = self.pending.len().min(FRAME);
        let piece = self.pending.split_to(n);
        self.activity.sent(piece.len());
        piece
    }
}

impl HttpBody for ProgressBody {
    type Data = Bytes;
    type Error = reqwest::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, reqwest::Error>>> {
        let this = &mut *self;
        if !this.pending.is_empty() {
            return Poll::Ready(Some(Ok(Frame::data(this.piece()))));
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => {
                    this.pending = data;
                    Poll::Ready(Some(Ok(Frame::data(this.piece()))))
                }
                Err(frame) => Poll::Ready(Some(Ok(frame))),
            },
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.pending.is_empty() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let inner = self.inner.size_hint();
        let extra = self.pending.len() as u64;
        let mut h = SizeHint::new();
        h.set_lower(inner.lower() + extra);
        if let Some(u) = inner.upper() {
            h.set_upper(u + extra);
        }
        h
    }
}

/// A response body that fails with [`BodyStalled`] when no data comes for `limit` while it is
/// being read (time the reader spends elsewhere does not count).
pub(crate) struct IdleBody {
    inner: reqwest::Body,
    limit: Duration,
    sleep: Pin<Box<Sleep>>,
    rearm: bool,
    received: u64,
}

impl IdleBody {
    pub fn new(inner: reqwest::Body, limit: Duration) -> Self {
        Self {
            inner,
            limit,
            sleep: Box::pin(tokio::time::sleep(limit)),
            rearm: true,
            received: 0,
        }
    }
}

impl HttpBody for IdleBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.rearm {
            let deadline = Instant::now() + this.limit;
            this.sleep.as_mut().reset(deadline);
            this.rearm = false;
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.received += d.len() as u64;
                }
                this.rearm = true;
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Box::new(e)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => match this.sleep.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyStalled {
                    idle: this.limit,
                    received: this.received,
                })))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The same response (status, headers, final URL) with [`IdleBody`] around its body.
pub(crate) fn idle_response(resp: reqwest::Response, limit: Duration) -> reqwest::Response {
    use reqwest::ResponseBuilderExt as _;
    let url = resp.url().clone();
    let (mut parts, body) = http::Response::from(resp).into_parts();
    // reqwest keeps the final URL in an extension only its builder can set.
    if let Ok(marker) = http::Response::builder().url(url).body(()) {
        parts.extensions = marker.into_parts().0.extensions;
    }
    let body = reqwest::Body::wrap(IdleBody::new(body, limit));
    reqwest::Response::from(http::Response::from_parts(parts, body))
}

/// The `Content-Length` an answer declares.
pub(crate) fn content_length(resp: &reqwest::Response) -> Option<u64> {
    resp.headers()
        .get(http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Why [`read_limited`] stopped.
pub(crate) enum ReadFailure {
    /// More than the limit came.
    Overlong,
    /// The transport failed (or the body stalled).
    Transport(reqwest::Error),
}

/// Read a whole body of at most `limit` bytes; stops at the first byte past it.
pub(crate) async fn read_limited(
    mut resp: reqwest::Response,
    limit: u64,
) -> Result<Vec<u8>, ReadFailure> {
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(ReadFailure::Transport)? {
        if (out.len() + chunk.len()) as u64 > limit {
            return Err(ReadFailure::Overlong);
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// How much of an answer's body may be read, and how a violation is named.
pub(crate) struct Bound<'a> {
    /// The image reference (or `registry/repository`) in errors.
    pub reference: &'a str,
    /// `manifest`, `config sha256:...`, ...
    pub what: String,
    /// Bytes that may be read.
    pub limit: u64,
    /// Whether `limit` is the size declared for the content (else wpimg's own limit).
    pub declared: bool,
}

impl<'a> Bound<'a> {
    /// At most `declared` bytes when a size is declared (refused when over `max`), else `max`.
    pub fn new(
        reference: &'a str,
        what: String,
        declared: Option<u64>,
        max: u64,
    ) -> Result<Self, RegistryError> {
        match declared {
            Some(size) if size > max => Err(RegistryError::TooLarge {
                reference: reference.to_string(),
                what,
                size,
                limit: max,
            }),
            Some(size) => Ok(Self {
                reference,
                what,
                limit: size,
                declared: true,
            }),
            None => Ok(Self {
                reference,
                what,
                limit: max,
                declared: false,
            }),
        }
    }

    /// The error for an answer that sends (or announces) more than the bound.
    pub fn exceeded(&self, announced: Option<u64>) -> RegistryError {
        match announced {
            Some(size) if !self.declared => RegistryError::TooLarge {
                reference: self.reference.to_string(),
                what: self.what.clone(),
                size,
                limit: self.limit,
            },
            _ => RegistryError::Overlong {
                reference: self.reference.to_string(),
                what: self.what.clone(),
                limit: self.limit,
                declared: self.declared,
            },
        }
    }

    /// Refuse an answer whose `Content-Length` is over the bound, before reading any of it.
    pub fn check_announced(&self, resp: &reqwest::Response) -> Result<(), RegistryError> {
        match content_length(resp) {
            Some(n) if n > self.limit => Err(self.exceeded(Some(n))),
            _ => Ok(()),
        }
    }

    /// Read the whole body within the bound (`repository`/`op` name transport failures).
    pub async fn read(
        &self,
        resp: reqwest::Response,
        repository: &str,
        op: &str,
    ) -> Result<Vec<u8>, RegistryError> {
        self.check_announced(&resp)?;
        let host = host_port(resp.url());
        read_limited(resp, self.limit).await.map_err(|f| match f {
            ReadFailure::Overlong => self.exceeded(None),
            ReadFailure::Transport(e) => transport_error(repository, op, &host, e),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u(s: &str) -> Url {
        Url::parse(s).unwrap()
    }

    #[test]
    fn hops_keep_tls_and_plain_http_rules() {
        let insecure = vec!["reg.lan:5000".to_string()];
        let tls = u("https://reg.example:5000/v2/");
        let plain = u("http://127.0.0.1:5000/v2/");
        assert_eq!(
            check_hop(&insecure, &tls, &u("https://cdn.example/x")),
            Ok(())
        );
        assert_eq!(
            check_hop(&insecure, &tls, &u("http://reg.example:5000/x?_state=s")),
            Err(Refusal::Downgrade {
                from: "https://reg.example:5000".into(),
                to: "http://reg.example:5000".into()
            })
        );
        // Loopback is no excuse for a downgrade.
        assert!(matches!(
            check_hop(&insecure, &tls, &u("http://127.0.0.1:9/")),
            Err(Refusal::Downgrade { .. })
        ));
        assert_eq!(
            check_hop(&insecure, &plain, &u("http://127.0.0.2:7/")),
            Ok(())
        );
        assert_eq!(
            check_hop(&insecure, &plain, &u("http://reg.lan:5000/")),
            Ok(())
        );
        assert_eq!(
            check_hop(&insecure, &plain, &u("http://10.0.0.5:80/token")),
            Err(Refusal::PlainHttp {
                to: "http://10.0.0.5".into()
            })
        );
        assert!(matches!(
            check_hop(&insecure, &plain, &u("file:///etc/passwd")),
            Err(Refusal::Scheme { .. })
        ));
    }

    #[test]
    fn origins_compare_scheme_host_and_port() {
        assert!(same_origin(
            &u("https://r.io/v2/a"),
            &u("https://r.io:443/v2/b?x=1")
        ));
        assert!(!same_origin(&u("https://r.io/"), &u("http://r.io:443/")));
        assert!(!same_origin(
            &u("http://127.0.0.1:5000/"),
            &u("http://127.0.0.1:5001/")
        ));
        assert!(!same_origin(
            &u("http://127.0.0.1:5000/"),
            &u("http://127.0.0.2:5000/")
        ));
        assert_eq!(origin(&u("http://h:80/p?q=secret")), "http://h");
        assert_eq!(origin(&u("https://[::1]:5000/p")), "https://[::1]:5000");
    }

    #[tokio::test]
    async fn request_bodies_go_in_counted_pieces() {
        use http_body_util::BodyExt;
        let len = 3 * FRAME + 1000;
        let a = Activity::new(Some(len as u64));
        let body = ProgressBody::new(reqwest::Body::from(vec![7u8; len]), a.clone());
        assert_eq!(body.size_hint().exact(), Some(len as u64));
        let mut body = body;
        let mut sizes = Vec::new();
        while let Some(f) = body.frame().await {
            sizes.push(f.unwrap().into_data().unwrap().len());
        }
        assert_eq!(sizes, vec![FRAME, FRAME, FRAME, 1000]);
        assert_eq!(a.sent.load(Ordering::Relaxed), len as u64);
    }

    #[tokio::test]
    async fn idle_request_reports_where_it_stood() {
        let limit = Duration::from_millis(200);
        let a = Activity::new(Some(10));
        assert_eq!(
            a.stalled(limit).await,
            StallPhase::Upload {
                sent: 0,
                total: Some(10)
            }
        );
        a.sent(4);
        assert_eq!(
            a.stalled(limit).await,
            StallPhase::Upload {
                sent: 4,
                total: Some(10)
            }
        );
        tokio::time::sleep(limit).await;
        a.sent(6);
        let t = Instant::now();
        assert_eq!(a.stalled(limit).await, StallPhase::Answer);
        // Progress moved the deadline: the whole limit passed again after the last byte.
        assert!(
            t.elapsed() >= limit - Duration::from_millis(20),
            "{:?}",
            t.elapsed()
        );
    }

    #[tokio::test]
    async fn idle_body_fails_when_nothing_comes() {
        use http_body_util::BodyExt;
        let (mut tx, rx) = futures_channel_pair();
        let inner = reqwest::Body::wrap_stream(rx);
        let mut body = IdleBody::new(inner, Duration::from_millis(300));
        tx.push(Bytes::from_static(b"abc"));
        assert_eq!(
            body.frame().await.unwrap().unwrap().into_data().unwrap(),
            Bytes::from_static(b"abc")
        );
        let err = body.frame().await.unwrap().unwrap_err();
        let s = err.downcast_ref::<BodyStalled>().unwrap();
        assert_eq!((s.idle, s.received), (Duration::from_millis(300), 3));
        drop(tx);
    }

    #[tokio::test]
    async fn guarded_responses_keep_status_headers_and_url() {
        use reqwest::ResponseBuilderExt as _;
        let url = u("http://127.0.0.2:9/v2/r/blobs/sha256:00");
        let r = http::Response::builder()
            .status(206)
            .header("docker-content-digest", "sha256:00")
            .url(url.clone())
            .body(reqwest::Body::from("abc"))
            .unwrap();
        let r = idle_response(reqwest::Response::from(r), Duration::from_secs(5));
        assert_eq!(r.status().as_u16(), 206);
        assert_eq!(r.url(), &url);
        assert!(r.headers().contains_key("docker-content-digest"));
        assert_eq!(r.bytes().await.unwrap(), Bytes::from_static(b"abc"));
    }

    /// A body stream fed by hand that never ends on its own.
    struct Feed(tokio::sync::mpsc::UnboundedSender<Result<Bytes, std::io::Error>>);

    impl Feed {
        fn push(&mut self, b: Bytes) {
            self.0.send(Ok(b)).unwrap();
        }
    }

    fn futures_channel_pair() -> (
        Feed,
        impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send + Sync + 'static,
    ) {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let s = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
        (Feed(tx), s)
    }
}
