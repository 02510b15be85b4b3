//! The pipeline on the fake engine and a fake provisioner: which engine calls a step makes,
//! the cache, the container guard on failure and interruption, `--layer-path` misuse.
//! (Reading the fake's upper directory needs root, as wpimg's upperdir path always does.)

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::*;
use crate::error::{ErrorKind, HasKind};
use crate::events::SharedReporter;
use crate::layout::Layout;
use crate::oci::{Addendum, Platform};
use crate::provision::{ProvisionError, ProvisionRun, Provisioner};
use crate::runtime::{Engine, FakeEngine};

/// What the fake play does.
#[derive(Clone, Copy, PartialEq)]
enum Play {
    /// Writes a file into the container (its upper directory).
    Writes,
    /// Fails at a task.
    Fails,
    /// Never ends.
    Hangs,
}

struct FakeAnsible {
    play: Play,
    upper: PathBuf,
    containers: Mutex<Vec<String>>,
}

#[async_trait::async_trait]
impl Provisioner for FakeAnsible {
    async fn run(
        &self,
        p: &ProvisionRun,
        _: &SharedReporter,
    ) -> Result<crate::outputs::Outputs, ProvisionError> {
        if let Ok(mut c) = self.containers.lock() {
            c.push(p.container.clone());
        }
        match self.play {
            Play::Writes => {
                std::fs::create_dir_all(self.upper.join("etc"))?;
                std::fs::write(self.upper.join("etc/app.conf"), "provisioned\n")?;
                Ok(crate::outputs::Outputs::from([(
                    "version".to_string(),
                    "1.2.3".to_string(),
                )]))
            }
            Play::Fails => Err(ProvisionError::Failed {
                code: 2,
                task: Some("break on purpose".into()),
            }),
            Play::Hangs => {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Ok(Default::default())
            }
        }
    }
}

struct Fixture {
    dir: tempfile::TempDir,
    /// The fake container's upper directory (outside the project: not part of its cache key).
    upper: tempfile::TempDir,
    spec: crate::spec::ImageSpec,
    client: crate::registry::Client,
    base: Image,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pb.yml"), "- hosts: all\n  tasks: []\n").unwrap();
        std::fs::write(
            dir.path().join("image.yaml"),
            "name: app\nbase: 127.0.0.1:5000/base:1\nprovision:\n  playbook: pb.yml\n",
        )
        .unwrap();
        let spec = crate::spec::load(&dir.path().join("image.yaml"), &Default::default()).unwrap();
        let layout = Layout::open_or_create(dir.path().join("oci")).unwrap();
        let (d, n) = layout.write_blob(b"not a real layer").unwrap();
        let base = Image::scratch(&Platform::host())
            .append(
                &[Addendum {
                    layer: crate::oci::Descriptor::new(crate::oci::MEDIA_TYPE_OCI_LAYER_GZIP, d, n),
                    diff_id: crate::oci::Digest::of_bytes(b"tar"),
                    history: None,
                }],
                0,
                |_| {},
            )
            .unwrap();
        layout.write_image(&base).unwrap();
        Self {
            dir,
            upper: tempfile::tempdir().unwrap(),
            spec,
            client: crate::registry::Client::new(Default::default()).unwrap(),
            base,
        }
    }

    fn engine(&self) -> Arc<FakeEngine> {
        Arc::new(FakeEngine {
            upper: Some(self.upper.path().to_path_buf()),
            ..Default::default()
        })
    }

    fn ansible(&self, play: Play) -> Arc<FakeAnsible> {
        Arc::new(FakeAnsible {
            play,
            upper: self.upper.path().to_path_buf(),
            containers: Mutex::new(Vec::new()),
        })
    }

    fn context(
        &self,
        engine: &Arc<FakeEngine>,
        ansible: &Arc<FakeAnsible>,
        options: BuildOptions,
    ) -> BuildContext<'_> {
        let options = BuildOptions {
            oci_dir: self.dir.path().join("oci"),
            ..options
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
        .with_provisioner(ansible.clone())
    }

    async fn run(
        &self,
        ctx: &BuildContext<'_>,
        info: &EngineInfo,
    ) -> Result<StepOutcome, BuildError> {
        let step = Step::all(&self.spec).remove(0);
        let chain = Chain::new(&self.base);
        let run = StepRun {
            ctx,
            step: &step,
            chain: &chain,
            base: self.base.digest(),
            parent_key: None,
            platform: &Platform::host(),
            engine: info,
            may_stream: true,
        };
        let outcome = run.run().await?.finish(ctx, &Platform::host()).await;
        ctx.settle().await;
        outcome
    }
}

fn local_overlay() -> EngineInfo {
    EngineInfo {
        version: "fake".into(),
        api_version: "1.41".into(),
        storage_driver: "overlay2".into(),
        local: true,
        platform: "linux/amd64".into(),
    }
}

fn verbs(engine: &FakeEngine) -> Vec<String> {
    engine
        .calls()
        .iter()
        .map(|c| c.split(' ').next().unwrap_or("").to_string())
        .collect()
}

#[tokio::test]
async fn a_step_misses_then_hits_the_cache() {
    let f = Fixture::new();
    let engine = f.engine();
    let ansible = f.ansible(Play::Writes);
    let ctx = f.context(&engine, &ansible, BuildOptions::default());
    let first = f.run(&ctx, &local_overlay()).await.unwrap();
    assert_eq!(first.cache, CacheOutcome::Miss);
    assert_eq!(first.source, LayerSource::Upperdir);
    assert_eq!(
        verbs(&engine),
        [
            "image_exists",
            "load",
            "start_keepalive",
            "kill",
            "upper_dir",
            "remove"
        ]
    );
    let container = first.container.clone().unwrap();
    assert!(container.starts_with("wpimg-build-app-"), "{container}");
    assert_eq!(ansible.containers.lock().unwrap().as_slice(), [container]);
    assert!(ctx.layout().has_blob(&first.layer.digest));
    let times: Vec<String> = ctx.stages().times().into_iter().map(|t| t.stage).collect();
    assert_eq!(times, ["load-base", "provision", "layer"]);

    let calls_before = engine.calls().len();
    let again = f.run(&ctx, &local_overlay()).await.unwrap();
    assert_eq!(again.cache, CacheOutcome::Hit);
    assert_eq!(again.source, LayerSource::Cache);
    assert_eq!(again.layer, first.layer);
    assert_eq!(again.created, first.created, "a hit keeps the layer's time");
    assert_eq!(first.outputs["version"], "1.2.3");
    assert_eq!(
        again.outputs, first.outputs,
        "a hit gives the play's outputs back"
    );
    assert_eq!(engine.calls().len(), calls_before, "a hit needs no engine");

    let forced = f.context(
        &engine,
        &ansible,
        BuildOptions {
            no_cache: true,
            ..Default::default()
        },
    );
    let fresh = f.run(&forced, &local_overlay()).await.unwrap();
    assert_eq!(fresh.cache, CacheOutcome::Miss);
}

#[tokio::test]
async fn a_failed_play_removes_the_container_unless_kept() {
    let f = Fixture::new();
    let engine = f.engine();
    let ansible = f.ansible(Play::Fails);
    let ctx = f.context(&engine, &ansible, BuildOptions::default());
    let e = f.run(&ctx, &local_overlay()).await.unwrap_err();
    assert!(matches!(e, BuildError::Provision { kept: None, .. }), "{e}");
    assert_eq!(e.kind(), ErrorKind::Failure);
    assert_eq!(verbs(&engine).last().map(String::as_str), Some("remove"));

    let engine = f.engine();
    let keep = BuildOptions {
        keep_on_error: true,
        ..Default::default()
    };
    let ctx = f.context(&engine, &ansible, keep);
    let e = f.run(&ctx, &local_overlay()).await.unwrap_err();
    let BuildError::Provision {
        kept: Some(name), ..
    } = &e
    else {
        panic!("not kept: {e}")
    };
    assert!(e.to_string().contains(name.as_str()), "{e}");
    assert!(!verbs(&engine).contains(&"remove".to_string()));
}

#[tokio::test]
async fn an_interrupted_step_removes_the_container() {
    let f = Fixture::new();
    let engine = f.engine();
    let ansible = f.ansible(Play::Hangs);
    let cancel = tokio_util::sync::CancellationToken::new();
    let ctx = f
        .context(&engine, &ansible, BuildOptions::default())
        .with_cancel(cancel.clone());
    let later = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        later.cancel();
    });
    let e = f.run(&ctx, &local_overlay()).await.unwrap_err();
    assert!(matches!(e, BuildError::Interrupted), "{e}");
    assert_eq!(e.kind(), ErrorKind::Interrupted);
    assert_eq!(verbs(&engine).last().map(String::as_str), Some("remove"));
}

#[tokio::test]
async fn upperdir_with_a_remote_engine_is_bad_input() {
    let f = Fixture::new();
    let engine = f.engine();
    let ansible = f.ansible(Play::Writes);
    let options = BuildOptions {
        layer_path: LayerPath::Upperdir,
        ..Default::default()
    };
    let ctx = f.context(&engine, &ansible, options);
    let remote = EngineInfo {
        local: false,
        ..local_overlay()
    };
    let e = f.run(&ctx, &remote).await.unwrap_err();
    assert!(matches!(e, BuildError::LayerPathUnavailable { .. }), "{e}");
    assert_eq!(e.kind(), ErrorKind::BadInput);
    assert_eq!(verbs(&engine).last().map(String::as_str), Some("remove"));
}
