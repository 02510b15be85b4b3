//! `wpimg build` against a second, private Docker engine reached over TCP: plain, with mutual
//! TLS (DOCKER_TLS_VERIFY + DOCKER_CERT_PATH, like the docker CLI), and a closed port.
//! Also checks what -v adds and that -q keeps quiet.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::engine::{EngineTls, SecondEngine};
use crate::common::registry::skopeo_manifest_digest;
use crate::common::*;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/changes")
}

/// The fixture project (fixtures/changes/image.yaml) without the tasks that need a network:
/// the second engine runs with `--bridge none` so it leaves the host's networking alone.
fn project() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::copy(fixtures().join("image.yaml"), d.path().join("image.yaml")).unwrap();
    let play = std::fs::read_to_string(fixtures().join("changes.yml")).unwrap();
    let from = play
        .find("    - name: Install setcap")
        .expect("fixture changes.yml lost its setcap tasks: update this test");
    let to = play
        .find("    - name: Scratch file in an excluded path")
        .expect("fixture changes.yml lost its scratch task: update this test");
    let play = format!("{}{}", &play[..from], &play[to..]);
    write(&d.path().join("changes.yml"), &play);
    d
}

fn json_lines(stdout: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// What a container of the result sees (no network needed).
fn check_contents(engine: &SecondEngine, image: &str) {
    let out = engine.docker_ok(&["run", "--rm", image]);
    assert_eq!(out.trim(), "added by ansible m1");
    let script = "cat /etc/issue; test -e /etc/motd && echo motd-present || echo motd-gone; \
                  ls -A /etc/skel; stat -c %u:%g:%a /opt/wpimg-test/owned; \
                  readlink /opt/wpimg-test/link.txt; test -e /tmp/excluded.txt || echo tmp-gone";
    let out = engine.docker_ok(&[
        "run",
        "--rm",
        "--user",
        "0",
        "--entrypoint",
        "/bin/sh",
        image,
        "-c",
        script,
    ]);
    for want in [
        "modified by wpimg test",
        "motd-gone",
        "only-this",
        "1234:1234:600",
        "/opt/wpimg-test/added.txt",
        "tmp-gone",
    ] {
        assert!(out.contains(want), "{want:?} missing from {out}");
    }
}

/// Nothing of the build is left: no container on the second engine, none on the main one, no
/// temp blobs.
fn assert_clean(engine: &SecondEngine, name: &str, oci: &Path) {
    assert_eq!(
        engine.containers(),
        Vec::<String>::new(),
        "containers left on the second engine"
    );
    assert!(
        build_containers(name).is_empty(),
        "a build container appeared on the main engine"
    );
    assert!(temp_blobs(oci).is_empty(), "{:?}", temp_blobs(oci));
}

#[test]
fn build_over_plain_tcp() {
    require_fixtures();
    require("ansible-playbook");
    require("skopeo");
    let engine = SecondEngine::start();
    let name = unique("wpimg-test/tcp");
    let p = project();
    let oci = p.path().join(".wpimg/oci");
    let started = Instant::now();
    let o = run(engine
        .env(&mut wpimg())
        .current_dir(p.path())
        .args(["build", "--load", "--json", "--var"])
        .arg(format!("name={name}")));
    let build_secs = started.elapsed().as_secs_f64();
    assert!(
        o.status.success(),
        "build over {} failed:\n{}\n{}\ndockerd log:\n{}",
        engine.host(),
        String::from_utf8_lossy(&o.stdout),
        stderr(&o),
        engine.log()
    );
    let events = json_lines(&o.stdout);
    let result = events.last().unwrap();
    assert_eq!(result["event"], "result");
    assert_eq!(result["reference"], format!("{name}:latest"));
    // A tcp engine's files are not readable here: the layer comes through the Engine API.
    assert_eq!(result["layer_path"], "api", "{result}");
    let digest = result["manifest"]["digest"].as_str().unwrap().to_string();
    assert!(
        events.iter().any(|e| e["event"] == "note"
            && e["message"]
                .as_str()
                .unwrap_or("")
                .starts_with(&format!("engine {}: Docker ", engine.host()))),
        "no engine note"
    );

    // The layout holds it under that digest, as skopeo reads it.
    let oci_ref = format!("oci:{}:{name}:latest", oci.display());
    assert_eq!(
        skopeo_manifest_digest(&oci_ref, &[]).to_string(),
        digest,
        "layout digest"
    );
    // --load put it into the second engine (not the main one), with the right contents.
    let id = engine.docker_ok(&[
        "image",
        "inspect",
        "--format",
        "{{.Id}}",
        &format!("{name}:latest"),
    ]);
    assert_eq!(
        id.trim(),
        result["config_digest"].as_str().unwrap(),
        "loaded image id is the config digest"
    );
    let on_main = Command::new("docker")
        .args(["image", "inspect", &format!("{name}:latest")])
        .output()
        .unwrap();
    assert!(
        !on_main.status.success(),
        "the image reached the main engine"
    );
    check_contents(&engine, &format!("{name}:latest"));
    assert_clean(&engine, &name, &oci);

    // -q: a successful (cached) rebuild prints nothing at all.
    let o = run(engine
        .env(&mut wpimg())
        .current_dir(p.path())
        .args(["build", "-q", "--var"])
        .arg(format!("name={name}")));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        o.stdout.is_empty() && o.stderr.is_empty(),
        "-q printed: {o:?}"
    );
    // ... and `inspect -q` prints just the digest.
    let o = run(wpimg()
        .args(["inspect", "-q", "--oci-dir"])
        .arg(&oci)
        .arg(&name));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), digest);
    assert_clean(&engine, &name, &oci);
    eprintln!("build over plain tcp: {build_secs:.1}s");
}

#[test]
fn build_over_mutual_tls() {
    require_fixtures();
    require("ansible-playbook");
    require("skopeo");
    let certs = tempfile::tempdir().unwrap();
    let tls = EngineTls::create(certs.path());
    let engine = SecondEngine::start_with(Some(&tls));
    let name = unique("wpimg-test/tls");
    let p = project();
    let oci = p.path().join(".wpimg/oci");

    // Without TLS the engine refuses us, quickly, naming the host.
    let o = run(wpimg()
        .current_dir(p.path())
        .env("DOCKER_HOST", engine.host())
        .env_remove("DOCKER_TLS_VERIFY")
        .env_remove("DOCKER_CERT_PATH")
        .args(["build", "--var"])
        .arg(format!("name={name}")));
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains(&engine.host()), "{}", stderr(&o));

    // -v: the engine and TLS directory, the ansible command line (no secrets), stage times.
    let o = run(engine
        .env(&mut wpimg())
        .current_dir(p.path())
        .args(["build", "-v", "--load", "--var"])
        .arg(format!("name={name}")));
    let err = stderr(&o);
    assert!(
        o.status.success(),
        "build over TLS failed:\n{err}\ndockerd log:\n{}",
        engine.log()
    );
    let client_dir = tls.client_dir.display().to_string();
    assert!(
        err.contains(&format!(
            "engine {} (TLS, certificates from {client_dir}): Docker ",
            engine.host()
        )),
        "{err}"
    );
    let ansible = err
        .lines()
        .find(|l| l.contains("ansible-playbook -i "))
        .unwrap_or_else(|| panic!("no ansible command line in -v output:\n{err}"));
    assert!(
        ansible.contains("-e @") && ansible.contains("changes.yml"),
        "{ansible}"
    );
    assert!(!ansible.contains("marker"), "extra vars leaked: {ansible}");
    assert!(err.contains("provision done in"), "{err}");
    assert!(err.contains("built "), "{err}");

    let digest = skopeo_manifest_digest(&format!("oci:{}:{name}:latest", oci.display()), &[]);
    let o = run(wpimg()
        .args(["inspect", "--json", "--oci-dir"])
        .arg(&oci)
        .arg(format!("{name}:latest")));
    assert!(o.status.success(), "{}", stderr(&o));
    let v = json_lines(&o.stdout).pop().unwrap();
    assert_eq!(v["digest"], digest.to_string());
    let id = engine.docker_ok(&[
        "image",
        "inspect",
        "--format",
        "{{.Id}}",
        &format!("{name}:latest"),
    ]);
    assert_eq!(
        id.trim(),
        v["config_descriptor"]["digest"].as_str().unwrap()
    );
    check_contents(&engine, &format!("{name}:latest"));
    assert_clean(&engine, &name, &oci);

    // Under Mitogen (issue 17) the docker CLI drives the build container: DOCKER_HOST and
    // the TLS settings reach it, and the result is the same.
    require_mitogen();
    let y = std::fs::read_to_string(p.path().join("image.yaml"))
        .unwrap()
        .replace(
            "playbook: changes.yml",
            &format!("playbook: changes.yml\n  mitogen_path: {MITOGEN_PATH}"),
        );
    write(&p.path().join("image.yaml"), &y);
    let o = run(engine
        .env(&mut wpimg())
        .current_dir(p.path())
        .args([
            "build",
            "-v",
            "--load",
            "--no-cache",
            "--accelerator",
            "mitogen",
            "--var",
        ])
        .arg(format!("name={name}")));
    let err = stderr(&o);
    assert!(
        o.status.success(),
        "build over TLS under Mitogen failed:\n{err}\ndockerd log:\n{}",
        engine.log()
    );
    assert!(err.contains("accelerator: Mitogen "), "{err}");
    check_contents(&engine, &format!("{name}:latest"));
    assert_clean(&engine, &name, &oci);

    // A client directory without key.pem: the error names the file and the host.
    let partial = certs.path().join("partial");
    std::fs::create_dir_all(&partial).unwrap();
    for f in ["ca.pem", "cert.pem"] {
        std::fs::copy(tls.client_dir.join(f), partial.join(f)).unwrap();
    }
    let o = run(wpimg()
        .current_dir(p.path())
        .env("DOCKER_HOST", engine.host())
        .env("DOCKER_TLS_VERIFY", "1")
        .env("DOCKER_CERT_PATH", &partial)
        .args(["build", "--var"])
        .arg(format!("name={name}")));
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains(&partial.join("key.pem").display().to_string())
            && err.contains(&engine.host()),
        "{err}"
    );

    // A CA that did not sign the engine's certificate: refused, naming host and directory.
    let other = certs.path().join("other-ca");
    std::fs::create_dir_all(&other).unwrap();
    let other_ca = crate::common::registry::TestCa::create(&other);
    let wrong = certs.path().join("wrong");
    std::fs::create_dir_all(&wrong).unwrap();
    std::fs::copy(&other_ca.ca_pem, wrong.join("ca.pem")).unwrap();
    for f in ["cert.pem", "key.pem"] {
        std::fs::copy(tls.client_dir.join(f), wrong.join(f)).unwrap();
    }
    let started = Instant::now();
    let o = run(wpimg()
        .current_dir(p.path())
        .env("DOCKER_HOST", engine.host())
        .env("DOCKER_TLS_VERIFY", "1")
        .env("DOCKER_CERT_PATH", &wrong)
        .args(["build", "--var"])
        .arg(format!("name={name}")));
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains(&format!(
            "no Docker engine answers at {} (TLS, certificates from {})",
            engine.host(),
            wrong.display()
        )),
        "{err}"
    );
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_clean(&engine, &name, &oci);
}

#[test]
fn closed_port_fails_fast_and_names_the_host() {
    require_fixtures();
    let port = crate::common::registry::free_port();
    let host = format!("tcp://127.0.0.1:{port}");
    let name = unique("wpimg-test/closed");
    let p = project();
    let started = Instant::now();
    let o = run(wpimg()
        .current_dir(p.path())
        .env("DOCKER_HOST", &host)
        .env_remove("DOCKER_TLS_VERIFY")
        .env_remove("DOCKER_CERT_PATH")
        .args(["build", "-q", "--var"])
        .arg(format!("name={name}")));
    let secs = started.elapsed().as_secs_f64();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.starts_with(&format!("error: no Docker engine answers at {host}")),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "-q prints only the error: {err}");
    assert!(o.stdout.is_empty());
    assert!(secs < 5.0, "took {secs:.1}s");
    // Nothing left: no layout, no container.
    assert!(!p.path().join(".wpimg").exists(), "a layout was created");
    assert!(build_containers(&name).is_empty());

    // An unsupported scheme is named too.
    let o = run(wpimg()
        .current_dir(p.path())
        .env("DOCKER_HOST", "ssh://builder@example")
        .args(["build", "--var"])
        .arg(format!("name={name}")));
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("DOCKER_HOST=\"ssh://builder@example\": unsupported scheme ssh://"),
        "{}",
        stderr(&o)
    );
}
