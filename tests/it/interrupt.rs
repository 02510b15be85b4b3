//! SIGINT and SIGTERM at every stage of a build (pull, load-base, provision, layer through the
//! upper directory and through the API, assemble, load, push streamed or not): exit 130, and
//! nothing left — no container, no committed image, no temp blob, no run directory, no
//! ansible-playbook, no tag in the layout, in Docker or in the registry, no open upload session.
//! The timing is driven by the JSON events on stdout (`stage_start`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::common::registry::Registry;
use crate::common::running::{signal_name, Running};
use crate::common::*;

const WAIT: Duration = Duration::from_secs(300);

/// A project with a slow play and a play writing 100 MB of incompressible data.
fn project() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    write(
        &d.path().join("image.yaml"),
        "name: ${name}\nbase: ${base:-127.0.0.1:5000/debian:bookworm}\nprovision:\n  playbook: ${playbook:-big.yml}\n",
    );
    write(
        &d.path().join("big.yml"),
        "- hosts: all\n  gather_facts: false\n  tasks:\n    - name: Write incompressible data\n      ansible.builtin.shell: head -c 100M /dev/urandom > /opt/big.bin\n      changed_when: true\n",
    );
    write(&d.path().join("slow.yml"), SLOW_PLAY);
    d
}

/// `wpimg build --json` of the project.
fn build(dir: &Path, name: &str, args: &[&str]) -> Command {
    let mut c = wpimg();
    c.current_dir(dir)
        .args(["build", "--json", "--var"])
        .arg(format!("name={name}"))
        .args(args);
    c
}

/// Where a registry test repository's upload sessions live in the registry's storage.
fn uploads_dir(reg: &Registry, repo: &str) -> PathBuf {
    reg.dir
        .path()
        .join("data/docker/registry/v2/repositories")
        .join(repo)
        .join("_uploads")
}

/// Upload sessions of the repository still open in the registry's storage: a live session has
/// `data` and `startedat`; a discarded one has neither (distribution 2.8 leaves its `hashstates`).
fn open_sessions(reg: &Registry, repo: &str) -> Vec<PathBuf> {
    std::fs::read_dir(uploads_dir(reg, repo))
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default()
        .into_iter()
        .filter(|session| session.join("startedat").exists() || session.join("data").exists())
        .collect()
}

/// What must hold after an interrupted build.
struct Clean<'a> {
    dir: &'a Path,
    name: &'a str,
    registry: Option<(&'a Registry, &'a str)>,
    /// The push streamed the layer (chunked): every session must be gone.
    streamed: bool,
}

impl Clean<'_> {
    fn check(&self, what: &str, running: Running) {
        let pid = running.pid();
        let (status, events, stderr) = running.finish();
        let ctx = format!("{what}: {events:?}\n{stderr}");
        assert_eq!(status.code(), Some(130), "{ctx}");
        let last = events.last().unwrap();
        assert_eq!(last["event"], "error", "{ctx}");
        assert_eq!(last["exit_code"], 130, "{ctx}");
        assert!(
            build_containers(self.name).is_empty(),
            "container left: {ctx}"
        );
        let committed = ok_stdout(Command::new("docker").args([
            "images",
            "-q",
            "--filter",
            &format!("label=io.wpimg.pid={pid}"),
        ]));
        assert!(committed.trim().is_empty(), "committed image left: {ctx}");
        let oci = self.dir.join(".wpimg/oci");
        assert!(
            temp_blobs(&oci).is_empty(),
            "temp blob left: {:?} {ctx}",
            temp_blobs(&oci)
        );
        let runs: Vec<_> = std::fs::read_dir(oci.join("tmp"))
            .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        assert!(runs.is_empty(), "run directory left: {runs:?} {ctx}");
        assert!(
            ansible_of(&oci).is_empty(),
            "ansible-playbook left running: {ctx}"
        );
        let index = std::fs::read_to_string(oci.join("index.json")).unwrap_or_default();
        let tag = format!("{}:latest", self.name);
        assert!(
            !index.contains(&format!("\"{tag}\"")),
            "layout tag written: {ctx}"
        );
        let docker = run(Command::new("docker").args(["image", "inspect", &tag]));
        assert!(!docker.status.success(), "Docker tag written: {ctx}");
        if let Some((reg, repo)) = self.registry {
            let tags = ok_stdout(
                Command::new("curl").args(["-s", &format!("{}/v2/{repo}/tags/list", reg.url())]),
            );
            assert!(
                !tags.contains("\"latest\""),
                "registry tag written: {tags} {ctx}"
            );
            // Sessions left: only those cut in the middle of a monolithic upload, which
            // distribution 2.8 will not discard (their DELETE names a stale offset); wpimg
            // must have asked for each.
            let log = reg.log();
            let open = open_sessions(reg, repo);
            for s in &open {
                let uuid = s.file_name().unwrap().to_string_lossy().into_owned();
                assert!(
                    !self.streamed && log.contains(&format!("vars.uuid={uuid}")),
                    "upload session {uuid} left open, never discarded: {log} {ctx}"
                );
            }
        }
    }
}

/// Pids of processes whose command line names the layout (its ansible-playbook).
fn ansible_of(oci: &Path) -> Vec<u32> {
    let needle = oci.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).contains(&needle))
                .unwrap_or(false)
        })
        .collect()
}

/// Start a build, wait for `stage_start` of `stage`, send `sig`.
fn interrupt_at(cmd: &mut Command, stage: &str, sig: i32) -> Running {
    let mut run = Running::start(cmd);
    let seen = run.wait_for_stage(stage, WAIT);
    assert!(
        seen.is_some(),
        "stage {stage} never started: {:?}",
        run.seen()
    );
    run.signal(sig);
    run
}

#[test]
fn interrupt_before_the_layer() {
    require_fixtures();
    require("ansible-playbook");
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // pull: a fresh layout pulls the base.
        let name = unique("wpimg-test/intr-pull");
        let p = project();
        let run = interrupt_at(&mut build(p.path(), &name, &[]), "pull", sig);
        let clean = Clean {
            dir: p.path(),
            name: &name,
            registry: None,
            streamed: false,
        };
        clean.check(&format!("{} at pull", signal_name(sig)), run);

        // load-base, then provision (in the middle of a task).
        let slow = ["--var", "playbook=slow.yml"];
        let run = interrupt_at(&mut build(p.path(), &name, &slow), "load-base", sig);
        clean.check(&format!("{} at load-base", signal_name(sig)), run);

        let mut run = Running::start(&mut build(p.path(), &name, &slow));
        let task = run.wait_for(WAIT, |e| {
            e["event"] == "output"
                && e["line"]
                    .as_str()
                    .unwrap_or("")
                    .contains("TASK [Sleep long]")
        });
        assert!(task.is_some(), "the play never started: {:?}", run.seen());
        std::thread::sleep(Duration::from_secs(1));
        assert_eq!(
            build_containers(&name).len(),
            1,
            "the build container runs now"
        );
        assert!(
            !ansible_of(&p.path().join(".wpimg/oci")).is_empty(),
            "ansible runs now"
        );
        run.signal(sig);
        clean.check(&format!("{} at provision", signal_name(sig)), run);
    }
}

#[test]
fn interrupt_while_the_layer_is_written() {
    require_fixtures();
    require("ansible-playbook");
    for (sig, path) in [(libc::SIGINT, "upperdir"), (libc::SIGTERM, "api")] {
        let name = unique("wpimg-test/intr-layer");
        let p = project();
        let args = ["--no-cache", "--layer-path", path];
        let run = interrupt_at(&mut build(p.path(), &name, &args), "layer", sig);
        let clean = Clean {
            dir: p.path(),
            name: &name,
            registry: None,
            streamed: false,
        };
        clean.check(&format!("{} at layer ({path})", signal_name(sig)), run);
        let cache = p.path().join(".wpimg/oci/wpimg-cache");
        let entries = std::fs::read_dir(&cache).map(|d| d.count()).unwrap_or(0);
        assert_eq!(
            entries, 0,
            "a cache entry was stored for an interrupted layer"
        );
    }
}

#[test]
fn interrupt_after_the_layer() {
    require_fixtures();
    require("ansible-playbook");
    require("curl");
    let name = unique("wpimg-test/intr-late");
    let _img = ImageGuard(format!("{name}:latest"));
    let p = project();
    // The layer in the cache: the runs below go cache hit → assemble → load or push.
    let (status, events, stderr) = Running::start(&mut build(p.path(), &name, &[])).finish();
    assert!(status.success(), "{events:?}\n{stderr}");
    let index = p.path().join(".wpimg/oci/index.json");
    let tagged = std::fs::read_to_string(&index).unwrap();
    // The earlier build's tag is put back, not removed: start each run from no tag at all.
    let untag = || {
        let mut v: serde_json::Value = serde_json::from_str(&tagged).unwrap();
        v["manifests"] = serde_json::json!([]);
        std::fs::write(&index, v.to_string()).unwrap();
    };
    let reg = Registry::start();
    let repo = "wpimg-test/intr";
    let to = format!("{}/{repo}", reg.host());
    for sig in [libc::SIGINT, libc::SIGTERM] {
        let clean = Clean {
            dir: p.path(),
            name: &name,
            registry: Some((&reg, repo)),
            streamed: false,
        };
        for (stage, args) in [("assemble", vec!["--load"]), ("load", vec!["--load"])] {
            untag();
            let run = interrupt_at(&mut build(p.path(), &name, &args), stage, sig);
            clean.check(&format!("{} at {stage} {args:?}", signal_name(sig)), run);
        }
        // push: while the 100 MB layer is being uploaded.
        untag();
        let args = ["--push", "--no-stream", "--to", &to];
        let mut run = Running::start(&mut build(p.path(), &name, &args));
        let big = run.wait_for(WAIT, |e| {
            e["event"] == "blob_start"
                && e["direction"] == "push"
                && e["size"].as_u64().unwrap_or(0) > 50_000_000
        });
        assert!(
            big.is_some(),
            "the layer upload never started: {:?}",
            run.seen()
        );
        std::thread::sleep(Duration::from_millis(150));
        run.signal(sig);
        clean.check(&format!("{} at push", signal_name(sig)), run);
    }
}

#[test]
fn interrupt_a_streamed_push() {
    require_fixtures();
    require("ansible-playbook");
    require("curl");
    let reg = Registry::start();
    let repo = "wpimg-test/intr-stream";
    let to = format!("{}/{repo}", reg.host());
    // While the layer streams to the registry, then in the push stage that follows.
    // In the push stage the base layer goes up monolithically: a session cut in its middle
    // may stay (see `Clean::check`); while the layer streams, none may.
    for (sig, stage, streamed) in [
        (libc::SIGINT, "layer", true),
        (libc::SIGTERM, "push", false),
    ] {
        let name = unique("wpimg-test/intr-stream");
        let p = project();
        let args = ["--no-cache", "--push", "--to", &to];
        let mut run = Running::start(&mut build(p.path(), &name, &args));
        let seen = run.wait_for_stage(stage, WAIT);
        assert!(
            seen.is_some(),
            "stage {stage} never started: {:?}",
            run.seen()
        );
        if stage == "layer" {
            // Let the upload take some parts first.
            std::thread::sleep(Duration::from_millis(300));
        }
        run.signal(sig);
        let clean = Clean {
            dir: p.path(),
            name: &name,
            registry: Some((&reg, repo)),
            streamed,
        };
        clean.check(
            &format!("{} at {stage} (streamed push)", signal_name(sig)),
            run,
        );
    }
}
