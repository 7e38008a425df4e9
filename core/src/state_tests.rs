//! `apply` without any network: fencing, idempotency, plan re-checks, loss and recovery.

use std::collections::BTreeMap;

use super::*;
use crate::model::{Program, TaskSpec};

fn spec(tasks: &[&str], cpu: u64) -> RunSpec {
    RunSpec {
        name: "r".into(),
        tasks: tasks
            .iter()
            .map(|n| TaskSpec {
                resources: Resources {
                    cpu_millis: cpu,
                    ..Default::default()
                },
                ..TaskSpec::new(*n, Program::Argv(vec!["true".into()]))
            })
            .collect(),
        on_failure: crate::model::OnFailure::Continue,
        labels: BTreeMap::new(),
        ..Default::default()
    }
}

fn one(state: &mut State, term: u64, cmd: Command) -> CommandResult {
    let mut r = state.apply(
        term,
        &Request {
            now_us: 1_000_000,
            commands: vec![cmd].into(),
        },
    );
    r.results.pop().unwrap()
}

fn register(state: &mut State, name: &str, cpu: u64, held: Vec<HeldTask>) -> CommandResult {
    one(
        state,
        1,
        Command::RegisterAgent {
            name: name.into(),
            labels: BTreeMap::new(),
            total: Resources {
                cpu_millis: cpu,
                ..Default::default()
            },
            class: "default".into(),
            version: "t".into(),
            held,
            pool: String::new(),
            isolation: String::new(),
            instance_id: String::new(),
        },
    )
}

fn submit(state: &mut State, key: &str, tasks: &[&str], cpu: u64) -> String {
    match one(
        state,
        1,
        Command::SubmitRun {
            idempotency_key: key.into(),
            spec: spec(tasks, cpu),
            submitted_by: "t".into(),
            placement: None,
        },
    ) {
        CommandResult::Submitted { run_id, .. } => run_id,
        other => panic!("{other:?}"),
    }
}

fn assign(state: &mut State, term: u64, task: &str, attempt: u64, agent: &str) -> CommandResult {
    one(
        state,
        term,
        Command::ApplyPlan {
            term,
            assignments: vec![Assignment {
                task_id: task.into(),
                attempt,
                agent: agent.into(),
            }],
            unplaced: vec![],
        },
    )
}

fn finish(state: &mut State, agent: &str, task: &str, attempt: u64, ok: bool) -> CommandResult {
    one(
        state,
        1,
        Command::TaskFinished {
            agent: agent.into(),
            task_id: task.into(),
            attempt,
            outcome: Outcome {
                exit_code: Some(if ok { 0 } else { 1 }),
                succeeded: ok,
                ..Default::default()
            },
            started_at_us: 0,
        },
    )
}

#[test]
fn a_run_goes_from_pending_to_succeeded_and_frees_its_capacity() {
    // Guards: the happy path of apply and the capacity bookkeeping on the agent.
    let mut s = State::default();
    register(&mut s, "a", 1000, vec![]);
    let run = submit(&mut s, "k1", &["main"], 600);
    assert_eq!(run, "run-1");
    let tid = task_id(&run, "main");
    assert!(
        matches!(assign(&mut s, 1, &tid, 1, "a"), CommandResult::PlanApplied { ref accepted, dropped: 0 } if accepted.len() == 1)
    );
    assert_eq!(s.agents["a"].free().cpu_millis, 400);
    assert_eq!(
        one(
            &mut s,
            1,
            Command::TaskStarted {
                agent: "a".into(),
                task_id: tid.clone(),
                attempt: 1,
                started_at_us: 0,
            }
        ),
        CommandResult::Reported
    );
    assert_eq!(s.tasks[&tid].state, TaskState::Running);
    assert_eq!(finish(&mut s, "a", &tid, 1, true), CommandResult::Reported);
    assert_eq!(s.tasks[&tid].state, TaskState::Succeeded);
    assert_eq!(s.agents["a"].free().cpu_millis, 1000);
    assert_eq!(s.run_state(s.run_by_id(&run).unwrap()), RunState::Succeeded);
    assert_ne!(s.run_by_id(&run).unwrap().finished_at_us, 0);
}

#[test]
fn the_same_idempotency_key_never_creates_a_second_run() {
    // Guards: retried submissions (after a timeout) return the first run.
    let mut s = State::default();
    let first = submit(&mut s, "same", &["main"], 0);
    let again = one(
        &mut s,
        1,
        Command::SubmitRun {
            idempotency_key: "same".into(),
            spec: spec(&["main"], 0),
            submitted_by: "t".into(),
            placement: None,
        },
    );
    assert_eq!(
        again,
        CommandResult::Submitted {
            run_id: first,
            deduplicated: true,
            assigned: vec![],
        }
    );
    assert_eq!(s.runs.len(), 1);
}

#[test]
fn apply_refuses_stale_or_overcommitting_assignments_and_foreign_terms() {
    // Guards: plan/apply re-checks (capacity, attempt, task state) and term fencing of plans.
    let mut s = State::default();
    register(&mut s, "a", 1000, vec![]);
    let run = submit(&mut s, "", &["x", "y"], 700);
    let x = task_id(&run, "x");
    let y = task_id(&run, "y");
    assert!(matches!(
        assign(&mut s, 1, &x, 1, "a"),
        CommandResult::PlanApplied { dropped: 0, .. }
    ));
    // y would overcommit the agent: dropped.
    assert!(matches!(
        assign(&mut s, 1, &y, 1, "a"),
        CommandResult::PlanApplied { dropped: 1, .. }
    ));
    // x is no longer pending: dropped.
    assert!(matches!(
        assign(&mut s, 1, &x, 1, "a"),
        CommandResult::PlanApplied { dropped: 1, .. }
    ));
    // Wrong attempt, unknown agent: dropped.
    assert!(matches!(
        assign(&mut s, 1, &y, 7, "a"),
        CommandResult::PlanApplied { dropped: 1, .. }
    ));
    assert!(matches!(
        assign(&mut s, 1, &y, 1, "ghost"),
        CommandResult::PlanApplied { dropped: 1, .. }
    ));
    // A plan made in another term is refused whole.
    let r = one(
        &mut s,
        2,
        Command::ApplyPlan {
            term: 1,
            assignments: vec![],
            unplaced: vec![],
        },
    );
    assert!(matches!(r, CommandResult::Rejected { .. }));
    assert_eq!(s.counters.assignments_dropped, 4);
}

#[test]
fn a_lost_agent_requeues_its_tasks_and_its_late_results_are_rejected() {
    // Guards: attempts as fencing tokens across agent loss, and stale re-registration.
    let mut s = State::default();
    register(&mut s, "a", 1000, vec![]);
    register(&mut s, "b", 1000, vec![]);
    let run = submit(&mut s, "", &["main"], 100);
    let tid = task_id(&run, "main");
    assign(&mut s, 1, &tid, 1, "a");
    let lost = one(
        &mut s,
        1,
        Command::AgentLost {
            name: "a".into(),
            reason: "test".into(),
        },
    );
    assert_eq!(
        lost,
        CommandResult::AgentLost {
            requeued: vec![tid.clone()]
        }
    );
    assert_eq!(s.tasks[&tid].state, TaskState::Pending);
    assert_eq!(s.tasks[&tid].attempt, 2);
    assert_eq!(s.agents["a"].used, Resources::default());
    assert!(s.tasks[&tid].pending_reason.contains("agent a lost"));

    assign(&mut s, 1, &tid, 2, "b");
    // The old attempt's result arrives late: rejected, counted, nothing changes.
    assert_eq!(
        finish(&mut s, "a", &tid, 1, true),
        CommandResult::StaleReport { current_attempt: 2 }
    );
    assert_eq!(s.counters.stale_reports, 1);
    assert_eq!(s.tasks[&tid].state, TaskState::Assigned);
    // The lost agent comes back still holding attempt 1: told it is stale.
    let r = register(
        &mut s,
        "a",
        1000,
        vec![HeldTask {
            task_id: tid.clone(),
            attempt: 1,
        }],
    );
    assert!(matches!(r, CommandResult::Registered { ref stale, .. } if stale.len() == 1));
    assert_eq!(s.agents["a"].state, AgentState::Active);
    // The current attempt completes normally.
    assert_eq!(finish(&mut s, "b", &tid, 2, true), CommandResult::Reported);
    assert_eq!(s.tasks[&tid].state, TaskState::Succeeded);
}

#[test]
fn reregistration_resends_unreceived_and_requeues_vanished_tasks() {
    // Guards: recovery of an agent that restarted (lost its processes) or missed an assignment.
    let mut s = State::default();
    register(&mut s, "a", 1000, vec![]);
    let run = submit(&mut s, "", &["sent", "running"], 100);
    let sent = task_id(&run, "sent");
    let running = task_id(&run, "running");
    assign(&mut s, 1, &sent, 1, "a");
    assign(&mut s, 1, &running, 1, "a");
    one(
        &mut s,
        1,
        Command::TaskStarted {
            agent: "a".into(),
            task_id: running.clone(),
            attempt: 1,
            started_at_us: 0,
        },
    );
    let r = register(&mut s, "a", 1000, vec![]);
    assert_eq!(
        r,
        CommandResult::Registered {
            stale: vec![],
            resend: vec![sent.clone()],
            requeued: vec![running.clone()]
        }
    );
    assert_eq!(s.tasks[&running].attempt, 2);
    assert_eq!(s.tasks[&running].state, TaskState::Pending);
    // Holding the current attempt is fine: nothing stale, nothing to resend.
    let r = register(
        &mut s,
        "a",
        1000,
        vec![HeldTask {
            task_id: sent.clone(),
            attempt: 1,
        }],
    );
    assert_eq!(
        r,
        CommandResult::Registered {
            stale: vec![],
            resend: vec![],
            requeued: vec![]
        }
    );
}

#[test]
fn apply_is_deterministic_and_snapshots_round_trip() {
    // Guards: replicas applying the same log agree byte for byte, including through a snapshot.
    let build = || {
        let mut s = State::default();
        register(&mut s, "b", 2000, vec![]);
        register(&mut s, "a", 2000, vec![]);
        for i in 0..20 {
            let run = submit(&mut s, &format!("k{i}"), &["t1", "t2"], 150);
            assign(
                &mut s,
                1,
                &task_id(&run, "t1"),
                1,
                if i % 2 == 0 { "a" } else { "b" },
            );
        }
        one(
            &mut s,
            1,
            Command::AgentLost {
                name: "b".into(),
                reason: "x".into(),
            },
        );
        s
    };
    let (s1, s2) = (build(), build());
    let j1 = serde_json::to_vec(&s1).unwrap();
    assert_eq!(j1, serde_json::to_vec(&s2).unwrap());
    let mut restored: State = serde_json::from_slice(&j1).unwrap();
    restored.rebuild_derived();
    assert_eq!(restored, s1);
}

#[test]
fn a_run_finishes_with_its_last_task_also_after_a_snapshot() {
    // Guards: the run's count of unfinished tasks (kept instead of a walk over every sibling per
    // result) is exact, ignores duplicate results, and is rebuilt from a snapshot.
    let mut s = State::default();
    register(&mut s, "a", 4000, vec![]);
    let run = submit(&mut s, "k", &["t1", "t2", "t3"], 100);
    for t in ["t1", "t2", "t3"] {
        assign(&mut s, 1, &task_id(&run, t), 1, "a");
    }
    finish(&mut s, "a", &task_id(&run, "t1"), 1, true);
    finish(&mut s, "a", &task_id(&run, "t1"), 1, true);
    assert_eq!(s.run_by_id(&run).unwrap().finished_at_us, 0);
    // As a snapshot load does: the stored fields, then what is derived from them.
    let mut restored: State = serde_json::from_slice(&serde_json::to_vec(&s).unwrap()).unwrap();
    restored.rebuild_derived();
    assert_eq!(restored, s);
    for st in [&mut s, &mut restored] {
        finish(st, "a", &task_id(&run, "t2"), 1, false);
        assert_eq!(st.run_by_id(&run).unwrap().finished_at_us, 0);
        finish(st, "a", &task_id(&run, "t3"), 1, true);
        let r = st.run_by_id(&run).unwrap();
        assert_eq!(r.finished_at_us, 1_000_000);
        assert_eq!(st.run_state(r), RunState::Failed);
    }
}

#[test]
fn the_pending_queue_has_a_limit_that_names_itself() {
    // Guards: pending_tasks_max is enforced in apply with a named RESOURCE_EXHAUSTED-style result.
    let mut s = State::default();
    for i in 0..limits::PENDING_TASKS_MAX {
        s.pending.insert((0, i as u64, format!("fake-{i}")));
    }
    let r = one(
        &mut s,
        1,
        Command::SubmitRun {
            idempotency_key: String::new(),
            spec: spec(&["main"], 0),
            submitted_by: "t".into(),
            placement: None,
        },
    );
    assert!(
        matches!(r, CommandResult::Rejected { limit: Some(ref l), .. } if l == "pending_tasks_max"),
        "{r:?}"
    );
}

#[test]
fn an_unchanged_reregistration_needs_no_write_but_any_change_does() {
    // Guards: the leader's no-write answer to reconnects matches what apply would have answered.
    let mut s = State::default();
    register(&mut s, "a", 1000, vec![]);
    let run = submit(&mut s, "", &["sent", "running"], 100);
    let (sent, running) = (task_id(&run, "sent"), task_id(&run, "running"));
    assign(&mut s, 1, &sent, 1, "a");
    assign(&mut s, 1, &running, 1, "a");
    one(
        &mut s,
        1,
        Command::TaskStarted {
            agent: "a".into(),
            task_id: running.clone(),
            attempt: 1,
            started_at_us: 0,
        },
    );
    let cmd = |cpu: u64, held: Vec<HeldTask>| Command::RegisterAgent {
        name: "a".into(),
        labels: BTreeMap::new(),
        total: Resources {
            cpu_millis: cpu,
            ..Default::default()
        },
        class: "default".into(),
        version: "t".into(),
        held,
        pool: String::new(),
        isolation: String::new(),
        instance_id: String::new(),
    };
    let holds_running = vec![
        HeldTask {
            task_id: running.clone(),
            attempt: 1,
        },
        HeldTask {
            task_id: "run-9/x".into(),
            attempt: 3,
        },
    ];
    // Same attributes, holding the running task: answered without a write, and the same as apply.
    let fast = s
        .unchanged_registration(&cmd(1000, holds_running.clone()))
        .expect("no write needed");
    let mut applied = s.clone();
    assert_eq!(one(&mut applied, 1, cmd(1000, holds_running)), fast);
    assert!(
        matches!(&fast, CommandResult::Registered { stale, resend, requeued } if stale.len() == 1 && resend == &vec![sent.clone()] && requeued.is_empty())
    );
    // The running task vanished (agent restarted): a write is needed to re-queue it.
    assert_eq!(s.unchanged_registration(&cmd(1000, vec![])), None);
    // Different capacity, unknown agent, or a lost agent: a write is needed.
    assert_eq!(
        s.unchanged_registration(&cmd(
            2000,
            vec![HeldTask {
                task_id: running.clone(),
                attempt: 1
            }]
        )),
        None
    );
    one(
        &mut s,
        1,
        Command::AgentLost {
            name: "a".into(),
            reason: "t".into(),
        },
    );
    assert_eq!(s.unchanged_registration(&cmd(1000, vec![])), None);
}

fn submit_placed(
    state: &mut State,
    term: u64,
    plan_term: u64,
    tasks: &[&str],
    cpu: u64,
    on: &str,
) -> CommandResult {
    one(
        state,
        term,
        Command::SubmitRun {
            idempotency_key: String::new(),
            spec: spec(tasks, cpu),
            submitted_by: "t".into(),
            placement: Some(crate::command::Placement {
                term: plan_term,
                agents: tasks.iter().map(|_| Some(on.to_owned())).collect(),
            }),
        },
    )
}

#[test]
fn a_placement_at_submission_commits_with_the_run_and_is_rechecked() {
    let mut s = State::default();
    register(&mut s, "a1", 1_000, vec![]);
    // Fits: both tasks assigned in the same apply as the submission.
    let CommandResult::Submitted {
        run_id, assigned, ..
    } = submit_placed(&mut s, 1, 1, &["x", "y"], 400, "a1")
    else {
        panic!()
    };
    assert_eq!(assigned.len(), 2);
    assert!(s.pending.is_empty());
    assert_eq!(s.tasks[&task_id(&run_id, "x")].state, TaskState::Assigned);
    assert_eq!(s.agents["a1"].used.cpu_millis, 800);
    // Over capacity: apply refuses the placement, the task waits for a round.
    let CommandResult::Submitted {
        run_id, assigned, ..
    } = submit_placed(&mut s, 1, 1, &["z"], 400, "a1")
    else {
        panic!()
    };
    assert!(assigned.is_empty());
    assert_eq!(s.tasks[&task_id(&run_id, "z")].state, TaskState::Pending);
    assert_eq!(s.counters.assignments_dropped, 1);
    // Planned by the leader of an older term: ignored, the run is still accepted.
    let CommandResult::Submitted {
        run_id, assigned, ..
    } = submit_placed(&mut s, 2, 1, &["w"], 100, "a1")
    else {
        panic!()
    };
    assert!(assigned.is_empty());
    assert_eq!(s.tasks[&task_id(&run_id, "w")].state, TaskState::Pending);
    assert_eq!(s.agents["a1"].used.cpu_millis, 800);
    // An unknown agent is refused the same way.
    let CommandResult::Submitted { assigned, .. } = submit_placed(&mut s, 2, 2, &["v"], 1, "nope")
    else {
        panic!()
    };
    assert!(assigned.is_empty());
}

#[test]
fn the_agents_start_time_is_kept_within_assignment_and_the_leaders_clock() {
    // Guards: a task's start is when the agent began it, but a skewed agent clock cannot put it
    // before the assignment or after the report was committed.
    let mut s = State::default();
    let at = |s: &mut State, now_us: u64, cmd: Command| {
        s.apply(
            1,
            &Request {
                now_us,
                commands: vec![cmd].into(),
            },
        )
        .results
        .pop()
        .unwrap()
    };
    register(&mut s, "a", 1000, vec![]);
    let run = submit(&mut s, "", &["x", "y", "z", "w"], 0);
    let tids: Vec<String> = ["x", "y", "z", "w"]
        .iter()
        .map(|t| task_id(&run, t))
        .collect();
    for tid in &tids {
        let plan = Command::ApplyPlan {
            term: 1,
            assignments: vec![Assignment {
                task_id: tid.clone(),
                attempt: 1,
                agent: "a".into(),
            }],
            unplaced: vec![],
        };
        at(&mut s, 2_000_000, plan);
    }
    for (tid, reported) in tids.iter().zip([2_500_000, 500_000, 9_000_000, 0]) {
        let started = Command::TaskStarted {
            agent: "a".into(),
            task_id: tid.clone(),
            attempt: 1,
            started_at_us: reported,
        };
        assert_eq!(at(&mut s, 3_000_000, started), CommandResult::Reported);
    }
    let started: Vec<u64> = tids.iter().map(|t| s.tasks[t].started_at_us).collect();
    assert_eq!(started, vec![2_500_000, 2_000_000, 3_000_000, 3_000_000]);
}

#[test]
fn the_oldest_finished_runs_are_forgotten_past_the_run_or_task_limit() {
    // Guards: retention bounds tasks as well as runs, never drops an unfinished run, and a key of
    // a forgotten run no longer deduplicates even before the stale-key sweep.
    let mut s = State::default();
    register(&mut s, "a", 100_000, vec![]);
    let mut runs = Vec::new();
    for i in 0..4 {
        let run = submit(&mut s, &format!("k{i}"), &["t1", "t2", "t3"], 1);
        for t in ["t1", "t2", "t3"] {
            assign(&mut s, 1, &task_id(&run, t), 1, "a");
        }
        runs.push(run);
    }
    // run-1 is still running; run-2 and run-3 finish.
    for run in &runs[1..3] {
        for t in ["t1", "t2", "t3"] {
            finish(&mut s, "a", &task_id(run, t), 1, true);
        }
    }
    s.evict_old_runs(10, 7);
    assert!(s.run_by_id(&runs[0]).is_some(), "unfinished runs stay");
    assert!(s.run_by_id(&runs[1]).is_none());
    assert!(s.run_by_id(&runs[2]).is_none());
    assert_eq!(s.tasks.len(), 6);
    assert!(!s.tasks.contains_key(&task_id(&runs[1], "t1")));
    s.evict_old_runs(1, 1_000);
    assert_eq!(s.runs.len(), 2, "only finished runs are forgotten");
    let again = submit(&mut s, "k1", &["t1"], 1);
    assert_ne!(again, runs[1], "a forgotten run's key starts a new run");
}

#[test]
fn an_agent_registering_below_what_it_holds_takes_nothing_more_and_apply_does_not_panic() {
    // Guards: before, apply asserted `used <= total` after adding a zero request to an agent that
    // had re-registered smaller, and every replica panicked on that entry (and on its replay).
    let mut s = State::default();
    register(&mut s, "a", 2_000, vec![]);
    let big = task_id(&submit(&mut s, "", &["big"], 1_500), "big");
    assign(&mut s, 1, &big, 1, "a");
    let held = vec![HeldTask {
        task_id: big.clone(),
        attempt: 1,
    }];
    // Restarted with less capacity, still holding its task: accepted, the task stays placed.
    assert!(matches!(
        register(&mut s, "a", 1_000, held),
        CommandResult::Registered { ref requeued, .. } if requeued.is_empty()
    ));
    assert!(s.agents["a"].over_committed());
    let zero = task_id(&submit(&mut s, "", &["zero"], 0), "zero");
    let dropped_before = s.counters.assignments_dropped;
    assert!(matches!(
        assign(&mut s, 1, &zero, 1, "a"),
        CommandResult::PlanApplied { ref accepted, dropped: 1 } if accepted.is_empty()
    ));
    assert_eq!(s.counters.assignments_dropped, dropped_before + 1);
    assert_eq!(s.tasks[&zero].state, TaskState::Pending);
    // The scheduler is not offered it either, so the leader does not plan it over and over.
    let slot = crate::placement::agent_slot(&s.agents["a"], None);
    assert_eq!(slot.slots, 0);
    // Once the big task finishes, it fits again.
    finish(&mut s, "a", &big, 1, true);
    assert!(!s.agents["a"].over_committed());
    assert!(matches!(
        assign(&mut s, 1, &zero, 1, "a"),
        CommandResult::PlanApplied { ref accepted, dropped: 0 } if accepted.len() == 1
    ));
}

#[test]
fn capacity_sums_saturate_instead_of_overflowing() {
    let huge = Resources {
        cpu_millis: u64::MAX,
        memory_bytes: u64::MAX,
        gpus: u64::MAX,
        extended: [("x".to_owned(), u64::MAX)].into(),
    };
    let sum = huge.plus(&huge);
    assert_eq!(sum, huge);
}

#[test]
fn the_queue_refuses_runs_past_its_task_or_byte_cap_naming_the_cap() {
    let t = |tasks, bytes| Tally { tasks, bytes };
    assert!(room_for(t(5, 500), t(5, 500), 10, 1_000).is_ok());
    let refusal = |r: Result<(), CommandResult>| match r {
        Err(CommandResult::Rejected {
            limit: Some(l),
            message,
        }) => (l, message),
        other => panic!("{other:?}"),
    };
    let (limit, message) = refusal(room_for(t(9, 0), t(2, 0), 10, 1_000));
    assert_eq!(limit, "pending_tasks_max");
    assert!(message.contains("9 tasks are pending"), "{message}");
    let (limit, message) = refusal(room_for(t(1, 900), t(1, 200), 10, 1_000));
    assert_eq!(limit, "pending_bytes_max");
    assert!(message.contains("this run adds 200"), "{message}");
}

#[test]
fn pending_tallies_follow_tasks_in_and_out_of_the_queue_and_survive_a_snapshot() {
    let mut s = State::default();
    register(&mut s, "a", 10_000, vec![]);
    let run = submit(&mut s, "", &["x", "y"], 100);
    let per_task = s.tasks[&task_id(&run, "x")].spec.approx_bytes();
    assert_eq!(
        s.pending_total,
        Tally {
            tasks: 2,
            bytes: 2 * per_task
        }
    );
    assert_eq!(s.pending_by_submitter["t"].tasks, 2);
    assert_eq!(s.pending_by_queue["default"].tasks, 2);
    assign(&mut s, 1, &task_id(&run, "x"), 1, "a");
    assert_eq!(s.pending_total.tasks, 1);
    // Lost with its agent: back in the queue, counted again.
    one(
        &mut s,
        1,
        Command::AgentLost {
            name: "a".into(),
            reason: "t".into(),
        },
    );
    assert_eq!(s.pending_total.tasks, 2);
    assert_eq!(s.task_bytes, 2 * per_task);
    let mut restored: State = serde_json::from_slice(&serde_json::to_vec(&s).unwrap()).unwrap();
    restored.rebuild_derived();
    assert_eq!(restored, s);
}
