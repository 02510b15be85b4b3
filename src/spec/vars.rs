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
    interpolate_tracked(s, &|name| lookup(name).map(|value| (value, false))).map(|(v, _)| v)
}

/// Expand `s` with `vars`, then the environment; also says whether a secret value went in.
pub(crate) fn interpolate_vars(s: &str, vars: &Vars) -> Result<(String, bool), String> {
    interpolate_tracked(s, &|name| match vars.get(name) {
        Some(v) => Some((v.value.clone(), v.secret)),
        None => std::env::var(name).ok().map(|v| (v, true)),
    })
}

/// [`interpolate`] with a lookup that tells whether each value is secret.
fn interpolate_tracked(
    s: &str,
    lookup: &dyn Fn(&str) -> Option<(String, bool)>,
) -> Result<(String, bool), String> {
    let mut out = String::with_capacity(s.len());
    let mut secret = false;
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix("${") {
            out.push_str("${");
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
                    let (v, s) = interpolate_tracked(d, lookup)?;
                    out.push_str(&v);
                    secret |= s;
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
    Ok((out, secret))
}

/// Index of the `}` closing a `${`, counting nested `${...}`.
fn matching_brace(s: &str) -> Option<usize> {
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
        assert_eq!(
            interpolate_vars("x-${tag}", &vars).unwrap(),
            ("x-v1".into(), false)
        );
        assert_eq!(
            interpolate_vars("${tag}:${pw}", &vars).unwrap(),
            ("v1:s3cret".into(), true)
        );
        assert_eq!(
            interpolate_vars("${nope:-${pw}}", &vars).unwrap(),
            ("s3cret".into(), true)
        );
        assert_eq!(
            interpolate_vars("${nope:-plain}", &vars).unwrap(),
            ("plain".into(), false)
        );
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
