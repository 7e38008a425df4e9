//! What the scheduler sees of the state: the view builder. The leader supplies the agents (it
//! knows which are connected, and what entries in flight hold); the queue, and where spreading
//! runs already have tasks, come from the state.

use std::collections::BTreeMap;

use crate::limits;
use crate::scheduler::{self, AgentSlot, PendingTask, Plan, View};
use crate::state::State;

/// Plans one round: the head of the queue against `agents`.
pub fn plan_round(
    s: &State,
    agents: Vec<AgentSlot>,
    queue_room: BTreeMap<String, (usize, String)>,
) -> Plan {
    // Behind a deep queue most rounds can place only as many tasks as the fleet has free
    // slots, yet looking up a full window of queued tasks was a fifth of the leader's CPU.
    // A window just past the free slots gives the same plan whenever the plan stops at the
    // full fleet inside it; only when it does not is the full window planned.
    let open: usize = agents.iter().map(|a| a.slots).sum();
    let small = open
        .saturating_add(limits::SCHEDULE_WINDOW_MARGIN)
        .min(limits::SCHEDULE_ROUND_TASKS_MAX);
    let mut view = View {
        agents,
        queue_room,
        ..View::default()
    };
    for window in [small, limits::SCHEDULE_ROUND_TASKS_MAX] {
        fill_view(s, window, &mut view);
        let plan = scheduler::plan(&view);
        let whole_queue = s.pending.len() <= window;
        if plan.unexamined > 0 || whole_queue || window == limits::SCHEDULE_ROUND_TASKS_MAX {
            return plan;
        }
    }
    unreachable!("the last window always returns")
}

/// The first `window` queued tasks, and where the spreading runs among them have tasks.
pub fn fill_view<'s>(s: &'s State, window: usize, view: &mut View<'s>) {
    view.pending = s
        .pending
        .iter()
        .take(window)
        .filter_map(|(_, _, tid)| s.tasks.get(tid))
        .map(|t| PendingTask {
            reason: &t.pending_reason,
            ..PendingTask::new(t.id.as_str(), t.attempt, t.run_id.as_str(), &t.spec)
        })
        .collect();
    let spreading: std::collections::BTreeSet<&str> = view
        .pending
        .iter()
        .filter(|t| !t.spread_by.is_empty())
        .map(|t| &*t.run_id)
        .collect();
    let mut placed: BTreeMap<String, BTreeMap<String, u32>> = BTreeMap::new();
    for run_id in spreading {
        if let Some(run) = crate::state::run_seq(run_id).and_then(|seq| s.runs.get(&seq)) {
            for tid in &run.task_ids {
                if let Some(t) = s.tasks.get(tid)
                    && let Some(agent) = &t.agent
                    && !t.state.is_terminal()
                {
                    *placed
                        .entry(run_id.to_owned())
                        .or_default()
                        .entry(agent.clone())
                        .or_default() += 1;
                }
            }
        }
    }
    view.placed = placed;
}
