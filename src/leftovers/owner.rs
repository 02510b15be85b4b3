//! Who owns what a build leaves while it runs: the wpimg process (host, pid and the pid's start
//! time), recorded in container labels, temp file names and lock files, and whether that
//! process is gone.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Label with the host name of the wpimg that started a container.
pub const HOST_LABEL: &str = "io.wpimg.host";
/// Label with the pid of the wpimg that started a container.
pub const PID_LABEL: &str = "io.wpimg.pid";
/// Label with the start time of that pid (clock ticks after boot), against pid reuse.
pub const PID_START_LABEL: &str = "io.wpimg.pid-start";

/// A wpimg process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// Host name.
    pub host: String,
    /// Process id.
    pub pid: u32,
    /// Start time of the process (clock ticks after boot), when known.
    pub start: Option<u64>,
}

impl Owner {
    /// This process.
    pub fn current() -> &'static Owner {
        static CURRENT: OnceLock<Owner> = OnceLock::new();
        CURRENT.get_or_init(|| {
            let pid = std::process::id();
            Owner {
                host: host_name(),
                pid,
                start: process_state(pid).map(|(_, start)| start),
            }
        })
    }

    /// The labels that record this owner on a container.
    pub fn labels(&self) -> HashMap<String, String> {
        let mut l = HashMap::from([
            (HOST_LABEL.to_string(), self.host.clone()),
            (PID_LABEL.to_string(), self.pid.to_string()),
        ]);
        if let Some(s) = self.start {
            l.insert(PID_START_LABEL.to_string(), s.to_string());
        }
        l
    }

    /// The owner recorded in labels (none without host and pid).
    pub fn from_labels(labels: &HashMap<String, String>) -> Option<Owner> {
        Some(Owner {
            host: labels.get(HOST_LABEL)?.clone(),
            pid: labels.get(PID_LABEL)?.parse().ok()?,
            start: labels.get(PID_START_LABEL).and_then(|s| s.parse().ok()),
        })
    }

    /// Whether this process is known to be gone: it ran on this host and no process with its
    /// pid (and start time) is alive. An owner on another host is never taken for gone.
    pub fn is_gone(&self) -> bool {
        if self.host != Owner::current().host {
            return false;
        }
        match process_state(self.pid) {
            None => true,
            Some(('Z' | 'X', _)) => true,
            Some((_, start)) => self.start.is_some_and(|s| s != start),
        }
    }
}

/// This machine's host name.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

/// A process's state letter and start time, from `/proc/PID/stat`; `None` when there is none.
fn process_state(pid: u32) -> Option<(char, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: fields restart after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    // Field 22 (starttime) is the 20th after the command name.
    let start = fields.get(19)?.parse().ok()?;
    Some((state, start))
}

/// Whether a pid of this host belongs to a live process.
pub(crate) fn pid_alive(pid: u32) -> bool {
    process_state(pid).is_some_and(|(state, _)| !matches!(state, 'Z' | 'X'))
}

/// `PREFIX-PID-`: how temp files and directories of this process are named, so that the
/// collector can tell whose they are.
pub(crate) fn temp_prefix(prefix: &str) -> String {
    format!("{prefix}-{}-", std::process::id())
}

/// The pid in a name made with [`temp_prefix`].
pub(crate) fn pid_of_temp(name: &str) -> Option<u32> {
    let mut parts = name.splitn(3, '-');
    let (_, pid, _) = (parts.next()?, parts.next()?, parts.next()?);
    pid.parse().ok()
}

/// Take the exclusive lock on an open file that marks it in use (released when the process
/// ends, however it ends).
pub(crate) fn hold(file: &File, path: &Path) -> io::Result<()> {
    file.try_lock()
        .map_err(|e| io::Error::other(format!("lock {}: {e}", path.display())))
}

/// Whether nobody holds the lock of `path` (a file whose owner took it with [`hold`]; a
/// missing file holds no lock).
pub(crate) fn unlocked(path: &Path) -> bool {
    match File::open(path) {
        Ok(f) => f.try_lock().is_ok(),
        Err(e) => e.kind() == io::ErrorKind::NotFound,
    }
}

/// A private directory for one run's files (Ansible's inventory, extra vars and secrets, its
/// local temp): `PARENT/run-PID-XXXXXX`, mode 0700, locked while the run lasts and removed
/// when dropped; a dead run's directory is found and removed by the collector.
pub struct RunDir {
    dir: tempfile::TempDir,
    _lock: File,
}

/// Name of the lock file inside a [`RunDir`].
pub(crate) const RUN_LOCK: &str = "lock";

impl RunDir {
    /// Create one under `parent` (created if missing).
    pub fn create(parent: &Path) -> io::Result<Self> {
        fs_err::create_dir_all(parent)?;
        // Absolute, so that the processes of a run can be told by their command lines.
        let parent = fs_err::canonicalize(parent)?;
        let parent = parent.as_path();
        let dir = tempfile::Builder::new()
            .prefix(&temp_prefix("run"))
            .tempdir_in(parent)
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("create a directory in {}: {e}", parent.display()),
                )
            })?;
        fs_err::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))?;
        let lock_path = dir.path().join(RUN_LOCK);
        let lock = File::create(&lock_path)?;
        hold(&lock, &lock_path)?;
        Ok(Self { dir, _lock: lock })
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A path inside it.
    pub fn join(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_labels_round_trip() {
        let me = Owner::current();
        assert!(!me.is_gone());
        assert!(me.start.is_some());
        assert_eq!(Owner::from_labels(&me.labels()).as_ref(), Some(me));
        let reused = Owner {
            start: me.start.map(|s| s + 1),
            ..me.clone()
        };
        assert!(
            reused.is_gone(),
            "same pid, other start time: another process"
        );
        let elsewhere = Owner {
            host: format!("{}-other", me.host),
            pid: u32::MAX - 1,
            start: None,
        };
        assert!(
            !elsewhere.is_gone(),
            "another host's process is never taken for gone"
        );
    }

    #[test]
    fn a_dead_child_is_gone() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        let dead = Owner {
            host: Owner::current().host.clone(),
            pid,
            start: None,
        };
        assert!(dead.is_gone());
        assert!(!pid_alive(pid));
    }

    #[test]
    fn temp_names_carry_the_pid() {
        let name = format!("{}abc123", temp_prefix("blob"));
        assert_eq!(pid_of_temp(&name), Some(std::process::id()));
        assert_eq!(pid_of_temp("blob-x"), None);
    }

    #[test]
    fn run_dirs_are_private_locked_and_removed() {
        let parent = tempfile::tempdir().unwrap();
        let run = RunDir::create(&parent.path().join("tmp")).unwrap();
        let mode = std::fs::metadata(run.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        assert!(!unlocked(&run.join(RUN_LOCK)), "held while the run lasts");
        let path = run.path().to_path_buf();
        drop(run);
        assert!(!path.exists());
    }
}
