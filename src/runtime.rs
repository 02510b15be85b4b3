//! The container engine behind a small trait: Docker through its Engine API (bollard), and a
//! recording fake for unit tests.

use std::collections::HashMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::Duration;

use bollard::models::{ContainerConfig, ContainerCreateBody, HostConfig};
use bollard::query_parameters::{
    CommitContainerOptionsBuilder, CreateContainerOptionsBuilder, ImportImageOptionsBuilder,
    KillContainerOptionsBuilder, ListContainersOptionsBuilder, RemoveContainerOptionsBuilder,
    TagImageOptionsBuilder,
};
use bollard::Docker;
use bytes::Bytes;
use futures_util::{Stream, StreamExt};

/// A stream of bytes (image archives).
pub type ByteStream = Pin<Box<dyn Stream<Item = std::io::Result<Bytes>> + Send>>;

/// Label set on every container wpimg starts.
pub const BUILD_LABEL: &str = "io.wpimg.build";

/// Errors talking to the engine.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// No engine answered.
    #[error("no Docker engine answers at {host}: {source} (start dockerd, e.g. with scripts/setup, or set DOCKER_HOST)")]
    Unreachable {
        /// Where we looked.
        host: String,
        /// The cause.
        #[source]
        source: bollard::errors::Error,
    },
    /// An API call failed.
    #[error("Docker engine: {what}: {source}")]
    Api {
        /// The call.
        what: String,
        /// The cause.
        #[source]
        source: bollard::errors::Error,
    },
    /// Local I/O.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

fn api(what: impl Into<String>) -> impl FnOnce(bollard::errors::Error) -> RuntimeError {
    let what = what.into();
    move |source| RuntimeError::Api { what, source }
}

/// Facts about the engine.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EngineInfo {
    /// Engine version.
    pub version: String,
    /// Negotiated API version.
    pub api_version: String,
    /// Storage driver (e.g. `overlay2`).
    pub storage_driver: String,
    /// Whether the engine runs on this machine (unix socket), so its files are readable here.
    pub local: bool,
}

/// What to run as the build container.
#[derive(Debug, Clone, Default)]
pub struct ContainerSpec {
    /// Image (ID or reference).
    pub image: String,
    /// Container name.
    pub name: String,
    /// Labels.
    pub labels: HashMap<String, String>,
    /// Platform (`linux/amd64`), if any.
    pub platform: Option<String>,
}

/// The container engine operations wpimg needs.
#[async_trait::async_trait]
pub trait Engine: Send + Sync {
    /// Check the engine answers.
    async fn info(&self) -> Result<EngineInfo, RuntimeError>;
    /// Whether an image (ID or reference) exists.
    async fn image_exists(&self, image: &str) -> Result<bool, RuntimeError>;
    /// Load a docker-archive tar (`docker load`).
    async fn load(&self, archive: ByteStream) -> Result<(), RuntimeError>;
    /// Tag an image.
    async fn tag(&self, image: &str, repo: &str, tag: &str) -> Result<(), RuntimeError>;
    /// Create and start a keep-alive container; returns its ID.
    async fn start_keepalive(&self, spec: &ContainerSpec) -> Result<String, RuntimeError>;
    /// Stop a container's processes (SIGKILL), keeping its filesystem.
    async fn kill(&self, id: &str) -> Result<(), RuntimeError>;
    /// Remove a container (forced).
    async fn remove(&self, id: &str) -> Result<(), RuntimeError>;
    /// The overlayfs upper directory of a container, when the engine uses overlay2.
    async fn upper_dir(&self, id: &str) -> Result<Option<PathBuf>, RuntimeError>;
    /// Commit a container; returns the new image ID.
    async fn commit(&self, id: &str) -> Result<String, RuntimeError>;
    /// Export an image as a docker-archive tar (`docker save`).
    fn save(&self, image: &str) -> ByteStream;
    /// Remove an image.
    async fn remove_image(&self, image: &str) -> Result<(), RuntimeError>;
    /// Names of containers carrying a label.
    async fn containers_with_label(&self, label: &str) -> Result<Vec<String>, RuntimeError>;
}

/// Docker through the Engine API.
pub struct DockerEngine {
    docker: Docker,
    host: String,
}

impl DockerEngine {
    /// Connect using `DOCKER_HOST` (unix or tcp; TLS with `DOCKER_TLS_VERIFY`/`DOCKER_CERT_PATH`)
    /// and negotiate the API version.
    pub async fn connect() -> Result<Self, RuntimeError> {
        let host =
            std::env::var("DOCKER_HOST").unwrap_or_else(|_| "unix:///var/run/docker.sock".into());
        let unreachable = |source| RuntimeError::Unreachable {
            host: host.clone(),
            source,
        };
        // `docker save` on Docker 20.10 stages the whole image before the first byte.
        let docker = Docker::connect_with_defaults()
            .map_err(unreachable)?
            .with_timeout(Duration::from_secs(3600));
        let docker = docker.negotiate_version().await.map_err(unreachable)?;
        docker.ping().await.map_err(unreachable)?;
        Ok(Self { docker, host })
    }

    /// Where the engine was reached.
    pub fn host(&self) -> &str {
        &self.host
    }
}

#[async_trait::async_trait]
impl Engine for DockerEngine {
    async fn info(&self) -> Result<EngineInfo, RuntimeError> {
        let v = self.docker.version().await.map_err(api("version"))?;
        let i = self.docker.info().await.map_err(api("info"))?;
        Ok(EngineInfo {
            version: v.version.unwrap_or_default(),
            api_version: self.docker.client_version().to_string(),
            storage_driver: i.driver.unwrap_or_default(),
            local: self.host.starts_with("unix://"),
        })
    }

    async fn image_exists(&self, image: &str) -> Result<bool, RuntimeError> {
        match self.docker.inspect_image(image).await {
            Ok(_) => Ok(true),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(false),
            Err(e) => Err(api(format!("inspect image {image}"))(e)),
        }
    }

    async fn load(&self, archive: ByteStream) -> Result<(), RuntimeError> {
        let opts = ImportImageOptionsBuilder::default().quiet(true).build();
        let mut s = self.docker.import_image_stream(opts, archive, None);
        while let Some(r) = s.next().await {
            r.map_err(api("load image"))?;
        }
        Ok(())
    }

    async fn tag(&self, image: &str, repo: &str, tag: &str) -> Result<(), RuntimeError> {
        let opts = TagImageOptionsBuilder::default()
            .repo(repo)
            .tag(tag)
            .build();
        self.docker
            .tag_image(image, Some(opts))
            .await
            .map_err(api(format!("tag {image} as {repo}:{tag}")))
    }

    async fn start_keepalive(&self, spec: &ContainerSpec) -> Result<String, RuntimeError> {
        let mut opts = CreateContainerOptionsBuilder::default().name(&spec.name);
        if let Some(p) = &spec.platform {
            opts = opts.platform(p);
        }
        // Like Packer's docker builder: an interactive shell waiting on stdin keeps it alive,
        // whatever the base's own entrypoint/cmd/user are.
        let body = ContainerCreateBody {
            image: Some(spec.image.clone()),
            entrypoint: Some(vec!["/bin/sh".into()]),
            cmd: Some(vec![]),
            user: Some("0:0".into()),
            working_dir: Some("/".into()),
            tty: Some(true),
            open_stdin: Some(true),
            attach_stdin: Some(false),
            labels: Some(spec.labels.clone()),
            host_config: Some(HostConfig {
                init: Some(false),
                ..Default::default()
            }),
            ..Default::default()
        };
        let created = self
            .docker
            .create_container(Some(opts.build()), body)
            .await
            .map_err(api(format!("create container {}", spec.name)))?;
        if let Err(e) = self.docker.start_container(&created.id, None).await {
            let _ = self.remove(&created.id).await;
            return Err(api(format!("start container {}", spec.name))(e));
        }
        Ok(created.id)
    }

    async fn kill(&self, id: &str) -> Result<(), RuntimeError> {
        let opts = KillContainerOptionsBuilder::default()
            .signal("KILL")
            .build();
        match self.docker.kill_container(id, Some(opts)).await {
            Ok(()) => Ok(()),
            // Already stopped.
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 409, ..
            }) => Ok(()),
            Err(e) => Err(api(format!("stop container {id}"))(e)),
        }
    }

    async fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        let opts = RemoveContainerOptionsBuilder::default()
            .force(true)
            .v(true)
            .build();
        match self.docker.remove_container(id, Some(opts)).await {
            Ok(()) => Ok(()),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(()),
            Err(e) => Err(api(format!("remove container {id}"))(e)),
        }
    }

    async fn upper_dir(&self, id: &str) -> Result<Option<PathBuf>, RuntimeError> {
        let c = self
            .docker
            .inspect_container(id, None)
            .await
            .map_err(api(format!("inspect container {id}")))?;
        Ok(c.graph_driver
            .filter(|g| g.name == "overlay2")
            .and_then(|g| g.data.get("UpperDir").cloned())
            .map(PathBuf::from))
    }

    async fn commit(&self, id: &str) -> Result<String, RuntimeError> {
        let opts = CommitContainerOptionsBuilder::default()
            .container(id)
            .pause(true)
            .build();
        let r = self
            .docker
            .commit_container(opts, ContainerConfig::default())
            .await
            .map_err(api(format!("commit container {id}")))?;
        Ok(r.id)
    }

    fn save(&self, image: &str) -> ByteStream {
        let what = format!("save image {image}");
        Box::pin(
            self.docker
                .export_image(image)
                .map(move |r| r.map_err(|e| std::io::Error::other(format!("{what}: {e}")))),
        )
    }

    async fn remove_image(&self, image: &str) -> Result<(), RuntimeError> {
        let opts = bollard::query_parameters::RemoveImageOptionsBuilder::default()
            .force(true)
            .build();
        match self.docker.remove_image(image, Some(opts), None).await {
            Ok(_) => Ok(()),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(()),
            Err(e) => Err(api(format!("remove image {image}"))(e)),
        }
    }

    async fn containers_with_label(&self, label: &str) -> Result<Vec<String>, RuntimeError> {
        let mut filters = HashMap::new();
        filters.insert("label".to_string(), vec![label.to_string()]);
        let opts = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        let list = self
            .docker
            .list_containers(Some(opts))
            .await
            .map_err(api("list containers"))?;
        Ok(list
            .into_iter()
            .filter_map(|c| c.names.and_then(|n| n.into_iter().next()))
            .map(|n| n.trim_start_matches('/').to_string())
            .collect())
    }
}

/// A fake engine that records calls, for unit tests of the build stages.
#[derive(Default)]
pub struct FakeEngine {
    /// Every call, in order (`"start_keepalive NAME"`, `"remove ID"`, ...).
    pub calls: Mutex<Vec<String>>,
    /// Images reported as present.
    pub images: Mutex<Vec<String>>,
    /// Upper dir to report for every container.
    pub upper: Option<PathBuf>,
    /// Make `start_keepalive` fail.
    pub fail_start: bool,
}

impl FakeEngine {
    fn record(&self, s: String) {
        if let Ok(mut c) = self.calls.lock() {
            c.push(s);
        }
    }

    /// The recorded calls.
    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().map(|c| c.clone()).unwrap_or_default()
    }
}

#[async_trait::async_trait]
impl Engine for FakeEngine {
    async fn info(&self) -> Result<EngineInfo, RuntimeError> {
        self.record("info".into());
        Ok(EngineInfo {
            version: "fake".into(),
            api_version: "1.41".into(),
            storage_driver: "overlay2".into(),
            local: true,
        })
    }
    async fn image_exists(&self, image: &str) -> Result<bool, RuntimeError> {
        self.record(format!("image_exists {image}"));
        Ok(self
            .images
            .lock()
            .map(|i| i.iter().any(|x| x == image))
            .unwrap_or(false))
    }
    async fn load(&self, mut archive: ByteStream) -> Result<(), RuntimeError> {
        let mut n = 0;
        while let Some(b) = archive.next().await {
            n += b?.len();
        }
        self.record(format!("load {n}"));
        Ok(())
    }
    async fn tag(&self, image: &str, repo: &str, tag: &str) -> Result<(), RuntimeError> {
        self.record(format!("tag {image} {repo}:{tag}"));
        Ok(())
    }
    async fn start_keepalive(&self, spec: &ContainerSpec) -> Result<String, RuntimeError> {
        self.record(format!("start_keepalive {}", spec.name));
        if self.fail_start {
            return Err(RuntimeError::Io(std::io::Error::other(
                "fake start failure",
            )));
        }
        Ok(format!("id-{}", spec.name))
    }
    async fn kill(&self, id: &str) -> Result<(), RuntimeError> {
        self.record(format!("kill {id}"));
        Ok(())
    }
    async fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        self.record(format!("remove {id}"));
        Ok(())
    }
    async fn upper_dir(&self, id: &str) -> Result<Option<PathBuf>, RuntimeError> {
        self.record(format!("upper_dir {id}"));
        Ok(self.upper.clone())
    }
    async fn commit(&self, id: &str) -> Result<String, RuntimeError> {
        self.record(format!("commit {id}"));
        Ok("sha256:fake".into())
    }
    fn save(&self, image: &str) -> ByteStream {
        self.record(format!("save {image}"));
        Box::pin(futures_util::stream::empty())
    }
    async fn remove_image(&self, image: &str) -> Result<(), RuntimeError> {
        self.record(format!("remove_image {image}"));
        Ok(())
    }
    async fn containers_with_label(&self, label: &str) -> Result<Vec<String>, RuntimeError> {
        self.record(format!("containers_with_label {label}"));
        Ok(vec![])
    }
}

/// Write a docker-archive (the `docker load` format) of an image in the layout: config,
/// layer blobs as they are (Docker decompresses them on load), `manifest.json` last.
pub fn write_docker_archive(
    layout: &crate::layout::Layout,
    config: &crate::oci::Digest,
    layers: &[crate::oci::Digest],
    repo_tags: &[String],
    out: impl std::io::Write,
) -> std::io::Result<()> {
    let mut b = tar::Builder::new(out);
    let add =
        |b: &mut tar::Builder<_>, name: &str, d: &crate::oci::Digest| -> std::io::Result<()> {
            let f = layout
                .open_blob(d)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            let len = f.metadata()?.len();
            let mut h = tar::Header::new_ustar();
            h.set_size(len);
            h.set_mode(0o644);
            h.set_mtime(0);
            h.set_entry_type(tar::EntryType::Regular);
            b.append_data(&mut h, name, f)
        };
    let cfg_name = format!("{}.json", config.hex());
    add(&mut b, &cfg_name, config)?;
    let mut names = Vec::new();
    for d in layers {
        let n = format!("{}/layer.tar", d.hex());
        if !names.contains(&n) {
            add(&mut b, &n, d)?;
        }
        names.push(n);
    }
    let manifest = serde_json::json!([{
        "Config": cfg_name,
        "RepoTags": repo_tags,
        "Layers": names,
    }]);
    let bytes = serde_json::to_vec(&manifest).map_err(std::io::Error::other)?;
    let mut h = tar::Header::new_ustar();
    h.set_size(bytes.len() as u64);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_entry_type(tar::EntryType::Regular);
    b.append_data(&mut h, "manifest.json", bytes.as_slice())?;
    b.into_inner()?.flush()
}

/// A `Write` that sends chunks into a channel, turning blocking writers into a [`ByteStream`].
pub struct ChannelWriter {
    tx: tokio::sync::mpsc::Sender<std::io::Result<Bytes>>,
    buf: Vec<u8>,
}

const CHANNEL_CHUNK: usize = 1 << 20;

impl ChannelWriter {
    /// A writer and the stream that yields what it writes.
    pub fn pair() -> (Self, ByteStream) {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let s = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        (
            Self {
                tx,
                buf: Vec::with_capacity(CHANNEL_CHUNK),
            },
            Box::pin(s),
        )
    }

    /// Report a failure to the reading side.
    pub fn fail(self, e: std::io::Error) {
        let _ = self.tx.blocking_send(Err(e));
    }

    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(
            &mut self.buf,
            Vec::with_capacity(CHANNEL_CHUNK),
        ));
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "reader went away"))
    }
}

impl std::io::Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHANNEL_CHUNK {
            self.send()?;
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.send()
    }
}

impl Drop for ChannelWriter {
    fn drop(&mut self) {
        let _ = self.send();
    }
}
