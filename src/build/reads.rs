//! What a step's `ansible-playbook` can read, found statically from the playbook's YAML (the
//! files of a step's cache key): the playbook and those it imports, `vars_files`, the roles it
//! names literally (`roles:`, `import_role`/`include_role`, role `meta` dependencies,
//! recursively; a role counts as its whole directory), task files included with literal names,
//! `include_vars` files, `template`/`copy`/`script`/`unarchive` sources outside roles,
//! `group_vars/`, `host_vars/` and plugin directories beside a playbook.
//!
//! Conservative: a name that cannot be resolved statically (templated, a lookup of a file
//! outside a role, a role not found in the project) makes the whole playbook directory count
//! ([`Reads::fallback`] says why). `{{ playbook_dir }}` and `{{ role_path }}` are resolved.

use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};

use crate::spec::tree::{parse_tree, Node, Val};

/// Directory names never read as project content: version control, wpimg's own output.
pub const SKIP_DIRS: &[&str] = &[".git", ".hg", ".svn", ".wpimg", "__pycache__"];

/// Directories Ansible loads by themselves when they are beside a playbook.
const ADJACENT_DIRS: &[&str] = &[
    "group_vars",
    "host_vars",
    "library",
    "module_utils",
    "filter_plugins",
    "lookup_plugins",
    "action_plugins",
    "callback_plugins",
    "connection_plugins",
    "test_plugins",
    "vars_plugins",
    "collections",
];

/// File-reading lookup plugins (and `with_<plugin>` loops) whose names are not resolved here.
const FILE_LOOKUPS: &[&str] = &[
    "file",
    "fileglob",
    "template",
    "first_found",
    "csvfile",
    "ini",
    "unvault",
];

/// What a playbook reads.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Reads {
    /// Files (and symlinks) whose content and mode count.
    pub files: BTreeSet<PathBuf>,
    /// Paths Ansible would look for that do not exist: their appearance changes the key.
    pub absent: BTreeSet<PathBuf>,
    /// Why the whole playbook directory counts (empty: only `files` and `absent`).
    pub fallback: Vec<String>,
    /// What is read from outside the project and not in the key (installed collections).
    pub notes: Vec<String>,
}

/// What is never part of a key: [`SKIP_DIRS`], OCI layouts (directories holding an
/// `oci-layout` file), and given directories.
#[derive(Debug, Clone, Default)]
pub struct Skip {
    /// Directories skipped with everything below them (canonical paths).
    paths: Vec<PathBuf>,
    /// Files never in a key, wherever they are found (canonical paths): `secrets:` files.
    files: Vec<PathBuf>,
}

impl Skip {
    /// Also skip these directories (e.g. the `--oci-dir`, which may not exist yet).
    pub fn new(dirs: &[&Path]) -> Self {
        Self {
            paths: dirs
                .iter()
                .map(|d| std::fs::canonicalize(d).unwrap_or_else(|_| d.to_path_buf()))
                .collect(),
            files: Vec::new(),
        }
    }

    /// Also leave out these files (a secret's value must not change a key).
    pub fn with_files(mut self, files: &[PathBuf]) -> Self {
        self.files = files
            .iter()
            .map(|f| std::fs::canonicalize(f).unwrap_or_else(|_| f.clone()))
            .collect();
        self
    }

    /// Whether `path` is one of the files left out.
    pub fn skips_file(&self, path: &Path) -> bool {
        !self.files.is_empty()
            && self
                .files
                .contains(&std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf()))
    }

    /// Whether the directory entry `path` (named `name`) is skipped.
    pub fn skips(&self, path: &Path, name: &std::ffi::OsStr, is_dir: bool) -> bool {
        SKIP_DIRS.iter().any(|s| name == *s)
            || (is_dir
                && (path.join("oci-layout").is_file()
                    || std::fs::canonicalize(path).is_ok_and(|c| self.paths.contains(&c))))
    }

    /// Every file under `dir` (not following symlinked directories), minus what is skipped.
    pub fn walk(&self, dir: &Path, out: &mut BTreeSet<PathBuf>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            let p = e.path();
            let Ok(ft) = e.file_type() else { continue };
            if self.skips(&p, &e.file_name(), ft.is_dir()) {
                continue;
            }
            if ft.is_dir() {
                self.walk(&p, out);
            } else {
                out.insert(p);
            }
        }
    }
}

/// What `playbook` reads; `skip` is never read.
pub fn analyse(playbook: &Path, skip: &Skip) -> Reads {
    let top = playbook.parent().unwrap_or(Path::new(".")).to_path_buf();
    let mut a = Analysis {
        top: top.clone(),
        playbook_dirs: vec![top],
        skip,
        out: Reads::default(),
        seen: HashSet::new(),
    };
    a.playbook(playbook);
    a.out
}

/// Where a task list is: a playbook or task file outside roles, or inside a role.
#[derive(Clone, Copy)]
enum Ctx<'c> {
    /// Outside roles; `dir` is the directory of the file being read.
    Play { dir: &'c Path },
    /// Inside the role at `role`; `dir` is the directory of the file being read.
    Role { role: &'c Path, dir: &'c Path },
}

impl Ctx<'_> {
    fn dir(&self) -> &Path {
        match self {
            Ctx::Play { dir } | Ctx::Role { dir, .. } => dir,
        }
    }
    fn role(&self) -> Option<&Path> {
        match self {
            Ctx::Play { .. } => None,
            Ctx::Role { role, .. } => Some(role),
        }
    }
}

struct Analysis<'s> {
    /// The top-level playbook's directory (`playbook_dir`).
    top: PathBuf,
    /// Directories of every playbook read (roles are searched beside each).
    playbook_dirs: Vec<PathBuf>,
    skip: &'s Skip,
    out: Reads,
    /// Files and role directories already read.
    seen: HashSet<PathBuf>,
}

/// The value of `key` in a mapping.
fn get<'n>(n: &'n Node, key: &str) -> Option<&'n Node> {
    match &n.v {
        Val::Map(m) => m.iter().find(|(k, _)| k.name == key).map(|(_, v)| v),
        _ => None,
    }
}

fn as_str(n: &Node) -> Option<&str> {
    match &n.v {
        Val::Str(s) => Some(s),
        _ => None,
    }
}

/// `k=v` pairs of a free-form argument string (`name=web tasks_from=x`), and what is left.
fn free_form(s: &str) -> (Vec<(String, String)>, String) {
    let mut kv = Vec::new();
    let mut rest = Vec::new();
    for tok in s.split_whitespace() {
        match tok.split_once('=') {
            Some((k, v)) if !k.is_empty() && k.chars().all(|c| c.is_alphanumeric() || c == '_') => {
                kv.push((k.to_string(), v.trim_matches(['"', '\'']).to_string()))
            }
            _ => rest.push(tok),
        }
    }
    (kv, rest.join(" "))
}

/// An argument of a task: `key` of its mapping, or of its `k=v` string, or (for `raw`) the
/// string itself / `_raw_params`.
fn arg(n: &Node, key: &str, raw: bool) -> Option<String> {
    match &n.v {
        Val::Str(s) => {
            let (kv, rest) = free_form(s);
            kv.into_iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v)
                .or_else(|| (raw && !rest.is_empty()).then_some(rest))
        }
        Val::Map(_) => get(n, key)
            .and_then(as_str)
            .or_else(|| {
                raw.then(|| get(n, "_raw_params").and_then(as_str))
                    .flatten()
            })
            .map(str::to_string),
        _ => None,
    }
}

fn truthy(n: &Node, key: &str) -> bool {
    match get(n, key).map(|v| &v.v) {
        Some(Val::Bool(b)) => *b,
        Some(Val::Str(s)) => matches!(s.to_ascii_lowercase().as_str(), "yes" | "true" | "1"),
        _ => match &n.v {
            Val::Str(s) => free_form(s)
                .0
                .iter()
                .any(|(k, v)| k == key && matches!(v.as_str(), "yes" | "true" | "1")),
            _ => false,
        },
    }
}

/// A module name without `ansible.builtin.`/`ansible.legacy.`.
fn short(module: &str) -> &str {
    module
        .strip_prefix("ansible.builtin.")
        .or_else(|| module.strip_prefix("ansible.legacy."))
        .unwrap_or(module)
}

fn shown(p: &Path) -> String {
    p.display().to_string()
}

impl Analysis<'_> {
    fn fallback(&mut self, why: String) {
        if !self.out.fallback.contains(&why) {
            self.out.fallback.push(why);
        }
    }

    fn add_file(&mut self, p: &Path) {
        if let Some(name) = p.file_name() {
            if !self.skip.skips(p, name, false) {
                self.out.files.insert(p.to_path_buf());
            }
        }
    }

    fn add_dir(&mut self, d: &Path) {
        self.skip.walk(d, &mut self.out.files);
    }

    /// `s` with `{{ playbook_dir }}` and `{{ role_path }}` resolved, or `None` when templated.
    fn literal(&self, s: &str, ctx: Ctx<'_>) -> Option<String> {
        let mut out = s.to_string();
        let mut known = vec![("playbook_dir", self.top.display().to_string())];
        if let Some(r) = ctx.role() {
            known.push(("role_path", r.display().to_string()));
        }
        for (var, value) in known {
            for pat in [
                format!("{{{{ {var} }}}}"),
                format!("{{{{{var}}}}}"),
                format!("{{{{ {var}}}}}"),
                format!("{{{{{var} }}}}"),
            ] {
                out = out.replace(&pat, &value);
            }
        }
        (!out.contains("{{") && !out.contains("{%")).then_some(out)
    }

    /// The first existing candidate (added, with directories walked), else the first one as
    /// absent. Returns the existing one.
    fn first_of(&mut self, candidates: &[PathBuf]) -> Option<PathBuf> {
        match candidates.iter().find(|c| c.exists()) {
            Some(found) => {
                if found.is_dir() {
                    self.add_dir(found);
                } else {
                    self.add_file(found);
                }
                Some(found.clone())
            }
            None => {
                if let Some(first) = candidates.first() {
                    self.out.absent.insert(first.clone());
                }
                None
            }
        }
    }

    fn parse(&mut self, path: &Path) -> Option<Node> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) => {
                self.fallback(format!("cannot read {}: {e}", shown(path)));
                return None;
            }
        };
        match parse_tree(path, &text) {
            Ok(n) => Some(n),
            Err(p) => {
                self.fallback(format!("cannot parse {}: {}", shown(path), p.message));
                None
            }
        }
    }

    fn playbook(&mut self, path: &Path) {
        if !self.seen.insert(path.to_path_buf()) {
            return;
        }
        self.add_file(path);
        let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        if !self.playbook_dirs.contains(&dir) {
            self.playbook_dirs.push(dir.clone());
        }
        for d in ADJACENT_DIRS {
            let p = dir.join(d);
            if p.is_dir() {
                self.add_dir(&p);
            } else {
                self.out.absent.insert(p);
            }
        }
        let Some(doc) = self.parse(path) else { return };
        let plays = match &doc.v {
            Val::Seq(plays) => plays.clone(),
            Val::Null => Vec::new(),
            _ => {
                self.fallback(format!("{} is not a list of plays", shown(path)));
                return;
            }
        };
        let ctx = Ctx::Play { dir: &dir };
        for play in &plays {
            self.play(play, path, ctx);
        }
    }

    fn play(&mut self, play: &Node, path: &Path, ctx: Ctx<'_>) {
        for key in [
            "import_playbook",
            "ansible.builtin.import_playbook",
            "include",
        ] {
            if let Some(v) = get(play, key) {
                let raw = as_str(v).map(str::to_string).unwrap_or_default();
                match self.literal(&raw, ctx) {
                    Some(name) => {
                        let p = ctx.dir().join(name);
                        match p.is_file() {
                            true => self.playbook(&p),
                            false => {
                                self.out.absent.insert(p);
                            }
                        }
                    }
                    None => self.fallback(format!(
                        "{}: import_playbook {raw:?} is templated",
                        shown(path)
                    )),
                }
            }
        }
        if let Some(vf) = get(play, "vars_files") {
            self.vars_files(vf, path, ctx);
        }
        if let Some(Val::Seq(roles)) = get(play, "roles").map(|r| &r.v) {
            for r in roles {
                let name = match &r.v {
                    Val::Str(s) => Some(s.clone()),
                    Val::Map(_) => get(r, "role")
                        .or_else(|| get(r, "name"))
                        .and_then(as_str)
                        .map(str::to_string),
                    _ => None,
                };
                self.role_named(name.as_deref().unwrap_or(""), path, ctx);
            }
        }
        for key in ["pre_tasks", "tasks", "post_tasks", "handlers"] {
            if let Some(list) = get(play, key) {
                self.tasks(list, path, ctx);
            }
        }
    }

    fn vars_files(&mut self, vf: &Node, path: &Path, ctx: Ctx<'_>) {
        let Val::Seq(items) = &vf.v else {
            return self.fallback(format!("{}: vars_files is not a list", shown(path)));
        };
        for item in items {
            // A list item is a list of alternatives (the first that exists).
            let names: Vec<&Node> = match &item.v {
                Val::Seq(alts) => alts.iter().collect(),
                _ => vec![item],
            };
            for n in names {
                let raw = as_str(n).unwrap_or("");
                match self.literal(raw, ctx) {
                    Some(name) => {
                        self.first_of(&[ctx.dir().join(&name)]);
                    }
                    None => self.fallback(format!(
                        "{}: vars_files entry {raw:?} is templated",
                        shown(path)
                    )),
                }
            }
        }
    }

    fn tasks(&mut self, list: &Node, path: &Path, ctx: Ctx<'_>) {
        let items = match &list.v {
            Val::Seq(items) => items,
            Val::Null => return,
            _ => return self.fallback(format!("{}: a task list is not a list", shown(path))),
        };
        for task in items {
            let Val::Map(entries) = &task.v else { continue };
            for block in ["block", "rescue", "always"] {
                if let Some(inner) = get(task, block) {
                    self.tasks(inner, path, ctx);
                }
            }
            for (k, v) in entries {
                if let Some(loop_name) = k.name.strip_prefix("with_") {
                    if FILE_LOOKUPS.contains(&loop_name) && ctx.role().is_none() {
                        self.fallback(format!(
                            "{}: with_{loop_name} reads files by name",
                            shown(path)
                        ));
                    }
                }
                match k.name.as_str() {
                    "action" | "local_action" => self.free_action(v, path, ctx),
                    name => self.action(short(name), v, path, ctx),
                }
            }
            if ctx.role().is_none() && reads_files_by_lookup(task) {
                self.fallback(format!("{}: a lookup reads files by name", shown(path)));
            }
        }
    }

    /// `action: module args` / `local_action: module args` (or their mapping forms).
    fn free_action(&mut self, v: &Node, path: &Path, ctx: Ctx<'_>) {
        match &v.v {
            Val::Str(s) => {
                let (module, args) = s.split_once(char::is_whitespace).unwrap_or((s, ""));
                let args = Node {
                    line: v.line,
                    col: v.col,
                    v: Val::Str(args.to_string()),
                };
                self.action(short(module), &args, path, ctx);
            }
            Val::Map(_) => {
                if let Some(module) = get(v, "module").and_then(as_str) {
                    self.action(short(module), v, path, ctx);
                }
            }
            _ => {}
        }
    }

    fn action(&mut self, module: &str, args: &Node, path: &Path, ctx: Ctx<'_>) {
        match module {
            "include_tasks" | "import_tasks" | "include" => {
                let name = arg(args, "file", true).unwrap_or_default();
                self.task_file(&name, module, path, ctx);
            }
            "include_role" | "import_role" => {
                let name = arg(args, "name", false).unwrap_or_default();
                self.role_named(&name, path, ctx);
            }
            "include_vars" => {
                let (name, is_dir) = match arg(args, "dir", false) {
                    Some(d) => (d, true),
                    None => (arg(args, "file", true).unwrap_or_default(), false),
                };
                self.vars(&name, is_dir, path, ctx);
            }
            "template" | "copy" | "script" | "unarchive" => {
                let src = match module {
                    "script" => arg(args, "cmd", true),
                    _ => arg(args, "src", false),
                };
                let remote = truthy(args, "remote_src");
                if let Some(src) = src.filter(|_| !remote) {
                    self.source(module, &src, path, ctx);
                }
            }
            _ => {}
        }
    }

    fn task_file(&mut self, raw: &str, module: &str, path: &Path, ctx: Ctx<'_>) {
        let Some(name) = self.literal(raw, ctx) else {
            return self.fallback(format!("{}: {module} {raw:?} is templated", shown(path)));
        };
        let mut candidates = vec![ctx.dir().join(&name)];
        match ctx.role() {
            Some(role) => candidates.push(role.join("tasks").join(&name)),
            None => candidates.push(self.top.join(&name)),
        }
        if let Some(found) = self.first_of(&candidates) {
            if found.is_file() && self.seen.insert(found.clone()) {
                if let Some(doc) = self.parse(&found) {
                    let dir = found.parent().unwrap_or(Path::new(".")).to_path_buf();
                    let inner = match ctx {
                        Ctx::Play { .. } => Ctx::Play { dir: &dir },
                        Ctx::Role { role, .. } => Ctx::Role { role, dir: &dir },
                    };
                    self.tasks(&doc, &found, inner);
                }
            }
        }
    }

    fn vars(&mut self, raw: &str, is_dir: bool, path: &Path, ctx: Ctx<'_>) {
        let Some(name) = self.literal(raw, ctx) else {
            return self.fallback(format!(
                "{}: include_vars {raw:?} is templated",
                shown(path)
            ));
        };
        let base = ctx.role().unwrap_or(ctx.dir()).to_path_buf();
        let mut candidates = vec![base.join("vars").join(&name), base.join(&name)];
        if ctx.role().is_some() {
            candidates.push(ctx.dir().join(&name));
        }
        candidates.push(self.top.join("vars").join(&name));
        candidates.push(self.top.join(&name));
        if is_dir {
            candidates.retain(|c| !c.is_file());
        }
        self.first_of(&candidates);
    }

    /// A `template`/`copy`/`script`/`unarchive` source: the role's `templates/` or `files/`,
    /// then beside the file, then beside the playbook.
    fn source(&mut self, module: &str, raw: &str, path: &Path, ctx: Ctx<'_>) {
        let Some(name) = self.literal(raw, ctx) else {
            if ctx.role().is_none() {
                self.fallback(format!(
                    "{}: {module} src {raw:?} is templated",
                    shown(path)
                ));
            }
            // Inside a role: the role's directory is in the key.
            return;
        };
        let sub = if module == "template" {
            "templates"
        } else {
            "files"
        };
        let mut candidates = Vec::new();
        if let Some(role) = ctx.role() {
            candidates.extend([role.join(sub).join(&name), role.join(&name)]);
        }
        candidates.extend([ctx.dir().join(sub).join(&name), ctx.dir().join(&name)]);
        candidates.extend([self.top.join(sub).join(&name), self.top.join(&name)]);
        let in_role = |p: &Path| ctx.role().is_some_and(|r| p.starts_with(r));
        let Some(found) = self.first_of(&candidates) else {
            return;
        };
        if module == "template" && !in_role(&found) && includes_templates(&found) {
            self.fallback(format!(
                "{}: template {} includes other templates",
                shown(path),
                shown(&found)
            ));
        }
    }

    fn role_named(&mut self, raw: &str, path: &Path, ctx: Ctx<'_>) {
        let Some(name) = self.literal(raw, ctx).filter(|n| !n.is_empty()) else {
            return self.fallback(format!(
                "{}: role name {raw:?} is templated or missing",
                shown(path)
            ));
        };
        let mut candidates = Vec::new();
        let parts: Vec<&str> = name.split('.').collect();
        let path_like = name.contains('/') || name.starts_with('.');
        if !path_like && parts.len() >= 3 {
            let (ns, coll, role) = (parts[0], parts[1], parts[2..].join("."));
            let dir = self
                .top
                .join("collections/ansible_collections")
                .join(ns)
                .join(coll)
                .join("roles")
                .join(role);
            if dir.is_dir() {
                return self.role_dir(&dir);
            }
            let note = format!("role {name} comes from an installed collection: not in the key");
            if !self.out.notes.contains(&note) {
                self.out.notes.push(note);
            }
            return;
        }
        if path_like {
            candidates.extend([ctx.dir().join(&name), self.top.join(&name)]);
        } else {
            if let Some(role) = ctx.role() {
                candidates.push(role.join("roles").join(&name));
                if let Some(parent) = role.parent() {
                    candidates.push(parent.join(&name));
                }
            }
            for d in &self.playbook_dirs {
                candidates.extend([d.join("roles").join(&name), d.join(&name)]);
            }
        }
        match candidates.into_iter().find(|c| c.is_dir()) {
            Some(dir) => self.role_dir(&dir),
            None => self.fallback(format!(
                "{}: role {name:?} is not in the project (looked in roles/ beside the playbook)",
                shown(path)
            )),
        }
    }

    /// A role: its whole directory, its meta dependencies, and every task file in it.
    fn role_dir(&mut self, dir: &Path) {
        if !self.seen.insert(dir.to_path_buf()) {
            return;
        }
        self.add_dir(dir);
        for meta in ["meta/main.yml", "meta/main.yaml", "meta/main"] {
            let p = dir.join(meta);
            if !p.is_file() {
                continue;
            }
            let Some(doc) = self.parse(&p) else { continue };
            if let Some(Val::Seq(deps)) = get(&doc, "dependencies").map(|d| &d.v) {
                let meta_dir = dir.join("meta");
                let ctx = Ctx::Role {
                    role: dir,
                    dir: &meta_dir,
                };
                for d in deps {
                    let name = match &d.v {
                        Val::Str(s) => Some(s.clone()),
                        Val::Map(_) => get(d, "role")
                            .or_else(|| get(d, "name"))
                            .and_then(as_str)
                            .map(str::to_string),
                        _ => None,
                    };
                    self.role_named(name.as_deref().unwrap_or(""), &p, ctx);
                }
            }
            break;
        }
        for sub in ["tasks", "handlers"] {
            let mut files = BTreeSet::new();
            self.skip.walk(&dir.join(sub), &mut files);
            for f in files {
                let yaml = f.extension().is_some_and(|e| e == "yml" || e == "yaml")
                    || f.file_name().is_some_and(|n| n == "main");
                if !yaml || !self.seen.insert(f.clone()) {
                    continue;
                }
                let Some(doc) = self.parse(&f) else { continue };
                let fdir = f.parent().unwrap_or(dir).to_path_buf();
                self.tasks(
                    &doc,
                    &f,
                    Ctx::Role {
                        role: dir,
                        dir: &fdir,
                    },
                );
            }
        }
    }
}

/// Whether any string of a task calls a file-reading lookup (`lookup('file', ...)`,
/// `query('fileglob', ...)`, `q(...)`).
fn reads_files_by_lookup(task: &Node) -> bool {
    fn strings<'n>(n: &'n Node, out: &mut Vec<&'n str>) {
        match &n.v {
            Val::Str(s) => out.push(s),
            Val::Seq(items) => items.iter().for_each(|i| strings(i, out)),
            Val::Map(m) => m.iter().for_each(|(_, v)| strings(v, out)),
            _ => {}
        }
    }
    let mut all = Vec::new();
    strings(task, &mut all);
    all.iter().any(|s| {
        ["lookup(", "query(", "q("].iter().any(|call| {
            s.match_indices(call).any(|(i, _)| {
                let before = s[..i].chars().last();
                let word_start = before.is_none_or(|c| !(c.is_alphanumeric() || c == '_'));
                let rest = s[i + call.len()..].trim_start();
                let plugin = rest
                    .trim_start_matches(['\'', '"'])
                    .split(['\'', '"'])
                    .next()
                    .unwrap_or("");
                let plugin = plugin.rsplit('.').next().unwrap_or(plugin);
                word_start && FILE_LOOKUPS.contains(&plugin)
            })
        })
    })
}

/// Whether a Jinja template pulls in other templates.
fn includes_templates(path: &Path) -> bool {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.split("{%").skip(1).any(|stmt| {
        let word = stmt
            .trim_start_matches(['-', '+'])
            .split_whitespace()
            .next();
        matches!(word, Some("include" | "import" | "from" | "extends"))
    })
}

#[cfg(test)]
mod tests;
