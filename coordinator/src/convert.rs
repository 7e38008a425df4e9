//! proto <-> domain, in one place. Incoming specs are validated here; errors name the field path.

use std::collections::BTreeMap;

use drover_proto::pb;

use crate::error::CoordinatorError;
use crate::limits;
use crate::model::{
    Agent, AgentState, Backoff, DeadLetter, LabelExpr, LabelOp, OnFailure, Outcome, Program,
    QueueConfig, Resources, RetryPolicy, Run, RunSpec, RunState, Strategy, Task, TaskSpec,
    TaskState,
};
use crate::state::State;

pub fn resources_from_proto(r: Option<&pb::Resources>) -> Resources {
    match r {
        None => Resources::default(),
        Some(r) => Resources {
            cpu_millis: r.cpu_millis,
            memory_bytes: r.memory_bytes,
            gpus: r.gpus,
            extended: r.extended.iter().map(|(k, v)| (k.clone(), *v)).collect(),
        },
    }
}

pub fn resources_to_proto(r: &Resources) -> pb::Resources {
    pb::Resources {
        cpu_millis: r.cpu_millis,
        memory_bytes: r.memory_bytes,
        gpus: r.gpus,
        extended: r.extended.iter().map(|(k, v)| (k.clone(), *v)).collect(),
    }
}

pub(crate) fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= limits::NAME_BYTES_MAX
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

fn check_map(
    field: &str,
    m: &std::collections::HashMap<String, String>,
    max: usize,
) -> Result<(), CoordinatorError> {
    if m.len() > max {
        return Err(CoordinatorError::invalid(
            field,
            format!("{} entries; at most {max} allowed", m.len()),
        ));
    }
    for (k, v) in m {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            return Err(CoordinatorError::invalid(
                format!("{field}.{k}"),
                "keys must be non-empty, without '=' or NUL",
            ));
        }
        if v.len() > limits::ARG_BYTES_MAX || v.contains('\0') {
            return Err(CoordinatorError::invalid(
                format!("{field}.{k}"),
                format!(
                    "value must be under {} bytes, without NUL",
                    limits::ARG_BYTES_MAX
                ),
            ));
        }
    }
    Ok(())
}

pub fn label_expr_from_proto(
    field: &str,
    e: &pb::LabelExpression,
) -> Result<LabelExpr, CoordinatorError> {
    let op = match e.op.as_str() {
        "=" | "==" => LabelOp::Eq,
        "!=" => LabelOp::NotEq,
        "in" => LabelOp::In,
        "not in" | "notin" => LabelOp::NotIn,
        "exists" => LabelOp::Exists,
        "!exists" => LabelOp::NotExists,
        other => {
            return Err(CoordinatorError::invalid(
                format!("{field}.op"),
                format!(
                    "'{other}' is not one of {}",
                    drover_proto::selector::OPS.join(", ")
                ),
            ));
        }
    };
    if e.key.is_empty() || e.key.len() > limits::NAME_BYTES_MAX {
        return Err(CoordinatorError::invalid(
            format!("{field}.key"),
            "a label key of 1-63 bytes is required",
        ));
    }
    let want_values = match op {
        LabelOp::Eq | LabelOp::NotEq => e.values.len() == 1,
        LabelOp::In | LabelOp::NotIn => !e.values.is_empty() && e.values.len() <= 64,
        LabelOp::Exists | LabelOp::NotExists => e.values.is_empty(),
    };
    if !want_values {
        return Err(CoordinatorError::invalid(
            format!("{field}.values"),
            format!(
                "'{}' takes {}",
                e.op,
                match op {
                    LabelOp::Eq | LabelOp::NotEq => "exactly one value",
                    LabelOp::In | LabelOp::NotIn => "1 to 64 values",
                    _ => "no values",
                }
            ),
        ));
    }
    Ok(LabelExpr {
        key: e.key.clone(),
        op,
        values: e.values.clone(),
    })
}

pub fn label_expr_to_proto(e: &LabelExpr) -> pb::LabelExpression {
    pb::LabelExpression {
        key: e.key.clone(),
        op: match e.op {
            LabelOp::Eq => "=",
            LabelOp::NotEq => "!=",
            LabelOp::In => "in",
            LabelOp::NotIn => "not in",
            LabelOp::Exists => "exists",
            LabelOp::NotExists => "!exists",
        }
        .into(),
        values: e.values.clone(),
    }
}

/// Validates a submitted spec and turns it into the domain type.
pub fn run_spec_from_proto(spec: Option<&pb::RunSpec>) -> Result<RunSpec, CoordinatorError> {
    let spec = spec.ok_or_else(|| CoordinatorError::invalid("spec", "missing"))?;
    let name = if spec.name.is_empty() {
        "run".to_owned()
    } else {
        spec.name.clone()
    };
    if !valid_name(&name) {
        return Err(CoordinatorError::invalid(
            "spec.name",
            format!(
                "'{name}' must be 1-{} characters of a-z, 0-9, '-', '_'",
                limits::NAME_BYTES_MAX
            ),
        ));
    }
    check_map("spec.labels", &spec.labels, limits::LABELS_MAX)?;
    if spec.tasks.is_empty() {
        return Err(CoordinatorError::invalid(
            "spec.tasks",
            "a run needs at least one task",
        ));
    }
    if spec.tasks.len() > limits::TASKS_PER_RUN_MAX {
        return Err(CoordinatorError::invalid(
            "spec.tasks",
            format!(
                "{} tasks; tasks_per_run_max is {}",
                spec.tasks.len(),
                limits::TASKS_PER_RUN_MAX
            ),
        ));
    }
    let strategy = match spec.strategy.as_str() {
        "" | "binpack" => Strategy::BinPack,
        "spread" => Strategy::Spread,
        other => {
            return Err(CoordinatorError::invalid(
                "spec.strategy",
                format!("'{other}' is not binpack or spread"),
            ));
        }
    };
    let on_failure = match spec.on_failure.as_str() {
        "" | "fail_fast" => OnFailure::FailFast,
        "continue" => OnFailure::Continue,
        other => {
            return Err(CoordinatorError::invalid(
                "spec.on_failure",
                format!("'{other}' is not fail_fast or continue"),
            ));
        }
    };
    check_map("spec.params", &spec.params, limits::LABELS_MAX)?;
    for k in spec.params.keys() {
        if !drover_core::params::valid_name(k) {
            return Err(CoordinatorError::invalid(
                format!("spec.params.{k}"),
                "a parameter name is a letter or '_', then letters, digits or '_' (at most 64)",
            ));
        }
    }
    let params: BTreeMap<String, String> = spec
        .params
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut tasks = Vec::with_capacity(spec.tasks.len());
    let mut seen = std::collections::BTreeSet::new();
    for (i, t) in spec.tasks.iter().enumerate() {
        let field = format!("spec.tasks[{i}]");
        let tname = if t.name.is_empty() && spec.tasks.len() == 1 {
            "main".to_owned()
        } else {
            t.name.clone()
        };
        if !valid_name(&tname) {
            return Err(CoordinatorError::invalid(
                format!("{field}.name"),
                format!(
                    "'{tname}' must be 1-{} characters of a-z, 0-9, '-', '_'",
                    limits::NAME_BYTES_MAX
                ),
            ));
        }
        if !seen.insert(tname.clone()) {
            return Err(CoordinatorError::invalid(
                format!("{field}.name"),
                format!("'{tname}' is used by two tasks"),
            ));
        }
        let program = match (t.kind.as_str(), t.argv.is_empty(), t.shell.is_empty()) {
            ("noop", true, true) => Program::Noop {
                duration_ms: t.noop_duration_ms,
            },
            ("noop", _, _) => {
                return Err(CoordinatorError::invalid(
                    format!("{field}.command"),
                    "a noop task takes no command or shell",
                ));
            }
            ("" | "process", argv_empty, shell_empty) => match (argv_empty, shell_empty) {
                (false, true) => {
                    if t.argv.len() > limits::ARGS_MAX {
                        return Err(CoordinatorError::invalid(
                            format!("{field}.argv"),
                            format!("at most {} arguments", limits::ARGS_MAX),
                        ));
                    }
                    if t.argv[0].is_empty() {
                        return Err(CoordinatorError::invalid(
                            format!("{field}.argv[0]"),
                            "the program name is empty",
                        ));
                    }
                    for (j, a) in t.argv.iter().enumerate() {
                        if a.len() > limits::ARG_BYTES_MAX || a.contains('\0') {
                            return Err(CoordinatorError::invalid(
                                format!("{field}.argv[{j}]"),
                                format!(
                                    "must be under {} bytes, without NUL",
                                    limits::ARG_BYTES_MAX
                                ),
                            ));
                        }
                    }
                    Program::Argv(t.argv.clone())
                }
                (true, false) => {
                    if t.shell.len() > limits::ARG_BYTES_MAX || t.shell.contains('\0') {
                        return Err(CoordinatorError::invalid(
                            format!("{field}.shell"),
                            format!("must be under {} bytes, without NUL", limits::ARG_BYTES_MAX),
                        ));
                    }
                    Program::Shell(t.shell.clone())
                }
                (true, true) => {
                    return Err(CoordinatorError::invalid(
                        format!("{field}.command"),
                        "set either a command (argv list) or shell (a string for sh -c)",
                    ));
                }
                (false, false) => {
                    return Err(CoordinatorError::invalid(
                        format!("{field}.command"),
                        "set only one of command (argv list) and shell, not both",
                    ));
                }
            },
            (other, _, _) => {
                return Err(CoordinatorError::invalid(
                    format!("{field}.kind"),
                    format!("'{other}' is not process or noop"),
                ));
            }
        };
        check_map(&format!("{field}.env"), &t.env, limits::ENV_VARS_MAX)?;
        if !t.class.is_empty() && !valid_name(&t.class) {
            return Err(CoordinatorError::invalid(
                format!("{field}.class"),
                format!("'{}' is not a valid class name", t.class),
            ));
        }
        if t.required.len() > limits::EXPRESSIONS_MAX || t.preferred.len() > limits::EXPRESSIONS_MAX
        {
            return Err(CoordinatorError::invalid(
                format!("{field}.affinity"),
                format!(
                    "at most {expressions_max} expressions each",
                    expressions_max = limits::EXPRESSIONS_MAX
                ),
            ));
        }
        let required = t
            .required
            .iter()
            .enumerate()
            .map(|(j, e)| label_expr_from_proto(&format!("{field}.affinity.required[{j}]"), e))
            .collect::<Result<Vec<_>, _>>()?;
        let mut preferred = Vec::with_capacity(t.preferred.len());
        for (j, w) in t.preferred.iter().enumerate() {
            let f = format!("{field}.affinity.preferred[{j}]");
            if w.weight.unsigned_abs() > limits::WEIGHT_ABS_MAX.unsigned_abs() {
                return Err(CoordinatorError::invalid(
                    format!("{f}.weight"),
                    format!(
                        "must be within -{weight_abs_max}..={weight_abs_max}",
                        weight_abs_max = limits::WEIGHT_ABS_MAX
                    ),
                ));
            }
            let e = w
                .expression
                .as_ref()
                .ok_or_else(|| CoordinatorError::invalid(format!("{f}.expression"), "missing"))?;
            preferred.push((w.weight, label_expr_from_proto(&f, e)?));
        }
        if t.priority.unsigned_abs() > limits::PRIORITY_ABS_MAX.unsigned_abs() {
            return Err(CoordinatorError::invalid(
                format!("{field}.priority"),
                format!(
                    "must be within -{priority_abs_max}..={priority_abs_max}",
                    priority_abs_max = limits::PRIORITY_ABS_MAX
                ),
            ));
        }
        if !t.spread_by.is_empty()
            && (t.spread_by.len() > limits::NAME_BYTES_MAX
                || t.spread_by.contains(char::is_whitespace))
        {
            return Err(CoordinatorError::invalid(
                format!("{field}.spread_by"),
                "must be a label key",
            ));
        }
        if !t.queue.is_empty() && !valid_name(&t.queue) {
            return Err(CoordinatorError::invalid(
                format!("{field}.queue"),
                format!("'{}' is not a valid queue name", t.queue),
            ));
        }
        let retry = retry_from_proto(&field, t.retry.as_ref())?;
        if t.depends_on.len() > limits::TASKS_PER_RUN_MAX {
            return Err(CoordinatorError::invalid(
                format!("{field}.depends_on"),
                "more dependencies than a run has steps",
            ));
        }
        let mut task = TaskSpec {
            depends_on: t.depends_on.clone(),
            retry,
            required,
            preferred,
            spread_by: t.spread_by.clone(),
            priority: t.priority,
            queue: if t.queue.is_empty() {
                "default".into()
            } else {
                t.queue.clone()
            },
            strategy,
            name: tname,
            program,
            env: t.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            workdir: t.workdir.clone(),
            timeout_ms: t.timeout_ms,
            class: if t.class.is_empty() {
                crate::scheduler::DEFAULT_CLASS.to_owned()
            } else {
                t.class.clone()
            },
            resources: resources_from_proto(t.resources.as_ref()),
        };
        substitute_params(&field, &mut task, &params)?;
        tasks.push(task);
    }
    let steps: Vec<(&str, &[String])> = tasks
        .iter()
        .map(|t| (t.name.as_str(), t.depends_on.as_slice()))
        .collect();
    drover_core::dag::check("spec.tasks", &steps)
        .map_err(|e| CoordinatorError::invalid(e.field, e.message))?;
    Ok(RunSpec {
        name,
        on_failure,
        params,
        tasks,
        labels: spec
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect::<BTreeMap<_, _>>(),
    })
}

pub fn task_spec_to_proto(t: &TaskSpec) -> pb::TaskSpec {
    let (argv, shell, kind, noop_duration_ms) = match &t.program {
        Program::Argv(a) => (a.clone(), String::new(), String::new(), 0),
        Program::Shell(s) => (Vec::new(), s.clone(), String::new(), 0),
        Program::Noop { duration_ms } => {
            (Vec::new(), String::new(), "noop".to_owned(), *duration_ms)
        }
    };
    pb::TaskSpec {
        name: t.name.clone(),
        argv,
        shell,
        env: t.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        workdir: t.workdir.clone(),
        timeout_ms: t.timeout_ms,
        class: t.class.clone(),
        resources: Some(resources_to_proto(&t.resources)),
        required: t.required.iter().map(label_expr_to_proto).collect(),
        preferred: t
            .preferred
            .iter()
            .map(|(w, e)| pb::WeightedExpression {
                weight: *w,
                expression: Some(label_expr_to_proto(e)),
            })
            .collect(),
        spread_by: t.spread_by.clone(),
        priority: t.priority,
        queue: t.queue.clone(),
        kind,
        noop_duration_ms,
        depends_on: t.depends_on.clone(),
        retry: (t.retry.max > 0).then(|| pb::RetryPolicy {
            max: t.retry.max,
            backoff: match t.retry.backoff {
                Backoff::Fixed => "fixed".into(),
                Backoff::Exponential => "exponential".into(),
            },
            initial_ms: t.retry.initial_ms,
            max_delay_ms: t.retry.max_delay_ms,
        }),
    }
}

/// The retry policy of `field`, checked.
fn retry_from_proto(
    field: &str,
    r: Option<&pb::RetryPolicy>,
) -> Result<RetryPolicy, CoordinatorError> {
    let Some(r) = r else {
        return Ok(RetryPolicy::default());
    };
    if r.max > limits::RETRIES_MAX {
        return Err(CoordinatorError::invalid(
            format!("{field}.retry.max"),
            format!("{} retries; at most {}", r.max, limits::RETRIES_MAX),
        ));
    }
    let backoff = match r.backoff.as_str() {
        "" | "exponential" => Backoff::Exponential,
        "fixed" => Backoff::Fixed,
        other => {
            return Err(CoordinatorError::invalid(
                format!("{field}.retry.backoff"),
                format!("'{other}' is not exponential or fixed"),
            ));
        }
    };
    for (name, v) in [("initial", r.initial_ms), ("max_delay", r.max_delay_ms)] {
        if v > limits::RETRY_DELAY_MAX_MS {
            return Err(CoordinatorError::invalid(
                format!("{field}.retry.{name}"),
                format!("{v} ms is longer than a day"),
            ));
        }
    }
    Ok(RetryPolicy {
        max: r.max,
        backoff,
        initial_ms: r.initial_ms,
        max_delay_ms: r.max_delay_ms,
    })
}

/// Substitutes the run's params into the parts of a step that run (argv, shell, env values,
/// workdir); an undefined `${NAME}` names the field it is in.
fn substitute_params(
    field: &str,
    t: &mut TaskSpec,
    params: &BTreeMap<String, String>,
) -> Result<(), CoordinatorError> {
    use drover_core::params::substitute;
    let sub = |f: String, text: &mut String| -> Result<(), CoordinatorError> {
        *text = substitute(text, params).map_err(|m| CoordinatorError::invalid(f, m))?;
        Ok(())
    };
    match &mut t.program {
        Program::Argv(args) => {
            for (j, a) in args.iter_mut().enumerate() {
                sub(format!("{field}.argv[{j}]"), a)?;
            }
        }
        Program::Shell(s) => sub(format!("{field}.shell"), s)?,
        Program::Noop { .. } => {}
    }
    for (k, v) in t.env.iter_mut() {
        sub(format!("{field}.env.{k}"), v)?;
    }
    sub(format!("{field}.workdir"), &mut t.workdir)
}

/// `s` cut to at most `max` bytes at a character boundary, marked as cut.
pub fn clip_text(mut s: String, max: usize) -> String {
    if s.len() <= max {
        return s;
    }
    let mut end = max.saturating_sub(3);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    s.push_str("...");
    s
}

pub fn outcome_from_proto(o: Option<pb::TaskOutcome>) -> Outcome {
    let Some(o) = o else {
        return Outcome {
            reason: "agent sent no outcome".into(),
            ..Default::default()
        };
    };
    let clip = |mut v: Vec<u8>| {
        if v.len() > limits::OUTPUT_TAIL_BYTES_MAX {
            v.drain(..v.len() - limits::OUTPUT_TAIL_BYTES_MAX);
        }
        v
    };
    Outcome {
        exit_code: o.exit_code,
        signal: o.signal,
        reason: clip_text(o.reason, limits::REASON_BYTES_MAX),
        duration_ms: o.duration_ms,
        stdout_tail: clip(o.stdout_tail),
        stderr_tail: clip(o.stderr_tail),
        succeeded: o.succeeded,
        peak_memory_bytes: o.peak_memory_bytes,
        cpu_time_ms: o.cpu_time_ms,
    }
}

fn outcome_to_proto(o: &Outcome) -> pb::TaskOutcome {
    pb::TaskOutcome {
        exit_code: o.exit_code,
        signal: o.signal,
        reason: o.reason.clone(),
        duration_ms: o.duration_ms,
        stdout_tail: o.stdout_tail.clone(),
        stderr_tail: o.stderr_tail.clone(),
        succeeded: o.succeeded,
        peak_memory_bytes: o.peak_memory_bytes,
        cpu_time_ms: o.cpu_time_ms,
    }
}

fn task_state_to_proto(s: TaskState) -> pb::TaskState {
    match s {
        TaskState::Pending => pb::TaskState::Pending,
        TaskState::Assigned => pb::TaskState::Assigned,
        TaskState::Running => pb::TaskState::Running,
        TaskState::Succeeded => pb::TaskState::Succeeded,
        TaskState::Failed => pb::TaskState::Failed,
        TaskState::Cancelled => pb::TaskState::Cancelled,
        TaskState::Blocked => pb::TaskState::Blocked,
        TaskState::Waiting => pb::TaskState::WaitingRetry,
        TaskState::Skipped => pb::TaskState::Skipped,
    }
}

fn run_state_to_proto(s: RunState) -> pb::RunState {
    match s {
        RunState::Pending => pb::RunState::Pending,
        RunState::Running => pb::RunState::Running,
        RunState::Succeeded => pb::RunState::Succeeded,
        RunState::Failed => pb::RunState::Failed,
        RunState::Cancelled => pb::RunState::Cancelled,
    }
}

pub fn task_to_proto(t: &Task) -> pb::Task {
    pb::Task {
        id: t.id.clone(),
        run_id: t.run_id.clone(),
        spec: Some(task_spec_to_proto(&t.spec)),
        state: task_state_to_proto(t.state) as i32,
        attempt: t.attempt,
        agent: t.agent.clone().unwrap_or_default(),
        pending_reason: if matches!(
            t.state,
            TaskState::Pending | TaskState::Blocked | TaskState::Waiting
        ) {
            t.pending_reason.to_string()
        } else {
            String::new()
        },
        created_at_ms: t.created_at_us / 1000,
        assigned_at_ms: t.assigned_at_us / 1000,
        started_at_ms: t.started_at_us / 1000,
        finished_at_ms: t.finished_at_us / 1000,
        created_at_us: t.created_at_us,
        assigned_at_us: t.assigned_at_us,
        started_at_us: t.started_at_us,
        finished_at_us: t.finished_at_us,
        outcome: t.outcome.as_deref().map(outcome_to_proto),
        attempts: t
            .history
            .iter()
            .map(|h| pb::Attempt {
                attempt: h.attempt,
                agent: h.agent.clone(),
                started_at_ms: h.started_at_us / 1000,
                finished_at_ms: h.finished_at_us / 1000,
                exit_code: h.exit_code,
                signal: h.signal,
                reason: h.reason.clone(),
                succeeded: h.succeeded,
            })
            .collect(),
        retry_at_ms: if t.state == TaskState::Waiting {
            t.retry_at_us / 1000
        } else {
            0
        },
        failures: t.failures,
    }
}

pub fn on_failure_name(f: OnFailure) -> &'static str {
    match f {
        OnFailure::FailFast => "fail_fast",
        OnFailure::Continue => "continue",
    }
}

pub fn dead_letter_to_proto(d: &DeadLetter) -> pb::DeadLetter {
    pb::DeadLetter {
        id: format!("dl-{}", d.id),
        task_id: d.task_id.clone(),
        run_id: d.run_id.clone(),
        step: d.step.clone(),
        queue: d.queue.clone(),
        attempt: d.attempt,
        failures: d.failures,
        agent: d.agent.clone(),
        failed_at_ms: d.failed_at_us / 1000,
        reason: d.reason.clone(),
        exit_code: d.exit_code,
        signal: d.signal,
        stdout_tail: d.stdout_tail.clone(),
        stderr_tail: d.stderr_tail.clone(),
    }
}

/// Parses `dl-N` (or `N`).
pub fn dead_letter_id(id: &str) -> Result<u64, CoordinatorError> {
    id.strip_prefix("dl-").unwrap_or(id).parse().map_err(|_| {
        CoordinatorError::invalid("id", format!("'{id}' is not a dead letter id (dl-N)"))
    })
}

pub fn queue_to_proto(state: &State, name: &str) -> pb::Queue {
    let c = state.queues.get(name).cloned().unwrap_or_default();
    pb::Queue {
        name: name.to_owned(),
        max_concurrency: c.max_concurrency,
        rate: c.rate_milli as f64 / 1000.0,
        burst: c.burst,
        max_pending: c.max_pending,
        pending: state.pending_by_queue.get(name).map_or(0, |t| t.tasks),
        active: state.active_by_queue.get(name).copied().unwrap_or(0),
    }
}

pub fn queue_config_from_proto(q: &pb::Queue) -> Result<QueueConfig, CoordinatorError> {
    if !valid_name(&q.name) {
        return Err(CoordinatorError::invalid(
            "queue.name",
            format!("'{}' is not a valid queue name", q.name),
        ));
    }
    if !q.rate.is_finite() || q.rate < 0.0 || q.rate > 1_000_000.0 {
        return Err(CoordinatorError::invalid(
            "queue.rate",
            format!("{} is not a rate between 0 and 1000000 per second", q.rate),
        ));
    }
    Ok(QueueConfig {
        max_concurrency: q.max_concurrency,
        rate_milli: (q.rate * 1000.0).round() as u64,
        burst: q.burst,
        max_pending: q.max_pending,
    })
}

pub fn run_to_proto(state: &State, run: &Run) -> pb::Run {
    pb::Run {
        id: run.id.clone(),
        name: run.name.clone(),
        state: run_state_to_proto(state.run_state(run)) as i32,
        tasks: run
            .task_ids
            .iter()
            .filter_map(|t| state.tasks.get(t))
            .map(task_to_proto)
            .collect(),
        created_at_ms: run.created_at_us / 1000,
        finished_at_ms: run.finished_at_us / 1000,
        labels: run
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        submitted_by: run.submitted_by.clone(),
        params: run
            .params
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        on_failure: on_failure_name(run.on_failure).into(),
        cancelled: run.cancelled.clone(),
    }
}

pub fn agent_to_proto(a: &Agent, heartbeat_age_ms: Option<u64>, connected: bool) -> pb::Agent {
    pb::Agent {
        name: a.name.clone(),
        labels: a
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        total: Some(resources_to_proto(&a.total)),
        free: Some(resources_to_proto(&a.free())),
        class: a.class.clone(),
        state: match a.state {
            AgentState::Active => pb::AgentState::Active,
            AgentState::Draining => pb::AgentState::Draining,
            AgentState::Lost => pb::AgentState::Lost,
        } as i32,
        running_tasks: a.tasks.len() as u32,
        last_heartbeat_age_ms: heartbeat_age_ms,
        registered_at_ms: a.registered_at_ms,
        version: a.version.clone(),
        connected,
        pool: a.pool.clone(),
        drain_deadline_ms: a.drain_deadline_ms,
        instance_id: a.instance_id.clone(),
        idle_since_ms: a.idle_since_us / 1000,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(task: pb::TaskSpec) -> Result<RunSpec, CoordinatorError> {
        run_spec_from_proto(Some(&pb::RunSpec {
            name: "r".into(),
            tasks: vec![pb::TaskSpec {
                name: "t".into(),
                argv: vec!["true".into()],
                ..task
            }],
            ..Default::default()
        }))
    }

    #[test]
    fn the_most_negative_priority_and_weight_are_refused_not_wrapped() {
        // Guards: `i32::MIN.abs()` overflows (a panic in debug builds, i32::MIN itself in
        // release, which passed the range check).
        let e = with(pb::TaskSpec {
            priority: i32::MIN,
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("priority: must be within"), "{e}");
        let e = with(pb::TaskSpec {
            preferred: vec![pb::WeightedExpression {
                weight: i32::MIN,
                expression: Some(drover_proto::selector::parse("zone=a").unwrap()),
            }],
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("weight: must be within"), "{e}");
        assert!(with(pb::TaskSpec::default()).is_ok());
    }
}

#[cfg(test)]
mod clip_tests {
    #[test]
    fn long_reasons_are_cut_at_a_character_boundary() {
        assert_eq!(super::clip_text("short".into(), 10), "short");
        let cut = super::clip_text("é".repeat(1000), 1024);
        assert!(cut.len() <= 1024 && cut.ends_with("..."), "{}", cut.len());
        let o = super::outcome_from_proto(Some(drover_proto::pb::TaskOutcome {
            reason: "x".repeat(1 << 20),
            ..Default::default()
        }));
        assert_eq!(o.reason.len(), crate::limits::REASON_BYTES_MAX);
    }
}
