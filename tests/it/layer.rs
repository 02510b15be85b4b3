//! Layer production without Docker: a synthetic overlayfs upper directory and the equivalent
//! Docker-style layer tar (in Docker's order and shuffled) must give the same layer.
//! Needs root (mknod, chown, trusted.* xattrs), like reading a real upper directory does.

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;

use crate::common::layer::list_layer;
use wpimg::layer::{
    layer_from_dir, layer_from_tar, layer_from_tar_file, Compression, LayerError, LayerInfo,
    LayerOptions,
};
use wpimg::layout::Layout;

const MTIME: i64 = 1_600_000_000;
/// `setcap cap_net_raw+ep` (VFS_CAP_REVISION_2, effective).
const CAP: [u8; 20] = [
    1, 0, 0, 2, 0, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
];

fn require_root() {
    assert!(
        unsafe { libc::geteuid() } == 0,
        "these tests need root (mknod, chown, trusted.* xattrs): run them as root"
    );
}

fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn setxattr(p: &Path, name: &str, v: &[u8]) {
    let n = CString::new(name).unwrap();
    let rc = unsafe {
        libc::lsetxattr(
            cstr(p).as_ptr(),
            n.as_ptr(),
            v.as_ptr() as *const libc::c_void,
            v.len(),
            0,
        )
    };
    assert_eq!(
        rc,
        0,
        "setxattr {name} on {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
}

fn mknod(p: &Path, mode: libc::mode_t, dev: libc::dev_t) {
    let rc = unsafe { libc::mknod(cstr(p).as_ptr(), mode, dev) };
    assert_eq!(
        rc,
        0,
        "mknod {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
}

fn chown(p: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::lchown(p, Some(uid), Some(gid)).unwrap();
}

fn chmod(p: &Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
}

fn set_mtime(p: &Path, t: i64) {
    let ts = [
        libc::timespec {
            tv_sec: t,
            tv_nsec: 0,
        },
        libc::timespec {
            tv_sec: t,
            tv_nsec: 0,
        },
    ];
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            cstr(p).as_ptr(),
            ts.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert_eq!(rc, 0, "utimensat {}", p.display());
}

fn big_data() -> Vec<u8> {
    let mut x: u64 = 7;
    (0..3 * 1024 * 1024 + 333)
        .map(|i| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            if i % 3 == 0 {
                (x >> 59) as u8
            } else {
                b"abcdefgh"[i % 8]
            }
        })
        .collect()
}

fn long_name() -> String {
    "n".repeat(120)
}

fn long_target() -> String {
    format!("../../{}", "t".repeat(150))
}

/// Entries of the synthetic change set, in Docker's overlay2 order: (path, kind).
/// kinds: d=dir, f=file, h=hardlink, l=symlink, w=whiteout, o=opaque marker, p=fifo
fn docker_order() -> Vec<(&'static str, char)> {
    vec![
        ("data", 'd'),
        ("data/a", 'f'),
        ("data/b", 'h'),
        ("deep", 'd'),
        ("deep/LONG", 'f'),
        ("etc", 'd'),
        ("etc/app", 'd'),
        ("etc/app/.wh..wh..opq", 'o'),
        ("etc/app/conf", 'f'),
        ("etc/.wh.removed", 'w'),
        ("root", 'd'),
        ("root/.ansible", 'd'),
        ("root/.ansible/tmp", 'd'),
        ("root/.ansible/tmp/x", 'f'),
        ("run", 'd'),
        ("run/fifo", 'p'),
        ("tmp", 'd'),
        ("tmp/junk", 'f'),
        ("usr", 'd'),
        ("usr/bin", 'd'),
        ("usr/bin/big", 'f'),
        ("usr/bin/link", 'l'),
        ("usr/bin/longlink", 'l'),
        ("usr/bin/tool", 'f'),
    ]
}

fn mode_of(path: &str) -> u32 {
    match path {
        "etc/app" => 0o750,
        "tmp" => 0o1777,
        "usr/bin/tool" => 0o4755,
        "data/a" | "data/b" => 0o2640,
        _ if path.ends_with("fifo") => 0o600,
        _ => 0o755,
    }
}

fn owner_of(path: &str) -> (u32, u32) {
    if path == "usr/bin/tool" {
        (1234, 1234)
    } else if path.starts_with("data/") {
        (5_000_000, 7)
    } else {
        (0, 0)
    }
}

fn content_of(path: &str) -> Vec<u8> {
    match path {
        "usr/bin/big" => big_data(),
        "usr/bin/tool" => b"#!/bin/sh\necho tool\n".to_vec(),
        p => format!("content of {p}\n").into_bytes(),
    }
}

fn real(path: &str) -> String {
    path.replace("LONG", &long_name())
}

/// Create the overlayfs upper directory for the change set.
fn make_upper(root: &Path) {
    require_root();
    for (p, k) in docker_order() {
        let p = real(p);
        let abs = root.join(&p);
        match k {
            'd' => fs::create_dir(&abs).unwrap(),
            'f' => fs::write(&abs, content_of(&p)).unwrap(),
            'h' => fs::hard_link(root.join("data/a"), &abs).unwrap(),
            'l' if p.ends_with("longlink") => symlink(long_target(), &abs).unwrap(),
            'l' => symlink("tool", &abs).unwrap(),
            'p' => mknod(&abs, libc::S_IFIFO | 0o600, 0),
            'w' => {
                let target = abs
                    .parent()
                    .unwrap()
                    .join(&abs.file_name().unwrap().to_str().unwrap()[4..]);
                mknod(&target, libc::S_IFCHR | 0o600, 0);
            }
            'o' => setxattr(abs.parent().unwrap(), "trusted.overlay.opaque", b"y"),
            _ => unreachable!(),
        }
    }
    // Overlay bookkeeping that must never reach the layer.
    setxattr(&root.join("usr"), "trusted.overlay.origin", b"\x00\xfb\x21");
    // Metadata last, children before parents (creating children touches the parent).
    let mut all = docker_order();
    all.reverse();
    for (p, k) in all {
        let p = real(p);
        let abs = root.join(&p);
        match k {
            'o' => continue,
            'w' => {
                let target = abs
                    .parent()
                    .unwrap()
                    .join(&abs.file_name().unwrap().to_str().unwrap()[4..]);
                set_mtime(&target, MTIME);
                continue;
            }
            'l' => {}
            _ => {
                let (u, g) = owner_of(&p);
                chown(&abs, u, g);
                chmod(&abs, mode_of(&p));
            }
        }
        set_mtime(&abs, MTIME + p.len() as i64);
    }
    // After chown, which clears file capabilities.
    setxattr(&root.join("usr/bin/tool"), "security.capability", &CAP);
    setxattr(&root.join("usr/bin/tool"), "user.test", b"1");
}

/// The layer tar Docker writes for the same changes (GNU long names, PAX xattrs, unames set,
/// whiteouts as mode-0600 files, opaque marker right after its directory).
fn make_docker_tar(order: &[(&str, char)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for &(p, k) in order {
        let p = real(p);
        let mut h = tar::Header::new_gnu();
        h.set_username("root").unwrap();
        h.set_groupname("root").unwrap();
        let (u, g) = owner_of(&p);
        h.set_uid(u as u64);
        h.set_gid(g as u64);
        h.set_mode(mode_of(&p));
        h.set_mtime((MTIME + p.len() as i64) as u64);
        h.set_size(0);
        let mut data: Vec<u8> = Vec::new();
        let name = match k {
            'd' => {
                h.set_entry_type(tar::EntryType::Directory);
                format!("{p}/")
            }
            'f' => {
                h.set_entry_type(tar::EntryType::Regular);
                data = content_of(&p);
                h.set_size(data.len() as u64);
                p.clone()
            }
            'h' => {
                h.set_entry_type(tar::EntryType::Link);
                b.append_link(&mut h, &p, "data/a").unwrap();
                continue;
            }
            'l' => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                let t = if p.ends_with("longlink") {
                    long_target()
                } else {
                    "tool".into()
                };
                b.append_link(&mut h, &p, t).unwrap();
                continue;
            }
            'p' => {
                h.set_entry_type(tar::EntryType::Fifo);
                p.clone()
            }
            'w' => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(0o600);
                p.clone()
            }
            'o' => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(0o750);
                h.set_mtime(0);
                p.clone()
            }
            _ => unreachable!(),
        };
        if p == "usr/bin/tool" {
            b.append_pax_extensions([
                ("SCHILY.xattr.security.capability", &CAP[..]),
                ("SCHILY.xattr.user.test", &b"1"[..]),
            ])
            .unwrap();
        }
        b.append_data(&mut h, name, &data[..]).unwrap();
    }
    b.into_inner().unwrap()
}

fn opts(c: Compression, sde: Option<i64>) -> LayerOptions {
    LayerOptions {
        compression: c,
        excludes: vec!["/tmp/*".into()],
        source_date_epoch: sde,
        threads: 2,
        ..Default::default()
    }
}

fn all_paths(upper: &Path, layout: &Layout, o: &LayerOptions) -> Vec<(&'static str, LayerInfo)> {
    let dir = layer_from_dir(upper, layout, o).unwrap();
    let docker = make_docker_tar(&docker_order());
    let stream = layer_from_tar(&docker[..], layout, o).unwrap();
    let mut reversed = docker_order();
    reversed.reverse();
    let shuffled = layer_from_tar(&make_docker_tar(&reversed)[..], layout, o).unwrap();
    let mut bytesorted = docker_order();
    bytesorted.sort_by(|a, b| a.0.cmp(b.0));
    let file = tempfile::NamedTempFile::new().unwrap();
    fs::write(file.path(), make_docker_tar(&bytesorted)).unwrap();
    let from_file = layer_from_tar_file(file.path(), layout, o).unwrap();
    vec![
        ("upper dir", dir),
        ("docker tar stream", stream),
        ("reversed tar stream", shuffled),
        ("byte-sorted tar file", from_file),
    ]
}

fn assert_same(results: &[(&str, LayerInfo)]) {
    let (n0, first) = &results[0];
    for (n, r) in &results[1..] {
        assert_eq!(r, first, "{n} differs from {n0}");
    }
}

#[test]
fn upper_dir_and_docker_tar_give_identical_layers() {
    let t = tempfile::tempdir().unwrap();
    let upper = t.path().join("upper");
    fs::create_dir(&upper).unwrap();
    make_upper(&upper);
    let layout = Layout::open_or_create(t.path().join("oci")).unwrap();
    for c in [Compression::Gzip, Compression::Zstd] {
        for sde in [None, Some(1_600_000_010)] {
            let results = all_paths(&upper, &layout, &opts(c, sde));
            assert_same(&results);
            assert_eq!(results[0].1.media_type, c.media_type());
        }
    }
    // Content check of the canonical form.
    let info = layer_from_dir(&upper, &layout, &opts(Compression::Gzip, None)).unwrap();
    let l = list_layer(&layout, &info);
    let paths: Vec<&str> = l.iter().map(|e| e.path.as_str()).collect();
    let long = format!("deep/{}", long_name());
    assert_eq!(
        paths,
        [
            "data/",
            "data/a",
            "data/b",
            "deep/",
            &long,
            "etc/",
            "etc/app/",
            "etc/app/.wh..wh..opq",
            "etc/app/conf",
            "etc/.wh.removed",
            "root/",
            "run/",
            "run/fifo",
            "tmp/",
            "usr/",
            "usr/bin/",
            "usr/bin/big",
            "usr/bin/link",
            "usr/bin/longlink",
            "usr/bin/tool"
        ]
    );
    let get = |p: &str| l.iter().find(|e| e.path == p).unwrap();
    let tool = get("usr/bin/tool");
    assert_eq!((tool.mode, tool.uid, tool.gid), (0o4755, 1234, 1234));
    assert_eq!(
        tool.xattrs,
        vec![
            ("security.capability".to_string(), CAP.to_vec()),
            ("user.test".to_string(), b"1".to_vec())
        ]
    );
    assert!(l
        .iter()
        .all(|e| e.xattrs.iter().all(|(k, _)| !k.starts_with("trusted."))));
    let b = get("data/b");
    assert_eq!((b.ty, b.link.as_str(), b.uid), ('1', "data/a", 5_000_000));
    assert_eq!(get("data/a").mode, 0o2640);
    assert_eq!(get("tmp/").mode, 0o1777);
    assert_eq!(get("usr/bin/longlink").link, long_target());
    assert_eq!(get(&long).mtime, (MTIME + long.len() as i64) as u64);
    let wh = get("etc/.wh.removed");
    assert_eq!((wh.ty, wh.mode, wh.mtime), ('0', 0, 0));
    assert_eq!(
        get("usr/bin/big").data,
        wpimg::oci::Digest::of_bytes(&big_data()).short()
    );
}

#[test]
fn excluded_hardlink_target_promotes_the_next_link() {
    let t = tempfile::tempdir().unwrap();
    let upper = t.path().join("upper");
    fs::create_dir(&upper).unwrap();
    make_upper(&upper);
    let layout = Layout::open_or_create(t.path().join("oci")).unwrap();
    let mut o = opts(Compression::Gzip, None);
    o.excludes.push("/data/a".into());
    let results = all_paths(&upper, &layout, &o);
    assert_same(&results);
    let l = list_layer(&layout, &results[0].1);
    let b = l.iter().find(|e| e.path == "data/b").unwrap();
    assert_eq!(b.ty, '0');
    assert!(!b.data.is_empty());
    assert!(!l.iter().any(|e| e.path == "data/a"));
}

/// Golden digests: the same changes with SOURCE_DATE_EPOCH give the same layer on any machine.
#[test]
fn golden_digests_with_source_date_epoch() {
    let t = tempfile::tempdir().unwrap();
    let upper = t.path().join("upper");
    fs::create_dir(&upper).unwrap();
    make_upper(&upper);
    // mtimes after SOURCE_DATE_EPOCH must not matter.
    set_mtime(&upper.join("usr/bin/tool"), 2_000_000_000);
    let layout = Layout::open_or_create(t.path().join("oci")).unwrap();
    let o = |c| LayerOptions {
        compression: c,
        source_date_epoch: Some(1_500_000_000),
        threads: 2,
        ..Default::default()
    };
    let gz = layer_from_dir(&upper, &layout, &o(Compression::Gzip)).unwrap();
    let gz2 = layer_from_tar(
        &make_docker_tar(&docker_order())[..],
        &layout,
        &o(Compression::Gzip),
    )
    .unwrap();
    let zs = layer_from_dir(&upper, &layout, &o(Compression::Zstd)).unwrap();
    assert_eq!(gz, gz2);
    assert_eq!(gz.diff_id, zs.diff_id);
    assert_eq!(
        (
            gz.diff_id.to_string(),
            gz.digest.to_string(),
            zs.digest.to_string()
        ),
        (
            "sha256:0b146734b54622ab1eb1ba9d22653b21b9de275e6f6a820d8f22a3c7db8559b6".to_string(),
            "sha256:13776255bacf530f31e54707b0a9cddfbe827f1f3799545c584b1c9c70c5d09a".to_string(),
            "sha256:c177b78e70c383e7403185dc73afde645881339612bff2fc7c972c410f5edc2a".to_string()
        )
    );
}

#[test]
fn thread_count_does_not_change_the_layer() {
    let t = tempfile::tempdir().unwrap();
    let upper = t.path().join("upper");
    fs::create_dir(&upper).unwrap();
    make_upper(&upper);
    let layout = Layout::open_or_create(t.path().join("oci")).unwrap();
    for c in [Compression::Gzip, Compression::Zstd] {
        let mut o = opts(c, None);
        o.threads = 1;
        let one = layer_from_dir(&upper, &layout, &o).unwrap();
        o.threads = 3;
        assert_eq!(one, layer_from_dir(&upper, &layout, &o).unwrap(), "{c}");
    }
}

fn ingest_is_empty(layout: &Layout) -> bool {
    fs::read_dir(layout.dir().join("ingest"))
        .map(|d| d.count() == 0)
        .unwrap_or(true)
}

#[test]
fn failures_name_the_culprit_and_leave_no_temp_files() {
    let t = tempfile::tempdir().unwrap();
    let layout = Layout::open_or_create(t.path().join("oci")).unwrap();

    // Truncated tar: the entry is named, the temp blob is gone.
    let tar = make_docker_tar(&docker_order());
    let cut = tar.len() / 2;
    let e = layer_from_tar(&tar[..cut], &layout, &LayerOptions::default()).unwrap_err();
    assert!(matches!(e, LayerError::Tar { .. }), "{e}");
    assert!(e.to_string().contains("usr/bin/big"), "{e}");
    assert!(ingest_is_empty(&layout));

    // Bad exclude: index and pattern.
    let o = LayerOptions {
        excludes: vec!["/ok".into(), "relative/x".into()],
        ..Default::default()
    };
    let e = layer_from_tar(&tar[..], &layout, &o).unwrap_err();
    match e {
        LayerError::Exclude(x) => assert_eq!((x.index, x.pattern.as_str()), (1, "relative/x")),
        other => panic!("{other}"),
    }

    // Bad level.
    let o = LayerOptions {
        compression: Compression::Gzip,
        level: Some(12),
        ..Default::default()
    };
    assert!(matches!(
        layer_from_tar(&tar[..], &layout, &o),
        Err(LayerError::InvalidLevel { level: 12, .. })
    ));

    // Overlay redirect_dir: refuse, naming the directory.
    let upper = t.path().join("upper");
    fs::create_dir_all(upper.join("moved")).unwrap();
    setxattr(&upper.join("moved"), "trusted.overlay.redirect", b"/orig");
    let e = layer_from_dir(&upper, &layout, &LayerOptions::default()).unwrap_err();
    assert!(
        e.to_string().contains("moved") && e.to_string().contains("redirect"),
        "{e}"
    );
    assert!(ingest_is_empty(&layout));
    assert_eq!(
        fs::read_dir(layout.dir().join("blobs/sha256"))
            .unwrap()
            .count(),
        0,
        "no blob may be committed by a failed build"
    );
}

#[test]
fn empty_changes_give_an_empty_layer() {
    let t = tempfile::tempdir().unwrap();
    let layout = Layout::open_or_create(t.path().join("oci")).unwrap();
    let upper = t.path().join("upper");
    fs::create_dir(&upper).unwrap();
    let o = LayerOptions::default();
    let a = layer_from_dir(&upper, &layout, &o).unwrap();
    let b = layer_from_tar(&[0u8; 1024][..], &layout, &o).unwrap();
    assert_eq!(a, b);
    assert_eq!((a.entries, a.uncompressed_size), (0, 1024));
    assert_eq!(
        a.descriptor().media_type,
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );
}
