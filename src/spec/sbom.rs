//! The `sbom:` key: `false` turns the SBOM off, `true` (the default when absent) keeps it on,
//! a mapping `{ format: spdx-json | cyclonedx-json }` picks the format of the attached document.
//!
//! Read through a visitor that accepts a boolean or a mapping, so a wrong value or an unknown
//! key becomes a located problem (reported by `validate`) instead of failing the whole document.

use std::fmt;

use schemars::JsonSchema;
use serde::de::{self, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::sbom::Format;

/// `sbom:` of image.yaml.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SbomSetting {
    /// Whether an SBOM is made for the built image.
    pub enabled: bool,
    /// The attached document's format (SPDX JSON when unset).
    pub format: Option<Format>,
    /// Keys of the mapping other than `format`.
    pub(crate) unknown_keys: Vec<String>,
    /// What the value was when it is neither a boolean nor a mapping.
    pub(crate) invalid: Option<String>,
}

impl Default for SbomSetting {
    fn default() -> Self {
        Self::on(None)
    }
}

impl SbomSetting {
    /// On, with an optional format.
    pub fn on(format: Option<Format>) -> Self {
        Self {
            enabled: true,
            format,
            unknown_keys: Vec::new(),
            invalid: None,
        }
    }

    /// Off (`sbom: false`).
    pub fn off() -> Self {
        Self {
            enabled: false,
            ..Self::on(None)
        }
    }

    /// The format of the attached document, `None` when the SBOM is off.
    pub fn attached_format(&self) -> Option<Format> {
        self.enabled.then(|| self.format.unwrap_or_default())
    }

    fn invalid(what: impl Into<String>) -> Self {
        Self {
            invalid: Some(what.into()),
            ..Self::on(None)
        }
    }
}

struct SbomVisitor;

impl<'de> Visitor<'de> for SbomVisitor {
    type Value = SbomSetting;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("false, true or a mapping { format: spdx-json | cyclonedx-json }")
    }

    fn visit_bool<E: de::Error>(self, b: bool) -> Result<SbomSetting, E> {
        Ok(if b {
            SbomSetting::on(None)
        } else {
            SbomSetting::off()
        })
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<SbomSetting, E> {
        match s {
            "true" => self.visit_bool(true),
            "false" => self.visit_bool(false),
            other => Ok(SbomSetting::invalid(format!("{other:?}"))),
        }
    }

    fn visit_i64<E: de::Error>(self, n: i64) -> Result<SbomSetting, E> {
        Ok(SbomSetting::invalid(format!("the number {n}")))
    }

    fn visit_u64<E: de::Error>(self, n: u64) -> Result<SbomSetting, E> {
        Ok(SbomSetting::invalid(format!("the number {n}")))
    }

    fn visit_f64<E: de::Error>(self, n: f64) -> Result<SbomSetting, E> {
        Ok(SbomSetting::invalid(format!("the number {n}")))
    }

    fn visit_unit<E: de::Error>(self) -> Result<SbomSetting, E> {
        Ok(SbomSetting::on(None))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, _seq: A) -> Result<SbomSetting, A::Error> {
        Ok(SbomSetting::invalid("a list"))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<SbomSetting, A::Error> {
        let mut setting = SbomSetting::on(None);
        while let Some(key) = map.next_key::<String>()? {
            if key == "format" {
                setting.format = map.next_value::<Option<Format>>()?;
            } else {
                map.next_value::<IgnoredAny>()?;
                setting.unknown_keys.push(key);
            }
        }
        Ok(setting)
    }
}

impl<'de> Deserialize<'de> for SbomSetting {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(SbomVisitor)
    }
}

impl Serialize for SbomSetting {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match (self.enabled, self.format) {
            (false, _) => s.serialize_bool(false),
            (true, None) => s.serialize_bool(true),
            (true, Some(f)) => {
                let mut m = s.serialize_map(Some(1))?;
                m.serialize_entry("format", &f)?;
                m.end()
            }
        }
    }
}

impl JsonSchema for SbomSetting {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Sbom".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "SBOM of the built image (on by default): false turns it off; \
                            { format: spdx-json | cyclonedx-json } picks the attached document's \
                            format (default spdx-json).",
            "anyOf": [
                { "type": "boolean" },
                { "type": "string", "pattern": ".*\\$\\{.*" },
                {
                    "type": "object",
                    "additionalProperties": false,
                    "properties": {
                        "format": { "type": "string", "enum": ["spdx-json", "cyclonedx-json"] }
                    }
                },
                { "type": "null" }
            ]
        })
    }
}
