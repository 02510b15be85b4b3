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
/// Exit code: `--fail-on` found scan findings at or above the threshold.
pub const EXIT_FINDINGS: i32 = 3;
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
    /// Fail a registry request when nothing moves for this long (no answer, no byte sent or
    /// read); retried as a temporary failure. An idle timeout: large transfers are not cut.
    #[arg(long, global = true, value_name = "SECONDS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub registry_timeout: u64,
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
    /// Push an image of the local layout to a registry (or Amazon ECR).
    Push(PushCmd),
    /// Show an image (layers, sizes, config, history) of the local layout or a registry.
    Inspect(InspectCmd),
    /// Print shell completions.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

/// `wpimg inspect` arguments.
#[derive(Debug, Args)]
pub struct InspectCmd {
    /// `NAME[:TAG]` of the local layout, `oci:DIR[:NAME:TAG]`, or a registry image
    /// `docker://HOST/REPO:TAG` (also `HOST/REPO:TAG` when the layout lacks it).
    pub reference: String,
    /// Platform to pick from an index [default: this machine's].
    #[arg(long, value_name = "OS/ARCH[/VARIANT]", value_parser = parse_platform)]
    pub platform: Option<crate::oci::Platform>,
    /// Registry login and endpoint.
    #[command(flatten)]
    pub login: LoginArgs,
}

/// Credentials and endpoint for the one registry a command talks to.
#[derive(Debug, Args, Clone)]
pub struct LoginArgs {
    /// Registry user name (password read from stdin with --password-stdin).
    #[arg(long, requires = "password_stdin")]
    pub username: Option<String>,
    /// Read the registry password from stdin.
    #[arg(long, requires = "username")]
    pub password_stdin: bool,
    /// Send the registry's requests to this base URL (mirror or test endpoint); the registry
    /// name in references stays the same.
    #[arg(long, value_name = "URL")]
    pub registry_endpoint: Option<url::Url>,
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
    /// Share the build cache through this registry repository (with --ecr: an ECR repository).
    #[arg(long, value_name = "REPOSITORY")]
    pub cache_repo: Option<String>,
    /// Push the result after building (to target.repository, or --to).
    #[arg(long)]
    pub push: bool,
    /// Write a build manifest (JSON: digests, layers, pushed URIs, timings) to FILE.
    #[arg(long, value_name = "FILE")]
    pub manifest: Option<PathBuf>,
    /// With --push: upload the new layer after it is complete, not while it is compressed.
    #[arg(long)]
    pub no_stream: bool,
    /// Push options (with --push).
    #[command(flatten)]
    pub push_args: PushArgs,
}

/// `wpimg push` arguments.
#[derive(Debug, Args)]
pub struct PushCmd {
    /// The image.yaml whose built image is pushed.
    #[arg(default_value = "image.yaml")]
    pub image_yaml: PathBuf,
    /// Push this image instead: `oci:DIR:NAME:TAG` (any OCI image layout).
    #[arg(long, value_name = "oci:DIR:NAME:TAG")]
    pub from: Option<String>,
    /// Write a push manifest (JSON: digest, pushed URIs, tags, timings) to FILE.
    #[arg(long, value_name = "FILE")]
    pub manifest: Option<PathBuf>,
    /// Push options.
    #[command(flatten)]
    pub push_args: PushArgs,
}

/// Options of a push (shared by `push` and `build --push`).
#[derive(Debug, Args, Clone)]
pub struct PushArgs {
    /// Destination repository `HOST/PATH[:TAG]` [default: target.repository].
    #[arg(long, value_name = "REPOSITORY")]
    pub to: Option<String>,
    /// Tag to push (repeatable) [default: target.tags, else the tag in --to, else latest].
    #[arg(long = "tag", value_name = "TAG")]
    pub tags: Vec<String>,
    /// Concurrent blob uploads.
    #[arg(long, default_value_t = crate::registry::DEFAULT_JOBS, value_parser = parse_jobs)]
    pub jobs: usize,
    /// Chunk size of chunked uploads in bytes (at least 5 MiB).
    #[arg(long, value_name = "BYTES", default_value_t = crate::registry::MIN_CHUNK_SIZE)]
    pub chunk_size: u64,
    /// Use chunked (PATCH) uploads instead of monolithic streaming uploads.
    #[arg(long)]
    pub force_chunked: bool,
    /// Destination registry login and endpoint.
    #[command(flatten)]
    pub login: LoginArgs,
    /// Push to Amazon ECR: credentials from the AWS SDK chain, repository from target.ecr.
    #[arg(long)]
    pub ecr: bool,
    /// AWS region (beats target.ecr.region and the repository host).
    #[arg(long, requires = "ecr")]
    pub region: Option<String>,
    /// AWS profile (default: AWS_PROFILE or the default chain).
    #[arg(long, requires = "ecr")]
    pub profile: Option<String>,
    /// Wait for the ECR image scan and print its findings summary.
    #[arg(long, requires = "ecr")]
    pub wait_scan: bool,
    /// How long --wait-scan waits, in seconds.
    #[arg(long, default_value_t = 900, value_name = "SECONDS")]
    pub scan_timeout: u64,
    /// Exit with code 3 when the scan finds anything at or above this severity
    /// (INFORMATIONAL, LOW, MEDIUM, HIGH, CRITICAL).
    #[arg(long, requires = "wait_scan", value_name = "SEVERITY", value_parser = clap::builder::ValueParser::new(|s: &str| s.parse::<crate::ecr::Severity>()))]
    pub fail_on: Option<crate::ecr::Severity>,
}

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
        if let Some(crate::publish::PublishError::Findings { .. }) = cause.downcast_ref() {
            return EXIT_FINDINGS;
        }
        if let Some(crate::ecr::EcrError::InvalidRepository { .. }) = cause.downcast_ref() {
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

/// Registry client options from the global flags and, for pushes, the push flags.
fn client_options(g: &GlobalArgs, push: Option<&PushArgs>) -> crate::registry::ClientOptions {
    let mut o = crate::registry::ClientOptions {
        insecure_hosts: g.insecure_registries.clone(),
        ca_file: g.ca_file.clone(),
        idle_timeout: std::time::Duration::from_secs(g.registry_timeout),
        ..Default::default()
    };
    if let Some(a) = push {
        o.jobs = a.jobs;
        o.chunk_size = a.chunk_size;
        o.force_chunked = a.force_chunked;
    }
    o
}

/// Add `--registry-endpoint` and `--username`/`--password-stdin` for one registry.
fn with_login(
    mut opts: crate::registry::ClientOptions,
    registry: &str,
    login: &LoginArgs,
) -> Result<crate::registry::ClientOptions, Failure> {
    if let Some(url) = &login.registry_endpoint {
        opts = opts.with_endpoint(registry, url.clone());
    }
    if let (Some(user), true) = (&login.username, login.password_stdin) {
        let mut password = String::new();
        std::io::stdin()
            .read_line(&mut password)
            .context("read the password from stdin")?;
        let password = password.trim_end_matches(['\n', '\r']).to_string();
        if password.is_empty() {
            return Err(bad_input(anyhow::anyhow!(
                "--password-stdin: stdin held no password"
            )));
        }
        opts = opts.with_credential(
            registry,
            crate::auth::Credential::Basic {
                username: user.to_string(),
                password: crate::auth::Secret::new(password),
            },
        );
    }
    Ok(opts)
}

/// `--to`, else `target.repository`.
fn push_repository(
    args: &PushArgs,
    spec: Option<&crate::spec::ImageSpec>,
) -> anyhow::Result<String> {
    match (&args.to, spec.and_then(|s| s.target.as_ref())) {
        (Some(to), _) => Ok(to.clone()),
        (None, Some(t)) => Ok(t.repository.clone()),
        (None, None) => anyhow::bail!(
            "no destination: pass --to REPOSITORY or set target.repository in image.yaml"
        ),
    }
}

/// The registry client of a build (base pull, cache repository) and the cache repository.
async fn build_client(
    g: &GlobalArgs,
    b: &BuildArgs,
    spec: &crate::spec::ImageSpec,
) -> Result<(crate::registry::Client, Option<crate::reference::Reference>), Failure> {
    let mut opts = client_options(g, None);
    let cache_repo = match &b.cache_repo {
        None => None,
        Some(repo) if b.push_args.ecr => {
            let settings = spec
                .target
                .as_ref()
                .and_then(|t| t.ecr.clone())
                .unwrap_or_default();
            let (reference, provider) = crate::publish::ecr_repository_access(
                repo,
                &settings,
                b.push_args.region.as_deref(),
                b.push_args.profile.clone(),
            )
            .await
            .with_context(|| format!("cache repository {repo}"))?;
            opts = opts.with_provider(&reference.registry, provider);
            Some(reference)
        }
        Some(repo) => Some(
            crate::reference::Reference::parse(repo)
                .with_context(|| format!("--cache-repo {repo}"))
                .map_err(bad_input)?,
        ),
    };
    if let Ok(base) = crate::reference::Reference::parse(&spec.base) {
        opts = crate::publish::with_ecr_pull_credentials(
            opts,
            &base.registry,
            b.push_args.profile.clone(),
        );
    }
    let client = crate::registry::Client::new(opts).map_err(|e| bad_input(e.into()))?;
    Ok((client, cache_repo))
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
            engine_note(&engine, &rep).await;
            let (client, cache_repo) = build_client(g, b, &spec).await?;
            // A plain registry push is prepared first so the new layer streams to it while it
            // is compressed (ECR pushes check immutable tags first, so they upload afterwards).
            let target = match (b.push, b.push_args.ecr) {
                (true, false) => Some(registry_push_target(g, &b.push_args, Some(&spec))?),
                _ => None,
            };
            let (tee, stream) = match &target {
                Some((client, dest, _)) if !b.no_stream => {
                    let (w, s) = client.stream_blob(dest, &rep);
                    (crate::layer::Tee::new(w), Some(s))
                }
                _ => (crate::layer::Tee::default(), None),
            };
            let opts = crate::build::BuildOptions {
                oci_dir: oci_dir(g, &b.image_yaml),
                keep_on_error: b.keep_on_error,
                load: b.load,
                layer_path: b.layer_path,
                client,
                cancel: cancel_on_signal(),
                docker_host: engine
                    .endpoint()
                    .from_docker_host
                    .then(|| engine.host().to_string()),
                docker_tls_cert_dir: engine.endpoint().tls_cert_dir.clone(),
                no_cache: b.no_cache,
                cache_repo,
                layer_tee: tee,
            };
            let built = crate::build::build(&spec, &engine, &opts, &rep).await;
            let oci_dir = opts.oci_dir.clone();
            drop(opts); // closes the stream's writer if the layer never took it
            let report = match built {
                Ok(r) => r,
                Err(e) => {
                    if let Some(s) = stream {
                        s.abort();
                    }
                    return Err(anyhow::Error::new(e)
                        .context(format!("build {}", b.image_yaml.display()))
                        .into());
                }
            };
            if let Some(s) = stream {
                match report.layers.iter().rfind(|l| l.new) {
                    Some(l) if report.cache != "hit" => {
                        // On failure the task has said why; the push below uploads the blob.
                        let _ = s.finish(&l.digest, l.size).await;
                    }
                    _ => s.abort(),
                }
            }
            summary(out, &report);
            let mut result = serde_json::to_value(&report).unwrap_or_default();
            if b.push {
                let layout = crate::layout::Layout::open(&oci_dir)?;
                let pushed = match target {
                    Some((client, dest, tags)) => {
                        push_to_registry(&client, &dest, &tags, &layout, &report.manifest, out)
                            .await?
                    }
                    None => {
                        push(g, &b.push_args, Some(&spec), &layout, &report.manifest, out).await?
                    }
                };
                if let serde_json::Value::Object(m) = &mut result {
                    m.insert("image_uri".into(), pushed["image_uri"].clone());
                    m.insert("push".into(), pushed);
                }
            }
            if let Some(path) = &b.manifest {
                write_manifest(path, "build", &b.image_yaml, &result)?;
            }
            out.result("build", result);
            Ok(())
        }
        Command::Push(p) => {
            let (spec, layout, desc) = match &p.from {
                Some(from) => {
                    let (dir, reference) = parse_oci_from(from).map_err(bad_input)?;
                    let layout = crate::layout::Layout::open(&dir)
                        .with_context(|| format!("open OCI layout {}", dir.display()))
                        .map_err(bad_input)?;
                    let desc = match &reference {
                        Some(r) => layout.resolve(r).map_err(|e| bad_input(e.into()))?,
                        None => single_image(&layout).map_err(bad_input)?,
                    };
                    (None, layout, desc)
                }
                None => {
                    let spec = load_spec(&p.image_yaml, g)?;
                    let dir = oci_dir(g, &p.image_yaml);
                    let layout = crate::layout::Layout::open(&dir)
                        .with_context(|| {
                            format!(
                                "no OCI layout at {}: run wpimg build {} first",
                                dir.display(),
                                p.image_yaml.display()
                            )
                        })
                        .map_err(bad_input)?;
                    let desc = layout
                        .resolve(&spec.local_ref())
                        .with_context(|| {
                            format!(
                                "image {} not built yet: run wpimg build first",
                                spec.local_ref()
                            )
                        })
                        .map_err(bad_input)?;
                    (Some(spec), layout, desc)
                }
            };
            let pushed = push(g, &p.push_args, spec.as_ref(), &layout, &desc, out).await?;
            if let Some(path) = &p.manifest {
                write_manifest(path, "push", &p.image_yaml, &pushed)?;
            }
            out.result("push", pushed);
            Ok(())
        }
        Command::Inspect(i) => inspect(g, i, out).await,
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(*shell, &mut cmd, "wpimg", &mut std::io::stdout());
            Ok(())
        }
    }
}

/// `oci:DIR[:REF]` → (DIR, REF).
fn parse_oci_from(s: &str) -> anyhow::Result<(PathBuf, Option<String>)> {
    let rest = s
        .strip_prefix("oci:")
        .ok_or_else(|| anyhow::anyhow!("--from {s:?}: expected oci:DIR:NAME:TAG"))?;
    match rest.split_once(':') {
        Some((dir, r)) if !r.is_empty() => Ok((PathBuf::from(dir), Some(r.to_string()))),
        _ => Ok((PathBuf::from(rest.trim_end_matches(':')), None)),
    }
}

/// The only image of a layout (for `--from oci:DIR`).
fn single_image(layout: &crate::layout::Layout) -> anyhow::Result<crate::oci::Descriptor> {
    let idx = layout.index()?;
    match idx.manifests.as_slice() {
        [one] => Ok(one.clone()),
        [] => anyhow::bail!("OCI layout {} holds no image", layout.dir().display()),
        _ => anyhow::bail!(
            "OCI layout {} holds {} images: name one with oci:DIR:NAME:TAG",
            layout.dir().display(),
            idx.manifests.len()
        ),
    }
}

/// Destination and tags of a push from flags and image.yaml.
pub fn push_destination(
    args: &PushArgs,
    spec: Option<&crate::spec::ImageSpec>,
) -> anyhow::Result<(crate::reference::Reference, Vec<String>)> {
    let target = spec.and_then(|s| s.target.as_ref());
    let dest = crate::reference::Reference::parse(&push_repository(args, spec)?)?;
    let mut tags = args.tags.clone();
    if tags.is_empty() && args.to.is_none() {
        if let Some(t) = target {
            tags = t.tags.clone();
        }
    }
    if tags.is_empty() && dest.tag.is_none() {
        tags.push("latest".into());
    }
    Ok((dest, tags))
}

async fn push(
    g: &GlobalArgs,
    args: &PushArgs,
    spec: Option<&crate::spec::ImageSpec>,
    layout: &crate::layout::Layout,
    desc: &crate::oci::Descriptor,
    out: &Arc<Output>,
) -> Result<serde_json::Value, Failure> {
    if args.ecr {
        return push_ecr(g, args, spec, layout, desc, out).await;
    }
    let (client, dest, tags) = registry_push_target(g, args, spec)?;
    push_to_registry(&client, &dest, &tags, layout, desc, out).await
}

/// Client, destination and tags of a push to a plain registry (not ECR).
fn registry_push_target(
    g: &GlobalArgs,
    args: &PushArgs,
    spec: Option<&crate::spec::ImageSpec>,
) -> Result<
    (
        Arc<crate::registry::Client>,
        crate::reference::Reference,
        Vec<String>,
    ),
    Failure,
> {
    let (dest, tags) = push_destination(args, spec).map_err(bad_input)?;
    let opts = client_options(g, Some(args));
    if args.chunk_size < crate::registry::MIN_CHUNK_SIZE {
        return Err(bad_input(anyhow::anyhow!(
            "--chunk-size {}: at least {} bytes (5 MiB, Amazon ECR's minimum part size)",
            args.chunk_size,
            crate::registry::MIN_CHUNK_SIZE
        )));
    }
    let opts = with_login(opts, &dest.registry, &args.login)?;
    let client = crate::registry::Client::new(opts).map_err(|e| bad_input(e.into()))?;
    Ok((Arc::new(client), dest, tags))
}

async fn push_to_registry(
    client: &crate::registry::Client,
    dest: &crate::reference::Reference,
    tags: &[String],
    layout: &crate::layout::Layout,
    desc: &crate::oci::Descriptor,
    out: &Arc<Output>,
) -> Result<serde_json::Value, Failure> {
    let rep: SharedReporter = out.clone();
    rep.event(Event::StageStart {
        stage: "push".into(),
    });
    let report = client
        .push_image(layout, desc, dest, tags, &rep)
        .await
        .with_context(|| format!("push to {}", dest.repo_path()))?;
    rep.event(Event::StageFinish {
        stage: "push".into(),
        seconds: report.seconds,
    });
    let uri = format!("{}@{}", dest.repo_path(), report.manifest.digest);
    out.say(&format!(
        "pushed {uri} tags [{}]: {} uploaded, {} mounted, {} skipped, {:.1} MB in {:.1}s",
        report.tags.join(", "),
        report.count(crate::events::BlobOutcome::Uploaded),
        report.count(crate::events::BlobOutcome::Mounted),
        report.count(crate::events::BlobOutcome::Skipped),
        report.bytes_uploaded as f64 / 1e6,
        report.seconds
    ));
    let mut v = serde_json::to_value(&report).unwrap_or_default();
    if let serde_json::Value::Object(m) = &mut v {
        m.insert("image_uri".into(), uri.into());
        m.insert("digest".into(), report.manifest.digest.to_string().into());
    }
    Ok(v)
}

async fn push_ecr(
    g: &GlobalArgs,
    args: &PushArgs,
    spec: Option<&crate::spec::ImageSpec>,
    layout: &crate::layout::Layout,
    desc: &crate::oci::Descriptor,
    out: &Arc<Output>,
) -> Result<serde_json::Value, Failure> {
    let target = spec.and_then(|s| s.target.as_ref());
    let repository = push_repository(args, spec).map_err(bad_input)?;
    let mut tags = args.tags.clone();
    if tags.is_empty() {
        tags = target.map(|t| t.tags.clone()).unwrap_or_default();
    }
    if tags.is_empty() {
        tags.push("latest".into());
    }
    let client = client_options(g, Some(args));
    let settings = target.and_then(|t| t.ecr.clone()).unwrap_or_default();
    let opts = crate::publish::EcrPushOptions {
        repository: repository.clone(),
        tags,
        settings,
        region: args.region.clone(),
        profile: args.profile.clone(),
        client,
        registry_endpoint: args.login.registry_endpoint.clone(),
        wait_scan: args
            .wait_scan
            .then(|| std::time::Duration::from_secs(args.scan_timeout)),
        fail_on: args.fail_on,
    };
    let rep: SharedReporter = out.clone();
    rep.event(Event::StageStart {
        stage: "push".into(),
    });
    let started = std::time::Instant::now();
    let report = crate::publish::push_to_ecr(layout, desc, opts, &rep)
        .await
        .with_context(|| format!("push to ECR repository {repository}"))?;
    rep.event(Event::StageFinish {
        stage: "push".into(),
        seconds: started.elapsed().as_secs_f64(),
    });
    out.say(&format!("pushed {}", report.image_uri));
    if let Some(s) = &report.scan {
        out.say(&format!("{s}"));
    }
    let mut v = serde_json::to_value(&report).unwrap_or_default();
    if let serde_json::Value::Object(m) = &mut v {
        m.insert("digest".into(), desc.digest.to_string().into());
    }
    Ok(v)
}

/// The build manifest file (like Packer's manifest post-processor): a stable subset of the
/// result plus provenance.
pub fn manifest_document(
    command: &str,
    git_revision: Option<String>,
    result: &serde_json::Value,
) -> serde_json::Value {
    let pick = |k: &str| result.get(k).cloned().unwrap_or(serde_json::Value::Null);
    let push = if command == "push" {
        result.clone()
    } else {
        pick("push")
    };
    let pushed = if push.is_null() {
        serde_json::json!([])
    } else {
        serde_json::json!([{
            "image_uri": push.get("image_uri").cloned().unwrap_or_default(),
            "repository": push.get("repository").cloned().unwrap_or_default(),
            "tags": push.get("tags").cloned().unwrap_or_default(),
        }])
    };
    serde_json::json!({
        "wpimg_version": env!("CARGO_PKG_VERSION"),
        "command": command,
        "git_revision": git_revision,
        "name": pick("name"),
        "reference": pick("reference"),
        "base": pick("base"),
        "base_digest": pick("base_digest"),
        "manifest_digest": result.pointer("/manifest/digest").cloned().or_else(|| result.get("digest").cloned()).unwrap_or_default(),
        "config_digest": pick("config_digest"),
        "layers": pick("layers"),
        "total_size": pick("total_size"),
        "cache": pick("cache"),
        "stages": pick("stages"),
        "pushed": pushed,
    })
}

fn write_manifest(
    path: &Path,
    command: &str,
    image_yaml: &Path,
    result: &serde_json::Value,
) -> Result<(), Failure> {
    let dir = crate::spec::dir_of(image_yaml);
    let git = std::process::Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["rev-parse", "HEAD"])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    let doc = manifest_document(command, git, result);
    let bytes = serde_json::to_vec_pretty(&doc).unwrap_or_default();
    crate::layout::write_atomic(path, &bytes)
        .with_context(|| format!("write manifest {}", path.display()))?;
    Ok(())
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

/// A verbose note on the engine reached (host, TLS, version).
async fn engine_note(engine: &crate::runtime::DockerEngine, rep: &SharedReporter) {
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

async fn inspect(g: &GlobalArgs, i: &InspectCmd, out: &Arc<Output>) -> Result<(), Failure> {
    use crate::inspect::{InspectError, Target};
    let bad = |e: InspectError| match e {
        InspectError::BadReference(_) => bad_input(e.into()),
        e => Failure::from(e),
    };
    let default_dir = g
        .oci_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(".wpimg/oci"));
    let platform = i
        .platform
        .clone()
        .unwrap_or_else(crate::oci::Platform::host);
    let view = match crate::inspect::resolve_target(&i.reference, &default_dir).map_err(bad)? {
        Target::Layout { dir, reference } => {
            crate::inspect::from_layout(&dir, reference.as_deref(), &platform).map_err(bad)?
        }
        Target::Registry(reference) => {
            let opts = with_login(client_options(g, None), &reference.registry, &i.login)?;
            let client = crate::registry::Client::new(opts).map_err(|e| bad_input(e.into()))?;
            let rep: SharedReporter = out.clone();
            crate::inspect::from_registry(&client, &reference, &platform, &rep)
                .await
                .map_err(bad)?
        }
    };
    if g.json {
        out.result("inspect", serde_json::to_value(&view).unwrap_or_default());
    } else {
        // The view is the product: stdout; -q prints just the digest, for scripts.
        let text = if g.quiet {
            format!("{}\n", view.digest)
        } else {
            crate::inspect::render_human(&view)
        };
        let mut stdout = std::io::stdout().lock();
        let _ = stdout.write_all(text.as_bytes());
        let _ = stdout.flush();
    }
    Ok(())
}

fn parse_platform(s: &str) -> Result<crate::oci::Platform, String> {
    crate::oci::Platform::parse(s).ok_or_else(|| format!("{s:?}: expected OS/ARCH[/VARIANT]"))
}

fn parse_jobs(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (1..=64).contains(&n) => Ok(n),
        _ => Err(format!("{s:?}: a number from 1 to 64")),
    }
}

fn short(digest: &str) -> &str {
    digest.get(..19).unwrap_or(digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_file_shape() {
        let build = serde_json::json!({
            "name": "app", "reference": "app:latest", "base": "b", "base_digest": "sha256:b",
            "manifest": {"digest": "sha256:m"}, "config_digest": "sha256:c",
            "layers": [{"digest": "sha256:l", "size": 1, "media_type": "x", "new": true}],
            "total_size": 1, "cache": "miss", "stages": [{"stage": "pull", "seconds": 1.0}],
            "push": {"image_uri": "r/app@sha256:m", "repository": "app", "tags": ["latest"]},
        });
        let doc = manifest_document("build", Some("abc".into()), &build);
        let keys: Vec<&str> = doc
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            keys,
            [
                "wpimg_version",
                "command",
                "git_revision",
                "name",
                "reference",
                "base",
                "base_digest",
                "manifest_digest",
                "config_digest",
                "layers",
                "total_size",
                "cache",
                "stages",
                "pushed"
            ]
        );
        assert_eq!(doc["manifest_digest"], "sha256:m");
        assert_eq!(doc["pushed"][0]["image_uri"], "r/app@sha256:m");
        assert_eq!(doc["git_revision"], "abc");
        let push = serde_json::json!({"image_uri": "r/app@sha256:m", "digest": "sha256:m", "repository": "app", "tags": ["v1"]});
        let doc = manifest_document("push", None, &push);
        assert_eq!(doc["manifest_digest"], "sha256:m");
        assert_eq!(doc["pushed"][0]["tags"][0], "v1");
    }
}
