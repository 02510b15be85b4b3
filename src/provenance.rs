//! The build manifest file (`--manifest FILE`, like Packer's manifest post-processor): what was
//! built and pushed, from which git revision, as a stable JSON document.

use std::path::Path;

use serde::Serialize;

use crate::build::{BuildReport, CacheOutcome, LayerReport, StageTime, StepReport};
use crate::oci::{Descriptor, Digest};
use crate::outputs::Outputs;
use crate::publish::PushOutcome;

/// One pushed destination.
#[derive(Debug, Clone, Serialize)]
pub struct Pushed {
    /// `HOST/REPO@sha256:...`.
    pub image_uri: String,
    /// `HOST/REPO` (a registry push: the repository path).
    pub repository: String,
    /// The tags pushed.
    pub tags: Vec<String>,
}

/// The build manifest document. Fields a command does not know are `null`.
#[derive(Debug, Clone, Serialize)]
pub struct BuildManifest {
    /// wpimg's version.
    pub wpimg_version: &'static str,
    /// `build` or `push`.
    pub command: &'static str,
    /// `git rev-parse HEAD` of image.yaml's work tree, if it is in one.
    pub git_revision: Option<String>,
    /// Image name.
    pub name: Option<String>,
    /// `NAME:TAG` in the layout.
    pub reference: Option<String>,
    /// Base reference as written.
    pub base: Option<String>,
    /// Base manifest digest.
    pub base_digest: Option<Digest>,
    /// The image's manifest digest.
    pub manifest_digest: Digest,
    /// The image's config digest.
    pub config_digest: Option<Digest>,
    /// Layers, base first.
    pub layers: Option<Vec<LayerReport>>,
    /// Total compressed size.
    pub total_size: Option<u64>,
    /// Cache outcome: `hit`, `miss` or `partial`.
    pub cache: Option<CacheOutcome>,
    /// What each step did (name, cache, layer, seconds).
    pub steps: Option<Vec<StepReport>>,
    /// Stage timings of the build.
    pub stages: Option<Vec<StageTime>>,
    /// Where the image was pushed.
    pub pushed: Vec<Pushed>,
    /// The index digest of a multi-platform image (`manifest_digest` is then the index's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index_digest: Option<Digest>,
    /// Each platform's image of a multi-platform image.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub platforms: Vec<PlatformImage>,
    /// The provisioning outputs (`set_stats`) the build resolved image.yaml's
    /// `${outputs.NAME}` with (an index: the first platform's; each platform's in `platforms`).
    pub outputs: Option<Outputs>,
}

/// One platform's image of an index.
#[derive(Debug, Clone, Serialize)]
pub struct PlatformImage {
    /// `os/arch[/variant]`.
    pub platform: String,
    /// Its manifest digest.
    pub manifest_digest: Digest,
    /// Its config digest (a build knows it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config_digest: Option<Digest>,
    /// The base's manifest for the platform (a build knows it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base_digest: Option<Digest>,
    /// Its layers, base first (a build knows them).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layers: Option<Vec<LayerReport>>,
    /// Its provisioning outputs (a build knows them).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outputs: Option<Outputs>,
}

impl PlatformImage {
    /// An index entry as pushed.
    fn of_entry(d: &Descriptor) -> Self {
        Self {
            platform: d
                .platform
                .as_ref()
                .map(|p| p.to_string())
                .unwrap_or_default(),
            manifest_digest: d.digest.clone(),
            config_digest: None,
            base_digest: None,
            layers: None,
            outputs: None,
        }
    }
}

impl BuildManifest {
    /// The document of a build (and its push, with `--push`).
    pub fn of_build(
        report: &BuildReport,
        pushed: Option<&PushOutcome>,
        git_revision: Option<String>,
    ) -> Self {
        Self {
            wpimg_version: env!("CARGO_PKG_VERSION"),
            command: "build",
            git_revision,
            name: Some(report.name.clone()),
            reference: Some(report.reference.clone()),
            base: Some(report.base.clone()),
            base_digest: Some(report.base_digest.clone()),
            manifest_digest: report.manifest.digest.clone(),
            config_digest: Some(report.config_digest.clone()),
            layers: Some(report.layers.clone()),
            total_size: Some(report.total_size),
            cache: Some(report.cache),
            steps: Some(report.steps.clone()),
            stages: Some(report.stages.clone()),
            pushed: pushed.map(Pushed::of).into_iter().collect(),
            index_digest: report.index_digest.clone(),
            platforms: report
                .platforms
                .iter()
                .map(|p| PlatformImage {
                    platform: p.platform.clone(),
                    manifest_digest: p.manifest.digest.clone(),
                    config_digest: Some(p.config_digest.clone()),
                    base_digest: Some(p.base_digest.clone()),
                    layers: Some(p.layers.clone()),
                    outputs: Some(p.outputs.clone()),
                })
                .collect(),
            outputs: Some(report.outputs.clone()),
        }
    }

    /// The document of a push.
    pub fn of_push(pushed: &PushOutcome, git_revision: Option<String>) -> Self {
        Self {
            wpimg_version: env!("CARGO_PKG_VERSION"),
            command: "push",
            git_revision,
            name: None,
            reference: None,
            base: None,
            base_digest: None,
            manifest_digest: pushed.digest.clone(),
            config_digest: None,
            layers: None,
            total_size: None,
            cache: None,
            steps: None,
            stages: None,
            pushed: vec![Pushed::of(pushed)],
            index_digest: (!pushed.platforms.is_empty()).then(|| pushed.digest.clone()),
            platforms: pushed
                .platforms
                .iter()
                .map(PlatformImage::of_entry)
                .collect(),
            outputs: None,
        }
    }

    /// Write the document to `path` (atomically).
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        crate::layout::write_atomic(path, &bytes)
    }
}

impl Pushed {
    fn of(p: &PushOutcome) -> Self {
        Self {
            image_uri: p.image_uri.clone(),
            repository: p.repository.clone(),
            tags: p.tags.clone(),
        }
    }
}

/// `git rev-parse HEAD` in `dir`, when it is in a git work tree.
pub fn git_revision(dir: &Path) -> Option<String> {
    std::process::Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["rev-parse", "HEAD"])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::{LayerSource, StageTime, StepReport};
    use crate::oci::Descriptor;
    use crate::publish::PushDetails;
    use crate::registry::PushReport;

    fn d(s: &str) -> Digest {
        Digest::of_bytes(s.as_bytes())
    }

    #[test]
    fn manifest_file_shape() {
        let manifest = Descriptor::new(crate::oci::MEDIA_TYPE_OCI_MANIFEST, d("m"), 1);
        let build = BuildReport {
            name: "app".into(),
            reference: "app:latest".into(),
            oci_dir: "/l".into(),
            base: "b".into(),
            base_digest: d("b"),
            manifest: manifest.clone(),
            config_digest: d("c"),
            layers: vec![LayerReport {
                digest: d("l"),
                size: 1,
                media_type: "x".into(),
                new: true,
            }],
            diff_id: d("t"),
            layer_uncompressed_size: 2,
            layer_path: LayerSource::Upperdir,
            cache: CacheOutcome::Miss,
            cache_key: "k".into(),
            total_size: 1,
            stages: vec![StageTime {
                stage: "pull".into(),
                seconds: 1.0,
            }],
            container: "c".into(),
            loaded: None,
            sbom: None,
            steps: vec![StepReport {
                name: "os".into(),
                cache: CacheOutcome::Miss,
                layer: d("l"),
                seconds: 1.5,
            }],
            squashed: false,
            index_digest: None,
            platforms: vec![],
            outputs: Outputs::from([("wordpress_version".to_string(), "6.1.9".to_string())]),
        };
        let pushed = PushOutcome {
            image_uri: format!("r/app@{}", d("m")),
            digest: d("m"),
            repository: "r/app".into(),
            tags: vec!["latest".into()],
            seconds: 1.0,
            platforms: vec![],
            details: PushDetails::Registry(PushReport {
                registry: "r".into(),
                repository: "app".into(),
                manifest,
                tags: vec!["latest".into()],
                blobs: vec![],
                manifests_put: 1,
                bytes_uploaded: 0,
                requests: 1,
                seconds: 1.0,
            }),
            attachments: None,
        };
        let doc = serde_json::to_value(BuildManifest::of_build(
            &build,
            Some(&pushed),
            Some("abc".into()),
        ))
        .unwrap();
        let keys: Vec<&str> = doc
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            keys,
            [
                "wpimg_version",
                "command",
                "git_revision",
                "name",
                "reference",
                "base",
                "base_digest",
                "manifest_digest",
                "config_digest",
                "layers",
                "total_size",
                "cache",
                "steps",
                "stages",
                "pushed",
                "outputs"
            ]
        );
        assert_eq!(doc["outputs"]["wordpress_version"], "6.1.9");
        assert_eq!(doc["manifest_digest"], d("m").to_string());
        assert_eq!(doc["pushed"][0]["image_uri"], format!("r/app@{}", d("m")));
        assert_eq!(doc["git_revision"], "abc");
        assert_eq!(doc["cache"], "miss");
        assert_eq!(
            doc["steps"],
            serde_json::json!([{"name": "os", "cache": "miss", "layer": d("l").to_string(), "seconds": 1.5}])
        );
        let doc = serde_json::to_value(BuildManifest::of_push(&pushed, None)).unwrap();
        assert_eq!(doc["manifest_digest"], d("m").to_string());
        assert_eq!(doc["pushed"][0]["tags"][0], "latest");
        assert_eq!(doc["name"], serde_json::Value::Null);
    }
}
