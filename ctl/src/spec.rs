//! Run spec files (YAML) -> the wire RunSpec. serde reports problems with their line and column;
//! quantities (timeouts, cpu, memory) are parsed during deserialisation so theirs do too.

use std::collections::BTreeMap;
use std::fmt;

use drover_proto::pb;
use drover_proto::quantity;
use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("{file}: {message}")]
    Yaml { file: String, message: String },
    #[error("{file}: {message}")]
    Invalid { file: String, message: String },
}

/// A run: either a list of `tasks`, or a single task written at the top level. (Fields are listed
/// out rather than flattened: serde loses line numbers and `deny_unknown_fields` under flatten.)
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RunFile {
    name: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    tasks: Vec<TaskFile>,
    /// binpack (default) or spread.
    strategy: Option<String>,
    command: Option<Vec<String>>,
    shell: Option<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    workdir: Option<String>,
    timeout: Option<DurationMs>,
    class: Option<String>,
    resources: Option<ResourcesFile>,
    affinity: Option<AffinityFile>,
    spread_by: Option<String>,
    priority: Option<i32>,
    queue: Option<String>,
    /// process (default) or noop.
    kind: Option<String>,
    noop_duration: Option<DurationMs>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TaskFile {
    name: Option<String>,
    /// argv list: `["echo", "hi"]`.
    command: Option<Vec<String>>,
    /// a string for `sh -c`.
    shell: Option<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    workdir: Option<String>,
    timeout: Option<DurationMs>,
    class: Option<String>,
    resources: Option<ResourcesFile>,
    affinity: Option<AffinityFile>,
    spread_by: Option<String>,
    priority: Option<i32>,
    queue: Option<String>,
    /// process (default) or noop.
    kind: Option<String>,
    noop_duration: Option<DurationMs>,
}

impl RunFile {
    /// The top-level task fields, if any are set.
    fn single_task(&mut self) -> Option<TaskFile> {
        let any = self.command.is_some()
            || self.shell.is_some()
            || !self.env.is_empty()
            || self.workdir.is_some()
            || self.timeout.is_some()
            || self.class.is_some()
            || self.resources.is_some()
            || self.affinity.is_some()
            || self.spread_by.is_some()
            || self.priority.is_some()
            || self.queue.is_some()
            || self.kind.is_some()
            || self.noop_duration.is_some();
        any.then(|| TaskFile {
            name: Some("main".into()),
            command: self.command.take(),
            shell: self.shell.take(),
            env: std::mem::take(&mut self.env),
            workdir: self.workdir.take(),
            timeout: self.timeout.take(),
            class: self.class.take(),
            resources: self.resources.take(),
            affinity: self.affinity.take(),
            spread_by: self.spread_by.take(),
            priority: self.priority.take(),
            queue: self.queue.take(),
            kind: self.kind.take(),
            noop_duration: self.noop_duration.take(),
        })
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ResourcesFile {
    cpu: Option<CpuMillis>,
    memory: Option<Bytes>,
    gpus: Option<u64>,
    #[serde(default)]
    extended: BTreeMap<String, u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AffinityFile {
    #[serde(default)]
    required: Vec<Expr>,
    #[serde(default)]
    preferred: Vec<PreferredFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PreferredFile {
    weight: i32,
    #[serde(rename = "match")]
    expression: Expr,
}

/// A label expression written as text (`zone = a`, `gpu exists`, ...).
#[derive(Debug)]
struct Expr(pb::LabelExpression);

impl<'de> Deserialize<'de> for Expr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        drover_proto::selector::parse(&text)
            .map(Expr)
            .map_err(de::Error::custom)
    }
}

#[derive(Debug)]
struct DurationMs(u64);
#[derive(Debug)]
struct CpuMillis(u64);
#[derive(Debug)]
struct Bytes(u64);

/// Accepts a string or a number and parses it with `parse`.
struct QuantityVisitor(fn(&str) -> Result<u64, String>, &'static str);

impl Visitor<'_> for QuantityVisitor {
    type Value = u64;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.1)
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
        (self.0)(v).map_err(E::custom)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
        (self.0)(&v.to_string()).map_err(E::custom)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
        (self.0)(&v.to_string()).map_err(E::custom)
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<u64, E> {
        (self.0)(&v.to_string()).map_err(E::custom)
    }
}

impl<'de> Deserialize<'de> for DurationMs {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(QuantityVisitor(
            |s| quantity::parse_duration(s).map(|d| d.as_millis() as u64),
            "a duration such as 30s, 5m or 1h30m",
        ))
        .map(DurationMs)
    }
}

impl<'de> Deserialize<'de> for CpuMillis {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(QuantityVisitor(
            quantity::parse_cpu_millis,
            "a cpu quantity such as 2, 0.5 or 500m",
        ))
        .map(CpuMillis)
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(QuantityVisitor(
            quantity::parse_bytes,
            "a byte quantity such as 512Mi or 4Gi",
        ))
        .map(Bytes)
    }
}

fn task_to_proto(name: String, f: TaskFile) -> pb::TaskSpec {
    pb::TaskSpec {
        name,
        argv: f.command.unwrap_or_default(),
        shell: f.shell.unwrap_or_default(),
        env: f.env.into_iter().collect(),
        workdir: f.workdir.unwrap_or_default(),
        timeout_ms: f.timeout.map_or(0, |d| d.0),
        class: f.class.unwrap_or_default(),
        resources: f.resources.map(|r| pb::Resources {
            cpu_millis: r.cpu.map_or(0, |c| c.0),
            memory_bytes: r.memory.map_or(0, |m| m.0),
            gpus: r.gpus.unwrap_or(0),
            extended: r.extended.into_iter().collect(),
        }),
        required: f
            .affinity
            .as_ref()
            .map(|a| a.required.iter().map(|e| e.0.clone()).collect())
            .unwrap_or_default(),
        preferred: f
            .affinity
            .as_ref()
            .map(|a| {
                a.preferred
                    .iter()
                    .map(|p| pb::WeightedExpression {
                        weight: p.weight,
                        expression: Some(p.expression.0.clone()),
                    })
                    .collect()
            })
            .unwrap_or_default(),
        spread_by: f.spread_by.unwrap_or_default(),
        priority: f.priority.unwrap_or(0),
        queue: f.queue.unwrap_or_default(),
        kind: f.kind.unwrap_or_default(),
        noop_duration_ms: f.noop_duration.map_or(0, |d| d.0),
    }
}

/// Parses a YAML run spec. `file` names the source in error messages.
pub fn parse(file: &str, text: &str) -> Result<pb::RunSpec, SpecError> {
    let mut run: RunFile = serde_norway::from_str(text).map_err(|e| SpecError::Yaml {
        file: file.to_owned(),
        message: e.to_string(),
    })?;
    let invalid = |message: &str| SpecError::Invalid {
        file: file.to_owned(),
        message: message.to_owned(),
    };
    let single = run.single_task();
    let tasks = match (run.tasks.is_empty(), single) {
        (false, None) => std::mem::take(&mut run.tasks)
            .into_iter()
            .enumerate()
            .map(|(i, t)| {
                let name = t.name.clone().unwrap_or_else(|| format!("task-{i}"));
                task_to_proto(name, t)
            })
            .collect(),
        (true, Some(t)) => vec![task_to_proto("main".into(), t)],
        (true, None) => {
            return Err(invalid(
                "no task: give `tasks:` (a list) or a top-level `command:` or `shell:`",
            ));
        }
        (false, Some(_)) => {
            return Err(invalid(
                "both `tasks:` and top-level task fields (command, shell, env, ...) are set; put them inside a task",
            ));
        }
    };
    Ok(pb::RunSpec {
        name: run.name.unwrap_or_default(),
        tasks,
        labels: run.labels.into_iter().collect(),
        strategy: run.strategy.unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_examples_parse() {
        // Guards: every file in examples/ stays a valid spec.
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples");
        let mut n = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "yaml") {
                let text = std::fs::read_to_string(&path).unwrap();
                let spec = parse(&path.display().to_string(), &text).unwrap();
                assert!(!spec.tasks.is_empty());
                n += 1;
            }
        }
        assert!(n >= 1);
    }

    #[test]
    fn malformed_yaml_names_line_and_column() {
        // Guards: a YAML syntax error points at the line and column.
        let err = parse("bad.yaml", "name: x\ntasks:\n  - shell: [unclosed\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("bad.yaml: "), "{err}");
        assert!(err.contains("line 3") || err.contains("line 4"), "{err}");
        assert!(err.contains("column"), "{err}");
    }

    #[test]
    fn bad_quantities_and_unknown_fields_name_their_place() {
        // Guards: semantic errors in quantities and typos in keys carry a location too.
        let err = parse("t.yaml", "tasks:\n  - shell: true\n    timeout: soon\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("not a duration") && err.contains("line 3"),
            "{err}"
        );
        let err = parse(
            "t.yaml",
            "tasks:\n  - shell: true\n    resources: {memory: lots}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("not a byte quantity") && err.contains("line 3"),
            "{err}"
        );
        let err = parse("t.yaml", "name: x\ncomand: [echo]\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("comand"), "{err}");
    }

    #[test]
    fn single_task_shorthand_and_lists() {
        // Guards: the two documented spec shapes.
        let one = parse(
            "a",
            "name: one\ncommand: [echo, hi]\ntimeout: 5s\nresources: {cpu: 500m, memory: 64Mi}\n",
        )
        .unwrap();
        assert_eq!(one.tasks.len(), 1);
        assert_eq!(one.tasks[0].argv, vec!["echo", "hi"]);
        assert_eq!(one.tasks[0].timeout_ms, 5000);
        assert_eq!(one.tasks[0].resources.as_ref().unwrap().cpu_millis, 500);
        let two = parse(
            "b",
            "tasks:\n  - {name: a, shell: 'true'}\n  - {name: b, command: ['false']}\n",
        )
        .unwrap();
        assert_eq!(two.tasks.len(), 2);
        assert!(parse("c", "name: empty\n").is_err());
    }

    #[test]
    fn placement_fields_parse_and_bad_expressions_name_their_line() {
        // Guards: affinity, spread, priority, queue and strategy in specs.
        let text = "strategy: spread\ntasks:\n  - name: a\n    shell: 'true'\n    priority: 5\n    queue: batch\n    spread_by: zone\n    affinity:\n      required: ['zone in (a, b)', 'gpu !exists']\n      preferred: [{weight: 20, match: 'disk = ssd'}]\n";
        let spec = parse("p.yaml", text).unwrap();
        let t = &spec.tasks[0];
        assert_eq!(spec.strategy, "spread");
        assert_eq!(
            (t.priority, t.queue.as_str(), t.spread_by.as_str()),
            (5, "batch", "zone")
        );
        assert_eq!(t.required.len(), 2);
        assert_eq!(t.required[0].op, "in");
        assert_eq!(t.preferred[0].weight, 20);
        let err = parse("p.yaml", "shell: 'true'\naffinity:\n  required: ['zone']\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no operator") && err.contains("line 3"),
            "{err}"
        );
    }
}
