//! The closed set of typed commands the state machine applies. Variants are append-only: a
//! replica must decode every entry ever written.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::model::{AgentName, Assignment, HeldTask, Outcome, Resources, RunSpec, TaskId};

/// One Raft entry: a batch of commands stamped with the leader's clock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Leader's wall clock when the batch was proposed, milliseconds since the Unix epoch.
    pub now_ms: u64,
    pub commands: Vec<Command>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    SubmitRun {
        idempotency_key: String,
        spec: RunSpec,
        submitted_by: String,
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
    },
    TaskFinished {
        agent: AgentName,
        task_id: TaskId,
        attempt: u64,
        outcome: Outcome,
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
}

impl Command {
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
        }
    }
}

/// What applying one command did; index-aligned with `Request::commands`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandResult {
    Submitted {
        run_id: String,
        deduplicated: bool,
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
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub results: Vec<CommandResult>,
}
