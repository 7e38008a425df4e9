//! Rendering for people (tables) and for programs (JSON). Data goes to stdout, messages to stderr.

use std::fmt::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use drover_proto::pb;
use serde_json::{Value, json};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
}

pub fn task_state(s: i32) -> &'static str {
    match pb::TaskState::try_from(s).unwrap_or(pb::TaskState::Unspecified) {
        pb::TaskState::Pending => "pending",
        pb::TaskState::Assigned => "assigned",
        pb::TaskState::Running => "running",
        pb::TaskState::Succeeded => "succeeded",
        pb::TaskState::Failed => "failed",
        pb::TaskState::Cancelled => "cancelled",
        pb::TaskState::Blocked => "blocked",
        pb::TaskState::WaitingRetry => "waiting-retry",
        pb::TaskState::Skipped => "skipped",
        pb::TaskState::Unspecified => "unknown",
    }
}

pub fn run_state(s: i32) -> &'static str {
    match pb::RunState::try_from(s).unwrap_or(pb::RunState::Unspecified) {
        pb::RunState::Pending => "pending",
        pb::RunState::Running => "running",
        pb::RunState::Succeeded => "succeeded",
        pb::RunState::Failed => "failed",
        pb::RunState::Cancelled => "cancelled",
        pb::RunState::Unspecified => "unknown",
    }
}

pub fn is_terminal_run(s: i32) -> bool {
    matches!(run_state(s), "succeeded" | "failed" | "cancelled")
}

fn agent_state(s: i32) -> &'static str {
    match pb::AgentState::try_from(s).unwrap_or(pb::AgentState::Unspecified) {
        pb::AgentState::Active => "active",
        pb::AgentState::Draining => "draining",
        pb::AgentState::Lost => "lost",
        pb::AgentState::Unspecified => "unknown",
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn ago(ms: u64) -> String {
    if ms == 0 {
        return "-".into();
    }
    let d = now_ms().saturating_sub(ms) / 1000;
    match d {
        0..60 => format!("{d}s ago"),
        60..3600 => format!("{}m ago", d / 60),
        3600..86400 => format!("{}h ago", d / 3600),
        _ => format!("{}d ago", d / 86400),
    }
}

fn duration(ms: u64) -> String {
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else {
        format!("{}m{}s", ms / 60_000, (ms % 60_000) / 1000)
    }
}

fn bytes(b: u64) -> String {
    const UNITS: [(&str, u64); 3] = [("Gi", 1 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)];
    for (u, s) in UNITS {
        if b >= s {
            let v = b as f64 / s as f64;
            return if v.fract() == 0.0 {
                format!("{v:.0}{u}")
            } else {
                format!("{v:.1}{u}")
            };
        }
    }
    format!("{b}")
}

fn cpu(m: u64) -> String {
    if m.is_multiple_of(1000) {
        format!("{}", m / 1000)
    } else {
        format!("{m}m")
    }
}

/// Left-aligned columns separated by two spaces.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<&str>, out: &mut String| {
        let n = cells.len();
        for (i, c) in cells.into_iter().enumerate() {
            if i + 1 == n {
                out.push_str(c);
            } else {
                let _ = write!(out, "{c:<w$}  ", w = widths[i]);
            }
        }
        out.push('\n');
    };
    line(header.to_vec(), &mut out);
    for r in rows {
        line(r.iter().map(String::as_str).collect(), &mut out);
    }
    out
}

fn outcome_summary(t: &pb::Task) -> String {
    let waiting = matches!(task_state(t.state), "pending" | "blocked" | "waiting-retry");
    match &t.outcome {
        _ if waiting && !t.pending_reason.is_empty() => t.pending_reason.clone(),
        None if !t.pending_reason.is_empty() => t.pending_reason.clone(),
        None => String::new(),
        Some(o) if o.exit_code.is_none() && o.signal.is_none() && !o.reason.is_empty() => {
            o.reason.clone()
        }
        Some(o) => {
            let mut s = match (o.exit_code, o.signal) {
                (Some(c), _) => format!("exit {c}"),
                (None, Some(sig)) => format!("signal {sig}"),
                _ => "no exit status".into(),
            };
            if !o.reason.is_empty() {
                let _ = write!(s, " ({})", o.reason);
            }
            let _ = write!(s, " in {}", duration(o.duration_ms));
            s
        }
    }
}

pub fn run_table(run: &pb::Run) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "Run:        {}  ({})", run.id, run.name);
    let _ = writeln!(out, "State:      {}", run_state(run.state));
    let _ = writeln!(
        out,
        "Submitted:  {} by {}",
        ago(run.created_at_ms),
        run.submitted_by
    );
    if run.finished_at_ms != 0 {
        let _ = writeln!(
            out,
            "Finished:   {} (took {})",
            ago(run.finished_at_ms),
            duration(run.finished_at_ms.saturating_sub(run.created_at_ms))
        );
    }
    if !run.cancelled.is_empty() {
        let _ = writeln!(out, "Cancelled:  {}", run.cancelled);
    }
    if !run.params.is_empty() {
        let mut params: Vec<String> = run.params.iter().map(|(k, v)| format!("{k}={v}")).collect();
        params.sort();
        let _ = writeln!(out, "Params:     {}", params.join(" "));
    }
    if run
        .tasks
        .iter()
        .any(|t| t.spec.as_ref().is_some_and(|s| !s.depends_on.is_empty()))
    {
        let _ = writeln!(out, "On failure: {}", run.on_failure);
    }
    out.push('\n');
    let rows: Vec<Vec<String>> = run
        .tasks
        .iter()
        .map(|t| {
            vec![
                t.spec.as_ref().map(|s| s.name.clone()).unwrap_or_default(),
                task_state(t.state).into(),
                t.attempt.to_string(),
                if t.agent.is_empty() {
                    "-".into()
                } else {
                    t.agent.clone()
                },
                outcome_summary(t),
            ]
        })
        .collect();
    out.push_str(&table(
        &["STEP", "STATE", "ATTEMPT", "AGENT", "RESULT / WHY PENDING"],
        &rows,
    ));
    let retried: Vec<&pb::Task> = run.tasks.iter().filter(|t| t.attempts.len() > 1).collect();
    if !retried.is_empty() {
        out.push_str("\nAttempts:\n");
        let mut rows = Vec::new();
        for t in retried {
            let name = t.spec.as_ref().map(|s| s.name.clone()).unwrap_or_default();
            for a in &t.attempts {
                rows.push(vec![
                    name.clone(),
                    a.attempt.to_string(),
                    if a.agent.is_empty() {
                        "-".into()
                    } else {
                        a.agent.clone()
                    },
                    a.exit_code.map_or_else(
                        || a.signal.map_or("-".into(), |s| format!("signal {s}")),
                        |c| c.to_string(),
                    ),
                    ago(a.finished_at_ms),
                    a.reason.clone(),
                ]);
            }
        }
        out.push_str(&table(
            &["STEP", "ATTEMPT", "AGENT", "EXIT", "ENDED", "REASON"],
            &rows,
        ));
    }
    for t in &run.tasks {
        if let Some(o) = &t.outcome {
            let name = t.spec.as_ref().map(|s| s.name.as_str()).unwrap_or("");
            for (label, data) in [("stdout", &o.stdout_tail), ("stderr", &o.stderr_tail)] {
                if !data.is_empty() {
                    let _ = writeln!(out, "\n--- {name} {label} (last {} bytes) ---", data.len());
                    out.push_str(&String::from_utf8_lossy(data));
                    if !data.ends_with(b"\n") {
                        out.push('\n');
                    }
                }
            }
        }
    }
    out
}

pub fn runs_table(runs: &[pb::Run]) -> String {
    let rows: Vec<Vec<String>> = runs
        .iter()
        .map(|r| {
            let done = r
                .tasks
                .iter()
                .filter(|t| {
                    matches!(
                        task_state(t.state),
                        "succeeded" | "failed" | "cancelled" | "skipped"
                    )
                })
                .count();
            vec![
                r.id.clone(),
                r.name.clone(),
                run_state(r.state).into(),
                format!("{done}/{}", r.tasks.len()),
                ago(r.created_at_ms),
            ]
        })
        .collect();
    table(&["ID", "NAME", "STATE", "STEPS DONE", "SUBMITTED"], &rows)
}

pub fn agents_table(agents: &[pb::Agent]) -> String {
    let rows: Vec<Vec<String>> = agents
        .iter()
        .map(|a| {
            let total = a.total.clone().unwrap_or_default();
            let free = a.free.clone().unwrap_or_default();
            vec![
                a.name.clone(),
                agent_state(a.state).into(),
                a.class.clone(),
                a.pool.clone(),
                format!("{}/{}", cpu(free.cpu_millis), cpu(total.cpu_millis)),
                format!("{}/{}", bytes(free.memory_bytes), bytes(total.memory_bytes)),
                a.running_tasks.to_string(),
                a.last_heartbeat_age_ms
                    .map_or("-".into(), |ms| format!("{:.1}s", ms as f64 / 1000.0)),
                {
                    let mut l: Vec<String> =
                        a.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    l.sort();
                    l.join(",")
                },
            ]
        })
        .collect();
    table(
        &[
            "NAME",
            "STATE",
            "CLASS",
            "CPU FREE/TOTAL",
            "MEMORY FREE/TOTAL",
            "TASKS",
            "HEARTBEAT",
            "LABELS",
        ],
        &rows,
    )
}

pub fn agent_detail(resp: &pb::GetAgentResponse) -> String {
    let mut out = String::new();
    let Some(a) = &resp.agent else { return out };
    let total = a.total.clone().unwrap_or_default();
    let free = a.free.clone().unwrap_or_default();
    let _ = writeln!(out, "Agent:      {}", a.name);
    let _ = writeln!(
        out,
        "State:      {}{}",
        agent_state(a.state),
        if a.connected {
            " (connected)"
        } else {
            " (not connected)"
        }
    );
    if a.drain_deadline_ms != 0 {
        let _ = writeln!(
            out,
            "Drain:      tasks still running are stopped at {} (ms since epoch)",
            a.drain_deadline_ms
        );
    }
    let _ = writeln!(out, "Class:      {}   Pool: {}", a.class, a.pool);
    let mut labels: Vec<String> = a.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    labels.sort();
    let _ = writeln!(out, "Labels:     {}", labels.join(", "));
    let _ = writeln!(
        out,
        "CPU:        {} free of {}",
        cpu(free.cpu_millis),
        cpu(total.cpu_millis)
    );
    let _ = writeln!(
        out,
        "Memory:     {} free of {}",
        bytes(free.memory_bytes),
        bytes(total.memory_bytes)
    );
    if total.gpus > 0 {
        let _ = writeln!(out, "GPUs:       {} free of {}", free.gpus, total.gpus);
    }
    for (k, v) in &total.extended {
        let _ = writeln!(
            out,
            "{k}:  {} free of {v}",
            free.extended.get(k).copied().unwrap_or(0)
        );
    }
    let _ = writeln!(
        out,
        "Heartbeat:  {}",
        a.last_heartbeat_age_ms
            .map_or("-".into(), |ms| format!("{:.1}s ago", ms as f64 / 1000.0))
    );
    out.push('\n');
    let rows: Vec<Vec<String>> = resp
        .tasks
        .iter()
        .map(|t| {
            vec![
                t.id.clone(),
                task_state(t.state).into(),
                t.attempt.to_string(),
                ago(t.assigned_at_ms),
            ]
        })
        .collect();
    out.push_str(&table(&["TASK", "STATE", "ATTEMPT", "ASSIGNED"], &rows));
    out
}

pub fn cluster_table(s: &pb::ClusterStatusResponse) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "Answered by: node {} ({})", s.node_id, s.state);
    let _ = writeln!(
        out,
        "Leader:      {}",
        s.leader_id
            .map_or("none (election in progress)".into(), |l| format!(
                "node {l} at {}",
                s.leader_addr
            ))
    );
    let _ = writeln!(out, "Term:        {}", s.term);
    let _ = writeln!(
        out,
        "Commit:      {}   Applied: {}   Last log: {}",
        s.commit_index, s.applied_index, s.last_log_index
    );
    if let Some(snap) = s.snapshot_index {
        let _ = writeln!(out, "Snapshot:    up to {snap}");
    }
    out.push('\n');
    let rows: Vec<Vec<String>> = s
        .members
        .iter()
        .map(|m| {
            vec![
                m.node_id.to_string(),
                m.addr.clone(),
                m.health.clone(),
                m.matched_index.map_or("-".into(), |i| i.to_string()),
            ]
        })
        .collect();
    out.push_str(&table(&["NODE", "ADDRESS", "HEALTH", "MATCHED"], &rows));
    out
}

// ------------------------------------------------------------------ JSON

fn resources_json(r: &Option<pb::Resources>) -> Value {
    let r = r.clone().unwrap_or_default();
    json!({"cpu_millis": r.cpu_millis, "memory_bytes": r.memory_bytes, "gpus": r.gpus, "extended": r.extended})
}

pub fn task_json(t: &pb::Task) -> Value {
    let spec = t.spec.clone().unwrap_or_default();
    json!({
        "id": t.id,
        "name": spec.name,
        "state": task_state(t.state),
        "attempt": t.attempt,
        "agent": t.agent,
        "pending_reason": t.pending_reason,
        "created_at_ms": t.created_at_ms,
        "assigned_at_ms": t.assigned_at_ms,
        "started_at_ms": t.started_at_ms,
        "finished_at_ms": t.finished_at_ms,
        "failures": t.failures,
        "retry_at_ms": t.retry_at_ms,
        "attempts": t.attempts.iter().map(|a| json!({
            "attempt": a.attempt, "agent": a.agent, "started_at_ms": a.started_at_ms,
            "finished_at_ms": a.finished_at_ms, "exit_code": a.exit_code, "signal": a.signal,
            "reason": a.reason, "succeeded": a.succeeded,
        })).collect::<Vec<_>>(),
        "spec": {
            "depends_on": spec.depends_on,
            "retry": spec.retry.as_ref().map(|r| json!({
                "max": r.max, "backoff": r.backoff, "initial_ms": r.initial_ms,
                "max_delay_ms": r.max_delay_ms,
            })),
            "command": spec.argv, "shell": spec.shell, "env": spec.env, "workdir": spec.workdir,
            "timeout_ms": spec.timeout_ms, "class": spec.class, "resources": resources_json(&spec.resources),
            "affinity": {
                "required": spec.required.iter().map(drover_proto::selector::display).collect::<Vec<_>>(),
                "preferred": spec.preferred.iter().map(|p| json!({
                    "weight": p.weight,
                    "match": p.expression.as_ref().map(drover_proto::selector::display).unwrap_or_default(),
                })).collect::<Vec<_>>(),
            },
            "spread_by": spec.spread_by, "priority": spec.priority, "queue": spec.queue,
        },
        "outcome": t.outcome.as_ref().map(|o| json!({
            "succeeded": o.succeeded,
            "exit_code": o.exit_code,
            "signal": o.signal,
            "reason": o.reason,
            "duration_ms": o.duration_ms,
            "stdout_tail": String::from_utf8_lossy(&o.stdout_tail),
            "stderr_tail": String::from_utf8_lossy(&o.stderr_tail),
            "peak_memory_bytes": o.peak_memory_bytes,
            "cpu_time_ms": o.cpu_time_ms,
        })),
    })
}

pub fn run_json(r: &pb::Run) -> Value {
    json!({
        "id": r.id,
        "name": r.name,
        "state": run_state(r.state),
        "labels": r.labels,
        "submitted_by": r.submitted_by,
        "created_at_ms": r.created_at_ms,
        "finished_at_ms": r.finished_at_ms,
        "params": r.params,
        "on_failure": r.on_failure,
        "cancelled": r.cancelled,
        "tasks": r.tasks.iter().map(task_json).collect::<Vec<_>>(),
    })
}

pub fn agent_json(a: &pb::Agent) -> Value {
    json!({
        "name": a.name,
        "state": agent_state(a.state),
        "class": a.class,
        "labels": a.labels,
        "total": resources_json(&a.total),
        "free": resources_json(&a.free),
        "running_tasks": a.running_tasks,
        "pool": a.pool,
        "drain_deadline_ms": a.drain_deadline_ms,
        "last_heartbeat_age_ms": a.last_heartbeat_age_ms,
        "connected": a.connected,
        "registered_at_ms": a.registered_at_ms,
        "version": a.version,
    })
}

pub fn cluster_json(s: &pb::ClusterStatusResponse) -> Value {
    json!({
        "node_id": s.node_id,
        "state": s.state,
        "leader_id": s.leader_id,
        "leader_addr": s.leader_addr,
        "term": s.term,
        "commit_index": s.commit_index,
        "applied_index": s.applied_index,
        "last_log_index": s.last_log_index,
        "snapshot_index": s.snapshot_index,
        "members": s.members.iter().map(|m| json!({
            "node_id": m.node_id, "addr": m.addr, "health": m.health, "matched_index": m.matched_index,
        })).collect::<Vec<_>>(),
    })
}

/// A list as a table, or as a JSON array of its items.
pub fn print_list<T>(
    format: Format,
    items: &[T],
    table: fn(&[T]) -> String,
    item: fn(&T) -> Value,
) {
    match format {
        Format::Table => print!("{}", table(items)),
        Format::Json => print_json(&Value::Array(items.iter().map(item).collect())),
    }
}

pub fn print_json(v: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).expect("a Value always serialises")
    );
}

/// One line per certificate: name, role, when it expires (and how soon), host names.
pub fn cert_line(c: &crate::certs::CertInfo) -> String {
    let now = (now_ms() / 1000) as i64;
    let left = c.not_after - now;
    let span = |s: i64| {
        if s >= 2 * 86_400 {
            format!("{} days", s / 86_400)
        } else {
            duration(s as u64 * 1000)
        }
    };
    let when = if left <= 0 {
        format!("EXPIRED {} ago", span(-left))
    } else {
        format!("expires in {}", span(left))
    };
    let mut line = format!("{:<24} {:<12} {when}", c.name, c.role.as_str());
    if !c.sans.is_empty() {
        let _ = write!(line, "  hosts: {}", c.sans.join(", "));
    }
    line
}

/// One line per step whose state, attempt or agent changed since `before` (all steps when
/// `before` is None): the live view of `droverctl run watch`.
pub fn watch_lines(before: Option<&pb::Run>, now: &pb::Run) -> Vec<String> {
    let key = |t: &pb::Task| (t.state, t.attempt, t.agent.clone());
    let mut lines = Vec::new();
    let clock = {
        let secs = now_ms() / 1000;
        format!(
            "{:02}:{:02}:{:02}",
            secs / 3600 % 24,
            secs / 60 % 60,
            secs % 60
        )
    };
    for t in &now.tasks {
        let old = before.and_then(|b| b.tasks.iter().find(|o| o.id == t.id));
        if old.is_some_and(|o| key(o) == key(t)) {
            continue;
        }
        let name = t.spec.as_ref().map(|s| s.name.as_str()).unwrap_or("");
        let mut line = format!("{clock} {name:<20} {:<13}", task_state(t.state));
        if t.attempt > 1 {
            let _ = write!(line, " attempt {}", t.attempt);
        }
        if !t.agent.is_empty() && matches!(task_state(t.state), "assigned" | "running") {
            let _ = write!(line, " on {}", t.agent);
        }
        let detail = match task_state(t.state) {
            "succeeded" | "failed" | "skipped" | "cancelled" => outcome_summary(t),
            _ => t.pending_reason.clone(),
        };
        if !detail.is_empty() && detail != "-" {
            let _ = write!(line, "  {detail}");
        }
        lines.push(line);
    }
    if before.is_none_or(|b| b.state != now.state) {
        let done = now
            .tasks
            .iter()
            .filter(|t| {
                matches!(
                    task_state(t.state),
                    "succeeded" | "failed" | "cancelled" | "skipped"
                )
            })
            .count();
        lines.push(format!(
            "{clock} run {} is {} ({done}/{} steps done)",
            now.id,
            run_state(now.state),
            now.tasks.len()
        ));
    }
    lines
}

pub fn dead_letters_table(letters: &[pb::DeadLetter]) -> String {
    let rows: Vec<Vec<String>> = letters
        .iter()
        .map(|d| {
            vec![
                d.id.clone(),
                d.run_id.clone(),
                d.step.clone(),
                d.queue.clone(),
                d.failures.to_string(),
                d.exit_code.map_or_else(
                    || d.signal.map_or("-".into(), |s| format!("signal {s}")),
                    |c| c.to_string(),
                ),
                ago(d.failed_at_ms),
                d.reason.clone(),
            ]
        })
        .collect();
    table(
        &[
            "ID", "RUN", "STEP", "QUEUE", "FAILURES", "EXIT", "FAILED", "REASON",
        ],
        &rows,
    )
}

pub fn dead_letter_json(d: &pb::DeadLetter) -> Value {
    json!({
        "id": d.id, "run_id": d.run_id, "task_id": d.task_id, "step": d.step, "queue": d.queue,
        "attempt": d.attempt, "failures": d.failures, "agent": d.agent,
        "failed_at_ms": d.failed_at_ms, "reason": d.reason, "exit_code": d.exit_code,
        "signal": d.signal,
        "stdout_tail": String::from_utf8_lossy(&d.stdout_tail),
        "stderr_tail": String::from_utf8_lossy(&d.stderr_tail),
    })
}

fn limit_text(n: u64) -> String {
    if n == 0 { "-".into() } else { n.to_string() }
}

pub fn queues_table(queues: &[pb::Queue]) -> String {
    let rows: Vec<Vec<String>> = queues
        .iter()
        .map(|q| {
            vec![
                q.name.clone(),
                q.pending.to_string(),
                q.active.to_string(),
                limit_text(q.max_concurrency.into()),
                if q.rate > 0.0 {
                    format!("{}/s", q.rate)
                } else {
                    "-".into()
                },
                limit_text(q.burst.into()),
                limit_text(q.max_pending),
            ]
        })
        .collect();
    table(
        &[
            "QUEUE",
            "PENDING",
            "ACTIVE",
            "MAX CONCURRENCY",
            "RATE",
            "BURST",
            "MAX PENDING",
        ],
        &rows,
    )
}

pub fn queue_json(q: &pb::Queue) -> Value {
    json!({
        "name": q.name, "pending": q.pending, "active": q.active,
        "max_concurrency": q.max_concurrency, "rate": q.rate, "burst": q.burst,
        "max_pending": q.max_pending,
    })
}

pub fn pools_table(pools: &[pb::PoolStatus]) -> String {
    let rows: Vec<Vec<String>> = pools
        .iter()
        .map(|p| {
            vec![
                p.name.clone(),
                format!("{}..{}", p.min, p.max),
                p.current.to_string(),
                p.launching.to_string(),
                p.desired.to_string(),
                p.demand_pending.to_string(),
                p.hook.clone(),
                p.hook_health.clone(),
            ]
        })
        .collect();
    table(
        &[
            "POOL",
            "MIN..MAX",
            "CURRENT",
            "LAUNCHING",
            "DESIRED",
            "PENDING",
            "HOOK",
            "HOOK HEALTH",
        ],
        &rows,
    )
}

pub fn pool_detail(p: &pb::PoolStatus) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "Pool:       {} (min {}, max {})", p.name, p.min, p.max);
    let _ = writeln!(
        out,
        "Agents:     {} current, {} launching, {} desired",
        p.current, p.launching, p.desired
    );
    let _ = writeln!(
        out,
        "Demand:     {} tasks pending, p90 wait {}",
        p.demand_pending,
        duration(p.demand_wait_p90_ms)
    );
    let _ = writeln!(out, "Hook:       {} ({})", p.hook, p.hook_health);
    if p.launches_failed > 0 {
        let _ = writeln!(
            out,
            "Failed:     {} launches never registered",
            p.launches_failed
        );
    }
    out.push_str("\nDecisions (newest last):\n");
    let rows: Vec<Vec<String>> = p
        .decisions
        .iter()
        .map(|d| {
            vec![
                d.id.to_string(),
                ago(d.at_ms),
                format!("{} -> {}", d.from, d.to),
                d.reason.clone(),
                if d.remove.is_empty() {
                    "-".into()
                } else {
                    d.remove.join(", ")
                },
                if d.last_error.is_empty() {
                    format!("{} ({} calls)", d.hook, d.attempts)
                } else {
                    format!("{} ({} calls; {})", d.hook, d.attempts, d.last_error)
                },
            ]
        })
        .collect();
    out.push_str(&table(
        &["ID", "WHEN", "SIZE", "REASON", "REMOVE", "HOOK"],
        &rows,
    ));
    out
}

pub fn pool_json(p: &pb::PoolStatus) -> Value {
    json!({
        "name": p.name, "min": p.min, "max": p.max, "current": p.current,
        "launching": p.launching, "desired": p.desired,
        "demand": {"pending": p.demand_pending, "wait_p90_ms": p.demand_wait_p90_ms},
        "hook": p.hook, "hook_health": p.hook_health, "launches_failed": p.launches_failed,
        "spec": serde_json::from_str::<Value>(&p.spec_json).unwrap_or(Value::Null),
        "decisions": p.decisions.iter().map(|d| json!({
            "id": d.id, "at_ms": d.at_ms, "from": d.from, "to": d.to, "reason": d.reason,
            "remove": d.remove, "hook": d.hook, "attempts": d.attempts, "last_error": d.last_error,
        })).collect::<Vec<_>>(),
    })
}
