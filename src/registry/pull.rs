//! Pulling images into the local layout (and fetching manifests/configs for inspection).

use std::io::Write;
use std::time::Instant;

use futures_util::{stream, StreamExt, TryStreamExt};
use http::header::{ACCEPT, CONTENT_TYPE};

use super::client::{
    expect_status, Client, Repo, Retry, MANIFEST_ACCEPT, MAX_CONFIG_BYTES, MAX_MANIFEST_BYTES,
};
use super::error::RegistryError;
use super::guard::{self, Bound};
use super::push::{check_digest_header, BlobReport, Progress};
use super::source::RemoteSource;
use super::sources::BlobSources;
use crate::events::{BlobOutcome, Event, SharedReporter};
use crate::layout::{Layout, LayoutError};
use crate::oci::{self, Descriptor, Digest, Document, Image, Manifest, Platform, Resolved};
use crate::reference::Reference;

/// A manifest to fetch: its tag or digest, and what is known of it beforehand.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Wanted<'a> {
    /// Tag or digest.
    pub reference: &'a str,
    /// The digest it must have.
    pub digest: Option<&'a Digest>,
    /// The size its descriptor declares.
    pub size: Option<u64>,
}

impl<'a> Wanted<'a> {
    /// A manifest known by tag or digest only.
    pub fn named(reference: &'a str, digest: Option<&'a Digest>) -> Self {
        Self {
            reference,
            digest,
            size: None,
        }
    }
}

/// `registry/repository:tag` or `registry/repository@sha256:...`.
fn manifest_name(repo: &Repo, reference: &str) -> String {
    if reference.contains(':') {
        format!("{}@{reference}", repo.name)
    } else {
        format!("{}:{reference}", repo.name)
    }
}

/// A pulled image, stored in the layout.
#[derive(Debug, Clone)]
pub struct PulledImage {
    /// What was pulled.
    pub reference: Reference,
    /// Descriptor of the index the manifest was selected from, if any.
    pub index: Option<Descriptor>,
    /// The platform's image (manifest kept as served: OCI or Docker schema 2).
    pub image: Image,
    /// Per-blob outcome (skipped = already in the layout), config first.
    pub blobs: Vec<BlobReport>,
    /// Bytes downloaded.
    pub bytes_downloaded: u64,
    /// Wall time in seconds.
    pub seconds: f64,
}

impl Client {
    /// The descriptor (digest, media type, size) a tag or digest currently resolves to in the
    /// registry, by HEAD; `None` when it does not exist.
    pub async fn manifest_descriptor(
        &self,
        reference: &Reference,
        reporter: &SharedReporter,
    ) -> Result<Option<Descriptor>, RegistryError> {
        let repo = self
            .repo(&reference.registry, &reference.repository)
            .await?;
        self.head_manifest(
            &repo,
            &[repo.pull_scope()],
            &reference.manifest_reference(),
            reporter,
        )
        .await
    }

    /// Fetch the manifest or index a reference names, verifying its digest.
    pub async fn fetch_manifest(
        &self,
        reference: &Reference,
        reporter: &SharedReporter,
    ) -> Result<Document, RegistryError> {
        let repo = self
            .repo(&reference.registry, &reference.repository)
            .await?;
        let tag_or_digest = reference.manifest_reference();
        let wanted = Wanted::named(&tag_or_digest, reference.digest.as_ref());
        self.get_manifest(&repo, &[repo.pull_scope()], wanted, reporter)
            .await
    }

    /// Fetch an image's manifest (selecting `platform` from an index) and config, in memory.
    pub async fn fetch_image(
        &self,
        reference: &Reference,
        platform: &Platform,
        reporter: &SharedReporter,
    ) -> Result<Resolved, RegistryError> {
        let source = self.source(reference, None, reporter).await?;
        let top = reference.manifest_reference();
        oci::resolve(&source, &top, reference.digest.as_ref(), platform).await
    }

    /// `reference`'s repository as an image source (reading `layout` first, if given).
    async fn source<'a>(
        &'a self,
        reference: &Reference,
        layout: Option<&'a Layout>,
        reporter: &'a SharedReporter,
    ) -> Result<RemoteSource<'a>, RegistryError> {
        Ok(RemoteSource {
            client: self,
            repo: self
                .repo(&reference.registry, &reference.repository)
                .await?,
            image: reference.to_string(),
            layout,
            reporter,
        })
    }

    /// Pull an image into `layout`: manifest (the `platform` entry of an index), config and
    /// layers, each verified against its digest. Blobs already in the layout are not fetched
    /// again, nor is a manifest addressed by a digest the layout has.
    pub async fn pull_image(
        &self,
        reference: &Reference,
        platform: &Platform,
        layout: &Layout,
        reporter: &SharedReporter,
    ) -> Result<PulledImage, RegistryError> {
        let started = Instant::now();
        let source = self.source(reference, Some(layout), reporter).await?;
        let repo = &source.repo;
        let top = reference.manifest_reference();
        let (index, image) =
            oci::resolve_manifest(&source, &top, reference.digest.as_ref(), platform).await?;
        let Manifest::Image(manifest) = &image.manifest else {
            return Err(unsupported(reference, &image.descriptor.media_type));
        };
        // The config is read into memory after the download: refuse an oversized one first.
        Bound::new(
            &reference.to_string(),
            format!("config {}", manifest.config.digest),
            Some(manifest.config.size),
            MAX_CONFIG_BYTES,
        )?;
        let mut wanted: Vec<Descriptor> = Vec::new();
        for d in std::iter::once(&manifest.config).chain(&manifest.layers) {
            if !wanted.iter().any(|w| w.digest == d.digest) {
                wanted.push(d.clone());
            }
        }
        let mut blobs: Vec<(usize, BlobReport)> = stream::iter(wanted.iter().enumerate())
            .map(|(i, d)| async move {
                self.pull_blob(repo, layout, d, reporter)
                    .await
                    .map(|r| (i, r))
            })
            .buffer_unordered(self.opts.jobs)
            .try_collect()
            .await?;
        blobs.sort_by_key(|(i, _)| *i);
        let blobs: Vec<BlobReport> = blobs.into_iter().map(|(_, b)| b).collect();

        if let Some(i) = &index {
            layout.write_index(i)?;
        }
        layout.write_blob(&image.raw)?;
        let config = &manifest.config;
        let raw_config =
            layout
                .read_blob(&config.digest)
                .map_err(|source| RegistryError::Blob {
                    repository: repo.name.clone(),
                    digest: config.digest.clone(),
                    source,
                })?;
        let image = Image::from_raw(image.descriptor, image.raw, raw_config).map_err(|source| {
            RegistryError::Manifest {
                reference: format!("{reference} config {}", config.digest),
                source,
            }
        })?;
        let got = image.platform();
        if index.is_none() && (got.os != platform.os || got.architecture != platform.architecture) {
            reporter.event(Event::Warning {
                message: format!(
                    "{reference} is a {}/{} image, not {platform}",
                    got.os, got.architecture
                ),
            });
        }
        let recorded: Vec<&Digest> = wanted
            .iter()
            .map(|d| &d.digest)
            .chain(index.iter().map(|i| &i.descriptor.digest))
            .chain(std::iter::once(image.digest()))
            .collect();
        if let Err(e) = BlobSources::record(layout, &reference.repo_path(), recorded) {
            reporter.event(Event::Warning {
                message: format!(
                    "cannot record blob sources in {}: {e}",
                    layout.dir().display()
                ),
            });
        }
        Ok(PulledImage {
            reference: reference.clone(),
            index: index.map(|i| i.descriptor),
            image,
            bytes_downloaded: blobs
                .iter()
                .filter(|b| b.outcome == BlobOutcome::Downloaded)
                .map(|b| b.size)
                .sum(),
            blobs,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// GET a manifest by tag or digest and verify its digest. At most the size its descriptor
    /// declares (if known) and never more than [`MAX_MANIFEST_BYTES`] is read.
    pub(crate) async fn get_manifest(
        &self,
        repo: &Repo,
        scopes: &[String],
        wanted: Wanted<'_>,
        reporter: &SharedReporter,
    ) -> Result<Document, RegistryError> {
        let reference = wanted.reference;
        let expected = wanted.digest;
        let op = format!("get manifest {reference}");
        let name = manifest_name(repo, reference);
        let bound = Bound::new(&name, "manifest".into(), wanted.size, MAX_MANIFEST_BYTES)?;
        let u = repo.url(&format!("manifests/{reference}"))?;
        // Retried as a whole (one request): a body can stop or fail after the answer came.
        let raw = self.with_retries(&op, reporter, || async {
            let resp = self
                .send(repo, scopes, &op, Retry::Never, reporter, |c| {
                    Ok(c.get(u.clone()).header(ACCEPT, MANIFEST_ACCEPT))
                })
                .await?;
            let resp = expect_status(resp, &[200], &repo.name, &op).await?;
            let content_type = resp
                .headers()
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(|s| s.split(';').next().unwrap_or(s).trim().to_string());
            let header_digest = resp
                .headers()
                .get("docker-content-digest")
                .and_then(|v| v.to_str().ok())
                .and_then(|s| s.trim().parse::<Digest>().ok());
            let raw = bound.read(resp, &repo.name, &op).await?;
            Ok((raw, content_type, header_digest))
        });
        let (raw, content_type, header_digest) = raw.await?;
        let actual = Digest::of_bytes(&raw);
        if let Some(exp) = expected.or(header_digest.as_ref()) {
            if *exp != actual {
                return Err(RegistryError::DigestMismatch {
                    repository: repo.name.clone(),
                    what: "manifest",
                    expected: exp.clone(),
                    actual,
                });
            }
        }
        manifest_from_raw(&repo.name, reference, raw, content_type.as_deref())
    }

    /// GET an image config of `image` into memory, verified; at most the size its descriptor
    /// declares, which must be within [`MAX_CONFIG_BYTES`].
    pub(crate) async fn get_config(
        &self,
        repo: &Repo,
        image: &str,
        desc: &Descriptor,
        reporter: &SharedReporter,
    ) -> Result<Vec<u8>, RegistryError> {
        let op = format!("get blob {}", desc.digest);
        let what = format!("config {}", desc.digest);
        let bound = Bound::new(image, what, Some(desc.size), MAX_CONFIG_BYTES)?;
        let u = repo.url(&format!("blobs/{}", desc.digest))?;
        let scopes = [repo.pull_scope()];
        // Retried as a whole (one request), as a manifest.
        let raw = self
            .with_retries(&op, reporter, || async {
                let resp = self
                    .send(repo, &scopes, &op, Retry::Never, reporter, |c| {
                        Ok(c.get(u.clone()))
                    })
                    .await?;
                let resp = expect_status(resp, &[200], &repo.name, &op).await?;
                bound.read(resp, &repo.name, &op).await
            })
            .await?;
        let actual = Digest::of_bytes(&raw);
        if actual != desc.digest {
            return Err(RegistryError::DigestMismatch {
                repository: repo.name.clone(),
                what: "blob",
                expected: desc.digest.clone(),
                actual,
            });
        }
        Ok(raw)
    }

    pub(super) async fn pull_blob(
        &self,
        repo: &Repo,
        layout: &Layout,
        desc: &Descriptor,
        reporter: &SharedReporter,
    ) -> Result<BlobReport, RegistryError> {
        reporter.event(Event::BlobStart {
            digest: desc.digest.to_string(),
            size: desc.size,
            direction: "pull".into(),
        });
        let outcome = if layout.has_blob(&desc.digest) {
            BlobOutcome::Skipped
        } else {
            let progress = Progress::new(&desc.digest, reporter);
            self.with_retries(&format!("pull blob {}", desc.digest), reporter, || {
                self.download_blob(repo, layout, desc, &progress, reporter)
            })
            .await?;
            BlobOutcome::Downloaded
        };
        reporter.event(Event::BlobDone {
            digest: desc.digest.to_string(),
            size: desc.size,
            outcome,
        });
        Ok(BlobReport {
            digest: desc.digest.clone(),
            size: desc.size,
            outcome,
            mounted_from: None,
        })
    }

    async fn download_blob(
        &self,
        repo: &Repo,
        layout: &Layout,
        desc: &Descriptor,
        progress: &Progress,
        reporter: &SharedReporter,
    ) -> Result<(), RegistryError> {
        let op = format!("get blob {}", desc.digest);
        let blob_err = |source| RegistryError::Blob {
            repository: repo.name.clone(),
            digest: desc.digest.clone(),
            source,
        };
        let u = repo.url(&format!("blobs/{}", desc.digest))?;
        // Retried as a whole by `pull_blob`: stalls are left to it.
        let resp = self
            .send(
                repo,
                &[repo.pull_scope()],
                &op,
                Retry::InOperation,
                reporter,
                |c| Ok(c.get(u.clone())),
            )
            .await?;
        let resp = expect_status(resp, &[200], &repo.name, &op).await?;
        check_digest_header(repo, &resp, "blob", &desc.digest)?;
        let host = guard::host_port(resp.url());
        let bound = Bound {
            reference: &repo.name,
            what: format!("blob {}", desc.digest),
            limit: desc.size,
            declared: true,
        };
        bound.check_announced(&resp)?;
        progress.reset(0);
        let mut w = layout.blob_writer().map_err(blob_err)?;
        let mut body = resp.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| guard::transport_error(&repo.name, &op, &host, e))?;
            if w.written() + chunk.len() as u64 > desc.size {
                return Err(bound.exceeded(None));
            }
            w.write_all(&chunk)
                .map_err(|e| blob_err(LayoutError::Io(e)))?;
            progress.add(chunk.len() as u64);
        }
        match w.commit(Some(&desc.digest), Some(desc.size)) {
            Ok(_) => Ok(()),
            Err(LayoutError::DigestMismatch { expected, actual }) => {
                Err(RegistryError::DigestMismatch {
                    repository: repo.name.clone(),
                    what: "blob",
                    expected,
                    actual,
                })
            }
            Err(e) => Err(blob_err(e)),
        }
    }
}

fn unsupported(reference: &Reference, media_type: &str) -> RegistryError {
    RegistryError::UnsupportedMediaType {
        reference: reference.to_string(),
        media_type: media_type.to_string(),
    }
}

/// Parse raw manifest bytes as served (Docker schema 1 is refused).
fn manifest_from_raw(
    repo_name: &str,
    reference: &str,
    raw: Vec<u8>,
    content_type: Option<&str>,
) -> Result<Document, RegistryError> {
    let name = format!("{repo_name}:{reference}");
    if let Some(ct) = content_type {
        if ct.starts_with("application/vnd.docker.distribution.manifest.v1") {
            return Err(RegistryError::UnsupportedMediaType {
                reference: name,
                media_type: ct.to_string(),
            });
        }
    }
    Document::from_raw(raw, content_type).map_err(|source| RegistryError::Manifest {
        reference: name,
        source,
    })
}
