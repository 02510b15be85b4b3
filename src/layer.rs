//! Layer production (temporary stub until the layer branch lands).
#![allow(missing_docs, dead_code)]

use crate::layout::Layout;
use crate::oci::{Descriptor, Digest};
use crate::spec::Compression;

#[derive(Debug, thiserror::Error)]
#[error("layer: {0}")]
pub struct LayerError(String);

pub struct LayerOptions {
    pub compression: Compression,
    pub level: Option<i32>,
    pub excludes: Vec<String>,
    pub source_date_epoch: Option<i64>,
    pub threads: usize,
}

pub struct LayerInfo {
    pub digest: Digest,
    pub diff_id: Digest,
    pub size: u64,
    pub uncompressed_size: u64,
    pub media_type: String,
}

impl LayerInfo {
    pub fn descriptor(&self) -> Descriptor {
        Descriptor::new(self.media_type.clone(), self.digest.clone(), self.size)
    }
}

pub fn layer_from_tar(
    _r: impl std::io::Read,
    _l: &Layout,
    _o: &LayerOptions,
) -> Result<LayerInfo, LayerError> {
    Err(LayerError("stub".into()))
}

pub fn layer_from_dir(
    _d: &std::path::Path,
    _l: &Layout,
    _o: &LayerOptions,
) -> Result<LayerInfo, LayerError> {
    Err(LayerError("stub".into()))
}
