//! The autoscaling policy and its committed decisions, without any network or clock.

use std::collections::{BTreeMap, BTreeSet};

use super::*;
use crate::command::Command;
use crate::model::{Agent, AgentState, Hook, Resources, ScaleDown, ScaleUp};

const S: u64 = 1_000_000;

fn spec() -> PoolSpec {
    PoolSpec {
        name: "cpu".into(),
        min: 0,
        max: 4,
        class: String::new(),
        labels: BTreeMap::new(),
        scale_up: ScaleUp {
            pending_per_agent: 5,
            wait_p90_over_ms: 0,
            step: 2,
            cooldown_ms: 60_000,
        },
        scale_down: ScaleDown {
            idle_for_ms: 300_000,
            step: 1,
            cooldown_ms: 120_000,
        },
        boot_timeout_ms: 300_000,
        hook: Hook::Local { agent_args: vec![] },
    }
}

fn agent(name: &str, busy: bool, idle_since_us: u64) -> Agent {
    Agent {
        name: name.into(),
        labels: BTreeMap::new(),
        total: Resources::default(),
        class: "cpu".into(),
        version: String::new(),
        pool: "cpu".into(),
        isolation: String::new(),
        state: AgentState::Active,
        drain_deadline_ms: 0,
        registered_at_ms: 0,
        used: Resources::default(),
        tasks: if busy {
            BTreeSet::from(["run-1/t".to_owned()])
        } else {
            BTreeSet::new()
        },
        instance_id: format!("i-{name}"),
        idle_since_us: if busy { 0 } else { idle_since_us },
    }
}

fn pool() -> Pool {
    Pool {
        spec: spec(),
        ..Default::default()
    }
}

fn demand(pending: u64) -> Demand {
    Demand {
        pending,
        wait_p90_ms: 0,
    }
}

#[test]
fn it_grows_by_its_step_never_past_max_and_not_within_the_cooldown() {
    let p = pool();
    let d = decide(&p, &[], demand(40), 10 * S).unwrap();
    assert_eq!((d.from, d.to), (0, 2));
    assert!(d.reason.contains("40 tasks pending"), "{}", d.reason);
    // Two already launching count as capacity: 40 > 5 * 2, so 2 -> 4, and no further.
    let mut p = pool();
    p.launching.push(Launch {
        decision: 1,
        remaining: 2,
        deadline_us: 400 * S,
    });
    let d = decide(&p, &[], demand(40), 10 * S).unwrap();
    assert_eq!((d.from, d.to), (2, 4));
    let a: Vec<Agent> = (0..4).map(|i| agent(&format!("a{i}"), true, 0)).collect();
    let refs: Vec<&Agent> = a.iter().collect();
    assert_eq!(decide(&pool(), &refs, demand(400), 10 * S), None, "at max");
    let mut cooling = pool();
    cooling.last_up_us = 5 * S;
    assert_eq!(decide(&cooling, &refs[..1], demand(40), 10 * S), None);
}

#[test]
fn launches_past_their_boot_timeout_stop_counting() {
    let mut p = pool();
    p.launching.push(Launch {
        decision: 1,
        remaining: 2,
        deadline_us: 5 * S,
    });
    assert_eq!(launching(&p, 4 * S), 2);
    assert_eq!(launching(&p, 6 * S), 0);
    let d = decide(&p, &[], demand(40), 6 * S).unwrap();
    assert_eq!(d.from, 0, "the two that never came are not capacity");
}

#[test]
fn it_shrinks_only_idle_agents_after_idle_for_with_nothing_pending() {
    let idle = agent("idle", false, S);
    let fresh = agent("fresh", false, 400 * S);
    let busy = agent("busy", true, 0);
    let all = [&idle, &fresh, &busy];
    let now = 500 * S;
    let d = decide(&pool(), &all, demand(0), now).unwrap();
    assert_eq!(
        d.remove,
        ["idle"],
        "the one idle 499 s, not the one idle 100 s or the busy one"
    );
    assert_eq!((d.from, d.to), (3, 2));
    // Anything pending: no shrinking (hysteresis), and one task is not enough to grow.
    assert_eq!(decide(&pool(), &all, demand(1), now), None);
    // Never below min.
    let mut p = pool();
    p.spec.min = 3;
    assert_eq!(decide(&p, &all, demand(0), now), None);
    // Not within a scale-up's cooldown.
    let mut p = pool();
    p.last_up_us = now - S;
    assert_eq!(decide(&p, &all, demand(0), now), None);
}

#[test]
fn below_min_it_grows_to_min() {
    let mut p = pool();
    p.spec.min = 1;
    let d = decide(&p, &[], demand(0), S).unwrap();
    assert_eq!((d.from, d.to), (0, 1));
}

fn apply(s: &mut State, now_us: u64, cmd: Command) -> CommandResult {
    s.apply_at(now_us, cmd)
}

fn register(s: &mut State, now_us: u64, name: &str) {
    apply(
        s,
        now_us,
        Command::RegisterAgent {
            name: name.into(),
            labels: BTreeMap::new(),
            total: Resources::default(),
            class: "cpu".into(),
            version: String::new(),
            held: vec![],
            pool: "cpu".into(),
            isolation: String::new(),
            instance_id: format!("i-{name}"),
        },
    );
}

#[test]
fn decisions_commit_once_launch_until_registered_and_drain_only_idle_agents() {
    let mut s = State::default();
    apply(
        &mut s,
        S,
        Command::ApplyPools {
            pools: vec![spec()],
        },
    );
    let up = |from, to| Command::Scale {
        pool: "cpu".into(),
        from,
        to,
        reason: "test".into(),
        remove: vec![],
    };
    assert_eq!(
        apply(&mut s, S, up(0, 2)),
        CommandResult::Scaled { decision: 1 }
    );
    // The same decision again (a new leader that had not seen it): stale, no second launch.
    assert!(matches!(
        apply(&mut s, 2 * S, up(0, 2)),
        CommandResult::Rejected { .. }
    ));
    assert!(
        matches!(
            apply(&mut s, 2 * S, up(2, 4)),
            CommandResult::Rejected { .. }
        ),
        "cooldown"
    );
    register(&mut s, 3 * S, "a");
    assert_eq!(s.pools["cpu"].launching[0].remaining, 1);
    register(&mut s, 3 * S, "b");
    assert!(s.pools["cpu"].launching.is_empty());
    // b gets a task; removing both drains only a.
    s.agents
        .get_mut("b")
        .unwrap()
        .tasks
        .insert("run-1/t".into());
    let r = apply(
        &mut s,
        100 * S,
        Command::Scale {
            pool: "cpu".into(),
            from: 2,
            to: 0,
            reason: "idle".into(),
            remove: vec!["a".into(), "b".into()],
        },
    );
    assert_eq!(r, CommandResult::Scaled { decision: 2 });
    let d = s.pools["cpu"].decisions.last().unwrap().clone();
    assert_eq!((d.from, d.to), (2, 1));
    assert_eq!(d.remove, [("a".to_owned(), "i-a".to_owned())]);
    assert_eq!(s.agents["a"].state, AgentState::Draining);
    assert_eq!(s.agents["b"].state, AgentState::Active);
    // Hook outcomes: retried until done; once done, later reports change nothing.
    apply(
        &mut s,
        101 * S,
        Command::HookOutcome {
            decision: 2,
            ok: false,
            error: "exit 1".into(),
        },
    );
    let d = s.pools["cpu"].decisions.last().unwrap();
    assert_eq!(
        (d.hook, d.attempts, d.last_error.as_str()),
        (HookState::Pending, 1, "exit 1")
    );
    apply(
        &mut s,
        102 * S,
        Command::HookOutcome {
            decision: 2,
            ok: true,
            error: String::new(),
        },
    );
    apply(
        &mut s,
        103 * S,
        Command::HookOutcome {
            decision: 2,
            ok: false,
            error: "late".into(),
        },
    );
    let d = s.pools["cpu"].decisions.last().unwrap();
    assert_eq!((d.hook, d.attempts), (HookState::Done, 2));
}

#[test]
fn demand_counts_only_tasks_the_pool_could_take_and_their_p90_wait() {
    let mut s = State::default();
    let task = |name: &str, class: &str| crate::model::TaskSpec {
        class: class.into(),
        ..crate::model::TaskSpec::new(name, crate::model::Program::Argv(vec!["true".into()]))
    };
    apply(
        &mut s,
        S,
        Command::SubmitRun {
            idempotency_key: String::new(),
            spec: crate::model::RunSpec {
                name: "r".into(),
                tasks: vec![task("a", "cpu"), task("b", "cpu"), task("c", "gpu")],
                on_failure: crate::model::OnFailure::Continue,
                ..Default::default()
            },
            submitted_by: "t".into(),
            placement: None,
        },
    );
    let d = super::demand(&s, &spec(), 11 * S);
    assert_eq!(
        d,
        Demand {
            pending: 2,
            wait_p90_ms: 10_000
        }
    );
}
