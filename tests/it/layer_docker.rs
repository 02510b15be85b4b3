//! With the real Docker engine (overlay2): the same container changes give the same layer from
//! the container's overlayfs upper directory and from `docker commit` + `docker save`.

use std::fs;
use std::io::Read;
use std::path::Path;
use std::process::Command;

use crate::common::layer::list_layer;
use wpimg::layer::{
    layer_from_dir, layer_from_tar, layer_from_tar_file, Compression, LayerInfo, LayerOptions,
};
use wpimg::layout::Layout;

const ROOTFS: &str = "/var/cache/wpimg-fixtures/rootfs-bookworm";

fn docker(args: &[&str]) -> String {
    let out = Command::new("docker")
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run `docker` ({e}): install docker.io and start dockerd")
        });
    assert!(
        out.status.success(),
        "docker {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Removes the test's containers and images, even when the test panics.
struct Cleanup {
    containers: Vec<String>,
    images: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for c in &self.containers {
            let _ = Command::new("docker").args(["rm", "-f", c]).output();
        }
        for i in &self.images {
            let _ = Command::new("docker").args(["rmi", "-f", i]).output();
        }
    }
}

const CHANGES: &str = r#"
set -e
echo new > /etc/newfile
echo modified >> /etc/debian_version
rm /etc/issue.net
rm -rf /usr/share/doc
mkdir -p /usr/share/doc/pkg
echo readme > /usr/share/doc/pkg/README
ln -s /etc/newfile /etc/newlink
mkdir -p /opt/app
echo data > /opt/app/a
ln /opt/app/a /opt/app/b
ln /bin/true /usr/local/bin/true-link
chown 1234:1234 /opt/app/a
cp /bin/true /usr/local/bin/suid
chmod 4755 /usr/local/bin/suid
chmod 2775 /opt/app
cp /bin/true /usr/local/bin/capped
python3 -c "import os; os.setxattr('/usr/local/bin/capped', 'security.capability', bytes([1,0,0,2,0,0x20,0,0]+[0]*12))"
mkdir -p /root/.ansible/tmp/ansible-tmp-1
echo junk > /root/.ansible/tmp/ansible-tmp-1/AnsiballZ_setup.py
echo scratch > /tmp/scratch
mkfifo /run/fifo
mkdir -p /opt/deep/$(printf 'd%.0s' $(seq 1 90))
echo long > /opt/deep/$(printf 'd%.0s' $(seq 1 90))/$(printf 'f%.0s' $(seq 1 90))
ln -s /opt/deep/$(printf 'd%.0s' $(seq 1 90))/$(printf 'f%.0s' $(seq 1 90)) /opt/longlink
dd if=/dev/urandom of=/opt/app/random bs=1M count=3 status=none
"#;

fn top_layer_of_save(save_dir: &Path) -> std::path::PathBuf {
    let m: serde_json::Value =
        serde_json::from_slice(&fs::read(save_dir.join("manifest.json")).unwrap()).unwrap();
    let layers = m[0]["Layers"].as_array().unwrap();
    save_dir.join(layers.last().unwrap().as_str().unwrap())
}

#[test]
fn upper_dir_and_docker_save_give_identical_layers() {
    assert!(
        Path::new(ROOTFS).join("usr/bin/python3").exists(),
        "{ROOTFS} is missing: create it with `debootstrap --variant=minbase --include=python3 bookworm {ROOTFS}`"
    );
    docker(&["version", "--format", "{{.Server.Version}}"]);
    let driver = docker(&["info", "--format", "{{.Driver}}"]);
    assert_eq!(
        driver, "overlay2",
        "the test needs Docker's overlay2 storage driver"
    );

    let tag = format!(
        "wpimg-layer-test-{}-{}",
        std::process::id(),
        fastrand::u32(..)
    );
    let mut guard = Cleanup {
        containers: vec![],
        images: vec![],
    };
    let base = format!("{tag}:base");
    guard.images.push(base.clone());
    let imp = Command::new("bash")
        .args([
            "-c",
            &format!("set -o pipefail 2>/dev/null; tar -C {ROOTFS} -c . | docker import - {base}"),
        ])
        .output()
        .unwrap();
    assert!(
        imp.status.success(),
        "tar | docker import: {}",
        String::from_utf8_lossy(&imp.stderr)
    );

    let name = format!("{tag}-c");
    guard.containers.push(name.clone());
    docker(&["run", "-d", "--name", &name, &base, "sleep", "infinity"]);
    docker(&["exec", &name, "sh", "-c", CHANGES]);
    docker(&["kill", &name]);
    let upper = docker(&["inspect", "-f", "{{.GraphDriver.Data.UpperDir}}", &name]);

    let committed = format!("{tag}:committed");
    guard.images.push(committed.clone());
    docker(&["commit", &name, &committed]);
    let t = tempfile::tempdir().unwrap();
    let save_tar = t.path().join("save.tar");
    docker(&["save", "-o", save_tar.to_str().unwrap(), &committed]);
    let save_dir = t.path().join("save");
    fs::create_dir(&save_dir).unwrap();
    let st = Command::new("tar")
        .args([
            "-C",
            save_dir.to_str().unwrap(),
            "-xf",
            save_tar.to_str().unwrap(),
        ])
        .status()
        .unwrap();
    assert!(st.success());
    let top = top_layer_of_save(&save_dir);
    let mut magic = [0u8; 2];
    fs::File::open(&top)
        .unwrap()
        .read_exact(&mut magic)
        .unwrap();
    assert_ne!(
        magic,
        [0x1f, 0x8b],
        "expected an uncompressed layer tar in docker save"
    );

    let layout = Layout::open_or_create(t.path().join("oci")).unwrap();
    for (compression, sde) in [
        (Compression::Gzip, None),
        (Compression::Zstd, Some(1_700_000_000)),
    ] {
        let o = LayerOptions {
            compression,
            excludes: vec!["/tmp/*".into()],
            source_date_epoch: sde,
            ..Default::default()
        };
        let from_dir = layer_from_dir(Path::new(&upper), &layout, &o).unwrap();
        let from_stream = layer_from_tar(fs::File::open(&top).unwrap(), &layout, &o).unwrap();
        let from_file = layer_from_tar_file(&top, &layout, &o).unwrap();
        assert_eq!(
            from_dir, from_stream,
            "upper dir vs docker save ({compression})"
        );
        assert_eq!(
            from_dir, from_file,
            "upper dir vs docker save file ({compression})"
        );
        check_content(&layout, &from_dir);
    }
}

fn check_content(layout: &Layout, info: &LayerInfo) {
    let l = list_layer(layout, info);
    let get = |p: &str| {
        l.iter().find(|e| e.path == p).unwrap_or_else(|| {
            panic!(
                "{p} missing from layer: {:#?}",
                l.iter().map(|e| &e.path).collect::<Vec<_>>()
            )
        })
    };
    get("etc/newfile");
    get("etc/debian_version");
    get("etc/.wh.issue.net");
    get("usr/share/doc/.wh..wh..opq");
    get("usr/share/doc/pkg/README");
    assert_eq!(get("etc/newlink").link, "/etc/newfile");
    let b = get("opt/app/b");
    assert_eq!((b.ty, b.link.as_str()), ('1', "opt/app/a"));
    assert_eq!(get("opt/app/a").uid, 1234);
    assert_eq!(get("opt/app/").mode, 0o2775);
    assert_eq!(get("usr/local/bin/suid").mode, 0o4755);
    let link = get("usr/local/bin/true-link");
    assert_eq!((link.ty, link.link.as_str()), ('1', "usr/bin/true"));
    assert_eq!(
        get("usr/local/bin/capped").xattrs[0].0,
        "security.capability"
    );
    assert!(l.iter().all(|e| !e.path.starts_with("root/.ansible")));
    assert!(l.iter().all(|e| !e.path.starts_with("tmp/scratch")));
    assert!(l.iter().any(|e| e.path.len() > 180));
}
