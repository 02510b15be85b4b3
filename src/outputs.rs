//! Provisioning outputs: values a play reports with `set_stats` (read back through the callback
//! [`crate::provision`] installs for each run), merged over the steps in order, and used after
//! provisioning as `${outputs.NAME}` in `image.labels`, `image.env` and `target.tags`.
//!
//! image.yaml keeps `${outputs.NAME}` (and `${outputs.NAME:-default}`) as placeholders through
//! loading; [`resolve`] fills them in once the steps have run. A build stores the outputs of its
//! image in the layout ([`store`], keyed by the manifest or index digest) so that `wpimg push`
//! resolves `target.tags` from the outputs of the image it pushes ([`stored`]).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::{ErrorKind, HasKind};
use crate::layout::{write_atomic, Layout};
use crate::oci::Digest;
use crate::secrets::{LeakScanner, Secrets};

/// Outputs by name (values are text).
pub type Outputs = BTreeMap<String, String>;

/// The prefix of an output reference inside `${...}`.
pub const PREFIX: &str = "outputs.";

/// Errors of reading, checking and using outputs.
#[derive(Debug, thiserror::Error)]
pub enum OutputsError {
    /// A reference to an output no step reported.
    #[error("{key}: ${{outputs.{name}}} is not an output of this build: no step reported {name:?} (reported: {}); report it from the play with ansible.builtin.set_stats (per_host: false), or write ${{outputs.{name}:-default}}", list(reported))]
    Missing {
        /// The output's name.
        name: String,
        /// Where it is used (`image.labels.version`, `target.tags[1]`).
        key: String,
        /// The outputs that were reported.
        reported: Vec<String>,
    },
    /// `wpimg push` of an image built without the outputs a tag needs.
    #[error("{key}: ${{outputs.{name}}}: the image being pushed ({digest}) has no stored output {name:?} (stored: {}); rebuild it with wpimg build", list(stored))]
    NotStored {
        /// The output's name.
        name: String,
        /// Where it is used.
        key: String,
        /// The image.
        digest: String,
        /// The outputs stored for it.
        stored: Vec<String>,
    },
    /// A tag made from outputs is not a valid tag.
    #[error("{key}: the tag made from output {} is {tag:?}, not a valid tag: {reason}", names.join(", "))]
    BadTag {
        /// Where the tag is written.
        key: String,
        /// The outputs it uses.
        names: Vec<String>,
        /// The resolved tag.
        tag: String,
        /// Why it is not a tag.
        reason: String,
    },
    /// A tag resolves to different values on the platforms of an index.
    #[error("{key}: output {} differs between platforms ({}): the tags of an index must be the same for every platform", names.join(", "), values.iter().map(|(p, v)| format!("{p}: {v:?}")).collect::<Vec<_>>().join(", "))]
    PlatformsDiffer {
        /// Where the tag is written.
        key: String,
        /// The outputs it uses.
        names: Vec<String>,
        /// Each platform's resolved tag.
        values: Vec<(String, String)>,
    },
    /// An output whose value is (or holds) a build secret.
    #[error("output {name:?} holds the value of build secret {secret:?}: refused (outputs go to labels, tags, JSON and the cache)")]
    Secret {
        /// The output's name.
        name: String,
        /// The secret's name.
        secret: String,
    },
    /// An output whose value is not a string, number or boolean.
    #[error("output {name:?} is {what}: report a string, number or boolean (e.g. \"{{{{ value | to_json }}}}\")")]
    NotText {
        /// The output's name.
        name: String,
        /// What it is (`a list`, `a mapping`, `null`).
        what: &'static str,
    },
    /// The file the callback wrote is not a JSON object.
    #[error("the outputs file {path} written by wpimg's callback is not a JSON object: {reason}")]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

impl HasKind for OutputsError {
    fn kind(&self) -> ErrorKind {
        match self {
            OutputsError::Secret { .. } | OutputsError::Unreadable { .. } => ErrorKind::Failure,
            _ => ErrorKind::BadInput,
        }
    }
}

fn list(names: &[String]) -> String {
    match names.is_empty() {
        true => "none".into(),
        false => names.join(", "),
    }
}

/// The outputs of a callback's JSON object: strings as they are, numbers and booleans written
/// out; anything else is an error naming the output.
pub fn from_json(path: &std::path::Path, raw: &[u8]) -> Result<Outputs, OutputsError> {
    let unreadable = |reason: String| OutputsError::Unreadable {
        path: path.to_path_buf(),
        reason,
    };
    let value: serde_json::Value =
        serde_json::from_slice(raw).map_err(|e| unreadable(e.to_string()))?;
    let serde_json::Value::Object(map) = value else {
        return Err(unreadable("not an object".into()));
    };
    map.into_iter()
        .map(|(name, v)| {
            let text = match v {
                serde_json::Value::String(s) => s,
                serde_json::Value::Number(n) => n.to_string(),
                serde_json::Value::Bool(b) => b.to_string(),
                other => {
                    let what = match other {
                        serde_json::Value::Array(_) => "a list",
                        serde_json::Value::Object(_) => "a mapping",
                        _ => "null",
                    };
                    return Err(OutputsError::NotText { name, what });
                }
            };
            Ok((name, text))
        })
        .collect()
}

/// Refuse an output whose value is a build secret's, or holds one (its name, never a value).
pub fn check_secrets(outputs: &Outputs, secrets: &Secrets) -> Result<(), OutputsError> {
    let scanner = LeakScanner::new(secrets);
    for (name, value) in outputs {
        let equal = secrets
            .iter()
            .find(|(_, s)| !s.expose().is_empty() && s.expose().trim_end() == value.trim_end());
        let found = equal.map(|(s, _)| s.to_string()).or_else(|| {
            scanner
                .as_ref()
                .and_then(|sc| sc.find(value.as_bytes()).map(|h| h.secret.to_string()))
        });
        if let Some(secret) = found {
            return Err(OutputsError::Secret {
                name: name.clone(),
                secret,
            });
        }
    }
    Ok(())
}

/// The outputs of several steps merged in order: a later step's value wins.
pub fn merge<'a>(steps: impl IntoIterator<Item = &'a Outputs>) -> Outputs {
    let mut all = Outputs::new();
    for o in steps {
        all.extend(o.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    all
}

/// One piece of a template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    Output {
        name: String,
        default: Option<Vec<Piece>>,
    },
}

/// Parse a template (a loaded value using outputs): `${outputs.NAME}`,
/// `${outputs.NAME:-default}` (the default may use outputs), `$${` for a literal `${`.
fn parse(s: &str) -> Result<Vec<Piece>, String> {
    let mut pieces = Vec::new();
    let mut text = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        text.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix("${") {
            text.push_str("${");
            rest = tail;
            continue;
        }
        let Some(body_start) = after.strip_prefix('{') else {
            text.push('$');
            rest = after;
            continue;
        };
        let end = crate::spec::matching_brace(body_start)
            .ok_or_else(|| format!("unterminated \"${{\" in {s:?}"))?;
        let body = &body_start[..end];
        let (reference, default) = match body.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (body, None),
        };
        let name = reference
            .strip_prefix(PREFIX)
            .filter(|n| valid_name(n))
            .ok_or_else(|| {
                format!("${{{reference}}}: only ${{outputs.NAME}} is resolved after provisioning")
            })?;
        if !text.is_empty() {
            pieces.push(Piece::Text(std::mem::take(&mut text)));
        }
        pieces.push(Piece::Output {
            name: name.to_string(),
            default: default.map(parse).transpose()?,
        });
        rest = &body_start[end + 1..];
    }
    text.push_str(rest);
    if !text.is_empty() {
        pieces.push(Piece::Text(text));
    }
    Ok(pieces)
}

/// Whether `name` can be an output's name in a reference (letters, digits, `_`).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Check an output reference's default at load: it may hold only text and other outputs.
pub fn check_default(default: &str) -> Result<(), String> {
    parse(default).map(|_| ())
}

/// The names of the outputs a template uses (defaults included).
pub fn names(template: &str) -> Vec<String> {
    fn walk(pieces: &[Piece], out: &mut Vec<String>) {
        for p in pieces {
            if let Piece::Output { name, default } = p {
                if !out.contains(name) {
                    out.push(name.clone());
                }
                walk(default.as_deref().unwrap_or_default(), out);
            }
        }
    }
    let mut out = Vec::new();
    walk(&parse(template).unwrap_or_default(), &mut out);
    out
}

/// Where a missing output's error comes from: a build (nothing reported) or a push (nothing
/// stored for the image).
#[derive(Debug, Clone, Copy)]
pub enum Source<'a> {
    /// The build's steps reported these.
    Build,
    /// Stored for the image with this digest.
    Stored(&'a Digest),
}

/// A template (the value at `key`) with its outputs filled in.
pub fn resolve(
    template: &str,
    key: &str,
    outputs: &Outputs,
    source: Source<'_>,
) -> Result<String, OutputsError> {
    let pieces = parse(template).map_err(|reason| OutputsError::BadTag {
        key: key.to_string(),
        names: Vec::new(),
        tag: template.to_string(),
        reason,
    })?;
    let mut out = String::new();
    fill(&pieces, key, outputs, source, &mut out)?;
    Ok(out)
}

fn fill(
    pieces: &[Piece],
    key: &str,
    outputs: &Outputs,
    source: Source<'_>,
    out: &mut String,
) -> Result<(), OutputsError> {
    for p in pieces {
        match p {
            Piece::Text(t) => out.push_str(t),
            Piece::Output { name, default } => {
                let value = outputs
                    .get(name)
                    .filter(|v| default.is_none() || !v.is_empty());
                match (value, default) {
                    (Some(v), _) => out.push_str(v),
                    (None, Some(d)) => fill(d, key, outputs, source, out)?,
                    (None, None) => return Err(missing(name, key, outputs, source)),
                }
            }
        }
    }
    Ok(())
}

fn missing(name: &str, key: &str, outputs: &Outputs, source: Source<'_>) -> OutputsError {
    let names: Vec<String> = outputs.keys().cloned().collect();
    match source {
        Source::Build => OutputsError::Missing {
            name: name.to_string(),
            key: key.to_string(),
            reported: names,
        },
        Source::Stored(digest) => OutputsError::NotStored {
            name: name.to_string(),
            key: key.to_string(),
            digest: digest.to_string(),
            stored: names,
        },
    }
}

/// The image's labels and env with their outputs resolved (only the keys image.yaml wrote with
/// outputs are templates; every other value is left as loaded).
pub fn resolve_settings(
    spec: &crate::spec::ImageSpec,
    outputs: &Outputs,
) -> Result<crate::spec::ImageSettings, OutputsError> {
    let mut settings = spec.image_settings();
    let at = crate::spec::KeyPath::of("image");
    for (section, map) in [
        ("labels", settings.labels.as_mut()),
        ("env", settings.env.as_mut()),
    ] {
        for (k, v) in map.into_iter().flatten() {
            let path = at.key(section).key(k);
            if spec.source.outputs.contains(&path) {
                *v = resolve(v, &path.to_string(), outputs, Source::Build)?;
            }
        }
    }
    Ok(settings)
}

/// `tags` (image.yaml's `target.tags`, or a push's) with their outputs resolved; a resolved tag
/// must be a valid tag. Tags without outputs are returned as they are.
pub fn resolve_tags(
    tags: &[String],
    outputs: &Outputs,
    source: Source<'_>,
) -> Result<Vec<String>, OutputsError> {
    let at = crate::spec::KeyPath::of("target.tags");
    tags.iter()
        .enumerate()
        .map(|(i, t)| {
            if !uses_outputs(t) {
                return Ok(t.clone());
            }
            let key = at.index(i).to_string();
            let tag = resolve(t, &key, outputs, source)?;
            crate::reference::validate_tag(&tag).map_err(|reason| OutputsError::BadTag {
                key,
                names: names(t),
                tag: tag.clone(),
                reason: reason.to_string(),
            })?;
            Ok(tag)
        })
        .collect()
}

/// Whether a tag uses outputs (a tag cannot hold `$` otherwise).
pub fn uses_outputs(tag: &str) -> bool {
    tag.contains("${")
}

/// The tags of an index: each platform's outputs must give the same tags.
pub fn resolve_index_tags(
    tags: &[String],
    platforms: &[(String, &Outputs)],
) -> Result<Vec<String>, OutputsError> {
    let mut first: Option<Vec<String>> = None;
    let mut per: Vec<(String, Vec<String>)> = Vec::new();
    for (platform, outputs) in platforms {
        let resolved = resolve_tags(tags, outputs, Source::Build)?;
        first.get_or_insert_with(|| resolved.clone());
        per.push((platform.clone(), resolved));
    }
    let Some(first) = first else {
        return Ok(tags.to_vec());
    };
    for (i, tag) in tags.iter().enumerate() {
        if per.iter().any(|(_, r)| r[i] != first[i]) {
            return Err(OutputsError::PlatformsDiffer {
                key: crate::spec::KeyPath::of("target.tags").index(i).to_string(),
                names: names(tag),
                values: per.iter().map(|(p, r)| (p.clone(), r[i].clone())).collect(),
            });
        }
    }
    Ok(first)
}

/// What the layout keeps of a build's outputs, next to its image.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StoredOutputs {
    /// The outputs of the image (an index: those its tags resolve from, the first platform's).
    pub outputs: Outputs,
    /// An index: each platform's outputs.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub platforms: BTreeMap<String, Outputs>,
}

fn stored_path(layout: &Layout, digest: &Digest) -> PathBuf {
    layout
        .dir()
        .join("wpimg-outputs")
        .join(format!("{}-{}.json", digest.algorithm(), digest.hex()))
}

/// Keep the outputs of the image (or index) `digest` in the layout (written atomically).
pub fn store(layout: &Layout, digest: &Digest, stored: &StoredOutputs) -> std::io::Result<()> {
    let path = stored_path(layout, digest);
    if let Some(d) = path.parent() {
        fs_err::create_dir_all(d)?;
    }
    let bytes = serde_json::to_vec_pretty(stored).map_err(std::io::Error::other)?;
    write_atomic(&path, &bytes)
}

/// The outputs stored for the image (or index) `digest`; `None` when it has none.
pub fn stored(layout: &Layout, digest: &Digest) -> Option<StoredOutputs> {
    let bytes = fs_err::read(stored_path(layout, digest)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outs(pairs: &[(&str, &str)]) -> Outputs {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn templates_resolve_with_defaults_and_escapes() {
        let o = outs(&[("v", "6.1.9"), ("empty", "")]);
        let r = |t: &str| resolve(t, "k", &o, Source::Build);
        assert_eq!(r("wp-${outputs.v}").unwrap(), "wp-6.1.9");
        assert_eq!(r("${outputs.nope:-x${outputs.v}}").unwrap(), "x6.1.9");
        assert_eq!(r("${outputs.empty:-d}").unwrap(), "d");
        assert_eq!(r("${outputs.empty}").unwrap(), "");
        assert_eq!(r("a $${outputs.v} $HOME").unwrap(), "a ${outputs.v} $HOME");
        assert_eq!(
            names("${outputs.a}-${outputs.b:-${outputs.c}}"),
            ["a", "b", "c"]
        );
        assert!(check_default("x${outputs.a}").is_ok());
        assert!(check_default("${other}").is_err());
    }

    #[test]
    fn a_missing_output_names_itself_and_what_was_reported() {
        let o = outs(&[("php_version", "8.2"), ("wordpress_version", "6.1.9")]);
        let e = resolve("${outputs.wp_version}", "image.labels.v", &o, Source::Build).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::BadInput);
        let msg = e.to_string();
        for want in [
            "image.labels.v",
            "${outputs.wp_version}",
            "reported: php_version, wordpress_version",
        ] {
            assert!(msg.contains(want), "{want:?} not in {msg}");
        }
        let d = Digest::of_bytes(b"x");
        let e = resolve_tags(
            &["${outputs.v}".into()],
            &Outputs::new(),
            Source::Stored(&d),
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("no stored output \"v\" (stored: none)"),
            "{e}"
        );
    }

    #[test]
    fn tags_resolve_and_are_checked() {
        let o = outs(&[("v", "6.1.9"), ("bad", "a b")]);
        let tags = vec!["latest".to_string(), "${outputs.v}".into()];
        assert_eq!(
            resolve_tags(&tags, &o, Source::Build).unwrap(),
            ["latest", "6.1.9"]
        );
        let e = resolve_tags(&["v-${outputs.bad}".into()], &o, Source::Build).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::BadInput);
        assert!(e.to_string().contains("output bad is \"v-a b\""), "{e}");
        let other = outs(&[("v", "6.2")]);
        let e = resolve_index_tags(
            &tags,
            &[("linux/amd64".into(), &o), ("linux/arm64".into(), &other)],
        )
        .unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("target.tags[1]: output v differs"), "{msg}");
        assert!(msg.contains("linux/arm64: \"6.2\""), "{msg}");
        assert_eq!(
            resolve_index_tags(
                &tags,
                &[("linux/amd64".into(), &o), ("linux/arm64".into(), &o)]
            )
            .unwrap(),
            ["latest", "6.1.9"]
        );
    }

    #[test]
    fn callback_values_become_text_and_secrets_are_refused() {
        let p = std::path::Path::new("/o.json");
        let o = from_json(p, br#"{"a": "x", "n": 8.2, "i": 3, "b": true}"#).unwrap();
        assert_eq!(
            o,
            outs(&[("a", "x"), ("n", "8.2"), ("i", "3"), ("b", "true")])
        );
        let e = from_json(p, br#"{"l": [1]}"#).unwrap_err();
        assert!(e.to_string().contains("output \"l\" is a list"), "{e}");
        assert!(from_json(p, b"[]").is_err());
        let mut secrets = Secrets::default();
        secrets.insert(
            "db_password",
            crate::secrets::SecretValue::new("s3cret-pw\n".into()),
        );
        let bad = outs(&[("pw", "s3cret-pw")]);
        let e = check_secrets(&bad, &secrets).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("\"pw\"") && msg.contains("db_password"),
            "{msg}"
        );
        assert!(!msg.contains("s3cret"), "{msg}");
        assert!(check_secrets(&outs(&[("v", "6.1.9")]), &secrets).is_ok());
        assert_eq!(
            merge([&outs(&[("a", "1"), ("b", "1")]), &outs(&[("a", "2")])]),
            outs(&[("a", "2"), ("b", "1")])
        );
    }

    #[test]
    fn stored_outputs_roundtrip_by_digest() {
        let d = tempfile::tempdir().unwrap();
        let l = Layout::open_or_create(d.path()).unwrap();
        let digest = Digest::of_bytes(b"m");
        assert!(stored(&l, &digest).is_none());
        let s = StoredOutputs {
            outputs: outs(&[("v", "1")]),
            platforms: BTreeMap::new(),
        };
        store(&l, &digest, &s).unwrap();
        assert_eq!(stored(&l, &digest), Some(s));
    }
}
