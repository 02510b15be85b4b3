//! Where blobs came from: `<layout>/wpimg-sources.json` maps a digest to the
//! `registry/repository` names known to hold it, so a push can mount instead of uploading.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::PathBuf;

use crate::layout::{write_atomic, Layout};
use crate::oci::Digest;

/// File name of the record inside a layout directory.
pub const SOURCES_FILE: &str = "wpimg-sources.json";

/// The blob-source record of a layout.
#[derive(Debug, Default, Clone)]
pub struct BlobSources {
    map: BTreeMap<String, BTreeSet<String>>,
}

impl BlobSources {
    /// Load the record of a layout (empty when missing or unreadable: it is only a hint).
    pub fn load(layout: &Layout) -> Self {
        let path = layout.dir().join(SOURCES_FILE);
        let map = std::fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Self { map }
    }

    /// Repositories (`registry/repository`) known to hold a blob.
    pub fn sources(&self, digest: &Digest) -> impl Iterator<Item = &str> {
        self.map
            .get(&digest.to_string())
            .into_iter()
            .flatten()
            .map(String::as_str)
    }

    /// A repository of `registry` other than `repository` that holds the blob, to mount from.
    pub fn mount_source(
        &self,
        digest: &Digest,
        registry: &str,
        repository: &str,
    ) -> Option<String> {
        self.sources(digest).find_map(|s| {
            let (reg, repo) = s.split_once('/')?;
            (reg == registry && repo != repository).then(|| repo.to_string())
        })
    }

    /// Record that `repo_path` (`registry/repository`) holds the given blobs, merging with what
    /// other processes recorded meanwhile.
    pub fn record<'a>(
        layout: &Layout,
        repo_path: &str,
        digests: impl IntoIterator<Item = &'a Digest>,
    ) -> io::Result<()> {
        let path: PathBuf = layout.dir().join(SOURCES_FILE);
        let _lock = lock(layout)?;
        let mut cur = Self::load(layout);
        for d in digests {
            cur.map
                .entry(d.to_string())
                .or_default()
                .insert(repo_path.to_string());
        }
        let bytes = serde_json::to_vec_pretty(&cur.map).map_err(io::Error::other)?;
        write_atomic(&path, &bytes)
    }
}

fn lock(layout: &Layout) -> io::Result<crate::layout::FileLock> {
    crate::layout::FileLock::exclusive(&layout.dir().join(format!("{SOURCES_FILE}.lock")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_and_find_mount_sources() {
        let dir = tempfile::tempdir().unwrap();
        let l = Layout::open_or_create(dir.path()).unwrap();
        let d = Digest::of_bytes(b"x");
        BlobSources::record(&l, "reg:5000/a", [&d]).unwrap();
        BlobSources::record(&l, "other.io/b", [&d]).unwrap();
        let s = BlobSources::load(&l);
        assert_eq!(s.sources(&d).count(), 2);
        assert_eq!(s.mount_source(&d, "reg:5000", "c").as_deref(), Some("a"));
        assert_eq!(s.mount_source(&d, "reg:5000", "a"), None);
        assert_eq!(s.mount_source(&d, "third.io", "a"), None);
        assert_eq!(
            s.mount_source(&Digest::of_bytes(b"y"), "reg:5000", "c"),
            None
        );
    }
}
