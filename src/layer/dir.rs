//! Overlayfs upper directory input: walk it in canonical order, converting overlayfs whiteouts
//! (0/0 character devices, `trusted.overlay.whiteout` files) and opaque directories
//! (`trusted.overlay.opaque=y`) into OCI whiteouts.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use super::canon::{Entry, Kind, TarWriter, OPAQUE, WH};
use super::compress::Dest;
use super::exclude::Excluder;
use super::tarin::out_err;
use super::watch::Watch;
use super::{LayerError, LayerInfo, LayerOptions};
use crate::layout::Layout;

pub(crate) fn from_dir(
    upper: &Path,
    layout: &Layout,
    opts: &LayerOptions,
    dest: &Dest<'_>,
) -> Result<LayerInfo, LayerError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(LayerError::NotRoot {
            path: upper.to_path_buf(),
        });
    }
    let meta = std::fs::symlink_metadata(upper).map_err(|source| LayerError::Read {
        path: upper.to_path_buf(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(LayerError::Unsupported {
            path: upper.to_path_buf(),
            what: "not a directory".into(),
        });
    }
    let x = Excluder::new(&opts.excludes)?;
    let mut sink = dest.sink()?;
    let entries = {
        let mut walk = Walk {
            w: TarWriter::new(sink.writer(), Watch::new(opts)),
            x: &x,
            sde: opts.source_date_epoch,
            links: HashMap::new(),
            layout,
        };
        walk.dir(upper, &[])?;
        let n = walk.w.entries();
        walk.w.finish().map_err(out_err(layout))?;
        n
    };
    sink.finish(entries)
}

struct Walk<'a, W: io::Write> {
    w: TarWriter<W>,
    x: &'a Excluder,
    sde: Option<i64>,
    /// (dev, inode) of multiply-linked files -> first path written.
    links: HashMap<(u64, u64), Vec<u8>>,
    layout: &'a Layout,
}

fn read_err(path: &Path) -> impl Fn(io::Error) -> LayerError + '_ {
    move |source| LayerError::Read {
        path: path.to_path_buf(),
        source,
    }
}

fn join(rel: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(rel.len() + name.len() + 1);
    if !rel.is_empty() {
        p.extend_from_slice(rel);
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

impl<W: io::Write> Walk<'_, W> {
    /// Write the contents of directory `abs` (image path `rel`), sorted by name.
    fn dir(&mut self, abs: &Path, rel: &[u8]) -> Result<(), LayerError> {
        let mut names: Vec<Vec<u8>> = std::fs::read_dir(abs)
            .map_err(read_err(abs))?
            .map(|d| d.map(|d| d.file_name().as_bytes().to_vec()))
            .collect::<Result<_, _>>()
            .map_err(read_err(abs))?;
        names.sort();
        for name in names {
            let child = abs.join(OsStr::from_bytes(&name));
            let rel_child = join(rel, &name);
            self.child(&child, rel, &name, rel_child)?;
        }
        Ok(())
    }

    fn child(
        &mut self,
        abs: &Path,
        rel_dir: &[u8],
        name: &[u8],
        rel: Vec<u8>,
    ) -> Result<(), LayerError> {
        let md = std::fs::symlink_metadata(abs).map_err(read_err(abs))?;
        let ft = md.file_type();
        if ft.is_socket() {
            return Ok(());
        }
        if self.x.matches(&rel) {
            return Ok(());
        }
        let xattrs = if ft.is_symlink() || ft.is_file() || ft.is_dir() {
            list_xattrs(abs).map_err(read_err(abs))?
        } else {
            Vec::new()
        };
        let has = |k: &[u8]| {
            xattrs
                .iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.as_slice())
        };
        let is_whiteout = (ft.is_char_device() && md.rdev() == 0)
            || (ft.is_file() && has(b"trusted.overlay.whiteout").is_some());
        if is_whiteout {
            let mut wname = WH.to_vec();
            wname.extend_from_slice(name);
            let mut e = Entry::new(join(rel_dir, &wname), Kind::Whiteout);
            e.canonicalize(self.sde);
            return self.emit(&e, None, abs);
        }
        for bad in ["trusted.overlay.redirect", "trusted.overlay.metacopy"] {
            if has(bad.as_bytes()).is_some() {
                return Err(LayerError::Unsupported {
                    path: abs.to_path_buf(),
                    what: format!(
                        "overlayfs {bad} is set (redirect_dir/metacopy in use): the upper directory does not hold the full change; build the layer from `docker save` instead"
                    ),
                });
            }
        }
        let kind = if ft.is_dir() {
            Kind::Dir
        } else if ft.is_file() {
            Kind::Regular
        } else if ft.is_symlink() {
            Kind::Symlink
        } else if ft.is_char_device() {
            Kind::Char
        } else if ft.is_block_device() {
            Kind::Block
        } else if ft.is_fifo() {
            Kind::Fifo
        } else {
            return Err(LayerError::Unsupported {
                path: abs.to_path_buf(),
                what: "unknown file type".into(),
            });
        };
        let opaque = kind == Kind::Dir && has(b"trusted.overlay.opaque") == Some(b"y");
        let mut e = Entry::new(rel, kind);
        e.mode = md.mode();
        e.uid = md.uid() as u64;
        e.gid = md.gid() as u64;
        e.mtime = md.mtime();
        e.xattrs = xattrs;
        match kind {
            Kind::Regular => {
                e.size = md.len();
                if md.nlink() > 1 {
                    let key = (md.dev(), md.ino());
                    if let Some(first) = self.links.get(&key) {
                        e.kind = Kind::Hardlink;
                        e.link = first.clone();
                    } else {
                        self.links.insert(key, e.path.clone());
                    }
                }
            }
            Kind::Symlink => {
                e.link = std::fs::read_link(abs)
                    .map_err(read_err(abs))?
                    .into_os_string()
                    .into_vec();
            }
            Kind::Char | Kind::Block => {
                let rdev = md.rdev();
                e.dev_major = libc::major(rdev);
                e.dev_minor = libc::minor(rdev);
            }
            _ => {}
        }
        e.canonicalize(self.sde);
        if e.kind == Kind::Regular && e.size > 0 {
            let mut f = std::fs::File::open(abs).map_err(read_err(abs))?;
            self.emit(&e, Some(&mut f), abs)?;
        } else {
            self.emit(&e, None, abs)?;
        }
        if kind == Kind::Dir {
            if opaque {
                let mut o = Entry::new(join(&e.path, OPAQUE), Kind::Opaque);
                o.canonicalize(self.sde);
                self.emit(&o, None, abs)?;
            }
            self.dir(abs, &e.path)?;
        }
        Ok(())
    }

    fn emit(
        &mut self,
        e: &Entry,
        data: Option<&mut dyn io::Read>,
        abs: &Path,
    ) -> Result<(), LayerError> {
        use super::canon::AppendError;
        self.w.append(e, data).map_err(|err| match err {
            AppendError::Out(source) => out_err(self.layout)(source),
            AppendError::In(source) => LayerError::Read {
                path: abs.to_path_buf(),
                source,
            },
            AppendError::Short(n) => LayerError::FileChanged {
                path: abs.to_path_buf(),
                expected: e.size,
                actual: n,
            },
            AppendError::Watch(e) => e,
        })
    }
}

/// All xattrs of a path (not following symlinks), unsorted.
fn list_xattrs(path: &Path) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let names = match xattr::list(path) {
        Ok(names) => names,
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for name in names {
        match xattr::get(path, &name) {
            Ok(Some(value)) => out.push((name.as_bytes().to_vec(), value)),
            // Removed meanwhile.
            Ok(None) => {}
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("read xattr {}: {e}", name.to_string_lossy()),
                ))
            }
        }
    }
    Ok(out)
}
