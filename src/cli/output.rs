//! Output: JSON lines on stdout with `--json`, else human lines (and progress bars on a
//! terminal) on stderr. The only place that prints.

use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex};

use super::args::GlobalArgs;
use crate::events::{Event, Reporter, SharedReporter};

/// Output renderer: JSON lines on stdout, or human lines on stderr.
pub struct Output {
    json: bool,
    quiet: bool,
    verbose: bool,
    color: bool,
    lock: Mutex<()>,
    /// Progress bars on a terminal.
    bars: Option<indicatif::MultiProgress>,
    active: Mutex<std::collections::HashMap<String, indicatif::ProgressBar>>,
}

impl Output {
    /// A renderer for these flags.
    pub fn new(g: &GlobalArgs) -> Arc<Self> {
        let tty = std::io::stderr().is_terminal();
        let color = tty && std::env::var_os("NO_COLOR").is_none();
        let bars = (tty && !g.json && !g.quiet).then(indicatif::MultiProgress::new);
        Arc::new(Self {
            json: g.json,
            quiet: g.quiet,
            verbose: g.verbose,
            color,
            lock: Mutex::new(()),
            bars,
            active: Mutex::new(Default::default()),
        })
    }

    fn json_line(&self, v: &serde_json::Value) {
        let _g = self.lock.lock();
        let mut out = std::io::stdout().lock();
        let _ = serde_json::to_writer(&mut out, v);
        let _ = out.write_all(b"\n");
        let _ = out.flush();
    }

    /// A human line on stderr (suppressed by -q and in --json mode).
    pub fn say(&self, line: &str) {
        if self.quiet || self.json {
            return;
        }
        if let Some(b) = &self.bars {
            let _ = b.println(line);
            return;
        }
        let _g = self.lock.lock();
        // A closed stderr (the reader went away) must not turn into a panic.
        let _ = writeln!(std::io::stderr().lock(), "{line}");
    }

    fn bold(&self, s: &str) -> String {
        if self.color {
            console::style(s).bold().to_string()
        } else {
            s.to_string()
        }
    }

    /// Print the final result (`--json`: one `"event":"result"` line).
    pub fn result(&self, command: &str, v: &impl serde::Serialize) {
        if self.json {
            let mut obj = serde_json::Map::new();
            obj.insert("event".into(), "result".into());
            obj.insert("command".into(), command.into());
            if let Ok(serde_json::Value::Object(m)) = serde_json::to_value(v) {
                obj.extend(m);
            }
            self.json_line(&serde_json::Value::Object(obj));
        }
    }

    /// Whether output is JSON lines.
    pub fn is_json(&self) -> bool {
        self.json
    }

    /// Whether only errors are shown.
    pub fn is_quiet(&self) -> bool {
        self.quiet
    }

    /// Print an error (always shown).
    pub fn error(&self, exit_code: i32, err: &anyhow::Error) {
        if self.json {
            self.json_line(&serde_json::json!({
                "event": "error",
                "exit_code": exit_code,
                "message": format!("{err:#}"),
            }));
        }
        let _g = self.lock.lock();
        let prefix = if self.color {
            console::style("error:").red().bold().to_string()
        } else {
            "error:".to_string()
        };
        let _ = writeln!(std::io::stderr().lock(), "{prefix} {err:#}");
    }
}

impl Reporter for Output {
    fn event(&self, e: Event) {
        if self.json {
            if let Some(v) = e.to_json() {
                self.json_line(&v);
            }
            return;
        }
        match e {
            Event::Platform { platform, event } => self.platform_event(&platform, *event),
            Event::StageStart { stage } => self.say(&self.bold(&format!("==> {stage}"))),
            Event::StageFinish { stage, seconds } => {
                if self.verbose {
                    self.say(&format!("    {stage} done in {seconds:.1}s"))
                }
            }
            Event::Output { source, line } => self.say(&format!("    {source} | {line}")),
            Event::BlobStart {
                digest,
                size,
                direction,
            } => {
                if let (Some(mp), Ok(mut active)) = (&self.bars, self.active.lock()) {
                    let bar = mp.add(indicatif::ProgressBar::new(size));
                    bar.set_style(
                        indicatif::ProgressStyle::with_template(
                            "    {prefix} {bar:30} {bytes}/{total_bytes} {binary_bytes_per_sec}",
                        )
                        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                    );
                    bar.set_prefix(format!("{direction} {}", short(&digest)));
                    active.insert(digest, bar);
                }
            }
            Event::BlobProgress { digest, done } => {
                if let Some(bar) = self
                    .active
                    .lock()
                    .ok()
                    .and_then(|a| a.get(&digest).cloned())
                {
                    bar.set_position(done);
                }
            }
            Event::BlobDone {
                digest,
                size,
                outcome,
            } => {
                let bar = self.active.lock().ok().and_then(|mut a| a.remove(&digest));
                if let Some(bar) = bar {
                    bar.finish_and_clear();
                }
                self.say(&format!(
                    "    {} {:>10} {}",
                    short(&digest),
                    crate::inspect::human_bytes(size),
                    serde_json::to_value(outcome)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_default()
                ));
            }
            Event::StepStart { step } => self.say(&self.bold(&format!("==> step {step}"))),
            Event::CacheMiss { step, reasons } => {
                self.say(&format!("    step {step}: cache miss"));
                for r in reasons {
                    self.say(&format!("      {r}"));
                }
            }
            Event::Note { message } => {
                if self.verbose {
                    self.say(&format!("    {message}"))
                }
            }
            Event::Warning { message } => self.say(&format!("warning: {message}")),
            Event::Removed { kind, name, reason } => {
                self.say(&format!("removed left-over {kind} {name}: {reason}"))
            }
        }
    }
}

impl Output {
    /// A human line of one platform's event: stages and Ansible lines name the platform.
    fn platform_event(&self, platform: &str, e: Event) {
        match e {
            Event::StageStart { stage } => {
                self.say(&self.bold(&format!("==> {stage} [{platform}]")))
            }
            Event::StageFinish { stage, seconds } => {
                if self.verbose {
                    self.say(&format!("    {stage} [{platform}] done in {seconds:.1}s"))
                }
            }
            Event::Output { source, line } => {
                self.say(&format!("    {source} [{platform}] | {line}"))
            }
            Event::Warning { message } => self.say(&format!("warning: [{platform}] {message}")),
            other => self.event(other),
        }
    }
}

/// The one-screen summary of a build.
pub fn build_summary(out: &Output, r: &crate::build::BuildReport) {
    if !r.platforms.is_empty() {
        return index_summary(out, r);
    }
    out.say(&format!(
        "built {} {} ({} layers, {:.1} MB, new layer via {}, cache {})",
        r.reference,
        r.manifest.digest,
        r.layers.len(),
        r.total_size as f64 / 1e6,
        r.layer_path,
        r.cache
    ));
    if r.steps.len() > 1 || r.squashed {
        for s in &r.steps {
            out.say(&format!(
                "  step {:<12} {:<4} {} {:.1}s",
                s.name,
                s.cache.to_string(),
                short(&s.layer.to_string()),
                s.seconds
            ));
        }
    }
    let times: Vec<String> = r
        .stages
        .iter()
        .map(|s| format!("{} {:.1}s", s.stage, s.seconds))
        .collect();
    out.say(&format!("stages: {}", times.join(", ")));
    if !r.outputs.is_empty() {
        let shown: Vec<String> = r.outputs.iter().map(|(k, v)| format!("{k}={v}")).collect();
        out.say(&format!("outputs: {}", shown.join(", ")));
    }
}

/// The summary of a multi-platform build: the index, then a line per platform.
fn index_summary(out: &Output, r: &crate::build::BuildReport) {
    out.say(&format!(
        "built {} {} (index of {} platforms, {:.1} MB, cache {})",
        r.reference,
        r.manifest.digest,
        r.platforms.len(),
        r.total_size as f64 / 1e6,
        r.cache
    ));
    for p in &r.platforms {
        out.say(&format!(
            "  {:<12} {} ({} layers, new layer via {}, cache {}, {:.1}s on {})",
            p.platform,
            p.manifest.digest,
            p.layers.len(),
            p.layer_path,
            p.cache,
            p.seconds,
            p.engine
        ));
    }
    let times: Vec<String> = r
        .stages
        .iter()
        .map(|s| format!("{} {:.1}s", s.stage, s.seconds))
        .collect();
    out.say(&format!("stages: {}", times.join(", ")));
}

/// A verbose note on the engine reached (host, TLS, version).
pub async fn engine_note(engine: &crate::runtime::DockerEngine, rep: &SharedReporter) {
    use crate::runtime::Engine;
    let tls = engine
        .endpoint()
        .tls_cert_dir
        .as_ref()
        .map(|d| format!(" (TLS, certificates from {})", d.display()))
        .unwrap_or_default();
    let message = match engine.info().await {
        Ok(i) => format!(
            "engine {}{tls}: Docker {}, API {}, storage {}",
            engine.host(),
            i.version,
            i.api_version,
            i.storage_driver
        ),
        Err(e) => format!("engine {}{tls}: {e}", engine.host()),
    };
    rep.event(Event::Note { message });
}

fn short(digest: &str) -> &str {
    digest.get(..19).unwrap_or(digest)
}
