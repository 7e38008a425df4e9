//! Domain types of the coordinator: what the state machine stores and the scheduler reads.
//! Wire types never appear here; `convert` translates at the edge.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

pub type NodeId = u64;
/// `RUN_ID/TASK_NAME`, unique across the cluster.
pub type TaskId = String;
pub type AgentName = String;

/// Capacity asked for or offered. cpu in millicores, memory in bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    pub gpus: u64,
    pub extended: BTreeMap<String, u64>,
}

impl Resources {
    /// Whether `self` (a request) fits into `free`.
    pub fn fits_in(&self, free: &Resources) -> bool {
        self.cpu_millis <= free.cpu_millis
            && self.memory_bytes <= free.memory_bytes
            && self.gpus <= free.gpus
            && self
                .extended
                .iter()
                .all(|(k, v)| *v == 0 || free.extended.get(k).is_some_and(|f| f >= v))
    }

    /// `self - other`; callers check `other.fits_in(self)` first.
    pub fn minus(&self, other: &Resources) -> Resources {
        let mut extended = self.extended.clone();
        for (k, v) in &other.extended {
            if let Some(f) = extended.get_mut(k) {
                *f = f.saturating_sub(*v);
            }
        }
        Resources {
            cpu_millis: self.cpu_millis.saturating_sub(other.cpu_millis),
            memory_bytes: self.memory_bytes.saturating_sub(other.memory_bytes),
            gpus: self.gpus.saturating_sub(other.gpus),
            extended,
        }
    }

    pub fn plus(&self, other: &Resources) -> Resources {
        let mut extended = self.extended.clone();
        for (k, v) in &other.extended {
            let e = extended.entry(k.clone()).or_default();
            *e = e.saturating_add(*v);
        }
        // Saturating: apply runs this on replicated input, where an overflow panic would stop
        // every replica on the same entry.
        Resources {
            cpu_millis: self.cpu_millis.saturating_add(other.cpu_millis),
            memory_bytes: self.memory_bytes.saturating_add(other.memory_bytes),
            gpus: self.gpus.saturating_add(other.gpus),
            extended,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Program {
    /// Executed directly.
    Argv(Vec<String>),
    /// Executed as `sh -c`.
    Shell(String),
    /// Completed by the agent itself after this many milliseconds; no process.
    Noop { duration_ms: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LabelOp {
    Eq,
    NotEq,
    In,
    NotIn,
    Exists,
    NotExists,
}

/// A condition on an agent's labels.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LabelExpr {
    pub key: String,
    pub op: LabelOp,
    pub values: Vec<String>,
}

impl LabelExpr {
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let v = labels.get(&self.key);
        match self.op {
            LabelOp::Eq => v.is_some_and(|v| self.values.first() == Some(v)),
            LabelOp::NotEq => v.is_none_or(|v| self.values.first() != Some(v)),
            LabelOp::In => v.is_some_and(|v| self.values.contains(v)),
            LabelOp::NotIn => v.is_none_or(|v| !self.values.contains(v)),
            LabelOp::Exists => v.is_some(),
            LabelOp::NotExists => v.is_none(),
        }
    }
}

impl std::fmt::Display for LabelExpr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let first = self.values.first().map(String::as_str).unwrap_or("");
        match self.op {
            LabelOp::Eq => write!(f, "{} = {first}", self.key),
            LabelOp::NotEq => write!(f, "{} != {first}", self.key),
            LabelOp::In => write!(f, "{} in ({})", self.key, self.values.join(", ")),
            LabelOp::NotIn => write!(f, "{} not in ({})", self.key, self.values.join(", ")),
            LabelOp::Exists => write!(f, "{} exists", self.key),
            LabelOp::NotExists => write!(f, "{} !exists", self.key),
        }
    }
}

/// How a run's tasks are scored against agents that can take them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Strategy {
    /// Fill agents tightly (best fit), keeping whole agents free for big tasks.
    #[default]
    BinPack,
    /// Prefer the agent with the most room left (worst fit), spreading load.
    Spread,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskSpec {
    pub name: String,
    pub program: Program,
    pub env: BTreeMap<String, String>,
    pub workdir: String,
    /// 0 = no timeout.
    pub timeout_ms: u64,
    pub class: String,
    pub resources: Resources,
    /// Every expression must match the agent's labels.
    #[serde(default)]
    pub required: Vec<LabelExpr>,
    /// (weight, expression): matching agents score the weight.
    #[serde(default)]
    pub preferred: Vec<(i32, LabelExpr)>,
    /// Spread the run's tasks across the values of this agent label; empty = no spreading.
    #[serde(default)]
    pub spread_by: String,
    /// Higher first.
    #[serde(default)]
    pub priority: i32,
    #[serde(default)]
    pub queue: String,
    /// The run's strategy, copied onto each task.
    #[serde(default)]
    pub strategy: Strategy,
    /// Names of steps of the same run that must succeed before this one starts.
    #[serde(default)]
    pub depends_on: Vec<String>,
    #[serde(default)]
    pub retry: RetryPolicy,
}

/// How a failed attempt is retried: `max` more attempts, each after a delay.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// Retries after the first failure (0 = none).
    pub max: u32,
    pub backoff: Backoff,
    /// Delay before the first retry.
    pub initial_ms: u64,
    /// Cap on any one delay (0 = no cap).
    pub max_delay_ms: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Backoff {
    /// Every delay is `initial`.
    Fixed,
    /// `initial`, then doubling, up to `max_delay`.
    #[default]
    Exponential,
}

impl RetryPolicy {
    /// The delay before the retry that follows failure number `failures` (1-based) of task
    /// `seq`: the backoff less up to a fifth, so retries of many steps that failed together do not
    /// start together. The jitter is a hash, not a random draw: every replica computes the same.
    pub fn delay_ms(&self, failures: u32, seq: u64) -> u64 {
        let base = match self.backoff {
            Backoff::Fixed => self.initial_ms,
            Backoff::Exponential => {
                let doublings = failures.saturating_sub(1).min(40);
                self.initial_ms.saturating_mul(1u64 << doublings)
            }
        };
        let capped = if self.max_delay_ms > 0 {
            base.min(self.max_delay_ms)
        } else {
            base
        };
        let mut h = seq
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(u64::from(failures).wrapping_mul(0xBF58_476D_1CE4_E5B9));
        h ^= h >> 31;
        capped - h % (capped / 5 + 1)
    }
}

/// What a run does when a step fails for good.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum OnFailure {
    /// Every step not yet finished is skipped, running ones stopped.
    #[default]
    FailFast,
    /// Only the failed step's dependents are skipped; independent branches keep going.
    Continue,
}

impl TaskSpec {
    /// About how many bytes this spec holds in memory (and in a snapshot): its strings and
    /// collections plus a fixed overhead. Deterministic, so every replica counts alike.
    pub fn approx_bytes(&self) -> u64 {
        const OVERHEAD: usize = 256;
        const PER_ITEM: usize = 32;
        let expr = |e: &LabelExpr| {
            PER_ITEM + e.key.len() + e.values.iter().map(|v| PER_ITEM + v.len()).sum::<usize>()
        };
        let program = match &self.program {
            Program::Argv(args) => args.iter().map(|a| PER_ITEM + a.len()).sum(),
            Program::Shell(s) => s.len(),
            Program::Noop { .. } => 0,
        };
        let env: usize = self
            .env
            .iter()
            .map(|(k, v)| 2 * PER_ITEM + k.len() + v.len())
            .sum();
        let extended: usize = self
            .resources
            .extended
            .keys()
            .map(|k| PER_ITEM + k.len())
            .sum();
        (OVERHEAD
            + self.name.len()
            + program
            + env
            + self.workdir.len()
            + self.class.len()
            + self.queue.len()
            + self.spread_by.len()
            + self
                .depends_on
                .iter()
                .map(|d| PER_ITEM + d.len())
                .sum::<usize>()
            + extended
            + self.required.iter().map(expr).sum::<usize>()
            + self.preferred.iter().map(|(_, e)| expr(e)).sum::<usize>()) as u64
    }

    /// A task with only a name and a program; everything else as a spec that says nothing gets it
    /// (default class and queue, no limits, requirements or preferences, binpack).
    pub fn new(name: impl Into<String>, program: Program) -> Self {
        Self {
            name: name.into(),
            program,
            env: BTreeMap::new(),
            workdir: String::new(),
            timeout_ms: 0,
            class: crate::scheduler::DEFAULT_CLASS.to_owned(),
            resources: Resources::default(),
            required: vec![],
            preferred: vec![],
            spread_by: String::new(),
            priority: 0,
            queue: "default".into(),
            strategy: Strategy::default(),
            depends_on: vec![],
            retry: RetryPolicy::default(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunSpec {
    pub name: String,
    pub tasks: Vec<TaskSpec>,
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub on_failure: OnFailure,
    /// The parameters substituted into the steps (after overrides), kept for display.
    #[serde(default)]
    pub params: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskState {
    Pending,
    Assigned,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    /// Waits for steps it depends on; not in the queue.
    Blocked,
    /// Failed; waits for its retry deadline (`Task::retry_at_us`); not in the queue.
    Waiting,
    /// Never ran (or was stopped) because a step it needed failed or its run failed fast.
    Skipped,
}

/// One finished attempt of a task, kept in the task's history.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptRecord {
    pub attempt: u64,
    pub agent: String,
    pub started_at_us: u64,
    pub finished_at_us: u64,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub reason: String,
    pub succeeded: bool,
}

/// Queue order: higher priority first, then submission order.
pub type PendingKey = (i64, u64, TaskId);

impl Task {
    pub fn pending_key(&self) -> PendingKey {
        (-i64::from(self.spec.priority), self.seq, self.id.clone())
    }
}

impl TaskState {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TaskState::Succeeded | TaskState::Failed | TaskState::Cancelled | TaskState::Skipped
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunState {
    Pending,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

/// How a process ended. Owner: the agent that ran the attempt.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub reason: String,
    pub duration_ms: u64,
    #[serde(with = "crate::serde_bytes")]
    pub stdout_tail: Vec<u8>,
    #[serde(with = "crate::serde_bytes")]
    pub stderr_tail: Vec<u8>,
    pub succeeded: bool,
    #[serde(default)]
    pub peak_memory_bytes: Option<u64>,
    #[serde(default)]
    pub cpu_time_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    pub id: TaskId,
    pub run_id: String,
    /// Owner: the submitter (immutable after submission).
    pub spec: TaskSpec,
    /// Owner: the state machine, driven by plans (coordinator) and reports (agent).
    pub state: TaskState,
    /// Fencing token: bumped every time the task is handed out anew.
    pub attempt: u64,
    /// Owner: the leader's plan.
    pub agent: Option<AgentName>,
    /// Owner: the leader's scheduler; why the task is not placed yet.
    /// A shared constant for the common reasons (no allocation per queued task).
    pub pending_reason: std::borrow::Cow<'static, str>,
    /// Leader's clock at each step, microseconds since the Unix epoch (0 = not yet).
    pub created_at_us: u64,
    pub assigned_at_us: u64,
    pub started_at_us: u64,
    pub finished_at_us: u64,
    /// Owner: the agent that ran the current attempt.
    /// Boxed: most tasks in a large queue have none, and it is the biggest field.
    pub outcome: Option<Box<Outcome>>,
    /// Submission order, used to keep the queue first-in first-out.
    pub seq: u64,
    /// Failed attempts counted against `spec.retry.max`.
    #[serde(default)]
    pub failures: u32,
    /// While `Waiting`: when the next attempt is queued (leader clock, us).
    #[serde(default)]
    pub retry_at_us: u64,
    /// Finished attempts, oldest first (the newest `limits::ATTEMPTS_KEPT_MAX`).
    #[serde(default)]
    pub history: Vec<AttemptRecord>,
    /// While `Blocked`: dependencies not yet succeeded.
    #[serde(default)]
    pub waiting_on: u32,
    /// Tasks of the run that depend on this one.
    #[serde(default)]
    pub dependents: Vec<TaskId>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Run {
    pub id: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub task_ids: Vec<TaskId>,
    /// Microseconds since the Unix epoch (0 = not finished).
    pub created_at_us: u64,
    pub finished_at_us: u64,
    pub submitted_by: String,
    pub seq: u64,
    #[serde(default)]
    pub on_failure: OnFailure,
    #[serde(default)]
    pub params: BTreeMap<String, String>,
    /// Why the run was cancelled; empty unless someone cancelled the whole run.
    #[serde(default)]
    pub cancelled: String,
    /// Tasks not yet terminal: a finishing task closes its run without walking every sibling,
    /// which made each result of a 1,000-task run cost 1,000 lookups. Derived, so not stored:
    /// `State::rebuild_derived` recomputes it when a snapshot is loaded.
    #[serde(skip)]
    pub unfinished: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentState {
    Active,
    Draining,
    Lost,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Agent {
    pub name: AgentName,
    /// Owner: the agent (reported at registration).
    pub labels: BTreeMap<String, String>,
    pub total: Resources,
    pub class: String,
    pub version: String,
    #[serde(default)]
    pub pool: String,
    /// "cgroup-v2" when the agent enforces limits per task; "" otherwise.
    #[serde(default)]
    pub isolation: String,
    /// Owner: the state machine (registration, loss, drain).
    pub state: AgentState,
    /// While draining: when remaining tasks are stopped and re-queued (leader clock, ms); 0 = never.
    #[serde(default)]
    pub drain_deadline_ms: u64,
    pub registered_at_ms: u64,
    /// Sum of the requests of the tasks placed on this agent and not yet terminal.
    pub used: Resources,
    /// Tasks placed on this agent and not yet terminal.
    pub tasks: BTreeSet<TaskId>,
    /// The machine behind it (cloud instance id), for the autoscaler's hook.
    #[serde(default)]
    pub instance_id: String,
    /// Since when it holds no task (leader clock, us); 0 while it holds some.
    #[serde(default)]
    pub idle_since_us: u64,
}

impl Agent {
    pub fn free(&self) -> Resources {
        self.total.minus(&self.used)
    }

    /// Holds more than it offers: it re-registered with less capacity than its tasks use. It
    /// takes no new work, not even a task asking for nothing, until enough of them finish.
    pub fn over_committed(&self) -> bool {
        !self.used.fits_in(&self.total)
    }

    /// Whether a task asking for `request` may be added to what it holds.
    pub fn can_take(&self, request: &Resources) -> bool {
        self.used.plus(request).fits_in(&self.total)
    }
}

/// One placement decided by the scheduler.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub task_id: TaskId,
    /// The attempt the task had when planned; apply refuses the assignment if it moved on.
    pub attempt: u64,
    pub agent: AgentName,
}

/// A task (id, attempt) an agent holds: running, or finished with a result not yet acknowledged.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct HeldTask {
    pub task_id: TaskId,
    pub attempt: u64,
}

/// Limits of one queue; 0 in a field means no limit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueConfig {
    /// Tasks of the queue assigned or running at once.
    pub max_concurrency: u32,
    /// Tasks started per second, in thousandths (1500 = 1.5/s).
    pub rate_milli: u64,
    /// Tasks that may start at once after a quiet spell (token bucket size); 0 = one second's worth.
    pub burst: u32,
    /// Tasks of the queue waiting for an agent; submissions past it are refused.
    pub max_pending: u64,
}

/// A step that failed for good (retries exhausted): kept until retried, dropped, or its run is
/// forgotten.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub id: u64,
    pub task_id: TaskId,
    pub run_id: String,
    pub step: String,
    pub queue: String,
    /// The attempt that failed last; a retry must find the task still there.
    pub attempt: u64,
    pub failures: u32,
    pub agent: String,
    pub failed_at_us: u64,
    pub reason: String,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    #[serde(with = "crate::serde_bytes")]
    pub stdout_tail: Vec<u8>,
    #[serde(with = "crate::serde_bytes")]
    pub stderr_tail: Vec<u8>,
}

/// An agent pool (a cloud instance group) and how it is scaled.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolSpec {
    pub name: String,
    pub min: u32,
    pub max: u32,
    /// The class and labels of the pool's agents (its launch template): pending tasks that ask
    /// for this class and whose required expressions these labels satisfy are its demand.
    pub class: String,
    pub labels: BTreeMap<String, String>,
    pub scale_up: ScaleUp,
    pub scale_down: ScaleDown,
    /// Launched but not registered by then: counted as failed, no longer as capacity.
    pub boot_timeout_ms: u64,
    pub hook: Hook,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScaleUp {
    /// Grow while pending tasks per agent (counting launching ones) exceed this (0 = not used).
    pub pending_per_agent: u32,
    /// Grow while the 90th percentile of pending tasks' waits exceeds this (0 = not used).
    pub wait_p90_over_ms: u64,
    /// Agents added per decision (at least 1).
    pub step: u32,
    pub cooldown_ms: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScaleDown {
    /// An agent with no task for this long may be removed (when nothing waits for the pool).
    pub idle_for_ms: u64,
    /// Agents removed per decision (at least 1).
    pub step: u32,
    pub cooldown_ms: u64,
}

/// How the pool's instance group is driven.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Hook {
    /// A program given the decision as JSON on stdin.
    Exec {
        command: Vec<String>,
        timeout_ms: u64,
    },
    /// The decision POSTed as JSON, signed with HMAC-SHA256 under the secret in the leader's
    /// environment variable `secret_env`.
    Webhook {
        url: String,
        secret_env: String,
        timeout_ms: u64,
    },
    /// Agents started as processes on the leader's host (development and tests).
    Local { agent_args: Vec<String> },
}

impl Default for Hook {
    fn default() -> Self {
        Hook::Local { agent_args: vec![] }
    }
}

/// A committed scaling decision. Its id makes the hook's work idempotent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub id: u64,
    pub pool: String,
    pub from: u32,
    pub to: u32,
    pub reason: String,
    pub at_us: u64,
    /// Agents (with their instance ids) to remove, drained when the decision committed.
    pub remove: Vec<(AgentName, String)>,
    pub hook: HookState,
    pub attempts: u32,
    pub last_error: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum HookState {
    #[default]
    Pending,
    Done,
    /// Given up after `limits::HOOK_ATTEMPTS_MAX` attempts.
    Failed,
}

/// Instances a scale-up asked for and not yet registered.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Launch {
    pub decision: u64,
    pub remaining: u32,
    /// Leader clock (us): past it the rest count as failed launches.
    pub deadline_us: u64,
}

/// A pool in the replicated state: its spec and what scaling did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pool {
    pub spec: PoolSpec,
    pub launching: Vec<Launch>,
    /// The newest decisions, oldest first (`limits::POOL_DECISIONS_KEPT`).
    pub decisions: Vec<Decision>,
    pub last_up_us: u64,
    pub last_down_us: u64,
    pub launches_failed: u64,
}
