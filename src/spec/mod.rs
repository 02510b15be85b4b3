//! image.yaml: types, variable interpolation and validation with `file:line` errors.
//!
//! Parsing keeps every node's location, so one pass reports every problem at once
//! (unknown keys, wrong types, undefined variables, missing files, bad references).

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_saphyr::Spanned;

/// One problem in an image.yaml (or a variables file), with its location.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// The file at fault.
    pub file: PathBuf,
    /// 1-based line (0 when unknown).
    pub line: u64,
    /// 1-based column (0 when unknown).
    pub column: u64,
    /// Dotted key path (`provision.playbook`), empty for the document.
    pub key: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.column)?;
        }
        if self.key.is_empty() {
            write!(f, ": {}", self.message)
        } else {
            write!(f, ": {}: {}", self.key, self.message)
        }
    }
}

/// Errors of loading a spec: every problem found.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// One or more problems in the content.
    #[error("{}", problems.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("\n"))]
    Invalid {
        /// Every problem found, in document order.
        problems: Vec<Problem>,
    },
}

impl crate::error::HasKind for SpecError {
    fn kind(&self) -> crate::error::ErrorKind {
        crate::error::ErrorKind::BadInput
    }
}

impl SpecError {
    /// The problems (empty for a read error).
    pub fn problems(&self) -> &[Problem] {
        match self {
            SpecError::Invalid { problems } => problems,
            SpecError::Read { .. } => &[],
        }
    }
}

pub use crate::layer::Compression;

/// A validated image.yaml with variables resolved.
#[derive(Debug, Clone, Serialize)]
pub struct ImageSpec {
    /// Required: local image name.
    pub name: String,
    /// Required: base image reference.
    pub base: String,
    /// Optional: platform `os/arch[/variant]`.
    pub platform: Option<String>,
    /// Resolved variables (defaults merged with overrides).
    pub variables: BTreeMap<String, String>,
    /// Required: provisioning.
    pub provision: Provision,
    /// Optional: the result's config.
    pub image: ImageSettings,
    /// Optional: layer settings.
    pub layer: LayerSettings,
    /// Optional: push target.
    pub target: Option<Target>,
    /// Where the spec came from.
    pub source: SpecSource,
}

/// Where a spec was read from.
#[derive(Debug, Clone, Serialize)]
pub struct SpecSource {
    /// The image.yaml path as given.
    pub path: PathBuf,
    /// Its directory (relative paths resolve against it).
    pub dir: PathBuf,
    /// The raw file content (for cache keys).
    #[serde(skip)]
    pub raw: String,
}

/// `provision:` section.
#[derive(Debug, Clone, Serialize)]
pub struct Provision {
    /// Required: the playbook, resolved against the image.yaml directory.
    pub playbook: PathBuf,
    /// Optional: extra vars, passed as JSON.
    pub extra_vars: serde_json::Map<String, serde_json::Value>,
    /// Optional: extra ansible-playbook arguments.
    pub ansible_args: Vec<String>,
    /// Optional: environment for ansible-playbook.
    pub env: BTreeMap<String, String>,
    /// Optional: Ansible connection plugin (default `community.docker.docker_api`).
    pub connection: Option<String>,
    /// Optional: Ansible pipelining (default true).
    pub pipelining: Option<bool>,
}

/// `image:` section; unset fields inherit from the base.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ImageSettings {
    /// Entrypoint.
    pub entrypoint: Option<Vec<String>>,
    /// Cmd.
    pub cmd: Option<Vec<String>>,
    /// Environment, merged over the base's.
    pub env: Option<BTreeMap<String, String>>,
    /// Exposed ports (`80`, `80/tcp`, `53/udp`), normalised to `N/proto`.
    pub expose: Option<Vec<String>>,
    /// Labels, merged over the base's.
    pub labels: Option<BTreeMap<String, String>>,
    /// User.
    pub user: Option<String>,
    /// Working directory.
    pub workdir: Option<String>,
    /// Volumes.
    pub volumes: Option<Vec<String>>,
    /// Stop signal.
    pub stop_signal: Option<String>,
    /// Author.
    pub author: Option<String>,
}

/// `layer:` section.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LayerSettings {
    /// Glob patterns of paths left out of the layer.
    pub exclude: Vec<String>,
    /// Compression.
    pub compression: Compression,
    /// Compression level (gzip 1-9, zstd 1-19).
    pub level: Option<i32>,
}

/// `target:` section.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    /// Repository (`host/path` or an ECR repository name).
    pub repository: String,
    /// Tags (default `[latest]`).
    pub tags: Vec<String>,
    /// Amazon ECR settings.
    pub ecr: Option<EcrSettings>,
}

/// `target.ecr:` section.
#[derive(Debug, Clone, Default, Serialize)]
pub struct EcrSettings {
    /// Region.
    pub region: Option<String>,
    /// AWS account id (when `repository` is a bare name).
    pub account: Option<String>,
    /// Create the repository when missing.
    pub create_repository: bool,
    /// Scan on push (on create).
    pub scan_on_push: Option<bool>,
    /// `MUTABLE` or `IMMUTABLE` (on create).
    pub tag_immutability: Option<String>,
    /// `AES256` or `KMS` (on create).
    pub encryption: Option<String>,
    /// KMS key for `KMS` encryption.
    pub kms_key: Option<String>,
    /// Lifecycle policy JSON file, resolved against the image.yaml directory.
    pub lifecycle_policy: Option<PathBuf>,
}

impl ImageSpec {
    /// The tag used in the local layout: the first target tag, else `latest`.
    pub fn local_tag(&self) -> String {
        self.target
            .as_ref()
            .and_then(|t| t.tags.first().cloned())
            .unwrap_or_else(|| "latest".to_string())
    }

    /// `NAME:TAG` as stored in the local layout.
    pub fn local_ref(&self) -> String {
        format!("{}:{}", self.name, self.local_tag())
    }
}

/// Variable overrides from the command line.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--var KEY=VALUE` pairs (later wins).
    pub vars: Vec<(String, String)>,
    /// `--var-file FILE` paths (later wins; `--var` beats all files).
    pub var_files: Vec<PathBuf>,
}

impl Overrides {
    /// Parse a `KEY=VALUE` flag.
    pub fn parse_var(s: &str) -> Result<(String, String), String> {
        let (k, v) = s
            .split_once('=')
            .ok_or_else(|| format!("--var {s:?}: expected KEY=VALUE"))?;
        if !valid_var_name(k) {
            return Err(format!(
                "--var {s:?}: invalid variable name {k:?} (letters, digits, _; not starting with a digit)"
            ));
        }
        Ok((k.to_string(), v.to_string()))
    }
}

// ---------------------------------------------------------------------------
// Located YAML tree

#[derive(Debug, Clone)]
struct Node {
    line: u64,
    col: u64,
    v: Val,
}

#[derive(Debug, Clone)]
enum Val {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    Map(Vec<(Key, Node)>),
}

#[derive(Debug, Clone)]
struct Key {
    name: String,
    line: u64,
    col: u64,
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = Spanned::<Val>::deserialize(d)?;
        Ok(Node {
            line: s.referenced.line(),
            col: s.referenced.column(),
            v: s.value,
        })
    }
}

impl<'de> Deserialize<'de> for Val {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Val;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any YAML value")
            }
            fn visit_unit<E: de::Error>(self) -> Result<Val, E> {
                Ok(Val::Null)
            }
            fn visit_none<E: de::Error>(self) -> Result<Val, E> {
                Ok(Val::Null)
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Val, D::Error> {
                Val::deserialize(d)
            }
            fn visit_bool<E: de::Error>(self, b: bool) -> Result<Val, E> {
                Ok(Val::Bool(b))
            }
            fn visit_i64<E: de::Error>(self, i: i64) -> Result<Val, E> {
                Ok(Val::Int(i))
            }
            fn visit_u64<E: de::Error>(self, i: u64) -> Result<Val, E> {
                i64::try_from(i)
                    .map(Val::Int)
                    .or_else(|_| Ok(Val::Str(i.to_string())))
            }
            fn visit_f64<E: de::Error>(self, x: f64) -> Result<Val, E> {
                Ok(Val::Float(x))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Val, E> {
                Ok(Val::Str(s.to_string()))
            }
            fn visit_string<E: de::Error>(self, s: String) -> Result<Val, E> {
                Ok(Val::Str(s))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Val, A::Error> {
                let mut v = Vec::new();
                while let Some(n) = a.next_element::<Node>()? {
                    v.push(n);
                }
                Ok(Val::Seq(v))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Val, A::Error> {
                let mut v = Vec::new();
                while let Some(k) = a.next_key::<Spanned<KeyStr>>()? {
                    let n = a.next_value::<Node>()?;
                    v.push((
                        Key {
                            name: k.value.0,
                            line: k.referenced.line(),
                            col: k.referenced.column(),
                        },
                        n,
                    ));
                }
                Ok(Val::Map(v))
            }
        }
        d.deserialize_any(V)
    }
}

/// A mapping key: any scalar, as text.
struct KeyStr(String);

impl<'de> Deserialize<'de> for KeyStr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = KeyStr;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a scalar mapping key")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<KeyStr, E> {
                Ok(KeyStr(s.to_string()))
            }
            fn visit_i64<E: de::Error>(self, i: i64) -> Result<KeyStr, E> {
                Ok(KeyStr(i.to_string()))
            }
            fn visit_u64<E: de::Error>(self, i: u64) -> Result<KeyStr, E> {
                Ok(KeyStr(i.to_string()))
            }
            fn visit_bool<E: de::Error>(self, b: bool) -> Result<KeyStr, E> {
                Ok(KeyStr(b.to_string()))
            }
            fn visit_f64<E: de::Error>(self, x: f64) -> Result<KeyStr, E> {
                Ok(KeyStr(x.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

// ---------------------------------------------------------------------------
// Schema

#[derive(Clone, Copy)]
enum Ty {
    Str,
    Bool,
    Int,
    StrList,
    StrMap,
    AnyMap,
    Ports,
    Obj(&'static [Field]),
}

#[derive(Clone, Copy)]
struct Field {
    name: &'static str,
    ty: Ty,
    required: bool,
}

const fn req(name: &'static str, ty: Ty) -> Field {
    Field {
        name,
        ty,
        required: true,
    }
}
const fn opt(name: &'static str, ty: Ty) -> Field {
    Field {
        name,
        ty,
        required: false,
    }
}

const PROVISION: &[Field] = &[
    req("playbook", Ty::Str),
    opt("extra_vars", Ty::AnyMap),
    opt("ansible_args", Ty::StrList),
    opt("env", Ty::StrMap),
    opt("connection", Ty::Str),
    opt("pipelining", Ty::Bool),
];
const IMAGE: &[Field] = &[
    opt("entrypoint", Ty::StrList),
    opt("cmd", Ty::StrList),
    opt("env", Ty::StrMap),
    opt("expose", Ty::Ports),
    opt("labels", Ty::StrMap),
    opt("user", Ty::Str),
    opt("workdir", Ty::Str),
    opt("volumes", Ty::StrList),
    opt("stop_signal", Ty::Str),
    opt("author", Ty::Str),
];
const LAYER: &[Field] = &[
    opt("exclude", Ty::StrList),
    opt("compression", Ty::Str),
    opt("level", Ty::Int),
];
const ECR: &[Field] = &[
    opt("region", Ty::Str),
    opt("account", Ty::Str),
    opt("create_repository", Ty::Bool),
    opt("scan_on_push", Ty::Bool),
    opt("tag_immutability", Ty::Str),
    opt("encryption", Ty::Str),
    opt("kms_key", Ty::Str),
    opt("lifecycle_policy", Ty::Str),
];
const TARGET: &[Field] = &[
    req("repository", Ty::Str),
    opt("tags", Ty::StrList),
    opt("ecr", Ty::Obj(ECR)),
];
const TOP: &[Field] = &[
    req("name", Ty::Str),
    req("base", Ty::Str),
    opt("platform", Ty::Str),
    opt("variables", Ty::StrMap),
    req("provision", Ty::Obj(PROVISION)),
    opt("image", Ty::Obj(IMAGE)),
    opt("layer", Ty::Obj(LAYER)),
    opt("target", Ty::Obj(TARGET)),
];

/// The JSON value of a typed, interpolated node.
type Out = serde_json::Value;

struct Checker<'a> {
    file: &'a Path,
    vars: &'a BTreeMap<String, String>,
    problems: Vec<Problem>,
}

impl Checker<'_> {
    fn problem(&mut self, line: u64, col: u64, key: &str, message: impl Into<String>) {
        self.problems.push(Problem {
            file: self.file.to_path_buf(),
            line,
            column: col,
            key: key.to_string(),
            message: message.into(),
        });
    }

    fn check(&mut self, n: &Node, ty: Ty, path: &str) -> Option<Out> {
        match ty {
            Ty::Str => self.string(n, path).map(Out::String),
            Ty::Bool => match n.v {
                Val::Bool(b) => Some(Out::Bool(b)),
                Val::Str(ref s) => {
                    let s = self.interpolate(s, n, path)?;
                    match s.as_str() {
                        "true" => Some(Out::Bool(true)),
                        "false" => Some(Out::Bool(false)),
                        _ => {
                            self.problem(
                                n.line,
                                n.col,
                                path,
                                format!("expected true or false, got {s:?}"),
                            );
                            None
                        }
                    }
                }
                _ => self.wrong(n, path, "a boolean"),
            },
            Ty::Int => match n.v {
                Val::Int(i) => Some(Out::from(i)),
                Val::Str(ref s) => {
                    let s = self.interpolate(s, n, path)?;
                    match s.trim().parse::<i64>() {
                        Ok(i) => Some(Out::from(i)),
                        Err(_) => {
                            self.problem(
                                n.line,
                                n.col,
                                path,
                                format!("expected an integer, got {s:?}"),
                            );
                            None
                        }
                    }
                }
                _ => self.wrong(n, path, "an integer"),
            },
            Ty::StrList => match &n.v {
                Val::Seq(items) => {
                    let mut out = Vec::new();
                    let mut ok = true;
                    for (i, it) in items.iter().enumerate() {
                        match self.string(it, &format!("{path}[{i}]")) {
                            Some(s) => out.push(Out::String(s)),
                            None => ok = false,
                        }
                    }
                    ok.then_some(Out::Array(out))
                }
                _ => self.wrong(n, path, "a list of strings"),
            },
            Ty::Ports => match &n.v {
                Val::Seq(items) => {
                    let mut out = Vec::new();
                    let mut ok = true;
                    for (i, it) in items.iter().enumerate() {
                        let p = format!("{path}[{i}]");
                        let Some(s) = self.string(it, &p) else {
                            ok = false;
                            continue;
                        };
                        match normalise_port(&s) {
                            Some(port) => out.push(Out::String(port)),
                            None => {
                                self.problem(
                                    it.line,
                                    it.col,
                                    &p,
                                    format!("invalid port {s:?}: expected 1-65535 with optional /tcp, /udp or /sctp"),
                                );
                                ok = false;
                            }
                        }
                    }
                    ok.then_some(Out::Array(out))
                }
                _ => self.wrong(n, path, "a list of ports"),
            },
            Ty::StrMap => match &n.v {
                Val::Map(entries) => {
                    let mut out = serde_json::Map::new();
                    let mut ok = true;
                    for (k, v) in entries {
                        let p = join(path, &k.name);
                        match self.string(v, &p) {
                            Some(s) => {
                                out.insert(k.name.clone(), Out::String(s));
                            }
                            None => ok = false,
                        }
                    }
                    ok.then_some(Out::Object(out))
                }
                Val::Null => Some(Out::Object(Default::default())),
                _ => self.wrong(n, path, "a mapping of strings"),
            },
            Ty::AnyMap => match &n.v {
                Val::Map(_) => self.any(n, path),
                Val::Null => Some(Out::Object(Default::default())),
                _ => self.wrong(n, path, "a mapping"),
            },
            Ty::Obj(fields) => match &n.v {
                Val::Map(entries) => {
                    let mut out = serde_json::Map::new();
                    for (k, v) in entries {
                        let p = join(path, &k.name);
                        match fields.iter().find(|f| f.name == k.name) {
                            None => {
                                let names: Vec<_> = fields.iter().map(|f| f.name).collect();
                                self.problem(
                                    k.line,
                                    k.col,
                                    &p,
                                    format!(
                                        "unknown key {:?} (expected one of: {})",
                                        k.name,
                                        names.join(", ")
                                    ),
                                );
                            }
                            Some(f) => {
                                if out.contains_key(f.name) {
                                    self.problem(k.line, k.col, &p, "duplicate key");
                                } else if let Some(val) = self.check(v, f.ty, &p) {
                                    out.insert(f.name.to_string(), val);
                                }
                            }
                        }
                    }
                    for f in fields.iter().filter(|f| f.required) {
                        if !entries.iter().any(|(k, _)| k.name == f.name) {
                            self.problem(
                                n.line,
                                n.col,
                                &join(path, f.name),
                                format!("required key {:?} is missing", f.name),
                            );
                        }
                    }
                    // Partial on purpose: semantic checks still run on the keys that typed.
                    Some(Out::Object(out))
                }
                _ => self.wrong(n, path, "a mapping"),
            },
        }
    }

    fn wrong<T>(&mut self, n: &Node, path: &str, expected: &str) -> Option<T> {
        self.problem(
            n.line,
            n.col,
            path,
            format!("expected {expected}, got {}", describe(&n.v)),
        );
        None
    }

    fn string(&mut self, n: &Node, path: &str) -> Option<String> {
        match &n.v {
            Val::Str(s) => self.interpolate(s, n, path),
            Val::Int(i) => Some(i.to_string()),
            Val::Bool(b) => Some(b.to_string()),
            Val::Float(x) => Some(x.to_string()),
            _ => self.wrong(n, path, "a string"),
        }
    }

    fn any(&mut self, n: &Node, path: &str) -> Option<Out> {
        Some(match &n.v {
            Val::Null => Out::Null,
            Val::Bool(b) => Out::Bool(*b),
            Val::Int(i) => Out::from(*i),
            Val::Float(x) => serde_json::Number::from_f64(*x).map_or(Out::Null, Out::Number),
            Val::Str(s) => Out::String(self.interpolate(s, n, path)?),
            Val::Seq(items) => {
                let mut v = Vec::new();
                for (i, it) in items.iter().enumerate() {
                    v.push(self.any(it, &format!("{path}[{i}]"))?);
                }
                Out::Array(v)
            }
            Val::Map(entries) => {
                let mut m = serde_json::Map::new();
                for (k, v) in entries {
                    m.insert(k.name.clone(), self.any(v, &join(path, &k.name))?);
                }
                Out::Object(m)
            }
        })
    }

    fn interpolate(&mut self, s: &str, n: &Node, path: &str) -> Option<String> {
        match interpolate(s, &|name| {
            self.vars
                .get(name)
                .cloned()
                .or_else(|| std::env::var(name).ok())
        }) {
            Ok(v) => Some(v),
            Err(msg) => {
                self.problem(n.line, n.col, path, msg);
                None
            }
        }
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn describe(v: &Val) -> &'static str {
    match v {
        Val::Null => "null",
        Val::Bool(_) => "a boolean",
        Val::Int(_) => "an integer",
        Val::Float(_) => "a number",
        Val::Str(_) => "a string",
        Val::Seq(_) => "a list",
        Val::Map(_) => "a mapping",
    }
}

fn valid_var_name(k: &str) -> bool {
    !k.is_empty()
        && !k.starts_with(|c: char| c.is_ascii_digit())
        && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Expand `${VAR}` and `${VAR:-default}`; `$${` is a literal `${`.
pub fn interpolate(s: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix("${") {
            out.push_str("${");
            rest = tail;
            continue;
        }
        let Some(body_start) = after.strip_prefix('{') else {
            out.push('$');
            rest = after;
            continue;
        };
        let Some(end) = matching_brace(body_start) else {
            return Err(format!("unterminated \"${{\" in {s:?}"));
        };
        let body = &body_start[..end];
        let (name, default) = match body.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (body, None),
        };
        if !valid_var_name(name) {
            return Err(format!("invalid variable name {name:?} in {s:?}"));
        }
        match lookup(name).filter(|v| default.is_none() || !v.is_empty()) {
            Some(v) => out.push_str(&v),
            None => match default {
                Some(d) => out.push_str(&interpolate(d, lookup)?),
                None => {
                    return Err(format!(
                        "undefined variable ${{{name}}} (define it under variables:, pass --var {name}=..., set it in the environment, or write ${{{name}:-default}})"
                    ))
                }
            },
        }
        rest = &body_start[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Index of the `}` closing a `${`, counting nested `${...}`.
fn matching_brace(s: &str) -> Option<usize> {
    let mut depth = 0usize;
    let b = s.as_bytes();
    for (i, &c) in b.iter().enumerate() {
        match c {
            b'{' if i > 0 && b[i - 1] == b'$' => depth += 1,
            b'}' if depth == 0 => return Some(i),
            b'}' => depth -= 1,
            _ => {}
        }
    }
    None
}

fn normalise_port(s: &str) -> Option<String> {
    let (num, proto) = match s.split_once('/') {
        Some((n, p)) => (n, p.to_ascii_lowercase()),
        None => (s, "tcp".to_string()),
    };
    let n: u16 = num.trim().parse().ok()?;
    (n > 0 && matches!(proto.as_str(), "tcp" | "udp" | "sctp")).then(|| format!("{n}/{proto}"))
}

fn parse_tree(file: &Path, text: &str) -> Result<Node, Problem> {
    let mut options = serde_saphyr::Options::default();
    options.strict_booleans = true;
    options.leading_zero_numbers_as_strings = true;
    options.with_snippet = false;
    serde_saphyr::from_str_with_options::<Node>(text, options).map_err(|e| {
        let (line, column) = e
            .location()
            .map(|l| (l.line(), l.column()))
            .unwrap_or((0, 0));
        let msg = e.to_string();
        // serde-saphyr may append a source snippet; the first line is the message.
        let first = msg.lines().next().unwrap_or("invalid YAML").to_string();
        Problem {
            file: file.to_path_buf(),
            line,
            column,
            key: String::new(),
            message: format!("invalid YAML: {first}"),
        }
    })
}

fn invalid(p: Problem) -> SpecError {
    SpecError::Invalid { problems: vec![p] }
}

/// Read variables files and `--var` pairs into one map (later wins, `--var` last).
fn override_vars(ov: &Overrides) -> Result<BTreeMap<String, String>, SpecError> {
    let mut out = BTreeMap::new();
    let mut problems = Vec::new();
    for f in &ov.var_files {
        let text = fs_err::read_to_string(f).map_err(|e| SpecError::Read {
            path: f.clone(),
            source: e,
        })?;
        let tree = parse_tree(f, &text).map_err(invalid)?;
        let empty = BTreeMap::new();
        let mut c = Checker {
            file: f,
            vars: &empty,
            problems: Vec::new(),
        };
        if let Some(Out::Object(m)) = c.check(&tree, Ty::StrMap, "") {
            for (k, v) in m {
                if let Out::String(s) = v {
                    out.insert(k, s);
                }
            }
        }
        problems.extend(c.problems);
    }
    if !problems.is_empty() {
        return Err(SpecError::Invalid { problems });
    }
    for (k, v) in &ov.vars {
        out.insert(k.clone(), v.clone());
    }
    Ok(out)
}

/// The directory of an image.yaml (`.` for a bare file name): relative paths resolve against it.
pub fn dir_of(image_yaml: &Path) -> &Path {
    match image_yaml.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Load, interpolate and validate an image.yaml, reporting every problem at once.
pub fn load(path: &Path, ov: &Overrides) -> Result<ImageSpec, SpecError> {
    let text = fs_err::read_to_string(path).map_err(|e| SpecError::Read {
        path: path.to_path_buf(),
        source: e,
    })?;
    let dir = dir_of(path).to_path_buf();
    let tree = parse_tree(path, &text).map_err(invalid)?;
    let overrides = override_vars(ov)?;

    // Variables: image.yaml defaults (which may use ${ENV}), then overrides.
    let mut vars = BTreeMap::new();
    let mut problems = Vec::new();
    if let Val::Map(entries) = &tree.v {
        if let Some((_, vnode)) = entries.iter().find(|(k, _)| k.name == "variables") {
            let mut c = Checker {
                file: path,
                vars: &overrides,
                problems: Vec::new(),
            };
            if let Some(Out::Object(m)) = c.check(vnode, Ty::StrMap, "variables") {
                for (k, v) in m {
                    if let Out::String(s) = v {
                        vars.insert(k, s);
                    }
                }
            }
            if let Val::Map(ventries) = &vnode.v {
                for (k, _) in ventries {
                    if !valid_var_name(&k.name) {
                        c.problem(
                            k.line,
                            k.col,
                            &join("variables", &k.name),
                            "invalid variable name (letters, digits, _)",
                        );
                    }
                }
            }
            problems.extend(c.problems);
        }
    }
    vars.extend(overrides);

    let mut c = Checker {
        file: path,
        vars: &vars,
        problems,
    };
    let out = c.check(&tree, Ty::Obj(TOP), "");
    let mut problems = c.problems;
    let Some(Out::Object(doc)) = out else {
        // Not a mapping at all: nothing more to check.
        problems.sort_by_key(|p| (p.line, p.column));
        return Err(SpecError::Invalid { problems });
    };

    let spec = build_spec(path, &dir, &text, &tree, doc, vars, &mut problems);
    problems.sort_by_key(|p| (p.line, p.column));
    if problems.is_empty() {
        Ok(spec)
    } else {
        Err(SpecError::Invalid { problems })
    }
}

/// Location of a dotted key in the tree (for semantic errors after typing).
fn locate(tree: &Node, path: &str) -> (u64, u64) {
    let mut n = tree;
    for part in path.split('.') {
        let (name, idx) = match part.split_once('[') {
            Some((k, i)) => (k, i.trim_end_matches(']').parse::<usize>().ok()),
            None => (part, None),
        };
        let Val::Map(entries) = &n.v else { break };
        let Some((_, v)) = entries.iter().find(|(k, _)| k.name == name) else {
            break;
        };
        n = v;
        if let (Some(i), Val::Seq(items)) = (idx, &n.v) {
            if let Some(it) = items.get(i) {
                n = it;
            }
        }
    }
    (n.line, n.col)
}

fn str_of(m: &serde_json::Map<String, Out>, k: &str) -> Option<String> {
    m.get(k).and_then(|v| v.as_str()).map(str::to_string)
}

fn list_of(m: &serde_json::Map<String, Out>, k: &str) -> Option<Vec<String>> {
    m.get(k).and_then(|v| v.as_array()).map(|a| {
        a.iter()
            .filter_map(|x| x.as_str().map(str::to_string))
            .collect()
    })
}

fn map_of(m: &serde_json::Map<String, Out>, k: &str) -> Option<BTreeMap<String, String>> {
    m.get(k).and_then(|v| v.as_object()).map(|o| {
        o.iter()
            .filter_map(|(k, v)| v.as_str().map(|s| (k.clone(), s.to_string())))
            .collect()
    })
}

fn obj<'a>(
    m: &'a serde_json::Map<String, Out>,
    k: &str,
) -> Option<&'a serde_json::Map<String, Out>> {
    m.get(k).and_then(|v| v.as_object())
}

#[allow(clippy::too_many_arguments)]
fn build_spec(
    path: &Path,
    dir: &Path,
    text: &str,
    tree: &Node,
    doc: serde_json::Map<String, Out>,
    vars: BTreeMap<String, String>,
    problems: &mut Vec<Problem>,
) -> ImageSpec {
    let mut bad = |key: &str, msg: String| {
        let (line, column) = locate(tree, key);
        problems.push(Problem {
            file: path.to_path_buf(),
            line,
            column,
            key: key.to_string(),
            message: msg,
        });
    };

    let name = str_of(&doc, "name").unwrap_or_default();
    if doc.contains_key("name") && !valid_repo_path(&name) {
        bad(
            "name",
            format!(
                "invalid image name {name:?}: lowercase letters, digits, and . _ - / separators"
            ),
        );
    }
    let base = str_of(&doc, "base").unwrap_or_default();
    if let (true, Err(e)) = (doc.contains_key("base"), check_reference(&base)) {
        bad("base", format!("unparsable image reference {base:?}: {e}"));
    }
    let platform = str_of(&doc, "platform");
    if let Some(p) = &platform {
        if crate::oci::Platform::parse(p).is_none() {
            bad(
                "platform",
                format!("invalid platform {p:?}: expected os/arch[/variant], e.g. linux/amd64"),
            );
        }
    }

    let empty = serde_json::Map::new();
    let prov = obj(&doc, "provision").unwrap_or(&empty);
    let playbook_rel = str_of(prov, "playbook").unwrap_or_default();
    let playbook = dir.join(&playbook_rel);
    if prov.contains_key("playbook") && !playbook.is_file() {
        bad(
            "provision.playbook",
            format!(
                "playbook {playbook_rel:?} not found (looked for {})",
                playbook.display()
            ),
        );
    }
    let provision = Provision {
        playbook,
        extra_vars: prov
            .get("extra_vars")
            .and_then(|v| v.as_object())
            .cloned()
            .unwrap_or_default(),
        ansible_args: list_of(prov, "ansible_args").unwrap_or_default(),
        env: map_of(prov, "env").unwrap_or_default(),
        connection: str_of(prov, "connection"),
        pipelining: prov.get("pipelining").and_then(|v| v.as_bool()),
    };
    if let Some(c) = &provision.connection {
        if !matches!(
            c.as_str(),
            "community.docker.docker" | "community.docker.docker_api" | "docker"
        ) {
            bad(
                "provision.connection",
                format!("unsupported connection {c:?}: community.docker.docker_api, community.docker.docker or docker"),
            );
        }
    }

    let img = obj(&doc, "image").unwrap_or(&empty);
    let image = ImageSettings {
        entrypoint: list_of(img, "entrypoint"),
        cmd: list_of(img, "cmd"),
        env: map_of(img, "env"),
        expose: list_of(img, "expose"),
        labels: map_of(img, "labels"),
        user: str_of(img, "user"),
        workdir: str_of(img, "workdir"),
        volumes: list_of(img, "volumes"),
        stop_signal: str_of(img, "stop_signal"),
        author: str_of(img, "author"),
    };
    if let Some(env) = &image.env {
        for k in env.keys() {
            if k.is_empty() || k.contains('=') {
                bad(
                    &format!("image.env.{k}"),
                    "invalid environment variable name".into(),
                );
            }
        }
    }
    if let Some(w) = &image.workdir {
        if !w.starts_with('/') {
            bad(
                "image.workdir",
                format!("workdir {w:?} must be an absolute path"),
            );
        }
    }
    for (i, v) in image.volumes.iter().flatten().enumerate() {
        if !v.starts_with('/') {
            bad(
                &format!("image.volumes[{i}]"),
                format!("volume {v:?} must be an absolute path"),
            );
        }
    }
    if let Some(s) = &image.stop_signal {
        if !valid_signal(s) {
            bad(
                "image.stop_signal",
                format!("unknown signal {s:?} (e.g. SIGTERM, SIGQUIT, 15)"),
            );
        }
    }

    let lay = obj(&doc, "layer").unwrap_or(&empty);
    let mut layer = LayerSettings {
        exclude: list_of(lay, "exclude").unwrap_or_default(),
        compression: Compression::Gzip,
        level: lay.get("level").and_then(|v| v.as_i64()).map(|l| l as i32),
    };
    for (i, g) in layer.exclude.iter().enumerate() {
        if !g.starts_with('/') {
            bad(
                &format!("layer.exclude[{i}]"),
                format!("pattern {g:?} must be an absolute path glob"),
            );
        } else if let Err(e) = globset::Glob::new(g) {
            bad(
                &format!("layer.exclude[{i}]"),
                format!("invalid glob {g:?}: {e}"),
            );
        }
    }
    match str_of(lay, "compression").as_deref() {
        None | Some("gzip") => {}
        Some("zstd") => layer.compression = Compression::Zstd,
        Some(other) => bad(
            "layer.compression",
            format!("unknown compression {other:?} (gzip or zstd)"),
        ),
    }
    if let Some(l) = layer.level {
        let range = layer.compression.level_range();
        if !range.contains(&l) {
            bad(
                "layer.level",
                format!(
                    "level {l} out of range {}..={} for {}",
                    range.start(),
                    range.end(),
                    layer.compression
                ),
            );
        }
    }

    let target = obj(&doc, "target").map(|t| {
        let repository = str_of(t, "repository").unwrap_or_default();
        let has_repository = t.contains_key("repository");
        let tags = list_of(t, "tags").unwrap_or_else(|| vec!["latest".to_string()]);
        let ecr = obj(t, "ecr").map(|e| EcrSettings {
            region: str_of(e, "region"),
            account: str_of(e, "account"),
            create_repository: e
                .get("create_repository")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
            scan_on_push: e.get("scan_on_push").and_then(|v| v.as_bool()),
            tag_immutability: str_of(e, "tag_immutability"),
            encryption: str_of(e, "encryption"),
            kms_key: str_of(e, "kms_key"),
            lifecycle_policy: str_of(e, "lifecycle_policy").map(|p| dir.join(p)),
        });
        (
            Target {
                repository,
                tags,
                ecr,
            },
            has_repository,
        )
    });
    if let Some((t, has_repository)) = &target {
        let repo_ok = !has_repository
            || if t.ecr.is_some() && !t.repository.contains('/') {
                valid_repo_path(&t.repository)
            } else {
                check_reference(&t.repository).is_ok()
                    && !t
                        .repository
                        .rsplit('/')
                        .next()
                        .unwrap_or("")
                        .contains([':', '@'])
            };
        if !repo_ok {
            bad(
                "target.repository",
                format!(
                    "invalid repository {:?}: expected HOST/PATH without tag or digest",
                    t.repository
                ),
            );
        }
        if t.tags.is_empty() {
            bad("target.tags", "at least one tag is needed".into());
        }
        for (i, tag) in t.tags.iter().enumerate() {
            if !valid_tag(tag) {
                bad(
                    &format!("target.tags[{i}]"),
                    format!("invalid tag {tag:?}: [A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}}"),
                );
            }
        }
        if let Some(e) = &t.ecr {
            if let Some(m) = &e.tag_immutability {
                if !matches!(m.as_str(), "MUTABLE" | "IMMUTABLE") {
                    bad(
                        "target.ecr.tag_immutability",
                        format!("{m:?}: expected MUTABLE or IMMUTABLE"),
                    );
                }
            }
            match e.encryption.as_deref() {
                None | Some("AES256") => {}
                Some("KMS") => {}
                Some(o) => bad(
                    "target.ecr.encryption",
                    format!("{o:?}: expected AES256 or KMS"),
                ),
            }
            if e.kms_key.is_some() && e.encryption.as_deref() != Some("KMS") {
                bad("target.ecr.kms_key", "kms_key needs encryption: KMS".into());
            }
            if let Some(p) = &e.lifecycle_policy {
                match fs_err::read(p) {
                    Err(err) => bad("target.ecr.lifecycle_policy", format!("{err}")),
                    Ok(b) => {
                        if let Err(err) = serde_json::from_slice::<serde_json::Value>(&b) {
                            bad(
                                "target.ecr.lifecycle_policy",
                                format!("{} is not valid JSON: {err}", p.display()),
                            );
                        }
                    }
                }
            }
        }
    }

    ImageSpec {
        name,
        base,
        platform,
        variables: vars,
        provision,
        image,
        layer,
        target: target.map(|(t, _)| t),
        source: SpecSource {
            path: path.to_path_buf(),
            dir: dir.to_path_buf(),
            raw: text.to_string(),
        },
    }
}

fn valid_repo_path(s: &str) -> bool {
    !s.is_empty()
        && s.split('/').all(|c| {
            !c.is_empty()
                && c.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
                && c.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
                && c.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric())
        })
}

/// Whether a tag is valid.
pub fn valid_tag(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 128
        && t.bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_')
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

fn valid_signal(s: &str) -> bool {
    if let Ok(n) = s.parse::<u32>() {
        return (1..=64).contains(&n);
    }
    let name = s.strip_prefix("SIG").unwrap_or(s);
    matches!(
        name,
        "HUP"
            | "INT"
            | "QUIT"
            | "ILL"
            | "TRAP"
            | "ABRT"
            | "BUS"
            | "FPE"
            | "KILL"
            | "USR1"
            | "SEGV"
            | "USR2"
            | "PIPE"
            | "ALRM"
            | "TERM"
            | "STKFLT"
            | "CHLD"
            | "CONT"
            | "STOP"
            | "TSTP"
            | "TTIN"
            | "TTOU"
            | "URG"
            | "XCPU"
            | "XFSZ"
            | "VTALRM"
            | "PROF"
            | "WINCH"
            | "IO"
            | "PWR"
            | "SYS"
    ) || name.starts_with("RTMIN")
        || name.starts_with("RTMAX")
}

fn check_reference(s: &str) -> Result<(), String> {
    s.parse::<crate::reference::Reference>()
        .map(|_| ())
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, text).unwrap();
        p
    }

    fn load_str(text: &str) -> (tempfile::TempDir, Result<ImageSpec, SpecError>) {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "pb.yml", "- hosts: all\n  tasks: []\n");
        let p = write(d.path(), "image.yaml", text);
        let r = load(&p, &Overrides::default());
        (d, r)
    }

    #[test]
    fn minimal_spec_loads_with_defaults() {
        let (_d, r) = load_str(
            "name: app\nbase: 127.0.0.1:5000/debian:bookworm\nprovision:\n  playbook: pb.yml\n",
        );
        let s = r.unwrap();
        assert_eq!(s.local_ref(), "app:latest");
        assert_eq!(s.layer.compression, Compression::Gzip);
        assert!(s.target.is_none());
    }

    #[test]
    fn every_problem_is_reported_with_lines() {
        let (_d, r) = load_str(
            "name: app\nbase: ${nope}\nprovision:\n  playbook: missing.yml\n  colour: red\nimage:\n  expose: [99999]\n",
        );
        let e = r.unwrap_err();
        let ps = e.problems();
        assert_eq!(ps.len(), 4, "{e}");
        assert_eq!((ps[0].line, ps[0].key.as_str()), (2, "base"));
        assert!(ps[0].message.contains("undefined variable ${nope}"));
        assert_eq!((ps[1].line, ps[1].key.as_str()), (4, "provision.playbook"));
        assert_eq!((ps[2].line, ps[2].key.as_str()), (5, "provision.colour"));
        assert!(ps[2].message.contains("unknown key"));
        assert_eq!((ps[3].line, ps[3].key.as_str()), (7, "image.expose[0]"));
        assert!(
            e.to_string().contains("image.yaml:5:3: provision.colour"),
            "{e}"
        );
    }

    #[test]
    fn wrong_types_and_missing_required() {
        let (_d, r) = load_str("name: [a]\nprovision: {}\n");
        let e = r.unwrap_err();
        let s = e.to_string();
        assert!(
            s.contains(":1:") && s.contains("name: expected a string, got a list"),
            "{s}"
        );
        assert!(s.contains("base: required key \"base\" is missing"), "{s}");
        assert!(s.contains("provision.playbook: required key"), "{s}");
    }

    #[test]
    fn variables_defaults_overrides_and_env() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), "pb.yml", "- hosts: all\n");
        let p = write(
            d.path(),
            "image.yaml",
            "name: app\nvariables: { tag: v1, reg: \"127.0.0.1:5000\" }\nbase: ${reg}/debian:${flavour:-bookworm}\nprovision: { playbook: pb.yml, extra_vars: { t: \"${tag}\", n: [1, \"$${lit}\"] } }\ntarget: { repository: \"${reg}/app\", tags: [\"${tag}\"] }\n",
        );
        let vf = write(d.path(), "vars.yml", "tag: v2\n");
        let ov = Overrides {
            vars: vec![("flavour".into(), "trixie".into())],
            var_files: vec![vf],
        };
        let s = load(&p, &ov).unwrap();
        assert_eq!(s.base, "127.0.0.1:5000/debian:trixie");
        assert_eq!(s.local_ref(), "app:v2");
        assert_eq!(s.provision.extra_vars["t"], "v2");
        assert_eq!(s.provision.extra_vars["n"][1], "${lit}");
    }

    #[test]
    fn interpolation_rules() {
        let look = |n: &str| (n == "A").then(|| "x".to_string());
        assert_eq!(interpolate("a${A}b", &look).unwrap(), "axb");
        assert_eq!(interpolate("${B:-d${A}}", &look).unwrap(), "dx");
        assert_eq!(interpolate("$HOME $${A}", &look).unwrap(), "$HOME ${A}");
        assert!(interpolate("${B}", &look)
            .unwrap_err()
            .contains("undefined variable ${B}"));
        assert!(interpolate("${A", &look).is_err());
    }

    #[test]
    fn yaml_syntax_error_has_location() {
        let (_d, r) = load_str("name: app\nbase: [unclosed\n");
        let e = r.unwrap_err();
        assert!(e.problems()[0].line >= 2, "{e}");
        assert!(e.to_string().contains("invalid YAML"), "{e}");
    }
}
