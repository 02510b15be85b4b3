//! The build: pull the base → for each step (cache, or load → provision → layer) → assemble →
//! tag (→ load). One platform's path is [`build_platform`]; tagging and loading come after it.
//!
//! Returns a [`BuildReport`]; never prints (progress goes through the reporter).

mod assemble;
mod cache;
mod container;
mod context;
pub mod docker_archive;
mod extract;
mod report;
mod stage;
mod step;
#[cfg(test)]
mod tests;

pub use assemble::{apply, assemble};
pub use cache::{key as cache_key, Cache, CacheEntry};
pub use container::{BuildContainer, IMAGE_LABEL};
pub use context::{BuildContext, BuildOptions, LayerUpload};
pub use extract::{Extraction, LayerPath};
pub use report::{BuildReport, CacheOutcome, LayerReport, LayerSource, StageTime};
pub use stage::{StageTimer, Stages};
pub use step::{Step, StepOutcome, StepRun};

use std::path::{Path, PathBuf};

use crate::error::{ErrorKind, HasKind};
use crate::oci::{Image, OciError, Platform};
use crate::provision::ProvisionError;
use crate::reference::Reference;
use crate::registry::{PulledImage, RegistryError};
use crate::runtime::{EngineInfo, RuntimeError};

/// Errors of a build.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The base reference is invalid.
    #[error("base image {reference:?}: {message}")]
    BadReference {
        /// The reference.
        reference: String,
        /// Why.
        message: String,
    },
    /// Pulling the base failed.
    #[error("pull base image {reference}")]
    Pull {
        /// The reference.
        reference: String,
        /// The cause.
        #[source]
        source: Box<RegistryError>,
    },
    /// The container engine failed.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// Provisioning failed.
    #[error("provisioning failed{}", kept.as_ref().map(|k| format!(" (container {k} kept for debugging: docker exec -it {k} /bin/sh; remove it with docker rm -f {k})")).unwrap_or_default())]
    Provision {
        /// The cause.
        #[source]
        source: ProvisionError,
        /// The container kept with `--keep-on-error`.
        kept: Option<String>,
    },
    /// What `provision.accelerator` needs is missing.
    #[error(transparent)]
    Accelerator(#[from] crate::provision::AcceleratorError),
    /// Producing the layer failed.
    #[error("producing the layer")]
    Layer(#[from] crate::layer::LayerError),
    /// `--layer-path upperdir` with an engine whose upper directory cannot be read.
    #[error("--layer-path upperdir needs a local Docker engine with the overlay2 storage driver and a readable upper directory; this is a {engine} (use --layer-path auto or api)")]
    LayerPathUnavailable {
        /// What the engine is.
        engine: String,
    },
    /// The local layout failed.
    #[error("OCI layout")]
    Layout(#[from] crate::layout::LayoutError),
    /// Reading or writing a docker archive failed.
    #[error(transparent)]
    Archive(#[from] docker_archive::ArchiveError),
    /// The base image cannot be built on.
    #[error("base image {reference}")]
    Base {
        /// The reference.
        reference: String,
        /// Why.
        #[source]
        source: OciError,
    },
    /// Interrupted by a signal.
    #[error("interrupted; build container removed")]
    Interrupted,
    /// A worker thread failed.
    #[error("a worker thread failed")]
    Task(#[from] tokio::task::JoinError),
    /// Local I/O.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl HasKind for BuildError {
    fn kind(&self) -> ErrorKind {
        match self {
            BuildError::BadReference { .. } | BuildError::LayerPathUnavailable { .. } => {
                ErrorKind::BadInput
            }
            BuildError::Interrupted => ErrorKind::Interrupted,
            BuildError::Pull { source, .. } => source.kind(),
            BuildError::Accelerator(source) => source.kind(),
            _ => ErrorKind::Failure,
        }
    }
}

/// One platform's image: its base, the steps' outcomes and the assembled result (stored in the
/// layout, not tagged).
#[derive(Debug, Clone)]
pub struct PlatformBuild {
    /// The pulled base.
    pub base: PulledImage,
    /// What each step did.
    pub steps: Vec<StepOutcome>,
    /// The result.
    pub image: Image,
}

/// Run a whole build: the image for the spec's platform, tagged `NAME:TAG` in the layout, and
/// loaded into the engine with `--load`.
pub async fn build(ctx: &BuildContext<'_>) -> Result<BuildReport, BuildError> {
    let platform = ctx
        .spec
        .platform
        .as_deref()
        .and_then(Platform::parse)
        .unwrap_or_else(Platform::host);
    let engine = ctx.stage("engine", ctx.engine.info()).await?;
    let built = build_platform(ctx, &platform, &engine).await?;
    let reference = ctx.spec.local_ref();
    ctx.layout().tag(&reference, &built.image.descriptor)?;
    let loaded = match ctx.options.load {
        true => {
            let tags = vec![reference.clone()];
            let load = docker_archive::load(ctx.engine.as_ref(), ctx.layout(), &built.image, tags);
            ctx.stage("load", load).await?;
            Some(reference.clone())
        }
        false => None,
    };
    Ok(report(ctx, built, reference, loaded))
}

/// The whole path for one platform: pull the base, run each step on the result of the one
/// before, assemble. The result is stored in the layout; tagging, loading and pushing come
/// after.
pub async fn build_platform(
    ctx: &BuildContext<'_>,
    platform: &Platform,
    engine: &EngineInfo,
) -> Result<PlatformBuild, BuildError> {
    let base = ctx.stage("pull", pull_base(ctx, platform)).await?;
    let steps = Step::all(ctx.spec);
    let mut outcomes: Vec<StepOutcome> = Vec::with_capacity(steps.len());
    let mut parent = base.image.clone();
    for (i, step) in steps.iter().enumerate() {
        let run = StepRun {
            ctx,
            step,
            parent: &parent,
            platform,
            engine,
        };
        let outcome = run.run().await?;
        if i + 1 < steps.len() {
            parent = parent
                .append(&[outcome.addendum()], outcome.created, |_| {})
                .map_err(|source| base_error(ctx, source))?;
            ctx.layout().write_image(&parent)?;
        }
        outcomes.push(outcome);
    }
    let image = ctx
        .stage("assemble", async {
            let image = assemble(&base.image, &outcomes, &ctx.spec.image_settings())
                .map_err(|source| base_error(ctx, source))?;
            ctx.layout().write_image(&image)?;
            Ok::<_, BuildError>(image)
        })
        .await?;
    Ok(PlatformBuild {
        base,
        steps: outcomes,
        image,
    })
}

fn base_error(ctx: &BuildContext<'_>, source: OciError) -> BuildError {
    BuildError::Base {
        reference: ctx.spec.base.clone(),
        source,
    }
}

/// The base image for `platform`, pulled into the layout.
async fn pull_base(ctx: &BuildContext<'_>, platform: &Platform) -> Result<PulledImage, BuildError> {
    let base: Reference =
        ctx.spec
            .base
            .parse()
            .map_err(
                |e: crate::reference::ReferenceError| BuildError::BadReference {
                    reference: ctx.spec.base.clone(),
                    message: e.to_string(),
                },
            )?;
    ctx.client
        .pull_image(&base, platform, ctx.layout(), &ctx.reporter)
        .await
        .map_err(|source| BuildError::Pull {
            reference: ctx.spec.base.clone(),
            source: Box::new(source),
        })
}

fn report(
    ctx: &BuildContext<'_>,
    built: PlatformBuild,
    reference: String,
    loaded: Option<String>,
) -> BuildReport {
    let nbase = built.base.image.manifest.layers.len();
    let layers: Vec<LayerReport> = built
        .image
        .manifest
        .layers
        .iter()
        .enumerate()
        .map(|(i, l)| LayerReport {
            digest: l.digest.clone(),
            size: l.size,
            media_type: l.media_type.clone(),
            new: i >= nbase,
        })
        .collect();
    let last = built.steps.last();
    let all_hit = built.steps.iter().all(|s| s.cache == CacheOutcome::Hit);
    BuildReport {
        name: ctx.spec.name.clone(),
        reference,
        oci_dir: ctx.options.oci_dir.clone(),
        base: ctx.spec.base.clone(),
        base_digest: built.base.image.digest().clone(),
        total_size: layers.iter().map(|l| l.size).sum(),
        layers,
        config_digest: built.image.manifest.config.digest.clone(),
        manifest: built.image.descriptor.clone(),
        diff_id: last
            .map(|s| s.diff_id.clone())
            .unwrap_or_else(|| crate::oci::Digest::of_bytes(b"")),
        layer_uncompressed_size: last.map_or(0, |s| s.uncompressed_size),
        layer_path: last.map_or(LayerSource::Cache, |s| s.source),
        cache: if all_hit {
            CacheOutcome::Hit
        } else {
            CacheOutcome::Miss
        },
        cache_key: last.map(|s| s.cache_key.clone()).unwrap_or_default(),
        stages: ctx.stages().times(),
        container: last.and_then(|s| s.container.clone()).unwrap_or_default(),
        loaded,
    }
}

/// Default OCI layout directory for an image.yaml: `.wpimg/oci` next to it.
pub fn default_oci_dir(image_yaml: &Path) -> PathBuf {
    crate::spec::dir_of(image_yaml).join(".wpimg").join("oci")
}
