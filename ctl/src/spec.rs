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
    #[serde(default, alias = "steps")]
    tasks: Vec<TaskFile>,
    #[serde(default)]
    params: BTreeMap<String, String>,
    /// fail_fast (default) or continue.
    on_failure: Option<String>,
    #[serde(default)]
    depends_on: Vec<String>,
    retries: Option<RetryFile>,
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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RetryFile {
    max: u32,
    /// exponential (default) or fixed.
    backoff: Option<String>,
    initial: Option<DurationMs>,
    max_delay: Option<DurationMs>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TaskFile {
    name: Option<String>,
    #[serde(default)]
    depends_on: Vec<String>,
    retries: Option<RetryFile>,
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
    /// The run written as one task at the top level (`command:` or `shell:` there).
    fn single_task(&mut self) -> Option<TaskFile> {
        (self.command.is_some() || self.shell.is_some()).then(|| TaskFile {
            name: Some("main".into()),
            depends_on: std::mem::take(&mut self.depends_on),
            retries: self.retries.take(),
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

    /// With a list of steps, the top-level step fields are defaults every step may override
    /// (env is merged, the step's entries winning).
    fn apply_defaults(&self, t: &mut TaskFile) {
        for (k, v) in &self.env {
            t.env.entry(k.clone()).or_insert_with(|| v.clone());
        }
        macro_rules! default {
            ($($f:ident),*) => {$(
                if t.$f.is_none() {
                    t.$f = self.$f.clone();
                }
            )*};
        }
        default!(
            retries,
            workdir,
            timeout,
            class,
            resources,
            affinity,
            spread_by,
            priority,
            queue,
            kind,
            noop_duration
        );
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ResourcesFile {
    /// The resource class (the same as a step's `class`).
    class: Option<String>,
    cpu: Option<CpuMillis>,
    memory: Option<Bytes>,
    gpus: Option<u64>,
    #[serde(default)]
    extended: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct AffinityFile {
    #[serde(default)]
    required: Vec<Expr>,
    #[serde(default)]
    preferred: Vec<PreferredFile>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct PreferredFile {
    weight: i32,
    #[serde(rename = "match", alias = "expr")]
    expression: Expr,
}

/// A label expression written as text (`zone = a`, `gpu exists`, ...).
#[derive(Debug, Clone)]
struct Expr(pb::LabelExpression);

impl<'de> Deserialize<'de> for Expr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        drover_proto::selector::parse(&text)
            .map(Expr)
            .map_err(de::Error::custom)
    }
}

#[derive(Debug, Clone)]
pub(crate) struct DurationMs(pub(crate) u64);
#[derive(Debug, Clone)]
struct CpuMillis(u64);
#[derive(Debug, Clone)]
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
    let class = f
        .class
        .or_else(|| f.resources.as_ref().and_then(|r| r.class.clone()));
    pb::TaskSpec {
        depends_on: f.depends_on,
        retry: f.retries.map(|r| pb::RetryPolicy {
            max: r.max,
            backoff: r.backoff.unwrap_or_default(),
            // A retry with no delay given waits a second, then doubles.
            initial_ms: r.initial.map_or(1000, |d| d.0),
            max_delay_ms: r.max_delay.map_or(0, |d| d.0),
        }),
        name,
        argv: f.command.unwrap_or_default(),
        shell: f.shell.unwrap_or_default(),
        env: f.env.into_iter().collect(),
        workdir: f.workdir.unwrap_or_default(),
        timeout_ms: f.timeout.map_or(0, |d| d.0),
        class: class.unwrap_or_default(),
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
            .map(|(i, mut t)| {
                run.apply_defaults(&mut t);
                let name = t.name.clone().unwrap_or_else(|| format!("step-{i}"));
                task_to_proto(name, t)
            })
            .collect(),
        (true, Some(t)) => vec![task_to_proto("main".into(), t)],
        (true, None) => {
            return Err(invalid(
                "no step: give `steps:` (a list) or a top-level `command:` or `shell:`",
            ));
        }
        (false, Some(_)) => {
            return Err(invalid(
                "both `steps:` and a top-level `command:` or `shell:` are set; put the command inside a step",
            ));
        }
    };
    Ok(pb::RunSpec {
        name: run.name.unwrap_or_default(),
        tasks,
        labels: run.labels.into_iter().collect(),
        strategy: run.strategy.unwrap_or_default(),
        params: run.params.into_iter().collect(),
        on_failure: run.on_failure.unwrap_or_default(),
    })
}

/// Sets `--param K=V` overrides on a parsed spec.
pub fn override_params(spec: &mut pb::RunSpec, overrides: &[(String, String)]) {
    for (k, v) in overrides {
        spec.params.insert(k.clone(), v.clone());
    }
}

/// Runs the coordinator's own checks on `spec` (field names, sizes, dependencies and cycles,
/// parameters), and names the place in `text` an error points at: its line, when the spec came
/// from YAML. What passes here passes the coordinator, which checks again.
pub fn check(file: &str, text: Option<&str>, spec: &pb::RunSpec) -> Result<(), SpecError> {
    match drover_coordinator::convert::run_spec_from_proto(Some(spec)) {
        Ok(_) => Ok(()),
        Err(drover_coordinator::error::CoordinatorError::InvalidArgument { field, message }) => {
            let (path, line) = locate(&field, spec, text);
            let at = line.map_or(String::new(), |l| format!(" (line {l})"));
            Err(SpecError::Invalid {
                file: file.to_owned(),
                message: format!("{path}{at}: {message}"),
            })
        }
        Err(e) => Err(SpecError::Invalid {
            file: file.to_owned(),
            message: e.to_string(),
        }),
    }
}

/// The coordinator's field path (`spec.tasks[2].argv[0]`) as the file writes it
/// (`steps[2] (extract).command[0]`), and the line of the step (or key) in `text`.
fn locate(field: &str, spec: &pb::RunSpec, text: Option<&str>) -> (String, Option<usize>) {
    let rest = field.strip_prefix("spec.").unwrap_or(field);
    let Some(after) = rest.strip_prefix("tasks[") else {
        let key = rest.split(['.', '[']).next().unwrap_or(rest);
        let line = text.and_then(|t| top_level_line(t, key));
        return (rest.to_owned(), line);
    };
    let Some((index, tail)) = after.split_once(']') else {
        return (rest.to_owned(), None);
    };
    let Ok(i) = index.parse::<usize>() else {
        return (rest.to_owned(), None);
    };
    let name = spec.tasks.get(i).map_or("", |t| t.name.as_str());
    let tail = tail.replacen(".argv", ".command", 1);
    let key = tail
        .trim_start_matches('.')
        .split(['.', '['])
        .next()
        .unwrap_or("")
        .replace("argv", "command");
    let line = text.and_then(|t| step_line(t, i, &key));
    (format!("steps[{i}] ({name}){tail}"), line)
}

/// Line (1-based) of a top-level `key:`.
fn top_level_line(text: &str, key: &str) -> Option<usize> {
    text.lines()
        .position(|l| l.starts_with(&format!("{key}:")))
        .map(|n| n + 1)
}

/// Line of step `index` of the block list under `steps:` (or `tasks:`), or of its `key:` when
/// the step has one. Flow-style lists (`[{...}]`) give the list's line.
fn step_line(text: &str, index: usize, key: &str) -> Option<usize> {
    let lines: Vec<&str> = text.lines().collect();
    let list = lines
        .iter()
        .position(|l| l.starts_with("steps:") || l.starts_with("tasks:"))?;
    let mut items = Vec::new();
    let mut indent = None;
    for (n, l) in lines.iter().enumerate().skip(list + 1) {
        let trimmed = l.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let lead = l.len() - trimmed.len();
        if lead == 0 && !trimmed.starts_with('-') {
            break;
        }
        if trimmed.starts_with("- ") || trimmed == "-" {
            match indent {
                None => {
                    indent = Some(lead);
                    items.push(n);
                }
                Some(i) if i == lead => items.push(n),
                _ => {}
            }
        }
    }
    let Some(&start) = items.get(index) else {
        return Some(list + 1);
    };
    let end = items.get(index + 1).copied().unwrap_or(lines.len());
    if !key.is_empty() {
        for (n, l) in lines.iter().enumerate().take(end).skip(start) {
            let t = l.trim_start().trim_start_matches("- ");
            if t.starts_with(&format!("{key}:")) {
                return Some(n + 1);
            }
        }
    }
    Some(start + 1)
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
                check(&path.display().to_string(), Some(&text), &spec).unwrap();
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

    /// The issue's own example: every field of a DAG spec.
    const ETL: &str = r#"name: nightly-etl
queue: etl
priority: 5
params: {DATE: "2026-11-01"}
env: {LOG_LEVEL: info}
on_failure: fail_fast
steps:
  - name: extract
    command: ["python3", "extract.py", "--date", "${DATE}"]
    resources: {cpu: 2000m, memory: 4Gi, class: cpu-large}
    affinity: {required: ["zone in (a,b)"], preferred: [{expr: "ssd=true", weight: 50}]}
    retries: {max: 3, backoff: exponential, initial: 1s, max_delay: 1m}
    timeout: 10m
  - name: transform
    depends_on: [extract]
    shell: "./transform.sh"
  - name: load
    depends_on: [transform]
    shell: "./load.sh"
"#;

    fn checked(text: &str) -> Result<pb::RunSpec, String> {
        let spec = parse("etl.yaml", text).map_err(|e| e.to_string())?;
        check("etl.yaml", Some(text), &spec).map_err(|e| e.to_string())?;
        Ok(spec)
    }

    #[test]
    fn a_dag_spec_parses_with_defaults_params_and_retries() {
        let spec = checked(ETL).unwrap();
        assert_eq!(spec.on_failure, "fail_fast");
        assert_eq!(spec.params["DATE"], "2026-11-01");
        let extract = &spec.tasks[0];
        assert_eq!(extract.class, "cpu-large");
        assert_eq!(extract.queue, "etl", "run-level defaults reach every step");
        assert_eq!(extract.priority, 5);
        assert_eq!(extract.env["LOG_LEVEL"], "info");
        let retry = extract.retry.as_ref().unwrap();
        assert_eq!(
            (retry.max, retry.initial_ms, retry.max_delay_ms),
            (3, 1000, 60_000)
        );
        assert_eq!(extract.preferred[0].weight, 50);
        assert_eq!(spec.tasks[2].depends_on, ["transform"]);
        assert_eq!(spec.tasks[2].queue, "etl");
    }

    fn error_of(text: &str) -> String {
        checked(text).unwrap_err()
    }

    #[test]
    fn a_cycle_is_named_with_its_line() {
        let text = ETL
            .replace(
                "    shell: \"./transform.sh\"",
                "    shell: \"./transform.sh\"\n    # loops\n",
            )
            .replace(
                "  - name: extract\n",
                "  - name: extract\n    depends_on: [load]\n",
            );
        let e = error_of(&text);
        assert!(
            e.contains("dependency cycle: extract -> transform -> load -> extract"),
            "{e}"
        );
        assert!(e.contains("steps[0] (extract).depends_on (line 9)"), "{e}");
    }

    #[test]
    fn unknown_and_duplicate_steps_name_the_field_and_line() {
        let e = error_of(&ETL.replace("depends_on: [transform]", "depends_on: [transfrom]"));
        assert!(e.contains("steps[2] (load).depends_on[0] (line 18)"), "{e}");
        assert!(e.contains("'transfrom', which is not a step"), "{e}");
        let e = error_of(&ETL.replace("name: load", "name: transform"));
        assert!(e.contains("steps[2] (transform).name (line 17)"), "{e}");
        assert!(e.contains("used by two"), "{e}");
    }

    #[test]
    fn empty_commands_and_undefined_params_are_refused_with_their_line() {
        let e = error_of(&ETL.replace("shell: \"./load.sh\"", "command: []"));
        assert!(e.contains("steps[2] (load).command (line 19)"), "{e}");
        let e = error_of(&ETL.replace("${DATE}", "${DAY}"));
        assert!(e.contains("steps[0] (extract).command[3] (line 9)"), "{e}");
        assert!(e.contains("${DAY} is not defined (params: DATE)"), "{e}");
        // A --param override defines it.
        let mut spec = parse("etl.yaml", &ETL.replace("${DATE}", "${DAY}")).unwrap();
        override_params(&mut spec, &[("DAY".into(), "mon".into())]);
        check("etl.yaml", None, &spec).unwrap();
    }

    #[test]
    fn bad_retry_and_failure_settings_are_refused() {
        let e = error_of(&ETL.replace("backoff: exponential", "backoff: linear"));
        assert!(e.contains("retry.backoff") && e.contains("'linear'"), "{e}");
        let e = error_of(&ETL.replace("max: 3,", "max: 1000,"));
        assert!(e.contains("retry.max"), "{e}");
        let e = error_of(&ETL.replace("initial: 1s", "initial: soon"));
        assert!(e.contains("not a duration") && e.contains("line 12"), "{e}");
        let e = error_of(&ETL.replace("on_failure: fail_fast", "on_failure: retry"));
        assert!(e.contains("on_failure (line 6)"), "{e}");
        let e = error_of(&ETL.replace("depends_on: [extract]", "depends_of: [extract]"));
        assert!(e.contains("depends_of") && e.contains("line 15"), "{e}");
    }
}
