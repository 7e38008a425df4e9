//! Placement as a pure function: an immutable view of pending tasks and agents in, a plan out.
//! No I/O, clock or randomness; the same view always yields the same plan. The leader commits
//! the plan and `apply` re-checks every assignment against the state at commit time.

use std::collections::BTreeSet;

use crate::model::{AgentName, Assignment, Resources, TaskId};

#[derive(Debug, Clone)]
pub struct PendingTask {
    pub id: TaskId,
    pub attempt: u64,
    pub class: String,
    pub resources: Resources,
}

#[derive(Debug, Clone)]
pub struct AgentSlot {
    pub name: AgentName,
    pub class: String,
    pub free: Resources,
}

/// What the scheduler sees: pending tasks in queue order, and the agents that may take work.
#[derive(Debug, Clone, Default)]
pub struct View {
    pub pending: Vec<PendingTask>,
    pub agents: Vec<AgentSlot>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub assignments: Vec<Assignment>,
    /// Every task left pending, with a reason a person can act on.
    pub unplaced: Vec<(TaskId, String)>,
}

/// Tasks with no class ask for this one; agents started without `--class` offer it.
pub const DEFAULT_CLASS: &str = "default";

/// Places tasks in queue order, each on the agent where it fits tightest (best fit), ties broken
/// by agent name.
pub fn plan(view: &View) -> Plan {
    let mut agents = view.agents.clone();
    agents.sort_by(|a, b| a.name.cmp(&b.name));
    let mut out = Plan::default();
    for task in &view.pending {
        let class = if task.class.is_empty() {
            DEFAULT_CLASS
        } else {
            &task.class
        };
        let mut best: Option<(u128, usize)> = None;
        for (i, a) in agents.iter().enumerate() {
            if a.class != class || !task.resources.fits_in(&a.free) {
                continue;
            }
            let score = leftover_score(&a.free, &task.resources);
            if best.is_none_or(|(s, _)| score < s) {
                best = Some((score, i));
            }
        }
        match best {
            Some((_, i)) => {
                let agent = &mut agents[i];
                agent.free = agent.free.minus(&task.resources);
                out.assignments.push(Assignment {
                    task_id: task.id.clone(),
                    attempt: task.attempt,
                    agent: agent.name.clone(),
                });
            }
            None => out
                .unplaced
                .push((task.id.clone(), unplaced_reason(task, class, &view.agents))),
        }
    }
    out
}

/// Smaller is a tighter fit. cpu and memory weigh equally after scaling memory to MiB.
fn leftover_score(free: &Resources, want: &Resources) -> u128 {
    let cpu = u128::from(free.cpu_millis - want.cpu_millis);
    let mem = u128::from((free.memory_bytes - want.memory_bytes) >> 20);
    cpu + mem
}

fn unplaced_reason(task: &PendingTask, class: &str, agents: &[AgentSlot]) -> String {
    if agents.is_empty() {
        return "no agents are connected".into();
    }
    let in_class: Vec<&AgentSlot> = agents.iter().filter(|a| a.class == class).collect();
    if in_class.is_empty() {
        let classes: BTreeSet<&str> = agents.iter().map(|a| a.class.as_str()).collect();
        return format!(
            "no agent in class {class} (connected classes: {})",
            classes.into_iter().collect::<Vec<_>>().join(", ")
        );
    }
    let want = &task.resources;
    let mut short = Vec::new();
    let most = |f: fn(&Resources) -> u64| in_class.iter().map(|a| f(&a.free)).max().unwrap_or(0);
    if in_class.iter().all(|a| a.free.cpu_millis < want.cpu_millis) {
        short.push(format!(
            "cpu {}m (most free: {}m)",
            want.cpu_millis,
            most(|r| r.cpu_millis)
        ));
    }
    if in_class
        .iter()
        .all(|a| a.free.memory_bytes < want.memory_bytes)
    {
        short.push(format!(
            "memory {} (most free: {})",
            human_bytes(want.memory_bytes),
            human_bytes(most(|r| r.memory_bytes))
        ));
    }
    if in_class.iter().all(|a| a.free.gpus < want.gpus) {
        short.push(format!(
            "gpus {} (most free: {})",
            want.gpus,
            most(|r| r.gpus)
        ));
    }
    for (k, v) in &want.extended {
        if in_class
            .iter()
            .all(|a| a.free.extended.get(k).copied().unwrap_or(0) < *v)
        {
            short.push(format!("{k} {v}"));
        }
    }
    let n = in_class.len();
    let agents_word = if n == 1 { "agent" } else { "agents" };
    if short.is_empty() {
        format!(
            "{n} {agents_word} in class {class}, but none has all of cpu, memory, gpus and extended resources free at once"
        )
    } else {
        format!(
            "{n} {agents_word} in class {class}, none with enough free {}",
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
mod tests {
    use super::*;

    fn res(cpu: u64, mem_mib: u64) -> Resources {
        Resources {
            cpu_millis: cpu,
            memory_bytes: mem_mib << 20,
            ..Default::default()
        }
    }

    fn task(id: &str, class: &str, r: Resources) -> PendingTask {
        PendingTask {
            id: id.into(),
            attempt: 1,
            class: class.into(),
            resources: r,
        }
    }

    fn agent(name: &str, class: &str, r: Resources) -> AgentSlot {
        AgentSlot {
            name: name.into(),
            class: class.into(),
            free: r,
        }
    }

    #[test]
    fn best_fit_prefers_the_tightest_agent_and_never_overcommits() {
        // Guards: best-fit placement and that free capacity is consumed within a round.
        let view = View {
            pending: vec![
                task("t1", "", res(500, 100)),
                task("t2", "", res(500, 100)),
                task("t3", "", res(500, 100)),
            ],
            agents: vec![
                agent("big", "default", res(4000, 4096)),
                agent("small", "default", res(1000, 200)),
            ],
        };
        let p = plan(&view);
        let on: Vec<(&str, &str)> = p
            .assignments
            .iter()
            .map(|a| (a.task_id.as_str(), a.agent.as_str()))
            .collect();
        assert_eq!(on, vec![("t1", "small"), ("t2", "small"), ("t3", "big")]);
        assert!(p.unplaced.is_empty());
    }

    #[test]
    fn unplaceable_tasks_say_why() {
        // Guards: every unplaced task carries a reason naming the missing class or resource.
        let view = View {
            pending: vec![
                task("gpu", "gpu", res(1, 1)),
                task("huge", "", res(1, 8192)),
            ],
            agents: vec![agent("a", "default", res(2000, 4096))],
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
            pending: vec![task("x", "", res(1, 1))],
            agents: vec![],
        });
        assert_eq!(none.unplaced[0].1, "no agents are connected");
    }

    #[test]
    fn plan_is_deterministic_whatever_the_agent_order() {
        // Guards: the same view in any agent order yields the same plan.
        let a = vec![
            agent("a", "default", res(1000, 1000)),
            agent("b", "default", res(1000, 1000)),
        ];
        let mut b = a.clone();
        b.reverse();
        let pending = vec![task("t", "", res(100, 10))];
        let p1 = plan(&View {
            pending: pending.clone(),
            agents: a,
        });
        let p2 = plan(&View { pending, agents: b });
        assert_eq!(p1, p2);
        assert_eq!(p1.assignments[0].agent, "a");
    }
}
