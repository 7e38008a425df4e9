//! Placement at submission, the pure part: where the tasks of new runs go, given the agents as
//! the scheduler sees them (capacity net of entries in flight). The leader's shell
//! (`drover_coordinator::submit_placement`) supplies the agents and keeps the reservations.

use std::collections::BTreeMap;

use crate::command::Placement;
use crate::limits;
use crate::model::{Agent, AgentName, Assignment, Resources, RunSpec};
use crate::scheduler::{self, AgentSlot, PendingTask, View};

/// Places the tasks of new runs on `agents`, honouring queue order across the runs (priority,
/// then submission). Returns, per run and per task, the chosen agent. Steps that wait for others
/// are not placed, nor are tasks of queues with limits (`limited`): the scheduling round
/// applies those.
pub fn place(
    agents: Vec<AgentSlot>,
    runs: &[&RunSpec],
    limited: &dyn Fn(&str) -> bool,
) -> Vec<Vec<Option<AgentName>>> {
    let mut pending = Vec::new();
    let mut at = Vec::new();
    for (ri, spec) in runs.iter().enumerate() {
        for (ti, t) in spec.tasks.iter().enumerate() {
            if !t.depends_on.is_empty() || limited(&t.queue) {
                continue;
            }
            // Ids only need to be unique within this plan: the index into `at`.
            let task = PendingTask::new(at.len().to_string(), 1, ri.to_string(), t);
            pending.push((-i64::from(t.priority), task));
            at.push((ri, ti));
        }
    }
    // Stable: equal priorities keep submission order.
    pending.sort_by_key(|(key, _)| *key);
    let view = View {
        pending: pending.into_iter().map(|(_, t)| t).collect(),
        agents,
        placed: BTreeMap::new(),
        queue_room: BTreeMap::new(),
    };
    let plan = scheduler::plan(&view);
    let mut out: Vec<Vec<Option<AgentName>>> =
        runs.iter().map(|r| vec![None; r.tasks.len()]).collect();
    for a in plan.assignments {
        if let Some(&(ri, ti)) = a.task_id.parse::<usize>().ok().and_then(|i| at.get(i)) {
            out[ri][ti] = Some(a.agent);
        }
    }
    out
}

/// An agent as the scheduler sees it: free capacity and task slots net of what entries in flight
/// (`reserved`: resources, task count) have assigned to it.
pub fn agent_slot(a: &Agent, reserved: Option<&(Resources, usize)>) -> AgentSlot {
    let (free, held) = match reserved {
        Some((r, n)) => (a.free().minus(r), a.tasks.len() + n),
        None => (a.free(), a.tasks.len()),
    };
    AgentSlot {
        name: a.name.clone(),
        class: a.class.clone(),
        labels: a.labels.clone(),
        free,
        slots: if a.over_committed() {
            0
        } else {
            limits::AGENT_TASKS_MAX.saturating_sub(held)
        },
    }
}

/// Assignments of a submission's placement, by task id.
pub fn assignments(run_id: &str, spec: &RunSpec, placement: &Placement) -> Vec<Assignment> {
    spec.tasks
        .iter()
        .zip(&placement.agents)
        .filter_map(|(t, a)| {
            a.as_ref().map(|a| Assignment {
                task_id: crate::state::task_id(run_id, &t.name),
                attempt: 1,
                agent: a.clone(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Program, TaskSpec};

    fn task(name: &str, cpu: u64, priority: i32, class: &str) -> TaskSpec {
        TaskSpec {
            class: class.into(),
            resources: Resources {
                cpu_millis: cpu,
                ..Default::default()
            },
            priority,
            ..TaskSpec::new(name, Program::Argv(vec!["true".into()]))
        }
    }

    fn run(tasks: Vec<TaskSpec>) -> RunSpec {
        RunSpec {
            name: "r".into(),
            tasks,
            labels: BTreeMap::new(),
            ..Default::default()
        }
    }

    fn slot(name: &str, cpu: u64, class: &str) -> AgentSlot {
        AgentSlot {
            name: name.into(),
            class: class.into(),
            labels: BTreeMap::new(),
            free: Resources {
                cpu_millis: cpu,
                ..Default::default()
            },
            slots: limits::AGENT_TASKS_MAX,
        }
    }

    #[test]
    fn places_by_priority_across_runs_within_capacity_and_class() {
        let first = run(vec![task("a", 600, 0, "default"), task("b", 10, 0, "gpu")]);
        let second = run(vec![task("c", 600, 5, "default")]);
        let third = run(vec![task("d", 300, 0, "default")]);
        let placed = place(
            vec![slot("n1", 1_000, "default")],
            &[&first, &second, &third],
            &|_| false,
        );
        // The later, higher-priority task takes the room first; the earlier one no longer fits,
        // but the smaller one after it still does. No agent offers class gpu.
        assert_eq!(placed[0], vec![None, None]);
        assert_eq!(placed[1], vec![Some("n1".to_owned())]);
        assert_eq!(placed[2], vec![Some("n1".to_owned())]);
    }

    #[test]
    fn nothing_to_place_on_no_agents() {
        let r = run(vec![task("a", 0, 0, "default")]);
        assert_eq!(place(vec![], &[&r], &|_| false), vec![vec![None]]);
    }
}
