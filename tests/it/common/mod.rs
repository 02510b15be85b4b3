//! Shared support for integration tests: real components only; a missing one fails the test.
#![allow(dead_code)]

pub mod ecr;
pub mod engine;
pub mod hostile;
pub mod layer;
pub mod registry;
pub mod running;
pub mod webdriver;
pub mod wordpress;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// The fixture registry started by scripts/setup.
pub const FIXTURE_REGISTRY: &str = "127.0.0.1:5000";
/// Debian bookworm minbase with python3, served by the fixture registry.
pub const BASE: &str = "127.0.0.1:5000/debian:bookworm";
/// Debian bookworm minbase without python3.
pub const BASE_NO_PYTHON: &str = "127.0.0.1:5000/debian:bookworm-minbase";

/// Where scripts/setup installs Mitogen for Ansible (`provision.mitogen_path`).
pub const MITOGEN_PATH: &str = "/opt/wpimg-mitogen";

/// Fail (never skip) unless scripts/setup's Mitogen is there.
pub fn require_mitogen() {
    let strategy =
        Path::new(MITOGEN_PATH).join("ansible_mitogen/plugins/strategy/mitogen_linear.py");
    assert!(
        strategy.is_file(),
        "Mitogen is not installed in {MITOGEN_PATH}: run scripts/setup"
    );
}

/// Path of the wpimg binary under test.
pub fn wpimg_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_wpimg"))
}

/// Fail (never skip) when a required program is missing.
pub fn require(program: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{program} is not installed: run scripts/setup (it installs and starts every test component)"
    );
}

/// Fail unless Docker and the fixture registry answer.
pub fn require_fixtures() {
    require("docker");
    let ok = Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "no Docker engine answers: run scripts/setup");
    let ok = std::net::TcpStream::connect(FIXTURE_REGISTRY).is_ok();
    assert!(
        ok,
        "fixture registry {FIXTURE_REGISTRY} is not running: run scripts/setup"
    );
}

/// Run a command and return its output (never panics on non-zero exit).
pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Run a command with `input` on its stdin and return its output.
pub fn run_with_stdin(cmd: &mut Command, input: &[u8]) -> Output {
    use std::io::Write;
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input).unwrap();
    }
    child.wait_with_output().unwrap()
}

/// stdout of a command that must succeed.
pub fn ok_stdout(cmd: &mut Command) -> String {
    let o = run(cmd);
    assert!(
        o.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A `wpimg` command.
pub fn wpimg() -> Command {
    let mut c = Command::new(wpimg_bin());
    c.env_remove("SOURCE_DATE_EPOCH");
    c
}

/// Unique suffix for names in this test run.
pub fn unique(prefix: &str) -> String {
    let n: u32 = rand_u32();
    format!("{prefix}-{}-{n:08x}", std::process::id())
}

fn rand_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish() as u32
}

/// Build containers of wpimg's for an image name (running or not).
pub fn build_containers(image_name: &str) -> Vec<String> {
    let out = ok_stdout(Command::new("docker").args([
        "ps",
        "-a",
        "--filter",
        "label=io.wpimg.build",
        "--filter",
        &format!("label=io.wpimg.image={image_name}"),
        "--format",
        "{{.Names}}",
    ]));
    out.lines()
        .map(str::to_string)
        .filter(|l| !l.is_empty())
        .collect()
}

/// Files left in a layout's ingest directory (temp blobs).
pub fn temp_blobs(oci_dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(oci_dir.join("ingest"))
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default()
}

/// Removes a Docker image (by reference) on drop.
pub struct ImageGuard(pub String);

impl Drop for ImageGuard {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["rmi", "-f", &self.0])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Write a file, creating parent directories.
pub fn write(path: &Path, text: &str) {
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p).unwrap();
    }
    std::fs::write(path, text).unwrap();
}

/// A play whose one task sleeps for five minutes (a build to interrupt or kill mid-provision).
pub const SLOW_PLAY: &str = "- hosts: all\n  gather_facts: false\n  tasks:\n    - name: Sleep long\n      ansible.builtin.command: sleep 300\n      changed_when: false\n";

/// Processes (pid, command line) whose command line mentions `needle`.
pub fn processes_mentioning(needle: &str) -> Vec<(u32, String)> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(raw) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
        if cmdline.contains(needle) {
            found.push((pid, cmdline));
        }
    }
    found
}

/// The parent of a process (None when it is gone or a zombie).
pub fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    fields.next()?.parse().ok()
}
