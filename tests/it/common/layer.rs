//! Helpers for layer tests: reading back a layer blob.

use std::io::Read;

use wpimg::layer::LayerInfo;
use wpimg::layout::Layout;

/// One entry of a layer as read back: path, type byte, mode, uid, gid, mtime, link, xattr names,
/// data digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub path: String,
    pub ty: char,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: u64,
    pub link: String,
    pub xattrs: Vec<(String, Vec<u8>)>,
    pub data: String,
}

/// Decompress and list a layer blob, checking its diff_id on the way.
pub fn list_layer(layout: &Layout, info: &LayerInfo) -> Vec<Listed> {
    let f = layout.open_blob(&info.digest).unwrap();
    let mut tar_bytes = Vec::new();
    if info.media_type.ends_with("zstd") {
        zstd::stream::read::Decoder::new(f)
            .unwrap()
            .read_to_end(&mut tar_bytes)
            .unwrap();
    } else {
        flate2::read::GzDecoder::new(f)
            .read_to_end(&mut tar_bytes)
            .unwrap();
    }
    assert_eq!(
        wpimg::oci::Digest::of_bytes(&tar_bytes),
        info.diff_id,
        "diff_id"
    );
    assert_eq!(tar_bytes.len() as u64, info.uncompressed_size);
    let mut ar = tar::Archive::new(&tar_bytes[..]);
    let mut out = Vec::new();
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let h = e.header().clone();
        let mut xattrs = Vec::new();
        if let Some(p) = e.pax_extensions().unwrap() {
            for r in p {
                let r = r.unwrap();
                if let Some(n) = r.key().unwrap().strip_prefix("SCHILY.xattr.") {
                    xattrs.push((n.to_string(), r.value_bytes().to_vec()));
                }
            }
        }
        let path = String::from_utf8_lossy(&e.path_bytes()).into_owned();
        let link = e
            .link_name_bytes()
            .map(|l| String::from_utf8_lossy(&l).into_owned())
            .unwrap_or_default();
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        out.push(Listed {
            path,
            ty: h.entry_type().as_byte() as char,
            mode: h.mode().unwrap(),
            uid: h.uid().unwrap(),
            gid: h.gid().unwrap(),
            mtime: h.mtime().unwrap(),
            link,
            xattrs,
            data: if data.is_empty() {
                String::new()
            } else {
                wpimg::oci::Digest::of_bytes(&data).short()
            },
        });
    }
    assert_eq!(out.len() as u64, info.entries, "entry count");
    out
}
