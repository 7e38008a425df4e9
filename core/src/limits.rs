//! Bounds the replicated state and the scheduler keep, each with the reason for its value.

/// Tasks waiting for placement across all runs. One million pending tasks fit in well under
/// 1.5 GiB of state; past that a cluster is better served by back-pressure on submitters.
pub const PENDING_TASKS_MAX: usize = 1_000_000;

/// Bytes of task specs waiting for placement, all submitters together (`TaskSpec::approx_bytes`).
/// Counts alone let a submitter fill every replica's memory with large specs that never place;
/// per-submitter and per-queue budgets (`--submitter-pending-bytes-max`, ...) sit below this.
pub const PENDING_BYTES_MAX: u64 = 512 * 1024 * 1024;

/// Bytes of task specs kept in all (pending, placed and finished): the oldest finished runs are
/// forgotten while more is kept, as with `RUNS_RETAINED_MAX` and `TASKS_RETAINED_MAX`.
pub const TASK_BYTES_RETAINED_MAX: u64 = 1024 * 1024 * 1024;

/// Tasks in one run. Large fan-outs belong in several runs; this keeps one submission (and one
/// Raft entry) well under the gRPC message limit.
pub const TASKS_PER_RUN_MAX: usize = 1_000;

/// Runs kept in state. Beyond this the oldest finished runs are forgotten (their results were
/// readable for the whole time they were among the newest 100,000).
pub const RUNS_RETAINED_MAX: usize = 100_000;

/// Tasks kept in state, finished or not. Beyond this the oldest finished runs are forgotten too:
/// 100,000 runs of up to 1,000 tasks would otherwise hold 100 million tasks, and every snapshot
/// carries all of them.
pub const TASKS_RETAINED_MAX: usize = 1_000_000;

/// Tasks one agent holds at once (assigned or running). A reconnecting agent is sent everything
/// it should hold, so this stays well inside its session outbox (`SESSION_OUTBOX_MAX`); it also
/// bounds what one lost agent takes with it. Tasks that ask for no resources meet this first.
pub const AGENT_TASKS_MAX: usize = 1_024;

/// Tasks the scheduler places in one round (one Raft entry).
pub const SCHEDULE_ROUND_TASKS_MAX: usize = 4_096;

/// Queued tasks a round looks at beyond the fleet's free task slots before falling back to the
/// full window: room for a few tasks no agent can take ahead of those that fit.
pub const SCHEDULE_WINDOW_MARGIN: usize = 64;

/// Finished attempts kept in a task's history (the newest).
pub const ATTEMPTS_KEPT_MAX: usize = 32;

/// Retries a step may ask for.
pub const RETRIES_MAX: u32 = 100;

/// Longest retry delay a step may ask for, and the cap on any computed delay: one day.
pub const RETRY_DELAY_MAX_MS: u64 = 24 * 3600 * 1000;

/// Dead letters kept; past it the oldest is dropped (and counted).
pub const DEAD_LETTERS_MAX: usize = 10_000;

/// Queues with a configuration.
pub const QUEUES_MAX: usize = 1_024;

/// Retries queued by one `RetryDue` entry; more wait for the next tick.
pub const RETRY_DUE_BATCH_MAX: usize = 1_024;

/// Pools configured at once.
pub const POOLS_MAX: usize = 256;

/// Decisions kept per pool (the newest).
pub const POOL_DECISIONS_KEPT: usize = 20;

/// Attempts at a decision's hook before it is marked failed.
pub const HOOK_ATTEMPTS_MAX: u32 = 10;

/// Pending tasks the autoscaler looks at per evaluation to measure demand.
pub const DEMAND_SCAN_MAX: usize = 20_000;
