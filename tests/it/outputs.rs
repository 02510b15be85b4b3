//! Provisioning outputs (issue 16) end to end, with real Docker and ansible-playbook: a play's
//! `set_stats` in a label, an env value and a tag; the same outputs (and digest) from a cache
//! hit, local or from `--cache-repo`; a reference to an output no step reported (exit 2,
//! nothing tagged); `wpimg validate`; `wpimg push` of the resolved tag to a private registry;
//! the same under Mitogen, and an output holding a build secret refused.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::{json, Value};

use crate::common::registry::Registry;
use crate::common::*;

/// Step `one` reports `app_version` and `flavour` run-wide and `host_only` per host; step `two`
/// reports `app_version` again (it wins) and, with `leak=yes`, the build secret.
const STEP_ONE: &str = r#"- hosts: all
  gather_facts: false
  tasks:
    - ansible.builtin.set_stats:
        data: { app_version: "1.0", flavour: "{{ 'pl' + 'ain' }}", count: 3 }
        per_host: false
    - ansible.builtin.set_stats:
        data: { host_only: "h" }
        per_host: true
"#;

const STEP_TWO: &str = r#"- hosts: all
  gather_facts: false
  tasks:
    - ansible.builtin.raw: mkdir -p /opt/out && echo "{{ version }}" > /opt/out/version
    - ansible.builtin.set_stats:
        data: { app_version: "{{ version }}" }
        per_host: false
    - ansible.builtin.set_stats:
        data: { leaked: "{{ token }}" }
        per_host: false
      when: leak | default('no') == 'yes'
"#;

/// A two-step project using outputs in a label, an env value and a tag (plus `extra` image.yaml
/// lines under `image.labels`).
fn project(dir: &Path, repo: &str, provision_extra: &str, extra_label: &str) {
    write(&dir.join("one.yml"), STEP_ONE);
    write(&dir.join("two.yml"), STEP_TWO);
    write(
        &dir.join("image.yaml"),
        &format!(
            r#"name: ${{name}}
base: {BASE}
secrets:
  token: {{ env: WPIMG_OUTPUTS_TEST_TOKEN }}
provision:
{provision_extra}  steps:
    - name: one
      playbook: one.yml
    - name: two
      playbook: two.yml
      extra_vars: {{ version: "2.0", leak: "${{leak:-no}}" }}
image:
  labels:
    org.opencontainers.image.version: ${{outputs.app_version}}
    fallback: ${{outputs.nope:-none}}
{extra_label}  env:
    APP_VERSION: v${{outputs.app_version}}
    FLAVOUR: ${{outputs.flavour}}-${{outputs.count}}
target:
  repository: {repo}
  tags: [latest, "${{outputs.app_version}}"]
"#
        ),
    );
}

const TOKEN: &str = "tok-0utputs-Secret-value";

fn wpimg_in(dir: &Path, oci: &Path, name: &str) -> Command {
    let mut c = wpimg();
    c.current_dir(dir)
        .env("WPIMG_OUTPUTS_TEST_TOKEN", TOKEN)
        .arg("--oci-dir")
        .arg(oci)
        .args(["--var", &format!("name={name}")]);
    c
}

fn result(o: &Output) -> Value {
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .rfind(|e| e["event"] == "result")
        .unwrap_or_else(|| panic!("no result: {}", String::from_utf8_lossy(&o.stderr)))
}

fn build_ok(dir: &Path, oci: &Path, name: &str, args: &[&str]) -> Value {
    build_out(dir, oci, name, args).0
}

/// A build that must succeed: its result and its JSON lines.
fn build_out(dir: &Path, oci: &Path, name: &str, args: &[&str]) -> (Value, String) {
    let o = run(wpimg_in(dir, oci, name)
        .args(["build", "--json"])
        .args(args));
    assert!(
        o.status.success(),
        "build failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    (result(&o), String::from_utf8_lossy(&o.stdout).into_owned())
}

/// The config of `NAME:latest` in the layout.
fn config(dir: &Path, oci: &Path, name: &str) -> Value {
    let o = run(wpimg_in(dir, oci, name).args(["inspect", "--json", &format!("{name}:latest")]));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    result(&o)["config"]["config"].clone()
}

/// Whether the layout's index names `NAME:TAG`.
fn tagged(oci: &Path, reference: &str) -> bool {
    let index = std::fs::read_to_string(oci.join("index.json")).unwrap_or_default();
    index.contains(&format!("\"{reference}\""))
}

/// Removes the step images and containers an image's build keeps in the engine.
struct Cleanup(String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let label = format!("label=io.wpimg.image={}", self.0);
        for (list, rm) in [
            (vec!["ps", "-aq", "--filter", &label], vec!["rm", "-f"]),
            (vec!["images", "-q", "--filter", &label], vec!["rmi", "-f"]),
        ] {
            let Ok(o) = Command::new("docker").args(&list).output() else {
                continue;
            };
            let ids: Vec<String> = String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(str::to_string)
                .collect();
            if !ids.is_empty() {
                let _ = Command::new("docker").args(&rm).args(&ids).output();
            }
        }
    }
}

#[test]
fn outputs_resolve_labels_env_and_tags_survive_the_cache_and_push() {
    require_fixtures();
    require("ansible-playbook");
    require("skopeo");
    let reg = Registry::start();
    let name = unique("wpimg-test/outputs");
    let _cleanup = Cleanup(name.clone());
    let repo = format!("{}/wpimg/outputs", reg.host());
    let p = tempfile::tempdir().unwrap();
    let oci = p.path().join("oci");
    project(p.path(), &repo, "", "");

    // validate accepts the syntax without running anything, and shows it unresolved.
    let o = run(wpimg_in(p.path(), &oci, &name).args(["validate", "--json"]));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let spec = &result(&o)["spec"];
    assert_eq!(
        spec["image"]["labels"]["org.opencontainers.image.version"],
        "${outputs.app_version}"
    );
    assert_eq!(spec["target"]["tags"][1], "${outputs.app_version}");
    assert!(!oci.exists(), "validate made a layout");

    let cache_repo = format!("{}/wpimg/outputs-cache", reg.host());
    let first = build_ok(p.path(), &oci, &name, &["--cache-repo", &cache_repo]);
    let want = json!({"app_version": "2.0", "count": "3", "flavour": "plain", "host_only": "h"});
    assert_eq!(first["outputs"], want, "{first}");
    let c = config(p.path(), &oci, &name);
    assert_eq!(c["Labels"]["org.opencontainers.image.version"], "2.0");
    assert_eq!(c["Labels"]["fallback"], "none");
    let env: Vec<&str> = c["Env"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(env.contains(&"APP_VERSION=v2.0"), "{env:?}");
    assert!(env.contains(&"FLAVOUR=plain-3"), "{env:?}");

    // A rebuild hits the cache of both steps: the same outputs, the same image.
    let again = build_ok(p.path(), &oci, &name, &[]);
    assert_eq!(again["cache"], "hit", "{again}");
    assert_eq!(again["outputs"], want);
    assert_eq!(again["manifest"]["digest"], first["manifest"]["digest"]);

    // Another layout finds both steps in the cache repository, with their outputs.
    let elsewhere = p.path().join("oci-elsewhere");
    let shared = build_ok(p.path(), &elsewhere, &name, &["--cache-repo", &cache_repo]);
    assert_eq!(shared["cache"], "hit", "{shared}");
    assert_eq!(shared["outputs"], want);
    assert_eq!(shared["manifest"]["digest"], first["manifest"]["digest"]);

    // The manifest file has them too.
    let manifest = p.path().join("build-manifest.json");
    let m = build_ok(
        p.path(),
        &oci,
        &name,
        &["--manifest", manifest.to_str().unwrap()],
    );
    assert_eq!(m["cache"], "hit");
    let doc: Value = serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
    assert_eq!(doc["outputs"], want);

    // wpimg push resolves the version tag from the outputs stored with the image.
    let o = run(wpimg_in(p.path(), &oci, &name).args(["push", "--json"]));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let pushed = result(&o);
    assert_eq!(pushed["tags"], json!(["latest", "2.0"]), "{pushed}");
    let digest = ok_stdout(Command::new("skopeo").args([
        "inspect",
        "--tls-verify=false",
        "--format",
        "{{.Digest}}",
        &format!("docker://{repo}:2.0"),
    ]));
    assert_eq!(digest.trim(), first["manifest"]["digest"].as_str().unwrap());

    // Without its stored outputs, the image cannot be pushed with that tag.
    let stored = oci.join("wpimg-outputs");
    std::fs::remove_dir_all(&stored).unwrap();
    let o = run(wpimg_in(p.path(), &oci, &name).args(["push"]));
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("target.tags[1]: ${outputs.app_version}") && err.contains("no stored output"),
        "{err}"
    );

    // A reference to an output no step reported: exit 2 naming it and what was reported, no tag.
    let other = unique("wpimg-test/outputs-missing");
    let _cleanup_other = Cleanup(other.clone());
    project(p.path(), &repo, "", "    broken: ${outputs.not_reported}\n");
    let o = run(wpimg_in(p.path(), &oci, &other).args(["build"]));
    assert_eq!(
        o.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let err = String::from_utf8_lossy(&o.stderr);
    for want in [
        "image.labels.broken",
        "${outputs.not_reported}",
        "reported: app_version, count, flavour, host_only",
    ] {
        assert!(err.contains(want), "{want:?} not in {err}");
    }
    assert!(!tagged(&oci, &format!("{other}:latest")), "a tag was left");
}

#[test]
fn outputs_under_mitogen_and_a_secret_output_is_refused() {
    require_fixtures();
    require("ansible-playbook");
    require_mitogen();
    let name = unique("wpimg-test/outputs-mitogen");
    let _cleanup = Cleanup(name.clone());
    let p = tempfile::tempdir().unwrap();
    let oci = p.path().join("oci");
    let accel = format!("  accelerator: mitogen\n  mitogen_path: {MITOGEN_PATH}\n");
    project(p.path(), "127.0.0.1:5000/wpimg-test/outputs", &accel, "");

    let (built, lines) = build_out(p.path(), &oci, &name, &[]);
    assert!(lines.contains("accelerator: Mitogen "), "not under Mitogen");
    assert_eq!(built["outputs"]["app_version"], "2.0", "{built}");
    assert_eq!(built["outputs"]["host_only"], "h");
    let c = config(p.path(), &oci, &name);
    assert_eq!(c["Labels"]["org.opencontainers.image.version"], "2.0");

    // An output holding the build secret fails the build, naming it, never the value.
    let o = run(wpimg_in(p.path(), &oci, &name).args(["--var", "leak=yes", "build"]));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("output \"leaked\" holds the value of build secret \"token\""),
        "{err}"
    );
    assert!(!err.contains(TOKEN), "the secret is in the error: {err}");
    assert!(!String::from_utf8_lossy(&o.stdout).contains(TOKEN));
}
