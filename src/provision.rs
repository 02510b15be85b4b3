//! Running `ansible-playbook` against the build container through a docker connection.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use crate::events::{Event, SharedReporter};
use crate::leftovers::RunDir;
use crate::outputs::{Outputs, OutputsError};
use crate::runtime::DEFAULT_DOCKER_HOST;
use crate::secrets::{Redactor, Secrets};

mod mitogen;
mod outputs;

pub use mitogen::{Accelerator, AcceleratorError, Mitogen, MITOGEN_STRATEGY, MITOGEN_VERSION};
pub use outputs::{OutputsCallback, CALLBACK_NAME, OUTPUTS_FILE_ENV};

/// Default connection plugin: talks to the Engine API directly (no docker CLI per task).
pub const DEFAULT_CONNECTION: &str = "community.docker.docker_api";

/// Errors of provisioning.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    /// `ansible-playbook` is not installed.
    #[error("ansible-playbook not found on PATH: install Ansible (apt-get install ansible, or pip install ansible; scripts/setup does it)")]
    NotInstalled,
    /// The play failed.
    #[error("ansible-playbook failed (exit code {code}){}", task.as_ref().map(|t| format!(" at task {t:?}")).unwrap_or_default())]
    Failed {
        /// Exit code.
        code: i32,
        /// The failing task's name, when seen in the output.
        task: Option<String>,
    },
    /// The outputs the play reported cannot be used.
    #[error("the play's outputs (set_stats)")]
    Outputs(#[source] Box<OutputsError>),
    /// Local I/O (temp files, spawning).
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl crate::error::HasKind for ProvisionError {
    fn kind(&self) -> crate::error::ErrorKind {
        match self {
            ProvisionError::Outputs(e) => e.kind(),
            _ => crate::error::ErrorKind::Failure,
        }
    }
}

/// Everything needed to run the playbook.
#[derive(Debug, Clone)]
pub struct ProvisionRun {
    /// Playbook path.
    pub playbook: PathBuf,
    /// Container name (the inventory host's `ansible_host`).
    pub container: String,
    /// Connection plugin.
    pub connection: String,
    /// Pipelining.
    pub pipelining: bool,
    /// Extra vars (written to a private file, never put on the command line).
    pub extra_vars: serde_json::Map<String, serde_json::Value>,
    /// Extra arguments.
    pub args: Vec<String>,
    /// Extra environment.
    pub env: BTreeMap<String, String>,
    /// `DOCKER_HOST` to hand to the connection plugin, if not the default.
    pub docker_host: Option<String>,
    /// Directory with `ca.pem`, `cert.pem` and `key.pem` when the engine is reached over TLS.
    pub docker_tls_cert_dir: Option<PathBuf>,
    /// Build secrets, each a variable of the play (written to a private file, never put on the
    /// command line, redacted from the output).
    pub secrets: Secrets,
    /// Where the run's private directory is made (the layout's `tmp/`), never the system temp.
    pub state_dir: PathBuf,
    /// Run under Mitogen (`provision.accelerator: mitogen`): the `docker` connection, whatever
    /// `connection` says.
    pub mitogen: Option<Mitogen>,
}

impl ProvisionRun {
    /// The inventory text for the build container.
    pub fn inventory(&self) -> String {
        let mut vars = serde_json::Map::new();
        // Mitogen takes over the `docker` connection (the docker CLI, which reads DOCKER_HOST
        // and the TLS settings from the environment), not the Docker API plugin.
        let connection = match self.mitogen {
            Some(_) => "docker",
            None => &self.connection,
        };
        vars.insert("ansible_connection".into(), connection.into());
        vars.insert("ansible_host".into(), self.container.clone().into());
        vars.insert("ansible_user".into(), "root".into());
        vars.insert("ansible_python_interpreter".into(), "auto_silent".into());
        if let Some(h) = &self.docker_host {
            if connection.ends_with("docker_api") {
                // The plugin's daemon URL; `ansible_docker_host` would be the container name.
                vars.insert("ansible_docker_docker_host".into(), h.clone().into());
                // The API plugin takes TLS settings from variables only, not DOCKER_TLS_VERIFY.
                if let Some(dir) = &self.docker_tls_cert_dir {
                    vars.insert("ansible_docker_validate_certs".into(), true.into());
                    for (var, file) in [
                        ("ansible_docker_ca_cert", "ca.pem"),
                        ("ansible_docker_client_cert", "cert.pem"),
                        ("ansible_docker_client_key", "key.pem"),
                    ] {
                        vars.insert(var.into(), dir.join(file).display().to_string().into());
                    }
                }
            }
        }
        let inv = serde_json::json!({
            "all": { "hosts": { "default": vars } }
        });
        // JSON is valid YAML; ansible's yaml inventory plugin reads it.
        serde_json::to_string_pretty(&inv).unwrap_or_default()
    }

    /// The argument vector (without the program), given the private files' paths.
    pub fn argv(&self, inventory: &Path, extra_vars: &Path, secrets: Option<&Path>) -> Vec<String> {
        let mut a = vec![
            "-i".to_string(),
            inventory.display().to_string(),
            "-e".to_string(),
            format!("@{}", extra_vars.display()),
        ];
        if let Some(s) = secrets {
            a.extend(["-e".to_string(), format!("@{}", s.display())]);
        }
        a.extend(self.args.iter().cloned());
        a.push(self.playbook.display().to_string());
        a
    }

    /// The environment set for ansible-playbook (user env last, so it can override).
    pub fn environment(&self) -> BTreeMap<String, String> {
        let mut env = BTreeMap::new();
        env.insert(
            "ANSIBLE_PIPELINING".to_string(),
            if self.effective_pipelining() {
                "True"
            } else {
                "False"
            }
            .to_string(),
        );
        env.insert("ANSIBLE_HOST_KEY_CHECKING".into(), "False".into());
        env.insert("ANSIBLE_RETRY_FILES_ENABLED".into(), "False".into());
        env.insert("ANSIBLE_NOCOLOR".into(), "1".into());
        env.insert("PYTHONUNBUFFERED".into(), "1".into());
        if self.docker_host.is_none() && self.mitogen.is_some() {
            // The docker CLI would follow its current context; the build container is here.
            env.insert("DOCKER_HOST".into(), DEFAULT_DOCKER_HOST.into());
        }
        if let Some(h) = &self.docker_host {
            env.insert("DOCKER_HOST".into(), h.clone());
            // For the docker CLI: `community.docker.docker`, and Mitogen's `docker`.
            if let Some(dir) = &self.docker_tls_cert_dir {
                env.insert("DOCKER_TLS_VERIFY".into(), "1".into());
                env.insert("DOCKER_CERT_PATH".into(), dir.display().to_string());
            }
        }
        // image.yaml's env last, so it can override (ANSIBLE_STRATEGY=mitogen_free, ...);
        // its PYTHONPATH, or the inherited one, goes behind Mitogen's directory.
        let mut user = self.env.clone();
        if let Some(m) = &self.mitogen {
            let inherited = std::env::var("PYTHONPATH").ok();
            let pythonpath = user.get("PYTHONPATH").or(inherited.as_ref());
            let mut accelerated = m.environment(pythonpath.map(String::as_str));
            if let Some(p) = accelerated.remove("PYTHONPATH") {
                user.insert("PYTHONPATH".into(), p);
            }
            env.extend(accelerated);
        }
        env.extend(user);
        env
    }
}

/// The argument vector for a log line: inline `-e`/`--extra-vars` values (which may hold
/// secrets) are replaced by `<redacted>`; `@FILE` references are kept.
pub fn redacted_command_line(argv: &[String]) -> String {
    let mut out = Vec::with_capacity(argv.len());
    let mut value_next = false;
    for a in argv {
        let shown = if value_next && !a.starts_with('@') {
            "<redacted>".to_string()
        } else if let Some(v) = a.strip_prefix("--extra-vars=") {
            if v.starts_with('@') {
                a.clone()
            } else {
                "--extra-vars=<redacted>".to_string()
            }
        } else if a.len() > 2
            && a.starts_with("-e")
            && !a.starts_with("-e@")
            && !a.starts_with("--")
        {
            "-e<redacted>".to_string()
        } else {
            a.clone()
        };
        value_next = a == "-e" || a == "--extra-vars";
        out.push(if shown.contains(char::is_whitespace) {
            format!("{shown:?}")
        } else {
            shown
        });
    }
    out.join(" ")
}

impl ProvisionRun {
    /// Whether pipelining is used: not with the Docker API plugin over TLS, which cannot
    /// half-close an exec's stdin on a TLS socket, so a pipelined module waits for EOF forever.
    pub fn effective_pipelining(&self) -> bool {
        self.pipelining
            && !(self.docker_tls_cert_dir.is_some()
                && self.docker_host.is_some()
                && self.mitogen.is_none()
                && self.connection.ends_with("docker_api"))
    }

    /// Inherited variables to drop for ansible-playbook. With a TLS engine: requests lets
    /// `REQUESTS_CA_BUNDLE`/`CURL_CA_BUNDLE` replace the CA the docker plugins set
    /// (https://github.com/psf/requests/issues/3829), so the engine's certificate would fail
    /// to verify; kept when image.yaml's `provision.env` sets them.
    pub fn removed_environment(&self) -> Vec<&'static str> {
        if self.docker_host.is_none() || self.docker_tls_cert_dir.is_none() {
            return Vec::new();
        }
        ["REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"]
            .into_iter()
            .filter(|k| !self.env.contains_key(*k))
            .collect()
    }
}

/// Runs a step's playbook against a build container (Ansible; a fake in unit tests).
#[async_trait::async_trait]
pub trait Provisioner: Send + Sync {
    /// Run `p`, streaming its output through `reporter`; dropping the future stops it. Returns
    /// the outputs the play reported (`set_stats`).
    async fn run(
        &self,
        p: &ProvisionRun,
        reporter: &SharedReporter,
    ) -> Result<Outputs, ProvisionError>;
}

/// The real provisioner: `ansible-playbook` through a docker connection.
pub struct AnsiblePlaybook;

#[async_trait::async_trait]
impl Provisioner for AnsiblePlaybook {
    async fn run(
        &self,
        p: &ProvisionRun,
        reporter: &SharedReporter,
    ) -> Result<Outputs, ProvisionError> {
        run(p, reporter).await
    }
}

/// Find a program on PATH.
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(program))
        .find(|p| {
            use std::os::unix::fs::PermissionsExt;
            p.metadata()
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

/// Tracks the failing task from ansible-playbook's output.
#[derive(Default)]
struct TaskTracker {
    current: Option<String>,
    failed: Option<String>,
}

impl TaskTracker {
    fn line(&mut self, line: &str) {
        if let Some(rest) = line.strip_prefix("TASK [") {
            if let Some(end) = rest.rfind(']') {
                self.current = Some(rest[..end].to_string());
            }
        } else if (line.starts_with("fatal:") || line.starts_with("failed:"))
            && !line.contains("...ignoring")
            && self.failed.is_none()
        {
            self.failed = self.current.clone();
        }
    }
}

/// The run's private files: inventory, extra vars and secrets (mode 0600) in a [`RunDir`], and
/// the outputs callback.
struct RunFiles {
    dir: RunDir,
    inventory: PathBuf,
    extra_vars: PathBuf,
    secrets: Option<PathBuf>,
    callback: OutputsCallback,
}

impl RunFiles {
    fn write(p: &ProvisionRun) -> Result<Self, ProvisionError> {
        let dir = RunDir::create(&p.state_dir)?;
        let inventory = dir.join("inventory.yml");
        let extra_vars = dir.join("extra_vars.json");
        write_private(&inventory, p.inventory().as_bytes())?;
        let extra = serde_json::Value::Object(p.extra_vars.clone());
        write_private(&extra_vars, &serde_json::to_vec(&extra).unwrap_or_default())?;
        let secrets = match p.secrets.is_empty() {
            true => None,
            false => {
                let path = dir.join("secrets.json");
                write_private(&path, &p.secrets.to_json())?;
                Some(path)
            }
        };
        let callback = OutputsCallback::write(dir.path())?;
        Ok(Self {
            dir,
            inventory,
            extra_vars,
            secrets,
            callback,
        })
    }
}

/// Kills ansible-playbook's process group when dropped: when the run is cancelled, and after it
/// ended (what it started and left, such as Mitogen's multiplexer or Ansible's workers, goes too).
struct GroupGuard(Option<i32>);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if let Some(pgid) = self.0.filter(|p| *p > 0) {
            // SAFETY: kill(2) on the process group this run created; no memory is involved.
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
        }
    }
}

/// Make the child its own process group's leader and have the kernel kill it when wpimg dies,
/// even by SIGKILL (`PR_SET_PDEATHSIG`); a child whose parent already died exits at once. (The
/// signal follows the spawning thread: a runtime worker, which lives as long as wpimg.)
fn die_with_parent(cmd: &mut Command) {
    let parent = std::process::id() as libc::pid_t;
    cmd.process_group(0);
    // SAFETY: the closure runs between fork and exec and calls only async-signal-safe
    // functions (prctl, getppid, _exit).
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

/// Run the playbook, streaming each output line (secret values redacted) as an
/// [`Event::Output`], and return the outputs it reported. If this future is dropped
/// (cancellation), the play's whole process group is killed and its private files removed; if
/// wpimg itself is killed, the kernel kills ansible-playbook and the next build removes the files.
pub async fn run(p: &ProvisionRun, reporter: &SharedReporter) -> Result<Outputs, ProvisionError> {
    let program = which("ansible-playbook").ok_or(ProvisionError::NotInstalled)?;
    let files = RunFiles::write(p)?;
    let argv = p.argv(
        &files.inventory,
        &files.extra_vars,
        files.secrets.as_deref(),
    );
    reporter.event(Event::Note {
        message: format!(
            "{} {} (env {})",
            program.display(),
            redacted_command_line(&argv),
            p.environment()
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        ),
    });
    let mut cmd = Command::new(program);
    if p.pipelining && !p.effective_pipelining() {
        reporter.event(Event::Note {
            message: "ansible pipelining off: the Docker API connection cannot pipeline over TLS"
                .into(),
        });
    }
    for k in p.removed_environment() {
        cmd.env_remove(k);
    }
    let environment = p.environment();
    let inherited = |k: &str| std::env::var(k).ok();
    let callback_env = files.callback.environment(&environment, &inherited);
    cmd.args(&argv)
        .envs(environment)
        .envs(callback_env)
        .env("ANSIBLE_LOCAL_TEMP", files.dir.join("tmp"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    die_with_parent(&mut cmd);
    let mut child = cmd.spawn()?;
    let group = GroupGuard(child.id().map(|id| id as i32));
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let tracker = std::sync::Mutex::new(TaskTracker::default());
    let redactor = Redactor::new(&p.secrets);
    let pump = |r: Option<Box<dyn tokio::io::AsyncRead + Unpin + Send>>| {
        let (tracker, redactor) = (&tracker, &redactor);
        async move {
            let Some(r) = r else { return };
            let mut lines = BufReader::new(r).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let line = redactor.redact(line);
                if let Ok(mut t) = tracker.lock() {
                    t.line(&line);
                }
                reporter.event(Event::Output {
                    source: "ansible".into(),
                    line,
                });
            }
        }
    };
    let (_, _, status) = tokio::join!(
        pump(stdout.map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>)),
        pump(stderr.map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>)),
        child.wait()
    );
    drop(group);
    let reported = files.callback.read();
    drop(files);
    let status = status?;
    if status.success() {
        let outputs = reported.map_err(|e| ProvisionError::Outputs(Box::new(e)))?;
        crate::outputs::check_secrets(&outputs, &p.secrets)
            .map_err(|e| ProvisionError::Outputs(Box::new(e)))?;
        Ok(outputs)
    } else {
        let task = tracker
            .lock()
            .ok()
            .and_then(|t| t.failed.clone().or(t.current.clone()));
        Err(ProvisionError::Failed {
            code: status.code().unwrap_or(-1),
            task,
        })
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use fs_err::os::unix::fs::OpenOptionsExt;
    use std::io::Write;
    let mut f = fs_err::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_note_hides_inline_extra_vars() {
        let argv: Vec<String> = [
            "-i",
            "/t/inv.yml",
            "-e",
            "@/t/x.json",
            "-e",
            "pw=s3cret",
            "--extra-vars=tok=abc",
            "-epw=x",
            "--diff",
            "site.yml",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let line = redacted_command_line(&argv);
        assert_eq!(
            line,
            "-i /t/inv.yml -e @/t/x.json -e <redacted> --extra-vars=<redacted> -e<redacted> --diff site.yml"
        );
    }

    fn run_spec() -> ProvisionRun {
        let mut extra = serde_json::Map::new();
        extra.insert("db_password".into(), "s3cret".into());
        ProvisionRun {
            playbook: "/pb/site.yml".into(),
            container: "wpimg-build-x".into(),
            connection: DEFAULT_CONNECTION.into(),
            pipelining: true,
            extra_vars: extra,
            args: vec!["--diff".into()],
            env: BTreeMap::from([("ANSIBLE_PIPELINING".to_string(), "False".to_string())]),
            docker_host: None,
            docker_tls_cert_dir: None,
            secrets: Secrets::default(),
            state_dir: PathBuf::from("/nonexistent"),
            mitogen: None,
        }
    }

    #[test]
    fn secrets_never_reach_the_command_line() {
        let p = run_spec();
        let argv = p.argv(
            Path::new("/t/inv.yml"),
            Path::new("/t/ev.json"),
            Some(Path::new("/t/s.json")),
        );
        assert_eq!(
            argv,
            [
                "-i",
                "/t/inv.yml",
                "-e",
                "@/t/ev.json",
                "-e",
                "@/t/s.json",
                "--diff",
                "/pb/site.yml"
            ]
        );
        assert!(!argv.join(" ").contains("s3cret"));
    }

    #[test]
    fn inventory_targets_the_container() {
        let inv: serde_json::Value = serde_json::from_str(&run_spec().inventory()).unwrap();
        let h = &inv["all"]["hosts"]["default"];
        assert_eq!(h["ansible_connection"], DEFAULT_CONNECTION);
        assert_eq!(h["ansible_host"], "wpimg-build-x");
    }

    #[test]
    fn remote_engine_goes_to_the_daemon_vars() {
        let mut r = run_spec();
        r.env.remove("ANSIBLE_PIPELINING");
        r.docker_host = Some("tcp://10.0.0.1:2376".into());
        r.docker_tls_cert_dir = Some(PathBuf::from("/certs"));
        let inv: serde_json::Value = serde_json::from_str(&r.inventory()).unwrap();
        let h = &inv["all"]["hosts"]["default"];
        assert_eq!(h["ansible_host"], "wpimg-build-x");
        assert!(h.get("ansible_docker_host").is_none(), "{h}");
        assert_eq!(h["ansible_docker_docker_host"], "tcp://10.0.0.1:2376");
        assert_eq!(h["ansible_docker_validate_certs"], true);
        assert_eq!(h["ansible_docker_ca_cert"], "/certs/ca.pem");
        assert_eq!(h["ansible_docker_client_key"], "/certs/key.pem");
        let env = r.environment();
        assert_eq!(env["DOCKER_HOST"], "tcp://10.0.0.1:2376");
        assert_eq!(env["DOCKER_CERT_PATH"], "/certs");
        assert_eq!(
            r.removed_environment(),
            ["REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"]
        );
        r.env
            .insert("REQUESTS_CA_BUNDLE".into(), "/my/bundle.pem".into());
        assert_eq!(r.removed_environment(), ["CURL_CA_BUNDLE"]);
        assert!(run_spec().removed_environment().is_empty());
        r.pipelining = true;
        assert_eq!(r.environment()["ANSIBLE_PIPELINING"], "False");
        r.docker_tls_cert_dir = None;
        assert_eq!(r.environment()["ANSIBLE_PIPELINING"], "True");
    }

    #[test]
    fn mitogen_runs_over_the_docker_cli_connection() {
        let mut r = run_spec();
        r.mitogen = Some(Mitogen {
            package: "/opt/m/ansible_mitogen".into(),
            version: "0.3.54".into(),
            pythonpath: Some("/opt/m".into()),
        });
        r.docker_host = Some("tcp://10.0.0.1:2376".into());
        r.docker_tls_cert_dir = Some(PathBuf::from("/certs"));
        r.env.insert("PYTHONPATH".into(), "/mine".into());
        let inv: serde_json::Value = serde_json::from_str(&r.inventory()).unwrap();
        let h = &inv["all"]["hosts"]["default"];
        assert_eq!(h["ansible_connection"], "docker", "{h}");
        assert_eq!(h["ansible_host"], "wpimg-build-x");
        assert!(h.get("ansible_docker_docker_host").is_none(), "{h}");
        let env = r.environment();
        assert_eq!(env["ANSIBLE_STRATEGY"], "mitogen_linear");
        assert_eq!(
            env["ANSIBLE_STRATEGY_PLUGINS"],
            "/opt/m/ansible_mitogen/plugins/strategy"
        );
        assert_eq!(env["PYTHONPATH"], "/opt/m:/mine");
        // The docker CLI reaches the same engine, over TLS.
        assert_eq!(env["DOCKER_HOST"], "tcp://10.0.0.1:2376");
        assert_eq!(env["DOCKER_TLS_VERIFY"], "1");
        assert_eq!(env["DOCKER_CERT_PATH"], "/certs");
        r.docker_host = None;
        r.docker_tls_cert_dir = None;
        assert_eq!(r.environment()["DOCKER_HOST"], DEFAULT_DOCKER_HOST);
        // image.yaml's env still wins for Ansible settings.
        r.env
            .insert("ANSIBLE_STRATEGY".into(), "mitogen_free".into());
        assert_eq!(r.environment()["ANSIBLE_STRATEGY"], "mitogen_free");
        assert!(!run_spec().environment().contains_key("ANSIBLE_STRATEGY"));
    }

    #[test]
    fn user_env_overrides_defaults() {
        assert_eq!(run_spec().environment()["ANSIBLE_PIPELINING"], "False");
    }

    #[test]
    fn failing_task_is_found() {
        let mut t = TaskTracker::default();
        for l in [
            "TASK [Gathering Facts] ****",
            "ok: [default]",
            "TASK [install nginx] ****",
            "fatal: [default]: FAILED! => {\"msg\": \"x\"}",
            "PLAY RECAP ****",
        ] {
            t.line(l);
        }
        assert_eq!(t.failed.as_deref(), Some("install nginx"));
    }
}
