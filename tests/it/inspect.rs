//! `wpimg inspect`: images of the local layout (`NAME:TAG`, `oci:DIR:NAME:TAG`) and of a real
//! docker-registry on loopback (`docker://HOST/REPO:TAG`, `HOST/REPO:TAG`), including an index,
//! basic auth over TLS with --ca-file, and what the human view must not print.

use std::path::Path;
use std::process::{Command, Output};

use crate::common::registry::{random_blob, write_image_for, Registry, RegistryOptions, TestImage};
use crate::common::*;
use wpimg::layout::Layout;
use wpimg::oci::{self, Descriptor};

const SECRET: &str = "topsecret-4711";

/// An image whose config carries an env value that must stay out of the human view.
fn secret_image(layout: &Layout, tag: &str) -> TestImage {
    let layers = vec![
        random_blob(layout, 300_000, 7),
        random_blob(layout, 2_000, 8),
    ];
    let diff_ids: Vec<_> = layers.iter().map(|l| l.digest.clone()).collect();
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux", "created": "2024-05-06T07:08:09Z",
        "config": {
            "Env": ["PATH=/usr/bin:/bin", format!("API_TOKEN={SECRET}")],
            "Entrypoint": ["/bin/app"], "Cmd": ["--serve"], "User": "1000:1000",
            "ExposedPorts": {"8080/tcp": {}}, "WorkingDir": "/srv",
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [
            {"created": "2024-05-06T07:08:09Z", "created_by": "debootstrap bookworm"},
            {"created": "2024-05-06T07:08:10Z", "created_by": "wpimg build (ansible site.yml)"},
        ],
    });
    let (cd, cs) = layout
        .write_blob(&serde_json::to_vec(&config).unwrap())
        .unwrap();
    let config = Descriptor::new(oci::MEDIA_TYPE_OCI_CONFIG, cd, cs);
    let manifest = serde_json::json!({
        "schemaVersion": 2, "mediaType": oci::MEDIA_TYPE_OCI_MANIFEST,
        "config": config, "layers": layers,
    });
    let (md, ms) = layout
        .write_blob(&serde_json::to_vec(&manifest).unwrap())
        .unwrap();
    let manifest = Descriptor::new(oci::MEDIA_TYPE_OCI_MANIFEST, md, ms);
    layout.tag(tag, &manifest).unwrap();
    TestImage {
        manifest,
        config,
        layers,
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn inspect_json(cmd: &mut Command) -> serde_json::Value {
    let o = run(cmd);
    assert!(o.status.success(), "{}", stderr(&o));
    let line = stdout(&o).lines().last().unwrap().to_string();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["event"], "result");
    assert_eq!(v["command"], "inspect");
    v
}

fn skopeo_push(dir: &Path, tag: &str, dest: &str, all: bool) {
    require("skopeo");
    let mut c = Command::new("skopeo");
    c.args([
        "copy",
        "--quiet",
        "--preserve-digests",
        "--dest-tls-verify=false",
    ]);
    if all {
        c.arg("--all");
    }
    ok_stdout(c.arg(format!("oci:{}:{tag}", dir.display())).arg(dest));
}

fn assert_view(v: &serde_json::Value, img: &TestImage) {
    assert_eq!(v["digest"], img.manifest.digest.to_string());
    assert_eq!(v["media_type"], oci::MEDIA_TYPE_OCI_MANIFEST);
    assert_eq!(
        v["config_descriptor"]["digest"],
        img.config.digest.to_string()
    );
    let layers = v["layers"].as_array().unwrap();
    assert_eq!(layers.len(), img.layers.len());
    for (got, want) in layers.iter().zip(&img.layers) {
        assert_eq!(got["digest"], want.digest.to_string());
        assert_eq!(got["size"], want.size);
        assert_eq!(got["media_type"], want.media_type);
    }
    let total: u64 = img.layers.iter().map(|l| l.size).sum();
    assert_eq!(v["total_size"], total);
    assert_eq!(v["history"].as_array().unwrap().len(), 2);
    assert_eq!(v["platform"], "linux/amd64");
}

#[test]
fn local_layout_and_registry_show_the_same_image() {
    let reg = Registry::start();
    let d = tempfile::tempdir().unwrap();
    let oci_dir = d.path().join("oci");
    let layout = Layout::open_or_create(&oci_dir).unwrap();
    let img = secret_image(&layout, "app:v1");
    let remote = format!("{}/wpimg/app:v1", reg.host());
    skopeo_push(&oci_dir, "app:v1", &format!("docker://{remote}"), false);

    // Local: NAME:TAG in --oci-dir, and oci:DIR:NAME:TAG.
    let v = inspect_json(
        wpimg()
            .current_dir(d.path())
            .args(["inspect", "--json", "--oci-dir"])
            .arg(&oci_dir)
            .arg("app:v1"),
    );
    assert_view(&v, &img);
    assert_eq!(v["source"], "layout");
    let v = inspect_json(
        wpimg()
            .current_dir(d.path())
            .args(["inspect", "--json"])
            .arg(format!("oci:{}:app:v1", oci_dir.display())),
    );
    assert_view(&v, &img);

    // Registry: docker://, and HOST/REPO:TAG when the layout lacks it.
    for arg in [format!("docker://{remote}"), remote.clone()] {
        let v = inspect_json(
            wpimg()
                .current_dir(d.path())
                .args(["inspect", "--json", "--oci-dir"])
                .arg(&oci_dir)
                .arg(&arg),
        );
        assert_view(&v, &img);
        assert_eq!(v["source"], "registry", "{arg}");
        assert_eq!(v["reference"], remote);
        // The config as stored, secrets included: --json is for machines.
        assert!(v["config"]["config"]["Env"].to_string().contains(SECRET));
    }

    // Human view: one screen, env keys only.
    let o = run(wpimg()
        .current_dir(d.path())
        .args(["inspect"])
        .arg(format!("docker://{remote}")));
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    for want in [
        img.manifest.digest.to_string().as_str(),
        "created     2024-05-06T07:08:09Z",
        "entrypoint  [\"/bin/app\"]",
        "cmd         [\"--serve\"]",
        "user        1000:1000",
        "env keys    PATH, API_TOKEN",
        "ports       8080/tcp",
        "LAYERS",
        "300.0 kB",
        "HISTORY",
        "wpimg build (ansible site.yml)",
    ] {
        assert!(text.contains(want), "{want:?} missing:\n{text}");
    }
    assert!(!text.contains(SECRET), "secret printed:\n{text}");
    assert!(
        !text.contains("/usr/bin:/bin"),
        "env value printed:\n{text}"
    );
    assert!(text.lines().count() < 30, "not one screen:\n{text}");

    // -q: the digest alone.
    let o = run(wpimg().args(["inspect", "-q"]).arg(&remote));
    assert_eq!(stdout(&o).trim(), img.manifest.digest.to_string());
    assert!(o.stderr.is_empty());
}

#[test]
fn index_platform_selection() {
    let reg = Registry::start();
    let d = tempfile::tempdir().unwrap();
    let layout = Layout::open_or_create(d.path()).unwrap();
    let mut entries = Vec::new();
    let mut images = Vec::new();
    for (i, arch) in ["amd64", "arm64"].into_iter().enumerate() {
        let l = random_blob(&layout, 1000 + i as u64, 40 + i as u64);
        let img = write_image_for(
            &layout,
            &format!("tmp-{arch}"),
            arch,
            vec![l.clone()],
            vec![l.digest.clone()],
            None,
        );
        let mut e = img.manifest.clone();
        e.platform = wpimg::oci::Platform::parse(&format!("linux/{arch}"));
        entries.push(e);
        images.push(img);
    }
    let index = serde_json::json!({
        "schemaVersion": 2, "mediaType": oci::MEDIA_TYPE_OCI_INDEX, "manifests": entries,
    });
    let (xd, xs) = layout
        .write_blob(&serde_json::to_vec(&index).unwrap())
        .unwrap();
    let index_desc = Descriptor::new(oci::MEDIA_TYPE_OCI_INDEX, xd.clone(), xs);
    layout.tag("multi:v1", &index_desc).unwrap();
    let remote = format!("{}/wpimg/multi:v1", reg.host());
    skopeo_push(d.path(), "multi:v1", &format!("docker://{remote}"), true);

    for (arch, img) in ["amd64", "arm64"].iter().zip(&images) {
        for arg in [
            format!("docker://{remote}"),
            format!("oci:{}:multi:v1", d.path().display()),
        ] {
            let v = inspect_json(wpimg().args([
                "inspect",
                "--json",
                "--platform",
                &format!("linux/{arch}"),
                &arg,
            ]));
            assert_eq!(v["digest"], img.manifest.digest.to_string(), "{arg}");
            assert_eq!(v["index_digest"], xd.to_string(), "{arg}");
            assert_eq!(v["platform"], format!("linux/{arch}"));
        }
    }
    let o = run(wpimg().args([
        "inspect",
        "--platform",
        "linux/s390x",
        &format!("docker://{remote}"),
    ]));
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("linux/s390x"), "{}", stderr(&o));
}

fn inspect_with_password(reg: &Registry, args: &[&str], password: &str) -> Output {
    let ca = reg.ca.as_ref().unwrap();
    run_with_stdin(
        wpimg()
            .env("DOCKER_CONFIG", "/nonexistent-wpimg-test")
            .arg("inspect")
            .arg("--ca-file")
            .arg(&ca.ca_pem)
            .args(args),
        format!("{password}\n").as_bytes(),
    )
}

#[test]
fn registry_auth_tls_and_errors() {
    let reg = Registry::start_with(RegistryOptions {
        htpasswd: Some(("wpimg".into(), "inspect-pass-99".into())),
        tls: true,
    });
    let d = tempfile::tempdir().unwrap();
    let layout = Layout::open_or_create(d.path()).unwrap();
    let img = secret_image(&layout, "app:v2");
    let remote = format!("{}/wpimg/app:v2", reg.host());
    // Push with wpimg itself (same flags).
    let ca = reg.ca.as_ref().unwrap();
    let o = run_with_stdin(
        wpimg()
            .env("DOCKER_CONFIG", "/nonexistent-wpimg-test")
            .args(["push", "--from"])
            .arg(format!("oci:{}:app:v2", d.path().display()))
            .arg("--ca-file")
            .arg(&ca.ca_pem)
            .args(["--to", &remote, "--username", "wpimg", "--password-stdin"]),
        b"inspect-pass-99\n",
    );
    assert!(o.status.success(), "push: {}", stderr(&o));

    let o = inspect_with_password(
        &reg,
        &[
            "--json",
            "--username",
            "wpimg",
            "--password-stdin",
            &format!("docker://{remote}"),
        ],
        "inspect-pass-99",
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(stdout(&o).lines().last().unwrap()).unwrap();
    assert_view(&v, &img);

    // Wrong password: exit 1, names the image, never the password.
    let o = inspect_with_password(
        &reg,
        &["--username", "wpimg", "--password-stdin", &remote],
        "wrong-pass-123",
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains(&remote), "{}", stderr(&o));
    assert!(!stderr(&o).contains("wrong-pass-123"));

    // Without --ca-file the registry's certificate is not trusted.
    let o = run(wpimg()
        .env("DOCKER_CONFIG", "/nonexistent-wpimg-test")
        .args(["inspect", &format!("docker://{remote}")]));
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains(&remote), "{}", stderr(&o));

    // A tag the registry lacks.
    let o = inspect_with_password(
        &reg,
        &[
            "--username",
            "wpimg",
            "--password-stdin",
            &format!("{}/wpimg/app:nope", reg.host()),
        ],
        "inspect-pass-99",
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("wpimg/app:nope"), "{}", stderr(&o));
}

#[test]
fn local_names_that_are_not_in_the_layout() {
    let d = tempfile::tempdir().unwrap();
    let o = run(wpimg().current_dir(d.path()).args(["inspect", "app:v1"]));
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("app:v1: not in the OCI layout .wpimg/oci") && err.contains("docker://"),
        "{err}"
    );
    let o = run(wpimg()
        .current_dir(d.path())
        .args(["inspect", "docker://127.0.0.1:5000/Bad::ref"]));
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("Bad::ref"), "{}", stderr(&o));
}
