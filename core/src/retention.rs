//! How long the cluster keeps what nobody will use: tasks that were never placed, and agents
//! that were lost and never came back. Both are decided by the leader (its clock, its
//! configuration) and committed as commands; the choices here are pure.

use std::collections::HashMap;
use std::ops::Bound;
use std::time::Duration;

use crate::model::{AgentName, AgentState, HeldTask, PendingKey, TaskState};
use crate::state::State;

/// Pending tasks looked at per sweep; a cursor carries the walk on from sweep to sweep.
pub const EXPIRY_SCAN_MAX: usize = 16_384;

/// Among up to `scan` pending tasks after `after` (from the queue's head when None): those never
/// placed (first attempt) and queued `timeout` or longer ago, each with the reason to record.
/// Returns them and where the next sweep goes on (None once the walk reached the end).
pub fn unplaced_expired(
    state: &State,
    now_us: u64,
    timeout: Duration,
    after: Option<&PendingKey>,
    scan: usize,
) -> (Vec<(HeldTask, String)>, Option<PendingKey>) {
    let timeout_us = timeout.as_micros() as u64;
    let start = after.map_or(Bound::Unbounded, Bound::Excluded);
    let mut out = Vec::new();
    let mut last = None;
    for (n, key) in state
        .pending
        .range::<PendingKey, _>((start, Bound::Unbounded))
        .enumerate()
    {
        if n == scan {
            return (out, last);
        }
        last = Some(key.clone());
        let Some(t) = state.tasks.get(&key.2) else {
            continue;
        };
        if t.state != TaskState::Pending
            || t.attempt != 1
            || now_us.saturating_sub(t.created_at_us) < timeout_us
        {
            continue;
        }
        let why = if t.pending_reason.is_empty() {
            "no agent took it".to_owned()
        } else {
            t.pending_reason.to_string()
        };
        out.push((
            HeldTask {
                task_id: t.id.clone(),
                attempt: t.attempt,
            },
            format!("not placed within {} s: {why}", timeout.as_secs()),
        ));
    }
    (out, None)
}

/// Keeps `lost_since` (when this leader first saw each agent lost) in step with state and
/// returns the agents lost for `retention` or longer that hold nothing. A new leader starts
/// counting afresh: the retention can only grow across a failover, never shrink.
pub fn lost_too_long(
    state: &State,
    lost_since: &mut HashMap<AgentName, std::time::Instant>,
    now: std::time::Instant,
    retention: Duration,
) -> Vec<AgentName> {
    lost_since.retain(|name, _| {
        state
            .agents
            .get(name)
            .is_some_and(|a| a.state == AgentState::Lost)
    });
    let mut due = Vec::new();
    for a in state
        .agents
        .values()
        .filter(|a| a.state == AgentState::Lost)
    {
        let since = *lost_since.entry(a.name.clone()).or_insert(now);
        if now.duration_since(since) >= retention && a.tasks.is_empty() {
            due.push(a.name.clone());
        }
    }
    due
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::{Command, Request};
    use crate::model::{Program, Resources, RunSpec, TaskSpec};

    const S: u64 = 1_000_000;

    fn apply(s: &mut State, now_us: u64, cmd: Command) {
        s.apply(
            1,
            &Request {
                now_us,
                commands: vec![cmd].into(),
            },
        );
    }

    fn submit(s: &mut State, now_us: u64, names: &[&str]) {
        apply(
            s,
            now_us,
            Command::SubmitRun {
                idempotency_key: String::new(),
                spec: RunSpec {
                    name: "r".into(),
                    tasks: names
                        .iter()
                        .map(|n| TaskSpec::new(*n, Program::Argv(vec!["true".into()])))
                        .collect(),
                    labels: Default::default(),
                    on_failure: crate::model::OnFailure::Continue,
                    ..Default::default()
                },
                submitted_by: "t".into(),
                placement: None,
            },
        );
    }

    #[test]
    fn only_old_never_placed_tasks_expire_and_the_walk_resumes_where_it_stopped() {
        let mut s = State::default();
        submit(&mut s, 0, &["a", "b", "c"]);
        submit(&mut s, 50 * S, &["d"]);
        let timeout = Duration::from_secs(60);
        let (none, _) = unplaced_expired(&s, 59 * S, timeout, None, 100);
        assert!(none.is_empty());
        // Two at a time: a and b, then c and d (d too young), which ends the walk.
        let (first, cursor) = unplaced_expired(&s, 61 * S, timeout, None, 2);
        let ids: Vec<&str> = first.iter().map(|(h, _)| h.task_id.as_str()).collect();
        assert_eq!(ids, ["run-1/a", "run-1/b"]);
        assert!(
            first[0]
                .1
                .starts_with("not placed within 60 s: waiting for the scheduler")
        );
        let (second, cursor) = unplaced_expired(&s, 61 * S, timeout, cursor.as_ref(), 2);
        assert_eq!(second.len(), 1);
        assert_eq!(second[0].0.task_id, "run-1/c");
        assert!(cursor.is_none(), "the next sweep starts over from the head");
        // Committed: failed with the reason, out of the queue and its tallies, run finished.
        apply(&mut s, 61 * S, Command::ExpireTasks { tasks: first });
        let a = &s.tasks["run-1/a"];
        assert_eq!(a.state, TaskState::Failed);
        assert!(
            a.outcome
                .as_ref()
                .unwrap()
                .reason
                .contains("not placed within")
        );
        assert_eq!(s.pending.len(), 2);
        assert_eq!(s.pending_total.tasks, 2);
        assert_eq!(s.pending_by_submitter["t"].tasks, 2);
    }

    #[test]
    fn lost_agents_are_forgotten_after_the_retention_unless_they_hold_tasks() {
        let mut s = State::default();
        for name in ["gone", "back"] {
            apply(
                &mut s,
                0,
                Command::RegisterAgent {
                    name: name.into(),
                    labels: Default::default(),
                    total: Resources::default(),
                    class: "default".into(),
                    version: String::new(),
                    held: vec![],
                    pool: String::new(),
                    isolation: String::new(),
                    instance_id: String::new(),
                },
            );
            apply(
                &mut s,
                0,
                Command::AgentLost {
                    name: name.into(),
                    reason: "t".into(),
                },
            );
        }
        let mut since = HashMap::new();
        let t0 = std::time::Instant::now();
        let day = Duration::from_secs(86_400);
        assert!(lost_too_long(&s, &mut since, t0, day).is_empty());
        let due = lost_too_long(&s, &mut since, t0 + day, day);
        assert_eq!(due, ["back", "gone"]);
        apply(
            &mut s,
            0,
            Command::ForgetAgents {
                names: vec!["gone".into()],
            },
        );
        assert!(!s.agents.contains_key("gone"));
        assert!(lost_too_long(&s, &mut since, t0 + day, day) == ["back"]);
        assert!(!since.contains_key("gone"));
    }
}
