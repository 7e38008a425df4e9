//! The optional config file shared by the coordinator and the agent. It is a YAML mapping whose
//! keys are the `DROVER_*` variable names without the prefix (`node-id: 1`,
//! `peers: [1=a:7101, 2=b:7101]`, `agent-name: w1`). Precedence is flags, then
//! `DROVER_*` environment variables, then the file: each key becomes the default of its
//! environment variable, and only where that variable is not already set.

use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    #[error("reading config file {path}: {cause}")]
    Read { path: String, cause: std::io::Error },
    #[error("config file {path}: {message}")]
    Parse { path: String, message: String },
}

/// The environment variable a config key stands for: `node-id` and `node_id` -> `DROVER_NODE_ID`.
pub fn env_name(key: &str) -> String {
    format!("DROVER_{}", key.replace('-', "_").to_uppercase())
}

/// Parses the file into (variable, value) pairs. Lists become comma-separated values, as the flags
/// accept them. A key the program does not know is an error, named with the known ones.
pub fn parse(
    path: &str,
    text: &str,
    known: &[&str],
) -> Result<Vec<(String, String)>, ConfigFileError> {
    let err = |message: String| ConfigFileError::Parse {
        path: path.to_owned(),
        message,
    };
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    let map: std::collections::BTreeMap<String, serde_norway::Value> =
        serde_norway::from_str(text).map_err(|e| err(e.to_string()))?;
    let mut out = Vec::new();
    for (key, value) in map {
        let var = env_name(&key);
        if !known.contains(&var.as_str()) {
            let names: Vec<String> = known
                .iter()
                .map(|k| {
                    k.trim_start_matches("DROVER_")
                        .to_lowercase()
                        .replace('_', "-")
                })
                .collect();
            return Err(err(format!(
                "unknown key '{key}' (known: {})",
                names.join(", ")
            )));
        }
        let scalar = |v: &serde_norway::Value| -> Result<String, ConfigFileError> {
            match v {
                serde_norway::Value::String(s) => Ok(s.clone()),
                serde_norway::Value::Number(n) => Ok(n.to_string()),
                serde_norway::Value::Bool(b) => Ok(b.to_string()),
                _ => Err(err(format!(
                    "'{key}' must be a string, number, boolean or a list of them"
                ))),
            }
        };
        let text = match &value {
            serde_norway::Value::Sequence(items) => items
                .iter()
                .map(scalar)
                .collect::<Result<Vec<_>, _>>()?
                .join(","),
            other => scalar(other)?,
        };
        out.push((var, text));
    }
    Ok(out)
}

/// Finds `--config FILE` (or `--config=FILE`, or `DROVER_CONFIG`) in the process arguments and
/// exports the file's settings as environment defaults. Call before starting any thread.
pub fn load_into_env(known: &[&str]) -> Result<(), ConfigFileError> {
    let args: Vec<String> = std::env::args().collect();
    let mut path = std::env::var("DROVER_CONFIG").ok();
    for (i, a) in args.iter().enumerate() {
        if a == "--config" {
            path = args.get(i + 1).cloned();
        } else if let Some(p) = a.strip_prefix("--config=") {
            path = Some(p.to_owned());
        }
    }
    let Some(path) = path else { return Ok(()) };
    let text =
        std::fs::read_to_string(Path::new(&path)).map_err(|cause| ConfigFileError::Read {
            path: path.clone(),
            cause,
        })?;
    for (var, value) in parse(&path, &text, known)? {
        if std::env::var_os(&var).is_none() {
            // SAFETY: called from `main` before the runtime or any other thread exists, so nothing
            // reads the environment concurrently.
            unsafe { std::env::set_var(&var, value) };
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_map_to_their_environment_variables() {
        // Guards: the documented file format and its error for unknown keys.
        let known = ["DROVER_NODE_ID", "DROVER_PEERS", "DROVER_DATA_DIR"];
        let vars = parse(
            "c.yaml",
            "node-id: 2\npeers: [1=a:1, 2=b:1]\ndata_dir: /var/lib/drover\n",
            &known,
        )
        .unwrap();
        assert_eq!(
            vars,
            vec![
                ("DROVER_DATA_DIR".to_owned(), "/var/lib/drover".to_owned()),
                ("DROVER_NODE_ID".to_owned(), "2".to_owned()),
                ("DROVER_PEERS".to_owned(), "1=a:1,2=b:1".to_owned()),
            ]
        );
        let e = parse("c.yaml", "nod-id: 2\n", &known)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown key 'nod-id'") && e.contains("node-id"),
            "{e}"
        );
        assert!(parse("c.yaml", "node-id: {a: 1}\n", &known).is_err());
    }
}
