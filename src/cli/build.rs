//! `wpimg build`: settings → the build → (push) → manifest file → result.

use std::sync::Arc;

use anyhow::Context;
use serde::Serialize;

use super::args::{BuildArgs, GlobalArgs};
use super::output::{build_summary, engine_note, Output};
use super::{push, settings};
use crate::build::{BuildContext, BuildOptions, BuildReport, LayerUpload};
use crate::error::{ErrorKind, HasKind};
use crate::events::SharedReporter;
use crate::layout::Layout;
use crate::oci::Descriptor;
use crate::provenance::{git_revision, BuildManifest};
use crate::publish::PushOutcome;
use crate::runtime::{DockerEngine, Engine};

/// The `--json` result of a build: the report, and with `--push` the image URI and the push.
#[derive(Serialize)]
struct BuildResult<'a> {
    #[serde(flatten)]
    report: &'a BuildReport,
    #[serde(skip_serializing_if = "Option::is_none")]
    image_uri: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    push: Option<&'a PushOutcome>,
}

/// Run `wpimg build`.
pub async fn run(g: &GlobalArgs, b: &BuildArgs, out: &Arc<Output>) -> anyhow::Result<()> {
    let cancel = settings::cancel_on_signal()?;
    let rep: SharedReporter = out.clone();
    let spec = settings::load_spec(g, &b.image_yaml)?;
    let engine = DockerEngine::connect().await?;
    engine_note(&engine, &rep).await;
    let (client, cache_repo) = settings::build_client(g, b, &spec).await?;
    // The push target is resolved first: a bad destination fails before the build, and a
    // registry push streams the new layer while it is compressed.
    let target = match b.push {
        true => Some(settings::push_target(g, &b.push_args, Some(&spec))?),
        false => None,
    };
    let options = BuildOptions {
        oci_dir: settings::oci_dir(g, &b.image_yaml),
        keep_on_error: b.keep_on_error,
        load: b.load,
        layer_path: b.layer_path,
        no_cache: b.no_cache,
        cache_repo,
        docker_host: engine
            .endpoint()
            .from_docker_host
            .then(|| engine.host().to_string()),
        docker_tls_cert_dir: engine.endpoint().tls_cert_dir.clone(),
    };
    super::prune::collect(&engine, Some(&options.oci_dir), &rep).await;
    let engine: Arc<dyn Engine> = Arc::new(engine);
    let mut ctx = BuildContext::new(&spec, engine, &client, options, rep.clone())?
        .with_cancel(cancel.clone());
    let stream = target.as_ref().filter(|_| !b.no_stream);
    if let Some((writer, stream)) = stream.and_then(|t| t.stream_blob(&rep)) {
        ctx = ctx.with_layer_upload(LayerUpload::new(writer, stream));
    }
    let tag = TagBefore::read(ctx.layout(), spec.local_ref());
    let built = crate::build::build(&ctx).await;
    if built.is_err() {
        ctx.discard_layer_upload().await;
        // A cache-repository push cut short leaves its upload sessions open.
        client.discard_open_uploads().await;
    }
    let layout = ctx.layout().clone();
    drop(ctx);
    let report = match built {
        Ok(r) => r,
        Err(e) => {
            if e.kind() == ErrorKind::Interrupted {
                tag.restore(&layout)?;
            }
            return Err(anyhow::Error::new(e).context(format!("build {}", b.image_yaml.display())));
        }
    };
    build_summary(out, &report);

    let pushed = match &target {
        Some(t) => match push::push_until(t, &layout, &report.manifest, out, &cancel).await {
            Err(e) if crate::error::kind_of(&e) == ErrorKind::Interrupted => {
                tag.restore(&layout)?;
                return Err(e);
            }
            r => Some(r?),
        },
        None => None,
    };
    if let Some(path) = &b.manifest {
        let revision = git_revision(crate::spec::dir_of(&b.image_yaml));
        BuildManifest::of_build(&report, pushed.as_ref(), revision)
            .write(path)
            .with_context(|| format!("write manifest {}", path.display()))?;
    }
    let result = BuildResult {
        report: &report,
        image_uri: pushed.as_ref().map(|p| p.image_uri.as_str()),
        push: pushed.as_ref(),
    };
    out.result("build", &result);
    Ok(())
}

/// The layout's `NAME:TAG` before the build: an interrupted build or push puts it back, so that
/// no tag of an unfinished build is left.
struct TagBefore {
    reference: String,
    previous: Option<Descriptor>,
}

impl TagBefore {
    fn read(layout: &Layout, reference: String) -> Self {
        let previous = layout.resolve(&reference).ok();
        Self {
            reference,
            previous,
        }
    }

    fn restore(&self, layout: &Layout) -> anyhow::Result<()> {
        match &self.previous {
            Some(d) => layout.tag(&self.reference, d),
            None => layout.untag(&self.reference),
        }
        .with_context(|| {
            format!(
                "restore tag {} in {}",
                self.reference,
                layout.dir().display()
            )
        })
    }
}
