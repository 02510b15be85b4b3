//! The command line's types (clap): global options, commands and their flags.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

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
    /// Read variables from a YAML/JSON mapping file (repeatable; its values are never shown).
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
    /// Allow plain HTTP to this registry host when it does not speak TLS (repeatable; loopback
    /// always may). TLS, when spoken, is always verified: trust a private CA with --ca-file.
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
    Validate(ValidateArgs),
    /// Push an image of the local layout to a registry (or Amazon ECR).
    Push(PushCmd),
    /// Show an image (layers, sizes, config, history) of the local layout or a registry.
    Inspect(InspectCmd),
    /// Print the SBOM of an image of the local layout or a registry on stdout.
    Sbom(SbomCmd),
    /// Check that an image in a registry has a valid cosign signature by a key.
    Verify(VerifyCmd),
    /// Manage the build cache (`wpimg cache prune`).
    Cache(CacheCmd),
    /// Print the JSON Schema of image.yaml (for editors' YAML language servers).
    Schema,
    /// Remove what dead builds left: their containers and committed images, temp files and
    /// run directories in the layout (every build also does this first).
    Prune(LeftoversArgs),
    /// Print shell completions.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

/// `wpimg cache` subcommands.
#[derive(Debug, Args)]
pub struct CacheCmd {
    /// What to do.
    #[command(subcommand)]
    pub action: CacheAction,
}

/// What `wpimg cache` does.
#[derive(Debug, Subcommand)]
pub enum CacheAction {
    /// Remove the layout's stale cache entries (all but the newest of each step) with the
    /// layers only they used, the image's cache mount volumes and the step images the engine
    /// keeps for it; say how much that freed.
    Prune(PruneArgs),
}

/// `wpimg cache prune` arguments.
#[derive(Debug, Args)]
pub struct PruneArgs {
    /// The image.yaml (its name and default layout).
    #[arg(default_value = "image.yaml")]
    pub image_yaml: PathBuf,
    /// Every cache entry of the layout, and the cache volumes and step images of every image.
    #[arg(long)]
    pub all: bool,
}

/// `wpimg validate` arguments.
#[derive(Debug, Args)]
pub struct ValidateArgs {
    /// The image.yaml.
    #[arg(default_value = "image.yaml")]
    pub image_yaml: PathBuf,
}

/// `wpimg prune` arguments.
#[derive(Debug, Args)]
pub struct LeftoversArgs {
    /// The image.yaml whose layout (`.wpimg/oci` next to it, or --oci-dir) is cleaned too.
    #[arg(default_value = "image.yaml")]
    pub image_yaml: PathBuf,
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

/// `wpimg sbom` arguments.
#[derive(Debug, Args)]
pub struct SbomCmd {
    /// `NAME[:TAG]` of the local layout (see --oci-dir), `oci:DIR[:NAME:TAG]`, or a registry
    /// image `docker://HOST/REPO:TAG` (also `HOST/REPO:TAG` when the layout lacks it).
    pub reference: String,
    /// Document format [default: the stored document's, else spdx-json]; another format than
    /// the stored one is made from the image's layers.
    #[arg(long, value_name = "spdx-json|cyclonedx-json", value_parser = parse_sbom_format)]
    pub format: Option<crate::sbom::Format>,
    /// Platform to pick from an index [default: this machine's].
    #[arg(long, value_name = "OS/ARCH[/VARIANT]", value_parser = parse_platform)]
    pub platform: Option<crate::oci::Platform>,
    /// Registry login and endpoint.
    #[command(flatten)]
    pub login: LoginArgs,
}

/// `wpimg verify` arguments.
#[derive(Debug, Args)]
pub struct VerifyCmd {
    /// The image: `HOST/REPO:TAG`, `HOST/REPO@sha256:...` (or with `docker://`).
    pub reference: String,
    /// PEM public key (cosign.pub, or `openssl pkey -pubout`) the signature must verify with.
    #[arg(
        long,
        value_name = "PUB.pem",
        required_unless_present = "kms",
        conflicts_with = "kms"
    )]
    pub key: Option<PathBuf>,
    /// AWS KMS key whose public key the signature must verify with: awskms:///alias/NAME,
    /// awskms:///KEY-ID or awskms:///arn:aws:kms:REGION:ACCOUNT:key/ID.
    #[arg(long, value_name = "awskms:///KEY")]
    pub kms: Option<String>,
    /// AWS region of a --kms key given by id or alias [default: AWS_REGION or the profile's].
    #[arg(long, requires = "kms")]
    pub region: Option<String>,
    /// AWS profile for --kms [default: AWS_PROFILE or the default chain].
    #[arg(long, requires = "kms")]
    pub profile: Option<String>,
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
    /// name in references stays the same. No credentials in it: use --username.
    #[arg(long, value_name = "URL")]
    pub registry_endpoint: Option<String>,
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
    /// Provisioning accelerator, beating image.yaml's provision.accelerator: mitogen (Mitogen
    /// for Ansible over the `docker` connection) or none [default: image.yaml's, else none].
    #[arg(long, value_enum, value_name = "ACCELERATOR")]
    pub accelerator: Option<crate::provision::Accelerator>,
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
    /// Build PLATFORM (one image.yaml builds) on the Docker engine at DOCKER_HOST_URL
    /// (unix:///PATH or tcp://HOST:PORT; TLS as for DOCKER_HOST: https:// or DOCKER_TLS_VERIFY
    /// with DOCKER_CERT_PATH) instead of DOCKER_HOST's. Repeatable.
    #[arg(long = "engine", value_name = "PLATFORM=DOCKER_HOST_URL")]
    pub engines: Vec<String>,
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
    /// Tag to push (repeatable) [default: with --to, its tag or latest; else target.tags].
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
    /// Sign the pushed image (cosign's format) with this PEM ECDSA P-256 private key (PKCS#8),
    /// or a cosign-generated encrypted key (password from COSIGN_PASSWORD or
    /// --sign-password-stdin).
    #[arg(long, value_name = "FILE", conflicts_with = "sign_kms")]
    pub sign_key: Option<PathBuf>,
    /// Sign the pushed image with an AWS KMS ECC_NIST_P256 key: awskms:///alias/NAME,
    /// awskms:///KEY-ID or awskms:///arn:aws:kms:REGION:ACCOUNT:key/ID.
    #[arg(long, value_name = "awskms:///KEY")]
    pub sign_kms: Option<String>,
    /// Read the password of an encrypted --sign-key from stdin (instead of COSIGN_PASSWORD).
    #[arg(long, requires = "sign_key", conflicts_with = "password_stdin")]
    pub sign_password_stdin: bool,
    /// Exit with code 3 when the scan finds anything at or above this severity
    /// (INFORMATIONAL, LOW, MEDIUM, HIGH, CRITICAL).
    #[arg(long, requires = "wait_scan", value_name = "SEVERITY", value_parser = clap::builder::ValueParser::new(|s: &str| s.parse::<crate::ecr::Severity>()))]
    pub fail_on: Option<crate::ecr::Severity>,
}

fn parse_platform(s: &str) -> Result<crate::oci::Platform, String> {
    crate::oci::Platform::parse(s).ok_or_else(|| format!("{s:?}: expected OS/ARCH[/VARIANT]"))
}

fn parse_sbom_format(s: &str) -> Result<crate::sbom::Format, String> {
    s.parse()
}

fn parse_jobs(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (1..=64).contains(&n) => Ok(n),
        _ => Err(format!("{s:?}: a number from 1 to 64")),
    }
}
