//! `wpimg push --ecr` end to end: moto's server for the ECR API, Debian's docker-registry
//! (htpasswd with the `AWS` user and moto's token password) for the data plane, reached through
//! `--registry-endpoint`.

use std::path::Path;
use std::process::Command;

use crate::common::ecr::{wpimg_push_ecr, write_ecr_image_yaml, Moto, MOTO_ACCOUNT};
use crate::common::registry::{Registry, RegistryOptions};
use crate::common::*;

const REGION: &str = "us-east-1";

fn ecr_host() -> String {
    format!("{MOTO_ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com")
}

struct Env {
    moto: Moto,
    reg: Registry,
    dir: tempfile::TempDir,
    aws: tempfile::TempDir,
}

fn setup(ecr_yaml: &str) -> Env {
    require_fixtures();
    require("skopeo");
    let moto = Moto::start();
    let reg = Registry::start_with(RegistryOptions {
        htpasswd: Some(("AWS".into(), format!("{MOTO_ACCOUNT}-auth-token"))),
        tls: false,
    });
    let dir = tempfile::tempdir().unwrap();
    write_ecr_image_yaml(dir.path(), &format!("{}/wp", ecr_host()), ecr_yaml);
    Env {
        moto,
        reg,
        dir,
        aws: tempfile::tempdir().unwrap(),
    }
}

/// Put an image into the layout as `app:v1` (any OCI image works for a push).
fn put_image(dir: &Path, source: &str) {
    std::fs::create_dir_all(dir.join(".wpimg")).unwrap();
    ok_stdout(Command::new("skopeo").args([
        "copy",
        "--quiet",
        "--src-tls-verify=false",
        &format!("docker://{source}"),
        &format!("oci:{}:app:v1", dir.join(".wpimg/oci").display()),
    ]));
}

fn push(env: &Env, extra: &[&str]) -> (Option<i32>, serde_json::Value, String) {
    let url = env.reg.url();
    let mut args = vec!["--registry-endpoint", &url];
    args.extend(extra);
    wpimg_push_ecr(&env.moto, env.dir.path(), env.aws.path(), &args)
}

#[test]
fn creates_the_repository_pushes_and_handles_immutable_tags() {
    let env = setup("    region: us-east-1\n    create_repository: true\n    scan_on_push: true\n    tag_immutability: IMMUTABLE\n");
    put_image(env.dir.path(), BASE);

    let (code, r, stderr) = push(&env, &[]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(r["event"], "result");
    assert_eq!(r["repository_created"], true);
    let digest = r["digest"].as_str().unwrap().to_string();
    assert_eq!(r["image_uri"], format!("{}/wp@{digest}", ecr_host()));
    assert_eq!(r["push"]["tags"], serde_json::json!(["v1"]));

    // The bytes really are in the registry behind the endpoint.
    let pulled = ok_stdout(Command::new("skopeo").args([
        "inspect",
        "--tls-verify=false",
        "--creds",
        &format!("AWS:{MOTO_ACCOUNT}-auth-token"),
        "--format",
        "{{.Digest}}",
        &format!("docker://{}/wp:v1", env.reg.host()),
    ]));
    assert_eq!(pulled.trim(), digest);

    // The registry behind the endpoint is not moto: tell moto's ECR about the tag, as real ECR
    // would know it after the push.
    let manifest = ok_stdout(Command::new("skopeo").args([
        "inspect",
        "--raw",
        "--tls-verify=false",
        "--creds",
        &format!("AWS:{MOTO_ACCOUNT}-auth-token"),
        &format!("docker://{}/wp:v1", env.reg.host()),
    ]));
    put_image_in_moto(&env, "wp", "v1", manifest.trim_end(), &digest);

    // Same digest again: fine, said so, and the immutable tag is not rewritten.
    let (code, r, stderr) = push(&env, &[]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(r["repository_created"], false);
    assert_eq!(r["unchanged_tags"], serde_json::json!(["v1"]));
    assert!(r["push"].is_null(), "{r}");

    // Another image under the immutable v1 fails before any upload.
    put_image(env.dir.path(), BASE_NO_PYTHON);
    let before = blob_count(&env.reg);
    let (code, _, stderr) = push(&env, &[]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.to_lowercase().contains("immutable"), "{stderr}");
    assert!(stderr.contains("v1"), "{stderr}");
    assert_eq!(
        before,
        blob_count(&env.reg),
        "something was uploaded despite the conflict"
    );
}

/// Blobs stored by the registry.
fn blob_count(reg: &Registry) -> usize {
    fn walk(p: &Path) -> usize {
        std::fs::read_dir(p)
            .map(|rd| {
                rd.filter_map(Result::ok)
                    .map(|e| {
                        if e.path().is_dir() {
                            walk(&e.path())
                        } else {
                            usize::from(e.file_name() == "data")
                        }
                    })
                    .sum()
            })
            .unwrap_or(0)
    }
    walk(&reg.dir.path().join("data/docker/registry/v2/blobs"))
}

/// Register a manifest under a tag in moto (as ECR would after a push).
fn put_image_in_moto(env: &Env, repo: &str, tag: &str, manifest: &str, digest: &str) {
    let script = format!(
        "import boto3,sys\nc=boto3.client('ecr',region_name='{REGION}',endpoint_url='{}',aws_access_key_id='t',aws_secret_access_key='t')\nm=sys.stdin.read()\ntry:\n  c.put_image(repositoryName='{repo}',imageManifest=m,imageTag='{tag}',imageDigest='{digest}')\nexcept c.exceptions.ImageAlreadyExistsException:\n  pass\n",
        env.moto.url
    );
    let o = crate::common::run_with_stdin(
        Command::new(crate::common::ecr::VENV_PYTHON).args(["-c", &script]),
        manifest.as_bytes(),
    );
    assert!(o.status.success(), "put_image in moto failed: {o:?}");
}

#[test]
fn missing_repository_without_create_fails_before_upload() {
    let env = setup("    create_repository: false\n");
    put_image(env.dir.path(), BASE);
    let (code, r, stderr) = push(&env, &[]);
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(r["event"], "error");
    assert!(stderr.contains("wp"), "{stderr}");
    assert!(stderr.contains("create_repository"), "{stderr}");
    assert!(
        !env.reg
            .dir
            .path()
            .join("data/docker/registry/v2/repositories/wp")
            .exists(),
        "data was pushed"
    );
}
