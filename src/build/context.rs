//! What every part of a build shares: the spec, the engine, the layout, the options, the
//! reporter, cancellation, stage timers and the streamed upload of the new layer.

use std::future::Future;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

use super::extract::LayerPath;
use super::platforms::PlatformEngine;
use super::stage::Stages;
use super::BuildError;
use crate::events::{Event, PlatformReporter, SharedReporter};
use crate::layout::Layout;
use crate::oci::{Descriptor, Platform};
use crate::provision::{Accelerator, AnsiblePlaybook, Mitogen, Provisioner};
use crate::reference::Reference;
use crate::registry::{BlobStream, Client, StreamWriter};
use crate::runtime::Engine;
use crate::secrets::{LeakFound, LeakScanner, MIN_SCANNED_LEN};
use crate::spec::ImageSpec;

/// How long a build waits at its end for container removals still running in the background.
pub const SETTLE_DEADLINE: std::time::Duration = std::time::Duration::from_secs(120);
/// How long a failed build waits for the registry to discard its streamed upload.
const DISCARD_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

/// Options of a build that do not come from image.yaml.
#[derive(Debug, Clone, Default)]
pub struct BuildOptions {
    /// The local OCI layout.
    pub oci_dir: PathBuf,
    /// Keep the build container when provisioning fails.
    pub keep_on_error: bool,
    /// Also load the result into the Docker engine as `NAME:TAG`.
    pub load: bool,
    /// Layer path choice.
    pub layer_path: LayerPath,
    /// Do not reuse a cached layer (a fresh one is still stored).
    pub no_cache: bool,
    /// Registry repository sharing the build cache between machines (`--cache-repo`).
    pub cache_repo: Option<Reference>,
    /// `DOCKER_HOST` handed to Ansible (when the engine was named by `DOCKER_HOST`).
    pub docker_host: Option<String>,
    /// TLS certificate directory handed to Ansible with `docker_host`.
    pub docker_tls_cert_dir: Option<PathBuf>,
}

/// A streaming upload of the new layer while it is compressed (`build --push` to a plain
/// registry): the layer writer takes its writer, then the build finishes the upload with the
/// layer's digest, or aborts it (cache hit, failure, or dropped unused).
pub struct LayerUpload {
    writer: Option<StreamWriter>,
    stream: BlobStream,
}

impl LayerUpload {
    /// An upload from the two ends a registry client's `stream_blob` returns.
    pub fn new(writer: StreamWriter, stream: BlobStream) -> Self {
        Self {
            writer: Some(writer),
            stream,
        }
    }
}

/// The shared state of one build.
pub struct BuildContext<'a> {
    /// The image.yaml.
    pub spec: &'a ImageSpec,
    /// The container engine.
    pub engine: Arc<dyn Engine>,
    /// The registry client (base pull, cache repository).
    pub client: &'a Client,
    /// Options from the command line.
    pub options: BuildOptions,
    /// Progress.
    pub reporter: SharedReporter,
    cancel: CancellationToken,
    provisioner: Arc<dyn Provisioner>,
    mitogen: Option<Mitogen>,
    layout: Layout,
    stages: Stages,
    layer_upload: Mutex<Option<LayerUpload>>,
    background: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    platform_engines: Vec<(Platform, PlatformEngine)>,
    leak_scan: Option<Arc<LeakScanner>>,
}

impl<'a> BuildContext<'a> {
    /// A build of `spec` on `engine` (opens or creates the layout; finds Mitogen for
    /// `provision.accelerator: mitogen`, a bad-input error when it is missing).
    pub fn new(
        spec: &'a ImageSpec,
        engine: Arc<dyn Engine>,
        client: &'a Client,
        options: BuildOptions,
        reporter: SharedReporter,
    ) -> Result<Self, BuildError> {
        let secrets = &spec.source.secret_values;
        for name in secrets.too_short() {
            reporter.event(Event::Warning {
                message: format!(
                    "secret {name:?} is shorter than {MIN_SCANNED_LEN} bytes: the new layers and \
                     the config are not scanned for it"
                ),
            });
        }
        let mitogen = find_accelerator(spec, &reporter)?;
        Ok(Self {
            mitogen,
            leak_scan: LeakScanner::new(secrets),
            layout: Layout::open_or_create(&options.oci_dir)?,
            stages: Stages::new(reporter.clone()),
            spec,
            engine,
            client,
            options,
            reporter,
            cancel: CancellationToken::new(),
            provisioner: Arc::new(AnsiblePlaybook),
            layer_upload: Mutex::new(None),
            background: Mutex::new(Vec::new()),
            platform_engines: Vec::new(),
        })
    }

    /// Build `platform` of a multi-platform build on `engine` (`--engine PLATFORM=URL`)
    /// instead of the build's own engine.
    pub fn with_platform_engine(mut self, platform: Platform, engine: PlatformEngine) -> Self {
        self.platform_engines.retain(|(p, _)| *p != platform);
        self.platform_engines.push((platform, engine));
        self
    }

    /// The engine `platform` builds on: its own (`--engine`), else the build's.
    pub fn engine_for(&self, platform: &Platform) -> PlatformEngine {
        if let Some((_, e)) = self.platform_engines.iter().find(|(p, _)| p == platform) {
            return e.clone();
        }
        PlatformEngine {
            engine: self.engine.clone(),
            host: self
                .options
                .docker_host
                .clone()
                .unwrap_or_else(|| crate::runtime::DEFAULT_DOCKER_HOST.to_string()),
            docker_host: self.options.docker_host.clone(),
            docker_tls_cert_dir: self.options.docker_tls_cert_dir.clone(),
        }
    }

    /// The context of `platform`'s part of a multi-platform build: this build's spec, layout,
    /// client and options on `engine`, its own stage timers, events marked with the platform,
    /// stopped by `cancel`, no streamed upload.
    pub(crate) fn for_platform(
        &self,
        platform: &Platform,
        engine: &PlatformEngine,
        cancel: CancellationToken,
    ) -> BuildContext<'a> {
        let reporter = PlatformReporter::shared(self.reporter.clone(), platform.to_string());
        BuildContext {
            spec: self.spec,
            engine: engine.engine.clone(),
            client: self.client,
            options: BuildOptions {
                docker_host: engine.docker_host.clone(),
                docker_tls_cert_dir: engine.docker_tls_cert_dir.clone(),
                ..self.options.clone()
            },
            stages: Stages::new(reporter.clone()),
            reporter,
            cancel,
            provisioner: self.provisioner.clone(),
            layout: self.layout.clone(),
            layer_upload: Mutex::new(None),
            background: Mutex::new(Vec::new()),
            platform_engines: Vec::new(),
            leak_scan: self.leak_scan.clone(),
            mitogen: self.mitogen.clone(),
        }
    }

    /// The build's cancellation (a platform's part is cancelled with it).
    pub(crate) fn cancel_token(&self) -> &CancellationToken {
        &self.cancel
    }

    /// Stop at the next stage boundary, or inside the running stage, when `cancel` fires.
    pub fn with_cancel(mut self, cancel: CancellationToken) -> Self {
        self.cancel = cancel;
        self
    }

    /// Provision with `provisioner` instead of `ansible-playbook` (unit tests).
    pub fn with_provisioner(mut self, provisioner: Arc<dyn Provisioner>) -> Self {
        self.provisioner = provisioner;
        self
    }

    /// The provisioner.
    pub fn provisioner(&self) -> &dyn Provisioner {
        self.provisioner.as_ref()
    }

    /// Mitogen, when provisioning runs under it (`provision.accelerator: mitogen`).
    pub fn mitogen(&self) -> Option<&Mitogen> {
        self.mitogen.as_ref()
    }

    /// Stream the new layer to a registry while it is compressed.
    pub fn with_layer_upload(self, upload: LayerUpload) -> Self {
        if let Ok(mut u) = self.layer_upload.lock() {
            *u = Some(upload);
        }
        self
    }

    /// The local layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The stage timers.
    pub fn stages(&self) -> &Stages {
        &self.stages
    }

    /// Where a run's private files go (`tmp/` of the layout): never the system temp dir.
    pub fn state_dir(&self) -> PathBuf {
        self.layout.dir().join("tmp")
    }

    /// The scanner for the build's secrets (none without secrets long enough to scan for).
    pub fn leak_scanner(&self) -> Option<Arc<LeakScanner>> {
        self.leak_scan.clone()
    }

    /// Fail when a build secret is in an image's config (before the config is stored).
    pub fn scan_config(&self, image: &crate::oci::Image) -> Result<(), LeakFound> {
        let Some(scanner) = &self.leak_scan else {
            return Ok(());
        };
        match scanner.find_in_json(&image.raw_config) {
            Some((hit, path)) => Err(LeakFound {
                secret: hit.secret.to_string(),
                location: format!("the image config ({path})"),
            }),
            None => Ok(()),
        }
    }

    /// Run `f` unless the build is cancelled first (then [`BuildError::Interrupted`]; `f` is
    /// dropped, which kills a running ansible-playbook).
    pub async fn cancellable<T>(&self, f: impl Future<Output = T>) -> Result<T, BuildError> {
        tokio::select! {
            r = f => Ok(r),
            _ = self.cancel.cancelled() => Err(BuildError::Interrupted),
        }
    }

    /// Run `f` as stage `name`: timed, cancellable.
    pub async fn stage<T, E: Into<BuildError>>(
        &self,
        name: &str,
        f: impl Future<Output = Result<T, E>>,
    ) -> Result<T, BuildError> {
        let timer = self.stages.start(name);
        let out = self.cancellable(f).await?.map_err(Into::into)?;
        timer.finish();
        Ok(out)
    }

    /// The writer of the streamed upload, for the first layer that is produced.
    pub(crate) fn take_layer_writer(&self) -> Option<Box<dyn Write + Send>> {
        let mut u = self.layer_upload.lock().ok()?;
        let w = u.as_mut()?.writer.take()?;
        Some(Box::new(w))
    }

    /// Complete the streamed upload as `layer` (a failure is a note: the push uploads it).
    pub(crate) async fn finish_layer_upload(&self, layer: &Descriptor) {
        let upload = self.layer_upload.lock().ok().and_then(|mut u| u.take());
        let Some(LayerUpload { writer, stream }) = upload else {
            return;
        };
        drop(writer);
        // On failure the upload task has said why; the push uploads the blob.
        let _ = stream.finish(&layer.digest, layer.size).await;
    }

    /// Run `task` in the background (container removals); [`BuildContext::settle`] waits for it.
    pub(crate) fn spawn_background(&self, task: impl Future<Output = ()> + Send + 'static) {
        let handle = tokio::spawn(task);
        if let Ok(mut b) = self.background.lock() {
            b.push(handle);
        }
    }

    /// Wait (at most [`SETTLE_DEADLINE`]) for what runs in the background.
    pub async fn settle(&self) {
        let tasks: Vec<_> = self
            .background
            .lock()
            .map(|mut b| std::mem::take(&mut *b))
            .unwrap_or_default();
        let all = futures_util::future::join_all(tasks);
        let _ = tokio::time::timeout(SETTLE_DEADLINE, all).await;
    }

    /// Give the streamed upload up (the layer came from the cache).
    pub(crate) fn abort_layer_upload(&self) {
        if let Some(u) = self.layer_upload.lock().ok().and_then(|mut u| u.take()) {
            u.stream.abort();
        }
    }

    /// Give the streamed upload up after a failed or interrupted build, and wait until the
    /// registry was told to discard it.
    pub async fn discard_layer_upload(&self) {
        let upload = self.layer_upload.lock().ok().and_then(|mut u| u.take());
        if let Some(LayerUpload { writer, stream }) = upload {
            drop(writer);
            stream.discard(DISCARD_DEADLINE).await;
        }
    }
}

/// Mitogen for `provision.accelerator: mitogen` (at `provision.mitogen_path`, relative to
/// image.yaml, or in ansible-playbook's Python), said in a note.
fn find_accelerator(
    spec: &ImageSpec,
    reporter: &SharedReporter,
) -> Result<Option<Mitogen>, BuildError> {
    let p = &spec.provision;
    if p.accelerator() != Accelerator::Mitogen {
        return Ok(None);
    }
    let at = p.mitogen_path.as_ref().map(|m| spec.source.dir.join(m));
    let mitogen = Mitogen::find(at.as_deref(), &p.env.clone().unwrap_or_default())?;
    if let Some(conn) = p
        .connection
        .as_deref()
        .filter(|c| c.ends_with("docker_api"))
    {
        reporter.event(Event::Warning {
            message: format!("provision.connection {conn} is not used: Mitogen runs over the `docker` connection (the docker CLI)"),
        });
    }
    reporter.event(Event::Note {
        message: format!(
            "accelerator: Mitogen {} ({}), strategy {}",
            mitogen.version,
            mitogen.package.display(),
            crate::provision::MITOGEN_STRATEGY
        ),
    });
    Ok(Some(mitogen))
}
