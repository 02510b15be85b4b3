//! The WordPress image end to end: `wpimg build --push` of the top-level image.yaml on the
//! Debian fixture base, then pull and run the pushed image against a real MariaDB, install
//! WordPress over HTTP, check health endpoints, SIGTERM shutdown, that the database password
//! is in no layer, that the image's SBOM lists exactly its packages, and that its version label
//! and version tag are the WordPress version installed (provisioning outputs).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::registry::Registry;
use crate::common::wordpress::*;
use crate::common::*;

/// Every blob of the pushed image, as stored by the registry, must not contain `needle`
/// (compressed or not).
fn assert_not_in_blobs(reg: &Registry, needle: &str) {
    fn walk(p: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
            if e.path().is_dir() {
                walk(&e.path(), out);
            } else if e.file_name() == "data" {
                out.push(e.path());
            }
        }
    }
    let mut blobs = Vec::new();
    walk(
        &reg.dir.path().join("data/docker/registry/v2/blobs"),
        &mut blobs,
    );
    assert!(blobs.len() >= 3, "no blobs found in the registry");
    for b in blobs {
        let mut raw = Vec::new();
        std::fs::File::open(&b)
            .unwrap()
            .read_to_end(&mut raw)
            .unwrap();
        let plain = if raw.starts_with(&[0x1f, 0x8b]) {
            let mut d = flate2::read::MultiGzDecoder::new(raw.as_slice());
            let mut v = Vec::new();
            d.read_to_end(&mut v).unwrap();
            v
        } else {
            raw
        };
        assert!(
            !plain.windows(needle.len()).any(|w| w == needle.as_bytes()),
            "the database password is in blob {}",
            b.display()
        );
    }
}

#[test]
fn wordpress_image_builds_pushes_runs_and_installs() {
    require("curl");
    let reg = Registry::start();
    let oci = tempfile::tempdir().unwrap();
    let id = unique("wp");
    let password = format!("db-{id}-Secret");

    // Build with wpimg from the repository's image.yaml on the local Debian base under Mitogen
    // (issue 17), push it, pull it by digest and run it against MariaDB.
    require_mitogen();
    let built = build_wordpress_with(&reg, oci.path(), "e2e", &["--accelerator", "mitogen"]);
    assert!(
        built.events.iter().any(|e| e["event"] == "note"
            && e["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("accelerator: Mitogen "))),
        "not built under Mitogen"
    );
    eprintln!("stages: {}", built.result["stages"]);
    assert_sbom_lists_the_image(&reg, oci.path(), &built);
    let db = Mariadb::start(&password);
    let name = format!("wpimg-e2e-{id}");
    let _c = ContainerGuard(name.clone());
    run_wordpress(&name, &built.image, &db, "127.0.0.1::80", &[]);
    let url = published_url(&name);

    wait_for(&format!("{url}/healthz"), 90);
    let (_, body) = curl(&["-f", &format!("{url}/healthz")]);
    assert_eq!(body.trim(), "ok");
    wait_for(&format!("{url}/healthz/php"), 60);
    let (ok, body) = curl(&["-f", &format!("{url}/healthz/php?db=1")]);
    assert!(ok && body.contains("database"), "PHP/DB health: {body}");

    // Redirects keep the host and port the client used; behind a TLS-terminating load
    // balancer (X-Forwarded-Proto: https) they are https (issue 16).
    let authority = url.trim_start_matches("http://");
    let https = ["-H", "X-Forwarded-Proto: https"];
    let install_url = format!("{url}/wp-admin/install.php");
    assert_eq!(
        redirect(&format!("{url}/"), &[]),
        (302, install_url.clone())
    );
    assert_eq!(
        redirect(&format!("{url}/wp-admin"), &[]),
        (301, "/wp-admin/".into())
    );
    assert_eq!(
        redirect(&format!("{url}/"), &https),
        (302, format!("https://{authority}/wp-admin/install.php"))
    );

    // Complete the installation over HTTP, then find the title on the front page.
    let title = format!("wpimg e2e {id}");
    let (ok, _) = curl(&[
        "-f",
        "-o",
        "/dev/null",
        &format!("{url}/wp-admin/install.php"),
    ]);
    assert!(ok, "install.php does not answer");
    let (ok, page) = curl(&[
        "-f",
        &format!("{url}/wp-admin/install.php?step=2"),
        "--data-urlencode",
        &format!("weblog_title={title}"),
        "--data-urlencode",
        "user_name=admin",
        "--data-urlencode",
        "admin_password=e2e-admin-password",
        "--data-urlencode",
        "admin_password2=e2e-admin-password",
        "--data-urlencode",
        "admin_email=admin@example.com",
        "--data-urlencode",
        "pw_weak=1",
        "--data-urlencode",
        "blog_public=0",
    ]);
    assert!(
        ok && page.contains("Success!"),
        "installation failed: {page}"
    );
    let (ok, front) = curl(&["-f", &format!("{url}/")]);
    assert!(ok && front.contains(&title), "title not on the front page");

    // The installed site: links name the address of the request, https behind the load
    // balancer without a redirect (no loop), and another container on another port links to
    // that port.
    assert_links_to(&front, &format!("{url}/"));
    assert_eq!(redirect(&format!("{url}/"), &https).0, 200);
    let (ok, front) = curl(&[https[0], https[1], &format!("{url}/")]);
    assert!(ok, "front page behind the load balancer");
    assert_links_to(&front, &format!("https://{authority}/"));
    // HTTP/1.0 without a Host header: the URLs stored at install time.
    let (ok, front) = curl(&["-f", "-0", "-H", "Host:", &format!("{url}/")]);
    assert!(ok, "front page without a Host header");
    assert_links_to(&front, &format!("{url}/"));
    let name2 = format!("{name}-2");
    let _c2 = ContainerGuard(name2.clone());
    run_wordpress(&name2, &built.image, &db, "127.0.0.1::80", &[]);
    let url2 = published_url(&name2);
    assert_ne!(url2, url);
    wait_for(&format!("{url2}/healthz/php"), 60);
    let (ok, front) = curl(&["-f", &format!("{url2}/")]);
    assert!(
        ok && front.contains(&title),
        "second container's front page"
    );
    assert_links_to(&front, &format!("{url2}/"));
    assert_eq!(
        redirect(&format!("{url2}/wp-admin/"), &[]).1,
        format!(
            "{url2}/wp-login.php?redirect_to={}%2Fwp-admin%2F&reauth=1",
            urlencode(&url2)
        )
    );

    // The version label and the version tag tell the WordPress version actually installed
    // (issue 16): the play's output, resolved in the label and in image.yaml's target.tags.
    assert_version_is_the_installed_one(&name, &built, oci.path());

    // Workers do not run as root.
    let ps = ok_stdout(Command::new("docker").args(["exec", &name, "ps", "-eo", "user,args"]));
    for line in ps
        .lines()
        .filter(|l| l.contains("worker process") || l.contains("pool "))
    {
        assert!(
            !line.trim_start().starts_with("root"),
            "worker as root: {line}"
        );
    }

    // SIGTERM: clean stop well within ECS's timeout.
    let t = Instant::now();
    ok_stdout(Command::new("docker").args(["stop", "-t", "10", &name]));
    let took = t.elapsed();
    let code =
        ok_stdout(Command::new("docker").args(["inspect", "-f", "{{.State.ExitCode}}", &name]));
    assert!(took < Duration::from_secs(10), "docker stop took {took:?}");
    assert_eq!(code.trim(), "0", "exit code after SIGTERM");
    let logs = run(Command::new("docker").args(["logs", &name]));
    let logs = format!(
        "{}{}",
        String::from_utf8_lossy(&logs.stdout),
        String::from_utf8_lossy(&logs.stderr)
    );
    assert!(!logs.contains(&password), "password in the container log");

    // No layer of the pushed image holds the password.
    assert_not_in_blobs(&reg, &password);

    // Without the accelerator the play makes the same files, with the same modes and owners.
    same_files_as_without_the_accelerator(oci.path(), &built.result);
}

/// The image's `org.opencontainers.image.version` label, the build's `outputs` and the version
/// tag `wpimg push` would give it (image.yaml's `target.tags`, from the outputs stored with the
/// image) all equal the version in the running container's `wp-includes/version.php`.
fn assert_version_is_the_installed_one(container: &str, built: &BuiltImage, oci: &Path) {
    let installed = ok_stdout(Command::new("docker").args([
        "exec",
        container,
        "php",
        "-r",
        "include 'wp-includes/version.php'; echo $wp_version;",
    ]));
    let installed = installed.trim();
    assert!(
        installed.starts_with(|c: char| c.is_ascii_digit()),
        "{installed}"
    );
    assert_eq!(built.result["outputs"]["wordpress_version"], installed);
    let label = ok_stdout(Command::new("docker").args([
        "image",
        "inspect",
        "--format",
        "{{ index .Config.Labels \"org.opencontainers.image.version\" }}",
        &built.image,
    ]));
    assert_eq!(label.trim(), installed, "version label");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let overrides = wpimg::spec::Overrides {
        vars: vec![("base".into(), BASE.into())],
        var_files: vec![],
    };
    let spec = wpimg::spec::load(&root.join("image.yaml"), &overrides).unwrap();
    let layout = wpimg::layout::Layout::open(oci).unwrap();
    let digest: wpimg::oci::Digest = built.result["manifest"]["digest"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let stored = wpimg::outputs::stored(&layout, &digest).expect("no outputs stored");
    let tags = wpimg::outputs::resolve_tags(
        &spec.target.as_ref().unwrap().tags(),
        &stored.outputs,
        wpimg::outputs::Source::Stored(&digest),
    )
    .unwrap();
    assert_eq!(tags, ["latest", installed], "image.yaml's tags");
}

/// Build image.yaml again with `--accelerator none` and compare each step's new layer listing
/// with the one of `accelerated` (path, type, mode, owner, link target; contents and times
/// vary; a directory one play only touched, with nothing below it, is not a difference).
fn same_files_as_without_the_accelerator(oci: &Path, accelerated: &serde_json::Value) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let o = run(wpimg()
        .current_dir(root)
        .arg("--oci-dir")
        .arg(oci)
        .args(["build", "image.yaml", "--json", "--accelerator", "none"])
        .args(["--var", &format!("base={BASE}")]));
    assert!(
        o.status.success(),
        "wpimg build --accelerator none failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let plain: serde_json::Value = String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .rfind(|e| e["event"] == "result")
        .expect("no result event");
    assert_eq!(
        plain["cache"], "miss",
        "the accelerator is in the cache key"
    );
    let (with_layers, without_layers) = (new_layers(accelerated), new_layers(&plain));
    assert_eq!(
        with_layers.len(),
        without_layers.len(),
        "{accelerated}\n{plain}"
    );
    for (step, (w, n)) in with_layers.iter().zip(&without_layers).enumerate() {
        let with = layer_listing(oci, w);
        let without = layer_listing(oci, n);
        let only = |a: &BTreeMap<String, Entry>, b: &BTreeMap<String, Entry>| -> Vec<String> {
            a.keys()
                .filter(|k| !b.contains_key(*k) && !touched_only(a, k))
                .cloned()
                .collect()
        };
        let differ: Vec<String> = with
            .iter()
            .filter_map(|(k, e)| {
                let o = without.get(k)?;
                (o != e).then(|| format!("{k}: {e:?} (mitogen) vs {o:?} (none)"))
            })
            .collect();
        let (only_with, only_without) = (only(&with, &without), only(&without, &with));
        assert!(
            only_with.is_empty() && only_without.is_empty() && differ.is_empty(),
            "step {step}: layers differ ({} entries with Mitogen, {} without)\nonly with Mitogen: {:?}\nonly without: {:?}\ndifferent: {:?}",
            with.len(),
            without.len(),
            &only_with[..only_with.len().min(40)],
            &only_without[..only_without.len().min(40)],
            &differ[..differ.len().min(40)]
        );
        eprintln!(
            "step {step}: same {} layer entries with and without Mitogen",
            with.len()
        );
    }
}

/// The package the WordPress play purges from the Debian base (bootstrap_debian_purge).
const PURGED_BY_THE_PLAY: &str = "e2fsprogs";

/// The SBOM of the WordPress image (issue 14): made by the build, pushed with the image under
/// cosign's `.sbom` tag (the loopback registry has no referrers API), valid SPDX (pyspdxtools)
/// and CycloneDX (its strict schema validator), with the names and versions `dpkg-query -W`
/// lists inside the image; the package the play purges is gone.
fn assert_sbom_lists_the_image(reg: &Registry, oci: &Path, built: &BuiltImage) {
    use crate::sbom::{assert_cyclonedx_valid, assert_spdx_valid, dpkg_query, spdx_set};
    let r = &built.result;
    let digest = r["manifest"]["digest"].as_str().unwrap();
    assert_eq!(r["sbom"]["subject"], digest, "{r}");
    assert!(
        r["stages"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["stage"] == "sbom"),
        "{r}"
    );
    let attached = &r["push"]["attachments"];
    assert_eq!(attached["mode"], "tags", "{r}");
    let sbom_tag = format!("sha256-{}.sbom", &digest[7..]);
    assert_eq!(
        attached["sboms"][0]["reference"],
        format!("{}/wordpress:{sbom_tag}", reg.host())
    );

    // From the registry: the pushed document.
    let repo_ref = format!("{}/wordpress@{digest}", reg.host());
    let o = run(wpimg().args(["sbom", &repo_ref]));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let dir = tempfile::tempdir().unwrap();
    let spdx = dir.path().join("wordpress.spdx.json");
    std::fs::write(&spdx, &o.stdout).unwrap();
    assert_spdx_valid(&spdx);
    let doc: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let installed = dpkg_query(&built.image);
    assert!(installed.len() > 150, "{installed:?}");
    assert_eq!(spdx_set(&doc), installed);
    for expected in ["nginx", "wordpress", "supervisor"] {
        assert!(
            installed.iter().any(|(n, _)| n == expected),
            "{expected} not installed"
        );
    }
    assert!(!installed.iter().any(|(n, _)| n == PURGED_BY_THE_PLAY));
    assert!(dpkg_query(BASE)
        .iter()
        .any(|(n, _)| n == PURGED_BY_THE_PLAY));

    // CycloneDX, made from the layers in the local layout.
    let o = run(wpimg().arg("--oci-dir").arg(oci).args([
        "sbom",
        "--format",
        "cyclonedx-json",
        &format!("wordpress:{}", "latest"),
    ]));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let cdx = dir.path().join("wordpress.cdx.json");
    std::fs::write(&cdx, &o.stdout).unwrap();
    assert_cyclonedx_valid(&cdx);
    let cdx: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let listed: std::collections::BTreeSet<(String, String)> = cdx["components"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["type"] == "library")
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_string(),
                c["version"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(listed, installed);
}
