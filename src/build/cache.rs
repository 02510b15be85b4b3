//! The build cache: a key over every input of a provisioning step, mapping to the layer it
//! produced. Entries live in the local OCI layout (`wpimg-cache/KEY.json` + the layer blob) and,
//! with `--cache-repo`, in a registry repository as one-layer images tagged `wpimg-cache-KEY`
//! ([`Cache`] looks in both and stores in both).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::events::{Event, SharedReporter};
use crate::layout::{write_atomic, Layout};
use crate::oci::{Addendum, Descriptor, Digest, Image, Platform};
use crate::reference::Reference;
use crate::registry::{Client, RegistryError};
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
    field(
        "accelerator",
        spec.provision.accelerator().as_str().as_bytes(),
    );
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

const CACHE_TAG_PREFIX: &str = "wpimg-cache-";
const CACHE_CREATED_LABEL: &str = "io.wpimg.cache.created";
const CACHE_SIZE_LABEL: &str = "io.wpimg.cache.uncompressed-size";

/// The build cache of one build: the layout's entries, and a registry repository's with
/// `--cache-repo`.
pub struct Cache<'a> {
    /// The local layout.
    pub layout: &'a Layout,
    /// The registry client (for the remote cache).
    pub client: &'a Client,
    /// `--cache-repo`.
    pub repository: Option<&'a Reference>,
    /// Progress and warnings.
    pub reporter: &'a SharedReporter,
}

impl Cache<'_> {
    /// The entry for `key`: the layout's, else the cache repository's (stored locally then).
    pub async fn lookup(&self, key: &str, platform: &Platform) -> Option<CacheEntry> {
        if let Some(e) = lookup(self.layout, key) {
            return Some(e);
        }
        let repo = self.repository?;
        match self.lookup_remote(repo, key, platform).await {
            Ok(found) => found,
            Err(e) => {
                self.reporter.event(Event::Warning {
                    message: format!("cache repository {}: {e}", repo.repo_path()),
                });
                None
            }
        }
    }

    /// Whether entries are also pushed to a cache repository.
    pub fn is_shared(&self) -> bool {
        self.repository.is_some()
    }

    /// Store an entry in the layout.
    pub fn store_local(&self, entry: &CacheEntry) -> std::io::Result<()> {
        store(self.layout, entry)
    }

    /// Push an entry to the cache repository (a one-layer image of `platform`); a failure is a
    /// warning, never a failed build.
    pub async fn store_remote(&self, entry: &CacheEntry, platform: &Platform) {
        let Some(repo) = self.repository else { return };
        if let Err(e) = self.push_entry(repo, entry, platform).await {
            self.reporter.event(Event::Warning {
                message: format!(
                    "could not store the layer in cache repository {}: {e:#}",
                    repo.repo_path()
                ),
            });
        }
    }

    async fn lookup_remote(
        &self,
        repo: &Reference,
        key: &str,
        platform: &Platform,
    ) -> Result<Option<CacheEntry>, RegistryError> {
        let Some(r) = cache_ref(repo, key) else {
            return Ok(None);
        };
        if self
            .client
            .manifest_descriptor(&r, self.reporter)
            .await?
            .is_none()
        {
            return Ok(None);
        }
        let pulled = self
            .client
            .pull_image(&r, platform, self.layout, self.reporter)
            .await?;
        let Some(entry) = entry_of(key, &pulled.image) else {
            return Ok(None);
        };
        let _ = store(self.layout, &entry);
        self.reporter.event(Event::Note {
            message: format!("cache hit in {}", repo.repo_path()),
        });
        Ok(Some(entry))
    }

    async fn push_entry(
        &self,
        repo: &Reference,
        entry: &CacheEntry,
        platform: &Platform,
    ) -> Result<(), RegistryError> {
        let Some(r) = cache_ref(repo, &entry.key) else {
            return Ok(());
        };
        let image = cache_image(entry, platform).map_err(|source| RegistryError::Manifest {
            reference: r.to_string(),
            source,
        })?;
        self.layout.write_image(&image)?;
        self.client
            .push_image(self.layout, &image.descriptor, &r, &[], self.reporter)
            .await?;
        Ok(())
    }
}

fn cache_ref(repo: &Reference, key: &str) -> Option<Reference> {
    repo.with_tag(&format!("{CACHE_TAG_PREFIX}{key}")).ok()
}

/// The image a cache entry is shared as: its layer on an empty base, with the entry's creation
/// time and uncompressed size as labels.
fn cache_image(entry: &CacheEntry, platform: &Platform) -> Result<Image, crate::oci::OciError> {
    let layer = Addendum {
        layer: entry.layer.clone(),
        diff_id: entry.diff_id.clone(),
        history: None,
    };
    Image::scratch(platform).append(&[layer], entry.created, |c| {
        c.config.labels = Some(BTreeMap::from([
            (CACHE_CREATED_LABEL.to_string(), entry.created.to_string()),
            (
                CACHE_SIZE_LABEL.to_string(),
                entry.uncompressed_size.to_string(),
            ),
        ]));
    })
}

/// The cache entry a cache image holds.
fn entry_of(key: &str, image: &Image) -> Option<CacheEntry> {
    let labels = image.config.config.labels.as_ref()?;
    Some(CacheEntry {
        key: key.to_string(),
        layer: image.manifest.layers.first()?.clone(),
        diff_id: image.config.rootfs.diff_ids.first()?.clone(),
        uncompressed_size: labels.get(CACHE_SIZE_LABEL)?.parse().ok()?,
        created: labels.get(CACHE_CREATED_LABEL)?.parse().ok()?,
    })
}

fn entry_path(layout: &Layout, key: &str) -> PathBuf {
    layout.dir().join("wpimg-cache").join(format!("{key}.json"))
}

/// Look up a key in the layout; an entry whose layer blob is gone counts as a miss.
pub fn lookup(layout: &Layout, key: &str) -> Option<CacheEntry> {
    let bytes = fs_err::read(entry_path(layout, key)).ok()?;
    let e: CacheEntry = serde_json::from_slice(&bytes).ok()?;
    (e.key == key && layout.has_blob(&e.layer.digest)).then_some(e)
}

/// Store an entry in the layout.
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
    fn the_accelerator_is_in_the_key() {
        let d = setup();
        let mut spec = load(&d.path().join("image.yaml"), &Overrides::default()).unwrap();
        let base = Digest::of_bytes(b"base");
        let oci = d.path().join(".wpimg/oci");
        let plain = key(&spec, &base, "linux/amd64", &oci).unwrap();
        // As `--accelerator mitogen` sets it.
        spec.provision.accelerator = Some(crate::provision::Accelerator::Mitogen);
        assert_ne!(plain, key(&spec, &base, "linux/amd64", &oci).unwrap());
    }

    #[test]
    fn key_does_not_depend_on_the_checkout_location() {
        let a = setup();
        let b = setup();
        let none = Overrides::default();
        assert_eq!(key_of(a.path(), &none), key_of(b.path(), &none));
    }

    #[test]
    fn cache_images_give_back_their_entry() {
        let e = CacheEntry {
            key: "k".into(),
            layer: Descriptor::new(
                crate::oci::MEDIA_TYPE_OCI_LAYER_GZIP,
                Digest::of_bytes(b"l"),
                1,
            ),
            diff_id: Digest::of_bytes(b"d"),
            uncompressed_size: 10,
            created: 1_700_000_000,
        };
        let img = cache_image(&e, &Platform::parse("linux/arm64/v8").unwrap()).unwrap();
        assert_eq!(entry_of("k", &img), Some(e));
        assert_eq!(img.config.variant.as_deref(), Some("v8"));
        assert!(img.config.history.is_empty());
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
