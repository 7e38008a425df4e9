//! Metrics an operator graphs, exported in Prometheus text format on the HTTP port.
//! Gauges derived from state are refreshed when scraped; counters count events as they happen.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    pub method: String,
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct PoolLabels {
    pub pool: String,
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct QueueLabels {
    pub queue: String,
    pub state: String,
}

pub struct Metrics {
    pub registry: Registry,
    pub rpc_total: Family<RpcLabels, Counter>,
    pub agent_reports: Family<KindLabels, Counter>,
    pub proposal_batch_size: Histogram,
    pub proposal_seconds: Histogram,
    pub proposals_held_for_lease: Counter,
    pub raft_log_sync_seconds: Histogram,
    pub raft_term: Gauge,
    pub raft_is_leader: Gauge,
    pub raft_commit_index: Gauge,
    pub raft_applied_index: Gauge,
    pub raft_last_log_index: Gauge,
    pub raft_purged_index: Gauge,
    pub tasks: Family<StateLabels, Gauge>,
    pub agents: Family<StateLabels, Gauge>,
    pub agent_sessions: Gauge,
    pub raft_log_appended_bytes: Gauge<u64, AtomicU64>,
    pub runs_submitted: Gauge<u64, AtomicU64>,
    pub tasks_succeeded: Gauge<u64, AtomicU64>,
    pub tasks_failed: Gauge<u64, AtomicU64>,
    pub stale_reports: Gauge<u64, AtomicU64>,
    pub agents_lost: Gauge<u64, AtomicU64>,
    pub assignments_dropped: Gauge<u64, AtomicU64>,
    pub apply_panics: Counter,
    pub assignments_resent: Counter,
    pub assignments_expired: Counter,
    pub tasks_expired: Counter,
    pub tasks_retried: Counter,
    pub scale_decisions: Counter,
    pub hook_calls: Family<ResultLabels, Counter>,
    pub pool_agents: Family<PoolLabels, Gauge>,
    pub tasks_stopped: Counter,
    pub dead_letters: Gauge,
    pub step_outcomes: Family<StateLabels, Gauge<u64, AtomicU64>>,
    pub queue_tasks: Family<QueueLabels, Gauge>,
    pub schedule_rounds: Counter,
    pub tasks_placed: Counter,
    pub snapshot_build_seconds: Histogram,
    pub snapshot_install_seconds: Histogram,
    pub snapshot_bytes: Gauge,
    pub tls_handshakes: Family<ResultLabels, Counter>,
    pub raft_leader_probes: Family<ResultLabels, Counter>,
    pub tls_handshakes_pending: Gauge,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("drover");
        let rpc_total = Family::<RpcLabels, Counter>::default();
        registry.register(
            "rpc",
            "gRPC requests served, by method and status code",
            rpc_total.clone(),
        );
        let agent_reports = Family::<KindLabels, Counter>::default();
        registry.register(
            "agent_reports",
            "Task reports received from agents on this node, by kind (task_started, task_finished)",
            agent_reports.clone(),
        );
        let proposal_batch_size = Histogram::new(exponential_buckets(1.0, 2.0, 12));
        registry.register(
            "raft_proposal_batch_commands",
            "Commands coalesced into one Raft entry",
            proposal_batch_size.clone(),
        );
        let proposal_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 14));
        registry.register(
            "raft_proposal_seconds",
            "Time from proposing an entry to its apply",
            proposal_seconds.clone(),
        );
        let proposals_held_for_lease = Counter::default();
        registry.register(
            "raft_proposals_held_for_lease",
            "Proposals the leader refused while no quorum had answered it within its lease, held and proposed again",
            proposals_held_for_lease.clone(),
        );
        // From 50 us to ~1.1 s in steps of 1.5x: an idle virtual disk takes 0.3-0.6 ms, a busy one
        // 0.1 ms, and doubling steps could not tell those apart.
        let raft_log_sync_seconds = Histogram::new(exponential_buckets(0.00005, 1.5, 20));
        registry.register(
            "raft_log_sync_seconds",
            "Time to make the Raft log durable (one sync per appended batch, vote, truncation or purge)",
            raft_log_sync_seconds.clone(),
        );
        let raft_term = Gauge::default();
        registry.register("raft_term", "Current Raft term", raft_term.clone());
        let raft_is_leader = Gauge::default();
        registry.register(
            "raft_is_leader",
            "1 when this node is the leader",
            raft_is_leader.clone(),
        );
        let raft_commit_index = Gauge::default();
        registry.register(
            "raft_commit_index",
            "Highest committed log index known",
            raft_commit_index.clone(),
        );
        let raft_applied_index = Gauge::default();
        registry.register(
            "raft_applied_index",
            "Highest applied log index",
            raft_applied_index.clone(),
        );
        let raft_last_log_index = Gauge::default();
        registry.register(
            "raft_last_log_index",
            "Last log index on this node",
            raft_last_log_index.clone(),
        );
        let raft_purged_index = Gauge::default();
        registry.register(
            "raft_purged_index",
            "Highest log index compacted away on this node (covered by its snapshot)",
            raft_purged_index.clone(),
        );
        let tasks = Family::<StateLabels, Gauge>::default();
        registry.register(
            "tasks",
            "Tasks in state, by state (pending, running)",
            tasks.clone(),
        );
        let agents = Family::<StateLabels, Gauge>::default();
        registry.register("agents", "Registered agents, by state", agents.clone());
        let agent_sessions = Gauge::default();
        registry.register(
            "agent_sessions",
            "Agent sessions held by this node",
            agent_sessions.clone(),
        );
        let raft_log_appended_bytes = Gauge::<u64, AtomicU64>::default();
        registry.register(
            "raft_log_appended_bytes",
            "Bytes appended to this node's Raft log since it started (its write rate when graphed)",
            raft_log_appended_bytes.clone(),
        );
        let runs_submitted = Gauge::<u64, AtomicU64>::default();
        registry.register(
            "runs_submitted",
            "Runs submitted since the cluster began (replicated)",
            runs_submitted.clone(),
        );
        let tasks_succeeded = Gauge::<u64, AtomicU64>::default();
        registry.register(
            "tasks_succeeded",
            "Tasks that succeeded (replicated count)",
            tasks_succeeded.clone(),
        );
        let tasks_failed = Gauge::<u64, AtomicU64>::default();
        registry.register(
            "tasks_failed",
            "Tasks that failed (replicated count)",
            tasks_failed.clone(),
        );
        let stale_reports = Gauge::<u64, AtomicU64>::default();
        registry.register(
            "stale_reports",
            "Agent reports rejected because their attempt was no longer current (replicated count)",
            stale_reports.clone(),
        );
        let agents_lost = Gauge::<u64, AtomicU64>::default();
        registry.register(
            "agents_lost",
            "Agents declared lost (replicated count)",
            agents_lost.clone(),
        );
        let assignments_dropped = Gauge::<u64, AtomicU64>::default();
        registry.register(
            "assignments_dropped",
            "Planned assignments apply refused: task no longer pending, agent gone, draining or \
             without room (replicated count)",
            assignments_dropped.clone(),
        );
        let apply_panics = Counter::default();
        registry.register(
            "apply_panics",
            "Log entries whose apply panicked on this node (the node stops after one)",
            apply_panics.clone(),
        );
        let assignments_resent = Counter::default();
        registry.register(
            "assignments_resent",
            "Assignments this leader handed to an agent again: never handed over (a failover, a \
             commit confirmed late) or not started a while after",
            assignments_resent.clone(),
        );
        let assignments_expired = Counter::default();
        registry.register(
            "assignments_expired",
            "Assignments re-queued by this leader because they did not start within the start timeout",
            assignments_expired.clone(),
        );
        let tasks_expired = Counter::default();
        registry.register(
            "tasks_expired",
            "Tasks failed by this leader because they were never placed within the unplaced timeout",
            tasks_expired.clone(),
        );
        let tasks_retried = Counter::default();
        registry.register(
            "tasks_retried",
            "Failed attempts this leader queued again once their retry backoff passed",
            tasks_retried.clone(),
        );
        let scale_decisions = Counter::default();
        registry.register(
            "scale_decisions",
            "Scaling decisions this leader committed",
            scale_decisions.clone(),
        );
        let hook_calls = Family::<ResultLabels, Counter>::default();
        registry.register(
            "autoscaler_hook_calls",
            "Autoscaler hook calls made by this leader, by result",
            hook_calls.clone(),
        );
        let pool_agents = Family::<PoolLabels, Gauge>::default();
        registry.register(
            "pool_agents",
            "Per pool: agents current, launching and desired, tasks pending for it, decisions whose hook has not succeeded",
            pool_agents.clone(),
        );
        let tasks_stopped = Counter::default();
        registry.register(
            "tasks_stopped",
            "Stop requests this leader sent agents for attempts the coordinator ended (cancel, skip, timeout)",
            tasks_stopped.clone(),
        );
        let dead_letters = Gauge::default();
        registry.register(
            "dead_letters",
            "Steps that failed for good and wait in the dead-letter list",
            dead_letters.clone(),
        );
        let step_outcomes = Family::<StateLabels, Gauge<u64, AtomicU64>>::default();
        registry.register(
            "step_outcomes",
            "Cluster-wide totals since the cluster began: retried, skipped, cancelled steps and dead letters",
            step_outcomes.clone(),
        );
        let queue_tasks = Family::<QueueLabels, Gauge>::default();
        registry.register(
            "queue_tasks",
            "Tasks per queue: pending (waiting for an agent) and active (assigned or running)",
            queue_tasks.clone(),
        );
        let schedule_rounds = Counter::default();
        registry.register(
            "schedule_rounds",
            "Scheduling rounds run by this node as leader",
            schedule_rounds.clone(),
        );
        let tasks_placed = Counter::default();
        registry.register(
            "tasks_placed",
            "Assignments committed by this node as leader",
            tasks_placed.clone(),
        );
        let snapshot_build_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register(
            "snapshot_build_seconds",
            "Time to encode and store a snapshot of the state",
            snapshot_build_seconds.clone(),
        );
        let snapshot_install_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register(
            "snapshot_install_seconds",
            "Time to decode and store a snapshot received from the leader",
            snapshot_install_seconds.clone(),
        );
        let snapshot_bytes = Gauge::default();
        registry.register(
            "snapshot_bytes",
            "Size of the newest snapshot built or installed",
            snapshot_bytes.clone(),
        );
        let raft_leader_probes = Family::<ResultLabels, Counter>::default();
        registry.register(
            "raft_leader_probes",
            "Probes of a silent leader by this follower's election watchdog, by result (leading: \
             not campaigning; not_leading, unreachable: campaigning)",
            raft_leader_probes.clone(),
        );
        let tls_handshakes = Family::<ResultLabels, Counter>::default();
        registry.register(
            "tls_handshakes",
            "TLS handshakes on the gRPC port, by result (ok, failed, timeout)",
            tls_handshakes.clone(),
        );
        let tls_handshakes_pending = Gauge::default();
        registry.register(
            "tls_handshakes_pending",
            "TLS handshakes in progress on the gRPC port",
            tls_handshakes_pending.clone(),
        );
        Self {
            registry,
            rpc_total,
            agent_reports,
            proposal_batch_size,
            proposal_seconds,
            proposals_held_for_lease,
            raft_log_sync_seconds,
            raft_term,
            raft_is_leader,
            raft_commit_index,
            raft_applied_index,
            raft_last_log_index,
            raft_purged_index,
            tasks,
            agents,
            agent_sessions,
            raft_log_appended_bytes,
            runs_submitted,
            tasks_succeeded,
            tasks_failed,
            stale_reports,
            agents_lost,
            assignments_dropped,
            apply_panics,
            assignments_resent,
            assignments_expired,
            tasks_expired,
            tasks_retried,
            scale_decisions,
            hook_calls,
            pool_agents,
            tasks_stopped,
            dead_letters,
            step_outcomes,
            queue_tasks,
            schedule_rounds,
            tasks_placed,
            snapshot_build_seconds,
            snapshot_install_seconds,
            snapshot_bytes,
            tls_handshakes,
            raft_leader_probes,
            tls_handshakes_pending,
        }
    }

    pub fn count_rpc(&self, method: &str, code: tonic::Code) {
        self.rpc_total
            .get_or_create(&RpcLabels {
                method: method.to_owned(),
                code: format!("{code:?}"),
            })
            .inc();
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
