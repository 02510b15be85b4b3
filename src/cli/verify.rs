//! `wpimg verify`: does an image in a registry carry a valid cosign signature by this key?

use std::sync::Arc;

use anyhow::Context;
use serde::Serialize;

use super::args::{GlobalArgs, VerifyCmd};
use super::output::Output;
use super::{settings, InputError};
use crate::events::SharedReporter;
use crate::oci::Digest;
use crate::reference::Reference;
use crate::sign::{PublicKey, Rejection};

/// No signature verified (exit code 1).
#[derive(Debug, thiserror::Error)]
#[error("{reference} ({digest}): {rejection}")]
pub struct NotVerified {
    reference: String,
    digest: Digest,
    rejection: Rejection,
}

/// The `--json` result.
#[derive(Serialize)]
struct VerifyResult<'a> {
    reference: String,
    digest: &'a Digest,
    verified: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<String>,
    /// Who signed: `key sha256:<fingerprint>` or the KMS key reference.
    #[serde(skip_serializing_if = "Option::is_none")]
    signer: Option<&'a str>,
    /// SHA-256 fingerprint of the key's SubjectPublicKeyInfo.
    key: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    docker_reference: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload: Option<&'a serde_json::Value>,
}

/// Run `wpimg verify`.
pub async fn run(g: &GlobalArgs, v: &VerifyCmd, out: &Arc<Output>) -> anyhow::Result<()> {
    let reference = parse_reference(&v.reference)?;
    let (key, signer) = public_key(v).await?;
    let opts = settings::client_options(g, None)?;
    let opts = settings::with_login(opts, &reference.registry, &v.login)?;
    // An ECR host: tokens from the AWS SDK chain when no login was given.
    let opts = crate::publish::with_ecr_pull_credentials(opts, &reference.registry, None);
    let client = settings::client(opts)?;
    let rep: SharedReporter = out.clone();
    let checked = crate::supply::verify(&client, &reference, &key, &rep)
        .await
        .with_context(|| format!("verify {reference}"))?;
    let mut result = VerifyResult {
        reference: reference.to_string(),
        digest: &checked.digest,
        verified: false,
        reason: None,
        message: None,
        signer: None,
        key: key.fingerprint().to_string(),
        docker_reference: None,
        payload: None,
    };
    match &checked.result {
        Ok(ok) => {
            result.verified = true;
            result.signer = Some(&signer);
            result.docker_reference = Some(&ok.docker_reference);
            result.payload = Some(&ok.payload);
            out.say(&format!(
                "verified {reference} ({}): signed by {signer}, for {}",
                checked.digest, ok.docker_reference
            ));
            out.result("verify", &result);
            Ok(())
        }
        Err(rejection) => {
            result.reason = Some(rejection.reason());
            result.message = Some(rejection.to_string());
            out.result("verify", &result);
            Err(NotVerified {
                reference: reference.to_string(),
                digest: checked.digest.clone(),
                rejection: rejection.clone(),
            }
            .into())
        }
    }
}

/// `HOST/REPO:TAG`, `HOST/REPO@sha256:...`, optionally with `docker://`.
fn parse_reference(arg: &str) -> Result<Reference, InputError> {
    let s = arg.strip_prefix("docker://").unwrap_or(arg);
    Reference::parse(s).map_err(|e| InputError::caused(format!("verify {arg}"), e))
}

/// The public key to check against, and how the signer is named: `key sha256:...` for
/// `--key`, the reference for `--kms`.
async fn public_key(v: &VerifyCmd) -> anyhow::Result<(PublicKey, String)> {
    if let Some(path) = &v.key {
        let key = PublicKey::load(path).context("--key")?;
        let name = format!("key {}", key.fingerprint());
        return Ok((key, name));
    }
    let Some(kms) = &v.kms else {
        return Err(InputError::new(
            "give the public key with --key PUB.pem or --kms awskms:///...",
        )
        .into());
    };
    let signer = settings::kms_signer(kms, v.region.clone(), v.profile.clone())
        .await
        .context("--kms")?;
    let key = signer.public_key().await.context("--kms")?;
    Ok((key, signer.key().to_string()))
}
