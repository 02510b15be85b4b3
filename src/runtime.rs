//! The container engine behind a small trait: Docker through its Engine API (bollard), and a
//! recording fake for unit tests.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Mutex;
use std::time::Duration;

use bollard::models::{ContainerConfig, ContainerCreateBody, HostConfig};
use bollard::query_parameters::{
    CommitContainerOptionsBuilder, CreateContainerOptionsBuilder, ImportImageOptionsBuilder,
    KillContainerOptionsBuilder, ListContainersOptionsBuilder, RemoveContainerOptionsBuilder,
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
    #[error("no Docker engine answers at {host}{} (start dockerd, e.g. with scripts/setup, or set DOCKER_HOST)", tls_note(.tls))]
    Unreachable {
        /// Where we looked.
        host: String,
        /// The certificate directory, when TLS was used.
        tls: Option<PathBuf>,
        /// The cause.
        #[source]
        source: bollard::errors::Error,
    },
    /// `DOCKER_HOST` (or the TLS variables) cannot be used.
    #[error("DOCKER_HOST={host:?}: {reason}")]
    BadHost {
        /// The value.
        host: String,
        /// What is wrong.
        reason: String,
    },
    /// A TLS file for the engine is missing or unusable.
    #[error("Docker engine at {host}: TLS file {}: {reason} (DOCKER_CERT_PATH must hold ca.pem, cert.pem and key.pem, as for the docker CLI)", path.display())]
    TlsFile {
        /// The engine.
        host: String,
        /// The file at fault.
        path: PathBuf,
        /// What is wrong.
        reason: String,
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

impl crate::error::HasKind for RuntimeError {
    fn kind(&self) -> crate::error::ErrorKind {
        crate::error::ErrorKind::Failure
    }
}

fn tls_note(tls: &Option<PathBuf>) -> String {
    match tls {
        Some(dir) => format!(" (TLS, certificates from {})", dir.display()),
        None => String::new(),
    }
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
    /// The engine's own platform (`linux/amd64`): what it runs without emulation.
    pub platform: String,
}

/// How a container run to its end ([`Engine::run_to_end`]) ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOutcome {
    /// Its exit code; `None` when it could not start or did not end in time.
    pub exit_code: Option<i64>,
    /// Its output (stdout and stderr, the last few KiB), or why it did not run.
    pub output: String,
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
    /// Named volumes mounted in the container: (volume, absolute path).
    pub volumes: Vec<(String, String)>,
}

/// A named volume of the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeInfo {
    /// Its name.
    pub name: String,
    /// Its labels.
    pub labels: HashMap<String, String>,
    /// Where its data is on the engine's host.
    pub mountpoint: String,
}

/// A container or image with its labels.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Labelled {
    /// Its ID.
    pub id: String,
    /// Its name (containers; images: empty).
    pub name: String,
    /// Its labels.
    pub labels: HashMap<String, String>,
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
    /// Create a named volume (nothing happens when it exists).
    async fn create_volume(
        &self,
        name: &str,
        labels: &HashMap<String, String>,
    ) -> Result<(), RuntimeError>;
    /// Volumes carrying a label (`KEY` or `KEY=VALUE`).
    async fn volumes_with_label(&self, label: &str) -> Result<Vec<VolumeInfo>, RuntimeError>;
    /// Remove a volume; `false` when a container still uses it.
    async fn remove_volume(&self, name: &str) -> Result<bool, RuntimeError>;
    /// Create (never start) a container named `name` of `image`: an engine-wide mutex. `false`
    /// when a container of that name exists.
    async fn create_marker(
        &self,
        name: &str,
        image: &str,
        labels: &HashMap<String, String>,
    ) -> Result<bool, RuntimeError>;
    /// The labels of a container, `None` when there is none of that name.
    async fn container_labels(
        &self,
        name: &str,
    ) -> Result<Option<HashMap<String, String>>, RuntimeError>;
    /// Run a container of `spec` (its image's entrypoint, no network) to its end, waiting at
    /// most `timeout`, and remove it: its exit code and output.
    async fn run_to_end(
        &self,
        spec: &ContainerSpec,
        timeout: Duration,
    ) -> Result<RunOutcome, RuntimeError>;
    /// Containers (running or not) carrying a label, with their labels.
    async fn labelled_containers(&self, label: &str) -> Result<Vec<Labelled>, RuntimeError>;
    /// Images carrying a label, with their labels.
    async fn labelled_images(&self, label: &str) -> Result<Vec<Labelled>, RuntimeError>;
    /// Rename a container.
    async fn rename(&self, id: &str, name: &str) -> Result<(), RuntimeError>;
}

/// How much of a container's output [`Engine::run_to_end`] keeps (the end of it).
const RUN_OUTPUT_MAX: usize = 4096;

/// Where the engine listens when `DOCKER_HOST` is not set.
pub const DEFAULT_DOCKER_HOST: &str = "unix:///var/run/docker.sock";
/// How long connecting and the first API answer may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Per-request timeout: `docker save` on Docker 20.10 stages the whole image before the first byte.
const REQUEST_TIMEOUT_SECS: u64 = 3600;

/// Where and how to reach the engine, read from the environment like the docker CLI does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineEndpoint {
    /// `unix:///PATH` or `tcp://HOST:PORT` (a missing port defaults to 2375, or 2376 with TLS).
    pub host: String,
    /// Directory holding `ca.pem`, `cert.pem` and `key.pem` when TLS is used.
    pub tls_cert_dir: Option<PathBuf>,
    /// Whether `DOCKER_HOST` was set (it is then handed on to Ansible).
    pub from_docker_host: bool,
}

impl EngineEndpoint {
    /// From `DOCKER_HOST`, `DOCKER_TLS_VERIFY`, `DOCKER_TLS` and `DOCKER_CERT_PATH` (empty values
    /// count as unset, as for the docker CLI).
    pub fn from_env() -> Result<Self, RuntimeError> {
        Self::from_vars(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
    }

    /// Like [`EngineEndpoint::from_env`], reading variables through `var`.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self, RuntimeError> {
        let given = var("DOCKER_HOST");
        let raw = given
            .clone()
            .unwrap_or_else(|| DEFAULT_DOCKER_HOST.to_string());
        let bad = |reason: &str| RuntimeError::BadHost {
            host: raw.clone(),
            reason: reason.to_string(),
        };
        let verify = var("DOCKER_TLS_VERIFY").is_some();
        let (scheme, rest) = match raw.split_once("://") {
            Some((s, r)) => (s.to_ascii_lowercase(), r),
            None => ("tcp".to_string(), raw.as_str()),
        };
        let cert_dir = || {
            var("DOCKER_CERT_PATH")
                .map(PathBuf::from)
                .or_else(|| var("HOME").map(|h| PathBuf::from(h).join(".docker")))
                .ok_or_else(|| bad("TLS needs DOCKER_CERT_PATH (or HOME for ~/.docker)"))
        };
        match scheme.as_str() {
            "unix" => {
                if rest.is_empty() {
                    return Err(bad("no socket path"));
                }
                Ok(Self {
                    host: format!("unix://{rest}"),
                    tls_cert_dir: None,
                    from_docker_host: given.is_some(),
                })
            }
            "tcp" | "http" | "https" => {
                let tls = verify || scheme == "https";
                if !tls && var("DOCKER_TLS").is_some() {
                    return Err(bad(
                        "DOCKER_TLS without DOCKER_TLS_VERIFY (TLS without checking the engine's \
                         certificate) is not supported: set DOCKER_TLS_VERIFY=1 and DOCKER_CERT_PATH",
                    ));
                }
                let authority = rest.trim_end_matches('/');
                if authority.is_empty() || authority.contains('/') {
                    return Err(bad("expected tcp://HOST:PORT"));
                }
                let has_port = match authority.rsplit_once(':') {
                    Some((h, p)) => {
                        if p.parse::<u16>().is_err() {
                            return Err(bad("the port is not a number"));
                        }
                        !h.is_empty()
                    }
                    None => false,
                };
                let authority = if has_port {
                    authority.to_string()
                } else {
                    format!("{authority}:{}", if tls { 2376 } else { 2375 })
                };
                Ok(Self {
                    host: format!("tcp://{authority}"),
                    tls_cert_dir: if tls { Some(cert_dir()?) } else { None },
                    from_docker_host: given.is_some(),
                })
            }
            other => Err(bad(&format!(
                "unsupported scheme {other}:// (use unix:///PATH or tcp://HOST:PORT)"
            ))),
        }
    }

    /// The `ca.pem`, `cert.pem` and `key.pem` paths, checked: each exists and parses.
    fn tls_files(&self, dir: &Path) -> Result<(PathBuf, PathBuf, PathBuf), RuntimeError> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let fault = |path: &Path, reason: String| RuntimeError::TlsFile {
            host: self.host.clone(),
            path: path.to_path_buf(),
            reason,
        };
        let (ca, cert, key) = (
            dir.join("ca.pem"),
            dir.join("cert.pem"),
            dir.join("key.pem"),
        );
        for p in [&ca, &cert, &key] {
            if let Err(e) = std::fs::metadata(p) {
                return Err(fault(p, e.to_string()));
            }
        }
        for p in [&ca, &cert] {
            let certs = CertificateDer::pem_file_iter(p)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| fault(p, e.to_string()))?;
            if certs.is_empty() {
                return Err(fault(p, "holds no PEM certificate".into()));
            }
        }
        let der = PrivateKeyDer::from_pem_file(&key)
            .map_err(|e| fault(&key, format!("no usable PEM private key: {e}")))?;
        rustls::crypto::aws_lc_rs::default_provider()
            .key_provider
            .load_private_key(der)
            .map_err(|e| fault(&key, format!("unsupported private key: {e}")))?;
        Ok((ca, cert, key))
    }
}

/// Docker through the Engine API.
pub struct DockerEngine {
    docker: Docker,
    endpoint: EngineEndpoint,
}

impl DockerEngine {
    /// Connect using `DOCKER_HOST` (unix or tcp; TLS with `DOCKER_TLS_VERIFY`/`DOCKER_CERT_PATH`)
    /// and negotiate the API version.
    pub async fn connect() -> Result<Self, RuntimeError> {
        Self::connect_to(EngineEndpoint::from_env()?).await
    }

    /// Connect to an endpoint and negotiate the API version.
    pub async fn connect_to(endpoint: EngineEndpoint) -> Result<Self, RuntimeError> {
        let unreachable = |source| RuntimeError::Unreachable {
            host: endpoint.host.clone(),
            tls: endpoint.tls_cert_dir.clone(),
            source,
        };
        let version = bollard::API_DEFAULT_VERSION;
        let docker = match &endpoint.tls_cert_dir {
            Some(dir) => {
                let (ca, cert, key) = endpoint.tls_files(dir)?;
                // bollard's client-certificate resolver expects a process-wide provider.
                let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
                Docker::connect_with_ssl(
                    &endpoint.host,
                    &key,
                    &cert,
                    &ca,
                    REQUEST_TIMEOUT_SECS,
                    version,
                )
            }
            None if endpoint.host.starts_with("unix://") => {
                Docker::connect_with_unix(&endpoint.host, REQUEST_TIMEOUT_SECS, version)
            }
            None => Docker::connect_with_http(&endpoint.host, REQUEST_TIMEOUT_SECS, version),
        }
        .map_err(unreachable)?;
        let first_answer = async {
            let docker = docker.negotiate_version().await?;
            docker.ping().await?;
            Ok::<_, bollard::errors::Error>(docker)
        };
        let docker = tokio::time::timeout(CONNECT_TIMEOUT, first_answer)
            .await
            .map_err(|_| unreachable(bollard::errors::Error::RequestTimeoutError))?
            .map_err(unreachable)?;
        Ok(Self { docker, endpoint })
    }

    /// Where the engine was reached.
    pub fn host(&self) -> &str {
        &self.endpoint.host
    }

    /// How the engine was reached.
    pub fn endpoint(&self) -> &EngineEndpoint {
        &self.endpoint
    }
}

#[async_trait::async_trait]
impl Engine for DockerEngine {
    async fn info(&self) -> Result<EngineInfo, RuntimeError> {
        let v = self.docker.version().await.map_err(api("version"))?;
        let i = self.docker.info().await.map_err(api("info"))?;
        Ok(EngineInfo {
            platform: format!(
                "{}/{}",
                v.os.as_deref().unwrap_or("linux"),
                v.arch.as_deref().unwrap_or("unknown")
            ),
            version: v.version.unwrap_or_default(),
            api_version: self.docker.client_version().to_string(),
            storage_driver: i.driver.unwrap_or_default(),
            local: self.endpoint.host.starts_with("unix://"),
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
                mounts: Some(
                    spec.volumes
                        .iter()
                        .map(|(volume, target)| bollard::models::Mount {
                            typ: Some(bollard::models::MountType::VOLUME),
                            source: Some(volume.clone()),
                            target: Some(target.clone()),
                            ..Default::default()
                        })
                        .collect(),
                ),
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

    async fn labelled_containers(&self, label: &str) -> Result<Vec<Labelled>, RuntimeError> {
        let filters = HashMap::from([("label".to_string(), vec![label.to_string()])]);
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
            .map(|c| Labelled {
                id: c.id.unwrap_or_default(),
                name: c
                    .names
                    .and_then(|n| n.into_iter().next())
                    .map(|n| n.trim_start_matches('/').to_string())
                    .unwrap_or_default(),
                labels: c.labels.unwrap_or_default(),
            })
            .collect())
    }

    async fn labelled_images(&self, label: &str) -> Result<Vec<Labelled>, RuntimeError> {
        let filters = HashMap::from([("label".to_string(), vec![label.to_string()])]);
        let opts = bollard::query_parameters::ListImagesOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        let list = self
            .docker
            .list_images(Some(opts))
            .await
            .map_err(api("list images"))?;
        Ok(list
            .into_iter()
            .map(|i| Labelled {
                id: i.id,
                name: String::new(),
                labels: i.labels,
            })
            .collect())
    }

    async fn rename(&self, id: &str, name: &str) -> Result<(), RuntimeError> {
        let opts = bollard::query_parameters::RenameContainerOptionsBuilder::default()
            .name(name)
            .build();
        self.docker
            .rename_container(id, opts)
            .await
            .map_err(api(format!("rename container {id} to {name}")))
    }

    async fn create_volume(
        &self,
        name: &str,
        labels: &HashMap<String, String>,
    ) -> Result<(), RuntimeError> {
        let req = bollard::models::VolumeCreateRequest {
            name: Some(name.to_string()),
            labels: Some(labels.clone()),
            ..Default::default()
        };
        self.docker
            .create_volume(req)
            .await
            .map_err(api(format!("create volume {name}")))?;
        Ok(())
    }

    async fn volumes_with_label(&self, label: &str) -> Result<Vec<VolumeInfo>, RuntimeError> {
        let filters = HashMap::from([("label".to_string(), vec![label.to_string()])]);
        let opts = bollard::query_parameters::ListVolumesOptionsBuilder::default()
            .filters(&filters)
            .build();
        let list = self
            .docker
            .list_volumes(Some(opts))
            .await
            .map_err(api("list volumes"))?;
        Ok(list
            .volumes
            .unwrap_or_default()
            .into_iter()
            .map(|v| VolumeInfo {
                name: v.name,
                labels: v.labels,
                mountpoint: v.mountpoint,
            })
            .collect())
    }

    async fn remove_volume(&self, name: &str) -> Result<bool, RuntimeError> {
        match self
            .docker
            .remove_volume(name, None::<bollard::query_parameters::RemoveVolumeOptions>)
            .await
        {
            Ok(()) => Ok(true),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(true),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 409, ..
            }) => Ok(false),
            Err(e) => Err(api(format!("remove volume {name}"))(e)),
        }
    }

    async fn create_marker(
        &self,
        name: &str,
        image: &str,
        labels: &HashMap<String, String>,
    ) -> Result<bool, RuntimeError> {
        let opts = CreateContainerOptionsBuilder::default().name(name).build();
        let body = ContainerCreateBody {
            image: Some(image.to_string()),
            entrypoint: Some(vec!["/bin/true".into()]),
            cmd: Some(vec![]),
            labels: Some(labels.clone()),
            ..Default::default()
        };
        match self.docker.create_container(Some(opts), body).await {
            Ok(_) => Ok(true),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 409, ..
            }) => Ok(false),
            Err(e) => Err(api(format!("create container {name}"))(e)),
        }
    }

    async fn container_labels(
        &self,
        name: &str,
    ) -> Result<Option<HashMap<String, String>>, RuntimeError> {
        match self.docker.inspect_container(name, None).await {
            Ok(c) => Ok(Some(c.config.and_then(|c| c.labels).unwrap_or_default())),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(None),
            Err(e) => Err(api(format!("inspect container {name}"))(e)),
        }
    }
    async fn run_to_end(
        &self,
        spec: &ContainerSpec,
        timeout: Duration,
    ) -> Result<RunOutcome, RuntimeError> {
        let mut opts = CreateContainerOptionsBuilder::default().name(&spec.name);
        if let Some(p) = &spec.platform {
            opts = opts.platform(p);
        }
        let body = ContainerCreateBody {
            image: Some(spec.image.clone()),
            labels: Some(spec.labels.clone()),
            network_disabled: Some(true),
            host_config: Some(HostConfig {
                network_mode: Some("none".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let created = self
            .docker
            .create_container(Some(opts.build()), body)
            .await
            .map_err(api(format!("create container {}", spec.name)))?;
        let outcome = self.start_and_wait(&created.id, timeout).await;
        let removed = self.remove(&created.id).await;
        let outcome = outcome?;
        removed?;
        Ok(outcome)
    }
}

impl DockerEngine {
    /// Start a created container, wait for its end (at most `timeout`) and read its output.
    async fn start_and_wait(
        &self,
        id: &str,
        timeout: Duration,
    ) -> Result<RunOutcome, RuntimeError> {
        if let Err(e) = self.docker.start_container(id, None).await {
            return Ok(RunOutcome {
                exit_code: None,
                output: format!("the container did not start: {e}"),
            });
        }
        let wait = async {
            let opts = bollard::query_parameters::WaitContainerOptions::default();
            let mut s = self.docker.wait_container(id, Some(opts));
            match s.next().await {
                Some(Ok(r)) => Ok(r.status_code),
                Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => {
                    Ok(code)
                }
                Some(Err(e)) => Err(api(format!("wait for container {id}"))(e)),
                None => Ok(-1),
            }
        };
        let code = match tokio::time::timeout(timeout, wait).await {
            Ok(code) => code?,
            Err(_) => {
                return Ok(RunOutcome {
                    exit_code: None,
                    output: format!("the container did not end within {} s", timeout.as_secs()),
                })
            }
        };
        Ok(RunOutcome {
            exit_code: Some(code),
            output: self.output_of(id).await,
        })
    }

    /// The end of a container's stdout and stderr (empty when it cannot be read).
    async fn output_of(&self, id: &str) -> String {
        let opts = bollard::query_parameters::LogsOptionsBuilder::new()
            .stdout(true)
            .stderr(true)
            .build();
        let mut s = self.docker.logs(id, Some(opts));
        let mut out: Vec<u8> = Vec::new();
        while let Some(Ok(chunk)) = s.next().await {
            out.extend_from_slice(&chunk.into_bytes());
            if out.len() > 2 * RUN_OUTPUT_MAX {
                out.drain(..out.len() - RUN_OUTPUT_MAX);
            }
        }
        let start = out.len().saturating_sub(RUN_OUTPUT_MAX);
        String::from_utf8_lossy(&out[start..]).trim().to_string()
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
    /// Volumes that exist, with their labels.
    pub volumes: Mutex<HashMap<String, HashMap<String, String>>>,
    /// Marker containers that exist, with their labels.
    pub markers: Mutex<HashMap<String, HashMap<String, String>>>,
    /// Platforms whose containers fail to run (`run_to_end` says "exec format error"); the
    /// others exit 0.
    pub cannot_run: Vec<String>,
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
            platform: crate::oci::Platform::host().to_string(),
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
        if let Ok(mut m) = self.markers.lock() {
            m.remove(id);
        }
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
    async fn run_to_end(
        &self,
        spec: &ContainerSpec,
        _timeout: Duration,
    ) -> Result<RunOutcome, RuntimeError> {
        let platform = spec.platform.clone().unwrap_or_default();
        self.record(format!("run_to_end {} {platform}", spec.image));
        if self.cannot_run.contains(&platform) {
            return Ok(RunOutcome {
                exit_code: Some(1),
                output: "exec /probe: exec format error".into(),
            });
        }
        Ok(RunOutcome {
            exit_code: Some(0),
            output: String::new(),
        })
    }
    async fn labelled_containers(&self, label: &str) -> Result<Vec<Labelled>, RuntimeError> {
        self.record(format!("labelled_containers {label}"));
        Ok(vec![])
    }
    async fn labelled_images(&self, label: &str) -> Result<Vec<Labelled>, RuntimeError> {
        self.record(format!("labelled_images {label}"));
        Ok(vec![])
    }
    async fn rename(&self, id: &str, name: &str) -> Result<(), RuntimeError> {
        self.record(format!("rename {id} {name}"));
        Ok(())
    }
    async fn create_volume(
        &self,
        name: &str,
        labels: &HashMap<String, String>,
    ) -> Result<(), RuntimeError> {
        self.record(format!("create_volume {name}"));
        if let Ok(mut v) = self.volumes.lock() {
            v.entry(name.to_string()).or_insert_with(|| labels.clone());
        }
        Ok(())
    }
    async fn volumes_with_label(&self, label: &str) -> Result<Vec<VolumeInfo>, RuntimeError> {
        self.record(format!("volumes_with_label {label}"));
        let v = self.volumes.lock().map(|v| v.clone()).unwrap_or_default();
        Ok(v.into_iter()
            .filter(|(_, l)| label_matches(l, label))
            .map(|(name, labels)| VolumeInfo {
                name,
                labels,
                mountpoint: String::new(),
            })
            .collect())
    }
    async fn remove_volume(&self, name: &str) -> Result<bool, RuntimeError> {
        self.record(format!("remove_volume {name}"));
        if let Ok(mut v) = self.volumes.lock() {
            v.remove(name);
        }
        Ok(true)
    }
    async fn create_marker(
        &self,
        name: &str,
        image: &str,
        labels: &HashMap<String, String>,
    ) -> Result<bool, RuntimeError> {
        self.record(format!("create_marker {name} {image}"));
        let mut m = self
            .markers
            .lock()
            .map_err(|_| RuntimeError::Io(std::io::Error::other("poisoned")))?;
        if m.contains_key(name) {
            return Ok(false);
        }
        m.insert(name.to_string(), labels.clone());
        Ok(true)
    }
    async fn container_labels(
        &self,
        name: &str,
    ) -> Result<Option<HashMap<String, String>>, RuntimeError> {
        self.record(format!("container_labels {name}"));
        Ok(self.markers.lock().ok().and_then(|m| m.get(name).cloned()))
    }
}

/// Whether labels match a filter `KEY` or `KEY=VALUE` (as the engine's `label` filter does).
fn label_matches(labels: &HashMap<String, String>, filter: &str) -> bool {
    match filter.split_once('=') {
        Some((k, v)) => labels.get(k).is_some_and(|x| x == v),
        None => labels.contains_key(filter),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(vars: &[(&str, &str)]) -> Result<EngineEndpoint, RuntimeError> {
        EngineEndpoint::from_vars(|k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        })
    }

    #[test]
    fn endpoint_like_the_docker_cli() {
        let e = ep(&[]).unwrap();
        assert_eq!(e.host, DEFAULT_DOCKER_HOST);
        assert!(!e.from_docker_host && e.tls_cert_dir.is_none());
        let e = ep(&[("DOCKER_HOST", "tcp://127.0.0.1:1234")]).unwrap();
        assert_eq!(e.host, "tcp://127.0.0.1:1234");
        assert!(e.from_docker_host && e.tls_cert_dir.is_none());
        assert_eq!(
            ep(&[("DOCKER_HOST", "tcp://10.0.0.1")]).unwrap().host,
            "tcp://10.0.0.1:2375"
        );
        assert_eq!(
            ep(&[("DOCKER_HOST", "10.0.0.1:99/")]).unwrap().host,
            "tcp://10.0.0.1:99"
        );
        let e = ep(&[
            ("DOCKER_HOST", "tcp://docker.example"),
            ("DOCKER_TLS_VERIFY", "1"),
            ("DOCKER_CERT_PATH", "/certs"),
        ])
        .unwrap();
        assert_eq!(e.host, "tcp://docker.example:2376");
        assert_eq!(e.tls_cert_dir, Some(PathBuf::from("/certs")));
        let e = ep(&[
            ("DOCKER_HOST", "tcp://h:1"),
            ("DOCKER_TLS_VERIFY", "1"),
            ("HOME", "/home/u"),
        ])
        .unwrap();
        assert_eq!(e.tls_cert_dir, Some(PathBuf::from("/home/u/.docker")));
        // TLS variables do not apply to a unix socket.
        let e = ep(&[
            ("DOCKER_HOST", "unix:///x.sock"),
            ("DOCKER_TLS_VERIFY", "1"),
        ])
        .unwrap();
        assert!(e.tls_cert_dir.is_none());
    }

    #[test]
    fn bad_endpoints_name_the_host() {
        for (vars, want) in [
            (
                vec![("DOCKER_HOST", "ssh://u@h")],
                "unsupported scheme ssh://",
            ),
            (vec![("DOCKER_HOST", "tcp://h:port")], "not a number"),
            (vec![("DOCKER_HOST", "tcp://")], "expected tcp://HOST:PORT"),
            (
                vec![("DOCKER_HOST", "tcp://h:1"), ("DOCKER_TLS", "1")],
                "DOCKER_TLS without DOCKER_TLS_VERIFY",
            ),
        ] {
            let e = ep(&vars).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
            assert!(e.contains(vars[0].1), "{e}");
        }
    }

    #[test]
    fn missing_tls_files_name_the_file_and_host() {
        let d = tempfile::tempdir().unwrap();
        let e = ep(&[
            ("DOCKER_HOST", "tcp://127.0.0.1:9"),
            ("DOCKER_TLS_VERIFY", "1"),
            ("DOCKER_CERT_PATH", d.path().to_str().unwrap()),
        ])
        .unwrap();
        let err = e.tls_files(d.path()).unwrap_err().to_string();
        assert!(err.contains("tcp://127.0.0.1:9"), "{err}");
        assert!(
            err.contains(&d.path().join("ca.pem").display().to_string()),
            "{err}"
        );
        for f in ["ca.pem", "cert.pem"] {
            std::fs::write(d.path().join(f), "not pem").unwrap();
        }
        std::fs::write(d.path().join("key.pem"), "not pem").unwrap();
        let err = e.tls_files(d.path()).unwrap_err().to_string();
        assert!(err.contains("ca.pem: holds no PEM certificate"), "{err}");
    }
}
