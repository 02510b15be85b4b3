//! The local OCI image layout: content-addressed blobs, `index.json` with tagged refs.
//!
//! Blobs are written to a temp file inside the layout, verified, then renamed into place, so a
//! blob path only ever holds complete, verified content.

use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use fs_err as fs;

use crate::oci::{
    Descriptor, Digest, HashingWriter, ImageIndex, OciError, ANNOTATION_REF_NAME,
    MEDIA_TYPE_OCI_INDEX,
};

/// Errors of the layout store.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// Filesystem error (the message names the path).
    #[error(transparent)]
    Io(#[from] io::Error),
    /// Content did not match its expected digest.
    #[error("digest mismatch for blob: expected {expected}, got {actual}")]
    DigestMismatch {
        /// What was expected.
        expected: Digest,
        /// What the content hashed to.
        actual: Digest,
    },
    /// Content did not have its expected size.
    #[error("size mismatch for blob {digest}: expected {expected} bytes, got {actual}")]
    SizeMismatch {
        /// The blob.
        digest: Digest,
        /// Expected size.
        expected: u64,
        /// Actual size.
        actual: u64,
    },
    /// A ref is not in the index.
    #[error("no image {reference:?} in OCI layout {dir}")]
    RefNotFound {
        /// The missing ref.
        reference: String,
        /// The layout directory.
        dir: PathBuf,
    },
    /// A blob is missing.
    #[error("blob {digest} is missing from OCI layout {dir}")]
    BlobMissing {
        /// The blob.
        digest: Digest,
        /// The layout directory.
        dir: PathBuf,
    },
    /// Malformed JSON in the layout.
    #[error("{path}: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: OciError,
    },
}

/// A local OCI image layout directory.
#[derive(Debug, Clone)]
pub struct Layout {
    dir: PathBuf,
}

impl Layout {
    /// Open a layout, creating the directory structure if missing.
    pub fn open_or_create(dir: impl AsRef<Path>) -> Result<Self, LayoutError> {
        let dir = dir.as_ref().to_path_buf();
        fs::create_dir_all(dir.join("blobs").join("sha256"))?;
        let marker = dir.join("oci-layout");
        if !marker.exists() {
            write_atomic(&marker, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        }
        if !dir.join("index.json").exists() {
            write_atomic(
                &dir.join("index.json"),
                &crate::oci::to_canonical_json(&ImageIndex::empty()),
            )?;
        }
        Ok(Self { dir })
    }

    /// Open an existing layout (error if it is not one).
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, LayoutError> {
        let dir = dir.as_ref().to_path_buf();
        fs::metadata(dir.join("index.json"))?;
        Ok(Self { dir })
    }

    /// The layout directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of a blob (it may not exist).
    pub fn blob_path(&self, d: &Digest) -> PathBuf {
        self.dir.join("blobs").join(d.algorithm()).join(d.hex())
    }

    /// Whether a blob is present.
    pub fn has_blob(&self, d: &Digest) -> bool {
        self.blob_path(d).is_file()
    }

    /// Size of a present blob.
    pub fn blob_size(&self, d: &Digest) -> Result<u64, LayoutError> {
        Ok(fs::metadata(self.blob_path(d))?.len())
    }

    /// Open a blob for reading.
    pub fn open_blob(&self, d: &Digest) -> Result<fs::File, LayoutError> {
        let p = self.blob_path(d);
        if !p.is_file() {
            return Err(LayoutError::BlobMissing {
                digest: d.clone(),
                dir: self.dir.clone(),
            });
        }
        Ok(fs::File::open(p)?)
    }

    /// Read a whole (small) blob.
    pub fn read_blob(&self, d: &Digest) -> Result<Vec<u8>, LayoutError> {
        let mut v = Vec::new();
        self.open_blob(d)?.read_to_end(&mut v)?;
        Ok(v)
    }

    /// Start writing a blob; commit it with [`BlobWriter::commit`].
    pub fn blob_writer(&self) -> Result<BlobWriter, LayoutError> {
        let ingest = self.dir.join("ingest");
        fs::create_dir_all(&ingest)?;
        let tmp = tempfile::Builder::new()
            .prefix("blob-")
            .tempfile_in(&ingest)
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("create temp blob in {}: {e}", ingest.display()),
                )
            })?;
        let file = tmp.reopen()?;
        Ok(BlobWriter {
            layout: self.clone(),
            tmp,
            w: HashingWriter::new(BufWriter::with_capacity(1 << 20, file)),
        })
    }

    /// Store bytes as a blob and return its digest and size.
    pub fn write_blob(&self, bytes: &[u8]) -> Result<(Digest, u64), LayoutError> {
        let d = Digest::of_bytes(bytes);
        if !self.has_blob(&d) {
            let mut w = self.blob_writer()?;
            w.write_all(bytes)?;
            w.commit(Some(&d), Some(bytes.len() as u64))?;
        }
        Ok((d, bytes.len() as u64))
    }

    /// Read `index.json`.
    pub fn index(&self) -> Result<ImageIndex, LayoutError> {
        let path = self.dir.join("index.json");
        let bytes = fs::read(&path)?;
        serde_json::from_slice(&bytes).map_err(|e| LayoutError::Json {
            path,
            source: OciError::Json {
                what: "index",
                source: e,
            },
        })
    }

    /// Find the descriptor tagged `reference` (the `org.opencontainers.image.ref.name` value).
    pub fn resolve(&self, reference: &str) -> Result<Descriptor, LayoutError> {
        let idx = self.index()?;
        idx.manifests
            .into_iter()
            .rev()
            .find(|d| d.annotations.get(ANNOTATION_REF_NAME).map(String::as_str) == Some(reference))
            .ok_or_else(|| LayoutError::RefNotFound {
                reference: reference.to_string(),
                dir: self.dir.clone(),
            })
    }

    /// Tag a descriptor as `reference`, replacing an earlier entry with the same ref.
    pub fn tag(&self, reference: &str, desc: &Descriptor) -> Result<(), LayoutError> {
        let _lock = self.lock()?;
        let mut idx = self.index()?;
        idx.media_type = Some(MEDIA_TYPE_OCI_INDEX.into());
        idx.manifests.retain(|d| {
            d.annotations.get(ANNOTATION_REF_NAME).map(String::as_str) != Some(reference)
        });
        let mut d = desc.clone();
        d.annotations
            .insert(ANNOTATION_REF_NAME.to_string(), reference.to_string());
        idx.manifests.push(d);
        write_atomic(
            &self.dir.join("index.json"),
            &serde_json::to_vec_pretty(&idx).unwrap_or_default(),
        )?;
        Ok(())
    }

    /// Add an untagged manifest (an attachment such as an SBOM artifact) to `index.json`,
    /// once per digest.
    pub fn add_manifest(&self, desc: &Descriptor) -> Result<(), LayoutError> {
        let _lock = self.lock()?;
        let mut idx = self.index()?;
        if idx
            .manifests
            .iter()
            .any(|d| d.digest == desc.digest && !d.annotations.contains_key(ANNOTATION_REF_NAME))
        {
            return Ok(());
        }
        idx.media_type = Some(MEDIA_TYPE_OCI_INDEX.into());
        idx.manifests.push(desc.clone());
        write_atomic(
            &self.dir.join("index.json"),
            &serde_json::to_vec_pretty(&idx).unwrap_or_default(),
        )?;
        Ok(())
    }

    /// Remove leftovers of interrupted writes.
    pub fn clean_ingest(&self) -> Result<(), LayoutError> {
        let ingest = self.dir.join("ingest");
        if ingest.is_dir() {
            fs::remove_dir_all(&ingest)?;
        }
        Ok(())
    }

    fn lock(&self) -> Result<IndexLock, LayoutError> {
        let path = self.dir.join("index.json.lock");
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)?;
        let (f, _) = f.into_parts();
        // SAFETY: flock on a valid fd we own.
        let rc = unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&f), libc::LOCK_EX) };
        if rc != 0 {
            return Err(io::Error::new(
                io::Error::last_os_error().kind(),
                format!("lock {}: {}", path.display(), io::Error::last_os_error()),
            )
            .into());
        }
        Ok(IndexLock { _f: f })
    }
}

struct IndexLock {
    _f: File,
}

/// A blob being written: hashed as it is written, renamed into place on commit, deleted on drop.
pub struct BlobWriter {
    layout: Layout,
    tmp: tempfile::NamedTempFile,
    w: HashingWriter<BufWriter<File>>,
}

impl BlobWriter {
    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.w.count()
    }

    /// Verify against the expected digest/size (if given) and move the blob into place.
    pub fn commit(
        self,
        expected: Option<&Digest>,
        expected_size: Option<u64>,
    ) -> Result<(Digest, u64), LayoutError> {
        let (buf, digest, size) = self.w.finish();
        let file = buf.into_inner().map_err(|e| e.into_error())?;
        file.sync_data()?;
        drop(file);
        if let Some(exp) = expected {
            if *exp != digest {
                return Err(LayoutError::DigestMismatch {
                    expected: exp.clone(),
                    actual: digest,
                });
            }
        }
        if let Some(exp) = expected_size {
            if exp != size {
                return Err(LayoutError::SizeMismatch {
                    digest,
                    expected: exp,
                    actual: size,
                });
            }
        }
        let dest = self.layout.blob_path(&digest);
        self.tmp.persist(&dest).map_err(|e| {
            io::Error::new(
                e.error.kind(),
                format!("rename blob to {}: {}", dest.display(), e.error),
            )
        })?;
        Ok((digest, size))
    }
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.w.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.w.flush()
    }
}

/// Write a small file atomically (temp file in the same directory, then rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempfile_in(dir)
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("create temp file in {}: {e}", dir.display()),
            )
        })?;
    tmp.write_all(bytes)?;
    tmp.persist(path).map_err(|e| {
        io::Error::new(
            e.error.kind(),
            format!("write {}: {}", path.display(), e.error),
        )
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_roundtrip_and_tagging() {
        let dir = tempfile::tempdir().unwrap();
        let l = Layout::open_or_create(dir.path()).unwrap();
        let (d, n) = l.write_blob(b"abc").unwrap();
        assert_eq!(n, 3);
        assert!(l.has_blob(&d));
        assert_eq!(l.read_blob(&d).unwrap(), b"abc");
        let desc = Descriptor::new(crate::oci::MEDIA_TYPE_OCI_MANIFEST, d.clone(), 3);
        l.tag("img:1", &desc).unwrap();
        l.tag("img:1", &desc).unwrap();
        l.tag("img:2", &desc).unwrap();
        assert_eq!(l.index().unwrap().manifests.len(), 2);
        assert_eq!(l.resolve("img:1").unwrap().digest, d);
        assert!(matches!(
            l.resolve("nope"),
            Err(LayoutError::RefNotFound { .. })
        ));
    }

    #[test]
    fn wrong_digest_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let l = Layout::open_or_create(dir.path()).unwrap();
        let mut w = l.blob_writer().unwrap();
        w.write_all(b"data").unwrap();
        let wrong = Digest::of_bytes(b"other");
        assert!(matches!(
            w.commit(Some(&wrong), None),
            Err(LayoutError::DigestMismatch { .. })
        ));
        assert!(!l.has_blob(&wrong));
        assert!(!l.has_blob(&Digest::of_bytes(b"data")));
        let left: Vec<_> = std::fs::read_dir(dir.path().join("ingest"))
            .unwrap()
            .collect();
        assert!(left.is_empty(), "temp blob left behind: {left:?}");
    }
}
