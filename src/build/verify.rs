//! The cache does not trust its blobs: a cached layer is checked before it is reused. A blob
//! whose file is unchanged since it was last known good (same device, inode, size, mtime and
//! ctime, kept as a checksum in `wpimg-cache/verified/HEX`) is reused at once; any other is
//! hashed in full. Writing a file always moves its ctime, so any change made through the
//! filesystem is caught without rehashing unchanged blobs on every hit.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use sha2::{Digest as _, Sha256};

use crate::layout::{write_atomic, Layout};
use crate::oci::{Descriptor, Digest};

/// Why a cached blob cannot be reused.
#[derive(Debug, thiserror::Error)]
pub enum BlobProblem {
    /// The file is gone or unreadable.
    #[error("cannot read it: {0}")]
    Unreadable(#[from] std::io::Error),
    /// Its size is not the descriptor's.
    #[error("it has {actual} bytes instead of {expected}")]
    Size {
        /// The descriptor's size.
        expected: u64,
        /// The file's.
        actual: u64,
    },
    /// Its content hashes to another digest.
    #[error("its content hashes to {actual}")]
    Digest {
        /// What it hashes to.
        actual: Digest,
    },
}

/// Check the blob of `desc` (a cached layer) before it is reused.
pub fn verify_cached_blob(layout: &Layout, desc: &Descriptor) -> Result<(), BlobProblem> {
    let path = layout.blob_path(&desc.digest);
    let meta = fs_err::metadata(&path)?;
    if meta.len() != desc.size {
        return Err(BlobProblem::Size {
            expected: desc.size,
            actual: meta.len(),
        });
    }
    if recorded(layout, &desc.digest).as_deref() == Some(identity(&meta).as_str()) {
        return Ok(());
    }
    let actual = hash_file(&path)?;
    if actual != desc.digest {
        return Err(BlobProblem::Digest { actual });
    }
    remember(layout, &desc.digest);
    Ok(())
}

/// Record the blob of `digest` as good as its file is now (a blob just written or verified).
pub fn remember(layout: &Layout, digest: &Digest) {
    let Ok(meta) = fs_err::metadata(layout.blob_path(digest)) else {
        return;
    };
    let path = identity_path(layout, digest);
    if let Some(dir) = path.parent() {
        let _ = fs_err::create_dir_all(dir);
    }
    // Best effort: without the record the next hit hashes the blob again.
    let _ = write_atomic(&path, identity(&meta).as_bytes());
}

/// Forget a blob found bad: its record and the blob itself (the rebuilt step writes it anew).
pub fn forget(layout: &Layout, digest: &Digest) {
    let _ = fs_err::remove_file(identity_path(layout, digest));
    let _ = fs_err::remove_file(layout.blob_path(digest));
}

fn identity_path(layout: &Layout, digest: &Digest) -> PathBuf {
    layout
        .dir()
        .join("wpimg-cache")
        .join("verified")
        .join(digest.hex())
}

fn recorded(layout: &Layout, digest: &Digest) -> Option<String> {
    fs_err::read_to_string(identity_path(layout, digest)).ok()
}

/// A checksum of where and when the file was last written.
fn identity(m: &std::fs::Metadata) -> String {
    let fields = format!(
        "{}:{}:{}:{}.{}:{}.{}",
        m.dev(),
        m.ino(),
        m.len(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec()
    );
    hex::encode(Sha256::digest(fields.as_bytes()))
}

fn hash_file(path: &std::path::Path) -> std::io::Result<Digest> {
    let f = fs_err::File::open(path)?;
    Ok(Digest::of_reader(std::io::BufReader::with_capacity(1 << 20, f))?.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unchanged_blobs_pass_and_any_change_is_caught() {
        let d = tempfile::tempdir().unwrap();
        let l = Layout::open_or_create(d.path()).unwrap();
        let (dg, n) = l.write_blob(b"layer bytes").unwrap();
        let desc = Descriptor::new(crate::oci::MEDIA_TYPE_OCI_LAYER_GZIP, dg.clone(), n);
        verify_cached_blob(&l, &desc).unwrap();
        assert!(recorded(&l, &dg).is_some(), "a verified blob is remembered");
        verify_cached_blob(&l, &desc).unwrap();

        // Same size, other bytes: the identity moved, the hash catches it.
        std::fs::write(l.blob_path(&dg), b"LAYER BYTES").unwrap();
        assert!(matches!(
            verify_cached_blob(&l, &desc),
            Err(BlobProblem::Digest { .. })
        ));
        std::fs::write(l.blob_path(&dg), b"short").unwrap();
        assert!(matches!(
            verify_cached_blob(&l, &desc),
            Err(BlobProblem::Size { .. })
        ));
        forget(&l, &dg);
        assert!(!l.has_blob(&dg) && recorded(&l, &dg).is_none());
        assert!(matches!(
            verify_cached_blob(&l, &desc),
            Err(BlobProblem::Unreadable(_))
        ));
    }
}
