//! Typing the located tree into image.yaml's structs with serde: a [`serde::Deserializer`]
//! over [`Node`]s that interpolates `${VAR}` in every string, checks integer ranges before
//! narrowing, refuses unknown and duplicate keys, and reports a missing required key (a field
//! that is not an `Option`). It never stops at the first problem: a wrong value is recorded
//! with its location and replaced by an empty one, so one pass finds every problem. It also
//! remembers where each key is (for later checks) and which values are secret.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;

use serde::de::{
    self, DeserializeSeed, Deserializer, EnumAccess, IntoDeserializer, MapAccess, SeqAccess,
    VariantAccess, Visitor,
};

use super::tree::{describe, Key, Node, Val};
use super::vars::{interpolate_vars, Vars};
use super::{KeyPath, Problem};

/// One typing pass: its variables, and what it found.
pub(crate) struct Typing<'a> {
    file: &'a Path,
    vars: &'a Vars,
    /// Problems under this path are not recorded (already reported by an earlier pass).
    quiet: Option<KeyPath>,
    problems: RefCell<Vec<Problem>>,
    locations: RefCell<BTreeMap<KeyPath, (u64, u64)>>,
    secret: RefCell<BTreeSet<KeyPath>>,
    outputs: RefCell<BTreeSet<KeyPath>>,
}

/// What a typing pass found besides the value.
pub(crate) struct Found {
    pub problems: Vec<Problem>,
    pub locations: BTreeMap<KeyPath, (u64, u64)>,
    pub secret: BTreeSet<KeyPath>,
    /// Values that use `${outputs.NAME}` (kept as templates).
    pub outputs: BTreeSet<KeyPath>,
}

impl<'a> Typing<'a> {
    pub fn new(file: &'a Path, vars: &'a Vars) -> Self {
        Self {
            file,
            vars,
            quiet: None,
            problems: RefCell::default(),
            locations: RefCell::default(),
            secret: RefCell::default(),
            outputs: RefCell::default(),
        }
    }

    /// Do not report problems under `path`.
    pub fn quiet(mut self, path: KeyPath) -> Self {
        self.quiet = Some(path);
        self
    }

    /// Type `node` (at `path`) as a `T`; `None` only if a visitor refused it outright (then
    /// that is the problem recorded).
    pub fn value<T: de::DeserializeOwned>(&self, node: &Node, path: KeyPath) -> Option<T> {
        match T::deserialize(self.at(node, path.clone())) {
            Ok(v) => Some(v),
            Err(e) => {
                self.problem(node.line, node.col, &path, e.to_string());
                None
            }
        }
    }

    /// The problems, locations and secret paths found.
    pub fn finish(self) -> Found {
        Found {
            problems: self.problems.into_inner(),
            locations: self.locations.into_inner(),
            secret: self.secret.into_inner(),
            outputs: self.outputs.into_inner(),
        }
    }

    fn problem(&self, line: u64, column: u64, path: &KeyPath, message: String) {
        if self.quiet.as_ref().is_some_and(|q| path.starts_with(q)) {
            return;
        }
        self.problems.borrow_mut().push(Problem {
            file: self.file.to_path_buf(),
            line,
            column,
            key: path.to_string(),
            message,
        });
    }

    fn at<'t>(&'t self, node: &'t Node, path: KeyPath) -> NodeDe<'a, 't> {
        self.locations
            .borrow_mut()
            .insert(path.clone(), (node.line, node.col));
        NodeDe {
            t: self,
            node: Some(node),
            absent: Absent::Present,
            path,
        }
    }
}

/// A value that is not in the document.
#[derive(Clone, Copy)]
enum Absent {
    /// It is there.
    Present,
    /// A missing key of the mapping at this location: required unless the field is an Option.
    Key { line: u64, col: u64 },
    /// Inside a value already reported (a missing or wrong section): no further problems.
    Silent,
}

/// The error of the typing deserializer; problems are recorded as they are found, so an error
/// only travels when a visitor itself refuses a value.
#[derive(Debug)]
pub(crate) struct DeError(String);

impl fmt::Display for DeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DeError {}

impl de::Error for DeError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        DeError(msg.to_string())
    }
}

/// What a visitor expects (`a string`, `a boolean`, ...), from its own `expecting`.
struct Expecting<'v, V>(&'v V);

impl<'de, V: Visitor<'de>> fmt::Display for Expecting<'_, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.expecting(f)
    }
}

/// The typing deserializer at one node.
struct NodeDe<'a, 't> {
    t: &'t Typing<'a>,
    node: Option<&'t Node>,
    absent: Absent,
    path: KeyPath,
}

impl<'a, 't> NodeDe<'a, 't> {
    fn problem(&self, message: String) {
        match (self.node, self.absent) {
            (Some(n), _) => self.t.problem(n.line, n.col, &self.path, message),
            (None, Absent::Key { line, col }) => self.t.problem(line, col, &self.path, message),
            _ => {}
        }
    }

    /// A missing value where one is needed: a required key (unless already silent).
    fn missing(&self) {
        if let Absent::Key { .. } = self.absent {
            let name = self.path.last_key().unwrap_or_default();
            self.problem(format!("required key {name:?} is missing"));
        }
    }

    fn wrong(&self, expected: &str) {
        match self.node {
            Some(n) => self.problem(format!("expected {expected}, got {}", describe(&n.v))),
            None => self.missing(),
        }
    }

    /// The node as text: strings interpolated (a secret value marks the path), scalars
    /// written out; `None` for anything else (nothing recorded) or a failed interpolation
    /// (recorded).
    fn text(&self) -> Option<Result<String, ()>> {
        match &self.node?.v {
            Val::Str(s) => Some(match interpolate_vars(s, self.t.vars) {
                Ok(e) => {
                    if e.secret {
                        self.t.secret.borrow_mut().insert(self.path.clone());
                    }
                    if e.outputs {
                        self.t.outputs.borrow_mut().insert(self.path.clone());
                    }
                    Ok(e.value)
                }
                Err(msg) => {
                    self.problem(msg);
                    Err(())
                }
            }),
            Val::Int(i) => Some(Ok(i.to_string())),
            Val::Bool(b) => Some(Ok(b.to_string())),
            Val::Float(x) => Some(Ok(x.to_string())),
            _ => None,
        }
    }

    /// An integer within `min..=max` (0, reported, when it is not one).
    fn integer(&self, min: i128, max: i128) -> i128 {
        let n = match self.node.map(|n| &n.v) {
            Some(Val::Int(i)) => *i as i128,
            Some(Val::Str(_)) => match self.text() {
                Some(Ok(s)) => match s.trim().parse::<i128>() {
                    Ok(i) => i,
                    Err(_) => {
                        self.problem(format!("expected an integer, got {s:?}"));
                        return 0;
                    }
                },
                _ => return 0,
            },
            _ => {
                self.wrong("an integer");
                return 0;
            }
        };
        if (min..=max).contains(&n) {
            n
        } else {
            self.problem(format!("{n} is out of range ({min}..={max})"));
            0
        }
    }

    fn child(&self, node: Option<&'t Node>, absent: Absent, path: KeyPath) -> NodeDe<'a, 't> {
        match node {
            Some(n) => self.t.at(n, path),
            None => NodeDe {
                t: self.t,
                node: None,
                absent,
                path,
            },
        }
    }

    fn silent_map(self) -> StructDe<'a, 't> {
        StructDe {
            de: self,
            entries: Vec::new(),
            next: 0,
            value: None,
        }
    }
}

macro_rules! integers {
    ($($method:ident $ty:ty => $visit:ident),* $(,)?) => {
        $(
            fn $method<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
                let n = self.integer(<$ty>::MIN as i128, <$ty>::MAX as i128);
                v.$visit(n as $ty)
            }
        )*
    };
}

impl<'de> Deserializer<'de> for NodeDe<'_, '_> {
    type Error = DeError;

    fn deserialize_any<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
        let Some(node) = self.node else {
            self.missing();
            return v.visit_unit();
        };
        match &node.v {
            Val::Null => v.visit_unit(),
            Val::Bool(b) => v.visit_bool(*b),
            Val::Int(i) => v.visit_i64(*i),
            Val::Float(x) => v.visit_f64(*x),
            Val::Str(_) => match self.text() {
                Some(Ok(s)) => v.visit_string(s),
                _ => v.visit_string(String::new()),
            },
            Val::Seq(items) => v.visit_seq(SeqDe {
                de: &self,
                items,
                next: 0,
            }),
            Val::Map(entries) => v.visit_map(MapDe::new(&self, entries)),
        }
    }

    fn deserialize_bool<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
        match self.node.map(|n| &n.v) {
            Some(Val::Bool(b)) => v.visit_bool(*b),
            Some(Val::Str(_)) => match self.text() {
                Some(Ok(s)) if s == "true" => v.visit_bool(true),
                Some(Ok(s)) if s == "false" => v.visit_bool(false),
                Some(Ok(s)) => {
                    self.problem(format!("expected true or false, got {s:?}"));
                    v.visit_bool(false)
                }
                _ => v.visit_bool(false),
            },
            _ => {
                self.wrong("a boolean");
                v.visit_bool(false)
            }
        }
    }

    integers!(
        deserialize_i8 i8 => visit_i8,
        deserialize_i16 i16 => visit_i16,
        deserialize_i32 i32 => visit_i32,
        deserialize_i64 i64 => visit_i64,
        deserialize_u8 u8 => visit_u8,
        deserialize_u16 u16 => visit_u16,
        deserialize_u32 u32 => visit_u32,
        deserialize_u64 u64 => visit_u64,
    );

    fn deserialize_f32<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
        self.deserialize_f64(v)
    }

    fn deserialize_f64<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
        match self.node.map(|n| &n.v) {
            Some(Val::Float(x)) => v.visit_f64(*x),
            Some(Val::Int(i)) => v.visit_f64(*i as f64),
            Some(Val::Str(_)) => match self.text() {
                Some(Ok(s)) => match s.trim().parse::<f64>() {
                    Ok(x) => v.visit_f64(x),
                    Err(_) => {
                        self.problem(format!("expected a number, got {s:?}"));
                        v.visit_f64(0.0)
                    }
                },
                _ => v.visit_f64(0.0),
            },
            _ => {
                self.wrong("a number");
                v.visit_f64(0.0)
            }
        }
    }

    fn deserialize_char<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
        self.deserialize_string(v)
    }

    fn deserialize_str<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
        self.deserialize_string(v)
    }

    fn deserialize_string<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
        match self.text() {
            Some(Ok(s)) => v.visit_string(s),
            Some(Err(())) => v.visit_string(String::new()),
            None => {
                self.wrong(&Expecting(&v).to_string());
                v.visit_string(String::new())
            }
        }
    }

    fn deserialize_bytes<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
        self.deserialize_any(v)
    }

    fn deserialize_byte_buf<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
        self.deserialize_any(v)
    }

    fn deserialize_option<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
        match self.node.map(|n| &n.v) {
            None | Some(Val::Null) => v.visit_none(),
            Some(_) => v.visit_some(self),
        }
    }

    fn deserialize_unit<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
        v.visit_unit()
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        v: V,
    ) -> Result<V::Value, DeError> {
        v.visit_unit()
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        v: V,
    ) -> Result<V::Value, DeError> {
        v.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
        if let Some(Val::Seq(items)) = self.node.map(|n| &n.v) {
            return v.visit_seq(SeqDe {
                de: &self,
                items,
                next: 0,
            });
        }
        let probe = RefCell::new(String::new());
        let out = v.visit_seq(ProbeSeq(&probe))?;
        let items = plural(&probe.borrow());
        self.wrong(&format!("a list of {items}"));
        Ok(out)
    }

    fn deserialize_tuple<V: Visitor<'de>>(self, _len: usize, v: V) -> Result<V::Value, DeError> {
        self.deserialize_seq(v)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _len: usize,
        v: V,
    ) -> Result<V::Value, DeError> {
        self.deserialize_seq(v)
    }

    fn deserialize_map<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
        match self.node.map(|n| &n.v) {
            Some(Val::Map(entries)) => v.visit_map(MapDe::new(&self, entries)),
            Some(Val::Null) => v.visit_map(MapDe::new(&self, &[])),
            _ => {
                self.wrong("a mapping");
                v.visit_map(MapDe::new(&self, &[]))
            }
        }
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, DeError> {
        let map = match self.node.map(|n| &n.v) {
            Some(Val::Map(entries)) => StructDe::new(self, entries, fields),
            Some(_) => {
                self.wrong("a mapping");
                StructDe::absent(self.silent_map(), fields, Absent::Silent)
            }
            None => {
                self.missing();
                StructDe::absent(self.silent_map(), fields, Absent::Silent)
            }
        };
        v.visit_map(map)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        variants: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, DeError> {
        let first = variants.first().copied().unwrap_or_default();
        let chosen = match self.text() {
            Some(Ok(s)) => match variants.iter().find(|x| **x == s) {
                Some(x) => x,
                None => {
                    self.problem(format!(
                        "unknown value {s:?} (expected one of: {})",
                        variants.join(", ")
                    ));
                    first
                }
            },
            Some(Err(())) => first,
            None => {
                self.wrong(&format!("one of: {}", variants.join(", ")));
                first
            }
        };
        v.visit_enum(UnitVariant(chosen))
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
        self.deserialize_string(v)
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
        v.visit_unit()
    }
}

/// `a string` → `strings`, `i32` → `integers`.
fn plural(expecting: &str) -> String {
    let noun = expecting
        .strip_prefix("an ")
        .or_else(|| expecting.strip_prefix("a "))
        .unwrap_or(expecting);
    match noun {
        "" => "values".into(),
        "i8" | "i16" | "i32" | "i64" | "u8" | "u16" | "u32" | "u64" => "integers".into(),
        n => format!("{n}s"),
    }
}

/// Learns what a sequence's elements are, then ends empty.
struct ProbeSeq<'p>(&'p RefCell<String>);

impl<'de> SeqAccess<'de> for ProbeSeq<'_> {
    type Error = DeError;
    fn next_element_seed<S: DeserializeSeed<'de>>(
        &mut self,
        seed: S,
    ) -> Result<Option<S::Value>, DeError> {
        let _ = seed.deserialize(Probe(self.0));
        Ok(None)
    }
}

/// Records what is asked of it, then refuses.
struct Probe<'p>(&'p RefCell<String>);

impl<'de> Deserializer<'de> for Probe<'_> {
    type Error = DeError;
    fn deserialize_any<V: Visitor<'de>>(self, v: V) -> Result<V::Value, DeError> {
        *self.0.borrow_mut() = Expecting(&v).to_string();
        Err(DeError("probe".into()))
    }
    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        _v: V,
    ) -> Result<V::Value, DeError> {
        *self.0.borrow_mut() = "a mapping".into();
        Err(DeError("probe".into()))
    }
    fn deserialize_map<V: Visitor<'de>>(self, _v: V) -> Result<V::Value, DeError> {
        *self.0.borrow_mut() = "a mapping".into();
        Err(DeError("probe".into()))
    }
    fn deserialize_seq<V: Visitor<'de>>(self, _v: V) -> Result<V::Value, DeError> {
        *self.0.borrow_mut() = "a list".into();
        Err(DeError("probe".into()))
    }
    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct tuple tuple_struct enum identifier ignored_any
    }
}

/// A sequence's items.
struct SeqDe<'d, 'a, 't> {
    de: &'d NodeDe<'a, 't>,
    items: &'t [Node],
    next: usize,
}

impl<'de> SeqAccess<'de> for SeqDe<'_, '_, '_> {
    type Error = DeError;
    fn next_element_seed<S: DeserializeSeed<'de>>(
        &mut self,
        seed: S,
    ) -> Result<Option<S::Value>, DeError> {
        let Some(item) = self.items.get(self.next) else {
            return Ok(None);
        };
        let path = self.de.path.index(self.next);
        self.next += 1;
        seed.deserialize(self.de.t.at(item, path)).map(Some)
    }
    fn size_hint(&self) -> Option<usize> {
        Some(self.items.len() - self.next)
    }
}

/// The entries of a mapping typed as a map (any keys); a repeated key is reported and skipped.
struct MapDe<'d, 'a, 't> {
    de: &'d NodeDe<'a, 't>,
    entries: Vec<&'t (Key, Node)>,
    next: usize,
}

impl<'d, 'a, 't> MapDe<'d, 'a, 't> {
    fn new(de: &'d NodeDe<'a, 't>, all: &'t [(Key, Node)]) -> Self {
        let mut entries: Vec<&'t (Key, Node)> = Vec::new();
        for e in all {
            if entries.iter().any(|(k, _)| k.name == e.0.name) {
                let path = de.path.key(&e.0.name);
                de.t.problem(e.0.line, e.0.col, &path, "duplicate key".into());
            } else {
                entries.push(e);
            }
        }
        Self {
            de,
            entries,
            next: 0,
        }
    }
}

impl<'de> MapAccess<'de> for MapDe<'_, '_, '_> {
    type Error = DeError;
    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, DeError> {
        let Some((k, _)) = self.entries.get(self.next) else {
            return Ok(None);
        };
        seed.deserialize(k.name.clone().into_deserializer())
            .map(Some)
    }
    fn next_value_seed<S: DeserializeSeed<'de>>(&mut self, seed: S) -> Result<S::Value, DeError> {
        let (k, v) = self.entries[self.next];
        self.next += 1;
        seed.deserialize(self.de.t.at(v, self.de.path.key(&k.name)))
    }
}

/// The entries of a mapping typed as a struct: unknown and repeated keys reported and
/// skipped, then every field the mapping lacks (absent: an `Option` takes it as `None`, any
/// other field reports a missing required key).
struct StructDe<'a, 't> {
    de: NodeDe<'a, 't>,
    entries: Vec<(&'static str, Option<&'t Node>, Absent)>,
    next: usize,
    value: Option<(Option<&'t Node>, Absent, &'static str)>,
}

impl<'a, 't> StructDe<'a, 't> {
    fn new(de: NodeDe<'a, 't>, all: &'t [(Key, Node)], fields: &'static [&'static str]) -> Self {
        let mut entries = Vec::new();
        for (k, v) in all {
            let path = de.path.key(&k.name);
            match fields.iter().find(|f| **f == k.name) {
                None => de.t.problem(
                    k.line,
                    k.col,
                    &path,
                    format!(
                        "unknown key {:?} (expected one of: {})",
                        k.name,
                        fields.join(", ")
                    ),
                ),
                Some(f) if entries.iter().any(|(e, _, _)| e == f) => {
                    de.t.problem(k.line, k.col, &path, "duplicate key".into())
                }
                Some(f) => entries.push((*f, Some(v), Absent::Present)),
            }
        }
        let (line, col) = de.node.map_or((0, 0), |n| (n.line, n.col));
        let missing = Absent::Key { line, col };
        Self::absent(
            StructDe {
                de,
                entries,
                next: 0,
                value: None,
            },
            fields,
            missing,
        )
    }

    /// Add every field not given as absent.
    fn absent(mut self, fields: &'static [&'static str], how: Absent) -> Self {
        for f in fields {
            if !self.entries.iter().any(|(e, _, _)| e == f) {
                self.entries.push((f, None, how));
            }
        }
        self
    }
}

impl<'de> MapAccess<'de> for StructDe<'_, '_> {
    type Error = DeError;
    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, DeError> {
        let Some((name, node, absent)) = self.entries.get(self.next).copied() else {
            return Ok(None);
        };
        self.next += 1;
        self.value = Some((node, absent, name));
        seed.deserialize(name.into_deserializer()).map(Some)
    }
    fn next_value_seed<S: DeserializeSeed<'de>>(&mut self, seed: S) -> Result<S::Value, DeError> {
        let (node, absent, name) = self
            .value
            .take()
            .ok_or_else(|| DeError("value asked before its key".into()))?;
        let child = self.de.child(node, absent, self.de.path.key(name));
        seed.deserialize(child)
    }
}

/// A unit variant chosen by name.
struct UnitVariant(&'static str);

impl<'de> EnumAccess<'de> for UnitVariant {
    type Error = DeError;
    type Variant = Self;
    fn variant_seed<S: DeserializeSeed<'de>>(self, seed: S) -> Result<(S::Value, Self), DeError> {
        let v = seed.deserialize(self.0.into_deserializer())?;
        Ok((v, self))
    }
}

impl<'de> VariantAccess<'de> for UnitVariant {
    type Error = DeError;
    fn unit_variant(self) -> Result<(), DeError> {
        Ok(())
    }
    fn newtype_variant_seed<S: DeserializeSeed<'de>>(self, _seed: S) -> Result<S::Value, DeError> {
        Err(DeError(format!("{} takes no value", self.0)))
    }
    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, _v: V) -> Result<V::Value, DeError> {
        Err(DeError(format!("{} takes no value", self.0)))
    }
    fn struct_variant<V: Visitor<'de>>(
        self,
        _fields: &'static [&'static str],
        _v: V,
    ) -> Result<V::Value, DeError> {
        Err(DeError(format!("{} takes no value", self.0)))
    }
}
