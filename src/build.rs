//! The build pipeline: pull base → load → provision → layer → assemble → tag (→ load).
//!
//! Returns a [`BuildReport`]; never prints (progress goes through the reporter).

use std::collections::BTreeMap;
use std::io::{Read, Seek};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::events::{Event, SharedReporter};
use crate::layer::{LayerInfo, LayerOptions};
use crate::layout::Layout;
use crate::oci::{
    self, Descriptor, Digest, History, ImageConfig, ImageManifest, Platform, RootFs,
    MEDIA_TYPE_OCI_CONFIG, MEDIA_TYPE_OCI_MANIFEST,
};
use crate::provision::{self, ProvisionRun};
use crate::reference::Reference;
use crate::registry::{self, Client, PulledImage};
use crate::runtime::{self, ContainerSpec, Engine};
use crate::spec::ImageSpec;

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
        source: Box<registry::RegistryError>,
    },
    /// The container engine failed.
    #[error(transparent)]
    Runtime(#[from] runtime::RuntimeError),
    /// Provisioning failed.
    #[error("provisioning failed{}", kept.as_ref().map(|k| format!(" (container {k} kept for debugging: docker exec -it {k} /bin/sh; remove it with docker rm -f {k})")).unwrap_or_default())]
    Provision {
        /// The cause.
        #[source]
        source: provision::ProvisionError,
        /// The container kept with `--keep-on-error`.
        kept: Option<String>,
    },
    /// Producing the layer failed.
    #[error("producing the layer")]
    Layer(#[from] crate::layer::LayerError),
    /// The local layout failed.
    #[error("OCI layout")]
    Layout(#[from] crate::layout::LayoutError),
    /// The base image is unusable.
    #[error("base image {reference}: {message}")]
    Base {
        /// The reference.
        reference: String,
        /// Why.
        message: String,
    },
    /// Interrupted by a signal.
    #[error("interrupted; build container removed")]
    Interrupted,
    /// Local I/O.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// How the layer is read from the build container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum LayerPath {
    /// The overlayfs upper directory when the engine is local and uses overlay2, else the API.
    #[default]
    Auto,
    /// Always the container's overlayfs upper directory.
    Upperdir,
    /// Always the Engine API (`commit` + `save`).
    Api,
}

/// Options of a build that do not come from image.yaml.
pub struct BuildOptions {
    /// The local OCI layout.
    pub oci_dir: PathBuf,
    /// Keep the build container when provisioning fails.
    pub keep_on_error: bool,
    /// Also load the result into the Docker engine as `NAME:TAG`.
    pub load: bool,
    /// Layer path choice.
    pub layer_path: LayerPath,
    /// Registry client for the base pull.
    pub client: Client,
    /// Cancelled on Ctrl-C/SIGTERM.
    pub cancel: CancellationToken,
    /// `DOCKER_HOST` handed to Ansible.
    pub docker_host: Option<String>,
    /// TLS certificate directory handed to Ansible with `docker_host`.
    pub docker_tls_cert_dir: Option<PathBuf>,
    /// Do not reuse a cached layer (a fresh one is still stored).
    pub no_cache: bool,
    /// Registry repository sharing the build cache between machines (`--cache-repo`).
    pub cache_repo: Option<Reference>,
    /// Where the new layer's compressed bytes also go while they are produced (`build --push`
    /// streams them to the registry).
    pub layer_tee: crate::layer::Tee,
}

/// The layer a build adds, whether produced now or taken from the cache.
#[derive(Debug, Clone)]
pub struct NewLayer {
    /// The compressed blob.
    pub descriptor: Descriptor,
    /// Uncompressed digest.
    pub diff_id: Digest,
    /// Uncompressed size.
    pub uncompressed_size: u64,
}

impl From<&LayerInfo> for NewLayer {
    fn from(l: &LayerInfo) -> Self {
        Self {
            descriptor: l.descriptor(),
            diff_id: l.diff_id.clone(),
            uncompressed_size: l.uncompressed_size,
        }
    }
}

/// Wall time of one stage.
#[derive(Debug, Clone, Serialize)]
pub struct StageTime {
    /// Stage name.
    pub stage: String,
    /// Seconds.
    pub seconds: f64,
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
    /// How the layer was read (`upperdir`, `api`, or `cache`).
    pub layer_path: String,
    /// Cache outcome: `hit` or `miss`.
    pub cache: String,
    /// The cache key.
    pub cache_key: String,
    /// Total compressed size of all layers.
    pub total_size: u64,
    /// Stage timings.
    pub stages: Vec<StageTime>,
    /// Build container name.
    pub container: String,
    /// `NAME:TAG` loaded into Docker, with `--load`.
    pub loaded: Option<String>,
}

struct Stages<'a> {
    rep: &'a SharedReporter,
    times: Vec<StageTime>,
}

impl<'a> Stages<'a> {
    fn start(&mut self, stage: &str) -> (String, Instant) {
        self.rep.event(Event::StageStart {
            stage: stage.to_string(),
        });
        (stage.to_string(), Instant::now())
    }
    fn finish(&mut self, (stage, t): (String, Instant)) {
        let seconds = t.elapsed().as_secs_f64();
        self.rep.event(Event::StageFinish {
            stage: stage.clone(),
            seconds,
        });
        self.times.push(StageTime { stage, seconds });
    }
}

/// Run a whole build.
pub async fn build(
    spec: &ImageSpec,
    engine: &dyn Engine,
    opts: &BuildOptions,
    rep: &SharedReporter,
) -> Result<BuildReport, BuildError> {
    let mut st = Stages {
        rep,
        times: Vec::new(),
    };
    let layout = Layout::open_or_create(&opts.oci_dir)?;
    let base_ref: Reference =
        spec.base
            .parse()
            .map_err(
                |e: crate::reference::ReferenceError| BuildError::BadReference {
                    reference: spec.base.clone(),
                    message: e.to_string(),
                },
            )?;
    let platform = spec
        .platform
        .as_deref()
        .and_then(Platform::parse)
        .unwrap_or_else(Platform::host);

    let s = st.start("engine");
    let info = engine.info().await?;
    st.finish(s);

    let s = st.start("pull");
    let base = cancellable(
        &opts.cancel,
        opts.client.pull_image(&base_ref, &platform, &layout, rep),
    )
    .await?
    .map_err(|source| BuildError::Pull {
        reference: spec.base.clone(),
        source: Box::new(source),
    })?;
    st.finish(s);

    let cache_key = crate::cache::key(
        spec,
        &base.descriptor.digest,
        &platform.to_string(),
        layout.dir(),
    )?;
    let cached = if opts.no_cache {
        None
    } else {
        match crate::cache::lookup(&layout, &cache_key) {
            Some(e) => Some(e),
            None => match &opts.cache_repo {
                Some(repo) => {
                    remote_cache_lookup(opts, repo, &cache_key, &platform, &layout, rep).await
                }
                None => None,
            },
        }
    };
    let hit = cached.is_some();
    let base_id = format!("sha256:{}", base.manifest.config.digest.hex());
    let mut container = String::new();
    let (layer, layer_path, created) = match cached {
        Some(e) => {
            rep.event(Event::Note {
                message: format!(
                    "cache hit {}: reusing layer {}",
                    &cache_key[..12],
                    e.layer.digest
                ),
            });
            (
                NewLayer {
                    descriptor: e.layer,
                    diff_id: e.diff_id,
                    uncompressed_size: e.uncompressed_size,
                },
                "cache".to_string(),
                e.created,
            )
        }
        None => {
            let s = st.start("load-base");
            if !engine.image_exists(&base_id).await? {
                let layers: Vec<Digest> = base
                    .manifest
                    .layers
                    .iter()
                    .map(|l| l.digest.clone())
                    .collect();
                load_archive(
                    engine,
                    &layout,
                    &base.manifest.config.digest,
                    &layers,
                    vec![],
                )
                .await?;
            }
            st.finish(s);
            container = format!(
                "wpimg-build-{}-{:08x}",
                spec.name.replace(['/', '.'], "-"),
                rand::random::<u32>()
            );
            let (info, path) = provision_container(
                spec, engine, opts, rep, &mut st, &layout, &base_id, &container, &info,
            )
            .await?;
            let created = oci::source_date_epoch().unwrap_or_else(oci::now_unix);
            let layer = NewLayer::from(&info);
            let entry = crate::cache::CacheEntry {
                key: cache_key.clone(),
                layer: layer.descriptor.clone(),
                diff_id: layer.diff_id.clone(),
                uncompressed_size: layer.uncompressed_size,
                created,
            };
            crate::cache::store(&layout, &entry)?;
            if let Some(repo) = &opts.cache_repo {
                let s = st.start("cache-push");
                if let Err(e) =
                    remote_cache_store(opts, repo, &entry, &base.config, &layout, rep).await
                {
                    rep.event(Event::Warning {
                        message: format!(
                            "could not store the layer in cache repository {}: {e:#}",
                            repo.repo_path()
                        ),
                    });
                }
                st.finish(s);
            }
            (layer, path, created)
        }
    };

    let s = st.start("assemble");
    let (config, manifest) = assemble(spec, &base, &layer, created)?;
    let config_bytes = oci::to_canonical_json(&config);
    let (config_digest, config_size) = layout.write_blob(&config_bytes)?;
    let mut manifest = manifest;
    manifest.config = Descriptor::new(MEDIA_TYPE_OCI_CONFIG, config_digest.clone(), config_size);
    let manifest_bytes = oci::to_canonical_json(&manifest);
    let (manifest_digest, manifest_size) = layout.write_blob(&manifest_bytes)?;
    let mut mdesc = Descriptor::new(MEDIA_TYPE_OCI_MANIFEST, manifest_digest, manifest_size);
    mdesc.platform = Some(Platform {
        architecture: config.architecture.clone(),
        os: config.os.clone(),
        variant: config.variant.clone(),
        os_version: None,
        extra: BTreeMap::new(),
    });
    let reference = spec.local_ref();
    layout.tag(&reference, &mdesc)?;
    st.finish(s);

    let mut loaded = None;
    if opts.load {
        let s = st.start("load");
        let layers: Vec<Digest> = manifest.layers.iter().map(|l| l.digest.clone()).collect();
        load_archive(
            engine,
            &layout,
            &config_digest,
            &layers,
            vec![reference.clone()],
        )
        .await?;
        loaded = Some(reference.clone());
        st.finish(s);
    }

    let nbase = base.manifest.layers.len();
    let layers: Vec<LayerReport> = manifest
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
    Ok(BuildReport {
        name: spec.name.clone(),
        reference,
        oci_dir: opts.oci_dir.clone(),
        base: spec.base.clone(),
        base_digest: base.descriptor.digest.clone(),
        total_size: layers.iter().map(|l| l.size).sum(),
        layers,
        manifest: mdesc,
        config_digest,
        diff_id: layer.diff_id.clone(),
        layer_uncompressed_size: layer.uncompressed_size,
        layer_path,
        cache: if hit { "hit" } else { "miss" }.to_string(),
        cache_key,
        stages: st.times,
        container,
        loaded,
    })
}

const CACHE_TAG_PREFIX: &str = "wpimg-cache-";
const CACHE_CREATED_LABEL: &str = "io.wpimg.cache.created";
const CACHE_SIZE_LABEL: &str = "io.wpimg.cache.uncompressed-size";

fn cache_ref(repo: &Reference, key: &str) -> Option<Reference> {
    repo.with_tag(&format!("{CACHE_TAG_PREFIX}{key}")).ok()
}

/// Fetch a cache entry from `--cache-repo` (an image whose only layer is the cached layer).
async fn remote_cache_lookup(
    opts: &BuildOptions,
    repo: &Reference,
    key: &str,
    platform: &Platform,
    layout: &Layout,
    rep: &SharedReporter,
) -> Option<crate::cache::CacheEntry> {
    let r = cache_ref(repo, key)?;
    match opts.client.manifest_descriptor(&r, rep).await {
        Ok(Some(_)) => {}
        Ok(None) => return None,
        Err(e) => {
            rep.event(Event::Warning {
                message: format!("cache repository {}: {e}", repo.repo_path()),
            });
            return None;
        }
    }
    let pulled = match opts.client.pull_image(&r, platform, layout, rep).await {
        Ok(p) => p,
        Err(e) => {
            rep.event(Event::Warning {
                message: format!("cache repository {}: {e}", repo.repo_path()),
            });
            return None;
        }
    };
    let layer = pulled.manifest.layers.first()?.clone();
    let diff_id = pulled.config.rootfs.diff_ids.first()?.clone();
    let labels = pulled.config.config.labels.as_ref()?;
    let created = labels.get(CACHE_CREATED_LABEL)?.parse().ok()?;
    let uncompressed_size = labels.get(CACHE_SIZE_LABEL)?.parse().ok()?;
    let entry = crate::cache::CacheEntry {
        key: key.to_string(),
        uncompressed_size,
        layer,
        diff_id,
        created,
    };
    let _ = crate::cache::store(layout, &entry);
    rep.event(Event::Note {
        message: format!("cache hit in {}", repo.repo_path()),
    });
    Some(entry)
}

/// Push a cache entry to `--cache-repo` as a one-layer image tagged `wpimg-cache-KEY`.
async fn remote_cache_store(
    opts: &BuildOptions,
    repo: &Reference,
    entry: &crate::cache::CacheEntry,
    base: &ImageConfig,
    layout: &Layout,
    rep: &SharedReporter,
) -> Result<(), BuildError> {
    let Some(r) = cache_ref(repo, &entry.key) else {
        return Ok(());
    };
    let config = ImageConfig {
        created: Some(oci::rfc3339(entry.created)),
        author: None,
        architecture: base.architecture.clone(),
        os: base.os.clone(),
        variant: base.variant.clone(),
        config: oci::RuntimeConfig {
            labels: Some(BTreeMap::from([
                (CACHE_CREATED_LABEL.to_string(), entry.created.to_string()),
                (
                    CACHE_SIZE_LABEL.to_string(),
                    entry.uncompressed_size.to_string(),
                ),
            ])),
            ..Default::default()
        },
        rootfs: RootFs {
            kind: "layers".into(),
            diff_ids: vec![entry.diff_id.clone()],
        },
        history: vec![],
        _private: (),
    };
    let (cd, cs) = layout.write_blob(&oci::to_canonical_json(&config))?;
    let manifest = ImageManifest {
        schema_version: 2,
        media_type: Some(MEDIA_TYPE_OCI_MANIFEST.into()),
        config: Descriptor::new(MEDIA_TYPE_OCI_CONFIG, cd, cs),
        layers: vec![entry.layer.clone()],
        annotations: BTreeMap::new(),
    };
    let (md, ms) = layout.write_blob(&oci::to_canonical_json(&manifest))?;
    opts.client
        .push_image(
            layout,
            &Descriptor::new(MEDIA_TYPE_OCI_MANIFEST, md, ms),
            &r,
            &[],
            rep,
        )
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(())
}

async fn cancellable<T>(
    cancel: &CancellationToken,
    f: impl std::future::Future<Output = T>,
) -> Result<T, BuildError> {
    tokio::select! {
        r = f => Ok(r),
        _ = cancel.cancelled() => Err(BuildError::Interrupted),
    }
}

#[allow(clippy::too_many_arguments)]
async fn provision_and_extract(
    spec: &ImageSpec,
    engine: &dyn Engine,
    opts: &BuildOptions,
    rep: &SharedReporter,
    st: &mut Stages<'_>,
    layout: &Layout,
    id: &str,
    container: &str,
    info: &runtime::EngineInfo,
    stage: (String, Instant),
) -> Result<(LayerInfo, String), BuildError> {
    let run = ProvisionRun {
        playbook: spec.provision.playbook.clone(),
        container: container.to_string(),
        connection: spec
            .provision
            .connection
            .clone()
            .unwrap_or_else(|| provision::DEFAULT_CONNECTION.to_string()),
        pipelining: spec.provision.pipelining.unwrap_or(true),
        extra_vars: spec.provision.extra_vars.clone(),
        args: spec.provision.ansible_args.clone(),
        env: spec.provision.env.clone(),
        docker_host: opts.docker_host.clone(),
        docker_tls_cert_dir: opts.docker_tls_cert_dir.clone(),
    };
    cancellable(&opts.cancel, provision::run(&run, rep))
        .await?
        .map_err(|source| BuildError::Provision { source, kept: None })?;
    st.finish(stage);

    let s = st.start("layer");
    // Stop the keep-alive shell (and anything Ansible left running) so the filesystem is still.
    engine.kill(id).await?;
    let lopts = LayerOptions {
        compression: spec.layer.compression,
        level: spec.layer.level,
        excludes: spec.layer.exclude.clone(),
        source_date_epoch: oci::source_date_epoch(),
        threads: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        tee: opts.layer_tee.clone(),
    };
    let upper = match opts.layer_path {
        LayerPath::Api => None,
        LayerPath::Auto if !(info.local && info.storage_driver == "overlay2") => None,
        _ => engine.upper_dir(id).await?.filter(|p| p.is_dir()),
    };
    if opts.layer_path == LayerPath::Upperdir && upper.is_none() {
        return Err(BuildError::Base {
            reference: spec.base.clone(),
            message: "--layer-path upperdir needs a local Docker engine with the overlay2 storage driver and a readable upper directory".into(),
        });
    }
    let result = match upper {
        Some(dir) => {
            let layout = layout.clone();
            let info = cancellable(
                &opts.cancel,
                tokio::task::spawn_blocking(move || {
                    crate::layer::layer_from_dir(&dir, &layout, &lopts)
                }),
            )
            .await?
            .map_err(|e| std::io::Error::other(e.to_string()))??;
            (info, "upperdir".to_string())
        }
        None => {
            let info =
                cancellable(&opts.cancel, layer_via_api(engine, layout, id, lopts)).await??;
            (info, "api".to_string())
        }
    };
    st.finish(s);
    Ok(result)
}

/// Start the build container, provision it, read its layer, and always clean it up
/// (unless `--keep-on-error` and the play failed).
#[allow(clippy::too_many_arguments)]
async fn provision_container(
    spec: &ImageSpec,
    engine: &dyn Engine,
    opts: &BuildOptions,
    rep: &SharedReporter,
    st: &mut Stages<'_>,
    layout: &Layout,
    base_id: &str,
    container: &str,
    info: &runtime::EngineInfo,
) -> Result<(LayerInfo, String), BuildError> {
    let s = st.start("provision");
    let labels = [
        (runtime::BUILD_LABEL.to_string(), "1".to_string()),
        ("io.wpimg.image".to_string(), spec.name.clone()),
    ]
    .into_iter()
    .collect();
    let id = engine
        .start_keepalive(&ContainerSpec {
            image: base_id.to_string(),
            name: container.to_string(),
            labels,
            platform: spec.platform.clone(),
        })
        .await?;
    let produced =
        provision_and_extract(spec, engine, opts, rep, st, layout, &id, container, info, s).await;
    let keep = opts.keep_on_error && matches!(produced, Err(BuildError::Provision { .. }));
    if !keep {
        engine.remove(&id).await?;
    }
    match produced {
        Err(BuildError::Provision { source, .. }) => Err(BuildError::Provision {
            source,
            kept: keep.then(|| container.to_string()),
        }),
        other => other,
    }
}

/// Commit + save, then the top layer of the saved archive.
async fn layer_via_api(
    engine: &dyn Engine,
    layout: &Layout,
    id: &str,
    lopts: LayerOptions,
) -> Result<LayerInfo, BuildError> {
    use futures_util::StreamExt;
    use std::io::Write;
    let image = engine.commit(id).await?;
    let result = async {
        let mut tmp = tempfile::Builder::new()
            .prefix("wpimg-save-")
            .tempfile_in(layout.dir())?;
        let mut s = engine.save(&image);
        while let Some(chunk) = s.next().await {
            tmp.write_all(&chunk?)?;
        }
        tmp.flush()?;
        let layout = layout.clone();
        let info = tokio::task::spawn_blocking(move || -> Result<LayerInfo, BuildError> {
            let mut f = tmp.reopen()?;
            let top = top_layer_path(&mut f)?;
            f.rewind()?;
            let mut ar = tar::Archive::new(f);
            for e in ar.entries_with_seek()? {
                let e = e?;
                if e.path()?.to_string_lossy() == top {
                    let r = sniff_decompress(e)?;
                    return Ok(crate::layer::layer_from_tar(r, &layout, &lopts)?);
                }
            }
            Err(std::io::Error::other(format!("docker save archive has no {top}")).into())
        })
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))??;
        Ok::<_, BuildError>(info)
    }
    .await;
    let _ = engine.remove_image(&image).await;
    result
}

/// The path of the last layer in a docker-save archive, via its `manifest.json`.
fn top_layer_path(f: &mut std::fs::File) -> Result<String, BuildError> {
    #[derive(serde::Deserialize)]
    struct Entry {
        #[serde(rename = "Layers")]
        layers: Vec<String>,
    }
    let mut ar = tar::Archive::new(&mut *f);
    for e in ar.entries_with_seek()? {
        let mut e = e?;
        if e.path()?.to_string_lossy() == "manifest.json" {
            let mut s = String::new();
            e.read_to_string(&mut s)?;
            let m: Vec<Entry> = serde_json::from_str(&s)
                .map_err(|e| std::io::Error::other(format!("docker save manifest.json: {e}")))?;
            return m
                .into_iter()
                .next()
                .and_then(|e| e.layers.last().cloned())
                .ok_or_else(|| {
                    std::io::Error::other("docker save manifest.json lists no layers").into()
                });
        }
    }
    Err(std::io::Error::other("docker save archive has no manifest.json").into())
}

/// Newer engines may store layers compressed inside a save archive: sniff the gzip magic.
fn sniff_decompress<'a>(r: impl Read + 'a) -> std::io::Result<Box<dyn Read + 'a>> {
    let mut r = std::io::BufReader::with_capacity(1 << 20, r);
    let head = std::io::BufRead::fill_buf(&mut r)?;
    if head.starts_with(&[0x1f, 0x8b]) {
        Ok(Box::new(flate2::read::MultiGzDecoder::new(r)))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Ok(Box::new(zstd::stream::read::Decoder::with_buffer(r)?))
    } else {
        Ok(Box::new(r))
    }
}

/// Load an image from the layout into the engine (docker-archive stream, nothing on disk).
async fn load_archive(
    engine: &dyn Engine,
    layout: &Layout,
    config: &Digest,
    layers: &[Digest],
    tags: Vec<String>,
) -> Result<(), BuildError> {
    let (w, stream) = runtime::ChannelWriter::pair();
    let layout = layout.clone();
    let config = config.clone();
    let layers = layers.to_vec();
    let writer = tokio::task::spawn_blocking(move || {
        let mut w = w;
        match runtime::write_docker_archive(&layout, &config, &layers, &tags, &mut w) {
            Ok(()) => Ok(()),
            Err(e) => {
                let msg = e.to_string();
                w.fail(e);
                Err(std::io::Error::other(msg))
            }
        }
    });
    let loaded = engine.load(stream).await;
    let written = writer
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    loaded?;
    written?;
    Ok(())
}

/// Assemble the result's config and manifest from the base and the new layer (pure).
pub fn assemble(
    spec: &ImageSpec,
    base: &PulledImage,
    layer: &NewLayer,
    created: i64,
) -> Result<(ImageConfig, ImageManifest), BuildError> {
    let mut cfg = base.config.clone();
    let when = oci::rfc3339(created);
    cfg.created = Some(when.clone());
    if let Some(a) = &spec.image.author {
        cfg.author = Some(a.clone());
    }
    let img = &spec.image;
    let rc = &mut cfg.config;
    if let Some(v) = &img.entrypoint {
        rc.entrypoint = Some(v.clone());
        // Docker semantics: a new entrypoint resets an inherited cmd.
        if img.cmd.is_none() {
            rc.cmd = None;
        }
    }
    if let Some(v) = &img.cmd {
        rc.cmd = Some(v.clone());
    }
    if let Some(env) = &img.env {
        let mut list = rc.env.take().unwrap_or_default();
        for (k, v) in env {
            let prefix = format!("{k}=");
            list.retain(|e| !e.starts_with(&prefix));
            list.push(format!("{k}={v}"));
        }
        rc.env = Some(list);
    }
    if let Some(ports) = &img.expose {
        let m = rc.exposed_ports.get_or_insert_with(BTreeMap::new);
        for p in ports {
            m.insert(p.clone(), serde_json::json!({}));
        }
    }
    if let Some(labels) = &img.labels {
        let m = rc.labels.get_or_insert_with(BTreeMap::new);
        m.extend(labels.clone());
    }
    if let Some(u) = &img.user {
        rc.user = Some(u.clone());
    }
    if let Some(w) = &img.workdir {
        rc.working_dir = Some(w.clone());
    }
    if let Some(vols) = &img.volumes {
        let m = rc.volumes.get_or_insert_with(BTreeMap::new);
        for v in vols {
            m.insert(v.clone(), serde_json::json!({}));
        }
    }
    if let Some(s) = &img.stop_signal {
        rc.stop_signal = Some(s.clone());
    }
    if cfg.rootfs.kind.is_empty() {
        cfg.rootfs = RootFs {
            kind: "layers".into(),
            diff_ids: vec![],
        };
    }
    if cfg.rootfs.diff_ids.len() != base.manifest.layers.len() {
        return Err(BuildError::Base {
            reference: spec.base.clone(),
            message: format!(
                "config lists {} diff_ids but the manifest has {} layers",
                cfg.rootfs.diff_ids.len(),
                base.manifest.layers.len()
            ),
        });
    }
    cfg.rootfs.diff_ids.push(layer.diff_id.clone());
    cfg.history.push(History {
        created: Some(when),
        created_by: Some(format!(
            "wpimg {}: ansible-playbook {}",
            env!("CARGO_PKG_VERSION"),
            spec.provision
                .playbook
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default()
        )),
        comment: Some("provisioned by wpimg".into()),
        ..Default::default()
    });

    let mut layers: Vec<Descriptor> = base
        .manifest
        .layers
        .iter()
        .map(|l| {
            let mut d = l.clone();
            d.media_type = oci_layer_media_type(&l.media_type).to_string();
            d
        })
        .collect();
    layers.push(layer.descriptor.clone());
    let manifest = ImageManifest {
        schema_version: 2,
        media_type: Some(MEDIA_TYPE_OCI_MANIFEST.into()),
        // Filled in by the caller once the config blob is written.
        config: Descriptor::new(MEDIA_TYPE_OCI_CONFIG, Digest::of_bytes(b""), 0),
        layers,
        annotations: BTreeMap::new(),
    };
    Ok((cfg, manifest))
}

/// The OCI media type for a (possibly Docker) layer media type; the bytes are the same.
fn oci_layer_media_type(mt: &str) -> &str {
    match mt {
        oci::MEDIA_TYPE_DOCKER_LAYER_GZIP => oci::MEDIA_TYPE_OCI_LAYER_GZIP,
        "application/vnd.docker.image.rootfs.diff.tar" => oci::MEDIA_TYPE_OCI_LAYER_TAR,
        other => other,
    }
}

/// Default OCI layout directory for an image.yaml: `.wpimg/oci` next to it.
pub fn default_oci_dir(image_yaml: &Path) -> PathBuf {
    crate::spec::dir_of(image_yaml).join(".wpimg").join("oci")
}
