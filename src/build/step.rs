//! One provisioning step on a parent image: its cache key, the cache lookup, and on a miss the
//! parent in the engine, a build container, `ansible-playbook`, the layer, and the cache store.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::cache::{self, Cache, CacheEntry};
use super::container::BuildContainer;
use super::context::BuildContext;
use super::docker_archive;
use super::extract::Extraction;
use super::report::{CacheOutcome, LayerSource};
use super::stage::StageTimer;
use super::BuildError;
use crate::events::Event;
use crate::layer::{LayerInfo, LayerOptions, Tee};
use crate::oci::{self, Addendum, Descriptor, Digest, History, Image, Platform};
use crate::provision::{self, ProvisionRun};
use crate::runtime::EngineInfo;
use crate::spec::ImageSpec;

/// One provisioning step: a playbook run in a container of its parent image, yielding one layer.
#[derive(Debug, Clone)]
pub struct Step {
    /// The step's name (`provision` for image.yaml's `provision:` section).
    pub name: String,
    /// The playbook.
    pub playbook: PathBuf,
    /// Extra vars (passed through a private file).
    pub extra_vars: serde_json::Map<String, serde_json::Value>,
    /// Extra ansible-playbook arguments.
    pub ansible_args: Vec<String>,
    /// Environment for ansible-playbook.
    pub env: BTreeMap<String, String>,
    /// Connection plugin.
    pub connection: String,
    /// Ansible pipelining.
    pub pipelining: bool,
}

impl Step {
    /// The steps of an image.yaml, in order (today the one `provision:` section).
    pub fn all(spec: &ImageSpec) -> Vec<Step> {
        let p = &spec.provision;
        vec![Step {
            name: "provision".into(),
            playbook: p.playbook.clone(),
            extra_vars: p.extra_vars.clone().unwrap_or_default(),
            ansible_args: p.ansible_args.clone().unwrap_or_default(),
            env: p.env.clone().unwrap_or_default(),
            connection: p
                .connection
                .clone()
                .unwrap_or_else(|| provision::DEFAULT_CONNECTION.to_string()),
            pipelining: p.pipelining.unwrap_or(true),
        }]
    }

    /// The history entry of the layer this step makes.
    pub fn history(&self) -> History {
        History {
            created_by: Some(format!(
                "wpimg {}: ansible-playbook {}",
                env!("CARGO_PKG_VERSION"),
                self.playbook
                    .file_name()
                    .map(|f| f.to_string_lossy().into_owned())
                    .unwrap_or_default()
            )),
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

/// One run of a step on a parent image.
pub struct StepRun<'a> {
    /// The build.
    pub ctx: &'a BuildContext<'a>,
    /// The step.
    pub step: &'a Step,
    /// The image the step runs in (the base for the first step).
    pub parent: &'a Image,
    /// The platform being built.
    pub platform: &'a Platform,
    /// What the engine said about itself.
    pub engine: &'a EngineInfo,
}

impl StepRun<'_> {
    /// Run the step: a cache hit reuses the stored layer, a miss provisions a container.
    pub async fn run(&self) -> Result<StepOutcome, BuildError> {
        let key = cache::key(
            self.ctx.spec,
            self.parent.digest(),
            &self.platform.to_string(),
            self.ctx.layout().dir(),
        )?;
        if !self.ctx.options.no_cache {
            if let Some(entry) = self.cache().lookup(&key, self.platform).await {
                self.ctx.abort_layer_upload();
                return Ok(self.hit(key, entry));
            }
        }
        let loading = self.ctx.stages().start("load-base");
        self.ctx.cancellable(self.ensure_parent_loaded()).await??;
        loading.finish();
        let (info, source, container) = self.produce().await?;
        self.ctx.finish_layer_upload(&info.descriptor()).await;
        let entry = CacheEntry {
            key: key.clone(),
            layer: info.descriptor(),
            diff_id: info.diff_id.clone(),
            uncompressed_size: info.uncompressed_size,
            created: oci::source_date_epoch().unwrap_or_else(oci::now_unix),
        };
        self.store(&entry).await?;
        Ok(StepOutcome {
            name: self.step.name.clone(),
            layer: entry.layer,
            diff_id: entry.diff_id,
            uncompressed_size: entry.uncompressed_size,
            created: entry.created,
            history: self.step.history(),
            cache: CacheOutcome::Miss,
            cache_key: key,
            source,
            container: Some(container),
        })
    }

    fn cache(&self) -> Cache<'_> {
        Cache {
            layout: self.ctx.layout(),
            client: self.ctx.client,
            repository: self.ctx.options.cache_repo.as_ref(),
            reporter: &self.ctx.reporter,
        }
    }

    fn hit(&self, key: String, e: CacheEntry) -> StepOutcome {
        self.ctx.reporter.event(Event::Note {
            message: format!(
                "cache hit {}: reusing layer {}",
                &key[..12.min(key.len())],
                e.layer.digest
            ),
        });
        StepOutcome {
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
        }
    }

    /// Store the layer in the cache (and the cache repository, as stage `cache-push`).
    async fn store(&self, entry: &CacheEntry) -> Result<(), BuildError> {
        let cache = self.cache();
        cache.store_local(entry)?;
        if cache.is_shared() {
            let pushing = self.ctx.stages().start("cache-push");
            self.ctx
                .cancellable(cache.store_remote(entry, self.platform))
                .await?;
            pushing.finish();
        }
        Ok(())
    }

    /// The parent image in the engine (streamed from the layout unless the engine has it).
    async fn ensure_parent_loaded(&self) -> Result<(), BuildError> {
        let engine = self.ctx.engine.as_ref();
        if !engine.image_exists(&self.parent.config_id()).await? {
            docker_archive::load(engine, self.ctx.layout(), self.parent, vec![]).await?;
        }
        Ok(())
    }

    /// A build container of the parent, provisioned and read as a layer, then removed (kept
    /// after a failed play with `--keep-on-error`). Returns the layer and the container's name.
    async fn produce(&self) -> Result<(LayerInfo, LayerSource, String), BuildError> {
        let provisioning = self.ctx.stages().start("provision");
        // The engine's own platform unless image.yaml names one.
        let platform = self
            .ctx
            .spec
            .platform
            .as_ref()
            .map(|_| self.platform.to_string());
        let spec = BuildContainer::spec(&self.parent.config_id(), &self.ctx.spec.name, platform);
        let container = BuildContainer::start(self.ctx.engine.clone(), &spec).await?;
        let produced = self
            .ctx
            .cancellable(self.provision_and_read(&container, provisioning))
            .await
            .and_then(|r| r);
        let keep =
            self.ctx.options.keep_on_error && matches!(produced, Err(BuildError::Provision { .. }));
        match produced {
            Err(BuildError::Provision { source, .. }) if keep => Err(BuildError::Provision {
                source,
                kept: Some(container.keep()),
            }),
            other => {
                container.remove().await?;
                other.map(|(info, source)| (info, source, spec.name))
            }
        }
    }

    async fn provision_and_read(
        &self,
        container: &BuildContainer,
        provisioning: StageTimer<'_>,
    ) -> Result<(LayerInfo, LayerSource), BuildError> {
        let run = self.provision_run(container.name());
        self.ctx
            .provisioner()
            .run(&run, &self.ctx.reporter)
            .await
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
        let layer = extraction.layer(container, self.layer_options()).await?;
        reading.finish();
        Ok(layer)
    }

    fn provision_run(&self, container: &str) -> ProvisionRun {
        ProvisionRun {
            playbook: self.step.playbook.clone(),
            container: container.to_string(),
            connection: self.step.connection.clone(),
            pipelining: self.step.pipelining,
            extra_vars: self.step.extra_vars.clone(),
            args: self.step.ansible_args.clone(),
            env: self.step.env.clone(),
            docker_host: self.ctx.options.docker_host.clone(),
            docker_tls_cert_dir: self.ctx.options.docker_tls_cert_dir.clone(),
            mitogen: self.ctx.mitogen().cloned(),
        }
    }

    fn layer_options(&self) -> LayerOptions {
        let layer = self.ctx.spec.layer_settings();
        LayerOptions {
            compression: layer.compression(),
            level: layer.level,
            excludes: layer.excludes(),
            source_date_epoch: oci::source_date_epoch(),
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            tee: self
                .ctx
                .take_layer_writer()
                .map(Tee::new)
                .unwrap_or_default(),
        }
    }
}
