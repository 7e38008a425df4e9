//! Coalesces commands from every caller into few Raft entries: one entry, one fsync, many
//! submissions and status reports. Callers wait for their own command's result.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use openraft::error::{ClientWriteError, ForwardReason, RaftError};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tracing::Instrument;

use crate::command::{Command, CommandResult, Request};
use crate::error::CoordinatorError;
use crate::limits;
use crate::metrics::Metrics;
use crate::model::NodeId;
use crate::raft::{Raft, TypeConfig};

type Reply = oneshot::Sender<Result<CommandResult, CoordinatorError>>;

/// Between proposals refused for an expired lease: short at first (a quorum usually answers
/// within a heartbeat or two), doubling up to the maximum.
const LEASE_PAUSE_MIN: Duration = Duration::from_millis(10);
const LEASE_PAUSE_MAX: Duration = Duration::from_millis(200);

/// openraft's leader refuses writes while no quorum has answered it within its lease; it still
/// leads, and under load the lease returns as soon as the followers' slow log syncs finish.
fn refused_for_lease<T>(
    result: &Result<T, RaftError<TypeConfig, ClientWriteError<TypeConfig>>>,
) -> bool {
    matches!(
        result,
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))
            if f.reason == ForwardReason::LeaseExpired
    )
}

/// Handle for proposing commands; cheap to clone.
#[derive(Clone)]
pub struct Proposer {
    tx: mpsc::Sender<(Command, Reply)>,
}

pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Proposer {
    pub fn start(
        raft: Raft,
        peers: Arc<Vec<(NodeId, String)>>,
        metrics: Arc<Metrics>,
        hook: Arc<dyn BatchHook>,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> (Self, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(limits::PROPOSAL_QUEUE_MAX);
        let handle = tokio::spawn(run(raft, peers, metrics, hook, rx, shutdown));
        (Self { tx }, handle)
    }

    /// Proposes one command and waits for its applied result.
    pub async fn propose(&self, cmd: Command) -> Result<CommandResult, CoordinatorError> {
        let (reply_tx, reply_rx) = oneshot::channel();
        self.tx.try_send((cmd, reply_tx)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => CoordinatorError::LimitReached {
                limit: "proposal_queue_max".into(),
                message: format!(
                    "the leader's proposal queue is full (proposal_queue_max = {}); retry with backoff",
                    limits::PROPOSAL_QUEUE_MAX
                ),
            },
            mpsc::error::TrySendError::Closed(_) => CoordinatorError::ShuttingDown,
        })?;
        match tokio::time::timeout(limits::COMMIT_WAIT, reply_rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(CoordinatorError::Unknown("proposer stopped".into())),
            Err(_) => Err(CoordinatorError::Unknown(
                "commit not confirmed in time".into(),
            )),
        }
    }
}

/// What the leader does around a batch's write. The proposer only batches and writes; placing
/// submissions, holding capacity for entries in flight and handing the assignments an entry
/// committed to their agents belong to the leader's placement pipeline (`placer::Placer`).
pub trait BatchHook: Send + Sync + 'static {
    /// Called with a batch just before it is written; the token comes back to `after_write`.
    fn before_write(&self, commands: &mut [Command]) -> BatchToken;
    /// Called once the batch is applied (with its results, index-aligned) or failed (None).
    fn after_write(&self, token: BatchToken, results: Option<&[CommandResult]>);
}

/// Whatever a `BatchHook` keeps between the two calls.
pub type BatchToken = Box<dyn std::any::Any + Send>;

async fn run(
    raft: Raft,
    peers: Arc<Vec<(NodeId, String)>>,
    metrics: Arc<Metrics>,
    hook: Arc<dyn BatchHook>,
    mut rx: mpsc::Receiver<(Command, Reply)>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let in_flight = Arc::new(Semaphore::new(limits::PROPOSALS_IN_FLIGHT_MAX));
    // A command that did not fit the previous batch opens the next one.
    let mut carried: Option<(Command, Reply)> = None;
    loop {
        let first = match carried.take() {
            Some(m) => m,
            None => tokio::select! {
                m = rx.recv() => match m { Some(m) => m, None => return },
                _ = shutdown.changed() => return,
            },
        };
        // Wait for a slot first: while all slots are busy, more commands pile up into this batch.
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        let mut bytes = first.0.approx_bytes();
        let mut batch = vec![first];
        while batch.len() < limits::PROPOSAL_BATCH_MAX {
            match rx.try_recv() {
                Ok(m) => {
                    bytes += m.0.approx_bytes();
                    if bytes > limits::PROPOSAL_BATCH_BYTES_MAX {
                        carried = Some(m);
                        break;
                    }
                    batch.push(m);
                }
                Err(_) => break,
            }
        }
        let (mut commands, replies): (Vec<Command>, Vec<Reply>) = batch.into_iter().unzip();
        let token = hook.before_write(&mut commands);
        let raft = raft.clone();
        let peers = peers.clone();
        let metrics = metrics.clone();
        let hook = hook.clone();
        let span = tracing::debug_span!("raft_propose", commands = commands.len());
        tokio::spawn(
            async move {
                write_batch(&raft, &peers, &metrics, &*hook, token, commands, replies).await;
                drop(permit);
            }
            .instrument(span),
        );
    }
}

async fn write_batch(
    raft: &Raft,
    peers: &[(NodeId, String)],
    metrics: &Metrics,
    hook: &dyn BatchHook,
    token: BatchToken,
    commands: Vec<Command>,
    replies: Vec<Reply>,
) {
    let n = commands.len();
    metrics.proposal_batch_size.observe(n as f64);
    let started = std::time::Instant::now();
    let commands: Arc<[Command]> = commands.into();
    let mut pause = LEASE_PAUSE_MIN;
    let result = loop {
        let result = raft
            .client_write(Request {
                now_us: now_us(),
                commands: commands.clone(),
            })
            .await;
        // Refused before it was appended: proposing again cannot write it twice.
        if refused_for_lease(&result) && started.elapsed() + pause < limits::LEASE_WAIT {
            metrics.proposals_held_for_lease.inc();
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(LEASE_PAUSE_MAX);
            continue;
        }
        break result;
    };
    metrics
        .proposal_seconds
        .observe(started.elapsed().as_secs_f64());
    match result {
        Ok(resp) => {
            // Whether or not its proposers still wait: a caller that gave up (the commit was
            // not confirmed in time) must not leave what the entry decided undone.
            hook.after_write(token, Some(&resp.data.results));
            for (reply, r) in replies.into_iter().zip(resp.data.results) {
                let _ = reply.send(Ok(r));
            }
        }
        Err(e) => {
            hook.after_write(token, None);
            let err = match e {
                RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
                    CoordinatorError::NotLeader {
                        leader_addr: f.leader_id.and_then(|id| {
                            peers.iter().find(|(p, _)| *p == id).map(|(_, a)| a.clone())
                        }),
                    }
                }
                // Appended here, then replaced by another leader's log: it may still commit there.
                RaftError::APIError(ClientWriteError::LogEntryDiscarded(f)) => {
                    CoordinatorError::Unknown(format!("leadership changed: {f}"))
                }
                RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
                    CoordinatorError::Internal(e.to_string())
                }
                RaftError::APIError(ClientWriteError::PreconditionFailed(e)) => {
                    CoordinatorError::Internal(e.to_string())
                }
                RaftError::Fatal(f) => CoordinatorError::Unknown(format!("raft stopped: {f}")),
            };
            for reply in replies {
                let _ = reply.send(Err(err.clone()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use openraft::error::{ClientWriteError, Fatal, ForwardReason, ForwardToLeader, RaftError};

    use super::refused_for_lease;
    use crate::error::CoordinatorError;

    #[test]
    fn only_a_refusal_for_the_lease_is_proposed_again_and_reports_retry_what_may_pass() {
        let forward = |reason| -> Result<(), _> {
            let mut f = ForwardToLeader::empty();
            f.reason = reason;
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))
        };
        assert!(refused_for_lease(&forward(ForwardReason::LeaseExpired)));
        assert!(!refused_for_lease(&forward(ForwardReason::NotLeader)));
        assert!(!refused_for_lease(&forward(
            ForwardReason::LeadershipTransfer
        )));
        assert!(!refused_for_lease::<()>(&Err(RaftError::Fatal(
            Fatal::Stopped
        ))));
        assert!(!refused_for_lease(&Ok(())));

        // A task report is proposed again on errors that may pass on the same node.
        assert!(CoordinatorError::NotLeader { leader_addr: None }.may_pass());
        assert!(CoordinatorError::Unknown("timed out".into()).may_pass());
        assert!(
            CoordinatorError::LimitReached {
                limit: "proposal_queue_max".into(),
                message: String::new()
            }
            .may_pass()
        );
        assert!(
            !CoordinatorError::NotLeader {
                leader_addr: Some("127.0.0.1:1".into())
            }
            .may_pass(),
            "another node leads: the session is about to close"
        );
        assert!(!CoordinatorError::ShuttingDown.may_pass());
        assert!(!CoordinatorError::Internal("bug".into()).may_pass());
    }
}
