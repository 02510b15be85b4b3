//! Push throughput of wpimg's client against `skopeo copy` for a ~400 MB image of random
//! layers, each into a fresh docker-registry. Run with
//! `cargo test --release --test it registry_bench -- --ignored --nocapture`.

use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use crate::common::registry::*;
use wpimg::auth::DockerConfigProvider;
use wpimg::events::null;
use wpimg::layout::Layout;
use wpimg::reference::Reference;
use wpimg::registry::{Client, ClientOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run explicitly with --ignored --nocapture"]
async fn push_400mb_vs_skopeo() {
    require_tool("skopeo", "apt-get install skopeo");
    let dir = tempfile::tempdir().unwrap();
    let l = Layout::open_or_create(dir.path()).unwrap();
    let t = Instant::now();
    let mut layers = Vec::new();
    let mut diff_ids = Vec::new();
    for i in 0..4 {
        let (d, id) = random_tar_layer_with(&l, 100 << 20, 100 + i, flate2::Compression::none());
        layers.push(d);
        diff_ids.push(id);
    }
    let total: u64 = layers.iter().map(|d| d.size).sum();
    let img = write_image(&l, "bench", layers, diff_ids, None);
    eprintln!("generated {} MB in {:.1?}", total >> 20, t.elapsed());

    let mut results = Vec::new();
    for round in 0..2 {
        let reg = Registry::start();
        let c = Client::new(ClientOptions {
            default_credentials: Some(Arc::new(DockerConfigProvider {
                dir: Some(dir.path().join("no-docker-config")),
                helper_path: None,
            })),
            ..Default::default()
        })
        .unwrap();
        let dest: Reference = format!("{}/bench/app:1", reg.host()).parse().unwrap();
        let t = Instant::now();
        let rep = c
            .push_image(&l, &img.manifest, &dest, &[], &null())
            .await
            .unwrap();
        let ours = t.elapsed().as_secs_f64();
        assert_eq!(rep.bytes_uploaded, total + img.config.size);

        let reg2 = Registry::start();
        let t = Instant::now();
        run(Command::new("skopeo")
            .args(["copy", "-q", "--dest-tls-verify=false"])
            .arg(format!("oci:{}:bench", dir.path().display()))
            .arg(format!("docker://{}/bench/app:1", reg2.host())));
        let skopeo = t.elapsed().as_secs_f64();
        assert_eq!(
            skopeo_manifest_digest(
                &format!("docker://{}/bench/app:1", reg2.host()),
                &["--tls-verify=false"]
            ),
            img.manifest.digest
        );
        eprintln!(
            "round {round}: wpimg {ours:.2}s ({:.0} MB/s), skopeo {skopeo:.2}s ({:.0} MB/s)",
            total as f64 / 1e6 / ours,
            total as f64 / 1e6 / skopeo
        );
        results.push((ours, skopeo));
    }
}
