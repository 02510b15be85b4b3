//! `wpimg push --ecr` through a proxy that answers like Amazon ECR's registry: moto's server for
//! the ECR API, Debian's docker-registry (htpasswd, user `AWS` with moto's token) for the data
//! plane, and the test proxy in front of it enforcing ECR's chunked-upload rules (>= 5 MiB parts,
//! 201 PATCH answers, stale Range), immutable tags (`TAG_INVALID`) and unknown repositories
//! (`NAME_UNKNOWN`).

mod common;

use std::path::Path;
use std::process::Command;

use common::ecr::{wpimg_push_ecr, write_ecr_image_yaml, Moto, MOTO_ACCOUNT};
use common::registry::{
    random_image, skopeo_manifest_digest, KnownRepositories, Proxy, ProxyMode, Registry,
    RegistryOptions,
};
use common::*;
use wpimg::layout::Layout;

const REGION: &str = "us-east-1";
const MIB: u64 = 1024 * 1024;

fn ecr_host() -> String {
    format!("{MOTO_ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com")
}

fn token_creds() -> String {
    format!("AWS:{MOTO_ACCOUNT}-auth-token")
}

struct Env {
    moto: Moto,
    reg: Registry,
    proxy: Proxy,
    dir: tempfile::TempDir,
    aws: tempfile::TempDir,
}

/// moto, the htpasswd registry and an ECR-like proxy that knows only the repository `wp`;
/// image.yaml targets `wp:v1` (created with immutable tags).
fn setup() -> Env {
    require("skopeo");
    let moto = Moto::start();
    let reg = Registry::start_with(RegistryOptions {
        htpasswd: Some(("AWS".into(), format!("{MOTO_ACCOUNT}-auth-token"))),
        tls: false,
    });
    let proxy = Proxy::start(
        &reg.url(),
        ProxyMode {
            ecr_chunked: true,
            immutable_tags: true,
            known_repositories: Some(KnownRepositories {
                account: MOTO_ACCOUNT.into(),
                names: vec!["wp".into()],
            }),
            ..Default::default()
        },
    );
    let dir = tempfile::tempdir().unwrap();
    write_ecr_image_yaml(
        dir.path(),
        &format!("{}/wp", ecr_host()),
        &format!(
            "    region: {REGION}\n    create_repository: true\n    tag_immutability: IMMUTABLE\n"
        ),
    );
    Env {
        moto,
        reg,
        proxy,
        dir,
        aws: tempfile::tempdir().unwrap(),
    }
}

/// Write a registry-only image of random layers into the layout as `app:v1`; its manifest
/// digest.
fn put_random_image(dir: &Path, sizes: &[u64], seed: u64) -> String {
    let layout = Layout::open_or_create(dir.join(".wpimg/oci")).unwrap();
    random_image(&layout, "app:v1", sizes, seed)
        .manifest
        .digest
        .to_string()
}

/// `wpimg push --ecr --json` through the proxy, chunked with 5 MiB parts:
/// (exit code, last JSON line, stderr).
fn push(env: &Env, extra: &[&str]) -> (Option<i32>, serde_json::Value, String) {
    let (endpoint, chunk) = (env.proxy.url(), (5 * MIB).to_string());
    let mut args = vec![
        "--registry-endpoint",
        &endpoint,
        "--force-chunked",
        "--chunk-size",
        &chunk,
    ];
    args.extend(extra);
    wpimg_push_ecr(&env.moto, env.dir.path(), env.aws.path(), &args)
}

/// Digest of `repo:tag` in the registry behind the proxy, as skopeo sees it.
fn registry_digest(env: &Env, repo: &str, tag: &str) -> String {
    skopeo_manifest_digest(
        &format!("docker://{}/{repo}:{tag}", env.reg.host()),
        &["--tls-verify=false", "--creds", &token_creds()],
    )
    .to_string()
}

#[test]
fn chunked_push_through_ecr_proxy_then_immutable_tag_is_refused_by_code() {
    let env = setup();

    // (a) A 13 MiB layer goes up in 5 MiB PATCH parts that ECR accepts.
    let first = put_random_image(env.dir.path(), &[13 * MIB, 300 * 1024], 1);
    let (code, r, stderr) = push(&env, &[]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(r["event"], "result", "{r}");
    assert_eq!(r["digest"], first.as_str());
    assert_eq!(r["image_uri"], format!("{}/wp@{first}", ecr_host()));
    assert!(
        env.proxy.violations().is_empty(),
        "ECR rules broken: {:?}",
        env.proxy.violations()
    );
    let reqs = env.proxy.requests();
    let patches: Vec<_> = reqs.iter().filter(|l| l.method == "PATCH").collect();
    assert!(
        patches.len() >= 2,
        "want several parts, saw {} PATCH",
        patches.len()
    );
    assert!(
        patches
            .iter()
            .all(|l| l.status == 201 && l.content_length >= 5 * MIB),
        "{patches:?}"
    );
    assert_eq!(registry_digest(&env, "wp", "v1"), first);

    // (b) Another image under the same tag: the registry refuses with TAG_INVALID (moto's ECR
    // does not know the tag, so only the registry's answer can stop it).
    let second = put_random_image(env.dir.path(), &[6 * MIB], 2);
    assert_ne!(first, second);
    env.proxy.clear();
    let (code, r, stderr) = push(&env, &[]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("TAG_INVALID"), "{stderr}");
    assert!(stderr.contains(&format!("{}/wp", ecr_host())), "{stderr}");
    assert!(
        stderr.contains("tags are immutable") && stderr.contains("push under a new tag"),
        "not recognised by its code: {stderr}"
    );
    assert!(stderr.contains("tag v1"), "{stderr}");
    assert_eq!(r["event"], "error", "{r}");
    assert_eq!(r["exit_code"], 1);
    let msg = r["message"].as_str().unwrap();
    assert!(
        msg.contains("TAG_INVALID") && msg.contains(&format!("{}/wp", ecr_host())),
        "{msg}"
    );
    let refused = env
        .proxy
        .requests()
        .into_iter()
        .filter(|l| l.method == "PUT" && l.path.ends_with("/manifests/v1"))
        .map(|l| l.status)
        .collect::<Vec<_>>();
    assert_eq!(refused, vec![400], "one tag PUT, refused");
    assert!(env.proxy.violations().is_empty());
    assert_eq!(registry_digest(&env, "wp", "v1"), first, "the tag moved");
}

#[test]
fn repository_unknown_to_the_registry_fails_with_name_unknown() {
    let env = setup();
    put_random_image(env.dir.path(), &[6 * MIB], 3);
    // moto creates and knows `other`; the ECR-like registry does not.
    let other = format!("{}/other", ecr_host());
    let (code, r, stderr) = push(&env, &["--to", &other]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("NAME_UNKNOWN"), "{stderr}");
    assert!(stderr.contains(&other), "{stderr}");
    assert!(
        stderr.contains("although the ECR API reports that it exists"),
        "not recognised by its code: {stderr}"
    );
    assert!(
        stderr.contains("The repository with name 'other' does not exist"),
        "{stderr}"
    );
    assert_eq!(r["event"], "error", "{r}");
    let msg = r["message"].as_str().unwrap();
    assert!(
        msg.contains("NAME_UNKNOWN") && msg.contains(&other),
        "{msg}"
    );
    let reqs = env.proxy.requests();
    assert!(
        reqs.iter().any(|l| l.path.starts_with("/v2/other/")),
        "nothing reached the registry: {reqs:?}"
    );
    assert!(
        reqs.iter()
            .filter(|l| l.path.starts_with("/v2/other/"))
            .all(|l| l.status == 404),
        "{reqs:?}"
    );
    assert!(
        !env.reg
            .dir
            .path()
            .join("data/docker/registry/v2/repositories/other")
            .exists(),
        "data was pushed"
    );
    // moto really knows the repository: the failure is the registry's.
    let script = format!(
        "import boto3\nc=boto3.client('ecr',region_name='{REGION}',endpoint_url='{}',aws_access_key_id='t',aws_secret_access_key='t')\nprint(c.describe_repositories(repositoryNames=['other'])['repositories'][0]['repositoryName'])\n",
        env.moto.url
    );
    let name = ok_stdout(Command::new(common::ecr::VENV_PYTHON).args(["-c", &script]));
    assert_eq!(name.trim(), "other");
}
