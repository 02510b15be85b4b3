//! Command-line types (clap), settings and output. The only module that prints.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use crate::events::{Event, Reporter, SharedReporter};

/// Exit code: success.
pub const EXIT_OK: i32 = 0;
/// Exit code: build, provision, registry or engine failure.
pub const EXIT_FAILURE: i32 = 1;
/// Exit code: bad input (image.yaml, flags, references).
pub const EXIT_BAD_INPUT: i32 = 2;
/// Exit code: interrupted by SIGINT/SIGTERM.
pub const EXIT_INTERRUPTED: i32 = 130;

/// wpimg: build container images from image.yaml with Ansible, push them to any OCI registry or
/// Amazon ECR.
#[derive(Debug, Parser)]
#[command(name = "wpimg", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    /// Global options.
    #[command(flatten)]
    pub global: GlobalArgs,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// Options accepted by every command.
#[derive(Debug, Args, Clone)]
pub struct GlobalArgs {
    /// Local OCI image layout where results live [default: .wpimg/oci next to image.yaml].
    #[arg(long, global = true, value_name = "DIR")]
    pub oci_dir: Option<PathBuf>,
    /// Set a variable (repeatable; beats --var-file, image.yaml and the environment).
    #[arg(long = "var", global = true, value_name = "KEY=VALUE", value_parser = crate::spec::Overrides::parse_var)]
    pub vars: Vec<(String, String)>,
    /// Read variables from a YAML/JSON mapping file (repeatable).
    #[arg(long = "var-file", global = true, value_name = "FILE")]
    pub var_files: Vec<PathBuf>,
    /// Print JSON lines (events, then one `"event":"result"` line) on stdout.
    #[arg(long, global = true)]
    pub json: bool,
    /// Only errors on stderr.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
    /// More detail on stderr.
    #[arg(short, long, global = true)]
    pub verbose: bool,
    /// Allow plain HTTP/unverified TLS for this registry host (repeatable; loopback is always allowed).
    #[arg(long = "insecure-registry", global = true, value_name = "HOST")]
    pub insecure_registries: Vec<String>,
    /// Trust this PEM CA bundle for registry TLS (in addition to the system roots).
    #[arg(long, global = true, value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Build the image described by image.yaml into the local OCI layout.
    Build(BuildArgs),
    /// Check an image.yaml and print every problem.
    Validate {
        /// The image.yaml.
        #[arg(default_value = "image.yaml")]
        image_yaml: PathBuf,
    },
    /// Show an image of the local layout (layers, sizes, config, history).
    Inspect {
        /// `NAME[:TAG]` in the layout.
        reference: String,
    },
    /// Print shell completions.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

/// `wpimg build` flags.
#[derive(Debug, Args)]
pub struct BuildArgs {
    /// The image.yaml.
    #[arg(default_value = "image.yaml")]
    pub image_yaml: PathBuf,
    /// Also load the result into the Docker engine as NAME:TAG.
    #[arg(long)]
    pub load: bool,
    /// Keep the build container when provisioning fails (its name is printed).
    #[arg(long)]
    pub keep_on_error: bool,
    /// How to read the container's changes.
    #[arg(long, value_enum, default_value_t = crate::build::LayerPath::Auto)]
    pub layer_path: crate::build::LayerPath,
    /// Do not reuse a cached layer (the new one is still cached).
    #[arg(long)]
    pub no_cache: bool,
}

/// Output renderer: JSON lines on stdout, or human lines on stderr.
pub struct Output {
    json: bool,
    quiet: bool,
    verbose: bool,
    color: bool,
    lock: Mutex<()>,
}

impl Output {
    /// A renderer for these flags.
    pub fn new(g: &GlobalArgs) -> Arc<Self> {
        let color = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
        Arc::new(Self {
            json: g.json,
            quiet: g.quiet,
            verbose: g.verbose,
            color,
            lock: Mutex::new(()),
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

    /// Print the final result.
    pub fn result(&self, command: &str, v: serde_json::Value) {
        if self.json {
            let mut obj = serde_json::Map::new();
            obj.insert("event".into(), "result".into());
            obj.insert("command".into(), command.into());
            if let serde_json::Value::Object(m) = v {
                obj.extend(m);
            }
            self.json_line(&serde_json::Value::Object(obj));
        }
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
            if !matches!(e, Event::BlobProgress { .. }) {
                if let Ok(v) = serde_json::to_value(&e) {
                    self.json_line(&v);
                }
            }
            return;
        }
        match e {
            Event::StageStart { stage } => self.say(&self.bold(&format!("==> {stage}"))),
            Event::StageFinish { stage, seconds } => {
                if self.verbose {
                    self.say(&format!("    {stage} done in {seconds:.1}s"))
                }
            }
            Event::Output { source, line } => self.say(&format!("    {source} | {line}")),
            Event::BlobStart { .. } | Event::BlobProgress { .. } => {}
            Event::BlobDone {
                digest,
                size,
                outcome,
            } => {
                if self.verbose {
                    self.say(&format!("    {digest} {size} bytes {outcome:?}"))
                }
            }
            Event::Note { message } => {
                if self.verbose {
                    self.say(&format!("    {message}"))
                }
            }
            Event::Warning { message } => self.say(&format!("warning: {message}")),
        }
    }
}

/// An error with the exit code it maps to.
#[derive(Debug)]
pub struct Failure {
    /// Exit code.
    pub code: i32,
    /// The error.
    pub error: anyhow::Error,
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        let error = e.into();
        let code = exit_code_for(&error);
        Self { code, error }
    }
}

fn bad_input(error: anyhow::Error) -> Failure {
    Failure {
        code: EXIT_BAD_INPUT,
        error,
    }
}

/// Map an error chain to an exit code.
pub fn exit_code_for(e: &anyhow::Error) -> i32 {
    for cause in e.chain() {
        if cause.downcast_ref::<crate::spec::SpecError>().is_some() {
            return EXIT_BAD_INPUT;
        }
        if let Some(crate::build::BuildError::Interrupted) = cause.downcast_ref() {
            return EXIT_INTERRUPTED;
        }
        if let Some(crate::build::BuildError::BadReference { .. }) = cause.downcast_ref() {
            return EXIT_BAD_INPUT;
        }
    }
    EXIT_FAILURE
}

fn load_spec(path: &Path, g: &GlobalArgs) -> Result<crate::spec::ImageSpec, Failure> {
    let ov = crate::spec::Overrides {
        vars: g.vars.clone(),
        var_files: g.var_files.clone(),
    };
    crate::spec::load(path, &ov).map_err(|e| bad_input(e.into()))
}

fn oci_dir(g: &GlobalArgs, image_yaml: &Path) -> PathBuf {
    g.oci_dir
        .clone()
        .unwrap_or_else(|| crate::build::default_oci_dir(image_yaml))
}

/// Registry client options from the global flags.
pub fn client(g: &GlobalArgs) -> Result<crate::registry::Client, Failure> {
    let opts = crate::registry::ClientOptions {
        insecure_hosts: g.insecure_registries.clone(),
        ca_file: g.ca_file.clone(),
        ..Default::default()
    };
    crate::registry::Client::new(opts).map_err(|e| bad_input(e.into()))
}

/// Cancellation on SIGINT/SIGTERM.
fn cancel_on_signal() -> tokio_util::sync::CancellationToken {
    let token = tokio_util::sync::CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return,
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = term.recv() => {},
        }
        t.cancel();
    });
    token
}

/// Run a parsed command line; returns the exit code.
pub async fn run(cli: Cli) -> i32 {
    let out = Output::new(&cli.global);
    match dispatch(&cli, &out).await {
        Ok(()) => EXIT_OK,
        Err(f) => {
            out.error(f.code, &f.error);
            f.code
        }
    }
}

async fn dispatch(cli: &Cli, out: &Arc<Output>) -> Result<(), Failure> {
    let g = &cli.global;
    let rep: SharedReporter = out.clone();
    match &cli.command {
        Command::Validate { image_yaml } => {
            let spec = load_spec(image_yaml, g)?;
            out.say(&format!(
                "{}: ok ({} from {})",
                image_yaml.display(),
                spec.local_ref(),
                spec.base
            ));
            out.result(
                "validate",
                serde_json::json!({ "valid": true, "spec": spec }),
            );
            Ok(())
        }
        Command::Build(b) => {
            let spec = load_spec(&b.image_yaml, g)?;
            let engine = crate::runtime::DockerEngine::connect().await?;
            let opts = crate::build::BuildOptions {
                oci_dir: oci_dir(g, &b.image_yaml),
                keep_on_error: b.keep_on_error,
                load: b.load,
                layer_path: b.layer_path,
                client: client(g)?,
                cancel: cancel_on_signal(),
                docker_host: std::env::var("DOCKER_HOST").ok(),
                no_cache: b.no_cache,
            };
            let report = crate::build::build(&spec, &engine, &opts, &rep)
                .await
                .with_context(|| format!("build {}", b.image_yaml.display()))?;
            summary(out, &report);
            out.result("build", serde_json::to_value(&report).unwrap_or_default());
            Ok(())
        }
        Command::Inspect { reference } => {
            let dir = g
                .oci_dir
                .clone()
                .unwrap_or_else(|| PathBuf::from(".wpimg/oci"));
            let v = inspect_local(&dir, reference)?;
            if !g.json {
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            }
            out.result("inspect", v);
            Ok(())
        }
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(*shell, &mut cmd, "wpimg", &mut std::io::stdout());
            Ok(())
        }
    }
}

fn summary(out: &Output, r: &crate::build::BuildReport) {
    out.say(&format!(
        "built {} {} ({} layers, {:.1} MB, new layer via {}, cache {})",
        r.reference,
        r.manifest.digest,
        r.layers.len(),
        r.total_size as f64 / 1e6,
        r.layer_path,
        r.cache
    ));
    let times: Vec<String> = r
        .stages
        .iter()
        .map(|s| format!("{} {:.1}s", s.stage, s.seconds))
        .collect();
    out.say(&format!("stages: {}", times.join(", ")));
}

fn inspect_local(dir: &Path, reference: &str) -> Result<serde_json::Value, Failure> {
    let reference = if reference.contains(':') {
        reference.to_string()
    } else {
        format!("{reference}:latest")
    };
    let layout = crate::layout::Layout::open(dir)
        .with_context(|| format!("open OCI layout {}", dir.display()))?;
    let desc = layout.resolve(&reference)?;
    let manifest_bytes = layout.read_blob(&desc.digest)?;
    let manifest: crate::oci::ImageManifest = serde_json::from_slice(&manifest_bytes)
        .with_context(|| format!("manifest {}", desc.digest))?;
    let config: serde_json::Value =
        serde_json::from_slice(&layout.read_blob(&manifest.config.digest)?)
            .with_context(|| format!("config {}", manifest.config.digest))?;
    Ok(serde_json::json!({
        "reference": reference,
        "digest": desc.digest,
        "manifest": manifest,
        "config": config,
        "total_size": manifest.layers.iter().map(|l| l.size).sum::<u64>(),
    }))
}
