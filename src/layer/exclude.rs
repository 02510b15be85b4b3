//! `layer.exclude` globs and the built-in exclusions.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

/// Paths always left out of a layer: artifacts of the build itself, not of the image.
/// Ansible keeps its remote temp files and async job status in the connecting user's home
/// (`~/.ansible/tmp`, `~/.ansible_async`) or, when becoming an unprivileged user, in
/// `/var/tmp/ansible-tmp-*`; Docker bind-mounts `/etc/hostname`, `/etc/hosts`, `/etc/resolv.conf`
/// over the image's and creates `/.dockerenv`.
pub const BUILTIN_EXCLUDES: &[&str] = &[
    "/root/.ansible",
    "/root/.ansible_async",
    "/home/*/.ansible/tmp",
    "/home/*/.ansible_async",
    "/var/tmp/ansible-tmp-*",
    "/tmp/ansible-tmp-*",
    "/.dockerenv",
    "/etc/hostname",
    "/etc/hosts",
    "/etc/resolv.conf",
];

/// A bad exclude pattern.
#[derive(Debug, thiserror::Error)]
#[error("layer.exclude[{index}] {pattern:?}: {reason}")]
pub struct ExcludeError {
    /// Position of the pattern in the list.
    pub index: usize,
    /// The pattern.
    pub pattern: String,
    /// What is wrong with it.
    pub reason: String,
}

/// Check exclude globs; the error names the first bad pattern and its index.
pub fn validate_excludes(patterns: &[String]) -> Result<(), ExcludeError> {
    for (index, p) in patterns.iter().enumerate() {
        build_glob(p).map_err(|reason| ExcludeError {
            index,
            pattern: p.clone(),
            reason,
        })?;
    }
    Ok(())
}

/// Check one exclude glob; the error says what is wrong with it.
pub fn check_exclude(p: &str) -> Result<(), String> {
    build_glob(p).map(|_| ())
}

fn build_glob(p: &str) -> Result<globset::Glob, String> {
    if !p.starts_with('/') {
        return Err("must be an absolute path in the image (start with '/')".into());
    }
    let trimmed = p.trim_end_matches('/');
    if trimmed.is_empty() {
        return Err("would exclude the whole filesystem".into());
    }
    GlobBuilder::new(trimmed)
        .literal_separator(true)
        .backslash_escape(true)
        .build()
        .map_err(|e| e.kind().to_string())
}

/// Matches paths against the built-in and user exclusions.
pub(crate) struct Excluder {
    set: GlobSet,
}

impl Excluder {
    /// Build from user patterns (plus the built-in ones).
    pub(crate) fn new(user: &[String]) -> Result<Self, ExcludeError> {
        validate_excludes(user)?;
        let mut b = GlobSetBuilder::new();
        for p in BUILTIN_EXCLUDES
            .iter()
            .copied()
            .chain(user.iter().map(|s| s.as_str()))
        {
            // Validated above; built-ins are covered by a test.
            if let Ok(g) = build_glob(p) {
                b.add(g);
            }
        }
        let set = b.build().map_err(|e| ExcludeError {
            index: 0,
            pattern: user.join(" "),
            reason: e.to_string(),
        })?;
        Ok(Self { set })
    }

    /// Whether the image path `/<rel>` itself matches (ancestors are not checked).
    pub(crate) fn matches(&self, rel: &[u8]) -> bool {
        let mut abs = Vec::with_capacity(rel.len() + 1);
        abs.push(b'/');
        abs.extend_from_slice(rel);
        self.set.is_match(Path::new(OsStr::from_bytes(&abs)))
    }

    /// Whether `/<rel>` or any of its ancestor directories matches.
    pub(crate) fn excludes(&self, rel: &[u8]) -> bool {
        if self.set.is_empty() {
            return false;
        }
        rel.iter()
            .enumerate()
            .filter(|(_, b)| **b == b'/')
            .any(|(i, _)| self.matches(&rel[..i]))
            || self.matches(rel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtins_are_valid() {
        let b: Vec<String> = BUILTIN_EXCLUDES.iter().map(|s| s.to_string()).collect();
        validate_excludes(&b).unwrap();
    }

    #[test]
    fn bad_patterns_are_named() {
        let e = validate_excludes(&["/tmp/*".into(), "var/x".into()]).unwrap_err();
        assert_eq!(e.index, 1);
        assert_eq!(e.pattern, "var/x");
        let e = validate_excludes(&["/a/[b".into()]).unwrap_err();
        assert_eq!(e.index, 0);
        assert!(e.to_string().contains("/a/[b"), "{e}");
    }

    #[test]
    fn matching_semantics() {
        let x =
            Excluder::new(&["/tmp/*".into(), "/var/cache/dnf/**".into(), "/opt/".into()]).unwrap();
        assert!(x.excludes(b"tmp/a"));
        assert!(x.excludes(b"tmp/a/b/c"));
        assert!(!x.excludes(b"tmp"));
        assert!(!x.excludes(b"tmpx/a"));
        assert!(!x.excludes(b"var/cache/dnf"));
        assert!(x.excludes(b"var/cache/dnf/x/y"));
        assert!(x.excludes(b"opt"));
        assert!(x.excludes(b"opt/z"));
        assert!(x.excludes(b"root/.ansible"));
        assert!(x.excludes(b"root/.ansible/tmp/ansible-tmp-1/AnsiballZ_setup.py"));
        assert!(!x.excludes(b"root/.ansible.cfg"));
        assert!(x.excludes(b"home/app/.ansible/tmp/x"));
        assert!(!x.excludes(b"home/app/.ansible"));
    }
}
