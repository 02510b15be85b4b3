//! Package URLs (<https://github.com/package-url/purl-spec>), encoded the way the reference
//! implementation (packageurl-python) encodes them: percent-encoding except unreserved
//! characters and `:`, qualifiers sorted by key, `/` kept in qualifier values.

use std::fmt::Write as _;

/// `pkg:TYPE/[NAMESPACE/]NAME[@VERSION][?k=v&...]`; empty qualifier values are left out.
pub fn build(
    kind: &str,
    namespace: Option<&str>,
    name: &str,
    version: Option<&str>,
    qualifiers: &[(&str, String)],
) -> String {
    let mut out = format!("pkg:{kind}/");
    if let Some(ns) = namespace.filter(|n| !n.is_empty()) {
        let segs: Vec<String> = ns.split('/').map(|s| encode(s, false)).collect();
        out.push_str(&segs.join("/"));
        out.push('/');
    }
    out.push_str(&encode(name, false));
    if let Some(v) = version.filter(|v| !v.is_empty()) {
        out.push('@');
        out.push_str(&encode(v, false));
    }
    let mut q: Vec<(String, &str)> = qualifiers
        .iter()
        .filter(|(_, v)| !v.trim().is_empty())
        .map(|(k, v)| (k.to_ascii_lowercase(), v.as_str()))
        .collect();
    q.sort();
    for (i, (k, v)) in q.iter().enumerate() {
        out.push(if i == 0 { '?' } else { '&' });
        let _ = write!(out, "{k}={}", encode(v, true));
    }
    out
}

fn encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        let keep = b.is_ascii_alphanumeric()
            || matches!(b, b'-' | b'.' | b'_' | b'~' | b':')
            || (keep_slash && b == b'/');
        if keep {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_reference_implementation() {
        // Expected strings from packageurl-python 0.17 `PackageURL(...).to_string()`.
        assert_eq!(
            build(
                "deb",
                Some("debian"),
                "libc6",
                Some("2.36-9+deb12u10"),
                &[("arch", "amd64".into())]
            ),
            "pkg:deb/debian/libc6@2.36-9%2Bdeb12u10?arch=amd64"
        );
        assert_eq!(
            build(
                "deb",
                Some("debian"),
                "g++",
                Some("4:12.2.0-3~x"),
                &[("arch", "amd64".into())]
            ),
            "pkg:deb/debian/g%2B%2B@4:12.2.0-3~x?arch=amd64"
        );
        assert_eq!(
            build(
                "rpm",
                Some("centos"),
                "foo",
                Some("2.3-4.el9"),
                &[("epoch", "1".into()), ("arch", "x86_64".into())]
            ),
            "pkg:rpm/centos/foo@2.3-4.el9?arch=x86_64&epoch=1"
        );
        assert_eq!(
            build(
                "oci",
                None,
                "debian",
                Some("sha256:abc"),
                &[
                    ("repository_url", "127.0.0.1:5000/debian".into()),
                    ("arch", "amd64".into())
                ]
            ),
            "pkg:oci/debian@sha256:abc?arch=amd64&repository_url=127.0.0.1:5000/debian"
        );
        assert_eq!(
            build(
                "apk",
                Some("alpine"),
                "musl",
                Some("1.2.4-r2"),
                &[("arch", String::new())]
            ),
            "pkg:apk/alpine/musl@1.2.4-r2"
        );
    }
}
