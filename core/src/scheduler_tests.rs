//! The scheduler through its pure interface: examples for each rule, and properties over random views.

use std::collections::BTreeMap;

use proptest::prelude::{any, prop, prop_assert, prop_assert_eq, proptest};
use proptest::strategy::Strategy as PropStrategy;

use super::*;
use crate::model::Strategy as Fit;
use crate::model::{LabelExpr, LabelOp};

fn res(cpu: u64, mem_mib: u64) -> Resources {
    Resources {
        cpu_millis: cpu,
        memory_bytes: mem_mib << 20,
        ..Default::default()
    }
}

fn pending(id: &str, class: &str, r: Resources) -> PendingTask<'static> {
    PendingTask {
        id: id.to_owned().into(),
        attempt: 1,
        run_id: "run-1".into(),
        class: class.to_owned().into(),
        resources: Cow::Owned(r),
        required: Cow::Borrowed(&[]),
        preferred: Cow::Borrowed(&[]),
        spread_by: "".into(),
        strategy: Fit::BinPack,
        queue: "default".into(),
        reason: "",
    }
}

fn agent(name: &str, class: &str, r: Resources, labels: &[(&str, &str)]) -> AgentSlot {
    AgentSlot {
        name: name.into(),
        class: class.into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        free: r,
        slots: crate::limits::AGENT_TASKS_MAX,
    }
}

fn eq(k: &str, v: &str) -> LabelExpr {
    LabelExpr {
        key: k.into(),
        op: LabelOp::Eq,
        values: vec![v.into()],
    }
}

fn placed_on(p: &Plan) -> Vec<(&str, &str)> {
    p.assignments
        .iter()
        .map(|a| (a.task_id.as_str(), a.agent.as_str()))
        .collect()
}

#[test]
fn best_fit_prefers_the_tightest_agent_and_never_overcommits() {
    // Guards: best-fit placement and that free capacity is consumed within a round.
    let view = View {
        pending: vec![
            pending("t1", "", res(500, 100)),
            pending("t2", "", res(500, 100)),
            pending("t3", "", res(500, 100)),
        ],
        agents: vec![
            agent("big", "default", res(4000, 4096), &[]),
            agent("small", "default", res(1000, 200), &[]),
        ],
        ..Default::default()
    };
    let p = plan(&view);
    assert_eq!(
        placed_on(&p),
        vec![("t1", "small"), ("t2", "small"), ("t3", "big")]
    );
    assert!(p.unplaced.is_empty());
}

#[test]
fn the_spread_strategy_prefers_the_emptiest_agent() {
    // Guards: per-run strategy `spread` (worst fit).
    let mut t = pending("t1", "", res(500, 100));
    t.strategy = Fit::Spread;
    let view = View {
        pending: vec![t],
        agents: vec![
            agent("big", "default", res(4000, 4096), &[]),
            agent("small", "default", res(1000, 200), &[]),
        ],
        ..Default::default()
    };
    assert_eq!(placed_on(&plan(&view)), vec![("t1", "big")]);
}

#[test]
fn tasks_without_resources_go_to_the_agent_holding_fewest() {
    // Guards: zero-resource tasks leave the fit equal everywhere; binpack used to put every one
    // on the first agent by name while the others idled.
    let view = View {
        pending: (0..6)
            .map(|i| pending(&format!("t{i}"), "", res(0, 0)))
            .collect(),
        agents: vec![
            agent("a", "default", res(2000, 1024), &[]),
            agent("b", "default", res(2000, 1024), &[]),
            AgentSlot {
                slots: crate::limits::AGENT_TASKS_MAX - 5,
                ..agent("c", "default", res(2000, 1024), &[])
            },
        ],
        ..Default::default()
    };
    let p = plan(&view);
    let on = |name: &str| p.assignments.iter().filter(|a| a.agent == name).count();
    // c already holds 5 tasks: a and b take turns until they hold as many.
    assert_eq!((on("a"), on("b"), on("c")), (3, 3, 0));
    assert_eq!(p.assignments[0].agent, "a");
}

#[test]
fn equal_requests_still_pack_the_first_agent_under_binpack() {
    // Guards: the held-tasks tie-break only breaks ties; binpack keeps filling the agent with
    // the least room left.
    let view = View {
        pending: (0..3)
            .map(|i| pending(&format!("t{i}"), "", res(500, 100)))
            .collect(),
        agents: vec![
            agent("a", "default", res(2000, 1024), &[]),
            agent("b", "default", res(2000, 1024), &[]),
        ],
        ..Default::default()
    };
    assert_eq!(
        placed_on(&plan(&view)),
        vec![("t0", "a"), ("t1", "a"), ("t2", "a")]
    );
}

#[test]
fn required_expressions_filter_and_preferred_weights_steer() {
    // Guards: affinity.required is a hard filter, affinity.preferred a weighted preference.
    let agents = vec![
        agent(
            "a1",
            "default",
            res(4000, 4096),
            &[("zone", "a"), ("disk", "hdd")],
        ),
        agent(
            "b1",
            "default",
            res(1000, 1024),
            &[("zone", "b"), ("disk", "ssd")],
        ),
    ];
    let mut only_a = pending("only-a", "", res(100, 10));
    only_a.required = vec![eq("zone", "a")].into();
    let mut likes_ssd = pending("likes-ssd", "", res(100, 10));
    likes_ssd.preferred = vec![(10, eq("disk", "ssd"))].into();
    let mut dislikes_ssd = pending("dislikes-ssd", "", res(100, 10));
    dislikes_ssd.preferred = vec![(-10, eq("disk", "ssd"))].into();
    let mut nowhere = pending("nowhere", "", res(100, 10));
    nowhere.required = vec![eq("zone", "c")].into();
    let p = plan(&View {
        pending: vec![only_a, likes_ssd, dislikes_ssd, nowhere],
        agents,
        ..Default::default()
    });
    assert_eq!(
        placed_on(&p),
        vec![
            ("only-a", "a1"),
            ("likes-ssd", "b1"),
            ("dislikes-ssd", "a1")
        ]
    );
    assert_eq!(
        p.unplaced,
        vec![(
            "nowhere".to_owned(),
            "2 agents in class default, none matching `zone = c`".to_owned()
        )]
    );
}

#[test]
fn spread_by_distributes_a_runs_tasks_across_label_values() {
    // Guards: `spread_by: zone` puts the run's tasks on alternating zones, counting earlier placements.
    let agents = vec![
        agent("a1", "default", res(8000, 8192), &[("zone", "a")]),
        agent("a2", "default", res(8000, 8192), &[("zone", "a")]),
        agent("b1", "default", res(8000, 8192), &[("zone", "b")]),
    ];
    let pending: Vec<PendingTask> = (0..4)
        .map(|i| {
            let mut t = pending(&format!("t{i}"), "", res(100, 10));
            t.spread_by = "zone".into();
            t
        })
        .collect();
    // One task of the run already runs in zone a.
    let placed = BTreeMap::from([("run-1".to_owned(), BTreeMap::from([("a1".to_owned(), 1)]))]);
    let p = plan(&View {
        pending,
        agents,
        placed,
        ..Default::default()
    });
    let in_a = 1 + p
        .assignments
        .iter()
        .filter(|a| a.agent.starts_with('a'))
        .count();
    let in_b = p
        .assignments
        .iter()
        .filter(|a| a.agent.starts_with('b'))
        .count();
    // The first goes to the empty zone; after that the zones stay within one task of each other.
    assert_eq!(p.assignments[0].agent, "b1");
    assert_eq!(in_a + in_b, 5);
    assert!(in_a.abs_diff(in_b) <= 1, "a={in_a} b={in_b}");
}

#[test]
fn unplaceable_tasks_say_why() {
    // Guards: every unplaced task carries a reason naming the missing class, label or resource.
    let view = View {
        pending: vec![
            pending("gpu", "gpu", res(1, 1)),
            pending("huge", "", res(1, 8192)),
        ],
        agents: vec![agent("a", "default", res(2000, 4096), &[])],
        ..Default::default()
    };
    let p = plan(&view);
    assert!(p.assignments.is_empty());
    assert_eq!(
        p.unplaced[0].1,
        "no agent in class gpu (connected classes: default)"
    );
    assert_eq!(
        p.unplaced[1].1,
        "1 agent in class default, none with enough free memory 8Gi (most free: 4Gi)"
    );
    let none = plan(&View {
        pending: vec![pending("x", "", res(1, 1))],
        ..Default::default()
    });
    assert_eq!(none.unplaced[0].1, "no agents are connected and active");
}

#[test]
fn a_reason_shared_by_tasks_of_one_shape_is_recomputed_after_an_assignment() {
    // Guards: the per-round reuse of reasons never reports capacity from before a placement.
    let p = plan(&View {
        pending: vec![
            pending("big1", "", res(2000, 1)),
            pending("big2", "", res(2000, 1)),
            pending("small", "", res(600, 1)),
            pending("big3", "", res(2000, 1)),
        ],
        agents: vec![agent("a", "default", res(1000, 4096), &[])],
        ..Default::default()
    });
    assert_eq!(placed_on(&p), vec![("small", "a")]);
    let reasons: Vec<(&str, &str)> = p
        .unplaced
        .iter()
        .map(|(t, r)| (t.as_str(), r.as_str()))
        .collect();
    let before = "1 agent in class default, none with enough free cpu 2000m (most free: 1000m)";
    let after = "1 agent in class default, none with enough free cpu 2000m (most free: 400m)";
    assert_eq!(
        reasons,
        vec![("big1", before), ("big2", before), ("big3", after)]
    );
}

// ------------------------------------------------------------------ properties

fn arb_view() -> impl PropStrategy<Value = View<'static>> {
    let zones = prop::sample::select(vec!["a", "b", "c"]);
    let classes = prop::sample::select(vec!["default", "gpu"]);
    // Few task slots, so some views meet a full fleet.
    let agent_shape = (
        classes.clone(),
        zones.clone(),
        0u64..4000,
        0u64..4096,
        0usize..6,
    );
    let task_shape = (
        classes,
        prop::option::of(zones),
        1u64..2000,
        1u64..2048,
        -3i32..3,
        any::<bool>(),
    );
    (
        prop::collection::vec(agent_shape, 0..8),
        prop::collection::vec(task_shape, 0..40),
    )
        .prop_map(|(agents, tasks)| {
            let mut pending: Vec<(i32, PendingTask)> = tasks
                .into_iter()
                .enumerate()
                .map(|(i, (class, zone, cpu, mem, priority, spread))| {
                    let mut t = pending(&format!("t{i:02}"), class, res(cpu, mem));
                    t.required = zone.map(|z| vec![eq("zone", z)]).unwrap_or_default().into();
                    if spread {
                        t.strategy = Fit::Spread;
                    }
                    (priority, t)
                })
                .collect();
            // The leader hands tasks over in queue order: priority first, then submission.
            pending.sort_by_key(|(p, _)| -p);
            View {
                pending: pending.into_iter().map(|(_, t)| t).collect(),
                agents: agents
                    .into_iter()
                    .enumerate()
                    .map(|(i, (class, zone, cpu, mem, slots))| AgentSlot {
                        slots,
                        ..agent(&format!("ag{i}"), class, res(cpu, mem), &[("zone", zone)])
                    })
                    .collect(),
                placed: BTreeMap::new(),
                queue_room: BTreeMap::new(),
            }
        })
}

proptest! {
    #[test]
    fn a_plan_that_stops_at_the_full_fleet_is_the_plan_of_any_longer_queue(view in arb_view(), cut in 0usize..40) {
        // Guards: the leader first plans a short window of the queue and trusts it whenever the
        // plan stopped at a full fleet inside it (limits::SCHEDULE_WINDOW_MARGIN).
        let cut = cut.min(view.pending.len());
        let short = View { pending: view.pending[..cut].to_vec(), ..view.clone() };
        let p = plan(&short);
        if p.unexamined > 0 {
            let full = plan(&view);
            prop_assert_eq!(&p.assignments, &full.assignments);
            prop_assert_eq!(&p.unplaced, &full.unplaced);
        }
    }

    #[test]
    fn never_overcommits_never_breaks_a_requirement_and_is_deterministic(view in arb_view()) {
        // Guards: the scheduler's safety properties over arbitrary views.
        let p = plan(&view);
        prop_assert_eq!(&p, &plan(&view));
        let mut used: BTreeMap<&str, Resources> = BTreeMap::new();
        for a in &p.assignments {
            let t = view.pending.iter().find(|t| t.id == a.task_id).unwrap();
            let ag = view.agents.iter().find(|g| g.name == a.agent).unwrap();
            prop_assert_eq!(&ag.class, if t.class.is_empty() { DEFAULT_CLASS } else { &t.class });
            prop_assert!(t.required.iter().all(|e| e.matches(&ag.labels)));
            let u = used.entry(&ag.name).or_default();
            *u = u.plus(&t.resources);
            prop_assert!(u.fits_in(&ag.free), "agent {} over-committed", ag.name);
        }
        // Every task is either placed or explained, never both.
        prop_assert_eq!(p.assignments.len() + p.unplaced.len() + p.unexamined, view.pending.len());
    }

    #[test]
    fn a_task_is_never_passed_over_for_an_identical_lower_priority_one(view in arb_view()) {
        // Guards: queue order: capacity goes to higher priority among tasks asking the same thing.
        let p = plan(&view);
        let placed: std::collections::BTreeSet<&str> = p.assignments.iter().map(|a| a.task_id.as_str()).collect();
        for (i, hi) in view.pending.iter().enumerate() {
            if placed.contains(&*hi.id) {
                continue;
            }
            for lo in &view.pending[i + 1..] {
                let same = lo.class == hi.class && lo.required == hi.required && lo.resources == hi.resources;
                prop_assert!(!(same && placed.contains(&*lo.id)), "{} placed before {}", lo.id, hi.id);
            }
        }
    }
}

/// One agent `a1` with room for `slots` more tasks, and `tasks` queued tasks `t0`.. asking for
/// no resources.
fn slot_bound_view(slots: usize, tasks: usize) -> View<'static> {
    let mut a = agent("a1", "default", res(0, 0), &[]);
    a.slots = slots;
    View {
        pending: (0..tasks)
            .map(|i| pending(&format!("t{i}"), "default", res(0, 0)))
            .collect(),
        agents: vec![a],
        placed: Default::default(),
        ..Default::default()
    }
}

#[test]
fn an_agent_takes_no_more_tasks_than_its_slots_even_when_they_ask_for_nothing() {
    // Guards: tasks without resources are bounded per agent (AGENT_TASKS_MAX), so a resend of
    // everything an agent holds always fits its session.
    let p = plan(&slot_bound_view(2, 3));
    assert_eq!(p.assignments.len(), 2);
    assert_eq!(p.unplaced.len(), 1);
    assert!(
        p.unplaced[0].1.contains("maximum of"),
        "{}",
        p.unplaced[0].1
    );
}

#[test]
fn behind_a_full_fleet_only_the_first_waiting_task_is_examined_and_known_reasons_are_not_repeated()
{
    // Guards: a deep queue behind agents at their task limits costs one task per round, not the
    // whole window, and a reason already recorded is not written again.
    let mut view = slot_bound_view(1, 5);
    let p = plan(&view);
    assert_eq!(placed_on(&p), vec![("t0", "a1")]);
    assert_eq!(p.unplaced.len(), 1);
    assert_eq!(p.unplaced[0].0, "t1");
    assert_eq!(p.unexamined, 3);
    let reason = p.unplaced[0].1.clone();
    view.pending[1].reason = &reason;
    let again = plan(&view);
    assert!(again.unplaced.is_empty(), "{:?}", again.unplaced);
    assert_eq!(again.unexamined, 3);
}

#[test]
fn a_queue_with_no_room_left_waits_without_holding_back_other_queues() {
    let etl = |id: &str| PendingTask {
        queue: "etl".into(),
        ..pending(id, "default", res(0, 0))
    };
    let view = View {
        pending: vec![
            etl("e1"),
            etl("e2"),
            etl("e3"),
            pending("o1", "default", res(0, 0)),
        ],
        agents: vec![agent("a", "default", res(4000, 4096), &[])],
        placed: BTreeMap::new(),
        queue_room: [(
            "etl".to_owned(),
            (2, "queue etl is at its max_concurrency (2)".to_owned()),
        )]
        .into(),
    };
    let plan = plan(&view);
    let placed: Vec<&str> = plan
        .assignments
        .iter()
        .map(|a| a.task_id.as_str())
        .collect();
    assert_eq!(placed, ["e1", "e2", "o1"]);
    assert_eq!(
        plan.unplaced,
        [(
            "e3".to_owned(),
            "queue etl is at its max_concurrency (2)".to_owned()
        )]
    );
}
