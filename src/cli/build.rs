//! `wpimg build`: settings → the build → (push) → manifest file → result.

use std::sync::Arc;

use anyhow::Context;
use serde::Serialize;

use super::args::{BuildArgs, GlobalArgs};
use super::output::{build_summary, engine_note, Output};
use super::{push, settings};
use crate::build::{BuildContext, BuildOptions, BuildReport, LayerUpload};
use crate::events::SharedReporter;
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
    let rep: SharedReporter = out.clone();
    let mut spec = settings::load_spec(g, &b.image_yaml)?;
    settings::apply_accelerator(&mut spec, b.accelerator);
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
    let engine: Arc<dyn Engine> = Arc::new(engine);
    let mut ctx = BuildContext::new(&spec, engine, &client, options, rep.clone())?
        .with_cancel(settings::cancel_on_signal());
    let stream = target.as_ref().filter(|_| !b.no_stream);
    if let Some((writer, stream)) = stream.and_then(|t| t.stream_blob(&rep)) {
        ctx = ctx.with_layer_upload(LayerUpload::new(writer, stream));
    }
    let report = crate::build::build(&ctx)
        .await
        .with_context(|| format!("build {}", b.image_yaml.display()))?;
    let layout = ctx.layout().clone();
    drop(ctx);
    build_summary(out, &report);

    let pushed = match &target {
        Some(t) => Some(push::push(t, &layout, &report.manifest, out).await?),
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
