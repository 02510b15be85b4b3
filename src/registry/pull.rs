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
use super::sources::BlobSources;
use crate::events::{BlobOutcome, Event, SharedReporter};
use crate::layout::{Layout, LayoutError};
use crate::oci::{
    is_index_media_type, is_manifest_media_type, Descriptor, Digest, ImageConfig, ImageManifest,
    Manifest, Platform, MEDIA_TYPE_OCI_INDEX, MEDIA_TYPE_OCI_MANIFEST,
};
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

/// A manifest or index as the registry serves it.
#[derive(Debug, Clone)]
pub struct RemoteManifest {
    /// Its descriptor (media type, digest of the raw bytes, size).
    pub descriptor: Descriptor,
    /// The raw bytes (their digest is `descriptor.digest`).
    pub raw: Vec<u8>,
    /// Parsed.
    pub manifest: Manifest,
}

/// An image's manifest and config, fetched without touching a layout (for `inspect`).
#[derive(Debug, Clone)]
pub struct RemoteImage {
    /// The index the manifest was selected from, if the reference named an index.
    pub index: Option<RemoteManifest>,
    /// Descriptor of the platform's image manifest.
    pub descriptor: Descriptor,
    /// The image manifest.
    pub manifest: ImageManifest,
    /// Raw manifest bytes.
    pub raw_manifest: Vec<u8>,
    /// The parsed config.
    pub config: ImageConfig,
    /// Raw config bytes.
    pub raw_config: Vec<u8>,
}

/// A pulled image, stored in the layout.
#[derive(Debug, Clone)]
pub struct PulledImage {
    /// What was pulled.
    pub reference: Reference,
    /// Descriptor of the index the manifest was selected from, if any.
    pub index: Option<Descriptor>,
    /// Descriptor of the platform's image manifest (OCI or Docker schema 2, kept as served).
    pub descriptor: Descriptor,
    /// The image manifest.
    pub manifest: ImageManifest,
    /// The parsed config.
    pub config: ImageConfig,
    /// Raw config bytes.
    pub raw_config: Vec<u8>,
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
    ) -> Result<RemoteManifest, RegistryError> {
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
    ) -> Result<RemoteImage, RegistryError> {
        let repo = self
            .repo(&reference.registry, &reference.repository)
            .await?;
        let (index, image) = self
            .resolve_image(&repo, reference, platform, None, reporter)
            .await?;
        let Manifest::Image(manifest) = image.manifest.clone() else {
            return Err(unsupported(reference, &image.descriptor.media_type));
        };
        let raw_config = self
            .get_config(&repo, &reference.to_string(), &manifest.config, reporter)
            .await?;
        let config =
            ImageConfig::from_slice(&raw_config).map_err(|source| RegistryError::Manifest {
                reference: format!("{reference} config {}", manifest.config.digest),
                source,
            })?;
        Ok(RemoteImage {
            index,
            descriptor: image.descriptor,
            manifest,
            raw_manifest: image.raw,
            config,
            raw_config,
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
        let repo = self
            .repo(&reference.registry, &reference.repository)
            .await?;
        let (index, image) = self
            .resolve_image(&repo, reference, platform, Some(layout), reporter)
            .await?;
        let Manifest::Image(manifest) = image.manifest.clone() else {
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
            .map(|(i, d)| {
                let repo = &repo;
                async move {
                    self.pull_blob(repo, layout, d, reporter)
                        .await
                        .map(|r| (i, r))
                }
            })
            .buffer_unordered(self.opts.jobs)
            .try_collect()
            .await?;
        blobs.sort_by_key(|(i, _)| *i);
        let blobs: Vec<BlobReport> = blobs.into_iter().map(|(_, b)| b).collect();

        for m in index.iter().chain(std::iter::once(&image)) {
            layout.write_blob(&m.raw)?;
        }
        let raw_config = layout
            .read_blob(&manifest.config.digest)
            .map_err(|source| RegistryError::Blob {
                repository: repo.name.clone(),
                digest: manifest.config.digest.clone(),
                source,
            })?;
        let config =
            ImageConfig::from_slice(&raw_config).map_err(|source| RegistryError::Manifest {
                reference: format!("{reference} config {}", manifest.config.digest),
                source,
            })?;
        if index.is_none()
            && (config.os != platform.os || config.architecture != platform.architecture)
        {
            reporter.event(Event::Warning {
                message: format!(
                    "{reference} is a {}/{} image, not {platform}",
                    config.os, config.architecture
                ),
            });
        }
        let recorded: Vec<&Digest> = wanted
            .iter()
            .map(|d| &d.digest)
            .chain(index.iter().map(|i| &i.descriptor.digest))
            .chain(std::iter::once(&image.descriptor.digest))
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
            descriptor: image.descriptor,
            manifest,
            config,
            raw_config,
            bytes_downloaded: blobs
                .iter()
                .filter(|b| b.outcome == BlobOutcome::Downloaded)
                .map(|b| b.size)
                .sum(),
            blobs,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// The index (if any) and the platform's image manifest a reference names.
    async fn resolve_image(
        &self,
        repo: &Repo,
        reference: &Reference,
        platform: &Platform,
        layout: Option<&Layout>,
        reporter: &SharedReporter,
    ) -> Result<(Option<RemoteManifest>, RemoteManifest), RegistryError> {
        let scopes = [repo.pull_scope()];
        let tag_or_digest = reference.manifest_reference();
        let top = self
            .get_manifest_cached(
                repo,
                &scopes,
                Wanted::named(&tag_or_digest, reference.digest.as_ref()),
                layout,
                reporter,
            )
            .await?;
        let Manifest::Index(idx) = &top.manifest else {
            return Ok((None, top));
        };
        let entry =
            idx.select(platform)
                .cloned()
                .ok_or_else(|| RegistryError::PlatformNotFound {
                    reference: reference.to_string(),
                    platform: platform.to_string(),
                    available: idx
                        .manifests
                        .iter()
                        .filter_map(|d| d.platform.as_ref().map(|p| p.to_string()))
                        .collect(),
                })?;
        let child_ref = entry.digest.to_string();
        let wanted = Wanted {
            reference: &child_ref,
            digest: Some(&entry.digest),
            size: Some(entry.size),
        };
        let mut child = self
            .get_manifest_cached(repo, &scopes, wanted, layout, reporter)
            .await?;
        if matches!(child.manifest, Manifest::Index(_)) {
            return Err(unsupported(reference, "nested index"));
        }
        child.descriptor.platform = entry.platform.clone();
        Ok((Some(top), child))
    }

    async fn get_manifest_cached(
        &self,
        repo: &Repo,
        scopes: &[String],
        wanted: Wanted<'_>,
        layout: Option<&Layout>,
        reporter: &SharedReporter,
    ) -> Result<RemoteManifest, RegistryError> {
        if let (Some(d), Some(l)) = (wanted.digest, layout) {
            if l.has_blob(d) {
                let raw = l.read_blob(d)?;
                if &Digest::of_bytes(&raw) == d {
                    return manifest_from_raw(&repo.name, wanted.reference, raw, None);
                }
            }
        }
        self.get_manifest(repo, scopes, wanted, reporter).await
    }

    /// GET a manifest by tag or digest and verify its digest. At most the size its descriptor
    /// declares (if known) and never more than [`MAX_MANIFEST_BYTES`] is read.
    pub(crate) async fn get_manifest(
        &self,
        repo: &Repo,
        scopes: &[String],
        wanted: Wanted<'_>,
        reporter: &SharedReporter,
    ) -> Result<RemoteManifest, RegistryError> {
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
    async fn get_config(
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

    async fn pull_blob(
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

/// Parse raw manifest bytes into a [`RemoteManifest`] (digest computed from the bytes).
fn manifest_from_raw(
    repo_name: &str,
    reference: &str,
    raw: Vec<u8>,
    content_type: Option<&str>,
) -> Result<RemoteManifest, RegistryError> {
    let name = format!("{repo_name}:{reference}");
    if let Some(ct) = content_type {
        if ct.starts_with("application/vnd.docker.distribution.manifest.v1") {
            return Err(RegistryError::UnsupportedMediaType {
                reference: name.clone(),
                media_type: ct.to_string(),
            });
        }
    }
    let manifest =
        Manifest::parse(&raw, content_type).map_err(|source| RegistryError::Manifest {
            reference: name.clone(),
            source,
        })?;
    let declared = match &manifest {
        Manifest::Image(m) => m.media_type.clone(),
        Manifest::Index(i) => i.media_type.clone(),
    };
    let media_type = declared
        .or_else(|| content_type.map(str::to_string))
        .filter(|m| is_manifest_media_type(m) || is_index_media_type(m))
        .unwrap_or_else(|| match &manifest {
            // OCI documents may omit mediaType; a schema 1 manifest never parses this far.
            Manifest::Image(_) => MEDIA_TYPE_OCI_MANIFEST.to_string(),
            Manifest::Index(_) => MEDIA_TYPE_OCI_INDEX.to_string(),
        });
    let size = raw.len() as u64;
    Ok(RemoteManifest {
        descriptor: Descriptor::new(media_type, Digest::of_bytes(&raw), size),
        raw,
        manifest,
    })
}
