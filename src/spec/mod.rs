//! image.yaml. The typed structs below are its one schema: serde reads the document into them
//! (through a typing pass that reports every problem at once with `file:line:col`), schemars
//! prints their JSON Schema (`wpimg schema`), and their doc comments say Required or Optional.
//! Checks that types cannot express run afterwards, section by section ([`validate`]).
//!
//! Convention: an optional key is an `Option` field (never `#[serde(default)]`): a missing
//! non-`Option` field is a missing required key.

mod de;
mod sbom;
pub(crate) mod tree;
mod validate;
mod vars;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use crate::layer::Compression;
pub use crate::provision::Accelerator;
pub use sbom::SbomSetting;
pub(crate) use vars::matching_brace;
pub use vars::{interpolate, Overrides, Var, Vars};

/// The value shown in place of a secret one.
pub const REDACTED: &str = "<redacted>";

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

/// A key's place in the document: `provision.extra_vars.db`, `image.expose[0]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct KeyPath(Vec<Segment>);

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Segment {
    Key(String),
    Index(usize),
}

impl KeyPath {
    /// The document itself.
    pub fn root() -> Self {
        Self::default()
    }

    /// A key below this path.
    pub fn key(&self, k: &str) -> Self {
        let mut p = self.clone();
        p.0.push(Segment::Key(k.to_string()));
        p
    }

    /// An item of the list at this path.
    pub fn index(&self, i: usize) -> Self {
        let mut p = self.clone();
        p.0.push(Segment::Index(i));
        p
    }

    /// A path from dotted keys (`provision.playbook`).
    pub fn of(dotted: &str) -> Self {
        dotted.split('.').fold(Self::root(), |p, k| p.key(k))
    }

    /// Whether this path is `prefix` or below it.
    pub fn starts_with(&self, prefix: &KeyPath) -> bool {
        self.0.starts_with(&prefix.0)
    }

    /// How many keys and indexes deep the path is.
    pub fn depth(&self) -> usize {
        self.0.len()
    }

    /// The last key name.
    pub fn last_key(&self) -> Option<String> {
        self.0.iter().rev().find_map(|s| match s {
            Segment::Key(k) => Some(k.clone()),
            Segment::Index(_) => None,
        })
    }

    /// The value at this path in a JSON document.
    fn in_json<'v>(&self, mut v: &'v mut serde_json::Value) -> Option<&'v mut serde_json::Value> {
        for s in &self.0 {
            v = match s {
                Segment::Key(k) => v.get_mut(k)?,
                Segment::Index(i) => v.get_mut(*i)?,
            };
        }
        Some(v)
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, s) in self.0.iter().enumerate() {
            match s {
                // A key holding control characters (NUL, newline) is shown escaped and quoted.
                Segment::Key(k) if k.contains(char::is_control) && i == 0 => write!(f, "{k:?}")?,
                Segment::Key(k) if k.contains(char::is_control) => write!(f, ".{k:?}")?,
                Segment::Key(k) if i == 0 => write!(f, "{k}")?,
                Segment::Key(k) => write!(f, ".{k}")?,
                Segment::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

/// image.yaml: what to build (`name`), from what (`base`), how (`provision`, `image`,
/// `layer`) and where it goes (`target`).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "wpimg image.yaml")]
pub struct ImageSpec {
    /// Required: local image name (the layout ref is NAME:TAG).
    pub name: String,
    /// Required: base image reference (HOST/REPO:TAG, or @sha256:... for a fixed digest).
    pub base: String,
    /// Optional: platform os/arch[/variant]; picks the base's manifest from an index.
    pub platform: Option<String>,
    /// Optional: platforms os/arch[/variant] to build, each from the base's manifest for it;
    /// the result is an OCI image index (not with `platform`).
    pub platforms: Option<Vec<String>>,
    /// Optional: defaults for ${VAR} (they may use ${ENV}); --var and --var-file beat them.
    pub variables: Option<BTreeMap<String, String>>,
    /// Required: the Ansible provisioning.
    pub provision: Provision,
    /// Optional: the result's config; unset fields inherit from the base.
    pub image: Option<ImageSettings>,
    /// Optional: how the new layer is made.
    pub layer: Option<LayerSettings>,
    /// Optional: where `wpimg push` goes.
    pub target: Option<Target>,
    /// Optional: the SBOM made for the built image (on by default): `false` turns it off,
    /// `{ format: spdx-json | cyclonedx-json }` picks the attached document's format.
    pub sbom: Option<SbomSetting>,
    /// Optional: build secrets by name, each `{ env: NAME }` or `{ file: PATH }` (relative to
    /// image.yaml); the play gets each as a variable of that name, from a private file. Their
    /// values never reach the layer, the config, logs, JSON or the cache key.
    pub secrets: Option<BTreeMap<String, SecretSource>>,
    /// Where the spec came from (not a key of image.yaml).
    #[serde(skip_deserializing)]
    #[schemars(skip)]
    pub source: SpecSource,
}

/// Where a spec was read from.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SpecSource {
    /// The image.yaml path as given.
    pub path: PathBuf,
    /// Its directory (relative paths resolve against it).
    pub dir: PathBuf,
    /// The raw file content (for cache keys).
    #[serde(skip)]
    pub raw: String,
    /// Keys whose value came from the environment or a variables file: never shown.
    #[serde(skip)]
    pub secret: BTreeSet<KeyPath>,
    /// The values of `secrets:`, read when the spec is loaded.
    #[serde(skip)]
    pub secret_values: crate::secrets::Secrets,
    /// The files `secrets:` reads (left out of the cache key).
    #[serde(skip)]
    pub secret_files: Vec<PathBuf>,
    /// Values that use `${outputs.NAME}`: templates resolved after provisioning
    /// ([`crate::outputs`]); only under `image.labels`, `image.env` and `target.tags`.
    #[serde(skip)]
    pub outputs: BTreeSet<KeyPath>,
}

/// Where a build secret's value comes from: exactly one of `env` and `file`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SecretSource {
    /// Optional: the environment variable holding the value.
    pub env: Option<String>,
    /// Optional: the file holding the value (UTF-8 text), relative to image.yaml.
    pub file: Option<PathBuf>,
}

/// `provision:` section: one playbook (`playbook` and its keys: one step named `provision`), or
/// `steps`, each a playbook run in a container of the previous step's result.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Provision {
    /// Required unless `steps` is given: the playbook, relative to image.yaml.
    pub playbook: Option<PathBuf>,
    /// Optional (with `playbook`): extra vars, passed as JSON through a private file.
    pub extra_vars: Option<serde_json::Map<String, serde_json::Value>>,
    /// Optional (with `playbook`): extra ansible-playbook arguments.
    pub ansible_args: Option<Vec<String>>,
    /// Optional: environment for ansible-playbook (every step; a step's `env` is merged over it).
    pub env: Option<BTreeMap<String, String>>,
    /// Optional: connection plugin for every step: community.docker.docker_api (default),
    /// community.docker.docker or docker.
    pub connection: Option<String>,
    /// Optional: Ansible pipelining for every step (default true).
    #[schemars(schema_with = "schema::bool_or_variable")]
    pub pipelining: Option<bool>,
    /// Optional: absolute paths kept between builds in wpimg-owned Docker volumes, mounted in
    /// every step's container; never in a layer or a cache key (the play sees them as
    /// `wpimg_cache_mounts`).
    pub cache_mounts: Option<Vec<String>>,
    /// Optional (with `playbook`): more files the playbook reads (globs relative to image.yaml).
    pub inputs: Option<Vec<String>>,
    /// Required unless `playbook` is given: the steps, in order; each yields one layer.
    pub steps: Option<Vec<StepSpec>>,
    /// Optional: none (default) or mitogen: run every step's playbook under Mitogen for
    /// Ansible (strategy mitogen_linear over the `docker` connection); --accelerator beats it.
    pub accelerator: Option<Accelerator>,
    /// Optional: directory holding Mitogen (`ansible_mitogen`, as `pip install --target DIR
    /// mitogen` lays it out), relative to image.yaml; else ansible-playbook's own Python has it.
    pub mitogen_path: Option<PathBuf>,
}

impl Provision {
    /// The accelerator (none unless set).
    pub fn accelerator(&self) -> Accelerator {
        self.accelerator.unwrap_or_default()
    }
}

/// One provisioning step (`provision.steps[]`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StepSpec {
    /// Required: the step's name ([a-z0-9-]+, unique).
    pub name: String,
    /// Required: the playbook, relative to image.yaml.
    pub playbook: PathBuf,
    /// Optional: extra vars, passed as JSON through a private file.
    pub extra_vars: Option<serde_json::Map<String, serde_json::Value>>,
    /// Optional: extra ansible-playbook arguments.
    pub ansible_args: Option<Vec<String>>,
    /// Optional: environment for ansible-playbook, merged over `provision.env`.
    pub env: Option<BTreeMap<String, String>>,
    /// Optional: more files this step reads (globs relative to image.yaml).
    pub inputs: Option<Vec<String>>,
}

/// `image:` section; unset fields inherit from the base.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ImageSettings {
    /// Optional: entrypoint (a new entrypoint resets an inherited cmd, as in Docker).
    pub entrypoint: Option<Vec<String>>,
    /// Optional: cmd.
    pub cmd: Option<Vec<String>>,
    /// Optional: environment, merged over the base's.
    pub env: Option<BTreeMap<String, String>>,
    /// Optional: exposed ports (`80`, `80/tcp`, `53/udp`).
    pub expose: Option<Vec<Port>>,
    /// Optional: labels, merged over the base's.
    pub labels: Option<BTreeMap<String, String>>,
    /// Optional: user (name or uid[:gid]).
    pub user: Option<String>,
    /// Optional: working directory (absolute).
    pub workdir: Option<String>,
    /// Optional: volumes (absolute paths).
    pub volumes: Option<Vec<String>>,
    /// Optional: stop signal (SIGTERM, SIGQUIT, 15, ...).
    pub stop_signal: Option<String>,
    /// Optional: author.
    pub author: Option<String>,
}

/// An exposed port: `N` or `N/tcp|udp|sctp` (loaded: always `N/proto`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Port(pub String);

impl fmt::Display for Port {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Port {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Port;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Port, E> {
                Ok(Port(s.to_string()))
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Port, E> {
                Ok(Port(n.to_string()))
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Port, E> {
                Ok(Port(n.to_string()))
            }
        }
        d.deserialize_string(V)
    }
}

impl JsonSchema for Port {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Port".into()
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "A port: N or N/tcp, N/udp, N/sctp (1-65535).",
            "anyOf": [
                { "type": "integer", "minimum": 1, "maximum": 65535 },
                { "type": "string", "pattern": "^([0-9]+(/(tcp|udp|sctp|TCP|UDP|SCTP))?|.*\\$\\{.*)$" }
            ]
        })
    }
}

/// `layer:` section.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LayerSettings {
    /// Optional: absolute-path globs left out of the layer (`*` within a path component,
    /// `**` across them); a directory takes its contents.
    pub exclude: Option<Vec<String>>,
    /// Optional: gzip (default; every engine can pull it) or zstd (Docker 20.10 cannot).
    pub compression: Option<Compression>,
    /// Optional: compression level: gzip 0-9 (default 6), zstd 1-22 (default 3).
    #[schemars(schema_with = "schema::integer_or_variable")]
    pub level: Option<i32>,
    /// Optional: true merges the steps' new layers into one (same filesystem; default false).
    #[schemars(schema_with = "schema::bool_or_variable")]
    pub squash: Option<bool>,
}

impl LayerSettings {
    /// The compression (gzip unless set).
    pub fn compression(&self) -> Compression {
        self.compression.unwrap_or_default()
    }

    /// The exclude globs.
    pub fn excludes(&self) -> Vec<String> {
        self.exclude.clone().unwrap_or_default()
    }

    /// Whether the steps' layers are merged into one.
    pub fn squashed(&self) -> bool {
        self.squash == Some(true)
    }
}

/// `target:` section.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Target {
    /// Required: repository: HOST/PATH (no tag), or a bare ECR repository name.
    pub repository: String,
    /// Optional: tags (default [latest]); they may use `${outputs.NAME}`. The first tag that
    /// uses no output (else `latest`) is also the local layout tag.
    pub tags: Option<Vec<String>>,
    /// Optional: Amazon ECR settings (with --ecr).
    pub ecr: Option<EcrSettings>,
}

impl Target {
    /// The tags (`latest` unless set).
    pub fn tags(&self) -> Vec<String> {
        self.tags
            .clone()
            .unwrap_or_else(|| vec![crate::reference::DEFAULT_TAG.to_string()])
    }
}

/// `target.ecr:` section.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EcrSettings {
    /// Optional: region (beaten by --region; default: the repository host's, or the AWS
    /// config's).
    pub region: Option<String>,
    /// Optional: AWS account id, when `repository` is a bare name.
    pub account: Option<String>,
    /// Optional: create the repository when it is missing (default false).
    #[schemars(schema_with = "schema::bool_or_variable")]
    pub create_repository: Option<bool>,
    /// Optional: scan on push (on create).
    #[schemars(schema_with = "schema::bool_or_variable")]
    pub scan_on_push: Option<bool>,
    /// Optional: MUTABLE, IMMUTABLE, IMMUTABLE_WITH_EXCLUSION or MUTABLE_WITH_EXCLUSION
    /// (on create).
    pub tag_immutability: Option<String>,
    /// Optional: wildcard filters of the tags exempt from `tag_immutability` (on create, with
    /// the `*_WITH_EXCLUSION` settings; default ["sha256-*"], cosign's signature and SBOM tags).
    pub tag_immutability_exclusion_filters: Option<Vec<String>>,
    /// Optional: AES256 or KMS (on create).
    pub encryption: Option<String>,
    /// Optional: KMS key for `encryption: KMS`.
    pub kms_key: Option<String>,
    /// Optional: lifecycle policy JSON file, relative to image.yaml.
    pub lifecycle_policy: Option<PathBuf>,
}

/// The exclusion filter that exempts cosign's attachment tags (`sha256-<hex>.sig`, `.sbom`).
pub const ATTACHMENT_TAG_FILTER: &str = "sha256-*";

impl EcrSettings {
    /// Whether a missing repository is created.
    pub fn creates_repository(&self) -> bool {
        self.create_repository == Some(true)
    }

    /// The exclusion filters applied on create: the given ones, else `sha256-*` with a
    /// `*_WITH_EXCLUSION` mutability, else none.
    pub fn exclusion_filters(&self) -> Vec<String> {
        match (
            &self.tag_immutability_exclusion_filters,
            self.tag_immutability.as_deref(),
        ) {
            (Some(f), _) => f.clone(),
            (None, Some(m)) if m.ends_with("_WITH_EXCLUSION") => {
                vec![ATTACHMENT_TAG_FILTER.to_string()]
            }
            _ => Vec::new(),
        }
    }
}

impl ImageSpec {
    /// The tag used in the local layout: the first target tag that uses no output (known
    /// before the build, so that `wpimg push` finds the image), else `latest`.
    pub fn local_tag(&self) -> String {
        self.target
            .as_ref()
            .and_then(|t| {
                t.tags()
                    .into_iter()
                    .find(|t| !crate::outputs::uses_outputs(t))
            })
            .unwrap_or_else(|| crate::reference::DEFAULT_TAG.to_string())
    }

    /// `NAME:TAG` as stored in the local layout.
    pub fn local_ref(&self) -> String {
        format!("{}:{}", self.name, self.local_tag())
    }

    /// The platforms of a multi-platform build (`platforms:`); `None` for a single image.
    pub fn index_platforms(&self) -> Option<Vec<crate::oci::Platform>> {
        let list = self.platforms.as_ref()?;
        Some(
            list.iter()
                .filter_map(|p| crate::oci::Platform::parse(p))
                .collect(),
        )
    }

    /// The `image:` settings (empty when absent).
    pub fn image_settings(&self) -> ImageSettings {
        self.image.clone().unwrap_or_default()
    }

    /// The format of the SBOM attached to the built image; `None` with `sbom: false`.
    pub fn sbom_format(&self) -> Option<crate::sbom::Format> {
        self.sbom.clone().unwrap_or_default().attached_format()
    }

    /// The `layer:` settings (defaults when absent).
    pub fn layer_settings(&self) -> LayerSettings {
        self.layer.clone().unwrap_or_default()
    }

    /// `value` of the key at `path`, or `<redacted>` when it is secret.
    pub fn shown<'v>(&self, path: &KeyPath, value: &'v str) -> &'v str {
        if self.source.secret.contains(path) {
            REDACTED
        } else {
            value
        }
    }

    /// The spec as JSON with every secret value replaced by `<redacted>`.
    pub fn redacted_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        for path in &self.source.secret {
            if let Some(slot) = path.in_json(&mut v) {
                *slot = REDACTED.into();
            }
        }
        v
    }
}

/// The JSON Schema of image.yaml (draft 7, as YAML language servers read it).
pub fn json_schema() -> serde_json::Value {
    let schema = schemars::generate::SchemaSettings::draft07()
        .into_generator()
        .into_root_schema_for::<ImageSpec>();
    serde_json::to_value(schema).unwrap_or_default()
}

/// Schemas of keys that also take a `${VAR}` string.
mod schema {
    use schemars::{json_schema, Schema, SchemaGenerator};

    const VARIABLE: &str = ".*\\$\\{.*";

    /// A boolean, or a string holding a `${VAR}`.
    pub fn bool_or_variable(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "anyOf": [
                { "type": "boolean" },
                { "type": "string", "pattern": VARIABLE },
                { "type": "null" }
            ]
        })
    }

    /// An integer, or a string holding a `${VAR}`.
    pub fn integer_or_variable(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "anyOf": [
                { "type": "integer" },
                { "type": "string", "pattern": VARIABLE },
                { "type": "null" }
            ]
        })
    }
}

/// The directory of an image.yaml (`.` for a bare file name): relative paths resolve against it.
pub fn dir_of(image_yaml: &Path) -> &Path {
    match image_yaml.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

fn invalid(p: Problem) -> SpecError {
    SpecError::Invalid { problems: vec![p] }
}

fn read(path: &Path) -> Result<String, SpecError> {
    fs_err::read_to_string(path).map_err(|e| SpecError::Read {
        path: path.to_path_buf(),
        source: e,
    })
}

/// Variables files (secret), then `--var` pairs (later wins, `--var` last).
fn override_vars(ov: &Overrides) -> Result<Vars, SpecError> {
    let mut out = Vars::new();
    let mut problems = Vec::new();
    for f in &ov.var_files {
        let text = read(f)?;
        let tree = tree::parse_tree(f, &text).map_err(invalid)?;
        let env_only = Vars::new();
        let typing = de::Typing::new(f, &env_only);
        let values: Option<BTreeMap<String, String>> = typing.value(&tree, KeyPath::root());
        for (k, value) in values.unwrap_or_default() {
            out.insert(
                k,
                Var {
                    value,
                    secret: true,
                },
            );
        }
        problems.extend(typing.finish().problems);
    }
    if !problems.is_empty() {
        return Err(SpecError::Invalid { problems });
    }
    for (k, value) in &ov.vars {
        let var = Var {
            value: value.clone(),
            secret: false,
        };
        out.insert(k.clone(), var);
    }
    Ok(out)
}

/// The `variables:` section (which may use overrides and the environment) under the overrides.
fn variables(file: &Path, tree: &tree::Node, overrides: Vars, problems: &mut Vec<Problem>) -> Vars {
    let mut vars = Vars::new();
    let tree::Val::Map(entries) = &tree.v else {
        return overrides;
    };
    let Some((_, node)) = entries.iter().find(|(k, _)| k.name == "variables") else {
        return overrides;
    };
    let at = KeyPath::root().key("variables");
    let typing = de::Typing::new(file, &overrides);
    let values: Option<BTreeMap<String, String>> = typing.value(node, at.clone());
    let found = typing.finish();
    problems.extend(found.problems);
    for (k, value) in values.unwrap_or_default() {
        let secret = found.secret.contains(&at.key(&k));
        vars.insert(k, Var { value, secret });
    }
    if let tree::Val::Map(defined) = &node.v {
        for (k, _) in defined
            .iter()
            .filter(|(k, _)| !vars::valid_var_name(&k.name))
        {
            problems.push(Problem {
                file: file.to_path_buf(),
                line: k.line,
                column: k.col,
                key: at.key(&k.name).to_string(),
                message: "invalid variable name (letters, digits, _)".into(),
            });
        }
    }
    vars.extend(overrides);
    vars
}

/// Load, interpolate and validate an image.yaml, reporting every problem at once.
pub fn load(path: &Path, ov: &Overrides) -> Result<ImageSpec, SpecError> {
    let text = read(path)?;
    let dir = dir_of(path).to_path_buf();
    let tree = tree::parse_tree(path, &text).map_err(invalid)?;
    let mut problems = Vec::new();
    let vars = variables(path, &tree, override_vars(ov)?, &mut problems);

    let typing = de::Typing::new(path, &vars).quiet(KeyPath::root().key("variables"));
    let spec: Option<ImageSpec> = typing.value(&tree, KeyPath::root());
    let found = typing.finish();
    problems.extend(found.problems);
    let document_ok = !problems.iter().any(|p| p.key.is_empty());
    let Some(mut spec) = spec.filter(|_| document_ok) else {
        problems.sort_by_key(|p| (p.line, p.column));
        return Err(SpecError::Invalid { problems });
    };

    let mut secret = found.secret;
    let at = KeyPath::root().key("variables");
    secret.extend(
        vars.iter()
            .filter(|(_, v)| v.secret)
            .map(|(k, _)| at.key(k)),
    );
    spec.variables = Some(vars.into_iter().map(|(k, v)| (k, v.value)).collect());
    spec.source = SpecSource {
        path: path.to_path_buf(),
        dir: dir.clone(),
        raw: text,
        secret,
        outputs: found.outputs,
        ..Default::default()
    };
    let mut checks = validate::Checks::new(path, &found.locations, &mut problems);
    validate::check(&mut spec, &dir, &mut checks);
    problems.sort_by_key(|p| (p.line, p.column));
    if problems.is_empty() {
        Ok(spec)
    } else {
        Err(SpecError::Invalid { problems })
    }
}

#[cfg(test)]
mod tests;
