//! The simple-signing payload cosign signs: which manifest digest, claimed for which
//! repository, as sigstore's `payload.Cosign` marshals it with Go's `encoding/json`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::oci::Digest;

use super::SignError;

/// `critical.type` of a cosign signature.
pub const COSIGN_SIGNATURE_TYPE: &str = "cosign container image signature";

/// A parsed payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Payload {
    /// `critical.identity.docker-reference`: the repository the signer claimed.
    pub docker_reference: String,
    /// `critical.image.docker-manifest-digest`.
    pub manifest_digest: String,
    /// `optional` (null or the signer's annotations).
    pub optional: Value,
}

/// The payload bytes for `digest` claimed for `docker_reference` (cosign uses the repository,
/// e.g. `123.dkr.ecr.us-east-1.amazonaws.com/app`), with optional annotations (`null` without).
pub fn build(
    docker_reference: &str,
    digest: &Digest,
    optional: &BTreeMap<String, String>,
) -> Vec<u8> {
    let optional = if optional.is_empty() {
        Value::Null
    } else {
        json!(optional)
    };
    let v = json!({
        "critical": {
            "identity": {"docker-reference": docker_reference},
            "image": {"docker-manifest-digest": digest.to_string()},
            "type": COSIGN_SIGNATURE_TYPE,
        },
        "optional": optional,
    });
    go_escape(&serde_json::to_string(&v).unwrap_or_default()).into_bytes()
}

/// Go's `encoding/json` escapes `<`, `>`, `&`, U+2028 and U+2029 inside strings; outside
/// strings JSON has none of them, so replacing everywhere is exact.
fn go_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => out.push_str("\\u003c"),
            '>' => out.push_str("\\u003e"),
            '&' => out.push_str("\\u0026"),
            '\u{2028}' => out.push_str("\\u2028"),
            '\u{2029}' => out.push_str("\\u2029"),
            c => out.push(c),
        }
    }
    out
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    critical: Critical,
    optional: Value,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Critical {
    identity: Identity,
    image: Image,
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Identity {
    #[serde(rename = "docker-reference")]
    docker_reference: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Image {
    #[serde(rename = "docker-manifest-digest")]
    docker_manifest_digest: String,
}

/// Parse a payload as strictly as containers/image does (exact fields, the cosign type).
pub fn parse(bytes: &[u8]) -> Result<Payload, SignError> {
    let raw: Raw = serde_json::from_slice(bytes)
        .map_err(|e| SignError::BadPayload(format!("not a simple-signing payload: {e}")))?;
    if raw.critical.kind != COSIGN_SIGNATURE_TYPE {
        return Err(SignError::BadPayload(format!(
            "signature type {:?} is not {COSIGN_SIGNATURE_TYPE:?}",
            raw.critical.kind
        )));
    }
    Ok(Payload {
        docker_reference: raw.critical.identity.docker_reference,
        manifest_digest: raw.critical.image.docker_manifest_digest,
        optional: raw.optional,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest() -> Digest {
        "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
            .parse()
            .unwrap()
    }

    #[test]
    fn builds_cosigns_bytes() {
        let p = build("127.0.0.1:5000/app", &digest(), &BTreeMap::new());
        assert_eq!(
            String::from_utf8(p.clone()).unwrap(),
            "{\"critical\":{\"identity\":{\"docker-reference\":\"127.0.0.1:5000/app\"},\"image\":\
             {\"docker-manifest-digest\":\"sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e\
             73043362938b9824\"},\"type\":\"cosign container image signature\"},\"optional\":null}"
        );
        let parsed = parse(&p).unwrap();
        assert_eq!(parsed.docker_reference, "127.0.0.1:5000/app");
        assert_eq!(parsed.manifest_digest, digest().to_string());
        assert_eq!(parsed.optional, Value::Null);
    }

    #[test]
    fn annotations_sorted_and_go_escaped() {
        let opt = BTreeMap::from([
            ("z".to_string(), "1".to_string()),
            ("a".to_string(), "<b&c>".to_string()),
        ]);
        let p = String::from_utf8(build("r", &digest(), &opt)).unwrap();
        assert!(
            p.ends_with("\"optional\":{\"a\":\"\\u003cb\\u0026c\\u003e\",\"z\":\"1\"}}"),
            "{p}"
        );
        assert_eq!(parse(p.as_bytes()).unwrap().optional["a"], "<b&c>");
    }

    #[test]
    fn rejects_other_payloads() {
        assert!(parse(b"{}").is_err());
        assert!(parse(br#"{"critical":{"identity":{"docker-reference":"r"},"image":{"docker-manifest-digest":"d"},"type":"atomic container signature"},"optional":null}"#).is_err());
        assert!(parse(br#"{"critical":{"identity":{"docker-reference":"r"},"image":{"docker-manifest-digest":"d"},"type":"cosign container image signature","x":1},"optional":null}"#).is_err());
    }
}
