//! apk's database `/lib/apk/db/installed`: one paragraph per package of `X:value` lines.

use super::{purl, Ecosystem, Package, SourcePackage};

/// The installed database (path in the image).
pub const INSTALLED: &str = "lib/apk/db/installed";

/// Packages of an `installed` file: `P` name, `V` version, `A` arch, `L` licence, `o` origin.
pub fn parse_installed(text: &str, namespace: &str) -> Vec<Package> {
    let mut out = Vec::new();
    let mut cur = Fields::default();
    for line in text.lines().chain(std::iter::once("")) {
        if line.trim().is_empty() {
            if let Some(p) = std::mem::take(&mut cur).into_package(namespace) {
                out.push(p);
            }
            continue;
        }
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let v = v.trim().to_string();
        match k {
            "P" => cur.name = Some(v),
            "V" => cur.version = Some(v),
            "A" => cur.arch = Some(v),
            "L" => cur.license = Some(v),
            "o" => cur.origin = Some(v),
            _ => {}
        }
    }
    out
}

#[derive(Default)]
struct Fields {
    name: Option<String>,
    version: Option<String>,
    arch: Option<String>,
    license: Option<String>,
    origin: Option<String>,
}

impl Fields {
    fn into_package(self, namespace: &str) -> Option<Package> {
        let name = self.name.filter(|n| !n.is_empty())?;
        let version = self.version.filter(|v| !v.is_empty())?;
        let purl = purl::build(
            Ecosystem::Apk.purl_type(),
            Some(namespace),
            &name,
            Some(&version),
            &[("arch", self.arch.clone().unwrap_or_default())],
        );
        Some(Package {
            ecosystem: Ecosystem::Apk,
            source: self
                .origin
                .filter(|o| !o.is_empty())
                .map(|o| SourcePackage {
                    name: o,
                    version: None,
                }),
            name,
            version,
            epoch: None,
            arch: self.arch.filter(|a| !a.is_empty()),
            license: self.license.filter(|l| !l.is_empty()),
            supplier: None,
            purl,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_installed() {
        let text = "C:Q1abc=\nP:musl\nV:1.2.4_git20230717-r4\nA:x86_64\nS:383152\nI:622592\n\
                    T:the musl c library (libc) implementation\nL:MIT\no:musl\nm:Natanael Copa\n\
                    F:lib\nR:ld-musl-x86_64.so.1\n\nP:busybox\nV:1.36.1-r15\nA:x86_64\n\
                    L:GPL-2.0-only\no:busybox\n\nV:9\n";
        let pkgs = parse_installed(text, "alpine");
        assert_eq!(pkgs.len(), 2);
        assert_eq!(pkgs[0].name, "musl");
        assert_eq!(pkgs[0].license.as_deref(), Some("MIT"));
        assert_eq!(
            pkgs[0].source.as_ref().map(|s| s.name.as_str()),
            Some("musl")
        );
        assert_eq!(
            pkgs[0].purl,
            "pkg:apk/alpine/musl@1.2.4_git20230717-r4?arch=x86_64"
        );
        assert_eq!(pkgs[1].version, "1.36.1-r15");
    }
}
