//! The located YAML tree: every node keeps its line and column (from serde-saphyr's spans),
//! so every later problem can name `file:line:col`.

use std::fmt;
use std::path::Path;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_saphyr::Spanned;

use super::Problem;

/// A YAML node with its location.
#[derive(Debug, Clone)]
pub(crate) struct Node {
    pub line: u64,
    pub col: u64,
    pub v: Val,
}

/// A YAML value.
#[derive(Debug, Clone)]
pub(crate) enum Val {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    Map(Vec<(Key, Node)>),
}

/// A mapping key with its location.
#[derive(Debug, Clone)]
pub(crate) struct Key {
    pub name: String,
    pub line: u64,
    pub col: u64,
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = Spanned::<Val>::deserialize(d)?;
        Ok(Node {
            line: s.referenced.line(),
            col: s.referenced.column(),
            v: s.value,
        })
    }
}

impl<'de> Deserialize<'de> for Val {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Val;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any YAML value")
            }
            fn visit_unit<E: de::Error>(self) -> Result<Val, E> {
                Ok(Val::Null)
            }
            fn visit_none<E: de::Error>(self) -> Result<Val, E> {
                Ok(Val::Null)
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Val, D::Error> {
                Val::deserialize(d)
            }
            fn visit_bool<E: de::Error>(self, b: bool) -> Result<Val, E> {
                Ok(Val::Bool(b))
            }
            fn visit_i64<E: de::Error>(self, i: i64) -> Result<Val, E> {
                Ok(Val::Int(i))
            }
            fn visit_u64<E: de::Error>(self, i: u64) -> Result<Val, E> {
                i64::try_from(i)
                    .map(Val::Int)
                    .or_else(|_| Ok(Val::Str(i.to_string())))
            }
            fn visit_f64<E: de::Error>(self, x: f64) -> Result<Val, E> {
                Ok(Val::Float(x))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Val, E> {
                Ok(Val::Str(s.to_string()))
            }
            fn visit_string<E: de::Error>(self, s: String) -> Result<Val, E> {
                Ok(Val::Str(s))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Val, A::Error> {
                let mut v = Vec::new();
                while let Some(n) = a.next_element::<Node>()? {
                    v.push(n);
                }
                Ok(Val::Seq(v))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut a: A) -> Result<Val, A::Error> {
                let mut v = Vec::new();
                while let Some(k) = a.next_key::<Spanned<KeyStr>>()? {
                    let n = a.next_value::<Node>()?;
                    v.push((
                        Key {
                            name: k.value.0,
                            line: k.referenced.line(),
                            col: k.referenced.column(),
                        },
                        n,
                    ));
                }
                Ok(Val::Map(v))
            }
        }
        d.deserialize_any(V)
    }
}

/// A mapping key: any scalar, as text.
struct KeyStr(String);

impl<'de> Deserialize<'de> for KeyStr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = KeyStr;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a scalar mapping key")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<KeyStr, E> {
                Ok(KeyStr(s.to_string()))
            }
            fn visit_i64<E: de::Error>(self, i: i64) -> Result<KeyStr, E> {
                Ok(KeyStr(i.to_string()))
            }
            fn visit_u64<E: de::Error>(self, i: u64) -> Result<KeyStr, E> {
                Ok(KeyStr(i.to_string()))
            }
            fn visit_bool<E: de::Error>(self, b: bool) -> Result<KeyStr, E> {
                Ok(KeyStr(b.to_string()))
            }
            fn visit_f64<E: de::Error>(self, x: f64) -> Result<KeyStr, E> {
                Ok(KeyStr(x.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

/// Parse YAML text into a located tree; a syntax error is one problem with its location.
pub(crate) fn parse_tree(file: &Path, text: &str) -> Result<Node, Problem> {
    let mut options = serde_saphyr::Options::default();
    options.strict_booleans = true;
    options.leading_zero_numbers_as_strings = true;
    options.with_snippet = false;
    serde_saphyr::from_str_with_options::<Node>(text, options).map_err(|e| {
        let (line, column) = e
            .location()
            .map(|l| (l.line(), l.column()))
            .unwrap_or((0, 0));
        let msg = e.to_string();
        // serde-saphyr may append a source snippet; the first line is the message.
        let first = msg.lines().next().unwrap_or("invalid YAML").to_string();
        Problem {
            file: file.to_path_buf(),
            line,
            column,
            key: String::new(),
            message: format!("invalid YAML: {first}"),
        }
    })
}

/// How a value reads in messages (`a list`, `a mapping`, ...).
pub(crate) fn describe(v: &Val) -> &'static str {
    match v {
        Val::Null => "null",
        Val::Bool(_) => "a boolean",
        Val::Int(_) => "an integer",
        Val::Float(_) => "a number",
        Val::Str(_) => "a string",
        Val::Seq(_) => "a list",
        Val::Map(_) => "a mapping",
    }
}
