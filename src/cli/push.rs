//! `wpimg push`: the image to push (image.yaml's, or `--from oci:DIR:REF`) → the push target →
//! the push → manifest file → result.

use std::sync::Arc;

use anyhow::Context;

use super::args::{GlobalArgs, PushCmd};
use super::output::Output;
use super::{settings, InputError};
use crate::events::SharedReporter;
use crate::layout::Layout;
use crate::oci::Descriptor;
use crate::provenance::{git_revision, BuildManifest};
use crate::publish::{PushOutcome, PushTarget, TargetKind};
use crate::reference::LayoutRef;
use crate::spec::ImageSpec;

/// Run `wpimg push`.
pub async fn run(g: &GlobalArgs, p: &PushCmd, out: &Arc<Output>) -> anyhow::Result<()> {
    let (spec, layout, desc) = match &p.from {
        Some(from) => from_layout(from)?,
        None => built_image(g, p)?,
    };
    let mut target = settings::push_target(g, &p.push_args, spec.as_ref())?;
    target.signer = settings::signer(&p.push_args).await?;
    let pushed = push(&target, &layout, &desc, out).await?;
    if let Some(path) = &p.manifest {
        let revision = git_revision(crate::spec::dir_of(&p.image_yaml));
        BuildManifest::of_push(&pushed, revision)
            .write(path)
            .with_context(|| format!("write manifest {}", path.display()))?;
    }
    out.result("push", &pushed);
    Ok(())
}

/// Push `desc` of `layout` to `target` and say what was done.
pub async fn push(
    target: &PushTarget,
    layout: &Layout,
    desc: &Descriptor,
    out: &Arc<Output>,
) -> anyhow::Result<PushOutcome> {
    let rep: SharedReporter = out.clone();
    let pushed = target
        .push(layout, desc, &rep)
        .await
        .with_context(|| match &target.kind {
            TargetKind::Registry { .. } => format!("push to {}", target.repository()),
            TargetKind::Ecr(_) => format!("push to ECR repository {}", target.repository()),
        })?;
    out.say(&pushed.summary());
    Ok(pushed)
}

/// `--from oci:DIR[:NAME:TAG]`: any OCI layout's image.
fn from_layout(from: &str) -> anyhow::Result<(Option<ImageSpec>, Layout, Descriptor)> {
    let LayoutRef { dir, reference } = LayoutRef::parse(from)
        .ok_or_else(|| InputError::new(format!("--from {from:?}: expected oci:DIR:NAME:TAG")))?;
    let layout = Layout::open(&dir)
        .map_err(|e| InputError::caused(format!("open OCI layout {}", dir.display()), e))?;
    let desc = match &reference {
        Some(r) => layout
            .resolve(r)
            .map_err(|e| InputError::caused(format!("--from {from}"), e))?,
        None => only_image(&layout)?,
    };
    Ok((None, layout, desc))
}

/// The image `wpimg build` made from image.yaml.
fn built_image(
    g: &GlobalArgs,
    p: &PushCmd,
) -> anyhow::Result<(Option<ImageSpec>, Layout, Descriptor)> {
    let spec = settings::load_spec(g, &p.image_yaml)?;
    let dir = settings::oci_dir(g, &p.image_yaml);
    let layout = Layout::open(&dir).map_err(|e| {
        InputError::caused(
            format!(
                "no OCI layout at {}: run wpimg build {} first",
                dir.display(),
                p.image_yaml.display()
            ),
            e,
        )
    })?;
    let desc = layout.resolve(&spec.local_ref()).map_err(|e| {
        InputError::caused(
            format!(
                "image {} not built yet: run wpimg build first",
                spec.local_ref()
            ),
            e,
        )
    })?;
    Ok((Some(spec), layout, desc))
}

/// The only image of a layout (for `--from oci:DIR`).
fn only_image(layout: &Layout) -> anyhow::Result<Descriptor> {
    let images = layout.images()?;
    match images.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(InputError::new(format!(
            "OCI layout {} holds no image",
            layout.dir().display()
        ))
        .into()),
        _ => Err(InputError::new(format!(
            "OCI layout {} holds {} images: name one with oci:DIR:NAME:TAG",
            layout.dir().display(),
            images.len()
        ))
        .into()),
    }
}
