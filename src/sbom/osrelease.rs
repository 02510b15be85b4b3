//! `/etc/os-release`: which distribution an image is (the purl namespace comes from its `ID`).

/// Where os-release lives, in lookup order (paths in the image without the leading `/`).
pub const PATHS: &[&str] = &["etc/os-release", "usr/lib/os-release"];

/// The fields of os-release an SBOM uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OsRelease {
    /// `ID` (`debian`, `centos`, `alpine`).
    pub id: String,
    /// `VERSION_ID` (`12`, `9`, `3.19.1`).
    pub version_id: Option<String>,
    /// `VERSION_CODENAME` (`bookworm`).
    pub version_codename: Option<String>,
    /// `NAME` (`Debian GNU/Linux`).
    pub name: Option<String>,
    /// `PRETTY_NAME`.
    pub pretty_name: Option<String>,
}

impl OsRelease {
    /// Parse the shell-style `KEY=value` file (quoted or not, `#` comments).
    pub fn parse(text: &str) -> Self {
        let mut o = OsRelease::default();
        for line in text.lines() {
            let line = line.trim();
            let Some((k, v)) = line.split_once('=') else {
                continue;
            };
            if k.starts_with('#') {
                continue;
            }
            let v = unquote(v.trim());
            match k.trim() {
                "ID" => o.id = v.to_ascii_lowercase(),
                "VERSION_ID" => o.version_id = Some(v),
                "VERSION_CODENAME" => o.version_codename = Some(v),
                "NAME" => o.name = Some(v),
                "PRETTY_NAME" => o.pretty_name = Some(v),
                _ => {}
            }
        }
        o
    }
}

fn unquote(v: &str) -> String {
    let inner = v
        .strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .or_else(|| v.strip_prefix('\'').and_then(|s| s.strip_suffix('\'')));
    match inner {
        Some(s) => {
            let mut out = String::new();
            let mut chars = s.chars();
            while let Some(c) = chars.next() {
                if c == '\\' {
                    if let Some(n) = chars.next() {
                        out.push(n);
                    }
                } else {
                    out.push(c);
                }
            }
            out
        }
        None => v.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_debian_and_centos() {
        let d = OsRelease::parse(
            "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nNAME=\"Debian GNU/Linux\"\n\
             VERSION_ID=\"12\"\nVERSION_CODENAME=bookworm\nID=debian\n# ID=nope\n",
        );
        assert_eq!(d.id, "debian");
        assert_eq!(d.version_id.as_deref(), Some("12"));
        assert_eq!(d.version_codename.as_deref(), Some("bookworm"));
        assert_eq!(
            d.pretty_name.as_deref(),
            Some("Debian GNU/Linux 12 (bookworm)")
        );
        let c = OsRelease::parse("NAME='CentOS Stream'\nID=\"centos\"\nVERSION_ID=\"9\"\n");
        assert_eq!(c.id, "centos");
        assert_eq!(c.name.as_deref(), Some("CentOS Stream"));
    }
}
