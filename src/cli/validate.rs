//! `wpimg validate`: every problem of an image.yaml, or what it describes.

use std::sync::Arc;

use super::args::{GlobalArgs, ValidateArgs};
use super::output::Output;
use super::settings;

/// Run `wpimg validate`.
pub fn run(g: &GlobalArgs, v: &ValidateArgs, out: &Arc<Output>) -> anyhow::Result<()> {
    let spec = settings::load_spec(g, &v.image_yaml)?;
    out.say(&format!(
        "{}: ok ({} from {})",
        v.image_yaml.display(),
        spec.local_ref(),
        spec.base
    ));
    out.result(
        "validate",
        &serde_json::json!({ "valid": true, "spec": spec }),
    );
    Ok(())
}
