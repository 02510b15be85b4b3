//! What dead builds leave, and its collection: a build SIGKILLed during provisioning takes its
//! ansible-playbook with it, and the next build removes its container and private files and
//! says so; `wpimg prune --json` removes exactly what belongs to wpimg processes that are gone.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::running::Running;
use crate::common::*;

const WAIT: Duration = Duration::from_secs(300);

fn entries(dir: &Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default()
}

fn removed<'a>(events: &'a [serde_json::Value], kind: &str) -> Vec<&'a str> {
    events
        .iter()
        .filter(|e| e["event"] == "removed" && e["kind"] == kind)
        .filter_map(|e| e["name"].as_str())
        .collect()
}

#[test]
fn sigkill_during_provision_then_the_next_build_collects() {
    require_fixtures();
    require("ansible-playbook");
    let name = unique("wpimg-test/killed");
    let d = tempfile::tempdir().unwrap();
    write(
        &d.path().join("image.yaml"),
        "name: ${name}\nbase: 127.0.0.1:5000/debian:bookworm\nprovision:\n  playbook: ${playbook:-slow.yml}\n  extra_vars: { marker: left-behind }\n",
    );
    write(&d.path().join("slow.yml"), SLOW_PLAY);
    write(
        &d.path().join("quick.yml"),
        "- hosts: all\n  gather_facts: false\n  tasks:\n    - name: Touch\n      ansible.builtin.file: { path: /opt/quick, state: touch, mode: '0644' }\n",
    );
    let oci = d.path().join(".wpimg/oci");
    let build = |extra: &[&str]| {
        let mut c = wpimg();
        c.current_dir(d.path())
            .args(["build", "--json", "--var"])
            .arg(format!("name={name}"))
            .args(extra);
        c
    };

    let mut run = Running::start(&mut build(&[]));
    let task = run.wait_for(WAIT, |e| {
        e["event"] == "output"
            && e["line"]
                .as_str()
                .unwrap_or("")
                .contains("TASK [Sleep long]")
    });
    assert!(task.is_some(), "the play never started: {:?}", run.seen());
    std::thread::sleep(Duration::from_secs(1));
    let tmp = std::fs::canonicalize(oci.join("tmp")).unwrap();
    let needle = tmp.to_string_lossy().into_owned();
    let ansible: Vec<u32> = processes_mentioning(&needle)
        .into_iter()
        .map(|(pid, _)| pid)
        .filter(|p| parent_of(*p) == Some(run.pid()))
        .collect();
    assert_eq!(ansible.len(), 1, "ansible-playbook runs now");
    run.signal(libc::SIGKILL);
    let (status, _, _) = run.finish();
    assert_eq!(status.code(), None, "killed by a signal");

    // ansible-playbook dies with wpimg (its workers, in its process group, are left to the
    // collection); the container and the private files stay behind.
    let started = Instant::now();
    while parent_of(ansible[0]).is_some() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "ansible-playbook outlived its wpimg"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let containers = build_containers(&name);
    assert_eq!(containers.len(), 1, "{containers:?}");
    let runs = entries(&tmp);
    assert_eq!(runs.len(), 1, "{runs:?}");
    let extra_vars = runs[0].join("extra_vars.json");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&extra_vars).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "private file readable by others");

    // The next build collects them and says so.
    let (status, events, stderr) =
        Running::start(&mut build(&["--var", "playbook=quick.yml"])).finish();
    assert!(status.success(), "{events:?}\n{stderr}");
    assert_eq!(
        removed(&events, "container"),
        [containers[0].as_str()],
        "{events:?}"
    );
    let dirs = removed(&events, "temp-dir");
    assert_eq!(dirs, [runs[0].to_string_lossy()], "{events:?}");
    assert!(
        build_containers(&name).is_empty(),
        "the left-over container is still there"
    );
    assert!(entries(&tmp).is_empty(), "the run directory is still there");
    assert!(
        processes_mentioning(&needle).is_empty(),
        "a process of the dead run is still there"
    );
}

#[test]
fn prune_removes_what_dead_builds_left_and_nothing_else() {
    require_fixtures();
    ok_stdout(Command::new("docker").args(["pull", "-q", BASE]));
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .to_string();
    let mut child = Command::new("true").spawn().unwrap();
    let dead = child.id().to_string();
    child.wait().unwrap();
    let me = std::process::id().to_string();
    let tag = unique("prune");
    // (name, host, pid): only the first is a dead build's.
    let cases = [
        (format!("{tag}-dead"), host.clone(), dead.clone()),
        (format!("{tag}-live"), host.clone(), me.clone()),
        (format!("{tag}-x-kept"), host.clone(), dead.clone()),
        (
            format!("{tag}-elsewhere"),
            format!("{host}-other"),
            dead.clone(),
        ),
    ];
    let _guards: Vec<ContainerGuard> = cases
        .iter()
        .map(|(n, h, pid)| {
            ok_stdout(Command::new("docker").args([
                "create",
                "--name",
                n,
                "--label",
                "io.wpimg.build=1",
                "--label",
                &format!("io.wpimg.image={tag}"),
                "--label",
                &format!("io.wpimg.host={h}"),
                "--label",
                &format!("io.wpimg.pid={pid}"),
                BASE,
                "true",
            ]));
            ContainerGuard(n.clone())
        })
        .collect();
    // A committed image of the dead build (as `--layer-path api` makes): it keeps the labels.
    let image = ok_stdout(Command::new("docker").args(["commit", &cases[0].0]))
        .trim()
        .to_string();
    let _img = ImageGuard(image.clone());

    let d = tempfile::tempdir().unwrap();
    let oci = d.path().join("oci");
    write(&oci.join(format!("ingest/blob-{dead}-abc123")), "partial");
    write(&oci.join(format!("ingest/blob-{me}-live")), "in use");
    write(
        &oci.join(format!("tmp/run-{dead}-xyz/extra_vars.json")),
        "{}",
    );

    let o = run(wpimg().args(["prune", "--json", "--oci-dir"]).arg(&oci));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let result: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(result["event"], "result");
    assert_eq!(result["command"], "prune");
    let names: Vec<String> = result["removed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            format!(
                "{} {}",
                r["kind"].as_str().unwrap(),
                r["name"].as_str().unwrap()
            )
        })
        .collect();
    let has = |s: &str| names.iter().any(|n| n.contains(s));
    assert!(has(&format!("container {}", cases[0].0)), "{names:?}");
    assert!(has(&format!("image {image}")), "{names:?}");
    assert!(has(&format!("blob-{dead}-abc123")), "{names:?}");
    assert!(has("temp-dir"), "{names:?}");
    for (n, _, _) in &cases[1..] {
        assert!(!has(n), "{n} removed: {names:?}");
    }
    assert!(!has("live"), "{names:?}");
    let left = ok_stdout(Command::new("docker").args([
        "ps",
        "-a",
        "--filter",
        &format!("label=io.wpimg.image={tag}"),
        "--format",
        "{{.Names}}",
    ]));
    let mut left: Vec<&str> = left.lines().collect();
    left.sort();
    let mut want: Vec<&str> = cases[1..].iter().map(|c| c.0.as_str()).collect();
    want.sort();
    assert_eq!(left, want);
    let gone = run(Command::new("docker").args(["image", "inspect", &image]));
    assert!(!gone.status.success(), "committed image still there");
    assert!(oci.join(format!("ingest/blob-{me}-live")).exists());
    assert!(!oci.join(format!("ingest/blob-{dead}-abc123")).exists());
    assert!(!oci.join(format!("tmp/run-{dead}-xyz")).exists());

    // Nothing more the second time.
    let o = run(wpimg().args(["prune", "--json", "--oci-dir"]).arg(&oci));
    let again: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().last().unwrap()).unwrap();
    assert_eq!(again["removed"], serde_json::json!([]));
}

/// Removes a container on drop.
struct ContainerGuard(String);

impl Drop for ContainerGuard {
    fn drop(&mut self) {
        let _ = Command::new("docker").args(["rm", "-f", &self.0]).output();
    }
}
