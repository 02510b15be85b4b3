//! `wpimg build`: settings → the build → (push) → manifest file → result.

use std::sync::Arc;

use anyhow::Context;
use serde::Serialize;

use super::args::{BuildArgs, GlobalArgs};
use super::output::{build_summary, engine_note, Output};
use super::settings::EngineFlag;
use super::{push, settings};
use crate::build::{BuildContext, BuildOptions, BuildReport, LayerUpload, PlatformEngine};
use crate::error::{ErrorKind, HasKind};
use crate::events::SharedReporter;
use crate::layout::Layout;
use crate::oci::{Descriptor, Platform};
use crate::outputs::Source;
use crate::provenance::{git_revision, BuildManifest};
use crate::publish::PushOutcome;
use crate::runtime::DockerEngine;
use crate::spec::ImageSpec;

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
    if !b.push && (b.push_args.sign_key.is_some() || b.push_args.sign_kms.is_some()) {
        return Err(super::InputError::new(
            "--sign-key and --sign-kms sign the pushed image: add --push",
        )
        .into());
    }
    let mut spec = settings::load_spec(g, &b.image_yaml)?;
    settings::apply_accelerator(&mut spec, b.accelerator);
    let flags = settings::engine_flags(&b.engines, &spec, |k| {
        std::env::var(k).ok().filter(|v| !v.is_empty())
    })?;
    let engines = Engines::connect(&spec, b.load, flags, &rep).await?;
    let (client, cache_repo) = settings::build_client(g, b, &spec).await?;
    // The push target is resolved first: a bad destination fails before the build, and a
    // registry push streams the new layer while it is compressed.
    let mut target = match b.push {
        true => {
            let mut t = settings::push_target(g, &b.push_args, Some(&spec))?;
            t.signer = settings::signer(&b.push_args).await?;
            Some(t)
        }
        false => None,
    };
    let options = BuildOptions {
        oci_dir: settings::oci_dir(g, &b.image_yaml),
        keep_on_error: b.keep_on_error,
        load: b.load,
        layer_path: b.layer_path,
        no_cache: b.no_cache,
        cache_repo,
        docker_host: engines.main.docker_host.clone(),
        docker_tls_cert_dir: engines.main.docker_tls_cert_dir.clone(),
    };
    super::prune::collect(engines.main.engine.as_ref(), Some(&options.oci_dir), &rep).await;
    let mut ctx = BuildContext::new(&spec, engines.main.engine, &client, options, rep.clone())?
        .with_cancel(cancel.clone());
    for (platform, engine) in engines.platforms {
        ctx = ctx.with_platform_engine(platform, engine);
    }
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
    if let Some(t) = &mut target {
        // image.yaml's tags using outputs, from this build's (checked before tagging).
        let tags = crate::outputs::resolve_tags(&t.tags, &report.outputs, Source::Build)?;
        t.set_tags(tags);
    }

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

/// The engines of a build: its own (`DOCKER_HOST`'s, or the `--engine` of its `platform:`),
/// and the `--engine` of each platform of `platforms:` that has one.
struct Engines {
    main: PlatformEngine,
    platforms: Vec<(Platform, PlatformEngine)>,
}

impl Engines {
    /// Connect every engine the build uses; `DOCKER_HOST`'s only when a platform (or `--load`)
    /// needs it.
    async fn connect(
        spec: &ImageSpec,
        load: bool,
        flags: Vec<EngineFlag>,
        rep: &SharedReporter,
    ) -> anyhow::Result<Self> {
        let mut platforms = Vec::new();
        for f in flags {
            let what = format!("--engine {}={}", f.platform, f.endpoint.host);
            let engine = DockerEngine::connect_to(f.endpoint)
                .await
                .with_context(|| what)?;
            engine_note(&engine, rep).await;
            platforms.push((f.platform, platform_engine(engine)));
        }
        let needs_own = match spec.index_platforms() {
            Some(all) => load || all.iter().any(|p| !platforms.iter().any(|(q, _)| q == p)),
            None => platforms.is_empty(),
        };
        let main = match needs_own {
            true => {
                let engine = DockerEngine::connect().await?;
                engine_note(&engine, rep).await;
                platform_engine(engine)
            }
            // A single image on its --engine; or every platform on its own engine.
            false => match spec.index_platforms() {
                None => platforms.remove(0).1,
                Some(_) => platforms[0].1.clone(),
            },
        };
        Ok(Self { main, platforms })
    }
}

/// An engine with what Ansible needs to reach it (`DOCKER_HOST` when one was named).
fn platform_engine(engine: DockerEngine) -> PlatformEngine {
    let endpoint = engine.endpoint().clone();
    PlatformEngine {
        host: endpoint.host.clone(),
        docker_host: endpoint.from_docker_host.then(|| endpoint.host.clone()),
        docker_tls_cert_dir: endpoint.tls_cert_dir.clone(),
        engine: Arc::new(engine),
    }
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
