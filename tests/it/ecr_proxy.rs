//! `wpimg push --ecr` through a proxy that answers like Amazon ECR's registry: moto's server for
//! the ECR API, Debian's docker-registry (htpasswd, user `AWS` with moto's token) for the data
//! plane, and the test proxy in front of it enforcing ECR's chunked-upload rules (>= 5 MiB parts,
//! 201 PATCH answers, stale Range), immutable tags (`TAG_INVALID`) and unknown repositories
//! (`NAME_UNKNOWN`).

use std::path::Path;
use std::process::Command;

use crate::common::ecr::{
    child_test, run_child_test, wpimg_push_ecr, write_ecr_image_yaml, Moto, MOTO_ACCOUNT,
};
use crate::common::registry::{
    random_image, skopeo_manifest_digest, KnownRepositories, Proxy, ProxyMode, Registry,
    RegistryOptions,
};
use crate::common::*;
use wpimg::auth::{Credential, Secret};
use wpimg::events::SharedReporter;
use wpimg::layout::Layout;
use wpimg::oci::Platform;
use wpimg::reference::Reference;
use wpimg::registry::{Client, ClientOptions};

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
    let name = ok_stdout(Command::new(crate::common::ecr::VENV_PYTHON).args(["-c", &script]));
    assert_eq!(name.trim(), "other");
}

/// A base image on an ECR host (as `wpimg build` pulls it): credentials come from the AWS SDK
/// default chain (a token from moto) through `with_ecr_pull_credentials`, else from Docker's
/// config; the ECR host is served by the htpasswd registry through an endpoint override.
/// Environment variables are process-wide, so each case runs in a child copy of this test.
#[test]
fn base_image_on_an_ecr_host_pulls_with_an_aws_sdk_token_else_docker_config() {
    if std::env::var_os("WPIMG_ECR_PULL_CHILD").is_some() {
        return ecr_pull_child();
    }
    let moto = Moto::start();
    let reg = Registry::start_with(RegistryOptions {
        htpasswd: Some(("AWS".into(), format!("{MOTO_ACCOUNT}-auth-token"))),
        tls: false,
    });
    let src_dir = tempfile::tempdir().unwrap();
    let src = Layout::open_or_create(src_dir.path()).unwrap();
    let img = random_image(&src, "base:1", &[2 * MIB], 9);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let token = Credential::Basic {
            username: "AWS".into(),
            password: Secret::new(format!("{MOTO_ACCOUNT}-auth-token")),
        };
        let c = Client::new(ClientOptions::default().with_credential(&reg.host(), token)).unwrap();
        let dest: Reference = format!("{}/base:1", reg.host()).parse().unwrap();
        let rep: SharedReporter = crate::common::registry::Recorder::new();
        c.push_image(&src, &img.manifest, &dest, &[], &rep)
            .await
            .unwrap();
    });

    let home = tempfile::tempdir().unwrap();
    let empty_docker = home.path().join("docker-empty");
    std::fs::create_dir_all(&empty_docker).unwrap();
    let logged_in = home.path().join("docker-login");
    {
        use base64::Engine as _;
        let auth = base64::engine::general_purpose::STANDARD.encode(token_creds());
        write(
            &logged_in.join("config.json"),
            &serde_json::json!({"auths": {ecr_host(): {"auth": auth}}}).to_string(),
        );
    }
    let child = |aws_keys: bool, docker: &Path| {
        let mut cmd = child_test(
            "ecr_proxy::base_image_on_an_ecr_host_pulls_with_an_aws_sdk_token_else_docker_config",
            home.path(),
        );
        cmd.env("WPIMG_ECR_PULL_CHILD", reg.url())
            .env("WPIMG_ECR_PULL_DIGEST", img.manifest.digest.to_string())
            .env("AWS_ENDPOINT_URL_ECR", &moto.url)
            .env("AWS_CONFIG_FILE", home.path().join("aws-config"))
            .env(
                "AWS_SHARED_CREDENTIALS_FILE",
                home.path().join("aws-credentials"),
            )
            .env("DOCKER_CONFIG", docker);
        if aws_keys {
            cmd.env("AWS_ACCESS_KEY_ID", "testing")
                .env("AWS_SECRET_ACCESS_KEY", "testing-secret-key");
        }
        let text = run_child_test(&mut cmd);
        assert!(!text.contains("auth-token"), "token leaked:\n{text}");
        text
    };
    // AWS credentials, nothing in Docker's config: a token from GetAuthorizationToken.
    let t = child(true, &empty_docker);
    assert!(t.contains("ECR-PULL: pulled"), "{t}");
    // No AWS credentials, but `docker login` credentials for the host: those.
    let t = child(false, &logged_in);
    assert!(t.contains("ECR-PULL: pulled"), "{t}");
    // Neither: the error names the registry and the AWS failure.
    let t = child(false, &empty_docker);
    assert!(t.contains("ECR-PULL: failed"), "{t}");
    assert!(t.contains(&ecr_host()), "{t}");
    assert!(t.to_lowercase().contains("credentials"), "{t}");
}

/// The child side: pull `ECR_HOST/base:1` as a build's client would, print the outcome.
fn ecr_pull_child() {
    let url = std::env::var("WPIMG_ECR_PULL_CHILD").unwrap();
    let want = std::env::var("WPIMG_ECR_PULL_DIGEST").unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let base: Reference = format!("{}/base:1", ecr_host()).parse().unwrap();
        let opts = ClientOptions::default().with_endpoint(&base.registry, url.parse().unwrap());
        let opts = wpimg::publish::with_ecr_pull_credentials(opts, &base.registry, None);
        let client = Client::new(opts).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::open_or_create(dir.path()).unwrap();
        let rep: SharedReporter = crate::common::registry::Recorder::new();
        let platform = Platform::parse("linux/amd64").unwrap();
        match client.pull_image(&base, &platform, &layout, &rep).await {
            Ok(p) => {
                assert_eq!(p.image.descriptor.digest.to_string(), want);
                println!("ECR-PULL: pulled {}", p.image.descriptor.digest);
            }
            Err(e) => println!("ECR-PULL: failed: {:#}", anyhow::Error::from(e)),
        }
    });
}
