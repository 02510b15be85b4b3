//! `wpimg inspect`: an image of the layout or a registry, as JSON or one screen.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use super::args::{GlobalArgs, InspectCmd};
use super::output::Output;
use super::settings;
use crate::events::SharedReporter;
use crate::inspect::Target;

/// Run `wpimg inspect`.
pub async fn run(g: &GlobalArgs, i: &InspectCmd, out: &Arc<Output>) -> anyhow::Result<()> {
    let default_dir = g
        .oci_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(".wpimg/oci"));
    let platform = i
        .platform
        .clone()
        .unwrap_or_else(crate::oci::Platform::host);
    let view = match crate::inspect::resolve_target(&i.reference, &default_dir)? {
        Target::Layout { dir, reference } => {
            crate::inspect::from_layout(&dir, reference.as_deref(), &platform).await?
        }
        Target::Registry(reference) => {
            let opts = settings::client_options(g, None)?;
            let opts = settings::with_login(opts, &reference.registry, &i.login)?;
            let client = settings::client(opts)?;
            let rep: SharedReporter = out.clone();
            crate::inspect::from_registry(&client, &reference, &platform, &rep).await?
        }
    };
    if out.is_json() {
        out.result("inspect", &view);
    } else {
        // The view is the product: stdout; -q prints just the digest, for scripts.
        let text = if out.is_quiet() {
            format!("{}\n", view.digest)
        } else {
            crate::inspect::render_human(&view)
        };
        let mut stdout = std::io::stdout().lock();
        let _ = stdout.write_all(text.as_bytes());
        let _ = stdout.flush();
    }
    Ok(())
}
