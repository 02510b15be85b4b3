//! The supply-chain commands' work: the SBOM of an image (`wpimg sbom`), from the local layout
//! or a registry, stored or made from the layers; the signature check of an image in a
//! registry (`wpimg verify`).

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::events::{self, SharedReporter};
use crate::inspect::{with_default_tag, InspectError};
use crate::layout::{Layout, LayoutError};
use crate::oci::{Descriptor, Digest, Platform, ANNOTATION_REF_NAME};
use crate::reference::Reference;
use crate::registry::{Client, RegistryError};
use crate::sbom::{artifact, Format, SbomError};
use crate::sign::{remote, PublicKey, Rejection, SignError, Verified};

/// Errors of `sbom` and `verify`.
#[derive(Debug, thiserror::Error)]
pub enum SupplyError {
    /// The image is not in the layout, or the layout cannot be read.
    #[error(transparent)]
    Inspect(#[from] InspectError),
    /// The layout failed.
    #[error("OCI layout {}", dir.display())]
    Layout {
        /// The layout.
        dir: PathBuf,
        /// The cause.
        #[source]
        source: LayoutError,
    },
    /// The registry failed.
    #[error("{reference}")]
    Registry {
        /// The image.
        reference: String,
        /// The cause.
        #[source]
        source: Box<RegistryError>,
    },
    /// Reading signatures or SBOMs failed.
    #[error("{reference}")]
    Attachments {
        /// The image.
        reference: String,
        /// The cause.
        #[source]
        source: Box<SignError>,
    },
    /// Making the SBOM failed.
    #[error("SBOM of {reference}")]
    Sbom {
        /// The image.
        reference: String,
        /// The cause.
        #[source]
        source: SbomError,
    },
    /// A temporary directory could not be made.
    #[error("temporary OCI layout: {0}")]
    Temp(#[source] std::io::Error),
    /// A worker thread failed.
    #[error("a worker thread failed")]
    Task(#[from] tokio::task::JoinError),
}

impl crate::error::HasKind for SupplyError {
    fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind;
        match self {
            SupplyError::Inspect(e) => e.kind(),
            SupplyError::Registry { source, .. } => source.kind(),
            SupplyError::Attachments { source, .. } => source.kind(),
            _ => ErrorKind::Failure,
        }
    }
}

/// Where an SBOM document came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SbomSource {
    /// Stored with the image (layout artifact, registry referrer or `.sbom` tag).
    Stored,
    /// Made now from the image's layers.
    Scanned,
}

/// An image's SBOM document.
#[derive(Debug, Clone)]
pub struct SbomDocument {
    /// The platform manifest it describes.
    pub subject: Digest,
    /// Its format.
    pub format: Format,
    /// The document.
    pub document: Vec<u8>,
    /// Stored or made now.
    pub source: SbomSource,
}

/// The SBOM of an image of the layout at `dir` (`reference` `NAME[:TAG]`, or its only image),
/// for `platform` when it is an index: the stored document in `format` (any stored format when
/// `None`), else one made from the layers (SPDX JSON when `None`).
pub async fn sbom_from_layout(
    dir: &Path,
    reference: Option<&str>,
    platform: &Platform,
    format: Option<Format>,
) -> Result<SbomDocument, SupplyError> {
    let layout_err = |source| SupplyError::Layout {
        dir: dir.to_path_buf(),
        source,
    };
    let layout = Layout::open(dir).map_err(layout_err)?;
    let (name, top) = layout_image(&layout, dir, reference)?;
    let resolved = crate::oci::resolve(&layout, &top, None, platform)
        .await
        .map_err(layout_err)?;
    let manifest = resolved.image.descriptor.clone();
    let stored =
        artifact::find_sboms(&layout, &manifest.digest).map_err(|source| SupplyError::Sbom {
            reference: name.clone(),
            source,
        })?;
    let pick = stored
        .into_iter()
        .find(|f| format.is_none_or(|want| want == f.format));
    if let Some(found) = pick {
        let document =
            artifact::read_document(&layout, &found).map_err(|source| SupplyError::Sbom {
                reference: name.clone(),
                source,
            })?;
        return Ok(SbomDocument {
            subject: manifest.digest,
            format: found.format,
            document,
            source: SbomSource::Stored,
        });
    }
    let image_name = name.rsplit_once(':').map_or(name.as_str(), |(n, _)| n);
    scan(
        layout,
        manifest,
        image_name,
        None,
        format.unwrap_or_default(),
    )
    .await
}

/// `(NAME:TAG or digest, what to resolve)` of the image a layout reference names.
fn layout_image(
    layout: &Layout,
    dir: &Path,
    reference: Option<&str>,
) -> Result<(String, String), SupplyError> {
    if let Some(r) = reference {
        let r = with_default_tag(r);
        return match layout.resolve(&r) {
            Ok(_) => Ok((r.clone(), r)),
            Err(LayoutError::RefNotFound { .. }) => Err(InspectError::NotFound {
                reference: r,
                dir: dir.to_path_buf(),
            }
            .into()),
            Err(source) => Err(SupplyError::Layout {
                dir: dir.to_path_buf(),
                source,
            }),
        };
    }
    let images = layout.images().map_err(|source| SupplyError::Layout {
        dir: dir.to_path_buf(),
        source,
    })?;
    match images.as_slice() {
        [one] => Ok((
            one.annotations
                .get(ANNOTATION_REF_NAME)
                .cloned()
                .unwrap_or_else(|| one.digest.to_string()),
            one.digest.to_string(),
        )),
        _ => Err(InspectError::NotFound {
            reference: format!(
                "oci:{} ({} images: name one with oci:DIR:NAME:TAG)",
                dir.display(),
                images.len()
            ),
            dir: dir.to_path_buf(),
        }
        .into()),
    }
}

/// Make the SBOM of `manifest` (stored in `layout` with its layers) from its layers.
async fn scan(
    layout: Layout,
    manifest: Descriptor,
    name: &str,
    repository: Option<String>,
    format: Format,
) -> Result<SbomDocument, SupplyError> {
    let reference = name.to_string();
    let subject = manifest.digest.clone();
    let made =
        tokio::task::spawn_blocking(move || crate::sbom::generate(&layout, &manifest, &reference))
            .await?
            .map_err(|source| SupplyError::Sbom {
                reference: name.to_string(),
                source,
            })?;
    let made = match repository {
        Some(r) => crate::sbom::Sbom {
            subject: made.subject.with_repository(r),
            ..made
        },
        None => made,
    };
    Ok(SbomDocument {
        subject,
        format,
        document: made.to_json(format),
        source: SbomSource::Scanned,
    })
}

/// The SBOM of an image in a registry, for `platform` when it is an index: an attached
/// document in `format` (any attached format when `None`; referrers first, then the `.sbom`
/// tag), else one made from its layers, pulled into a temporary layout.
pub async fn sbom_from_registry(
    client: &Client,
    reference: &Reference,
    platform: &Platform,
    format: Option<Format>,
    reporter: &SharedReporter,
) -> Result<SbomDocument, SupplyError> {
    let registry_err = |source| SupplyError::Registry {
        reference: reference.to_string(),
        source: Box::new(source),
    };
    let quiet = events::without_blobs(reporter);
    let resolved = client
        .fetch_image(reference, platform, &quiet)
        .await
        .map_err(registry_err)?;
    let digest = resolved.image.descriptor.digest.clone();
    let tmp = tempfile::Builder::new()
        .prefix("wpimg-sbom-")
        .tempdir()
        .map_err(SupplyError::Temp)?;
    let layout = Layout::open_or_create(tmp.path()).map_err(|source| SupplyError::Layout {
        dir: tmp.path().to_path_buf(),
        source,
    })?;
    let attached = remote::fetch_sboms(client, &layout, reference, &digest, &quiet)
        .await
        .map_err(|source| SupplyError::Attachments {
            reference: reference.to_string(),
            source: Box::new(source),
        })?;
    if let Some(found) = attached
        .into_iter()
        .find(|f| format.is_none_or(|want| want == f.format))
    {
        return Ok(SbomDocument {
            subject: digest,
            format: found.format,
            document: found.document,
            source: SbomSource::Stored,
        });
    }
    let platform_ref = Reference {
        tag: None,
        ..reference.with_digest(digest)
    };
    let pulled = client
        .pull_image(&platform_ref, platform, &layout, &quiet)
        .await
        .map_err(registry_err)?;
    let repository = reference.repo_path();
    let doc = scan(
        layout,
        pulled.image.descriptor,
        &reference.repository,
        Some(repository),
        format.unwrap_or_default(),
    )
    .await;
    drop(tmp);
    doc
}

/// The outcome of `wpimg verify`.
#[derive(Debug, Clone)]
pub struct Verification {
    /// The digest the reference resolved to (the one the signature must name).
    pub digest: Digest,
    /// The valid signature, or why there is none.
    pub result: Result<Verified, Rejection>,
}

/// Check that the manifest (or index) `reference` resolves to has a cosign signature valid
/// for `key` (referrers first, then the `.sig` tag).
pub async fn verify(
    client: &Client,
    reference: &Reference,
    key: &PublicKey,
    reporter: &SharedReporter,
) -> Result<Verification, SupplyError> {
    let attach_err = |source| SupplyError::Attachments {
        reference: reference.to_string(),
        source: Box::new(source),
    };
    let quiet = events::without_blobs(reporter);
    let digest = remote::resolve_digest(client, reference, &quiet)
        .await
        .map_err(attach_err)?;
    let tmp = tempfile::Builder::new()
        .prefix("wpimg-verify-")
        .tempdir()
        .map_err(SupplyError::Temp)?;
    let layout = Layout::open_or_create(tmp.path()).map_err(|source| SupplyError::Layout {
        dir: tmp.path().to_path_buf(),
        source,
    })?;
    let at = Reference {
        tag: None,
        ..reference.with_digest(digest.clone())
    };
    let layers = remote::fetch_signatures(client, &layout, &at, &digest, &quiet)
        .await
        .map_err(attach_err)?;
    Ok(Verification {
        result: crate::sign::verify(key, &digest, &layers),
        digest,
    })
}
