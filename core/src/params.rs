//! `${NAME}` parameters in a run's steps: substituted from the run's params (after `--param`
//! overrides) into commands, shell strings, environment values and working directories.
//! `$${` writes a literal `${` (for shell variables with braces); `$NAME` is left alone.

use std::collections::BTreeMap;

/// `text` with every `${NAME}` replaced. The error names the first undefined parameter.
pub fn substitute(text: &str, params: &BTreeMap<String, String>) -> Result<String, String> {
    if !text.contains("${") {
        return Ok(text.to_owned());
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at..];
        if let Some(escaped) = after.strip_prefix("$${") {
            out.push_str("${");
            rest = escaped;
        } else if let Some(inner) = after.strip_prefix("${") {
            let Some(end) = inner.find('}') else {
                return Err(format!("'${{' without a closing '}}' in \"{text}\""));
            };
            let name = &inner[..end];
            match params.get(name) {
                Some(v) => out.push_str(v),
                None => {
                    let known: Vec<&str> = params.keys().map(String::as_str).collect();
                    return Err(if known.is_empty() {
                        format!("parameter ${{{name}}} is not defined (the run has no params)")
                    } else {
                        format!(
                            "parameter ${{{name}}} is not defined (params: {})",
                            known.join(", ")
                        )
                    });
                }
            }
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = &after[1..];
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// Whether `name` may be a parameter name: a letter or `_`, then letters, digits and `_`.
pub fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.len() <= 64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> BTreeMap<String, String> {
        [("DATE".to_owned(), "2026-11-01".to_owned())].into()
    }

    #[test]
    fn names_are_replaced_and_escapes_kept_literal() {
        assert_eq!(
            substitute("--date=${DATE} $${HOME} $PATH $", &params()).unwrap(),
            "--date=2026-11-01 ${HOME} $PATH $"
        );
    }

    #[test]
    fn an_undefined_or_unclosed_name_is_an_error_naming_it() {
        let e = substitute("${DAY}", &params()).unwrap_err();
        assert!(e.contains("${DAY} is not defined (params: DATE)"), "{e}");
        assert!(
            substitute("${DATE", &params())
                .unwrap_err()
                .contains("closing")
        );
    }
}
