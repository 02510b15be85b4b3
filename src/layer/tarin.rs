//! Layer tar input: normalise entries, stream them when in canonical order, otherwise re-read
//! them from a seekable file in canonical order.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use super::canon::{
    cmp_paths, normalize_path, AppendError, Entry, Kind, TarWriter, OPAQUE, WH, WH_META,
};
use super::compress::Dest;
use super::exclude::Excluder;
use super::watch::Watch;
use super::{LayerError, LayerInfo, LayerOptions};
use crate::layout::Layout;

pub(crate) fn tar_err(entry: &[u8], source: io::Error) -> LayerError {
    LayerError::Tar {
        entry: String::from_utf8_lossy(entry).into_owned(),
        source,
    }
}

fn unsupported(entry: &[u8], what: impl Into<String>) -> LayerError {
    LayerError::Unsupported {
        path: PathBuf::from(String::from_utf8_lossy(entry).into_owned()),
        what: what.into(),
    }
}

/// Turn a tar entry into a canonical entry (`None`: not part of the layer's content).
pub(crate) fn parse<R: Read>(
    e: &mut tar::Entry<'_, R>,
    sde: Option<i64>,
) -> Result<Option<Entry>, LayerError> {
    let raw_path = e.path_bytes().into_owned();
    let h = e.header();
    let ty = h.entry_type();
    let mut kind = match ty {
        tar::EntryType::Regular | tar::EntryType::Continuous => Kind::Regular,
        tar::EntryType::Directory => Kind::Dir,
        tar::EntryType::Symlink => Kind::Symlink,
        tar::EntryType::Link => Kind::Hardlink,
        tar::EntryType::Char => Kind::Char,
        tar::EntryType::Block => Kind::Block,
        tar::EntryType::Fifo => Kind::Fifo,
        tar::EntryType::XGlobalHeader => return Ok(None),
        other => {
            return Err(unsupported(
                &raw_path,
                format!("unsupported tar entry type {:?}", other.as_byte() as char),
            ))
        }
    };
    let path =
        normalize_path(&raw_path).ok_or_else(|| unsupported(&raw_path, "path contains '..'"))?;
    if path.is_empty() {
        return Ok(None);
    }
    let base = path.rsplit(|c| *c == b'/').next().unwrap_or(&path);
    if base == OPAQUE {
        kind = Kind::Opaque;
    } else if base.starts_with(WH_META) {
        return Ok(None);
    } else if base.starts_with(WH) {
        kind = Kind::Whiteout;
    }
    let terr = |source| tar_err(&raw_path, source);
    let mut out = Entry::new(path, kind);
    out.mode = h.mode().map_err(terr)?;
    out.uid = h.uid().map_err(terr)?;
    out.gid = h.gid().map_err(terr)?;
    out.mtime = h.mtime().map_err(terr)? as i64;
    if kind == Kind::Regular {
        out.size = e.size();
    }
    if matches!(kind, Kind::Char | Kind::Block) {
        out.dev_major = h.device_major().map_err(terr)?.unwrap_or(0);
        out.dev_minor = h.device_minor().map_err(terr)?.unwrap_or(0);
    }
    if matches!(kind, Kind::Symlink | Kind::Hardlink) {
        let l = e
            .link_name_bytes()
            .map(|c| c.into_owned())
            .unwrap_or_default();
        out.link = if kind == Kind::Hardlink {
            normalize_path(&l)
                .ok_or_else(|| unsupported(&raw_path, "hard link target contains '..'"))?
        } else {
            l
        };
    }
    if let Some(pax) = e.pax_extensions().map_err(terr)? {
        for rec in pax {
            let rec = rec.map_err(terr)?;
            let k = rec.key_bytes();
            if let Some(name) = k.strip_prefix(b"SCHILY.xattr.") {
                out.xattrs.push((name.to_vec(), rec.value_bytes().to_vec()));
            } else if k == b"mtime" {
                // PAX mtime may be fractional; keep whole seconds (floor).
                if let Some(t) = rec.value().ok().and_then(|v| v.trim().parse::<f64>().ok()) {
                    out.mtime = t.floor() as i64;
                }
            }
        }
    }
    out.canonicalize(sde);
    Ok(Some(out))
}

/// Whether an entry is left out: the entry (for whiteouts: the path it deletes; for opaque
/// markers: their directory) or an ancestor is excluded.
fn excluded(x: &Excluder, e: &Entry) -> bool {
    match e.kind {
        Kind::Opaque => match e.path.iter().rposition(|c| *c == b'/') {
            Some(i) => x.excludes(&e.path[..i]),
            None => false,
        },
        Kind::Whiteout => {
            let (dir, name) = match e.path.iter().rposition(|c| *c == b'/') {
                Some(i) => (&e.path[..=i], &e.path[i + 1..]),
                None => (&b""[..], &e.path[..]),
            };
            let mut target = dir.to_vec();
            target.extend_from_slice(&name[WH.len()..]);
            x.excludes(&target)
        }
        _ => x.excludes(&e.path),
    }
}

/// Error constructor for writes into the layout.
pub(crate) fn out_err(layout: &Layout) -> impl Fn(io::Error) -> LayerError + '_ {
    |source| LayerError::Write {
        dir: layout.dir().to_path_buf(),
        source,
    }
}

pub(crate) fn append(
    w: &mut TarWriter<impl Write>,
    sink_err: impl Fn(io::Error) -> LayerError,
    e: &Entry,
    data: Option<&mut dyn Read>,
) -> Result<(), LayerError> {
    w.append(e, data).map_err(|err| match err {
        AppendError::Out(source) => sink_err(source),
        AppendError::In(source) => tar_err(&e.path, source),
        AppendError::Short(n) => tar_err(
            &e.path,
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("data ended after {n} of {} bytes", e.size),
            ),
        ),
        AppendError::Watch(e) => e,
    })
}

/// Copies everything read into a spool file.
struct Tee<R> {
    r: R,
    spool: BufWriter<File>,
}

impl<R: Read> Read for Tee<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.r.read(buf)?;
        self.spool.write_all(&buf[..n])?;
        Ok(n)
    }
}

pub(crate) fn from_stream(
    r: impl Read,
    layout: &Layout,
    opts: &LayerOptions,
    dest: &Dest<'_>,
) -> Result<LayerInfo, LayerError> {
    let x = Excluder::new(&opts.excludes)?;
    let ingest = layout.dir().join("ingest");
    let werr = |source| LayerError::Write {
        dir: ingest.clone(),
        source,
    };
    fs_err::create_dir_all(&ingest).map_err(werr)?;
    let spool = tempfile::tempfile_in(&ingest).map_err(werr)?;
    let mut ar = tar::Archive::new(Tee {
        r,
        spool: BufWriter::with_capacity(1 << 20, spool),
    });
    let mut sink = dest.sink()?;
    let mut in_order = true;
    let entries = {
        let mut w = TarWriter::new(sink.writer(), Watch::new(opts));
        let mut last: Option<Vec<u8>> = None;
        let iter = ar.entries().map_err(|e| tar_err(b"", e))?;
        for item in iter {
            let mut te = item.map_err(|e| tar_err(last.as_deref().unwrap_or(b""), e))?;
            let Some(e) = parse(&mut te, opts.source_date_epoch)? else {
                continue;
            };
            if excluded(&x, &e) {
                continue;
            }
            let ordered = last
                .as_deref()
                .is_none_or(|l| cmp_paths(l, &e.path) == Ordering::Less);
            let link_ok = e.kind != Kind::Hardlink
                || (cmp_paths(&e.link, &e.path) == Ordering::Less && !x.excludes(&e.link));
            if !ordered || !link_ok {
                in_order = false;
                break;
            }
            append(&mut w, out_err(layout), &e, Some(&mut te))?;
            last = Some(e.path);
        }
        let n = w.entries();
        if in_order {
            w.finish().map_err(out_err(layout))?;
        }
        n
    };
    if in_order {
        return sink.finish(entries);
    }
    // Out of canonical order: abandon this blob, spool the rest, rebuild from the spool.
    drop(sink);
    let mut tee = ar.into_inner();
    io::copy(&mut tee, &mut io::sink()).map_err(|e| tar_err(b"", e))?;
    let mut spool = tee.spool.into_inner().map_err(|e| werr(e.into_error()))?;
    spool.seek(SeekFrom::Start(0)).map_err(werr)?;
    from_seekable(
        &mut spool,
        Path::new("<layer tar spool>"),
        layout,
        opts,
        &x,
        dest,
    )
}

pub(crate) fn from_file(
    path: &Path,
    layout: &Layout,
    opts: &LayerOptions,
    dest: &Dest<'_>,
) -> Result<LayerInfo, LayerError> {
    let x = Excluder::new(&opts.excludes)?;
    let mut f = File::open(path).map_err(|source| LayerError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    from_seekable(&mut f, path, layout, opts, &x, dest)
}

struct Indexed {
    e: Entry,
    /// Offset of the data in the file.
    off: u64,
    excluded: bool,
}

pub(crate) fn from_seekable<R: Read + Seek>(
    f: &mut R,
    path: &Path,
    layout: &Layout,
    opts: &LayerOptions,
    x: &Excluder,
    dest: &Dest<'_>,
) -> Result<LayerInfo, LayerError> {
    let rerr = |source| LayerError::Read {
        path: path.to_path_buf(),
        source,
    };
    // Pass 1: headers only.
    let mut all: Vec<Indexed> = Vec::new();
    {
        let mut ar = tar::Archive::new(&mut *f);
        let iter = ar.entries_with_seek().map_err(|e| tar_err(b"", e))?;
        for item in iter {
            let mut te =
                item.map_err(|e| tar_err(all.last().map_or(&b""[..], |i| &i.e.path), e))?;
            let Some(e) = parse(&mut te, opts.source_date_epoch)? else {
                continue;
            };
            let excluded = excluded(x, &e);
            all.push(Indexed {
                off: te.raw_file_position(),
                e,
                excluded,
            });
        }
    }
    // Last occurrence of a path wins (tar extraction semantics).
    all.reverse();
    all.sort_by(|a, b| cmp_paths(&a.e.path, &b.e.path));
    all.dedup_by(|later, earlier| later.e.path == earlier.e.path);

    // Hard links: the first kept member of each inode group (in canonical order) gets the data.
    let pos: HashMap<Vec<u8>, usize> = all
        .iter()
        .enumerate()
        .map(|(i, it)| (it.e.path.clone(), i))
        .collect();
    let resolve = |mut i: usize| -> Option<usize> {
        for _ in 0..64 {
            match all[i].e.kind {
                Kind::Regular => return Some(i),
                Kind::Hardlink => i = *pos.get(&all[i].e.link)?,
                _ => return None,
            }
        }
        None
    };
    let mut groups: HashMap<usize, Vec<usize>> = HashMap::new();
    for (i, it) in all.iter().enumerate() {
        if it.e.kind == Kind::Hardlink {
            if let Some(r) = resolve(i) {
                groups.entry(r).or_default().push(i);
            }
        }
    }
    // (entry index) -> data source (offset, size) for promoted links; link rewrites.
    let mut data_from: HashMap<usize, (u64, u64)> = HashMap::new();
    let mut relink: Vec<(usize, Vec<u8>)> = Vec::new();
    for (r, links) in groups {
        let mut members: Vec<usize> = links;
        members.push(r);
        members.retain(|&m| !all[m].excluded);
        members.sort_unstable();
        let Some((&first, rest)) = members.split_first() else {
            continue;
        };
        if first != r {
            data_from.insert(first, (all[r].off, all[r].e.size));
        }
        for &m in rest {
            relink.push((m, all[first].e.path.clone()));
        }
    }
    for (&i, &(off, size)) in &data_from {
        all[i].e.kind = Kind::Regular;
        all[i].e.link.clear();
        all[i].e.size = size;
        all[i].off = off;
    }
    for (i, target) in relink {
        all[i].e.kind = Kind::Hardlink;
        all[i].e.size = 0;
        all[i].e.link = target;
    }

    // Pass 2: emit in order.
    let mut sink = dest.sink()?;
    let entries = {
        let mut w = TarWriter::new(sink.writer(), Watch::new(opts));
        for it in all.iter().filter(|it| !it.excluded) {
            if it.e.kind == Kind::Regular && it.e.size > 0 {
                f.seek(SeekFrom::Start(it.off)).map_err(rerr)?;
                let mut data = (&mut *f).take(it.e.size);
                append(&mut w, out_err(layout), &it.e, Some(&mut data))?;
            } else {
                append(&mut w, out_err(layout), &it.e, None)?;
            }
        }
        let n = w.entries();
        w.finish().map_err(out_err(layout))?;
        n
    };
    sink.finish(entries)
}
