//! cosign-compatible image signatures (issue 14): the simple-signing payload signed with
//! ECDSA P-256 / SHA-256 by a key file or an AWS KMS key, stored as cosign stores it (see
//! [`cosign`]), and verified against a public key the way `cosign verify --key` and the
//! containers tools' `sigstoreSigned` policy do.
//!
//! Signing: [`Signer::sign_manifest`] gives a signature [`cosign::Layer`]; [`cosign::Image`]
//! makes the signature image (append to the layers already under the `.sig` tag, as cosign
//! does) and writes it to the layout for the registry client to push.
//! Verifying: [`verify`] checks candidate layers (from the `.sig` tag or referrers) against
//! the manifest digest and a public key.

pub mod cosign;
pub mod keys;
pub mod kms;
pub mod payload;
pub mod remote;

use std::collections::BTreeMap;
use std::path::PathBuf;

use base64::Engine as _;
use serde::Serialize;

use crate::layout::LayoutError;
use crate::oci::Digest;

pub use keys::{KeyError, PrivateKey, PublicKey};
pub use kms::{KmsKeyRef, KmsSigner};
pub use payload::Payload;

/// Errors of signing. Messages name files and key references, never key material.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// A key file could not be read or used.
    #[error("key file {path}: {source}")]
    KeyFile {
        /// The file.
        path: PathBuf,
        /// The cause (an I/O error or a [`KeyError`]).
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A key could not be used.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// A malformed `awskms://` reference.
    #[error("KMS key reference {0}")]
    KmsRef(String),
    /// An AWS KMS call failed.
    #[error("AWS KMS {operation} with {key}: {message}")]
    Kms {
        /// The API operation.
        operation: &'static str,
        /// The key reference.
        key: String,
        /// The service's code and message.
        message: String,
    },
    /// The KMS key cannot make cosign signatures.
    #[error("AWS KMS key {key} is {spec}: cosign-compatible signing needs an ECC_NIST_P256 key")]
    KmsKeySpec {
        /// The key reference.
        key: String,
        /// Its key spec.
        spec: String,
    },
    /// A fresh signature did not verify with the signer's own public key.
    #[error("the signature made with {0} does not verify with its public key")]
    SelfCheck(String),
    /// A signature manifest is not what cosign writes.
    #[error("signature manifest: {0}")]
    BadSignatureManifest(String),
    /// A payload is not a cosign simple-signing payload.
    #[error("signature payload: {0}")]
    BadPayload(String),
    /// The layout could not be read or written.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// The registry could not be read or written.
    #[error(transparent)]
    Registry(#[from] crate::registry::RegistryError),
    /// A reference could not be formed (a tag the registry would refuse).
    #[error(transparent)]
    Reference(#[from] crate::reference::ReferenceError),
    /// The image to verify does not exist.
    #[error("{0} does not exist")]
    ImageNotFound(String),
}

impl SignError {
    /// The exit code this error maps to: 2 for bad input (key files, references), else 1.
    pub fn exit_code(&self) -> i32 {
        crate::error::HasKind::kind(self).exit_code()
    }
}

impl crate::error::HasKind for SignError {
    fn kind(&self) -> crate::error::ErrorKind {
        use crate::error::ErrorKind;
        match self {
            SignError::KeyFile { .. }
            | SignError::Key(_)
            | SignError::KmsRef(_)
            | SignError::KmsKeySpec { .. }
            | SignError::Reference(_) => ErrorKind::BadInput,
            SignError::Registry(e) => e.kind(),
            _ => ErrorKind::Failure,
        }
    }
}

/// Who signs: a private key (from a file) or an AWS KMS key.
#[derive(Debug, Clone)]
pub enum Signer {
    /// A local ECDSA P-256 key.
    Key(PrivateKey),
    /// An AWS KMS key.
    Kms(KmsSigner),
}

impl Signer {
    /// What names the signer in output: `key sha256:<SPKI fingerprint>` or the KMS reference.
    pub async fn describe(&self) -> Result<String, SignError> {
        Ok(match self {
            Signer::Key(k) => format!("key {}", k.public_key().fingerprint()),
            Signer::Kms(k) => k.key().to_string(),
        })
    }

    /// The signer's public key.
    pub async fn public_key(&self) -> Result<PublicKey, SignError> {
        match self {
            Signer::Key(k) => Ok(k.public_key()),
            Signer::Kms(k) => k.public_key().await,
        }
    }

    /// DER ECDSA P-256 / SHA-256 signature of `message`.
    pub async fn sign(&self, message: &[u8]) -> Result<Vec<u8>, SignError> {
        match self {
            Signer::Key(k) => Ok(k.sign(message)),
            Signer::Kms(k) => k.sign(message).await,
        }
    }

    /// Sign `digest` claimed for `docker_reference` (the repository, as cosign does) and
    /// return the signature layer, checked against the signer's public key first.
    pub async fn sign_manifest(
        &self,
        docker_reference: &str,
        digest: &Digest,
        annotations: &BTreeMap<String, String>,
    ) -> Result<cosign::Layer, SignError> {
        let payload = payload::build(docker_reference, digest, annotations);
        let signature = self.sign(&payload).await?;
        if !self.public_key().await?.verify(&payload, &signature) {
            return Err(SignError::SelfCheck(self.describe().await?));
        }
        let b64 = base64::engine::general_purpose::STANDARD.encode(&signature);
        Ok(cosign::Layer::signature(payload, b64))
    }
}

/// The layers of a signature image after adding `new` to `existing` (what was under the
/// `.sig` tag): cosign appends; an identical layer is not added twice.
pub fn append_signature(mut existing: Vec<cosign::Layer>, new: cosign::Layer) -> cosign::Image {
    if !existing.contains(&new) {
        existing.push(new);
    }
    cosign::Image::new(existing)
}

/// A signature that verified.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verified {
    /// The key that verified it (`sha256:` fingerprint of its SubjectPublicKeyInfo).
    pub key: String,
    /// The signed manifest digest.
    pub digest: String,
    /// The repository the signer claimed.
    pub docker_reference: String,
    /// The whole payload.
    pub payload: serde_json::Value,
    /// Digest of the payload blob.
    pub payload_digest: String,
}

/// Why no signature verified.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// No cosign signature was found for the manifest.
    #[error("no signature: no cosign signature is attached to {digest}")]
    NoSignature {
        /// The manifest.
        digest: String,
    },
    /// Signatures exist but none verifies with the key.
    #[error("wrong key: none of the {count} signature(s) of {digest} verifies with key {key}")]
    WrongKey {
        /// The manifest.
        digest: String,
        /// Signatures tried.
        count: usize,
        /// The key's fingerprint.
        key: String,
    },
    /// A signature by this key is valid but for another manifest digest.
    #[error("digest mismatch: the signature by key {key} is for {signed}, not {digest}")]
    DigestMismatch {
        /// The manifest being verified.
        digest: String,
        /// What the payload names.
        signed: String,
        /// The key's fingerprint.
        key: String,
    },
    /// A signature by this key has a payload that is not a cosign payload.
    #[error("invalid payload: {0}")]
    BadPayload(String),
}

impl Rejection {
    /// The short reason (`no signature`, `wrong key`, `digest mismatch`, `invalid payload`).
    pub fn reason(&self) -> &'static str {
        match self {
            Rejection::NoSignature { .. } => "no signature",
            Rejection::WrongKey { .. } => "wrong key",
            Rejection::DigestMismatch { .. } => "digest mismatch",
            Rejection::BadPayload(_) => "invalid payload",
        }
    }
}

/// Check candidate signature layers of `digest` against `key`: the first layer whose
/// signature verifies and whose payload names `digest` is accepted.
pub fn verify(
    key: &PublicKey,
    digest: &Digest,
    layers: &[cosign::Layer],
) -> Result<Verified, Rejection> {
    let fingerprint = key.fingerprint().to_string();
    let candidates: Vec<&cosign::Layer> = layers
        .iter()
        .filter(|l| {
            l.media_type == cosign::SIMPLE_SIGNING_MEDIA_TYPE && l.signature_b64().is_some()
        })
        .collect();
    if candidates.is_empty() {
        return Err(Rejection::NoSignature {
            digest: digest.to_string(),
        });
    }
    let mut mismatch = None;
    let mut bad_payload = None;
    for layer in &candidates {
        let Some(sig) = layer
            .signature_b64()
            .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
        else {
            continue;
        };
        if !key.verify(&layer.content, &sig) {
            continue;
        }
        match payload::parse(&layer.content) {
            Ok(p) if p.manifest_digest == digest.to_string() => {
                return Ok(Verified {
                    key: fingerprint,
                    digest: p.manifest_digest.clone(),
                    docker_reference: p.docker_reference.clone(),
                    payload: serde_json::from_slice(&layer.content).unwrap_or_default(),
                    payload_digest: Digest::of_bytes(&layer.content).to_string(),
                });
            }
            Ok(p) => mismatch = Some(p.manifest_digest),
            Err(e) => bad_payload = Some(e.to_string()),
        }
    }
    if let Some(signed) = mismatch {
        return Err(Rejection::DigestMismatch {
            digest: digest.to_string(),
            signed,
            key: fingerprint,
        });
    }
    if let Some(m) = bad_payload {
        return Err(Rejection::BadPayload(m));
    }
    Err(Rejection::WrongKey {
        digest: digest.to_string(),
        count: candidates.len(),
        key: fingerprint,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Secret;

    fn key() -> PrivateKey {
        let pem = include_str!("testdata/cosign-sigstore.key");
        PrivateKey::from_pem(pem.as_bytes(), Some(&Secret::new("hello"))).unwrap()
    }

    fn other_key() -> PrivateKey {
        // A fixed P-256 key (PKCS#8) used only here.
        let pem = include_str!("testdata/other-p256.pem");
        PrivateKey::from_pem(pem.as_bytes(), None).unwrap()
    }

    fn digest(s: &str) -> Digest {
        Digest::of_bytes(s.as_bytes())
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
    }

    #[test]
    fn sign_then_verify_and_every_rejection() {
        let d = digest("manifest");
        let signer = Signer::Key(key());
        let layer = rt()
            .block_on(signer.sign_manifest("127.0.0.1:5000/app", &d, &BTreeMap::new()))
            .unwrap();
        let pubkey = key().public_key();
        let ok = verify(&pubkey, &d, std::slice::from_ref(&layer)).unwrap();
        assert_eq!(ok.digest, d.to_string());
        assert_eq!(ok.docker_reference, "127.0.0.1:5000/app");
        assert_eq!(ok.key, pubkey.fingerprint().to_string());

        assert_eq!(
            verify(&pubkey, &d, &[]).unwrap_err().reason(),
            "no signature"
        );
        let other = other_key().public_key();
        assert_eq!(
            verify(&other, &d, std::slice::from_ref(&layer))
                .unwrap_err()
                .reason(),
            "wrong key"
        );
        assert_eq!(
            verify(&pubkey, &digest("another"), std::slice::from_ref(&layer))
                .unwrap_err()
                .reason(),
            "digest mismatch"
        );
        // A tampered payload no longer verifies.
        let mut tampered = layer.clone();
        tampered.content = payload::build("127.0.0.1:5000/evil", &d, &BTreeMap::new());
        assert_eq!(
            verify(&pubkey, &d, &[tampered]).unwrap_err().reason(),
            "wrong key"
        );

        // Appending keeps earlier signatures, once.
        let by_other = rt()
            .block_on(Signer::Key(other_key()).sign_manifest("r", &d, &BTreeMap::new()))
            .unwrap();
        let img = append_signature(vec![by_other.clone()], layer.clone());
        let img = append_signature(img.layers, layer.clone());
        assert_eq!(img.layers.len(), 2);
        assert!(verify(&pubkey, &d, &img.layers).is_ok());
        assert!(verify(&other, &d, &img.layers).is_ok());
    }
}
