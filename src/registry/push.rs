//! Pushing an image from the local layout: per blob HEAD → mount → monolithic streaming upload
//! (chunked PATCH fallback), bounded concurrency, then manifests, then tags.

use std::io::{Seek, SeekFrom};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures_util::{stream, StreamExt, TryStreamExt};
use http::header::{ACCEPT, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, LOCATION};
use serde::Serialize;
use tokio::io::AsyncReadExt;
use tokio_util::io::ReaderStream;
use url::Url;

use super::client::{error_from_response, expect_status, Client, Repo, Retry, MANIFEST_ACCEPT};
use super::error::{tag_operation, RegistryError};
use super::pull::Wanted;
use super::sources::BlobSources;
use crate::events::{BlobOutcome, Event, SharedReporter};
use crate::layout::{Layout, LayoutError};
use crate::oci::{Descriptor, Digest, Manifest};
use crate::reference::{validate_tag, Reference, ReferenceError};

/// What happened to one blob.
#[derive(Debug, Clone, Serialize)]
pub struct BlobReport {
    /// The blob.
    pub digest: Digest,
    /// Its size.
    pub size: u64,
    /// Skipped, mounted, uploaded (push) or downloaded (pull).
    pub outcome: BlobOutcome,
    /// Repository it was mounted from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mounted_from: Option<String>,
}

/// The result of a push.
#[derive(Debug, Clone, Serialize)]
pub struct PushReport {
    /// Registry name.
    pub registry: String,
    /// Repository.
    pub repository: String,
    /// The pushed manifest (or index).
    pub manifest: Descriptor,
    /// Tags now pointing at it.
    pub tags: Vec<String>,
    /// Per-blob outcome, config first.
    pub blobs: Vec<BlobReport>,
    /// Manifests (and tags) actually written; 0 when the registry had them all.
    pub manifests_put: usize,
    /// Bytes of blobs uploaded.
    pub bytes_uploaded: u64,
    /// HTTP requests sent during the push.
    pub requests: u64,
    /// Wall time in seconds.
    pub seconds: f64,
}

impl PushReport {
    /// Blobs with a given outcome.
    pub fn count(&self, outcome: BlobOutcome) -> usize {
        self.blobs.iter().filter(|b| b.outcome == outcome).count()
    }
}

/// Byte counter of one transfer that reports `BlobProgress` a few times a second.
#[derive(Clone)]
pub(crate) struct Progress(Arc<ProgressInner>);

struct ProgressInner {
    digest: String,
    done: AtomicU64,
    last: Mutex<(u64, Instant)>,
    reporter: SharedReporter,
}

impl Progress {
    pub fn new(digest: &Digest, reporter: &SharedReporter) -> Self {
        Self(Arc::new(ProgressInner {
            digest: digest.to_string(),
            done: AtomicU64::new(0),
            last: Mutex::new((0, Instant::now())),
            reporter: reporter.clone(),
        }))
    }

    pub fn reset(&self, to: u64) {
        self.0.done.store(to, Ordering::Relaxed);
        if let Ok(mut l) = self.0.last.lock() {
            *l = (to, Instant::now());
        }
    }

    pub fn add(&self, n: u64) {
        let done = self.0.done.fetch_add(n, Ordering::Relaxed) + n;
        let Ok(mut last) = self.0.last.lock() else {
            return;
        };
        let delta = done.saturating_sub(last.0);
        if delta >= 8 << 20 || (delta >= 256 << 10 && last.1.elapsed().as_millis() >= 100) {
            *last = (done, Instant::now());
            drop(last);
            self.0.reporter.event(Event::BlobProgress {
                digest: self.0.digest.clone(),
                done,
            });
        }
    }
}

/// A request body streaming `len` bytes of a file from `offset`, counted by `progress`.
fn file_body(
    path: &Path,
    offset: u64,
    len: u64,
    progress: &Progress,
) -> Result<reqwest::Body, RegistryError> {
    let io_err = |source| RegistryError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(io_err)?;
    f.seek(SeekFrom::Start(offset)).map_err(io_err)?;
    progress.reset(offset);
    let p = progress.clone();
    let reader = tokio::fs::File::from_std(f).take(len);
    let s =
        ReaderStream::with_capacity(reader, 256 * 1024).inspect_ok(move |b| p.add(b.len() as u64));
    Ok(reqwest::Body::wrap_stream(s))
}

fn with_digest(u: &Url, d: &Digest) -> Url {
    let mut u = u.clone();
    u.query_pairs_mut().append_pair("digest", &d.to_string());
    u
}

/// One blob being uploaded from the layout.
struct Upload<'a> {
    repo: &'a Repo,
    scopes: &'a [String],
    path: &'a Path,
    desc: &'a Descriptor,
    progress: &'a Progress,
    /// The session as tracked by [`Client::open_upload`].
    session_id: u64,
}

/// Whether an answer to a monolithic PUT means "this registry wants chunks".
fn refuses_monolithic(e: &RegistryError) -> bool {
    let RegistryError::Api { status, .. } = e else {
        return false;
    };
    matches!(status, 400 | 405 | 411 | 413 | 415 | 416 | 501)
        && ![
            "DIGEST_INVALID",
            "NAME_UNKNOWN",
            "NAME_INVALID",
            "DENIED",
            "UNAUTHORIZED",
        ]
        .iter()
        .any(|c| e.has_code(c))
}

/// Check a `Docker-Content-Digest` answer header, if the registry sent one.
pub(crate) fn check_digest_header(
    repo: &Repo,
    resp: &reqwest::Response,
    what: &'static str,
    expected: &Digest,
) -> Result<(), RegistryError> {
    let Some(v) = resp.headers().get("docker-content-digest") else {
        return Ok(());
    };
    let got: Digest = v
        .to_str()
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| {
            repo.protocol(
                &format!("{what} {expected}"),
                "malformed Docker-Content-Digest header".into(),
            )
        })?;
    if &got != expected {
        return Err(RegistryError::DigestMismatch {
            repository: repo.name.clone(),
            what,
            expected: expected.clone(),
            actual: got,
        });
    }
    Ok(())
}

struct Plan {
    blobs: Vec<Descriptor>,
    /// Child manifests of an index, then the pushed manifest itself.
    manifests: Vec<(Descriptor, bytes::Bytes)>,
}

fn plan(layout: &Layout, top: &Descriptor, repo: &Repo) -> Result<Plan, RegistryError> {
    let blob_err = |digest: &Digest, source| RegistryError::Blob {
        repository: repo.name.clone(),
        digest: digest.clone(),
        source,
    };
    let read = |d: &Descriptor| -> Result<(bytes::Bytes, Manifest), RegistryError> {
        let raw = layout
            .read_blob(&d.digest)
            .map_err(|e| blob_err(&d.digest, e))?;
        let m = Manifest::parse(&raw, Some(&d.media_type)).map_err(|source| {
            RegistryError::Manifest {
                reference: format!("{} in {}", d.digest, layout.dir().display()),
                source,
            }
        })?;
        Ok((raw.into(), m))
    };
    let mut manifests = Vec::new();
    let mut images = Vec::new();
    let (raw, m) = read(top)?;
    match m {
        Manifest::Image(im) => images.push(im),
        Manifest::Index(idx) => {
            for child in &idx.manifests {
                let (craw, cm) = read(child)?;
                match cm {
                    Manifest::Image(im) => images.push(im),
                    Manifest::Index(_) => {
                        return Err(RegistryError::UnsupportedMediaType {
                            reference: format!("{} in {}", child.digest, layout.dir().display()),
                            media_type: format!("{} (nested index)", child.media_type),
                        })
                    }
                }
                manifests.push((child.clone(), craw));
            }
        }
    }
    manifests.push((top.clone(), raw));
    let mut blobs: Vec<Descriptor> = Vec::new();
    for im in images {
        for d in std::iter::once(im.config).chain(im.layers) {
            if !blobs.iter().any(|b| b.digest == d.digest) {
                blobs.push(d);
            }
        }
    }
    for b in &blobs {
        let size = layout.blob_size(&b.digest).map_err(|_| {
            blob_err(
                &b.digest,
                LayoutError::BlobMissing {
                    digest: b.digest.clone(),
                    dir: layout.dir().to_path_buf(),
                },
            )
        })?;
        if size != b.size {
            return Err(blob_err(
                &b.digest,
                LayoutError::SizeMismatch {
                    digest: b.digest.clone(),
                    expected: b.size,
                    actual: size,
                },
            ));
        }
    }
    Ok(Plan { blobs, manifests })
}

impl Client {
    /// Push the manifest (image or index) `manifest` from `layout` to `dest`'s repository, then
    /// tag it with `dest.tag` and every tag in `tags`. Blobs the registry has are skipped,
    /// blobs known in another repository of the same registry are mounted, the rest are
    /// streamed from the layout.
    pub async fn push_image(
        &self,
        layout: &Layout,
        manifest: &Descriptor,
        dest: &Reference,
        tags: &[String],
        reporter: &SharedReporter,
    ) -> Result<PushReport, RegistryError> {
        let started = Instant::now();
        let requests_before = self.requests_sent();
        let mut all_tags: Vec<String> = Vec::new();
        for t in dest.tag.iter().chain(tags) {
            validate_tag(t).map_err(|reason| {
                RegistryError::Reference(ReferenceError {
                    reference: format!("{}:{t}", dest.repo_path()),
                    reason,
                })
            })?;
            if !all_tags.contains(t) {
                all_tags.push(t.clone());
            }
        }
        let repo = self.repo(&dest.registry, &dest.repository).await?;
        let plan = plan(layout, manifest, &repo)?;
        let scopes = [repo.push_scope()];

        // One HEAD first: it learns the auth challenge before transfers start in parallel, and a
        // registry that has the manifest has all its blobs.
        let have_manifest = self
            .head_manifest(&repo, &scopes, &manifest.digest.to_string(), reporter)
            .await?
            .is_some_and(|d| d.digest == manifest.digest);

        let blobs: Vec<BlobReport> = if have_manifest {
            plan.blobs
                .iter()
                .map(|d| {
                    reporter.event(Event::BlobStart {
                        digest: d.digest.to_string(),
                        size: d.size,
                        direction: "push".into(),
                    });
                    reporter.event(Event::BlobDone {
                        digest: d.digest.to_string(),
                        size: d.size,
                        outcome: BlobOutcome::Skipped,
                    });
                    BlobReport {
                        digest: d.digest.clone(),
                        size: d.size,
                        outcome: BlobOutcome::Skipped,
                        mounted_from: None,
                    }
                })
                .collect()
        } else {
            let sources = BlobSources::load(layout);
            let mut done: Vec<(usize, BlobReport)> = stream::iter(plan.blobs.iter().enumerate())
                .map(|(i, d)| {
                    let from = sources.mount_source(&d.digest, &repo.registry, &repo.repository);
                    let repo = &repo;
                    async move {
                        self.push_blob(repo, layout, d, from.as_deref(), reporter)
                            .await
                            .map(|r| (i, r))
                    }
                })
                .buffer_unordered(self.opts.jobs)
                .try_collect()
                .await?;
            done.sort_by_key(|(i, _)| *i);
            done.into_iter().map(|(_, r)| r).collect()
        };

        let mut manifests_put = 0;
        if !have_manifest {
            for (d, raw) in &plan.manifests {
                if self
                    .put_manifest(&repo, &d.digest.to_string(), d, raw, reporter)
                    .await?
                {
                    manifests_put += 1;
                }
            }
        }
        let (top, raw) = plan
            .manifests
            .last()
            .ok_or_else(|| repo.protocol("push", "nothing to push".into()))?;
        for t in &all_tags {
            if self.put_manifest(&repo, t, top, raw, reporter).await? {
                manifests_put += 1;
            }
        }

        let pushed: Vec<&Digest> = plan
            .blobs
            .iter()
            .map(|b| &b.digest)
            .chain(plan.manifests.iter().map(|(d, _)| &d.digest))
            .collect();
        if let Err(e) = BlobSources::record(layout, &dest.repo_path(), pushed) {
            reporter.event(Event::Warning {
                message: format!(
                    "cannot record blob sources in {}: {e}",
                    layout.dir().display()
                ),
            });
        }
        Ok(PushReport {
            registry: dest.registry.clone(),
            repository: dest.repository.clone(),
            manifest: manifest.clone(),
            tags: all_tags,
            bytes_uploaded: blobs
                .iter()
                .filter(|b| b.outcome == BlobOutcome::Uploaded)
                .map(|b| b.size)
                .sum(),
            blobs,
            manifests_put,
            requests: self.requests_sent() - requests_before,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    async fn push_blob(
        &self,
        repo: &Repo,
        layout: &Layout,
        desc: &Descriptor,
        mount_from: Option<&str>,
        reporter: &SharedReporter,
    ) -> Result<BlobReport, RegistryError> {
        reporter.event(Event::BlobStart {
            digest: desc.digest.to_string(),
            size: desc.size,
            direction: "push".into(),
        });
        let progress = Progress::new(&desc.digest, reporter);
        let (outcome, mounted_from) = self
            .with_retries(&format!("push blob {}", desc.digest), reporter, || {
                self.push_blob_once(repo, layout, desc, mount_from, &progress, reporter)
            })
            .await?;
        reporter.event(Event::BlobDone {
            digest: desc.digest.to_string(),
            size: desc.size,
            outcome,
        });
        Ok(BlobReport {
            digest: desc.digest.clone(),
            size: desc.size,
            outcome,
            mounted_from,
        })
    }

    async fn push_blob_once(
        &self,
        repo: &Repo,
        layout: &Layout,
        desc: &Descriptor,
        mount_from: Option<&str>,
        progress: &Progress,
        reporter: &SharedReporter,
    ) -> Result<(BlobOutcome, Option<String>), RegistryError> {
        // Retried as a whole by `push_blob`: requests here leave stalls to it.
        let digest = &desc.digest;
        let scopes = vec![repo.push_scope()];
        let op = format!("check blob {digest}");
        let head = repo.url(&format!("blobs/{digest}"))?;
        let resp = self
            .send(repo, &scopes, &op, Retry::InOperation, reporter, |c| {
                Ok(c.head(head.clone()))
            })
            .await?;
        match resp.status().as_u16() {
            200 if self.was_streamed(digest) => return Ok((BlobOutcome::Uploaded, None)),
            200 => return Ok((BlobOutcome::Skipped, None)),
            404 => {}
            _ => return Err(error_from_response(resp, &repo.name, &op).await),
        }

        let mut session = None;
        if let Some(from) = mount_from {
            let op = format!("mount blob {digest} from {from}");
            let mut u = repo.url("blobs/uploads/")?;
            u.query_pairs_mut()
                .append_pair("mount", &digest.to_string())
                .append_pair("from", from);
            let mount_scopes = vec![repo.push_scope(), format!("repository:{from}:pull")];
            let res = self
                .send(
                    repo,
                    &mount_scopes,
                    &op,
                    Retry::InOperation,
                    reporter,
                    |c| Ok(c.post(u.clone()).header(CONTENT_LENGTH, 0)),
                )
                .await;
            match res {
                Ok(resp) if resp.status().as_u16() == 201 => {
                    check_digest_header(repo, &resp, "blob", digest)?;
                    return Ok((BlobOutcome::Mounted, Some(from.to_string())));
                }
                // 202: not mounted (e.g. ECR without mounting enabled); upload in this session.
                Ok(resp) if resp.status().as_u16() == 202 => {
                    session = repo
                        .resolve_location(&op, resp.headers().get(LOCATION))
                        .ok();
                }
                Ok(resp) => {
                    let e = error_from_response(resp, &repo.name, &op).await;
                    reporter.event(Event::Note {
                        message: format!("not mounted, uploading instead: {e}"),
                    });
                }
                Err(e) if e.is_temporary() => return Err(e),
                Err(e) => reporter.event(Event::Note {
                    message: format!("not mounted, uploading instead: {e}"),
                }),
            }
        }
        let session = match session {
            Some(s) => s,
            None => {
                let what = format!("blob {digest}");
                self.start_upload(repo, &scopes, &what, Retry::InOperation, reporter)
                    .await?
            }
        };
        let path = layout.blob_path(digest);
        let up = Upload {
            repo,
            scopes: &scopes,
            path: &path,
            desc,
            progress,
            session_id: self.open_upload(repo, &session),
        };
        // Until here the session is open: an interrupted push discards it (the future is
        // dropped before `close_upload`).
        let uploaded = self.upload(&up, session, reporter).await;
        self.close_upload(up.session_id);
        uploaded?;
        Ok((BlobOutcome::Uploaded, None))
    }

    /// Monolithic upload in `session` (chunked when the registry wants chunks).
    async fn upload(
        &self,
        up: &Upload<'_>,
        session: Url,
        reporter: &SharedReporter,
    ) -> Result<(), RegistryError> {
        let repo = up.repo;
        if self.uses_chunked(&repo.registry) {
            return self.upload_chunked(up, session, reporter).await;
        }
        match self.upload_monolithic(up, &session, reporter).await {
            Err(e) if refuses_monolithic(&e) => {
                reporter.event(Event::Note {
                    message: format!(
                        "{} refused a monolithic upload, switching to chunked uploads: {e}",
                        repo.registry
                    ),
                });
                self.set_chunked(&repo.registry);
                let what = format!("blob {}", up.desc.digest);
                let session = self
                    .start_upload(repo, up.scopes, &what, Retry::InOperation, reporter)
                    .await?;
                self.move_upload(up.session_id, &session);
                self.upload_chunked(up, session, reporter).await
            }
            other => other,
        }
    }

    /// Open an upload session (POST); `what` names the blob in errors.
    pub(super) async fn start_upload(
        &self,
        repo: &Repo,
        scopes: &[String],
        what: &str,
        retry: Retry,
        reporter: &SharedReporter,
    ) -> Result<Url, RegistryError> {
        let op = format!("start upload of {what}");
        let u = repo.url("blobs/uploads/")?;
        let resp = self
            .send(repo, scopes, &op, retry, reporter, |c| {
                Ok(c.post(u.clone()).header(CONTENT_LENGTH, 0))
            })
            .await?;
        let resp = expect_status(resp, &[202], &repo.name, &op).await?;
        repo.resolve_location(&op, resp.headers().get(LOCATION))
    }

    async fn upload_monolithic(
        &self,
        up: &Upload<'_>,
        session: &Url,
        reporter: &SharedReporter,
    ) -> Result<(), RegistryError> {
        let Upload {
            repo,
            scopes,
            path,
            desc,
            progress,
            ..
        } = up;
        let op = format!("upload blob {}", desc.digest);
        let u = with_digest(session, &desc.digest);
        let size = desc.size;
        let resp = self
            .send(repo, scopes, &op, Retry::Never, reporter, |c| {
                Ok(c.put(u.clone())
                    .header(CONTENT_TYPE, "application/octet-stream")
                    .header(CONTENT_LENGTH, size)
                    .body(file_body(path, 0, size, progress)?))
            })
            .await?;
        let resp = expect_status(resp, &[201, 204], &repo.name, &op).await?;
        check_digest_header(repo, &resp, "blob", &desc.digest)
    }

    /// Chunked upload: PATCH parts of `chunk_size` (201 or 202 accepted, the offset tracked
    /// here rather than trusted from `Range`), the last part in the final PUT.
    async fn upload_chunked(
        &self,
        up: &Upload<'_>,
        mut session: Url,
        reporter: &SharedReporter,
    ) -> Result<(), RegistryError> {
        let Upload {
            repo,
            scopes,
            path,
            desc,
            progress,
            session_id,
        } = up;
        let chunk = self.opts.chunk_size;
        let size = desc.size;
        let mut offset = 0u64;
        while size - offset > chunk {
            let op = format!(
                "upload blob {} bytes {offset}-{}",
                desc.digest,
                offset + chunk - 1
            );
            let u = session.clone();
            let resp = self
                .send(repo, scopes, &op, Retry::Never, reporter, |c| {
                    Ok(c.patch(u.clone())
                        .header(CONTENT_TYPE, "application/octet-stream")
                        .header(CONTENT_LENGTH, chunk)
                        .header(CONTENT_RANGE, format!("{offset}-{}", offset + chunk - 1))
                        .body(file_body(path, offset, chunk, progress)?))
                })
                .await?;
            let resp = expect_status(resp, &[201, 202, 204], &repo.name, &op).await?;
            if resp.headers().contains_key(LOCATION) {
                session = repo.resolve_location(&op, resp.headers().get(LOCATION))?;
                self.move_upload(*session_id, &session);
            }
            offset += chunk;
        }
        let op = format!("finish upload of blob {}", desc.digest);
        let u = with_digest(&session, &desc.digest);
        let last = size - offset;
        let resp = self
            .send(repo, scopes, &op, Retry::Never, reporter, |c| {
                let mut rb = c
                    .put(u.clone())
                    .header(CONTENT_TYPE, "application/octet-stream")
                    .header(CONTENT_LENGTH, last)
                    .body(file_body(path, offset, last, progress)?);
                if last > 0 {
                    rb = rb.header(CONTENT_RANGE, format!("{offset}-{}", size - 1));
                }
                Ok(rb)
            })
            .await?;
        let resp = expect_status(resp, &[201, 204], &repo.name, &op).await?;
        check_digest_header(repo, &resp, "blob", &desc.digest)
    }

    /// HEAD a manifest by tag or digest; `None` when the registry does not have it.
    pub(crate) async fn head_manifest(
        &self,
        repo: &Repo,
        scopes: &[String],
        reference: &str,
        reporter: &SharedReporter,
    ) -> Result<Option<Descriptor>, RegistryError> {
        let op = format!("check manifest {reference}");
        let u = repo.url(&format!("manifests/{reference}"))?;
        let resp = self
            .send(repo, scopes, &op, Retry::Temporary, reporter, |c| {
                Ok(c.head(u.clone()).header(ACCEPT, MANIFEST_ACCEPT))
            })
            .await?;
        match resp.status().as_u16() {
            200 => {}
            404 => return Ok(None),
            _ => return Err(error_from_response(resp, &repo.name, &op).await),
        }
        let h = resp.headers();
        let media_type = h
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.split(';').next().unwrap_or(s).trim().to_string())
            .unwrap_or_default();
        let size = h
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        match h
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<Digest>().ok())
        {
            Some(d) => Ok(Some(Descriptor::new(media_type, d, size))),
            None => {
                // No digest header: fetch the manifest and hash it.
                let m = self
                    .get_manifest(repo, scopes, Wanted::named(reference, None), reporter)
                    .await?;
                Ok(Some(m.descriptor))
            }
        }
    }

    /// PUT a manifest under `reference` unless the registry already has that digest there.
    /// Returns whether it was written.
    async fn put_manifest(
        &self,
        repo: &Repo,
        reference: &str,
        desc: &Descriptor,
        raw: &bytes::Bytes,
        reporter: &SharedReporter,
    ) -> Result<bool, RegistryError> {
        let scopes = [repo.push_scope()];
        if let Some(have) = self
            .head_manifest(repo, &scopes, reference, reporter)
            .await?
        {
            if have.digest == desc.digest {
                return Ok(false);
            }
        }
        let op = if reference.starts_with("sha256:") {
            format!("push manifest {reference}")
        } else {
            tag_operation(&desc.digest, reference)
        };
        let put = async {
            let u = repo.url(&format!("manifests/{reference}"))?;
            let resp = self
                .send(repo, &scopes, &op, Retry::Temporary, reporter, |c| {
                    Ok(c.put(u.clone())
                        .header(CONTENT_TYPE, desc.media_type.as_str())
                        .body(raw.clone()))
                })
                .await?;
            let resp = expect_status(resp, &[200, 201, 204], &repo.name, &op).await?;
            check_digest_header(repo, &resp, "manifest", &desc.digest)
        };
        match put.await {
            Ok(()) => Ok(true),
            Err(e) if reference.starts_with("sha256:") => Err(e),
            Err(e) => Err(e.for_tag(reference)),
        }
    }
}
