//! What a build reports: stage timings, layers, the cache outcome (the `--json` result).

use std::path::PathBuf;

use serde::Serialize;

use crate::oci::{Descriptor, Digest};
use crate::outputs::Outputs;

/// Wall time of one stage.
#[derive(Debug, Clone, Serialize)]
pub struct StageTime {
    /// Stage name.
    pub stage: String,
    /// Seconds.
    pub seconds: f64,
}

/// Whether a step's layer came from the build cache (for a build: all, none, or some).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheOutcome {
    /// Reused from the cache (local or `--cache-repo`).
    Hit,
    /// Produced by running the step.
    Miss,
    /// A build: some steps hit, some missed.
    Partial,
}

impl CacheOutcome {
    /// A build's outcome from its steps'.
    pub fn of(steps: &[super::StepOutcome]) -> Self {
        let hits = steps
            .iter()
            .filter(|s| s.cache == CacheOutcome::Hit)
            .count();
        match hits {
            n if n == steps.len() => CacheOutcome::Hit,
            0 => CacheOutcome::Miss,
            _ => CacheOutcome::Partial,
        }
    }

    /// The outcome of several builds (an index's platforms) from theirs.
    pub fn combined(outcomes: impl IntoIterator<Item = CacheOutcome>) -> Self {
        outcomes
            .into_iter()
            .reduce(|a, b| if a == b { a } else { CacheOutcome::Partial })
            .unwrap_or(CacheOutcome::Miss)
    }
}

impl std::fmt::Display for CacheOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CacheOutcome::Hit => "hit",
            CacheOutcome::Miss => "miss",
            CacheOutcome::Partial => "partial",
        })
    }
}

/// What one step did (the result's `steps` list and the build manifest's).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepReport {
    /// The step's name.
    pub name: String,
    /// `hit` or `miss`.
    pub cache: CacheOutcome,
    /// The step's layer (compressed digest).
    pub layer: Digest,
    /// Wall time of the step in seconds.
    pub seconds: f64,
}

impl StepReport {
    /// The report of a step's outcome.
    pub fn of(o: &super::StepOutcome) -> Self {
        Self {
            name: o.name.clone(),
            cache: o.cache,
            layer: o.layer.digest.clone(),
            seconds: (o.seconds * 1000.0).round() / 1000.0,
        }
    }
}

/// Where a step's layer was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LayerSource {
    /// The container's overlayfs upper directory.
    Upperdir,
    /// The Engine API (`commit` + `save`).
    Api,
    /// The build cache.
    Cache,
}

impl std::fmt::Display for LayerSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LayerSource::Upperdir => "upperdir",
            LayerSource::Api => "api",
            LayerSource::Cache => "cache",
        })
    }
}

/// One layer of the result.
#[derive(Debug, Clone, Serialize)]
pub struct LayerReport {
    /// Compressed digest.
    pub digest: Digest,
    /// Compressed size.
    pub size: u64,
    /// Media type.
    pub media_type: String,
    /// Whether this build produced it.
    pub new: bool,
}

/// The outcome of a build.
#[derive(Debug, Clone, Serialize)]
pub struct BuildReport {
    /// Image name.
    pub name: String,
    /// `NAME:TAG` in the local layout.
    pub reference: String,
    /// The layout directory.
    pub oci_dir: PathBuf,
    /// Base reference as written.
    pub base: String,
    /// Base manifest digest (the platform manifest).
    pub base_digest: Digest,
    /// Result manifest descriptor.
    pub manifest: Descriptor,
    /// Result config digest.
    pub config_digest: Digest,
    /// Layers, base first.
    pub layers: Vec<LayerReport>,
    /// The new layer's uncompressed digest.
    pub diff_id: Digest,
    /// The new layer's uncompressed size.
    pub layer_uncompressed_size: u64,
    /// How the layer was read.
    pub layer_path: LayerSource,
    /// Cache outcome: `hit` (every step), `miss` (none) or `partial`.
    pub cache: CacheOutcome,
    /// The cache key.
    pub cache_key: String,
    /// Total compressed size of all layers.
    pub total_size: u64,
    /// Stage timings.
    pub stages: Vec<StageTime>,
    /// Build container name (empty on a cache hit).
    pub container: String,
    /// `NAME:TAG` loaded into Docker, with `--load`.
    pub loaded: Option<String>,
    /// The SBOM stored in the layout (absent with `sbom: false`).
    pub sbom: Option<SbomReport>,
    /// What each step did, in order.
    pub steps: Vec<StepReport>,
    /// Whether the steps' layers were squashed into one (`layer.squash`).
    pub squashed: bool,
    /// A multi-platform build's index digest (`manifest` is then the index; the image fields
    /// above are the first platform's, each platform's are in `platforms`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index_digest: Option<Digest>,
    /// A multi-platform build's images, in `platforms:` order (empty for one image).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub platforms: Vec<PlatformReport>,
    /// The provisioning outputs (`set_stats` of every step, merged in step order; an index:
    /// the first platform's, each platform's are in `platforms`).
    pub outputs: Outputs,
}

/// The SBOM of a built image, stored in the layout.
#[derive(Debug, Clone, Serialize)]
pub struct SbomReport {
    /// The artifact manifest (its `subject` is the image manifest).
    pub artifact: Descriptor,
    /// The image manifest it describes.
    pub subject: Digest,
    /// The document's format.
    pub format: crate::sbom::Format,
    /// Packages listed.
    pub packages: usize,
}

/// One platform's image of a multi-platform build.
#[derive(Debug, Clone, Serialize)]
pub struct PlatformReport {
    /// `os/arch[/variant]`.
    pub platform: String,
    /// The engine it was built on (`unix:///var/run/docker.sock`, `tcp://HOST:PORT`).
    pub engine: String,
    /// Its manifest descriptor (with its platform), as listed in the index.
    pub manifest: Descriptor,
    /// Its config digest.
    pub config_digest: Digest,
    /// The base's manifest for this platform.
    pub base_digest: Digest,
    /// Layers, base first.
    pub layers: Vec<LayerReport>,
    /// Total compressed size of its layers.
    pub total_size: u64,
    /// Its new layer's uncompressed digest.
    pub diff_id: Digest,
    /// How its new layer was read.
    pub layer_path: LayerSource,
    /// Cache outcome.
    pub cache: CacheOutcome,
    /// Its cache key.
    pub cache_key: String,
    /// Its build container (empty on a cache hit).
    pub container: String,
    /// Its stage timings.
    pub stages: Vec<StageTime>,
    /// What each of its steps did.
    pub steps: Vec<StepReport>,
    /// Its SBOM, stored in the layout.
    pub sbom: Option<SbomReport>,
    /// Wall time of its build, in seconds.
    pub seconds: f64,
    /// Its provisioning outputs.
    pub outputs: Outputs,
}

impl PlatformReport {
    /// The platform's part of the report of its build (`report` made on its own context).
    pub fn of(report: BuildReport, platform: String, engine: String, seconds: f64) -> Self {
        Self {
            platform,
            engine,
            manifest: report.manifest,
            config_digest: report.config_digest,
            base_digest: report.base_digest,
            layers: report.layers,
            total_size: report.total_size,
            diff_id: report.diff_id,
            layer_path: report.layer_path,
            cache: report.cache,
            cache_key: report.cache_key,
            container: report.container,
            stages: report.stages,
            steps: report.steps,
            sbom: report.sbom,
            seconds,
            outputs: report.outputs,
        }
    }
}
