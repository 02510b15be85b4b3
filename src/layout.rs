//! The local OCI image layout: content-addressed blobs, `index.json` with tagged refs and
//! untagged attachments (manifests found by their `subject`); an [`ImageSource`].
//!
//! Blobs are written to a temp file inside the layout, verified, then renamed into place, so a
//! blob path only ever holds complete, verified content.

use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use fs_err as fs;

use crate::oci::{
    Descriptor, Digest, Document, HashingWriter, Image, ImageIndex, ImageSource, Index, Manifest,
    OciError, ResolveError, ANNOTATION_REF_NAME, MEDIA_TYPE_OCI_INDEX,
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
    /// A reference does not lead to one image.
    #[error(transparent)]
    Resolve(Box<ResolveError>),
}

impl From<ResolveError> for LayoutError {
    fn from(e: ResolveError) -> Self {
        LayoutError::Resolve(Box::new(e))
    }
}

impl crate::error::HasKind for LayoutError {
    fn kind(&self) -> crate::error::ErrorKind {
        crate::error::ErrorKind::Failure
    }
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

    /// A temp file in `ingest/` named `PREFIX-PID-XXXXXX` and locked while this process holds
    /// it (deleted when dropped): the collection of leftovers removes it once the process is gone.
    pub fn ingest_file(&self, prefix: &str) -> io::Result<tempfile::NamedTempFile> {
        let ingest = self.dir.join("ingest");
        fs::create_dir_all(&ingest)?;
        let tmp = tempfile::Builder::new()
            .prefix(&crate::leftovers::temp_prefix(prefix))
            .tempfile_in(&ingest)
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("create a temp file in {}: {e}", ingest.display()),
                )
            })?;
        crate::leftovers::hold(tmp.as_file(), tmp.path())?;
        Ok(tmp)
    }

    /// Start writing a blob; commit it with [`BlobWriter::commit`].
    pub fn blob_writer(&self) -> Result<BlobWriter, LayoutError> {
        let tmp = self.ingest_file("blob")?;
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

    /// Store an image's config and manifest (its layers must be stored already).
    pub fn write_image(&self, image: &Image) -> Result<(), LayoutError> {
        self.write_blob(&image.raw_config)?;
        self.write_blob(&image.raw_manifest)?;
        Ok(())
    }

    /// Store an index (its manifests must be stored already).
    pub fn write_index(&self, index: &Index) -> Result<(), LayoutError> {
        self.write_blob(&index.raw)?;
        Ok(())
    }

    /// The image manifest `desc` names, with its config, verified against their digests.
    pub fn image(&self, desc: &Descriptor) -> Result<Image, LayoutError> {
        let raw_manifest = self.read_verified(desc)?;
        let config = match Manifest::parse(&raw_manifest, Some(&desc.media_type))
            .map_err(|source| self.json_err(&desc.digest, source))?
        {
            Manifest::Image(m) => m.config,
            Manifest::Index(_) => {
                return Err(self.json_err(&desc.digest, OciError::NotAnImage(desc.digest.clone())))
            }
        };
        let raw_config = self.read_verified(&config)?;
        Image::from_raw(desc.clone(), raw_manifest, raw_config)
            .map_err(|source| self.json_err(&config.digest, source))
    }

    /// Read a blob and check it against its descriptor's digest.
    fn read_verified(&self, desc: &Descriptor) -> Result<Vec<u8>, LayoutError> {
        let raw = self.read_blob(&desc.digest)?;
        let actual = Digest::of_bytes(&raw);
        if actual != desc.digest {
            return Err(LayoutError::DigestMismatch {
                expected: desc.digest.clone(),
                actual,
            });
        }
        Ok(raw)
    }

    fn json_err(&self, digest: &Digest, source: OciError) -> LayoutError {
        LayoutError::Json {
            path: self.blob_path(digest),
            source,
        }
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
        self.update_index(|idx| {
            idx.manifests.retain(|d| {
                d.annotations.get(ANNOTATION_REF_NAME).map(String::as_str) != Some(reference)
            });
            let mut d = desc.clone();
            d.annotations
                .insert(ANNOTATION_REF_NAME.to_string(), reference.to_string());
            idx.manifests.push(d);
        })
    }

    /// Remove the tag `reference` (nothing happens when there is none).
    pub fn untag(&self, reference: &str) -> Result<(), LayoutError> {
        self.update_index(|idx| {
            idx.manifests.retain(|d| {
                d.annotations.get(ANNOTATION_REF_NAME).map(String::as_str) != Some(reference)
            });
        })
    }

    /// Keep a manifest that has no tag (an attachment such as an SBOM) in `index.json`, so it
    /// is listed by [`Layout::referrers`] of its subject.
    pub fn add_untagged(&self, desc: &Descriptor) -> Result<(), LayoutError> {
        self.update_index(|idx| {
            if !idx.manifests.iter().any(|d| d.digest == desc.digest) {
                idx.manifests.push(desc.clone());
            }
        })
    }

    /// The manifests in `index.json` whose `subject` is `subject` (attachments of it).
    pub fn referrers(&self, subject: &Digest) -> Result<Vec<Descriptor>, LayoutError> {
        let mut out = Vec::new();
        for d in self.index()?.manifests {
            if d.annotations.contains_key(ANNOTATION_REF_NAME) && d.artifact_type.is_none() {
                continue;
            }
            let raw = self.read_verified(&d)?;
            let attached = match Manifest::parse(&raw, Some(&d.media_type)) {
                Ok(Manifest::Image(m)) => m.subject.is_some_and(|s| &s.digest == subject),
                Ok(Manifest::Index(i)) => i.subject.is_some_and(|s| &s.digest == subject),
                Err(source) => return Err(self.json_err(&d.digest, source)),
            };
            if attached {
                out.push(d);
            }
        }
        Ok(out)
    }

    /// The entries of `index.json` that are images or indexes, not attachments.
    pub fn images(&self) -> Result<Vec<Descriptor>, LayoutError> {
        let mut idx = self.index()?;
        idx.manifests.retain(|d| d.artifact_type.is_none());
        Ok(idx.manifests)
    }

    /// Change `index.json` under the layout's lock.
    fn update_index(&self, change: impl FnOnce(&mut ImageIndex)) -> Result<(), LayoutError> {
        let _lock = self.lock()?;
        let mut idx = self.index()?;
        idx.media_type = Some(MEDIA_TYPE_OCI_INDEX.into());
        change(&mut idx);
        write_atomic(
            &self.dir.join("index.json"),
            &serde_json::to_vec_pretty(&idx).unwrap_or_default(),
        )?;
        Ok(())
    }

    fn lock(&self) -> Result<FileLock, LayoutError> {
        Ok(FileLock::exclusive(&self.dir.join("index.json.lock"))?)
    }
}

/// An exclusive lock on a file (created if missing), held until dropped.
pub struct FileLock {
    _file: File,
}

impl FileLock {
    /// Wait for the exclusive lock on `path`.
    pub fn exclusive(path: &Path) -> io::Result<Self> {
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)?;
        let (f, _) = f.into_parts();
        f.lock()
            .map_err(|e| io::Error::new(e.kind(), format!("lock {}: {e}", path.display())))?;
        Ok(Self { _file: f })
    }
}

#[async_trait::async_trait]
impl ImageSource for Layout {
    type Error = LayoutError;

    async fn document(
        &self,
        reference: &str,
        expected: Option<&Digest>,
        _declared_size: Option<u64>,
    ) -> Result<Document, LayoutError> {
        let desc = match reference.parse::<Digest>() {
            Ok(d) => self
                .index()?
                .manifests
                .into_iter()
                .find(|m| m.digest == d)
                .unwrap_or_else(|| Descriptor::new("", d, 0)),
            Err(_) => self.resolve(reference)?,
        };
        if let Some(e) = expected.filter(|e| **e != desc.digest) {
            return Err(LayoutError::DigestMismatch {
                expected: e.clone(),
                actual: desc.digest,
            });
        }
        let raw = self.read_verified(&desc)?;
        let hint = Some(desc.media_type.as_str()).filter(|m| !m.is_empty());
        Document::from_raw(raw, hint).map_err(|source| self.json_err(&desc.digest, source))
    }

    async fn small_blob(&self, descriptor: &Descriptor) -> Result<Vec<u8>, LayoutError> {
        self.read_verified(descriptor)
    }

    fn name(&self, reference: &str) -> String {
        format!("{}:{reference}", self.dir.display())
    }
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

    #[tokio::test]
    async fn images_attachments_and_the_walk() {
        use crate::oci::{Platform, MEDIA_TYPE_OCI_LAYER_GZIP};
        let dir = tempfile::tempdir().unwrap();
        let l = Layout::open_or_create(dir.path()).unwrap();
        let amd = Platform::parse("linux/amd64").unwrap();
        let (ld, ls) = l.write_blob(b"layer").unwrap();
        let img = Image::scratch(&amd)
            .append(
                &[crate::oci::Addendum {
                    layer: Descriptor::new(MEDIA_TYPE_OCI_LAYER_GZIP, ld, ls),
                    diff_id: Digest::of_bytes(b"tar"),
                    history: None,
                }],
                0,
                |_| {},
            )
            .unwrap();
        l.write_image(&img).unwrap();
        let idx = Index::new(vec![img.descriptor.clone()]);
        l.write_index(&idx).unwrap();
        l.tag("app:1", &idx.descriptor).unwrap();
        let (sd, ss) = l.write_blob(b"sbom").unwrap();
        let sbom = Image::artifact(
            "application/spdx+json",
            vec![Descriptor::new("application/spdx+json", sd, ss)],
            Some(img.descriptor.clone()),
            Default::default(),
        );
        l.write_blob(crate::oci::EMPTY_JSON).unwrap();
        l.write_image(&sbom).unwrap();
        l.add_untagged(&sbom.descriptor).unwrap();
        l.add_untagged(&sbom.descriptor).unwrap();

        assert_eq!(l.images().unwrap().len(), 1, "attachments are not images");
        let found = l.referrers(img.digest()).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].digest, *sbom.digest());
        assert!(l.referrers(sbom.digest()).unwrap().is_empty());
        let r = crate::oci::resolve(&l, "app:1", None, &amd).await.unwrap();
        assert_eq!(r.index.unwrap().descriptor.digest, idx.descriptor.digest);
        assert_eq!(r.image.manifest, img.manifest);
        assert_eq!(l.image(&img.descriptor).unwrap().config, img.config);
        let e = crate::oci::resolve(&l, "app:1", None, &Platform::parse("linux/arm64").unwrap())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("available: linux/amd64"), "{e}");
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
