//! Producing a layer: reading a build container's changes (a `docker save` layer tar or an
//! overlayfs upper directory), normalising them into one canonical tar, compressing it and
//! storing it as a blob, with the digest and diff_id computed in the same streaming pass.
//!
//! Canonical form (identical for both inputs, so both give the same digest):
//! - entries in tree order: a directory before its contents, siblings in byte order of their
//!   names, where a whiteout `.wh.NAME` sorts as `NAME` and an opaque marker `.wh..wh..opq`
//!   sorts first in its directory (this is the order Docker itself writes for overlay2);
//! - ustar headers, names relative without `./`, directories with a trailing `/`, long names,
//!   large ids/sizes and xattrs in a PAX `x` header whose records are sorted by key;
//! - uid/gid/mode (incl. setuid/setgid/sticky) kept, uname/gname empty, mtime in whole seconds,
//!   clamped to `SOURCE_DATE_EPOCH` when set; devices keep major/minor;
//! - hard links: the first path of an inode (in canonical order) carries the data, later ones
//!   are link entries;
//! - whiteouts and opaque markers are empty regular files with mode 0, uid/gid 0 and mtime 0;
//! - xattrs kept as `SCHILY.xattr.*` except [`DROPPED_XATTR_PREFIXES`]. Note that Docker's own
//!   tar only carries `security.capability`, so a layer from an upper directory whose files carry
//!   other xattrs (`user.*`, ACLs) differs from the one made from `docker save` of the same
//!   container;
//! - the archive ends with two zero blocks.

mod canon;
mod compress;
mod dir;
mod exclude;
mod squash;
mod tarin;
mod watch;

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::layout::{Layout, LayoutError};
use crate::oci::{Descriptor, Digest, MEDIA_TYPE_OCI_LAYER_GZIP, MEDIA_TYPE_OCI_LAYER_ZSTD};

use compress::Dest;
pub use exclude::{check_exclude, validate_excludes, ExcludeError, BUILTIN_EXCLUDES};
pub use squash::squash;

/// Xattr name prefixes never written into a layer (overlayfs bookkeeping, host SELinux labels).
pub const DROPPED_XATTR_PREFIXES: &[&str] =
    &["trusted.overlay.", "user.overlay.", "security.selinux"];

/// Layer compression.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// gzip (the default; every engine can pull it).
    #[default]
    Gzip,
    /// zstd (Docker 20.10 cannot pull it).
    Zstd,
}

impl Compression {
    /// OCI media type of a layer with this compression.
    pub fn media_type(self) -> &'static str {
        match self {
            Compression::Gzip => MEDIA_TYPE_OCI_LAYER_GZIP,
            Compression::Zstd => MEDIA_TYPE_OCI_LAYER_ZSTD,
        }
    }

    /// Level used when none is given.
    pub fn default_level(self) -> i32 {
        match self {
            Compression::Gzip => 6,
            Compression::Zstd => 3,
        }
    }

    /// Valid levels.
    pub fn level_range(self) -> std::ops::RangeInclusive<i32> {
        match self {
            Compression::Gzip => 0..=9,
            Compression::Zstd => 1..=22,
        }
    }

    /// Check a level, returning the effective one.
    pub fn check_level(self, level: Option<i32>) -> Result<i32, LayerError> {
        let l = level.unwrap_or_else(|| self.default_level());
        if self.level_range().contains(&l) {
            Ok(l)
        } else {
            Err(LayerError::InvalidLevel {
                compression: self,
                level: l,
            })
        }
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        })
    }
}

/// How to produce a layer.
#[derive(Debug, Clone)]
pub struct LayerOptions {
    /// Compression of the blob.
    pub compression: Compression,
    /// Compression level (default: gzip 6, zstd 3).
    pub level: Option<i32>,
    /// Absolute-path globs to leave out (`*` stays within a path component, `**` crosses them);
    /// excluding a directory excludes its contents. [`BUILTIN_EXCLUDES`] always apply.
    pub excludes: Vec<String>,
    /// Clamp mtimes to this Unix time (`SOURCE_DATE_EPOCH`).
    pub source_date_epoch: Option<i64>,
    /// Compression threads (the output does not depend on it).
    pub threads: usize,
    /// A second destination of the compressed bytes (a streaming upload).
    pub tee: Tee,
    /// Stop with [`LayerError::Interrupted`] as soon as this is cancelled.
    pub cancel: Option<tokio_util::sync::CancellationToken>,
    /// Fail with [`LayerError::Leak`] when a build secret shows up in the layer.
    pub leak_scan: Option<Arc<crate::secrets::LeakScanner>>,
}

/// A second destination of a layer's compressed bytes as they are produced, taken by the first
/// layer written with the options that hold it; write errors there never fail the layer.
#[derive(Clone, Default)]
pub struct Tee(Arc<Mutex<Option<Box<dyn Write + Send>>>>);

impl Tee {
    /// Send the compressed bytes to `w` too.
    pub fn new(w: impl Write + Send + 'static) -> Self {
        Self(Arc::new(Mutex::new(Some(Box::new(w)))))
    }

    pub(crate) fn take(&self) -> Option<Box<dyn Write + Send>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

impl std::fmt::Debug for Tee {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tee")
    }
}

impl Default for LayerOptions {
    fn default() -> Self {
        Self {
            compression: Compression::Gzip,
            level: None,
            excludes: Vec::new(),
            source_date_epoch: None,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            tee: Tee::default(),
            cancel: None,
            leak_scan: None,
        }
    }
}

/// A layer stored in the layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerInfo {
    /// Digest of the compressed blob.
    pub digest: Digest,
    /// Digest of the uncompressed tar (the config's diff_id).
    pub diff_id: Digest,
    /// Size of the compressed blob.
    pub size: u64,
    /// Size of the uncompressed tar.
    pub uncompressed_size: u64,
    /// Media type of the blob.
    pub media_type: &'static str,
    /// Number of tar entries (files, directories, links, whiteouts).
    pub entries: u64,
}

impl LayerInfo {
    /// Descriptor of the blob for a manifest.
    pub fn descriptor(&self) -> Descriptor {
        Descriptor::new(self.media_type, self.digest.clone(), self.size)
    }
}

/// Errors producing a layer.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    /// Reading a file of the changes failed.
    #[error("{}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Reading the input layer tar failed or it is malformed.
    #[error("layer tar, entry {entry:?}: {source}")]
    Tar {
        /// The entry (empty before the first one).
        entry: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// An input the layer module cannot represent faithfully.
    #[error("{}: {what}", path.display())]
    Unsupported {
        /// The file or tar entry.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// A file changed size while it was read.
    #[error("{}: file changed while reading it (expected {expected} bytes, read {actual})", path.display())]
    FileChanged {
        /// The file.
        path: PathBuf,
        /// Size when listed.
        expected: u64,
        /// Bytes read.
        actual: u64,
    },
    /// Reading an overlayfs upper directory needs root (whiteouts live in `trusted.*` xattrs).
    #[error("reading overlayfs upper directory {} needs root (opaque directories are marked by trusted.* xattrs)", path.display())]
    NotRoot {
        /// The upper directory.
        path: PathBuf,
    },
    /// A bad `layer.exclude` pattern.
    #[error(transparent)]
    Exclude(#[from] ExcludeError),
    /// A compression level out of range.
    #[error("{compression} level {level} is out of range ({}..={})", compression.level_range().start(), compression.level_range().end())]
    InvalidLevel {
        /// The compression.
        compression: Compression,
        /// The level.
        level: i32,
    },
    /// Writing the blob or a spool file failed.
    #[error("writing layer blob into {}: {source}", dir.display())]
    Write {
        /// The layout directory.
        dir: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The layout store failed.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// A build secret is in the layer (the blob is not kept).
    #[error(transparent)]
    Leak(#[from] crate::secrets::LeakFound),
    /// The build was interrupted while the layer was written (the blob is not kept).
    #[error("interrupted")]
    Interrupted,
}

/// Build a layer from an uncompressed layer tar stream (e.g. a committed container's top layer
/// from `docker save`). Entries already in canonical order are streamed straight through; the
/// input is also spooled to an unlinked temp file in the layout, which is re-read in canonical
/// order only if the input turns out to be out of order.
pub fn layer_from_tar(
    r: impl Read,
    layout: &Layout,
    opts: &LayerOptions,
) -> Result<LayerInfo, LayerError> {
    tarin::from_stream(r, layout, opts, &Dest::Blob { layout, opts })
}

/// Build a layer from an uncompressed layer tar file; it is read in place (headers first, then
/// data in canonical order), so nothing is spooled.
pub fn layer_from_tar_file(
    path: &Path,
    layout: &Layout,
    opts: &LayerOptions,
) -> Result<LayerInfo, LayerError> {
    tarin::from_file(path, layout, opts, &Dest::Blob { layout, opts })
}

/// Build a layer from an overlayfs upper directory (Docker overlay2's `GraphDriver.Data.UpperDir`
/// of a stopped container), converting overlayfs whiteouts and opaque directories to OCI ones.
pub fn layer_from_dir(
    upper: &Path,
    layout: &Layout,
    opts: &LayerOptions,
) -> Result<LayerInfo, LayerError> {
    dir::from_dir(upper, layout, opts, &Dest::Blob { layout, opts })
}

/// Like [`layer_from_dir`], but the canonical tar is written uncompressed to `spool` (created
/// or truncated); the result describes that tar (its digest is the diff_id). Compress it later
/// with [`compress_spool`]. `layout` holds temporary files.
pub fn spool_from_dir(
    upper: &Path,
    spool: &Path,
    layout: &Layout,
    opts: &LayerOptions,
) -> Result<LayerInfo, LayerError> {
    dir::from_dir(upper, layout, opts, &Dest::Spool(spool))
}

/// Like [`layer_from_tar`], but into an uncompressed spool file (see [`spool_from_dir`]).
pub fn spool_from_tar(
    r: impl Read,
    spool: &Path,
    layout: &Layout,
    opts: &LayerOptions,
) -> Result<LayerInfo, LayerError> {
    tarin::from_stream(r, layout, opts, &Dest::Spool(spool))
}

/// Compress a spooled canonical tar (from [`spool_from_dir`]/[`spool_from_tar`], described by
/// `spooled`) into a layout blob. Stops with an `Interrupted` error when `cancel` is set.
pub fn compress_spool(
    spool: &Path,
    spooled: &LayerInfo,
    layout: &Layout,
    opts: &LayerOptions,
    cancel: &std::sync::atomic::AtomicBool,
) -> Result<LayerInfo, LayerError> {
    let rerr = |source| LayerError::Read {
        path: spool.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::open(spool).map_err(rerr)?;
    let mut sink = Dest::Blob { layout, opts }.sink()?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        if cancel.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(LayerError::Read {
                path: spool.to_path_buf(),
                source: io::Error::new(io::ErrorKind::Interrupted, "compression cancelled"),
            });
        }
        let n = f.read(&mut buf).map_err(rerr)?;
        if n == 0 {
            break;
        }
        sink.writer()
            .write_all(&buf[..n])
            .map_err(|source| LayerError::Write {
                dir: layout.dir().to_path_buf(),
                source,
            })?;
    }
    let info = sink.finish(spooled.entries)?;
    if info.diff_id != spooled.diff_id {
        return Err(LayerError::Unsupported {
            path: spool.to_path_buf(),
            what: format!(
                "spool changed while it was compressed ({} then {})",
                spooled.diff_id, info.diff_id
            ),
        });
    }
    Ok(info)
}
