//! `wpimg validate`: every problem of an image.yaml, or what it describes. Values that came
//! from the environment or a `--var-file` are shown as `<redacted>`, here as everywhere.

use std::sync::Arc;

use super::args::{GlobalArgs, ValidateArgs};
use super::output::Output;
use super::settings;
use crate::spec::KeyPath;

/// Run `wpimg validate`.
pub fn run(g: &GlobalArgs, v: &ValidateArgs, out: &Arc<Output>) -> anyhow::Result<()> {
    let spec = settings::load_spec(g, &v.image_yaml)?;
    let tag = spec.local_tag();
    let tag_at = KeyPath::of("target.tags").index(0);
    out.say(&format!(
        "{}: ok ({}:{} from {})",
        v.image_yaml.display(),
        spec.shown(&KeyPath::of("name"), &spec.name),
        spec.shown(&tag_at, &tag),
        spec.shown(&KeyPath::of("base"), &spec.base)
    ));
    out.result(
        "validate",
        &serde_json::json!({ "valid": true, "spec": spec.redacted_json() }),
    );
    Ok(())
}
