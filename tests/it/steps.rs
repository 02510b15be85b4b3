//! Provisioning steps end to end (real Docker, real ansible-playbook): one layer and an exact
//! cache entry per step, misses that say why, failed steps never stored, cache mounts (kept
//! between builds, in no layer, locked between concurrent builds), `wpimg cache prune`, and
//! `layer.squash` (the same filesystem, read by Docker, umoci and skopeo).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::common::*;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/steps")
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), &dest).unwrap();
        }
    }
}

/// A copy of the two-step fixture.
fn project() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    copy_dir(&fixture(), d.path());
    d
}

/// Removes an image's cache volumes, step images and containers on drop.
struct Cleanup(String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let label = format!("label=io.wpimg.image={}", self.0);
        for (list, rm) in [
            (vec!["ps", "-aq", "--filter", &label], vec!["rm", "-f"]),
            (vec!["images", "-q", "--filter", &label], vec!["rmi", "-f"]),
            (
                vec!["volume", "ls", "-q", "--filter", &label],
                vec!["volume", "rm", "-f"],
            ),
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
        let _ = Command::new("docker")
            .args(["rmi", "-f", &format!("{}:latest", self.0)])
            .output();
    }
}

struct Built {
    events: Vec<serde_json::Value>,
    result: serde_json::Value,
}

impl Built {
    fn steps(&self) -> Vec<(String, String)> {
        self.result["steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s["name"].as_str().unwrap().to_string(),
                    s["cache"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    }

    fn caches(&self) -> Vec<String> {
        self.steps().into_iter().map(|(_, c)| c).collect()
    }

    fn digest(&self) -> String {
        self.result["manifest"]["digest"]
            .as_str()
            .unwrap()
            .to_string()
    }

    fn reasons(&self, step: &str) -> Vec<String> {
        self.events
            .iter()
            .filter(|e| e["event"] == "cache_miss" && e["step"] == step)
            .flat_map(|e| e["reasons"].as_array().unwrap().clone())
            .map(|r| r.as_str().unwrap().to_string())
            .collect()
    }
}

fn wpimg_build(dir: &Path, name: &str, args: &[&str]) -> Output {
    run(wpimg()
        .current_dir(dir)
        .args(["build", "--json", "--var"])
        .arg(format!("name={name}"))
        .args(args))
}

fn build(dir: &Path, name: &str, args: &[&str]) -> Built {
    let o = wpimg_build(dir, name, args);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "build {args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let events: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect();
    let result = events.last().unwrap().clone();
    assert_eq!(result["event"], "result");
    Built { events, result }
}

fn edit(p: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(p).unwrap();
    assert!(text.contains(from), "{} lacks {from:?}", p.display());
    std::fs::write(p, text.replace(from, to)).unwrap();
}

fn sh_in(image: &str, script: &str) -> String {
    ok_stdout(Command::new("docker").args([
        "run",
        "--rm",
        "--user",
        "0",
        "--entrypoint",
        "/bin/sh",
        image,
        "-c",
        script,
    ]))
}

#[test]
fn each_step_has_its_layer_and_an_exact_cache_entry() {
    require_fixtures();
    require("ansible-playbook");
    let name = unique("wpimg-test/steps");
    let _c = Cleanup(name.clone());
    let p = project();
    let dir = p.path();

    let first = build(dir, &name, &["--load"]);
    assert_eq!(first.caches(), ["miss", "miss"]);
    assert_eq!(first.result["cache"], "miss");
    assert_eq!(
        first.reasons("one"),
        ["no earlier build of this step"],
        "{:?}",
        first.events
    );
    let layers = first.result["layers"].as_array().unwrap();
    let new: Vec<_> = layers.iter().filter(|l| l["new"] == true).collect();
    assert_eq!(new.len(), 2, "one layer per step: {layers:?}");
    for (i, s) in first.result["steps"].as_array().unwrap().iter().enumerate() {
        assert_eq!(s["layer"], new[i]["digest"], "step {i}'s layer");
        assert!(s["seconds"].as_f64().unwrap() > 0.0);
    }
    assert!(build_containers(&name).is_empty(), "build container left");
    assert!(
        temp_blobs(&dir.join(".wpimg/oci")).is_empty(),
        "temp files left"
    );

    // What a container of the result sees: each step's changes, the later one winning.
    let out = sh_in(
        &format!("{name}:latest"),
        "cat /opt/steps/one.txt /opt/steps/one-link.txt /opt/steps/two.txt; ls /opt/steps; ls /opt/steps/dir; test -e /etc/motd || echo motd-gone; ls /etc/skel",
    );
    assert_eq!(
        out,
        "changed\none a\ntwo b\ndir\nmounts\none-link.txt\none.txt\nruns-seen\ntwo.txt\nnew.txt\nmotd-gone\nonly-this\n"
    );
    let history = ok_stdout(Command::new("docker").args([
        "image",
        "history",
        "--no-trunc",
        "--format",
        "{{.CreatedBy}}",
        &format!("{name}:latest"),
    ]));
    assert!(
        history.contains("step one: ansible-playbook one.yml"),
        "{history}"
    );
    assert!(
        history.contains("step two: ansible-playbook two.yml"),
        "{history}"
    );

    // Unchanged: both hit, the same image.
    let again = build(dir, &name, &[]);
    assert_eq!(again.caches(), ["hit", "hit"]);
    assert_eq!(again.result["cache"], "hit");
    assert_eq!(again.digest(), first.digest());

    // The image: section, an unrelated file, a log next to the playbook: both hit.
    edit(
        &dir.join("image.yaml"),
        "/opt/steps/two.txt\"]",
        "/opt/steps/one.txt\"]",
    );
    edit(
        &dir.join("image.yaml"),
        "title: steps",
        "title: steps-renamed",
    );
    std::fs::write(dir.join("playbooks/notes.txt"), "edited\n").unwrap();
    std::fs::write(dir.join("playbooks/build.log"), "a log\n").unwrap();
    let unrelated = build(dir, &name, &[]);
    assert_eq!(unrelated.caches(), ["hit", "hit"]);
    assert_ne!(unrelated.digest(), first.digest(), "the config changed");

    // A template of step two: step two only, and the miss names the file.
    edit(
        &dir.join("playbooks/roles/second/templates/two.j2"),
        "two {{",
        "second {{",
    );
    let tmpl = build(dir, &name, &[]);
    assert_eq!(tmpl.caches(), ["hit", "miss"]);
    assert_eq!(tmpl.result["cache"], "partial");
    assert_eq!(
        tmpl.reasons("two"),
        ["file changed: playbooks/roles/second/templates/two.j2"]
    );
    assert!(tmpl.reasons("one").is_empty());

    // A variable of step two: step two only; its value is never shown.
    let var2 = build(dir, &name, &["--var", "two=secret-value-42"]);
    assert_eq!(var2.caches(), ["hit", "miss"]);
    assert_eq!(var2.reasons("two"), ["variable changed: two_value"]);
    let all_events = serde_json::to_string(&var2.events).unwrap();
    let miss_events: Vec<_> = var2
        .events
        .iter()
        .filter(|e| e["event"] == "cache_miss")
        .collect();
    assert!(
        !serde_json::to_string(&miss_events)
            .unwrap()
            .contains("secret-value-42"),
        "{all_events}"
    );
    let entries = dir.join(".wpimg/oci/wpimg-cache");
    for e in std::fs::read_dir(&entries).unwrap().flatten() {
        if e.path().is_file() {
            let text = std::fs::read_to_string(e.path()).unwrap();
            assert!(!text.contains("secret-value-42"), "{}", e.path().display());
        }
    }

    // A variable of step one: both miss (step two's parent changed).
    let var1 = build(dir, &name, &["--var", "one=z"]);
    assert_eq!(var1.caches(), ["miss", "miss"]);
    assert_eq!(var1.reasons("one"), ["variable changed: one_value"]);
    // (and step two's variable is back to its default)
    assert_eq!(
        var1.reasons("two"),
        ["parent step changed", "variable changed: two_value"]
    );

    // A task file of step one: both miss.
    edit(
        &dir.join("playbooks/roles/first/tasks/files.yml"),
        "echo gone",
        "echo gone-too",
    );
    let task1 = build(dir, &name, &["--var", "one=z"]);
    assert_eq!(task1.caches(), ["miss", "miss"]);
    assert_eq!(
        task1.reasons("one"),
        ["file changed: playbooks/roles/first/tasks/files.yml"]
    );

    // A layout inside the playbook directory is never part of a key.
    let inner = dir.join("playbooks/oci");
    let inner_arg = inner.to_str().unwrap();
    let a = build(dir, &name, &["--oci-dir", inner_arg]);
    let b = build(dir, &name, &["--oci-dir", inner_arg]);
    assert_eq!(b.caches(), ["hit", "hit"], "{:?}", a.caches());
    assert_eq!(a.digest(), b.digest());

    // The build manifest file carries the steps.
    let manifest = dir.join("build-manifest.json");
    let m = build(
        dir,
        &name,
        &["--var", "one=z", "--manifest", manifest.to_str().unwrap()],
    );
    let doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
    assert_eq!(doc["steps"], m.result["steps"]);
    assert_eq!(doc["cache"], "hit");
    assert!(build_containers(&name).is_empty());
}

#[test]
fn a_failing_step_is_never_stored() {
    require_fixtures();
    require("ansible-playbook");
    let name = unique("wpimg-test/stepfail");
    let _c = Cleanup(name.clone());
    let p = project();
    for round in 0..2 {
        let o = wpimg_build(p.path(), &name, &["--var", "fail=true"]);
        let stdout = String::from_utf8_lossy(&o.stdout);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "round {round}: {stderr}");
        assert!(stderr.contains("Fail on request"), "{stderr}");
        // Step two runs (and fails) every time; step one was stored the first time.
        let misses: Vec<&str> = stdout
            .lines()
            .filter(|l| l.contains("\"cache_miss\""))
            .collect();
        let want = if round == 0 { 2 } else { 1 };
        assert_eq!(misses.len(), want, "round {round}: {misses:?}");
        assert!(
            misses.last().unwrap().contains("\"step\":\"two\""),
            "{misses:?}"
        );
        assert!(build_containers(&name).is_empty());
    }
    let ok = build(p.path(), &name, &[]);
    assert_eq!(ok.caches(), ["hit", "miss"]);
}

/// The paths of every layer blob of a layout's image.
fn layer_paths(oci: &Path, reference: &str) -> Vec<String> {
    let layout = wpimg::layout::Layout::open(oci).unwrap();
    let desc = layout.resolve(reference).unwrap();
    let image = layout.image(&desc).unwrap();
    let mut paths = Vec::new();
    for d in image.layer_digests() {
        let mut gz = flate2::read::MultiGzDecoder::new(layout.open_blob(&d).unwrap());
        let mut bytes = Vec::new();
        gz.read_to_end(&mut bytes).unwrap();
        let mut ar = tar::Archive::new(bytes.as_slice());
        for e in ar.entries().unwrap() {
            paths.push(e.unwrap().path().unwrap().display().to_string());
        }
    }
    paths
}

#[test]
fn cache_mounts_persist_stay_out_of_layers_and_are_pruned() {
    require_fixtures();
    require("ansible-playbook");
    let name = unique("wpimg-test/mounts");
    let _c = Cleanup(name.clone());
    let p = project();
    let dir = p.path();
    let reference = format!("{name}:latest");
    let oci = dir.join(".wpimg/oci");

    build(dir, &name, &["--load"]);
    let seen = sh_in(&reference, "cat /opt/steps/runs-seen /opt/steps/mounts");
    assert_eq!(seen, "1\n/var/cache/wpimg-steps\n");
    // --no-cache reruns the steps, with the cache mount as the last build left it (and a new
    // variable leaves the first build's entries stale).
    build(dir, &name, &["--load", "--no-cache", "--var", "one=x"]);
    assert_eq!(sh_in(&reference, "cat /opt/steps/runs-seen"), "2\n");
    let paths = layer_paths(&oci, &reference);
    assert!(
        paths.iter().any(|p| p.starts_with("opt/steps")),
        "{paths:?}"
    );
    assert!(
        !paths.iter().any(|p| p.contains("wpimg-steps")),
        "a cache mount in a layer: {paths:?}"
    );
    let volumes = ok_stdout(Command::new("docker").args([
        "volume",
        "ls",
        "-q",
        "--filter",
        &format!("label=io.wpimg.image={name}"),
    ]));
    assert_eq!(volumes.lines().count(), 1, "{volumes}");
    assert!(volumes.starts_with("wpimg-cache-"), "{volumes}");

    // Prune: the volume, the stale entries (the first build's), what it freed.
    let o = run(wpimg()
        .current_dir(dir)
        .args(["cache", "prune", "--json", "--var"])
        .arg(format!("name={name}")));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().last().unwrap()).unwrap();
    assert_eq!(r["volumes_removed"].as_array().unwrap().len(), 1, "{r}");
    assert_eq!(r["entries_removed"], 2, "{r}");
    assert_eq!(r["entries_kept"], 2, "{r}");
    assert!(r["bytes_freed"].as_u64().unwrap() > 0, "{r}");
    let volumes = ok_stdout(Command::new("docker").args([
        "volume",
        "ls",
        "-q",
        "--filter",
        &format!("label=io.wpimg.image={name}"),
    ]));
    assert!(volumes.trim().is_empty(), "{volumes}");
    // The kept entries still hit; a fresh mount starts empty.
    assert_eq!(
        build(dir, &name, &["--var", "one=x"]).caches(),
        ["hit", "hit"]
    );
    build(dir, &name, &["--load", "--no-cache"]);
    assert_eq!(sh_in(&reference, "cat /opt/steps/runs-seen"), "1\n");
    let o = run(wpimg()
        .current_dir(dir)
        .args(["cache", "prune", "--var"])
        .arg(format!("name={name}")));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(stderr.contains("freed "), "{stderr}");
}

#[test]
fn concurrent_builds_share_a_cache_mount_one_at_a_time() {
    require_fixtures();
    require("ansible-playbook");
    let name = unique("wpimg-test/shared-mount");
    let _c = Cleanup(name.clone());
    let (a, b) = (project(), project());
    let spawn = |dir: &Path| {
        wpimg()
            .current_dir(dir)
            .args(["build", "-v", "--no-cache", "--var", "hold=4", "--var"])
            .arg(format!("name={name}"))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (ca, cb) = (spawn(a.path()), spawn(b.path()));
    let (oa, ob) = (
        ca.wait_with_output().unwrap(),
        cb.wait_with_output().unwrap(),
    );
    for o in [&oa, &ob] {
        assert!(
            o.status.success(),
            "a build failed:\n{}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let waited = [&oa, &ob]
        .iter()
        .any(|o| String::from_utf8_lossy(&o.stderr).contains("waiting for another build"));
    assert!(waited, "the builds did not meet at the lock");
    let volume = wpimg::build::mounts::volume_name(&name, "/var/cache/wpimg-steps");
    let locks = ok_stdout(Command::new("docker").args([
        "ps",
        "-aq",
        "--filter",
        &format!("name={volume}-lock"),
    ]));
    assert!(locks.trim().is_empty(), "lock left behind: {locks}");
    assert!(build_containers(&name).is_empty());
}

/// Every entry of a root filesystem (a directory, or a container's `/`): type, mode, owner, size
/// and link target (directories without size: it depends on the filesystem), and the mtime and
/// content digest of the test files.
const LIST: &str = r#"cd "$ROOT" || exit 1
P='( -path ./proc -o -path ./sys -o -path ./dev -o -path ./etc/hostname -o -path ./etc/hosts -o -path ./etc/resolv.conf -o -path ./.dockerenv )'
find . -mindepth 1 -xdev $P -prune -o -type d -printf '%p d %m %U %G\n' | sort
find . -mindepth 1 -xdev $P -prune -o ! -type d -printf '%p %y %m %U %G %s %l\n' | sort
find ./opt ./etc/skel -type f -printf '%p %T@\n' | sort
find ./opt ./etc/skel ./etc/issue -type f -exec md5sum {} + | sort
"#;

#[test]
fn squash_gives_one_layer_and_the_same_filesystem() {
    require_fixtures();
    require("ansible-playbook");
    require("umoci");
    require("skopeo");
    let flat = unique("wpimg-test/squashed");
    let layered = unique("wpimg-test/layered");
    let _c = (Cleanup(flat.clone()), Cleanup(layered.clone()));
    let p = project();
    let dir = p.path();
    let a = build(dir, &layered, &["--load"]);
    let b = build(dir, &flat, &["--load", "--var", "squash=true"]);
    assert_eq!(b.caches(), ["hit", "hit"], "steps are cached unsquashed");
    assert_eq!(b.result["squashed"], true);
    let new = |r: &Built| {
        r.result["layers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|l| l["new"] == true)
            .count()
    };
    assert_eq!((new(&a), new(&b)), (2, 1));
    let history = ok_stdout(Command::new("docker").args([
        "image",
        "history",
        "--no-trunc",
        "--format",
        "{{.CreatedBy}}|{{.Size}}",
        &format!("{flat}:latest"),
    ]));
    assert!(history.contains("step one:"), "{history}");
    assert!(history.contains("step two:"), "{history}");

    // Docker sees the same files.
    let in_docker = |image: &str| {
        ok_stdout(Command::new("docker").args([
            "run",
            "--rm",
            "--user",
            "0",
            "--entrypoint",
            "/bin/sh",
            "-e",
            "ROOT=/",
            image,
            "-c",
            LIST,
        ]))
    };
    let (la, lb) = (
        in_docker(&format!("{layered}:latest")),
        in_docker(&format!("{flat}:latest")),
    );
    assert!(la.contains("./opt/steps/one-link.txt"), "{la}");
    assert!(
        la == lb,
        "squashed and layered images differ in Docker:\n{}",
        diff(&la, &lb)
    );

    // skopeo copies both; umoci unpacks both to the same tree.
    let work = tempfile::tempdir().unwrap();
    let oci = dir.join(".wpimg/oci");
    let mut trees = Vec::new();
    for (i, image) in [&layered, &flat].into_iter().enumerate() {
        let copy = work.path().join(format!("copy{i}"));
        ok_stdout(Command::new("skopeo").args([
            "copy",
            "--quiet",
            &format!("oci:{}:{image}:latest", oci.display()),
            &format!("oci:{}:img", copy.display()),
        ]));
        let bundle = work.path().join(format!("bundle{i}"));
        ok_stdout(Command::new("umoci").args([
            "unpack",
            "--image",
            &format!("{}:img", copy.display()),
            bundle.to_str().unwrap(),
        ]));
        let rootfs = bundle.join("rootfs");
        trees.push(ok_stdout(
            Command::new("sh").env("ROOT", &rootfs).args(["-c", LIST]),
        ));
    }
    assert!(
        trees[0].contains("./opt/steps/one-link.txt"),
        "{}",
        trees[0]
    );
    assert!(
        trees[0] == trees[1],
        "umoci unpacks different trees:\n{}",
        diff(&trees[0], &trees[1])
    );
}

/// Lines only in `a` (`-`) or only in `b` (`+`).
fn diff(a: &str, b: &str) -> String {
    let (la, lb): (Vec<&str>, Vec<&str>) = (a.lines().collect(), b.lines().collect());
    let mut out = String::new();
    for l in &la {
        if !lb.contains(l) {
            out.push_str(&format!("- {l}\n"));
        }
    }
    for l in &lb {
        if !la.contains(l) {
            out.push_str(&format!("+ {l}\n"));
        }
    }
    out
}

#[test]
fn a_templated_include_makes_the_whole_playbook_directory_count() {
    require_fixtures();
    require("ansible-playbook");
    let name = unique("wpimg-test/fallback");
    let _c = Cleanup(name.clone());
    let p = project();
    let dir = p.path();
    let tasks = dir.join("playbooks/roles/second/tasks");
    std::fs::write(
        tasks.join("extra.yml"),
        "- name: Extra\n  ansible.builtin.debug:\n    msg: extra\n",
    )
    .unwrap();
    let main = std::fs::read_to_string(tasks.join("main.yml")).unwrap();
    std::fs::write(
        tasks.join("main.yml"),
        format!("{main}\n- name: Templated include\n  ansible.builtin.include_tasks: \"{{{{ 'extra' }}}}.yml\"\n"),
    )
    .unwrap();
    let first = build(dir, &name, &["-v"]);
    assert_eq!(first.caches(), ["miss", "miss"]);
    let notes: Vec<&serde_json::Value> = first
        .events
        .iter()
        .filter(|e| {
            e["event"] == "note"
                && e["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("covers the whole playbook directory"))
        })
        .collect();
    assert!(!notes.is_empty(), "no -v note: {:?}", first.events);
    let note = notes[0]["message"].as_str().unwrap();
    assert!(note.starts_with("step two:"), "{note}");
    assert!(note.contains("is templated"), "{note}");
    // Step two now depends on every file of the directory; step one still does not.
    std::fs::write(dir.join("playbooks/notes.txt"), "edited\n").unwrap();
    let edited = build(dir, &name, &[]);
    assert_eq!(edited.caches(), ["hit", "miss"]);
    assert_eq!(edited.reasons("two"), ["file changed: playbooks/notes.txt"]);
}

#[test]
fn the_cache_repository_holds_each_step() {
    require_fixtures();
    require("ansible-playbook");
    let reg = crate::common::registry::Registry::start();
    let repo = format!("{}/wpimg/steps-cache", reg.host());
    let name = unique("wpimg-test/stepsrepo");
    let _c = Cleanup(name.clone());
    let a = project();
    let first = build(a.path(), &name, &["--cache-repo", &repo]);
    assert_eq!(first.caches(), ["miss", "miss"]);
    // Another checkout (empty layout): both steps from the repository, the same image.
    let b = project();
    let second = build(b.path(), &name, &["--cache-repo", &repo]);
    assert_eq!(second.caches(), ["hit", "hit"]);
    assert_eq!(second.digest(), first.digest());
    // An edit of step two there: step one from the repository, step two runs.
    edit(
        &b.path().join("playbooks/roles/second/templates/two.j2"),
        "two {{",
        "2 {{",
    );
    let c = project();
    edit(
        &c.path().join("playbooks/roles/second/templates/two.j2"),
        "two {{",
        "2 {{",
    );
    let third = build(c.path(), &name, &["--cache-repo", &repo]);
    assert_eq!(third.caches(), ["hit", "miss"]);
}
