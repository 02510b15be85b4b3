//! `wpimg schema`: the JSON Schema of image.yaml on stdout.

use std::io::Write;

/// Run `wpimg schema`.
pub fn run() -> anyhow::Result<()> {
    let mut text = serde_json::to_string_pretty(&crate::spec::json_schema())?;
    text.push('\n');
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(text.as_bytes())?;
    stdout.flush()?;
    Ok(())
}
