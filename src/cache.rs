//! The build cache: a key over every input of the provisioning step, mapping to the layer it
//! produced. Entries live in the local OCI layout (`wpimg-cache/KEY.json` + the layer blob).

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::layout::{write_atomic, Layout};
use crate::oci::{Descriptor, Digest};
use crate::spec::ImageSpec;

/// Version of the cache key recipe; bump when the layer format or key inputs change.
const KEY_VERSION: &str = "wpimg-cache-v1";

/// Directory names never hashed as playbook content (VCS data, wpimg's own output).
const SKIP_DIRS: &[&str] = &[".git", ".wpimg", ".hg", ".svn", "__pycache__"];

/// What a cache entry remembers of a provisioning run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CacheEntry {
    /// The cache key.
    pub key: String,
    /// The layer blob.
    pub layer: Descriptor,
    /// Its uncompressed digest.
    pub diff_id: Digest,
    /// Its uncompressed size.
    pub uncompressed_size: u64,
    /// When the layer was produced (Unix seconds): reused so an unchanged rebuild has the same digest.
    pub created: i64,
}

/// Compute the cache key of a build.
pub fn key(
    spec: &ImageSpec,
    base_digest: &Digest,
    platform: &str,
    oci_dir: &Path,
) -> std::io::Result<String> {
    let mut h = Sha256::new();
    let mut field = |name: &str, bytes: &[u8]| {
        h.update(name.as_bytes());
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    field("version", KEY_VERSION.as_bytes());
    field("wpimg", env!("CARGO_PKG_VERSION").as_bytes());
    field("base", base_digest.to_string().as_bytes());
    field("platform", platform.as_bytes());
    field("image.yaml", spec.source.raw.as_bytes());
    // The resolved spec: variables, extra vars, ansible args and env after interpolation, with
    // paths relative to image.yaml so checkouts in different places share the cache.
    field(
        "spec",
        &serde_json::to_vec(&portable_spec(spec)).unwrap_or_default(),
    );
    let mut files = Vec::new();
    let pb_dir = spec
        .provision
        .playbook
        .parent()
        .unwrap_or(Path::new("."))
        .to_path_buf();
    collect(&pb_dir, &pb_dir, oci_dir, &mut files)?;
    for cfg in [spec.source.dir.join("ansible.cfg")] {
        if cfg.is_file() && !cfg.starts_with(&pb_dir) {
            files.push((PathBuf::from("../ansible.cfg"), cfg));
        }
    }
    if let Some(env_cfg) = std::env::var_os("ANSIBLE_CONFIG") {
        let p = PathBuf::from(env_cfg);
        if p.is_file() {
            files.push((PathBuf::from("$ANSIBLE_CONFIG"), p));
        }
    }
    files.sort();
    for (rel, abs) in files {
        let meta = fs_err::symlink_metadata(&abs)?;
        let kind = if meta.file_type().is_symlink() {
            fs_err::read_link(&abs)?.to_string_lossy().into_owned()
        } else {
            use std::os::unix::fs::PermissionsExt;
            format!("mode {:o}", meta.permissions().mode() & 0o777)
        };
        field("path", rel.to_string_lossy().as_bytes());
        field("kind", kind.as_bytes());
        if meta.is_file() {
            let mut f = fs_err::File::open(&abs)?;
            let mut buf = vec![0u8; 1 << 16];
            let mut fh = Sha256::new();
            loop {
                let n = f.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                fh.update(&buf[..n]);
            }
            field("content", &fh.finalize());
        }
    }
    Ok(hex::encode(h.finalize()))
}

fn portable_spec(spec: &ImageSpec) -> serde_json::Value {
    let mut v = serde_json::to_value(spec).unwrap_or_default();
    let rel = |p: &Path| {
        p.strip_prefix(&spec.source.dir)
            .unwrap_or(p)
            .to_string_lossy()
            .into_owned()
    };
    if let Some(m) = v.as_object_mut() {
        m.remove("source");
    }
    if let Some(p) = v.pointer_mut("/provision/playbook") {
        *p = rel(&spec.provision.playbook).into();
    }
    if let (Some(p), Some(lp)) = (
        v.pointer_mut("/target/ecr/lifecycle_policy"),
        spec.target
            .as_ref()
            .and_then(|t| t.ecr.as_ref())
            .and_then(|e| e.lifecycle_policy.as_ref()),
    ) {
        *p = rel(lp).into();
    }
    v
}

fn collect(
    root: &Path,
    dir: &Path,
    skip: &Path,
    out: &mut Vec<(PathBuf, PathBuf)>,
) -> std::io::Result<()> {
    for e in fs_err::read_dir(dir)? {
        let e = e?;
        let p = e.path();
        let name = e.file_name();
        if p == skip || SKIP_DIRS.iter().any(|s| name == *s) {
            continue;
        }
        let rel = p.strip_prefix(root).unwrap_or(&p).to_path_buf();
        let ft = e.file_type()?;
        if ft.is_dir() {
            collect(root, &p, skip, out)?;
        } else {
            out.push((rel, p));
        }
    }
    Ok(())
}

fn entry_path(layout: &Layout, key: &str) -> PathBuf {
    layout.dir().join("wpimg-cache").join(format!("{key}.json"))
}

/// Look up a key; an entry whose layer blob is gone counts as a miss.
pub fn lookup(layout: &Layout, key: &str) -> Option<CacheEntry> {
    let bytes = fs_err::read(entry_path(layout, key)).ok()?;
    let e: CacheEntry = serde_json::from_slice(&bytes).ok()?;
    (e.key == key && layout.has_blob(&e.layer.digest)).then_some(e)
}

/// Store an entry.
pub fn store(layout: &Layout, e: &CacheEntry) -> std::io::Result<()> {
    let p = entry_path(layout, &e.key);
    if let Some(d) = p.parent() {
        fs_err::create_dir_all(d)?;
    }
    write_atomic(&p, &serde_json::to_vec_pretty(e).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{load, Overrides};

    fn setup() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        let w = |p: &str, t: &str| {
            let p = d.path().join(p);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, t).unwrap();
        };
        w(
            "image.yaml",
            "name: app\nbase: r.example/b:1\nvariables: { v: one }\nprovision:\n  playbook: pb/site.yml\n  extra_vars: { v: \"${v}\" }\n",
        );
        w("pb/site.yml", "- hosts: all\n  roles: [web]\n");
        w("pb/roles/web/templates/conf.j2", "listen 80;\n");
        d
    }

    fn key_of(d: &Path, ov: &Overrides) -> String {
        let spec = load(&d.join("image.yaml"), ov).unwrap();
        let base = Digest::of_bytes(b"base");
        key(&spec, &base, "linux/amd64", &d.join(".wpimg/oci")).unwrap()
    }

    #[test]
    fn any_input_change_misses() {
        let d = setup();
        let none = Overrides::default();
        let k0 = key_of(d.path(), &none);
        assert_eq!(k0, key_of(d.path(), &none), "key must be stable");

        // wpimg's own output does not count.
        std::fs::create_dir_all(d.path().join("pb/.wpimg")).unwrap();
        std::fs::write(d.path().join("pb/.wpimg/x"), "y").unwrap();
        assert_eq!(k0, key_of(d.path(), &none));

        let var = Overrides {
            vars: vec![("v".into(), "two".into())],
            var_files: vec![],
        };
        assert_ne!(k0, key_of(d.path(), &var), "a variable change must miss");

        std::fs::write(
            d.path().join("pb/roles/web/templates/conf.j2"),
            "listen 8080;\n",
        )
        .unwrap();
        let k1 = key_of(d.path(), &none);
        assert_ne!(k0, k1, "a template change must miss");

        std::fs::write(d.path().join("pb/roles/web/vars.yml"), "x: 1\n").unwrap();
        assert_ne!(k1, key_of(d.path(), &none), "a new vars file must miss");
    }

    #[test]
    fn key_does_not_depend_on_the_checkout_location() {
        let a = setup();
        let b = setup();
        let none = Overrides::default();
        assert_eq!(key_of(a.path(), &none), key_of(b.path(), &none));
    }

    #[test]
    fn entries_roundtrip_and_need_their_blob() {
        let d = tempfile::tempdir().unwrap();
        let l = Layout::open_or_create(d.path()).unwrap();
        let (dg, n) = l.write_blob(b"layer").unwrap();
        let e = CacheEntry {
            key: "k".into(),
            layer: Descriptor::new(crate::oci::MEDIA_TYPE_OCI_LAYER_GZIP, dg.clone(), n),
            diff_id: dg.clone(),
            uncompressed_size: n,
            created: 1,
        };
        store(&l, &e).unwrap();
        assert_eq!(lookup(&l, "k"), Some(e));
        std::fs::remove_file(l.blob_path(&dg)).unwrap();
        assert_eq!(lookup(&l, "k"), None);
    }
}
