//! One provisioning step on a parent image: its cache key, the cache lookup, and on a miss the
//! parent in the engine, the cache mounts, a build container, `ansible-playbook`, the layer
//! (read uncompressed, compressed in the background while the next step runs), and the cache
//! store once the layer is compressed ([`StepDone::finish`]).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use super::cache::{self, Cache, CacheEntry, EntryOwner};
use super::container::{BuildContainer, IMAGE_LABEL};
use super::context::BuildContext;
use super::docker_archive::{self, Blobs};
use super::extract::Extraction;
use super::key::{self, KeyInputs, KeySource};
use super::mounts::MountLocks;
use super::reads::Skip;
use super::report::{CacheOutcome, LayerSource};
use super::stage::StageTimer;
use super::BuildError;
use crate::events::Event;
use crate::layer::{LayerInfo, LayerOptions, Tee};
use crate::oci::{self, Addendum, Descriptor, Digest, History, Image, Platform};
use crate::provision::{self, ProvisionRun};
use crate::runtime::EngineInfo;
use crate::spec::ImageSpec;

/// Label of the step images wpimg keeps in the engine (value: the step's cache key).
pub const STEP_IMAGE_LABEL: &str = "io.wpimg.step-image";
/// Label naming the step of a step image.
pub const STEP_LABEL: &str = "io.wpimg.step";
/// Label of a step image: the uncompressed size of the step's layer.
pub const STEP_SIZE_LABEL: &str = "io.wpimg.step-layer-size";
/// The name of the one step of image.yaml's single form (`provision.playbook`).
pub const SINGLE_STEP: &str = "provision";

/// One provisioning step: a playbook run in a container of its parent image, yielding one layer.
#[derive(Debug, Clone)]
pub struct Step {
    /// The step's name (`provision` for the single form).
    pub name: String,
    /// The playbook.
    pub playbook: PathBuf,
    /// Extra vars (passed through a private file).
    pub extra_vars: serde_json::Map<String, serde_json::Value>,
    /// Extra ansible-playbook arguments.
    pub ansible_args: Vec<String>,
    /// Environment for ansible-playbook (`provision.env` with the step's merged over it).
    pub env: BTreeMap<String, String>,
    /// Connection plugin.
    pub connection: String,
    /// Ansible pipelining.
    pub pipelining: bool,
    /// `none` or `mitogen` (after `--accelerator`).
    pub accelerator: provision::Accelerator,
    /// Cache mount paths.
    pub cache_mounts: Vec<String>,
    /// More files the step reads (globs relative to image.yaml).
    pub inputs: Vec<String>,
    /// Whether image.yaml names the step (`provision.steps`).
    pub named: bool,
}

impl Step {
    /// The steps of an image.yaml, in order: `provision.steps`, or the single `provision`.
    pub fn all(spec: &ImageSpec) -> Vec<Step> {
        let p = &spec.provision;
        let env = p.env.clone().unwrap_or_default();
        let common = Step {
            name: SINGLE_STEP.into(),
            playbook: p.playbook.clone().unwrap_or_default(),
            extra_vars: p.extra_vars.clone().unwrap_or_default(),
            ansible_args: p.ansible_args.clone().unwrap_or_default(),
            env: env.clone(),
            connection: p
                .connection
                .clone()
                .unwrap_or_else(|| provision::DEFAULT_CONNECTION.to_string()),
            pipelining: p.pipelining.unwrap_or(true),
            accelerator: p.accelerator(),
            cache_mounts: p.cache_mounts.clone().unwrap_or_default(),
            inputs: p.inputs.clone().unwrap_or_default(),
            named: false,
        };
        let Some(steps) = &p.steps else {
            return vec![common];
        };
        steps
            .iter()
            .map(|s| {
                let mut env = env.clone();
                env.extend(s.env.clone().unwrap_or_default());
                Step {
                    name: s.name.clone(),
                    playbook: s.playbook.clone(),
                    extra_vars: s.extra_vars.clone().unwrap_or_default(),
                    ansible_args: s.ansible_args.clone().unwrap_or_default(),
                    env,
                    inputs: s.inputs.clone().unwrap_or_default(),
                    named: true,
                    ..common.clone()
                }
            })
            .collect()
    }

    /// The history entry of the layer this step makes.
    pub fn history(&self) -> History {
        let playbook = self
            .playbook
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        let version = env!("CARGO_PKG_VERSION");
        let created_by = match self.named {
            true => format!(
                "wpimg {version}: step {}: ansible-playbook {playbook}",
                self.name
            ),
            false => format!("wpimg {version}: ansible-playbook {playbook}"),
        };
        History {
            created_by: Some(created_by),
            comment: Some("provisioned by wpimg".into()),
            ..Default::default()
        }
    }
}

/// What a step produced (or found in the cache).
#[derive(Debug, Clone)]
pub struct StepOutcome {
    /// The step's name.
    pub name: String,
    /// The compressed layer.
    pub layer: Descriptor,
    /// Its uncompressed digest.
    pub diff_id: Digest,
    /// Its uncompressed size.
    pub uncompressed_size: u64,
    /// When the layer was made (Unix seconds; a cached layer keeps its time).
    pub created: i64,
    /// Its history entry.
    pub history: History,
    /// Hit or miss.
    pub cache: CacheOutcome,
    /// The step's cache key.
    pub cache_key: String,
    /// Where the layer was read from.
    pub source: LayerSource,
    /// The build container's name (none on a cache hit).
    pub container: Option<String>,
    /// Wall time of the step (lookup to layer read; background compression not included).
    pub seconds: f64,
    /// The outputs its play reported (`set_stats`), or its cache entry kept.
    pub outputs: crate::outputs::Outputs,
}

impl StepOutcome {
    /// The layer as appended to the image.
    pub fn addendum(&self) -> Addendum {
        Addendum {
            layer: self.layer.clone(),
            diff_id: self.diff_id.clone(),
            history: Some(self.history.clone()),
        }
    }
}

/// The engine-side images of a build so far: the base, then each step's result; and the
/// uncompressed layers not yet compressed (their descriptors name the uncompressed tar).
#[derive(Default)]
pub struct Chain {
    images: Vec<Image>,
    spooled: HashMap<Digest, Arc<tempfile::TempPath>>,
}

impl Chain {
    /// A chain starting at `base`.
    pub fn new(base: &Image) -> Self {
        Self {
            images: vec![base.clone()],
            spooled: HashMap::new(),
        }
    }

    /// The newest image (the next step's parent).
    pub fn top(&self) -> &Image {
        &self.images[self.images.len() - 1]
    }

    /// The image under the newest one (the last step's parent), if any.
    pub fn parent_of_top(&self) -> Option<&Image> {
        self.images.len().checked_sub(2).map(|i| &self.images[i])
    }

    /// Add a step's result: `done`'s layer on the top image, labelled as wpimg's step image.
    pub fn push(&mut self, ctx: &BuildContext<'_>, done: &StepDone) -> Result<(), oci::OciError> {
        let o = &done.outcome;
        let image = self.top().append(&[o.addendum()], o.created, |c| {
            let labels = c.config.labels.get_or_insert_with(Default::default);
            labels.insert(STEP_IMAGE_LABEL.into(), o.cache_key.clone());
            labels.insert(STEP_LABEL.into(), o.name.clone());
            labels.insert(IMAGE_LABEL.into(), ctx.spec.name.clone());
            labels.insert(STEP_SIZE_LABEL.into(), o.uncompressed_size.to_string());
        })?;
        if let Some(p) = &done.spool {
            self.spooled.insert(o.layer.digest.clone(), p.clone());
        }
        self.images.push(image);
        Ok(())
    }

    /// Make sure the engine has the top image: load only the layers above the newest image of
    /// the chain it already has (spooled layers straight from their uncompressed tar).
    async fn ensure_loaded(&self, ctx: &BuildContext<'_>) -> Result<(), BuildError> {
        let engine = ctx.engine.as_ref();
        let top = self.top();
        let mut present = 0;
        for (i, image) in self.images.iter().enumerate().rev() {
            if engine.image_exists(&image.config_id()).await? {
                if i == self.images.len() - 1 {
                    return Ok(());
                }
                present = image.manifest.layers.len();
                break;
            }
        }
        let blobs = Blobs {
            spooled: self
                .spooled
                .iter()
                .map(|(d, p)| (d.clone(), p.to_path_buf()))
                .collect(),
            present,
        };
        docker_archive::load_with(engine, ctx.layout(), blobs, top, vec![]).await?;
        Ok(())
    }
}

/// A run step: its outcome and, after a miss, its layer still being compressed.
pub struct StepDone {
    /// The outcome; after a miss, `layer` names the uncompressed tar until [`StepDone::finish`].
    pub outcome: StepOutcome,
    spool: Option<Arc<tempfile::TempPath>>,
    pending: Option<Pending>,
}

/// A layer being compressed in the background, and what its cache entry needs.
struct Pending {
    task: tokio::task::JoinHandle<Result<LayerInfo, crate::layer::LayerError>>,
    cancel: Arc<AtomicBool>,
    inputs: KeyInputs,
    streams_upload: bool,
}

impl StepDone {
    /// Wait for the layer's compression and store it in the cache (locally, and in the cache
    /// repository as stage `cache-push`).
    pub async fn finish(
        self,
        ctx: &BuildContext<'_>,
        platform: &Platform,
    ) -> Result<StepOutcome, BuildError> {
        let mut outcome = self.outcome;
        let Some(p) = self.pending else {
            return Ok(outcome);
        };
        let info = p.task.await??;
        if p.streams_upload {
            ctx.finish_layer_upload(&info.descriptor()).await;
        }
        let platform_name = platform.to_string();
        let owner = EntryOwner {
            image: &ctx.spec.name,
            step: &outcome.name,
            platform: &platform_name,
        };
        let mut entry = CacheEntry::new(
            &outcome.cache_key,
            &info,
            outcome.created,
            &owner,
            &p.inputs,
        );
        entry.outputs = outcome.outputs.clone();
        store(ctx, &entry, &owner, platform).await?;
        outcome.layer = info.descriptor();
        Ok(outcome)
    }

    /// Stop the background compression (the build was interrupted).
    pub fn abandon(self) {
        if let Some(p) = self.pending {
            p.cancel.store(true, Ordering::Relaxed);
        }
    }
}

fn cache<'c>(ctx: &'c BuildContext<'_>) -> Cache<'c> {
    Cache {
        layout: ctx.layout(),
        client: ctx.client,
        repository: ctx.options.cache_repo.as_ref(),
        reporter: &ctx.reporter,
    }
}

/// Store an entry in the cache (and the cache repository, as stage `cache-push`); it becomes
/// the newest of its step.
async fn store(
    ctx: &BuildContext<'_>,
    entry: &CacheEntry,
    owner: &EntryOwner<'_>,
    platform: &Platform,
) -> Result<(), BuildError> {
    let cache = cache(ctx);
    cache.store_local(entry)?;
    cache::set_newest(ctx.layout(), owner, &entry.key)?;
    if cache.is_shared() {
        let pushing = ctx.stages().start("cache-push");
        ctx.cancellable(cache.store_remote(entry, platform)).await?;
        pushing.finish();
    }
    Ok(())
}

/// What a provisioned container gave: its layer (uncompressed), where it was read from, and the
/// play's outputs.
struct Produced {
    layer: LayerInfo,
    source: LayerSource,
    outputs: crate::outputs::Outputs,
}

/// One run of a step on the newest image of a chain.
pub struct StepRun<'a> {
    /// The build.
    pub ctx: &'a BuildContext<'a>,
    /// The step.
    pub step: &'a Step,
    /// The images so far (the top one is the parent).
    pub chain: &'a Chain,
    /// The base's manifest digest.
    pub base: &'a Digest,
    /// The previous step's key (`None` for the first step).
    pub parent_key: Option<&'a str>,
    /// The platform being built.
    pub platform: &'a Platform,
    /// What the engine said about itself.
    pub engine: &'a EngineInfo,
    /// Whether the new layer may stream to the registry (not when the layers are squashed).
    pub may_stream: bool,
}

impl StepRun<'_> {
    /// Run the step: a cache hit reuses the stored layer, a miss provisions a container and
    /// leaves the layer compressing in the background.
    pub async fn run(&self) -> Result<StepDone, BuildError> {
        let started = Instant::now();
        let ctx = self.ctx;
        ctx.reporter.event(Event::StepStart {
            step: self.step.name.clone(),
        });
        let inputs = self.key_inputs()?;
        let key = inputs.key();
        let platform = self.platform.to_string();
        let owner = EntryOwner {
            image: &ctx.spec.name,
            step: &self.step.name,
            platform: &platform,
        };
        if !ctx.options.no_cache {
            if let Some(entry) = cache(ctx).lookup(&key, self.platform).await {
                return self.hit(key, entry, &inputs, &owner, started);
            }
        }
        let reasons = match ctx.options.no_cache {
            true => vec!["--no-cache".to_string()],
            false => cache::explain(cache::newest(ctx.layout(), &owner).as_ref(), &key, &inputs),
        };
        ctx.reporter.event(Event::CacheMiss {
            step: self.step.name.clone(),
            reasons,
        });
        self.miss(key, inputs, started).await
    }

    fn key_inputs(&self) -> Result<KeyInputs, BuildError> {
        let ctx = self.ctx;
        let skip = Skip::new(&[ctx.layout().dir()]).with_files(&ctx.spec.source.secret_files);
        let layer = ctx.spec.layer_settings();
        let platform = self.platform.to_string();
        let src = KeySource {
            spec_dir: &ctx.spec.source.dir,
            base: self.base,
            parent_key: self.parent_key,
            platform: &platform,
            layer: &layer,
            skip: &skip,
        };
        let inputs = key::inputs(self.step, &src)?;
        for why in &inputs.fallback {
            ctx.reporter.event(Event::Note {
                message: format!(
                    "step {}: the cache key covers the whole playbook directory: {why}",
                    self.step.name
                ),
            });
        }
        for note in &inputs.notes {
            ctx.reporter.event(Event::Note {
                message: format!("step {}: {note}", self.step.name),
            });
        }
        Ok(inputs)
    }

    fn hit(
        &self,
        key: String,
        mut e: CacheEntry,
        inputs: &KeyInputs,
        owner: &EntryOwner<'_>,
        started: Instant,
    ) -> Result<StepDone, BuildError> {
        let ctx = self.ctx;
        ctx.reporter.event(Event::Note {
            message: format!(
                "step {}: cache hit {}: reusing layer {}",
                self.step.name,
                &key[..12.min(key.len())],
                e.layer.digest
            ),
        });
        if e.inputs.is_empty() {
            // From the cache repository: remember it here, with its inputs.
            e.remember(owner, inputs);
            cache::store(ctx.layout(), &e)?;
        }
        cache::set_newest(ctx.layout(), owner, &key)?;
        Ok(StepDone {
            outcome: StepOutcome {
                name: self.step.name.clone(),
                layer: e.layer,
                diff_id: e.diff_id,
                uncompressed_size: e.uncompressed_size,
                created: e.created,
                history: self.step.history(),
                cache: CacheOutcome::Hit,
                cache_key: key,
                source: LayerSource::Cache,
                container: None,
                seconds: started.elapsed().as_secs_f64(),
                outputs: e.outputs,
            },
            spool: None,
            pending: None,
        })
    }

    async fn miss(
        &self,
        key: String,
        inputs: KeyInputs,
        started: Instant,
    ) -> Result<StepDone, BuildError> {
        let ctx = self.ctx;
        let stage = match self.parent_key {
            None => "load-base",
            Some(_) => "load-parent",
        };
        let loading = ctx.stages().start(stage);
        ctx.cancellable(self.chain.ensure_loaded(ctx)).await??;
        loading.finish();
        let spool = Arc::new(self.spool_path()?);
        let (produced, container) = self.produce(&spool).await?;
        let Produced {
            layer: info,
            source,
            outputs,
        } = produced;
        let created = oci::source_date_epoch().unwrap_or_else(oci::now_unix);
        let mut opts = self.layer_options();
        let writer = self.may_stream.then(|| ctx.take_layer_writer()).flatten();
        let streams_upload = writer.is_some();
        opts.tee = writer.map(Tee::new).unwrap_or_default();
        let cancel = Arc::new(AtomicBool::new(false));
        let task = {
            let (layout, spool, info, cancel) = (
                ctx.layout().clone(),
                spool.clone(),
                info.clone(),
                cancel.clone(),
            );
            tokio::task::spawn_blocking(move || {
                crate::layer::compress_spool(&spool, &info, &layout, &opts, &cancel)
            })
        };
        Ok(StepDone {
            outcome: StepOutcome {
                name: self.step.name.clone(),
                layer: info.descriptor(),
                diff_id: info.diff_id.clone(),
                uncompressed_size: info.uncompressed_size,
                created,
                history: self.step.history(),
                cache: CacheOutcome::Miss,
                cache_key: key,
                source,
                container: Some(container),
                seconds: started.elapsed().as_secs_f64(),
                outputs,
            },
            spool: Some(spool),
            pending: Some(Pending {
                task,
                cancel,
                inputs,
                streams_upload,
            }),
        })
    }

    /// A temp file in the layout for the uncompressed layer (removed when no longer used).
    fn spool_path(&self) -> Result<tempfile::TempPath, BuildError> {
        let ingest = self.ctx.layout().dir().join("ingest");
        fs_err::create_dir_all(&ingest)?;
        Ok(tempfile::Builder::new()
            .prefix("wpimg-spool-")
            .suffix(".tar")
            .tempfile_in(&ingest)?
            .into_temp_path())
    }

    /// A build container of the parent (with the cache mounts, locked), provisioned and read as
    /// an uncompressed layer into `spool`, then removed in the background (kept after a failed
    /// play with `--keep-on-error`). Returns what it produced and the container's name.
    async fn produce(&self, spool: &std::path::Path) -> Result<(Produced, String), BuildError> {
        let ctx = self.ctx;
        let parent = self.chain.top().config_id();
        let locks = match self.step.cache_mounts.is_empty() {
            true => None,
            false => Some(MountLocks::acquire(ctx, &self.step.cache_mounts, &parent).await?),
        };
        let provisioning = ctx.stages().start("provision");
        // The engine's own platform unless image.yaml names one (or several).
        let platform = (ctx.spec.platform.is_some() || ctx.spec.platforms.is_some())
            .then(|| self.platform.to_string());
        let mut spec = BuildContainer::spec(&parent, &ctx.spec.name, platform);
        spec.volumes = locks
            .as_ref()
            .map(|l| l.volumes.clone())
            .unwrap_or_default();
        let container = BuildContainer::start(ctx.engine.clone(), &spec).await?;
        let produced = self
            .provision_and_read(&container, provisioning, spool)
            .await;
        let keep =
            ctx.options.keep_on_error && matches!(produced, Err(BuildError::Provision { .. }));
        let result = match produced {
            Err(BuildError::Provision { source, .. }) if keep => Err(BuildError::Provision {
                source,
                kept: Some(container.keep().await),
            }),
            Err(e) => container.remove().await.map_err(Into::into).and(Err(e)),
            Ok(produced) => {
                container.remove_in_background(ctx);
                Ok((produced, spec.name))
            }
        };
        // The container is stopped (or gone): nothing writes to the volumes any more.
        match locks {
            Some(l) => l.release().await.and(result),
            None => result,
        }
    }

    async fn provision_and_read(
        &self,
        container: &BuildContainer,
        provisioning: StageTimer<'_>,
        spool: &std::path::Path,
    ) -> Result<Produced, BuildError> {
        let run = self.provision_run(container.name());
        // Dropped when cancelled (ansible-playbook is killed); the layer read below handles
        // cancellation itself, so that its temp files are gone when it returns.
        let outputs = self
            .ctx
            .cancellable(self.ctx.provisioner().run(&run, &self.ctx.reporter))
            .await?
            .map_err(|source| BuildError::Provision { source, kept: None })?;
        provisioning.finish();

        let reading = self.ctx.stages().start("layer");
        // Stop the keep-alive shell (and anything Ansible left running): a still filesystem.
        container.stop().await?;
        let extraction = Extraction {
            engine: self.ctx.engine.as_ref(),
            info: self.engine,
            path: self.ctx.options.layer_path,
            layout: self.ctx.layout(),
        };
        let (layer, source) = extraction
            .spool(container, self.layer_options(), spool)
            .await?;
        reading.finish();
        Ok(Produced {
            layer,
            source,
            outputs,
        })
    }

    fn provision_run(&self, container: &str) -> ProvisionRun {
        let mut extra_vars = self.step.extra_vars.clone();
        extra_vars
            .entry("wpimg_cache_mounts")
            .or_insert_with(|| serde_json::json!(self.step.cache_mounts));
        ProvisionRun {
            playbook: self.step.playbook.clone(),
            container: container.to_string(),
            connection: self.step.connection.clone(),
            pipelining: self.step.pipelining,
            extra_vars,
            args: self.step.ansible_args.clone(),
            env: self.step.env.clone(),
            docker_host: self.ctx.options.docker_host.clone(),
            docker_tls_cert_dir: self.ctx.options.docker_tls_cert_dir.clone(),
            secrets: self.ctx.spec.source.secret_values.clone(),
            state_dir: self.ctx.state_dir(),
            mitogen: self.ctx.mitogen().cloned(),
        }
    }

    /// How the layer is made: image.yaml's `layer:` settings, the cache mounts left out.
    fn layer_options(&self) -> LayerOptions {
        let layer = self.ctx.spec.layer_settings();
        let mut excludes = layer.excludes();
        excludes.extend(self.step.cache_mounts.iter().cloned());
        LayerOptions {
            compression: layer.compression(),
            level: layer.level,
            excludes,
            source_date_epoch: oci::source_date_epoch(),
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            tee: Tee::default(),
            cancel: Some(self.ctx.cancel_token().clone()),
            leak_scan: self.ctx.leak_scanner(),
        }
    }
}
