//! Registry client against Debian's docker-registry on 127.0.0.1: push/pull round trips checked
//! with skopeo and docker, HEAD-skips, mounts, basic and token auth, TLS, error parsing.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use crate::common::registry::*;
use futures_util::future::BoxFuture;
use wpimg::auth::{AuthError, Credential, CredentialProvider, DockerConfigProvider};
use wpimg::events::{null, BlobOutcome, SharedReporter};
use wpimg::layout::Layout;
use wpimg::oci::{self, Descriptor, Platform};
use wpimg::reference::Reference;
use wpimg::registry::{Client, ClientOptions, RegistryError, RetryPolicy};

fn client(opts: ClientOptions) -> Client {
    Client::new(ClientOptions {
        // Never read the developer's ~/.docker/config.json.
        default_credentials: opts.default_credentials.clone().or_else(|| {
            Some(Arc::new(DockerConfigProvider {
                dir: Some(std::env::temp_dir().join("wpimg-no-docker-config")),
                helper_path: None,
            }))
        }),
        ..opts
    })
    .unwrap()
}

fn reference(host: &str, repo: &str, tag: &str) -> Reference {
    format!("{host}/{repo}:{tag}").parse().unwrap()
}

fn layout() -> (tempfile::TempDir, Layout) {
    let d = tempfile::tempdir().unwrap();
    let l = Layout::open_or_create(d.path()).unwrap();
    (d, l)
}

struct DockerImageGuard(String);

impl Drop for DockerImageGuard {
    fn drop(&mut self) {
        let _ = Command::new("docker").args(["rmi", "-f", &self.0]).output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_then_pull_back_with_skopeo_and_docker_run() {
    let reg = Registry::start();
    let (_d, l) = layout();
    let img = echo_image(&l, "echo", "hello from wpimg");
    let c = client(ClientOptions::default());
    let dest = reference(&reg.host(), "wpimg/echo", "v1");
    let rep = c
        .push_image(&l, &img.manifest, &dest, &["latest".into()], &null())
        .await
        .unwrap();
    assert_eq!(rep.tags, vec!["v1".to_string(), "latest".to_string()]);
    assert_eq!(rep.count(BlobOutcome::Uploaded), 2, "{rep:?}");
    assert_eq!(rep.bytes_uploaded, img.config.size + img.layers[0].size);

    for tag in ["v1", "latest"] {
        let d = skopeo_manifest_digest(
            &format!("docker://{}/wpimg/echo:{tag}", reg.host()),
            &["--tls-verify=false"],
        );
        assert_eq!(
            d, img.manifest.digest,
            "skopeo sees another manifest for {tag}"
        );
    }
    let out = tempfile::tempdir().unwrap();
    run(Command::new("skopeo")
        .args(["copy", "--src-tls-verify=false"])
        .arg(format!("docker://{}/wpimg/echo:v1", reg.host()))
        .arg(format!("oci:{}:copy", out.path().display())));
    let copied = Layout::open(out.path()).unwrap();
    assert_eq!(copied.resolve("copy").unwrap().digest, img.manifest.digest);
    for b in img.blobs() {
        assert!(
            copied.has_blob(&b.digest),
            "skopeo did not get {}",
            b.digest
        );
    }

    // Our pull gets back the same bytes.
    let (_d2, l2) = layout();
    let pulled = c
        .pull_image(&dest, &Platform::host(), &l2, &null())
        .await
        .unwrap();
    assert_eq!(pulled.image.descriptor.digest, img.manifest.digest);
    assert_eq!(
        pulled.image.config.config.cmd.as_ref().unwrap()[1],
        "hello from wpimg"
    );
    for b in img.blobs() {
        assert_eq!(
            l2.read_blob(&b.digest).unwrap(),
            l.read_blob(&b.digest).unwrap()
        );
    }

    // Docker pulls it and runs it.
    require_tool("docker", "apt-get install docker.io and start dockerd");
    let image = format!("{}/wpimg/echo:v1", reg.host());
    let _guard = DockerImageGuard(image.clone());
    run(Command::new("docker").args(["pull", "-q", &image]));
    let id = run(Command::new("docker").args(["image", "inspect", "--format", "{{.Id}}", &image]));
    assert_eq!(
        id.trim(),
        img.config.digest.to_string(),
        "docker's image id is the config digest"
    );
    let said = run(Command::new("docker").args(["run", "--rm", &image]));
    assert_eq!(said.trim(), "hello from wpimg");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_push_uploads_nothing_and_other_repository_mounts() {
    let reg = Registry::start();
    let proxy = Proxy::start(&reg.url(), ProxyMode::default());
    let (_d, l) = layout();
    let a = random_blob(&l, 3 << 20, 1);
    let b = random_blob(&l, 1 << 20, 2);
    // The same layer twice: deduplicated.
    let layers = vec![a.clone(), b.clone(), a.clone()];
    let diff_ids = layers.iter().map(|x| x.digest.clone()).collect();
    let img = write_image(&l, "img", layers, diff_ids, None);
    let c = client(ClientOptions {
        jobs: 4,
        ..Default::default()
    });
    let dest = reference(&proxy.host(), "team/app", "1.0");
    let rec = Recorder::new();
    let reporter: SharedReporter = rec.clone();
    let rep = c
        .push_image(&l, &img.manifest, &dest, &[], &reporter)
        .await
        .unwrap();
    assert_eq!(rep.blobs.len(), 3, "config + 2 distinct layers: {rep:?}");
    assert_eq!(rep.count(BlobOutcome::Uploaded), 3);
    let puts: Vec<_> = proxy
        .requests()
        .into_iter()
        .filter(|r| r.method == "PUT" && r.is_upload())
        .collect();
    assert_eq!(
        puts.len(),
        3,
        "one streamed PUT per distinct blob: {puts:?}"
    );
    for p in &puts {
        assert!(
            p.content_length > 0,
            "monolithic PUT carries the blob: {p:?}"
        );
    }
    let manifest_puts = proxy
        .requests()
        .iter()
        .filter(|r| r.method == "PUT" && r.path.contains("/manifests/"))
        .count();
    assert_eq!(manifest_puts, 2, "by digest, then the tag");
    let starts = rec
        .events
        .lock()
        .unwrap()
        .iter()
        .filter(|e| matches!(e, wpimg::events::Event::BlobStart { .. }))
        .count();
    assert_eq!(starts, 3);

    // Again: nothing uploaded, nothing written.
    proxy.clear();
    let c2 = client(ClientOptions::default());
    let rep = c2
        .push_image(&l, &img.manifest, &dest, &[], &null())
        .await
        .unwrap();
    let log = proxy.requests();
    assert!(
        log.iter().all(|r| r.method == "GET" || r.method == "HEAD"),
        "second push must only read: {log:#?}"
    );
    assert_eq!(rep.count(BlobOutcome::Skipped), 3);
    assert_eq!(rep.manifests_put, 0);
    assert_eq!(rep.bytes_uploaded, 0);
    assert!(log.len() <= 4, "a handful of requests, got {log:#?}");

    // Another repository of the same registry: mounted, not uploaded.
    proxy.clear();
    let other = reference(&proxy.host(), "team/other", "1.0");
    let rep = c2
        .push_image(&l, &img.manifest, &other, &[], &null())
        .await
        .unwrap();
    assert_eq!(rep.count(BlobOutcome::Mounted), 3, "{rep:?}");
    assert!(rep
        .blobs
        .iter()
        .all(|b| b.mounted_from.as_deref() == Some("team/app")));
    let log = proxy.requests();
    assert_eq!(
        log.iter()
            .filter(|r| r.is_mount() && r.status == 201)
            .count(),
        3
    );
    assert_eq!(log.iter().filter(|r| r.is_upload()).count(), 0, "{log:#?}");
    assert_eq!(
        skopeo_manifest_digest(
            &format!("docker://{}/team/other:1.0", reg.host()),
            &["--tls-verify=false"]
        ),
        img.manifest.digest
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_index_with_platform_selection_and_docker_schema2_and_resume() {
    require_tool("skopeo", "apt-get install skopeo");
    let reg = Registry::start();
    let (src_dir, src) = layout();
    let mk = |tag: &str, arch: &str, seed: u64| {
        let (layer, diff_id) = random_tar_layer(&src, 2 << 20, seed);
        write_image_for(&src, tag, arch, vec![layer], vec![diff_id], None)
    };
    let amd = mk("amd", "amd64", 10);
    let arm = mk("arm", "arm64", 20);
    let entry = |i: &TestImage, arch: &str| {
        let mut d = i.manifest.clone();
        d.platform = Platform::parse(&format!("linux/{arch}"));
        d
    };
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": oci::MEDIA_TYPE_OCI_INDEX,
        "manifests": [entry(&amd, "amd64"), entry(&arm, "arm64/v8")],
    });
    let (idx_digest, idx_size) = src
        .write_blob(&serde_json::to_vec(&index).unwrap())
        .unwrap();
    src.tag(
        "multi",
        &Descriptor::new(oci::MEDIA_TYPE_OCI_INDEX, idx_digest.clone(), idx_size),
    )
    .unwrap();
    run(Command::new("skopeo")
        .args(["copy", "--all", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:multi", src_dir.path().display()))
        .arg(format!("docker://{}/base/multi:1", reg.host())));
    run(Command::new("skopeo")
        .args(["copy", "--format", "v2s2", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:amd", src_dir.path().display()))
        .arg(format!("docker://{}/base/docker:1", reg.host())));

    let proxy = Proxy::start(&reg.url(), ProxyMode::default());
    let c = client(ClientOptions::default());
    let (_d, l) = layout();
    let arm64 = Platform::parse("linux/arm64").unwrap();
    let r = reference(&proxy.host(), "base/multi", "1");
    let pulled = c.pull_image(&r, &arm64, &l, &null()).await.unwrap();
    // skopeo re-serialises the index; the image manifests stay byte for byte.
    let remote_idx = skopeo_manifest_digest(
        &format!("docker://{}/base/multi:1", reg.host()),
        &["--tls-verify=false"],
    );
    assert_eq!(pulled.index.as_ref().unwrap().digest, remote_idx);
    let idx_digest = remote_idx;
    assert_eq!(pulled.image.descriptor.digest, arm.manifest.digest);
    assert_eq!(pulled.image.config.architecture, "arm64");
    assert_eq!(pulled.count_downloaded(), 2);
    for b in arm.blobs() {
        assert!(l.has_blob(&b.digest));
    }
    assert!(
        !l.has_blob(&amd.layers[0].digest),
        "only the wanted platform is fetched"
    );
    assert!(l.has_blob(&idx_digest) && l.has_blob(&arm.manifest.digest));

    // Resume: a second pull fetches no blob again.
    proxy.clear();
    let again = c.pull_image(&r, &arm64, &l, &null()).await.unwrap();
    assert!(again
        .blobs
        .iter()
        .all(|b| b.outcome == BlobOutcome::Skipped));
    assert!(
        !proxy.requests().iter().any(|x| x.path.contains("/blobs/")),
        "{:#?}",
        proxy.requests()
    );
    // By digest, with everything in the layout: no request at all.
    proxy.clear();
    let by_digest = r.with_digest(idx_digest.clone());
    c.pull_image(&by_digest, &arm64, &l, &null()).await.unwrap();
    assert!(proxy.requests().is_empty(), "{:#?}", proxy.requests());

    // Our push of the (original) index: children by digest, then the index, as skopeo sees it.
    let ours = reference(&reg.host(), "base/ours", "1");
    let idx_desc = src.resolve("multi").unwrap();
    let rep = c
        .push_image(&src, &idx_desc, &ours, &[], &null())
        .await
        .unwrap();
    assert_eq!(rep.blobs.len(), 4, "two configs, two layers: {rep:?}");
    assert_eq!(
        rep.manifests_put, 4,
        "two image manifests, the index, the tag"
    );
    assert_eq!(
        skopeo_manifest_digest(
            &format!("docker://{}/base/ours:1", reg.host()),
            &["--tls-verify=false"]
        ),
        idx_desc.digest
    );
    let e = c
        .pull_image(&r, &Platform::parse("linux/s390x").unwrap(), &l, &null())
        .await
        .unwrap_err();
    assert!(matches!(e, RegistryError::PlatformNotFound { .. }), "{e}");
    assert!(e.to_string().contains("linux/arm64/v8"), "{e}");

    // Docker schema 2, kept as served.
    let d = reference(&proxy.host(), "base/docker", "1");
    let want = skopeo_manifest_digest(
        &format!("docker://{}/base/docker:1", reg.host()),
        &["--tls-verify=false"],
    );
    let head = c.manifest_descriptor(&d, &null()).await.unwrap().unwrap();
    assert_eq!(head.digest, want);
    assert_eq!(head.media_type, oci::MEDIA_TYPE_DOCKER_MANIFEST);
    let (_d3, l3) = layout();
    let pulled = c
        .pull_image(&d, &Platform::host(), &l3, &null())
        .await
        .unwrap();
    assert_eq!(pulled.image.descriptor.digest, want);
    assert_eq!(
        pulled.image.descriptor.media_type,
        oci::MEDIA_TYPE_DOCKER_MANIFEST
    );
    assert_eq!(oci::Digest::of_bytes(&l3.read_blob(&want).unwrap()), want);
    let remote = c.fetch_image(&d, &Platform::host(), &null()).await.unwrap();
    assert_eq!(remote.image.descriptor.digest, want);
    assert_eq!(remote.image.config.architecture, "amd64");
    assert!(c
        .manifest_descriptor(&reference(&proxy.host(), "base/docker", "nope"), &null())
        .await
        .unwrap()
        .is_none());
}

trait CountDownloaded {
    fn count_downloaded(&self) -> usize;
}

impl CountDownloaded for wpimg::registry::PulledImage {
    fn count_downloaded(&self) -> usize {
        self.blobs
            .iter()
            .filter(|b| b.outcome == BlobOutcome::Downloaded)
            .count()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_blobs_and_missing_images_fail_with_clear_errors() {
    let reg = Registry::start();
    let (_d, l) = layout();
    let img = random_image(&l, "img", &[1 << 20], 5);
    let c = client(ClientOptions::default());
    let dest = reference(&reg.host(), "errs/app", "1");
    c.push_image(&l, &img.manifest, &dest, &[], &null())
        .await
        .unwrap();

    let bad = Proxy::start(
        &reg.url(),
        ProxyMode {
            corrupt_blobs: true,
            ..Default::default()
        },
    );
    let (_d2, l2) = layout();
    let e = c
        .pull_image(
            &reference(&bad.host(), "errs/app", "1"),
            &Platform::host(),
            &l2,
            &null(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(e, RegistryError::DigestMismatch { what: "blob", .. }),
        "{e}"
    );
    assert!(e.to_string().contains("errs/app"), "{e}");
    for b in img.blobs() {
        assert!(
            !l2.has_blob(&b.digest),
            "a corrupt blob must not land in the layout"
        );
    }

    let e = c
        .pull_image(
            &reference(&reg.host(), "errs/missing", "1"),
            &Platform::host(),
            &l2,
            &null(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(e.code(), Some("NAME_UNKNOWN" | "MANIFEST_UNKNOWN")),
        "{e}"
    );
    assert!(
        e.to_string()
            .contains(&format!("{}/errs/missing", reg.host())),
        "{e}"
    );
    assert!(!e.is_temporary());

    let e = c
        .pull_image(
            &reference(&reg.host(), "errs/app", "nope"),
            &Platform::host(),
            &l2,
            &null(),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("MANIFEST_UNKNOWN"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn htpasswd_basic_auth_and_refresh_hook() {
    let reg = Registry::start_with(RegistryOptions {
        htpasswd: Some(("alice".into(), "s3cret-pw".into())),
        ..Default::default()
    });
    let (_d, l) = layout();
    let img = random_image(&l, "img", &[1 << 20], 7);
    let dest = reference(&reg.host(), "private/app", "1");

    let ok = client(
        ClientOptions::default()
            .with_credential(&reg.host(), Credential::basic("alice", "s3cret-pw")),
    );
    ok.push_image(&l, &img.manifest, &dest, &[], &null())
        .await
        .unwrap();

    let wrong = client(
        ClientOptions::default()
            .with_credential(&reg.host(), Credential::basic("alice", "wrong-pw")),
    );
    let e = wrong
        .push_image(
            &l,
            &img.manifest,
            &reference(&reg.host(), "private/other", "1"),
            &[],
            &null(),
        )
        .await
        .unwrap_err();
    assert!(matches!(e.code(), Some("UNAUTHORIZED" | "DENIED")), "{e}");
    assert!(e.to_string().contains("private/other"), "{e}");
    assert!(!e.to_string().contains("wrong-pw") && !format!("{e:?}").contains("wrong-pw"));
    assert!(!e.is_temporary());
    assert!(
        wrong.requests_sent() <= 5,
        "auth failures are not retried: {}",
        wrong.requests_sent()
    );

    let anon = client(ClientOptions::default());
    let e = anon.manifest_descriptor(&dest, &null()).await.unwrap_err();
    assert_eq!(e.code(), Some("UNAUTHORIZED"), "{e}");

    // Docker's config.json auths entry.
    let cfg = tempfile::tempdir().unwrap();
    std::fs::write(
        cfg.path().join("config.json"),
        format!(
            r#"{{"auths":{{"{}":{{"auth":"{}"}}}}}}"#,
            reg.host(),
            base64_encode("alice:s3cret-pw")
        ),
    )
    .unwrap();
    let from_cfg = client(ClientOptions {
        default_credentials: Some(Arc::new(DockerConfigProvider {
            dir: Some(cfg.path().to_path_buf()),
            helper_path: None,
        })),
        ..Default::default()
    });
    let d = from_cfg
        .manifest_descriptor(&dest, &null())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(d.digest, img.manifest.digest);

    // A provider whose first credentials are stale (an expired ECR token): refreshed on 401.
    let provider = Arc::new(Refreshing {
        calls: AtomicU32::new(0),
        refreshes: AtomicU32::new(0),
    });
    let refreshing = client(ClientOptions::default().with_provider(&reg.host(), provider.clone()));
    refreshing
        .push_image(
            &l,
            &img.manifest,
            &reference(&reg.host(), "private/third", "1"),
            &[],
            &null(),
        )
        .await
        .unwrap();
    assert_eq!(provider.refreshes.load(Ordering::SeqCst), 1);
}

fn base64_encode(s: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(s)
}

struct Refreshing {
    calls: AtomicU32,
    refreshes: AtomicU32,
}

impl CredentialProvider for Refreshing {
    fn credential<'a>(
        &'a self,
        _registry: &'a str,
        refresh: bool,
    ) -> BoxFuture<'a, Result<Credential, AuthError>> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if refresh {
            self.refreshes.fetch_add(1, Ordering::SeqCst);
        }
        let fresh = self.refreshes.load(Ordering::SeqCst) > 0;
        Box::pin(async move {
            Ok(if fresh {
                Credential::basic("alice", "s3cret-pw")
            } else {
                Credential::basic("alice", "expired-token")
            })
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_token_flow_with_scopes() {
    let reg = Registry::start();
    let proxy = Proxy::start(
        &reg.url(),
        ProxyMode {
            token_auth: Some(TokenAuth {
                username: "bob".into(),
                password: "tok-pw".into(),
            }),
            ..Default::default()
        },
    );
    let (_d, l) = layout();
    let img = random_image(&l, "img", &[2 << 20, 1 << 20], 9);
    let dest = reference(&proxy.host(), "tok/app", "1");
    let c = client(
        ClientOptions::default().with_credential(&proxy.host(), Credential::basic("bob", "tok-pw")),
    );
    let rep = c
        .push_image(&l, &img.manifest, &dest, &[], &null())
        .await
        .unwrap();
    assert_eq!(rep.count(BlobOutcome::Uploaded), 3);
    let tokens = proxy
        .requests()
        .iter()
        .filter(|r| r.path == "/token")
        .count();
    assert!(
        tokens <= 2,
        "tokens are cached per scope, got {tokens} token requests"
    );

    // Mount needs pull on the source repository: the token must carry both scopes.
    let rep = c
        .push_image(
            &l,
            &img.manifest,
            &reference(&proxy.host(), "tok/copy", "1"),
            &[],
            &null(),
        )
        .await
        .unwrap();
    assert_eq!(rep.count(BlobOutcome::Mounted), 3, "{rep:?}");

    // Anonymous tokens pull but do not push.
    let anon = client(ClientOptions::default());
    let (_d2, l2) = layout();
    let pulled = anon
        .pull_image(&dest, &Platform::host(), &l2, &null())
        .await
        .unwrap();
    assert_eq!(pulled.image.descriptor.digest, img.manifest.digest);
    let e = anon
        .push_image(
            &l,
            &img.manifest,
            &reference(&proxy.host(), "tok/anon", "1"),
            &[],
            &null(),
        )
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some("UNAUTHORIZED"), "{e}");
    assert!(e.to_string().contains("tok/anon"), "{e}");

    // An identity token (config.json `identitytoken`) is exchanged with a refresh-token grant.
    let ident = client(ClientOptions::default().with_credential(
        &proxy.host(),
        Credential::IdentityToken(wpimg::auth::Secret::new("tok-pw")),
    ));
    let rep = ident
        .push_image(
            &l,
            &img.manifest,
            &reference(&proxy.host(), "tok/ident", "1"),
            &[],
            &null(),
        )
        .await
        .unwrap();
    assert_eq!(rep.count(BlobOutcome::Mounted), 3, "{rep:?}");
    assert!(proxy
        .requests()
        .iter()
        .any(|r| r.path == "/token" && r.method == "POST"));

    let wrong = client(
        ClientOptions::default()
            .with_credential(&proxy.host(), Credential::basic("bob", "nope-pw")),
    );
    let e = wrong.manifest_descriptor(&dest, &null()).await.unwrap_err();
    assert_eq!(e.code(), Some("UNAUTHORIZED"), "{e}");
    assert!(
        e.to_string().contains("incorrect username or password"),
        "{e}"
    );
    assert!(!e.to_string().contains("nope-pw"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_private_ca() {
    let reg = Registry::start_with(RegistryOptions {
        tls: true,
        ..Default::default()
    });
    let ca = reg.ca.as_ref().unwrap().ca_pem.clone();
    let (_d, l) = layout();
    let img = random_image(&l, "img", &[1 << 20], 11);
    let dest = reference(&reg.host(), "tls/app", "1");

    let untrusting = client(ClientOptions::default());
    let e = untrusting
        .push_image(&l, &img.manifest, &dest, &[], &null())
        .await
        .unwrap_err();
    assert!(matches!(e, RegistryError::Transport { .. }), "{e}");
    assert!(e.to_string().contains("certificate"), "{e}");
    assert!(e.to_string().contains("tls/app"), "{e}");

    let c = client(ClientOptions {
        ca_file: Some(ca.clone()),
        ..Default::default()
    });
    c.push_image(&l, &img.manifest, &dest, &[], &null())
        .await
        .unwrap();
    let (_d2, l2) = layout();
    let p = c
        .pull_image(&dest, &Platform::host(), &l2, &null())
        .await
        .unwrap();
    assert_eq!(p.image.descriptor.digest, img.manifest.digest);
    let certs = tempfile::tempdir().unwrap();
    std::fs::copy(&ca, certs.path().join("ca.crt")).unwrap();
    let d = skopeo_manifest_digest(
        &format!("docker://{}/tls/app:1", reg.host()),
        &["--cert-dir", certs.path().to_str().unwrap()],
    );
    assert_eq!(d, img.manifest.digest);

    let e = Client::new(ClientOptions {
        ca_file: Some(reg.dir.path().join("config.yml")),
        ..Default::default()
    })
    .unwrap_err();
    assert!(e.to_string().contains("config.yml"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temporary_failures_are_retried() {
    let reg = Registry::start();
    let (_d, l) = layout();
    let img = random_image(&l, "img", &[1 << 20, 1 << 20], 13);
    for status in [503u16, 429] {
        let proxy = Proxy::start(
            &reg.url(),
            ProxyMode {
                flaky: Some((3, status)),
                ..Default::default()
            },
        );
        let rec = Recorder::new();
        let reporter: SharedReporter = rec.clone();
        let c = client(ClientOptions {
            retry: RetryPolicy {
                initial_backoff: std::time::Duration::from_millis(20),
                ..Default::default()
            },
            ..Default::default()
        });
        let dest = reference(&proxy.host(), &format!("flaky/s{status}"), "1");
        c.push_image(&l, &img.manifest, &dest, &[], &reporter)
            .await
            .unwrap();
        let notes = rec.notes();
        assert!(
            notes
                .iter()
                .any(|n| n.starts_with("retrying") && n.contains(&status.to_string())),
            "{notes:#?}"
        );
        let (_d2, l2) = layout();
        let p = c
            .pull_image(&dest, &Platform::host(), &l2, &null())
            .await
            .unwrap();
        assert_eq!(p.image.descriptor.digest, img.manifest.digest);
    }
}
