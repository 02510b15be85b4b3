//! What `wpimg inspect` shows: an image's manifest, config, layers and history, read from a
//! local OCI layout or fetched from a registry (never its layers).

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::{ErrorKind, HasKind};
use crate::events::SharedReporter;
use crate::layout::{Layout, LayoutError};
use crate::oci::{self, Descriptor, Digest, OciError, Platform, Resolved};
use crate::reference::{LayoutRef, Reference, ReferenceError};
use crate::registry::{Client, RegistryError};

/// Errors of `inspect`.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// The reference cannot be parsed.
    #[error(transparent)]
    BadReference(#[from] ReferenceError),
    /// The layout cannot be read, or the reference does not lead to one image there.
    #[error("OCI layout {}", dir.display())]
    Layout {
        /// The layout.
        dir: PathBuf,
        /// The cause.
        #[source]
        source: LayoutError,
    },
    /// Neither in the layout nor a registry reference.
    #[error("{reference}: not in the OCI layout {} (for a registry image use docker://HOST/REPO:TAG or HOST/REPO:TAG)", dir.display())]
    NotFound {
        /// The reference as given.
        reference: String,
        /// The layout searched.
        dir: PathBuf,
    },
    /// The stored manifest or config is not valid JSON.
    #[error("{what} of {reference}")]
    Document {
        /// Which document.
        what: String,
        /// The image.
        reference: String,
        /// The cause.
        #[source]
        source: OciError,
    },
    /// The registry failed.
    #[error("inspect {reference}")]
    Registry {
        /// The image.
        reference: String,
        /// The cause.
        #[source]
        source: Box<RegistryError>,
    },
}

impl HasKind for InspectError {
    fn kind(&self) -> ErrorKind {
        match self {
            InspectError::BadReference(_) => ErrorKind::BadInput,
            InspectError::Registry { source, .. } => source.kind(),
            _ => ErrorKind::Failure,
        }
    }
}

/// Where an image to inspect lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// In a local OCI layout: a `NAME:TAG` ref, or its only image when `None`.
    Layout {
        /// The layout directory.
        dir: PathBuf,
        /// The ref name.
        reference: Option<String>,
    },
    /// In a registry.
    Registry(Reference),
}

/// `NAME` → `NAME:latest` (a `:` in the last path component is a tag).
pub fn with_default_tag(name: &str) -> String {
    let last = name.rsplit('/').next().unwrap_or(name);
    if last.contains(':') || name.contains('@') {
        name.to_string()
    } else {
        format!("{name}:latest")
    }
}

/// Decide where `arg` points: `oci:DIR[:REF]` and `docker://REF` say so; otherwise the
/// default layout if it holds the ref, else a registry when the first component is a
/// registry host (has a `.` or `:`, or is `localhost`).
pub fn resolve_target(arg: &str, default_dir: &Path) -> Result<Target, InspectError> {
    if let Some(l) = LayoutRef::parse(arg) {
        return Ok(Target::Layout {
            dir: l.dir,
            reference: l.reference,
        });
    }
    if let Some(rest) = arg.strip_prefix("docker://") {
        return Ok(Target::Registry(Reference::parse(rest)?));
    }
    let local = with_default_tag(arg);
    if let Ok(layout) = Layout::open(default_dir) {
        if layout.resolve(&local).is_ok() {
            return Ok(Target::Layout {
                dir: default_dir.to_path_buf(),
                reference: Some(local),
            });
        }
    }
    match arg.split_once('/') {
        Some((first, _)) if first.contains('.') || first.contains(':') || first == "localhost" => {
            Ok(Target::Registry(Reference::parse(arg)?))
        }
        _ => Err(InspectError::NotFound {
            reference: arg.to_string(),
            dir: default_dir.to_path_buf(),
        }),
    }
}

/// One layer of an image.
#[derive(Debug, Clone, Serialize)]
pub struct LayerView {
    /// Digest of the blob.
    pub digest: Digest,
    /// Size of the blob in bytes.
    pub size: u64,
    /// Media type.
    pub media_type: String,
}

/// One image of an index.
#[derive(Debug, Clone, Serialize)]
pub struct PlatformView {
    /// `os/arch[/variant]`.
    pub platform: String,
    /// Its manifest digest.
    pub digest: Digest,
    /// Its manifest's size.
    pub size: u64,
    /// Its manifest's media type.
    pub media_type: String,
}

/// Everything `inspect` reports about an image.
#[derive(Debug, Clone, Serialize)]
pub struct ImageView {
    /// The reference as resolved (`NAME:TAG`, or `HOST/REPO:TAG`).
    pub reference: String,
    /// `layout` or `registry`.
    pub source: String,
    /// Where: the layout directory or the registry host.
    pub location: String,
    /// Digest of the image manifest.
    pub digest: Digest,
    /// Media type of the image manifest.
    pub media_type: String,
    /// Digest of the index the manifest was selected from, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index_digest: Option<Digest>,
    /// The index's images, one per platform (empty when the reference names one image).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub platforms: Vec<PlatformView>,
    /// `os/arch[/variant]` of the image.
    pub platform: String,
    /// The config blob's descriptor.
    pub config_descriptor: Descriptor,
    /// Layers, base first.
    pub layers: Vec<LayerView>,
    /// Sum of the layer sizes.
    pub total_size: u64,
    /// The config as stored.
    pub config: serde_json::Value,
    /// The config's history entries.
    pub history: Vec<serde_json::Value>,
    /// The manifest as stored.
    pub manifest: serde_json::Value,
}

fn json_doc(
    bytes: &[u8],
    reference: &str,
    what: &'static str,
) -> Result<serde_json::Value, InspectError> {
    serde_json::from_slice(bytes).map_err(|source| InspectError::Document {
        what: what.to_string(),
        reference: reference.to_string(),
        source: OciError::Json { what, source },
    })
}

/// Where an inspected image was found.
struct Found {
    /// The reference as resolved.
    reference: String,
    /// `layout` or `registry`.
    source: &'static str,
    /// The layout directory or the registry host.
    location: String,
}

impl Found {
    fn view(self, resolved: &Resolved) -> Result<ImageView, InspectError> {
        let image = &resolved.image;
        let layers: Vec<LayerView> = image
            .manifest
            .layers
            .iter()
            .map(|l| LayerView {
                digest: l.digest.clone(),
                size: l.size,
                media_type: l.media_type.clone(),
            })
            .collect();
        let config = json_doc(&image.raw_config, &self.reference, "config")?;
        let history = config
            .get("history")
            .and_then(|h| h.as_array())
            .cloned()
            .unwrap_or_default();
        Ok(ImageView {
            media_type: image
                .manifest
                .media_type
                .clone()
                .unwrap_or_else(|| image.descriptor.media_type.clone()),
            manifest: json_doc(&image.raw_manifest, &self.reference, "manifest")?,
            reference: self.reference,
            source: self.source.to_string(),
            location: self.location,
            digest: image.descriptor.digest.clone(),
            index_digest: resolved.index.as_ref().map(|i| i.descriptor.digest.clone()),
            platforms: resolved
                .index
                .iter()
                .flat_map(|i| &i.index.manifests)
                .map(|d| PlatformView {
                    platform: d
                        .platform
                        .as_ref()
                        .map(|p| p.to_string())
                        .unwrap_or_default(),
                    digest: d.digest.clone(),
                    size: d.size,
                    media_type: d.media_type.clone(),
                })
                .collect(),
            platform: image.platform().to_string(),
            config_descriptor: image.manifest.config.clone(),
            total_size: layers.iter().map(|l| l.size).sum(),
            layers,
            config,
            history,
        })
    }
}

/// Inspect an image of a local layout (`reference` `None`: its only image), selecting
/// `platform` when the ref names an index.
pub async fn from_layout(
    dir: &Path,
    reference: Option<&str>,
    platform: &Platform,
) -> Result<ImageView, InspectError> {
    let layout_err = |source| InspectError::Layout {
        dir: dir.to_path_buf(),
        source,
    };
    let layout = Layout::open(dir).map_err(layout_err)?;
    let (name, top) = match reference {
        // A manifest of the layout by digest (an index's platform image).
        Some(r) if r.parse::<Digest>().is_ok() => (r.to_string(), r.to_string()),
        Some(r) => {
            let r = with_default_tag(r);
            if let Err(LayoutError::RefNotFound { .. }) = layout.resolve(&r) {
                return Err(InspectError::NotFound {
                    reference: r,
                    dir: dir.to_path_buf(),
                });
            }
            (r.clone(), r)
        }
        None => {
            let images = layout.images().map_err(layout_err)?;
            match images.as_slice() {
                [one] => (
                    one.annotations
                        .get(crate::oci::ANNOTATION_REF_NAME)
                        .cloned()
                        .unwrap_or_else(|| one.digest.to_string()),
                    one.digest.to_string(),
                ),
                _ => {
                    return Err(InspectError::NotFound {
                        reference: format!(
                            "oci:{} ({} images: name one with oci:DIR:NAME:TAG)",
                            dir.display(),
                            images.len()
                        ),
                        dir: dir.to_path_buf(),
                    })
                }
            }
        }
    };
    let resolved = oci::resolve(&layout, &top, None, platform)
        .await
        .map_err(layout_err)?;
    let found = Found {
        reference: name,
        source: "layout",
        location: dir.display().to_string(),
    };
    found.view(&resolved)
}

/// Inspect an image in a registry: manifest (the `platform` entry of an index) and config,
/// verified against their digests; layers are listed, not fetched.
pub async fn from_registry(
    client: &Client,
    reference: &Reference,
    platform: &Platform,
    reporter: &SharedReporter,
) -> Result<ImageView, InspectError> {
    let resolved = client
        .fetch_image(reference, platform, reporter)
        .await
        .map_err(|source| InspectError::Registry {
            reference: reference.to_string(),
            source: Box::new(source),
        })?;
    let found = Found {
        reference: reference.to_string(),
        source: "registry",
        location: reference.registry.clone(),
    };
    found.view(&resolved)
}

/// `1.2 MB`-style sizes (decimal units).
pub fn human_bytes(n: u64) -> String {
    let f = n as f64;
    if f >= 1e9 {
        format!("{:.2} GB", f / 1e9)
    } else if f >= 1e6 {
        format!("{:.1} MB", f / 1e6)
    } else if f >= 1e3 {
        format!("{:.1} kB", f / 1e3)
    } else {
        format!("{n} B")
    }
}

fn short_media_type(mt: &str) -> &str {
    mt.rsplit(['.', '/']).next().unwrap_or(mt)
}

fn clip(s: &str, max: usize) -> String {
    let s = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if s.chars().count() <= max {
        s
    } else {
        let mut t: String = s.chars().take(max.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

fn json_list(v: Option<&serde_json::Value>) -> Option<String> {
    let a = v?.as_array()?;
    Some(serde_json::to_string(a).unwrap_or_default())
}

fn keys(v: Option<&serde_json::Value>) -> Option<String> {
    let o = v?.as_object()?;
    (!o.is_empty()).then(|| o.keys().cloned().collect::<Vec<_>>().join(", "))
}

/// A one-screen human view. Environment variables are shown by name only (values may be
/// secrets); `--json` has the config as stored.
pub fn render_human(v: &ImageView) -> String {
    let mut out = String::new();
    let mut line = |k: &str, val: &str| out.push_str(&format!("{k:<11} {val}\n"));
    line(
        "image",
        &format!("{} ({} {})", v.reference, v.source, v.location),
    );
    line("digest", &v.digest.to_string());
    line("media type", &v.media_type);
    if let Some(i) = &v.index_digest {
        line("index", &i.to_string());
    }
    line("platform", &v.platform);
    for (i, p) in v.platforms.iter().enumerate() {
        let shown = if p.digest == v.digest { " (shown)" } else { "" };
        let label = if i == 0 { "platforms" } else { "" };
        line(label, &format!("{:<14} {}{shown}", p.platform, p.digest));
    }
    if let Some(c) = v.config.get("created").and_then(|c| c.as_str()) {
        line("created", c);
    }
    line(
        "size",
        &format!("{} in {} layers", human_bytes(v.total_size), v.layers.len()),
    );
    let rc = v.config.get("config");
    let get = |k: &str| rc.and_then(|c| c.get(k));
    if let Some(u) = get("User")
        .and_then(|u| u.as_str())
        .filter(|u| !u.is_empty())
    {
        line("user", u);
    }
    if let Some(e) = json_list(get("Entrypoint")) {
        line("entrypoint", &e);
    }
    if let Some(c) = json_list(get("Cmd")) {
        line("cmd", &c);
    }
    if let Some(w) = get("WorkingDir")
        .and_then(|w| w.as_str())
        .filter(|w| !w.is_empty())
    {
        line("workdir", w);
    }
    if let Some(env) = get("Env").and_then(|e| e.as_array()) {
        let names: Vec<&str> = env
            .iter()
            .filter_map(|e| e.as_str())
            .map(|e| e.split_once('=').map(|(k, _)| k).unwrap_or(e))
            .collect();
        line("env keys", &names.join(", "));
    }
    if let Some(p) = keys(get("ExposedPorts")) {
        line("ports", &p);
    }
    if let Some(p) = keys(get("Volumes")) {
        line("volumes", &p);
    }
    if let Some(l) = keys(get("Labels")) {
        line("labels", &clip(&l, 100));
    }
    out.push_str("\nLAYERS\n");
    for (i, l) in v.layers.iter().enumerate() {
        out.push_str(&format!(
            "{:>3}  {}  {:>10}  {}\n",
            i + 1,
            l.digest.short(),
            human_bytes(l.size),
            short_media_type(&l.media_type)
        ));
    }
    if !v.history.is_empty() {
        out.push_str("\nHISTORY\n");
        for h in &v.history {
            let created = h.get("created").and_then(|c| c.as_str()).unwrap_or("-");
            let by = h
                .get("created_by")
                .or_else(|| h.get("comment"))
                .and_then(|c| c.as_str())
                .unwrap_or("");
            let empty = if h.get("empty_layer").and_then(|e| e.as_bool()) == Some(true) {
                " (no layer)"
            } else {
                ""
            };
            out.push_str(&format!(
                "  {:<20}  {}{}\n",
                created.get(..19).unwrap_or(created),
                clip(by, 90),
                empty
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        assert_eq!(
            resolve_target("oci:/x:app:v1", dir).unwrap(),
            Target::Layout {
                dir: "/x".into(),
                reference: Some("app:v1".into())
            }
        );
        assert_eq!(
            resolve_target("oci:/x", dir).unwrap(),
            Target::Layout {
                dir: "/x".into(),
                reference: None
            }
        );
        let r = resolve_target("docker://127.0.0.1:5000/a/b:t", dir).unwrap();
        assert_eq!(
            r,
            Target::Registry(Reference::parse("127.0.0.1:5000/a/b:t").unwrap())
        );
        let r = resolve_target("ghcr.io/o/app", dir).unwrap();
        assert!(matches!(r, Target::Registry(_)));
        let e = resolve_target("app:v1", dir).unwrap_err().to_string();
        assert!(e.contains("app:v1: not in the OCI layout"), "{e}");

        // A ref in the layout wins over the registry reading.
        let layout = Layout::open_or_create(dir).unwrap();
        let (dg, n) = layout.write_blob(b"{}").unwrap();
        let desc = Descriptor::new(crate::oci::MEDIA_TYPE_OCI_MANIFEST, dg, n);
        layout.tag("localhost/app:latest", &desc).unwrap();
        assert_eq!(
            resolve_target("localhost/app", dir).unwrap(),
            Target::Layout {
                dir: dir.to_path_buf(),
                reference: Some("localhost/app:latest".into())
            }
        );
        assert_eq!(
            with_default_tag("127.0.0.1:5000/app"),
            "127.0.0.1:5000/app:latest"
        );
    }

    #[test]
    fn human_view_hides_env_values() {
        let config = serde_json::json!({
            "architecture": "amd64", "os": "linux", "created": "2024-01-02T03:04:05Z",
            "config": {"Env": ["PATH=/bin", "DB_PASSWORD=hunter2"], "Cmd": ["/bin/app"],
                       "User": "1234", "ExposedPorts": {"8080/tcp": {}}},
            "rootfs": {"type": "layers", "diff_ids": []},
            "history": [{"created": "2024-01-02T03:04:05Z", "created_by": "wpimg build"}],
        });
        let raw_config = serde_json::to_vec(&config).unwrap();
        let cd = Descriptor::new(
            crate::oci::MEDIA_TYPE_OCI_CONFIG,
            Digest::of_bytes(&raw_config),
            raw_config.len() as u64,
        );
        let l = Descriptor::new(
            crate::oci::MEDIA_TYPE_OCI_LAYER_GZIP,
            Digest::of_bytes(b"l"),
            1_500_000,
        );
        let manifest = serde_json::json!({
            "schemaVersion": 2, "mediaType": crate::oci::MEDIA_TYPE_OCI_MANIFEST,
            "config": cd, "layers": [l],
        });
        let raw = serde_json::to_vec(&manifest).unwrap();
        let md = Descriptor::new(
            crate::oci::MEDIA_TYPE_OCI_MANIFEST,
            Digest::of_bytes(&raw),
            raw.len() as u64,
        );
        let image = crate::oci::Image::from_raw(md, raw, raw_config).unwrap();
        let found = Found {
            reference: "app:v1".into(),
            source: "layout",
            location: "/l".into(),
        };
        let v = found.view(&Resolved { index: None, image }).unwrap();
        assert_eq!(v.total_size, 1_500_000);
        let text = render_human(&v);
        assert!(text.contains("env keys    PATH, DB_PASSWORD"), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("1.5 MB"), "{text}");
        assert!(text.contains("wpimg build"), "{text}");
        assert!(text.contains("8080/tcp"), "{text}");
        // JSON keeps the config as stored.
        assert!(serde_json::to_string(&v).unwrap().contains("hunter2"));
    }
}
