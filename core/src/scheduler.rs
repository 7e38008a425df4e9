//! Placement as a pure function: an immutable view of pending tasks and agents in, a plan out.
//! No I/O, clock or randomness; the same view always yields the same plan. The leader commits
//! the plan and `apply` re-checks every assignment against the state at commit time.
//!
//! For each task, in queue order (priority, then submission): the candidates are the agents of
//! its class whose labels satisfy every required expression and whose free capacity fits the
//! request. Among them the highest score wins; ties go to the agent holding the fewest tasks,
//! then to the agent name that sorts first:
//! 1. spread: fewest of the run's tasks already on agents sharing the `spread_by` label value;
//! 2. preferred: the sum of the weights of the preferred expressions the agent matches;
//! 3. fit: binpack takes the tightest fit (least room left), spread the loosest.
//!
//! Tasks that ask for no resources leave every agent's room unchanged, so the fit cannot tell
//! agents apart: without the held-tasks tie-break, binpack sent all of them to one agent
//! while the others idled.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::model::{AgentName, Assignment, LabelExpr, Resources, Strategy, TaskId, TaskSpec};

/// A queued task as the scheduler sees it. The leader's view borrows from the applied state
/// (a round looks at up to 4,096 tasks, many times a second under load: cloning them was most of
/// the leader's time); tests and placement at submission may own their fields.
#[derive(Debug, Clone)]
pub struct PendingTask<'a> {
    pub id: Cow<'a, str>,
    pub attempt: u64,
    pub run_id: Cow<'a, str>,
    pub class: Cow<'a, str>,
    pub resources: Cow<'a, Resources>,
    pub required: Cow<'a, [LabelExpr]>,
    pub preferred: Cow<'a, [(i32, LabelExpr)]>,
    pub spread_by: Cow<'a, str>,
    pub strategy: Strategy,
    pub queue: Cow<'a, str>,
    /// Why it is still queued, as last recorded: the plan reports a reason only when it differs.
    pub reason: &'a str,
}

impl<'a> PendingTask<'a> {
    pub fn new(
        id: impl Into<Cow<'a, str>>,
        attempt: u64,
        run_id: impl Into<Cow<'a, str>>,
        spec: &'a TaskSpec,
    ) -> Self {
        Self {
            id: id.into(),
            attempt,
            run_id: run_id.into(),
            class: Cow::Borrowed(&spec.class),
            resources: Cow::Borrowed(&spec.resources),
            required: Cow::Borrowed(&spec.required),
            preferred: Cow::Borrowed(&spec.preferred),
            spread_by: Cow::Borrowed(&spec.spread_by),
            strategy: spec.strategy,
            queue: Cow::Borrowed(&spec.queue),
            reason: "",
        }
    }
}

#[derive(Debug, Clone)]
pub struct AgentSlot {
    pub name: AgentName,
    pub class: String,
    pub labels: BTreeMap<String, String>,
    pub free: Resources,
    /// More tasks it may hold (`limits::AGENT_TASKS_MAX` less those it holds; 0 while it holds
    /// more than it offers).
    pub slots: usize,
}

/// What the scheduler sees: pending tasks in queue order, the agents that may take work, and
/// where each run's tasks already are (for spreading).
#[derive(Debug, Clone, Default)]
pub struct View<'a> {
    pub pending: Vec<PendingTask<'a>>,
    pub agents: Vec<AgentSlot>,
    /// run id -> agent -> tasks of that run placed there and not finished.
    pub placed: BTreeMap<String, BTreeMap<AgentName, u32>>,
    /// Queues with limits: how many more of their tasks may start now, and what stops them
    /// when none may. Queues not listed have no limit.
    pub queue_room: BTreeMap<String, (usize, String)>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub assignments: Vec<Assignment>,
    /// Tasks left pending whose reason (one a person can act on) differs from the recorded one.
    pub unplaced: Vec<(TaskId, String)>,
    /// Tasks not looked at because every agent was already at its task limit: nothing further
    /// could be placed, and their recorded reasons stand until a round reaches them.
    pub unexamined: usize,
}

/// Tasks with no class ask for this one; agents started without `--class` offer it.
pub const DEFAULT_CLASS: &str = "default";

/// Score weights: each criterion dominates the ones below it.
const SPREAD_WEIGHT: i128 = 1 << 80;
const PREFERRED_WEIGHT: i128 = 1 << 48;

pub fn plan(view: &View<'_>) -> Plan {
    let mut agents: Vec<AgentSlot> = view.agents.clone();
    agents.sort_by(|a, b| a.name.cmp(&b.name));
    let mut by_class: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, a) in agents.iter().enumerate() {
        by_class.entry(a.class.clone()).or_default().push(i);
    }
    // Work that depends only on a task's shape is done once per distinct shape, not per task:
    // the agents passing (class, required), and each agent's preferred-weight sum.
    let mut eligible: HashMap<(&str, &[LabelExpr]), Vec<usize>> = HashMap::new();
    let mut preference: HashMap<&[(i32, LabelExpr)], Vec<i64>> = HashMap::new();
    // (run, label key) -> label value -> tasks of the run on agents with that value.
    let mut spread_counts: HashMap<(&str, &str), HashMap<String, u32>> = HashMap::new();
    let mut out = Plan::default();
    // The reason given to the last unplaced task, reused for the next task of the same shape until
    // an assignment changes the agents: behind a full fleet, thousands of queued tasks share one.
    let mut last_reason: Option<(&str, &[LabelExpr], &Resources, String)> = None;
    // Behind a fleet at its task limits (a deep queue), a round would otherwise walk thousands of
    // tasks to place none of them: the first task to meet the full fleet is told so, and the rest
    // wait behind it (as Slurm's "Priority" reason).
    let mut open_slots: usize = agents.iter().map(|a| a.slots).sum();
    let mut met_full_fleet = false;
    let mut queue_room = view.queue_room.clone();

    for (n, task) in view.pending.iter().enumerate() {
        if met_full_fleet {
            out.unexamined = view.pending.len() - n;
            break;
        }
        if let Some((room, why)) = queue_room.get(&*task.queue)
            && *room == 0
        {
            if why != task.reason {
                out.unplaced.push((task.id.to_string(), why.clone()));
            }
            continue;
        }
        let class = if task.class.is_empty() {
            DEFAULT_CLASS
        } else {
            &*task.class
        };
        let candidates = eligible.entry((class, &*task.required)).or_insert_with(|| {
            by_class
                .get(class)
                .map(|v| {
                    v.iter()
                        .copied()
                        .filter(|&i| task.required.iter().all(|e| e.matches(&agents[i].labels)))
                        .collect()
                })
                .unwrap_or_default()
        });
        let preferred = if task.preferred.is_empty() {
            None
        } else {
            Some(&*preference.entry(&*task.preferred).or_insert_with(|| {
                agents
                    .iter()
                    .map(|a| {
                        task.preferred
                            .iter()
                            .filter(|(_, e)| e.matches(&a.labels))
                            .map(|(w, _)| i64::from(*w))
                            .sum()
                    })
                    .collect()
            }))
        };
        let counts = if task.spread_by.is_empty() {
            None
        } else {
            Some(
                &*spread_counts
                    .entry((&*task.run_id, &*task.spread_by))
                    .or_insert_with(|| {
                        let mut m: HashMap<String, u32> = HashMap::new();
                        if let Some(on) = view.placed.get(&*task.run_id) {
                            for a in &agents {
                                if let Some(n) = on.get(&a.name) {
                                    *m.entry(
                                        a.labels.get(&*task.spread_by).cloned().unwrap_or_default(),
                                    )
                                    .or_default() += n;
                                }
                            }
                        }
                        m
                    }),
            )
        };
        let mut best: Option<((i128, usize), usize)> = None;
        for &i in candidates.iter() {
            let a = &agents[i];
            if a.slots == 0 || !task.resources.fits_in(&a.free) {
                continue;
            }
            let mut score: i128 = 0;
            if let Some(counts) = counts {
                let value = a
                    .labels
                    .get(&*task.spread_by)
                    .map(String::as_str)
                    .unwrap_or("");
                score -= SPREAD_WEIGHT * i128::from(counts.get(value).copied().unwrap_or(0));
            }
            if let Some(p) = preferred {
                score += PREFERRED_WEIGHT * i128::from(p[i]);
            }
            let room = leftover(&a.free, &task.resources);
            score += match task.strategy {
                Strategy::BinPack => -room,
                Strategy::Spread => room,
            };
            // More free slots = fewer tasks held; agents are in name order, so a full tie keeps
            // the first.
            let key = (score, a.slots);
            if best.is_none_or(|(b, _)| key > b) {
                best = Some((key, i));
            }
        }
        match best {
            Some((_, i)) => {
                last_reason = None;
                if let Some((room, _)) = queue_room.get_mut(&*task.queue) {
                    *room -= 1;
                }
                let agent = &mut agents[i];
                agent.free = agent.free.minus(&task.resources);
                agent.slots -= 1;
                open_slots -= 1;
                if let Some(counts) = spread_counts.get_mut(&(&*task.run_id, &*task.spread_by)) {
                    *counts
                        .entry(
                            agent
                                .labels
                                .get(&*task.spread_by)
                                .cloned()
                                .unwrap_or_default(),
                        )
                        .or_default() += 1;
                }
                out.assignments.push(Assignment {
                    task_id: task.id.to_string(),
                    attempt: task.attempt,
                    agent: agent.name.clone(),
                });
            }
            None => {
                let same_shape = last_reason.as_ref().is_some_and(|(c, req, res, _)| {
                    *c == class && **req == *task.required && **res == *task.resources
                });
                if !same_shape {
                    let reason = unplaced_reason(task, class, &agents);
                    last_reason = Some((class, &task.required, &task.resources, reason));
                }
                if let Some((.., reason)) = &last_reason
                    && reason != task.reason
                {
                    out.unplaced.push((task.id.to_string(), reason.clone()));
                }
                met_full_fleet = open_slots == 0 && !agents.is_empty();
            }
        }
    }
    out
}

/// Room left after placing: cpu millicores plus memory MiB (weighed alike).
fn leftover(free: &Resources, want: &Resources) -> i128 {
    i128::from(free.cpu_millis - want.cpu_millis)
        + i128::from((free.memory_bytes - want.memory_bytes) >> 20)
}

fn unplaced_reason(task: &PendingTask<'_>, class: &str, agents: &[AgentSlot]) -> String {
    if agents.is_empty() {
        return "no agents are connected and active".into();
    }
    let in_class: Vec<&AgentSlot> = agents.iter().filter(|a| a.class == class).collect();
    if in_class.is_empty() {
        let classes: BTreeSet<&str> = agents.iter().map(|a| a.class.as_str()).collect();
        return format!(
            "no agent in class {class} (connected classes: {})",
            classes.into_iter().collect::<Vec<_>>().join(", ")
        );
    }
    let n = in_class.len();
    let agents_word = if n == 1 { "agent" } else { "agents" };
    let matching: Vec<&AgentSlot> = in_class
        .iter()
        .copied()
        .filter(|a| task.required.iter().all(|e| e.matches(&a.labels)))
        .collect();
    if matching.is_empty() {
        let blocker = task
            .required
            .iter()
            .find(|e| in_class.iter().all(|a| !e.matches(&a.labels)))
            .map(|e| format!("`{e}`"))
            .unwrap_or_else(|| {
                let all: Vec<String> = task.required.iter().map(|e| format!("`{e}`")).collect();
                format!("all of {}", all.join(", "))
            });
        return format!("{n} {agents_word} in class {class}, none matching {blocker}");
    }
    let m = matching.len();
    if matching.iter().all(|a| a.slots == 0) {
        let word = if m == 1 { "agent" } else { "agents" };
        return format!(
            "{m} {word} in class {class} could take it, but each holds its maximum of {} tasks \
             or more than it now offers (it re-registered smaller)",
            crate::limits::AGENT_TASKS_MAX
        );
    }
    let matching: Vec<&AgentSlot> = matching.into_iter().filter(|a| a.slots > 0).collect();
    let want = &task.resources;
    let most = |f: fn(&Resources) -> u64| matching.iter().map(|a| f(&a.free)).max().unwrap_or(0);
    let mut short = Vec::new();
    if matching.iter().all(|a| a.free.cpu_millis < want.cpu_millis) {
        short.push(format!(
            "cpu {}m (most free: {}m)",
            want.cpu_millis,
            most(|r| r.cpu_millis)
        ));
    }
    if matching
        .iter()
        .all(|a| a.free.memory_bytes < want.memory_bytes)
    {
        short.push(format!(
            "memory {} (most free: {})",
            human_bytes(want.memory_bytes),
            human_bytes(most(|r| r.memory_bytes))
        ));
    }
    if matching.iter().all(|a| a.free.gpus < want.gpus) {
        short.push(format!(
            "gpus {} (most free: {})",
            want.gpus,
            most(|r| r.gpus)
        ));
    }
    for (k, v) in &want.extended {
        if matching
            .iter()
            .all(|a| a.free.extended.get(k).copied().unwrap_or(0) < *v)
        {
            short.push(format!("{k} {v}"));
        }
    }
    let matched = if task.required.is_empty() {
        format!("in class {class}")
    } else {
        format!("in class {class} match its labels")
    };
    let word = if m == 1 { "agent" } else { "agents" };
    if short.is_empty() {
        format!(
            "{m} {word} {matched}, but none has cpu, memory, gpus and extended resources free at once"
        )
    } else {
        format!(
            "{m} {word} {matched}, none with enough free {}",
            short.join(", ")
        )
    }
}

pub fn human_bytes(b: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("Ti", 1 << 40),
        ("Gi", 1 << 30),
        ("Mi", 1 << 20),
        ("Ki", 1 << 10),
    ];
    for (unit, size) in UNITS {
        if b >= size && b.is_multiple_of(size) {
            return format!("{}{unit}", b / size);
        }
    }
    for (unit, size) in UNITS {
        if b >= size {
            return format!("{:.1}{unit}", b as f64 / size as f64);
        }
    }
    format!("{b}B")
}

#[cfg(test)]
#[path = "scheduler_tests.rs"]
mod tests;
