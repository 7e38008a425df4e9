//! Placement at submission. When nothing is queued, the leader places a new run's tasks before
//! proposing it, so the submission and its assignments commit in one Raft entry: one commit less
//! between submit and start, and one command less per task. Apply re-checks every placement as it
//! does a scheduling round's; a placement it refuses leaves the task pending for the next round.
//!
//! Entries in flight are not applied yet, so their assignments are not in the applied state's
//! free capacity. The leader keeps them as reservations until their entry is applied, and both
//! this path and the scheduling rounds see capacity net of them.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use openraft::ServerState;
use openraft::async_runtime::WatchReceiver;

use crate::command::{Command, CommandResult, Placement};
use crate::limits;
use crate::model::{Agent, AgentName, AgentState, Assignment, NodeId, Resources, RunSpec};
use crate::raft::Raft;
use crate::raft::state_machine::Shared;
use crate::scheduler::{self, AgentSlot, PendingTask, View};
use crate::sessions::Sessions;

/// Places the tasks of new runs on `agents`, honouring queue order across the runs (priority,
/// then submission). Returns, per run and per task, the chosen agent.
pub fn place(agents: Vec<AgentSlot>, runs: &[&RunSpec]) -> Vec<Vec<Option<AgentName>>> {
    let mut pending = Vec::new();
    let mut at = Vec::new();
    for (ri, spec) in runs.iter().enumerate() {
        for (ti, t) in spec.tasks.iter().enumerate() {
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

/// Resources reserved by one entry in flight, released once it is applied (or failed).
#[derive(Debug, Default)]
pub struct Reservation(Vec<(AgentName, Resources)>);

/// The leader's shell around [`place`]: reads applied state and connected sessions, keeps the
/// reservations of entries in flight, and hands committed placements to agents.
pub struct SubmitPlacement {
    node_id: NodeId,
    raft: Raft,
    shared: Arc<Shared>,
    sessions: Arc<Sessions>,
    /// Per agent: resources and task count held by entries in flight.
    reserved: Mutex<BTreeMap<AgentName, (Resources, usize)>>,
}

impl SubmitPlacement {
    pub fn new(node_id: NodeId, raft: Raft, shared: Arc<Shared>, sessions: Arc<Sessions>) -> Self {
        Self {
            node_id,
            raft,
            shared,
            sessions,
            reserved: Mutex::default(),
        }
    }

    /// Capacity (resources, tasks) held by entries in flight, per agent.
    pub fn reserved(&self) -> BTreeMap<AgentName, (Resources, usize)> {
        self.reserved.lock().expect("reservations lock").clone()
    }

    /// Fills in the placement of the batch's submissions (when this node leads and nothing is
    /// queued) and reserves the capacity of every assignment in the batch.
    pub fn prepare(&self, commands: &mut [Command]) -> Reservation {
        let term = {
            let m = self.raft.metrics();
            let m = m.borrow_watched();
            if m.state != ServerState::Leader || m.current_leader != Some(self.node_id) {
                return Reservation::default();
            }
            m.current_term
        };
        let mut reservation = Vec::new();
        let mut reserved = self.reserved();
        self.shared.read(|a| {
            let s = &a.state;
            // Plans already in the batch hold capacity too.
            for c in commands.iter() {
                if let Command::ApplyPlan { assignments, .. } = c {
                    for asg in assignments {
                        if let Some(t) = s.tasks.get(&asg.task_id) {
                            let e = reserved.entry(asg.agent.clone()).or_default();
                            e.0 = e.0.plus(&t.spec.resources);
                            e.1 += 1;
                            reservation.push((asg.agent.clone(), t.spec.resources.clone()));
                        }
                    }
                }
            }
            let tasks: usize = commands
                .iter()
                .filter_map(|c| match c {
                    Command::SubmitRun { spec, .. } => Some(spec.tasks.len()),
                    _ => None,
                })
                .sum();
            // Queued tasks go first; a large batch is left to the scheduling round.
            if tasks == 0 || !s.pending.is_empty() || tasks > limits::SCHEDULE_ROUND_TASKS_MAX {
                return;
            }
            let agents: Vec<AgentSlot> = s
                .agents
                .values()
                .filter(|a| a.state == AgentState::Active && self.sessions.is_connected(&a.name))
                .map(|a| agent_slot(a, reserved.get(&a.name)))
                .collect();
            if agents.is_empty() {
                return;
            }
            let runs: Vec<&RunSpec> = commands
                .iter()
                .filter_map(|c| match c {
                    Command::SubmitRun { spec, .. } => Some(spec),
                    _ => None,
                })
                .collect();
            let mut placed = place(agents, &runs).into_iter();
            drop(runs);
            for c in commands.iter_mut() {
                if let Command::SubmitRun {
                    spec, placement, ..
                } = c
                {
                    let agents = placed.next().unwrap_or_default();
                    for (t, a) in spec.tasks.iter().zip(&agents) {
                        if let Some(a) = a {
                            reservation.push((a.clone(), t.resources.clone()));
                        }
                    }
                    if agents.iter().any(Option::is_some) {
                        *placement = Some(Placement { term, agents });
                    }
                }
            }
        });
        let mut held = self.reserved.lock().expect("reservations lock");
        for (name, r) in &reservation {
            let e = held.entry(name.clone()).or_default();
            e.0 = e.0.plus(r);
            e.1 += 1;
        }
        Reservation(reservation)
    }

    /// The entry holding `reservation` is applied (or failed): its capacity is in the state now.
    pub fn release(&self, reservation: Reservation) {
        let mut held = self.reserved.lock().expect("reservations lock");
        for (name, r) in reservation.0 {
            if let Some(e) = held.get_mut(&name) {
                e.0 = e.0.minus(&r);
                e.1 = e.1.saturating_sub(1);
                if e.1 == 0 {
                    held.remove(&name);
                }
            }
        }
    }

    /// Sends the assignments that committed with their submissions to the agents.
    pub fn dispatch(&self, results: &[CommandResult]) {
        for r in results {
            if let CommandResult::Submitted { assigned, .. } = r
                && !assigned.is_empty()
            {
                crate::leader::dispatch(&self.shared, &self.sessions, assigned);
            }
        }
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
        assert_eq!(place(vec![], &[&r]), vec![vec![None]]);
    }
}
