//! Coordinator configuration: flags, mirrored by `DROVER_*` environment variables (flags win),
//! with defaults that work for a local dev cluster.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::model::NodeId;

#[derive(Debug, Clone, Parser)]
#[command(
    name = "drover-coordinator",
    version,
    about = "Drover's Raft-replicated coordinator"
)]
pub struct Config {
    /// YAML file of settings (keys are flag names); flags and DROVER_* variables win over it.
    #[arg(long, env = "DROVER_CONFIG")]
    pub config: Option<PathBuf>,

    /// This node's id; must appear in --peer.
    #[arg(long, env = "DROVER_NODE_ID")]
    pub node_id: NodeId,

    /// gRPC (mTLS) listen address for clients, agents and peers. Port 0 picks a free port.
    #[arg(long, env = "DROVER_LISTEN", default_value = "127.0.0.1:7101")]
    pub listen: SocketAddr,

    /// HTTP listen address for /healthz, /readyz and /metrics. Port 0 picks a free port.
    #[arg(long, env = "DROVER_HTTP_LISTEN", default_value = "127.0.0.1:7201")]
    pub http_listen: SocketAddr,

    /// Where the Raft log, vote and snapshots live.
    #[arg(long, env = "DROVER_DATA_DIR")]
    pub data_dir: PathBuf,

    /// Cluster members as ID=HOST:PORT, repeated or comma-separated (DROVER_PEERS). Includes this node.
    #[arg(
        long = "peer",
        env = "DROVER_PEERS",
        value_delimiter = ',',
        required = true
    )]
    pub peers: Vec<String>,

    /// Directory holding ca.pem, NAME.pem and NAME-key.pem (from `droverctl certs init`).
    #[arg(long, env = "DROVER_TLS_DIR")]
    pub tls_dir: PathBuf,

    /// Certificate name inside --tls-dir [default: coordinator-NODE_ID].
    #[arg(long, env = "DROVER_TLS_NAME")]
    pub tls_name: Option<String>,

    /// Agent heartbeat interval told to agents at registration.
    #[arg(long, env = "DROVER_HEARTBEAT_INTERVAL_MS", default_value_t = 1000)]
    pub heartbeat_interval_ms: u64,

    /// An agent not heard from for this long is declared lost and its tasks re-queued. Four
    /// missed heartbeats: a dead agent is declared lost within 5 s of its death (the lease runs
    /// from its last heartbeat, up to an interval earlier, and rounds come every 100 ms).
    #[arg(long, env = "DROVER_LEASE_TTL_MS", default_value_t = 4000)]
    pub lease_ttl_ms: u64,

    /// A task assigned and not reported started for this long is re-queued as a new attempt
    /// (it is re-sent to its agent before that, every sixth of it, at most every 5 s).
    #[arg(long, env = "DROVER_START_TIMEOUT_MS", default_value_t = 30_000)]
    pub start_timeout_ms: u64,

    /// Tasks one submitter (certificate name) may have waiting for placement.
    #[arg(
        long,
        env = "DROVER_SUBMITTER_PENDING_TASKS_MAX",
        default_value_t = 250_000
    )]
    pub submitter_pending_tasks_max: u64,

    /// Bytes of task specs one submitter may have waiting for placement (e.g. 128Mi).
    #[arg(long, env = "DROVER_SUBMITTER_PENDING_BYTES_MAX", default_value = "128Mi", value_parser = drover_proto::quantity::parse_bytes)]
    pub submitter_pending_bytes_max: u64,

    /// Tasks one queue may have waiting for placement.
    #[arg(
        long,
        env = "DROVER_QUEUE_PENDING_TASKS_MAX",
        default_value_t = 500_000
    )]
    pub queue_pending_tasks_max: u64,

    /// Bytes of task specs one queue may have waiting for placement.
    #[arg(long, env = "DROVER_QUEUE_PENDING_BYTES_MAX", default_value = "256Mi", value_parser = drover_proto::quantity::parse_bytes)]
    pub queue_pending_bytes_max: u64,

    /// A task still waiting for its first placement this long after submission fails, with the
    /// reason it could not be placed (e.g. 24h, 30m); 0 = wait forever.
    #[arg(long, env = "DROVER_UNPLACED_TIMEOUT", default_value = "24h", value_parser = drover_proto::quantity::parse_duration)]
    pub unplaced_timeout: Duration,

    /// How often the leader evaluates the agent pools' scaling policies (e.g. 10s, 500ms).
    #[arg(long, env = "DROVER_AUTOSCALE_INTERVAL", default_value = "10s", value_parser = drover_proto::quantity::parse_duration)]
    pub autoscale_interval: Duration,

    /// An agent lost this long (and holding no tasks) is forgotten: it leaves `agent list`.
    #[arg(long, env = "DROVER_LOST_AGENT_RETENTION", default_value = "24h", value_parser = drover_proto::quantity::parse_duration)]
    pub lost_agent_retention: Duration,

    /// Raft leader heartbeat interval.
    #[arg(long, env = "DROVER_RAFT_HEARTBEAT_MS", default_value_t = 50)]
    pub raft_heartbeat_ms: u64,

    /// Minimum Raft election timeout. A follower campaigns after hearing nothing from the leader
    /// for the leader lease (the maximum below) plus a random timeout between minimum and maximum.
    #[arg(long, env = "DROVER_ELECTION_TIMEOUT_MS", default_value_t = 150)]
    pub election_timeout_ms: u64,

    /// Maximum Raft election timeout (default: the minimum plus a third).
    #[arg(long, env = "DROVER_ELECTION_TIMEOUT_MAX_MS")]
    pub election_timeout_max_ms: Option<u64>,

    /// Build a snapshot (and compact the log) once at least this many entries, and at least as
    /// many log bytes as the last snapshot holds, have been written since it.
    #[arg(long, env = "DROVER_SNAPSHOT_LOGS", default_value_t = 5000)]
    pub snapshot_logs: u64,
}

/// Environment variables a config file may set.
pub const ENV_VARS: &[&str] = &[
    "DROVER_NODE_ID",
    "DROVER_LISTEN",
    "DROVER_HTTP_LISTEN",
    "DROVER_DATA_DIR",
    "DROVER_PEERS",
    "DROVER_TLS_DIR",
    "DROVER_TLS_NAME",
    "DROVER_HEARTBEAT_INTERVAL_MS",
    "DROVER_LEASE_TTL_MS",
    "DROVER_START_TIMEOUT_MS",
    "DROVER_SUBMITTER_PENDING_TASKS_MAX",
    "DROVER_SUBMITTER_PENDING_BYTES_MAX",
    "DROVER_QUEUE_PENDING_TASKS_MAX",
    "DROVER_QUEUE_PENDING_BYTES_MAX",
    "DROVER_UNPLACED_TIMEOUT",
    "DROVER_LOST_AGENT_RETENTION",
    "DROVER_RAFT_HEARTBEAT_MS",
    "DROVER_ELECTION_TIMEOUT_MS",
    "DROVER_ELECTION_TIMEOUT_MAX_MS",
    "DROVER_SNAPSHOT_LOGS",
];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--peer '{0}': expected ID=HOST:PORT, e.g. 1=127.0.0.1:7101")]
    BadPeer(String),
    #[error("--node-id {0} does not appear in --peer")]
    SelfNotInPeers(NodeId),
    #[error("--peer lists node {0} twice")]
    DuplicatePeer(NodeId),
    #[error(
        "--lease-ttl-ms ({lease}) must be at least twice --heartbeat-interval-ms ({heartbeat})"
    )]
    LeaseTooShort { lease: u64, heartbeat: u64 },
    #[error(
        "election timeouts: need --raft-heartbeat-ms ({heartbeat}) < --election-timeout-ms ({min}) < --election-timeout-max-ms ({max})"
    )]
    BadElectionTimeouts { heartbeat: u64, min: u64, max: u64 },
}

impl Config {
    /// Parses --peer entries into (id, address), sorted by id.
    pub fn parsed_peers(&self) -> Result<Vec<(NodeId, String)>, ConfigError> {
        let mut out: Vec<(NodeId, String)> = Vec::new();
        for p in &self.peers {
            let (id, addr) = p
                .split_once('=')
                .ok_or_else(|| ConfigError::BadPeer(p.clone()))?;
            let id: NodeId = id
                .trim()
                .parse()
                .map_err(|_| ConfigError::BadPeer(p.clone()))?;
            let addr = addr.trim();
            if addr.is_empty() || !addr.contains(':') {
                return Err(ConfigError::BadPeer(p.clone()));
            }
            if out.iter().any(|(i, _)| *i == id) {
                return Err(ConfigError::DuplicatePeer(id));
            }
            out.push((id, addr.to_owned()));
        }
        out.sort();
        if !out.iter().any(|(i, _)| *i == self.node_id) {
            return Err(ConfigError::SelfNotInPeers(self.node_id));
        }
        if self.lease_ttl_ms < 2 * self.heartbeat_interval_ms {
            return Err(ConfigError::LeaseTooShort {
                lease: self.lease_ttl_ms,
                heartbeat: self.heartbeat_interval_ms,
            });
        }
        let (min, max) = self.election_timeouts();
        if !(self.raft_heartbeat_ms < min && min < max) {
            return Err(ConfigError::BadElectionTimeouts {
                heartbeat: self.raft_heartbeat_ms,
                min,
                max,
            });
        }
        Ok(out)
    }

    /// (minimum, maximum) Raft election timeouts in milliseconds.
    pub fn election_timeouts(&self) -> (u64, u64) {
        let min = self.election_timeout_ms;
        (min, self.election_timeout_max_ms.unwrap_or(min + min / 3))
    }

    pub fn tls_name(&self) -> String {
        self.tls_name
            .clone()
            .unwrap_or_else(|| format!("coordinator-{}", self.node_id))
    }

    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.heartbeat_interval_ms)
    }

    pub fn lease_ttl(&self) -> Duration {
        Duration::from_millis(self.lease_ttl_ms)
    }

    pub fn budgets(&self) -> crate::admission::Budgets {
        crate::admission::Budgets {
            submitter_tasks: self.submitter_pending_tasks_max,
            submitter_bytes: self.submitter_pending_bytes_max,
            queue_tasks: self.queue_pending_tasks_max,
            queue_bytes: self.queue_pending_bytes_max,
        }
    }

    pub fn start_timeout(&self) -> Duration {
        Duration::from_millis(self.start_timeout_ms)
    }
}
