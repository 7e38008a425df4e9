//! Steps through their runs without any network: dependencies, retries, dead letters, fail
//! fast, cancellation and queue limits.

use std::collections::BTreeMap;

use crate::command::{Command, CommandResult};
use crate::model::{
    Assignment, Backoff, HeldTask, OnFailure, Outcome, Program, QueueConfig, Resources,
    RetryPolicy, RunSpec, TaskSpec, TaskState,
};
use crate::state::State;

const S: u64 = 1_000_000;

fn apply(s: &mut State, now_us: u64, cmd: Command) -> CommandResult {
    s.apply_at(now_us, cmd)
}

fn step(name: &str, deps: &[&str]) -> TaskSpec {
    TaskSpec {
        depends_on: deps.iter().map(|d| d.to_string()).collect(),
        ..TaskSpec::new(name, Program::Argv(vec!["true".into()]))
    }
}

fn setup(steps: Vec<TaskSpec>, on_failure: OnFailure) -> State {
    let mut s = State::default();
    apply(
        &mut s,
        S,
        Command::RegisterAgent {
            name: "a".into(),
            labels: BTreeMap::new(),
            total: Resources::default(),
            class: "default".into(),
            version: "t".into(),
            held: vec![],
            pool: String::new(),
            isolation: String::new(),
            instance_id: String::new(),
        },
    );
    let r = apply(
        &mut s,
        S,
        Command::SubmitRun {
            idempotency_key: String::new(),
            spec: RunSpec {
                name: "dag".into(),
                tasks: steps,
                on_failure,
                ..Default::default()
            },
            submitted_by: "t".into(),
            placement: None,
        },
    );
    assert!(matches!(r, CommandResult::Submitted { .. }), "{r:?}");
    s
}

fn state(s: &State, step: &str) -> TaskState {
    s.tasks[&format!("run-1/{step}")].state
}

fn pending(s: &State) -> Vec<String> {
    s.pending
        .iter()
        .map(|(_, _, t)| t.trim_start_matches("run-1/").to_owned())
        .collect()
}

/// Places `step` (its current attempt) on agent a.
fn assign(s: &mut State, now: u64, step: &str) -> CommandResult {
    let tid = format!("run-1/{step}");
    let attempt = s.tasks[&tid].attempt;
    apply(
        s,
        now,
        Command::ApplyPlan {
            term: 1,
            assignments: vec![Assignment {
                task_id: tid,
                attempt,
                agent: "a".into(),
            }],
            unplaced: vec![],
        },
    )
}

/// Places and runs `step` on agent a, ending with `ok`.
fn run_step(s: &mut State, now: u64, step: &str, ok: bool) -> CommandResult {
    let tid = format!("run-1/{step}");
    let attempt = s.tasks[&tid].attempt;
    let r = assign(s, now, step);
    assert!(
        matches!(&r, CommandResult::PlanApplied { accepted, .. } if accepted.len() == 1),
        "{step}: {r:?}"
    );
    apply(
        s,
        now,
        Command::TaskFinished {
            agent: "a".into(),
            task_id: tid,
            attempt,
            outcome: Outcome {
                succeeded: ok,
                exit_code: Some(if ok { 0 } else { 3 }),
                ..Default::default()
            },
            started_at_us: 0,
        },
    )
}

fn diamond() -> Vec<TaskSpec> {
    vec![
        step("a", &[]),
        step("b", &["a"]),
        step("c", &["a"]),
        step("d", &["b", "c"]),
    ]
}

#[test]
fn a_diamond_releases_each_step_when_all_it_needs_has_succeeded() {
    let mut s = setup(diamond(), OnFailure::FailFast);
    assert_eq!(pending(&s), ["a"]);
    assert_eq!(state(&s, "d"), TaskState::Blocked);
    run_step(&mut s, 2 * S, "a", true);
    assert_eq!(pending(&s), ["b", "c"], "both middle steps at once");
    run_step(&mut s, 3 * S, "b", true);
    assert_eq!(state(&s, "d"), TaskState::Blocked, "still waits for c");
    run_step(&mut s, 3 * S, "c", true);
    assert_eq!(pending(&s), ["d"]);
    run_step(&mut s, 4 * S, "d", true);
    let run = s.run_by_id("run-1").unwrap();
    assert_eq!(s.run_state(run), crate::model::RunState::Succeeded);
    assert_eq!(run.finished_at_us, 4 * S);
}

#[test]
fn a_failure_retries_after_its_backoff_and_counts_its_attempts() {
    let mut retried = step("a", &[]);
    retried.retry = RetryPolicy {
        max: 2,
        backoff: Backoff::Exponential,
        initial_ms: 1000,
        max_delay_ms: 0,
    };
    let mut s = setup(vec![retried], OnFailure::FailFast);
    run_step(&mut s, 2 * S, "a", false);
    let t = &s.tasks["run-1/a"];
    assert_eq!(t.state, TaskState::Waiting);
    let first = t.retry_at_us - 2 * S;
    assert!((800_000..=1_000_000).contains(&first), "{first}");
    assert!(s.pending.is_empty() && s.retry_due.len() == 1);
    // The leader fires the deadline: the next attempt is queued.
    let due = HeldTask {
        task_id: "run-1/a".into(),
        attempt: 1,
    };
    apply(
        &mut s,
        3 * S,
        Command::RetryDue {
            tasks: vec![due.clone()],
        },
    );
    assert_eq!(pending(&s), ["a"]);
    assert_eq!(s.tasks["run-1/a"].attempt, 2);
    // Fired twice (a re-led timer): the second finds nothing waiting.
    let r = apply(&mut s, 3 * S, Command::RetryDue { tasks: vec![due] });
    assert_eq!(r, CommandResult::Retried { tasks: vec![] });
    run_step(&mut s, 4 * S, "a", false);
    let second = s.tasks["run-1/a"].retry_at_us - 4 * S;
    assert!(
        (1_600_000..=2_000_000).contains(&second),
        "doubled: {second}"
    );
    let t = s.tasks["run-1/a"].clone();
    apply(
        &mut s,
        7 * S,
        Command::RetryDue {
            tasks: vec![HeldTask {
                task_id: t.id.clone(),
                attempt: t.attempt,
            }],
        },
    );
    run_step(&mut s, 8 * S, "a", true);
    let t = &s.tasks["run-1/a"];
    assert_eq!(t.state, TaskState::Succeeded);
    assert_eq!(t.attempt, 3);
    let codes: Vec<_> = t.history.iter().map(|h| h.exit_code).collect();
    assert_eq!(codes, [Some(3), Some(3), Some(0)]);
    assert!(s.dead_letters.is_empty());
}

#[test]
fn an_exhausted_step_is_a_dead_letter_and_retrying_it_resumes_the_run() {
    let mut s = setup(diamond(), OnFailure::Continue);
    run_step(&mut s, 2 * S, "a", true);
    run_step(&mut s, 3 * S, "b", false);
    assert_eq!(state(&s, "d"), TaskState::Skipped, "downstream of b");
    assert_eq!(pending(&s), ["c"], "an independent branch keeps going");
    run_step(&mut s, 3 * S, "c", true);
    let run = s.run_by_id("run-1").unwrap();
    assert_eq!(s.run_state(run), crate::model::RunState::Failed);
    let (id, letter) = s.dead_letters.first_key_value().unwrap();
    assert_eq!(letter.step, "b");
    assert_eq!(letter.exit_code, Some(3));
    let id = *id;
    let r = apply(&mut s, 4 * S, Command::RetryDeadLetter { id });
    assert!(matches!(r, CommandResult::Retried { .. }), "{r:?}");
    assert!(s.dead_letters.is_empty());
    assert_eq!(pending(&s), ["b"]);
    assert_eq!(state(&s, "d"), TaskState::Blocked, "restored, waits for b");
    assert_eq!(s.run_by_id("run-1").unwrap().finished_at_us, 0);
    run_step(&mut s, 5 * S, "b", true);
    run_step(&mut s, 6 * S, "d", true);
    let run = s.run_by_id("run-1").unwrap();
    assert_eq!(s.run_state(run), crate::model::RunState::Succeeded);
    assert_eq!(run.finished_at_us, 6 * S);
    let r = apply(&mut s, 7 * S, Command::RetryDeadLetter { id });
    assert!(matches!(r, CommandResult::NotFound { .. }), "{r:?}");
}

#[test]
fn fail_fast_skips_the_rest_and_stops_what_runs() {
    let mut s = setup(diamond(), OnFailure::FailFast);
    run_step(&mut s, 2 * S, "a", true);
    // c is running on the agent when b fails.
    assign(&mut s, 3 * S, "c");
    run_step(&mut s, 3 * S, "b", false);
    assert_eq!(state(&s, "c"), TaskState::Skipped);
    assert_eq!(state(&s, "d"), TaskState::Skipped);
    assert_eq!(s.stopping["run-1/c"], ("a".to_owned(), 1));
    assert!(s.agents["a"].tasks.is_empty());
    assert_eq!(s.active_by_queue.get("default"), None);
    // The agent's report of the stopped attempt ends the stop.
    apply(
        &mut s,
        4 * S,
        Command::TaskFinished {
            agent: "a".into(),
            task_id: "run-1/c".into(),
            attempt: 1,
            outcome: Outcome::default(),
            started_at_us: 0,
        },
    );
    assert!(s.stopping.is_empty());
    assert_eq!(state(&s, "c"), TaskState::Skipped);
    // Retrying b's dead letter brings back c (nothing it needs failed) and d.
    let id = *s.dead_letters.keys().next().unwrap();
    apply(&mut s, 5 * S, Command::RetryDeadLetter { id });
    assert_eq!(pending(&s), ["b", "c"]);
}

#[test]
fn cancelling_a_run_ends_every_step_and_stops_running_ones() {
    let mut s = setup(diamond(), OnFailure::FailFast);
    assign(&mut s, 2 * S, "a");
    let r = apply(
        &mut s,
        3 * S,
        Command::CancelRun {
            run_id: "run-1".into(),
            step: String::new(),
            reason: "by t".into(),
        },
    );
    assert!(
        matches!(&r, CommandResult::Cancelled { tasks } if tasks.len() == 4),
        "{r:?}"
    );
    let run = s.run_by_id("run-1").unwrap();
    assert_eq!(s.run_state(run), crate::model::RunState::Cancelled);
    assert_eq!(s.stopping.len(), 1);
    // A registration that still holds it is told to stop it.
    let r = apply(
        &mut s,
        4 * S,
        Command::RegisterAgent {
            name: "a".into(),
            labels: BTreeMap::new(),
            total: Resources::default(),
            class: "default".into(),
            version: "t".into(),
            held: vec![HeldTask {
                task_id: "run-1/a".into(),
                attempt: 1,
            }],
            pool: String::new(),
            isolation: String::new(),
            instance_id: String::new(),
        },
    );
    assert!(
        matches!(&r, CommandResult::Registered { stale, .. } if stale.len() == 1),
        "{r:?}"
    );
    let r = apply(
        &mut s,
        4 * S,
        Command::CancelRun {
            run_id: "run-1".into(),
            step: String::new(),
            reason: "again".into(),
        },
    );
    assert_eq!(
        r,
        CommandResult::Cancelled { tasks: vec![] },
        "a retry is answered as done"
    );
    let r = apply(
        &mut s,
        4 * S,
        Command::CancelRun {
            run_id: "run-9".into(),
            step: String::new(),
            reason: "x".into(),
        },
    );
    assert!(matches!(r, CommandResult::NotFound { .. }), "{r:?}");
}

#[test]
fn cancelling_one_step_skips_only_what_needs_it() {
    let mut s = setup(diamond(), OnFailure::FailFast);
    run_step(&mut s, 2 * S, "a", true);
    apply(
        &mut s,
        3 * S,
        Command::CancelRun {
            run_id: "run-1".into(),
            step: "b".into(),
            reason: "t".into(),
        },
    );
    assert_eq!(state(&s, "b"), TaskState::Cancelled);
    assert_eq!(state(&s, "d"), TaskState::Skipped);
    assert_eq!(pending(&s), ["c"]);
    run_step(&mut s, 4 * S, "c", true);
    let run = s.run_by_id("run-1").unwrap();
    assert_eq!(s.run_state(run), crate::model::RunState::Cancelled);
}

#[test]
fn queue_limits_hold_at_apply_and_survive_a_snapshot() {
    let mut s = setup(vec![step("first", &[])], OnFailure::FailFast);
    apply(
        &mut s,
        S,
        Command::SetQueue {
            name: "etl".into(),
            config: QueueConfig {
                max_concurrency: 2,
                max_pending: 3,
                ..Default::default()
            },
        },
    );
    let submit = |s: &mut State, n: usize| {
        apply(
            s,
            S,
            Command::SubmitRun {
                idempotency_key: String::new(),
                spec: RunSpec {
                    name: "q".into(),
                    tasks: (0..n)
                        .map(|i| TaskSpec {
                            queue: "etl".into(),
                            ..step(&format!("s{i}"), &[])
                        })
                        .collect(),
                    ..Default::default()
                },
                submitted_by: "t".into(),
                placement: None,
            },
        )
    };
    let r = submit(&mut s, 3);
    let CommandResult::Submitted { run_id, .. } = r else {
        panic!("{r:?}")
    };
    let r = submit(&mut s, 1);
    assert!(
        matches!(&r, CommandResult::Rejected { limit: Some(l), .. } if l == "queue etl max_pending"),
        "{r:?}"
    );
    let r = apply(
        &mut s,
        2 * S,
        Command::ApplyPlan {
            term: 1,
            assignments: (0..3)
                .map(|i| Assignment {
                    task_id: format!("{run_id}/s{i}"),
                    attempt: 1,
                    agent: "a".into(),
                })
                .collect(),
            unplaced: vec![],
        },
    );
    assert!(
        matches!(&r, CommandResult::PlanApplied { accepted, dropped: 1 } if accepted.len() == 2),
        "{r:?}"
    );
    assert_eq!(s.active_by_queue["etl"], 2);
    let mut restored: State = serde_json::from_slice(&serde_json::to_vec(&s).unwrap()).unwrap();
    restored.rebuild_derived();
    assert_eq!(restored, s);
}

#[test]
fn a_late_report_of_an_attempt_the_leader_failed_changes_nothing() {
    let mut retried = step("a", &[]);
    retried.retry = RetryPolicy {
        max: 1,
        backoff: Backoff::Fixed,
        initial_ms: 1000,
        max_delay_ms: 0,
    };
    let mut s = setup(vec![retried], OnFailure::FailFast);
    assign(&mut s, 2 * S, "a");
    let held = HeldTask {
        task_id: "run-1/a".into(),
        attempt: 1,
    };
    apply(
        &mut s,
        3 * S,
        Command::FailTasks {
            tasks: vec![(held.clone(), "timeout".into())],
        },
    );
    assert_eq!(state(&s, "a"), TaskState::Waiting);
    assert_eq!(s.stopping.len(), 1);
    let before = s.clone();
    // The agent's own report of that attempt arrives after all.
    let mut late = s.clone();
    apply(
        &mut late,
        4 * S,
        Command::TaskFinished {
            agent: "a".into(),
            task_id: "run-1/a".into(),
            attempt: 1,
            outcome: Outcome::default(),
            started_at_us: 0,
        },
    );
    assert!(late.stopping.is_empty(), "the stop is confirmed");
    assert_eq!(late.tasks, before.tasks);
    assert_eq!(late.retry_due, before.retry_due);
}

#[test]
fn a_step_failing_for_good_leaves_its_queue_once() {
    // Guards: the queue's active count (what max_concurrency is held to) drops by one per
    // finished attempt, however many steps of ending it take it off its agent.
    let mut s = setup(vec![step("x", &[]), step("y", &[])], OnFailure::Continue);
    assign(&mut s, 2 * S, "y");
    run_step(&mut s, 2 * S, "x", false);
    assert_eq!(s.active_by_queue.get("default"), Some(&1), "y still runs");
    let mut restored = s.clone();
    restored.rebuild_derived();
    assert_eq!(restored.active_by_queue, s.active_by_queue);
}
