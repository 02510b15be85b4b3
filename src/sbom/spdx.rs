//! SPDX 2.3 JSON: the image is the described package (`DESCRIBES`), it `CONTAINS` the
//! operating system and every installed package.

use serde_json::{json, Map, Value};

use super::{derived_uuid, tool_name, Package, Sbom};

const NOASSERTION: &str = "NOASSERTION";
const IMAGE_ID: &str = "SPDXRef-Image";
const OS_ID: &str = "SPDXRef-OperatingSystem";

/// A declared licence as SPDX sees it.
pub(super) enum Licence {
    /// A valid SPDX licence expression.
    Expression(String),
    /// Anything else (`GPLv2+`, free text), kept verbatim.
    Other(String),
}

/// Classify a declared licence string.
pub(super) fn licence(declared: &str) -> Licence {
    let s = declared.trim();
    match ::spdx::Expression::parse(s) {
        Ok(_) => Licence::Expression(s.to_string()),
        Err(_) => Licence::Other(s.to_string()),
    }
}

/// Characters allowed in SPDX ids and LicenseRefs: letters, digits, `.` and `-`.
fn id_safe(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect()
}

fn short_hash(s: &str) -> String {
    crate::oci::Digest::of_bytes(s.as_bytes()).hex()[..8].to_string()
}

fn licence_ref(text: &str) -> String {
    let mut name = id_safe(text);
    name.truncate(40);
    format!("LicenseRef-{}-{}", name.trim_matches('-'), short_hash(text))
}

fn package_id(p: &Package) -> String {
    format!(
        "SPDXRef-Package-{}-{}-{}",
        p.ecosystem.purl_type(),
        id_safe(&p.name),
        short_hash(&p.purl)
    )
}

fn purl_ref(purl: &str) -> Value {
    json!([{
        "referenceCategory": "PACKAGE-MANAGER",
        "referenceType": "purl",
        "referenceLocator": purl,
    }])
}

fn contains(id: &str) -> Value {
    json!({"spdxElementId": IMAGE_ID, "relationshipType": "CONTAINS", "relatedSpdxElement": id})
}

/// The SPDX document of an SBOM.
pub(super) fn document(sbom: &Sbom) -> Value {
    let subject = &sbom.subject;
    let digest = subject.manifest.digest.to_string();
    let mut packages = vec![json!({
        "name": subject.name,
        "SPDXID": IMAGE_ID,
        "versionInfo": digest,
        "downloadLocation": NOASSERTION,
        "filesAnalyzed": false,
        "checksums": [{"algorithm": "SHA256", "checksumValue": subject.manifest.digest.hex()}],
        "licenseConcluded": NOASSERTION,
        "licenseDeclared": NOASSERTION,
        "copyrightText": NOASSERTION,
        "externalRefs": purl_ref(&subject.purl()),
        "primaryPackagePurpose": "CONTAINER",
        "comment": format!("OCI image manifest {digest} ({})", subject.platform),
    })];
    let mut relationships = vec![json!({
        "spdxElementId": "SPDXRef-DOCUMENT",
        "relationshipType": "DESCRIBES",
        "relatedSpdxElement": IMAGE_ID,
    })];
    if let Some(os) = &sbom.inventory.os {
        let mut p = Map::new();
        p.insert("name".into(), json!(os.id));
        p.insert("SPDXID".into(), json!(OS_ID));
        if let Some(v) = &os.version_id {
            p.insert("versionInfo".into(), json!(v));
        }
        p.insert("downloadLocation".into(), json!(NOASSERTION));
        p.insert("filesAnalyzed".into(), json!(false));
        p.insert("licenseConcluded".into(), json!(NOASSERTION));
        p.insert("licenseDeclared".into(), json!(NOASSERTION));
        p.insert("copyrightText".into(), json!(NOASSERTION));
        if let Some(d) = &os.pretty_name {
            p.insert("description".into(), json!(d));
        }
        p.insert("primaryPackagePurpose".into(), json!("OPERATING-SYSTEM"));
        packages.push(Value::Object(p));
        relationships.push(contains(OS_ID));
    }
    let mut extracted: Vec<Value> = Vec::new();
    for pkg in &sbom.inventory.packages {
        let id = package_id(pkg);
        let declared = match pkg.license.as_deref().map(licence) {
            None => NOASSERTION.to_string(),
            Some(Licence::Expression(e)) => e,
            Some(Licence::Other(text)) => {
                let r = licence_ref(&text);
                if !extracted.iter().any(|e| e["licenseId"] == r.as_str()) {
                    extracted.push(json!({"licenseId": r, "extractedText": text, "name": text}));
                }
                r
            }
        };
        let mut p = Map::new();
        p.insert("name".into(), json!(pkg.name));
        p.insert("SPDXID".into(), json!(id));
        p.insert("versionInfo".into(), json!(pkg.full_version()));
        if let Some(s) = &pkg.supplier {
            p.insert("supplier".into(), json!(format!("Organization: {s}")));
        }
        p.insert("downloadLocation".into(), json!(NOASSERTION));
        p.insert("filesAnalyzed".into(), json!(false));
        if let Some(src) = &pkg.source {
            let v = src
                .version
                .as_deref()
                .map(|v| format!(" {v}"))
                .unwrap_or_default();
            p.insert(
                "sourceInfo".into(),
                json!(format!("built package from: {}{v}", src.name)),
            );
        }
        p.insert("licenseConcluded".into(), json!(NOASSERTION));
        p.insert("licenseDeclared".into(), json!(declared));
        p.insert("copyrightText".into(), json!(NOASSERTION));
        p.insert("externalRefs".into(), purl_ref(&pkg.purl));
        packages.push(Value::Object(p));
        relationships.push(contains(&id));
    }
    let mut doc = Map::new();
    doc.insert("spdxVersion".into(), json!("SPDX-2.3"));
    doc.insert("dataLicense".into(), json!("CC0-1.0"));
    doc.insert("SPDXID".into(), json!("SPDXRef-DOCUMENT"));
    doc.insert("name".into(), json!(format!("{}@{digest}", subject.name)));
    doc.insert(
        "documentNamespace".into(),
        json!(format!(
            "https://spdx.org/spdxdocs/wpimg/{}-{}",
            id_safe(&subject.name),
            derived_uuid("wpimg-spdx", &digest)
        )),
    );
    doc.insert(
        "creationInfo".into(),
        json!({"created": subject.created, "creators": [format!("Tool: {}", tool_name())]}),
    );
    doc.insert("packages".into(), Value::Array(packages));
    if !extracted.is_empty() {
        doc.insert("hasExtractedLicensingInfos".into(), Value::Array(extracted));
    }
    doc.insert("relationships".into(), Value::Array(relationships));
    Value::Object(doc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn licences_are_expressions_or_refs() {
        assert!(matches!(licence("MIT"), Licence::Expression(_)));
        assert!(matches!(
            licence("GPL-2.0-or-later AND LGPL-2.1-only"),
            Licence::Expression(_)
        ));
        assert!(matches!(licence("GPLv2+"), Licence::Other(_)));
        assert!(matches!(licence("Public Domain"), Licence::Other(_)));
        let r = licence_ref("GPLv2+ and (BSD or MIT)");
        assert!(r.starts_with("LicenseRef-GPLv2--and--BSD-or-MIT-"), "{r}");
        assert!(r
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-'));
    }
}
