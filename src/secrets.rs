//! Build secrets (`secrets:` in image.yaml): their values, the leak scanner that looks for them
//! in what a build produces (layer files, link targets, xattrs, the image config), and the
//! redactor that keeps them out of Ansible's output.
//!
//! A value is looked for as written, with trailing line breaks removed, as its JSON string
//! form, and as base64 (standard and URL-safe alphabets) at each of the three alignments it can
//! have inside a longer base64 text. Values shorter than [`MIN_SCANNED_LEN`] bytes are not looked
//! for: they would match by chance.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use aho_corasick::AhoCorasick;
use base64::Engine as _;
use zeroize::Zeroizing;

/// Values shorter than this many bytes are not scanned for (with a warning).
pub const MIN_SCANNED_LEN: usize = 8;

/// A secret's value: never printed (`Debug` shows `<redacted>`), wiped from memory when dropped.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretValue(Zeroizing<String>);

impl SecretValue {
    /// Wrap a value.
    pub fn new(value: String) -> Self {
        Self(Zeroizing::new(value))
    }

    /// The value; only for the private file Ansible reads and for the scanner.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(crate::spec::REDACTED)
    }
}

/// The build's secrets by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Secrets(BTreeMap<String, SecretValue>);

impl Secrets {
    /// Add (or replace) a secret.
    pub fn insert(&mut self, name: impl Into<String>, value: SecretValue) {
        self.0.insert(name.into(), value);
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The names, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.0.keys().map(String::as_str)
    }

    /// Names and values, in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &SecretValue)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// The JSON object `{"name": "value", ...}` Ansible reads as extra vars (wiped when dropped).
    pub fn to_json(&self) -> Zeroizing<Vec<u8>> {
        let map: serde_json::Map<String, serde_json::Value> = self
            .0
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.expose().to_string())))
            .collect();
        Zeroizing::new(serde_json::to_vec(&serde_json::Value::Object(map)).unwrap_or_default())
    }

    /// Names of secrets too short to be scanned for.
    pub fn too_short(&self) -> Vec<&str> {
        self.iter()
            .filter(|(_, v)| scanned_form(v.expose()).len() < MIN_SCANNED_LEN)
            .map(|(k, _)| k)
            .collect()
    }
}

/// A secret found where it must not be: its name and where (never its value).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("secret {secret:?} found in {location}")]
pub struct LeakFound {
    /// The secret's name.
    pub secret: String,
    /// Where: a path inside the image (`/etc/app.conf`, with ` (symlink target)`,
    /// ` (xattr NAME)` or ` (base64)` when not the file's content as written) or the image config.
    pub location: String,
}

/// How a secret appeared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// As written (or as a JSON string).
    Plain,
    /// Base64-encoded.
    Base64,
}

/// One match: which secret, in which form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hit<'a> {
    /// The secret's name.
    pub secret: &'a str,
    /// Its form.
    pub form: Form,
}

/// Finds secrets' values (and their encodings) in bytes, also across buffer boundaries.
pub struct LeakScanner {
    ac: AhoCorasick,
    /// Per pattern: the secret's index in `names` and the form.
    owners: Vec<(usize, Form)>,
    names: Vec<String>,
    longest: usize,
}

impl fmt::Debug for LeakScanner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeakScanner")
            .field("secrets", &self.names)
            .finish_non_exhaustive()
    }
}

/// The part of a value that is looked for: the value without trailing line breaks (a file
/// secret often ends with one the play does not write).
fn scanned_form(value: &str) -> &str {
    value.trim_end_matches(['\n', '\r'])
}

/// `value` as it appears inside a JSON string (quotes, backslashes and control characters
/// escaped).
fn json_escaped(value: &str) -> String {
    let quoted = serde_json::to_string(value).unwrap_or_default();
    quoted
        .get(1..quoted.len().saturating_sub(1))
        .unwrap_or_default()
        .to_string()
}

/// The base64 texts `value` always produces inside a longer base64 text, at each of the three
/// byte alignments it can have there (the characters that also depend on neighbouring bytes are
/// left out).
fn base64_forms(value: &[u8], engine: &base64::engine::GeneralPurpose) -> Vec<String> {
    (0..3usize)
        .filter_map(|shift| {
            let mut padded = vec![0u8; shift];
            padded.extend_from_slice(value);
            let text = engine.encode(&padded);
            let start = (shift * 8).div_ceil(6);
            let end = (padded.len() * 8) / 6;
            text.get(start..end).map(str::to_string)
        })
        .collect()
}

impl LeakScanner {
    /// A scanner for every secret long enough to be scanned for; `None` when there is none.
    pub fn new(secrets: &Secrets) -> Option<Arc<Self>> {
        let mut patterns: Vec<Vec<u8>> = Vec::new();
        let mut owners = Vec::new();
        let mut names = Vec::new();
        let engines = [
            &base64::engine::general_purpose::STANDARD_NO_PAD,
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
        ];
        for (name, value) in secrets.iter() {
            let plain = scanned_form(value.expose());
            if plain.len() < MIN_SCANNED_LEN {
                continue;
            }
            let i = names.len();
            names.push(name.to_string());
            let mut add = |p: Vec<u8>, form: Form| {
                if !patterns.contains(&p) {
                    patterns.push(p);
                    owners.push((i, form));
                }
            };
            add(plain.as_bytes().to_vec(), Form::Plain);
            add(json_escaped(plain).into_bytes(), Form::Plain);
            for engine in engines {
                for form in base64_forms(plain.as_bytes(), engine) {
                    add(form.into_bytes(), Form::Base64);
                }
            }
        }
        if patterns.is_empty() {
            return None;
        }
        let longest = patterns.iter().map(Vec::len).max().unwrap_or(0);
        let ac = AhoCorasick::new(&patterns).ok()?;
        Some(Arc::new(Self {
            ac,
            owners,
            names,
            longest,
        }))
    }

    /// The first secret found in `hay`.
    pub fn find(&self, hay: &[u8]) -> Option<Hit<'_>> {
        let m = self.ac.find(hay)?;
        let (i, form) = self.owners[m.pattern().as_usize()];
        Some(Hit {
            secret: &self.names[i],
            form,
        })
    }

    /// A scan of one byte stream fed in pieces (matches across pieces are found).
    pub fn stream(self: &Arc<Self>) -> StreamScan {
        StreamScan {
            scanner: self.clone(),
            tail: Vec::with_capacity(self.longest),
        }
    }

    /// The first secret in the strings (and keys) of a JSON document, with the JSON path of the
    /// value it was found in (`config.Env[2]`); the raw bytes when they are not JSON.
    pub fn find_in_json(&self, raw: &[u8]) -> Option<(Hit<'_>, String)> {
        match serde_json::from_slice::<serde_json::Value>(raw) {
            Ok(v) => self.find_in_value(&v, String::new()),
            Err(_) => self.find(raw).map(|h| (h, String::new())),
        }
    }

    fn find_in_value(&self, v: &serde_json::Value, path: String) -> Option<(Hit<'_>, String)> {
        match v {
            serde_json::Value::String(s) => self.find(s.as_bytes()).map(|h| (h, path)),
            serde_json::Value::Array(items) => items
                .iter()
                .enumerate()
                .find_map(|(i, x)| self.find_in_value(x, format!("{path}[{i}]"))),
            serde_json::Value::Object(m) => m.iter().find_map(|(k, x)| {
                let here = if path.is_empty() {
                    k.clone()
                } else {
                    format!("{path}.{k}")
                };
                match self.find(k.as_bytes()) {
                    Some(h) => Some((h, here)),
                    None => self.find_in_value(x, here),
                }
            }),
            _ => None,
        }
    }
}

/// The state of a scan over a stream: the last bytes of what came before, so that a value
/// split between two pieces is still found.
pub struct StreamScan {
    scanner: Arc<LeakScanner>,
    tail: Vec<u8>,
}

impl StreamScan {
    /// Scan the next piece of the stream.
    pub fn feed(&mut self, piece: &[u8]) -> Option<Hit<'_>> {
        let keep = self.scanner.longest.saturating_sub(1);
        let found = self.boundary_hit(piece, keep) || self.scanner.ac.is_match(piece);
        if found {
            return self.hit_in_window(piece);
        }
        self.keep_tail(piece, keep);
        None
    }

    /// Start a new stream.
    pub fn reset(&mut self) {
        self.tail.clear();
    }

    /// Whether a match spans the end of the previous pieces and the start of this one.
    fn boundary_hit(&self, piece: &[u8], keep: usize) -> bool {
        if self.tail.is_empty() {
            return false;
        }
        let mut window = self.tail.clone();
        window.extend_from_slice(&piece[..piece.len().min(keep)]);
        self.scanner.ac.is_match(&window)
    }

    /// The hit in tail + piece (only built when there is one).
    fn hit_in_window(&self, piece: &[u8]) -> Option<Hit<'_>> {
        let mut window = self.tail.clone();
        window.extend_from_slice(piece);
        self.scanner.find(&window)
    }

    fn keep_tail(&mut self, piece: &[u8], keep: usize) {
        if piece.len() >= keep {
            self.tail.clear();
            self.tail.extend_from_slice(&piece[piece.len() - keep..]);
        } else {
            self.tail.extend_from_slice(piece);
            let extra = self.tail.len().saturating_sub(keep);
            self.tail.drain(..extra);
        }
    }
}

/// Replaces secret values in text (Ansible's output lines) by `<redacted>`.
pub struct Redactor {
    ac: Option<AhoCorasick>,
}

impl Redactor {
    /// A redactor for every non-empty secret value (as written, without trailing line breaks,
    /// and JSON-escaped as Ansible prints results).
    pub fn new(secrets: &Secrets) -> Self {
        let mut patterns: Vec<String> = Vec::new();
        for (_, v) in secrets.iter() {
            let forms = [
                v.expose().to_string(),
                scanned_form(v.expose()).to_string(),
                json_escaped(v.expose()),
                json_escaped(scanned_form(v.expose())),
            ];
            for p in forms {
                if !p.is_empty() && !patterns.contains(&p) {
                    patterns.push(p);
                }
            }
        }
        let ac = aho_corasick::AhoCorasickBuilder::new()
            .match_kind(aho_corasick::MatchKind::LeftmostLongest)
            .build(&patterns)
            .ok()
            .filter(|_| !patterns.is_empty());
        Self { ac }
    }

    /// `line` with every secret value replaced.
    pub fn redact(&self, line: String) -> String {
        match &self.ac {
            Some(ac) if ac.is_match(&line) => {
                let with: Vec<&str> = vec![crate::spec::REDACTED; ac.patterns_len()];
                ac.replace_all(&line, &with)
            }
            _ => line,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secrets(pairs: &[(&str, &str)]) -> Secrets {
        let mut s = Secrets::default();
        for (k, v) in pairs {
            s.insert(*k, SecretValue::new(v.to_string()));
        }
        s
    }

    const TOKEN: &str = "tok-3f9a2c1e7b";

    #[test]
    fn finds_the_value_and_names_only_the_secret() {
        let s = secrets(&[("api_token", TOKEN), ("pin", "1234")]);
        assert_eq!(s.too_short(), ["pin"]);
        let sc = LeakScanner::new(&s).unwrap();
        let hit = sc.find(format!("x = {TOKEN}\n").as_bytes()).unwrap();
        assert_eq!((hit.secret, hit.form), ("api_token", Form::Plain), "{sc:?}");
        assert!(sc.find(b"1234 is too short to look for").is_none());
        assert!(!format!("{sc:?} {s:?}").contains(TOKEN));
    }

    #[test]
    fn finds_base64_at_every_alignment_in_both_alphabets() {
        let s = secrets(&[("k", "s3cr\u{fb}t?>value~~")]);
        let sc = LeakScanner::new(&s).unwrap();
        let engines = [
            base64::engine::general_purpose::STANDARD,
            base64::engine::general_purpose::URL_SAFE,
        ];
        for engine in engines {
            for prefix in ["", "a", "ab", "abc", "abcd"] {
                for suffix in ["", "z", "zz"] {
                    let text = format!("{prefix}s3cr\u{fb}t?>value~~{suffix}");
                    let enc = engine.encode(text.as_bytes());
                    let hit = sc.find(enc.as_bytes());
                    assert_eq!(
                        hit.map(|h| h.form),
                        Some(Form::Base64),
                        "{prefix:?} {suffix:?} {enc}"
                    );
                }
            }
        }
        assert!(sc.find(b"c3VyZWx5IG5vdCBpdA==").is_none());
    }

    #[test]
    fn json_forms_keep_edge_quotes() {
        assert_eq!(json_escaped("\"abc\""), r#"\"abc\""#);
        assert_eq!(json_escaped(""), "");
    }

    #[test]
    fn finds_json_escaped_values_and_trims_line_breaks() {
        let s = secrets(&[("k", "pa\"ss\\word1\n")]);
        let sc = LeakScanner::new(&s).unwrap();
        let config = serde_json::json!({"config": {"Env": ["A=1", "PW=pa\"ss\\word1"]}});
        let raw = serde_json::to_vec(&config).unwrap();
        let (hit, path) = sc.find_in_json(&raw).unwrap();
        assert_eq!((hit.secret, path.as_str()), ("k", "config.Env[1]"));
        assert!(sc.find(br#"{"pw":"pa\"ss\\word1"}"#).is_some());
    }

    #[test]
    fn stream_finds_values_split_between_pieces() {
        let s = secrets(&[("k", TOKEN)]);
        let sc = LeakScanner::new(&s).unwrap();
        let text = format!("{}{TOKEN}{}", "x".repeat(1000), "y".repeat(1000));
        for piece in [1, 2, 3, 7, 13, 64, 1000, 5000] {
            let mut st = sc.stream();
            let found = text.as_bytes().chunks(piece).any(|c| st.feed(c).is_some());
            assert!(found, "piece size {piece}");
        }
        let mut st = sc.stream();
        assert!(st.feed(&TOKEN.as_bytes()[..5]).is_none());
        st.reset();
        assert!(st.feed(&TOKEN.as_bytes()[5..]).is_none(), "reset forgets");
    }

    #[test]
    fn redacts_output_lines() {
        let s = secrets(&[("a", TOKEN), ("b", "short"), ("c", "with \"quotes\"\n")]);
        let r = Redactor::new(&s);
        assert_eq!(
            r.redact(format!("ok: [default] => {TOKEN} and short")),
            "ok: [default] => <redacted> and <redacted>"
        );
        assert_eq!(
            r.redact(r#""msg": "with \"quotes\"\n""#.into()),
            r#""msg": "<redacted>""#
        );
        assert_eq!(Redactor::new(&Secrets::default()).redact("x".into()), "x");
    }

    #[test]
    fn the_json_file_holds_every_value() {
        let s = secrets(&[("a", TOKEN)]);
        let v: serde_json::Value = serde_json::from_slice(&s.to_json()).unwrap();
        assert_eq!(v["a"], TOKEN);
    }
}
