//! ECR API tests against moto's server (a real ECR API emulator), one server per test.

use std::time::Duration;

use crate::common::ecr::{child_test, run_child_test, Moto, MOTO_ACCOUNT};
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_ecr::config::Credentials;
use aws_sdk_ecr::types::ImageIdentifier;
use wpimg::ecr::{
    plan_tags, EcrClient, EcrError, EcrRepo, EcrRepoRef, Severity, TagState, TagStatus,
};
use wpimg::oci::Digest;
use wpimg::spec::EcrSettings;

const REGION: &str = "us-east-1";

async fn sdk_config(moto: &Moto, key: &str, secret: &str) -> SdkConfig {
    aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new(REGION))
        .endpoint_url(&moto.url)
        .credentials_provider(Credentials::new(key, secret, None, None, "test"))
        .load()
        .await
}

async fn client(moto: &Moto) -> EcrClient {
    EcrClient::from_sdk_config(&sdk_config(moto, "testing", "testing").await).unwrap()
}

async fn repo(c: &EcrClient, name: &str) -> EcrRepo {
    let auth = c.authorization().await.unwrap();
    EcrRepoRef::parse(name, None)
        .unwrap()
        .resolve(c.region(), &auth)
        .unwrap()
}

/// A small image manifest; its digest is what ECR reports for it.
fn manifest(seed: &str) -> (String, Digest) {
    let cfg = Digest::of_bytes(seed.as_bytes());
    let layer = Digest::of_bytes(format!("layer-{seed}").as_bytes());
    let m = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cfg.to_string(), "size": 2},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer.to_string(), "size": 3}]
    })
    .to_string();
    let d = Digest::of_bytes(m.as_bytes());
    (m, d)
}

async fn put_image(c: &EcrClient, repo: &EcrRepo, tag: &str, seed: &str) -> Digest {
    let (m, d) = manifest(seed);
    c.sdk()
        .put_image()
        .repository_name(&repo.name)
        .image_manifest(m)
        .image_manifest_media_type("application/vnd.oci.image.manifest.v1+json")
        .image_tag(tag)
        .image_digest(d.to_string())
        .send()
        .await
        .unwrap();
    d
}

fn create(immutability: &str) -> EcrSettings {
    EcrSettings {
        create_repository: Some(true),
        tag_immutability: Some(immutability.into()),
        ..Default::default()
    }
}

#[tokio::test]
async fn creates_missing_repository_with_requested_settings() {
    let moto = Moto::start();
    let c = client(&moto).await;
    let dir = tempfile::tempdir().unwrap();
    let policy = r#"{"rules":[{"rulePriority":1,"description":"keep 10","selection":{"tagStatus":"any","countType":"imageCountMoreThan","countNumber":10},"action":{"type":"expire"}}]}"#;
    let policy_path = dir.path().join("policy.json");
    std::fs::write(&policy_path, policy).unwrap();
    let settings = EcrSettings {
        create_repository: Some(true),
        scan_on_push: Some(true),
        tag_immutability: Some("IMMUTABLE".into()),
        encryption: Some("KMS".into()),
        kms_key: Some(format!(
            "arn:aws:kms:{REGION}:{MOTO_ACCOUNT}:key/1234abcd-12ab-34cd-56ef-1234567890ab"
        )),
        lifecycle_policy: Some(policy_path),
        ..Default::default()
    };
    let r = repo(&c, "team/wordpress").await;
    assert_eq!(
        r.uri(),
        format!("{MOTO_ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/team/wordpress")
    );

    let st = c.ensure_repository(&r, &settings).await.unwrap();
    assert!(st.created);
    assert_eq!(st.tag_mutability, "IMMUTABLE");
    assert!(st.scan_on_push);
    assert_eq!(st.uri, r.uri());
    assert!(st.tag_is_immutable("latest"));

    // What ECR holds, read back independently.
    let d = c
        .sdk()
        .describe_repositories()
        .repository_names("team/wordpress")
        .send()
        .await
        .unwrap();
    let rep = &d.repositories()[0];
    assert_eq!(rep.image_tag_mutability().unwrap().as_str(), "IMMUTABLE");
    assert!(rep.image_scanning_configuration().unwrap().scan_on_push());
    let enc = rep.encryption_configuration().unwrap();
    assert_eq!(enc.encryption_type().as_str(), "KMS");
    assert_eq!(enc.kms_key(), settings.kms_key.as_deref());
    let lp = c
        .sdk()
        .get_lifecycle_policy()
        .repository_name("team/wordpress")
        .send()
        .await
        .unwrap();
    let got: serde_json::Value = serde_json::from_str(lp.lifecycle_policy_text().unwrap()).unwrap();
    let want: serde_json::Value = serde_json::from_str(policy).unwrap();
    assert_eq!(got, want);

    // Second run: found, not created, no warnings.
    let st = c.ensure_repository(&r, &settings).await.unwrap();
    assert!(!st.created && st.warnings.is_empty(), "{st:?}");
    // Different settings for an existing repository: reported, not applied.
    let st = c.ensure_repository(&r, &create("MUTABLE")).await.unwrap();
    assert!(!st.created);
    assert_eq!(st.tag_mutability, "IMMUTABLE");
    assert!(
        st.warnings[0].contains("tag_immutability is MUTABLE"),
        "{st:?}"
    );
}

#[tokio::test]
async fn missing_repository_without_create_is_a_clear_error() {
    let moto = Moto::start();
    let c = client(&moto).await;
    let r = repo(&c, "absent").await;
    let e = c
        .ensure_repository(&r, &EcrSettings::default())
        .await
        .unwrap_err();
    eprintln!("{e}");
    assert!(matches!(e, EcrError::RepositoryNotFound { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains("absent")
            && msg.contains(MOTO_ACCOUNT)
            && msg.contains(REGION)
            && msg.contains("target.ecr.create_repository: true"),
        "{msg}"
    );
    // Nothing was created.
    let d = c.sdk().describe_repositories().send().await.unwrap();
    assert!(d.repositories().is_empty());
    // Tag lookups against it say the same.
    let e = c
        .check_tags(&r, &["v1".into()], &manifest("a").1)
        .await
        .unwrap_err();
    eprintln!("{e}");
    assert!(matches!(e, EcrError::RepositoryNotFound { .. }), "{e:?}");
    // A broken lifecycle policy file is reported before the repository is created.
    let settings = EcrSettings {
        create_repository: Some(true),
        lifecycle_policy: Some("/nonexistent/policy.json".into()),
        ..Default::default()
    };
    let e = c.ensure_repository(&r, &settings).await.unwrap_err();
    eprintln!("{e}");
    assert!(e.to_string().contains("/nonexistent/policy.json"), "{e}");
    let d = c.sdk().describe_repositories().send().await.unwrap();
    assert!(d.repositories().is_empty());
}

#[tokio::test]
async fn immutable_tag_conflicts_are_found_before_upload() {
    let moto = Moto::start();
    let c = client(&moto).await;
    let r = repo(&c, "immutable").await;
    let st = c.ensure_repository(&r, &create("IMMUTABLE")).await.unwrap();
    let existing = put_image(&c, &r, "v1", "old").await;
    let (_, ours) = manifest("new");
    let tags = vec!["v1".to_string(), "v2".to_string()];

    let states = c.check_tags(&r, &tags, &ours).await.unwrap();
    assert_eq!(
        states,
        vec![
            TagState {
                tag: "v1".into(),
                status: TagStatus::Other(existing.to_string())
            },
            TagState {
                tag: "v2".into(),
                status: TagStatus::Absent
            },
        ]
    );
    let e = plan_tags(&st, &states, &ours).unwrap_err();
    eprintln!("{e}");
    let msg = e.to_string();
    assert!(matches!(e, EcrError::ImmutableTags { .. }));
    assert!(
        msg.contains(&format!("v1 -> {existing}"))
            && msg.contains(&ours.to_string())
            && msg.contains(&r.uri()),
        "{msg}"
    );

    // The same digest already under the tag: nothing to do for it, the push succeeds.
    let states = c.check_tags(&r, &tags, &existing).await.unwrap();
    assert_eq!(states[0].status, TagStatus::Same);
    let plan = plan_tags(&st, &states, &existing).unwrap();
    assert_eq!(plan.unchanged, vec!["v1"]);
    assert_eq!(plan.push, vec!["v2"]);

    // A mutable repository lets the tag move.
    let m = repo(&c, "mutable").await;
    let mst = c.ensure_repository(&m, &create("MUTABLE")).await.unwrap();
    put_image(&c, &m, "v1", "old").await;
    let states = c.check_tags(&m, &tags, &ours).await.unwrap();
    let plan = plan_tags(&mst, &states, &ours).unwrap();
    assert_eq!(plan.push, vec!["v1", "v2"]);
}

#[tokio::test]
async fn token_is_decoded_cached_and_refreshed() {
    let moto = Moto::start();
    let c = client(&moto).await;
    let tokens = c.token_provider();
    let a = tokens.get().await.unwrap();
    assert_eq!(a.username, "AWS");
    assert_eq!(a.password.expose(), format!("{MOTO_ACCOUNT}-auth-token"));
    assert_eq!(
        a.registry_host(),
        format!("{MOTO_ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com")
    );
    // moto's expiresAt is 2015: the token is still used, not refused.
    assert!(a.expires_at.unwrap() < std::time::SystemTime::now());
    assert!(!format!("{a:?}").contains("auth-token"));
    tokens.get().await.unwrap();
    assert_eq!(tokens.fetch_count(), 1, "reused within validity");

    // The registry side's callback: plain gets reuse, a refresh (after a 401) fetches anew.
    let f = tokens.token_fn();
    let (user, pass) = f(false).await.unwrap();
    assert_eq!((user.as_str(), pass.expose()), ("AWS", a.password.expose()));
    assert_eq!(tokens.fetch_count(), 1);
    f(true).await.unwrap();
    assert_eq!(tokens.fetch_count(), 2);
    // Concurrent refreshes (many uploads hit 401 together) share one fetch.
    let all = futures_util::future::join_all((0..8).map(|_| f(true))).await;
    assert!(all.iter().all(|r| r.is_ok()));
    assert_eq!(tokens.fetch_count(), 3);
}

fn scan_result(repo: &str, digest: &Digest, status: &str, counts: serde_json::Value) -> String {
    serde_json::json!({
        "region": REGION,
        "results": [{
            "registryId": MOTO_ACCOUNT,
            "repositoryName": repo,
            "imageId": {"imageDigest": digest.to_string()},
            "imageScanStatus": {"status": status, "description": format!("scan {status}")},
            "imageScanFindings": {"findingSeverityCounts": counts, "findings": []}
        }]
    })
    .to_string()
}

#[tokio::test]
async fn scan_wait_summarises_findings() {
    let moto = Moto::start();
    let c = client(&moto).await;
    let r = repo(&c, "scanned").await;
    c.ensure_repository(&r, &create("MUTABLE")).await.unwrap();
    let t = Duration::from_secs(30);

    // No scan yet: wait_scan starts one; moto's default result is one HIGH finding.
    let d = put_image(&c, &r, "a", "a").await;
    let s = c.wait_scan(&r, &d, t).await.unwrap();
    assert_eq!(s.status, "COMPLETE");
    assert_eq!(s.counts.get("HIGH"), Some(&1));
    assert!(s.exceeds(Severity::High) && s.exceeds(Severity::Low));
    assert!(!s.exceeds(Severity::Critical));
    assert!(s.to_string().contains("HIGH 1"), "{s}");

    let d = put_image(&c, &r, "b", "b").await;
    moto.api_post(
        "/moto-api/static/ecr/scan-finding-results",
        &scan_result(
            "scanned",
            &d,
            "COMPLETE",
            serde_json::json!({"CRITICAL": 2, "LOW": 3}),
        ),
    );
    let s = c.wait_scan(&r, &d, t).await.unwrap();
    assert_eq!(s.at_or_above(Severity::Critical), 2);
    assert_eq!(s.at_or_above(Severity::Informational), 5);

    let d = put_image(&c, &r, "c", "c").await;
    moto.api_post(
        "/moto-api/static/ecr/scan-finding-results",
        &scan_result("scanned", &d, "FAILED", serde_json::json!({})),
    );
    let e = c.wait_scan(&r, &d, t).await.unwrap_err();
    eprintln!("{e}");
    assert!(matches!(e, EcrError::ScanFailed { .. }), "{e:?}");
    assert!(e.to_string().contains("FAILED") && e.to_string().contains(&d.to_string()));

    let d = put_image(&c, &r, "e", "e").await;
    moto.api_post(
        "/moto-api/static/ecr/scan-finding-results",
        &scan_result("scanned", &d, "IN_PROGRESS", serde_json::json!({})),
    );
    let e = c
        .wait_scan(&r, &d, Duration::from_secs(3))
        .await
        .unwrap_err();
    eprintln!("{e}");
    assert!(matches!(e, EcrError::ScanTimeout { .. }), "{e:?}");
    assert!(e.to_string().contains("IN_PROGRESS"), "{e}");
}

#[tokio::test]
async fn refused_credentials_and_denied_actions_name_the_aws_code() {
    let moto = Moto::start();
    // A user allowed to get tokens only, made before moto starts enforcing IAM.
    let (key, secret) = moto.iam_user("pusher", &["ecr:GetAuthorizationToken"]);
    moto.enforce_auth();

    // Unknown access key.
    let bad_secret = "wJalrXUtnFEMI-not-a-real-secret";
    let c =
        EcrClient::from_sdk_config(&sdk_config(&moto, "AKIAUNKNOWN000000000", bad_secret).await)
            .unwrap();
    let e = c.authorization().await.unwrap_err();
    eprintln!("{e}");
    assert!(matches!(e, EcrError::Credentials { .. }), "{e:?}");
    let msg = e.to_string();
    let code = e.aws_code().unwrap().to_string();
    assert!(
        ["UnrecognizedClientException", "InvalidClientTokenId"].contains(&code.as_str()),
        "{msg}"
    );
    assert!(
        msg.contains(&code) && msg.contains("GetAuthorizationToken"),
        "{msg}"
    );
    assert!(!msg.contains(bad_secret) && !format!("{e:?}").contains(bad_secret));

    // Known user, wrong secret: the signature does not match.
    let c = EcrClient::from_sdk_config(&sdk_config(&moto, &key, bad_secret).await).unwrap();
    let e = c.authorization().await.unwrap_err();
    eprintln!("{e}");
    assert!(matches!(e, EcrError::Credentials { .. }), "{e:?}");
    assert!(!format!("{e} {e:?}").contains(bad_secret));

    // Valid user: token OK, but the policy lacks ecr:DescribeRepositories.
    let c = EcrClient::from_sdk_config(&sdk_config(&moto, &key, &secret).await).unwrap();
    let r = repo(&c, "wordpress").await;
    let e = c
        .ensure_repository(&r, &EcrSettings::default())
        .await
        .unwrap_err();
    eprintln!("{e}");
    assert!(matches!(e, EcrError::AccessDenied { .. }), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains("AccessDenied") && msg.contains("ecr:DescribeRepositories"),
        "{msg}"
    );
    assert!(!format!("{e} {e:?}").contains(&secret));
}

#[tokio::test]
async fn unreachable_api_and_missing_credentials_are_clear() {
    // Nothing listens on this port.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new(REGION))
        .endpoint_url(format!("http://127.0.0.1:{port}"))
        .credentials_provider(Credentials::new("testing", "testing", None, None, "test"))
        .load()
        .await;
    let e = EcrClient::from_sdk_config(&cfg)
        .unwrap()
        .authorization()
        .await
        .unwrap_err();
    eprintln!("{e}");
    assert!(matches!(e, EcrError::Network { .. }), "{e:?}");
    assert!(e.to_string().contains("GetAuthorizationToken"), "{e}");

    let moto = Moto::start();
    let cfg = aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new(REGION))
        .endpoint_url(&moto.url)
        .no_credentials()
        .load()
        .await;
    let e = EcrClient::from_sdk_config(&cfg)
        .unwrap()
        .authorization()
        .await
        .unwrap_err();
    eprintln!("{e}");
    assert!(matches!(e, EcrError::NoCredentials { .. }), "{e:?}");
    assert!(e.to_string().contains("--profile"), "{e}");

    let cfg = SdkConfig::builder()
        .behavior_version(BehaviorVersion::latest())
        .build();
    let e = EcrClient::from_sdk_config(&cfg).unwrap_err();
    eprintln!("{e}");
    assert!(matches!(e, EcrError::NoRegion { .. }), "{e:?}");
}

/// `EcrClient::new` goes through the real default chain: AWS_ENDPOINT_URL_ECR, a profile from
/// the shared config/credentials files, region from the profile or the override. Environment
/// variables are process-wide, so the checks run in a child copy of this test binary.
#[test]
fn default_chain_from_environment_and_profile() {
    if std::env::var_os("WPIMG_ECR_CHILD").is_some() {
        return default_chain_child();
    }
    let moto = Moto::start();
    let home = tempfile::tempdir().unwrap();
    let aws = home.path().join(".aws");
    std::fs::create_dir_all(&aws).unwrap();
    std::fs::write(
        aws.join("config"),
        "[default]\nregion = ap-south-1\n\n[profile ci]\nregion = eu-west-1\n\n[profile nocreds]\nregion = eu-west-1\n",
    )
    .unwrap();
    std::fs::write(
        aws.join("credentials"),
        "[default]\naws_access_key_id = testing\naws_secret_access_key = testing\n\n\
         [ci]\naws_access_key_id = testing\naws_secret_access_key = testing\n",
    )
    .unwrap();
    let text = run_child_test(
        child_test(
            "ecr_api::default_chain_from_environment_and_profile",
            home.path(),
        )
        .env("WPIMG_ECR_CHILD", "1")
        .env("AWS_ENDPOINT_URL_ECR", &moto.url),
    );
    eprintln!("{text}");
}

fn default_chain_child() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // Default profile: its region.
        let c = EcrClient::new(None, None).await.unwrap();
        assert_eq!(c.region(), "ap-south-1");
        // --profile ci: the profile's region and credentials; moto answers for that region.
        let c = EcrClient::new(None, Some("ci".into())).await.unwrap();
        assert_eq!(c.region(), "eu-west-1");
        let a = c.authorization().await.unwrap();
        assert_eq!(
            a.registry_host(),
            format!("{MOTO_ACCOUNT}.dkr.ecr.eu-west-1.amazonaws.com")
        );
        // --region beats the profile.
        let c = EcrClient::new(Some("us-west-2".into()), Some("ci".into()))
            .await
            .unwrap();
        assert_eq!(c.region(), "us-west-2");
        let a = c.authorization().await.unwrap();
        assert!(
            a.proxy_endpoint.contains("us-west-2"),
            "{}",
            a.proxy_endpoint
        );
        // A profile that does not exist: no region, and the message names the profile.
        let e = EcrClient::new(None, Some("nope".into())).await.unwrap_err();
        eprintln!("{e}");
        assert!(e.to_string().contains("profile nope"), "{e}");
        // A profile without credentials (and no other source): a clear error, not a hang.
        let c2 = EcrClient::new(None, Some("nocreds".into())).await.unwrap();
        let e = c2.authorization().await.unwrap_err();
        eprintln!("{e}");
        assert!(matches!(e, EcrError::NoCredentials { .. }), "{e:?}");
        // A repository created through the env-configured endpoint is visible in that region.
        let r = EcrRepoRef::parse("wordpress", None)
            .unwrap()
            .resolve(c.region(), &a)
            .unwrap();
        let st = c.ensure_repository(&r, &create("IMMUTABLE")).await.unwrap();
        assert!(st.created);
        let d = c
            .sdk()
            .describe_images()
            .repository_name("wordpress")
            .image_ids(ImageIdentifier::builder().image_tag("x").build())
            .send()
            .await;
        assert!(d.is_err(), "no image yet");
    });
}
