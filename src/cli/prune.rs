//! `wpimg prune`: remove what dead builds left (containers, committed images, temp files,
//! run directories and their processes); every build starts with the same collection.

use std::path::Path;
use std::sync::Arc;

use serde::Serialize;

use super::args::{GlobalArgs, LeftoversArgs};
use super::output::Output;
use super::settings;
use crate::events::{Event, SharedReporter};
use crate::leftovers::{self, Removed};
use crate::runtime::{DockerEngine, Engine};

/// The `--json` result of `wpimg prune`.
#[derive(Serialize)]
struct PruneResult {
    removed: Vec<Removed>,
}

/// Run `wpimg prune`.
pub async fn run(g: &GlobalArgs, a: &LeftoversArgs, out: &Arc<Output>) -> anyhow::Result<()> {
    let rep: SharedReporter = out.clone();
    let engine = DockerEngine::connect().await?;
    let oci_dir = settings::oci_dir(g, &a.image_yaml);
    let removed = collect(&engine, Some(&oci_dir), &rep).await;
    out.say(&match removed.len() {
        0 => "nothing left over".to_string(),
        n => format!(
            "removed {n} left-over item{}",
            if n == 1 { "" } else { "s" }
        ),
    });
    out.result("prune", &PruneResult { removed });
    Ok(())
}

/// Collect the leftovers of dead builds on `engine` and in the layout at `oci_dir` (if it
/// exists), reporting each removal; a failure is a warning, never an error.
pub async fn collect(
    engine: &dyn Engine,
    oci_dir: Option<&Path>,
    rep: &SharedReporter,
) -> Vec<Removed> {
    let mut removed = Vec::new();
    match leftovers::collect_engine(engine).await {
        Ok(r) => removed.extend(r),
        Err(e) => warn(rep, format!("collecting left-over containers: {e}")),
    }
    if let Some(dir) = oci_dir.filter(|d| d.is_dir()) {
        match leftovers::collect_layout(dir) {
            Ok(r) => removed.extend(r),
            Err(e) => warn(
                rep,
                format!("collecting left-over files in {}: {e}", dir.display()),
            ),
        }
    }
    for r in &removed {
        rep.event(Event::Removed {
            kind: r.kind.to_string(),
            name: r.name.clone(),
            reason: r.reason.clone(),
        });
    }
    removed
}

fn warn(rep: &SharedReporter, message: String) {
    rep.event(Event::Warning { message });
}
