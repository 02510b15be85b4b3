//! CycloneDX 1.5 JSON: the image is `metadata.component` (type `container`), the operating
//! system and the packages are `components`.

use serde_json::{json, Map, Value};

use super::spdx::{licence, Licence};
use super::{derived_uuid, Package, Sbom};

const IMAGE_REF: &str = "image";
const OS_REF: &str = "operating-system";

fn prop(name: &str, value: &str) -> Value {
    json!({"name": name, "value": value})
}

fn component(p: &Package) -> Value {
    let mut c = Map::new();
    c.insert("bom-ref".into(), json!(p.purl));
    c.insert("type".into(), json!("library"));
    if let Some(s) = &p.supplier {
        c.insert("supplier".into(), json!({"name": s}));
    }
    c.insert("name".into(), json!(p.name));
    c.insert("version".into(), json!(p.full_version()));
    match p.license.as_deref().map(licence) {
        Some(Licence::Expression(e)) => {
            c.insert("licenses".into(), json!([{"expression": e}]));
        }
        Some(Licence::Other(text)) => {
            c.insert("licenses".into(), json!([{"license": {"name": text}}]));
        }
        None => {}
    }
    c.insert("purl".into(), json!(p.purl));
    let mut props = vec![prop("wpimg:package:type", p.ecosystem.purl_type())];
    if let Some(a) = &p.arch {
        props.push(prop("wpimg:package:arch", a));
    }
    if let Some(src) = &p.source {
        props.push(prop("wpimg:package:source", &src.name));
        if let Some(v) = &src.version {
            props.push(prop("wpimg:package:source-version", v));
        }
    }
    c.insert("properties".into(), Value::Array(props));
    Value::Object(c)
}

/// The CycloneDX document of an SBOM.
pub(super) fn document(sbom: &Sbom) -> Value {
    let subject = &sbom.subject;
    let digest = subject.manifest.digest.to_string();
    let image = json!({
        "bom-ref": IMAGE_REF,
        "type": "container",
        "name": subject.name,
        "version": digest,
        "hashes": [{"alg": "SHA-256", "content": subject.manifest.digest.hex()}],
        "purl": subject.purl(),
        "properties": [prop("wpimg:image:platform", &subject.platform)],
    });
    let mut components = Vec::new();
    if let Some(os) = &sbom.inventory.os {
        let mut c = Map::new();
        c.insert("bom-ref".into(), json!(OS_REF));
        c.insert("type".into(), json!("operating-system"));
        c.insert("name".into(), json!(os.id));
        if let Some(v) = &os.version_id {
            c.insert("version".into(), json!(v));
        }
        if let Some(d) = &os.pretty_name {
            c.insert("description".into(), json!(d));
        }
        components.push(Value::Object(c));
    }
    components.extend(sbom.inventory.packages.iter().map(component));
    json!({
        "$schema": "http://cyclonedx.org/schema/bom-1.5.schema.json",
        "bomFormat": "CycloneDX",
        "specVersion": "1.5",
        "serialNumber": format!("urn:uuid:{}", derived_uuid("wpimg-cyclonedx", &digest)),
        "version": 1,
        "metadata": {
            "timestamp": subject.created,
            "tools": {"components": [{
                "type": "application",
                "name": "wpimg",
                "version": env!("CARGO_PKG_VERSION"),
            }]},
            "component": image,
        },
        "components": components,
    })
}
