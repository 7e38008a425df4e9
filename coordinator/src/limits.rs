//! Every bound the coordinator enforces, in one place. Hitting one is an error the caller sees,
//! naming the limit (RESOURCE_EXHAUSTED), never a silent drop or block.

use std::time::Duration;

/// The bounds of the replicated state and the scheduler live with them, in `drover_core`.
pub use drover_core::limits::*;

/// Commands waiting to be proposed to Raft. Bounded so a flood of submissions meets
/// RESOURCE_EXHAUSTED instead of growing the leader's memory.
pub const PROPOSAL_QUEUE_MAX: usize = 65_536;

/// Commands coalesced into one Raft entry. One entry (and one fsync) serves them all; the cap
/// keeps an entry under a few MiB.
pub const PROPOSAL_BATCH_MAX: usize = 2_048;

/// Estimated bytes of one Raft entry: a batch closes before passing it (a single larger command,
/// up to the gRPC message limit, gets an entry of its own). With `RAFT_APPEND_ENTRIES_MAX` entries
/// per append, replication messages stay within the Raft channel's message limit.
pub const PROPOSAL_BATCH_BYTES_MAX: usize = 2 * 1024 * 1024;

/// How long the leader waits for a follower to receive a snapshot chunk and, for the last one, to
/// decode and store the whole snapshot. 200 ms (openraft's old default) was shorter than a
/// follower restarted under a backlog took to take in a 2.7 MiB snapshot over HTTP/2's 64 KiB
/// flow-control windows: every attempt timed out, was dropped half-received and started over, and
/// the follower never caught up. A million queued tasks take seconds to decode.
pub const RAFT_INSTALL_SNAPSHOT_WAIT_MS: u64 = 10_000;

/// Bytes of a snapshot in one message to a follower.
pub const RAFT_SNAPSHOT_CHUNK_BYTES: usize = 3 * 1024 * 1024;

/// The largest snapshot a follower takes in (a million pending tasks encode to ~145 MiB). A
/// transfer that would pass it is refused, naming this limit.
pub const RAFT_SNAPSHOT_RECEIVE_BYTES_MAX: u64 = 4 * 1024 * 1024 * 1024;

/// Entries in one Raft append: times the largest entry (a command at the gRPC message limit,
/// 8 MiB), within the Raft channel's 64 MiB message limit.
pub const RAFT_APPEND_ENTRIES_MAX: u64 = 8;

/// sled's page cache. Its default (1 GiB) would sit on top of the state; the log is read back
/// mostly right after it is written (replication), and snapshots once per restart.
pub const SLED_CACHE_BYTES: u64 = 64 * 1024 * 1024;

/// Raft entries in flight at once from the proposer. A few overlap the fsync of one batch with
/// the collection of the next.
pub const PROPOSALS_IN_FLIGHT_MAX: usize = 4;

/// Newest Raft entries the log store keeps decoded in memory for replication and apply, by count
/// and by encoded size (a batch of large submissions can be megabytes). Older reads go to sled.
pub const RAFT_RECENT_ENTRIES_MAX: usize = 1_024;
pub const RAFT_RECENT_ENTRY_BYTES_MAX: usize = 32 * 1024 * 1024;

/// Appends handed to the log's sync task and not yet reported durable; one sync serves all of
/// them. openraft waits to hand over another when this many are waiting.
pub const RAFT_APPENDS_AWAITING_SYNC_MAX: usize = 1_024;

/// A snapshot file is written back to disk in chunks of this size as it is written, so the Raft
/// log's syncs never wait behind more than two of them (see `state_machine::write_paced`).
pub const SNAPSHOT_WRITE_CHUNK_BYTES: usize = 8 * 1024 * 1024;

/// Messages buffered towards one agent session before the session is considered stuck.
pub const SESSION_OUTBOX_MAX: usize = 4_096;

/// Agent sessions one leader holds.
pub const AGENT_SESSIONS_MAX: usize = 20_000;

/// Concurrent log reads forwarded to agents.
pub const LOG_REQUESTS_IN_FLIGHT_MAX: usize = 256;

/// Bytes of log returned in one GetTaskLogs answer.
pub const LOG_READ_BYTES_MAX: u64 = 4 * 1024 * 1024;

/// Runs returned by one ListRuns call.
pub const LIST_RUNS_MAX: u32 = 1_000;
/// Encoded bytes of one ListRuns page past its first run; half the gRPC message limit.
pub const LIST_RUNS_BYTES_MAX: usize = 4 * 1024 * 1024;

/// Lengths of names and strings in a run spec.
pub const NAME_BYTES_MAX: usize = 63;
pub const ARG_BYTES_MAX: usize = 64 * 1024;
pub const ARGS_MAX: usize = 4_096;
pub const ENV_VARS_MAX: usize = 1_024;
pub const LABELS_MAX: usize = 64;

/// Bytes of stdout/stderr tail kept in a replicated result (per stream).
pub const OUTPUT_TAIL_BYTES_MAX: usize = 4 * 1024;
/// An agent's reason for an outcome is cut to this; it is replicated with the result.
pub const REASON_BYTES_MAX: usize = 1024;
/// Task ids are `run-N/NAME`; a report naming a longer one is refused and ends the session.
pub const TASK_ID_BYTES_MAX: usize = 128;

/// Steps of TLS handshakes (a poll each: parse a flight, sign, verify a chain) computing at
/// once on the gRPC port; the others wait for a permit outside the runtime's run queue, so a
/// fleet reconnecting at once cannot queue Raft and heartbeat reads behind thousands of
/// handshakes (see `accept`).
pub const TLS_HANDSHAKE_STEPS_AT_ONCE: usize = 4;

/// Handshakes in progress on the gRPC port; past this, new connections wait in the kernel's
/// listen backlog.
pub const TLS_HANDSHAKES_PENDING_MAX: usize = 16_384;

/// Handshakes in progress from one IP address; past this, its new connections are closed at
/// once. One host (or one attacker) cannot take the whole `TLS_HANDSHAKES_PENDING_MAX`; a
/// fleet simulator connects at most 64 at a time.
pub const TLS_HANDSHAKES_PER_IP_MAX: usize = 128;

/// How long a client may take over its side of the TLS handshake (a few round trips and one
/// signature: a healthy client needs milliseconds).
pub const TLS_HANDSHAKE_WAIT: Duration = Duration::from_secs(5);

/// How long a new agent stream may take to send its `register`.
pub const REGISTER_WAIT: Duration = Duration::from_secs(10);

/// Reports from one agent being committed at once; more wait, which slows that agent's stream
/// (gRPC flow control) instead of growing the leader's memory.
pub const REPORTS_IN_FLIGHT_PER_SESSION: usize = 1_024;

/// Longest drain deadline accepted (a week); longer means "drain without a deadline".
pub const DRAIN_DEADLINE_MAX_MS: u64 = 7 * 24 * 3600 * 1000;

/// How long a log read waits for the agent to answer before falling back to the replicated tail.
pub const LOG_READ_WAIT: Duration = Duration::from_secs(5);

/// Bytes of a client's idempotency key (a UUID or a hash fits several times over).
pub const IDEMPOTENCY_KEY_BYTES_MAX: usize = 128;

/// Largest |weight| of a preferred expression: enough range to rank, small enough that sums
/// of 32 expressions never overflow the scheduler's score.
pub const WEIGHT_ABS_MAX: i32 = 1_000;

/// Largest |priority| of a task.
pub const PRIORITY_ABS_MAX: i32 = 1_000_000;

/// Required or preferred expressions per task; each one is evaluated against every candidate agent.
pub const EXPRESSIONS_MAX: usize = 32;

/// How long a caller waits for its command to commit before the outcome is "unknown".
pub const COMMIT_WAIT: Duration = Duration::from_secs(10);

/// How long the leader holds a proposal it refused because no quorum answered it within its
/// lease (a follower's slow log sync, a host starved of CPU), proposing it again as the lease
/// returns. Well within `COMMIT_WAIT`, so a caller still gets an answer when the lease stays
/// lost; by then an election is under way and the answer names no leader.
pub const LEASE_WAIT: Duration = Duration::from_secs(3);

/// `WatchRun` streams open at once in one coordinator process.
pub const WATCHES_MAX: usize = 1_024;
