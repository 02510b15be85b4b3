//! Odd inputs are bad input (exit 2) with the file:line or the flag at fault, found before
//! anything starts: no layout, no container.

use crate::common::*;

const HEAD: &str =
    "name: ${name}\nbase: 127.0.0.1:5000/debian:bookworm\nprovision:\n  playbook: pb.yml\n";

fn project(rest: &str) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    write(
        &d.path().join("pb.yml"),
        "- hosts: all\n  gather_facts: false\n  tasks: []\n",
    );
    write(&d.path().join("image.yaml"), &format!("{HEAD}{rest}"));
    d
}

/// `wpimg ARGS` in the project: exit 2, stderr holding every `want`, nothing started.
fn bad(d: &tempfile::TempDir, name: &str, args: &[&str], want: &[&str]) {
    let o = run(wpimg()
        .current_dir(d.path())
        .args(args)
        .arg("--var")
        .arg(format!("name={name}")));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{args:?}: {stderr}");
    for w in want {
        assert!(stderr.contains(w), "{args:?}: {w:?} not in {stderr}");
    }
    assert!(
        !o.stderr.contains(&0),
        "a raw NUL byte in the message: {stderr:?}"
    );
    assert!(
        !d.path().join(".wpimg").exists(),
        "{args:?}: a build started"
    );
    assert!(build_containers(name).is_empty());
}

#[test]
fn each_odd_input_is_exit_2_at_its_place() {
    let name = unique("wpimg-test/bad");
    let cases: [(&str, &[&str]); 5] = [
        (
            "layer:\n  level: 4294967302\n",
            &["image.yaml:6:10: layer.level: 4294967302 is out of range"],
        ),
        (
            "layer:\n  level: 4294967296\n",
            &["image.yaml:6:10: layer.level: 4294967296 is out of range"],
        ),
        (
            "  env: { \"A=B\": x }\n",
            &[
                "image.yaml:5:",
                "provision.env.A=B: invalid environment variable name",
            ],
        ),
        (
            "  env: { \"A\\0B\": x }\n",
            &[
                "image.yaml:5:",
                "provision.env.\"A\\0B\": invalid environment variable name",
            ],
        ),
        (
            "  extra_vars: { 1: a, \"1\": b }\n",
            &["image.yaml:5:", "provision.extra_vars.1: duplicate key"],
        ),
    ];
    for (rest, want) in cases {
        let d = project(rest);
        bad(&d, &name, &["build"], want);
        bad(&d, &name, &["validate"], want);
    }
}

#[test]
fn an_invalid_tag_is_exit_2_naming_the_flag() {
    require_fixtures();
    let name = unique("wpimg-test/badtag");
    let d = project("");
    for (args, flag) in [
        (
            &[
                "build",
                "--push",
                "--to",
                "127.0.0.1:5000/wpimg-test/x",
                "--tag",
                "bad tag",
            ][..],
            "--tag",
        ),
        (
            &[
                "build",
                "--push",
                "--to",
                "127.0.0.1:5000/wpimg-test/x:bad!tag",
            ][..],
            "--to",
        ),
        (
            &[
                "push",
                "--to",
                "127.0.0.1:5000/wpimg-test/x",
                "--tag",
                "bad tag",
            ][..],
            "--tag",
        ),
    ] {
        bad(&d, &name, args, &[&format!("{flag}: invalid tag")]);
    }
}
