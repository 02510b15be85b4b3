//! The command line's rules: every input error exits 2 before anything starts, and values from
//! the environment, a `--var-file` or a URL's credentials are never shown.

use std::path::Path;
use std::process::Output;

use crate::common::*;
use wpimg::layout::Layout;
use wpimg::oci::{Image, Platform};

const SECRET_ENV: &str = "WPIMG_IT_DB_PASSWORD";
const SECRET_VALUE: &str = "hunter2-from-env-4711";
const FILE_SECRET: &str = "token-from-var-file-0815";

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A project whose image.yaml takes a password from the environment and a token from a file.
fn secret_project() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    write(&d.path().join("site.yml"), "- hosts: all\n  tasks: []\n");
    write(
        &d.path().join("image.yaml"),
        &format!(
            "name: app\nbase: 127.0.0.1:5000/debian:bookworm\nvariables:\n  db_password: ${{{SECRET_ENV}}}\nprovision:\n  playbook: site.yml\n  extra_vars:\n    db_password: \"${{db_password}}\"\n    api_token: \"${{api_token}}\"\n    greeting: hello\n  env: {{ TOKEN: \"${{api_token}}\" }}\n"
        ),
    );
    write(
        &d.path().join("secrets.yml"),
        &format!("api_token: {FILE_SECRET}\n"),
    );
    d
}

fn validate(dir: &Path, args: &[&str]) -> Output {
    run(wpimg()
        .current_dir(dir)
        .env(SECRET_ENV, SECRET_VALUE)
        .args(["validate", "image.yaml", "--var-file", "secrets.yml"])
        .args(args))
}

#[test]
fn validate_shows_secret_values_as_redacted() {
    let p = secret_project();
    let o = validate(p.path(), &["--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let all = format!("{}{}", stdout(&o), stderr(&o));
    for secret in [SECRET_VALUE, FILE_SECRET] {
        assert!(!all.contains(secret), "{secret} shown:\n{all}");
    }
    let v: serde_json::Value = serde_json::from_str(stdout(&o).lines().last().unwrap()).unwrap();
    let spec = &v["spec"];
    assert_eq!(spec["provision"]["extra_vars"]["db_password"], "<redacted>");
    assert_eq!(spec["provision"]["extra_vars"]["api_token"], "<redacted>");
    assert_eq!(spec["provision"]["env"]["TOKEN"], "<redacted>");
    assert_eq!(spec["variables"]["db_password"], "<redacted>");
    assert_eq!(spec["provision"]["extra_vars"]["greeting"], "hello");

    let o = validate(p.path(), &["-v"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let all = format!("{}{}", stdout(&o), stderr(&o));
    assert!(all.contains("ok (app:latest from"), "{all}");
    for secret in [SECRET_VALUE, FILE_SECRET] {
        assert!(!all.contains(secret), "{secret} shown:\n{all}");
    }
}

#[test]
fn a_secret_in_a_bad_value_is_not_quoted() {
    let p = secret_project();
    let y = std::fs::read_to_string(p.path().join("image.yaml")).unwrap();
    write(
        &p.path().join("image.yaml"),
        &format!(
            "{y}target:\n  repository: 127.0.0.1:5000/app\n  tags: [\"${{{SECRET_ENV}}} x\"]\n"
        ),
    );
    let o = validate(p.path(), &["--json"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let all = format!("{}{}", stdout(&o), stderr(&o));
    assert!(
        all.contains("target.tags[0]: invalid tag <redacted>"),
        "{all}"
    );
    assert!(!all.contains(SECRET_VALUE), "{all}");
}

/// A layout holding one image, `app:v1`.
fn layout_with_image() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let l = Layout::open_or_create(d.path()).unwrap();
    let img = Image::scratch(&Platform::host());
    l.write_image(&img).unwrap();
    l.tag("app:v1", &img.descriptor).unwrap();
    d
}

fn push_from(layout: &Path, args: &[&str]) -> Output {
    run(wpimg()
        .env("DOCKER_CONFIG", "/nonexistent-wpimg-test")
        .args(["push", "--from"])
        .arg(format!("oci:{}:app:v1", layout.display()))
        .args(args))
}

fn assert_input_error(o: &Output, says: &str) {
    assert_eq!(o.status.code(), Some(2), "want exit 2: {}", stderr(o));
    assert!(
        stderr(o).contains(says),
        "stderr lacks {says:?}: {}",
        stderr(o)
    );
}

#[test]
fn push_input_errors_exit_2_before_any_request() {
    let l = layout_with_image();
    // Port 1 answers nothing: any request would fail with exit 1, not 2.
    let o = push_from(l.path(), &["--to", "127.0.0.1:1/x", "--tag", "bad tag!"]);
    assert_input_error(&o, "invalid tag");
    let o = push_from(l.path(), &["--to", "127.0.0.1:1/Bad_Repo"]);
    assert_input_error(&o, "Bad_Repo");
    let o = push_from(l.path(), &["--to", "127.0.0.1:1/x", "--chunk-size", "1000"]);
    assert_input_error(&o, "--chunk-size");
    let o = run(wpimg().args([
        "push",
        "--from",
        "oci:/nonexistent-wpimg/layout:app:v1",
        "--to",
        "127.0.0.1:1/x",
    ]));
    assert_input_error(&o, "/nonexistent-wpimg/layout");
    let o = push_from(
        l.path(),
        &["--to", "127.0.0.1:1/x", "--ca-file", "/nonexistent-ca.pem"],
    );
    assert_input_error(&o, "/nonexistent-ca.pem");
    let o = push_from(l.path(), &["--ecr", "--to", "Not//An/Ecr:Repo"]);
    assert_input_error(&o, "invalid ECR repository");
}

#[test]
fn no_ecr_region_is_an_input_error() {
    let l = layout_with_image();
    let home = tempfile::tempdir().unwrap();
    let o = run(wpimg()
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", home.path())
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .args(["push", "--ecr", "--to", "wordpress", "--from"])
        .arg(format!("oci:{}:app:v1", l.path().display())));
    assert_input_error(&o, "no AWS region");
}

#[test]
fn endpoint_credentials_are_refused_and_never_echoed() {
    let l = layout_with_image();
    let o = push_from(
        l.path(),
        &[
            "--to",
            "127.0.0.1:1/x",
            "--registry-endpoint",
            "http://wpimg:s3cret-pass@127.0.0.1:1/",
        ],
    );
    assert_input_error(&o, "--registry-endpoint http://127.0.0.1:1/");
    assert!(!stderr(&o).contains("s3cret-pass"), "{}", stderr(&o));
    let o = run(wpimg().args([
        "inspect",
        "--registry-endpoint",
        "https://u:s3cret-pass@127.0.0.1:1",
        "docker://127.0.0.1:1/x:1",
    ]));
    assert_input_error(&o, "credentials do not belong in the URL");
    assert!(!stderr(&o).contains("s3cret-pass"), "{}", stderr(&o));
}

#[test]
fn image_yaml_input_errors_exit_2_with_their_location() {
    let d = tempfile::tempdir().unwrap();
    write(&d.path().join("site.yml"), "- hosts: all\n  tasks: []\n");
    write(
        &d.path().join("image.yaml"),
        "name: app\nbase: 127.0.0.1:5000/debian:bookworm\nprovision:\n  playbook: site.yml\n  env: { \"A=B\": x }\nlayer:\n  level: 4294967302\n",
    );
    for cmd in [
        &["validate"][..],
        &["build"],
        &["push", "--to", "127.0.0.1:1/x"],
    ] {
        let o = run(wpimg().current_dir(d.path()).args(cmd));
        assert_eq!(o.status.code(), Some(2), "{cmd:?}: {}", stderr(&o));
        let e = stderr(&o);
        assert!(e.contains("image.yaml:7:10: layer.level"), "{cmd:?}: {e}");
        assert!(
            e.contains("image.yaml:5:") && e.contains("provision.env.A=B"),
            "{e}"
        );
    }
    let o = run(wpimg()
        .current_dir(d.path())
        .args(["validate", "--var-file", "missing-vars.yml"]));
    assert_input_error(&o, "missing-vars.yml");
}

#[test]
fn schema_describes_image_yaml() {
    let o = run(wpimg().arg("schema"));
    assert!(o.status.success(), "{}", stderr(&o));
    let s: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(s["$schema"], "http://json-schema.org/draft-07/schema#");
    assert_eq!(
        s["required"],
        serde_json::json!(["name", "base", "provision"])
    );
    assert!(
        s["definitions"]["Provision"]["properties"]["playbook"].is_object(),
        "{s}"
    );
}
