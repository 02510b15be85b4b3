//! The docker-archive format (`docker save` / `docker load`): writing an image of the layout as
//! one (streamed into the engine, nothing on disk), and reading the top layer of a saved one.
//!
//! The save format differs by engine version (per-layer `layer.tar` directories, or an OCI
//! layout with compressed blobs): reading always goes through `manifest.json` and sniffs the
//! compression.

use std::collections::HashMap;
use std::io::{self, Read, Seek, Write};
use std::path::PathBuf;

use crate::layout::Layout;
use crate::oci::{Digest, Image};
use crate::runtime::{ChannelWriter, Engine, RuntimeError};

/// Errors of reading or writing a docker archive.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// Reading or writing failed.
    #[error("docker archive: {0}")]
    Io(#[from] io::Error),
    /// A blob of the image is not in the layout.
    #[error("docker archive: {0}")]
    Layout(#[from] crate::layout::LayoutError),
    /// The archive is not what `docker save` writes.
    #[error("docker save archive: {0}")]
    Malformed(String),
    /// The engine refused the archive.
    #[error(transparent)]
    Engine(#[from] RuntimeError),
}

/// Where the layers of an archive come from, and which the engine already has.
#[derive(Debug, Clone, Default)]
pub struct Blobs {
    /// Layers (by digest) read from a file instead of the layout (uncompressed spools).
    pub spooled: HashMap<Digest, PathBuf>,
    /// The engine has the first `present` layers (an image made of them): their files are left
    /// out. Docker's image store then never opens them (it finds the layer chain); an engine
    /// that does refuses the archive, and the caller loads the whole image.
    pub present: usize,
}

/// Write a docker archive of `image` (config, layer blobs as they are — the engine decompresses
/// them — and `manifest.json` last), tagged `repo_tags`.
pub fn write(
    layout: &Layout,
    image: &Image,
    repo_tags: &[String],
    out: impl Write,
) -> Result<(), ArchiveError> {
    write_with(layout, &Blobs::default(), image, repo_tags, out)
}

/// [`write`] with layers from `blobs`.
pub fn write_with(
    layout: &Layout,
    blobs: &Blobs,
    image: &Image,
    repo_tags: &[String],
    out: impl Write,
) -> Result<(), ArchiveError> {
    let mut b = tar::Builder::new(out);
    let config = &image.manifest.config.digest;
    let cfg_name = format!("{}.json", config.hex());
    // From the image itself: intermediate step images are not stored in the layout.
    b.append_data(
        &mut file_header(image.raw_config.len() as u64),
        &cfg_name,
        image.raw_config.as_slice(),
    )?;
    let mut names = Vec::new();
    for (i, d) in image.layer_digests().into_iter().enumerate() {
        let n = format!("{}/layer.tar", d.hex());
        if i >= blobs.present && !names.contains(&n) {
            match blobs.spooled.get(&d) {
                Some(path) => {
                    let f = std::fs::File::open(path)?;
                    let len = f.metadata()?.len();
                    b.append_data(&mut file_header(len), &n, f)?;
                }
                None => append_blob(&mut b, layout, &n, &d)?,
            }
        }
        names.push(n);
    }
    let manifest = serde_json::json!([{
        "Config": cfg_name,
        "RepoTags": repo_tags,
        "Layers": names,
    }]);
    let bytes = serde_json::to_vec(&manifest).map_err(io::Error::other)?;
    b.append_data(
        &mut file_header(bytes.len() as u64),
        "manifest.json",
        bytes.as_slice(),
    )?;
    b.into_inner()?.flush()?;
    Ok(())
}

fn file_header(size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_size(size);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_entry_type(tar::EntryType::Regular);
    h
}

fn append_blob(
    b: &mut tar::Builder<impl Write>,
    layout: &Layout,
    name: &str,
    digest: &crate::oci::Digest,
) -> Result<(), ArchiveError> {
    let f = layout.open_blob(digest)?;
    let len = f.metadata()?.len();
    b.append_data(&mut file_header(len), name, f)?;
    Ok(())
}

/// Load `image` from the layout into the engine, tagged `repo_tags`: the archive is written on a
/// blocking thread and streamed into the engine as it is produced.
pub async fn load(
    engine: &dyn Engine,
    layout: &Layout,
    image: &Image,
    repo_tags: Vec<String>,
) -> Result<(), ArchiveError> {
    load_with(engine, layout, Blobs::default(), image, repo_tags).await
}

/// [`load`] with layers from `blobs`; when the engine refuses an archive that leaves layers out,
/// the whole image is loaded.
pub async fn load_with(
    engine: &dyn Engine,
    layout: &Layout,
    blobs: Blobs,
    image: &Image,
    repo_tags: Vec<String>,
) -> Result<(), ArchiveError> {
    let partial = blobs.present > 0;
    match stream_into(engine, layout, blobs.clone(), image, repo_tags.clone()).await {
        Err(_) if partial => {
            let all = Blobs {
                present: 0,
                ..blobs
            };
            stream_into(engine, layout, all, image, repo_tags).await
        }
        other => other,
    }
}

async fn stream_into(
    engine: &dyn Engine,
    layout: &Layout,
    blobs: Blobs,
    image: &Image,
    repo_tags: Vec<String>,
) -> Result<(), ArchiveError> {
    let (w, stream) = ChannelWriter::pair();
    let (layout, image) = (layout.clone(), image.clone());
    let writer = tokio::task::spawn_blocking(move || {
        let mut w = w;
        match write_with(&layout, &blobs, &image, &repo_tags, &mut w) {
            Ok(()) => Ok(()),
            Err(e) => {
                w.fail(io::Error::other(e.to_string()));
                Err(e)
            }
        }
    });
    let loaded = engine.load(stream).await;
    let written = writer.await.map_err(io::Error::other)?;
    loaded?;
    written
}

/// The top (last) layer of a `docker save` archive, decompressed when the engine stored it
/// compressed, handed to `read`.
pub fn with_top_layer<T>(
    file: &mut std::fs::File,
    read: impl FnOnce(Box<dyn Read + '_>) -> T,
) -> Result<T, ArchiveError> {
    file.rewind()?;
    let top = top_layer_path(file)?;
    file.rewind()?;
    let mut ar = tar::Archive::new(file);
    for e in ar.entries_with_seek()? {
        let e = e?;
        if e.path()?.to_string_lossy() == top {
            return Ok(read(sniff_decompress(e)?));
        }
    }
    Err(ArchiveError::Malformed(format!("no {top} in the archive")))
}

/// The path of the last layer in a docker-save archive, via its `manifest.json`.
fn top_layer_path(f: &mut std::fs::File) -> Result<String, ArchiveError> {
    #[derive(serde::Deserialize)]
    struct Entry {
        #[serde(rename = "Layers")]
        layers: Vec<String>,
    }
    let mut ar = tar::Archive::new(&mut *f);
    for e in ar.entries_with_seek()? {
        let mut e = e?;
        if e.path()?.to_string_lossy() == "manifest.json" {
            let mut s = String::new();
            e.read_to_string(&mut s)?;
            let m: Vec<Entry> = serde_json::from_str(&s)
                .map_err(|e| ArchiveError::Malformed(format!("manifest.json: {e}")))?;
            return m
                .into_iter()
                .next()
                .and_then(|e| e.layers.last().cloned())
                .ok_or_else(|| ArchiveError::Malformed("manifest.json lists no layers".into()));
        }
    }
    Err(ArchiveError::Malformed("no manifest.json".into()))
}

/// Newer engines may store layers compressed inside a save archive: sniff the magic bytes.
fn sniff_decompress<'a>(r: impl Read + 'a) -> io::Result<Box<dyn Read + 'a>> {
    let mut r = io::BufReader::with_capacity(1 << 20, r);
    let head = io::BufRead::fill_buf(&mut r)?;
    if head.starts_with(&[0x1f, 0x8b]) {
        Ok(Box::new(flate2::read::MultiGzDecoder::new(r)))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Ok(Box::new(zstd::stream::read::Decoder::with_buffer(r)?))
    } else {
        Ok(Box::new(r))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::{Addendum, Descriptor, Digest, Platform, MEDIA_TYPE_OCI_LAYER_TAR};

    #[test]
    fn written_archive_reads_back_its_top_layer() {
        let d = tempfile::tempdir().unwrap();
        let layout = Layout::open_or_create(d.path()).unwrap();
        let mut layers = Vec::new();
        for content in [&b"bottom"[..], b"top"] {
            let (dg, n) = layout.write_blob(content).unwrap();
            layers.push(Addendum {
                layer: Descriptor::new(MEDIA_TYPE_OCI_LAYER_TAR, dg.clone(), n),
                diff_id: dg,
                history: None,
            });
        }
        let img = Image::scratch(&Platform::host())
            .append(&layers, 0, |_| {})
            .unwrap();
        layout.write_image(&img).unwrap();
        let mut out = tempfile::tempfile().unwrap();
        write(&layout, &img, &["app:1".to_string()], &mut out).unwrap();
        let got = with_top_layer(&mut out, |mut r| {
            let mut s = Vec::new();
            r.read_to_end(&mut s).map(|_| s)
        })
        .unwrap()
        .unwrap();
        assert_eq!(got, b"top");
        assert_eq!(Digest::of_bytes(&got), layers[1].diff_id);
    }
}
