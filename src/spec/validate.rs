//! What types cannot say, section by section: references, tags and repositories (with
//! `reference`'s own checks), files that must exist, ranges that depend on other keys.
//! A key that already has a problem (a wrong type, an undefined variable) is not checked again.

use std::collections::BTreeMap;
use std::path::Path;

use super::{
    Accelerator, ImageSettings, ImageSpec, KeyPath, LayerSettings, Problem, Provision, SbomSetting,
    StepSpec, Target, REDACTED,
};
use crate::reference::{validate_repository, validate_tag, Reference};

/// The checks' output: problems at the location of the key at fault.
pub(crate) struct Checks<'a> {
    file: &'a Path,
    locations: &'a BTreeMap<KeyPath, (u64, u64)>,
    problems: &'a mut Vec<Problem>,
    secret: std::collections::BTreeSet<KeyPath>,
}

impl<'a> Checks<'a> {
    pub fn new(
        file: &'a Path,
        locations: &'a BTreeMap<KeyPath, (u64, u64)>,
        problems: &'a mut Vec<Problem>,
    ) -> Self {
        Self {
            file,
            locations,
            problems,
            secret: Default::default(),
        }
    }

    /// Whether `path` (or a key below it) already has a problem.
    fn has_problem(&self, path: &KeyPath) -> bool {
        let p = path.to_string();
        self.problems.iter().any(|x| {
            x.key == p || x.key.starts_with(&format!("{p}.")) || x.key.starts_with(&format!("{p}["))
        })
    }

    fn bad(&mut self, path: &KeyPath, message: String) {
        self.bad_at(path, path, message)
    }

    /// A problem of `path`, located at `located` (for a key that is not in the document).
    fn bad_at(&mut self, path: &KeyPath, located: &KeyPath, message: String) {
        if self.has_problem(path) {
            return;
        }
        let (line, column) = self.locations.get(located).copied().unwrap_or((0, 0));
        self.problems.push(Problem {
            file: self.file.to_path_buf(),
            line,
            column,
            key: path.to_string(),
            message,
        });
    }

    /// `value` quoted for a message, or `<redacted>` when the key's value is secret.
    fn quote(&self, path: &KeyPath, value: &str) -> String {
        if self.secret.contains(path) {
            REDACTED.to_string()
        } else {
            format!("{value:?}")
        }
    }
}

/// Check a typed spec; resolves its paths against `dir` and normalises its ports.
pub(crate) fn check(spec: &mut ImageSpec, dir: &Path, c: &mut Checks<'_>) {
    c.secret = spec.source.secret.clone();
    let root = KeyPath::root();
    // First: a misplaced output is the problem of its key, whatever else it breaks there.
    outputs_placement(spec, c);
    top_level(spec, c);
    provision(&mut spec.provision, dir, &root.key("provision"), c);
    if let Some(i) = &mut spec.image {
        image(i, &root.key("image"), c);
    }
    if let Some(l) = &spec.layer {
        layer(l, &root.key("layer"), c);
    }
    if let Some(t) = &mut spec.target {
        target(t, dir, &root.key("target"), c);
    }
    if let Some(s) = &spec.sbom {
        sbom(s, &root.key("sbom"), c);
    }
    secrets(spec, dir, &root.key("secrets"), c);
}

/// `${outputs.NAME}` only in the values of `image.labels`, `image.env` and `target.tags`: the
/// only settings used after provisioning.
fn outputs_placement(spec: &ImageSpec, c: &mut Checks<'_>) {
    let allowed = [
        KeyPath::of("image.labels"),
        KeyPath::of("image.env"),
        KeyPath::of("target.tags"),
    ];
    for path in &spec.source.outputs {
        let ok = allowed
            .iter()
            .any(|a| path.starts_with(a) && path.depth() == a.depth() + 1);
        if !ok {
            c.bad(
                path,
                "${outputs.NAME} (a provisioning output) may be used only in the values of \
                 image.labels, image.env and target.tags: they are resolved after provisioning"
                    .into(),
            );
        }
    }
}

fn sbom(s: &SbomSetting, at: &KeyPath, c: &mut Checks<'_>) {
    if let Some(got) = &s.invalid {
        c.bad(
            at,
            format!("expected false, true or a mapping {{ format: spdx-json | cyclonedx-json }}, got {got}"),
        );
    }
    for k in &s.unknown_keys {
        c.bad(
            &at.key(k),
            format!("unknown key {k:?} (expected one of: format)"),
        );
    }
}

fn top_level(spec: &ImageSpec, c: &mut Checks<'_>) {
    let at = KeyPath::root().key("name");
    if let Err(reason) = validate_repository(&spec.name) {
        let msg = format!("invalid image name {}: {reason}", c.quote(&at, &spec.name));
        c.bad(&at, msg);
    }
    let at = KeyPath::root().key("base");
    if let Err(e) = Reference::parse(&spec.base) {
        let msg = format!(
            "unparsable image reference {}: {}",
            c.quote(&at, &spec.base),
            e.reason
        );
        c.bad(&at, msg);
    }
    if let Some(p) = &spec.platform {
        platform(p, &KeyPath::root().key("platform"), c);
    }
    if let Some(list) = &spec.platforms {
        platforms(list, spec.platform.is_some(), c);
    }
}

/// `os/arch[/variant]`, each part lower-case letters, digits or `_`.
fn platform(p: &str, at: &KeyPath, c: &mut Checks<'_>) {
    let part_ok = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    };
    let ok = crate::oci::Platform::parse(p).is_some() && p.split('/').all(part_ok);
    if !ok {
        let msg = format!(
            "invalid platform {}: expected os/arch[/variant], e.g. linux/amd64 or linux/arm64",
            c.quote(at, p)
        );
        c.bad(at, msg);
    }
}

/// `platforms:`: at least one, each valid, none twice, and not with `platform:`.
fn platforms(list: &[String], with_platform: bool, c: &mut Checks<'_>) {
    let at = KeyPath::root().key("platforms");
    if with_platform {
        c.bad(
            &at,
            "platform and platforms are mutually exclusive: use platforms for an index, \
             platform for one image"
                .into(),
        );
    }
    if list.is_empty() {
        c.bad(&at, "at least one platform is needed".into());
    }
    for (i, p) in list.iter().enumerate() {
        let here = at.index(i);
        platform(p, &here, c);
        let key = |q: &str| crate::oci::Platform::parse(q).map(|q| q.to_string());
        if key(p).is_some() && list[..i].iter().any(|q| key(q) == key(p)) {
            let msg = format!("platform {} is listed twice", c.quote(&here, p));
            c.bad(&here, msg);
        }
    }
}

fn provision(p: &mut Provision, dir: &Path, at: &KeyPath, c: &mut Checks<'_>) {
    match (&mut p.playbook, &mut p.steps) {
        (Some(_), Some(_)) => c.bad(
            &at.key("steps"),
            "playbook and steps together: give one playbook, or steps".into(),
        ),
        (None, None) => c.bad_at(
            &at.key("playbook"),
            at,
            "required key \"playbook\" is missing (or give provision.steps)".into(),
        ),
        (Some(pb), None) => playbook(pb, dir, &at.key("playbook"), c),
        (None, Some(steps)) => {
            for key in ["extra_vars", "ansible_args", "inputs"] {
                let given = match key {
                    "extra_vars" => p.extra_vars.is_some(),
                    "ansible_args" => p.ansible_args.is_some(),
                    _ => p.inputs.is_some(),
                };
                if given {
                    c.bad(
                        &at.key(key),
                        format!("only with provision.playbook: with steps, give {key} per step"),
                    );
                }
            }
            step_list(steps, dir, &at.key("steps"), c);
        }
    }
    if let Some(conn) = &p.connection {
        if !matches!(
            conn.as_str(),
            "community.docker.docker" | "community.docker.docker_api" | "docker"
        ) {
            c.bad(
                &at.key("connection"),
                format!("unsupported connection {conn:?}: community.docker.docker_api, community.docker.docker or docker"),
            );
        }
    }
    if p.accelerator() == Accelerator::Mitogen {
        if let Some(conn) = p
            .connection
            .as_deref()
            .filter(|c| c.ends_with("docker_api"))
        {
            c.bad(
                &at.key("connection"),
                format!("{conn} cannot be accelerated: Mitogen takes over the `docker` connection (the docker CLI); remove provision.connection or set it to community.docker.docker"),
            );
        }
    }
    env_names(p.env.as_ref(), &at.key("env"), c);
    inputs(p.inputs.as_deref(), &at.key("inputs"), c);
    cache_mounts(p.cache_mounts.as_mut(), &at.key("cache_mounts"), c);
}

/// A playbook path, resolved against image.yaml's directory; it must exist.
fn playbook(pb: &mut std::path::PathBuf, dir: &Path, at: &KeyPath, c: &mut Checks<'_>) {
    let rel = pb.clone();
    *pb = dir.join(&rel);
    if !pb.is_file() {
        let msg = format!("playbook {:?} not found (looked for {})", rel, pb.display());
        c.bad(at, msg);
    }
}

fn step_list(steps: &mut [StepSpec], dir: &Path, at: &KeyPath, c: &mut Checks<'_>) {
    if steps.is_empty() {
        c.bad(at, "at least one step is needed".into());
    }
    let mut seen = std::collections::BTreeSet::new();
    for (i, s) in steps.iter_mut().enumerate() {
        let here = at.index(i);
        let valid = !s.name.is_empty()
            && s.name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !valid {
            let msg = format!(
                "invalid step name {}: lowercase letters, digits and -",
                c.quote(&here.key("name"), &s.name)
            );
            c.bad(&here.key("name"), msg);
        } else if !seen.insert(s.name.clone()) {
            c.bad(
                &here.key("name"),
                format!("step name {:?} is used twice", s.name),
            );
        }
        playbook(&mut s.playbook, dir, &here.key("playbook"), c);
        env_names(s.env.as_ref(), &here.key("env"), c);
        inputs(s.inputs.as_deref(), &here.key("inputs"), c);
    }
}

/// `inputs` globs: relative to image.yaml, inside its directory.
fn inputs(globs: Option<&[String]>, at: &KeyPath, c: &mut Checks<'_>) {
    for (i, g) in globs.into_iter().flatten().enumerate() {
        let here = at.index(i);
        let outside = g.starts_with('/') || g.split('/').any(|part| part == "..");
        let problem = if g.is_empty() {
            Some("empty pattern".to_string())
        } else if outside {
            Some("must be relative to image.yaml and stay inside its directory".to_string())
        } else {
            globset::Glob::new(g).err().map(|e| e.kind().to_string())
        };
        if let Some(why) = problem {
            let msg = format!("pattern {}: {why}", c.quote(&here, g));
            c.bad(&here, msg);
        }
    }
}

/// `cache_mounts`: absolute, normalised (no trailing `/`), not `/`, each once.
fn cache_mounts(paths: Option<&mut Vec<String>>, at: &KeyPath, c: &mut Checks<'_>) {
    let Some(paths) = paths else { return };
    let mut seen = std::collections::BTreeSet::new();
    for (i, p) in paths.iter_mut().enumerate() {
        let here = at.index(i);
        let trimmed = p.trim_end_matches('/').to_string();
        let bad_part = trimmed
            .split('/')
            .skip(1)
            .any(|part| part.is_empty() || part == "." || part == "..");
        if !p.starts_with('/') || trimmed.is_empty() || bad_part {
            let msg = format!(
                "cache mount {} must be an absolute path other than / (no ., .. or //)",
                c.quote(&here, p)
            );
            c.bad(&here, msg);
            continue;
        }
        *p = trimmed;
        if !seen.insert(p.clone()) {
            c.bad(&here, format!("cache mount {p:?} is listed twice"));
        }
    }
}

/// `secrets:`: valid variable names not used by `provision.extra_vars`, each with exactly one
/// source; reads the values (a missing variable or file is a problem naming it).
fn secrets(spec: &mut ImageSpec, dir: &Path, at: &KeyPath, c: &mut Checks<'_>) {
    let Some(declared) = spec.secrets.clone() else {
        return;
    };
    let extra_vars = spec.provision.extra_vars.clone().unwrap_or_default();
    for (name, source) in &declared {
        let here = at.key(name);
        if !super::vars::valid_var_name(name) || name.starts_with("ansible_") {
            c.bad(
                &here,
                "invalid secret name: the play reads it as a variable (letters, digits, _; not \
                 starting with a digit or ansible_)"
                    .into(),
            );
            continue;
        }
        if extra_vars.contains_key(name) {
            c.bad(
                &here,
                format!("secret {name:?} is also a key of provision.extra_vars: rename one"),
            );
            continue;
        }
        let value = match (&source.env, &source.file) {
            (Some(var), None) => secret_from_env(var, &here.key("env"), c),
            (None, Some(file)) => {
                let path = dir.join(file);
                spec.source.secret_files.push(path.clone());
                secret_from_file(&path, &here.key("file"), c)
            }
            _ => {
                c.bad(&here, "give exactly one of env: NAME or file: PATH".into());
                None
            }
        };
        if let Some(v) = value {
            spec.source
                .secret_values
                .insert(name.clone(), crate::secrets::SecretValue::new(v));
        }
    }
}

fn secret_from_env(var: &str, at: &KeyPath, c: &mut Checks<'_>) -> Option<String> {
    if var.is_empty() || var.contains(['=', '\0']) {
        c.bad(
            at,
            "invalid environment variable name (empty, or holds = or NUL)".into(),
        );
        return None;
    }
    match std::env::var(var) {
        Ok(v) => Some(v),
        Err(std::env::VarError::NotPresent) => {
            c.bad(at, format!("environment variable {var} is not set"));
            None
        }
        Err(std::env::VarError::NotUnicode(_)) => {
            c.bad(at, format!("environment variable {var} is not UTF-8 text"));
            None
        }
    }
}

fn secret_from_file(path: &Path, at: &KeyPath, c: &mut Checks<'_>) -> Option<String> {
    match std::fs::read(path) {
        Ok(bytes) => match String::from_utf8(bytes) {
            Ok(v) => Some(v),
            Err(_) => {
                c.bad(
                    at,
                    format!("secret file {} is not UTF-8 text", path.display()),
                );
                None
            }
        },
        Err(e) => {
            c.bad(
                at,
                format!("cannot read secret file {}: {e}", path.display()),
            );
            None
        }
    }
}

/// Environment variable names: not empty, no `=` or NUL.
fn env_names(env: Option<&BTreeMap<String, String>>, at: &KeyPath, c: &mut Checks<'_>) {
    for k in env.into_iter().flat_map(|e| e.keys()) {
        if k.is_empty() || k.contains(['=', '\0']) {
            c.bad(
                &at.key(k),
                "invalid environment variable name (empty, or holds = or NUL)".into(),
            );
        }
    }
}

fn image(img: &mut ImageSettings, at: &KeyPath, c: &mut Checks<'_>) {
    env_names(img.env.as_ref(), &at.key("env"), c);
    for (i, port) in img.expose.iter_mut().flatten().enumerate() {
        let here = at.key("expose").index(i);
        match normalise_port(&port.0) {
            Some(p) => port.0 = p,
            None => {
                let msg = format!(
                    "invalid port {}: expected 1-65535 with optional /tcp, /udp or /sctp",
                    c.quote(&here, &port.0)
                );
                c.bad(&here, msg);
            }
        }
    }
    if let Some(w) = &img.workdir {
        if !w.starts_with('/') {
            let here = at.key("workdir");
            let msg = format!("workdir {} must be an absolute path", c.quote(&here, w));
            c.bad(&here, msg);
        }
    }
    for (i, v) in img.volumes.iter().flatten().enumerate() {
        if !v.starts_with('/') {
            let here = at.key("volumes").index(i);
            let msg = format!("volume {} must be an absolute path", c.quote(&here, v));
            c.bad(&here, msg);
        }
    }
    if let Some(s) = &img.stop_signal {
        if !valid_signal(s) {
            let here = at.key("stop_signal");
            let msg = format!(
                "unknown signal {} (e.g. SIGTERM, SIGQUIT, 15)",
                c.quote(&here, s)
            );
            c.bad(&here, msg);
        }
    }
}

fn layer(l: &LayerSettings, at: &KeyPath, c: &mut Checks<'_>) {
    for (i, g) in l.exclude.iter().flatten().enumerate() {
        if let Err(reason) = crate::layer::check_exclude(g) {
            let here = at.key("exclude").index(i);
            let msg = format!("pattern {}: {reason}", c.quote(&here, g));
            c.bad(&here, msg);
        }
    }
    if let Some(level) = l.level {
        let compression = l.compression();
        let range = compression.level_range();
        if !range.contains(&level) {
            c.bad(
                &at.key("level"),
                format!(
                    "level {level} out of range {}..={} for {compression}",
                    range.start(),
                    range.end()
                ),
            );
        }
    }
}

fn target(t: &mut Target, dir: &Path, at: &KeyPath, c: &mut Checks<'_>) {
    let here = at.key("repository");
    let bare_ecr_name = t.ecr.is_some() && !t.repository.contains('/');
    let ok = if bare_ecr_name {
        validate_repository(&t.repository).is_ok()
    } else {
        Reference::parse(&t.repository).is_ok_and(|r| r.tag.is_none() && r.digest.is_none())
    };
    if !ok {
        let msg = format!(
            "invalid repository {}: expected HOST/PATH without tag or digest",
            c.quote(&here, &t.repository)
        );
        c.bad(&here, msg);
    }
    if let Some(tags) = &t.tags {
        if tags.is_empty() {
            c.bad(&at.key("tags"), "at least one tag is needed".into());
        }
        for (i, tag) in tags.iter().enumerate() {
            let here = at.key("tags").index(i);
            // A tag using outputs is checked once they are known; its text around them now.
            let checked = match crate::outputs::uses_outputs(tag) {
                true => with_sample_outputs(tag),
                false => tag.clone(),
            };
            if validate_tag(&checked).is_err() {
                let msg = format!(
                    "invalid tag {}: {}",
                    c.quote(&here, tag),
                    crate::reference::TAG_RULE
                );
                c.bad(&here, msg);
            }
        }
    }
    let Some(e) = &mut t.ecr else { return };
    let at = at.key("ecr");
    if let Some(m) = &e.tag_immutability {
        if !matches!(
            m.as_str(),
            "MUTABLE" | "IMMUTABLE" | "IMMUTABLE_WITH_EXCLUSION" | "MUTABLE_WITH_EXCLUSION"
        ) {
            c.bad(
                &at.key("tag_immutability"),
                format!(
                    "{m:?}: expected MUTABLE, IMMUTABLE, IMMUTABLE_WITH_EXCLUSION or \
                     MUTABLE_WITH_EXCLUSION"
                ),
            );
        }
    }
    exclusion_filters(e, &at, c);
    if let Some(o) = e
        .encryption
        .as_deref()
        .filter(|o| !matches!(*o, "AES256" | "KMS"))
    {
        c.bad(
            &at.key("encryption"),
            format!("{o:?}: expected AES256 or KMS"),
        );
    }
    if e.kms_key.is_some() && e.encryption.as_deref() != Some("KMS") {
        c.bad(&at.key("kms_key"), "kms_key needs encryption: KMS".into());
    }
    if let Some(p) = &mut e.lifecycle_policy {
        *p = dir.join(&*p);
        let here = at.key("lifecycle_policy");
        match fs_err::read(&*p) {
            Err(err) => c.bad(&here, format!("{err}")),
            Ok(b) => {
                if let Err(err) = serde_json::from_slice::<serde_json::Value>(&b) {
                    c.bad(&here, format!("{} is not valid JSON: {err}", p.display()));
                }
            }
        }
    }
}

/// A tag template with every output replaced by `0` (valid anywhere in a tag).
fn with_sample_outputs(tag: &str) -> String {
    let sample: crate::outputs::Outputs = crate::outputs::names(tag)
        .into_iter()
        .map(|n| (n, "0".to_string()))
        .collect();
    let source = crate::outputs::Source::Build;
    crate::outputs::resolve(tag, "", &sample, source).unwrap_or_else(|_| tag.to_string())
}

/// `target.ecr.tag_immutability_exclusion_filters`: ECR's wildcard filters (1 to 5, each 1-128
/// of `A-Za-z0-9._*-`), only with a `*_WITH_EXCLUSION` mutability.
fn exclusion_filters(e: &crate::spec::EcrSettings, at: &KeyPath, c: &mut Checks<'_>) {
    let Some(filters) = &e.tag_immutability_exclusion_filters else {
        return;
    };
    let here = at.key("tag_immutability_exclusion_filters");
    if !e
        .tag_immutability
        .as_deref()
        .is_some_and(|m| m.ends_with("_WITH_EXCLUSION"))
    {
        c.bad(
            &here,
            "exclusion filters need tag_immutability: IMMUTABLE_WITH_EXCLUSION (or \
             MUTABLE_WITH_EXCLUSION)"
                .into(),
        );
    }
    if filters.is_empty() || filters.len() > 5 {
        c.bad(&here, "ECR takes 1 to 5 exclusion filters".into());
    }
    for (i, f) in filters.iter().enumerate() {
        let ok = (1..=128).contains(&f.len())
            && f.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'*' | b'-'));
        if !ok {
            let at = here.index(i);
            let msg = format!(
                "filter {}: 1 to 128 of the characters A-Z a-z 0-9 . _ - and the wildcard *",
                c.quote(&at, f)
            );
            c.bad(&at, msg);
        }
    }
}

/// `80`, `80/TCP` → `80/tcp`; `None` when not a port.
fn normalise_port(s: &str) -> Option<String> {
    let (num, proto) = match s.split_once('/') {
        Some((n, p)) => (n, p.to_ascii_lowercase()),
        None => (s, "tcp".to_string()),
    };
    let n: u16 = num.trim().parse().ok()?;
    (n > 0 && matches!(proto.as_str(), "tcp" | "udp" | "sctp")).then(|| format!("{n}/{proto}"))
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
