//! `wpimg push` and `wpimg build --push` from the command line against a real docker-registry.

use std::path::Path;
use std::process::{Command, Stdio};

use crate::common::registry::{Proxy, ProxyMode, Registry, RegistryOptions};
use crate::common::*;

fn json_result(stdout: &[u8]) -> serde_json::Value {
    let s = String::from_utf8_lossy(stdout);
    let last = s.lines().last().unwrap_or_else(|| panic!("no JSON output"));
    let v: serde_json::Value = serde_json::from_str(last).unwrap();
    assert_eq!(v["event"], "result", "{s}");
    v
}

fn outcomes(v: &serde_json::Value) -> Vec<String> {
    v["blobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["outcome"].as_str().unwrap().to_string())
        .collect()
}

/// A small image built by wpimg itself, pushed from its layout with --push.
fn simple_project(dir: &Path, name: &str, repo: &str) {
    let f = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/changes");
    std::fs::copy(f.join("simple.yml"), dir.join("simple.yml")).unwrap();
    write(
        &dir.join("image.yaml"),
        &format!(
            "name: {name}\nbase: {BASE}\nprovision:\n  playbook: simple.yml\nimage:\n  cmd: [\"/bin/cat\", \"/opt/simple/file.txt\"]\ntarget:\n  repository: {repo}\n  tags: [v1, latest]\n"
        ),
    );
}

#[test]
fn build_push_then_pull_back_and_push_again() {
    require_fixtures();
    require("skopeo");
    let reg = Registry::start();
    let name = unique("wpimg-test/push");
    let repo = format!("{}/wpimg/simple", reg.host());
    let p = tempfile::tempdir().unwrap();
    simple_project(p.path(), &name, &repo);
    let _g = ImageGuard(format!("{repo}:v1"));

    let o = run(wpimg()
        .current_dir(p.path())
        .args(["build", "--push", "--json"]));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r = json_result(&o.stdout);
    let digest = r["manifest"]["digest"].as_str().unwrap().to_string();
    assert_eq!(r["image_uri"], format!("{repo}@{digest}"));
    assert_eq!(r["push"]["tags"], serde_json::json!(["v1", "latest"]));
    assert!(outcomes(&r["push"]).iter().all(|o| o == "uploaded"), "{r}");

    // skopeo and docker see the same digest, and the pulled image runs.
    let raw = ok_stdout(Command::new("skopeo").args([
        "inspect",
        "--tls-verify=false",
        "--format",
        "{{.Digest}}",
        &format!("docker://{repo}:latest"),
    ]));
    assert_eq!(raw.trim(), digest);
    ok_stdout(Command::new("docker").args(["pull", "-q", &format!("{repo}:v1")]));
    let repo_digests = ok_stdout(Command::new("docker").args([
        "image",
        "inspect",
        "--format",
        "{{json .RepoDigests}}",
        &format!("{repo}:v1"),
    ]));
    assert!(repo_digests.contains(&digest), "{repo_digests}");
    let out = ok_stdout(Command::new("docker").args(["run", "--rm", &format!("{repo}:v1")]));
    assert_eq!(out.trim(), "x");

    // Pushing again uploads nothing.
    let o = run(wpimg().current_dir(p.path()).args(["push", "--json"]));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let again = json_result(&o.stdout);
    assert!(outcomes(&again).iter().all(|o| o == "skipped"), "{again}");
    assert_eq!(again["bytes_uploaded"], 0);

    // Another repository of the same registry: layers are mounted, not uploaded.
    let other = format!("{}/wpimg/other", reg.host());
    let o = run(wpimg()
        .current_dir(p.path())
        .args(["push", "--json", "--to", &other]));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mounted = json_result(&o.stdout);
    assert!(
        outcomes(&mounted).iter().all(|o| o == "mounted"),
        "{mounted}"
    );
    assert_eq!(mounted["tags"], serde_json::json!(["latest"]));

    // Any OCI layout, by oci:DIR:NAME:TAG.
    let third = format!("{}/wpimg/third:t1", reg.host());
    let from = format!("oci:{}:{name}:v1", p.path().join(".wpimg/oci").display());
    let o = run(wpimg().args(["push", "--json", "--from", &from, "--to", &third]));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(json_result(&o.stdout)["digest"], digest.as_str());
}

fn push_with_password(reg: &Registry, from: &str, password: &str) -> std::process::Output {
    run_with_stdin(
        wpimg()
            .env("DOCKER_CONFIG", "/nonexistent-wpimg-test")
            .args(["push", "--from", from, "--to"])
            .arg(format!("{}/wpimg/auth", reg.host()))
            .args(["--username", "wpimg", "--password-stdin"]),
        format!("{password}\n").as_bytes(),
    )
}

#[test]
fn basic_auth_with_password_stdin() {
    require_fixtures();
    let reg = Registry::start_with(RegistryOptions {
        htpasswd: Some(("wpimg".into(), "right-pass-4711".into())),
        tls: false,
    });
    // An image to push: the fixture base, pulled into a layout by skopeo (any layout works).
    let d = tempfile::tempdir().unwrap();
    ok_stdout(Command::new("skopeo").args([
        "copy",
        "--quiet",
        "--src-tls-verify=false",
        &format!("docker://{BASE}"),
        &format!("oci:{}:base", d.path().display()),
    ]));
    let from = format!("oci:{}:base", d.path().display());

    let o = push_with_password(&reg, &from, "wrong-pass");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("UNAUTHORIZED"), "{stderr}");
    assert!(!stderr.contains("wrong-pass"), "password leaked: {stderr}");

    let o = push_with_password(&reg, &from, "right-pass-4711");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(
        !stderr.contains("right-pass-4711"),
        "password leaked: {stderr}"
    );
}

#[test]
fn push_without_destination_or_build_is_bad_input() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("pb.yml"), "- hosts: all\n").unwrap();
    std::fs::write(
        d.path().join("image.yaml"),
        "name: app\nbase: 127.0.0.1:5000/debian:bookworm\nprovision: { playbook: pb.yml }\n",
    )
    .unwrap();
    let o = run(wpimg().current_dir(d.path()).args(["push"]));
    assert_eq!(o.status.code(), Some(2));
    let o = run(wpimg().current_dir(d.path()).args([
        "push",
        "--to",
        "127.0.0.1:1/x",
        "--chunk-size",
        "1000",
    ]));
    assert_eq!(o.status.code(), Some(2));
}

/// Start a `build --push --json` of a project whose layer holds 24 MiB of random bytes; returns
/// the result and the number of PATCHes the proxy had answered when the layer stage finished.
fn build_push_big(dir: &Path, proxy: &Proxy, extra: &[&str]) -> (serde_json::Value, usize) {
    use std::io::BufRead;
    let mut child = wpimg()
        .current_dir(dir)
        .args([
            "build",
            "--push",
            "--json",
            "--no-cache",
            "--chunk-size",
            "5242880",
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    // PATCHes seen when the build has finished compressing its layers (stage `compress`, the
    // wait for the layers compressed in the background), before the push stage.
    let mut patches_compressed = usize::MAX;
    let mut last = String::new();
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line.unwrap();
        if line.contains(r#""event":"stage_finish""#) && line.contains(r#""stage":"compress""#) {
            patches_compressed = proxy
                .requests()
                .iter()
                .filter(|r| r.method == "PATCH")
                .count();
        }
        last = line;
    }
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    (json_result(last.as_bytes()), patches_compressed)
}

#[test]
fn build_push_streams_the_new_layer_while_compressing() {
    require_fixtures();
    require("skopeo");
    let reg = Registry::start();
    let proxy = Proxy::start(&reg.url(), ProxyMode::default());
    let p = tempfile::tempdir().unwrap();
    write(
        &p.path().join("big.yml"),
        "- hosts: all\n  gather_facts: false\n  tasks:\n    - name: Random bytes\n      ansible.builtin.shell: head -c 25165824 /dev/urandom > /opt/random.bin\n      changed_when: true\n",
    );
    let name = unique("wpimg-test/stream");
    let repo = format!("{}/wpimg/stream", proxy.host());
    write(
        &p.path().join("image.yaml"),
        &format!("name: {name}\nbase: {BASE}\nprovision:\n  playbook: big.yml\ntarget:\n  repository: {repo}\n  tags: [v1]\n"),
    );

    let (r, patches_compressed) = build_push_big(p.path(), &proxy, &[]);
    let layer = r["layers"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(layer["new"], true);
    let size = layer["size"].as_u64().unwrap();
    let digest = layer["digest"].as_str().unwrap().to_string();
    assert!(size > 24 << 20, "{layer}");
    let outcome = r["push"]["blobs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["digest"] == digest.as_str())
        .unwrap()["outcome"]
        .clone();
    assert_eq!(outcome, "uploaded", "{r}");
    // The layer went up in 5 MiB PATCHes, some of them before compression had finished, and
    // its last part with the digest in the final PUT; nothing uploaded it a second time.
    let reqs = proxy.requests();
    let patches: Vec<_> = reqs.iter().filter(|r| r.method == "PATCH").collect();
    assert!(patches.len() >= 4, "{reqs:#?}");
    assert!(
        patches.iter().all(|r| r.content_length == 5 << 20),
        "{patches:#?}"
    );
    assert!(
        (4..usize::MAX).contains(&patches_compressed),
        "the parts were not uploaded while the layer was compressed ({patches_compressed})"
    );
    let finals: Vec<_> = reqs
        .iter()
        .filter(|r| r.method == "PUT" && r.query.contains(&digest[7..]))
        .collect();
    assert_eq!(finals.len(), 1, "{reqs:#?}");
    let streamed: u64 =
        patches.iter().map(|r| r.content_length).sum::<u64>() + finals[0].content_length;
    assert_eq!(streamed, size);
    // The registry serves the image with the built digest.
    let manifest = r["manifest"]["digest"].as_str().unwrap();
    let got = ok_stdout(Command::new("skopeo").args([
        "inspect",
        "--tls-verify=false",
        "--format",
        "{{.Digest}}",
        &format!("docker://{}/wpimg/stream:v1", reg.host()),
    ]));
    assert_eq!(got.trim(), manifest);

    // --no-stream: one monolithic PUT of the whole layer after the build, to a new repository.
    proxy.clear();
    let other = format!("{}/wpimg/stream-after", proxy.host());
    let (r, patches_compressed) =
        build_push_big(p.path(), &proxy, &["--no-stream", "--to", &other]);
    assert_eq!(
        patches_compressed, 0,
        "--no-stream uploaded during the build"
    );
    let layer = r["layers"].as_array().unwrap().last().unwrap().clone();
    let reqs = proxy.requests();
    assert!(reqs.iter().all(|r| r.method != "PATCH"), "{reqs:#?}");
    assert!(
        reqs.iter()
            .any(|q| q.method == "PUT" && q.content_length == layer["size"].as_u64().unwrap()),
        "{reqs:#?}"
    );
}
