//! Starting and stopping one coordinator node: storage, Raft, the gRPC and HTTP servers, the
//! proposer and the leader loop. Every long-lived task is spawned here, listens for the one
//! shutdown signal, and is awaited on stop.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use drover_proto::pb;
use drover_proto::pb::agent_service_server::AgentServiceServer;
use drover_proto::pb::client_service_server::ClientServiceServer;
use drover_proto::pb::raft_service_server::RaftServiceServer;
use drover_proto::tls::{TlsFiles, TlsMaterial};
use openraft::async_runtime::WatchReceiver;
use openraft::metrics::RaftMetrics;
use openraft::{BasicNode, ServerState, SnapshotPolicy};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::agent_service::AgentRpc;
use crate::client_service::{ClientRpc, member_health};
use crate::config::Config;
use crate::error::CoordinatorError;
use crate::metrics::{Metrics, StateLabels};
use crate::model::{AgentState, NodeId, TaskState};
use crate::placer::Placer;
use crate::proposer::Proposer;
use crate::raft::Raft;
use crate::raft::log_store::LogStore;
use crate::raft::network::NetworkFactory;
use crate::raft::service::RaftRpc;
use crate::raft::state_machine::{Shared, StateMachineStore};
use crate::sessions::{LogRequests, Sessions};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Tls(#[from] drover_proto::tls::TlsError),
    #[error("opening the data dir {path}: {message}")]
    Storage { path: String, message: String },
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("raft: {0}")]
    Raft(String),
    #[error("tls config: {0}")]
    TlsConfig(String),
}

pub struct Timing {
    pub heartbeat_interval: Duration,
    pub lease_ttl: Duration,
    pub stranded: crate::stranded::Policy,
    /// Never-placed tasks fail after this long in the queue; None = never.
    pub unplaced_timeout: Option<Duration>,
    pub lost_agent_retention: Duration,
    /// How often the leader evaluates the pools' scaling policies.
    pub autoscale_interval: Duration,
}

/// Everything the services and loops of one node share.
pub struct Ctx {
    pub node_id: NodeId,
    pub raft: Raft,
    pub shared: Arc<Shared>,
    pub proposer: Proposer,
    pub peers: Arc<Vec<(NodeId, String)>>,
    pub sessions: Arc<Sessions>,
    pub placement: Arc<Placer>,
    pub log_requests: LogRequests,
    pub metrics: Arc<Metrics>,
    pub timing: Timing,
    pub admission: Arc<crate::admission::Admission>,
    pub committed_index: Arc<AtomicU64>,
    /// Bytes this node has appended to its Raft log since it started.
    pub log_appended_bytes: Arc<AtomicU64>,
    /// Where the `local` autoscaler hook finds certificates and puts its agents' files.
    pub local: crate::autoscaler::LocalEnv,
}

impl Ctx {
    pub fn addr_of(&self, id: NodeId) -> Option<String> {
        self.peers
            .iter()
            .find(|(p, _)| *p == id)
            .map(|(_, a)| a.clone())
    }

    pub fn not_leader_error(&self) -> CoordinatorError {
        match self.raft.metrics().borrow_watched().current_leader {
            Some(id) if id != self.node_id => CoordinatorError::NotLeader {
                leader_addr: self.addr_of(id),
            },
            _ => CoordinatorError::NoLeader,
        }
    }

    /// How long no quorum has answered this leader, once that is half an agent lease or more:
    /// long enough that a slow follower disk is not taken for a partition, short enough that
    /// agents find a leader elected elsewhere before it declares them lost.
    pub fn quorum_silence(&self, m: &RaftMetrics<crate::raft::TypeConfig>) -> Option<Duration> {
        // A single voter is its own quorum: nobody to be cut off from. (openraft keeps a lone
        // voter's quorum time fresh anyway; this does not depend on it.)
        m.membership_config.membership().voter_ids().nth(1)?;
        let silent = openraft::Instant::elapsed(&**m.last_quorum_acked.as_ref()?);
        (silent >= self.timing.lease_ttl / 2).then_some(silent)
    }

    /// A leader that a quorum still answers: what an agent session needs.
    pub fn require_leader_in_contact(&self) -> Result<(), CoordinatorError> {
        self.require_leader()?;
        let m = self.raft.metrics().borrow_watched().clone();
        match self.quorum_silence(&m) {
            Some(silent) => Err(CoordinatorError::Unavailable(format!(
                "this leader has heard from no quorum for {} ms; try another coordinator",
                silent.as_millis()
            ))),
            None => Ok(()),
        }
    }

    pub fn require_leader(&self) -> Result<(), CoordinatorError> {
        let m = self.raft.metrics();
        let m = m.borrow_watched();
        if m.state == ServerState::Leader && m.current_leader == Some(self.node_id) {
            return Ok(());
        }
        drop(m);
        Err(self.not_leader_error())
    }

    /// Ready = this node knows a leader and has applied everything it knows to be committed.
    pub fn readiness(&self) -> (bool, String) {
        let m = self.raft.metrics().borrow_watched().clone();
        let applied = m.last_applied.map(|l| l.index).unwrap_or(0);
        let committed = self.committed_index.load(Ordering::Relaxed);
        match m.current_leader {
            None => (false, "not ready: no leader known".into()),
            Some(_) if applied < committed => (
                false,
                format!("not ready: applied {applied} of {committed} committed entries"),
            ),
            Some(l) => (true, format!("ready: leader {l}, applied {applied}")),
        }
    }

    pub fn refresh_gauges(&self, m: &RaftMetrics<crate::raft::TypeConfig>) {
        let mt = &self.metrics;
        mt.raft_term.set(m.current_term as i64);
        mt.raft_is_leader
            .set(i64::from(m.state == ServerState::Leader));
        mt.raft_applied_index
            .set(m.last_applied.map(|l| l.index).unwrap_or(0) as i64);
        mt.raft_last_log_index
            .set(m.last_log_index.unwrap_or(0) as i64);
        mt.raft_purged_index
            .set(m.purged.map(|l| l.index).unwrap_or(0) as i64);
        mt.raft_commit_index
            .set(self.committed_index.load(Ordering::Relaxed) as i64);
        mt.raft_log_appended_bytes
            .set(self.log_appended_bytes.load(Ordering::Relaxed));
        mt.agent_sessions
            .set(self.sessions.connected_count() as i64);
        self.shared.read(|a| {
            let s = &a.state;
            let running = s.tasks_in(TaskState::Running);
            mt.tasks
                .get_or_create(&StateLabels {
                    state: "pending".into(),
                })
                .set(s.pending.len() as i64);
            mt.tasks
                .get_or_create(&StateLabels {
                    state: "placed".into(),
                })
                .set(s.running_tasks() as i64);
            mt.tasks
                .get_or_create(&StateLabels {
                    state: "running".into(),
                })
                .set(running as i64);
            for (label, st) in [
                ("active", AgentState::Active),
                ("draining", AgentState::Draining),
                ("lost", AgentState::Lost),
            ] {
                let n = s.agents.values().filter(|a| a.state == st).count();
                mt.agents
                    .get_or_create(&StateLabels {
                        state: label.into(),
                    })
                    .set(n as i64);
            }
            mt.runs_submitted.set(s.counters.runs_submitted);
            mt.tasks_succeeded.set(s.counters.tasks_succeeded);
            mt.tasks_failed.set(s.counters.tasks_failed);
            mt.stale_reports.set(s.counters.stale_reports);
            mt.agents_lost.set(s.counters.agents_lost);
            mt.assignments_dropped.set(s.counters.assignments_dropped);
            mt.dead_letters.set(s.dead_letters.len() as i64);
            mt.tasks
                .get_or_create(&StateLabels {
                    state: "waiting_retry".into(),
                })
                .set(s.retry_due.len() as i64);
            for (label, n) in [
                ("retried", s.counters.tasks_retried),
                ("skipped", s.counters.tasks_skipped),
                ("cancelled", s.counters.tasks_cancelled),
                ("dead_lettered", s.counters.dead_letters),
                ("dead_letters_dropped", s.counters.dead_letters_dropped),
            ] {
                mt.step_outcomes
                    .get_or_create(&StateLabels {
                        state: label.into(),
                    })
                    .set(n);
            }
            mt.pool_agents.clear();
            let now_us = crate::proposer::now_ms() * 1000;
            for name in s.pools.keys() {
                if let Some(p) = crate::pools::status(s, name, now_us) {
                    let unhooked = s.pools[name]
                        .decisions
                        .iter()
                        .filter(|d| d.hook != crate::model::HookState::Done)
                        .count() as u64;
                    for (label, n) in [
                        ("current", u64::from(p.current)),
                        ("launching", u64::from(p.launching)),
                        ("desired", u64::from(p.desired)),
                        ("demand_pending", p.demand_pending),
                        ("hook_not_done", unhooked),
                    ] {
                        mt.pool_agents
                            .get_or_create(&crate::metrics::PoolLabels {
                                pool: name.clone(),
                                state: label.into(),
                            })
                            .set(n as i64);
                    }
                }
            }
            // Rebuilt each scrape, so the series of a queue no longer known goes away.
            mt.queue_tasks.clear();
            let queues = s
                .queues
                .keys()
                .chain(s.pending_by_queue.keys())
                .chain(s.active_by_queue.keys());
            for q in queues {
                for (label, n) in [
                    ("pending", s.pending_by_queue.get(q).map_or(0, |t| t.tasks)),
                    ("active", s.active_by_queue.get(q).copied().unwrap_or(0)),
                ] {
                    mt.queue_tasks
                        .get_or_create(&crate::metrics::QueueLabels {
                            queue: q.clone(),
                            state: label.into(),
                        })
                        .set(n as i64);
                }
            }
        });
    }

    pub fn cluster_status(&self) -> pb::ClusterStatusResponse {
        let m = self.raft.metrics().borrow_watched().clone();
        let last_log = m.last_log_index.unwrap_or(0);
        let members = self
            .peers
            .iter()
            .map(|(id, addr)| {
                let matched = m
                    .replication
                    .as_ref()
                    .map(|r| r.get(id).copied().flatten().map(|l| l.index));
                pb::Member {
                    node_id: *id,
                    addr: addr.clone(),
                    health: member_health(
                        *id,
                        self.node_id,
                        m.state,
                        m.current_leader,
                        matched,
                        last_log,
                    )
                    .into(),
                    matched_index: matched.flatten(),
                }
            })
            .collect();
        pb::ClusterStatusResponse {
            node_id: self.node_id,
            leader_id: m.current_leader,
            leader_addr: m
                .current_leader
                .and_then(|l| self.addr_of(l))
                .unwrap_or_default(),
            term: m.current_term,
            commit_index: self.committed_index.load(Ordering::Relaxed),
            applied_index: m.last_applied.map(|l| l.index).unwrap_or(0),
            last_log_index: last_log,
            members,
            state: format!("{:?}", m.state).to_lowercase(),
            snapshot_index: m.snapshot.map(|s| s.index),
        }
    }
}

/// A running node. Drop does not stop it; call [`NodeHandle::shutdown`].
pub struct NodeHandle {
    pub ctx: Arc<Ctx>,
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    shutdown: Arc<watch::Sender<bool>>,
    halted: Arc<std::sync::OnceLock<String>>,
    tasks: Vec<JoinHandle<()>>,
}

impl NodeHandle {
    /// Why the node stopped itself, if it did: Raft hit a fatal error (a storage failure, or an
    /// entry whose apply panicked). The program exits non-zero with this.
    pub fn halted(&self) -> Option<&str> {
        self.halted.get().map(String::as_str)
    }

    /// Resolves when a shutdown has been requested.
    pub fn shutdown_requested(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        if let Err(e) = self.ctx.raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
    }
}

/// How long a fresh member other than the lowest id waits for a leader before initialising the
/// cluster itself.
const FORMATION_GRACE: Duration = Duration::from_secs(1);

pub async fn start(config: Config) -> Result<NodeHandle, StartError> {
    let peers = Arc::new(config.parsed_peers()?);
    let tls: TlsMaterial = TlsFiles::in_dir(&config.tls_dir, &config.tls_name()).load()?;
    std::fs::create_dir_all(&config.data_dir).map_err(|e| StartError::Storage {
        path: config.data_dir.display().to_string(),
        message: e.to_string(),
    })?;
    let storage_err = |e: String| StartError::Storage {
        path: config.data_dir.display().to_string(),
        message: e,
    };
    let sled_dir = config.data_dir.join("sled");
    let db = sled::Config::new()
        .path(&sled_dir)
        .flush_every_ms(None)
        .cache_capacity(crate::limits::SLED_CACHE_BYTES)
        .open()
        .map_err(|e| storage_err(e.to_string()))?;
    let metrics = Arc::new(Metrics::new());
    let log_store = LogStore::open(&db, &sled_dir, metrics.raft_log_sync_seconds.clone())
        .map_err(|e| storage_err(e.to_string()))?;
    let committed_index = log_store.committed_index.clone();
    let log_appended_bytes = log_store.appended_bytes.clone();
    let fresh = log_store
        .is_fresh()
        .map_err(|e| storage_err(e.to_string()))?;
    let sm =
        StateMachineStore::open(&db, &config.data_dir, metrics.clone()).map_err(storage_err)?;
    let shared = sm.shared.clone();

    let raft_config = openraft::Config {
        cluster_name: "drover".into(),
        heartbeat_interval: config.raft_heartbeat_ms,
        election_timeout_min: config.election_timeouts().0,
        election_timeout_max: config.election_timeouts().1,
        // Snapshots are triggered by `snapshot_policy::run`, by log bytes as well as entries.
        snapshot_policy: SnapshotPolicy::Never,
        max_in_snapshot_log_to_keep: config.snapshot_logs / 2,
        max_payload_entries: crate::limits::RAFT_APPEND_ENTRIES_MAX,
        install_snapshot_timeout: crate::limits::RAFT_INSTALL_SNAPSHOT_WAIT_MS,
        ..Default::default()
    }
    .validate()
    .map_err(|e| StartError::Raft(e.to_string()))?;
    let raft = Raft::new(
        config.node_id,
        Arc::new(raft_config),
        NetworkFactory { tls: tls.clone() },
        log_store,
        sm,
    )
    .await
    .map_err(|e| StartError::Raft(e.to_string()))?;

    let grpc_listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| StartError::Bind {
            addr: config.listen,
            source,
        })?;
    let grpc_addr = grpc_listener
        .local_addr()
        .map_err(|source| StartError::Bind {
            addr: config.listen,
            source,
        })?;
    let http_listener = tokio::net::TcpListener::bind(config.http_listen)
        .await
        .map_err(|source| StartError::Bind {
            addr: config.http_listen,
            source,
        })?;
    let http_addr = http_listener
        .local_addr()
        .map_err(|source| StartError::Bind {
            addr: config.http_listen,
            source,
        })?;

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let shutdown_tx = Arc::new(shutdown_tx);
    let halted = Arc::new(std::sync::OnceLock::new());
    let mut tasks = Vec::new();
    let sessions = Arc::new(Sessions::default());
    let contact = Arc::new(crate::raft::watchdog::LeaderContact::default());
    let placement = Arc::new(Placer::new(
        config.node_id,
        raft.clone(),
        shared.clone(),
        sessions.clone(),
    ));
    let (proposer, proposer_task) = Proposer::start(
        raft.clone(),
        peers.clone(),
        metrics.clone(),
        placement.clone(),
        shutdown_rx.clone(),
    );
    tasks.push(proposer_task);
    let ctx = Arc::new(Ctx {
        node_id: config.node_id,
        raft: raft.clone(),
        shared,
        proposer,
        peers: peers.clone(),
        sessions,
        placement,
        log_requests: LogRequests::default(),
        metrics,
        timing: Timing {
            heartbeat_interval: config.heartbeat_interval(),
            lease_ttl: config.lease_ttl(),
            stranded: crate::stranded::Policy::new(config.start_timeout()),
            unplaced_timeout: Some(config.unplaced_timeout).filter(|t| !t.is_zero()),
            lost_agent_retention: config.lost_agent_retention,
            autoscale_interval: config.autoscale_interval,
        },
        admission: crate::admission::Admission::new(config.budgets()),
        committed_index,
        log_appended_bytes: log_appended_bytes.clone(),
        local: crate::autoscaler::LocalEnv {
            tls_dir: config.tls_dir.clone(),
            data_dir: config.data_dir.clone(),
        },
    });

    let max = drover_proto::GRPC_MESSAGE_BYTES_MAX;
    let tls_config = tls.server_config().map_err(StartError::TlsConfig)?;
    let router = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(5)))
        .add_service(
            ClientServiceServer::new(ClientRpc { ctx: ctx.clone() })
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .add_service(
            AgentServiceServer::new(AgentRpc { ctx: ctx.clone() })
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .add_service(crate::raft::service::HeardOnArrival {
            inner: RaftServiceServer::new(RaftRpc::new(raft.clone(), contact.clone()))
                .max_decoding_message_size(max * 8)
                .max_encoding_message_size(max * 8),
            contact: contact.clone(),
        });
    let (incoming, acceptor) = crate::accept::tls_incoming(
        grpc_listener,
        tls_config,
        ctx.metrics.clone(),
        shutdown_rx.clone(),
    );
    tasks.push(acceptor);
    let mut grpc_shutdown = shutdown_rx.clone();
    tasks.push(tokio::spawn(async move {
        let stop = async move {
            let _ = grpc_shutdown.changed().await;
        };
        if let Err(e) = router.serve_with_incoming_shutdown(incoming, stop).await {
            tracing::error!(error = %e, "gRPC server failed");
        }
    }));
    let mut http_shutdown = shutdown_rx.clone();
    let app = crate::http::router(ctx.clone());
    tasks.push(tokio::spawn(async move {
        let stop = async move {
            let _ = http_shutdown.changed().await;
        };
        if let Err(e) = axum::serve(http_listener, app)
            .with_graceful_shutdown(stop)
            .await
        {
            tracing::error!(error = %e, "HTTP server failed");
        }
    }));
    tasks.push(tokio::spawn(crate::raft::snapshot_policy::run(
        raft.clone(),
        crate::raft::snapshot_policy::Sizes {
            log_appended: log_appended_bytes,
            last_snapshot: ctx.metrics.snapshot_bytes.clone(),
            rank: crate::raft::snapshot_policy::rank(
                config.node_id,
                &peers.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
            ),
        },
        config.snapshot_logs,
        shutdown_rx.clone(),
    )));
    let (min, max) = config.election_timeouts();
    tasks.push(tokio::spawn(crate::raft::watchdog::run(
        raft.clone(),
        crate::raft::watchdog::Watch {
            me: config.node_id,
            contact,
            lease: Duration::from_millis(max),
            // A heartbeat: the other voter may have heard from the leader that much later.
            margin: Duration::from_millis(config.raft_heartbeat_ms + 10),
            step: Duration::from_millis(min / 3),
            prober: crate::raft::watchdog::LeaderProber::new(peers.clone(), tls.clone()),
            metrics: ctx.metrics.clone(),
        },
        shutdown_rx.clone(),
    )));
    tasks.push(tokio::spawn(crate::leader::run(
        ctx.clone(),
        shutdown_rx.clone(),
    )));
    tasks.push(tokio::spawn(watch_raft(
        raft.clone(),
        halted.clone(),
        shutdown_tx.clone(),
        shutdown_rx.clone(),
    )));

    if fresh {
        let members: BTreeMap<NodeId, BasicNode> = peers
            .iter()
            .map(|(id, addr)| (*id, BasicNode::new(addr)))
            .collect();
        // Any fresh member may initialise (with the same membership), so the cluster forms
        // whichever members start. When all of them did at once, they campaigned against each
        // other and a new cluster often elected twice in its first second: the lowest id goes
        // first and the others only if no leader has reached them after a grace period (a vote
        // granted or the membership replicated makes their initialise a no-op). Restarts never
        // get here.
        let first = peers.iter().map(|(id, _)| *id).min() == Some(config.node_id);
        let grace = if first {
            Duration::ZERO
        } else {
            FORMATION_GRACE
        };
        let raft = raft.clone();
        let mut shutdown = shutdown_rx.clone();
        tasks.push(tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(grace) => {}
                _ = shutdown.changed() => return,
            }
            match raft.initialize(members).await {
                Ok(()) => tracing::info!("initialised a new cluster"),
                Err(e) => tracing::info!(error = %e, "cluster already initialised elsewhere"),
            }
        }));
    }
    tracing::info!(node_id = config.node_id, %grpc_addr, %http_addr, "coordinator started");
    Ok(NodeHandle {
        ctx,
        grpc_addr,
        http_addr,
        shutdown: shutdown_tx,
        halted,
        tasks,
    })
}

/// Stops the whole node once Raft has stopped on its own. A node whose Raft is dead but whose
/// gRPC server still answers would look alive to agents and clients (and to a load balancer's
/// health check) while serving nothing; stopped, they move to the other nodes.
async fn watch_raft(
    raft: Raft,
    halted: Arc<std::sync::OnceLock<String>>,
    stop: Arc<watch::Sender<bool>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut metrics = raft.metrics();
    let reason = loop {
        if let Err(fatal) = &metrics.borrow_watched().running_state {
            break fatal.to_string();
        }
        tokio::select! {
            changed = metrics.changed() => {
                if changed.is_err() {
                    break "Raft stopped".to_owned();
                }
            }
            _ = shutdown.changed() => return,
        }
    };
    if *shutdown.borrow() {
        return;
    }
    tracing::error!(%reason, "Raft stopped on a fatal error; shutting this node down");
    let _ = halted.set(reason);
    let _ = stop.send(true);
}
