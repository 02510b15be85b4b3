//! Multi-platform builds (`platforms:`): every platform's whole path ([`build_platform`]) on
//! its engine, then one OCI index of their images, tagged `NAME:TAG`.
//!
//! Before any build: the engines answer, each engine runs a probe container of each of its
//! platforms, and the base has every platform. Platforms on different engines build at the same
//! time; on one engine, one after the other. A failure stops the others and tags nothing.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use futures_util::future::join_all;
use tokio_util::sync::CancellationToken;

use super::probe::{self, Probe};
use super::report::PlatformReport;
use super::{build_platform, docker_archive, report, BuildContext, BuildError, PlatformBuild};
use crate::build::BuildReport;
use crate::oci::{Index, Manifest, Platform};
use crate::outputs::{Outputs, StoredOutputs};
use crate::runtime::{Engine, EngineInfo};

/// The engine a platform builds on, and how Ansible reaches it.
#[derive(Clone)]
pub struct PlatformEngine {
    /// The engine.
    pub engine: Arc<dyn Engine>,
    /// Where it listens (`unix:///var/run/docker.sock`, `tcp://HOST:PORT`); platforms with the
    /// same host build one after the other.
    pub host: String,
    /// `DOCKER_HOST` handed to Ansible (none: Ansible's default, the local socket).
    pub docker_host: Option<String>,
    /// TLS certificate directory handed to Ansible with `docker_host`.
    pub docker_tls_cert_dir: Option<PathBuf>,
}

/// One engine and the platforms it builds, in `platforms:` order.
struct Lane {
    engine: PlatformEngine,
    info: EngineInfo,
    platforms: Vec<Platform>,
}

/// One platform's finished part.
struct Built {
    platform: Platform,
    build: PlatformBuild,
    report: PlatformReport,
}

/// Build every platform of `platforms` and tag their index `NAME:TAG` (loading the engine's
/// own platform with `--load`).
pub(super) async fn build_index(
    ctx: &BuildContext<'_>,
    platforms: &[Platform],
) -> Result<BuildReport, BuildError> {
    // The layer of one platform cannot stream: the push uploads every platform's after the build.
    ctx.abort_layer_upload();
    let (lanes, own) = ctx
        .stage("engine", async {
            Ok::<_, BuildError>((
                lanes(ctx, platforms).await?,
                own_platform(ctx, platforms).await?,
            ))
        })
        .await?;
    ctx.stage("probe", probe_all(&lanes)).await?;
    ctx.stage("resolve", check_base(ctx, platforms)).await?;
    let built = build_all(ctx, &lanes, platforms).await?;
    let outputs: Vec<(String, &Outputs)> = built
        .iter()
        .map(|b| (b.platform.to_string(), &b.build.outputs))
        .collect();
    crate::outputs::resolve_index_tags(&super::target_tags(ctx), &outputs)?;
    let index = Index::new(
        built
            .iter()
            .map(|b| b.build.image.descriptor.clone())
            .collect(),
    );
    let reference = ctx.spec.local_ref();
    ctx.layout().write_index(&index)?;
    let stored = StoredOutputs {
        outputs: built
            .first()
            .map(|b| b.build.outputs.clone())
            .unwrap_or_default(),
        platforms: outputs.into_iter().map(|(p, o)| (p, o.clone())).collect(),
    };
    crate::outputs::store(ctx.layout(), &index.descriptor.digest, &stored)?;
    ctx.layout().tag(&reference, &index.descriptor)?;
    let loaded = match own {
        Some(own) => Some(load_own(ctx, &built, &own, &reference).await?),
        None => None,
    };
    Ok(index_report(ctx, built, &index, reference, loaded))
}

/// The engines of the platforms (each asked for its facts once), grouped.
async fn lanes(ctx: &BuildContext<'_>, platforms: &[Platform]) -> Result<Vec<Lane>, BuildError> {
    let mut lanes: Vec<Lane> = Vec::new();
    for p in platforms {
        let engine = ctx.engine_for(p);
        match lanes.iter_mut().find(|l| l.engine.host == engine.host) {
            Some(lane) => lane.platforms.push(p.clone()),
            None => {
                let info = engine.engine.info().await?;
                lanes.push(Lane {
                    engine,
                    info,
                    platforms: vec![p.clone()],
                });
            }
        }
    }
    Ok(lanes)
}

/// With `--load`, the build's engine's own platform, which `platforms:` must list.
async fn own_platform(
    ctx: &BuildContext<'_>,
    platforms: &[Platform],
) -> Result<Option<Platform>, BuildError> {
    if !ctx.options.load {
        return Ok(None);
    }
    let info = ctx.engine.info().await?;
    let own = Platform::parse(&info.platform).unwrap_or_else(Platform::host);
    match platforms.iter().find(|p| p.matches(&own)) {
        Some(p) => Ok(Some(p.clone())),
        None => Err(BuildError::LoadPlatform {
            engine: own.to_string(),
            platforms: platforms.iter().map(Platform::to_string).collect(),
        }),
    }
}

/// The base must offer every platform: its index lists them, or it is one image of the only
/// platform wanted.
async fn check_base(ctx: &BuildContext<'_>, platforms: &[Platform]) -> Result<(), BuildError> {
    let base = super::base_reference(ctx)?;
    let pull_error = |source| BuildError::Pull {
        reference: ctx.spec.base.clone(),
        source: Box::new(source),
    };
    let top = ctx
        .client
        .fetch_manifest(&base, &ctx.reporter)
        .await
        .map_err(pull_error)?;
    let available: Vec<Platform> = match &top.manifest {
        Manifest::Index(i) => i
            .manifests
            .iter()
            .filter_map(|d| d.platform.clone())
            .filter(|p| p.os != "unknown")
            .collect(),
        Manifest::Image(_) => {
            let one = ctx
                .client
                .fetch_image(&base, &platforms[0], &ctx.reporter)
                .await
                .map_err(pull_error)?;
            vec![one.image.platform()]
        }
    };
    let missing: Vec<String> = platforms
        .iter()
        .filter(|p| !available.iter().any(|a| p.matches(a)))
        .map(Platform::to_string)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    Err(BuildError::BasePlatforms {
        base: ctx.spec.base.clone(),
        missing,
        available: available.iter().map(Platform::to_string).collect(),
    })
}

/// One image of a `platform:` other than the engine's own: the engine must run it (a probe).
pub(super) async fn check_runs(
    ctx: &BuildContext<'_>,
    platform: &Platform,
    info: &EngineInfo,
) -> Result<(), BuildError> {
    if Platform::parse(&info.platform).is_some_and(|own| platform.matches(&own)) {
        return Ok(());
    }
    let lane = Lane {
        engine: ctx.engine_for(platform),
        info: info.clone(),
        platforms: vec![platform.clone()],
    };
    ctx.stage("probe", probe_all(std::slice::from_ref(&lane)))
        .await
}

/// Every engine runs a probe container of each of its platforms (engines at the same time).
async fn probe_all(lanes: &[Lane]) -> Result<(), BuildError> {
    let per_lane = lanes.iter().map(|lane| async move {
        let mut failed = Vec::new();
        for p in &lane.platforms {
            match probe::probe(&lane.engine.engine, p).await? {
                Probe::Runs | Probe::Unknown => {}
                Probe::CannotRun(why) => failed.push(CannotRun {
                    platform: p.to_string(),
                    handler: probe::qemu_handler(p),
                    engine: lane.engine.host.clone(),
                    engine_platform: lane.info.platform.clone(),
                    why,
                }),
            }
        }
        Ok::<_, BuildError>(failed)
    });
    let mut failed = Vec::new();
    for r in join_all(per_lane).await {
        failed.extend(r?);
    }
    match failed.is_empty() {
        true => Ok(()),
        false => Err(BuildError::CannotRun(failed)),
    }
}

/// A platform an engine cannot run, and why.
#[derive(Debug, Clone)]
pub struct CannotRun {
    /// The platform.
    pub platform: String,
    /// The binfmt handler that would run it (`qemu-s390x`).
    pub handler: String,
    /// The engine.
    pub engine: String,
    /// The engine's own platform.
    pub engine_platform: String,
    /// What the probe container said.
    pub why: String,
}

impl std::fmt::Display for CannotRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the Docker engine at {} ({}) cannot run {} containers (probe: {}). Register \
             qemu-user-static's binfmt handlers on the engine's host (Debian/Ubuntu: apt-get \
             install qemu-user-static binfmt-support; /proc/sys/fs/binfmt_misc/{} must exist \
             with the F flag), or build {} on an engine that runs it: --engine {}=tcp://HOST:2376",
            self.engine,
            self.engine_platform,
            self.platform,
            self.why,
            self.handler,
            self.platform,
            self.platform
        )
    }
}

/// Build every platform: lanes at the same time, a lane's platforms one after the other. The
/// first failure cancels the rest and is returned, naming its platform.
async fn build_all(
    ctx: &BuildContext<'_>,
    lanes: &[Lane],
    platforms: &[Platform],
) -> Result<Vec<Built>, BuildError> {
    let abort = ctx.cancel_token().child_token();
    let runs = lanes.iter().map(|lane| build_lane(ctx, lane, &abort));
    let mut built = Vec::new();
    let mut failures = Vec::new();
    for r in join_all(runs).await {
        match r {
            Ok(b) => built.extend(b),
            Err(e) => failures.push(e),
        }
    }
    // A platform stopped because another one failed says nothing new.
    failures.sort_by_key(is_interrupted);
    if let Some(e) = failures.into_iter().next() {
        return Err(e);
    }
    built.sort_by_key(|b| platforms.iter().position(|p| *p == b.platform));
    Ok(built)
}

fn is_interrupted(e: &BuildError) -> bool {
    match e {
        BuildError::Interrupted => true,
        BuildError::Platform { source, .. } => is_interrupted(source),
        _ => false,
    }
}

/// One engine's platforms, one after the other; a failure cancels `abort`.
async fn build_lane(
    ctx: &BuildContext<'_>,
    lane: &Lane,
    abort: &CancellationToken,
) -> Result<Vec<Built>, BuildError> {
    let mut built = Vec::new();
    for p in &lane.platforms {
        let child = ctx.for_platform(p, &lane.engine, abort.child_token());
        let started = Instant::now();
        let result = build_platform(&child, p, &lane.info).await;
        child.settle().await;
        let build = match result {
            Ok(b) => b,
            Err(source) => {
                abort.cancel();
                return Err(match ctx.cancel_token().is_cancelled() {
                    true => BuildError::Interrupted,
                    false => BuildError::Platform {
                        platform: p.to_string(),
                        source: Box::new(source),
                    },
                });
            }
        };
        let seconds = started.elapsed().as_secs_f64();
        let one = report(&child, build.clone(), ctx.spec.local_ref(), None);
        built.push(Built {
            platform: p.clone(),
            report: PlatformReport::of(one, p.to_string(), lane.engine.host.clone(), seconds),
            build,
        });
    }
    Ok(built)
}

/// `--load`: the engine's own platform's image, into the build's engine as `NAME:TAG`.
async fn load_own(
    ctx: &BuildContext<'_>,
    built: &[Built],
    own: &Platform,
    reference: &str,
) -> Result<String, BuildError> {
    if let Some(b) = built.iter().find(|b| b.platform == *own) {
        let tags = vec![reference.to_string()];
        let load = docker_archive::load(ctx.engine.as_ref(), ctx.layout(), &b.build.image, tags);
        ctx.stage("load", load).await?;
    }
    Ok(reference.to_string())
}

/// The report of the whole build: the index as `manifest`, every platform's part.
fn index_report(
    ctx: &BuildContext<'_>,
    built: Vec<Built>,
    index: &Index,
    reference: String,
    loaded: Option<String>,
) -> BuildReport {
    let first = built[0].build.clone();
    let base_index = first.base.index.clone();
    let mut top = report(ctx, first, reference, loaded);
    top.manifest = index.descriptor.clone();
    top.index_digest = Some(index.descriptor.digest.clone());
    if let Some(i) = base_index {
        top.base_digest = i.digest;
    }
    let mut blobs: Vec<(&crate::oci::Digest, u64)> = Vec::new();
    for l in built.iter().flat_map(|b| &b.report.layers) {
        if !blobs.iter().any(|(d, _)| *d == &l.digest) {
            blobs.push((&l.digest, l.size));
        }
    }
    top.total_size = blobs.iter().map(|(_, s)| s).sum();
    top.cache = super::CacheOutcome::combined(built.iter().map(|b| b.report.cache));
    top.platforms = built.into_iter().map(|b| b.report).collect();
    top
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{ErrorKind, HasKind};
    use crate::runtime::FakeEngine;

    struct Fixture {
        _dir: tempfile::TempDir,
        spec: crate::spec::ImageSpec,
        client: crate::registry::Client,
        oci: PathBuf,
    }

    fn fixture(platforms: &str) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pb.yml"), "- hosts: all\n  tasks: []\n").unwrap();
        std::fs::write(
            dir.path().join("image.yaml"),
            format!("name: app\nbase: 127.0.0.1:5000/base:1\nplatforms: {platforms}\nprovision:\n  playbook: pb.yml\n"),
        )
        .unwrap();
        let spec = crate::spec::load(&dir.path().join("image.yaml"), &Default::default()).unwrap();
        Fixture {
            oci: dir.path().join("oci"),
            _dir: dir,
            spec,
            client: crate::registry::Client::new(Default::default()).unwrap(),
        }
    }

    impl Fixture {
        fn ctx(&self, engine: &Arc<FakeEngine>, load: bool) -> BuildContext<'_> {
            let options = super::super::BuildOptions {
                oci_dir: self.oci.clone(),
                load,
                ..Default::default()
            };
            let engine: Arc<dyn Engine> = engine.clone();
            BuildContext::new(
                &self.spec,
                engine,
                &self.client,
                options,
                crate::events::null(),
            )
            .unwrap()
        }
    }

    fn p(s: &str) -> Platform {
        Platform::parse(s).unwrap()
    }

    #[tokio::test]
    async fn a_platform_the_engine_cannot_run_fails_up_front_leaving_nothing() {
        let f = fixture("[linux/amd64, linux/arm64]");
        let fake = Arc::new(FakeEngine {
            cannot_run: vec!["linux/arm64".into()],
            ..Default::default()
        });
        let ctx = f.ctx(&fake, false);
        let platforms = f.spec.index_platforms().unwrap();
        let lanes = lanes(&ctx, &platforms).await.unwrap();
        let e = probe_all(&lanes).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Failure);
        let msg = e.to_string();
        for want in [
            "cannot run linux/arm64 containers (probe: exit code 1: exec /probe: exec format error)",
            "/proc/sys/fs/binfmt_misc/qemu-aarch64",
            "--engine linux/arm64=tcp://HOST:2376",
        ] {
            assert!(msg.contains(want), "{want:?} missing from {msg}");
        }
        assert!(!msg.contains("linux/amd64 containers"), "{msg}");
        // Every probe image loaded is removed; its container is removed by run_to_end.
        let calls = fake.calls();
        let loads = calls.iter().filter(|c| c.starts_with("load ")).count();
        let removed = calls
            .iter()
            .filter(|c| c.starts_with("remove_image sha256:"))
            .count();
        assert_eq!((loads, removed), (2, 2), "{calls:?}");
        assert!(calls
            .iter()
            .any(|c| c.ends_with(" linux/arm64") && c.starts_with("run_to_end")));
    }

    #[tokio::test]
    async fn platforms_group_by_engine() {
        let f = fixture("[linux/amd64, linux/arm64, linux/arm/v7]");
        let fake = Arc::new(FakeEngine::default());
        let platforms = f.spec.index_platforms().unwrap();
        let one = lanes(&f.ctx(&fake, false), &platforms).await.unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].platforms, platforms);
        let other = PlatformEngine {
            engine: Arc::new(FakeEngine::default()),
            host: "tcp://graviton:2376".into(),
            docker_host: Some("tcp://graviton:2376".into()),
            docker_tls_cert_dir: None,
        };
        let ctx = f
            .ctx(&fake, false)
            .with_platform_engine(p("linux/arm64"), other.clone())
            .with_platform_engine(p("linux/arm/v7"), other);
        let two = lanes(&ctx, &platforms).await.unwrap();
        let hosts: Vec<(&str, usize)> = two
            .iter()
            .map(|l| (l.engine.host.as_str(), l.platforms.len()))
            .collect();
        assert_eq!(
            hosts,
            [
                ("unix:///var/run/docker.sock", 1),
                ("tcp://graviton:2376", 2)
            ]
        );
        // Ansible of a platform on its own engine is sent there.
        let child = ctx.for_platform(&p("linux/arm64"), &two[1].engine, CancellationToken::new());
        assert_eq!(
            child.options.docker_host.as_deref(),
            Some("tcp://graviton:2376")
        );
    }

    #[tokio::test]
    async fn load_needs_the_engine_own_platform() {
        let fake = Arc::new(FakeEngine::default());
        let f = fixture("[linux/arm64, linux/s390x]");
        let platforms = f.spec.index_platforms().unwrap();
        let e = own_platform(&f.ctx(&fake, true), &platforms)
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::BadInput);
        assert!(
            e.to_string()
                .contains("--load loads the engine's own platform"),
            "{e}"
        );
        assert!(own_platform(&f.ctx(&fake, false), &platforms)
            .await
            .unwrap()
            .is_none());
        let f = fixture("[linux/arm64, linux/amd64]");
        let platforms = f.spec.index_platforms().unwrap();
        let own = own_platform(&f.ctx(&fake, true), &platforms).await.unwrap();
        assert_eq!(own, Some(Platform::host()));
    }
}
