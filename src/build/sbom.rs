//! The `sbom` stage: the packages of the built image, read from its layers, stored in the
//! layout as an SBOM artifact whose `subject` is the image manifest (issue 14).
//!
//! The document depends only on the manifest (layers and config), the image name, the format
//! and wpimg's version; the artifact records the last three, so an unchanged rebuild keeps the
//! stored document instead of reading every layer again.

use std::collections::BTreeMap;

use super::{BuildContext, BuildError, SbomReport};
use crate::layout::Layout;
use crate::oci::{Descriptor, Image};
use crate::sbom::artifact::{self, FoundSbom};
use crate::sbom::{Format, SbomError};

/// Store the SBOM of `image` (already in the layout) in `format`.
pub(super) async fn store(
    ctx: &BuildContext<'_>,
    image: &Image,
    format: Format,
) -> Result<SbomReport, BuildError> {
    let layout = ctx.layout().clone();
    let manifest = image.descriptor.clone();
    let name = ctx.spec.name.clone();
    let task = tokio::task::spawn_blocking(move || {
        let stamp = stamp(&name);
        match stored(&layout, &manifest, format, &stamp)? {
            Some(report) => Ok(report),
            None => scan(&layout, &manifest, &name, format, stamp),
        }
    });
    Ok(task.await??)
}

/// The annotations that say which document an artifact holds besides its subject and format.
fn stamp(name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            artifact::ANNOTATION_GENERATOR.to_string(),
            crate::sbom::tool_name(),
        ),
        (artifact::ANNOTATION_NAME.to_string(), name.to_string()),
    ])
}

/// The artifact a previous build stored for the same manifest, name, format and wpimg version.
fn stored(
    layout: &Layout,
    manifest: &Descriptor,
    format: Format,
    stamp: &BTreeMap<String, String>,
) -> Result<Option<SbomReport>, SbomError> {
    let same = |f: &FoundSbom| {
        f.format == format && stamp.iter().all(|(k, v)| f.annotations.get(k) == Some(v))
    };
    let packages = |f: &FoundSbom| {
        f.annotations
            .get(artifact::ANNOTATION_PACKAGES)
            .and_then(|n| n.parse().ok())
    };
    let found = artifact::find_sboms(layout, &manifest.digest)?;
    Ok(found.iter().filter(|f| same(f)).find_map(|f| {
        Some(SbomReport {
            artifact: f.manifest.clone(),
            subject: manifest.digest.clone(),
            format,
            packages: packages(f)?,
        })
    }))
}

/// Read the layers, write the document and its artifact.
fn scan(
    layout: &Layout,
    manifest: &Descriptor,
    name: &str,
    format: Format,
    mut annotations: BTreeMap<String, String>,
) -> Result<SbomReport, SbomError> {
    let sbom = crate::sbom::generate(layout, manifest, name)?;
    let packages = sbom.inventory.packages.len();
    annotations.insert(artifact::ANNOTATION_PACKAGES.into(), packages.to_string());
    let document = sbom.to_json(format);
    let created = &sbom.subject.created;
    let artifact =
        artifact::write_sbom_annotated(layout, &document, format, manifest, created, &annotations)?;
    Ok(SbomReport {
        artifact,
        subject: manifest.digest.clone(),
        format,
        packages,
    })
}
