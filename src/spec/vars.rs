//! Variables: `--var`, `--var-file`, `variables:` and the environment, `${VAR}` interpolation,
//! and which values must never be shown (those from the environment or a variables file).

use std::collections::BTreeMap;
use std::path::PathBuf;

/// Variable overrides from the command line.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--var KEY=VALUE` pairs (later wins).
    pub vars: Vec<(String, String)>,
    /// `--var-file FILE` paths (later wins; `--var` beats all files).
    pub var_files: Vec<PathBuf>,
}

impl Overrides {
    /// Parse a `KEY=VALUE` flag.
    pub fn parse_var(s: &str) -> Result<(String, String), String> {
        let (k, v) = s
            .split_once('=')
            .ok_or_else(|| format!("--var {s:?}: expected KEY=VALUE"))?;
        if !valid_var_name(k) {
            return Err(format!(
                "--var {k}=...: invalid variable name {k:?} (letters, digits, _; not starting with a digit)"
            ));
        }
        Ok((k.to_string(), v.to_string()))
    }
}

/// A variable's value, and whether it is secret (it came from the environment or a variables
/// file, or was made from such a value): secret values are shown as `<redacted>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Var {
    /// The value.
    pub value: String,
    /// Never shown.
    pub secret: bool,
}

/// Variables by name.
pub type Vars = BTreeMap<String, Var>;

/// Whether `k` is a valid variable name.
pub(crate) fn valid_var_name(k: &str) -> bool {
    !k.is_empty()
        && !k.starts_with(|c: char| c.is_ascii_digit())
        && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Expand `${VAR}` and `${VAR:-default}`; `$${` is a literal `${`.
pub fn interpolate(s: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let lookup = |name: &str| lookup(name).map(|value| (value, false));
    interpolate_tracked(s, &lookup, Mode::Expand).map(|e| e.value)
}

/// A value of image.yaml expanded at load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Expanded {
    /// The value (a template when it uses outputs).
    pub value: String,
    /// Whether a secret value went in.
    pub secret: bool,
    /// Whether it uses `${outputs.NAME}`: then it is kept as a template (its `${outputs...}`
    /// references and `$${` escapes as written) and resolved after provisioning.
    pub outputs: bool,
}

/// Expand `s` with `vars`, then the environment; `${outputs.NAME}` references are kept.
pub(crate) fn interpolate_vars(s: &str, vars: &Vars) -> Result<Expanded, String> {
    let lookup = |name: &str| match vars.get(name) {
        Some(v) => Some((v.value.clone(), v.secret)),
        None => std::env::var(name).ok().map(|v| (v, true)),
    };
    let e = interpolate_tracked(s, &lookup, Mode::KeepOutputs)?;
    match e.outputs {
        // A template: its `$${` stay escaped for the second pass.
        true => interpolate_tracked(s, &lookup, Mode::Template),
        false => Ok(e),
    }
}

/// How `${outputs.NAME}` and `$${` are treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Everything is a variable (outputs are not known here).
    Expand,
    /// `${outputs.NAME}` kept as written.
    KeepOutputs,
    /// `${outputs.NAME}` and `$${` kept as written.
    Template,
}

/// [`interpolate`] with a lookup that tells whether each value is secret.
fn interpolate_tracked(
    s: &str,
    lookup: &dyn Fn(&str) -> Option<(String, bool)>,
    mode: Mode,
) -> Result<Expanded, String> {
    let mut out = String::with_capacity(s.len());
    let mut secret = false;
    let mut outputs = false;
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix("${") {
            out.push_str(if mode == Mode::Template { "$${" } else { "${" });
            rest = tail;
            continue;
        }
        let Some(body_start) = after.strip_prefix('{') else {
            out.push('$');
            rest = after;
            continue;
        };
        let Some(end) = matching_brace(body_start) else {
            return Err(format!("unterminated \"${{\" in {s:?}"));
        };
        let body = &body_start[..end];
        let (name, default) = match body.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (body, None),
        };
        if let (Some(output), true) = (name.strip_prefix(OUTPUTS), mode != Mode::Expand) {
            check_output_reference(output, default, s)?;
            out.push_str("${");
            out.push_str(body);
            out.push('}');
            outputs = true;
            rest = &body_start[end + 1..];
            continue;
        }
        if !valid_var_name(name) {
            return Err(format!("invalid variable name {name:?} in {s:?}"));
        }
        match lookup(name).filter(|(v, _)| default.is_none() || !v.is_empty()) {
            Some((v, is_secret)) => {
                out.push_str(&v);
                secret |= is_secret;
            }
            None => match default {
                Some(d) => {
                    let e = interpolate_tracked(d, lookup, Mode::Expand)?;
                    out.push_str(&e.value);
                    secret |= e.secret;
                }
                None => {
                    return Err(format!(
                        "undefined variable ${{{name}}} (define it under variables:, pass --var {name}=..., set it in the environment, or write ${{{name}:-default}})"
                    ))
                }
            },
        }
        rest = &body_start[end + 1..];
    }
    out.push_str(rest);
    Ok(Expanded {
        value: out,
        secret,
        outputs,
    })
}

const OUTPUTS: &str = crate::outputs::PREFIX;

/// `${outputs.NAME[:-default]}` at load: a valid name, and a default of text and outputs only.
fn check_output_reference(name: &str, default: Option<&str>, s: &str) -> Result<(), String> {
    if !crate::outputs::valid_name(name) {
        return Err(format!(
            "invalid output name {name:?} in {s:?} (letters, digits, _)"
        ));
    }
    match default.map(crate::outputs::check_default) {
        Some(Err(_)) => Err(format!(
            "the default of ${{outputs.{name}:-...}} in {s:?} may hold only text and ${{outputs.NAME}} (variables are not expanded there)"
        )),
        _ => Ok(()),
    }
}

/// Index of the `}` closing a `${`, counting nested `${...}`.
pub(crate) fn matching_brace(s: &str) -> Option<usize> {
    let mut depth = 0usize;
    let b = s.as_bytes();
    for (i, &c) in b.iter().enumerate() {
        match c {
            b'{' if i > 0 && b[i - 1] == b'$' => depth += 1,
            b'}' if depth == 0 => return Some(i),
            b'}' => depth -= 1,
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interpolation_rules() {
        let look = |n: &str| (n == "A").then(|| "x".to_string());
        assert_eq!(interpolate("a${A}b", &look).unwrap(), "axb");
        assert_eq!(interpolate("${B:-d${A}}", &look).unwrap(), "dx");
        assert_eq!(interpolate("$HOME $${A}", &look).unwrap(), "$HOME ${A}");
        assert!(interpolate("${B}", &look)
            .unwrap_err()
            .contains("undefined variable ${B}"));
        assert!(interpolate("${A", &look).is_err());
    }

    #[test]
    fn secrets_are_tracked_through_interpolation() {
        let vars = Vars::from([
            (
                "pw".to_string(),
                Var {
                    value: "s3cret".into(),
                    secret: true,
                },
            ),
            (
                "tag".to_string(),
                Var {
                    value: "v1".into(),
                    secret: false,
                },
            ),
        ]);
        let e = |s: &str| {
            let e = interpolate_vars(s, &vars).unwrap();
            (e.value, e.secret)
        };
        assert_eq!(e("x-${tag}"), ("x-v1".into(), false));
        assert_eq!(e("${tag}:${pw}"), ("v1:s3cret".into(), true));
        assert_eq!(e("${nope:-${pw}}"), ("s3cret".into(), true));
        assert_eq!(e("${nope:-plain}"), ("plain".into(), false));
    }

    #[test]
    fn outputs_stay_placeholders_through_load() {
        let vars = Vars::from([(
            "v".to_string(),
            Var {
                value: "1".into(),
                secret: false,
            },
        )]);
        let e = interpolate_vars("${v}-${outputs.ver}-$${x}", &vars).unwrap();
        assert_eq!(e.value, "1-${outputs.ver}-$${x}");
        assert!(e.outputs && !e.secret);
        let e = interpolate_vars("${outputs.ver:-${outputs.b}}", &vars).unwrap();
        assert_eq!(e.value, "${outputs.ver:-${outputs.b}}");
        let plain = interpolate_vars("$${x}", &vars).unwrap();
        assert_eq!((plain.value.as_str(), plain.outputs), ("${x}", false));
        for bad in ["${outputs.a-b}", "${outputs.}", "${outputs.a:-${v}}"] {
            assert!(interpolate_vars(bad, &vars).is_err(), "{bad}");
        }
        // Outside image.yaml's values (no outputs there), an output is an unknown name.
        assert!(interpolate("${outputs.a}", &|_| None).is_err());
    }

    #[test]
    fn var_flags_never_echo_their_value() {
        let e = Overrides::parse_var("bad-name=s3cret").unwrap_err();
        assert!(!e.contains("s3cret"), "{e}");
        assert_eq!(
            Overrides::parse_var("a=b=c").unwrap(),
            ("a".to_string(), "b=c".to_string())
        );
    }
}
