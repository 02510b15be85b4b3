//! The registry as an [`ImageSource`]: one repository, manifests and configs by tag or digest,
//! read from a local layout first when it already holds them (pulls resume without requests).

use super::client::{Client, Repo};
use super::error::RegistryError;
use super::pull::Wanted;
use crate::events::SharedReporter;
use crate::layout::Layout;
use crate::oci::{Descriptor, Digest, Document, ImageSource, ResolveError};

/// One repository of a registry, seen through a [`Client`].
pub(crate) struct RemoteSource<'a> {
    pub client: &'a Client,
    pub repo: Repo,
    /// The image reference being read, as errors name it.
    pub image: String,
    /// Documents and blobs found here (verified) are not fetched.
    pub layout: Option<&'a Layout>,
    pub reporter: &'a SharedReporter,
}

impl RemoteSource<'_> {
    /// A blob of the layout, if it is there and still matches its digest.
    fn local(&self, digest: &Digest) -> Option<Vec<u8>> {
        let l = self.layout.filter(|l| l.has_blob(digest))?;
        let raw = l.read_blob(digest).ok()?;
        (&Digest::of_bytes(&raw) == digest).then_some(raw)
    }
}

impl From<ResolveError> for RegistryError {
    fn from(e: ResolveError) -> Self {
        match e {
            ResolveError::NoPlatform {
                reference,
                platform,
                available,
                ..
            } => RegistryError::PlatformNotFound {
                reference,
                platform,
                available,
            },
            ResolveError::NestedIndex { reference, .. } => RegistryError::UnsupportedMediaType {
                reference,
                media_type: "nested index".into(),
            },
            ResolveError::Document {
                reference, source, ..
            } => RegistryError::Manifest { reference, source },
        }
    }
}

#[async_trait::async_trait]
impl ImageSource for RemoteSource<'_> {
    type Error = RegistryError;

    async fn document(
        &self,
        reference: &str,
        expected: Option<&Digest>,
        declared_size: Option<u64>,
    ) -> Result<Document, RegistryError> {
        if let Some(raw) = expected.and_then(|d| self.local(d)) {
            return Document::from_raw(raw, None).map_err(|source| RegistryError::Manifest {
                reference: self.name(reference),
                source,
            });
        }
        self.client
            .get_manifest(
                &self.repo,
                &[self.repo.pull_scope()],
                Wanted {
                    reference,
                    digest: expected,
                    size: declared_size,
                },
                self.reporter,
            )
            .await
    }

    async fn small_blob(&self, descriptor: &Descriptor) -> Result<Vec<u8>, RegistryError> {
        if let Some(raw) = self.local(&descriptor.digest) {
            return Ok(raw);
        }
        self.client
            .get_config(&self.repo, &self.image, descriptor, self.reporter)
            .await
    }

    fn name(&self, reference: &str) -> String {
        if reference.starts_with("sha256:") {
            format!("{}@{reference}", self.repo.name)
        } else {
            format!("{}:{reference}", self.repo.name)
        }
    }
}
