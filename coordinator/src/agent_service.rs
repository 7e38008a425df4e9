//! Agent sessions: one bidirectional stream per agent, to the leader. Registration is committed;
//! heartbeats only refresh the lease in memory; task reports are proposed in batches with
//! everyone else's and acknowledged once committed, so the agent can forget them.

use std::pin::Pin;
use std::sync::Arc;

use crate::sessions::{SessionEnd, SessionOut};
use drover_proto::identity::{Role, require_role};
use drover_proto::pb::agent_message::Msg as In;
use drover_proto::pb::agent_service_server::AgentService;
use drover_proto::pb::coordinator_message::Msg as Out;
use drover_proto::pb::{self, AgentMessage, CoordinatorMessage};
use openraft::async_runtime::WatchReceiver;
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::command::{Command, CommandResult};
use crate::convert;
use crate::error::CoordinatorError;
use crate::limits;
use crate::metrics::KindLabels;
use crate::model::HeldTask;
use crate::node::Ctx;

pub struct AgentRpc {
    pub ctx: Arc<Ctx>,
}

fn valid_agent_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// Bounds on what a registration may carry: it is replicated into every node's memory and
/// snapshot, so an agent cannot be allowed to send megabytes of labels.
const REGISTER_LABEL_VALUE_BYTES_MAX: usize = 256;
const REGISTER_TEXT_BYTES_MAX: usize = 128;
const REGISTER_EXTENDED_MAX: usize = 32;

/// Checks a registration before anything is written. The name must be the certificate's: one
/// agent's certificate must not let its holder take another agent's assignments (and their
/// environment), report its results or requeue its work.
pub fn check_register(reg: &pb::Register, cert_name: &str) -> Result<(), Status> {
    if !valid_agent_name(&reg.name) {
        return Err(Status::invalid_argument(format!(
            "register.name: '{}' must be 1-253 characters of A-Z, a-z, 0-9, '-', '_', '.'",
            reg.name
        )));
    }
    if reg.name != cert_name {
        return Err(Status::permission_denied(format!(
            "certificate '{cert_name}' may register only as agent '{cert_name}', not '{}'; give \
             each agent a certificate of its own: droverctl certs issue --role agent --name {}",
            reg.name, reg.name
        )));
    }
    let too_long = |field: &str, len: usize, max: usize| {
        Status::invalid_argument(format!("{field}: {len} bytes; at most {max} allowed"))
    };
    if reg.labels.len() > limits::LABELS_MAX {
        return Err(Status::invalid_argument(format!(
            "register.labels: {} entries; at most {} allowed",
            reg.labels.len(),
            limits::LABELS_MAX
        )));
    }
    for (k, v) in &reg.labels {
        if k.is_empty() || k.len() > limits::NAME_BYTES_MAX {
            return Err(Status::invalid_argument(format!(
                "register.labels: key '{k}' must be 1-{} bytes",
                limits::NAME_BYTES_MAX
            )));
        }
        if v.len() > REGISTER_LABEL_VALUE_BYTES_MAX {
            return Err(too_long(
                &format!("register.labels.{k}"),
                v.len(),
                REGISTER_LABEL_VALUE_BYTES_MAX,
            ));
        }
    }
    for (field, text) in [
        ("register.class", &reg.class),
        ("register.pool", &reg.pool),
        ("register.version", &reg.version),
        ("register.isolation", &reg.isolation),
    ] {
        if text.len() > REGISTER_TEXT_BYTES_MAX {
            return Err(too_long(field, text.len(), REGISTER_TEXT_BYTES_MAX));
        }
    }
    if reg.running.len() > limits::AGENT_TASKS_MAX {
        return Err(Status::invalid_argument(format!(
            "register.running: {} tasks; an agent holds at most {}",
            reg.running.len(),
            limits::AGENT_TASKS_MAX
        )));
    }
    if let Some(r) = &reg.resources {
        if r.extended.len() > REGISTER_EXTENDED_MAX {
            return Err(Status::invalid_argument(format!(
                "register.resources.extended: {} entries; at most {REGISTER_EXTENDED_MAX} allowed",
                r.extended.len()
            )));
        }
        if let Some(k) = r.extended.keys().find(|k| k.len() > limits::NAME_BYTES_MAX) {
            return Err(too_long(
                "register.resources.extended key",
                k.len(),
                limits::NAME_BYTES_MAX,
            ));
        }
    }
    Ok(())
}

type SessionStream = Pin<Box<dyn Stream<Item = Result<CoordinatorMessage, Status>> + Send>>;

#[tonic::async_trait]
impl AgentService for AgentRpc {
    type SessionStream = SessionStream;

    #[tracing::instrument(skip_all, fields(agent))]
    async fn session(
        &self,
        req: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<SessionStream>, Status> {
        let result = self.open_session(req).await;
        self.ctx.metrics.count_rpc(
            "AgentService/Session",
            result
                .as_ref()
                .map_or_else(|s| s.code(), |_| tonic::Code::Ok),
        );
        result
    }
}

impl AgentRpc {
    async fn open_session(
        &self,
        req: Request<Streaming<AgentMessage>>,
    ) -> Result<Response<SessionStream>, Status> {
        let cert = require_role(&req, "an agent session", &[Role::Agent])?;
        self.ctx.require_leader_in_contact()?;
        let mut inbound = req.into_inner();
        let first = tokio::time::timeout(limits::REGISTER_WAIT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no register message within 10 s"))??;
        let Some(AgentMessage {
            msg: Some(In::Register(reg)),
        }) = first
        else {
            return Err(Status::invalid_argument(
                "the first message of a session must be register",
            ));
        };
        check_register(&reg, &cert.name)?;
        let name = reg.name.clone();
        tracing::Span::current().record("agent", name.as_str());
        let held: Vec<HeldTask> = reg
            .running
            .iter()
            .map(|r| HeldTask {
                task_id: r.task_id.clone(),
                attempt: r.attempt,
            })
            .collect();
        // The lease starts now, and holds until the registration is answered, so no round can
        // judge the agent while its registration waits in a long queue of them.
        self.ctx.sessions.touch(&name);
        let registering = self.ctx.sessions.registering(&name);
        let cmd = Command::RegisterAgent {
            name: name.clone(),
            labels: reg.labels.into_iter().collect(),
            total: convert::resources_from_proto(reg.resources.as_ref()),
            class: if reg.class.is_empty() {
                crate::scheduler::DEFAULT_CLASS.into()
            } else {
                reg.class
            },
            version: reg.version,
            held,
            pool: if reg.pool.is_empty() {
                "default".into()
            } else {
                reg.pool
            },
            isolation: reg.isolation,
            instance_id: convert::clip_text(reg.instance_id, limits::NAME_BYTES_MAX * 4),
        };
        // A reconnect that changes nothing (the common case after a leader failover) is answered
        // from applied state, so a fleet reconnecting at once does not become a storm of writes.
        // Only once this leader has applied an entry of its own term: before that, its applied
        // state may lack assignments its predecessor committed, and the answer would not re-send
        // them (the agent would never hear of them).
        let term = self.ctx.raft.metrics().borrow_watched().current_term;
        let unchanged = self.ctx.shared.read(|a| {
            a.last_applied
                .is_some_and(|l| l.leader_id.term == term)
                .then(|| a.state.unchanged_registration(&cmd))
                .flatten()
        });
        let result = match unchanged {
            Some(r) => r,
            None => self.ctx.proposer.propose(cmd).await?,
        };
        let CommandResult::Registered {
            stale,
            resend,
            requeued,
        } = result
        else {
            return Err(Status::internal(format!(
                "unexpected register result: {result:?}"
            )));
        };
        let (tx, rx) = mpsc::channel(limits::SESSION_OUTBOX_MAX);
        let (session_id, end) = self.ctx.sessions.open(&name, tx.clone())?;
        drop(registering);
        tracing::info!(agent = %name, stale = stale.len(), resend = resend.len(), requeued = requeued.len(), "agent registered");
        let registered = CoordinatorMessage {
            msg: Some(Out::Registered(pb::Registered {
                heartbeat_interval_ms: self.ctx.timing.heartbeat_interval.as_millis() as u64,
                lease_ttl_ms: self.ctx.timing.lease_ttl.as_millis() as u64,
                stale: stale
                    .into_iter()
                    .map(|h| pb::RunningTask {
                        task_id: h.task_id,
                        attempt: h.attempt,
                    })
                    .collect(),
            })),
        };
        let _ = tx.try_send(Ok(registered));
        let resend: Vec<crate::model::Assignment> = self.ctx.shared.read(|a| {
            resend
                .iter()
                .filter_map(|t| a.state.tasks.get(t))
                .map(|t| crate::model::Assignment {
                    task_id: t.id.clone(),
                    attempt: t.attempt,
                    agent: name.clone(),
                })
                .collect()
        });
        crate::leader::dispatch(&self.ctx.shared, &self.ctx.sessions, &resend);

        let ctx = self.ctx.clone();
        let ending = end.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = read_session(ctx.clone(), name.clone(), inbound, tx, &ending) => {}
                _ = ending.ended() => {}
            }
            ctx.sessions.close(&name, session_id);
            tracing::info!(agent = %name, "agent session ended");
        });
        Ok(Response::new(Box::pin(SessionOut::new(rx, end))))
    }
}

/// Proposes a task report, again and again while its session lasts and the failure may pass (a
/// full proposal queue, a commit not confirmed in time, a lease not regained): the agent sends a
/// report once per session, so giving up here would leave the task running or placed, as far as
/// the cluster knows, until the agent next registered. Reports are idempotent (the attempt
/// fences them), so proposing one whose outcome was unknown is harmless. A leader that steps
/// down closes its sessions, which ends this.
async fn propose_report(
    ctx: &Ctx,
    cmd: Command,
    session: &mpsc::Sender<Result<CoordinatorMessage, Status>>,
) -> Result<CommandResult, CoordinatorError> {
    let mut pause = REPORT_RETRY_PAUSE_MIN;
    loop {
        match ctx.proposer.propose(cmd.clone()).await {
            Err(e) if e.may_pass() && !session.is_closed() => {
                tracing::debug!(error = %e, "task report not committed; proposing it again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(REPORT_RETRY_PAUSE_MAX);
            }
            result => return result,
        }
    }
}

const REPORT_RETRY_PAUSE_MIN: std::time::Duration = std::time::Duration::from_millis(50);
const REPORT_RETRY_PAUSE_MAX: std::time::Duration = std::time::Duration::from_secs(1);

async fn read_session(
    ctx: Arc<Ctx>,
    name: String,
    mut inbound: Streaming<AgentMessage>,
    tx: mpsc::Sender<Result<CoordinatorMessage, Status>>,
    end: &SessionEnd,
) {
    let reports = Arc::new(Semaphore::new(limits::REPORTS_IN_FLIGHT_PER_SESSION));
    loop {
        let msg = match inbound.message().await {
            Ok(Some(m)) => m,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(agent = %name, error = %e, "session stream error");
                return;
            }
        };
        ctx.sessions.touch(&name);
        let reported = match &msg.msg {
            Some(In::Started(s)) => Some(s.task_id.len()),
            Some(In::Finished(f)) => Some(f.task_id.len()),
            _ => None,
        };
        if let Some(len) = reported.filter(|l| *l > limits::TASK_ID_BYTES_MAX) {
            end.end(Status::invalid_argument(format!(
                "task_id: {len} bytes; task ids are at most {}",
                limits::TASK_ID_BYTES_MAX
            )));
            return;
        }
        let cmd = match msg.msg {
            Some(In::Heartbeat(_)) | None => continue,
            Some(In::Register(_)) => {
                end.end(Status::invalid_argument(
                    "register may only be sent once per session",
                ));
                return;
            }
            Some(In::LogData(data)) => {
                ctx.log_requests.complete(data);
                continue;
            }
            Some(In::Started(s)) => Command::TaskStarted {
                agent: name.clone(),
                task_id: s.task_id,
                attempt: s.attempt,
                started_at_us: s.started_at_us,
            },
            Some(In::Finished(f)) => Command::TaskFinished {
                agent: name.clone(),
                task_id: f.task_id,
                attempt: f.attempt,
                outcome: convert::outcome_from_proto(f.outcome),
                started_at_us: f.started_at_us,
            },
        };
        ctx.metrics
            .agent_reports
            .get_or_create(&KindLabels { kind: cmd.kind() })
            .inc();
        let Ok(permit) = reports.clone().acquire_owned().await else {
            return;
        };
        let ctx = ctx.clone();
        let tx = tx.clone();
        let span = tracing::debug_span!("agent_report", kind = cmd.kind());
        tokio::spawn(
            async move {
                let ack = match &cmd {
                    Command::TaskFinished {
                        task_id, attempt, ..
                    } => Some((task_id.clone(), *attempt)),
                    _ => None,
                };
                match propose_report(&ctx, cmd, &tx).await {
                    Ok(CommandResult::Reported) => {}
                    Ok(CommandResult::StaleReport { current_attempt }) => {
                        tracing::info!(?ack, current_attempt, "stale report rejected");
                    }
                    Ok(other) => tracing::warn!(?other, "unexpected result for a task report"),
                    Err(e) => {
                        // Not committed and the session is over: no ack, so the agent keeps the
                        // report and sends it again on its next session.
                        tracing::debug!(error = %e, "task report not committed");
                        drop(permit);
                        return;
                    }
                }
                if let Some((task_id, attempt)) = ack {
                    let _ = tx.try_send(Ok(CoordinatorMessage {
                        msg: Some(Out::Ack(pb::Ack { task_id, attempt })),
                    }));
                }
                drop(permit);
            }
            .instrument(span),
        );
    }
}
