//! `wpimg sbom`: the SBOM of an image of the layout or a registry, printed on stdout.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use serde::Serialize;

use super::args::{GlobalArgs, SbomCmd};
use super::output::Output;
use super::settings;
use crate::events::SharedReporter;
use crate::inspect::Target;
use crate::supply::{SbomDocument, SbomSource};

/// The `--json` result: where the document came from (the document itself is on stdout
/// without `--json`).
#[derive(Serialize)]
struct SbomResult<'a> {
    reference: &'a str,
    subject: String,
    format: crate::sbom::Format,
    source: SbomSource,
    document: serde_json::Value,
}

/// Run `wpimg sbom`.
pub async fn run(g: &GlobalArgs, c: &SbomCmd, out: &Arc<Output>) -> anyhow::Result<()> {
    let default_dir = g
        .oci_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(".wpimg/oci"));
    let platform = c
        .platform
        .clone()
        .unwrap_or_else(crate::oci::Platform::host);
    let doc = match crate::inspect::resolve_target(&c.reference, &default_dir)? {
        Target::Layout { dir, reference } => {
            crate::supply::sbom_from_layout(&dir, reference.as_deref(), &platform, c.format).await?
        }
        Target::Registry(reference) => {
            let opts = settings::client_options(g, None)?;
            let opts = settings::with_login(opts, &reference.registry, &c.login)?;
            // An ECR host: tokens from the AWS SDK chain when no login was given.
            let opts = crate::publish::with_ecr_pull_credentials(opts, &reference.registry, None);
            let client = settings::client(opts)?;
            let rep: SharedReporter = out.clone();
            crate::supply::sbom_from_registry(&client, &reference, &platform, c.format, &rep)
                .await?
        }
    };
    print(&c.reference, &doc, out)
}

fn print(reference: &str, doc: &SbomDocument, out: &Output) -> anyhow::Result<()> {
    if out.is_json() {
        let document = serde_json::from_slice(&doc.document).context("the SBOM document")?;
        out.result(
            "sbom",
            &SbomResult {
                reference,
                subject: doc.subject.to_string(),
                format: doc.format,
                source: doc.source,
                document,
            },
        );
        return Ok(());
    }
    let how = match doc.source {
        SbomSource::Stored => "stored with the image",
        SbomSource::Scanned => "made from the image's layers",
    };
    out.say(&format!("SBOM ({}) of {}, {how}", doc.format, doc.subject));
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(&doc.document)
        .and_then(|()| stdout.flush())
        .context("write the SBOM to stdout")
}
