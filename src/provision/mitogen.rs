//! `provision.accelerator: mitogen`: finding Mitogen for Ansible before any container starts.
//! Mitogen replaces Ansible's per-task connection and module plumbing with persistent Python
//! interpreters in the target; it takes over Ansible's `docker` connection (the docker CLI).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::which;
use crate::error::{ErrorKind, HasKind};

/// The Mitogen release wpimg is tested with (its loader accepts ansible-core 2.10 and later).
pub const MITOGEN_VERSION: &str = "0.3.54";

/// The Ansible strategy wpimg runs under Mitogen.
pub const MITOGEN_STRATEGY: &str = "mitogen_linear";

/// How long the Python that runs ansible-playbook may take to say where Mitogen is.
const PROBE_DEADLINE: Duration = Duration::from_secs(20);

/// `provision.accelerator` / `--accelerator`.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Accelerator {
    /// Plain Ansible over the configured connection (the default).
    #[default]
    None,
    /// Mitogen for Ansible (`mitogen_linear` over the `docker` connection).
    Mitogen,
}

impl Accelerator {
    /// The name used in image.yaml and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Accelerator::None => "none",
            Accelerator::Mitogen => "mitogen",
        }
    }
}

/// Errors of finding what the accelerator needs (all before any container starts: exit 2).
#[derive(Debug, thiserror::Error)]
pub enum AcceleratorError {
    /// No ansible-playbook on PATH.
    #[error("provision.accelerator mitogen: ansible-playbook not found on PATH: install Ansible (apt-get install ansible, or pip install ansible-core; scripts/setup does it)")]
    NoAnsible,
    /// The docker CLI, which Mitogen's docker connection runs, is missing.
    #[error("provision.accelerator mitogen: the docker CLI is not on PATH (Mitogen drives the build container through `docker exec`): install it (apt-get install docker.io, or docker-ce-cli), or build with --accelerator none")]
    NoDockerCli,
    /// Mitogen is neither at `provision.mitogen_path` nor importable by ansible-playbook's Python.
    #[error("{}", missing_message(.python, .ansible_playbook, .mitogen_path.as_deref()))]
    Missing {
        /// The interpreter of ansible-playbook's `#!` line (None: it has none).
        python: Option<PathBuf>,
        /// The ansible-playbook found on PATH.
        ansible_playbook: PathBuf,
        /// `provision.mitogen_path`, resolved.
        mitogen_path: Option<PathBuf>,
    },
}

impl HasKind for AcceleratorError {
    fn kind(&self) -> ErrorKind {
        ErrorKind::BadInput
    }
}

fn missing_message(python: &Option<PathBuf>, playbook: &Path, at: Option<&Path>) -> String {
    let at = at
        .map(|p| format!(" nor found in provision.mitogen_path {}", p.display()))
        .unwrap_or_default();
    let pin = format!("mitogen=={MITOGEN_VERSION}");
    let into = match python {
        Some(py) => format!(
            "the ansible_mitogen package is not importable by {py}, the Python of {pb}{at}. \
             Install it into that environment: `{py} -m pip install {pin}`; where that Python \
             is externally managed (Debian's), install it into a directory instead, `{py} -m \
             pip install --target /opt/wpimg-mitogen {pin}`, and set provision.mitogen_path: \
             /opt/wpimg-mitogen (scripts/setup does this)",
            py = py.display(),
            pb = playbook.display(),
        ),
        None => format!(
            "{} has no #! line, so the Python that runs it is unknown{at}. Install Mitogen into \
             a directory, `python3 -m pip install --target /opt/wpimg-mitogen {pin}`, and set \
             provision.mitogen_path: /opt/wpimg-mitogen",
            playbook.display()
        ),
    };
    format!("provision.accelerator mitogen: {into}; or build with --accelerator none")
}

/// Mitogen for Ansible, found for `provision.accelerator: mitogen`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mitogen {
    /// The `ansible_mitogen` package directory.
    pub package: PathBuf,
    /// Mitogen's version (`mitogen.__version__`).
    pub version: String,
    /// Prepended to ansible-playbook's `PYTHONPATH` when Mitogen came from `provision.mitogen_path`.
    pub pythonpath: Option<PathBuf>,
}

impl Mitogen {
    /// Mitogen at `mitogen_path` (a directory holding `ansible_mitogen` and `mitogen`, as `pip
    /// install --target` makes it), else in the Python environment of ansible-playbook's `#!`
    /// line, run with `env` (image.yaml's `provision.env`) over the inherited environment.
    /// Also checks that the docker CLI is there.
    pub fn find(
        mitogen_path: Option<&Path>,
        env: &BTreeMap<String, String>,
    ) -> Result<Self, AcceleratorError> {
        let playbook = which("ansible-playbook").ok_or(AcceleratorError::NoAnsible)?;
        which("docker").ok_or(AcceleratorError::NoDockerCli)?;
        if let Some(found) = mitogen_path.and_then(in_directory) {
            return Ok(found);
        }
        let python = interpreter_of(&playbook);
        if let Some(found) = python.as_deref().and_then(|py| importable_by(py, env)) {
            return Ok(found);
        }
        Err(AcceleratorError::Missing {
            python,
            ansible_playbook: playbook,
            mitogen_path: mitogen_path.map(Path::to_path_buf),
        })
    }

    /// The directory of Mitogen's strategy plugins (`ANSIBLE_STRATEGY_PLUGINS`).
    pub fn strategy_plugins(&self) -> PathBuf {
        self.package.join("plugins").join("strategy")
    }

    /// The environment that makes ansible-playbook run under Mitogen (`inherited_pythonpath`:
    /// the `PYTHONPATH` it would otherwise get).
    pub fn environment(&self, inherited_pythonpath: Option<&str>) -> BTreeMap<String, String> {
        let mut env = BTreeMap::from([
            ("ANSIBLE_STRATEGY".to_string(), MITOGEN_STRATEGY.to_string()),
            (
                "ANSIBLE_STRATEGY_PLUGINS".to_string(),
                self.strategy_plugins().display().to_string(),
            ),
        ]);
        if let Some(dir) = &self.pythonpath {
            let path = match inherited_pythonpath.filter(|p| !p.is_empty()) {
                Some(rest) => format!("{}:{rest}", dir.display()),
                None => dir.display().to_string(),
            };
            env.insert("PYTHONPATH".into(), path);
        }
        env
    }
}

/// Mitogen laid out in `dir` (`DIR/ansible_mitogen`, `DIR/mitogen`), read without Python.
fn in_directory(dir: &Path) -> Option<Mitogen> {
    let package = dir.join("ansible_mitogen");
    let strategy = package
        .join("plugins")
        .join("strategy")
        .join(format!("{MITOGEN_STRATEGY}.py"));
    if !strategy.is_file() {
        return None;
    }
    let init = fs_err::read_to_string(dir.join("mitogen").join("__init__.py")).ok()?;
    Some(Mitogen {
        package,
        version: version_of(&init).unwrap_or_else(|| "unknown".into()),
        pythonpath: Some(dir.to_path_buf()),
    })
}

/// `__version__ = (0, 3, 54)` in `mitogen/__init__.py` → `0.3.54`.
fn version_of(init_py: &str) -> Option<String> {
    let line = init_py
        .lines()
        .find(|l| l.trim_start().starts_with("__version__"))?;
    let tuple = line.split_once('=')?.1.trim();
    let inner = tuple.strip_prefix('(')?.split(')').next()?;
    let parts: Vec<&str> = inner
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    (!parts.is_empty()).then(|| parts.join("."))
}

/// The interpreter of a script's `#!` line (`#!/usr/bin/env python3` looks `python3` up on PATH).
pub fn interpreter_of(script: &Path) -> Option<PathBuf> {
    use std::io::Read;
    let mut head = [0u8; 512];
    let n = fs_err::File::open(script).ok()?.read(&mut head).ok()?;
    let first = String::from_utf8_lossy(&head[..n]);
    parse_shebang(first.lines().next()?)
}

fn parse_shebang(line: &str) -> Option<PathBuf> {
    let mut words = line.strip_prefix("#!")?.split_whitespace();
    let interpreter = PathBuf::from(words.next()?);
    if interpreter.file_name().is_some_and(|f| f == "env") {
        // `env [-S] [-i] [NAME=VALUE]... PROGRAM [ARGS]`
        let program = words.find(|w| !w.starts_with('-') && !w.contains('='))?;
        return match program.contains('/') {
            true => Some(PathBuf::from(program)),
            false => which(program),
        };
    }
    Some(interpreter)
}

/// Ask `python` (with ansible-playbook's environment) where `ansible_mitogen` is.
fn importable_by(python: &Path, env: &BTreeMap<String, String>) -> Option<Mitogen> {
    const PROBE: &str = "import os, mitogen, ansible_mitogen\n\
                         print(os.path.dirname(os.path.abspath(ansible_mitogen.__file__)))\n\
                         print('.'.join(str(p) for p in mitogen.__version__))";
    let mut cmd = Command::new(python);
    cmd.args(["-c", PROBE])
        .envs(env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let out = output_within(&mut cmd, PROBE_DEADLINE)?;
    let mut lines = out.lines();
    let package = PathBuf::from(lines.next()?.trim());
    let version = lines.next()?.trim().to_string();
    package
        .join("plugins")
        .join("strategy")
        .is_dir()
        .then_some(Mitogen {
            package,
            version,
            pythonpath: None,
        })
}

/// The stdout of a successful run of `cmd`, or None (failed, or still running at the deadline:
/// then it is killed).
fn output_within(cmd: &mut Command, deadline: Duration) -> Option<String> {
    use std::io::Read;
    let mut child = cmd.spawn().ok()?;
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if started.elapsed() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    };
    let mut out = String::new();
    child.stdout.take()?.read_to_string(&mut out).ok()?;
    status.success().then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shebangs() {
        assert_eq!(
            parse_shebang("#! /usr/bin/python3"),
            Some(PathBuf::from("/usr/bin/python3"))
        );
        assert_eq!(
            parse_shebang("#!/opt/venv/bin/python3.11 -E"),
            Some(PathBuf::from("/opt/venv/bin/python3.11"))
        );
        assert_eq!(
            parse_shebang("#!/usr/bin/env -S PYTHONHASHSEED=0 /opt/py/bin/python3 -X dev"),
            Some(PathBuf::from("/opt/py/bin/python3"))
        );
        assert_eq!(parse_shebang("#!/usr/bin/env"), None);
        assert_eq!(parse_shebang("import sys"), None);
        // A program name is looked up on PATH like env does.
        let sh = parse_shebang("#!/usr/bin/env sh").unwrap();
        assert!(sh.is_absolute() && sh.ends_with("sh"), "{sh:?}");
    }

    #[test]
    fn version_from_init() {
        let init = "# comment\n__version__ = (0, 3, 54)\n__author__ = 'x'\n";
        assert_eq!(version_of(init).as_deref(), Some("0.3.54"));
        assert_eq!(version_of("nothing here"), None);
    }

    #[test]
    fn mitogen_in_a_directory_and_its_environment() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(in_directory(d.path()), None);
        let strategy = d.path().join("ansible_mitogen/plugins/strategy");
        std::fs::create_dir_all(&strategy).unwrap();
        std::fs::write(strategy.join("mitogen_linear.py"), "").unwrap();
        std::fs::create_dir_all(d.path().join("mitogen")).unwrap();
        std::fs::write(
            d.path().join("mitogen/__init__.py"),
            "__version__ = (0, 3, 54)\n",
        )
        .unwrap();
        let m = in_directory(d.path()).unwrap();
        assert_eq!(m.version, "0.3.54");
        assert_eq!(m.strategy_plugins(), strategy);
        let env = m.environment(Some("/x/lib"));
        assert_eq!(env["ANSIBLE_STRATEGY"], "mitogen_linear");
        assert_eq!(
            env["ANSIBLE_STRATEGY_PLUGINS"],
            strategy.display().to_string()
        );
        assert_eq!(env["PYTHONPATH"], format!("{}:/x/lib", d.path().display()));
        assert_eq!(
            m.environment(None)["PYTHONPATH"],
            d.path().display().to_string()
        );
    }

    #[test]
    fn the_missing_message_says_how_to_install() {
        let e = AcceleratorError::Missing {
            python: Some("/usr/bin/python3".into()),
            ansible_playbook: "/usr/bin/ansible-playbook".into(),
            mitogen_path: Some("/opt/m".into()),
        };
        let m = e.to_string();
        for want in [
            "/usr/bin/python3 -m pip install mitogen==0.3.54",
            "the Python of /usr/bin/ansible-playbook",
            "nor found in provision.mitogen_path /opt/m",
            "--accelerator none",
        ] {
            assert!(m.contains(want), "{want:?} not in {m}");
        }
        assert_eq!(e.kind(), ErrorKind::BadInput);
    }
}
