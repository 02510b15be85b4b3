//! The canonical entry form, its order, and the tar writer that emits it.

use std::cmp::Ordering;
use std::io::{self, Read, Write};

use super::watch::Watch;
use super::{LayerError, DROPPED_XATTR_PREFIXES};

/// Name of an opaque-directory marker.
pub(crate) const OPAQUE: &[u8] = b".wh..wh..opq";
/// Prefix of a whiteout.
pub(crate) const WH: &[u8] = b".wh.";
/// Prefix of AUFS metadata entries (never part of a layer's content).
pub(crate) const WH_META: &[u8] = b".wh..wh.";

/// Kind of a canonical entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Regular,
    Dir,
    Symlink,
    Hardlink,
    Char,
    Block,
    Fifo,
    /// `.wh.NAME`: NAME was deleted.
    Whiteout,
    /// `.wh..wh..opq`: the directory hides everything below it in lower layers.
    Opaque,
}

/// One entry in canonical form.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    /// Relative path without leading `./` or `/`, without trailing `/`.
    pub path: Vec<u8>,
    pub kind: Kind,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: i64,
    /// Data size (regular files only).
    pub size: u64,
    /// Symlink target, or hard link target path (relative, canonical).
    pub link: Vec<u8>,
    pub dev_major: u32,
    pub dev_minor: u32,
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Entry {
    /// A new entry with empty metadata.
    pub(crate) fn new(path: Vec<u8>, kind: Kind) -> Self {
        Self {
            path,
            kind,
            mode: 0,
            uid: 0,
            gid: 0,
            mtime: 0,
            size: 0,
            link: Vec::new(),
            dev_major: 0,
            dev_minor: 0,
            xattrs: Vec::new(),
        }
    }

    /// Bring metadata to canonical form.
    pub(crate) fn canonicalize(&mut self, sde: Option<i64>) {
        self.mode &= 0o7777;
        self.mtime = self.mtime.max(0);
        if let Some(s) = sde {
            self.mtime = self.mtime.min(s.max(0));
        }
        if !matches!(self.kind, Kind::Regular) {
            self.size = 0;
        }
        if !matches!(self.kind, Kind::Char | Kind::Block) {
            self.dev_major = 0;
            self.dev_minor = 0;
        }
        if !matches!(self.kind, Kind::Symlink | Kind::Hardlink) {
            self.link.clear();
        }
        if matches!(self.kind, Kind::Whiteout | Kind::Opaque) {
            self.mode = 0;
            self.uid = 0;
            self.gid = 0;
            self.mtime = 0;
            self.xattrs.clear();
        }
        self.xattrs.retain(|(k, _)| {
            !DROPPED_XATTR_PREFIXES
                .iter()
                .any(|p| k.starts_with(p.as_bytes()))
        });
        self.xattrs.sort();
        self.xattrs.dedup_by(|a, b| a.0 == b.0);
    }
}

/// Sort key of one path component: opaque marker first, whiteouts as their target's name
/// (before a same-named entry), everything else by name.
fn component_key(c: &[u8]) -> (u8, &[u8], u8) {
    if c == OPAQUE {
        (0, b"", 0)
    } else if let Some(n) = c.strip_prefix(WH) {
        (1, n, 0)
    } else {
        (1, c, 1)
    }
}

/// Canonical order of two relative paths (tree order, siblings by [`component_key`]).
pub(crate) fn cmp_paths(a: &[u8], b: &[u8]) -> Ordering {
    let mut ia = a.split(|c| *c == b'/');
    let mut ib = b.split(|c| *c == b'/');
    loop {
        match (ia.next(), ib.next()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) => match component_key(x).cmp(&component_key(y)) {
                Ordering::Equal => {}
                o => return o,
            },
        }
    }
}

/// Normalise a tar path: strip `./` and `/` prefixes, `.` components, repeated and trailing
/// slashes. `None` for `..` components; an empty result is the root.
pub(crate) fn normalize_path(p: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(p.len());
    for c in p.split(|c| *c == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return None,
            c => {
                if !out.is_empty() {
                    out.push(b'/');
                }
                out.extend_from_slice(c);
            }
        }
    }
    Some(out)
}

const BLOCK: usize = 512;
const MAX_OCTAL_7: u64 = 0o7777777;
const MAX_OCTAL_11: u64 = 0o77777777777;

/// Writes canonical entries as a tar stream.
pub(crate) struct TarWriter<W: Write> {
    w: W,
    entries: u64,
    buf: Vec<u8>,
    watch: Watch,
}

impl<W: Write> TarWriter<W> {
    /// A writer whose entries go through `watch` before they are written.
    pub(crate) fn new(w: W, watch: Watch) -> Self {
        Self {
            w,
            entries: 0,
            buf: vec![0; 256 * 1024],
            watch,
        }
    }

    /// Entries written so far.
    pub(crate) fn entries(&self) -> u64 {
        self.entries
    }

    /// Write one entry; `data` must yield at least `e.size` bytes for regular files.
    pub(crate) fn append(
        &mut self,
        e: &Entry,
        data: Option<&mut dyn Read>,
    ) -> Result<(), AppendError> {
        self.watch.entry(e).map_err(AppendError::Watch)?;
        let mut name = e.path.clone();
        if e.kind == Kind::Dir {
            name.push(b'/');
        }
        let (typeflag, link): (u8, &[u8]) = match e.kind {
            Kind::Regular | Kind::Whiteout | Kind::Opaque => (b'0', b""),
            Kind::Dir => (b'5', b""),
            Kind::Symlink => (b'2', &e.link),
            Kind::Hardlink => (b'1', &e.link),
            Kind::Char => (b'3', b""),
            Kind::Block => (b'4', b""),
            Kind::Fifo => (b'6', b""),
        };
        let mut pax: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        if name.len() > 100 {
            pax.push((b"path".to_vec(), name.clone()));
        }
        if link.len() > 100 {
            pax.push((b"linkpath".to_vec(), link.to_vec()));
        }
        let num = |v: u64, max: u64, key: &str, pax: &mut Vec<(Vec<u8>, Vec<u8>)>| {
            if v > max {
                pax.push((key.as_bytes().to_vec(), v.to_string().into_bytes()));
                0
            } else {
                v
            }
        };
        let uid = num(e.uid, MAX_OCTAL_7, "uid", &mut pax);
        let gid = num(e.gid, MAX_OCTAL_7, "gid", &mut pax);
        let size = num(e.size, MAX_OCTAL_11, "size", &mut pax);
        let mtime = num(e.mtime.max(0) as u64, MAX_OCTAL_11, "mtime", &mut pax);
        for (k, v) in &e.xattrs {
            let mut key = b"SCHILY.xattr.".to_vec();
            key.extend_from_slice(k);
            pax.push((key, v.clone()));
        }
        pax.sort();
        if !pax.is_empty() {
            let records = pax_records(&pax);
            let h = Ustar {
                name: b"././@PaxHeader",
                mode: 0o644,
                size: records.len() as u64,
                typeflag: b'x',
                ..Ustar::default()
            }
            .block();
            self.w.write_all(&h).map_err(AppendError::Out)?;
            self.w.write_all(&records).map_err(AppendError::Out)?;
            self.pad(records.len() as u64)?;
        }
        let h = Ustar {
            name: &name[..name.len().min(100)],
            mode: e.mode & 0o7777,
            uid,
            gid,
            size,
            mtime,
            typeflag,
            link: &link[..link.len().min(100)],
            major: e.dev_major,
            minor: e.dev_minor,
        }
        .block();
        self.w.write_all(&h).map_err(AppendError::Out)?;
        if e.kind == Kind::Regular && e.size > 0 {
            let data = data.ok_or(AppendError::Short(0))?;
            let mut left = e.size;
            while left > 0 {
                let want = left.min(self.buf.len() as u64) as usize;
                let n = match data.read(&mut self.buf[..want]) {
                    Ok(0) => return Err(AppendError::Short(e.size - left)),
                    Ok(n) => n,
                    Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                    Err(err) => return Err(AppendError::In(err)),
                };
                self.watch
                    .data(e, &self.buf[..n])
                    .map_err(AppendError::Watch)?;
                self.w.write_all(&self.buf[..n]).map_err(AppendError::Out)?;
                left -= n as u64;
            }
            self.pad(e.size)?;
        }
        self.entries += 1;
        Ok(())
    }

    fn pad(&mut self, len: u64) -> Result<(), AppendError> {
        let rem = (len % BLOCK as u64) as usize;
        if rem != 0 {
            self.w
                .write_all(&[0u8; BLOCK][..BLOCK - rem])
                .map_err(AppendError::Out)?;
        }
        Ok(())
    }

    /// Write the end-of-archive marker and return the inner writer.
    pub(crate) fn finish(mut self) -> io::Result<W> {
        self.w.write_all(&[0u8; 2 * BLOCK])?;
        Ok(self.w)
    }
}

/// Why [`TarWriter::append`] failed.
#[derive(Debug)]
pub(crate) enum AppendError {
    /// Writing the output failed.
    Out(io::Error),
    /// Reading the entry's data failed.
    In(io::Error),
    /// The data ended after this many bytes.
    Short(u64),
    /// A check of the entry failed (a secret found, the build interrupted).
    Watch(LayerError),
}

fn pax_records(recs: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in recs {
        // "<len> <key>=<value>\n" where len counts itself.
        let rest = k.len() + v.len() + 3;
        let mut len = rest + 1;
        while len != rest + len.to_string().len() {
            len = rest + len.to_string().len();
        }
        out.extend_from_slice(len.to_string().as_bytes());
        out.push(b' ');
        out.extend_from_slice(k);
        out.push(b'=');
        out.extend_from_slice(v);
        out.push(b'\n');
    }
    out
}

/// The fields of one ustar header block (names and links at most 100 bytes: longer ones go in
/// a PAX header first).
#[derive(Default)]
struct Ustar<'a> {
    name: &'a [u8],
    mode: u32,
    uid: u64,
    gid: u64,
    size: u64,
    mtime: u64,
    typeflag: u8,
    link: &'a [u8],
    major: u32,
    minor: u32,
}

impl Ustar<'_> {
    /// The 512-byte header block, checksum included.
    fn block(&self) -> [u8; BLOCK] {
        let mut h = [0u8; BLOCK];
        h[..self.name.len()].copy_from_slice(self.name);
        octal(&mut h[100..108], self.mode as u64);
        octal(&mut h[108..116], self.uid);
        octal(&mut h[116..124], self.gid);
        octal(&mut h[124..136], self.size);
        octal(&mut h[136..148], self.mtime);
        h[156] = self.typeflag;
        h[157..157 + self.link.len()].copy_from_slice(self.link);
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        octal(&mut h[329..337], self.major as u64);
        octal(&mut h[337..345], self.minor as u64);
        h[148..156].copy_from_slice(b"        ");
        let sum: u64 = h.iter().map(|b| *b as u64).sum();
        octal(&mut h[148..155], sum);
        h[155] = b' ';
        h
    }
}

/// Zero-padded octal digits filling all but the last byte of `field`, then NUL.
fn octal(field: &mut [u8], v: u64) {
    let digits = field.len() - 1;
    let s = format!("{v:0digits$o}");
    let s = s.as_bytes();
    // Callers keep values in range; saturate defensively.
    let s = if s.len() > digits {
        &s[s.len() - digits..]
    } else {
        s
    };
    field[..digits].copy_from_slice(s);
    field[digits] = 0;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_is_tree_order_with_whiteouts_as_their_names() {
        let mut v: Vec<&[u8]> = vec![
            b"a-b",
            b"a/x",
            b"a",
            b"a/.wh..wh..opq",
            b"a/.wh.b",
            b"a/c",
            b"a/a",
            b"b",
            b"a/.wh.c",
            b"Z",
        ];
        v.sort_by(|x, y| cmp_paths(x, y));
        let want: Vec<&[u8]> = vec![
            b"Z",
            b"a",
            b"a/.wh..wh..opq",
            b"a/a",
            b"a/.wh.b",
            b"a/.wh.c",
            b"a/c",
            b"a/x",
            b"a-b",
            b"b",
        ];
        assert_eq!(v, want);
    }

    #[test]
    fn normalizes_paths() {
        assert_eq!(normalize_path(b"./a//b/").unwrap(), b"a/b");
        assert_eq!(normalize_path(b"/a/./b").unwrap(), b"a/b");
        assert_eq!(normalize_path(b"./").unwrap(), b"");
        assert!(normalize_path(b"a/../b").is_none());
    }

    #[test]
    fn tar_crate_reads_what_we_write() {
        let long = "d/".to_string() + &"x".repeat(150);
        let mut e = Entry::new(long.clone().into_bytes(), Kind::Regular);
        e.mode = 0o4755;
        e.uid = 3_000_000;
        e.size = 5;
        e.mtime = 1_700_000_000;
        e.xattrs = vec![(b"security.capability".to_vec(), vec![1, 0, 0, 2, 0xff])];
        let mut w = TarWriter::new(Vec::new(), Watch::none());
        w.append(&e, Some(&mut &b"hello"[..])).unwrap();
        let mut l = Entry::new(b"lnk".to_vec(), Kind::Symlink);
        l.link = "t".repeat(120).into_bytes();
        w.append(&l, None).unwrap();
        let bytes = w.finish().unwrap();
        assert_eq!(bytes.len() % 512, 0);
        let mut ar = tar::Archive::new(&bytes[..]);
        let mut it = ar.entries().unwrap();
        let mut a = it.next().unwrap().unwrap();
        assert_eq!(a.path_bytes().as_ref(), long.as_bytes());
        assert_eq!(a.header().uid().unwrap(), 3_000_000);
        assert_eq!(a.header().mode().unwrap(), 0o4755);
        assert_eq!(a.header().mtime().unwrap(), 1_700_000_000);
        let x: Vec<_> = a
            .pax_extensions()
            .unwrap()
            .unwrap()
            .map(|r| r.unwrap().key().unwrap().to_string())
            .collect();
        assert!(x.contains(&"SCHILY.xattr.security.capability".to_string()));
        let mut s = String::new();
        a.read_to_string(&mut s).unwrap();
        assert_eq!(s, "hello");
        let b = it.next().unwrap().unwrap();
        assert_eq!(
            b.link_name_bytes().unwrap().as_ref(),
            "t".repeat(120).as_bytes()
        );
        assert!(it.next().is_none());
    }
}
