//! Signing with an AWS KMS `ECC_NIST_P256` key: `Sign` with ECDSA_SHA_256 and `GetPublicKey`
//! (DER SubjectPublicKeyInfo), so CI never holds a private key. A payload up to KMS's 4096-byte
//! RAW limit is sent as is (MessageType RAW: KMS hashes it with SHA-256 itself); a larger one as
//! its SHA-256 digest (MessageType DIGEST, as cosign always does). Both give the same signature
//! over SHA-256(payload); RAW also works with moto, whose KMS treats DIGEST as RAW and would
//! hash the digest again (moto's `sign`: "MessageType DIGEST is not yet implemented").
//!
//! Key references follow cosign (sigstore's `awskms` provider):
//! `awskms:///alias/NAME`, `awskms:///KEY-ID`, `awskms:///arn:aws:kms:REGION:ACCOUNT:key/ID`
//! (or `:alias/NAME`), and `awskms://ENDPOINT/...` to send the API to `https://ENDPOINT`.
//! `AWS_ENDPOINT_URL_KMS` redirects it too (the tests use moto).

use std::fmt;
use std::str::FromStr;

use aws_config::{BehaviorVersion, Region};
use aws_sdk_kms::error::{DisplayErrorContext, ProvideErrorMetadata};
use aws_sdk_kms::primitives::Blob;
use aws_sdk_kms::types::{KeySpec, MessageType, SigningAlgorithmSpec};
use sha2::{Digest as _, Sha256};

use super::keys::PublicKey;
use super::SignError;

/// The reference scheme.
pub const SCHEME: &str = "awskms://";
/// Largest message KMS `Sign` takes with MessageType RAW.
pub const MAX_RAW_MESSAGE: usize = 4096;

/// A parsed `awskms://` key reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KmsKeyRef {
    /// `host[:port]` to send the API to (over HTTPS), when the reference names one.
    pub endpoint: Option<String>,
    /// What KMS calls `KeyId`: a key id, key ARN, `alias/NAME` or alias ARN.
    pub key_id: String,
}

impl KmsKeyRef {
    /// The region an ARN names (`arn:aws:kms:REGION:...`).
    pub fn region(&self) -> Option<&str> {
        let mut parts = self.key_id.split(':');
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some("arn"), Some(_), Some("kms"), Some(r)) if !r.is_empty() => Some(r),
            _ => None,
        }
    }
}

impl fmt::Display for KmsKeyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{SCHEME}{}/{}",
            self.endpoint.as_deref().unwrap_or(""),
            self.key_id
        )
    }
}

fn is_key_uuid(s: &str) -> bool {
    let s = s.strip_prefix("mrk-").unwrap_or(s);
    let hex: String = s.chars().filter(|c| *c != '-').collect();
    (hex.len() == 32 && hex.chars().all(|c| c.is_ascii_hexdigit()))
        || (s.len() == 32 && s.chars().all(|c| c.is_ascii_hexdigit()))
}

fn is_arn_prefix(s: &str) -> Option<&str> {
    let rest = s.strip_prefix("arn:")?;
    let (partition, rest) = rest.split_once(':')?;
    if !matches!(partition, "aws" | "aws-us-gov" | "aws-cn") {
        return None;
    }
    let rest = rest.strip_prefix("kms:")?;
    let (region, rest) = rest.split_once(':')?;
    let (account, rest) = rest.split_once(':')?;
    let region_ok = !region.is_empty()
        && region
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    let account_ok = account.len() == 12 && account.chars().all(|c| c.is_ascii_digit());
    (region_ok && account_ok).then_some(rest)
}

impl FromStr for KmsKeyRef {
    type Err = SignError;

    /// Parse like sigstore's `awskms.ParseReference`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || {
            SignError::KmsRef(format!(
                "{s:?}: expected awskms://[ENDPOINT]/KEY where KEY is a key id, a key ARN, \
                 alias/NAME or an alias ARN"
            ))
        };
        let rest = s.strip_prefix(SCHEME).ok_or_else(bad)?;
        let (host, key) = rest.split_once('/').ok_or_else(bad)?;
        let valid = is_key_uuid(key)
            || key.strip_prefix("alias/").is_some_and(|a| !a.is_empty())
            || is_arn_prefix(key).is_some_and(|r| {
                r.strip_prefix("key/").is_some_and(is_key_uuid)
                    || r.strip_prefix("alias/").is_some_and(|a| !a.is_empty())
            });
        if !valid {
            return Err(bad());
        }
        Ok(Self {
            endpoint: Some(host.to_string()).filter(|h| !h.is_empty()),
            key_id: key.to_string(),
        })
    }
}

/// A KMS key that signs.
#[derive(Clone)]
pub struct KmsSigner {
    client: aws_sdk_kms::Client,
    key: KmsKeyRef,
}

impl fmt::Debug for KmsSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KmsSigner({})", self.key)
    }
}

impl KmsSigner {
    /// A client from the AWS default chain (environment, profile, SSO, web identity, ECS,
    /// IMDS); the region comes from the key ARN, else `region`, else the SDK config.
    pub async fn new(
        key: KmsKeyRef,
        region: Option<String>,
        profile: Option<String>,
    ) -> Result<Self, SignError> {
        let mut loader = aws_config::defaults(BehaviorVersion::latest());
        if let Some(p) = profile {
            loader = loader.profile_name(p);
        }
        if let Some(r) = key.region().map(str::to_string).or(region) {
            loader = loader.region(Region::new(r));
        }
        let sdk = loader.load().await;
        if sdk.region().is_none() {
            return Err(SignError::Kms {
                operation: "configure",
                key: key.to_string(),
                message: "no AWS region: use a key ARN, --region, AWS_REGION or a profile region"
                    .into(),
            });
        }
        let mut conf = aws_sdk_kms::config::Builder::from(&sdk);
        if let Some(host) = &key.endpoint {
            conf = conf.endpoint_url(format!("https://{host}"));
        }
        Ok(Self {
            client: aws_sdk_kms::Client::from_conf(conf.build()),
            key,
        })
    }

    /// The key reference.
    pub fn key(&self) -> &KmsKeyRef {
        &self.key
    }

    fn api_err<E>(&self, operation: &'static str, e: aws_sdk_kms::error::SdkError<E>) -> SignError
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        let message = match (e.code(), e.message()) {
            (Some(c), Some(m)) => format!("{c}: {m}"),
            (Some(c), None) => c.to_string(),
            _ => DisplayErrorContext(&e).to_string(),
        };
        SignError::Kms {
            operation,
            key: self.key.to_string(),
            message,
        }
    }

    /// The key's public key (`GetPublicKey`); fails unless it is an ECC_NIST_P256 signing key.
    pub async fn public_key(&self) -> Result<PublicKey, SignError> {
        let out = self
            .client
            .get_public_key()
            .key_id(&self.key.key_id)
            .send()
            .await
            .map_err(|e| self.api_err("GetPublicKey", e))?;
        if let Some(spec) = out.key_spec() {
            if *spec != KeySpec::EccNistP256 {
                return Err(SignError::KmsKeySpec {
                    key: self.key.to_string(),
                    spec: spec.as_str().to_string(),
                });
            }
        }
        let der = out.public_key().ok_or_else(|| SignError::Kms {
            operation: "GetPublicKey",
            key: self.key.to_string(),
            message: "the answer holds no public key".into(),
        })?;
        PublicKey::from_der(der.as_ref()).map_err(|_| SignError::KmsKeySpec {
            key: self.key.to_string(),
            spec: "not an ECDSA P-256 key".into(),
        })
    }

    /// ECDSA P-256 / SHA-256 signature (DER) of `message`.
    pub async fn sign(&self, message: &[u8]) -> Result<Vec<u8>, SignError> {
        let (body, kind) = if message.len() <= MAX_RAW_MESSAGE {
            (message.to_vec(), MessageType::Raw)
        } else {
            (Sha256::digest(message).to_vec(), MessageType::Digest)
        };
        let out = self
            .client
            .sign()
            .key_id(&self.key.key_id)
            .message(Blob::new(body))
            .message_type(kind)
            .signing_algorithm(SigningAlgorithmSpec::EcdsaSha256)
            .send()
            .await
            .map_err(|e| self.api_err("Sign", e))?;
        out.signature()
            .map(|b| b.as_ref().to_vec())
            .ok_or_else(|| SignError::Kms {
                operation: "Sign",
                key: self.key.to_string(),
                message: "the answer holds no signature".into(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cosign_references() {
        let a: KmsKeyRef = "awskms:///alias/wpimg-signing".parse().unwrap();
        assert_eq!(a.endpoint, None);
        assert_eq!(a.key_id, "alias/wpimg-signing");
        assert_eq!(a.region(), None);
        assert_eq!(a.to_string(), "awskms:///alias/wpimg-signing");

        let arn = "arn:aws:kms:eu-west-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab";
        let k: KmsKeyRef = format!("awskms:///{arn}").parse().unwrap();
        assert_eq!(k.key_id, arn);
        assert_eq!(k.region(), Some("eu-west-1"));

        let e: KmsKeyRef = "awskms://localhost:4566/1234abcd-12ab-34cd-56ef-1234567890ab"
            .parse()
            .unwrap();
        assert_eq!(e.endpoint.as_deref(), Some("localhost:4566"));

        let aa: KmsKeyRef = "awskms:///arn:aws:kms:us-east-1:123456789012:alias/ci"
            .parse()
            .unwrap();
        assert_eq!(aa.region(), Some("us-east-1"));

        for bad in [
            "awskms://",
            "awskms:///",
            "awskms:///not-a-key",
            "awskms:///alias/",
            "gcpkms://projects/x",
            "awskms:///arn:aws:kms:us-east-1:12345:key/1234abcd-12ab-34cd-56ef-1234567890ab",
        ] {
            assert!(bad.parse::<KmsKeyRef>().is_err(), "{bad}");
        }
    }
}
