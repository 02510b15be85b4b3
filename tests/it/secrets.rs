//! Build secrets (`secrets:` in image.yaml) end to end: the play gets each as a variable from a
//! private file; a secret used without being written passes and its value is found nowhere
//! (output, process arguments, files under the layout, temp files, the build manifest); written
//! to a file, as base64, as a symlink target, in an xattr or into the config, it fails the build
//! naming the secret and the path, with nothing tagged or cached; its value does not change the
//! cache key; a missing source is bad input.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use crate::common::running::Running;
use crate::common::*;

const WAIT: Duration = Duration::from_secs(300);
const TOKEN_VAR: &str = "WPIMG_TEST_API_TOKEN";

fn token() -> String {
    format!("tok-{}", unique("s3cret").replace('/', "-"))
}

const DEPLOY_KEY: &str =
    "-----BEGIN TEST KEY-----\nd2VsbCBoZWxsbyB0aGVyZQ==\n-----END TEST KEY-----\n";

/// A project whose playbook (`--var playbook=...`) does something with `api_token`.
fn project() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    write(
        &d.path().join("image.yaml"),
        &format!(
            "name: ${{name}}\nbase: 127.0.0.1:5000/debian:bookworm\n\
             secrets:\n  api_token: {{ env: {TOKEN_VAR} }}\n  deploy_key: {{ file: keys/deploy }}\n\
             provision:\n  playbook: ${{playbook:-used.yml}}\n\
             image:\n  labels:\n    note: \"${{config_note:-none}}\"\n"
        ),
    );
    write(&d.path().join("keys/deploy"), DEPLOY_KEY);
    let play = |name: &str, tasks: &str| {
        write(
            &d.path().join(format!("{name}.yml")),
            &format!("- hosts: all\n  gather_facts: false\n  tasks:\n{tasks}"),
        )
    };
    play(
        "used",
        "    - name: Use the secrets\n      ansible.builtin.assert:\n        that: [\"api_token | length > 8\", \"deploy_key is search('BEGIN TEST KEY')\"]\n\
         \x20   - name: Say it\n      ansible.builtin.debug:\n        msg: \"the token is {{ api_token }}\"\n\
         \x20   - name: Hold\n      ansible.builtin.command: sleep 3\n      changed_when: false\n\
         \x20   - name: Leave a harmless file\n      ansible.builtin.copy: { dest: /etc/app.conf, content: \"ok\\n\", mode: \"0644\" }\n",
    );
    play(
        "file",
        "    - ansible.builtin.copy: { dest: /etc/app.conf, content: \"token={{ api_token }}\\n\", mode: \"0600\" }\n",
    );
    play(
        "b64",
        "    - ansible.builtin.copy: { dest: /etc/app.b64, content: \"x{{ api_token | b64encode }}\\n\", mode: \"0600\" }\n",
    );
    play(
        "link",
        "    - ansible.builtin.file: { src: \"/opt/{{ api_token }}\", dest: /etc/app.link, state: link, force: true, follow: false }\n",
    );
    play(
        "xattr",
        "    - ansible.builtin.copy: { dest: /etc/app.x, content: \"x\\n\", mode: \"0644\" }\n\
         \x20   - ansible.builtin.command:\n        argv: [python3, -c, \"import os, sys; os.setxattr('/etc/app.x', 'user.token', sys.argv[1].encode())\", \"{{ api_token }}\"]\n",
    );
    d
}

fn build(dir: &Path, name: &str, token: &str, args: &[&str]) -> Command {
    let mut c = wpimg();
    c.current_dir(dir)
        .env(TOKEN_VAR, token)
        .args(["build", "--json", "--var"])
        .arg(format!("name={name}"))
        .args(args);
    c
}

/// Every regular file below `dir` (not following links).
fn files_below(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                todo.push(e.path());
            } else if ft.is_file() {
                out.push(e.path());
            }
        }
    }
    out
}

/// The files below `dir` holding `needle` (gzip files are also looked into).
fn files_holding(dir: &Path, needle: &str, changed_since: Option<SystemTime>) -> Vec<PathBuf> {
    files_below(dir)
        .into_iter()
        .filter(|p| {
            let Ok(meta) = std::fs::metadata(p) else {
                return false;
            };
            if meta.len() > 256 << 20 {
                return false;
            }
            if let Some(t) = changed_since {
                if meta.modified().map_or(true, |m| m < t) {
                    return false;
                }
            }
            let Ok(bytes) = std::fs::read(p) else {
                return false;
            };
            let mut holds = contains(&bytes, needle.as_bytes());
            if !holds && bytes.starts_with(&[0x1f, 0x8b]) {
                let mut plain = Vec::new();
                use std::io::Read;
                if flate2::read::MultiGzDecoder::new(&bytes[..])
                    .read_to_end(&mut plain)
                    .is_ok()
                {
                    holds = contains(&plain, needle.as_bytes());
                }
            }
            holds
        })
        .collect()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Command lines of the processes naming `needle` (the layout's run directory).
fn command_lines_naming(needle: &str) -> Vec<String> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(needle))
        .collect()
}

#[test]
fn a_secret_used_by_the_play_reaches_it_and_nothing_else() {
    require_fixtures();
    require("ansible-playbook");
    let name = unique("wpimg-test/secret-ok");
    let p = project();
    let tok = token();
    let oci = p.path().join(".wpimg/oci");
    // Outside the project: a file in the playbook's directory is part of the cache key.
    let out = tempfile::tempdir().unwrap();
    let manifest = out.path().join("build-manifest.json");
    let started = SystemTime::now();
    let mut cmd = build(p.path(), &name, &tok, &["--manifest"]);
    let mut running = Running::start(cmd.arg(&manifest));

    // During the play: the values are in a private file of the layout, not in any argument.
    let hold = running.wait_for(WAIT, |e| {
        e["event"] == "output" && e["line"].as_str().unwrap_or("").contains("TASK [Hold]")
    });
    assert!(hold.is_some(), "the play never held: {:?}", running.seen());
    let tmp = std::fs::canonicalize(oci.join("tmp")).unwrap();
    let lines = command_lines_naming(&tmp.to_string_lossy());
    assert!(
        lines
            .iter()
            .any(|l| l.contains("ansible-playbook") && l.contains("secrets.json")),
        "{lines:?}"
    );
    assert!(
        lines.iter().all(|l| !l.contains(&tok)),
        "secret in a command line"
    );
    let secrets_file = std::fs::read_dir(&tmp)
        .unwrap()
        .flatten()
        .map(|e| e.path().join("secrets.json"))
        .find(|p| p.exists())
        .expect("secrets.json in the run directory");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&secrets_file)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let dir_mode = std::fs::metadata(secrets_file.parent().unwrap())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(dir_mode & 0o777, 0o700);

    let (status, events, stderr) = running.finish();
    let stdout = serde_json::to_string(&events).unwrap();
    assert!(status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("the token is <redacted>"),
        "the play's output was not redacted: {stdout}"
    );
    for (what, text) in [("stdout", &stdout), ("stderr", &stderr)] {
        assert!(!text.contains(&tok), "secret in {what}");
        assert!(
            !text.contains("d2VsbCBoZWxsbyB0aGVyZQ"),
            "deploy key in {what}"
        );
    }
    assert!(
        std::fs::read_dir(&tmp).unwrap().next().is_none(),
        "run directory left"
    );
    assert_eq!(files_holding(&oci, &tok, None), Vec::<PathBuf>::new());
    assert_eq!(files_holding(p.path(), &tok, None), Vec::<PathBuf>::new());
    let temp = files_holding(&std::env::temp_dir(), &tok, Some(started));
    assert!(temp.is_empty(), "secret in temp files: {temp:?}");
    let m = std::fs::read_to_string(&manifest).unwrap();
    assert!(!m.contains(&tok) && !m.contains("api_token"), "{m}");

    // validate --json shows where secrets come from, never their values.
    let o = run(wpimg()
        .current_dir(p.path())
        .env(TOKEN_VAR, &tok)
        .args(["validate", "--json", "--var"])
        .arg(format!("name={name}")));
    let v = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{v}");
    assert!(v.contains(TOKEN_VAR) && !v.contains(&tok), "{v}");

    // Another value of the secret: the same cache key, a cache hit.
    let first = events.last().unwrap().clone();
    let other = token();
    let (status, events, stderr) =
        Running::start(&mut build(p.path(), &name, &other, &[])).finish();
    assert!(status.success(), "{stderr}");
    let again = events.last().unwrap();
    assert_eq!(again["cache"], "hit", "{again}");
    assert_eq!(again["cache_key"], first["cache_key"]);
}

#[test]
fn a_secret_written_into_the_image_fails_the_build() {
    require_fixtures();
    require("ansible-playbook");
    let cases: [(&str, &[&str], &str); 5] = [
        ("file", &[], "/etc/app.conf"),
        ("b64", &[], "/etc/app.b64 (base64)"),
        ("link", &[], "/etc/app.link (symlink target)"),
        (
            "xattr",
            &["--layer-path", "upperdir"],
            "/etc/app.x (xattr user.token)",
        ),
        ("config", &[], "the image config (config.Labels.note)"),
    ];
    for (play, extra, location) in cases {
        let name = unique("wpimg-test/secret-leak");
        let p = project();
        let tok = token();
        let mut args = vec!["--var"];
        let pb = format!(
            "playbook={}.yml",
            if play == "config" { "used" } else { play }
        );
        args.push(&pb);
        args.extend_from_slice(extra);
        let mut cmd = build(p.path(), &name, &tok, &args);
        if play == "config" {
            cmd.env("config_note", &tok);
        }
        let (status, events, stderr) = Running::start(&mut cmd).finish();
        let stdout = serde_json::to_string(&events).unwrap();
        let ctx = format!("{play}: {stdout}\n{stderr}");
        assert_eq!(status.code(), Some(1), "{ctx}");
        let want = format!("secret \"api_token\" found in {location}");
        assert!(stderr.contains(&want), "{want:?} not in {ctx}");
        assert!(
            !stdout.contains(&tok) && !stderr.contains(&tok),
            "value shown: {ctx}"
        );
        let oci = p.path().join(".wpimg/oci");
        let index = std::fs::read_to_string(oci.join("index.json")).unwrap_or_default();
        assert!(!index.contains(&name), "tagged: {ctx}");
        let cached = std::fs::read_dir(oci.join("wpimg-cache"))
            .map(|d| {
                d.flatten()
                    .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
                    .count()
            })
            .unwrap_or(0);
        assert_eq!(cached, 0, "cache entry stored: {ctx}");
        assert!(build_containers(&name).is_empty(), "container left: {ctx}");
        assert!(temp_blobs(&oci).is_empty(), "temp blob left: {ctx}");
        assert_eq!(
            files_holding(&oci, &tok, None),
            Vec::<PathBuf>::new(),
            "{ctx}"
        );
    }
}

#[test]
fn missing_secret_sources_and_short_values() {
    require_fixtures();
    let p = project();
    let name = unique("wpimg-test/secret-bad");
    // No environment variable.
    let o = run(wpimg()
        .current_dir(p.path())
        .env_remove(TOKEN_VAR)
        .args(["build", "--var"])
        .arg(format!("name={name}")));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("image.yaml:4:")
            && stderr.contains(&format!("environment variable {TOKEN_VAR} is not set")),
        "{stderr}"
    );
    assert!(!p.path().join(".wpimg").exists(), "a build started");
    // No file.
    std::fs::remove_file(p.path().join("keys/deploy")).unwrap();
    let o = run(wpimg()
        .current_dir(p.path())
        .env(TOKEN_VAR, token())
        .args(["validate"]));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("secrets.deploy_key.file") && stderr.contains("keys/deploy"),
        "{stderr}"
    );

    // A value too short to be scanned for: a warning, and the build goes on.
    write(&p.path().join("keys/deploy"), DEPLOY_KEY);
    let (status, events, stderr) = Running::start(&mut build(
        p.path(),
        &name,
        "short",
        &["--var", "playbook=file.yml"],
    ))
    .finish();
    assert!(status.success(), "{events:?}\n{stderr}");
    assert!(
        events.iter().any(|e| e["event"] == "warning"
            && e["message"]
                .as_str()
                .unwrap_or("")
                .contains("secret \"api_token\" is shorter than 8 bytes")),
        "{events:?}"
    );
}
