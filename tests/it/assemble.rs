//! Image assembly without Docker: a fixed base, a fixed layer and SOURCE_DATE_EPOCH give known
//! digests (golden values: a change here changes every image wpimg builds; the history entry
//! names wpimg's version, so a version bump changes them too).

use std::collections::BTreeMap;

use wpimg::layout::Layout;
use wpimg::oci::{self, Descriptor, Digest, Image, ImageConfig, ImageManifest, RootFs};

const EPOCH: i64 = 1_700_000_000;

/// An uncompressed tar with one file, fixed metadata.
fn tar_with(name: &str, content: &[u8]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_size(content.len() as u64);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(EPOCH as u64);
    h.set_entry_type(tar::EntryType::Regular);
    b.append_data(&mut h, name, content).unwrap();
    b.into_inner().unwrap()
}

fn layer(layout: &Layout, name: &str, content: &[u8]) -> wpimg::layer::LayerInfo {
    let opts = wpimg::layer::LayerOptions {
        source_date_epoch: Some(EPOCH),
        threads: 1,
        ..Default::default()
    };
    wpimg::layer::layer_from_tar(&tar_with(name, content)[..], layout, &opts).unwrap()
}

/// A one-layer Debian-like base, stored in the layout.
fn base_parts(layout: &Layout) -> (ImageConfig, ImageManifest, Vec<u8>) {
    let l = layer(layout, "etc/os-release", b"ID=debian\n");
    let mut labels = BTreeMap::new();
    labels.insert("org.example.base".to_string(), "yes".to_string());
    let config = ImageConfig {
        created: Some(oci::rfc3339(EPOCH - 86_400)),
        author: None,
        architecture: "amd64".into(),
        os: "linux".into(),
        variant: None,
        config: oci::RuntimeConfig {
            env: Some(vec!["PATH=/usr/bin:/bin".into(), "LANG=C".into()]),
            cmd: Some(vec!["bash".into()]),
            labels: Some(labels),
            ..Default::default()
        },
        rootfs: RootFs {
            kind: "layers".into(),
            diff_ids: vec![l.diff_id.clone()],
        },
        history: vec![oci::History {
            created: Some(oci::rfc3339(EPOCH - 86_400)),
            created_by: Some("debootstrap".into()),
            ..Default::default()
        }],
        _private: (),
    };
    let raw_config = oci::to_canonical_json(&config);
    let (cd, cs) = layout.write_blob(&raw_config).unwrap();
    let mut ld = l.descriptor();
    ld.media_type = oci::MEDIA_TYPE_DOCKER_LAYER_GZIP.into();
    let manifest = ImageManifest {
        schema_version: 2,
        media_type: Some(oci::MEDIA_TYPE_DOCKER_MANIFEST.into()),
        artifact_type: None,
        config: Descriptor::new(oci::MEDIA_TYPE_DOCKER_CONFIG, cd, cs),
        layers: vec![ld],
        subject: None,
        annotations: BTreeMap::new(),
    };
    (config, manifest, raw_config)
}

const IMAGE_YAML: &str = r#"name: golden
base: 127.0.0.1:5000/debian:bookworm
provision:
  playbook: site.yml
image:
  entrypoint: ["/entry"]
  env: { LANG: C.UTF-8, APP: golden }
  expose: [80, "53/udp"]
  labels: { org.example.app: golden }
  user: "www-data"
  workdir: /srv
  volumes: [/data]
  stop_signal: SIGQUIT
  author: wpimg tests
"#;

const GOLDEN_CONFIG: &str =
    "sha256:da89d557b88f0c63ad4819151e1c58ff00c35cfaf2e29c5e62c545d65169f0a3";
const GOLDEN_MANIFEST: &str =
    "sha256:cfb8e14f1a5f4d8647da8f1bffca6e66349f5569f583dd1ad0dc71706fc48a64";

#[test]
fn fixed_base_and_layer_give_known_digests() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("site.yml"), "- hosts: all\n  tasks: []\n").unwrap();
    std::fs::write(d.path().join("image.yaml"), IMAGE_YAML).unwrap();
    let spec = wpimg::spec::load(&d.path().join("image.yaml"), &Default::default()).unwrap();
    let layout = Layout::open_or_create(d.path().join("oci")).unwrap();
    let (config, manifest, raw_config) = base_parts(&layout);
    let raw_manifest = oci::to_canonical_json(&manifest);
    let (md, ms) = layout.write_blob(&raw_manifest).unwrap();
    let base = Image::from_raw(
        Descriptor::new(oci::MEDIA_TYPE_DOCKER_MANIFEST, md, ms),
        raw_manifest,
        raw_config,
    )
    .unwrap();
    assert_eq!(base.config, config);
    let new = layer(&layout, "srv/app.txt", b"provisioned\n");
    let step = wpimg::build::Step::all(&spec).remove(0);
    let outcome = wpimg::build::StepOutcome {
        name: step.name.clone(),
        layer: new.descriptor(),
        diff_id: new.diff_id.clone(),
        uncompressed_size: new.uncompressed_size,
        created: EPOCH,
        history: step.history(),
        cache: wpimg::build::CacheOutcome::Miss,
        cache_key: String::new(),
        source: wpimg::build::LayerSource::Upperdir,
        container: None,
        seconds: 0.0,
        outputs: Default::default(),
    };
    let image = wpimg::build::assemble(&base, &[outcome], &spec.image_settings()).unwrap();
    let (cb, mb) = (&image.raw_config, &image.raw_manifest);
    assert_eq!(image.manifest.config.digest, Digest::of_bytes(cb));
    assert_eq!(Digest::of_bytes(cb).to_string(), GOLDEN_CONFIG);
    assert_eq!(image.digest().to_string(), GOLDEN_MANIFEST);
    assert_eq!(Digest::of_bytes(mb).to_string(), GOLDEN_MANIFEST);
}
