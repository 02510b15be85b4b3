//! What a push attaches to the image: the SBOM of each platform manifest (found in the layout,
//! where the build stored it) and a cosign signature of the pushed descriptor (the manifest,
//! or the index the tags name). Attachments go as OCI 1.1 referrers where the registry answers
//! the referrers API, else under cosign's tags; they never enter the image index.

use std::sync::Arc;

use serde::Serialize;

use crate::events::{self, Event, SharedReporter};
use crate::layout::Layout;
use crate::oci::{Descriptor, Digest, Manifest};
use crate::reference::Reference;
use crate::registry::Client;
use crate::sbom::artifact::{self, FoundSbom};
use crate::sbom::Format;
use crate::sign::cosign;
use crate::sign::remote::{self, AttachMode};
use crate::sign::{SignError, Signer};

use super::PublishError;

/// The SBOM artifact of one platform manifest.
#[derive(Debug, Clone)]
struct PlannedSbom {
    /// The platform manifest it describes.
    subject: Descriptor,
    /// The artifact in the layout.
    found: FoundSbom,
}

/// What to attach to a pushed image.
#[derive(Clone, Default)]
pub struct Attachments {
    signer: Option<Arc<Signer>>,
    sboms: Vec<PlannedSbom>,
}

/// A pushed signature.
#[derive(Debug, Clone, Serialize)]
pub struct SignatureAttachment {
    /// The signed digest (the descriptor the tags name).
    pub digest: Digest,
    /// Where the signature is (`REPO@sha256:...` or `REPO:sha256-<hex>.sig`).
    pub reference: String,
    /// Who signed (`key sha256:...` or the KMS key reference).
    pub signer: String,
    /// Signatures stored there now.
    pub signatures: usize,
}

/// A pushed SBOM.
#[derive(Debug, Clone, Serialize)]
pub struct SbomAttachment {
    /// The platform manifest it describes.
    pub subject: Digest,
    /// The document's format.
    pub format: Format,
    /// Where it is (`REPO@sha256:...` or `REPO:sha256-<hex>.sbom`).
    pub reference: String,
}

/// What was attached.
#[derive(Debug, Clone, Serialize)]
pub struct AttachReport {
    /// Referrers or tags.
    pub mode: AttachMode,
    /// The signature, when one was made.
    pub signature: Option<SignatureAttachment>,
    /// The SBOMs.
    pub sboms: Vec<SbomAttachment>,
}

impl Attachments {
    /// The attachments of `top` (a manifest or an index) in `layout`: the newest SBOM artifact
    /// of each platform manifest, and a signature of `top` when there is a signer.
    pub fn plan(
        layout: &Layout,
        top: &Descriptor,
        signer: Option<Arc<Signer>>,
    ) -> Result<Self, PublishError> {
        let mut sboms = Vec::new();
        for subject in platform_manifests(layout, top)? {
            let found = artifact::find_sboms(layout, &subject.digest).map_err(sbom_err)?;
            if let Some(found) = found.into_iter().next() {
                sboms.push(PlannedSbom { subject, found });
            }
        }
        Ok(Self { signer, sboms })
    }

    /// Whether there is nothing to attach.
    pub fn is_empty(&self) -> bool {
        self.signer.is_none() && self.sboms.is_empty()
    }

    /// The cosign tags the tag scheme writes for them (`sha256-<hex>.sig`, `.sbom`).
    pub fn tags(&self, top: &Digest) -> Vec<String> {
        let sig = self.signer.as_ref().map(|_| cosign::signature_tag(top));
        sig.into_iter()
            .chain(
                self.sboms
                    .iter()
                    .map(|s| cosign::sbom_tag(&s.subject.digest)),
            )
            .collect()
    }

    /// Where they go in `repository`: referrers when its registry answers the API.
    pub async fn mode(
        &self,
        client: &Client,
        repository: &Reference,
        top: &Digest,
        reporter: &SharedReporter,
    ) -> Result<AttachMode, PublishError> {
        let mode = remote::attach_mode(client, repository, top, reporter)
            .await
            .map_err(sign_err)?;
        reporter.event(Event::Note {
            message: match mode {
                AttachMode::Referrers => format!(
                    "{} answers the OCI referrers API: attachments go as artifacts with subject",
                    repository.registry
                ),
                AttachMode::Tags => format!(
                    "{} has no OCI referrers API: attachments go under cosign's tags",
                    repository.registry
                ),
            },
        });
        Ok(mode)
    }

    /// Push them to `repository` (after the image `top`) where `mode` says.
    pub async fn push(
        &self,
        client: &Client,
        layout: &Layout,
        repository: &Reference,
        top: &Descriptor,
        mode: AttachMode,
        reporter: &SharedReporter,
    ) -> Result<AttachReport, PublishError> {
        let quiet = events::without_blobs(reporter);
        let mut sboms = Vec::new();
        for s in &self.sboms {
            let reference = self
                .push_sbom(client, layout, repository, s, mode, &quiet)
                .await?;
            sboms.push(SbomAttachment {
                subject: s.subject.digest.clone(),
                format: s.found.format,
                reference,
            });
        }
        let signature = match &self.signer {
            Some(signer) => {
                let r =
                    remote::sign_and_attach(client, layout, signer, repository, top, mode, &quiet)
                        .await
                        .map_err(sign_err)?;
                Some(SignatureAttachment {
                    digest: r.digest,
                    reference: r.signature_reference,
                    signer: r.signer,
                    signatures: r.signatures,
                })
            }
            None => None,
        };
        Ok(AttachReport {
            mode,
            signature,
            sboms,
        })
    }

    async fn push_sbom(
        &self,
        client: &Client,
        layout: &Layout,
        repository: &Reference,
        s: &PlannedSbom,
        mode: AttachMode,
        reporter: &SharedReporter,
    ) -> Result<String, PublishError> {
        let pushed = match mode {
            AttachMode::Referrers => {
                remote::push_sbom_referrer(client, layout, repository, &s.found.manifest, reporter)
                    .await
            }
            AttachMode::Tags => {
                let document = artifact::read_document(layout, &s.found).map_err(sbom_err)?;
                let (digest, format) = (&s.subject.digest, s.found.format);
                remote::push_sbom_tag(
                    client, layout, repository, digest, &document, format, reporter,
                )
                .await
            }
        }
        .map_err(sign_err)?;
        Ok(match pushed.tags.first() {
            Some(tag) => format!("{}:{tag}", repository.repo_path()),
            None => format!("{}@{}", repository.repo_path(), pushed.manifest.digest),
        })
    }
}

/// The platform manifests of `top`: its children when it is an index, else itself.
fn platform_manifests(layout: &Layout, top: &Descriptor) -> Result<Vec<Descriptor>, PublishError> {
    let raw = layout.read_blob(&top.digest).map_err(layout_err)?;
    match Manifest::parse(&raw, Some(&top.media_type)) {
        Ok(Manifest::Index(i)) => Ok(i.manifests),
        Ok(Manifest::Image(_)) => Ok(vec![top.clone()]),
        Err(source) => Err(layout_err(crate::layout::LayoutError::Json {
            path: layout.blob_path(&top.digest),
            source,
        })),
    }
}

fn sign_err(e: SignError) -> PublishError {
    PublishError::Attach(Box::new(e))
}

fn sbom_err(e: crate::sbom::SbomError) -> PublishError {
    PublishError::Sbom(Box::new(e))
}

fn layout_err(e: crate::layout::LayoutError) -> PublishError {
    PublishError::Attach(Box::new(SignError::Layout(e)))
}
