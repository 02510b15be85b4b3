//! Registry client (temporary stub until the registry branch lands).
#![allow(missing_docs, dead_code)]

use crate::events::SharedReporter;
use crate::layout::Layout;
use crate::oci::{Descriptor, ImageConfig, ImageManifest, Platform};
use crate::reference::Reference;

#[derive(Debug, thiserror::Error)]
#[error("registry: {0}")]
pub struct RegistryError(String);

#[derive(Debug, Clone, Default)]
pub struct ClientOptions {
    pub insecure_hosts: Vec<String>,
    pub ca_file: Option<std::path::PathBuf>,
}

#[derive(Clone)]
pub struct Client;

pub struct PulledImage {
    pub descriptor: Descriptor,
    pub manifest: ImageManifest,
    pub config: ImageConfig,
}

impl Client {
    pub fn new(_o: ClientOptions) -> Result<Self, RegistryError> {
        Ok(Self)
    }
    pub async fn pull_image(
        &self,
        _r: &Reference,
        _p: &Platform,
        _l: &Layout,
        _rep: &SharedReporter,
    ) -> Result<PulledImage, RegistryError> {
        Err(RegistryError("stub".into()))
    }
}
