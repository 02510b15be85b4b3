//! What every part of a build shares: the spec, the engine, the layout, the options, the
//! reporter, cancellation, stage timers and the streamed upload of the new layer.

use std::future::Future;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

use super::extract::LayerPath;
use super::stage::Stages;
use super::BuildError;
use crate::events::Event;
use crate::events::SharedReporter;
use crate::layout::Layout;
use crate::oci::Descriptor;
use crate::provision::{Accelerator, AnsiblePlaybook, Mitogen, Provisioner};
use crate::reference::Reference;
use crate::registry::{BlobStream, Client, StreamWriter};
use crate::runtime::Engine;
use crate::spec::ImageSpec;

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
        let mitogen = find_accelerator(spec, &reporter)?;
        Ok(Self {
            mitogen,
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
        })
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

    /// Give the streamed upload up (the layer came from the cache).
    pub(crate) fn abort_layer_upload(&self) {
        if let Some(u) = self.layer_upload.lock().ok().and_then(|mut u| u.take()) {
            u.stream.abort();
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
