//! The client API for what happens to runs after submission: cancel, watch, dead letters and
//! queue limits. Writes go through Raft on the leader; reads come from this node's applied state.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use drover_proto::identity::{Role, require_role};
use drover_proto::pb;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Status};

use crate::client_service::{ClientRpc, OPERATORS, READERS, SUBMITTERS};
use crate::command::{Command, CommandResult};
use crate::convert;
use crate::error::CoordinatorError;
use crate::limits;

/// How often a watch looks at its run. Applies are batched every few milliseconds; a person
/// watching, or a script waiting, needs no finer grain.
const WATCH_EVERY: Duration = Duration::from_millis(200);

/// Watch streams open in this process (all nodes it hosts); past `WATCHES_MAX`, refused.
static WATCHES: AtomicUsize = AtomicUsize::new(0);

struct WatchSlot;

impl Drop for WatchSlot {
    fn drop(&mut self) {
        WATCHES.fetch_sub(1, Ordering::Relaxed);
    }
}

pub type WatchStream = ReceiverStream<Result<pb::Run, Status>>;

/// A submitter acts only on its own runs; operators and admins on any.
fn check_owner(
    who: &drover_proto::identity::PeerIdentity,
    owner: &str,
    what: &str,
) -> Result<(), Status> {
    if who.role == Role::Submitter && who.name != owner {
        return Err(Status::permission_denied(format!(
            "{what} was submitted by '{owner}'; certificate '{}' (role submitter) may act only on \
             its own runs (an operator or admin may act on any)",
            who.name
        )));
    }
    Ok(())
}

impl ClientRpc {
    /// The answer a write's result gives the client.
    fn answer(&self, r: CommandResult) -> Result<CommandResult, Status> {
        match r {
            CommandResult::NotFound { message } => Err(self.not_found(message)),
            CommandResult::Rejected {
                limit: Some(limit),
                message,
            } => Err(CoordinatorError::LimitReached { limit, message }.into()),
            CommandResult::Rejected {
                limit: None,
                message,
            } => Err(Status::failed_precondition(message)),
            other => Ok(other),
        }
    }

    pub(crate) async fn cancel(
        &self,
        req: Request<pb::CancelRunRequest>,
    ) -> Result<pb::CancelRunResponse, Status> {
        let who = require_role(&req, "cancelling a run", SUBMITTERS)?;
        let req = req.into_inner();
        if req.run_id.is_empty() {
            return Err(CoordinatorError::invalid("run_id", "missing").into());
        }
        let reason = if req.reason.is_empty() {
            format!("by {}", who.name)
        } else {
            convert::clip_text(format!("{} (by {})", req.reason, who.name), 512)
        };
        self.ctx.require_leader()?;
        if let Some(owner) = self.ctx.shared.read(|a| {
            a.state
                .run_by_id(&req.run_id)
                .map(|r| r.submitted_by.clone())
        }) {
            check_owner(&who, &owner, &format!("run {}", req.run_id))?;
        }
        let r = self
            .ctx
            .proposer
            .propose(Command::CancelRun {
                run_id: req.run_id,
                step: req.step,
                reason,
            })
            .await?;
        match self.answer(r)? {
            CommandResult::Cancelled { tasks } => {
                // The leader's loop stops them on their agents (`State::stopping`).
                Ok(pb::CancelRunResponse { tasks })
            }
            other => Err(Status::internal(format!("unexpected result: {other:?}"))),
        }
    }

    pub(crate) fn watch(&self, req: Request<pb::GetRunRequest>) -> Result<WatchStream, Status> {
        require_role(&req, "watching runs", READERS)?;
        let id = req.into_inner().run_id;
        // The run must exist (here, or on the leader) before a stream opens.
        self.ctx.shared.read(|a| {
            a.state
                .run_by_id(&id)
                .map(|_| ())
                .ok_or_else(|| self.not_found(format!("run {id} not found")))
        })?;
        if WATCHES.fetch_add(1, Ordering::Relaxed) >= limits::WATCHES_MAX {
            WATCHES.fetch_sub(1, Ordering::Relaxed);
            return Err(CoordinatorError::LimitReached {
                limit: "watches_max".into(),
                message: format!(
                    "{} watches are open; watches_max is {}",
                    limits::WATCHES_MAX,
                    limits::WATCHES_MAX
                ),
            }
            .into());
        }
        let slot = WatchSlot;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let shared = self.ctx.shared.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let mut last: Vec<u8> = Vec::new();
            loop {
                let now = shared.read(|a| {
                    a.state
                        .run_by_id(&id)
                        .map(|run| convert::run_to_proto(&a.state, run))
                });
                let Some(run) = now else {
                    let _ = tx
                        .send(Err(Status::not_found(format!(
                            "run {id} is no longer kept"
                        ))))
                        .await;
                    return;
                };
                let bytes = prost::Message::encode_to_vec(&run);
                let finished = run.finished_at_ms != 0;
                if bytes != last {
                    if tx.send(Ok(run)).await.is_err() {
                        return;
                    }
                    last = bytes;
                }
                if finished {
                    return;
                }
                tokio::select! {
                    _ = tokio::time::sleep(WATCH_EVERY) => {}
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(ReceiverStream::new(rx))
    }

    pub(crate) fn dead_letters(
        &self,
        req: Request<pb::ListDeadLettersRequest>,
    ) -> Result<pb::ListDeadLettersResponse, Status> {
        require_role(&req, "listing dead letters", READERS)?;
        let req = req.into_inner();
        let limit = if req.limit == 0 {
            100
        } else {
            req.limit.min(1_000)
        } as usize;
        let before = if req.before.is_empty() {
            u64::MAX
        } else {
            convert::dead_letter_id(&req.before)?
        };
        Ok(self.ctx.shared.read(|a| {
            let s = &a.state;
            let mut matching = s
                .dead_letters
                .range(..before)
                .rev()
                .map(|(_, d)| d)
                .filter(|d| req.queue.is_empty() || d.queue == req.queue)
                .filter(|d| req.run_id.is_empty() || d.run_id == req.run_id)
                .peekable();
            let mut letters = Vec::new();
            while letters.len() < limit
                && let Some(d) = matching.next()
            {
                letters.push(convert::dead_letter_to_proto(d));
            }
            let next_before = match (matching.peek(), letters.last()) {
                (Some(_), Some(last)) => last.id.clone(),
                _ => String::new(),
            };
            pb::ListDeadLettersResponse {
                letters,
                next_before,
                total: s.dead_letters.len() as u64,
            }
        }))
    }

    pub(crate) async fn dead_letter_action(
        &self,
        req: Request<pb::DeadLetterRequest>,
        retry: bool,
    ) -> Result<pb::DeadLetterResponse, Status> {
        let what = if retry {
            "retrying a dead letter"
        } else {
            "dropping a dead letter"
        };
        let who = require_role(&req, what, SUBMITTERS)?;
        let id = convert::dead_letter_id(&req.get_ref().id)?;
        self.ctx.require_leader()?;
        if let Some((run_id, owner)) = self.ctx.shared.read(|a| {
            let s = &a.state;
            let d = s.dead_letters.get(&id)?;
            let run = s.run_by_id(&d.run_id)?;
            Some((run.id.clone(), run.submitted_by.clone()))
        }) {
            check_owner(&who, &owner, &format!("run {run_id}"))?;
        }
        let cmd = if retry {
            Command::RetryDeadLetter { id }
        } else {
            Command::DropDeadLetter { id }
        };
        let r = self.ctx.proposer.propose(cmd).await?;
        match self.answer(r)? {
            CommandResult::Retried { tasks } => Ok(pb::DeadLetterResponse {
                task_id: tasks.into_iter().next().unwrap_or_default(),
            }),
            CommandResult::Done => Ok(pb::DeadLetterResponse::default()),
            other => Err(Status::internal(format!("unexpected result: {other:?}"))),
        }
    }

    pub(crate) async fn set_queue(
        &self,
        req: Request<pb::SetQueueRequest>,
    ) -> Result<pb::Queue, Status> {
        require_role(&req, "setting queue limits", OPERATORS)?;
        let q = req
            .into_inner()
            .queue
            .ok_or_else(|| CoordinatorError::invalid("queue", "missing"))?;
        let config = convert::queue_config_from_proto(&q)?;
        self.ctx.require_leader()?;
        let r = self
            .ctx
            .proposer
            .propose(Command::SetQueue {
                name: q.name.clone(),
                config,
            })
            .await?;
        self.answer(r)?;
        Ok(self
            .ctx
            .shared
            .read(|a| convert::queue_to_proto(&a.state, &q.name)))
    }

    /// Any queue name answers: one never configured has no limits.
    pub(crate) fn get_queue(&self, req: Request<pb::GetQueueRequest>) -> Result<pb::Queue, Status> {
        require_role(&req, "reading queues", READERS)?;
        let name = &req.get_ref().name;
        if name.is_empty() {
            return Err(CoordinatorError::invalid("name", "missing").into());
        }
        Ok(self
            .ctx
            .shared
            .read(|a| convert::queue_to_proto(&a.state, name)))
    }

    /// Queues with limits, and queues holding tasks now.
    pub(crate) fn list_queues(
        &self,
        req: Request<pb::ListQueuesRequest>,
    ) -> Result<pb::ListQueuesResponse, Status> {
        require_role(&req, "listing queues", READERS)?;
        Ok(self.ctx.shared.read(|a| {
            let s = &a.state;
            let mut names: std::collections::BTreeSet<&str> =
                s.queues.keys().map(String::as_str).collect();
            names.extend(s.pending_by_queue.keys().map(String::as_str));
            names.extend(s.active_by_queue.keys().map(String::as_str));
            pb::ListQueuesResponse {
                queues: names
                    .into_iter()
                    .map(|n| convert::queue_to_proto(s, n))
                    .collect(),
            }
        }))
    }
}
