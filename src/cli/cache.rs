//! `wpimg cache prune`: image.yaml's name and layout → the prune → what it freed.

use std::sync::Arc;

use anyhow::Context;

use super::args::{GlobalArgs, PruneArgs};
use super::output::{engine_note, Output};
use super::settings;
use crate::build::prune::{prune as prune_cache, PruneOptions};
use crate::events::SharedReporter;
use crate::inspect::human_bytes;
use crate::layout::Layout;
use crate::runtime::DockerEngine;

/// Run `wpimg cache prune`.
pub async fn prune(g: &GlobalArgs, p: &PruneArgs, out: &Arc<Output>) -> anyhow::Result<()> {
    let rep: SharedReporter = out.clone();
    let spec = settings::load_spec(g, &p.image_yaml)?;
    let oci_dir = settings::oci_dir(g, &p.image_yaml);
    let engine = DockerEngine::connect().await?;
    engine_note(&engine, &rep).await;
    let local = engine.host().starts_with("unix://");
    // No layout yet: nothing to prune there (and none is created).
    let empty = tempfile::tempdir()?;
    let layout = match oci_dir.join("oci-layout").is_file() {
        true => Layout::open(&oci_dir)?,
        false => Layout::open_or_create(empty.path())?,
    };
    let opts = PruneOptions {
        image: spec.name.clone(),
        all: p.all,
    };
    let r = prune_cache(&layout, &engine, local, &opts)
        .await
        .with_context(|| format!("prune the build cache of {}", spec.name))?;
    let volumes = match r.volume_bytes_freed {
        Some(b) => human_bytes(b),
        None => "size unknown: remote engine".into(),
    };
    out.say(&format!(
        "removed {} cache entries and {} layer blobs ({}), {} cache volumes ({volumes}), {} step images ({}); kept {} entries{}",
        r.entries_removed,
        r.blobs_removed,
        human_bytes(r.layout_bytes_freed),
        r.volumes_removed.len(),
        r.images_removed,
        human_bytes(r.image_bytes_freed),
        r.entries_kept,
        match r.volumes_in_use.is_empty() {
            true => String::new(),
            false => format!("; volumes in use, kept: {}", r.volumes_in_use.join(", ")),
        }
    ));
    out.say(&format!("freed {}", human_bytes(r.bytes_freed)));
    out.result("cache prune", &r);
    Ok(())
}
