//! `wpimg build` end to end: real Docker engine, real ansible-playbook, the fixture registry.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/changes")
}

/// Copy the fixture project into a temp dir, with an optional image.yaml replacement.
fn project(image_yaml: Option<&str>) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    for f in ["changes.yml", "slow.yml", "failing.yml", "image.yaml"] {
        std::fs::copy(fixtures().join(f), d.path().join(f)).unwrap();
    }
    if let Some(y) = image_yaml {
        write(&d.path().join("image.yaml"), y);
    }
    d
}

fn json_lines(stdout: &str) -> Vec<serde_json::Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect()
}

#[test]
fn build_carries_every_kind_of_change_and_the_config() {
    require_fixtures();
    require("ansible-playbook");
    require("skopeo");
    let name = unique("wpimg-test/changes");
    let _img = ImageGuard(format!("{name}:latest"));
    let _img2 = ImageGuard(format!("{name}-skopeo:latest"));
    let p = project(None);
    let oci = p.path().join(".wpimg/oci");
    let o = run(wpimg()
        .current_dir(p.path())
        .args(["build", "--load", "--json", "--var"])
        .arg(format!("name={name}")));
    let stdout = String::from_utf8_lossy(&o.stdout);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "build failed:\n{stdout}\n{stderr}");
    let events = json_lines(&stdout);
    let result = events.last().unwrap();
    assert_eq!(result["event"], "result");
    assert_eq!(result["reference"], format!("{name}:latest"));
    let stages: Vec<&str> = events
        .iter()
        .filter(|e| e["event"] == "stage_start")
        .filter_map(|e| e["stage"].as_str())
        .collect();
    for s in ["pull", "provision", "layer", "assemble", "load"] {
        assert!(stages.contains(&s), "stage {s} missing from {stages:?}");
    }
    assert!(
        events.iter().any(|e| e["event"] == "output"
            && e["line"].as_str().unwrap_or("").contains("TASK [Hardlink]")),
        "ansible output was not streamed"
    );
    let digest = result["manifest"]["digest"].as_str().unwrap().to_string();
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(oci.join("index.json")).unwrap()).unwrap();
    assert!(index.to_string().contains(&digest));
    assert!(
        temp_blobs(&oci).is_empty(),
        "temp blobs left: {:?}",
        temp_blobs(&oci)
    );
    assert!(
        build_containers(&name).is_empty(),
        "build container left behind"
    );

    // Every change, seen from inside a container of the result.
    let checks = r#"
set -u
cat /opt/wpimg-test/added.txt
echo "issue=$(cat /etc/issue)"
test -e /etc/motd && echo motd-present || echo motd-gone
test -e /etc/cron.daily && echo crondaily-present || echo crondaily-gone
echo "skel=$(ls -A /etc/skel | tr '\n' ' ')"
echo "link=$(readlink /opt/wpimg-test/link.txt)"
echo "inodes=$(stat -c %i /opt/wpimg-test/added.txt) $(stat -c %i /opt/wpimg-test/hard.txt) nlink=$(stat -c %h /opt/wpimg-test/hard.txt)"
echo "suid=$(stat -c %a /opt/wpimg-test/suid)"
echo "owned=$(stat -c %u:%g:%a /opt/wpimg-test/owned)"
echo "cap=$(getcap /opt/wpimg-test/capbin)"
test -e /tmp/excluded.txt && echo tmp-present || echo tmp-gone
test -e /root/.ansible && echo ansible-tmp-present || echo ansible-tmp-gone
python3 -c 'print("python-ok")'
"#;
    let out = ok_stdout(Command::new("docker").args([
        "run",
        "--rm",
        "--user",
        "0",
        "--entrypoint",
        "/bin/sh",
        &format!("{name}:latest"),
        "-c",
        checks,
    ]));
    assert!(out.contains("added by ansible m1"), "{out}");
    assert!(out.contains("issue=modified by wpimg test"), "{out}");
    assert!(out.contains("motd-gone"), "{out}");
    assert!(out.contains("crondaily-gone"), "{out}");
    assert!(out.contains("skel=only-this "), "{out}");
    assert!(out.contains("link=/opt/wpimg-test/added.txt"), "{out}");
    let inodes = out.lines().find(|l| l.starts_with("inodes=")).unwrap();
    let parts: Vec<&str> = inodes["inodes=".len()..].split_whitespace().collect();
    assert_eq!(parts[0], parts[1], "hardlink lost: {inodes}");
    assert_eq!(parts[2], "nlink=2", "{inodes}");
    assert!(out.contains("suid=4755"), "{out}");
    assert!(out.contains("owned=1234:1234:600"), "{out}");
    assert!(out.contains("cap_net_bind_service=ep"), "{out}");
    assert!(out.contains("tmp-gone"), "{out}");
    assert!(out.contains("ansible-tmp-gone"), "{out}");
    assert!(out.contains("python-ok"), "{out}");

    // The default command runs as the configured user.
    let out = ok_stdout(Command::new("docker").args(["run", "--rm", &format!("{name}:latest")]));
    assert_eq!(out.trim(), "added by ansible m1");

    // Config as Docker sees it.
    let inspect: serde_json::Value =
        serde_json::from_str(&ok_stdout(Command::new("docker").args([
            "image",
            "inspect",
            &format!("{name}:latest"),
        ])))
        .unwrap();
    let c = &inspect[0]["Config"];
    assert_eq!(
        c["Cmd"],
        serde_json::json!(["/bin/cat", "/opt/wpimg-test/added.txt"])
    );
    let env: Vec<&str> = c["Env"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert!(env.contains(&"GREETING=hello"), "{env:?}");
    let base_cfg: serde_json::Value =
        serde_json::from_str(&ok_stdout(Command::new("skopeo").args([
            "inspect",
            "--config",
            "--tls-verify=false",
            &format!("docker://{BASE}"),
        ])))
        .unwrap();
    for e in base_cfg["config"]["Env"].as_array().into_iter().flatten() {
        assert!(
            env.contains(&e.as_str().unwrap()),
            "base env {e} lost: {env:?}"
        );
    }
    assert!(
        c["Entrypoint"].is_null(),
        "the build container's keep-alive leaked into the config: {c}"
    );
    assert!(c["ExposedPorts"].get("8080/tcp").is_some(), "{c}");
    assert!(c["ExposedPorts"].get("53/udp").is_some(), "{c}");
    assert_eq!(c["Labels"]["org.opencontainers.image.title"], "changes");
    assert_eq!(c["User"], "1234");
    assert_eq!(c["WorkingDir"], "/opt/wpimg-test");
    assert!(c["Volumes"].get("/data").is_some(), "{c}");
    assert_eq!(c["StopSignal"], "SIGQUIT");

    // And as skopeo sees the layout.
    let oci_ref = format!("oci:{}:{name}:latest", oci.display());
    let cfg: serde_json::Value = serde_json::from_str(&ok_stdout(
        Command::new("skopeo").args(["inspect", "--config", &oci_ref]),
    ))
    .unwrap();
    assert_eq!(cfg["config"]["User"], "1234");
    assert_eq!(cfg["config"]["Cmd"], c["Cmd"]);
    let history = cfg["history"].as_array().unwrap();
    assert!(
        history.last().unwrap()["created_by"]
            .as_str()
            .unwrap()
            .contains("ansible-playbook"),
        "{history:?}"
    );
    let raw: serde_json::Value = serde_json::from_str(&ok_stdout(
        Command::new("skopeo").args(["inspect", "--raw", &oci_ref]),
    ))
    .unwrap();
    let layers = raw["layers"].as_array().unwrap();
    assert_eq!(
        cfg["rootfs"]["diff_ids"].as_array().unwrap().len(),
        layers.len()
    );
    assert_eq!(
        layers.last().unwrap()["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );
    ok_stdout(Command::new("skopeo").args([
        "copy",
        "--quiet",
        &oci_ref,
        &format!("docker-daemon:{name}-skopeo:latest"),
    ]));
    let out =
        ok_stdout(Command::new("docker").args(["run", "--rm", &format!("{name}-skopeo:latest")]));
    assert_eq!(out.trim(), "added by ansible m1");

    // inspect reads it back from the layout.
    let o = run(wpimg()
        .current_dir(p.path())
        .args(["inspect", "--json", "--oci-dir"])
        .arg(&oci)
        .arg(format!("{name}:latest")));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ev = json_lines(&String::from_utf8_lossy(&o.stdout));
    assert_eq!(ev.last().unwrap()["digest"], digest.as_str());
}

fn assert_bad_input(image_yaml: &str, expect: &[&str]) {
    require_fixtures();
    let name = unique("wpimg-test/bad");
    let p = project(Some(&image_yaml.replace("NAME", &name)));
    let o = run(wpimg().current_dir(p.path()).arg("build"));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "want exit 2, stderr: {stderr}");
    for e in expect {
        assert!(stderr.contains(e), "stderr lacks {e:?}: {stderr}");
    }
    assert!(
        build_containers(&name).is_empty(),
        "a container was started"
    );
    assert!(
        !p.path().join(".wpimg").exists() || temp_blobs(&p.path().join(".wpimg/oci")).is_empty(),
        "something was written"
    );
}

#[test]
fn bad_input_unknown_key() {
    assert_bad_input(
        "name: NAME\nbase: 127.0.0.1:5000/debian:bookworm\nprovision:\n  playbook: changes.yml\n  playbok_args: []\n",
        &["image.yaml:5:3", "provision.playbok_args", "unknown key"],
    );
}

#[test]
fn bad_input_wrong_type() {
    assert_bad_input(
        "name: NAME\nbase: 127.0.0.1:5000/debian:bookworm\nprovision:\n  playbook: changes.yml\nimage:\n  cmd: /bin/true\n",
        &["image.yaml:6:", "image.cmd", "expected a list of strings"],
    );
}

#[test]
fn bad_input_missing_playbook() {
    assert_bad_input(
        "name: NAME\nbase: 127.0.0.1:5000/debian:bookworm\nprovision:\n  playbook: nope.yml\n",
        &[
            "image.yaml:4:",
            "provision.playbook",
            "nope.yml",
            "not found",
        ],
    );
}

#[test]
fn bad_input_unparsable_reference() {
    assert_bad_input(
        "name: NAME\nbase: \"127.0.0.1:5000/Debian::bookworm\"\nprovision:\n  playbook: changes.yml\n",
        &["image.yaml:2:", "base", "unparsable image reference"],
    );
}

#[test]
fn bad_input_undefined_variable() {
    assert_bad_input(
        "name: NAME\nbase: 127.0.0.1:5000/debian:${flavour}\nprovision:\n  playbook: changes.yml\n",
        &["image.yaml:2:", "base", "undefined variable ${flavour}"],
    );
}

#[test]
fn bad_flag_is_exit_2() {
    let o = run(wpimg().args(["build", "--no-such-flag"]));
    assert_eq!(o.status.code(), Some(2));
    let o = run(wpimg().args(["build", "--var", "no-equals-sign"]));
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("KEY=VALUE"));
}

#[test]
fn failing_play_names_the_task_and_removes_the_container() {
    require_fixtures();
    require("ansible-playbook");
    let name = unique("wpimg-test/fail");
    let p = project(None);
    let y = std::fs::read_to_string(p.path().join("image.yaml"))
        .unwrap()
        .replace("playbook: changes.yml", "playbook: failing.yml");
    write(&p.path().join("image.yaml"), &y);
    let o = run(wpimg()
        .current_dir(p.path())
        .args(["build", "--var"])
        .arg(format!("name={name}")));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("Break on purpose"),
        "failing task not named: {stderr}"
    );
    assert!(build_containers(&name).is_empty(), "container left behind");

    // --keep-on-error keeps it and says its name.
    let o = run(wpimg()
        .current_dir(p.path())
        .args(["build", "--keep-on-error", "--var"])
        .arg(format!("name={name}")));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    let kept = build_containers(&name);
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert!(
        stderr.contains(&kept[0]),
        "kept container not named: {stderr}"
    );
    ok_stdout(Command::new("docker").args(["rm", "-f", &kept[0]]));
}

#[test]
fn interrupt_during_provisioning_removes_the_container() {
    require_fixtures();
    require("ansible-playbook");
    let name = unique("wpimg-test/intr");
    let p = project(None);
    let y = std::fs::read_to_string(p.path().join("image.yaml"))
        .unwrap()
        .replace("playbook: changes.yml", "playbook: slow.yml");
    write(&p.path().join("image.yaml"), &y);
    let mut child = wpimg()
        .current_dir(p.path())
        .args(["build", "--var"])
        .arg(format!("name={name}"))
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut seen = String::new();
    let start = Instant::now();
    for line in BufReader::new(stderr).lines() {
        let line = line.unwrap();
        seen.push_str(&line);
        seen.push('\n');
        if line.contains("TASK [Sleep long]") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "no progress: {seen}"
        );
    }
    assert!(
        seen.contains("TASK [Sleep long]"),
        "never reached the task: {seen}"
    );
    assert_eq!(
        build_containers(&name).len(),
        1,
        "container should be running now"
    );
    // SAFETY: sending a signal to our own child.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
    }
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    assert!(
        build_containers(&name).is_empty(),
        "container left behind after SIGINT"
    );
}

#[test]
fn validate_reports_every_problem_with_lines() {
    let p = project(Some(
        "name: app\nbase: ${undefined_base}\nprovision:\n  playbook: missing.yml\nimage:\n  expose: [http]\n",
    ));
    let o = run(wpimg()
        .current_dir(p.path())
        .args(["validate", "image.yaml"]));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("image.yaml:2:7: base: undefined variable"),
        "{stderr}"
    );
    assert!(
        stderr.contains("image.yaml:4:13: provision.playbook"),
        "{stderr}"
    );
    assert!(
        stderr.contains("image.yaml:6:12: image.expose[0]: invalid port"),
        "{stderr}"
    );
}

fn simple_project() -> tempfile::TempDir {
    let p = project(None);
    std::fs::copy(fixtures().join("simple.yml"), p.path().join("simple.yml")).unwrap();
    let y = std::fs::read_to_string(p.path().join("image.yaml"))
        .unwrap()
        .replace("playbook: changes.yml", "playbook: simple.yml");
    write(&p.path().join("image.yaml"), &y);
    p
}

fn build_json(dir: &Path, args: &[&str], sde: Option<&str>) -> serde_json::Value {
    let mut c = wpimg();
    c.current_dir(dir).arg("build").arg("--json").args(args);
    if let Some(s) = sde {
        c.env("SOURCE_DATE_EPOCH", s);
    }
    let o = run(&mut c);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "build {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    json_lines(&stdout).pop().unwrap()
}

#[test]
fn upperdir_and_api_paths_give_the_same_digests() {
    require_fixtures();
    require("ansible-playbook");
    let name = unique("wpimg-test/paths");
    let p = simple_project();
    let var = format!("name={name}");
    let a = build_json(
        p.path(),
        &["--var", &var, "--layer-path", "upperdir", "--no-cache"],
        Some("1700000000"),
    );
    let b = build_json(
        p.path(),
        &["--var", &var, "--layer-path", "api", "--no-cache"],
        Some("1700000000"),
    );
    assert_eq!(a["layer_path"], "upperdir");
    assert_eq!(b["layer_path"], "api");
    assert_eq!(a["diff_id"], b["diff_id"], "uncompressed layers differ");
    assert_eq!(a["layers"], b["layers"], "compressed layers differ");
    assert_eq!(a["config_digest"], b["config_digest"]);
    assert_eq!(a["manifest"]["digest"], b["manifest"]["digest"]);
    assert!(build_containers(&name).is_empty());
}

#[test]
fn unchanged_rebuild_hits_the_cache_and_changes_miss() {
    require_fixtures();
    require("ansible-playbook");
    let name = unique("wpimg-test/cache");
    let p = simple_project();
    let var = format!("name={name}");
    let first = build_json(p.path(), &["--var", &var], None);
    assert_eq!(first["cache"], "miss");
    let t = Instant::now();
    let again = build_json(p.path(), &["--var", &var], None);
    let hit_secs = t.elapsed().as_secs_f64();
    assert_eq!(again["cache"], "hit");
    assert_eq!(again["layer_path"], "cache");
    assert_eq!(
        again["manifest"]["digest"], first["manifest"]["digest"],
        "an unchanged rebuild must give the same image"
    );
    eprintln!("cache hit rebuild took {hit_secs:.2}s");
    let changed_var = build_json(p.path(), &["--var", &var, "--var", "marker=m2"], None);
    assert_eq!(changed_var["cache"], "miss", "a variable change must miss");
    std::fs::write(
        p.path().join("simple.yml"),
        std::fs::read_to_string(p.path().join("simple.yml"))
            .unwrap()
            .replace("/opt/simple/file.txt", "/opt/simple/other.txt"),
    )
    .unwrap();
    let changed_pb = build_json(p.path(), &["--var", &var], None);
    assert_eq!(changed_pb["cache"], "miss", "a playbook change must miss");
    let manifest = p.path().join("build-manifest.json");
    let forced = build_json(
        p.path(),
        &[
            "--var",
            &var,
            "--no-cache",
            "--manifest",
            manifest.to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(forced["cache"], "miss");
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
    assert_eq!(m["manifest_digest"], forced["manifest"]["digest"]);
    assert_eq!(m["layers"], forced["layers"]);
    assert!(m["stages"].as_array().is_some_and(|s| !s.is_empty()), "{m}");
}

#[test]
fn cache_repo_shares_the_layer_between_checkouts() {
    require_fixtures();
    require("ansible-playbook");
    let reg = crate::common::registry::Registry::start();
    let cache = format!("{}/wpimg/cache", reg.host());
    let name = unique("wpimg-test/shared");
    let var = format!("name={name}");
    let a = simple_project();
    let first = build_json(a.path(), &["--var", &var, "--cache-repo", &cache], None);
    assert_eq!(first["cache"], "miss");
    assert!(
        first["stages"].to_string().contains("cache-push"),
        "{}",
        first["stages"]
    );
    // Another checkout (another directory, empty layout) of the same project: a remote hit.
    let b = simple_project();
    let second = build_json(b.path(), &["--var", &var, "--cache-repo", &cache], None);
    assert_eq!(second["cache"], "hit");
    assert_eq!(second["manifest"]["digest"], first["manifest"]["digest"]);
    assert!(build_containers(&name).is_empty());
}
