//! The leader's placement pipeline, the one place tasks are put on agents: scheduling rounds
//! (`plan_round`), placement at submission, the capacity held by entries in flight, and handing
//! the assignments an entry committed to their agents. The proposer only batches and writes; it
//! calls this around each write through `proposer::BatchHook`.
//!
//! Placement at submission: when nothing is queued, a new run's tasks are placed before the
//! batch is written, so the submission and its assignments commit in one Raft entry: one commit
//! less between submit and start, and one command less per task. Apply re-checks every placement
//! as it does a round's; a placement it refuses leaves the task pending for the next round.
//!
//! Entries in flight are not applied yet, so their assignments are not in the applied state's
//! free capacity. They are held as reservations until their entry is applied, and both paths see
//! capacity net of them. Every assignment an entry commits (a round's plan or a placement at
//! submission) is dispatched when the entry's results arrive here, whether or not whoever
//! proposed it still waits: a round whose commit was confirmed too late once left its tasks
//! assigned and never sent.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use openraft::ServerState;
use openraft::async_runtime::WatchReceiver;

pub use drover_core::placement::{agent_slot, assignments, place};

use crate::command::{Command, CommandResult, Placement};
use crate::limits;
use crate::model::{AgentName, AgentState, NodeId, Resources, RunSpec};
use crate::raft::Raft;
use crate::raft::state_machine::Shared;
use crate::scheduler::AgentSlot;
use crate::sessions::Sessions;

/// Resources reserved by one entry in flight, released once it is applied (or failed).
#[derive(Debug, Default)]
pub struct Reservation(Vec<(AgentName, Resources)>);

/// The leader's shell around [`place`]: reads applied state and connected sessions, keeps the
/// reservations of entries in flight, and hands committed placements to agents.
pub struct Placer {
    node_id: NodeId,
    raft: Raft,
    shared: Arc<Shared>,
    sessions: Arc<Sessions>,
    /// Per agent: resources and task count held by entries in flight.
    reserved: Mutex<BTreeMap<AgentName, (Resources, usize)>>,
    /// Token buckets of queues with a rate. Kept by the leader only: a new leader starts them
    /// full, so a failover may let one burst through early.
    buckets: Mutex<std::collections::HashMap<String, Bucket>>,
}

struct Bucket {
    tokens: f64,
    at: std::time::Instant,
}

impl crate::proposer::BatchHook for Placer {
    fn before_write(&self, commands: &mut [Command]) -> crate::proposer::BatchToken {
        Box::new(self.prepare(commands))
    }

    fn after_write(&self, token: crate::proposer::BatchToken, results: Option<&[CommandResult]>) {
        if let Some(results) = results {
            self.dispatch(results);
        }
        if let Ok(reservation) = token.downcast::<Reservation>() {
            self.release(*reservation);
        }
    }
}

impl Placer {
    /// Plans one scheduling round against the applied state (under its read lock: the view
    /// borrows the queued tasks) and the agents with a session here, net of reservations.
    /// Returns the assignments and the unplaced tasks whose reason changed.
    pub fn plan_round(&self) -> (Vec<crate::model::Assignment>, Vec<(String, String)>) {
        self.shared.read(|a| {
            let s = &a.state;
            let room = self.queue_room(s);
            let limited = !room.is_empty();
            let plan = crate::view::plan_round(s, self.agent_slots(s, &self.reserved()), room);
            if limited {
                self.spend_tokens(s, &plan.assignments);
            }
            (plan.assignments, plan.unplaced)
        })
    }

    /// How many tasks of each queue with limits may start now: the room under its
    /// `max_concurrency`, and the whole tokens in its rate bucket (refilled here).
    fn queue_room(&self, s: &crate::state::State) -> BTreeMap<String, (usize, String)> {
        let mut out = BTreeMap::new();
        if s.queues.is_empty() {
            return out;
        }
        let mut buckets = self.buckets.lock().expect("buckets lock");
        let now = std::time::Instant::now();
        for (name, q) in &s.queues {
            let mut room = usize::MAX;
            let mut why = String::new();
            if q.max_concurrency > 0 {
                let active = s.active_by_queue.get(name).copied().unwrap_or(0);
                let r = u64::from(q.max_concurrency).saturating_sub(active) as usize;
                if r < room {
                    room = r;
                    why = format!(
                        "queue {name} is at its max_concurrency ({})",
                        q.max_concurrency
                    );
                }
            }
            if q.rate_milli > 0 {
                let rate = q.rate_milli as f64 / 1000.0;
                let cap = if q.burst > 0 {
                    f64::from(q.burst)
                } else {
                    rate.ceil().max(1.0)
                };
                let b = buckets.entry(name.clone()).or_insert(Bucket {
                    tokens: cap,
                    at: now,
                });
                let elapsed = now.duration_since(b.at).as_secs_f64();
                b.tokens = (b.tokens + elapsed * rate).min(cap);
                b.at = now;
                let r = b.tokens.floor() as usize;
                if r < room {
                    room = r;
                    why = format!("queue {name} is at its rate limit ({rate}/s)");
                }
            }
            if room != usize::MAX {
                out.insert(name.clone(), (room, why));
            }
        }
        buckets.retain(|name, _| s.queues.get(name).is_some_and(|q| q.rate_milli > 0));
        out
    }

    /// Takes a token per planned task of a queue with a rate.
    fn spend_tokens(&self, s: &crate::state::State, planned: &[crate::model::Assignment]) {
        let mut buckets = self.buckets.lock().expect("buckets lock");
        for a in planned {
            if let Some(t) = s.tasks.get(&a.task_id)
                && let Some(b) = buckets.get_mut(&t.spec.queue)
            {
                b.tokens = (b.tokens - 1.0).max(0.0);
            }
        }
    }

    /// The agents that may take work (active, with a session here), as the scheduler sees
    /// them: capacity net of `reserved`.
    fn agent_slots(
        &self,
        s: &crate::state::State,
        reserved: &BTreeMap<AgentName, (Resources, usize)>,
    ) -> Vec<AgentSlot> {
        s.agents
            .values()
            .filter(|a| a.state == AgentState::Active && self.sessions.is_connected(&a.name))
            .map(|a| agent_slot(a, reserved.get(&a.name)))
            .collect()
    }

    pub fn new(node_id: NodeId, raft: Raft, shared: Arc<Shared>, sessions: Arc<Sessions>) -> Self {
        Self {
            node_id,
            raft,
            shared,
            sessions,
            reserved: Mutex::default(),
            buckets: Mutex::default(),
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
            let agents = self.agent_slots(s, &reserved);
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
            let mut placed = place(agents, &runs, &|q| s.queues.contains_key(q)).into_iter();
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

    /// Sends every assignment an entry committed (with submissions, or in a round's plan) to
    /// its agent.
    pub fn dispatch(&self, results: &[CommandResult]) {
        for r in results {
            let assigned = match r {
                CommandResult::Submitted { assigned, .. } => assigned,
                CommandResult::PlanApplied { accepted, .. } => accepted,
                _ => continue,
            };
            if !assigned.is_empty() {
                crate::leader::dispatch(&self.shared, &self.sessions, assigned);
            }
        }
    }
}
