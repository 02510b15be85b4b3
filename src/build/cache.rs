//! The build cache: a step's key ([`super::key`]) maps to the layer the step produced.
//! Entries live in the local OCI layout (`wpimg-cache/KEY.json` + the layer blob, and
//! `wpimg-cache/newest/` naming the newest entry of each image, step and platform) and, with
//! `--cache-repo`, in a registry repository as one-layer images tagged `wpimg-cache-KEY`
//! ([`Cache`] looks in both and stores in both). An entry remembers its inputs (salted
//! digests), so a miss is explained against the newest entry of the same step ([`explain`]).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::key::{Input, KeyInputs};
use super::verify;
use crate::events::{Event, SharedReporter};
use crate::layout::{write_atomic, Layout};
use crate::oci::{Addendum, Descriptor, Digest, Image, Platform};
use crate::reference::Reference;
use crate::registry::{Client, RegistryError};

/// What a cache entry remembers of a step's run.
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
    /// The image name it was built for.
    #[serde(default)]
    pub image: String,
    /// The step's name.
    #[serde(default)]
    pub step: String,
    /// The platform.
    #[serde(default)]
    pub platform: String,
    /// Salt of the input digests.
    #[serde(default)]
    pub salt: String,
    /// The inputs of the key (salted digests, never values).
    #[serde(default)]
    pub inputs: Vec<Input>,
    /// The outputs the step's play reported (`set_stats`): a hit gives them back. An entry
    /// written before outputs existed has none.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub outputs: crate::outputs::Outputs,
}

impl CacheEntry {
    /// A new entry for a layer made from `inputs` (a fresh salt).
    pub fn new(
        key: &str,
        info: &crate::layer::LayerInfo,
        created: i64,
        owner: &EntryOwner<'_>,
        inputs: &KeyInputs,
    ) -> Self {
        let mut e = Self {
            key: key.to_string(),
            layer: info.descriptor(),
            diff_id: info.diff_id.clone(),
            uncompressed_size: info.uncompressed_size,
            created,
            image: String::new(),
            step: String::new(),
            platform: String::new(),
            salt: String::new(),
            inputs: Vec::new(),
            outputs: Default::default(),
        };
        e.remember(owner, inputs);
        e
    }

    /// Record whose entry it is and its inputs (salted with a fresh salt).
    pub fn remember(&mut self, owner: &EntryOwner<'_>, inputs: &KeyInputs) {
        self.image = owner.image.to_string();
        self.step = owner.step.to_string();
        self.platform = owner.platform.to_string();
        self.salt = format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
        self.inputs = inputs.salted(&self.salt);
    }
}

/// Whose entry it is: an image's step on a platform.
#[derive(Debug, Clone, Copy)]
pub struct EntryOwner<'a> {
    /// Image name.
    pub image: &'a str,
    /// Step name.
    pub step: &'a str,
    /// Platform.
    pub platform: &'a str,
}

/// Why a step missed: which inputs differ from the newest entry of the same step (names of
/// files, variables and environment variables, never values).
pub fn explain(newest: Option<&CacheEntry>, key: &str, now: &KeyInputs) -> Vec<String> {
    let Some(old) = newest else {
        return vec!["no earlier build of this step".into()];
    };
    if old.key == key {
        return vec!["its cached layer is no longer in the layout".into()];
    }
    let before: BTreeMap<&str, &str> = old
        .inputs
        .iter()
        .map(|i| (i.name.as_str(), i.digest.as_str()))
        .collect();
    let salted = now.salted(&old.salt);
    let after: BTreeMap<&str, &str> = salted
        .iter()
        .map(|i| (i.name.as_str(), i.digest.as_str()))
        .collect();
    let names: BTreeSet<&str> = before.keys().chain(after.keys()).copied().collect();
    let mut reasons: Vec<(u8, String)> = Vec::new();
    for name in names {
        let (kind, what) = name.split_once(':').unwrap_or((name, ""));
        let change = match (before.get(name), after.get(name)) {
            (Some(a), Some(b)) if a == b => continue,
            (Some(_), Some(_)) => "changed",
            (None, Some(_)) => "added",
            (Some(_), None) => "removed",
            (None, None) => continue,
        };
        let reason = match kind {
            "format" => (0, "wpimg's cache format changed".to_string()),
            "base" => (1, "base changed".to_string()),
            "parent" => (2, "parent step changed".to_string()),
            "platform" => (3, "platform changed".to_string()),
            "setting" => (4, format!("setting {change}: {what}")),
            "var" => (5, format!("variable {change}: {what}")),
            "env" => (6, format!("env {change}: {what}")),
            "ansible.cfg" => (7, format!("file {change}: ansible.cfg")),
            "file" => (7, format!("file {change}: {what}")),
            _ => continue,
        };
        reasons.push(reason);
    }
    // Stable: within a kind, by input name.
    reasons.sort_by_key(|(rank, _)| *rank);
    if reasons.is_empty() {
        return vec!["cache key changed".into()];
    }
    reasons.into_iter().map(|(_, r)| r).collect()
}

const CACHE_TAG_PREFIX: &str = "wpimg-cache-";
const CACHE_CREATED_LABEL: &str = "io.wpimg.cache.created";
const CACHE_SIZE_LABEL: &str = "io.wpimg.cache.uncompressed-size";
/// Label of a cache image: the step's outputs as a JSON object (absent when it had none).
const CACHE_OUTPUTS_LABEL: &str = "io.wpimg.cache.outputs";

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
    /// The entry for `key`: the layout's (its blob verified first), else the cache
    /// repository's (stored locally then).
    pub async fn lookup(&self, key: &str, platform: &Platform) -> Option<CacheEntry> {
        if let Some(e) = lookup(self.layout, key) {
            match verify::verify_cached_blob(self.layout, &e.layer) {
                Ok(()) => return Some(e),
                Err(problem) => self.drop_bad_entry(&e, problem),
            }
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

    /// Drop an entry whose layer blob is bad (the step is rebuilt), with a warning.
    fn drop_bad_entry(&self, e: &CacheEntry, problem: verify::BlobProblem) {
        self.reporter.event(Event::Warning {
            message: format!(
                "cache entry {}: layer {} is corrupt ({problem}): dropped, rebuilding the step",
                &e.key[..12.min(e.key.len())],
                e.layer.digest
            ),
        });
        verify::forget(self.layout, &e.layer.digest);
        let _ = fs_err::remove_file(entry_path(self.layout, &e.key));
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
/// time, uncompressed size and outputs as labels.
fn cache_image(entry: &CacheEntry, platform: &Platform) -> Result<Image, crate::oci::OciError> {
    let layer = Addendum {
        layer: entry.layer.clone(),
        diff_id: entry.diff_id.clone(),
        history: None,
    };
    Image::scratch(platform).append(&[layer], entry.created, |c| {
        let mut labels = BTreeMap::from([
            (CACHE_CREATED_LABEL.to_string(), entry.created.to_string()),
            (
                CACHE_SIZE_LABEL.to_string(),
                entry.uncompressed_size.to_string(),
            ),
        ]);
        if !entry.outputs.is_empty() {
            let json = serde_json::to_string(&entry.outputs).unwrap_or_default();
            labels.insert(CACHE_OUTPUTS_LABEL.to_string(), json);
        }
        c.config.labels = Some(labels);
    })
}

/// The cache entry a cache image holds (without inputs: the caller knows them).
fn entry_of(key: &str, image: &Image) -> Option<CacheEntry> {
    let labels = image.config.config.labels.as_ref()?;
    Some(CacheEntry {
        key: key.to_string(),
        layer: image.manifest.layers.first()?.clone(),
        diff_id: image.config.rootfs.diff_ids.first()?.clone(),
        uncompressed_size: labels.get(CACHE_SIZE_LABEL)?.parse().ok()?,
        created: labels.get(CACHE_CREATED_LABEL)?.parse().ok()?,
        image: String::new(),
        step: String::new(),
        platform: String::new(),
        salt: String::new(),
        inputs: Vec::new(),
        outputs: match labels.get(CACHE_OUTPUTS_LABEL) {
            Some(json) => serde_json::from_str(json).ok()?,
            None => Default::default(),
        },
    })
}

/// The key of a squashed layer: the layers it merges and how it is written.
pub fn squash_key(
    steps: &[super::StepOutcome],
    layer: &crate::spec::LayerSettings,
    source_date_epoch: Option<i64>,
) -> String {
    let mut h = Sha256::new();
    h.update(super::key::KEY_VERSION.as_bytes());
    h.update(b"\0squash");
    for s in steps {
        h.update(b"\0");
        h.update(s.layer.digest.to_string().as_bytes());
    }
    let how = serde_json::json!([layer.compression(), layer.level, source_date_epoch]);
    h.update(how.to_string().as_bytes());
    hex::encode(h.finalize())
}

/// The directory of the layout's cache entries.
pub fn cache_dir(layout: &Layout) -> PathBuf {
    layout.dir().join("wpimg-cache")
}

fn entry_path(layout: &Layout, key: &str) -> PathBuf {
    cache_dir(layout).join(format!("{key}.json"))
}

fn newest_path(layout: &Layout, owner: &EntryOwner<'_>) -> PathBuf {
    let mut h = Sha256::new();
    for part in [owner.image, owner.step, owner.platform] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    cache_dir(layout)
        .join("newest")
        .join(&hex::encode(h.finalize())[..32])
}

/// Read an entry (even if its layer blob is gone).
pub fn read_entry(layout: &Layout, key: &str) -> Option<CacheEntry> {
    let bytes = fs_err::read(entry_path(layout, key)).ok()?;
    serde_json::from_slice::<CacheEntry>(&bytes)
        .ok()
        .filter(|e| e.key == key)
}

/// Look up a key in the layout; an entry whose layer blob is gone counts as a miss.
pub fn lookup(layout: &Layout, key: &str) -> Option<CacheEntry> {
    read_entry(layout, key).filter(|e| layout.has_blob(&e.layer.digest))
}

/// Store an entry in the layout (its blob, just written or verified, is remembered as good).
pub fn store(layout: &Layout, e: &CacheEntry) -> std::io::Result<()> {
    verify::remember(layout, &e.layer.digest);
    let p = entry_path(layout, &e.key);
    if let Some(d) = p.parent() {
        fs_err::create_dir_all(d)?;
    }
    write_atomic(&p, &serde_json::to_vec_pretty(e).unwrap_or_default())
}

/// The newest entry (stored or reused last) of an image's step on a platform.
pub fn newest(layout: &Layout, owner: &EntryOwner<'_>) -> Option<CacheEntry> {
    let key = fs_err::read_to_string(newest_path(layout, owner)).ok()?;
    read_entry(layout, key.trim())
}

/// Make `key` the newest entry of its step.
pub fn set_newest(layout: &Layout, owner: &EntryOwner<'_>, key: &str) -> std::io::Result<()> {
    let p = newest_path(layout, owner);
    if let Some(d) = p.parent() {
        fs_err::create_dir_all(d)?;
    }
    write_atomic(&p, key.as_bytes())
}

/// The keys named newest by any step (what `cache prune` keeps).
pub fn newest_keys(layout: &Layout) -> BTreeSet<String> {
    let dir = cache_dir(layout).join("newest");
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .map(|k| k.trim().to_string())
        .collect()
}

/// Every entry of the layout.
pub fn entries(layout: &Layout) -> Vec<CacheEntry> {
    std::fs::read_dir(cache_dir(layout))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .filter_map(|e| {
            let name = e.path().file_stem()?.to_string_lossy().into_owned();
            read_entry(layout, &name)
        })
        .collect()
}

/// Remove an entry's file (not its blob).
pub fn remove_entry(layout: &Layout, key: &str) -> std::io::Result<()> {
    match std::fs::remove_file(entry_path(layout, key)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(key: &str, layer: Descriptor, inputs: &KeyInputs) -> CacheEntry {
        let info = crate::layer::LayerInfo {
            digest: layer.digest.clone(),
            diff_id: Digest::of_bytes(b"d"),
            size: layer.size,
            uncompressed_size: 10,
            media_type: crate::oci::MEDIA_TYPE_OCI_LAYER_GZIP,
            entries: 1,
        };
        let owner = EntryOwner {
            image: "app",
            step: "os",
            platform: "linux/amd64",
        };
        CacheEntry::new(key, &info, 1_700_000_000, &owner, inputs)
    }

    #[test]
    fn cache_images_give_back_their_entry() {
        let layer = Descriptor::new(
            crate::oci::MEDIA_TYPE_OCI_LAYER_GZIP,
            Digest::of_bytes(b"l"),
            1,
        );
        let mut e = entry("k", layer, &KeyInputs::default());
        e.outputs.insert("wordpress_version".into(), "6.1.9".into());
        let img = cache_image(&e, &Platform::parse("linux/arm64/v8").unwrap()).unwrap();
        let back = entry_of("k", &img).unwrap();
        assert_eq!(back.outputs, e.outputs);
        assert_eq!(
            (back.layer, back.diff_id),
            (e.layer.clone(), e.diff_id.clone())
        );
        assert_eq!((back.uncompressed_size, back.created), (10, 1_700_000_000));
        assert_eq!(img.config.variant.as_deref(), Some("v8"));
        assert!(img.config.history.is_empty());
    }

    #[test]
    fn an_entry_written_before_outputs_has_none() {
        let layer = Descriptor::new(
            crate::oci::MEDIA_TYPE_OCI_LAYER_GZIP,
            Digest::of_bytes(b"l"),
            1,
        );
        let e = entry("k", layer, &KeyInputs::default());
        let json = serde_json::to_string(&e).unwrap();
        assert!(!json.contains("outputs"), "{json}");
        let back: CacheEntry = serde_json::from_str(&json).unwrap();
        assert!(back.outputs.is_empty());
        let mut with = e.clone();
        with.outputs.insert("v".into(), "1".into());
        let back: CacheEntry =
            serde_json::from_str(&serde_json::to_string(&with).unwrap()).unwrap();
        assert_eq!(back, with);
    }

    #[test]
    fn entries_roundtrip_need_their_blob_and_track_the_newest() {
        let d = tempfile::tempdir().unwrap();
        let l = Layout::open_or_create(d.path()).unwrap();
        let (dg, n) = l.write_blob(b"layer").unwrap();
        let e = entry(
            "k",
            Descriptor::new(crate::oci::MEDIA_TYPE_OCI_LAYER_GZIP, dg.clone(), n),
            &KeyInputs::default(),
        );
        store(&l, &e).unwrap();
        let owner = EntryOwner {
            image: "app",
            step: "os",
            platform: "linux/amd64",
        };
        assert_eq!(newest(&l, &owner), None);
        set_newest(&l, &owner, "k").unwrap();
        assert_eq!(newest(&l, &owner), Some(e.clone()));
        assert_eq!(newest_keys(&l), BTreeSet::from(["k".to_string()]));
        assert_eq!(lookup(&l, "k"), Some(e.clone()));
        assert_eq!(entries(&l), vec![e]);
        std::fs::remove_file(l.blob_path(&dg)).unwrap();
        assert_eq!(lookup(&l, "k"), None);
        assert!(read_entry(&l, "k").is_some());
    }

    #[test]
    fn misses_name_what_changed_never_values() {
        let mut before = KeyInputs::default();
        before.push("base", "sha256:b");
        before.push("var:db_password", "secret-one");
        before.push("env:TZ", "UTC");
        before.push("file:roles/app/templates/x.j2", "mode 644 aaa");
        before.push("file:roles/app/tasks/main.yml", "mode 644 bbb");
        let layer = Descriptor::new(
            crate::oci::MEDIA_TYPE_OCI_LAYER_GZIP,
            Digest::of_bytes(b"l"),
            1,
        );
        let old = entry(&before.key(), layer, &before);
        let mut now = KeyInputs::default();
        now.push("base", "sha256:b");
        now.push("var:db_password", "secret-two");
        now.push("env:TZ", "UTC");
        now.push("file:roles/app/templates/x.j2", "mode 644 ccc");
        now.push("file:roles/app/files/new.txt", "mode 644 ddd");
        let reasons = explain(Some(&old), &now.key(), &now);
        assert_eq!(
            reasons,
            [
                "variable changed: db_password",
                "file added: roles/app/files/new.txt",
                "file removed: roles/app/tasks/main.yml",
                "file changed: roles/app/templates/x.j2",
            ]
        );
        let stored = serde_json::to_string(&old).unwrap();
        assert!(
            !stored.contains("secret-one") && !stored.contains("UTC"),
            "{stored}"
        );
        assert_eq!(explain(None, "k", &now), ["no earlier build of this step"]);
        assert_eq!(
            explain(Some(&old), &old.key, &before),
            ["its cached layer is no longer in the layout"]
        );
    }
}
