//! Signatures in a registry under cosign's tag scheme (`sha256-<hex>.sig` in the signed
//! image's repository), through wpimg's registry client: push a new signature (appended to
//! those already there) and fetch them for verification. The referrers API path and ECR's
//! immutable-tag check belong to the push command that calls this.

use std::collections::BTreeMap;

use crate::events::SharedReporter;
use crate::layout::Layout;
use crate::oci::{Digest, Platform};
use crate::reference::Reference;
use crate::registry::{Client, PushReport};

use super::cosign::{self, Layer};
use super::{append_signature, Rejection, SignError, Signer, Verified};

/// What a signature push did.
#[derive(Debug, Clone)]
pub struct SignatureReport {
    /// The signed manifest digest.
    pub digest: Digest,
    /// Where the signature image went (`REPO:sha256-<hex>.sig`).
    pub signature_reference: String,
    /// The signer (`key sha256:...` or the KMS reference).
    pub signer: String,
    /// Signatures in the signature image now (earlier ones kept).
    pub signatures: usize,
    /// The push of the signature image.
    pub push: PushReport,
}

/// The signature layers under `image`'s `.sig` tag for `digest` (empty when there is none),
/// pulled into `layout`.
pub async fn fetch_signatures(
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
    let pulled = client
        .pull_image(&sig_ref, &Platform::host(), layout, reporter)
        .await?;
    cosign::read_layers(layout, &pulled.image.descriptor)
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
    let existing = fetch_signatures(client, layout, image, digest, reporter).await?;
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
        push,
    })
}

/// Verify the manifest `image` resolves to against `key` using the `.sig` tag's signatures:
/// `Ok(Err(rejection))` when none is valid, `Err` when the registry could not be read.
pub async fn verify_remote(
    client: &Client,
    layout: &Layout,
    image: &Reference,
    key: &super::PublicKey,
    reporter: &SharedReporter,
) -> Result<Result<Verified, Rejection>, SignError> {
    let digest = match &image.digest {
        Some(d) => d.clone(),
        None => {
            client
                .manifest_descriptor(image, reporter)
                .await?
                .ok_or_else(|| SignError::ImageNotFound(image.to_string()))?
                .digest
        }
    };
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
    format: crate::sbom::Format,
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
