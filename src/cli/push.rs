//! `wpimg push`: the image to push (image.yaml's, or `--from oci:DIR:REF`) → the push target →
//! the push → manifest file → result.

use std::sync::Arc;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use super::args::{GlobalArgs, PushCmd};
use super::output::Output;
use super::{settings, InputError};
use crate::error::Interrupted;
use crate::events::SharedReporter;
use crate::layout::Layout;
use crate::oci::Descriptor;
use crate::outputs;
use crate::provenance::{git_revision, BuildManifest};
use crate::publish::{PushOutcome, PushTarget, TargetKind};
use crate::reference::LayoutRef;
use crate::spec::ImageSpec;

/// Run `wpimg push`.
pub async fn run(g: &GlobalArgs, p: &PushCmd, out: &Arc<Output>) -> anyhow::Result<()> {
    let cancel = settings::cancel_on_signal()?;
    // Flags and image.yaml first: a bad tag is reported before the layout is looked at.
    let spec = match &p.from {
        Some(_) => None,
        None => Some(settings::load_spec(g, &p.image_yaml)?),
    };
    let mut target = settings::push_target(g, &p.push_args, spec.as_ref())?;
    target.signer = settings::signer(&p.push_args).await?;
    let (layout, desc) = match &spec {
        Some(spec) => built_image(g, p, spec)?,
        None => from_layout(p.from.as_deref().unwrap_or_default())?,
    };
    resolve_outputs(&mut target, &layout, &desc)?;
    let pushed = push_until(&target, &layout, &desc, out, &cancel).await?;
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

/// [`push`] unless `cancel` fires first: then the push's requests are dropped, the upload
/// sessions they left open are discarded, and the error is [`Interrupted`] (no tag is written
/// after that point: tags go last).
pub async fn push_until(
    target: &PushTarget,
    layout: &Layout,
    desc: &Descriptor,
    out: &Arc<Output>,
    cancel: &CancellationToken,
) -> anyhow::Result<PushOutcome> {
    tokio::select! {
        r = push(target, layout, desc, out) => r,
        _ = cancel.cancelled() => {
            target.discard_open_uploads().await;
            Err(Interrupted.into())
        }
    }
}

/// image.yaml's tags that use `${outputs.NAME}`, from the outputs the build stored for the
/// image being pushed.
fn resolve_outputs(
    target: &mut PushTarget,
    layout: &Layout,
    desc: &Descriptor,
) -> anyhow::Result<()> {
    if !target.tags.iter().any(|t| outputs::uses_outputs(t)) {
        return Ok(());
    }
    let stored = outputs::stored(layout, &desc.digest).unwrap_or_default();
    let tags = outputs::resolve_tags(
        &target.tags,
        &stored.outputs,
        outputs::Source::Stored(&desc.digest),
    )?;
    target.set_tags(tags);
    Ok(())
}

/// `--from oci:DIR[:NAME:TAG]`: any OCI layout's image.
fn from_layout(from: &str) -> anyhow::Result<(Layout, Descriptor)> {
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
    Ok((layout, desc))
}

/// The image `wpimg build` made from image.yaml.
fn built_image(
    g: &GlobalArgs,
    p: &PushCmd,
    spec: &ImageSpec,
) -> anyhow::Result<(Layout, Descriptor)> {
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
    Ok((layout, desc))
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
