//! `wpimg push` and `wpimg build --push` from the command line against a real docker-registry.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use common::registry::{Registry, RegistryOptions};
use common::*;

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
    let mut child = wpimg()
        .env("DOCKER_CONFIG", "/nonexistent-wpimg-test")
        .args(["push", "--from", from, "--to"])
        .arg(format!("{}/wpimg/auth", reg.host()))
        .args(["--username", "wpimg", "--password-stdin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{password}\n").as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
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
