//! wpimg against hostile registries (issue 13, items 1, 2 and 5): credentials stay with the
//! registry's origin (upload `Location`s and blob redirects to another host, a token realm on
//! another host over plain HTTP, https→http downgrades), every request has an idle deadline
//! (`--registry-timeout`: answers that never come, bodies that stop, uploads no longer taken),
//! and nothing is read past its declared size or wpimg's limits. Real `docker-registry`s
//! show what a real registry can (TLS, `http.host`, the redirect storage middleware); the fake
//! of `common::hostile` does the rest.

use std::path::PathBuf;
use std::process::Output;
use std::time::{Duration, Instant};

use crate::common::hostile::*;
use crate::common::registry::{random_image, Redirects, Registry, RegistryOptions, TestImage};
use crate::common::*;
use bytes::Bytes;
use wpimg::auth::{Credential, Secret};
use wpimg::layout::Layout;
use wpimg::oci::{self, Descriptor, Digest};
use wpimg::reference::Reference;
use wpimg::registry::{Client, ClientOptions, MAX_CONFIG_BYTES, MAX_MANIFEST_BYTES};

const USER: &str = "hostile-user";
const PASS: &str = "hostile-pass-4711";

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A layout with one random image (`img:1`), and its `oci:DIR` for `--from`.
fn image(layers: &[u64], seed: u64) -> (tempfile::TempDir, TestImage, String) {
    let d = tempfile::tempdir().unwrap();
    let l = Layout::open_or_create(d.path()).unwrap();
    let img = random_image(&l, "img:1", layers, seed);
    let from = format!("oci:{}", d.path().display());
    (d, img, from)
}

/// `wpimg ARGS --username USER --password-stdin` with PASS on stdin and no Docker config.
fn wpimg_with_password(args: &[&str]) -> Output {
    run_with_stdin(
        wpimg()
            .env("DOCKER_CONFIG", "/nonexistent-wpimg-test")
            .args(args)
            .args(["--username", USER, "--password-stdin"]),
        format!("{PASS}\n").as_bytes(),
    )
}

fn push(from: &str, to: &str, extra: &[&str]) -> Output {
    let mut args = vec!["push", "--from", from, "--to", to];
    args.extend_from_slice(extra);
    wpimg_with_password(&args)
}

fn inspect(reference: &str, extra: &[&str]) -> Output {
    let r = format!("docker://{reference}");
    let mut args = vec!["inspect", "--json", &r];
    args.extend_from_slice(extra);
    wpimg_with_password(&args)
}

fn assert_ok(o: &Output) {
    assert!(o.status.success(), "wpimg failed:\n{}", stderr(o));
}

fn assert_fails(o: &Output, needles: &[&str]) {
    let e = stderr(o);
    eprintln!("wpimg failed as expected:\n{e}");
    assert_eq!(o.status.code(), Some(1), "{e}");
    for n in needles {
        assert!(e.contains(n), "stderr lacks {n:?}:\n{e}");
    }
    assert!(!e.contains(PASS), "the password leaked into stderr:\n{e}");
}

fn assert_no_credentials(seen: &[Seen]) {
    for s in seen {
        assert!(
            s.authorization.is_none(),
            "{} {} on the other host carried credentials",
            s.method,
            s.path
        );
    }
}

/// Whether `reference` has a manifest in a registry (read with the test credentials).
fn manifest_exists(reference: &str, ca_file: Option<PathBuf>) -> bool {
    let r: Reference = reference.parse().unwrap();
    let c = Client::new(
        ClientOptions {
            ca_file,
            ..Default::default()
        }
        .with_credential(
            &r.registry,
            Credential::Basic {
                username: USER.into(),
                password: Secret::new(PASS.to_string()),
            },
        ),
    )
    .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(c.manifest_descriptor(&r, &wpimg::events::null()))
        .unwrap()
        .is_some()
}

fn htpasswd_registry(tls: bool, redirects: Redirects) -> Registry {
    let opts = RegistryOptions {
        htpasswd: Some((USER.into(), PASS.into())),
        tls,
    };
    Registry::start_redirecting(opts, redirects)
}

// ---- 1. Credentials stay with their host ----------------------------------------------------

#[test]
fn upload_location_on_another_host_gets_no_credentials() {
    let reg = htpasswd_registry(false, Redirects::default());
    let h = Hostile::start(HostileOptions {
        upstream: Some(reg.url()),
        upstream_auth: Some((USER.into(), PASS.into())),
        redirect_uploads: true,
        ..Default::default()
    });
    let (_d, img, from) = image(&[300_000, 7 << 20], 1);
    let to = format!("{}/cred/upload:1", h.host());
    assert_ok(&push(&from, &to, &[]));

    let other = h.seen_by(Side::Other);
    let uploads = other
        .iter()
        .filter(|s| s.method == "PUT" && s.path.contains("/blobs/uploads/"))
        .count();
    assert_eq!(uploads, img.blobs().len(), "{other:#?}");
    assert_no_credentials(&other);
    // The registry itself did get them.
    assert!(h.seen_by(Side::Registry).iter().any(|s| s
        .authorization
        .as_deref()
        .is_some_and(|a| a.starts_with("Basic "))));
    assert!(manifest_exists(
        &format!("{}/cred/upload:1", reg.host()),
        None
    ));
}

#[test]
fn blob_reads_redirected_to_another_host_get_no_credentials() {
    let reg = htpasswd_registry(false, Redirects::default());
    let (_d, img, from) = image(&[200_000, 3 << 20], 2);
    assert_ok(&push(&from, &format!("{}/cred/read:1", reg.host()), &[]));
    let h = Hostile::start(HostileOptions {
        upstream: Some(reg.url()),
        upstream_auth: Some((USER.into(), PASS.into())),
        redirect_blob_reads: true,
        ..Default::default()
    });
    let reference = format!("{}/cred/read:1", h.host());

    // inspect reads the config through the redirect.
    assert_ok(&inspect(&reference, &[]));
    // A pull (the base pull of a build) reads every layer through it.
    let dir = tempfile::tempdir().unwrap();
    let layout = Layout::open_or_create(dir.path()).unwrap();
    let r: Reference = reference.parse().unwrap();
    let c = Client::new(ClientOptions::default().with_credential(
        &r.registry,
        Credential::Basic {
            username: USER.into(),
            password: Secret::new(PASS.to_string()),
        },
    ))
    .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let pulled = rt
        .block_on(c.pull_image(&r, &oci::Platform::host(), &layout, &wpimg::events::null()))
        .unwrap();
    assert_eq!(pulled.image.descriptor.digest, img.manifest.digest);

    let other = h.seen_by(Side::Other);
    for b in img.blobs() {
        assert!(
            other
                .iter()
                .any(|s| s.path.ends_with(&b.digest.to_string())),
            "{} was not read from the other host: {other:#?}",
            b.digest
        );
    }
    assert_no_credentials(&other);
}

#[test]
fn token_realm_over_plain_http_on_another_host_gets_no_credentials() {
    let reg = Registry::start();
    let (_d, _img, from) = image(&[100_000], 3);
    assert_ok(&push(&from, &format!("{}/cred/realm:1", reg.host()), &[]));
    let ip = non_loopback_ipv4();
    let h = Hostile::start(HostileOptions {
        upstream: Some(reg.url()),
        token_realm: Some((USER.into(), PASS.into())),
        other_ip: ip.into(),
        ..Default::default()
    });
    let reference = format!("{}/cred/realm:1", h.host());
    let realm = h.other_url();

    let o = inspect(&reference, &[]);
    assert_fails(
        &o,
        &[
            &h.host(),
            &format!("refusing plain HTTP to {realm} (token realm)"),
            "--insecure-registry",
        ],
    );
    assert!(h.seen_by(Side::Other).is_empty(), "{:#?}", h.seen());

    // Allowed plain HTTP with --insecure-registry, the realm host gets the credentials.
    let allowed = realm.trim_start_matches("http://").to_string();
    assert_ok(&inspect(&reference, &["--insecure-registry", &allowed]));
    let other = h.seen_by(Side::Other);
    assert!(
        other
            .iter()
            .any(|s| s.path == "/token" && s.authorization.is_some()),
        "{other:#?}"
    );
}

#[test]
fn https_to_http_upload_location_is_refused() {
    let recorder = Hostile::start(HostileOptions::default());
    let reg = htpasswd_registry(
        true,
        Redirects {
            public_url: Some(recorder.other_url()),
            ..Default::default()
        },
    );
    let ca = reg.ca.as_ref().unwrap().ca_pem.clone();
    let (_d, _img, from) = image(&[100_000], 4);
    let to = format!("{}/down/upload:1", reg.host());
    let o = push(&from, &to, &["--ca-file", ca.to_str().unwrap()]);
    assert_fails(
        &o,
        &[
            "refusing the downgrade",
            &format!("from https://{}", reg.host()),
            &format!("to {}", recorder.other_url()),
        ],
    );
    assert!(recorder.seen().is_empty(), "{:#?}", recorder.seen());
    assert!(!manifest_exists(&to, Some(ca)));
}

#[test]
fn https_to_http_blob_redirect_is_refused() {
    let recorder = Hostile::start(HostileOptions::default());
    let reg = htpasswd_registry(
        true,
        Redirects {
            blob_redirect: Some(format!("{}/", recorder.other_url())),
            ..Default::default()
        },
    );
    let ca = reg.ca.as_ref().unwrap().ca_pem.clone();
    let ca_arg = ca.to_str().unwrap();
    let (_d, _img, from) = image(&[100_000], 5);
    let reference = format!("{}/down/read:1", reg.host());
    assert_ok(&push(&from, &reference, &["--ca-file", ca_arg]));

    let o = inspect(&reference, &["--ca-file", ca_arg]);
    assert_fails(
        &o,
        &[
            "refusing the downgrade",
            &format!("from https://{}", reg.host()),
            &format!("to {}", recorder.other_url()),
        ],
    );
    assert!(recorder.seen().is_empty(), "{:#?}", recorder.seen());
}

// ---- 2. A deadline on every registry request -------------------------------------------------

/// A canned image of the fake: manifest at `repo:1`, config (declaring `config_size`), and
/// the rules serving them; plus the digests of config and layer.
struct Canned {
    manifest: Bytes,
    config: Bytes,
    config_digest: Digest,
    layer_digest: Digest,
}

fn canned(config_size: Option<u64>) -> Canned {
    let layer = Bytes::from(vec![7u8; 1 << 20]);
    let layer_digest = Digest::of_bytes(&layer);
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {}, "rootfs": {"type": "layers", "diff_ids": [layer_digest.to_string()]},
    });
    let config = Bytes::from(serde_json::to_vec(&config).unwrap());
    let config_digest = Digest::of_bytes(&config);
    let manifest = serde_json::json!({
        "schemaVersion": 2, "mediaType": oci::MEDIA_TYPE_OCI_MANIFEST,
        "config": Descriptor::new(
            oci::MEDIA_TYPE_OCI_CONFIG,
            config_digest.clone(),
            config_size.unwrap_or(config.len() as u64),
        ),
        "layers": [Descriptor::new(oci::MEDIA_TYPE_OCI_LAYER_GZIP, layer_digest.clone(), 1 << 20)],
    });
    Canned {
        manifest: Bytes::from(serde_json::to_vec(&manifest).unwrap()),
        config,
        config_digest,
        layer_digest,
    }
}

fn serve(body: &Bytes, content_type: &str) -> Action {
    Action::Serve {
        content_type: content_type.into(),
        body: body.clone(),
    }
}

fn manifest_rule(c: &Canned) -> Rule {
    Rule::new(
        "GET",
        "/manifests/1",
        serve(&c.manifest, oci::MEDIA_TYPE_OCI_MANIFEST),
    )
}

#[test]
fn manifest_answer_that_never_comes_fails_within_the_timeout_naming_the_host() {
    let h = Hostile::start(HostileOptions {
        rules: vec![Rule::new("GET", "/manifests/1", Action::StallHeaders)],
        ..Default::default()
    });
    let t = Instant::now();
    let o = inspect(
        &format!("{}/stall/app:1", h.host()),
        &["--registry-timeout", "1"],
    );
    let took = t.elapsed();
    assert_fails(
        &o,
        &[
            &format!("{}/stall/app: get manifest 1", h.host()),
            &format!("no answer from {} for 1 s", h.host()),
        ],
    );
    // Retried as a temporary failure (three attempts for a stall), then given up.
    let gets = h
        .seen_by(Side::Registry)
        .iter()
        .filter(|s| s.path.ends_with("/manifests/1"))
        .count();
    assert_eq!(gets, 3, "{:#?}", h.seen());
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(20),
        "{took:?}"
    );
}

#[test]
fn config_body_that_stops_fails_within_the_timeout() {
    let c = canned(None);
    let h = Hostile::start(HostileOptions {
        rules: vec![
            manifest_rule(&c),
            Rule::new(
                "GET",
                format!("/blobs/{}", c.config_digest),
                Action::StallBody {
                    content_type: "application/octet-stream".into(),
                    body: c.config.clone(),
                    after: 10,
                },
            ),
        ],
        ..Default::default()
    });
    let t = Instant::now();
    let o = inspect(
        &format!("{}/stall/app:1", h.host()),
        &["--registry-timeout", "1"],
    );
    assert_fails(
        &o,
        &[
            &format!("get blob {}", c.config_digest),
            &format!("no data from {} for 1 s (after 10 bytes", h.host()),
        ],
    );
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
}

#[test]
fn base_layer_that_stops_fails_the_build_within_the_timeout() {
    require_fixtures();
    let c = canned(None);
    let h = Hostile::start(HostileOptions {
        rules: vec![
            manifest_rule(&c),
            Rule::new(
                "GET",
                format!("/blobs/{}", c.config_digest),
                serve(&c.config, "application/octet-stream"),
            ),
            Rule::new(
                "GET",
                format!("/blobs/{}", c.layer_digest),
                Action::StallBody {
                    content_type: "application/octet-stream".into(),
                    body: Bytes::from(vec![7u8; 1 << 20]),
                    after: 4096,
                },
            ),
        ],
        ..Default::default()
    });
    let p = tempfile::tempdir().unwrap();
    let name = unique("wpimg-test/hostile");
    write(&p.path().join("site.yml"), "- hosts: all\n  tasks: []\n");
    write(
        &p.path().join("image.yaml"),
        &format!(
            "name: {name}\nbase: {}/stall/base:1\nprovision:\n  playbook: site.yml\n",
            h.host()
        ),
    );
    let t = Instant::now();
    let o = run(wpimg()
        .current_dir(p.path())
        .args(["build", "--registry-timeout", "1"]));
    assert_fails(
        &o,
        &[
            &format!("get blob {}", c.layer_digest),
            &format!("no data from {} for 1 s (after 4096 bytes", h.host()),
        ],
    );
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
    assert!(build_containers(&name).is_empty());
}

#[test]
fn upload_the_registry_stops_taking_fails_within_the_timeout() {
    let reg = Registry::start();
    let mut stall = Rule::new("PUT", "", Action::StallUpload { after: 1 << 20 });
    stall.min_body = 8 << 20;
    let h = Hostile::start(HostileOptions {
        upstream: Some(reg.url()),
        rules: vec![stall],
        ..Default::default()
    });
    let big = 48u64 << 20;
    let (_d, img, from) = image(&[100_000, big], 6);
    let to = format!("{}/stall/push:1", h.host());
    let t = Instant::now();
    // 2 s: the requests forwarded to the real registry must not stall on a busy machine.
    let o = push(&from, &to, &["--registry-timeout", "2"]);
    assert_fails(
        &o,
        &[
            &format!("upload blob {}", img.layers[1].digest),
            &format!("{} took no data for 2 s (after ", h.host()),
            &format!(" of {big} bytes of the request body)"),
        ],
    );
    assert!(t.elapsed() < Duration::from_secs(60), "{:?}", t.elapsed());
    assert!(!manifest_exists(
        &format!("{}/stall/push:1", reg.host()),
        None
    ));
}

#[test]
fn ecr_push_through_a_stalling_registry_fails_within_the_timeout() {
    use crate::common::ecr::{wpimg_push_ecr, write_ecr_image_yaml, Moto, MOTO_ACCOUNT};
    let moto = Moto::start();
    let reg = Registry::start_with(RegistryOptions {
        htpasswd: Some(("AWS".into(), format!("{MOTO_ACCOUNT}-auth-token"))),
        tls: false,
    });
    let h = Hostile::start(HostileOptions {
        upstream: Some(reg.url()),
        rules: vec![Rule::new("POST", "/blobs/uploads/", Action::StallHeaders)],
        ..Default::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let ecr_host = format!("{MOTO_ACCOUNT}.dkr.ecr.us-east-1.amazonaws.com");
    write_ecr_image_yaml(
        dir.path(),
        &format!("{ecr_host}/stall"),
        "    region: us-east-1\n    create_repository: true\n",
    );
    let oci_dir = dir.path().join(".wpimg/oci");
    let layout = Layout::open_or_create(&oci_dir).unwrap();
    random_image(&layout, "app:v1", &[100_000], 7);
    let aws = tempfile::tempdir().unwrap();
    let endpoint = format!("http://{}", h.host());
    let t = Instant::now();
    let (code, _, err) = wpimg_push_ecr(
        &moto,
        dir.path(),
        aws.path(),
        &["--registry-endpoint", &endpoint, "--registry-timeout", "2"],
    );
    assert_eq!(code, Some(1), "{err}");
    // The registry's name, and the host that really stalled.
    let host = h.host();
    for needle in [
        format!("{ecr_host}/stall: start upload of blob sha256:"),
        format!("no answer from {host} for 2 s"),
    ] {
        assert!(err.contains(&needle), "stderr lacks {needle:?}:\n{err}");
    }
    assert!(t.elapsed() < Duration::from_secs(60), "{:?}", t.elapsed());
}

// ---- 5. Memory bounded by what the registry declares ----------------------------------------

/// At most this much of a flood may leave the fake (socket buffers included).
const FLOOD_READ_MAX: u64 = 16 << 20;

#[test]
fn config_larger_than_declared_is_not_read() {
    let c = canned(None);
    let declared = c.config.len();
    let huge = 600u64 << 20;
    for content_length in [Some(huge), None] {
        let h = Hostile::start(HostileOptions {
            rules: vec![
                manifest_rule(&c),
                Rule::new(
                    "GET",
                    format!("/blobs/{}", c.config_digest),
                    Action::Flood {
                        content_type: "application/octet-stream".into(),
                        total: huge,
                        content_length,
                    },
                ),
            ],
            ..Default::default()
        });
        let reference = format!("{}/big/config:1", h.host());
        let o = inspect(&reference, &[]);
        assert_fails(
            &o,
            &[
                &format!("{reference}: config {}", c.config_digest),
                &format!("more than {declared} bytes (the size it declared)"),
            ],
        );
        let sent = h.flood_sent();
        eprintln!("content-length {content_length:?}: the fake sent {sent} of {huge} bytes");
        assert!(sent < FLOOD_READ_MAX, "{sent} bytes left the fake");
    }
}

#[test]
fn manifest_over_the_limit_is_not_read() {
    let huge = 64u64 << 20;
    for (content_length, expect) in [
        (
            Some(huge),
            format!("manifest is {huge} bytes, over the limit of {MAX_MANIFEST_BYTES} bytes"),
        ),
        (
            None,
            format!("manifest: the registry sent more than {MAX_MANIFEST_BYTES} bytes"),
        ),
    ] {
        let h = Hostile::start(HostileOptions {
            rules: vec![Rule::new(
                "GET",
                "/manifests/1",
                Action::Flood {
                    content_type: oci::MEDIA_TYPE_OCI_MANIFEST.into(),
                    total: huge,
                    content_length,
                },
            )],
            ..Default::default()
        });
        let reference = format!("{}/big/manifest:1", h.host());
        let o = inspect(&reference, &[]);
        assert_fails(&o, &[&format!("{reference}: {expect}")]);
        let sent = h.flood_sent();
        eprintln!("content-length {content_length:?}: the fake sent {sent} of {huge} bytes");
        assert!(sent < FLOOD_READ_MAX, "{sent} bytes left the fake");
    }
}

#[test]
fn declared_config_over_the_limit_is_refused_before_any_download() {
    require_fixtures();
    let declared = 150u64 << 20;
    let c = canned(Some(declared));
    let h = Hostile::start(HostileOptions {
        rules: vec![manifest_rule(&c)],
        ..Default::default()
    });
    let base = format!("{}/big/base:1", h.host());
    let expect = format!(
        "config {} is {declared} bytes, over the limit of {MAX_CONFIG_BYTES} bytes",
        c.config_digest
    );

    // inspect
    let o = inspect(&base, &[]);
    assert_fails(&o, &[&format!("{base}: {expect}")]);
    // pull (the base pull of a build)
    let p = tempfile::tempdir().unwrap();
    write(&p.path().join("site.yml"), "- hosts: all\n  tasks: []\n");
    write(
        &p.path().join("image.yaml"),
        &format!(
            "name: {}\nbase: {base}\nprovision:\n  playbook: site.yml\n",
            unique("wpimg-test/hostile")
        ),
    );
    let o = run(wpimg().current_dir(p.path()).arg("build"));
    assert_fails(&o, &[&expect]);
    let blob_reads: Vec<_> = h
        .seen()
        .into_iter()
        .filter(|s| s.path.contains("/blobs/"))
        .collect();
    assert!(blob_reads.is_empty(), "{blob_reads:#?}");
    assert!(temp_blobs(&p.path().join(".wpimg/oci")).is_empty());
}
