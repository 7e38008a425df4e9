//! The agent's one long-lived stream to the leader: register, heartbeat, take assignments, send
//! reports until they are acknowledged. On a redirect it follows the leader at once; on any other
//! failure it backs off and tries the next coordinator. Tasks keep running meanwhile.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use drover_proto::client::{connect, describe_status, leader_hint};
use drover_proto::pb::agent_service_client::AgentServiceClient;
use drover_proto::pb::{self, AgentMessage, agent_message, coordinator_message};
use drover_proto::tls::TlsMaterial;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use crate::executor;
use crate::limits;
use crate::tasks::TaskTable;

/// What the agent tells the coordinator about itself.
#[derive(Clone)]
pub struct Identity {
    pub name: String,
    pub labels: std::collections::HashMap<String, String>,
    pub resources: pb::Resources,
    pub class: String,
    pub pool: String,
    pub instance_id: String,
    /// "cgroup-v2" when tasks get their own cgroup with limits.
    pub isolation: String,
}

pub struct SessionConfig {
    pub addrs: Vec<String>,
    pub tls: TlsMaterial,
    pub identity: Identity,
    pub work_dir: PathBuf,
    pub sandbox: Arc<crate::executor::Sandbox>,
}

enum End {
    Redirect(String),
    Shutdown,
    Failed(String),
}

/// Keeps a session up until shutdown.
pub async fn run(
    cfg: Arc<SessionConfig>,
    table: Arc<TaskTable>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut next: Option<String> = None;
    let mut index = 0usize;
    let mut backoff = Duration::from_millis(100);
    loop {
        if *shutdown.borrow() {
            return;
        }
        let addr = next.take().unwrap_or_else(|| {
            index += 1;
            cfg.addrs[(index - 1) % cfg.addrs.len()].clone()
        });
        match session(&cfg, &table, &addr, &mut shutdown).await {
            End::Shutdown => return,
            End::Redirect(leader) => {
                tracing::info!(from = %addr, to = %leader, "following the leader");
                next = Some(leader);
                backoff = Duration::from_millis(100);
            }
            End::Failed(why) => {
                tracing::warn!(coordinator = %addr, error = %why, retry_in_ms = backoff.as_millis() as u64, "session failed");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.changed() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// Something new to report, or a held-back start report came due.
async fn report_wake(
    changed: &tokio::sync::Notify,
    due: std::pin::Pin<&mut tokio::time::Sleep>,
    armed: bool,
) {
    tokio::select! {
        _ = changed.notified() => {}
        _ = due, if armed => {}
    }
}

fn redirect_or_fail(status: &tonic::Status) -> End {
    match leader_hint(status) {
        Some(leader) => End::Redirect(leader),
        None => End::Failed(describe_status(status)),
    }
}

async fn session(
    cfg: &SessionConfig,
    table: &Arc<TaskTable>,
    addr: &str,
    shutdown: &mut watch::Receiver<bool>,
) -> End {
    let channel = match connect(addr, &cfg.tls).await {
        Ok(c) => c,
        Err(e) => return End::Failed(e),
    };
    let (tx, rx) = mpsc::channel::<AgentMessage>(limits::SESSION_OUTBOX_MAX);
    table.reset_sent();
    let register = pb::Register {
        name: cfg.identity.name.clone(),
        labels: cfg.identity.labels.clone(),
        resources: Some(cfg.identity.resources.clone()),
        class: cfg.identity.class.clone(),
        version: env!("CARGO_PKG_VERSION").into(),
        running: table.held(),
        pool: cfg.identity.pool.clone(),
        isolation: cfg.identity.isolation.clone(),
        instance_id: cfg.identity.instance_id.clone(),
    };
    let _ = tx
        .send(AgentMessage {
            msg: Some(agent_message::Msg::Register(register)),
        })
        .await;
    let mut client = AgentServiceClient::new(channel)
        .max_decoding_message_size(drover_proto::GRPC_MESSAGE_BYTES_MAX)
        .max_encoding_message_size(drover_proto::GRPC_MESSAGE_BYTES_MAX);
    let mut inbound = match client.session(ReceiverStream::new(rx)).await {
        Ok(r) => r.into_inner(),
        Err(status) => return redirect_or_fail(&status),
    };
    let mut registered = false;
    // Wakes the loop when the first held-back start report is due (`TaskTable::take_unsent`);
    // one timer, moved rather than made again on every pass.
    let start_due = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(start_due);
    let mut start_due_armed = false;
    let mut heartbeat = tokio::time::interval(Duration::from_secs(1));
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.changed() => return End::Shutdown,
            msg = inbound.message() => {
                let msg = match msg {
                    Ok(Some(m)) => m,
                    Ok(None) => return End::Failed("the coordinator closed the session".into()),
                    Err(status) => return redirect_or_fail(&status),
                };
                use coordinator_message::Msg;
                match msg.msg {
                    Some(Msg::Registered(r)) => {
                        tracing::info!(coordinator = %addr, stale = r.stale.len(), "registered");
                        for s in &r.stale {
                            tracing::warn!(task = %s.task_id, attempt = s.attempt, "stopping an attempt that is no longer current");
                            table.drop_stale(&s.task_id, s.attempt, "attempt no longer current");
                        }
                        if r.heartbeat_interval_ms > 0 {
                            heartbeat = tokio::time::interval(Duration::from_millis(r.heartbeat_interval_ms));
                            heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                        }
                        registered = true;
                        table.changed.notify_one();
                    }
                    Some(Msg::Assign(a)) => {
                        tracing::debug!(task = %a.task_id, attempt = a.attempt, "assigned");
                        tokio::spawn(executor::execute(cfg.work_dir.clone(), table.clone(), cfg.sandbox.clone(), a));
                    }
                    Some(Msg::Cancel(c)) => table.stop(&c.task_id, c.attempt, &format!("cancelled: {}", c.reason)),
                    Some(Msg::Ack(a)) => table.ack(&a.task_id, a.attempt),
                    Some(Msg::LogRequest(req)) => {
                        let tx = tx.clone();
                        let work_dir = cfg.work_dir.clone();
                        let finished = table.is_finished(&req.task_id, req.attempt).unwrap_or(true);
                        tokio::spawn(async move {
                            let data = executor::read_log(&work_dir, &req, finished).await;
                            let _ = tx.send(AgentMessage { msg: Some(agent_message::Msg::LogData(data)) }).await;
                        });
                    }
                    None => {}
                }
            }
            _ = heartbeat.tick() => {
                if tx.try_send(AgentMessage { msg: Some(agent_message::Msg::Heartbeat(pb::Heartbeat {})) }).is_err() {
                    tracing::debug!("outbox full; skipping a heartbeat");
                }
            }
            _ = report_wake(&table.changed, start_due.as_mut(), start_due_armed), if registered => {
                let hold = Duration::from_millis(limits::STARTED_REPORT_HOLD_MS);
                let (msgs, due) = table.take_unsent(std::time::Instant::now(), hold);
                match due {
                    Some(due) => {
                        let due = tokio::time::Instant::from_std(due);
                        if !start_due_armed || start_due.deadline() != due {
                            start_due.as_mut().reset(due);
                        }
                        start_due_armed = true;
                    }
                    None => start_due_armed = false,
                }
                for m in msgs {
                    if tx.send(AgentMessage { msg: Some(m) }).await.is_err() {
                        return End::Failed("session outbox closed".into());
                    }
                }
            }
        }
    }
}
