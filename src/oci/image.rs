//! The image model (go-containerregistry's is the example): an [`Image`] is a manifest and its
//! config with their raw bytes and descriptors, an [`Index`] lists images by platform, an
//! [`ImageSource`] is anywhere images come from (the local layout, a registry), and
//! [`resolve`] is the one reference → index → manifest → config walk. [`Image::append`] is
//! assembly: a pure function from an image and new layers to the finished image.

use std::collections::BTreeMap;

use super::{
    is_index_media_type, is_manifest_media_type, rfc3339, to_canonical_json, Descriptor, Digest,
    History, ImageConfig, ImageIndex, ImageManifest, Manifest, OciError, Platform, RootFs,
    EMPTY_JSON, MEDIA_TYPE_DOCKER_CONFIG, MEDIA_TYPE_DOCKER_LAYER_GZIP, MEDIA_TYPE_OCI_CONFIG,
    MEDIA_TYPE_OCI_INDEX, MEDIA_TYPE_OCI_LAYER_GZIP, MEDIA_TYPE_OCI_LAYER_TAR,
    MEDIA_TYPE_OCI_MANIFEST,
};

/// A manifest or index as stored or served: descriptor (digest of the raw bytes), raw bytes and
/// the parsed document.
#[derive(Debug, Clone)]
pub struct Document {
    /// Media type, digest and size of `raw`.
    pub descriptor: Descriptor,
    /// The bytes as stored (their digest is the descriptor's).
    pub raw: Vec<u8>,
    /// Parsed.
    pub manifest: Manifest,
}

impl Document {
    /// Parse raw manifest bytes; the media type comes from the document, else from `hint` (a
    /// Content-Type header or a descriptor), else from its shape.
    pub fn from_raw(raw: Vec<u8>, hint: Option<&str>) -> Result<Self, OciError> {
        let manifest = Manifest::parse(&raw, hint)?;
        let declared = match &manifest {
            Manifest::Image(m) => m.media_type.clone(),
            Manifest::Index(i) => i.media_type.clone(),
        };
        let media_type = declared
            .or_else(|| hint.map(str::to_string))
            .filter(|m| is_manifest_media_type(m) || is_index_media_type(m))
            .unwrap_or_else(|| match &manifest {
                // OCI documents may omit mediaType.
                Manifest::Image(_) => MEDIA_TYPE_OCI_MANIFEST.to_string(),
                Manifest::Index(_) => MEDIA_TYPE_OCI_INDEX.to_string(),
            });
        let mut descriptor = Descriptor::new(media_type, Digest::of_bytes(&raw), raw.len() as u64);
        if let Manifest::Image(m) = &manifest {
            descriptor.artifact_type = m.artifact_type.clone();
        }
        Ok(Self {
            descriptor,
            raw,
            manifest,
        })
    }
}

/// An image: its manifest and config, each with the raw bytes it is stored as.
#[derive(Debug, Clone, PartialEq)]
pub struct Image {
    /// The manifest's descriptor (with the platform when known).
    pub descriptor: Descriptor,
    /// The manifest.
    pub manifest: ImageManifest,
    /// The manifest as stored.
    pub raw_manifest: Vec<u8>,
    /// The config (empty for an artifact whose config is not an image config).
    pub config: ImageConfig,
    /// The config as stored.
    pub raw_config: Vec<u8>,
}

/// A layer to append to an image: the blob, its uncompressed digest and its history entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Addendum {
    /// The compressed blob.
    pub layer: Descriptor,
    /// Its uncompressed digest (`rootfs.diff_ids`).
    pub diff_id: Digest,
    /// The history entry describing it (`created` is filled in by [`Image::append`]).
    pub history: Option<History>,
}

impl Image {
    /// An OCI image of `config` and `layers`: canonical JSON, descriptors computed, the
    /// manifest's descriptor carrying the config's platform.
    pub fn new(
        config: ImageConfig,
        layers: Vec<Descriptor>,
        annotations: BTreeMap<String, String>,
    ) -> Self {
        let raw_config = to_canonical_json(&config);
        let manifest = ImageManifest {
            schema_version: 2,
            media_type: Some(MEDIA_TYPE_OCI_MANIFEST.into()),
            artifact_type: None,
            config: Descriptor::new(
                MEDIA_TYPE_OCI_CONFIG,
                Digest::of_bytes(&raw_config),
                raw_config.len() as u64,
            ),
            layers,
            subject: None,
            annotations,
        };
        let raw_manifest = to_canonical_json(&manifest);
        let mut descriptor = Descriptor::new(
            MEDIA_TYPE_OCI_MANIFEST,
            Digest::of_bytes(&raw_manifest),
            raw_manifest.len() as u64,
        );
        descriptor.platform = Some(config.platform());
        Self {
            descriptor,
            manifest,
            raw_manifest,
            config,
            raw_config,
        }
    }

    /// An image without layers for `platform` (the base of a one-layer image).
    pub fn scratch(platform: &Platform) -> Self {
        let config = ImageConfig {
            architecture: platform.architecture.clone(),
            os: platform.os.clone(),
            variant: platform.variant.clone(),
            rootfs: RootFs {
                kind: "layers".into(),
                diff_ids: vec![],
            },
            ..Default::default()
        };
        Self::new(config, vec![], BTreeMap::new())
    }

    /// An artifact manifest (OCI 1.1): the empty config, `blobs` as its layers, attached to
    /// `subject` (an SBOM or a signature hanging off an image).
    pub fn artifact(
        artifact_type: &str,
        blobs: Vec<Descriptor>,
        subject: Option<Descriptor>,
        annotations: BTreeMap<String, String>,
    ) -> Self {
        let manifest = ImageManifest {
            schema_version: 2,
            media_type: Some(MEDIA_TYPE_OCI_MANIFEST.into()),
            artifact_type: Some(artifact_type.to_string()),
            config: Descriptor::empty_json(),
            layers: blobs,
            subject,
            annotations,
        };
        let raw_manifest = to_canonical_json(&manifest);
        let mut descriptor = Descriptor::new(
            MEDIA_TYPE_OCI_MANIFEST,
            Digest::of_bytes(&raw_manifest),
            raw_manifest.len() as u64,
        );
        descriptor.artifact_type = Some(artifact_type.to_string());
        Self {
            descriptor,
            manifest,
            raw_manifest,
            config: ImageConfig::default(),
            raw_config: EMPTY_JSON.to_vec(),
        }
    }

    /// An image from its stored bytes (the caller verified them against their digests). The
    /// config is parsed when it is an image config; an artifact's config stays empty.
    pub fn from_raw(
        descriptor: Descriptor,
        raw_manifest: Vec<u8>,
        raw_config: Vec<u8>,
    ) -> Result<Self, OciError> {
        let manifest = match Manifest::parse(&raw_manifest, Some(&descriptor.media_type))? {
            Manifest::Image(m) => m,
            Manifest::Index(_) => return Err(OciError::NotAnImage(descriptor.digest)),
        };
        let is_image_config = matches!(
            manifest.config.media_type.as_str(),
            MEDIA_TYPE_OCI_CONFIG | MEDIA_TYPE_DOCKER_CONFIG
        );
        let config = if is_image_config || manifest.artifact_type.is_none() {
            ImageConfig::from_slice(&raw_config)?
        } else {
            ImageConfig::default()
        };
        Ok(Self {
            descriptor,
            manifest,
            raw_manifest,
            config,
            raw_config,
        })
    }

    /// The manifest digest.
    pub fn digest(&self) -> &Digest {
        &self.descriptor.digest
    }

    /// The platform of the config (`os/arch[/variant]`).
    pub fn platform(&self) -> Platform {
        self.config.platform()
    }

    /// The engine's ID of this image: the digest of its config.
    pub fn config_id(&self) -> String {
        format!("sha256:{}", self.manifest.config.digest.hex())
    }

    /// Digests of the layers, base first.
    pub fn layer_digests(&self) -> Vec<Digest> {
        self.manifest
            .layers
            .iter()
            .map(|l| l.digest.clone())
            .collect()
    }

    /// The blobs the manifest references: config first, then the layers.
    pub fn blobs(&self) -> impl Iterator<Item = &Descriptor> {
        std::iter::once(&self.manifest.config).chain(&self.manifest.layers)
    }

    /// Whether this manifest is an attachment of another (an artifact or has a `subject`).
    pub fn is_attachment(&self) -> bool {
        self.manifest.artifact_type.is_some() || self.manifest.subject.is_some()
    }

    /// A new OCI image: this one's layers (media types made OCI; the bytes are the same) and
    /// config, `edit` applied to the config, then `layers` appended, each with its history
    /// entry, all dated `created` (Unix seconds).
    pub fn append(
        &self,
        layers: &[Addendum],
        created: i64,
        edit: impl FnOnce(&mut ImageConfig),
    ) -> Result<Self, OciError> {
        let mut config = self.config.clone();
        let when = rfc3339(created);
        config.created = Some(when.clone());
        edit(&mut config);
        if config.rootfs.kind.is_empty() {
            config.rootfs = RootFs {
                kind: "layers".into(),
                diff_ids: vec![],
            };
        }
        if config.rootfs.diff_ids.len() != self.manifest.layers.len() {
            return Err(OciError::DiffIds {
                diff_ids: config.rootfs.diff_ids.len(),
                layers: self.manifest.layers.len(),
            });
        }
        let mut descriptors: Vec<Descriptor> = self
            .manifest
            .layers
            .iter()
            .map(|l| {
                let mut d = l.clone();
                d.media_type = oci_layer_media_type(&l.media_type).to_string();
                d
            })
            .collect();
        for a in layers {
            config.rootfs.diff_ids.push(a.diff_id.clone());
            if let Some(h) = &a.history {
                config.history.push(History {
                    created: Some(when.clone()),
                    ..h.clone()
                });
            }
            descriptors.push(a.layer.clone());
        }
        Ok(Self::new(
            config,
            descriptors,
            self.manifest.annotations.clone(),
        ))
    }
}

/// The OCI media type for a (possibly Docker) layer media type; the bytes are the same.
fn oci_layer_media_type(mt: &str) -> &str {
    match mt {
        MEDIA_TYPE_DOCKER_LAYER_GZIP => MEDIA_TYPE_OCI_LAYER_GZIP,
        "application/vnd.docker.image.rootfs.diff.tar" => MEDIA_TYPE_OCI_LAYER_TAR,
        other => other,
    }
}

/// An image index with its raw bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Index {
    /// The index's descriptor.
    pub descriptor: Descriptor,
    /// The index.
    pub index: ImageIndex,
    /// The index as stored.
    pub raw: Vec<u8>,
}

impl Index {
    /// An OCI index of `manifests` (each with its platform), canonical JSON.
    pub fn new(manifests: Vec<Descriptor>) -> Self {
        let index = ImageIndex {
            manifests,
            ..ImageIndex::empty()
        };
        let raw = to_canonical_json(&index);
        let descriptor = Descriptor::new(
            MEDIA_TYPE_OCI_INDEX,
            Digest::of_bytes(&raw),
            raw.len() as u64,
        );
        Self {
            descriptor,
            index,
            raw,
        }
    }

    /// The entry for a wanted platform.
    pub fn select(&self, platform: &Platform) -> Option<&Descriptor> {
        self.index.select(platform)
    }

    /// The platforms the index offers.
    pub fn platforms(&self) -> Vec<String> {
        self.index
            .manifests
            .iter()
            .filter_map(|d| d.platform.as_ref().map(|p| p.to_string()))
            .collect()
    }
}

/// Why a reference does not lead to one image.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// The index has no entry for the wanted platform.
    #[error("{reference}: the index {index} has no image for {platform} (available: {})", available.join(", "))]
    NoPlatform {
        /// The reference.
        reference: String,
        /// The index.
        index: Digest,
        /// The wanted platform.
        platform: String,
        /// Platforms the index offers.
        available: Vec<String>,
    },
    /// An index entry is itself an index.
    #[error("{reference}: {digest} is a nested index")]
    NestedIndex {
        /// The reference.
        reference: String,
        /// The entry.
        digest: Digest,
    },
    /// A manifest or config does not parse.
    #[error("{what} of {reference}")]
    Document {
        /// Which document.
        what: &'static str,
        /// The reference.
        reference: String,
        /// The cause.
        #[source]
        source: OciError,
    },
}

/// Where images come from: the local layout, a registry repository.
#[async_trait::async_trait]
pub trait ImageSource: Send + Sync {
    /// The source's errors; they carry the walk's own.
    type Error: From<ResolveError> + Send;

    /// The manifest or index a tag (or layout ref) or digest names, verified against `expected`;
    /// a source reads no more than `declared_size` (a descriptor's size) when it is known.
    async fn document(
        &self,
        reference: &str,
        expected: Option<&Digest>,
        declared_size: Option<u64>,
    ) -> Result<Document, Self::Error>;

    /// A small blob (a config), verified against its descriptor.
    async fn small_blob(&self, descriptor: &Descriptor) -> Result<Vec<u8>, Self::Error>;

    /// How `reference` reads in messages (`HOST/REPO:TAG`, `DIR:NAME:TAG`).
    fn name(&self, reference: &str) -> String;
}

/// What a reference resolved to: the index it named, if any, and the platform's image.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// The index the image was selected from.
    pub index: Option<Index>,
    /// The image.
    pub image: Image,
}

/// The index (if the reference names one) and the platform's image manifest, without its
/// config: reference → index → manifest.
pub async fn resolve_manifest<S: ImageSource + ?Sized>(
    source: &S,
    reference: &str,
    expected: Option<&Digest>,
    platform: &Platform,
) -> Result<(Option<Index>, Document), S::Error> {
    let top = source.document(reference, expected, None).await?;
    let idx = match top.manifest {
        Manifest::Image(_) => return Ok((None, top)),
        Manifest::Index(idx) => Index {
            descriptor: top.descriptor,
            index: idx,
            raw: top.raw,
        },
    };
    let name = || source.name(reference);
    let entry = idx
        .select(platform)
        .cloned()
        .ok_or_else(|| ResolveError::NoPlatform {
            reference: name(),
            index: idx.descriptor.digest.clone(),
            platform: platform.to_string(),
            available: idx.platforms(),
        })?;
    let mut child = source
        .document(
            &entry.digest.to_string(),
            Some(&entry.digest),
            Some(entry.size),
        )
        .await?;
    if matches!(child.manifest, Manifest::Index(_)) {
        return Err(ResolveError::NestedIndex {
            reference: name(),
            digest: entry.digest,
        }
        .into());
    }
    child.descriptor.platform = entry.platform;
    Ok((Some(idx), child))
}

/// The one walk pull and inspect share: reference → index → manifest → config.
pub async fn resolve<S: ImageSource + ?Sized>(
    source: &S,
    reference: &str,
    expected: Option<&Digest>,
    platform: &Platform,
) -> Result<Resolved, S::Error> {
    let (index, manifest) = resolve_manifest(source, reference, expected, platform).await?;
    let config = match &manifest.manifest {
        Manifest::Image(m) => m.config.clone(),
        Manifest::Index(_) => {
            return Err(ResolveError::NestedIndex {
                reference: source.name(reference),
                digest: manifest.descriptor.digest,
            }
            .into())
        }
    };
    let raw_config = source.small_blob(&config).await?;
    let image =
        Image::from_raw(manifest.descriptor, manifest.raw, raw_config).map_err(|source_err| {
            ResolveError::Document {
                what: "config",
                reference: source.name(reference),
                source: source_err,
            }
        })?;
    Ok(Resolved { index, image })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Image {
        let mut i = Image::scratch(&Platform::parse("linux/amd64").unwrap());
        i = i
            .append(
                &[Addendum {
                    layer: Descriptor::new(MEDIA_TYPE_DOCKER_LAYER_GZIP, Digest::of_bytes(b"l"), 1),
                    diff_id: Digest::of_bytes(b"d"),
                    history: Some(History {
                        created_by: Some("base".into()),
                        ..Default::default()
                    }),
                }],
                0,
                |_| {},
            )
            .unwrap();
        i
    }

    #[test]
    fn append_is_pure_and_makes_layers_oci() {
        let b = base();
        let edited = b
            .append(&[], 10, |c| c.config.user = Some("app".into()))
            .unwrap();
        assert_eq!(b.config.config.user, None, "the base is untouched");
        assert_eq!(edited.config.config.user.as_deref(), Some("app"));
        assert_eq!(
            edited.manifest.layers[0].media_type,
            MEDIA_TYPE_OCI_LAYER_GZIP
        );
        assert_eq!(
            edited.manifest.config.digest,
            Digest::of_bytes(&edited.raw_config)
        );
        assert_eq!(
            edited.descriptor.digest,
            Digest::of_bytes(&edited.raw_manifest)
        );
        assert_eq!(
            edited.descriptor.platform.as_ref().unwrap().to_string(),
            "linux/amd64"
        );
        let back = Image::from_raw(
            edited.descriptor.clone(),
            edited.raw_manifest.clone(),
            edited.raw_config.clone(),
        )
        .unwrap();
        assert_eq!(back.manifest, edited.manifest);
        assert_eq!(back.config, edited.config);
    }

    #[test]
    fn append_refuses_inconsistent_bases() {
        let mut b = base();
        b.config.rootfs.diff_ids.clear();
        assert!(matches!(
            b.append(&[], 0, |_| {}),
            Err(OciError::DiffIds {
                diff_ids: 0,
                layers: 1
            })
        ));
    }

    #[test]
    fn artifacts_hang_off_a_subject() {
        let img = base();
        let sbom = Descriptor::new("application/spdx+json", Digest::of_bytes(b"s"), 1);
        let a = Image::artifact(
            "application/spdx+json",
            vec![sbom],
            Some(img.descriptor.clone()),
            BTreeMap::new(),
        );
        assert!(a.is_attachment() && !img.is_attachment());
        let json: serde_json::Value = serde_json::from_slice(&a.raw_manifest).unwrap();
        assert_eq!(json["artifactType"], "application/spdx+json");
        assert_eq!(json["subject"]["digest"], img.digest().to_string());
        assert_eq!(
            json["config"]["mediaType"],
            super::super::MEDIA_TYPE_OCI_EMPTY
        );
        let back =
            Image::from_raw(a.descriptor.clone(), a.raw_manifest.clone(), a.raw_config).unwrap();
        assert_eq!(back.manifest.subject.unwrap().digest, *img.digest());
    }

    #[test]
    fn index_selects_by_platform() {
        let amd = base();
        let idx = Index::new(vec![amd.descriptor.clone()]);
        assert_eq!(
            idx.select(&Platform::parse("linux/amd64").unwrap()),
            Some(&amd.descriptor)
        );
        assert_eq!(idx.platforms(), ["linux/amd64"]);
        let doc = Document::from_raw(idx.raw.clone(), None).unwrap();
        assert_eq!(doc.descriptor, idx.descriptor);
    }
}
