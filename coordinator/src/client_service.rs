//! The API for droverctl and SDKs. Reads are served by any node from its applied state; writes
//! must reach the leader, and a follower answers them with the leader's address.

use std::sync::Arc;

use drover_proto::identity::{Role, require_role};
use drover_proto::pb::client_service_server::ClientService;
use drover_proto::pb::coordinator_message::Msg as Out;
use drover_proto::pb::{self, CoordinatorMessage};
use openraft::ServerState;
use tonic::{Request, Response, Status};

use crate::command::{Command, CommandResult};
use crate::convert;
use crate::error::CoordinatorError;
use crate::limits;
use crate::model::{AgentState, Task};
use crate::node::Ctx;
use crate::state::run_seq;

pub(crate) const READERS: &[Role] = &[Role::Admin, Role::Operator, Role::Submitter, Role::Viewer];
pub(crate) const SUBMITTERS: &[Role] = &[Role::Admin, Role::Operator, Role::Submitter];
pub(crate) const OPERATORS: &[Role] = &[Role::Admin, Role::Operator];

pub struct ClientRpc {
    pub ctx: Arc<Ctx>,
}

impl ClientRpc {
    /// NOT_FOUND is answered only by a leader that has applied everything committed. A follower,
    /// or a leader just elected, may not have applied an acknowledged write yet; saying "not found"
    /// there would break read-your-writes after a failover. Followers redirect to the leader, and
    /// without one the answer is UNAVAILABLE; clients retry both.
    pub(crate) fn not_found(&self, what: String) -> Status {
        match self.ctx.require_leader() {
            Err(e) => e.into(),
            Ok(()) if !self.ctx.readiness().0 => {
                Status::unavailable("the leader is still applying committed entries; retry shortly")
            }
            Ok(()) => Status::not_found(what),
        }
    }

    fn observe<T>(&self, method: &str, r: Result<T, Status>) -> Result<Response<T>, Status> {
        self.ctx.metrics.count_rpc(
            method,
            r.as_ref().map_or_else(|s| s.code(), |_| tonic::Code::Ok),
        );
        if let Err(s) = &r {
            tracing::debug!(method, code = ?s.code(), message = s.message(), "rpc failed");
        }
        r.map(Response::new)
    }

    async fn submit(
        &self,
        req: Request<pb::SubmitRunRequest>,
    ) -> Result<pb::SubmitRunResponse, Status> {
        let who = require_role(&req, "submitting a run", SUBMITTERS)?;
        let req = req.into_inner();
        let spec = convert::run_spec_from_proto(req.spec.as_ref())?;
        if req.idempotency_key.len() > limits::IDEMPOTENCY_KEY_BYTES_MAX {
            return Err(CoordinatorError::invalid(
                "idempotency_key",
                format!(
                    "at most {idempotency_key_bytes_max} bytes",
                    idempotency_key_bytes_max = limits::IDEMPOTENCY_KEY_BYTES_MAX
                ),
            )
            .into());
        }
        self.ctx.require_leader()?;
        // A retry of a run already accepted is answered with that run, whatever the budgets.
        let key = &req.idempotency_key;
        let _admitted = self
            .ctx
            .shared
            .read(|a| {
                let known = !key.is_empty() && a.state.idempotency.contains_key(key);
                (!known).then(|| self.ctx.admission.admit(&a.state, &who.name, &spec))
            })
            .transpose()?;
        let result = self
            .ctx
            .proposer
            .propose(Command::SubmitRun {
                idempotency_key: req.idempotency_key,
                spec,
                submitted_by: who.name,
                placement: None,
            })
            .await?;
        match result {
            CommandResult::Submitted {
                run_id,
                deduplicated,
                ..
            } => Ok(pb::SubmitRunResponse {
                run_id,
                deduplicated,
            }),
            CommandResult::Rejected {
                limit: Some(limit),
                message,
            } => Err(CoordinatorError::LimitReached { limit, message }.into()),
            other => Err(Status::internal(format!(
                "unexpected submit result: {other:?}"
            ))),
        }
    }

    fn find_task(&self, run_id: &str, task: &str) -> Result<Task, Status> {
        self.ctx.shared.read(|a| {
            let run = a
                .state
                .run_by_id(run_id)
                .ok_or_else(|| self.not_found(format!("run {run_id} not found")))?;
            let tid = if task.is_empty() {
                if run.task_ids.len() != 1 {
                    let names: Vec<&str> = run
                        .task_ids
                        .iter()
                        .filter_map(|t| t.split('/').nth(1))
                        .collect();
                    return Err(Status::invalid_argument(format!(
                        "task: run {run_id} has {} tasks ({}); name one",
                        run.task_ids.len(),
                        names.join(", ")
                    )));
                }
                run.task_ids[0].clone()
            } else {
                crate::state::task_id(run_id, task)
            };
            a.state
                .tasks
                .get(&tid)
                .cloned()
                .ok_or_else(|| self.not_found(format!("task {task} not found in run {run_id}")))
        })
    }

    fn agent_proto(&self, name: &str) -> Result<pb::Agent, Status> {
        self.ctx.shared.read(|a| {
            let ag = a
                .state
                .agents
                .get(name)
                .ok_or_else(|| self.not_found(format!("agent {name} not found")))?;
            let age = if ag.state == AgentState::Lost {
                None
            } else {
                self.ctx.sessions.heard_ago_ms(&ag.name)
            };
            Ok(convert::agent_to_proto(
                ag,
                age,
                self.ctx.sessions.is_connected(&ag.name),
            ))
        })
    }

    async fn set_drain(
        &self,
        name: &str,
        draining: bool,
        deadline_ms: u64,
    ) -> Result<pb::DrainAgentResponse, Status> {
        if deadline_ms > limits::DRAIN_DEADLINE_MAX_MS {
            return Err(CoordinatorError::invalid(
                "deadline_ms",
                format!(
                    "at most {drain_deadline_max_ms} (7 days); use 0 for no deadline",
                    drain_deadline_max_ms = limits::DRAIN_DEADLINE_MAX_MS
                ),
            )
            .into());
        }
        self.ctx.require_leader()?;
        // Unknown names fail before anything is proposed.
        self.agent_proto(name)?;
        let deadline = if draining && deadline_ms > 0 {
            crate::proposer::now_ms() + deadline_ms
        } else {
            0
        };
        match self
            .ctx
            .proposer
            .propose(Command::SetDrain {
                name: name.to_owned(),
                draining,
                deadline_ms: deadline,
            })
            .await?
        {
            CommandResult::DrainSet => Ok(pb::DrainAgentResponse {
                agent: Some(self.agent_proto(name)?),
            }),
            CommandResult::Rejected { message, .. } => Err(Status::failed_precondition(message)),
            other => Err(Status::internal(format!(
                "unexpected drain result: {other:?}"
            ))),
        }
    }

    async fn logs(
        &self,
        req: Request<pb::GetTaskLogsRequest>,
    ) -> Result<pb::GetTaskLogsResponse, Status> {
        require_role(&req, "reading logs", READERS)?;
        let req = req.into_inner();
        let task = self.find_task(&req.run_id, &req.task)?;
        let stream = pb::LogStream::try_from(req.stream).unwrap_or(pb::LogStream::Stdout);
        let stream = if stream == pb::LogStream::Unspecified {
            pb::LogStream::Stdout
        } else {
            stream
        };
        let tail = |note: String| {
            let data = task
                .outcome
                .as_ref()
                .map(|o| {
                    if stream == pb::LogStream::Stderr {
                        o.stderr_tail.clone()
                    } else {
                        o.stdout_tail.clone()
                    }
                })
                .unwrap_or_default();
            pb::GetTaskLogsResponse {
                next_offset: 0,
                data,
                source: "tail".into(),
                eof: true,
                note,
            }
        };
        let Some(agent) = task.agent.clone() else {
            return Ok(tail("the task has not been placed on an agent".into()));
        };
        if !self.ctx.sessions.is_connected(&agent) {
            if let Err(e) = self.ctx.require_leader() {
                // Sessions live on the leader; send the caller there for the full log.
                if matches!(
                    e,
                    CoordinatorError::NotLeader {
                        leader_addr: Some(_)
                    }
                ) {
                    return Err(e.into());
                }
            }
            return Ok(tail(format!(
                "agent {agent} is not connected; showing the replicated tail"
            )));
        }
        let (request_id, rx) = self.ctx.log_requests.begin()?;
        let max_bytes = if req.max_bytes == 0 {
            limits::LOG_READ_BYTES_MAX
        } else {
            req.max_bytes.min(limits::LOG_READ_BYTES_MAX)
        };
        let sent = self.ctx.sessions.send(
            &agent,
            CoordinatorMessage {
                msg: Some(Out::LogRequest(pb::LogRequest {
                    request_id,
                    task_id: task.id.clone(),
                    attempt: task.attempt,
                    stream: stream as i32,
                    offset: req.offset,
                    max_bytes,
                })),
            },
        );
        if sent.is_err() {
            self.ctx.log_requests.cancel(request_id);
            return Ok(tail(format!(
                "agent {agent} is not connected; showing the replicated tail"
            )));
        }
        match tokio::time::timeout(limits::LOG_READ_WAIT, rx).await {
            Ok(Ok(data)) if data.error.is_empty() => Ok(pb::GetTaskLogsResponse {
                next_offset: data.next_offset,
                data: data.data,
                source: "agent".into(),
                eof: data.eof,
                note: String::new(),
            }),
            Ok(Ok(data)) => Ok(tail(format!(
                "agent {agent} could not read the log: {}",
                data.error
            ))),
            _ => {
                self.ctx.log_requests.cancel(request_id);
                Ok(tail(format!(
                    "agent {agent} did not answer within 5 s; showing the replicated tail"
                )))
            }
        }
    }
}

#[tonic::async_trait]
impl ClientService for ClientRpc {
    #[tracing::instrument(skip_all)]
    async fn submit_run(
        &self,
        req: Request<pb::SubmitRunRequest>,
    ) -> Result<Response<pb::SubmitRunResponse>, Status> {
        let r = self.submit(req).await;
        self.observe("ClientService/SubmitRun", r)
    }

    #[tracing::instrument(skip_all, fields(run_id = %req.get_ref().run_id))]
    async fn get_run(&self, req: Request<pb::GetRunRequest>) -> Result<Response<pb::Run>, Status> {
        let r = (|| {
            require_role(&req, "reading runs", READERS)?;
            let id = &req.get_ref().run_id;
            self.ctx.shared.read(|a| {
                a.state
                    .run_by_id(id)
                    .map(|run| convert::run_to_proto(&a.state, run))
                    .ok_or_else(|| self.not_found(format!("run {id} not found")))
            })
        })();
        self.observe("ClientService/GetRun", r)
    }

    #[tracing::instrument(skip_all)]
    async fn list_runs(
        &self,
        req: Request<pb::ListRunsRequest>,
    ) -> Result<Response<pb::ListRunsResponse>, Status> {
        let r = (|| {
            require_role(&req, "listing runs", READERS)?;
            let req = req.get_ref();
            let limit = if req.limit == 0 {
                50
            } else {
                req.limit.min(limits::LIST_RUNS_MAX)
            } as usize;
            let before = if req.before.is_empty() {
                u64::MAX
            } else {
                run_seq(&req.before).ok_or_else(|| {
                    Status::invalid_argument(format!("before: '{}' is not a run id", req.before))
                })?
            };
            let filter = RunFilter::from_request(req)?;
            Ok(self.ctx.shared.read(|a| {
                list_page(
                    a.state
                        .runs
                        .range(..before)
                        .rev()
                        .filter(|(_, run)| filter.keeps(&a.state, run))
                        .map(|(_, run)| convert::run_to_proto(&a.state, run)),
                    limit,
                    limits::LIST_RUNS_BYTES_MAX,
                )
            }))
        })();
        self.observe("ClientService/ListRuns", r)
    }

    #[tracing::instrument(skip_all, fields(run_id = %req.get_ref().run_id))]
    async fn get_task_logs(
        &self,
        req: Request<pb::GetTaskLogsRequest>,
    ) -> Result<Response<pb::GetTaskLogsResponse>, Status> {
        let r = self.logs(req).await;
        self.observe("ClientService/GetTaskLogs", r)
    }

    #[tracing::instrument(skip_all)]
    async fn list_agents(
        &self,
        req: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        let r = (|| {
            require_role(&req, "listing agents", READERS)?;
            // Liveness (sessions, heartbeat ages) lives on the leader: send readers there, and
            // answer here only while no leader is known.
            if let Err(
                e @ CoordinatorError::NotLeader {
                    leader_addr: Some(_),
                },
            ) = self.ctx.require_leader()
            {
                return Err(Status::from(e));
            }
            Ok(self.ctx.shared.read(|a| pb::ListAgentsResponse {
                agents: a
                    .state
                    .agents
                    .values()
                    .map(|ag| {
                        let age = if ag.state == AgentState::Lost {
                            None
                        } else {
                            self.ctx.sessions.heard_ago_ms(&ag.name)
                        };
                        convert::agent_to_proto(ag, age, self.ctx.sessions.is_connected(&ag.name))
                    })
                    .collect(),
            }))
        })();
        self.observe("ClientService/ListAgents", r)
    }

    #[tracing::instrument(skip_all, fields(agent = %req.get_ref().name))]
    async fn get_agent(
        &self,
        req: Request<pb::GetAgentRequest>,
    ) -> Result<Response<pb::GetAgentResponse>, Status> {
        let r = (|| {
            require_role(&req, "reading agents", READERS)?;
            if let Err(
                e @ CoordinatorError::NotLeader {
                    leader_addr: Some(_),
                },
            ) = self.ctx.require_leader()
            {
                return Err(Status::from(e));
            }
            let name = &req.get_ref().name;
            let agent = self.agent_proto(name)?;
            let tasks = self.ctx.shared.read(|a| {
                a.state
                    .agents
                    .get(name)
                    .map(|ag| {
                        ag.tasks
                            .iter()
                            .filter_map(|t| a.state.tasks.get(t))
                            .map(convert::task_to_proto)
                            .collect()
                    })
                    .unwrap_or_default()
            });
            Ok(pb::GetAgentResponse {
                agent: Some(agent),
                tasks,
            })
        })();
        self.observe("ClientService/GetAgent", r)
    }

    #[tracing::instrument(skip_all, fields(agent = %req.get_ref().name))]
    async fn drain_agent(
        &self,
        req: Request<pb::DrainAgentRequest>,
    ) -> Result<Response<pb::DrainAgentResponse>, Status> {
        let r = match require_role(&req, "draining an agent", OPERATORS) {
            Ok(_) => {
                self.set_drain(&req.get_ref().name, true, req.get_ref().deadline_ms)
                    .await
            }
            Err(e) => Err(e),
        };
        self.observe("ClientService/DrainAgent", r)
    }

    #[tracing::instrument(skip_all, fields(agent = %req.get_ref().name))]
    async fn undrain_agent(
        &self,
        req: Request<pb::UndrainAgentRequest>,
    ) -> Result<Response<pb::DrainAgentResponse>, Status> {
        let r = match require_role(&req, "undraining an agent", OPERATORS) {
            Ok(_) => self.set_drain(&req.get_ref().name, false, 0).await,
            Err(e) => Err(e),
        };
        self.observe("ClientService/UndrainAgent", r)
    }

    #[tracing::instrument(skip_all)]
    async fn cluster_status(
        &self,
        req: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        let r = (|| {
            require_role(&req, "reading cluster status", READERS)?;
            Ok(self.ctx.cluster_status())
        })();
        self.observe("ClientService/ClusterStatus", r)
    }

    #[tracing::instrument(skip_all, fields(run_id = %req.get_ref().run_id))]
    async fn cancel_run(
        &self,
        req: Request<pb::CancelRunRequest>,
    ) -> Result<Response<pb::CancelRunResponse>, Status> {
        let r = self.cancel(req).await;
        self.observe("ClientService/CancelRun", r)
    }

    type WatchRunStream = crate::run_control::WatchStream;

    #[tracing::instrument(skip_all, fields(run_id = %req.get_ref().run_id))]
    async fn watch_run(
        &self,
        req: Request<pb::GetRunRequest>,
    ) -> Result<Response<Self::WatchRunStream>, Status> {
        let r = self.watch(req);
        self.observe("ClientService/WatchRun", r)
    }

    #[tracing::instrument(skip_all)]
    async fn list_dead_letters(
        &self,
        req: Request<pb::ListDeadLettersRequest>,
    ) -> Result<Response<pb::ListDeadLettersResponse>, Status> {
        let r = self.dead_letters(req);
        self.observe("ClientService/ListDeadLetters", r)
    }

    #[tracing::instrument(skip_all, fields(id = %req.get_ref().id))]
    async fn retry_dead_letter(
        &self,
        req: Request<pb::DeadLetterRequest>,
    ) -> Result<Response<pb::DeadLetterResponse>, Status> {
        let r = self.dead_letter_action(req, true).await;
        self.observe("ClientService/RetryDeadLetter", r)
    }

    #[tracing::instrument(skip_all, fields(id = %req.get_ref().id))]
    async fn drop_dead_letter(
        &self,
        req: Request<pb::DeadLetterRequest>,
    ) -> Result<Response<pb::DeadLetterResponse>, Status> {
        let r = self.dead_letter_action(req, false).await;
        self.observe("ClientService/DropDeadLetter", r)
    }

    #[tracing::instrument(skip_all)]
    async fn set_queue(
        &self,
        req: Request<pb::SetQueueRequest>,
    ) -> Result<Response<pb::Queue>, Status> {
        let r = ClientRpc::set_queue(self, req).await;
        self.observe("ClientService/SetQueue", r)
    }

    #[tracing::instrument(skip_all, fields(queue = %req.get_ref().name))]
    async fn get_queue(
        &self,
        req: Request<pb::GetQueueRequest>,
    ) -> Result<Response<pb::Queue>, Status> {
        let r = ClientRpc::get_queue(self, req);
        self.observe("ClientService/GetQueue", r)
    }

    #[tracing::instrument(skip_all)]
    async fn list_queues(
        &self,
        req: Request<pb::ListQueuesRequest>,
    ) -> Result<Response<pb::ListQueuesResponse>, Status> {
        let r = ClientRpc::list_queues(self, req);
        self.observe("ClientService/ListQueues", r)
    }

    #[tracing::instrument(skip_all)]
    async fn apply_pools(
        &self,
        req: Request<pb::ApplyPoolsRequest>,
    ) -> Result<Response<pb::ListPoolsResponse>, Status> {
        let r = self.apply_pools_rpc(req).await;
        self.observe("ClientService/ApplyPools", r)
    }

    #[tracing::instrument(skip_all)]
    async fn list_pools(
        &self,
        req: Request<pb::ListPoolsRequest>,
    ) -> Result<Response<pb::ListPoolsResponse>, Status> {
        let r = self.list_pools_rpc(req);
        self.observe("ClientService/ListPools", r)
    }

    #[tracing::instrument(skip_all, fields(pool = %req.get_ref().name))]
    async fn get_pool(
        &self,
        req: Request<pb::GetPoolRequest>,
    ) -> Result<Response<pb::PoolStatus>, Status> {
        let r = self.get_pool_rpc(req);
        self.observe("ClientService/GetPool", r)
    }
}

/// What `ListRuns` keeps, from the request's filters.
struct RunFilter<'a> {
    state: Option<crate::model::RunState>,
    queue: &'a str,
    name: &'a str,
    prefix: bool,
    since_us: u64,
}

impl<'a> RunFilter<'a> {
    fn from_request(req: &'a pb::ListRunsRequest) -> Result<Self, Status> {
        use crate::model::RunState;
        let state = match req.state.as_str() {
            "" => None,
            "pending" => Some(RunState::Pending),
            "running" => Some(RunState::Running),
            "succeeded" => Some(RunState::Succeeded),
            "failed" => Some(RunState::Failed),
            "cancelled" => Some(RunState::Cancelled),
            other => {
                return Err(CoordinatorError::invalid(
                    "state",
                    format!("'{other}' is not pending, running, succeeded, failed or cancelled"),
                )
                .into());
            }
        };
        let (name, prefix) = match req.name.strip_suffix('*') {
            Some(p) => (p, true),
            None => (req.name.as_str(), false),
        };
        Ok(Self {
            state,
            queue: &req.queue,
            name,
            prefix,
            since_us: req.since_ms.saturating_mul(1000),
        })
    }

    fn keeps(&self, s: &crate::state::State, run: &crate::model::Run) -> bool {
        if run.created_at_us < self.since_us {
            return false;
        }
        if !self.name.is_empty() {
            let hit = if self.prefix {
                run.name.starts_with(self.name)
            } else {
                run.name == self.name
            };
            if !hit {
                return false;
            }
        }
        if !self.queue.is_empty()
            && !run
                .task_ids
                .iter()
                .any(|t| s.tasks.get(t).is_some_and(|t| t.spec.queue == self.queue))
        {
            return false;
        }
        self.state.is_none_or(|want| s.run_state(run) == want)
    }
}

/// Member health as the leader sees it from replication progress.
pub fn member_health(
    node_id: u64,
    me: u64,
    state: ServerState,
    leader: Option<u64>,
    matched: Option<Option<u64>>,
    last_log: u64,
) -> &'static str {
    if Some(node_id) == leader {
        return "leader";
    }
    if state != ServerState::Leader {
        return if node_id == me { "follower" } else { "unknown" };
    }
    match matched {
        Some(Some(i)) if last_log.saturating_sub(i) <= 100 => "follower",
        Some(Some(_)) => "lagging",
        _ => "unreachable",
    }
}

/// One page of runs, newest first: at most `limit` runs and, past the first, at most `bytes_max`
/// bytes encoded, so a page of large runs (a thousand tasks with output tails each) stays well
/// inside the gRPC message limit. `next_before` says where the next page starts.
pub fn list_page(
    runs: impl Iterator<Item = pb::Run>,
    limit: usize,
    bytes_max: usize,
) -> pb::ListRunsResponse {
    use prost::Message;
    let mut page = pb::ListRunsResponse::default();
    let mut bytes = 0;
    let mut runs = runs.peekable();
    while let Some(run) = runs.peek() {
        let size = run.encoded_len();
        if page.runs.len() == limit || (!page.runs.is_empty() && bytes + size > bytes_max) {
            break;
        }
        bytes += size;
        page.runs.extend(runs.next());
    }
    if runs.peek().is_some()
        && let Some(last) = page.runs.last()
    {
        page.next_before = last.id.clone();
    }
    page
}

#[cfg(test)]
mod page_tests {
    use super::*;

    fn run(i: u32, tail: usize) -> pb::Run {
        pb::Run {
            id: format!("run-{i}"),
            name: "x".repeat(tail),
            ..Default::default()
        }
    }

    #[test]
    fn pages_stop_at_the_limit_or_the_byte_budget_and_say_where_to_go_on() {
        let runs = || (1..=10).rev().map(|i| run(i, 1_000));
        let p = list_page(runs(), 3, usize::MAX);
        assert_eq!(p.runs.len(), 3);
        assert_eq!(p.next_before, "run-8");
        let p = list_page(runs(), 100, 2_500);
        assert_eq!(p.runs.len(), 2, "two runs of ~1 KB fit in 2.5 KB");
        assert_eq!(p.next_before, "run-9");
        // The whole rest fits: no next page.
        let p = list_page(runs(), 100, usize::MAX);
        assert_eq!(p.runs.len(), 10);
        assert!(p.next_before.is_empty());
        // A run larger than the budget still comes, alone, so paging always moves on.
        let p = list_page(runs(), 100, 10);
        assert_eq!(p.runs.len(), 1);
        assert_eq!(p.next_before, "run-10");
    }
}
