//! rpm's database: `rpmdb.sqlite` (EL9, CentOS Stream 9, Fedora) and the older Berkeley DB
//! hash file `Packages` (EL7/EL8), both holding one rpm header blob per installed package.
//!
//! The header format (rpm's `headerImport`): big-endian `il` (index entries) and `dl` (data
//! bytes), `il` 16-byte entries (tag, type, offset, count), then the data store. The Berkeley
//! DB reader walks hash pages and follows overflow chains; it reads no keys and no indexes.
//! SQLite is read through rusqlite's bundled SQLite (read-only queries on a private copy).

use std::path::Path;

use super::{purl, Ecosystem, Package, SbomError, SourcePackage};

/// SQLite databases, in lookup order (paths in the image).
pub const SQLITE_PATHS: &[&str] = &[
    "var/lib/rpm/rpmdb.sqlite",
    "usr/lib/sysimage/rpm/rpmdb.sqlite",
];
/// Berkeley DB databases, in lookup order.
pub const BDB_PATHS: &[&str] = &["var/lib/rpm/Packages", "usr/lib/sysimage/rpm/Packages"];

/// rpm header tags the SBOM reads.
pub mod tag {
    /// Package name.
    pub const NAME: u32 = 1000;
    /// Version.
    pub const VERSION: u32 = 1001;
    /// Release.
    pub const RELEASE: u32 = 1002;
    /// Epoch (INT32).
    pub const EPOCH: u32 = 1003;
    /// Vendor.
    pub const VENDOR: u32 = 1011;
    /// Licence.
    pub const LICENSE: u32 = 1014;
    /// Architecture.
    pub const ARCH: u32 = 1022;
    /// Source rpm file name.
    pub const SOURCERPM: u32 = 1044;
}

const TYPE_INT32: u32 = 4;
const TYPE_STRING: u32 = 6;
const TYPE_STRING_ARRAY: u32 = 8;
const TYPE_I18NSTRING: u32 = 9;
/// rpm's own limits on a header (`hdrchkTags`, `hdrchkData`).
const MAX_INDEX_ENTRIES: usize = 0xffff;
const MAX_DATA: usize = 256 << 20;
const HEADER_MAGIC: [u8; 8] = [0x8e, 0xad, 0xe8, 0x01, 0, 0, 0, 0];

/// A parsed rpm header: its index and data store.
#[derive(Debug)]
pub struct Header<'a> {
    entries: Vec<(u32, u32, usize, usize)>,
    data: &'a [u8],
}

impl<'a> Header<'a> {
    /// Parse a header blob (as stored in the database; a leading header magic is skipped).
    pub fn parse(blob: &'a [u8]) -> Result<Self, String> {
        let blob = blob.strip_prefix(&HEADER_MAGIC[..]).unwrap_or(blob);
        let be = |at: usize| -> Result<u32, String> {
            blob.get(at..at + 4)
                .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
                .ok_or_else(|| format!("header truncated at byte {at}"))
        };
        let il = be(0)? as usize;
        let dl = be(4)? as usize;
        if il == 0 || il > MAX_INDEX_ENTRIES || dl > MAX_DATA {
            return Err(format!("implausible header sizes (il {il}, dl {dl})"));
        }
        let data_start = 8 + il * 16;
        let data = blob.get(data_start..data_start + dl).ok_or_else(|| {
            format!(
                "header of {} bytes is shorter than its sizes say",
                blob.len()
            )
        })?;
        let mut entries = Vec::with_capacity(il);
        for i in 0..il {
            let at = 8 + i * 16;
            let (tag, kind, off, count) = (be(at)?, be(at + 4)?, be(at + 8)?, be(at + 12)?);
            if off as usize > dl {
                return Err(format!("tag {tag} points outside the data store"));
            }
            entries.push((tag, kind, off as usize, count as usize));
        }
        Ok(Self { entries, data })
    }

    /// A string tag (STRING, the first of a STRING_ARRAY or I18NSTRING).
    pub fn string(&self, tag: u32) -> Option<String> {
        let &(_, kind, off, _) = self.entries.iter().find(|e| e.0 == tag)?;
        if !matches!(kind, TYPE_STRING | TYPE_STRING_ARRAY | TYPE_I18NSTRING) {
            return None;
        }
        let rest = self.data.get(off..)?;
        let end = rest.iter().position(|&b| b == 0)?;
        Some(String::from_utf8_lossy(&rest[..end]).into_owned())
    }

    /// The first value of an INT32 tag.
    pub fn int32(&self, tag: u32) -> Option<u32> {
        let &(_, kind, off, count) = self.entries.iter().find(|e| e.0 == tag)?;
        if kind != TYPE_INT32 || count == 0 {
            return None;
        }
        let b = self.data.get(off..off + 4)?;
        Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
}

/// The package a header describes; `None` for `gpg-pubkey` pseudo-packages (imported signing
/// keys, not software) and headers without name or version.
pub fn package_from_header(h: &Header<'_>, namespace: &str) -> Option<Package> {
    let name = h.string(tag::NAME).filter(|n| !n.is_empty())?;
    if name == "gpg-pubkey" {
        return None;
    }
    let version = h.string(tag::VERSION)?;
    let release = h.string(tag::RELEASE).filter(|r| !r.is_empty());
    let version = match release {
        Some(r) => format!("{version}-{r}"),
        None => version,
    };
    let epoch = h.int32(tag::EPOCH);
    let arch = h
        .string(tag::ARCH)
        .filter(|a| !a.is_empty() && a != "(none)");
    let source = h
        .string(tag::SOURCERPM)
        .filter(|s| !s.is_empty() && s != "(none)")
        .map(|s| source_from_srpm(&s));
    let purl = purl::build(
        Ecosystem::Rpm.purl_type(),
        Some(namespace),
        &name,
        Some(&version),
        &[
            ("arch", arch.clone().unwrap_or_default()),
            ("epoch", epoch.map(|e| e.to_string()).unwrap_or_default()),
        ],
    );
    Some(Package {
        ecosystem: Ecosystem::Rpm,
        name,
        version,
        epoch,
        arch,
        source,
        license: h.string(tag::LICENSE).filter(|l| !l.is_empty()),
        supplier: h.string(tag::VENDOR).filter(|v| !v.is_empty()),
        purl,
    })
}

/// `bash-5.1.8-9.el9.src.rpm` → name `bash`, version `5.1.8-9.el9`.
fn source_from_srpm(srpm: &str) -> SourcePackage {
    let base = srpm
        .strip_suffix(".src.rpm")
        .or_else(|| srpm.strip_suffix(".nosrc.rpm"))
        .unwrap_or(srpm);
    let mut parts = base.rsplitn(3, '-');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(rel), Some(ver), Some(name)) if !name.is_empty() => SourcePackage {
            name: name.to_string(),
            version: Some(format!("{ver}-{rel}")),
        },
        _ => SourcePackage {
            name: base.to_string(),
            version: None,
        },
    }
}

fn packages_of_blobs<'a>(
    path: &str,
    blobs: impl IntoIterator<Item = &'a [u8]>,
    namespace: &str,
) -> Result<Vec<Package>, SbomError> {
    let mut out = Vec::new();
    for (i, blob) in blobs.into_iter().enumerate() {
        let h = Header::parse(blob)
            .map_err(|m| SbomError::db(path, format!("package header {i}: {m}")))?;
        out.extend(package_from_header(&h, namespace));
    }
    Ok(out)
}

/// Packages of an `rpmdb.sqlite` (`SELECT blob FROM Packages`), opened from a private copy
/// (its `-wal` beside it is replayed).
pub fn read_sqlite(path: &str, file: &Path, namespace: &str) -> Result<Vec<Package>, SbomError> {
    use rusqlite::{Connection, OpenFlags};
    let sql_err = |source| SbomError::Sqlite {
        path: path.to_string(),
        source,
    };
    // The copy sits in wpimg's private temp dir: opening it read-write lets SQLite replay a
    // WAL the image left; nothing is written back into any image.
    let conn = Connection::open_with_flags(
        file,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(sql_err)?;
    let mut stmt = conn
        .prepare("SELECT blob FROM Packages ORDER BY hnum")
        .map_err(sql_err)?;
    let blobs: Vec<Vec<u8>> = stmt
        .query_map([], |row| row.get::<_, Vec<u8>>(0))
        .map_err(sql_err)?
        .collect::<Result<_, _>>()
        .map_err(sql_err)?;
    packages_of_blobs(path, blobs.iter().map(Vec::as_slice), namespace)
}

/// Packages of a Berkeley DB hash `Packages` file.
pub fn read_bdb(path: &str, file: &Path, namespace: &str) -> Result<Vec<Package>, SbomError> {
    let bytes = fs_err::read(file).map_err(|source| SbomError::Io {
        context: "read a collected rpm database".into(),
        source,
    })?;
    let values = bdb::hash_values(&bytes).map_err(|m| SbomError::db(path, m))?;
    // Besides headers, rpm keeps one small record (key 0: the next instance number).
    let headers = values.iter().filter(|v| v.len() > 8).map(Vec::as_slice);
    packages_of_blobs(path, headers, namespace)
}

/// A reader for the values of a Berkeley DB hash database (format versions 8-10).
pub mod bdb {
    const HASH_MAGIC: u32 = 0x0006_1561;
    const PAGE_HEADER: usize = 26;
    const P_HASH_UNSORTED: u8 = 2;
    const P_OVERFLOW: u8 = 7;
    const P_HASHMETA: u8 = 8;
    const P_HASH: u8 = 13;
    const H_KEYDATA: u8 = 1;
    const H_OFFPAGE: u8 = 3;

    struct Db<'a> {
        bytes: &'a [u8],
        page_size: usize,
        little: bool,
    }

    impl<'a> Db<'a> {
        fn u16_at(&self, at: usize) -> Option<u16> {
            let b = self.bytes.get(at..at + 2)?;
            Some(if self.little {
                u16::from_le_bytes([b[0], b[1]])
            } else {
                u16::from_be_bytes([b[0], b[1]])
            })
        }

        fn u32_at(&self, at: usize) -> Option<u32> {
            let b = self.bytes.get(at..at + 4)?;
            Some(if self.little {
                u32::from_le_bytes([b[0], b[1], b[2], b[3]])
            } else {
                u32::from_be_bytes([b[0], b[1], b[2], b[3]])
            })
        }

        fn page(&self, n: usize) -> Option<&'a [u8]> {
            self.bytes.get(n * self.page_size..(n + 1) * self.page_size)
        }

        /// Follow an overflow chain from `pgno` and gather `len` bytes.
        fn overflow(&self, mut pgno: u32, len: usize) -> Result<Vec<u8>, String> {
            let mut out = Vec::with_capacity(len.min(64 << 20));
            let pages = self.bytes.len() / self.page_size;
            let mut hops = 0;
            while pgno != 0 && out.len() < len {
                hops += 1;
                let page = self
                    .page(pgno as usize)
                    .filter(|_| hops <= pages)
                    .ok_or_else(|| format!("overflow page {pgno} is outside the file or loops"))?;
                if page[25] != P_OVERFLOW {
                    return Err(format!("page {pgno} is not an overflow page"));
                }
                let base = pgno as usize * self.page_size;
                let on_page = self.u16_at(base + 22).unwrap_or(0) as usize;
                let chunk = page
                    .get(PAGE_HEADER..PAGE_HEADER + on_page)
                    .ok_or_else(|| format!("overflow page {pgno} has a bad length"))?;
                out.extend_from_slice(chunk);
                pgno = self.u32_at(base + 16).unwrap_or(0);
            }
            if out.len() != len {
                return Err(format!("overflow item has {} of {len} bytes", out.len()));
            }
            Ok(out)
        }
    }

    /// Every data item of every hash page, in page order.
    pub fn hash_values(bytes: &[u8]) -> Result<Vec<Vec<u8>>, String> {
        let magic_le = bytes
            .get(12..16)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
        let magic_be = bytes
            .get(12..16)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
        let little = match (magic_le, magic_be) {
            (Some(HASH_MAGIC), _) => true,
            (_, Some(HASH_MAGIC)) => false,
            _ => return Err("not a Berkeley DB hash database (bad magic)".into()),
        };
        let mut db = Db {
            bytes,
            page_size: 0,
            little,
        };
        let page_size = db.u32_at(20).unwrap_or(0) as usize;
        if !(512..=65536).contains(&page_size) || !page_size.is_power_of_two() {
            return Err(format!("bad page size {page_size}"));
        }
        db.page_size = page_size;
        if bytes.get(25) != Some(&P_HASHMETA) {
            return Err("first page is not a hash meta page".into());
        }
        if bytes.get(24).copied().unwrap_or(0) != 0 || bytes.get(26).copied().unwrap_or(0) & 1 != 0
        {
            return Err("encrypted or checksummed databases are not supported".into());
        }
        let mut values = Vec::new();
        for n in 1..bytes.len() / page_size {
            let Some(page) = db.page(n) else { break };
            if !matches!(page[25], P_HASH | P_HASH_UNSORTED) {
                continue;
            }
            let base = n * page_size;
            let entries = db.u16_at(base + 20).unwrap_or(0) as usize;
            let offsets: Vec<usize> = (0..entries)
                .map(|i| db.u16_at(base + PAGE_HEADER + 2 * i).unwrap_or(0) as usize)
                .collect();
            // Keys at even indexes, data at odd ones; items are packed from the page's end.
            for i in (1..entries).step_by(2) {
                let off = offsets[i];
                let end = if i == 0 { page_size } else { offsets[i - 1] };
                if off < PAGE_HEADER || off >= page_size || end > page_size || end <= off {
                    return Err(format!("page {n}: item {i} has a bad offset"));
                }
                match page[off] {
                    H_KEYDATA => values.push(page[off + 1..end].to_vec()),
                    H_OFFPAGE => {
                        let pgno = db.u32_at(base + off + 4).unwrap_or(0);
                        let len = db.u32_at(base + off + 8).unwrap_or(0) as usize;
                        values.push(db.overflow(pgno, len)?);
                    }
                    _ => {}
                }
            }
        }
        Ok(values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A header blob with string tags and an optional epoch.
    pub(crate) fn header(strings: &[(u32, &str)], epoch: Option<u32>) -> Vec<u8> {
        let mut index = Vec::new();
        let mut data = Vec::new();
        if let Some(e) = epoch {
            index.push((tag::EPOCH, TYPE_INT32, data.len(), 1));
            data.extend_from_slice(&e.to_be_bytes());
        }
        for (t, s) in strings {
            index.push((*t, TYPE_STRING, data.len(), 1));
            data.extend_from_slice(s.as_bytes());
            data.push(0);
        }
        let mut out = Vec::new();
        out.extend_from_slice(&(index.len() as u32).to_be_bytes());
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        for (t, k, o, c) in index {
            for v in [t, k, o as u32, c] {
                out.extend_from_slice(&v.to_be_bytes());
            }
        }
        out.extend_from_slice(&data);
        out
    }

    #[test]
    fn header_to_package() {
        let blob = header(
            &[
                (tag::NAME, "bash"),
                (tag::VERSION, "5.1.8"),
                (tag::RELEASE, "9.el9"),
                (tag::ARCH, "x86_64"),
                (tag::LICENSE, "GPLv3+"),
                (tag::VENDOR, "CentOS"),
                (tag::SOURCERPM, "bash-5.1.8-9.el9.src.rpm"),
            ],
            Some(1),
        );
        let h = Header::parse(&blob).unwrap();
        let p = package_from_header(&h, "centos").unwrap();
        assert_eq!(p.name, "bash");
        assert_eq!(p.version, "5.1.8-9.el9");
        assert_eq!(p.full_version(), "1:5.1.8-9.el9");
        assert_eq!(
            p.purl,
            "pkg:rpm/centos/bash@5.1.8-9.el9?arch=x86_64&epoch=1"
        );
        assert_eq!(p.license.as_deref(), Some("GPLv3+"));
        assert_eq!(p.supplier.as_deref(), Some("CentOS"));
        assert_eq!(
            p.source,
            Some(SourcePackage {
                name: "bash".into(),
                version: Some("5.1.8-9.el9".into())
            })
        );
        // With the magic of an rpm file's header in front, too.
        let mut with_magic = HEADER_MAGIC.to_vec();
        with_magic.extend_from_slice(&blob);
        assert!(Header::parse(&with_magic).is_ok());
    }

    #[test]
    fn pubkeys_and_broken_headers() {
        let key = header(
            &[(tag::NAME, "gpg-pubkey"), (tag::VERSION, "8483c65d")],
            None,
        );
        assert!(package_from_header(&Header::parse(&key).unwrap(), "centos").is_none());
        assert!(Header::parse(&[0, 0, 0, 1]).is_err());
        let mut short = header(&[(tag::NAME, "x")], None);
        short.truncate(short.len() - 1);
        assert!(Header::parse(&short).is_err());
        let mut huge = vec![0, 1, 0, 0];
        huge.extend_from_slice(&[0, 0, 0, 1]);
        assert!(Header::parse(&huge).is_err());
    }

    #[test]
    fn bdb_rejects_other_files() {
        assert!(bdb::hash_values(b"SQLite format 3\0 and more bytes here").is_err());
        assert!(bdb::hash_values(&[]).is_err());
    }
}
