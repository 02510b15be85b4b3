//! Signatures and SBOMs in a registry, through wpimg's registry client, in either place cosign
//! keeps them: as OCI 1.1 referrers (manifests with `subject`, listed by the referrers API) or
//! under cosign's tags in the signed image's repository (`sha256-<hex>.sig`, `.sbom`).
//! Which one a push uses is [`AttachMode`]; reading looks at referrers, then tags. ECR's
//! immutable-tag check belongs to the push that calls this.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::events::SharedReporter;
use crate::layout::Layout;
use crate::oci::{Descriptor, Digest};
use crate::reference::Reference;
use crate::registry::{Client, PushReport};
use crate::sbom::artifact::{ArtifactManifest, MAX_DOCUMENT_SIZE};
use crate::sbom::Format;

use super::cosign::{self, Layer, MAX_SIGNATURE_SIZE, SIGNATURE_ARTIFACT_TYPE};
use super::{append_signature, Rejection, SignError, Signer, Verified};

/// Where attachments go in a registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    /// OCI 1.1 artifacts with `subject`, found by the referrers API.
    Referrers,
    /// cosign's tag scheme: `sha256-<hex>.sig` and `sha256-<hex>.sbom`.
    Tags,
}

impl std::fmt::Display for AttachMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AttachMode::Referrers => "referrers",
            AttachMode::Tags => "tags",
        })
    }
}

/// [`AttachMode::Referrers`] when the registry answers the referrers API for `image`'s
/// repository, else [`AttachMode::Tags`].
pub async fn attach_mode(
    client: &Client,
    image: &Reference,
    subject: &Digest,
    reporter: &SharedReporter,
) -> Result<AttachMode, SignError> {
    Ok(match client.referrers(image, subject, reporter).await? {
        Some(_) => AttachMode::Referrers,
        None => AttachMode::Tags,
    })
}

/// What a signature push did.
#[derive(Debug, Clone)]
pub struct SignatureReport {
    /// The signed manifest digest.
    pub digest: Digest,
    /// Where the signature went (`REPO:sha256-<hex>.sig`, or `REPO@sha256:...` as a referrer).
    pub signature_reference: String,
    /// The signer (`key sha256:...` or the KMS reference).
    pub signer: String,
    /// Signatures in the signature image now (earlier ones kept under the tag).
    pub signatures: usize,
    /// Referrers or tags.
    pub mode: AttachMode,
    /// The push of the signature image.
    pub push: PushReport,
}

/// `image`'s repository at `digest` (no tag).
fn by_digest(image: &Reference, digest: &Digest) -> Reference {
    Reference {
        tag: None,
        ..image.with_digest(digest.clone())
    }
}

/// The signature layers under `image`'s `.sig` tag for `digest` (empty when there is none),
/// pulled into `layout`.
pub async fn fetch_tag_signatures(
    client: &Client,
    layout: &Layout,
    image: &Reference,
    digest: &Digest,
    reporter: &SharedReporter,
) -> Result<Vec<Layer>, SignError> {
    let sig_ref = image.with_tag(&cosign::signature_tag(digest))?;
    if client
        .manifest_descriptor(&sig_ref, reporter)
        .await?
        .is_none()
    {
        return Ok(Vec::new());
    }
    let desc = client
        .pull_attachment(&sig_ref, layout, MAX_SIGNATURE_SIZE, reporter)
        .await?;
    cosign::read_layers(layout, &desc)
}

/// The signature layers of `digest`: those of its signature referrers (when the registry
/// answers the referrers API), then those under the `.sig` tag.
pub async fn fetch_signatures(
    client: &Client,
    layout: &Layout,
    image: &Reference,
    digest: &Digest,
    reporter: &SharedReporter,
) -> Result<Vec<Layer>, SignError> {
    let mut layers = Vec::new();
    let referrers = client.referrers(image, digest, reporter).await?;
    for r in referrers.into_iter().flatten() {
        if r.artifact_type.as_deref() != Some(SIGNATURE_ARTIFACT_TYPE)
            || r.size > MAX_SIGNATURE_SIZE
        {
            continue;
        }
        let at = by_digest(image, &r.digest);
        let desc = client
            .pull_attachment(&at, layout, MAX_SIGNATURE_SIZE, reporter)
            .await?;
        layers.extend(cosign::read_layers(layout, &desc)?);
    }
    layers.extend(fetch_tag_signatures(client, layout, image, digest, reporter).await?);
    Ok(layers)
}

/// Sign `digest` (a manifest in `image`'s repository) and push the signature image under the
/// `.sig` tag, keeping the signatures already there.
pub async fn sign_and_push(
    client: &Client,
    layout: &Layout,
    signer: &Signer,
    image: &Reference,
    digest: &Digest,
    reporter: &SharedReporter,
) -> Result<SignatureReport, SignError> {
    let existing = fetch_tag_signatures(client, layout, image, digest, reporter).await?;
    let layer = signer
        .sign_manifest(&image.repo_path(), digest, &BTreeMap::new())
        .await?;
    let sig_image = append_signature(existing, layer);
    let desc = sig_image.write(layout)?;
    let sig_ref = image.with_tag(&cosign::signature_tag(digest))?;
    let push = client
        .push_image(layout, &desc, &sig_ref, &[], reporter)
        .await?;
    Ok(SignatureReport {
        digest: digest.clone(),
        signature_reference: sig_ref.to_string(),
        signer: signer.describe().await?,
        signatures: sig_image.layers.len(),
        mode: AttachMode::Tags,
        push,
    })
}

/// Sign the manifest `subject` (in `image`'s repository) and push the signature as an OCI 1.1
/// referrer of it (by digest, no tag).
pub async fn sign_and_push_referrer(
    client: &Client,
    layout: &Layout,
    signer: &Signer,
    image: &Reference,
    subject: &Descriptor,
    reporter: &SharedReporter,
) -> Result<SignatureReport, SignError> {
    let layer = signer
        .sign_manifest(&image.repo_path(), &subject.digest, &BTreeMap::new())
        .await?;
    let sig_image = cosign::Image::referrer(vec![layer], subject);
    let desc = sig_image.write(layout)?;
    let at = by_digest(image, &desc.digest);
    let push = client.push_image(layout, &desc, &at, &[], reporter).await?;
    Ok(SignatureReport {
        digest: subject.digest.clone(),
        signature_reference: at.to_string(),
        signer: signer.describe().await?,
        signatures: 1,
        mode: AttachMode::Referrers,
        push,
    })
}

/// Sign `subject` and push the signature where `mode` says.
pub async fn sign_and_attach(
    client: &Client,
    layout: &Layout,
    signer: &Signer,
    image: &Reference,
    subject: &Descriptor,
    mode: AttachMode,
    reporter: &SharedReporter,
) -> Result<SignatureReport, SignError> {
    match mode {
        AttachMode::Referrers => {
            sign_and_push_referrer(client, layout, signer, image, subject, reporter).await
        }
        AttachMode::Tags => {
            sign_and_push(client, layout, signer, image, &subject.digest, reporter).await
        }
    }
}

/// The digest `image` resolves to (its own digest, or what its tag points at).
pub async fn resolve_digest(
    client: &Client,
    image: &Reference,
    reporter: &SharedReporter,
) -> Result<Digest, SignError> {
    match &image.digest {
        Some(d) => Ok(d.clone()),
        None => Ok(client
            .manifest_descriptor(image, reporter)
            .await?
            .ok_or_else(|| SignError::ImageNotFound(image.to_string()))?
            .digest),
    }
}

/// Verify the manifest `image` resolves to against `key` using its signatures (referrers, then
/// the `.sig` tag): `Ok(Err(rejection))` when none is valid, `Err` when the registry could not
/// be read.
pub async fn verify_remote(
    client: &Client,
    layout: &Layout,
    image: &Reference,
    key: &super::PublicKey,
    reporter: &SharedReporter,
) -> Result<Result<Verified, Rejection>, SignError> {
    let digest = resolve_digest(client, image, reporter).await?;
    let layers = fetch_signatures(client, layout, image, &digest, reporter).await?;
    Ok(super::verify(key, &digest, &layers))
}

/// Push an SBOM document under cosign's tag `sha256-<hex>.sbom` of `digest` in `image`'s
/// repository, in the shape `cosign attach sbom` writes (one layer, `text/spdx+json` or
/// `application/vnd.cyclonedx+json`), for registries without the referrers API.
pub async fn push_sbom_tag(
    client: &Client,
    layout: &Layout,
    image: &Reference,
    digest: &Digest,
    document: &[u8],
    format: Format,
    reporter: &SharedReporter,
) -> Result<PushReport, SignError> {
    let media_type = crate::sbom::artifact::cosign_sbom_media_type(format);
    let file = cosign::file_image(document.to_vec(), media_type);
    let desc = file.write(layout)?;
    let tag_ref = image.with_tag(&cosign::sbom_tag(digest))?;
    Ok(client
        .push_image(layout, &desc, &tag_ref, &[], reporter)
        .await?)
}

/// Push an SBOM artifact of the layout (a manifest with `subject`, see
/// [`crate::sbom::artifact::write_sbom`]) to `image`'s repository by its digest.
pub async fn push_sbom_referrer(
    client: &Client,
    layout: &Layout,
    image: &Reference,
    artifact: &Descriptor,
    reporter: &SharedReporter,
) -> Result<PushReport, SignError> {
    let at = by_digest(image, &artifact.digest);
    Ok(client
        .push_image(layout, artifact, &at, &[], reporter)
        .await?)
}

/// An SBOM document found in a registry.
#[derive(Debug, Clone)]
pub struct RemoteSbom {
    /// Its format.
    pub format: Format,
    /// The document (digest-checked).
    pub document: Vec<u8>,
    /// Where it was found (`REPO@sha256:...` or `REPO:sha256-<hex>.sbom`).
    pub reference: String,
}

/// The SBOM documents of the manifest `digest`: its SBOM referrers (when the registry answers
/// the referrers API), then the one under the `.sbom` tag.
pub async fn fetch_sboms(
    client: &Client,
    layout: &Layout,
    image: &Reference,
    digest: &Digest,
    reporter: &SharedReporter,
) -> Result<Vec<RemoteSbom>, SignError> {
    let mut found = Vec::new();
    let referrers = client.referrers(image, digest, reporter).await?;
    for r in referrers.into_iter().flatten() {
        let known = r.artifact_type.as_deref().and_then(Format::from_media_type);
        if known.is_none() || r.size > MAX_SIGNATURE_SIZE {
            continue;
        }
        let at = by_digest(image, &r.digest);
        let desc = client
            .pull_attachment(&at, layout, MAX_DOCUMENT_SIZE, reporter)
            .await?;
        found.extend(documents(layout, &desc, &at.to_string())?);
    }
    let tag = image.with_tag(&cosign::sbom_tag(digest))?;
    if client.manifest_descriptor(&tag, reporter).await?.is_some() {
        let desc = client
            .pull_attachment(&tag, layout, MAX_DOCUMENT_SIZE, reporter)
            .await?;
        found.extend(documents(layout, &desc, &tag.to_string())?);
    }
    Ok(found)
}

/// The SBOM layers of an attachment manifest in the layout (blobs verified by the pull).
fn documents(
    layout: &Layout,
    manifest: &Descriptor,
    reference: &str,
) -> Result<Vec<RemoteSbom>, SignError> {
    let raw = layout.read_blob(&manifest.digest)?;
    let m: ArtifactManifest = serde_json::from_slice(&raw)
        .map_err(|e| SignError::BadSignatureManifest(format!("{reference}: {e}")))?;
    let mut out = Vec::new();
    for l in m.layers {
        if let Some(format) = Format::from_media_type(&l.media_type) {
            out.push(RemoteSbom {
                format,
                document: layout.read_blob(&l.digest)?,
                reference: reference.to_string(),
            });
        }
    }
    Ok(out)
}
