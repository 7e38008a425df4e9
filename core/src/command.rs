//! The closed set of typed commands the state machine applies. Variants are append-only: a
//! replica must decode every entry ever written.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::model::{
    AgentName, Assignment, HeldTask, Outcome, PoolSpec, QueueConfig, Resources, RunSpec, TaskId,
};

/// One Raft entry: a batch of commands stamped with the leader's clock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Leader's wall clock when the batch was proposed, microseconds since the Unix epoch.
    pub now_us: u64,
    /// Shared, so the log store's recent entries hand the same commands to replication and
    /// apply without copying them (serialised exactly as a Vec).
    pub commands: std::sync::Arc<[Command]>,
}

/// How openraft names an entry's payload in its logs: the size, not the contents.
impl std::fmt::Display for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} commands at {} us", self.commands.len(), self.now_us)
    }
}

/// A submission's placement: per task (index-aligned with the spec's tasks), the agent chosen,
/// by the leader of `term`; apply refuses it from another term, like a plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    pub term: u64,
    pub agents: Vec<Option<AgentName>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    SubmitRun {
        idempotency_key: String,
        spec: RunSpec,
        submitted_by: String,
        /// Where the leader placed the tasks before proposing (placement at submission).
        #[serde(default)]
        placement: Option<Placement>,
    },
    RegisterAgent {
        name: AgentName,
        labels: BTreeMap<String, String>,
        total: Resources,
        class: String,
        version: String,
        held: Vec<HeldTask>,
        #[serde(default)]
        pool: String,
        #[serde(default)]
        isolation: String,
        #[serde(default)]
        instance_id: String,
    },
    ApplyPlan {
        /// Term of the leader that planned; apply refuses a plan from another term.
        term: u64,
        assignments: Vec<Assignment>,
        /// Tasks left pending, with the reason (only those whose reason changed).
        unplaced: Vec<(TaskId, String)>,
    },
    TaskStarted {
        agent: AgentName,
        task_id: TaskId,
        attempt: u64,
        /// The agent's clock when the attempt began, microseconds (0 = not reported).
        started_at_us: u64,
    },
    TaskFinished {
        agent: AgentName,
        task_id: TaskId,
        attempt: u64,
        outcome: Outcome,
        /// As in `TaskStarted`; a finish can be the first report of an attempt.
        started_at_us: u64,
    },
    AgentLost {
        name: AgentName,
        reason: String,
    },
    /// Start (with an absolute deadline, 0 = none) or stop draining an agent.
    SetDrain {
        name: AgentName,
        draining: bool,
        deadline_ms: u64,
    },
    /// Take tasks off an agent and queue them again as new attempts (drain deadline passed).
    RequeueTasks {
        agent: AgentName,
        tasks: Vec<HeldTask>,
        reason: String,
    },
    /// Fail tasks still pending, never placed, past the leader's unplaced timeout; each with
    /// the reason it gives. Apply skips any that was placed or moved on meanwhile.
    ExpireTasks {
        tasks: Vec<(HeldTask, String)>,
    },
    /// Forget agents lost for longer than the leader's retention. Apply skips any that came
    /// back or holds tasks.
    ForgetAgents {
        names: Vec<AgentName>,
    },
    /// Cancel a whole run (`step` empty) or one step of it (its dependents are skipped).
    CancelRun {
        run_id: String,
        step: String,
        reason: String,
    },
    /// Queue the next attempt of tasks whose retry deadline passed (the leader fires these).
    RetryDue {
        tasks: Vec<HeldTask>,
    },
    /// Fail the current attempt of tasks the leader judged failed without their agent (a
    /// timeout the agent did not enforce); retried like any failure, and stopped on the agent.
    FailTasks {
        tasks: Vec<(HeldTask, String)>,
    },
    /// A new attempt of the step behind dead letter `id`; its run resumes.
    RetryDeadLetter {
        id: u64,
    },
    DropDeadLetter {
        id: u64,
    },
    /// Set (replace) a queue's limits.
    SetQueue {
        name: String,
        config: QueueConfig,
    },
    /// Replace the pools: those not listed are removed (their agents stay).
    ApplyPools {
        pools: Vec<PoolSpec>,
    },
    /// The leader's scaling decision for `pool`: from `from` agents (registered and launching)
    /// to `to`, removing `remove` (idle agents, drained by this very command).
    Scale {
        pool: String,
        from: u32,
        to: u32,
        reason: String,
        remove: Vec<AgentName>,
    },
    /// How a decision's hook call went.
    HookOutcome {
        decision: u64,
        ok: bool,
        error: String,
    },
}

impl Command {
    /// A generous estimate of the command's encoded size, so a batch can be closed before its
    /// entry grows past the Raft message budget. Byte strings count four times (JSON arrays).
    pub fn approx_bytes(&self) -> usize {
        fn map(m: &BTreeMap<String, String>) -> usize {
            m.iter().map(|(k, v)| k.len() + v.len() + 8).sum()
        }
        match self {
            // A spec's size in memory (with its per-item overheads) is more than its encoding.
            Command::SubmitRun { spec, .. } => {
                256 + map(&spec.labels)
                    + spec
                        .tasks
                        .iter()
                        .map(|t| 256 + t.approx_bytes() as usize)
                        .sum::<usize>()
            }
            Command::RegisterAgent { labels, held, .. } => 512 + map(labels) + held.len() * 96,
            Command::ApplyPlan {
                assignments,
                unplaced,
                ..
            } => {
                64 + assignments.len() * 128
                    + unplaced
                        .iter()
                        .map(|(t, r)| t.len() + r.len() + 8)
                        .sum::<usize>()
            }
            Command::TaskFinished { outcome, .. } => {
                512 + outcome.reason.len()
                    + 4 * (outcome.stdout_tail.len() + outcome.stderr_tail.len())
            }
            Command::RequeueTasks { tasks, reason, .. } => 128 + reason.len() + tasks.len() * 96,
            Command::AgentLost { reason, .. } => 128 + reason.len(),
            Command::ExpireTasks { tasks } => {
                64 + tasks
                    .iter()
                    .map(|(h, r)| 96 + h.task_id.len() + r.len())
                    .sum::<usize>()
            }
            Command::ForgetAgents { names } => {
                64 + names.iter().map(|n| 16 + n.len()).sum::<usize>()
            }
            Command::CancelRun {
                run_id,
                step,
                reason,
            } => 128 + run_id.len() + step.len() + reason.len(),
            Command::RetryDue { tasks } => {
                64 + tasks.iter().map(|h| 32 + h.task_id.len()).sum::<usize>()
            }
            Command::FailTasks { tasks } => {
                64 + tasks
                    .iter()
                    .map(|(h, r)| 96 + h.task_id.len() + r.len())
                    .sum::<usize>()
            }
            Command::SetQueue { name, .. } => 128 + name.len(),
            Command::ApplyPools { pools } => 128 + pools.len() * 1024,
            Command::Scale { reason, remove, .. } => {
                256 + reason.len() + remove.iter().map(|r| 16 + r.len()).sum::<usize>()
            }
            Command::HookOutcome { error, .. } => 128 + error.len(),
            Command::TaskStarted { .. }
            | Command::SetDrain { .. }
            | Command::RetryDeadLetter { .. }
            | Command::DropDeadLetter { .. } => 160,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Command::SubmitRun { .. } => "submit_run",
            Command::RegisterAgent { .. } => "register_agent",
            Command::ApplyPlan { .. } => "apply_plan",
            Command::TaskStarted { .. } => "task_started",
            Command::TaskFinished { .. } => "task_finished",
            Command::AgentLost { .. } => "agent_lost",
            Command::SetDrain { .. } => "set_drain",
            Command::RequeueTasks { .. } => "requeue_tasks",
            Command::ExpireTasks { .. } => "expire_tasks",
            Command::ForgetAgents { .. } => "forget_agents",
            Command::CancelRun { .. } => "cancel_run",
            Command::RetryDue { .. } => "retry_due",
            Command::FailTasks { .. } => "fail_tasks",
            Command::RetryDeadLetter { .. } => "retry_dead_letter",
            Command::DropDeadLetter { .. } => "drop_dead_letter",
            Command::SetQueue { .. } => "set_queue",
            Command::ApplyPools { .. } => "apply_pools",
            Command::Scale { .. } => "scale",
            Command::HookOutcome { .. } => "hook_outcome",
        }
    }
}

/// What applying one command did; index-aligned with `Request::commands`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandResult {
    Submitted {
        run_id: String,
        deduplicated: bool,
        /// Assignments that committed with the submission (its placement, as far as it held).
        #[serde(default)]
        assigned: Vec<Assignment>,
    },
    Registered {
        /// Tasks the agent holds that are no longer its current attempt: it must kill them.
        stale: Vec<HeldTask>,
        /// Tasks assigned to the agent that it does not hold: the leader (re)sends them.
        resend: Vec<TaskId>,
        /// Tasks that were running on the agent and vanished with its restart: re-queued.
        requeued: Vec<TaskId>,
    },
    PlanApplied {
        accepted: Vec<Assignment>,
        dropped: usize,
    },
    Reported,
    /// The report names an attempt that is no longer current (or an unknown task).
    StaleReport {
        current_attempt: u64,
    },
    AgentLost {
        requeued: Vec<TaskId>,
    },
    DrainSet,
    Requeued {
        requeued: Vec<TaskId>,
    },
    /// Refused without changing state; the text names the limit or the problem.
    Rejected {
        limit: Option<String>,
        message: String,
    },
    Expired {
        expired: Vec<TaskId>,
    },
    Forgotten {
        names: Vec<AgentName>,
    },
    /// Tasks cancelled (or skipped below a cancelled step).
    Cancelled {
        tasks: Vec<TaskId>,
    },
    /// Tasks queued again (retry deadlines, or a dead letter's step).
    Retried {
        tasks: Vec<TaskId>,
    },
    /// Attempts failed by the leader.
    Failed {
        tasks: Vec<TaskId>,
    },
    Done,
    /// A scaling decision committed under this id (with the agents it removes).
    Scaled {
        decision: u64,
    },
    /// The thing named does not exist.
    NotFound {
        message: String,
    },
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub results: Vec<CommandResult>,
}
