//! Squashing: several layers (bottom first) merged into one whose filesystem over any lower
//! layers is the same as theirs, as wpimg writes it itself: last writer wins, a whiteout
//! deletes what lower new layers made (and stays, for what the layers below may hold), a
//! directory that replaces a deleted path or a non-directory becomes opaque, hard links keep
//! the content they had when they were made.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};

use super::canon::{cmp_paths, Entry, Kind, TarWriter, OPAQUE, WH};
use super::compress::Dest;
use super::tarin::{append, out_err, parse};
use super::watch::Watch;
use super::{LayerError, LayerInfo, LayerOptions};
use crate::layout::Layout;
use crate::oci::Descriptor;

/// A regular file's data: (layer index, data offset in that layer's tar).
type Inode = (usize, u64);

#[derive(Debug)]
enum Src {
    /// A regular file with this data.
    Data(Inode),
    /// A hard link to the inode it resolved to when it was made.
    Link(Inode),
    /// A hard link to a path below the squashed layers.
    Below,
    /// No data (directory, symlink, device, fifo).
    None,
}

#[derive(Debug)]
enum Node {
    Whiteout,
    Present {
        entry: Entry,
        src: Src,
        opaque: bool,
    },
}

/// The merged state of the layers applied so far, by path.
#[derive(Default)]
struct Merge {
    nodes: BTreeMap<Vec<u8>, Node>,
    /// Every regular file's entry by inode (for links whose first path changed later).
    inodes: HashMap<Inode, Entry>,
}

fn unsupported(path: &[u8], what: &str) -> LayerError {
    LayerError::Unsupported {
        path: String::from_utf8_lossy(path).into_owned().into(),
        what: what.to_string(),
    }
}

fn parent_and_name(p: &[u8]) -> (&[u8], &[u8]) {
    match p.iter().rposition(|c| *c == b'/') {
        Some(i) => (&p[..i], &p[i + 1..]),
        None => (&b""[..], p),
    }
}

fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = dir.to_vec();
    if !p.is_empty() {
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

impl Merge {
    /// Remove everything below `p` (not `p`).
    fn remove_below(&mut self, p: &[u8]) {
        let mut lo = p.to_vec();
        lo.push(b'/');
        let mut hi = p.to_vec();
        hi.push(b'/' + 1);
        let doomed: Vec<Vec<u8>> = self.nodes.range(lo..hi).map(|(k, _)| k.clone()).collect();
        for k in doomed {
            self.nodes.remove(&k);
        }
    }

    fn inode_of(&self, target: &[u8]) -> Option<Inode> {
        match self.nodes.get(target) {
            Some(Node::Present {
                src: Src::Data(i) | Src::Link(i),
                ..
            }) => Some(*i),
            _ => None,
        }
    }

    /// Apply one entry of layer `layer` (data at `off`).
    fn apply(&mut self, layer: usize, e: Entry, off: u64) -> Result<(), LayerError> {
        match e.kind {
            Kind::Whiteout => {
                let (dir, name) = parent_and_name(&e.path);
                let target = join(dir, &name[WH.len()..]);
                self.remove_below(&target);
                self.nodes.insert(target, Node::Whiteout);
            }
            Kind::Opaque => {
                let (dir, _) = parent_and_name(&e.path);
                let dir = dir.to_vec();
                self.remove_below(&dir);
                match self.nodes.get_mut(&dir) {
                    Some(Node::Present {
                        entry,
                        opaque,
                        src: Src::None,
                    }) if entry.kind == Kind::Dir => *opaque = true,
                    _ => return Err(unsupported(&e.path, "opaque marker without its directory")),
                }
            }
            Kind::Dir => {
                let path = e.path.clone();
                let node = match self.nodes.remove(&path) {
                    Some(Node::Present { entry, opaque, .. }) if entry.kind == Kind::Dir => {
                        Node::Present {
                            entry: e,
                            src: Src::None,
                            opaque,
                        }
                    }
                    // A directory over a deleted path or a non-directory hides what is below.
                    Some(_) => Node::Present {
                        entry: e,
                        src: Src::None,
                        opaque: true,
                    },
                    None => Node::Present {
                        entry: e,
                        src: Src::None,
                        opaque: false,
                    },
                };
                self.nodes.insert(path, node);
            }
            kind => {
                let src = match kind {
                    Kind::Regular => {
                        self.inodes.insert((layer, off), e.clone());
                        Src::Data((layer, off))
                    }
                    Kind::Hardlink => match self.inode_of(&e.link) {
                        Some(i) => Src::Link(i),
                        None if self.nodes.contains_key(&e.link) => {
                            return Err(unsupported(&e.path, "hard link to a non-file"))
                        }
                        None => Src::Below,
                    },
                    _ => Src::None,
                };
                self.remove_below(&e.path);
                self.nodes.insert(
                    e.path.clone(),
                    Node::Present {
                        entry: e,
                        src,
                        opaque: false,
                    },
                );
            }
        }
        Ok(())
    }

    /// The merged layer's entries in canonical order, with where each one's data is.
    fn finish(self) -> Result<Vec<(Entry, Option<Inode>)>, LayerError> {
        let mut out: Vec<(Entry, Option<Inode>)> = Vec::new();
        let mut groups: HashMap<Inode, Vec<usize>> = HashMap::new();
        for (path, node) in &self.nodes {
            match node {
                Node::Whiteout => {
                    let (dir, name) = parent_and_name(path);
                    let mut wh = WH.to_vec();
                    wh.extend_from_slice(name);
                    out.push((Entry::new(join(dir, &wh), Kind::Whiteout), None));
                }
                Node::Present { entry, src, opaque } => {
                    match src {
                        Src::Data(i) | Src::Link(i) => {
                            groups.entry(*i).or_default().push(out.len())
                        }
                        Src::Below if self.nodes.contains_key(&entry.link) => {
                            return Err(unsupported(
                                path,
                                "hard link to a file below that a later layer changed",
                            ))
                        }
                        _ => {}
                    }
                    out.push((entry.clone(), None));
                    if *opaque {
                        out.push((Entry::new(join(path, OPAQUE), Kind::Opaque), None));
                    }
                }
            }
        }
        // Each inode's data goes with its first path in canonical order; the others link to it.
        for (inode, mut members) in groups {
            members.sort_by(|a, b| cmp_paths(&out[*a].0.path, &out[*b].0.path));
            let Some(data) = self.inodes.get(&inode) else {
                continue;
            };
            let first_path = out[members[0]].0.path.clone();
            for (n, m) in members.into_iter().enumerate() {
                let e = &mut out[m];
                if n == 0 {
                    let path = std::mem::take(&mut e.0.path);
                    e.0 = Entry {
                        path,
                        ..data.clone()
                    };
                    e.1 = Some(inode);
                } else {
                    e.0.kind = Kind::Hardlink;
                    e.0.size = 0;
                    e.0.link = first_path.clone();
                }
            }
        }
        out.sort_by(|a, b| cmp_paths(&a.0.path, &b.0.path));
        Ok(out)
    }
}

/// A layer blob decompressed into an unlinked temp file of the layout.
fn spool(layout: &Layout, d: &Descriptor) -> Result<File, LayerError> {
    let ingest = layout.dir().join("ingest");
    let werr = |source| LayerError::Write {
        dir: ingest.clone(),
        source,
    };
    fs_err::create_dir_all(&ingest).map_err(werr)?;
    let mut f = tempfile::tempfile_in(&ingest).map_err(werr)?;
    let blob = io::BufReader::with_capacity(1 << 20, layout.open_blob(&d.digest)?);
    let rerr = |source| LayerError::Read {
        path: layout.blob_path(&d.digest),
        source,
    };
    let mut r: Box<dyn Read> = if d.media_type.ends_with("+zstd") {
        Box::new(zstd::stream::read::Decoder::with_buffer(blob).map_err(rerr)?)
    } else if d.media_type.ends_with("gzip") {
        Box::new(flate2::read::MultiGzDecoder::new(blob))
    } else {
        Box::new(blob)
    };
    io::copy(&mut r, &mut f).map_err(rerr)?;
    f.seek(SeekFrom::Start(0)).map_err(werr)?;
    Ok(f)
}

/// Merge `layers` (bottom first, layout blobs) into one new layer blob.
pub fn squash(
    layers: &[Descriptor],
    layout: &Layout,
    opts: &LayerOptions,
) -> Result<LayerInfo, LayerError> {
    let mut merge = Merge::default();
    let mut files = Vec::with_capacity(layers.len());
    for (i, d) in layers.iter().enumerate() {
        let mut f = spool(layout, d)?;
        {
            let mut ar = tar::Archive::new(&mut f);
            let iter = ar
                .entries_with_seek()
                .map_err(|e| super::tarin::tar_err(b"", e))?;
            for item in iter {
                let mut te = item.map_err(|e| super::tarin::tar_err(b"", e))?;
                let Some(e) = parse(&mut te, opts.source_date_epoch)? else {
                    continue;
                };
                let off = te.raw_file_position();
                merge.apply(i, e, off)?;
            }
        }
        files.push(f);
    }
    let entries = merge.finish()?;
    let mut sink = Dest::Blob { layout, opts }.sink()?;
    let n = {
        let mut w = TarWriter::new(sink.writer(), Watch::new(opts));
        for (e, data) in &entries {
            match data {
                Some((layer, off)) if e.size > 0 => {
                    let f = &mut files[*layer];
                    f.seek(SeekFrom::Start(*off))
                        .map_err(|source| LayerError::Read {
                            path: "<squash spool>".into(),
                            source,
                        })?;
                    let mut r = (&mut *f).take(e.size);
                    append(&mut w, out_err(layout), e, Some(&mut r))?;
                }
                _ => append(&mut w, out_err(layout), e, None)?,
            }
        }
        let n = w.entries();
        w.finish().map_err(out_err(layout))?;
        n
    };
    sink.finish(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str, kind: Kind) -> Entry {
        let mut e = Entry::new(path.as_bytes().to_vec(), kind);
        if kind != Kind::Whiteout && kind != Kind::Opaque {
            e.mode = 0o755;
        }
        e
    }

    fn paths(m: Merge) -> Vec<String> {
        m.finish()
            .unwrap()
            .into_iter()
            .map(|(e, _)| {
                let kind = match e.kind {
                    Kind::Dir => "/",
                    Kind::Hardlink => "=",
                    _ => "",
                };
                format!("{}{kind}", String::from_utf8_lossy(&e.path))
            })
            .collect()
    }

    #[test]
    fn last_writer_wins_and_whiteouts_stay() {
        let mut m = Merge::default();
        m.apply(0, entry("a", Kind::Dir), 0).unwrap();
        m.apply(0, entry("a/x", Kind::Regular), 1).unwrap();
        m.apply(0, entry("a/y", Kind::Regular), 2).unwrap();
        m.apply(1, entry("a", Kind::Dir), 0).unwrap();
        m.apply(1, entry("a/.wh.x", Kind::Whiteout), 1).unwrap();
        m.apply(1, entry("etc", Kind::Dir), 2).unwrap();
        m.apply(1, entry("etc/.wh.motd", Kind::Whiteout), 3)
            .unwrap();
        assert_eq!(paths(m), ["a/", "a/.wh.x", "a/y", "etc/", "etc/.wh.motd"]);
    }

    #[test]
    fn a_directory_over_a_deleted_path_is_opaque() {
        let mut m = Merge::default();
        m.apply(0, entry(".wh.skel", Kind::Whiteout), 0).unwrap();
        m.apply(1, entry("skel", Kind::Dir), 0).unwrap();
        m.apply(1, entry("skel/only", Kind::Regular), 1).unwrap();
        assert_eq!(paths(m), ["skel/", "skel/.wh..wh..opq", "skel/only"]);
        let mut m = Merge::default();
        m.apply(0, entry("d", Kind::Dir), 0).unwrap();
        m.apply(0, entry("d/old", Kind::Regular), 1).unwrap();
        m.apply(1, entry("d", Kind::Dir), 0).unwrap();
        m.apply(1, entry("d/.wh..wh..opq", Kind::Opaque), 1)
            .unwrap();
        m.apply(1, entry("d/new", Kind::Regular), 2).unwrap();
        assert_eq!(paths(m), ["d/", "d/.wh..wh..opq", "d/new"]);
    }

    #[test]
    fn hard_links_keep_the_content_they_had() {
        let mut m = Merge::default();
        m.apply(0, entry("a", Kind::Regular), 10).unwrap();
        let mut l = entry("b", Kind::Hardlink);
        l.link = b"a".to_vec();
        m.apply(0, l, 20).unwrap();
        m.apply(1, entry("a", Kind::Regular), 5).unwrap();
        let out = m.finish().unwrap();
        let b = out.iter().find(|(e, _)| e.path == b"b").unwrap();
        assert_eq!(b.0.kind, Kind::Regular, "b keeps the first a's content");
        assert_eq!(b.1, Some((0, 10)));
        let a = out.iter().find(|(e, _)| e.path == b"a").unwrap();
        assert_eq!(a.1, Some((1, 5)));
    }

    #[test]
    fn a_file_replacing_a_directory_drops_its_contents() {
        let mut m = Merge::default();
        m.apply(0, entry("d", Kind::Dir), 0).unwrap();
        m.apply(0, entry("d/f", Kind::Regular), 1).unwrap();
        m.apply(1, entry("d", Kind::Regular), 0).unwrap();
        assert_eq!(paths(m), ["d"]);
    }
}
