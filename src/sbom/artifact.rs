//! An SBOM as an OCI 1.1 artifact: a manifest whose `artifactType` is the document's media
//! type, whose config is the empty descriptor (`application/vnd.oci.empty.v1+json`, `{}`),
//! whose one layer is the document and whose `subject` is the image manifest, the shape
//! `oras attach --artifact-type application/spdx+json` and the referrers API use. In the layout
//! it is an untagged `index.json` entry (as ORAS's OCI store keeps referrers), found again by
//! its `subject`.
//!
//! For registries without the referrers API the same document goes under cosign's tag
//! `sha256-<hex>.sbom` in the shape `cosign attach sbom` writes: see
//! [`crate::sign::cosign::file_manifest`] and [`cosign_sbom_media_type`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::layout::Layout;
use crate::oci::{Descriptor, Digest, MEDIA_TYPE_OCI_MANIFEST};

use super::{Format, SbomError};

/// SPDX JSON (IANA registered).
pub const MEDIA_TYPE_SPDX_JSON: &str = "application/spdx+json";
/// SPDX JSON as cosign names it in `cosign attach sbom --type spdxjson`.
pub const MEDIA_TYPE_COSIGN_SPDX_JSON: &str = "text/spdx+json";
/// CycloneDX JSON.
pub const MEDIA_TYPE_CYCLONEDX_JSON: &str = "application/vnd.cyclonedx+json";
/// The OCI 1.1 empty descriptor's media type.
pub const MEDIA_TYPE_EMPTY: &str = "application/vnd.oci.empty.v1+json";
/// The empty descriptor's content.
pub const EMPTY_JSON: &[u8] = b"{}";
/// Layer annotation naming the file (ORAS uses it as the file name on pull).
pub const ANNOTATION_TITLE: &str = "org.opencontainers.image.title";
/// Manifest annotation with the creation time.
pub const ANNOTATION_CREATED: &str = "org.opencontainers.image.created";
/// Largest SBOM document read back from a layout.
pub const MAX_DOCUMENT_SIZE: u64 = 256 << 20;
/// Manifest annotation: the tool that wrote the document (`wpimg-0.1.0`).
pub const ANNOTATION_GENERATOR: &str = "io.wpimg.sbom.generator";
/// Manifest annotation: the image name the document gives.
pub const ANNOTATION_NAME: &str = "io.wpimg.sbom.name";
/// Manifest annotation: the number of packages the document lists.
pub const ANNOTATION_PACKAGES: &str = "io.wpimg.sbom.packages";

/// An OCI image manifest with the OCI 1.1 artifact fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ArtifactManifest {
    /// Always 2.
    pub schema_version: u32,
    /// Always the OCI image manifest media type.
    pub media_type: String,
    /// What the artifact is (`application/spdx+json`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    /// The config (the empty descriptor for artifacts).
    pub config: Descriptor,
    /// The content.
    pub layers: Vec<Descriptor>,
    /// The manifest this artifact refers to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<Descriptor>,
    /// Annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// The empty config descriptor of OCI 1.1.
pub fn empty_descriptor() -> Descriptor {
    Descriptor::new(MEDIA_TYPE_EMPTY, Digest::of_bytes(EMPTY_JSON), 2)
}

/// The media type cosign's tag scheme uses for a format (`text/spdx+json` for SPDX).
pub fn cosign_sbom_media_type(format: Format) -> &'static str {
    match format {
        Format::SpdxJson => MEDIA_TYPE_COSIGN_SPDX_JSON,
        Format::CycloneDxJson => MEDIA_TYPE_CYCLONEDX_JSON,
    }
}

fn file_name(format: Format) -> &'static str {
    match format {
        Format::SpdxJson => "sbom.spdx.json",
        Format::CycloneDxJson => "sbom.cdx.json",
    }
}

/// The artifact manifest for a document: `subject` is the image manifest's descriptor (its
/// media type, digest and size only), `created` goes into the manifest's annotations.
pub fn sbom_manifest(
    document: &[u8],
    format: Format,
    subject: &Descriptor,
    created: &str,
) -> ArtifactManifest {
    let mut layer = Descriptor::new(
        format.media_type(),
        Digest::of_bytes(document),
        document.len() as u64,
    );
    layer
        .annotations
        .insert(ANNOTATION_TITLE.into(), file_name(format).into());
    let subject = Descriptor::new(
        subject.media_type.clone(),
        subject.digest.clone(),
        subject.size,
    );
    ArtifactManifest {
        schema_version: 2,
        media_type: MEDIA_TYPE_OCI_MANIFEST.into(),
        artifact_type: Some(format.media_type().into()),
        config: empty_descriptor(),
        layers: vec![layer],
        subject: Some(subject),
        annotations: BTreeMap::from([(ANNOTATION_CREATED.to_string(), created.to_string())]),
    }
}

/// Store a document as an artifact referring to `subject` in the layout; returns the artifact
/// manifest's descriptor (with `artifactType`), also added untagged to `index.json`.
pub fn write_sbom(
    layout: &Layout,
    document: &[u8],
    format: Format,
    subject: &Descriptor,
    created: &str,
) -> Result<Descriptor, SbomError> {
    write_sbom_annotated(layout, document, format, subject, created, &BTreeMap::new())
}

/// [`write_sbom`] with further manifest annotations (e.g. [`ANNOTATION_GENERATOR`]).
pub fn write_sbom_annotated(
    layout: &Layout,
    document: &[u8],
    format: Format,
    subject: &Descriptor,
    created: &str,
    annotations: &BTreeMap<String, String>,
) -> Result<Descriptor, SbomError> {
    let mut manifest = sbom_manifest(document, format, subject, created);
    manifest.annotations.extend(annotations.clone());
    layout.write_blob(EMPTY_JSON)?;
    layout.write_blob(document)?;
    let raw = crate::oci::to_canonical_json(&manifest);
    let (digest, size) = layout.write_blob(&raw)?;
    let mut desc = Descriptor::new(MEDIA_TYPE_OCI_MANIFEST, digest, size);
    desc.artifact_type = manifest.artifact_type.clone();
    layout.add_untagged(&desc)?;
    Ok(desc)
}

/// An SBOM artifact found in a layout.
#[derive(Debug, Clone, PartialEq)]
pub struct FoundSbom {
    /// The artifact manifest.
    pub manifest: Descriptor,
    /// The document's format.
    pub format: Format,
    /// The document blob.
    pub document: Descriptor,
    /// The artifact manifest's annotations.
    pub annotations: BTreeMap<String, String>,
}

/// The SBOM artifacts in the layout whose `subject` is `subject` (newest index entry first).
pub fn find_sboms(layout: &Layout, subject: &Digest) -> Result<Vec<FoundSbom>, SbomError> {
    let mut found = Vec::new();
    for entry in layout.index()?.manifests.iter().rev() {
        if entry.media_type != MEDIA_TYPE_OCI_MANIFEST
            || entry
                .artifact_type
                .as_deref()
                .is_some_and(|t| Format::from_media_type(t).is_none())
            || entry.size > 4 << 20
        {
            continue;
        }
        let raw = layout.read_blob(&entry.digest)?;
        let Ok(m) = serde_json::from_slice::<ArtifactManifest>(&raw) else {
            continue;
        };
        if m.subject.as_ref().map(|s| &s.digest) != Some(subject) {
            continue;
        }
        let Some(format) = m.artifact_type.as_deref().and_then(Format::from_media_type) else {
            continue;
        };
        let Some(document) = m
            .layers
            .iter()
            .find(|l| Format::from_media_type(&l.media_type) == Some(format))
        else {
            continue;
        };
        found.push(FoundSbom {
            manifest: entry.clone(),
            format,
            document: document.clone(),
            annotations: m.annotations.clone(),
        });
    }
    Ok(found)
}

/// The document of a found SBOM, digest-checked.
pub fn read_document(layout: &Layout, found: &FoundSbom) -> Result<Vec<u8>, SbomError> {
    let d = &found.document;
    if d.size > MAX_DOCUMENT_SIZE {
        return Err(SbomError::Document {
            digest: d.digest.clone(),
            message: format!("{} bytes is more than {MAX_DOCUMENT_SIZE}", d.size),
        });
    }
    let bytes = layout.read_blob(&d.digest)?;
    if Digest::of_bytes(&bytes) != d.digest {
        return Err(SbomError::Document {
            digest: d.digest.clone(),
            message: "content does not match its digest".into(),
        });
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_and_find_again() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::open_or_create(dir.path()).unwrap();
        let (d, n) = layout.write_blob(b"{\"schemaVersion\":2}").unwrap();
        let image = Descriptor::new(MEDIA_TYPE_OCI_MANIFEST, d.clone(), n);
        layout.tag("img:1", &image).unwrap();
        let created = "2024-01-02T03:04:05Z";
        let a = write_sbom(&layout, b"{\"spdx\":1}", Format::SpdxJson, &image, created).unwrap();
        let b = write_sbom(
            &layout,
            b"{\"cdx\":1}",
            Format::CycloneDxJson,
            &image,
            created,
        )
        .unwrap();
        // Idempotent: the same document again adds no second entry.
        write_sbom(&layout, b"{\"spdx\":1}", Format::SpdxJson, &image, created).unwrap();
        assert_eq!(layout.index().unwrap().manifests.len(), 3);
        // Tagging again keeps the artifact entries and their artifactType.
        layout.tag("img:1", &image).unwrap();
        let found = find_sboms(&layout, &d).unwrap();
        assert_eq!(found.len(), 2);
        assert_eq!(found[0].manifest.digest, b.digest);
        assert_eq!(found[1].manifest.digest, a.digest);
        assert_eq!(found[1].format, Format::SpdxJson);
        assert_eq!(
            found[1].manifest.artifact_type.as_deref(),
            Some("application/spdx+json")
        );
        assert_eq!(read_document(&layout, &found[1]).unwrap(), b"{\"spdx\":1}");
        assert!(find_sboms(&layout, &Digest::of_bytes(b"other"))
            .unwrap()
            .is_empty());

        let raw = layout.read_blob(&a.digest).unwrap();
        let m: serde_json::Value = serde_json::from_slice(&raw).unwrap();
        assert_eq!(m["artifactType"], "application/spdx+json");
        assert_eq!(m["config"]["mediaType"], MEDIA_TYPE_EMPTY);
        assert_eq!(
            m["config"]["digest"],
            "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
        );
        assert_eq!(m["subject"]["digest"], d.to_string());
        assert_eq!(m["layers"][0]["mediaType"], "application/spdx+json");
        assert_eq!(m["annotations"][ANNOTATION_CREATED], created);
    }
}
