//! The build cache does not trust its blobs: a corrupted cached layer is found before reuse,
//! its entry dropped with a warning, and the step rebuilt to the right digest.

use std::io::{Seek, SeekFrom, Write};
use std::process::Command;

use crate::common::running::Running;
use crate::common::*;

fn build(dir: &std::path::Path, name: &str) -> (serde_json::Value, Vec<serde_json::Value>) {
    let mut c = wpimg();
    c.current_dir(dir)
        .env("SOURCE_DATE_EPOCH", "1700000000")
        .args(["build", "--json", "--var"])
        .arg(format!("name={name}"));
    let (status, events, stderr) = Running::start(&mut c).finish();
    assert!(status.success(), "{events:?}\n{stderr}");
    (events.last().unwrap().clone(), events)
}

fn warnings(events: &[serde_json::Value]) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["event"] == "warning")
        .filter_map(|e| e["message"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn a_corrupted_cached_layer_is_rebuilt_with_a_warning() {
    require_fixtures();
    require("ansible-playbook");
    let name = unique("wpimg-test/corrupt");
    let d = tempfile::tempdir().unwrap();
    write(
        &d.path().join("image.yaml"),
        "name: ${name}\nbase: 127.0.0.1:5000/debian:bookworm\nprovision:\n  playbook: pb.yml\n",
    );
    write(
        &d.path().join("pb.yml"),
        "- hosts: all\n  gather_facts: false\n  tasks:\n    - ansible.builtin.copy: { dest: /opt/f.txt, content: \"content of the layer\\n\", mode: \"0644\" }\n",
    );
    let (first, _) = build(d.path(), &name);
    assert_eq!(first["cache"], "miss");
    let layer = first["layers"].as_array().unwrap().last().unwrap()["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let (second, events) = build(d.path(), &name);
    assert_eq!(second["cache"], "hit");
    assert!(warnings(&events).is_empty(), "{events:?}");

    // Flip bytes in the middle of the cached blob, keeping its size.
    let blob = d
        .path()
        .join(".wpimg/oci/blobs/sha256")
        .join(layer.trim_start_matches("sha256:"));
    let len = std::fs::metadata(&blob).unwrap().len();
    let mut f = std::fs::OpenOptions::new().write(true).open(&blob).unwrap();
    f.seek(SeekFrom::Start(len / 2)).unwrap();
    f.write_all(b"corrupted!").unwrap();
    drop(f);
    assert_eq!(std::fs::metadata(&blob).unwrap().len(), len);

    let (third, events) = build(d.path(), &name);
    let w = warnings(&events);
    assert!(
        w.iter()
            .any(|m| m.contains(&layer) && m.contains("corrupt") && m.contains("rebuilding")),
        "{w:?}"
    );
    assert_eq!(third["cache"], "miss", "the step was not rebuilt");
    let rebuilt = third["layers"].as_array().unwrap().last().unwrap()["digest"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(rebuilt, layer, "SOURCE_DATE_EPOCH: the same layer again");
    assert_eq!(third["manifest"]["digest"], first["manifest"]["digest"]);
    let sum = ok_stdout(Command::new("sha256sum").arg(&blob));
    assert_eq!(
        format!("sha256:{}", sum.split_whitespace().next().unwrap()),
        layer,
        "the blob in the layout is whole again"
    );
    let (fourth, events) = build(d.path(), &name);
    assert_eq!(fourth["cache"], "hit");
    assert!(warnings(&events).is_empty(), "{events:?}");
}
