//! OCI values: digests, descriptors, media types, image config, manifests and indexes.
//!
//! Everything here is a pure value: no I/O besides hashing readers, deterministic JSON.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{self, Read, Write};
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest as _, Sha256};

/// OCI image manifest media type.
pub const MEDIA_TYPE_OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index media type.
pub const MEDIA_TYPE_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image config media type.
pub const MEDIA_TYPE_OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// OCI gzip layer media type.
pub const MEDIA_TYPE_OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// OCI zstd layer media type.
pub const MEDIA_TYPE_OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
/// OCI uncompressed layer media type.
pub const MEDIA_TYPE_OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
/// Docker schema2 manifest media type.
pub const MEDIA_TYPE_DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list media type.
pub const MEDIA_TYPE_DOCKER_MANIFEST_LIST: &str =
    "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker image config media type.
pub const MEDIA_TYPE_DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
/// Docker gzip layer media type.
pub const MEDIA_TYPE_DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
/// Annotation holding a tag inside an OCI layout index.
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";

/// Errors of OCI values.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    /// A digest string is malformed.
    #[error("invalid digest {0:?}: expected sha256:<64 hex digits>")]
    InvalidDigest(String),
    /// JSON of a manifest/config/index could not be parsed.
    #[error("invalid {what} JSON: {source}")]
    Json {
        /// What was being parsed.
        what: &'static str,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
}

/// A content digest (`sha256:<hex>`).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    hex: String,
}

impl Digest {
    /// Digest of a byte slice.
    pub fn of_bytes(bytes: &[u8]) -> Self {
        Self::from_hasher(Sha256::new_with_prefix(bytes))
    }

    /// Digest from a finished sha256 hasher.
    pub fn from_hasher(h: Sha256) -> Self {
        Self {
            hex: hex::encode(h.finalize()),
        }
    }

    /// Digest and size of everything a reader yields.
    pub fn of_reader(mut r: impl Read) -> io::Result<(Self, u64)> {
        let mut w = HashingWriter::new(io::sink());
        io::copy(&mut r, &mut w)?;
        let (_, d, n) = w.finish();
        Ok((d, n))
    }

    /// The hex part.
    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// Algorithm name (always `sha256`).
    pub fn algorithm(&self) -> &'static str {
        "sha256"
    }

    /// Short form for humans (`sha256:0123456789ab`).
    pub fn short(&self) -> String {
        format!("sha256:{}", &self.hex[..12])
    }
}

impl FromStr for Digest {
    type Err = OciError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hex = s
            .strip_prefix("sha256:")
            .ok_or_else(|| OciError::InvalidDigest(s.to_string()))?;
        if hex.len() != 64
            || !hex
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        {
            return Err(OciError::InvalidDigest(s.to_string()));
        }
        Ok(Self {
            hex: hex.to_string(),
        })
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex)
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A writer that hashes and counts what passes through it.
pub struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    count: u64,
}

impl<W: Write> HashingWriter<W> {
    /// Wrap a writer.
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }

    /// Bytes written so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// The inner writer, the digest and the byte count.
    pub fn finish(self) -> (W, Digest, u64) {
        (self.inner, Digest::from_hasher(self.hasher), self.count)
    }

    /// Mutable access to the inner writer.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Platform of an image (`os`, `architecture`, optional `variant`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    /// Architecture, e.g. `amd64`.
    pub architecture: String,
    /// OS, e.g. `linux`.
    pub os: String,
    /// Variant, e.g. `v8`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    /// OS version (Windows).
    #[serde(
        rename = "os.version",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub os_version: Option<String>,
    /// Any other field, kept as is.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

impl Platform {
    /// Parse `os/arch[/variant]`.
    pub fn parse(s: &str) -> Option<Self> {
        let mut it = s.split('/');
        let os = it.next().filter(|s| !s.is_empty())?;
        let arch = it.next().filter(|s| !s.is_empty())?;
        let variant = it.next().map(str::to_string);
        if it.next().is_some() {
            return None;
        }
        Some(Self {
            architecture: arch.to_string(),
            os: os.to_string(),
            variant,
            os_version: None,
            extra: BTreeMap::new(),
        })
    }

    /// The platform wpimg runs on (linux/<arch of this build>).
    pub fn host() -> Self {
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "arm" => "arm",
            "s390x" => "s390x",
            "powerpc64" => "ppc64le",
            other => other,
        };
        Self::parse(&format!("linux/{arch}")).unwrap_or_else(|| Self {
            architecture: arch.to_string(),
            os: "linux".into(),
            variant: None,
            os_version: None,
            extra: BTreeMap::new(),
        })
    }

    /// Whether an index entry's platform satisfies this wanted platform.
    pub fn matches(&self, other: &Platform) -> bool {
        self.os == other.os
            && self.architecture == other.architecture
            && match (&self.variant, &other.variant) {
                (Some(a), Some(b)) => a == b,
                (Some(a), None) => a == "v8" && self.architecture == "arm64",
                _ => true,
            }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// A content descriptor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// Media type of the referenced content.
    pub media_type: String,
    /// Digest of the content.
    pub digest: Digest,
    /// Size in bytes.
    pub size: u64,
    /// Platform (index entries).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    /// Annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Alternative URLs (foreign layers).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub urls: Vec<String>,
    /// Artifact type of the referenced manifest (OCI 1.1 artifacts such as SBOMs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
}

impl Descriptor {
    /// A descriptor with no platform or annotations.
    pub fn new(media_type: impl Into<String>, digest: Digest, size: u64) -> Self {
        Self {
            media_type: media_type.into(),
            digest,
            size,
            platform: None,
            annotations: BTreeMap::new(),
            urls: Vec::new(),
            artifact_type: None,
        }
    }
}

/// An image manifest (OCI or Docker schema2, same shape).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageManifest {
    /// Always 2.
    pub schema_version: u32,
    /// Media type of this manifest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// The config blob.
    pub config: Descriptor,
    /// The layers, base first.
    pub layers: Vec<Descriptor>,
    /// Annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// An image index / manifest list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageIndex {
    /// Always 2.
    pub schema_version: u32,
    /// Media type of this index.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// Entries.
    #[serde(default)]
    pub manifests: Vec<Descriptor>,
    /// Annotations.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl ImageIndex {
    /// An empty OCI index.
    pub fn empty() -> Self {
        Self {
            schema_version: 2,
            media_type: Some(MEDIA_TYPE_OCI_INDEX.into()),
            manifests: Vec::new(),
            annotations: BTreeMap::new(),
        }
    }

    /// The entry for a wanted platform.
    pub fn select(&self, want: &Platform) -> Option<&Descriptor> {
        self.manifests
            .iter()
            .find(|d| d.platform.as_ref().is_some_and(|p| want.matches(p)))
    }
}

/// A parsed manifest document: an image manifest or an index.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)]
pub enum Manifest {
    /// A single-image manifest.
    Image(ImageManifest),
    /// An index or manifest list.
    Index(ImageIndex),
}

/// Whether a media type is an index/manifest list.
pub fn is_index_media_type(mt: &str) -> bool {
    mt == MEDIA_TYPE_OCI_INDEX || mt == MEDIA_TYPE_DOCKER_MANIFEST_LIST
}

/// Whether a media type is an image manifest.
pub fn is_manifest_media_type(mt: &str) -> bool {
    mt == MEDIA_TYPE_OCI_MANIFEST || mt == MEDIA_TYPE_DOCKER_MANIFEST
}

impl Manifest {
    /// Parse manifest bytes; the media type comes from the document or from `hint`
    /// (a Content-Type header or a descriptor).
    pub fn parse(bytes: &[u8], hint: Option<&str>) -> Result<Self, OciError> {
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Probe {
            media_type: Option<String>,
            manifests: Option<serde_json::Value>,
        }
        let probe: Probe = serde_json::from_slice(bytes).map_err(|source| OciError::Json {
            what: "manifest",
            source,
        })?;
        let mt = probe.media_type.or_else(|| hint.map(str::to_string));
        let is_index = match mt.as_deref() {
            Some(m) if is_index_media_type(m) => true,
            Some(m) if is_manifest_media_type(m) => false,
            _ => probe.manifests.is_some(),
        };
        if is_index {
            serde_json::from_slice(bytes)
                .map(Manifest::Index)
                .map_err(|source| OciError::Json {
                    what: "index",
                    source,
                })
        } else {
            serde_json::from_slice(bytes)
                .map(Manifest::Image)
                .map_err(|source| OciError::Json {
                    what: "manifest",
                    source,
                })
        }
    }
}

/// The runtime part of an image config (`config` in the config JSON).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RuntimeConfig {
    /// User.
    #[serde(rename = "User", default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Exposed ports as `"80/tcp": {}`.
    #[serde(
        rename = "ExposedPorts",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub exposed_ports: Option<BTreeMap<String, serde_json::Value>>,
    /// Environment as `KEY=value`.
    #[serde(rename = "Env", default, skip_serializing_if = "Option::is_none")]
    pub env: Option<Vec<String>>,
    /// Entrypoint.
    #[serde(
        rename = "Entrypoint",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub entrypoint: Option<Vec<String>>,
    /// Cmd.
    #[serde(rename = "Cmd", default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    /// Volumes as `"/path": {}`.
    #[serde(rename = "Volumes", default, skip_serializing_if = "Option::is_none")]
    pub volumes: Option<BTreeMap<String, serde_json::Value>>,
    /// Working directory.
    #[serde(
        rename = "WorkingDir",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub working_dir: Option<String>,
    /// Labels.
    #[serde(rename = "Labels", default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    /// Stop signal.
    #[serde(
        rename = "StopSignal",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub stop_signal: Option<String>,
    /// Other fields (Healthcheck, Shell, ...), kept as they are.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// The `rootfs` of an image config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RootFs {
    /// Always `layers`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Uncompressed layer digests, base first.
    pub diff_ids: Vec<Digest>,
}

/// One history entry.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct History {
    /// RFC 3339 creation time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    /// What created the layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_by: Option<String>,
    /// Author.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub author: Option<String>,
    /// Comment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    /// True when the entry made no layer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub empty_layer: Option<bool>,
}

/// An image config document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageConfig {
    /// Creation time (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    /// Author.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub author: Option<String>,
    /// Architecture.
    pub architecture: String,
    /// OS.
    pub os: String,
    /// Variant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    /// Runtime config.
    #[serde(default)]
    pub config: RuntimeConfig,
    /// Layers.
    pub rootfs: RootFs,
    /// History.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<History>,
    /// Other fields (docker's container_config, ...) are dropped on purpose: they describe the
    /// build container, not the image.
    #[serde(skip)]
    pub _private: (),
}

impl ImageConfig {
    /// Parse config JSON.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, OciError> {
        serde_json::from_slice(bytes).map_err(|source| OciError::Json {
            what: "image config",
            source,
        })
    }
}

/// Serialize a value to the compact deterministic JSON used for blobs.
pub fn to_canonical_json<T: Serialize>(v: &T) -> Vec<u8> {
    // Struct fields serialize in declaration order and maps are BTreeMaps: deterministic.
    serde_json::to_vec(v).unwrap_or_default()
}

/// RFC 3339 (UTC, seconds) for a Unix timestamp.
pub fn rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (h, m, s) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    // Civil-from-days (Howard Hinnant).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if mo <= 2 { y + 1 } else { y };
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{m:02}:{s:02}Z")
}

/// `SOURCE_DATE_EPOCH` if set and valid.
pub fn source_date_epoch() -> Option<i64> {
    std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|v| v.trim().parse::<i64>().ok())
}

/// Now as a Unix timestamp.
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_roundtrip_and_validation() {
        let d = Digest::of_bytes(b"hello");
        assert_eq!(
            d.to_string(),
            "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert_eq!(d.to_string().parse::<Digest>().unwrap(), d);
        assert!("sha256:abc".parse::<Digest>().is_err());
        assert!(
            "md5:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
                .parse::<Digest>()
                .is_err()
        );
        assert!(
            "sha256:2CF24DBA5FB0A30E26E83B2AC5B9E29E1B161E5C1FA7425E73043362938B9824"
                .parse::<Digest>()
                .is_err()
        );
    }

    #[test]
    fn rfc3339_known_values() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn platform_select_from_index() {
        let idx: ImageIndex = serde_json::from_str(
            r#"{"schemaVersion":2,"manifests":[
            {"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:1111111111111111111111111111111111111111111111111111111111111111","size":1,"platform":{"os":"linux","architecture":"arm64","variant":"v8"}},
            {"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:2222222222222222222222222222222222222222222222222222222222222222","size":1,"platform":{"os":"linux","architecture":"amd64"}}]}"#,
        )
        .unwrap();
        let amd = idx
            .select(&Platform::parse("linux/amd64").unwrap())
            .unwrap();
        assert!(amd.digest.hex().starts_with("2222"));
        let arm = idx
            .select(&Platform::parse("linux/arm64").unwrap())
            .unwrap();
        assert!(arm.digest.hex().starts_with("1111"));
        assert!(idx
            .select(&Platform::parse("linux/s390x").unwrap())
            .is_none());
    }

    #[test]
    fn manifest_parse_uses_media_type_or_shape() {
        let m = br#"{"schemaVersion":2,"config":{"mediaType":"a","digest":"sha256:1111111111111111111111111111111111111111111111111111111111111111","size":1},"layers":[]}"#;
        assert!(matches!(
            Manifest::parse(m, None).unwrap(),
            Manifest::Image(_)
        ));
        let i = br#"{"schemaVersion":2,"manifests":[]}"#;
        assert!(matches!(
            Manifest::parse(i, None).unwrap(),
            Manifest::Index(_)
        ));
    }

    #[test]
    fn config_keeps_unknown_runtime_fields() {
        let c = br#"{"architecture":"amd64","os":"linux","config":{"Cmd":["bash"],"Healthcheck":{"Test":["NONE"]}},"rootfs":{"type":"layers","diff_ids":[]},"container_config":{"Cmd":["x"]}}"#;
        let cfg = ImageConfig::from_slice(c).unwrap();
        assert_eq!(cfg.config.cmd.as_deref(), Some(&["bash".to_string()][..]));
        let out = String::from_utf8(to_canonical_json(&cfg)).unwrap();
        assert!(out.contains("Healthcheck"));
        assert!(!out.contains("container_config"));
    }
}
