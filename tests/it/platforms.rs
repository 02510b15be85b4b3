//! Multi-platform images (issue 15): `platforms:` builds one image per platform — linux/amd64
//! natively, linux/arm64 through qemu's binfmt handler (scripts/setup registers it) — into one
//! OCI index. The index is pushed, run by docker on each platform, pulled by containerd, read by
//! skopeo, rebuilt from the cache; a platform no handler serves fails before any build;
//! `--engine` sends arm64 to a second engine; the index goes to ECR like an image.

use std::io::Read;
use std::path::Path;
use std::process::Command;

use crate::common::ecr::{wpimg_push_ecr, write_ecr_image_yaml, Moto, MOTO_ACCOUNT, VENV_PYTHON};
use crate::common::engine::SecondEngine;
use crate::common::registry::{free_port, Registry, RegistryOptions};
use crate::common::*;

/// debian:bookworm (amd64) and debian:bookworm-arm64 as one index (scripts/setup).
const MULTI_BASE: &str = "127.0.0.1:5000/debian:bookworm-multi";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const CONTAINERD: &str = "/var/run/docker/containerd/containerd.sock";

/// A tiny play (emulated arm64 is slow): the architecture Ansible's facts report, in a file.
const PLAY: &str = r#"- hosts: all
  gather_facts: true
  gather_subset: [min]
  tasks:
    - name: Make the directory
      ansible.builtin.file:
        path: /opt/wpimg-platform
        state: directory
        mode: "0755"
    - name: Record the architecture Ansible sees
      ansible.builtin.copy:
        dest: /opt/wpimg-platform/arch.txt
        content: "{{ ansible_architecture }}\n"
        mode: "0644"
    - name: Report it (a provisioning output, per platform)
      ansible.builtin.set_stats:
        data: { arch: "{{ ansible_architecture }}" }
        per_host: false
"#;

/// A project building `platforms` from `base`, pushed (with `--push`) to `repository:v1`.
fn project(name: &str, base: &str, platforms: &str, repository: &str) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    write(&d.path().join("site.yml"), PLAY);
    write(
        &d.path().join("image.yaml"),
        &format!(
            "name: {name}\nbase: {base}\nplatforms: {platforms}\nprovision:\n  playbook: site.yml\n\
             image:\n  cmd: [\"/bin/cat\", \"/opt/wpimg-platform/arch.txt\"]\n  labels:\n\
             \x20   arch: ${{outputs.arch}}\n\
             target:\n  repository: {repository}\n  tags: [v1]\n"
        ),
    );
    d
}

fn json_lines(stdout: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn wpimg_build(dir: &Path, args: &[&str]) -> (std::process::Output, Vec<serde_json::Value>) {
    let o = run(wpimg()
        .current_dir(dir)
        .args(["build", "--json"])
        .args(args));
    let events = json_lines(&o.stdout);
    (o, events)
}

fn digests(result: &serde_json::Value) -> Vec<(String, String)> {
    result["platforms"]
        .as_array()
        .unwrap_or_else(|| panic!("no platforms in {result}"))
        .iter()
        .map(|p| {
            (
                p["platform"].as_str().unwrap().to_string(),
                p["manifest"]["digest"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Positions of the first and last event of `platform`'s part of the build.
fn span(events: &[serde_json::Value], platform: &str) -> (usize, usize) {
    let at: Vec<usize> = events
        .iter()
        .enumerate()
        .filter(|(_, e)| e["platform"] == platform)
        .map(|(i, _)| i)
        .collect();
    assert!(!at.is_empty(), "no event of {platform}");
    (at[0], at[at.len() - 1])
}

/// `uname -m` and the play's file in a container of `image` on `platform` (pulled first).
fn run_on(platform: &str, image: &str) -> String {
    ok_stdout(Command::new("docker").args(["pull", "-q", "--platform", platform, image]));
    ok_stdout(Command::new("docker").args([
        "run",
        "--rm",
        "--platform",
        platform,
        "--entrypoint",
        "/bin/sh",
        image,
        "-c",
        "uname -m; cat /opt/wpimg-platform/arch.txt",
    ]))
}

/// Remove a containerd namespace's images, then the namespace, on drop.
struct CtrNamespace(String);

impl CtrNamespace {
    fn ctr(&self) -> Command {
        let mut c = Command::new("ctr");
        c.args(["--address", CONTAINERD, "--namespace", &self.0]);
        c
    }
}

impl Drop for CtrNamespace {
    fn drop(&mut self) {
        let list = self.ctr().args(["images", "ls", "-q"]).output();
        for image in list
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
            .lines()
        {
            let _ = self.ctr().args(["images", "rm", "--sync", image]).output();
        }
        let _ = Command::new("ctr")
            .args(["--address", CONTAINERD, "namespaces", "rm", &self.0])
            .output();
    }
}

#[test]
fn two_platforms_one_index_pushed_run_pulled_and_rebuilt() {
    require_fixtures();
    require("ansible-playbook");
    require("skopeo");
    require("ctr");
    let reg = Registry::start();
    let name = unique("wpimg-test/platforms");
    let repo = format!("{}/wpimg/platforms", reg.host());
    let p = project(&name, MULTI_BASE, "[linux/amd64, linux/arm64]", &repo);
    let oci = p.path().join(".wpimg/oci");
    // Outside the project: every file next to the playbook is part of the cache key.
    let out = tempfile::tempdir().unwrap();
    let manifest_file = out.path().join("build-manifest.json");
    let _g = ImageGuard(format!("{repo}:v1"));

    let (o, events) = wpimg_build(
        p.path(),
        &["--push", "--manifest", manifest_file.to_str().unwrap()],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let r = events.last().unwrap();
    assert_eq!(r["event"], "result");

    // The result: the index as the manifest, each platform's image, the index digest as URI.
    assert_eq!(r["manifest"]["mediaType"], OCI_INDEX, "{r}");
    let index = r["index_digest"].as_str().unwrap().to_string();
    assert_eq!(r["manifest"]["digest"], index.as_str());
    assert_eq!(r["image_uri"], format!("{repo}@{index}"));
    let built = digests(r);
    let names: Vec<&str> = built.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(names, ["linux/amd64", "linux/arm64"]);
    for (i, arch) in ["amd64", "arm64"].iter().enumerate() {
        let one = &r["platforms"][i];
        assert_eq!(one["manifest"]["platform"]["architecture"], *arch, "{one}");
        assert_eq!(one["cache"], "miss");
        assert_eq!(one["engine"], "unix:///var/run/docker.sock");
        assert!(one["seconds"].as_f64().unwrap() > 0.0);
        assert!(one["stages"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["stage"] == "provision"));
    }
    // Each platform has its own outputs (issue 16).
    assert_eq!(r["platforms"][0]["outputs"]["arch"], "x86_64", "{r}");
    assert_eq!(r["platforms"][1]["outputs"]["arch"], "aarch64");
    assert_eq!(r["outputs"]["arch"], "x86_64");
    let (amd, arm) = (built[0].1.clone(), built[1].1.clone());
    assert_ne!(amd, arm);
    let pushed: Vec<&str> = r["push"]["platforms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["digest"].as_str().unwrap())
        .collect();
    assert_eq!(pushed, [amd.as_str(), arm.as_str()]);
    // Stages up front, then each platform's events carry the platform; one engine: one
    // platform after the other.
    let stages: Vec<&str> = events
        .iter()
        .filter(|e| e["event"] == "stage_start" && e.get("platform").is_none())
        .map(|e| e["stage"].as_str().unwrap())
        .collect();
    assert_eq!(stages[..3], ["engine", "probe", "resolve"], "{stages:?}");
    assert!(
        span(&events, "linux/amd64").1 < span(&events, "linux/arm64").0,
        "platforms of one engine overlapped"
    );

    // The build manifest file lists the index and every platform's manifest.
    let doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&manifest_file).unwrap()).unwrap();
    assert_eq!(doc["manifest_digest"], index.as_str());
    assert_eq!(doc["index_digest"], index.as_str());
    assert_eq!(doc["platforms"][0]["platform"], "linux/amd64");
    assert_eq!(doc["platforms"][1]["manifest_digest"], arm.as_str());
    assert_eq!(doc["platforms"][1]["outputs"]["arch"], "aarch64");
    assert_eq!(doc["pushed"][0]["image_uri"], format!("{repo}@{index}"));

    // The registry holds the index and each platform's manifest on its own.
    let raw = ok_stdout(Command::new("skopeo").args([
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{repo}:v1"),
    ]));
    let idx: serde_json::Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(idx["mediaType"], OCI_INDEX);
    assert_eq!(idx["manifests"][0]["digest"], amd.as_str());
    assert_eq!(idx["manifests"][1]["platform"]["architecture"], "arm64");
    let arch = ok_stdout(Command::new("skopeo").args([
        "inspect",
        "--tls-verify=false",
        "--format",
        "{{.Architecture}}",
        &format!("docker://{repo}@{arm}"),
    ]));
    assert_eq!(arch.trim(), "arm64");
    let label = ok_stdout(Command::new("skopeo").args([
        "inspect",
        "--tls-verify=false",
        "--format",
        "{{.Labels.arch}}",
        &format!("docker://{repo}@{arm}"),
    ]));
    assert_eq!(
        label.trim(),
        "aarch64",
        "the arm64 image's label has its own output"
    );

    // docker runs each platform; Ansible saw the platform's own facts.
    assert_eq!(
        run_on("linux/arm64", &format!("{repo}:v1")),
        "aarch64\naarch64\n"
    );
    ok_stdout(Command::new("docker").args(["rmi", &format!("{repo}:v1")]));
    assert_eq!(
        run_on("linux/amd64", &format!("{repo}:v1")),
        "x86_64\nx86_64\n"
    );

    // containerd's own puller and unpacker accept both.
    let ns = CtrNamespace(unique("wpimg-test"));
    for platform in ["linux/arm64", "linux/amd64"] {
        let o = run(ns.ctr().args([
            "images",
            "pull",
            "--plain-http",
            "--platform",
            platform,
            &format!("{repo}:v1"),
        ]));
        assert!(o.status.success(), "ctr pull {platform}: {}", stderr(&o));
    }
    drop(ns);

    // An unchanged rebuild hits the cache on both platforms: the same index; --load puts the
    // engine's own platform into Docker.
    let _loaded = ImageGuard(format!("{name}:v1"));
    let (o, events) = wpimg_build(p.path(), &["--load"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let again = events.last().unwrap();
    assert_eq!(again["index_digest"], index.as_str());
    assert_eq!(again["cache"], "hit");
    for one in again["platforms"].as_array().unwrap() {
        assert_eq!(one["cache"], "hit", "{one}");
    }
    assert_eq!(digests(again), built);
    assert_eq!(
        again["platforms"][1]["outputs"]["arch"], "aarch64",
        "{again}"
    );
    assert_eq!(again["loaded"], format!("{name}:v1"));
    let id = ok_stdout(Command::new("docker").args([
        "image",
        "inspect",
        "-f",
        "{{.Id}}",
        &format!("{name}:v1"),
    ]));
    assert_eq!(
        id.trim(),
        again["platforms"][0]["config_digest"].as_str().unwrap()
    );
    let o = ok_stdout(Command::new("docker").args(["run", "--rm", &format!("{name}:v1")]));
    assert_eq!(o, "x86_64\n");

    // inspect shows the platforms; each image is reachable from the index and by digest.
    let o = run(wpimg()
        .current_dir(p.path())
        .args(["inspect", "--json", "--platform", "linux/arm64"])
        .arg(format!("{name}:v1")));
    assert!(o.status.success(), "{}", stderr(&o));
    let view = json_lines(&o.stdout).pop().unwrap();
    assert_eq!(view["digest"], arm.as_str());
    assert_eq!(view["index_digest"], index.as_str());
    assert_eq!(view["platform"], "linux/arm64");
    assert_eq!(view["platforms"].as_array().unwrap().len(), 2);
    let o = run(wpimg()
        .arg("inspect")
        .arg(format!("oci:{}:{amd}", oci.display())));
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("platform    linux/amd64"), "{text}");

    assert!(build_containers(&name).is_empty(), "build containers left");
    assert!(temp_blobs(&oci).is_empty(), "{:?}", temp_blobs(&oci));
}

#[test]
fn a_failing_platform_is_named_and_nothing_is_tagged() {
    require_fixtures();
    require("ansible-playbook");
    let name = unique("wpimg-test/platformfails");
    let p = project(
        &name,
        MULTI_BASE,
        "[linux/amd64, linux/arm64]",
        "127.0.0.1:5000/unused",
    );
    write(
        &p.path().join("site.yml"),
        "- hosts: all\n  gather_facts: true\n  gather_subset: [min]\n  tasks:\n    - name: Break on amd64\n      ansible.builtin.fail:\n        msg: not on this platform\n      when: ansible_architecture == 'x86_64'\n",
    );
    let oci = p.path().join(".wpimg/oci");
    let (o, events) = wpimg_build(p.path(), &[]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("platform linux/amd64: provisioning failed"),
        "{err}"
    );
    assert!(err.contains("Break on amd64"), "{err}");
    // One engine: the second platform never started; nothing is tagged or left.
    assert!(
        !events.iter().any(|e| e["platform"] == "linux/arm64"),
        "linux/arm64 started after linux/amd64 failed"
    );
    let index = std::fs::read_to_string(oci.join("index.json")).unwrap();
    assert!(!index.contains(&name), "{index}");
    assert!(build_containers(&name).is_empty());
    assert!(temp_blobs(&oci).is_empty(), "{:?}", temp_blobs(&oci));
}

/// A platform no binfmt handler of this machine serves, and its handler's name.
fn unserved_platform() -> (&'static str, &'static str) {
    let candidates = [
        ("linux/s390x", "qemu-s390x"),
        ("linux/riscv64", "qemu-riscv64"),
        ("linux/ppc64le", "qemu-ppc64le"),
        ("linux/mips64le", "qemu-mips64el"),
    ];
    candidates
        .into_iter()
        .find(|(_, h)| !Path::new("/proc/sys/fs/binfmt_misc").join(h).exists())
        .unwrap_or_else(|| {
            panic!("every candidate platform has a binfmt handler here: {candidates:?}")
        })
}

/// Probe containers and images of `platform` on the main engine.
fn probe_leftovers(platform: &str) -> Vec<String> {
    let mut left: Vec<String> = ok_stdout(Command::new("docker").args([
        "ps",
        "-a",
        "--filter",
        &format!("label=io.wpimg.probe={platform}"),
        "--format",
        "{{.Names}}",
    ]))
    .lines()
    .map(str::to_string)
    .collect();
    let arch = platform.rsplit('/').next().unwrap();
    let images = ok_stdout(Command::new("docker").args([
        "images",
        "-q",
        "--no-trunc",
        "--filter",
        "label=io.wpimg.probe",
    ]));
    for id in images.lines() {
        let a =
            run(Command::new("docker").args(["image", "inspect", "-f", "{{.Architecture}}", id]));
        if String::from_utf8_lossy(&a.stdout).trim() == arch {
            left.push(id.to_string());
        }
    }
    left
}

#[test]
fn a_platform_no_binfmt_handler_serves_fails_before_any_build() {
    require_fixtures();
    let (platform, handler) = unserved_platform();
    let name = unique("wpimg-test/unserved");
    let p = project(
        &name,
        MULTI_BASE,
        &format!("[linux/amd64, {platform}]"),
        "127.0.0.1:5000/unused",
    );
    let oci = p.path().join(".wpimg/oci");
    let (o, events) = wpimg_build(p.path(), &[]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    let last = events.last().unwrap();
    assert_eq!(last["event"], "error");
    assert_eq!(last["exit_code"], 1);
    for want in [
        format!("cannot run {platform} containers"),
        format!("/proc/sys/fs/binfmt_misc/{handler}"),
        "qemu-user-static".to_string(),
        format!("--engine {platform}=tcp://HOST:2376"),
    ] {
        assert!(err.contains(&want), "{want:?} missing from {err}");
    }
    assert!(!err.contains("linux/amd64 containers"), "{err}");
    // Before any build: no pull, no build stage, nothing tagged, nothing left.
    assert!(
        !events
            .iter()
            .any(|e| e["event"] == "stage_start" && e["stage"] == "pull"),
        "a build started"
    );
    let blobs = std::fs::read_dir(oci.join("blobs/sha256")).unwrap().count();
    assert_eq!(blobs, 0, "blobs written");
    let index = std::fs::read_to_string(oci.join("index.json")).unwrap();
    assert!(!index.contains(&name), "{index}");
    assert_eq!(probe_leftovers(platform), Vec::<String>::new());
    assert!(build_containers(&name).is_empty());
}

#[test]
fn a_base_without_a_platform_is_bad_input() {
    require_fixtures();
    let name = unique("wpimg-test/noplatform");
    let p = project(
        &name,
        BASE,
        "[linux/amd64, linux/arm64]",
        "127.0.0.1:5000/unused",
    );
    let (o, _) = wpimg_build(p.path(), &[]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!(
            "base image {BASE} has no image for linux/arm64 (it has: linux/amd64)"
        )),
        "{err}"
    );
    let index = std::fs::read_to_string(p.path().join(".wpimg/oci/index.json")).unwrap();
    assert!(!index.contains(&name), "{index}");
    assert!(build_containers(&name).is_empty());
}

/// The bytes of `path` in the top layer of the layout's image `digest`.
fn file_in_top_layer(oci: &Path, digest: &str, path: &str) -> String {
    let blob = |d: &str| {
        oci.join("blobs/sha256")
            .join(d.trim_start_matches("sha256:"))
    };
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(blob(digest)).unwrap()).unwrap();
    let layers = m["layers"].as_array().unwrap();
    let top = layers.last().unwrap()["digest"].as_str().unwrap();
    let gz = flate2::read::GzDecoder::new(std::fs::File::open(blob(top)).unwrap());
    for e in tar::Archive::new(gz).entries().unwrap() {
        let mut e = e.unwrap();
        if e.path().unwrap().to_string_lossy().trim_start_matches("./") == path {
            let mut s = String::new();
            e.read_to_string(&mut s).unwrap();
            return s;
        }
    }
    panic!("{path} not in the top layer of {digest}");
}

#[test]
fn engine_flag_builds_arm64_on_a_second_engine_at_the_same_time() {
    require_fixtures();
    require("ansible-playbook");
    let engine = SecondEngine::start();
    let name = unique("wpimg-test/engines");
    let p = project(
        &name,
        MULTI_BASE,
        "[linux/amd64, linux/arm64]",
        "127.0.0.1:5000/unused",
    );
    let oci = p.path().join(".wpimg/oci");
    let flag = format!("linux/arm64={}", engine.host());
    let (o, events) = wpimg_build(p.path(), &["--engine", &flag]);
    assert!(
        o.status.success(),
        "{}\ndockerd log:\n{}",
        stderr(&o),
        engine.log()
    );
    let r = events.last().unwrap();
    let (amd, arm) = (&r["platforms"][0], &r["platforms"][1]);
    assert_eq!(amd["engine"], "unix:///var/run/docker.sock");
    assert_eq!(arm["engine"], engine.host());
    // The second engine is reached over TCP: its layer comes through the Engine API.
    assert_eq!(arm["layer_path"], "api");
    assert_eq!(amd["layer_path"], "upperdir");
    // Two engines: the platforms overlap.
    let (amd_span, arm_span) = (span(&events, "linux/amd64"), span(&events, "linux/arm64"));
    assert!(
        arm_span.0 < amd_span.1 && amd_span.0 < arm_span.1,
        "platforms on two engines did not build at the same time"
    );
    // The arm64 half ran there: its base is in the second engine (no container is left).
    let archs: Vec<String> = engine
        .docker_ok(&["images", "-q", "--no-trunc"])
        .lines()
        .map(|id| engine.docker_ok(&["image", "inspect", "-f", "{{.Architecture}}", id]))
        .map(|a| a.trim().to_string())
        .collect();
    assert_eq!(archs, ["arm64"], "images of the second engine");
    assert_eq!(engine.containers(), Vec::<String>::new());
    assert!(build_containers(&name).is_empty());
    let arch = |d: &serde_json::Value| {
        file_in_top_layer(
            &oci,
            d["manifest"]["digest"].as_str().unwrap(),
            "opt/wpimg-platform/arch.txt",
        )
    };
    assert_eq!(arch(arm), "aarch64\n");
    assert_eq!(arch(amd), "x86_64\n");
}

#[test]
fn engine_flags_are_checked_before_anything_runs() {
    let name = unique("wpimg-test/engineflags");
    let p = project(
        &name,
        MULTI_BASE,
        "[linux/amd64, linux/arm64]",
        "127.0.0.1:5000/unused",
    );
    for (flag, want) in [
        ("linux/arm64", "expected PLATFORM=DOCKER_HOST_URL"),
        (
            "linux/s390x=tcp://127.0.0.1:1",
            "image.yaml does not build linux/s390x (it builds linux/amd64, linux/arm64)",
        ),
        (
            "arm64=tcp://127.0.0.1:1",
            "\"arm64\" is not os/arch[/variant]",
        ),
        ("linux/arm64=ssh://u@h", "unsupported scheme ssh://"),
    ] {
        let (o, _) = wpimg_build(p.path(), &["--engine", flag]);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "--engine {flag}: {err}");
        assert!(err.contains(&format!("--engine {flag}")), "{err}");
        assert!(err.contains(want), "{want:?} missing from {err}");
    }
    let (o, _) = wpimg_build(
        p.path(),
        &[
            "--engine",
            "linux/arm64=tcp://127.0.0.1:1",
            "--engine",
            "linux/arm64=tcp://127.0.0.1:2",
        ],
    );
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("a second engine for linux/arm64"),
        "{}",
        stderr(&o)
    );
    // A closed port: the engine does not answer (exit 1), named.
    let port = free_port();
    let (o, _) = wpimg_build(
        p.path(),
        &["--engine", &format!("linux/arm64=tcp://127.0.0.1:{port}")],
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains(&format!(
            "no Docker engine answers at tcp://127.0.0.1:{port}"
        )),
        "{}",
        stderr(&o)
    );
}

#[test]
fn probe_executables_run_under_qemu() {
    let d = tempfile::tempdir().unwrap();
    for (platform, runner) in [
        ("linux/amd64", None),
        ("linux/arm64", Some("qemu-aarch64-static")),
        ("linux/arm/v7", Some("qemu-arm-static")),
        ("linux/386", Some("qemu-i386-static")),
        ("linux/riscv64", Some("qemu-riscv64-static")),
        ("linux/ppc64le", Some("qemu-ppc64le-static")),
        ("linux/s390x", Some("qemu-s390x-static")),
    ] {
        use std::os::unix::fs::PermissionsExt;
        let p = wpimg::oci::Platform::parse(platform).unwrap();
        let exe = wpimg::build::probe::executable(&p).unwrap();
        let path = d.path().join(platform.replace('/', "-"));
        std::fs::write(&path, &exe).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        let status = match runner {
            None => Command::new(&path).status(),
            Some(qemu) => {
                require(qemu);
                Command::new(qemu).arg(&path).status()
            }
        }
        .unwrap();
        assert_eq!(status.code(), Some(0), "{platform} probe");
    }
}

/// Register a manifest in moto's ECR (as real ECR would know it after the push).
fn put_in_moto(moto: &Moto, repo: &str, manifest: &str, digest: &str) {
    let script = format!(
        "import boto3,sys\nc=boto3.client('ecr',region_name='us-east-1',endpoint_url='{}',aws_access_key_id='t',aws_secret_access_key='t')\nc.put_image(repositoryName='{repo}',imageManifest=sys.stdin.read(),imageDigest='{digest}')\n",
        moto.url
    );
    let o = run_with_stdin(
        Command::new(VENV_PYTHON).args(["-c", &script]),
        manifest.as_bytes(),
    );
    assert!(o.status.success(), "put_image in moto: {o:?}");
}

#[test]
fn an_index_goes_to_ecr_and_each_platform_is_scanned() {
    require_fixtures();
    require("skopeo");
    let moto = Moto::start();
    let token = format!("{MOTO_ACCOUNT}-auth-token");
    let reg = Registry::start_with(RegistryOptions {
        htpasswd: Some(("AWS".into(), token.clone())),
        tls: false,
    });
    let host = format!("{MOTO_ACCOUNT}.dkr.ecr.us-east-1.amazonaws.com");
    let dir = tempfile::tempdir().unwrap();
    let aws = tempfile::tempdir().unwrap();
    write_ecr_image_yaml(
        dir.path(),
        &format!("{host}/wp"),
        "    region: us-east-1\n    create_repository: true\n",
    );
    // An index in the layout, as a multi-platform build leaves it.
    std::fs::create_dir_all(dir.path().join(".wpimg")).unwrap();
    ok_stdout(Command::new("skopeo").args([
        "copy",
        "--all",
        "--quiet",
        "--src-tls-verify=false",
        &format!("docker://{MULTI_BASE}"),
        &format!("oci:{}:app:v1", dir.path().join(".wpimg/oci").display()),
    ]));
    let url = reg.url();
    let (code, r, err) = wpimg_push_ecr(
        &moto,
        dir.path(),
        aws.path(),
        &["--registry-endpoint", &url],
    );
    assert_eq!(code, Some(0), "{err}");
    let index = r["digest"].as_str().unwrap().to_string();
    assert_eq!(r["image_uri"], format!("{host}/wp@{index}"));
    let children: Vec<String> = r["platforms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["digest"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(children.len(), 2, "{r}");
    let creds = format!("AWS:{token}");
    let raw = ok_stdout(Command::new("skopeo").args([
        "inspect",
        "--raw",
        "--tls-verify=false",
        "--creds",
        &creds,
        &format!("docker://{}/wp:v1", reg.host()),
    ]));
    let idx: serde_json::Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(idx["manifests"].as_array().unwrap().len(), 2);

    // --wait-scan: ECR scans images, not indexes: each platform's scan, added up (moto reports
    // one HIGH finding per image).
    for d in &children {
        let manifest = ok_stdout(Command::new("skopeo").args([
            "inspect",
            "--raw",
            "--tls-verify=false",
            "--creds",
            &creds,
            &format!("docker://{}/wp@{d}", reg.host()),
        ]));
        put_in_moto(&moto, "wp", manifest.trim_end(), d);
    }
    let (code, r, err) = wpimg_push_ecr(
        &moto,
        dir.path(),
        aws.path(),
        &[
            "--registry-endpoint",
            &url,
            "--wait-scan",
            "--scan-timeout",
            "60",
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    assert_eq!(r["scan"]["counts"]["HIGH"], 2, "{r}");
}
