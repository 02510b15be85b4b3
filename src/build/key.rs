//! A step's cache key: every input that can change what the step's layer holds, each a name
//! and a value, hashed in order. The parent (the base manifest digest for the first step, the
//! previous step's key after it), wpimg's cache and layer format version, the platform, the
//! step's resolved settings (playbook, extra vars, env, ansible args, connection, pipelining,
//! cache mount paths, the layer's exclude and compression), and the content and mode of the
//! files Ansible can read for the step ([`super::reads`]) and of its `inputs` globs.
//! image.yaml's `image:` section, the OCI layout, `.git`, cache mount contents and files no
//! step reads are never part of a key.
//!
//! Entries remember their inputs with salted digests ([`KeyInputs::salted`]) so a miss can say
//! which input changed without storing any value.

use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::reads::{self, Skip};
use super::step::Step;
use crate::oci::Digest;
use crate::spec::LayerSettings;

/// Version of the key recipe and of wpimg's layer format; bump when either changes (v3: entries
/// keep the outputs of their step, so an older entry, which has none, is never hit).
pub const KEY_VERSION: &str = "wpimg-cache-v3 layer-format-1";

/// One remembered input: its name (`file:roles/app/templates/x.j2`, `var:db_name`, ...) and a
/// salted digest of its value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Input {
    /// What it is.
    pub name: String,
    /// sha256 of the entry's salt, the name and the value.
    pub digest: String,
}

/// The inputs of a step, in key order.
#[derive(Debug, Clone, Default)]
pub struct KeyInputs {
    items: Vec<(String, Vec<u8>)>,
    /// Why the whole playbook directory is part of the key (empty: only what the play reads).
    pub fallback: Vec<String>,
    /// What the play reads from outside the project (not part of the key).
    pub notes: Vec<String>,
}

impl KeyInputs {
    /// Add an input.
    pub fn push(&mut self, name: impl Into<String>, value: impl Into<Vec<u8>>) {
        self.items.push((name.into(), value.into()));
    }

    /// The cache key (hex sha256).
    pub fn key(&self) -> String {
        let mut h = Sha256::new();
        let mut field = |bytes: &[u8]| {
            h.update((bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        };
        field(KEY_VERSION.as_bytes());
        for (name, value) in &self.items {
            field(name.as_bytes());
            field(value);
        }
        hex::encode(h.finalize())
    }

    /// The inputs with their values replaced by sha256(salt, name, value).
    pub fn salted(&self, salt: &str) -> Vec<Input> {
        self.items
            .iter()
            .map(|(name, value)| {
                let mut h = Sha256::new();
                for part in [salt.as_bytes(), name.as_bytes(), value] {
                    h.update((part.len() as u64).to_le_bytes());
                    h.update(part);
                }
                Input {
                    name: name.clone(),
                    digest: hex::encode(h.finalize()),
                }
            })
            .collect()
    }
}

/// Where a step's key comes from besides the step itself.
pub struct KeySource<'a> {
    /// image.yaml's directory: file names in the key are relative to it.
    pub spec_dir: &'a Path,
    /// The base manifest digest.
    pub base: &'a Digest,
    /// The previous step's key (`None` for the first step: its parent is the base).
    pub parent_key: Option<&'a str>,
    /// The platform built.
    pub platform: &'a str,
    /// `layer:` settings (exclude, compression, level).
    pub layer: &'a LayerSettings,
    /// What is never read (the OCI layout).
    pub skip: &'a Skip,
}

/// The inputs of `step`'s key.
pub fn inputs(step: &Step, src: &KeySource<'_>) -> std::io::Result<KeyInputs> {
    let mut k = KeyInputs::default();
    k.push("format", KEY_VERSION);
    k.push("base", src.base.to_string());
    if let Some(parent) = src.parent_key {
        k.push("parent", parent);
    }
    k.push("platform", src.platform);
    settings(step, src, &mut k);
    files(step, src, &mut k)?;
    Ok(k)
}

fn json(v: &impl Serialize) -> Vec<u8> {
    serde_json::to_vec(v).unwrap_or_default()
}

fn settings(step: &Step, src: &KeySource<'_>, k: &mut KeyInputs) {
    k.push("setting:playbook", rel(src.spec_dir, &step.playbook));
    k.push("setting:connection", step.connection.as_str());
    k.push("setting:pipelining", step.pipelining.to_string());
    k.push("setting:accelerator", step.accelerator.as_str());
    k.push("setting:ansible_args", json(&step.ansible_args));
    k.push("setting:cache_mounts", json(&step.cache_mounts));
    k.push("setting:inputs", json(&step.inputs));
    let layer = serde_json::json!({
        "exclude": src.layer.excludes(),
        "compression": src.layer.compression(),
        "level": src.layer.level,
    });
    k.push("setting:layer", json(&layer));
    for (name, value) in &step.extra_vars {
        k.push(format!("var:{name}"), json(value));
    }
    for (name, value) in &step.env {
        k.push(format!("env:{name}"), value.as_str());
    }
}

/// `p` relative to image.yaml's directory (so checkouts in different places share keys).
fn rel(spec_dir: &Path, p: &Path) -> String {
    let clean = |x: &Path| -> PathBuf {
        x.components()
            .filter(|c| !matches!(c, std::path::Component::CurDir))
            .collect()
    };
    let (dir, path) = (clean(spec_dir), clean(p));
    path.strip_prefix(&dir)
        .unwrap_or(&path)
        .to_string_lossy()
        .into_owned()
}

fn files(step: &Step, src: &KeySource<'_>, k: &mut KeyInputs) -> std::io::Result<()> {
    let found = reads::analyse(&step.playbook, src.skip);
    let mut files: BTreeSet<PathBuf> = found.files;
    if !found.fallback.is_empty() {
        if let Some(dir) = step.playbook.parent() {
            src.skip.walk(dir, &mut files);
        }
    }
    k.fallback = found.fallback;
    k.notes = found.notes;
    files.extend(globbed(&step.inputs, src)?);
    files.retain(|p| !src.skip.skips_file(p));
    if let Some(cfg) = ansible_cfg(step) {
        k.push("ansible.cfg", file_value(&cfg)?);
    }
    // Sorted by the name in the key, not the path as found.
    let mut named: Vec<(String, PathBuf)> = files
        .into_iter()
        .map(|p| (rel(src.spec_dir, &p), p))
        .collect();
    named.sort();
    named.dedup_by(|a, b| a.0 == b.0);
    for (name, path) in named {
        k.push(format!("file:{name}"), file_value(&path)?);
    }
    for p in found.absent.iter().filter(|p| !p.exists()) {
        k.push(format!("absent:{}", rel(src.spec_dir, p)), "absent");
    }
    Ok(())
}

/// A file's mode (or symlink target) and content digest.
fn file_value(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::os::unix::fs::PermissionsExt;
    let meta = fs_err::symlink_metadata(path)?;
    if meta.file_type().is_symlink() {
        let target = fs_err::read_link(path)?;
        return Ok(format!("symlink {}", target.display()).into_bytes());
    }
    let mut value = format!("mode {:o} ", meta.permissions().mode() & 0o7777).into_bytes();
    if meta.is_file() {
        let mut f = fs_err::File::open(path)?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        value.extend_from_slice(hex::encode(h.finalize()).as_bytes());
    }
    Ok(value)
}

/// Files matching the step's `inputs` globs (relative to image.yaml).
fn globbed(globs: &[String], src: &KeySource<'_>) -> std::io::Result<BTreeSet<PathBuf>> {
    let mut out = BTreeSet::new();
    for g in globs {
        let matcher = globset::GlobBuilder::new(g)
            .literal_separator(true)
            .build()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?
            .compile_matcher();
        // Walk from the glob's literal directory prefix only.
        let prefix: PathBuf = g
            .split('/')
            .take_while(|part| !part.contains(['*', '?', '[', '{']))
            .collect();
        let start = src.spec_dir.join(&prefix);
        let mut candidates = BTreeSet::new();
        if start.is_file() {
            candidates.insert(start);
        } else {
            src.skip.walk(&start, &mut candidates);
        }
        out.extend(
            candidates
                .into_iter()
                .filter(|p| matcher.is_match(rel(src.spec_dir, p))),
        );
    }
    Ok(out)
}

/// The configuration file ansible-playbook reads: `ANSIBLE_CONFIG` (the step's env first),
/// `./ansible.cfg`, `~/.ansible.cfg`, `/etc/ansible/ansible.cfg`, the first that exists.
fn ansible_cfg(step: &Step) -> Option<PathBuf> {
    let from_env = step
        .env
        .get("ANSIBLE_CONFIG")
        .cloned()
        .or_else(|| std::env::var("ANSIBLE_CONFIG").ok())
        .map(PathBuf::from);
    let home = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".ansible.cfg"));
    from_env
        .into_iter()
        .chain([PathBuf::from("ansible.cfg")])
        .chain(home)
        .chain([PathBuf::from("/etc/ansible/ansible.cfg")])
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_names_do_not_depend_on_the_checkout() {
        assert_eq!(
            rel(Path::new("/a/b"), Path::new("/a/b/pb/x.yml")),
            "pb/x.yml"
        );
        assert_eq!(rel(Path::new("."), Path::new("./pb/x.yml")), "pb/x.yml");
        assert_eq!(rel(Path::new("."), Path::new("pb/x.yml")), "pb/x.yml");
        assert_eq!(rel(Path::new("/a/b"), Path::new("/c/x.yml")), "/c/x.yml");
    }

    #[test]
    fn salted_digests_hide_values_and_differ_by_salt() {
        let mut k = KeyInputs::default();
        k.push("var:password", "hunter2");
        let a = k.salted("s1");
        assert_eq!(a[0].name, "var:password");
        assert!(!a[0].digest.contains("hunter2"));
        assert_ne!(a, k.salted("s2"));
        assert_eq!(a, k.salted("s1"));
    }
}
