//! SBOMs from real images and real package databases (issue 14): the Debian fixture image
//! pulled with skopeo, validated by pyspdxtools and CycloneDX's strict JSON schema validator
//! and compared with `dpkg-query -W` run in a container; a package purged in a container and
//! committed by Docker; distroless-style whiteouts; rpm databases written by Debian's `rpm`
//! (SQLite) and by Berkeley DB's `db5.3_load` (checked with rpm's `bdb_ro` backend); apk.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use crate::common::registry::write_image;
use crate::common::{ok_stdout, require, require_fixtures, run, unique, ImageGuard, BASE};
use wpimg::layout::Layout;
use wpimg::oci::{Descriptor, Digest, HashingWriter, MEDIA_TYPE_OCI_LAYER_GZIP};
use wpimg::sbom::{self, artifact, Ecosystem, Format};

const VENV: &str = "/opt/wpimg-venv/bin";

/// Copy an image into a new OCI layout under `dir` with skopeo; returns the layout and the
/// manifest descriptor tagged `x`.
fn skopeo_to_layout(src: &str, dir: &Path) -> (Layout, Descriptor) {
    require("skopeo");
    let target = dir.join("oci");
    ok_stdout(Command::new("skopeo").args([
        "copy",
        "--quiet",
        "--src-tls-verify=false",
        src,
        &format!("oci:{}:x", target.display()),
    ]));
    let layout = Layout::open(&target).unwrap();
    let desc = layout.resolve("x").unwrap();
    (layout, desc)
}

/// `pyspdxtools -i FILE` must accept the document.
pub(crate) fn assert_spdx_valid(path: &Path) {
    let tool = format!("{VENV}/pyspdxtools");
    assert!(
        Path::new(&tool).is_file(),
        "{tool} is missing: scripts/setup installs spdx-tools into the venv"
    );
    let o = run(Command::new(&tool).arg("-i").arg(path));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        o.status.success(),
        "pyspdxtools rejected {}:\n{text}",
        path.display()
    );
    assert!(!text.contains("validation error"), "{text}");
}

/// CycloneDX's own strict JSON schema validation (cyclonedx-python-lib) must accept it.
pub(crate) fn assert_cyclonedx_valid(path: &Path) {
    let py = format!("{VENV}/python");
    let script = r#"
import sys
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator
err = JsonStrictValidator(SchemaVersion.V1_5).validate_str(open(sys.argv[1]).read())
if err is not None:
    print("INVALID:", err)
    sys.exit(1)
print("VALID")
"#;
    let o = run(Command::new(&py).args(["-c", script]).arg(path));
    assert!(
        o.status.success(),
        "CycloneDX validation of {} failed: {}{}",
        path.display(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Parse every purl with packageurl-python and check it prints back identically.
fn assert_purls_canonical(purls: &[String]) {
    let py = format!("{VENV}/python");
    let script = r#"
import sys
from packageurl import PackageURL
bad = [p for p in sys.stdin.read().split() if PackageURL.from_string(p).to_string() != p]
print("\n".join(bad))
sys.exit(1 if bad else 0)
"#;
    let o = crate::common::run_with_stdin(
        Command::new(&py).args(["-c", script]),
        purls.join("\n").as_bytes(),
    );
    assert!(
        o.status.success(),
        "purls not canonical: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// (name, version) of installed packages, by `dpkg-query -W` in a container of `image`.
pub(crate) fn dpkg_query(image: &str) -> BTreeSet<(String, String)> {
    let out = ok_stdout(Command::new("docker").args([
        "run",
        "--rm",
        "--name",
        &unique("wpimg-sbom-dpkg"),
        image,
        "dpkg-query",
        "-W",
        "-f",
        "${db:Status-Status} ${Package} ${Version}\n",
    ]));
    out.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            match (it.next(), it.next(), it.next()) {
                (Some("installed"), Some(n), Some(v)) => Some((n.to_string(), v.to_string())),
                _ => None,
            }
        })
        .collect()
}

fn deb_set(sbom: &sbom::Sbom) -> BTreeSet<(String, String)> {
    sbom.inventory
        .packages
        .iter()
        .filter(|p| p.ecosystem == Ecosystem::Deb)
        .map(|p| (p.name.clone(), p.version.clone()))
        .collect()
}

/// (name, version) pairs of the packages in an SPDX document (the image and OS left out).
pub(crate) fn spdx_set(doc: &serde_json::Value) -> BTreeSet<(String, String)> {
    doc["packages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| {
            p["externalRefs"][0]["referenceLocator"]
                .as_str()
                .is_some_and(|l| !l.starts_with("pkg:oci/"))
        })
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_string(),
                p["versionInfo"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn debian_fixture_sbom_is_valid_and_matches_dpkg_query() {
    require_fixtures();
    let dir = tempfile::tempdir().unwrap();
    let (layout, desc) = skopeo_to_layout(&format!("docker://{BASE}"), dir.path());
    let sbom = sbom::generate(&layout, &desc, "debian").unwrap();

    let expected = dpkg_query(BASE);
    assert!(
        expected.len() > 50,
        "dpkg-query found too little: {expected:?}"
    );
    assert_eq!(deb_set(&sbom), expected);
    let os = sbom.inventory.os.as_ref().unwrap();
    assert_eq!(os.id, "debian");
    assert_eq!(os.version_id.as_deref(), Some("12"));

    let spdx = sbom.to_json(Format::SpdxJson);
    let cdx = sbom.to_json(Format::CycloneDxJson);
    // Reproducible: the same image gives byte-identical documents.
    let again = sbom::generate(&layout, &desc, "debian").unwrap();
    assert_eq!(again.to_json(Format::SpdxJson), spdx);
    assert_eq!(again.to_json(Format::CycloneDxJson), cdx);

    let spdx_path = dir.path().join("debian.spdx.json");
    let cdx_path = dir.path().join("debian.cdx.json");
    std::fs::write(&spdx_path, &spdx).unwrap();
    std::fs::write(&cdx_path, &cdx).unwrap();
    assert_spdx_valid(&spdx_path);
    assert_cyclonedx_valid(&cdx_path);

    let doc: serde_json::Value = serde_json::from_slice(&spdx).unwrap();
    assert_eq!(spdx_set(&doc), expected);
    assert_eq!(
        doc["creationInfo"]["creators"][0],
        format!("Tool: wpimg-{}", env!("CARGO_PKG_VERSION"))
    );
    let config: serde_json::Value = serde_json::from_slice(
        &layout
            .read_blob(&sbom::read_image(&layout, &desc).unwrap().0.config.digest)
            .unwrap(),
    )
    .unwrap();
    let created = config["created"].as_str().unwrap();
    assert_eq!(
        doc["creationInfo"]["created"].as_str().unwrap()[..19],
        created[..19]
    );
    let image = &doc["packages"][0];
    assert_eq!(image["SPDXID"], "SPDXRef-Image");
    assert_eq!(image["versionInfo"], desc.digest.to_string());
    assert_eq!(image["checksums"][0]["checksumValue"], desc.digest.hex());
    assert!(doc["relationships"]
        .as_array()
        .unwrap()
        .iter()
        .any(
            |r| r["relationshipType"] == "DESCRIBES" && r["relatedSpdxElement"] == "SPDXRef-Image"
        ));
    let libc = sbom
        .inventory
        .packages
        .iter()
        .find(|p| p.name == "libc6")
        .unwrap();
    assert_eq!(libc.source.as_ref().unwrap().name, "glibc");
    assert!(
        libc.purl.starts_with("pkg:deb/debian/libc6@"),
        "{}",
        libc.purl
    );
    assert!(libc.purl.ends_with("?arch=amd64"), "{}", libc.purl);

    let cdx_doc: serde_json::Value = serde_json::from_slice(&cdx).unwrap();
    assert_eq!(cdx_doc["metadata"]["component"]["type"], "container");
    assert_eq!(
        cdx_doc["metadata"]["component"]["version"],
        desc.digest.to_string()
    );
    let cdx_names: BTreeSet<(String, String)> = cdx_doc["components"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["type"] == "library")
        .map(|c| {
            (
                c["name"].as_str().unwrap().into(),
                c["version"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(cdx_names, expected);

    let mut purls: Vec<String> = sbom
        .inventory
        .packages
        .iter()
        .map(|p| p.purl.clone())
        .collect();
    purls.push(sbom.subject.purl());
    assert_purls_canonical(&purls);

    // Stored as an artifact with the image as subject, and found again.
    let stored = artifact::write_sbom(
        &layout,
        &spdx,
        Format::SpdxJson,
        &desc,
        &sbom.subject.created,
    )
    .unwrap();
    let found = artifact::find_sboms(&layout, &desc.digest).unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].manifest.digest, stored.digest);
    assert_eq!(artifact::read_document(&layout, &found[0]).unwrap(), spdx);
}

#[test]
fn package_purged_in_a_container_is_absent() {
    require_fixtures();
    let dir = tempfile::tempdir().unwrap();
    let container = unique("wpimg-sbom-purge");
    let image = format!("wpimg-sbom-purged:{}", unique("t"));
    let _img = ImageGuard(image.clone());
    let purge = run(Command::new("docker").args([
        "run", "--name", &container, BASE, "dpkg", "--purge", "python3",
    ]));
    let commit = run(Command::new("docker").args(["commit", &container, &image]));
    let _ = run(Command::new("docker").args(["rm", "-f", &container]));
    assert!(
        purge.status.success(),
        "{}",
        String::from_utf8_lossy(&purge.stderr)
    );
    assert!(
        commit.status.success(),
        "{}",
        String::from_utf8_lossy(&commit.stderr)
    );

    let (layout, desc) = skopeo_to_layout(&format!("docker-daemon:{image}"), dir.path());
    let sbom = sbom::generate(&layout, &desc, "purged").unwrap();
    let names: BTreeSet<String> = sbom
        .inventory
        .packages
        .iter()
        .map(|p| p.name.clone())
        .collect();
    assert!(!names.contains("python3"), "python3 still listed");
    assert!(names.contains("python3.11"), "its dependency should stay");
    assert_eq!(deb_set(&sbom), dpkg_query(&image));
}

/// Write a gzip tar layer of (path, content) regular files, plus whiteout names, into the
/// layout; returns its descriptor and diff_id.
fn tar_layer(layout: &Layout, files: &[(&str, &[u8])]) -> (Descriptor, Digest) {
    let mut w = layout.blob_writer().unwrap();
    let diff_id = {
        let gz = flate2::write::GzEncoder::new(&mut w, flate2::Compression::fast());
        let mut tar = tar::Builder::new(HashingWriter::new(gz));
        for (path, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_entry_type(tar::EntryType::Regular);
            tar.append_data(&mut h, path, *data).unwrap();
        }
        let (gz, diff_id, _) = tar.into_inner().unwrap().finish();
        gz.finish().unwrap();
        diff_id
    };
    let (d, n) = w.commit(None, None).unwrap();
    (Descriptor::new(MEDIA_TYPE_OCI_LAYER_GZIP, d, n), diff_id)
}

/// A layer holding every file under `root` at its relative path.
fn dir_layer(layout: &Layout, root: &Path, rel: &[&str]) -> (Descriptor, Digest) {
    let owned: Vec<(String, Vec<u8>)> = rel
        .iter()
        .map(|r| (r.to_string(), std::fs::read(root.join(r)).unwrap()))
        .collect();
    let files: Vec<(&str, &[u8])> = owned
        .iter()
        .map(|(p, d)| (p.as_str(), d.as_slice()))
        .collect();
    tar_layer(layout, &files)
}

fn image_of(layout: &Layout, tag: &str, layers: Vec<(Descriptor, Digest)>) -> Descriptor {
    let (descs, diffs): (Vec<_>, Vec<_>) = layers.into_iter().unzip();
    write_image(layout, tag, descs, diffs, None).manifest
}

#[test]
fn distroless_status_d_whiteout_removes_the_package() {
    let dir = tempfile::tempdir().unwrap();
    let layout = Layout::open_or_create(dir.path()).unwrap();
    let base = tar_layer(
        &layout,
        &[
            ("etc/os-release", b"ID=debian\nVERSION_ID=\"12\"\n"),
            ("var/lib/dpkg/status.d/base-files", b"Package: base-files\nVersion: 12.4+deb12u5\nArchitecture: amd64\n"),
            ("var/lib/dpkg/status.d/base-files.md5sums", b"d41d8cd98f00b204e9800998ecf8427e  etc/debian_version\n"),
            ("var/lib/dpkg/status.d/tzdata", b"Package: tzdata\nVersion: 2024a-0+deb12u1\nArchitecture: all\n"),
            ("var/lib/dpkg/status.d/libssl3", b"Package: libssl3\nSource: openssl\nVersion: 3.0.11-1~deb12u2\nArchitecture: amd64\n"),
        ],
    );
    let both = image_of(&layout, "two:1", vec![base.clone()]);
    let sbom = sbom::generate(&layout, &both, "distroless").unwrap();
    let names: Vec<&str> = sbom
        .inventory
        .packages
        .iter()
        .map(|p| p.name.as_str())
        .collect();
    assert_eq!(names, vec!["base-files", "libssl3", "tzdata"]);

    let upper = tar_layer(&layout, &[("var/lib/dpkg/status.d/.wh.tzdata", b"")]);
    let removed = image_of(&layout, "two:2", vec![base, upper]);
    let sbom = sbom::generate(&layout, &removed, "distroless").unwrap();
    let names: Vec<&str> = sbom
        .inventory
        .packages
        .iter()
        .map(|p| p.name.as_str())
        .collect();
    assert_eq!(names, vec!["base-files", "libssl3"]);
    let path = dir.path().join("d.spdx.json");
    std::fs::write(&path, sbom.to_json(Format::SpdxJson)).unwrap();
    assert_spdx_valid(&path);
}

/// Build tiny noarch rpms with rpmbuild: (name, version, release, epoch, licence).
fn build_rpms(
    dir: &Path,
    specs: &[(&str, &str, &str, Option<u32>, &str)],
) -> Vec<std::path::PathBuf> {
    require("rpmbuild");
    let top = dir.join("rpmbuild");
    let mut out = Vec::new();
    for (name, version, release, epoch, license) in specs {
        let spec = dir.join(format!("{name}.spec"));
        let epoch_line = epoch.map(|e| format!("Epoch: {e}\n")).unwrap_or_default();
        std::fs::write(
            &spec,
            format!(
                "Name: {name}\nVersion: {version}\nRelease: {release}\n{epoch_line}Summary: wpimg test \
                 package\nLicense: {license}\nVendor: wpimg tests\nBuildArch: noarch\n\n%description\n\
                 A package for wpimg's SBOM tests.\n\n%files\n"
            ),
        )
        .unwrap();
        ok_stdout(
            Command::new("rpmbuild")
                .arg("--define")
                .arg(format!("_topdir {}", top.display()))
                .args(["--quiet", "-bb"])
                .arg(&spec),
        );
        let rpm = top
            .join("RPMS/noarch")
            .join(format!("{name}-{version}-{release}.noarch.rpm"));
        assert!(rpm.is_file(), "{} missing", rpm.display());
        out.push(rpm);
    }
    out
}

const RPM_SPECS: &[(&str, &str, &str, Option<u32>, &str)] = &[
    ("wpimg-alpha", "1.2.3", "4.el9", None, "MIT"),
    ("wpimg-beta", "0.9", "1.el9", Some(2), "GPLv2+ and BSD"),
    ("wpimg-gamma", "2024.1", "7.el9", None, "Apache-2.0 OR MIT"),
];

/// `rpm -qa` of a root's database: (name, EVR, arch, licence).
fn rpm_qa(args: &[&str]) -> BTreeSet<(String, String, String, String)> {
    let out = ok_stdout(Command::new("rpm").args(args).args([
        "-qa",
        "--qf",
        "%{NAME}\t%{EVR}\t%{ARCH}\t%{LICENSE}\n",
    ]));
    out.lines()
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            (f[0].into(), f[1].into(), f[2].into(), f[3].into())
        })
        .collect()
}

fn sbom_rpm_set(sbom: &sbom::Sbom) -> BTreeSet<(String, String, String, String)> {
    sbom.inventory
        .packages
        .iter()
        .filter(|p| p.ecosystem == Ecosystem::Rpm)
        .map(|p| {
            (
                p.name.clone(),
                p.full_version(),
                p.arch.clone().unwrap_or_default(),
                p.license.clone().unwrap_or_default(),
            )
        })
        .collect()
}

/// Install the test rpms into `root` with a SQLite rpmdb; returns `rpm -qa` of it.
fn rpm_root(
    dir: &Path,
) -> (
    std::path::PathBuf,
    BTreeSet<(String, String, String, String)>,
) {
    require("rpm");
    let rpms = build_rpms(dir, RPM_SPECS);
    let root = dir.join("root");
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::write(
        root.join("etc/os-release"),
        "NAME=\"CentOS Stream\"\nID=\"centos\"\nVERSION_ID=\"9\"\n",
    )
    .unwrap();
    let root_s = root.to_str().unwrap();
    let common_args = [
        "--root",
        root_s,
        "--dbpath",
        "/var/lib/rpm",
        "--define",
        "_db_backend sqlite",
    ];
    ok_stdout(Command::new("rpm").args(common_args).arg("--initdb"));
    ok_stdout(
        Command::new("rpm")
            .args(common_args)
            .args(["-i", "--nodeps", "--noscripts", "--nosignature"])
            .args(&rpms),
    );
    let qa = rpm_qa(&common_args);
    assert_eq!(qa.len(), RPM_SPECS.len(), "{qa:?}");
    (root, qa)
}

#[test]
fn rpm_sqlite_database_written_by_rpm() {
    let dir = tempfile::tempdir().unwrap();
    let (root, expected) = rpm_root(dir.path());
    assert!(root.join("var/lib/rpm/rpmdb.sqlite").is_file());
    let layout = Layout::open_or_create(dir.path().join("oci")).unwrap();
    let mut files = vec!["etc/os-release", "var/lib/rpm/rpmdb.sqlite"];
    for extra in [
        "var/lib/rpm/rpmdb.sqlite-wal",
        "var/lib/rpm/rpmdb.sqlite-shm",
    ] {
        if root.join(extra).is_file() {
            files.push(extra);
        }
    }
    let layer = dir_layer(&layout, &root, &files);
    let image = image_of(&layout, "rpm:1", vec![layer]);
    let sbom = sbom::generate(&layout, &image, "centos-test").unwrap();
    assert_eq!(sbom_rpm_set(&sbom), expected);
    let beta = sbom
        .inventory
        .packages
        .iter()
        .find(|p| p.name == "wpimg-beta")
        .unwrap();
    assert_eq!(
        beta.purl,
        "pkg:rpm/centos/wpimg-beta@0.9-1.el9?arch=noarch&epoch=2"
    );
    assert_eq!(beta.supplier.as_deref(), Some("wpimg tests"));
    assert_eq!(
        beta.source
            .as_ref()
            .map(|s| (s.name.as_str(), s.version.as_deref())),
        Some(("wpimg-beta", Some("0.9-1.el9")))
    );
    let spdx = dir.path().join("rpm.spdx.json");
    let cdx = dir.path().join("rpm.cdx.json");
    std::fs::write(&spdx, sbom.to_json(Format::SpdxJson)).unwrap();
    std::fs::write(&cdx, sbom.to_json(Format::CycloneDxJson)).unwrap();
    assert_spdx_valid(&spdx);
    assert_cyclonedx_valid(&cdx);
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&spdx).unwrap()).unwrap();
    let declared: BTreeSet<&str> = doc["packages"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["licenseDeclared"].as_str())
        .collect();
    assert!(declared.contains("MIT"), "{declared:?}");
    assert!(declared.contains("Apache-2.0 OR MIT"), "{declared:?}");
    assert!(
        declared.iter().any(|d| d.starts_with("LicenseRef-GPLv2-")),
        "{declared:?}"
    );
    assert_purls_canonical(
        &sbom
            .inventory
            .packages
            .iter()
            .map(|p| p.purl.clone())
            .collect::<Vec<_>>(),
    );
}

/// The header blobs of an rpmdb.sqlite (`Packages.blob`), read with Python's sqlite3.
fn sqlite_blobs(db: &Path) -> Vec<(u32, Vec<u8>)> {
    let out = ok_stdout(Command::new("python3").args([
        "-c",
        "import sqlite3,sys\nfor h,b in sqlite3.connect(sys.argv[1]).execute('select hnum, blob from Packages'):\n print(h, b.hex())",
    ]).arg(db));
    out.lines()
        .map(|l| {
            let (h, b) = l.split_once(' ').unwrap();
            (h.parse().unwrap(), hex::decode(b).unwrap())
        })
        .collect()
}

/// Write a Berkeley DB hash `Packages` with `db5.3_load` (key: instance number, native
/// endian; value: header blob), as rpm's BDB backend stored them.
fn write_bdb(path: &Path, blobs: &[(u32, Vec<u8>)], page_size: u32) {
    require("db5.3_load");
    let mut dump = String::from("VERSION=3\nformat=bytevalue\ntype=hash\n");
    dump += &format!("db_pagesize={page_size}\nHEADER=END\n");
    let next = blobs.iter().map(|(h, _)| *h).max().unwrap_or(0) + 1;
    dump += &format!(
        " {}\n {}\n",
        hex::encode(0u32.to_le_bytes()),
        hex::encode(next.to_le_bytes())
    );
    for (h, b) in blobs {
        dump += &format!(" {}\n {}\n", hex::encode(h.to_le_bytes()), hex::encode(b));
    }
    dump += "DATA=END\n";
    let o = crate::common::run_with_stdin(Command::new("db5.3_load").arg(path), dump.as_bytes());
    assert!(
        o.status.success(),
        "db5.3_load: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn rpm_berkeley_db_packages() {
    let dir = tempfile::tempdir().unwrap();
    let (root, expected) = rpm_root(dir.path());
    let blobs = sqlite_blobs(&root.join("var/lib/rpm/rpmdb.sqlite"));
    assert_eq!(blobs.len(), RPM_SPECS.len());
    // Small pages put headers on overflow pages, big ones keep them inline.
    for page_size in [512u32, 65536] {
        let broot = dir.path().join(format!("bdb-{page_size}"));
        std::fs::create_dir_all(broot.join("var/lib/rpm")).unwrap();
        std::fs::copy(root.join("etc/os-release"), {
            std::fs::create_dir_all(broot.join("etc")).unwrap();
            broot.join("etc/os-release")
        })
        .unwrap();
        write_bdb(&broot.join("var/lib/rpm/Packages"), &blobs, page_size);
        // rpm itself reads the file (its read-only Berkeley DB backend).
        let dbpath = broot.join("var/lib/rpm");
        let by_rpm = rpm_qa(&[
            "--dbpath",
            dbpath.to_str().unwrap(),
            "--define",
            "_db_backend bdb_ro",
        ]);
        assert_eq!(
            by_rpm, expected,
            "rpm's bdb_ro reads the fixture (page size {page_size})"
        );

        let layout = Layout::open_or_create(dir.path().join(format!("oci-{page_size}"))).unwrap();
        let layer = dir_layer(&layout, &broot, &["etc/os-release", "var/lib/rpm/Packages"]);
        let image = image_of(&layout, "bdb:1", vec![layer]);
        let sbom = sbom::generate(&layout, &image, "el7-test").unwrap();
        assert_eq!(sbom.inventory.databases, vec!["var/lib/rpm/Packages"]);
        assert_eq!(sbom_rpm_set(&sbom), expected, "page size {page_size}");
    }
}

#[test]
fn apk_installed_database() {
    let dir = tempfile::tempdir().unwrap();
    let layout = Layout::open_or_create(dir.path()).unwrap();
    let installed = b"C:Q1SXmcpD7g==\nP:musl\nV:1.2.4_git20230717-r4\nA:x86_64\nS:383152\nI:622592\n\
T:the musl c library (libc) implementation\nU:https://musl.libc.org/\nL:MIT\no:musl\n\
m:Natanael Copa <ncopa@alpinelinux.org>\nt:1705064112\nc:4f9a9f6b\nF:lib\nR:ld-musl-x86_64.so.1\n\n\
C:Q1abc=\nP:busybox-binsh\nV:1.36.1-r15\nA:x86_64\nL:GPL-2.0-only\no:busybox\n\n\
C:Q1def=\nP:ca-certificates-bundle\nV:20230506-r0\nA:x86_64\nL:MPL-2.0 AND MIT\no:ca-certificates\n";
    let layer = tar_layer(
        &layout,
        &[
            (
                "etc/os-release",
                b"NAME=\"Alpine Linux\"\nID=alpine\nVERSION_ID=3.19.1\n",
            ),
            ("lib/apk/db/installed", installed),
        ],
    );
    let image = image_of(&layout, "alpine:1", vec![layer]);
    let sbom = sbom::generate(&layout, &image, "alpine").unwrap();
    let got: Vec<(&str, &str, Option<&str>)> = sbom
        .inventory
        .packages
        .iter()
        .map(|p| (p.name.as_str(), p.version.as_str(), p.license.as_deref()))
        .collect();
    assert_eq!(
        got,
        vec![
            ("busybox-binsh", "1.36.1-r15", Some("GPL-2.0-only")),
            (
                "ca-certificates-bundle",
                "20230506-r0",
                Some("MPL-2.0 AND MIT")
            ),
            ("musl", "1.2.4_git20230717-r4", Some("MIT")),
        ]
    );
    assert_eq!(
        sbom.inventory.packages[2].purl,
        "pkg:apk/alpine/musl@1.2.4_git20230717-r4?arch=x86_64"
    );
    let spdx = dir.path().join("apk.spdx.json");
    let cdx = dir.path().join("apk.cdx.json");
    std::fs::write(&spdx, sbom.to_json(Format::SpdxJson)).unwrap();
    std::fs::write(&cdx, sbom.to_json(Format::CycloneDxJson)).unwrap();
    assert_spdx_valid(&spdx);
    assert_cyclonedx_valid(&cdx);
}
