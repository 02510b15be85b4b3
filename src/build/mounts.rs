//! Cache mounts: each path of `provision.cache_mounts` is a named volume of the engine owned by
//! wpimg (`wpimg-cache-` + a hash of the image name and the path, so a remote `DOCKER_HOST`
//! keeps it too), mounted at that path in every step's container and never part of a layer or
//! a key. Package managers need exclusive access, so a step holds a lock on each volume while
//! its container runs: a never-started container named `VOLUME-lock` on the engine (container
//! names are unique engine-wide, so creating it is an atomic test-and-set that works for every
//! client of the engine, local or remote). A lock whose holder was a process on this host that
//! is gone is broken; a holder on another host is waited for up to [`LOCK_DEADLINE`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};

use super::context::BuildContext;
use super::BuildError;
use crate::events::Event;
use crate::runtime::Engine;

/// Label of wpimg's cache volumes (value: the mounted path).
pub const CACHE_MOUNT_LABEL: &str = "io.wpimg.cache-mount";
/// Label of a cache volume's lock container (value: the volume).
pub const LOCK_LABEL: &str = "io.wpimg.cache-lock";
const LOCK_HOST: &str = "io.wpimg.lock.host";
const LOCK_PID: &str = "io.wpimg.lock.pid";
const LOCK_START: &str = "io.wpimg.lock.start";
const LOCK_SINCE: &str = "io.wpimg.lock.since";
/// How long a step waits for another build's lock on a cache volume.
pub const LOCK_DEADLINE: Duration = Duration::from_secs(3600);

/// The volume holding cache mount `path` of image `image`.
pub fn volume_name(image: &str, path: &str) -> String {
    let mut h = Sha256::new();
    h.update(image.as_bytes());
    h.update([0]);
    h.update(path.as_bytes());
    format!("wpimg-cache-{}", &hex::encode(h.finalize())[..16])
}

/// This host's name.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates within it or
    // truncates, and we read up to the first NUL.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return String::new();
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// The start time of a process (clock ticks since boot, field 22 of `/proc/PID/stat`).
fn start_time(pid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces: count fields after its closing parenthesis.
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(19).map(str::to_string)
}

/// Whether a lock's holder was a process of this host that no longer runs.
pub fn holder_is_gone(labels: &HashMap<String, String>) -> bool {
    if labels.get(LOCK_HOST).map(String::as_str) != Some(hostname().as_str()) {
        return false;
    }
    let Some(pid) = labels.get(LOCK_PID).and_then(|p| p.parse::<u32>().ok()) else {
        return false;
    };
    start_time(pid).as_ref() != labels.get(LOCK_START)
}

fn describe_holder(labels: &HashMap<String, String>) -> String {
    let get = |k| labels.get(k).map(String::as_str).unwrap_or("?");
    format!(
        "pid {} on host {} since {}",
        get(LOCK_PID),
        get(LOCK_HOST),
        get(LOCK_SINCE)
    )
}

/// The locked cache volumes of one step, released when the step's container is stopped.
pub struct MountLocks {
    engine: Arc<dyn Engine>,
    locks: Vec<String>,
    /// (volume, path) to mount.
    pub volumes: Vec<(String, String)>,
}

impl MountLocks {
    /// Create the volumes of `paths` (for `image`) and lock each, waiting for other builds.
    /// `lock_image` is an image the engine has (the lock containers are made of it).
    pub async fn acquire(
        ctx: &BuildContext<'_>,
        paths: &[String],
        lock_image: &str,
    ) -> Result<Self, BuildError> {
        let image = &ctx.spec.name;
        let mut volumes: Vec<(String, String)> = paths
            .iter()
            .map(|p| (volume_name(image, p), p.clone()))
            .collect();
        // One order for every build: no two builds wait for each other's second lock.
        volumes.sort();
        let mut held = Self {
            engine: ctx.engine.clone(),
            locks: Vec::new(),
            volumes: Vec::new(),
        };
        for (volume, path) in &volumes {
            let labels = HashMap::from([
                (CACHE_MOUNT_LABEL.to_string(), path.clone()),
                (super::IMAGE_LABEL.to_string(), image.clone()),
            ]);
            ctx.engine.create_volume(volume, &labels).await?;
            let lock = format!("{volume}-lock");
            ctx.cancellable(held.lock(ctx, &lock, volume, path, lock_image))
                .await??;
            held.locks.push(lock);
        }
        held.volumes = volumes;
        Ok(held)
    }

    async fn lock(
        &self,
        ctx: &BuildContext<'_>,
        lock: &str,
        volume: &str,
        path: &str,
        lock_image: &str,
    ) -> Result<(), BuildError> {
        let pid = std::process::id();
        let labels = HashMap::from([
            (LOCK_LABEL.to_string(), volume.to_string()),
            (LOCK_HOST.to_string(), hostname()),
            (LOCK_PID.to_string(), pid.to_string()),
            (LOCK_START.to_string(), start_time(pid).unwrap_or_default()),
            (
                LOCK_SINCE.to_string(),
                crate::oci::rfc3339(crate::oci::now_unix()),
            ),
        ]);
        let started = Instant::now();
        let mut told = false;
        loop {
            if self.engine.create_marker(lock, lock_image, &labels).await? {
                return Ok(());
            }
            let Some(holder) = self.engine.container_labels(lock).await? else {
                continue;
            };
            if holder_is_gone(&holder) {
                ctx.reporter.event(Event::Note {
                    message: format!(
                        "cache mount {path}: removing the lock of a build that is gone ({})",
                        describe_holder(&holder)
                    ),
                });
                self.engine.remove(lock).await?;
                continue;
            }
            if started.elapsed() > LOCK_DEADLINE {
                return Err(BuildError::CacheMountBusy {
                    path: path.to_string(),
                    holder: describe_holder(&holder),
                    lock: lock.to_string(),
                });
            }
            if !told {
                told = true;
                ctx.reporter.event(Event::Note {
                    message: format!(
                        "cache mount {path}: waiting for another build ({})",
                        describe_holder(&holder)
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Release the locks.
    pub async fn release(mut self) -> Result<(), BuildError> {
        for lock in std::mem::take(&mut self.locks) {
            self.engine.remove(&lock).await?;
        }
        Ok(())
    }
}

impl Drop for MountLocks {
    fn drop(&mut self) {
        // Reached when the step failed or was interrupted: release in the background.
        let locks = std::mem::take(&mut self.locks);
        if locks.is_empty() {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let engine = self.engine.clone();
            rt.spawn(async move {
                for lock in locks {
                    let _ = engine.remove(&lock).await;
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_names_depend_on_image_and_path() {
        let a = volume_name("wordpress", "/var/cache/apt/archives");
        assert!(a.starts_with("wpimg-cache-") && a.len() == "wpimg-cache-".len() + 16);
        assert_eq!(a, volume_name("wordpress", "/var/cache/apt/archives"));
        assert_ne!(a, volume_name("other", "/var/cache/apt/archives"));
        assert_ne!(a, volume_name("wordpress", "/var/lib/apt/lists"));
    }

    #[test]
    fn a_lock_of_a_gone_process_here_is_stale() {
        let me = std::process::id();
        let mine = HashMap::from([
            (LOCK_HOST.to_string(), hostname()),
            (LOCK_PID.to_string(), me.to_string()),
            (LOCK_START.to_string(), start_time(me).unwrap()),
        ]);
        assert!(!holder_is_gone(&mine), "this process runs");
        let mut gone = mine.clone();
        gone.insert(LOCK_START.to_string(), "1".into());
        assert!(holder_is_gone(&gone), "a reused pid is another process");
        let mut elsewhere = gone.clone();
        elsewhere.insert(LOCK_HOST.to_string(), format!("{}-other", hostname()));
        assert!(
            !holder_is_gone(&elsewhere),
            "another host's holder is never broken"
        );
    }
}
