//! Running `ansible-playbook` against the build container through a docker connection.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use crate::events::{Event, SharedReporter};

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
    /// Local I/O (temp files, spawning).
    #[error(transparent)]
    Io(#[from] std::io::Error),
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
}

impl ProvisionRun {
    /// The inventory text for the build container.
    pub fn inventory(&self) -> String {
        let mut vars = serde_json::Map::new();
        vars.insert("ansible_connection".into(), self.connection.clone().into());
        vars.insert("ansible_host".into(), self.container.clone().into());
        vars.insert("ansible_user".into(), "root".into());
        vars.insert("ansible_python_interpreter".into(), "auto_silent".into());
        if let Some(h) = &self.docker_host {
            if self.connection.ends_with("docker_api") {
                vars.insert("ansible_docker_host".into(), h.clone().into());
            }
        }
        let inv = serde_json::json!({
            "all": { "hosts": { "default": vars } }
        });
        // JSON is valid YAML; ansible's yaml inventory plugin reads it.
        serde_json::to_string_pretty(&inv).unwrap_or_default()
    }

    /// The argument vector (without the program), given the temp file paths.
    pub fn argv(&self, inventory: &Path, extra_vars: &Path) -> Vec<String> {
        let mut a = vec![
            "-i".to_string(),
            inventory.display().to_string(),
            "-e".to_string(),
            format!("@{}", extra_vars.display()),
        ];
        a.extend(self.args.iter().cloned());
        a.push(self.playbook.display().to_string());
        a
    }

    /// The environment set for ansible-playbook (user env last, so it can override).
    pub fn environment(&self) -> BTreeMap<String, String> {
        let mut env = BTreeMap::new();
        env.insert(
            "ANSIBLE_PIPELINING".to_string(),
            if self.pipelining { "True" } else { "False" }.to_string(),
        );
        env.insert("ANSIBLE_HOST_KEY_CHECKING".into(), "False".into());
        env.insert("ANSIBLE_RETRY_FILES_ENABLED".into(), "False".into());
        env.insert("ANSIBLE_NOCOLOR".into(), "1".into());
        env.insert("PYTHONUNBUFFERED".into(), "1".into());
        if let Some(h) = &self.docker_host {
            env.insert("DOCKER_HOST".into(), h.clone());
        }
        env.extend(self.env.clone());
        env
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

/// Run the playbook, streaming each output line as an [`Event::Output`]. The child is killed
/// if this future is dropped (cancellation).
pub async fn run(p: &ProvisionRun, reporter: &SharedReporter) -> Result<(), ProvisionError> {
    let program = which("ansible-playbook").ok_or(ProvisionError::NotInstalled)?;
    let dir = tempfile::Builder::new()
        .prefix("wpimg-ansible-")
        .tempdir()?;
    let inventory = dir.path().join("inventory.yml");
    let extra = dir.path().join("extra_vars.json");
    write_private(&inventory, p.inventory().as_bytes())?;
    write_private(
        &extra,
        &serde_json::to_vec(&serde_json::Value::Object(p.extra_vars.clone())).unwrap_or_default(),
    )?;
    let mut cmd = Command::new(program);
    cmd.args(p.argv(&inventory, &extra))
        .envs(p.environment())
        .env("ANSIBLE_LOCAL_TEMP", dir.path().join("tmp"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn()?;
    let stdout = child.stdout.take();
    let stderr = child.stderr.take();
    let tracker = std::sync::Mutex::new(TaskTracker::default());
    let pump = |r: Option<Box<dyn tokio::io::AsyncRead + Unpin + Send>>| {
        let tracker = &tracker;
        async move {
            let Some(r) = r else { return };
            let mut lines = BufReader::new(r).lines();
            while let Ok(Some(line)) = lines.next_line().await {
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
    let status = status?;
    if status.success() {
        Ok(())
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
        }
    }

    #[test]
    fn secrets_never_reach_the_command_line() {
        let p = run_spec();
        let argv = p.argv(Path::new("/t/inv.yml"), Path::new("/t/ev.json"));
        assert_eq!(
            argv,
            [
                "-i",
                "/t/inv.yml",
                "-e",
                "@/t/ev.json",
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
