//! The agent's bounds, each with the reason for its value.

/// Bytes of stdout and of stderr kept in memory per task for the replicated result tail.
pub const OUTPUT_TAIL_BYTES_MAX: usize = 4 * 1024;

/// Tasks held at once (running, or finished and not yet acknowledged). An agent asked for more
/// refuses the assignment with a failed result rather than exhausting the host.
pub const HELD_TASKS_MAX: usize = 10_000;

/// Messages queued towards the coordinator on one session.
pub const SESSION_OUTBOX_MAX: usize = 4_096;

/// Bytes returned by one log read.
pub const LOG_READ_BYTES_MAX: u64 = 4 * 1024 * 1024;

/// Programs whose place on PATH the agent keeps (per program and PATH); more than a host runs
/// in a few seconds, and each entry is two short strings and a path.
pub const PROGRAM_PATHS_MAX: usize = 1_024;

/// How long a task's start goes unreported: a task that ends sooner sends its finish alone (it
/// carries the start time), one command for the coordinators to replicate and apply instead of
/// two. Most short tasks end well within it; a longer one shows as running this much later.
pub const STARTED_REPORT_HOLD_MS: u64 = 50;

/// Grace between SIGTERM and SIGKILL when a task is stopped.
pub const KILL_GRACE_MS: u64 = 2_000;

/// Threads for blocking work (starting a task with its log files and work directory, reading the
/// tails, log reads).
/// More queue for a thread instead of each burst of short tasks leaving hundreds behind.
pub const BLOCKING_THREADS_MAX: usize = 32;
