//! Software bills of materials (issue 14): the installed packages of an image's final
//! filesystem, read from its package databases straight out of the layer blobs, written as
//! SPDX 2.3 or CycloneDX 1.5 JSON and stored as an OCI artifact whose `subject` is the image.
//!
//! The data path: [`rootfs::DbFiles::collect`] streams the layers (base first, whiteouts and
//! opaque directories applied) and keeps only the database files on disk; [`dpkg`], [`rpm`] and
//! [`apk`] parse them into one [`Package`] list; [`Sbom`] turns that list into either format;
//! [`artifact`] stores and finds the document in the layout.

pub mod apk;
pub mod artifact;
mod cyclonedx;
pub mod dpkg;
pub mod osrelease;
pub mod purl;
pub mod rootfs;
pub mod rpm;
mod spdx;
mod time;

use std::fmt;
use std::io;
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::layout::{Layout, LayoutError};
use crate::oci::{Descriptor, Digest, ImageConfig, ImageManifest, Manifest, OciError};

pub use osrelease::OsRelease;

/// Errors of SBOM generation.
#[derive(Debug, thiserror::Error)]
pub enum SbomError {
    /// The layout could not be read.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// The manifest or config is not what an image needs.
    #[error("image {digest}: {source}")]
    Image {
        /// The manifest.
        digest: Digest,
        /// The cause.
        #[source]
        source: OciError,
    },
    /// The manifest is an index, not a single image.
    #[error("{digest} is an index: pick one platform's manifest for an SBOM")]
    NotAnImage {
        /// The index.
        digest: Digest,
    },
    /// The manifest's config lists a different number of layers than the manifest.
    #[error(
        "image {digest}: {manifest} layers in the manifest but {config} diff_ids in the config"
    )]
    LayerCount {
        /// The manifest.
        digest: Digest,
        /// Layers in the manifest.
        manifest: usize,
        /// diff_ids in the config.
        config: usize,
    },
    /// A layer blob could not be read as a (compressed) tar.
    #[error("layer {digest}: {source}")]
    Layer {
        /// The layer.
        digest: Digest,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A package database in the image is malformed.
    #[error("/{path} in the image: {message}")]
    Database {
        /// Path of the database inside the image (without the leading `/`).
        path: String,
        /// What is wrong.
        message: String,
    },
    /// SQLite could not read an rpm database.
    #[error("/{path} in the image: {source}")]
    Sqlite {
        /// Path of the database inside the image.
        path: String,
        /// The cause.
        #[source]
        source: rusqlite::Error,
    },
    /// Local I/O (temporary files).
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A stored document could not be parsed.
    #[error("SBOM document {digest}: {message}")]
    Document {
        /// The document blob.
        digest: Digest,
        /// What is wrong.
        message: String,
    },
}

impl crate::error::HasKind for SbomError {
    fn kind(&self) -> crate::error::ErrorKind {
        crate::error::ErrorKind::Failure
    }
}

impl SbomError {
    fn db(path: &str, message: impl Into<String>) -> Self {
        Self::Database {
            path: path.to_string(),
            message: message.into(),
        }
    }
}

/// The package manager a package was installed with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Ecosystem {
    /// dpkg (Debian, Ubuntu, distroless).
    Deb,
    /// rpm (RHEL, CentOS, Fedora, Amazon Linux).
    Rpm,
    /// apk (Alpine).
    Apk,
}

impl Ecosystem {
    /// The purl type (`deb`, `rpm`, `apk`).
    pub fn purl_type(self) -> &'static str {
        match self {
            Ecosystem::Deb => "deb",
            Ecosystem::Rpm => "rpm",
            Ecosystem::Apk => "apk",
        }
    }

    /// The purl namespace when the image has no `/etc/os-release`.
    fn default_namespace(self) -> &'static str {
        match self {
            Ecosystem::Deb => "debian",
            Ecosystem::Rpm => "redhat",
            Ecosystem::Apk => "alpine",
        }
    }
}

/// The source package a binary package was built from.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct SourcePackage {
    /// Source package name (`glibc`), or the source rpm file name for rpm.
    pub name: String,
    /// Its version when it differs from or is stated apart from the binary's.
    pub version: Option<String>,
}

/// One installed package.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Package {
    /// Package manager.
    pub ecosystem: Ecosystem,
    /// Name.
    pub name: String,
    /// Version as the package manager shows it: deb `Version`, rpm `VERSION-RELEASE`
    /// (epoch apart), apk `V`.
    pub version: String,
    /// rpm epoch, when set.
    pub epoch: Option<u32>,
    /// Architecture (`amd64`, `x86_64`, `noarch`, `all`).
    pub arch: Option<String>,
    /// Source package.
    pub source: Option<SourcePackage>,
    /// Licence as the database declares it (rpm `LICENSE`, apk `L:`); never guessed.
    pub license: Option<String>,
    /// Supplier (rpm `VENDOR`).
    pub supplier: Option<String>,
    /// Package URL.
    pub purl: String,
}

impl Package {
    /// Version with the rpm epoch (`1:2.3-4`), as `rpm -q --qf '%{EVR}'` prints it.
    pub fn full_version(&self) -> String {
        match self.epoch {
            Some(e) => format!("{e}:{}", self.version),
            None => self.version.clone(),
        }
    }
}

/// What was found in an image's filesystem.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Inventory {
    /// `/etc/os-release` (or `/usr/lib/os-release`).
    pub os: Option<OsRelease>,
    /// Installed packages, sorted and without duplicates.
    pub packages: Vec<Package>,
    /// Database files that were read (paths in the image, without `/`).
    pub databases: Vec<String>,
}

/// The image an SBOM describes.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageSubject {
    /// Image name (`wordpress`, or a repository path such as `library/debian`).
    pub name: String,
    /// Repository for the purl's `repository_url` (`123.dkr.ecr.../wordpress`), if known.
    pub repository: Option<String>,
    /// The image manifest's descriptor.
    pub manifest: Descriptor,
    /// The config's `created` normalised to `YYYY-MM-DDThh:mm:ssZ` (epoch 0 when unset).
    pub created: String,
    /// `os/architecture[/variant]` of the config.
    pub platform: String,
    /// Architecture alone (`amd64`).
    pub architecture: String,
}

impl ImageSubject {
    /// The subject for a manifest and its config.
    pub fn new(name: &str, manifest: Descriptor, config: &ImageConfig) -> Self {
        let created = config
            .created
            .as_deref()
            .and_then(time::parse_rfc3339)
            .unwrap_or(0);
        let mut platform = format!("{}/{}", config.os, config.architecture);
        if let Some(v) = &config.variant {
            platform = format!("{platform}/{v}");
        }
        Self {
            name: name.to_string(),
            repository: None,
            manifest,
            created: crate::oci::rfc3339(created),
            platform,
            architecture: config.architecture.clone(),
        }
    }

    /// The same subject with a repository for the purl.
    pub fn with_repository(mut self, repository: impl Into<String>) -> Self {
        self.repository = Some(repository.into());
        self
    }

    /// `pkg:oci/NAME@sha256%3A...?arch=...&repository_url=...`.
    pub fn purl(&self) -> String {
        let name = self.name.rsplit('/').next().unwrap_or(&self.name);
        let mut q = vec![("arch", self.architecture.clone())];
        if let Some(r) = &self.repository {
            q.push(("repository_url", r.clone()));
        }
        let version = self.manifest.digest.to_string();
        purl::build("oci", None, &name.to_ascii_lowercase(), Some(&version), &q)
    }
}

/// SBOM document format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Format {
    /// SPDX 2.3 JSON (the default).
    #[default]
    #[serde(rename = "spdx-json")]
    SpdxJson,
    /// CycloneDX 1.5 JSON.
    #[serde(rename = "cyclonedx-json")]
    CycloneDxJson,
}

impl Format {
    /// Media type of the document (also the artifact type of its OCI artifact).
    pub fn media_type(self) -> &'static str {
        match self {
            Format::SpdxJson => artifact::MEDIA_TYPE_SPDX_JSON,
            Format::CycloneDxJson => artifact::MEDIA_TYPE_CYCLONEDX_JSON,
        }
    }

    /// The format a media type names, if any (cosign's `text/spdx+json` included).
    pub fn from_media_type(mt: &str) -> Option<Self> {
        match mt {
            artifact::MEDIA_TYPE_SPDX_JSON | artifact::MEDIA_TYPE_COSIGN_SPDX_JSON => {
                Some(Format::SpdxJson)
            }
            artifact::MEDIA_TYPE_CYCLONEDX_JSON => Some(Format::CycloneDxJson),
            _ => None,
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::SpdxJson => "spdx-json",
            Format::CycloneDxJson => "cyclonedx-json",
        })
    }
}

impl FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "spdx-json" => Ok(Format::SpdxJson),
            "cyclonedx-json" => Ok(Format::CycloneDxJson),
            other => Err(format!(
                "unknown SBOM format {other:?}: expected spdx-json or cyclonedx-json"
            )),
        }
    }
}

/// An SBOM: the image and its packages, writable in either format.
#[derive(Debug, Clone, PartialEq)]
pub struct Sbom {
    /// The described image.
    pub subject: ImageSubject,
    /// What its filesystem holds.
    pub inventory: Inventory,
}

impl Sbom {
    /// The document in `format`: deterministic bytes for the same image and wpimg version.
    pub fn to_json(&self, format: Format) -> Vec<u8> {
        let doc = match format {
            Format::SpdxJson => spdx::document(self),
            Format::CycloneDxJson => cyclonedx::document(self),
        };
        let mut out = serde_json::to_vec_pretty(&doc).unwrap_or_default();
        out.push(b'\n');
        out
    }
}

/// The creator tool string (`wpimg-0.1.0`).
pub fn tool_name() -> String {
    format!("wpimg-{}", env!("CARGO_PKG_VERSION"))
}

/// A UUID (RFC 4122 layout, version 5 bits) derived from a name: the same name gives the same
/// UUID, so documents about the same image have the same identifiers.
pub fn derived_uuid(namespace: &str, name: &str) -> String {
    let h = Digest::of_bytes(format!("{namespace}\0{name}").as_bytes());
    let mut b = [0u8; 16];
    hex::decode_to_slice(&h.hex()[..32], &mut b).unwrap_or_default();
    b[6] = (b[6] & 0x0f) | 0x50;
    b[8] = (b[8] & 0x3f) | 0x80;
    let x = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &x[..8],
        &x[8..12],
        &x[12..16],
        &x[16..20],
        &x[20..]
    )
}

/// Read an image's manifest and config from the layout.
pub fn read_image(
    layout: &Layout,
    manifest: &Descriptor,
) -> Result<(ImageManifest, ImageConfig), SbomError> {
    let raw = layout.read_blob(&manifest.digest)?;
    let image_err = |source| SbomError::Image {
        digest: manifest.digest.clone(),
        source,
    };
    let m = match Manifest::parse(&raw, Some(&manifest.media_type)).map_err(image_err)? {
        Manifest::Image(m) => m,
        Manifest::Index(_) => {
            return Err(SbomError::NotAnImage {
                digest: manifest.digest.clone(),
            })
        }
    };
    let config =
        ImageConfig::from_slice(&layout.read_blob(&m.config.digest)?).map_err(image_err)?;
    if config.rootfs.diff_ids.len() != m.layers.len() {
        return Err(SbomError::LayerCount {
            digest: manifest.digest.clone(),
            manifest: m.layers.len(),
            config: config.rootfs.diff_ids.len(),
        });
    }
    Ok((m, config))
}

/// Read the package databases of the filesystem that `layers` (base first) make.
pub fn scan_layers(layout: &Layout, layers: &[Descriptor]) -> Result<Inventory, SbomError> {
    let files = rootfs::DbFiles::collect(layout, layers)?;
    inventory(&files)
}

/// Parse the collected database files into an inventory.
pub fn inventory(files: &rootfs::DbFiles) -> Result<Inventory, SbomError> {
    let os = match files.first_of(osrelease::PATHS) {
        Some((_, p)) => Some(OsRelease::parse(&read_file(&p)?)),
        None => None,
    };
    let mut inv = Inventory {
        os,
        ..Inventory::default()
    };
    let ns = |eco: Ecosystem| {
        inv.os
            .as_ref()
            .map(|o| o.id.clone())
            .filter(|id| !id.is_empty())
            .unwrap_or_else(|| eco.default_namespace().to_string())
    };
    let (deb_ns, rpm_ns, apk_ns) = (ns(Ecosystem::Deb), ns(Ecosystem::Rpm), ns(Ecosystem::Apk));
    let mut packages = Vec::new();
    if let Some(p) = files.file(dpkg::STATUS) {
        packages.extend(dpkg::parse_status(&read_file(&p)?, &deb_ns, true));
        inv.databases.push(dpkg::STATUS.to_string());
    }
    for (path, p) in files.children(dpkg::STATUS_D) {
        if path.ends_with(".md5sums") {
            continue;
        }
        packages.extend(dpkg::parse_status(&read_file(&p)?, &deb_ns, false));
        inv.databases.push(path);
    }
    if let Some((path, p)) = files.first_of(rpm::SQLITE_PATHS) {
        packages.extend(rpm::read_sqlite(&path, &p, &rpm_ns)?);
        inv.databases.push(path);
    } else if let Some((path, p)) = files.first_of(rpm::BDB_PATHS) {
        packages.extend(rpm::read_bdb(&path, &p, &rpm_ns)?);
        inv.databases.push(path);
    }
    if let Some(p) = files.file(apk::INSTALLED) {
        packages.extend(apk::parse_installed(&read_file(&p)?, &apk_ns));
        inv.databases.push(apk::INSTALLED.to_string());
    }
    packages.sort();
    packages.dedup_by(|a, b| a.purl == b.purl);
    inv.packages = packages;
    Ok(inv)
}

/// The SBOM of an image stored in the layout, named `name`.
pub fn generate(layout: &Layout, manifest: &Descriptor, name: &str) -> Result<Sbom, SbomError> {
    let (m, config) = read_image(layout, manifest)?;
    let inventory = scan_layers(layout, &m.layers)?;
    Ok(Sbom {
        subject: ImageSubject::new(name, manifest.clone(), &config),
        inventory,
    })
}

fn read_file(path: &Path) -> Result<String, SbomError> {
    let bytes = fs_err::read(path).map_err(|source| SbomError::Io {
        context: "read a collected database file".into(),
        source,
    })?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_uuid_is_stable_and_v5_shaped() {
        let a = derived_uuid("wpimg-spdx", "sha256:00");
        assert_eq!(a, derived_uuid("wpimg-spdx", "sha256:00"));
        assert_ne!(a, derived_uuid("wpimg-cdx", "sha256:00"));
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "5");
        assert!(matches!(&a[19..20], "8" | "9" | "a" | "b"));
    }

    #[test]
    fn format_names_and_media_types() {
        assert_eq!(
            "cyclonedx-json".parse::<Format>().unwrap(),
            Format::CycloneDxJson
        );
        assert!("spdx".parse::<Format>().is_err());
        assert_eq!(Format::SpdxJson.media_type(), "application/spdx+json");
        assert_eq!(
            Format::from_media_type("text/spdx+json"),
            Some(Format::SpdxJson)
        );
    }
}
