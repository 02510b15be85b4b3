//! Settings resolved once from the flags and image.yaml: the spec, the layout directory,
//! registry clients and logins, the push target, cancellation.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;

use super::args::{BuildArgs, GlobalArgs, LoginArgs, PushArgs};
use super::InputError;
use crate::auth::Secret;
use crate::oci::Platform;
use crate::publish::{push_tags, EcrPushOptions, PushTarget, TargetKind};
use crate::reference::Reference;
use crate::registry::{Client, ClientOptions};
use crate::runtime::EngineEndpoint;
use crate::sign::{KmsKeyRef, KmsSigner, PrivateKey, Signer};
use crate::spec::ImageSpec;

/// Load, interpolate and validate an image.yaml with the `--var`/`--var-file` overrides.
pub fn load_spec(g: &GlobalArgs, path: &Path) -> Result<ImageSpec, crate::spec::SpecError> {
    let ov = crate::spec::Overrides {
        vars: g.vars.clone(),
        var_files: g.var_files.clone(),
    };
    crate::spec::load(path, &ov)
}

/// `--accelerator` over image.yaml's `provision.accelerator` (an equal value leaves the spec, and
/// so its cache key, as it is).
pub fn apply_accelerator(spec: &mut ImageSpec, flag: Option<crate::provision::Accelerator>) {
    if let Some(a) = flag.filter(|a| *a != spec.provision.accelerator()) {
        spec.provision.accelerator = Some(a);
    }
}

/// `--oci-dir`, else `.wpimg/oci` next to image.yaml.
pub fn oci_dir(g: &GlobalArgs, image_yaml: &Path) -> PathBuf {
    g.oci_dir
        .clone()
        .unwrap_or_else(|| crate::build::default_oci_dir(image_yaml))
}

/// Registry client options from the global flags and, for pushes, the push flags.
pub fn client_options(
    g: &GlobalArgs,
    push: Option<&PushArgs>,
) -> Result<ClientOptions, InputError> {
    let mut o = ClientOptions {
        insecure_hosts: g.insecure_registries.clone(),
        ca_file: g.ca_file.clone(),
        idle_timeout: std::time::Duration::from_secs(g.registry_timeout),
        ..Default::default()
    };
    if let Some(a) = push {
        if a.chunk_size < crate::registry::MIN_CHUNK_SIZE {
            return Err(InputError::new(format!(
                "--chunk-size {}: at least {} bytes (5 MiB, Amazon ECR's minimum part size)",
                a.chunk_size,
                crate::registry::MIN_CHUNK_SIZE
            )));
        }
        o.jobs = a.jobs;
        o.chunk_size = a.chunk_size;
        o.force_chunked = a.force_chunked;
    }
    Ok(o)
}

/// A registry client (the CA file is read now: a bad one is bad input).
pub fn client(opts: ClientOptions) -> Result<Client, InputError> {
    Client::new(opts).map_err(|e| InputError::caused("registry client", e))
}

/// `--registry-endpoint` as a URL; credentials in it are refused without being shown.
pub fn registry_endpoint(login: &LoginArgs) -> Result<Option<url::Url>, InputError> {
    let Some(raw) = &login.registry_endpoint else {
        return Ok(None);
    };
    let url = url::Url::parse(raw)
        .map_err(|e| InputError::new(format!("--registry-endpoint: not a URL ({e})")))?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err(InputError::new(format!(
            "--registry-endpoint {}: credentials do not belong in the URL (they would show in \
             logs); use --username with --password-stdin",
            crate::reference::url_without_credentials(&url)
        )));
    }
    Ok(Some(url))
}

/// Add `--registry-endpoint` and `--username`/`--password-stdin` for one registry.
pub fn with_login(
    mut opts: ClientOptions,
    registry: &str,
    login: &LoginArgs,
) -> anyhow::Result<ClientOptions> {
    if let Some(url) = registry_endpoint(login)? {
        opts = opts.with_endpoint(registry, url);
    }
    if let (Some(user), true) = (&login.username, login.password_stdin) {
        opts = opts.with_credential(
            registry,
            crate::auth::Credential::Basic {
                username: user.to_string(),
                password: password_from_stdin("--password-stdin")?,
            },
        );
    }
    Ok(opts)
}

/// The first line of stdin as a secret (`flag` names it in errors); empty is refused.
fn password_from_stdin(flag: &str) -> anyhow::Result<Secret> {
    let mut line = zeroize::Zeroizing::new(String::new());
    std::io::stdin()
        .read_line(&mut line)
        .with_context(|| format!("{flag}: read the password from stdin"))?;
    let password = line.trim_end_matches(['\n', '\r']);
    if password.is_empty() {
        return Err(InputError::new(format!("{flag}: stdin held no password")).into());
    }
    Ok(Secret::new(password))
}

/// The signer of a push: `--sign-key` (an encrypted key's password from `--sign-password-stdin`,
/// else `COSIGN_PASSWORD`) or `--sign-kms` (its public key is fetched now, so a missing key or
/// one that cannot make cosign signatures fails before anything is uploaded).
pub async fn signer(args: &PushArgs) -> anyhow::Result<Option<Arc<Signer>>> {
    if let Some(path) = &args.sign_key {
        let password = match args.sign_password_stdin {
            true => Some(password_from_stdin("--sign-password-stdin")?),
            false => std::env::var("COSIGN_PASSWORD").ok().map(Secret::new),
        };
        let key = PrivateKey::load(path, password.as_ref()).context("--sign-key")?;
        return Ok(Some(Arc::new(Signer::Key(key))));
    }
    let Some(reference) = &args.sign_kms else {
        return Ok(None);
    };
    let signer = kms_signer(reference, args.region.clone(), args.profile.clone())
        .await
        .context("--sign-kms")?;
    signer.public_key().await.context("--sign-kms")?;
    Ok(Some(Arc::new(Signer::Kms(signer))))
}

/// An AWS KMS signer for an `awskms://` reference (region: the key ARN's, else `region`, else
/// the SDK configuration's).
pub async fn kms_signer(
    reference: &str,
    region: Option<String>,
    profile: Option<String>,
) -> Result<KmsSigner, crate::sign::SignError> {
    let key: KmsKeyRef = reference.parse()?;
    KmsSigner::new(key, region, profile).await
}

/// `--to` (with its tag split off), else `target.repository`.
fn destination(
    args: &PushArgs,
    spec: Option<&ImageSpec>,
) -> Result<(String, Option<String>), InputError> {
    let Some(to) = &args.to else {
        return match spec.and_then(|s| s.target.as_ref()) {
            Some(t) => Ok((t.repository.clone(), None)),
            None => Err(InputError::new(
                "no destination: pass --to REPOSITORY or set target.repository in image.yaml",
            )),
        };
    };
    let last = to.rsplit('/').next().unwrap_or(to);
    Ok(match last.rsplit_once(':') {
        Some((_, tag)) if !to.contains('@') => (
            to[..to.len() - tag.len() - 1].to_string(),
            Some(tag.to_string()),
        ),
        _ => (to.clone(), None),
    })
}

/// The push target of `push` or `build --push`: a registry, or ECR with `--ecr`.
pub fn push_target(
    g: &GlobalArgs,
    args: &PushArgs,
    spec: Option<&ImageSpec>,
) -> anyhow::Result<PushTarget> {
    let target = spec.and_then(|s| s.target.as_ref());
    let (repository, to_tag) = destination(args, spec)?;
    let tags = push_tags(&args.tags, to_tag.as_deref(), args.to.is_some(), target);
    for t in &tags {
        // image.yaml's tags using outputs were checked at load; they resolve after the build.
        let from_spec = !args.tags.contains(t) && to_tag.as_deref() != Some(t.as_str());
        if from_spec && crate::outputs::uses_outputs(t) {
            continue;
        }
        let flag = match to_tag.as_deref() == Some(t.as_str()) {
            true => "--to",
            false => "--tag",
        };
        crate::reference::validate_tag(t)
            .map_err(|reason| InputError::new(format!("{flag}: {reason}")))?;
    }
    let options = client_options(g, Some(args))?;
    if args.ecr {
        let options = EcrPushOptions {
            repository,
            tags: tags.clone(),
            settings: target.and_then(|t| t.ecr.clone()).unwrap_or_default(),
            region: args.region.clone(),
            profile: args.profile.clone(),
            client: options,
            registry_endpoint: registry_endpoint(&args.login)?,
            wait_scan: args
                .wait_scan
                .then(|| std::time::Duration::from_secs(args.scan_timeout)),
            fail_on: args.fail_on,
        };
        return Ok(PushTarget {
            kind: TargetKind::Ecr(Box::new(options)),
            tags,
            signer: None,
        });
    }
    let reference =
        Reference::parse(&repository).with_context(|| format!("push destination {repository}"))?;
    let options = with_login(options, &reference.registry, &args.login)?;
    Ok(PushTarget {
        kind: TargetKind::Registry {
            client: Arc::new(client(options)?),
            repository: Reference {
                tag: None,
                digest: None,
                ..reference
            },
        },
        tags,
        signer: None,
    })
}

/// The registry client of a build (base pull, cache repository: ECR credentials where they
/// are ECR repositories) and the cache repository.
pub async fn build_client(
    g: &GlobalArgs,
    b: &BuildArgs,
    spec: &ImageSpec,
) -> anyhow::Result<(Client, Option<Reference>)> {
    let mut opts = client_options(g, None)?;
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
        Some(repo) => Some(Reference::parse(repo).with_context(|| format!("--cache-repo {repo}"))?),
    };
    if let Ok(base) = Reference::parse(&spec.base) {
        opts = crate::publish::with_ecr_pull_credentials(
            opts,
            &base.registry,
            b.push_args.profile.clone(),
        );
    }
    Ok((client(opts)?, cache_repo))
}

/// One `--engine PLATFORM=DOCKER_HOST_URL`.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineFlag {
    /// The platform it builds.
    pub platform: Platform,
    /// Where its engine listens (and its TLS files).
    pub endpoint: EngineEndpoint,
}

/// The `--engine` flags, each for a platform image.yaml builds (`platform:` or `platforms:`),
/// none twice; URLs follow `DOCKER_HOST`'s rules, TLS variables read through `var`.
pub fn engine_flags(
    flags: &[String],
    spec: &ImageSpec,
    var: impl Fn(&str) -> Option<String>,
) -> Result<Vec<EngineFlag>, InputError> {
    let built: Vec<Platform> = match spec.index_platforms() {
        Some(list) => list,
        None => spec
            .platform
            .as_deref()
            .and_then(Platform::parse)
            .into_iter()
            .collect(),
    };
    let mut out: Vec<EngineFlag> = Vec::new();
    for raw in flags {
        let bad = |why: String| InputError::new(format!("--engine {raw}: {why}"));
        let (platform, url) = raw.split_once('=').ok_or_else(|| {
            bad("expected PLATFORM=DOCKER_HOST_URL, e.g. linux/arm64=tcp://HOST:2376".into())
        })?;
        let platform = Platform::parse(platform)
            .ok_or_else(|| bad(format!("{platform:?} is not os/arch[/variant]")))?;
        let Some(p) = built.iter().find(|b| b.to_string() == platform.to_string()) else {
            let listed: Vec<String> = built.iter().map(Platform::to_string).collect();
            return Err(bad(match listed.is_empty() {
                true => "image.yaml names no platform: set platform: or platforms:".into(),
                false => format!(
                    "image.yaml does not build {platform} (it builds {})",
                    listed.join(", ")
                ),
            }));
        };
        if out.iter().any(|f| f.platform == *p) {
            return Err(bad(format!("a second engine for {p}")));
        }
        let endpoint = EngineEndpoint::from_vars(|k| match k {
            "DOCKER_HOST" => Some(url.to_string()),
            other => var(other),
        })
        .map_err(|e| InputError::caused(format!("--engine {raw}"), e))?;
        out.push(EngineFlag {
            platform: p.clone(),
            endpoint,
        });
    }
    Ok(out)
}

/// Cancelled on SIGINT/SIGTERM (the handlers are in place when this returns).
pub fn cancel_on_signal() -> std::io::Result<tokio_util::sync::CancellationToken> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    let token = tokio_util::sync::CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = int.recv() => {},
            _ = term.recv() => {},
        }
        t.cancel();
    });
    Ok(token)
}
