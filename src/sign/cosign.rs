//! cosign's storage format, byte for byte as cosign (go-containerregistry) writes it.
//!
//! A signature "image" is an OCI manifest whose config is go-containerregistry's config of an
//! empty image with the appended layers (`architecture` and `os` empty, zero `created` times)
//! and whose layers are simple-signing payloads (`application/vnd.dev.cosign.simplesigning.v1+json`)
//! each annotated with `dev.cosignproject.cosign/signature` (the base64 DER signature). It is
//! pushed under the tag `sha256-<hex>.sig` of the signed manifest's repository; `cosign attach
//! sbom` uses the same shape with the SBOM as the layer under `sha256-<hex>.sbom`.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::layout::Layout;
use crate::oci::{Descriptor, Digest, MEDIA_TYPE_OCI_CONFIG, MEDIA_TYPE_OCI_MANIFEST};

use super::SignError;

/// Media type of a simple-signing payload layer (containers/image's `SigstoreSignatureMIMEType`).
pub const SIMPLE_SIGNING_MEDIA_TYPE: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
/// Layer annotation holding the base64 signature.
pub const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";
/// Layer annotation holding a Fulcio certificate (keyless; never written by wpimg).
pub const CERTIFICATE_ANNOTATION: &str = "dev.sigstore.cosign/certificate";
/// Largest signature manifest or payload read (containers/image's limit is 4 MiB).
pub const MAX_SIGNATURE_SIZE: u64 = 4 << 20;
/// The artifact type of a signature stored as an OCI 1.1 referrer: cosign's
/// `--registry-referrers-mode oci-1-1` puts it in `config.mediaType` (the referrers API
/// reports it as `artifactType`).
pub const SIGNATURE_ARTIFACT_TYPE: &str = "application/vnd.dev.cosign.artifact.sig.v1+json";

/// The tag cosign stores signatures of `digest` under (`sha256-<hex>.sig`).
pub fn signature_tag(digest: &Digest) -> String {
    format!("{}-{}.sig", digest.algorithm(), digest.hex())
}

/// The tag cosign stores SBOMs of `digest` under (`sha256-<hex>.sbom`).
pub fn sbom_tag(digest: &Digest) -> String {
    format!("{}-{}.sbom", digest.algorithm(), digest.hex())
}

/// go-containerregistry's config of an empty image with layers of these diff_ids appended.
pub fn ggcr_config(diff_ids: &[Digest]) -> Vec<u8> {
    const ZERO_TIME: &str = "0001-01-01T00:00:00Z";
    let history: Vec<Value> = diff_ids
        .iter()
        .map(|_| json!({"created": ZERO_TIME}))
        .collect();
    let mut c = Map::new();
    c.insert("architecture".into(), json!(""));
    c.insert("created".into(), json!(ZERO_TIME));
    if !history.is_empty() {
        c.insert("history".into(), Value::Array(history));
    }
    c.insert("os".into(), json!(""));
    c.insert(
        "rootfs".into(),
        json!({"type": "layers", "diff_ids": diff_ids.iter().map(|d| d.to_string()).collect::<Vec<_>>()}),
    );
    c.insert("config".into(), json!({}));
    serde_json::to_vec(&Value::Object(c)).unwrap_or_default()
}

/// A descriptor in go-containerregistry's field order (mediaType, size, digest, annotations).
fn ggcr_descriptor(
    media_type: &str,
    digest: &Digest,
    size: u64,
    ann: &BTreeMap<String, String>,
) -> Value {
    let mut d = Map::new();
    d.insert("mediaType".into(), json!(media_type));
    d.insert("size".into(), json!(size));
    d.insert("digest".into(), json!(digest.to_string()));
    if !ann.is_empty() {
        d.insert("annotations".into(), json!(ann));
    }
    Value::Object(d)
}

/// One layer of a cosign image: its content, media type and annotations.
#[derive(Clone, PartialEq, Eq)]
pub struct Layer {
    /// The content (a simple-signing payload, or an SBOM document).
    pub content: Vec<u8>,
    /// Its media type.
    pub media_type: String,
    /// Annotations (the signature for signature layers).
    pub annotations: BTreeMap<String, String>,
}

impl std::fmt::Debug for Layer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Layer")
            .field("media_type", &self.media_type)
            .field("size", &self.content.len())
            .field("annotations", &self.annotations)
            .finish()
    }
}

impl Layer {
    /// A signature layer: the payload with its base64 signature.
    pub fn signature(payload: Vec<u8>, signature_b64: String) -> Self {
        Self {
            content: payload,
            media_type: SIMPLE_SIGNING_MEDIA_TYPE.into(),
            annotations: BTreeMap::from([(SIGNATURE_ANNOTATION.to_string(), signature_b64)]),
        }
    }

    /// The base64 signature annotation, if any.
    pub fn signature_b64(&self) -> Option<&str> {
        self.annotations
            .get(SIGNATURE_ANNOTATION)
            .map(String::as_str)
    }
}

/// A cosign image as bytes: the config and the manifest (both blobs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// Config blob.
    pub config: Vec<u8>,
    /// Manifest blob.
    pub manifest: Vec<u8>,
    /// The layers.
    pub layers: Vec<Layer>,
}

impl Image {
    /// The image cosign writes for these layers (in this order).
    pub fn new(layers: Vec<Layer>) -> Self {
        Self::build(layers, MEDIA_TYPE_OCI_CONFIG, None)
    }

    /// The signature image as an OCI 1.1 referrer of `subject`, as cosign's
    /// `--registry-referrers-mode oci-1-1` writes it: the same config blob under the media type
    /// [`SIGNATURE_ARTIFACT_TYPE`], and `subject` (media type, size, digest) after the layers.
    pub fn referrer(layers: Vec<Layer>, subject: &Descriptor) -> Self {
        Self::build(layers, SIGNATURE_ARTIFACT_TYPE, Some(subject))
    }

    fn build(layers: Vec<Layer>, config_media_type: &str, subject: Option<&Descriptor>) -> Self {
        let digests: Vec<Digest> = layers
            .iter()
            .map(|l| Digest::of_bytes(&l.content))
            .collect();
        let config = ggcr_config(&digests);
        let layer_values: Vec<Value> = layers
            .iter()
            .zip(&digests)
            .map(|(l, d)| ggcr_descriptor(&l.media_type, d, l.content.len() as u64, &l.annotations))
            .collect();
        let none = BTreeMap::new();
        let config_desc = ggcr_descriptor(
            config_media_type,
            &Digest::of_bytes(&config),
            config.len() as u64,
            &none,
        );
        let mut manifest = Map::new();
        manifest.insert("schemaVersion".into(), json!(2));
        manifest.insert("mediaType".into(), json!(MEDIA_TYPE_OCI_MANIFEST));
        manifest.insert("config".into(), config_desc);
        manifest.insert("layers".into(), Value::Array(layer_values));
        if let Some(s) = subject {
            let s = ggcr_descriptor(&s.media_type, &s.digest, s.size, &none);
            manifest.insert("subject".into(), s);
        }
        Self {
            manifest: serde_json::to_vec(&Value::Object(manifest)).unwrap_or_default(),
            config,
            layers,
        }
    }

    /// The manifest's descriptor.
    pub fn descriptor(&self) -> Descriptor {
        Descriptor::new(
            MEDIA_TYPE_OCI_MANIFEST,
            Digest::of_bytes(&self.manifest),
            self.manifest.len() as u64,
        )
    }

    /// Store config, layers and manifest in the layout; returns the manifest's descriptor.
    /// The manifest is not tagged: push it to the tag [`signature_tag`] / [`sbom_tag`] names.
    pub fn write(&self, layout: &Layout) -> Result<Descriptor, SignError> {
        layout.write_blob(&self.config)?;
        for l in &self.layers {
            layout.write_blob(&l.content)?;
        }
        layout.write_blob(&self.manifest)?;
        Ok(self.descriptor())
    }
}

/// The image `cosign attach sbom` writes: one layer holding the document.
pub fn file_image(content: Vec<u8>, media_type: &str) -> Image {
    Image::new(vec![Layer {
        content,
        media_type: media_type.into(),
        annotations: BTreeMap::new(),
    }])
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawManifest {
    #[serde(default)]
    layers: Vec<Descriptor>,
}

/// The layer descriptors of a signature manifest (any layer media type; the caller filters).
pub fn manifest_layers(raw: &[u8]) -> Result<Vec<Descriptor>, SignError> {
    let m: RawManifest = serde_json::from_slice(raw)
        .map_err(|e| SignError::BadSignatureManifest(format!("not an OCI manifest: {e}")))?;
    Ok(m.layers)
}

/// Read a signature image's layers back from the layout (payloads digest-checked).
pub fn read_layers(layout: &Layout, manifest: &Descriptor) -> Result<Vec<Layer>, SignError> {
    if manifest.size > MAX_SIGNATURE_SIZE {
        return Err(SignError::BadSignatureManifest(format!(
            "manifest {} is {} bytes",
            manifest.digest, manifest.size
        )));
    }
    let raw = layout.read_blob(&manifest.digest)?;
    manifest_layers(&raw)?
        .into_iter()
        .map(|d| {
            if d.size > MAX_SIGNATURE_SIZE {
                return Err(SignError::BadSignatureManifest(format!(
                    "layer {} is {} bytes",
                    d.digest, d.size
                )));
            }
            let content = layout.read_blob(&d.digest)?;
            if Digest::of_bytes(&content) != d.digest {
                return Err(SignError::BadSignatureManifest(format!(
                    "layer {} does not match its digest",
                    d.digest
                )));
            }
            Ok(Layer {
                content,
                media_type: d.media_type,
                annotations: d.annotations,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags() {
        let d: Digest = "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
            .parse()
            .unwrap();
        assert_eq!(
            signature_tag(&d),
            "sha256-2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824.sig"
        );
        assert!(sbom_tag(&d).ends_with(".sbom"));
    }

    #[test]
    fn signature_image_has_cosigns_bytes() {
        let payload = b"{}".to_vec();
        let img = Image::new(vec![Layer::signature(payload, "MEUC".into())]);
        let pd = Digest::of_bytes(b"{}");
        assert_eq!(
            String::from_utf8(img.config.clone()).unwrap(),
            format!(
                "{{\"architecture\":\"\",\"created\":\"0001-01-01T00:00:00Z\",\"history\":[{{\"created\":\
                 \"0001-01-01T00:00:00Z\"}}],\"os\":\"\",\"rootfs\":{{\"type\":\"layers\",\"diff_ids\":\
                 [\"{pd}\"]}},\"config\":{{}}}}"
            )
        );
        let cd = Digest::of_bytes(&img.config);
        assert_eq!(
            String::from_utf8(img.manifest.clone()).unwrap(),
            format!(
                "{{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\
                 \"config\":{{\"mediaType\":\"application/vnd.oci.image.config.v1+json\",\"size\":{},\
                 \"digest\":\"{cd}\"}},\"layers\":[{{\"mediaType\":\
                 \"application/vnd.dev.cosign.simplesigning.v1+json\",\"size\":2,\"digest\":\"{pd}\",\
                 \"annotations\":{{\"dev.cosignproject.cosign/signature\":\"MEUC\"}}}}]}}",
                img.config.len()
            )
        );
        assert_eq!(manifest_layers(&img.manifest).unwrap().len(), 1);
    }

    #[test]
    fn write_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::open_or_create(dir.path()).unwrap();
        let img = Image::new(vec![
            Layer::signature(b"a".to_vec(), "c2ln".into()),
            Layer::signature(b"b".to_vec(), "c2lnMg==".into()),
        ]);
        let desc = img.write(&layout).unwrap();
        let layers = read_layers(&layout, &desc).unwrap();
        assert_eq!(layers, img.layers);
        assert_eq!(layers[1].signature_b64(), Some("c2lnMg=="));
        let subject = Descriptor::new(MEDIA_TYPE_OCI_MANIFEST, Digest::of_bytes(b"m"), 1);
        let r = Image::referrer(img.layers.clone(), &subject);
        assert_eq!(r.config, img.config);
        let m: Value = serde_json::from_slice(&r.manifest).unwrap();
        assert_eq!(m["config"]["mediaType"], SIGNATURE_ARTIFACT_TYPE);
        assert_eq!(m["subject"]["digest"], subject.digest.to_string());
        assert_eq!(
            read_layers(&layout, &r.write(&layout).unwrap()).unwrap(),
            img.layers
        );
        let f = file_image(b"{\"spdx\":1}".to_vec(), "text/spdx+json");
        assert!(String::from_utf8(f.manifest)
            .unwrap()
            .contains("\"text/spdx+json\""));
    }
}
