//! What dead builds leave behind, and its collection: build containers and committed images
//! whose wpimg is gone (their labels name its host and pid), temp blobs in a layout's `ingest/`,
//! and private run directories in its `tmp/` (with any `ansible-playbook` still running from
//! them). Every build starts with a collection; `wpimg prune` runs one on demand.

mod owner;

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::Serialize;

pub(crate) use owner::{hold, temp_prefix};
pub use owner::{Owner, RunDir, HOST_LABEL, PID_LABEL, PID_START_LABEL};

use crate::runtime::{Engine, Labelled, RuntimeError, BUILD_LABEL};

/// Suffix given to a build container kept with `--keep-on-error`: the collector leaves it.
pub const KEPT_SUFFIX: &str = "-kept";

/// A temp file whose name does not say whose it is counts as left over after this long.
const UNNAMED_STALE_AFTER: Duration = Duration::from_secs(3600);

/// One thing the collector removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Removed {
    /// `container`, `image`, `process`, `temp-file` or `temp-dir`.
    pub kind: &'static str,
    /// Its name (container name, image ID, pid and command, path).
    pub name: String,
    /// Why it was left over.
    pub reason: String,
}

/// Remove the build containers and committed images of wpimg processes of this host that are
/// gone. Kept containers (`--keep-on-error`) stay.
pub async fn collect_engine(engine: &dyn Engine) -> Result<Vec<Removed>, RuntimeError> {
    let mut removed = Vec::new();
    for c in engine.labelled_containers(BUILD_LABEL).await? {
        if c.name.ends_with(KEPT_SUFFIX) {
            continue;
        }
        if let Some(reason) = dead_owner(&c) {
            engine.remove(&c.id).await?;
            removed.push(Removed {
                kind: "container",
                name: c.name,
                reason,
            });
        }
    }
    for i in engine.labelled_images(BUILD_LABEL).await? {
        if let Some(reason) = dead_owner(&i) {
            engine.remove_image(&i.id).await?;
            removed.push(Removed {
                kind: "image",
                name: i.id,
                reason,
            });
        }
    }
    Ok(removed)
}

fn dead_owner(item: &Labelled) -> Option<String> {
    let owner = Owner::from_labels(&item.labels)?;
    owner
        .is_gone()
        .then(|| format!("its wpimg (pid {} on {}) is gone", owner.pid, owner.host))
}

/// Remove what dead builds left in a layout: temp blobs in `ingest/` and run directories in
/// `tmp/` (after killing any process still running from one).
pub fn collect_layout(dir: &Path) -> std::io::Result<Vec<Removed>> {
    let dir = &fs_err::canonicalize(dir)?;
    let mut removed = Vec::new();
    for path in entries(&dir.join("ingest"))? {
        if let Some(reason) = stale(&path, &path) {
            if !gone(fs_err::remove_file(&path))? {
                continue;
            }
            removed.push(Removed {
                kind: "temp-file",
                name: path.display().to_string(),
                reason,
            });
        }
    }
    for path in entries(&dir.join("tmp"))? {
        if let Some(reason) = stale(&path, &path.join(owner::RUN_LOCK)) {
            removed.extend(kill_processes_using(&path));
            if !gone(fs_err::remove_dir_all(&path))? {
                continue;
            }
            removed.push(Removed {
                kind: "temp-dir",
                name: path.display().to_string(),
                reason,
            });
        }
    }
    Ok(removed)
}

/// Whether a removal removed something (`false`: someone else was first).
fn gone(r: std::io::Result<()>) -> std::io::Result<bool> {
    match r {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

fn entries(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    match fs_err::read_dir(dir) {
        Ok(rd) => Ok(rd.filter_map(|e| e.ok().map(|e| e.path())).collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// Why `path` is left over, if it is: nobody holds its lock (`lock`), and the pid in its name
/// is gone (or, for a name without one, it is older than an hour).
fn stale(path: &Path, lock: &Path) -> Option<String> {
    let name = path.file_name()?.to_string_lossy();
    let why = match owner::pid_of_temp(&name) {
        Some(pid) if owner::pid_alive(pid) => return None,
        Some(pid) => format!("its wpimg (pid {pid}) is gone"),
        None => {
            let age = fs_err::metadata(path)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| SystemTime::now().duration_since(t).ok())?;
            if age < UNNAMED_STALE_AFTER {
                return None;
            }
            format!("unused for {} minutes", age.as_secs() / 60)
        }
    };
    owner::unlocked(lock).then_some(why)
}

/// Kill (SIGKILL) every process whose command line names `dir` (an `ansible-playbook` of a dead
/// build, and its workers).
fn kill_processes_using(dir: &Path) -> Vec<Removed> {
    let needle = dir.as_os_str().as_encoded_bytes();
    let mut killed = Vec::new();
    for proc_dir in entries(Path::new("/proc")).unwrap_or_default() {
        let Some(pid) = proc_dir
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(proc_dir.join("cmdline")) else {
            continue;
        };
        if !cmdline.windows(needle.len()).any(|w| w == needle) {
            continue;
        }
        // SAFETY: kill(2) with a pid read from /proc; no memory is involved.
        if unsafe { libc::kill(pid, libc::SIGKILL) } == 0 {
            let command: Vec<String> = cmdline
                .split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .take(2)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            killed.push(Removed {
                kind: "process",
                name: format!("{pid} ({})", command.join(" ")),
                reason: format!("runs from the left-over directory {}", dir.display()),
            });
        }
    }
    killed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_collection_removes_only_what_dead_processes_left() {
        let d = tempfile::tempdir().unwrap();
        let ingest = d.path().join("ingest");
        std::fs::create_dir_all(&ingest).unwrap();
        // A dead process's blob and run directory, with a process still running from it.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        std::fs::write(ingest.join(format!("blob-{dead}-abc")), b"x").unwrap();
        let run = d.path().join("tmp").join(format!("run-{dead}-xyz"));
        std::fs::create_dir_all(&run).unwrap();
        std::fs::write(run.join("extra_vars.json"), b"{}").unwrap();
        std::fs::write(run.join("inventory.yml"), b"{}").unwrap();
        let mut sleeper = std::process::Command::new("tail")
            .arg("-f")
            .arg(run.join("inventory.yml"))
            .spawn()
            .unwrap();
        let started = std::time::Instant::now();
        while !std::fs::read(format!("/proc/{}/cmdline", sleeper.id()))
            .unwrap_or_default()
            .ends_with(b"inventory.yml\0")
        {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "tail never started"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        // A live run (this process) and its blob.
        let live = RunDir::create(&d.path().join("tmp")).unwrap();
        let live_blob = ingest.join(format!("{}x", temp_prefix("blob")));
        std::fs::write(&live_blob, b"y").unwrap();

        let removed = collect_layout(d.path()).unwrap();
        let kinds: Vec<&str> = removed.iter().map(|r| r.kind).collect();
        if kinds != ["temp-file", "process", "temp-dir"] {
            let _ = sleeper.kill();
            panic!("{removed:?}");
        }
        assert!(removed[1].name.starts_with(&sleeper.id().to_string()));
        let status = sleeper.wait().unwrap();
        assert!(!status.success(), "the left-over process was killed");
        assert!(!run.exists());
        assert!(live.path().exists() && live_blob.exists());
        assert!(collect_layout(d.path()).unwrap().is_empty());
    }
}
