//! The package database files of an image's final filesystem, read from its layer blobs.
//!
//! Each layer (gzip, zstd or plain tar, sniffed from its first bytes) is streamed once, layers
//! in parallel (one worker per core); only entries at a database path are copied, into a
//! private temporary directory, so memory stays flat whatever the image size. A layer's whiteouts (`.wh.NAME`) and opaque markers
//! (`.wh..wh..opq`) hide what the layers below it had, then its own entries are laid over.

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::layout::Layout;
use crate::oci::Descriptor;

use super::SbomError;

/// Largest database file copied out of a layer (an rpmdb of a big image is ~200 MB).
pub const MAX_FILE_SIZE: u64 = 2 << 30;

/// Follow at most this many symlinks when resolving a database path.
const MAX_SYMLINKS: usize = 16;

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_MARKER: &str = ".wh..wh..opq";

/// Whether a path (relative, no leading `/`) is a file the SBOM reads.
pub fn is_database_path(path: &str) -> bool {
    const EXACT: &[&str] = &[
        "etc/os-release",
        "usr/lib/os-release",
        "var/lib/dpkg/status",
        "lib/apk/db/installed",
    ];
    const RPM_DIRS: &[&str] = &["var/lib/rpm/", "usr/lib/sysimage/rpm/"];
    const RPM_FILES: &[&str] = &[
        "rpmdb.sqlite",
        "rpmdb.sqlite-wal",
        "rpmdb.sqlite-shm",
        "Packages",
    ];
    if EXACT.contains(&path) {
        return true;
    }
    if let Some(name) = path.strip_prefix("var/lib/dpkg/status.d/") {
        return !name.is_empty() && !name.contains('/');
    }
    RPM_DIRS.iter().any(|d| {
        path.strip_prefix(d)
            .is_some_and(|name| RPM_FILES.contains(&name))
    })
}

#[derive(Debug)]
enum Node {
    /// A regular file, copied to this path in the temp dir.
    File(PathBuf),
    /// A symlink with its target as written.
    Symlink(String),
}

/// The collected database files (deleted with this value).
#[derive(Debug)]
pub struct DbFiles {
    dir: tempfile::TempDir,
    nodes: BTreeMap<String, Node>,
}

/// Reads one layer's database entries into the temp dir, under names of its own.
struct LayerReader<'a> {
    dir: &'a Path,
    layer: usize,
    counter: u64,
}

/// What one layer does to the database paths.
#[derive(Default)]
struct LayerChanges {
    added: BTreeMap<String, Node>,
    /// Whited-out paths (and everything below them).
    removed: Vec<String>,
    /// Opaque directories: everything below them in lower layers is hidden.
    opaque: Vec<String>,
}

impl DbFiles {
    fn new() -> Result<Self, SbomError> {
        let dir = tempfile::Builder::new()
            .prefix("wpimg-sbom-")
            .tempdir()
            .map_err(|source| SbomError::Io {
                context: "create a temporary directory for package databases".into(),
                source,
            })?;
        Ok(Self {
            dir,
            nodes: BTreeMap::new(),
        })
    }

    /// Stream `layers` (base first) from the layout and keep the database files of the result.
    pub fn collect(layout: &Layout, layers: &[Descriptor]) -> Result<Self, SbomError> {
        let mut files = Self::new()?;
        let dir = files.dir.path().to_path_buf();
        let changes = in_parallel(layers.len(), |i| {
            let layer = &layers[i];
            let layer_err = |source| SbomError::Layer {
                digest: layer.digest.clone(),
                source,
            };
            let blob = layout.open_blob(&layer.digest)?;
            let reader = decompress(blob).map_err(layer_err)?;
            LayerReader::new(&dir, i).read(reader).map_err(layer_err)
        })?;
        for c in changes {
            files.apply(c);
        }
        Ok(files)
    }

    /// Collect from tar streams directly (each already uncompressed or compressed), base first.
    pub fn collect_from_readers<R: Read>(
        layers: impl IntoIterator<Item = R>,
    ) -> Result<Self, SbomError> {
        let mut files = Self::new()?;
        for (i, r) in layers.into_iter().enumerate() {
            let io_err = |source| SbomError::Io {
                context: format!("read layer {i}"),
                source,
            };
            let reader = decompress(r).map_err(io_err)?;
            let changes = LayerReader::new(files.dir.path(), i)
                .read(reader)
                .map_err(io_err)?;
            files.apply(changes);
        }
        Ok(files)
    }

    fn apply(&mut self, changes: LayerChanges) {
        let hidden = |key: &str| {
            changes.opaque.iter().any(|d| is_below(key, d))
                || changes.removed.iter().any(|r| key == r || is_below(key, r))
        };
        let gone: Vec<String> = self
            .nodes
            .keys()
            .filter(|k| hidden(k) || changes.added.contains_key(*k))
            .cloned()
            .collect();
        for k in gone {
            if let Some(Node::File(p)) = self.nodes.remove(&k) {
                let _ = std::fs::remove_file(p);
            }
        }
        self.nodes.extend(changes.added);
    }

    /// The temp copy of the regular file at `path` (symlinks among database paths followed).
    pub fn file(&self, path: &str) -> Option<PathBuf> {
        let mut path = path.to_string();
        for _ in 0..MAX_SYMLINKS {
            match self.nodes.get(&path)? {
                Node::File(p) => return Some(p.clone()),
                Node::Symlink(target) => {
                    let parent = path.rsplit_once('/').map(|(p, _)| p).unwrap_or("");
                    path = resolve(parent, target)?;
                }
            }
        }
        None
    }

    /// The first of `paths` present, with its temp copy.
    pub fn first_of(&self, paths: &[&str]) -> Option<(String, PathBuf)> {
        paths
            .iter()
            .find_map(|p| self.file(p).map(|f| (p.to_string(), f)))
    }

    /// Regular files directly inside `dir` (sorted), with their temp copies.
    pub fn children(&self, dir: &str) -> Vec<(String, PathBuf)> {
        self.nodes
            .keys()
            .filter(|k| {
                k.strip_prefix(dir)
                    .and_then(|r| r.strip_prefix('/'))
                    .is_some_and(|name| !name.is_empty() && !name.contains('/'))
            })
            .filter_map(|k| self.file(k).map(|f| (k.clone(), f)))
            .collect()
    }

    /// Paths of everything kept (for tests and diagnostics).
    pub fn paths(&self) -> Vec<String> {
        self.nodes.keys().cloned().collect()
    }
}

impl<'a> LayerReader<'a> {
    fn new(dir: &'a Path, layer: usize) -> Self {
        Self {
            dir,
            layer,
            counter: 0,
        }
    }

    fn read(&mut self, reader: impl Read) -> io::Result<LayerChanges> {
        let mut changes = LayerChanges::default();
        let mut archive = tar::Archive::new(reader);
        for entry in archive.entries()? {
            let mut entry = entry?;
            let Some(path) = normalize(&entry.path_bytes()) else {
                continue;
            };
            let (parent, base) = match path.rsplit_once('/') {
                Some((p, b)) => (p.to_string(), b),
                None => (String::new(), path.as_str()),
            };
            if base == OPAQUE_MARKER {
                changes.opaque.push(parent);
                continue;
            }
            if let Some(hidden) = base.strip_prefix(WHITEOUT_PREFIX) {
                changes.removed.push(join(&parent, hidden));
                continue;
            }
            if !is_database_path(&path) {
                continue;
            }
            let kind = entry.header().entry_type();
            if kind.is_file() {
                let dest = self.copy_out(&mut entry, &path)?;
                changes.added.insert(path, Node::File(dest));
            } else if kind.is_symlink() {
                let target = entry
                    .link_name_bytes()
                    .map(|t| String::from_utf8_lossy(&t).into_owned())
                    .unwrap_or_default();
                changes.added.insert(path, Node::Symlink(target));
            } else if kind.is_hard_link() {
                let target = entry.link_name_bytes().and_then(|t| normalize(&t));
                let src = target.and_then(|t| match changes.added.get(&t) {
                    Some(Node::File(p)) => Some(p.clone()),
                    _ => None,
                });
                match src {
                    Some(src) => {
                        let dest = self.copy_file(&src)?;
                        changes.added.insert(path, Node::File(dest));
                    }
                    None => changes.removed.push(path),
                }
            } else {
                // A directory or device where a database file was: the file is gone.
                changes.removed.push(path);
            }
        }
        Ok(changes)
    }

    fn next_temp_path(&mut self) -> PathBuf {
        self.counter += 1;
        self.dir.join(format!("l{}-f{}", self.layer, self.counter))
    }

    fn copy_out(&mut self, entry: &mut impl Read, path: &str) -> io::Result<PathBuf> {
        let dest = self.next_temp_path();
        let mut out = fs_err::File::create(&dest)?;
        let n = io::copy(&mut entry.take(MAX_FILE_SIZE + 1), &mut out)?;
        if n > MAX_FILE_SIZE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("/{path} is larger than {MAX_FILE_SIZE} bytes"),
            ));
        }
        Ok(dest)
    }

    fn copy_file(&mut self, src: &Path) -> io::Result<PathBuf> {
        let dest = self.next_temp_path();
        fs_err::copy(src, &dest)?;
        Ok(dest)
    }
}

/// `work(i)` for every `i` below `n` on one worker per core; the results in order, or the
/// first error.
fn in_parallel<T: Send, E: Send>(
    n: usize,
    work: impl Fn(usize) -> Result<T, E> + Sync,
) -> Result<Vec<T>, E> {
    let workers = std::thread::available_parallelism()
        .map_or(1, |p| p.get())
        .min(n);
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Result<T, E>>>> = Mutex::new((0..n).map(|_| None).collect());
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let r = work(i);
                let failed = r.is_err();
                if let Ok(mut all) = results.lock() {
                    all[i] = Some(r);
                }
                if failed {
                    // The first error is the answer: leave the remaining layers.
                    next.store(n, Ordering::Relaxed);
                }
            });
        }
    });
    let all = results.into_inner().unwrap_or_else(|p| p.into_inner());
    let mut out = Vec::with_capacity(n);
    for r in all {
        match r {
            Some(Ok(v)) => out.push(v),
            Some(Err(e)) => return Err(e),
            None => {}
        }
    }
    Ok(out)
}

/// Wrap a layer stream in the decompressor its magic bytes call for.
pub fn decompress<'a>(r: impl Read + 'a) -> io::Result<Box<dyn Read + 'a>> {
    let mut br = BufReader::with_capacity(256 * 1024, r);
    let head = br.fill_buf()?;
    if head.starts_with(&[0x1f, 0x8b]) {
        Ok(Box::new(flate2::bufread::MultiGzDecoder::new(br)))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Ok(Box::new(zstd::stream::read::Decoder::with_buffer(br)?))
    } else {
        Ok(Box::new(br))
    }
}

/// A tar path as a relative path without `./`, leading or trailing `/`; `None` for the root.
fn normalize(raw: &[u8]) -> Option<String> {
    let s = String::from_utf8_lossy(raw);
    let mut parts: Vec<&str> = Vec::new();
    for p in s.split('/') {
        match p {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
}

fn join(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        name.to_string()
    } else {
        format!("{parent}/{name}")
    }
}

fn is_below(path: &str, dir: &str) -> bool {
    dir.is_empty() || path.strip_prefix(dir).is_some_and(|r| r.starts_with('/'))
}

/// A symlink target resolved against its directory (absolute targets from the image root).
fn resolve(parent: &str, target: &str) -> Option<String> {
    if target.starts_with('/') {
        normalize(target.as_bytes())
    } else {
        normalize(join(parent, target).as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tar with (path, content) files; content `None` makes a directory, `Some("->x")` a
    /// symlink to x.
    pub(crate) fn tar_of(entries: &[(&str, Option<&str>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (path, content) in entries {
            let mut h = tar::Header::new_gnu();
            match content {
                None => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_size(0);
                    h.set_mode(0o755);
                    b.append_data(&mut h, path, io::empty()).unwrap();
                }
                Some(c) if c.starts_with("->") => {
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_size(0);
                    h.set_mode(0o777);
                    b.append_link(&mut h, path, &c[2..]).unwrap();
                }
                Some(c) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_size(c.len() as u64);
                    h.set_mode(0o644);
                    b.append_data(&mut h, path, c.as_bytes()).unwrap();
                }
            }
        }
        b.into_inner().unwrap()
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn content(f: &DbFiles, path: &str) -> Option<String> {
        f.file(path).map(|p| std::fs::read_to_string(p).unwrap())
    }

    #[test]
    fn keeps_only_database_files() {
        assert!(is_database_path("var/lib/dpkg/status"));
        assert!(is_database_path("var/lib/dpkg/status.d/libc6"));
        assert!(!is_database_path("var/lib/dpkg/status.d/x/y"));
        assert!(!is_database_path("var/lib/dpkg/status-old"));
        assert!(is_database_path("usr/lib/sysimage/rpm/rpmdb.sqlite"));
        assert!(!is_database_path("var/lib/rpm/Name"));
        let base = tar_of(&[
            ("./etc/", None),
            ("./etc/passwd", Some("root:x:0:0")),
            ("./var/lib/dpkg/status", Some("A")),
        ]);
        let f = DbFiles::collect_from_readers([&base[..]]).unwrap();
        assert_eq!(f.paths(), vec!["var/lib/dpkg/status"]);
    }

    #[test]
    fn upper_layers_replace_whiteout_and_hide() {
        let base = tar_of(&[
            ("var/lib/dpkg/status", Some("base")),
            ("var/lib/dpkg/status.d/a", Some("a")),
            ("var/lib/dpkg/status.d/b", Some("b")),
            ("lib/apk/db/installed", Some("apk")),
            ("usr/lib/os-release", Some("ID=debian")),
            ("etc/os-release", Some("->../usr/lib/os-release")),
        ]);
        let upper = tar_of(&[
            ("var/lib/dpkg/status", Some("upper")),
            ("var/lib/dpkg/status.d/.wh.a", Some("")),
            ("lib/apk/.wh.db", Some("")),
        ]);
        let f = DbFiles::collect_from_readers([&gzip(&base)[..], &upper[..]]).unwrap();
        assert_eq!(content(&f, "var/lib/dpkg/status").as_deref(), Some("upper"));
        assert_eq!(
            f.children("var/lib/dpkg/status.d")
                .iter()
                .map(|(p, _)| p.as_str())
                .collect::<Vec<_>>(),
            vec!["var/lib/dpkg/status.d/b"]
        );
        assert_eq!(content(&f, "lib/apk/db/installed"), None);
        assert_eq!(content(&f, "etc/os-release").as_deref(), Some("ID=debian"));
    }

    #[test]
    fn opaque_directory_hides_lower_but_keeps_own_entries() {
        let base = tar_of(&[
            ("var/lib/dpkg/status.d/a", Some("a")),
            ("var/lib/dpkg/status.d/b", Some("b")),
        ]);
        // The marker may come after the layer's own entries: it still hides only lower ones.
        let upper = tar_of(&[
            ("var/lib/dpkg/status.d/c", Some("c")),
            ("var/lib/dpkg/status.d/.wh..wh..opq", Some("")),
        ]);
        let zst = zstd::encode_all(&upper[..], 3).unwrap();
        let f = DbFiles::collect_from_readers([&base[..], &zst[..]]).unwrap();
        assert_eq!(f.paths(), vec!["var/lib/dpkg/status.d/c"]);
    }

    #[test]
    fn directory_over_file_and_hard_links() {
        let base = tar_of(&[("var/lib/rpm/Packages", Some("bdb"))]);
        let upper = tar_of(&[("var/lib/rpm/Packages", None)]);
        let f = DbFiles::collect_from_readers([&base[..], &upper[..]]).unwrap();
        assert!(f.paths().is_empty());

        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(3);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, "etc/os-release", &b"ID="[..])
            .unwrap();
        let mut l = tar::Header::new_gnu();
        l.set_entry_type(tar::EntryType::Link);
        l.set_size(0);
        b.append_link(&mut l, "usr/lib/os-release", "etc/os-release")
            .unwrap();
        let t = b.into_inner().unwrap();
        let f = DbFiles::collect_from_readers([&t[..]]).unwrap();
        assert_eq!(content(&f, "usr/lib/os-release").as_deref(), Some("ID="));
    }

    #[test]
    fn symlink_loops_end() {
        let t = tar_of(&[
            ("etc/os-release", Some("->../usr/lib/os-release")),
            ("usr/lib/os-release", Some("->/etc/os-release")),
        ]);
        let f = DbFiles::collect_from_readers([&t[..]]).unwrap();
        assert_eq!(f.file("etc/os-release"), None);
    }

    #[test]
    fn garbage_layer_is_an_error() {
        let bad = gzip(b"this is not a tar archive, just some text that is long enough");
        assert!(DbFiles::collect_from_readers([&bad[..400.min(bad.len())]]).is_err());
    }
}
