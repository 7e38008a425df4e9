//! Label expressions as people write them: `zone = a`, `zone != b`, `zone in (a, b)`,
//! `zone not in (a, b)`, `gpu exists`, `gpu !exists` (also `!gpu`). Shared by the CLI (parsing specs)
//! and the coordinator (validating and matching).

use crate::pb::LabelExpression;

pub const OPS: [&str; 6] = ["=", "!=", "in", "not in", "exists", "!exists"];

fn valid_key(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= 63
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b))
}

fn expr(key: &str, op: &str, values: Vec<String>) -> LabelExpression {
    LabelExpression {
        key: key.to_owned(),
        op: op.to_owned(),
        values,
    }
}

pub fn parse(text: &str) -> Result<LabelExpression, String> {
    let t = text.trim();
    let bad = |why: &str| {
        format!(
            "'{text}': {why} (forms: k = v, k != v, k in (a, b), k not in (a, b), k exists, k !exists)"
        )
    };
    if let Some(k) = t.strip_prefix('!') {
        let k = k.trim();
        return if valid_key(k) {
            Ok(expr(k, "!exists", vec![]))
        } else {
            Err(bad("bad label key"))
        };
    }
    let list = |rest: &str| -> Result<Vec<String>, String> {
        let inner = rest
            .trim()
            .strip_prefix('(')
            .and_then(|r| r.strip_suffix(')'))
            .ok_or_else(|| bad("a list must be in parentheses"))?;
        let values: Vec<String> = inner
            .split(',')
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
            .collect();
        if values.is_empty() {
            return Err(bad("empty list"));
        }
        Ok(values)
    };
    let (key, op, values) = if let Some((k, v)) = t.split_once("!=") {
        (k.trim(), "!=", vec![v.trim().to_owned()])
    } else if let Some((k, v)) = t.split_once('=') {
        (k.trim(), "=", vec![v.trim().to_owned()])
    } else if let Some((k, rest)) = t.split_once(" not in ") {
        (k.trim(), "not in", list(rest)?)
    } else if let Some((k, rest)) = t.split_once(" in ") {
        (k.trim(), "in", list(rest)?)
    } else if let Some(k) = t.strip_suffix(" !exists") {
        (k.trim(), "!exists", vec![])
    } else if let Some(k) = t.strip_suffix(" exists") {
        (k.trim(), "exists", vec![])
    } else {
        return Err(bad("no operator"));
    };
    if !valid_key(key) {
        return Err(bad("bad label key"));
    }
    if (op == "=" || op == "!=") && values[0].is_empty() {
        return Err(bad("missing value"));
    }
    Ok(expr(key, op, values))
}

/// Renders an expression back to the text form.
pub fn display(e: &LabelExpression) -> String {
    match e.op.as_str() {
        "=" | "!=" => format!(
            "{} {} {}",
            e.key,
            e.op,
            e.values.first().map(String::as_str).unwrap_or("")
        ),
        "in" | "not in" => format!("{} {} ({})", e.key, e.op, e.values.join(", ")),
        op => format!("{} {op}", e.key),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_documented_form_parses_and_round_trips() {
        // Guards: the expression syntax in the README.
        for (text, op) in [
            ("zone = a", "="),
            ("zone!=b", "!="),
            ("zone in (a, b)", "in"),
            ("zone not in (a,b)", "not in"),
            ("gpu exists", "exists"),
            ("gpu !exists", "!exists"),
            ("!gpu", "!exists"),
        ] {
            let e = parse(text).unwrap();
            assert_eq!(e.op, op, "{text}");
            assert_eq!(parse(&display(&e)).unwrap(), e);
        }
        assert!(parse("zone").is_err());
        assert!(parse("zone in a, b").is_err());
        assert!(parse("= a").is_err());
        assert!(parse("zone =").is_err());
    }
}
