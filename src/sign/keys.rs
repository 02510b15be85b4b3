//! Signing keys: PEM ECDSA P-256 private keys (PKCS#8 `PRIVATE KEY` or SEC1 `EC PRIVATE KEY`),
//! cosign's password-encrypted keys (`ENCRYPTED SIGSTORE PRIVATE KEY` / `ENCRYPTED COSIGN
//! PRIVATE KEY`: JSON with scrypt parameters and salt, nacl secretbox nonce and ciphertext,
//! go-securesystemslib's `encrypted` format) and PEM SPKI public keys.
//!
//! Key material lives in types whose `Debug` shows nothing secret; decrypted key bytes are
//! zeroed on drop; errors name the file, never its content or the password.

use std::fmt;
use std::path::Path;

use base64::Engine as _;
use p256::ecdsa::signature::{Signer as _, Verifier as _};
use p256::ecdsa::{Signature, SigningKey, VerifyingKey};
use p256::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePublicKey, LineEnding};
use serde::Deserialize;
use zeroize::Zeroizing;

use crate::auth::Secret;
use crate::oci::Digest;

/// PEM label of cosign's current encrypted keys.
pub const SIGSTORE_ENCRYPTED_LABEL: &str = "ENCRYPTED SIGSTORE PRIVATE KEY";
/// PEM label of cosign's older encrypted keys.
pub const COSIGN_ENCRYPTED_LABEL: &str = "ENCRYPTED COSIGN PRIVATE KEY";
/// Upper bound of scrypt's cost `N` accepted from a key file (cosign uses 2^15).
const MAX_SCRYPT_LOG_N: u8 = 20;

/// Why a key could not be used. Never carries key bytes or passwords.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    /// Not PEM, or no block of a supported type.
    #[error("no PEM block of a supported type (PRIVATE KEY, EC PRIVATE KEY, {SIGSTORE_ENCRYPTED_LABEL}, {COSIGN_ENCRYPTED_LABEL}, PUBLIC KEY)")]
    NotPem,
    /// The key is encrypted and no password was given.
    #[error("the key is encrypted: give its password (COSIGN_PASSWORD or --sign-password-stdin)")]
    PasswordNeeded,
    /// Wrong password (or a damaged key file): the secretbox did not open.
    #[error("cannot decrypt the key: wrong password, or the key file is damaged")]
    WrongPassword,
    /// The encrypted key's JSON is not cosign's format.
    #[error("not a cosign encrypted key: {0}")]
    BadEncryptedKey(String),
    /// The key is not an ECDSA P-256 key in a supported encoding.
    #[error("not an ECDSA P-256 {0} key")]
    NotP256(&'static str),
}

/// An ECDSA P-256 private key. `Debug` shows only the public key's fingerprint.
#[derive(Clone)]
pub struct PrivateKey(SigningKey);

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrivateKey(public {})", self.public_key().fingerprint())
    }
}

impl PrivateKey {
    /// Parse a PEM private key; `password` is needed for cosign's encrypted keys.
    pub fn from_pem(text: &[u8], password: Option<&Secret>) -> Result<Self, KeyError> {
        let (label, der) = pem_decode(text).ok_or(KeyError::NotPem)?;
        match label.as_str() {
            "PRIVATE KEY" => from_pkcs8(&der),
            "EC PRIVATE KEY" => p256::SecretKey::from_sec1_der(&der)
                .map(|k| Self(SigningKey::from(k)))
                .map_err(|_| KeyError::NotP256("SEC1")),
            SIGSTORE_ENCRYPTED_LABEL | COSIGN_ENCRYPTED_LABEL => {
                let password = password.ok_or(KeyError::PasswordNeeded)?;
                let plain = decrypt(&der, password)?;
                // cosign stores PKCS#8; SEC1 inside is accepted too.
                from_pkcs8(&plain).or_else(|_| {
                    p256::SecretKey::from_sec1_der(&plain)
                        .map(|k| Self(SigningKey::from(k)))
                        .map_err(|_| KeyError::NotP256("PKCS#8 or SEC1"))
                })
            }
            _ => Err(KeyError::NotPem),
        }
    }

    /// Whether a PEM text holds one of cosign's encrypted keys (a password is needed).
    pub fn is_encrypted(text: &[u8]) -> bool {
        matches!(pem_decode(text), Some((l, _)) if l == SIGSTORE_ENCRYPTED_LABEL || l == COSIGN_ENCRYPTED_LABEL)
    }

    /// Read and parse a key file.
    pub fn load(path: &Path, password: Option<&Secret>) -> Result<Self, super::SignError> {
        let text =
            Zeroizing::new(
                fs_err::read(path).map_err(|source| super::SignError::KeyFile {
                    path: path.to_path_buf(),
                    source: Box::new(source),
                })?,
            );
        Self::from_pem(&text, password).map_err(|source| super::SignError::KeyFile {
            path: path.to_path_buf(),
            source: Box::new(source),
        })
    }

    /// The public key.
    pub fn public_key(&self) -> PublicKey {
        PublicKey(*self.0.verifying_key())
    }

    /// ECDSA P-256 / SHA-256 signature of `message`, ASN.1 DER (what cosign stores).
    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        let sig: Signature = self.0.sign(message);
        sig.to_der().as_bytes().to_vec()
    }
}

fn from_pkcs8(der: &[u8]) -> Result<PrivateKey, KeyError> {
    SigningKey::from_pkcs8_der(der)
        .map(PrivateKey)
        .map_err(|_| KeyError::NotP256("PKCS#8"))
}

/// An ECDSA P-256 public key.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey(VerifyingKey);

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.fingerprint())
    }
}

impl PublicKey {
    /// Parse a PEM `PUBLIC KEY` (SubjectPublicKeyInfo).
    pub fn from_pem(text: &[u8]) -> Result<Self, KeyError> {
        match pem_decode(text) {
            Some((label, der)) if label == "PUBLIC KEY" => Self::from_der(&der),
            _ => Err(KeyError::NotPem),
        }
    }

    /// Parse DER SubjectPublicKeyInfo (what KMS `GetPublicKey` returns).
    pub fn from_der(der: &[u8]) -> Result<Self, KeyError> {
        VerifyingKey::from_public_key_der(der)
            .map(Self)
            .map_err(|_| KeyError::NotP256("SubjectPublicKeyInfo"))
    }

    /// Read and parse a public key file.
    pub fn load(path: &Path) -> Result<Self, super::SignError> {
        let text = fs_err::read(path).map_err(|source| super::SignError::KeyFile {
            path: path.to_path_buf(),
            source: Box::new(source),
        })?;
        Self::from_pem(&text).map_err(|source| super::SignError::KeyFile {
            path: path.to_path_buf(),
            source: Box::new(source),
        })
    }

    /// DER SubjectPublicKeyInfo.
    pub fn to_der(&self) -> Vec<u8> {
        self.0
            .to_public_key_der()
            .map(|d| d.as_bytes().to_vec())
            .unwrap_or_default()
    }

    /// PEM `PUBLIC KEY`, as `cosign generate-key-pair` writes `cosign.pub`.
    pub fn to_pem(&self) -> String {
        self.0.to_public_key_pem(LineEnding::LF).unwrap_or_default()
    }

    /// `sha256:<hex>` of the DER SubjectPublicKeyInfo: names a key in output.
    pub fn fingerprint(&self) -> Digest {
        Digest::of_bytes(&self.to_der())
    }

    /// Whether `signature` (DER, or raw 64-byte r||s) is valid for `message`.
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        let sig = Signature::from_der(signature)
            .ok()
            .or_else(|| Signature::from_slice(signature).ok());
        sig.is_some_and(|s| self.0.verify(message, &s).is_ok())
    }
}

/// The first PEM block: (label, DER bytes), zeroed on drop.
fn pem_decode(text: &[u8]) -> Option<(String, Zeroizing<Vec<u8>>)> {
    let text = std::str::from_utf8(text).ok()?;
    let start = text.find("-----BEGIN ")?;
    let rest = &text[start + 11..];
    let label_end = rest.find("-----")?;
    let label = &rest[..label_end];
    let body_start = label_end + 5;
    let end_marker = format!("-----END {label}-----");
    let body_end = rest[body_start..].find(&end_marker)? + body_start;
    let b64: Zeroizing<String> = Zeroizing::new(
        rest[body_start..body_end]
            .lines()
            .filter(|l| !l.contains(':'))
            .flat_map(|l| l.trim().chars())
            .collect(),
    );
    let der = base64::engine::general_purpose::STANDARD
        .decode(b64.as_bytes())
        .ok()?;
    Some((label.to_string(), Zeroizing::new(der)))
}

#[derive(Deserialize)]
struct EncryptedKey {
    kdf: Kdf,
    cipher: Cipher,
    ciphertext: String,
}

#[derive(Deserialize)]
struct Kdf {
    name: String,
    params: ScryptParams,
    salt: String,
}

#[derive(Deserialize)]
struct ScryptParams {
    #[serde(rename = "N")]
    n: u64,
    r: u32,
    p: u32,
}

#[derive(Deserialize)]
struct Cipher {
    name: String,
    nonce: String,
}

fn b64(field: &str, s: &str) -> Result<Vec<u8>, KeyError> {
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .map_err(|_| KeyError::BadEncryptedKey(format!("{field} is not base64")))
}

/// Open cosign's encrypted key JSON with a password: scrypt → nacl secretbox.
pub fn decrypt(json: &[u8], password: &Secret) -> Result<Zeroizing<Vec<u8>>, KeyError> {
    use crypto_secretbox::aead::{AeadInPlace, KeyInit};
    use crypto_secretbox::{Key, Nonce, Tag, XSalsa20Poly1305};

    let e: EncryptedKey = serde_json::from_slice(json)
        .map_err(|err| KeyError::BadEncryptedKey(format!("JSON: {err}")))?;
    if e.kdf.name != "scrypt" || e.cipher.name != "nacl/secretbox" {
        return Err(KeyError::BadEncryptedKey(format!(
            "kdf {:?} / cipher {:?} (expected scrypt / nacl/secretbox)",
            e.kdf.name, e.cipher.name
        )));
    }
    let log_n = match e.kdf.params.n {
        n if n.is_power_of_two() && n > 1 => n.trailing_zeros() as u8,
        _ => {
            return Err(KeyError::BadEncryptedKey(
                "scrypt N is not a power of two".into(),
            ))
        }
    };
    if log_n > MAX_SCRYPT_LOG_N || e.kdf.params.r > 32 || e.kdf.params.p > 16 {
        return Err(KeyError::BadEncryptedKey(
            "scrypt parameters are too costly".into(),
        ));
    }
    let params = scrypt::Params::new(log_n, e.kdf.params.r, e.kdf.params.p, 32)
        .map_err(|_| KeyError::BadEncryptedKey("invalid scrypt parameters".into()))?;
    let salt = b64("kdf.salt", &e.kdf.salt)?;
    let nonce = b64("cipher.nonce", &e.cipher.nonce)?;
    if nonce.len() != 24 {
        return Err(KeyError::BadEncryptedKey("nonce is not 24 bytes".into()));
    }
    let sealed = b64("ciphertext", &e.ciphertext)?;
    if sealed.len() < 16 {
        return Err(KeyError::BadEncryptedKey("ciphertext is too short".into()));
    }
    let mut key = Zeroizing::new([0u8; 32]);
    scrypt::scrypt(password.expose().as_bytes(), &salt, &params, &mut key[..])
        .map_err(|_| KeyError::BadEncryptedKey("scrypt failed".into()))?;
    // NaCl's secretbox (as Go writes it) puts the Poly1305 tag before the ciphertext.
    let (tag, body) = sealed.split_at(16);
    let mut plain = Zeroizing::new(body.to_vec());
    XSalsa20Poly1305::new(Key::from_slice(&key[..]))
        .decrypt_in_place_detached(
            Nonce::from_slice(&nonce),
            &[],
            &mut plain[..],
            Tag::from_slice(tag),
        )
        .map_err(|_| KeyError::WrongPassword)?;
    Ok(plain)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// cosign's own test vector: `pemsigstorekey` in sigstore/cosign `pkg/cosign/keys_test.go`,
    /// made by `cosign generate-key-pair` with the password `hello`.
    const COSIGN_SIGSTORE_KEY: &str = include_str!("testdata/cosign-sigstore.key");

    #[test]
    fn cosign_encrypted_key_opens_with_its_password_only() {
        let good = Secret::new("hello");
        let key = PrivateKey::from_pem(COSIGN_SIGSTORE_KEY.as_bytes(), Some(&good)).unwrap();
        let sig = key.sign(b"payload");
        assert!(key.public_key().verify(b"payload", &sig));
        assert!(!key.public_key().verify(b"other", &sig));
        assert!(PrivateKey::is_encrypted(COSIGN_SIGSTORE_KEY.as_bytes()));
        let wrong = Secret::new("hellp");
        assert_eq!(
            PrivateKey::from_pem(COSIGN_SIGSTORE_KEY.as_bytes(), Some(&wrong)).unwrap_err(),
            KeyError::WrongPassword
        );
        assert_eq!(
            PrivateKey::from_pem(COSIGN_SIGSTORE_KEY.as_bytes(), None).unwrap_err(),
            KeyError::PasswordNeeded
        );
        // Neither the password nor key bytes show up in messages or Debug.
        let msg = KeyError::WrongPassword.to_string();
        assert!(!msg.contains("hellp"));
        assert!(format!("{key:?}").starts_with("PrivateKey(public sha256:"));
    }

    #[test]
    fn public_key_pem_roundtrip() {
        let key = PrivateKey::from_pem(COSIGN_SIGSTORE_KEY.as_bytes(), Some(&Secret::new("hello")))
            .unwrap();
        let pem = key.public_key().to_pem();
        assert!(pem.starts_with("-----BEGIN PUBLIC KEY-----\n"));
        let back = PublicKey::from_pem(pem.as_bytes()).unwrap();
        assert_eq!(back, key.public_key());
        assert_eq!(PublicKey::from_der(&back.to_der()).unwrap(), back);
        assert_eq!(PublicKey::from_pem(b"nope").unwrap_err(), KeyError::NotPem);
    }

    #[test]
    fn damaged_encrypted_keys_fail_cleanly() {
        let bad = b"{\"kdf\":{\"name\":\"scrypt\",\"params\":{\"N\":1000,\"r\":8,\"p\":1},\"salt\":\"\"},\
                    \"cipher\":{\"name\":\"nacl/secretbox\",\"nonce\":\"\"},\"ciphertext\":\"\"}";
        assert!(matches!(
            decrypt(bad, &Secret::new("x")),
            Err(KeyError::BadEncryptedKey(_))
        ));
        let costly = b"{\"kdf\":{\"name\":\"scrypt\",\"params\":{\"N\":1073741824,\"r\":8,\"p\":1},\
                       \"salt\":\"\"},\"cipher\":{\"name\":\"nacl/secretbox\",\"nonce\":\"\"},\"ciphertext\":\"\"}";
        assert!(matches!(
            decrypt(costly, &Secret::new("x")),
            Err(KeyError::BadEncryptedKey(_))
        ));
    }
}
