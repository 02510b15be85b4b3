//! dpkg's database: `/var/lib/dpkg/status` and distroless `/var/lib/dpkg/status.d/*`
//! (deb822 paragraphs).
//!
//! Licences stay unknown: Debian's copyright files are free text (the machine-readable format
//! is optional and names licences in Debian's own short names), so no licence is claimed.

use super::{purl, Ecosystem, Package, SourcePackage};

/// The status file (path in the image).
pub const STATUS: &str = "var/lib/dpkg/status";
/// The distroless per-package directory.
pub const STATUS_D: &str = "var/lib/dpkg/status.d";

/// Packages of a status file. A paragraph counts when its `Status` says the package is
/// installed (`install ok installed`, also `hold ok installed`); with `need_status` false
/// (status.d files, which have no `Status`), a paragraph without one counts too.
pub fn parse_status(text: &str, namespace: &str, need_status: bool) -> Vec<Package> {
    paragraphs(text)
        .filter_map(|p| package(&p, namespace, need_status))
        .collect()
}

/// deb822 paragraphs as (field, value) lists; continuation lines are appended.
pub fn paragraphs(text: &str) -> impl Iterator<Item = Vec<(String, String)>> + '_ {
    text.split("\n\n").filter_map(|block| {
        let mut fields: Vec<(String, String)> = Vec::new();
        for line in block.lines() {
            if line.starts_with([' ', '\t']) {
                if let Some((_, v)) = fields.last_mut() {
                    v.push('\n');
                    v.push_str(line.trim());
                }
            } else if let Some((k, v)) = line.split_once(':') {
                fields.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
        (!fields.is_empty()).then_some(fields)
    })
}

fn field<'a>(p: &'a [(String, String)], name: &str) -> Option<&'a str> {
    p.iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
        .filter(|v| !v.is_empty())
}

fn is_installed(status: &str) -> bool {
    let words: Vec<&str> = status.split_whitespace().collect();
    matches!(words.as_slice(), [want, "ok", "installed"] if matches!(*want, "install" | "hold"))
}

fn package(p: &[(String, String)], namespace: &str, need_status: bool) -> Option<Package> {
    match field(p, "Status") {
        Some(s) if !is_installed(s) => return None,
        None if need_status => return None,
        _ => {}
    }
    let name = field(p, "Package")?.to_string();
    let version = field(p, "Version")?.to_string();
    let arch = field(p, "Architecture").map(str::to_string);
    let source = field(p, "Source").map(parse_source);
    let purl = purl::build(
        Ecosystem::Deb.purl_type(),
        Some(namespace),
        &name,
        Some(&version),
        &[("arch", arch.clone().unwrap_or_default())],
    );
    Some(Package {
        ecosystem: Ecosystem::Deb,
        name,
        version,
        epoch: None,
        arch,
        source,
        license: None,
        supplier: None,
        purl,
    })
}

/// `glibc (2.36-9)` or `glibc`.
fn parse_source(s: &str) -> SourcePackage {
    match s.split_once('(') {
        Some((name, rest)) => SourcePackage {
            name: name.trim().to_string(),
            version: Some(rest.trim_end_matches(')').trim().to_string()).filter(|v| !v.is_empty()),
        },
        None => SourcePackage {
            name: s.trim().to_string(),
            version: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS_TEXT: &str = "\
Package: libc6
Status: install ok installed
Priority: optional
Architecture: amd64
Multi-Arch: same
Source: glibc (2.36-9+deb12u10)
Version: 2.36-9+deb12u10
Description: GNU C Library: Shared libraries
 Contains the standard libraries that are used by nearly all programs on
 the system.

Package: removed-pkg
Status: deinstall ok config-files
Architecture: amd64
Version: 1.0

Package: base-files
Status: hold ok installed
Architecture: amd64
Version: 12.4+deb12u10

Package: half
Status: install reinstreq half-installed
Architecture: all
Version: 2
";

    #[test]
    fn installed_entries_only() {
        let pkgs = parse_status(STATUS_TEXT, "debian", true);
        let names: Vec<&str> = pkgs.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, vec!["libc6", "base-files"]);
        let libc = &pkgs[0];
        assert_eq!(libc.version, "2.36-9+deb12u10");
        assert_eq!(libc.arch.as_deref(), Some("amd64"));
        assert_eq!(
            libc.source,
            Some(SourcePackage {
                name: "glibc".into(),
                version: Some("2.36-9+deb12u10".into())
            })
        );
        assert_eq!(
            libc.purl,
            "pkg:deb/debian/libc6@2.36-9%2Bdeb12u10?arch=amd64"
        );
        assert_eq!(pkgs[1].source, None);
    }

    #[test]
    fn distroless_status_d_has_no_status_field() {
        let text = "Package: tzdata\nVersion: 2024a-0+deb12u1\nArchitecture: all\nSource: tzdata\n";
        let pkgs = parse_status(text, "debian", false);
        assert_eq!(pkgs.len(), 1);
        assert_eq!(
            pkgs[0].purl,
            "pkg:deb/debian/tzdata@2024a-0%2Bdeb12u1?arch=all"
        );
        assert!(parse_status(text, "debian", true).is_empty());
        // md5sums-like content has no paragraph with Package/Version.
        assert!(parse_status("0123abcd  usr/share/zoneinfo/UTC\n", "debian", false).is_empty());
    }
}
