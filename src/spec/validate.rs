//! What types cannot say, section by section: references, tags and repositories (with
//! `reference`'s own checks), files that must exist, ranges that depend on other keys.
//! A key that already has a problem (a wrong type, an undefined variable) is not checked again.

use std::collections::BTreeMap;
use std::path::Path;

use super::{
    Accelerator, ImageSettings, ImageSpec, KeyPath, LayerSettings, Problem, Provision, Target,
    REDACTED,
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
        if self.has_problem(path) {
            return;
        }
        let (line, column) = self.locations.get(path).copied().unwrap_or((0, 0));
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
        let at = KeyPath::root().key("platform");
        if crate::oci::Platform::parse(p).is_none() {
            let msg = format!(
                "invalid platform {}: expected os/arch[/variant], e.g. linux/amd64",
                c.quote(&at, p)
            );
            c.bad(&at, msg);
        }
    }
}

fn provision(p: &mut Provision, dir: &Path, at: &KeyPath, c: &mut Checks<'_>) {
    let rel = p.playbook.clone();
    p.playbook = dir.join(&rel);
    if !p.playbook.is_file() {
        let msg = format!(
            "playbook {:?} not found (looked for {})",
            rel,
            p.playbook.display()
        );
        c.bad(&at.key("playbook"), msg);
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
            if validate_tag(tag).is_err() {
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
        if !matches!(m.as_str(), "MUTABLE" | "IMMUTABLE") {
            c.bad(
                &at.key("tag_immutability"),
                format!("{m:?}: expected MUTABLE or IMMUTABLE"),
            );
        }
    }
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
