//! `wpimg cache prune`: the layout's stale cache entries (every entry that is not the newest of
//! its step, or every entry with `all`) and the layer blobs only they used; the engine's cache
//! volumes of the image (or of every image); the step images it keeps for the image, except
//! those of kept entries. Says how much each part freed.

use std::collections::BTreeSet;
use std::path::Path;

use serde::Serialize;

use super::cache::{self, CacheEntry};
use super::mounts::CACHE_MOUNT_LABEL;
use super::step::STEP_IMAGE_LABEL;
use super::{BuildError, IMAGE_LABEL};
use crate::layout::Layout;
use crate::oci::Digest;
use crate::runtime::Engine;

/// What to prune.
#[derive(Debug, Clone)]
pub struct PruneOptions {
    /// The image name (its volumes and step images).
    pub image: String,
    /// Every cache entry, not only stale ones; volumes and step images of every image.
    pub all: bool,
}

/// What was removed.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PruneReport {
    /// Cache entries removed from the layout.
    pub entries_removed: usize,
    /// Cache entries kept (the newest of each step).
    pub entries_kept: usize,
    /// Layer blobs removed from the layout.
    pub blobs_removed: usize,
    /// Bytes freed in the layout.
    pub layout_bytes_freed: u64,
    /// Volumes removed.
    pub volumes_removed: Vec<String>,
    /// Volumes still used by a container (kept).
    pub volumes_in_use: Vec<String>,
    /// Bytes freed by the removed volumes (`null` for a remote engine: not measurable here).
    pub volume_bytes_freed: Option<u64>,
    /// Step images removed from the engine.
    pub images_removed: usize,
    /// Uncompressed bytes of the step layers those images held alone (an estimate).
    pub image_bytes_freed: u64,
    /// Everything freed that could be measured.
    pub bytes_freed: u64,
}

/// Prune the layout's cache and the engine's cache volumes and step images.
pub async fn prune(
    layout: &Layout,
    engine: &dyn Engine,
    local_engine: bool,
    opts: &PruneOptions,
) -> Result<PruneReport, BuildError> {
    let mut report = PruneReport::default();
    let kept = prune_layout(layout, opts, &mut report)?;
    prune_volumes(engine, local_engine, opts, &mut report).await?;
    prune_images(engine, opts, &kept, &mut report).await?;
    report.bytes_freed = report.layout_bytes_freed
        + report.volume_bytes_freed.unwrap_or(0)
        + report.image_bytes_freed;
    Ok(report)
}

/// Remove stale entries and the blobs only they used; returns the kept entries.
fn prune_layout(
    layout: &Layout,
    opts: &PruneOptions,
    report: &mut PruneReport,
) -> Result<Vec<CacheEntry>, BuildError> {
    let newest = cache::newest_keys(layout);
    let (kept, removed): (Vec<CacheEntry>, Vec<CacheEntry>) = cache::entries(layout)
        .into_iter()
        .partition(|e| !opts.all && newest.contains(&e.key) && layout.has_blob(&e.layer.digest));
    let mut in_use: BTreeSet<Digest> = kept.iter().map(|e| e.layer.digest.clone()).collect();
    in_use.extend(referenced_blobs(layout)?);
    let mut doomed: BTreeSet<Digest> = BTreeSet::new();
    for e in &removed {
        cache::remove_entry(layout, &e.key)?;
        if !in_use.contains(&e.layer.digest) && layout.has_blob(&e.layer.digest) {
            doomed.insert(e.layer.digest.clone());
        }
    }
    if opts.all {
        let _ = std::fs::remove_dir_all(cache::cache_dir(layout).join("newest"));
    }
    for d in doomed {
        let path = layout.blob_path(&d);
        let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        fs_err::remove_file(&path)?;
        report.blobs_removed += 1;
        report.layout_bytes_freed += size;
    }
    // Spool files of builds that were killed.
    for f in std::fs::read_dir(layout.dir().join("ingest"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = f.file_name().to_string_lossy().into_owned();
        if name.starts_with("wpimg-spool-") && stale_file(&f.path()) {
            report.layout_bytes_freed += f.metadata().map(|m| m.len()).unwrap_or(0);
            let _ = std::fs::remove_file(f.path());
        }
    }
    report.entries_removed = removed.len();
    report.entries_kept = kept.len();
    Ok(kept)
}

/// A temp file no running build writes any more (untouched for an hour).
fn stale_file(p: &Path) -> bool {
    std::fs::metadata(p)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age.as_secs() > 3600)
}

/// Every blob the layout's images and attachments use (index.json, recursively).
fn referenced_blobs(layout: &Layout) -> Result<BTreeSet<Digest>, BuildError> {
    let mut out = BTreeSet::new();
    let index = layout.index()?;
    let mut todo: Vec<crate::oci::Descriptor> = index.manifests.clone();
    while let Some(d) = todo.pop() {
        if !out.insert(d.digest.clone()) || !layout.has_blob(&d.digest) {
            continue;
        }
        let Ok(bytes) = layout.read_blob(&d.digest) else {
            continue;
        };
        let Ok(doc) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
            continue;
        };
        for key in ["manifests", "layers"] {
            for item in doc[key].as_array().into_iter().flatten() {
                if let Ok(child) = serde_json::from_value(item.clone()) {
                    todo.push(child);
                }
            }
        }
        for key in ["config", "subject"] {
            if let Ok(child) = serde_json::from_value(doc[key].clone()) {
                todo.push(child);
            }
        }
    }
    Ok(out)
}

async fn prune_volumes(
    engine: &dyn Engine,
    local_engine: bool,
    opts: &PruneOptions,
    report: &mut PruneReport,
) -> Result<(), BuildError> {
    let mut freed = local_engine.then_some(0u64);
    for v in engine.volumes_with_label(CACHE_MOUNT_LABEL).await? {
        if !opts.all && v.labels.get(IMAGE_LABEL) != Some(&opts.image) {
            continue;
        }
        let size = match local_engine {
            true => dir_size(Path::new(&v.mountpoint)),
            false => 0,
        };
        if engine.remove_volume(&v.name).await? {
            freed = freed.map(|f| f + size);
            report.volumes_removed.push(v.name);
        } else {
            report.volumes_in_use.push(v.name);
        }
    }
    report.volume_bytes_freed = freed;
    Ok(())
}

fn dir_size(p: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(p) else {
        return 0;
    };
    rd.flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_size(&e.path()),
            Ok(_) => e.metadata().map(|m| m.len()).unwrap_or(0),
            Err(_) => 0,
        })
        .sum()
}

async fn prune_images(
    engine: &dyn Engine,
    opts: &PruneOptions,
    kept: &[CacheEntry],
    report: &mut PruneReport,
) -> Result<(), BuildError> {
    let keep: BTreeSet<&str> = kept.iter().map(|e| e.key.as_str()).collect();
    for img in engine.labelled_images(STEP_IMAGE_LABEL).await? {
        let key = img
            .labels
            .get(STEP_IMAGE_LABEL)
            .map(String::as_str)
            .unwrap_or("");
        let mine = img.labels.get(IMAGE_LABEL) == Some(&opts.image);
        if (!opts.all && !mine) || keep.contains(key) {
            continue;
        }
        // An image a running container uses stays (the engine refuses to remove it).
        if engine.remove_image(&img.id).await.is_err() {
            continue;
        }
        report.images_removed += 1;
        report.image_bytes_freed += img
            .labels
            .get(super::step::STEP_SIZE_LABEL)
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0);
    }
    Ok(())
}
