//! The build: pull the base → for each step (cache, or load → provision → layer, compressed in
//! the background) → (squash) → assemble → tag (→ load). One platform's path is
//! [`build_platform`]; tagging and loading come after it.
//!
//! Returns a [`BuildReport`]; never prints (progress goes through the reporter).

mod assemble;
pub mod cache;
mod container;
mod context;
pub mod docker_archive;
mod extract;
pub mod key;
pub mod mounts;
mod platforms;
pub mod probe;
pub mod prune;
pub mod reads;
mod report;
mod sbom;
mod stage;
mod step;
#[cfg(test)]
mod tests;
mod verify;

pub use assemble::{apply, assemble, assemble_squashed};
pub use cache::{Cache, CacheEntry};
pub use container::{BuildContainer, IMAGE_LABEL};
pub use context::{BuildContext, BuildOptions, LayerUpload};
pub use extract::{Extraction, LayerPath};
pub use platforms::{CannotRun, PlatformEngine};
pub use report::{
    BuildReport, CacheOutcome, LayerReport, LayerSource, PlatformReport, SbomReport, StageTime,
    StepReport,
};
pub use stage::{StageTimer, Stages};
pub use step::{Chain, Step, StepDone, StepOutcome, StepRun, STEP_IMAGE_LABEL};

use std::path::{Path, PathBuf};

use crate::error::{ErrorKind, HasKind};
use crate::oci::{self, Image, OciError, Platform};
use crate::outputs::{Outputs, Source, StoredOutputs};
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
    /// The SBOM of the built image could not be made.
    #[error("SBOM of the built image")]
    Sbom(#[from] crate::sbom::SbomError),
    /// Interrupted by a signal.
    #[error("interrupted; build container removed")]
    Interrupted,
    /// Another build holds a cache mount for too long.
    #[error("cache mount {path} is locked by another build ({holder}) for longer than {} minutes; if that build is gone, remove the lock: docker rm -f {lock}", mounts::LOCK_DEADLINE.as_secs() / 60)]
    CacheMountBusy {
        /// The mounted path.
        path: String,
        /// Who holds the lock.
        holder: String,
        /// The lock container.
        lock: String,
    },
    /// A build secret is in the image (nothing is tagged or cached).
    #[error(transparent)]
    Leak(#[from] crate::secrets::LeakFound),
    /// A worker thread failed.
    #[error("a worker thread failed")]
    Task(#[from] tokio::task::JoinError),
    /// Local I/O.
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// The base has no image for some of the platforms to build.
    #[error("base image {base} has no image for {} (it has: {})", missing.join(", "), if available.is_empty() { "no platform".to_string() } else { available.join(", ") })]
    BasePlatforms {
        /// The base reference.
        base: String,
        /// The platforms it lacks.
        missing: Vec<String>,
        /// The platforms it has.
        available: Vec<String>,
    },
    /// An engine cannot run a platform's containers (its probe failed).
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    CannotRun(Vec<CannotRun>),
    /// `--load` with `platforms:` that lack the engine's own platform.
    #[error("--load loads the engine's own platform, {engine}, which platforms: does not list ({}): build without --load, or add {engine}", platforms.join(", "))]
    LoadPlatform {
        /// The engine's platform.
        engine: String,
        /// The platforms built.
        platforms: Vec<String>,
    },
    /// The outputs image.yaml uses cannot be resolved (nothing is tagged).
    #[error(transparent)]
    Outputs(Box<crate::outputs::OutputsError>),
    /// One platform of a multi-platform build failed.
    #[error("platform {platform}")]
    Platform {
        /// The platform.
        platform: String,
        /// The cause.
        #[source]
        source: Box<BuildError>,
    },
}

impl HasKind for BuildError {
    fn kind(&self) -> ErrorKind {
        match self {
            BuildError::BadReference { .. }
            | BuildError::LayerPathUnavailable { .. }
            | BuildError::BasePlatforms { .. }
            | BuildError::LoadPlatform { .. } => ErrorKind::BadInput,
            BuildError::Interrupted | BuildError::Layer(crate::layer::LayerError::Interrupted) => {
                ErrorKind::Interrupted
            }
            BuildError::Pull { source, .. } => source.kind(),
            BuildError::Platform { source, .. } => source.kind(),
            BuildError::Accelerator(source) => source.kind(),
            BuildError::Outputs(source) => source.kind(),
            BuildError::Provision { source, .. } => source.kind(),
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
    /// Its SBOM, stored in the layout (absent with `sbom: false`).
    pub sbom: Option<SbomReport>,
    /// Whether the steps' layers were squashed into one.
    pub squashed: bool,
    /// The image the last step ran in (when there were several steps), which the engine may
    /// have: `--load` leaves its layers out.
    pub last_parent: Option<Image>,
    /// The steps' outputs, merged in step order (a later step's value wins).
    pub outputs: Outputs,
}

/// Run a whole build: the image for the spec's platform, tagged `NAME:TAG` in the layout, and
/// loaded into the engine with `--load`; with `platforms:`, an index of one image per platform.
/// Waits at its end for the build containers still being
/// removed in the background.
pub async fn build(ctx: &BuildContext<'_>) -> Result<BuildReport, BuildError> {
    let result = match ctx.spec.index_platforms() {
        Some(platforms) => platforms::build_index(ctx, &platforms).await,
        None => build_tagged(ctx).await,
    };
    ctx.settle().await;
    result
}

/// The image of the spec's one platform, tagged `NAME:TAG` (and loaded with `--load`).
async fn build_tagged(ctx: &BuildContext<'_>) -> Result<BuildReport, BuildError> {
    let platform = ctx
        .spec
        .platform
        .as_deref()
        .and_then(Platform::parse)
        .unwrap_or_else(Platform::host);
    let engine = ctx.stage("engine", ctx.engine.info()).await?;
    if ctx.spec.platform.is_some() {
        platforms::check_runs(ctx, &platform, &engine).await?;
    }
    let built = build_platform(ctx, &platform, &engine).await?;
    crate::outputs::resolve_tags(&target_tags(ctx), &built.outputs, Source::Build)?;
    let reference = ctx.spec.local_ref();
    ctx.layout().tag(&reference, &built.image.descriptor)?;
    let loaded = match ctx.options.load {
        true => {
            let tags = vec![reference.clone()];
            let load = load_result(ctx, &built, tags);
            ctx.stage("load", load).await?;
            Some(reference.clone())
        }
        false => None,
    };
    Ok(report(ctx, built, reference, loaded))
}

impl From<crate::outputs::OutputsError> for BuildError {
    fn from(e: crate::outputs::OutputsError) -> Self {
        BuildError::Outputs(Box::new(e))
    }
}

/// image.yaml's `target.tags` (templates when they use outputs).
fn target_tags(ctx: &BuildContext<'_>) -> Vec<String> {
    ctx.spec
        .target
        .as_ref()
        .map(crate::spec::Target::tags)
        .unwrap_or_default()
}

/// `--load`: the result into the engine, without the layers it has from the last step's parent.
async fn load_result(
    ctx: &BuildContext<'_>,
    built: &PlatformBuild,
    tags: Vec<String>,
) -> Result<(), BuildError> {
    let engine = ctx.engine.as_ref();
    let present = match &built.last_parent {
        Some(p) if !built.squashed && engine.image_exists(&p.config_id()).await? => {
            p.manifest.layers.len()
        }
        _ => 0,
    };
    let blobs = docker_archive::Blobs {
        present,
        ..Default::default()
    };
    docker_archive::load_with(engine, ctx.layout(), blobs, &built.image, tags).await?;
    Ok(())
}

/// The whole path for one platform: pull the base, run each step on the result of the one
/// before (a step's layer is compressed while the next one runs), squash with
/// `layer.squash`, assemble. The result is stored in the layout; tagging, loading and pushing
/// come after.
pub async fn build_platform(
    ctx: &BuildContext<'_>,
    platform: &Platform,
    engine: &EngineInfo,
) -> Result<PlatformBuild, BuildError> {
    let base = ctx.stage("pull", pull_base(ctx, platform)).await?;
    let squash = ctx.spec.layer_settings().squashed();
    // A secret in the config (from image.yaml's `image:`) fails the build before any work.
    let settings = ctx.spec.image_settings();
    ctx.scan_config(&assemble(&base.image, &[], &settings).map_err(|s| base_error(ctx, s))?)?;
    let steps = Step::all(ctx.spec);
    let mut chain = Chain::new(&base.image);
    let mut done: Vec<StepDone> = Vec::with_capacity(steps.len());
    let mut failed = None;
    for step in &steps {
        let run = StepRun {
            ctx,
            step,
            chain: &chain,
            base: base.image.digest(),
            parent_key: done.last().map(|d| d.outcome.cache_key.as_str()),
            platform,
            engine,
            may_stream: !squash,
        };
        match run.run().await {
            Ok(d) => {
                chain
                    .push(ctx, &d)
                    .map_err(|source| base_error(ctx, source))?;
                done.push(d);
            }
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    let last_parent = chain.parent_of_top().cloned();
    let outcomes = finish_steps(ctx, done, platform, failed).await?;
    drop(chain);
    let outputs = crate::outputs::merge(outcomes.iter().map(|o| &o.outputs));
    let settings = crate::outputs::resolve_settings(ctx.spec, &outputs)?;
    let squashed = match squash && outcomes.len() > 1 {
        true => Some(
            ctx.stage("squash", squash_layers(ctx, &outcomes, platform))
                .await?,
        ),
        false => None,
    };
    ctx.abort_layer_upload();
    let image = ctx
        .stage("assemble", async {
            let image = match &squashed {
                Some(layer) => assemble_squashed(&base.image, &outcomes, layer, &settings),
                None => assemble(&base.image, &outcomes, &settings),
            }
            .map_err(|source| base_error(ctx, source))?;
            ctx.scan_config(&image)?;
            ctx.layout().write_image(&image)?;
            let stored = StoredOutputs {
                outputs: outputs.clone(),
                platforms: Default::default(),
            };
            crate::outputs::store(ctx.layout(), &image.descriptor.digest, &stored)?;
            Ok::<_, BuildError>(image)
        })
        .await?;
    let sbom = match ctx.spec.sbom_format() {
        Some(format) => Some(ctx.stage("sbom", sbom::store(ctx, &image, format)).await?),
        None => None,
    };
    Ok(PlatformBuild {
        base,
        steps: outcomes,
        image,
        sbom,
        squashed: squashed.is_some(),
        last_parent,
        outputs,
    })
}

/// Wait for the layers still being compressed and store them in the cache — also when a later
/// step failed (a failed step itself is never stored), not when the build was interrupted.
async fn finish_steps(
    ctx: &BuildContext<'_>,
    done: Vec<StepDone>,
    platform: &Platform,
    failed: Option<BuildError>,
) -> Result<Vec<StepOutcome>, BuildError> {
    if let Some(e @ BuildError::Interrupted) = failed {
        done.into_iter().for_each(StepDone::abandon);
        return Err(e);
    }
    let waiting = ctx.stages().start("compress");
    let mut outcomes = Vec::with_capacity(done.len());
    let mut first_error = None;
    for d in done {
        match ctx
            .cancellable(d.finish(ctx, platform))
            .await
            .and_then(|r| r)
        {
            Ok(o) => outcomes.push(o),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    match (failed, first_error) {
        (Some(e), _) | (None, Some(e)) => Err(e),
        (None, None) => {
            waiting.finish();
            Ok(outcomes)
        }
    }
}

/// The steps' layers merged into one (`layer.squash`), cached by the layers it merges.
async fn squash_layers(
    ctx: &BuildContext<'_>,
    outcomes: &[StepOutcome],
    platform: &Platform,
) -> Result<oci::Addendum, BuildError> {
    let layer = ctx.spec.layer_settings();
    let sde = oci::source_date_epoch();
    let key = cache::squash_key(outcomes, &layer, sde);
    let history = outcomes.last().map(|o| o.history.clone());
    if let Some(e) = cache::lookup(ctx.layout(), &key) {
        return Ok(oci::Addendum {
            layer: e.layer,
            diff_id: e.diff_id,
            history,
        });
    }
    let writer = ctx.take_layer_writer();
    let streams = writer.is_some();
    let opts = crate::layer::LayerOptions {
        compression: layer.compression(),
        level: layer.level,
        excludes: Vec::new(),
        source_date_epoch: sde,
        threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        tee: writer.map(crate::layer::Tee::new).unwrap_or_default(),
        cancel: Some(ctx.cancel_token().clone()),
        leak_scan: ctx.leak_scanner(),
    };
    let layers: Vec<_> = outcomes.iter().map(|o| o.layer.clone()).collect();
    let layout = ctx.layout().clone();
    let info = tokio::task::spawn_blocking(move || crate::layer::squash(&layers, &layout, &opts))
        .await??;
    if streams {
        ctx.finish_layer_upload(&info.descriptor()).await;
    }
    let created = outcomes.last().map_or(0, |o| o.created);
    let name = platform.to_string();
    let owner = cache::EntryOwner {
        image: &ctx.spec.name,
        step: "squash",
        platform: &name,
    };
    let entry = CacheEntry::new(&key, &info, created, &owner, &key::KeyInputs::default());
    cache::store(ctx.layout(), &entry)?;
    cache::set_newest(ctx.layout(), &owner, &key)?;
    Ok(oci::Addendum {
        layer: info.descriptor(),
        diff_id: info.diff_id,
        history,
    })
}

/// image.yaml's `base`, parsed (a bad reference is bad input naming it).
fn base_reference(ctx: &BuildContext<'_>) -> Result<Reference, BuildError> {
    ctx.spec.base.parse().map_err(
        |e: crate::reference::ReferenceError| BuildError::BadReference {
            reference: ctx.spec.base.clone(),
            message: e.to_string(),
        },
    )
}

fn base_error(ctx: &BuildContext<'_>, source: OciError) -> BuildError {
    BuildError::Base {
        reference: ctx.spec.base.clone(),
        source,
    }
}

/// The base image for `platform`, pulled into the layout.
async fn pull_base(ctx: &BuildContext<'_>, platform: &Platform) -> Result<PulledImage, BuildError> {
    let base = base_reference(ctx)?;
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
    let steps: Vec<StepReport> = built.steps.iter().map(StepReport::of).collect();
    let top_diff_id = built.image.config.rootfs.diff_ids.last().cloned();
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
        diff_id: top_diff_id.unwrap_or_else(|| crate::oci::Digest::of_bytes(b"")),
        layer_uncompressed_size: last.map_or(0, |s| s.uncompressed_size),
        layer_path: last.map_or(LayerSource::Cache, |s| s.source),
        cache: CacheOutcome::of(&built.steps),
        cache_key: last.map(|s| s.cache_key.clone()).unwrap_or_default(),
        stages: ctx.stages().times(),
        container: last.and_then(|s| s.container.clone()).unwrap_or_default(),
        loaded,
        sbom: built.sbom,
        steps,
        squashed: built.squashed,
        index_digest: None,
        platforms: Vec::new(),
        outputs: built.outputs,
    }
}

/// Default OCI layout directory for an image.yaml: `.wpimg/oci` next to it.
pub fn default_oci_dir(image_yaml: &Path) -> PathBuf {
    crate::spec::dir_of(image_yaml).join(".wpimg").join("oci")
}
