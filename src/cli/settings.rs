//! Settings resolved once from the flags and image.yaml: the spec, the layout directory,
//! registry clients and logins, the push target, cancellation.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;

use super::args::{BuildArgs, GlobalArgs, LoginArgs, PushArgs};
use super::InputError;
use crate::publish::{push_tags, EcrPushOptions, PushTarget, TargetKind};
use crate::reference::Reference;
use crate::registry::{Client, ClientOptions};
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
        let mut password = String::new();
        std::io::stdin()
            .read_line(&mut password)
            .context("read the password from stdin")?;
        let password = password.trim_end_matches(['\n', '\r']).to_string();
        if password.is_empty() {
            return Err(InputError::new("--password-stdin: stdin held no password").into());
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
        crate::reference::validate_tag(t)
            .map_err(|reason| InputError::new(format!("--tag: {reason}")))?;
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

/// Cancelled on SIGINT/SIGTERM.
pub fn cancel_on_signal() -> tokio_util::sync::CancellationToken {
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
