//! Registry client under faults: the registry killed in the middle of a large upload, and an
//! ECR-like registry that only takes chunked uploads (201 PATCH answers, stale Range header,
//! no mounts), reached through an endpoint override.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::common::registry::*;
use url::Url;
use wpimg::auth::DockerConfigProvider;
use wpimg::events::{null, BlobOutcome, Event, SharedReporter};
use wpimg::layout::Layout;
use wpimg::oci::{Digest, Platform};
use wpimg::reference::Reference;
use wpimg::registry::{Client, ClientOptions, RetryPolicy, MIN_CHUNK_SIZE};

fn client(opts: ClientOptions) -> Client {
    Client::new(ClientOptions {
        default_credentials: Some(Arc::new(DockerConfigProvider {
            dir: Some(std::env::temp_dir().join("wpimg-no-docker-config")),
            helper_path: None,
        })),
        ..opts
    })
    .unwrap()
}

fn digest_in_query(q: &str) -> Option<Digest> {
    url::form_urlencoded::parse(q.as_bytes())
        .find(|(k, _)| k == "digest")
        .and_then(|(_, v)| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_killed_mid_upload_then_rerun_uploads_only_what_is_missing() {
    let mut reg = Registry::start();
    let proxy = Proxy::start(&reg.url(), ProxyMode::default());
    let dir = tempfile::tempdir().unwrap();
    let l = Layout::open_or_create(dir.path()).unwrap();
    let big = 200u64 << 20;
    let img = random_image(&l, "img", &[1 << 20, 2 << 20, big], 42);
    let big_digest = img.layers[2].digest.clone();
    let dest: Reference = format!("{}/fault/app:1", proxy.host()).parse().unwrap();

    let pid = reg.pid() as i32;
    let killed = Arc::new(AtomicBool::new(false));
    let k = killed.clone();
    let bd = big_digest.to_string();
    let rec = Recorder::with_hook(move |e| {
        if let Event::BlobProgress { digest, done } = e {
            if *digest == bd && *done >= 16 << 20 && !k.swap(true, Ordering::SeqCst) {
                // SAFETY: plain kill(2) of the registry this test started.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    });
    let reporter: SharedReporter = rec.clone();
    let c = client(ClientOptions {
        retry: RetryPolicy {
            max_attempts: 2,
            initial_backoff: Duration::from_millis(50),
            ..Default::default()
        },
        ..Default::default()
    });
    let err = c
        .push_image(&l, &img.manifest, &dest, &[], &reporter)
        .await
        .expect_err("the push must fail while the registry is dead");
    assert!(
        killed.load(Ordering::SeqCst),
        "the registry was never killed"
    );
    assert!(err.to_string().contains("fault/app"), "{err}");
    let first_done: BTreeSet<String> = rec
        .events
        .lock()
        .unwrap()
        .iter()
        .filter_map(|e| match e {
            Event::BlobDone { digest, .. } => Some(digest.clone()),
            _ => None,
        })
        .collect();
    assert!(!first_done.contains(&big_digest.to_string()));

    eprintln!("first push failed as expected: {err}");
    reg.kill();
    reg.restart();
    proxy.clear();
    let c = client(ClientOptions::default());
    let rep = c
        .push_image(&l, &img.manifest, &dest, &[], &null())
        .await
        .unwrap();
    let uploaded: BTreeSet<String> = rep
        .blobs
        .iter()
        .filter(|b| b.outcome == BlobOutcome::Uploaded)
        .map(|b| b.digest.to_string())
        .collect();
    let expected: BTreeSet<String> = img
        .blobs()
        .iter()
        .map(|b| b.digest.to_string())
        .filter(|d| !first_done.contains(d))
        .collect();
    // What the first run finished is skipped; of the rest, a blob the registry committed just
    // before dying may be skipped too. Nothing else is sent again.
    for b in &rep.blobs {
        if first_done.contains(&b.digest.to_string()) {
            assert_eq!(b.outcome, BlobOutcome::Skipped, "{b:?}");
        }
    }
    assert!(
        uploaded.is_subset(&expected),
        "{uploaded:?} vs {expected:?}"
    );
    assert!(uploaded.contains(&big_digest.to_string()));
    let put_digests: BTreeSet<String> = proxy
        .requests()
        .iter()
        .filter(|r| r.method == "PUT" && r.is_upload())
        .filter_map(|r| digest_in_query(&r.query))
        .map(|d| d.to_string())
        .collect();
    assert_eq!(
        put_digests, uploaded,
        "the registry saw uploads of these blobs only"
    );
    assert_eq!(
        skopeo_manifest_digest(
            &format!("docker://{}/fault/app:1", reg.host()),
            &["--tls-verify=false"]
        ),
        img.manifest.digest
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ecr_like_chunked_only_registry_through_endpoint_override() {
    let reg = Registry::start();
    let proxy = Proxy::start(
        &reg.url(),
        ProxyMode {
            ecr_chunked: true,
            ..Default::default()
        },
    );
    let dir = tempfile::tempdir().unwrap();
    let l = Layout::open_or_create(dir.path()).unwrap();
    // An odd size, an exact multiple of the chunk size, one below it.
    let img = random_image(
        &l,
        "img",
        &[12 * MIN_CHUNK_SIZE / 5 + 3, 2 * MIN_CHUNK_SIZE, 1 << 20],
        77,
    );
    let ecr = "123456789012.dkr.ecr.us-east-1.amazonaws.com";
    let opts = ClientOptions::default().with_endpoint(ecr, Url::parse(&proxy.url()).unwrap());
    let c = client(opts.clone());
    let rec = Recorder::new();
    let reporter: SharedReporter = rec.clone();
    let dest: Reference = format!("{ecr}/team/app:1").parse().unwrap();
    let rep = c
        .push_image(&l, &img.manifest, &dest, &[], &reporter)
        .await
        .unwrap();
    assert_eq!(rep.registry, ecr);
    assert_eq!(rep.count(BlobOutcome::Uploaded), 4);
    assert!(proxy.violations().is_empty(), "{:#?}", proxy.violations());
    assert!(
        rec.notes()
            .iter()
            .any(|n| n.contains("switching to chunked")),
        "{:#?}",
        rec.notes()
    );
    let log = proxy.requests();
    let patches: Vec<_> = log.iter().filter(|r| r.method == "PATCH").collect();
    assert!(!patches.is_empty());
    assert!(patches
        .iter()
        .all(|p| p.status == 201 && p.content_length == MIN_CHUNK_SIZE));
    assert_eq!(
        skopeo_manifest_digest(
            &format!("docker://{}/team/app:1", reg.host()),
            &["--tls-verify=false"]
        ),
        img.manifest.digest
    );

    // Pull it back through the override.
    let d2 = tempfile::tempdir().unwrap();
    let l2 = Layout::open_or_create(d2.path()).unwrap();
    let p = c
        .pull_image(&dest, &Platform::host(), &l2, &null())
        .await
        .unwrap();
    assert_eq!(p.image.descriptor.digest, img.manifest.digest);

    // Mounting answered 202 (not mounted): uploads instead, chunked from the start this time.
    proxy.clear();
    let other: Reference = format!("{ecr}/team/other:1").parse().unwrap();
    let rep = c
        .push_image(&l, &img.manifest, &other, &[], &null())
        .await
        .unwrap();
    assert_eq!(rep.count(BlobOutcome::Uploaded), 4, "{rep:?}");
    let log = proxy.requests();
    assert_eq!(
        log.iter()
            .filter(|r| r.is_mount() && r.status == 202)
            .count(),
        4
    );
    assert!(!log.iter().any(|r| r.status == 413), "{log:#?}");
    assert!(proxy.violations().is_empty(), "{:#?}", proxy.violations());

    // force_chunked: never tries a monolithic upload of a large blob.
    proxy.clear();
    let forced = client(ClientOptions {
        force_chunked: true,
        chunk_size: MIN_CHUNK_SIZE,
        ..opts
    });
    let third: Reference = format!("{ecr}/team/third:1").parse().unwrap();
    let d3 = tempfile::tempdir().unwrap();
    let l3 = Layout::open_or_create(d3.path()).unwrap();
    let img3 = random_image(&l3, "img", &[3 * MIN_CHUNK_SIZE + 1], 78);
    forced
        .push_image(&l3, &img3.manifest, &third, &[], &null())
        .await
        .unwrap();
    let log = proxy.requests();
    assert!(
        !log.iter()
            .any(|r| r.status >= 400 && r.status != 404 && r.status != 401),
        "{log:#?}"
    );
    assert_eq!(log.iter().filter(|r| r.method == "PATCH").count(), 3);
}
