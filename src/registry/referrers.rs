//! Attachments of a manifest in a registry: the OCI 1.1 referrers API
//! (`GET /v2/<name>/referrers/<digest>`) and small artifacts (signatures, SBOMs) pulled whole
//! into the layout.

use http::header::{ACCEPT, CONTENT_TYPE, LINK};
use url::Url;

use super::client::{expect_status, Client, Repo, Retry, MAX_MANIFEST_BYTES};
use super::error::RegistryError;
use super::guard::Bound;
use crate::events::SharedReporter;
use crate::layout::Layout;
use crate::oci::{Descriptor, Digest, ImageIndex, Manifest, MEDIA_TYPE_OCI_INDEX};
use crate::reference::Reference;

/// Pages of a referrers answer followed at most.
const MAX_REFERRER_PAGES: usize = 16;

impl Client {
    /// The manifests whose `subject` is `subject` in `repository`'s repository, by the OCI 1.1
    /// referrers API (each descriptor with its `artifactType`); `None` when the registry does
    /// not answer that API (404 or 405, as registries without it do).
    pub async fn referrers(
        &self,
        repository: &Reference,
        subject: &Digest,
        reporter: &SharedReporter,
    ) -> Result<Option<Vec<Descriptor>>, RegistryError> {
        let repo = self
            .repo(&repository.registry, &repository.repository)
            .await?;
        let mut url = repo.url(&format!("referrers/{subject}"))?;
        let mut found = Vec::new();
        for page in 0..MAX_REFERRER_PAGES {
            match self.referrers_page(&repo, &url, subject, reporter).await? {
                None if page == 0 => return Ok(None),
                None => {
                    return Err(repo.protocol(
                        &format!("list referrers of {subject}"),
                        "a further page of the answer is missing".into(),
                    ))
                }
                Some((manifests, next)) => {
                    found.extend(manifests);
                    match next {
                        Some(n) => url = n,
                        None => return Ok(Some(found)),
                    }
                }
            }
        }
        Err(repo.protocol(
            &format!("list referrers of {subject}"),
            format!("more than {MAX_REFERRER_PAGES} pages of referrers"),
        ))
    }

    /// One page: its descriptors and the next page's URL; `None` when the API is not there.
    async fn referrers_page(
        &self,
        repo: &Repo,
        url: &Url,
        subject: &Digest,
        reporter: &SharedReporter,
    ) -> Result<Option<(Vec<Descriptor>, Option<Url>)>, RegistryError> {
        let op = format!("list referrers of {subject}");
        let scopes = [repo.pull_scope()];
        let resp = self
            .send(repo, &scopes, &op, Retry::Temporary, reporter, |c| {
                Ok(c.get(url.clone()).header(ACCEPT, MEDIA_TYPE_OCI_INDEX))
            })
            .await?;
        if matches!(resp.status().as_u16(), 404 | 405) {
            return Ok(None);
        }
        let resp = expect_status(resp, &[200], &repo.name, &op).await?;
        let next = next_link(repo, &resp);
        let json = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.contains("json"));
        let bound = Bound::new(&repo.name, "referrers".into(), None, MAX_MANIFEST_BYTES)?;
        let raw = bound.read(resp, &repo.name, &op).await?;
        match serde_json::from_slice::<ImageIndex>(&raw) {
            Ok(index) => Ok(Some((index.manifests, next))),
            // Not an index (an HTML page of a registry that routes everything): no API here.
            Err(_) if !json => Ok(None),
            Err(e) => Err(repo.protocol(&op, format!("the answer is not an OCI index: {e}"))),
        }
    }

    /// Pull a small manifest (an attachment: a signature or an SBOM) by `reference`'s tag or
    /// digest, with its config and layers, into `layout`, each verified and at most `max_blob`
    /// bytes; returns the manifest's descriptor.
    pub async fn pull_attachment(
        &self,
        reference: &Reference,
        layout: &Layout,
        max_blob: u64,
        reporter: &SharedReporter,
    ) -> Result<Descriptor, RegistryError> {
        let doc = self.fetch_manifest(reference, reporter).await?;
        let Manifest::Image(m) = &doc.manifest else {
            return Err(RegistryError::UnsupportedMediaType {
                reference: reference.to_string(),
                media_type: format!(
                    "{} (an index, not an attachment)",
                    doc.descriptor.media_type
                ),
            });
        };
        let repo = self
            .repo(&reference.registry, &reference.repository)
            .await?;
        for d in std::iter::once(&m.config).chain(&m.layers) {
            Bound::new(
                &reference.to_string(),
                format!("attachment blob {}", d.digest),
                Some(d.size),
                max_blob,
            )?;
            self.pull_blob(&repo, layout, d, reporter).await?;
        }
        layout
            .write_blob(&doc.raw)
            .map_err(|source| RegistryError::Blob {
                repository: repo.name.clone(),
                digest: doc.descriptor.digest.clone(),
                source,
            })?;
        Ok(doc.descriptor)
    }
}

/// The `rel="next"` target of a `Link` header, resolved against the registry.
fn next_link(repo: &Repo, resp: &reqwest::Response) -> Option<Url> {
    let link = resp.headers().get(LINK)?.to_str().ok()?;
    link.split(',').find_map(|part| {
        let (target, params) = part.split_once(';')?;
        let target = target.trim().strip_prefix('<')?.strip_suffix('>')?;
        params
            .split(';')
            .any(|p| p.trim().replace(' ', "") == "rel=\"next\"")
            .then(|| repo.base.join(target).ok())?
    })
}
