//! The leader's loop: keeps leases, runs scheduling rounds, and hands committed assignments to
//! agent sessions. Every node runs it; it acts only while its node leads. Timers are absolute
//! deadlines checked each tick, so a failover neither loses nor doubles them.

use std::sync::Arc;
use std::time::Duration;

use drover_proto::pb::{self, coordinator_message::Msg};
use openraft::ServerState;
use openraft::async_runtime::WatchReceiver;
use tonic::Status;
use tracing::Instrument;

use crate::command::{Command, CommandResult};
use crate::convert;
use crate::model::{AgentState, Assignment, HeldTask, TaskState};
use crate::node::Ctx;
use crate::raft::state_machine::Shared;
use crate::sessions::Sessions;

/// How often the loop wakes when nothing else wakes it.
const TICK: Duration = Duration::from_millis(100);

pub async fn run(ctx: Arc<Ctx>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let mut metrics_rx = ctx.raft.metrics();
    let mut led_term: Option<u64> = None;
    // Lease and drain checks walk every agent; under load the loop wakes on every apply, so they
    // run at most once per tick.
    let mut last_housekeeping = tokio::time::Instant::now() - TICK;
    let mut took_office = tokio::time::Instant::now();
    let mut retention = Retention::default();
    let mut stops = Stops::default();
    let mut autoscaler = crate::autoscaler::Autoscaler::default();
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = ctx.shared.applied.notified() => {}
            r = metrics_rx.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(TICK) => {}
        }
        let m = metrics_rx.borrow_and_update().clone();
        let leading = m.state == ServerState::Leader && m.current_leader == Some(ctx.node_id);
        if !leading {
            if led_term.take().is_some() {
                close_agent_sessions(&ctx, m.current_term, "stepped down");
            }
            continue;
        }
        // Cut off from a quorum (partitioned, or the others frozen), this node still believes it
        // leads, but nothing it proposes commits, and a leader elected on the other side grants
        // the agents one lease before declaring them lost. Ending the sessions well within that
        // lease sends the agents looking for the new leader; while cut off it refuses new ones.
        if let Some(silent) = ctx.quorum_silence(&m) {
            if led_term.take().is_some() {
                close_agent_sessions(
                    &ctx,
                    m.current_term,
                    &format!("no quorum has answered for {} ms", silent.as_millis()),
                );
            }
            continue;
        }
        if led_term != Some(m.current_term) {
            retention = Retention::default();
            autoscaler = crate::autoscaler::Autoscaler::default();
            if led_term.is_some() {
                // Deposed and elected again between two looks at the metrics, so the step-down
                // above never ran. Assignments committed around the flap may never have reached
                // their agents, and only a registration resends those: seen as 641 tasks
                // assigned and never run, for good, after a leader flap in a 1.5M-task run.
                // Closing the sessions makes every agent register again.
                close_agent_sessions(&ctx, m.current_term, "deposed and elected again");
            }
            led_term = Some(m.current_term);
            took_office = tokio::time::Instant::now();
            tracing::info!(
                term = m.current_term,
                "became leader; granting every agent a full lease"
            );
            let names: Vec<String> = ctx.shared.read(|a| {
                a.state
                    .agents
                    .values()
                    .filter(|a| a.state != AgentState::Lost)
                    .map(|a| a.name.clone())
                    .collect()
            });
            ctx.sessions.grant_leases(names.iter().map(String::as_str));
        }
        if last_housekeeping.elapsed() >= TICK {
            last_housekeeping = tokio::time::Instant::now();
            expire_leases(&ctx, took_office).await;
            enforce_drain_deadlines(&ctx).await;
            sweep_stranded(&ctx).await;
            retention.sweep(&ctx).await;
            fire_retries(&ctx).await;
            stops.send(&ctx);
            stops.overdue(&ctx).await;
            autoscaler.tick(&ctx).await;
        }
        schedule_round(&ctx, m.current_term).await;
    }
}

/// Ends every agent session, so each agent registers again with whoever leads now.
fn close_agent_sessions(ctx: &Ctx, term: u64, why: &str) {
    tracing::info!(term, "{why}; closing agent sessions");
    let status: Status = ctx.not_leader_error().into();
    ctx.sessions.close_all(&status);
}

/// How many leases a reconnect storm may hold off judgement of agents not yet heard from: a
/// backstop, as the storm ends on its own once a lease passes without a newcomer.
const STORM_GRACE_LEASES: u32 = 12;

async fn expire_leases(ctx: &Ctx, took_office: tokio::time::Instant) {
    let ttl = ctx.timing.lease_ttl;
    let ttl_ms = ttl.as_millis() as u64;
    // After a failover every agent reconnects at once. While agents keep arriving (one heard from
    // for the first time within the last lease) and for at most STORM_GRACE_LEASES leases, agents
    // this leader has not heard from yet are still queueing to reconnect, not dead: don't judge
    // them. Agents it has heard from and then lost are judged normally. On a slow host 10,000
    // agents took longer than the former six leases to reconnect, and hundreds were declared lost.
    let in_office = took_office.elapsed();
    let storm = in_office < ttl * STORM_GRACE_LEASES
        && (in_office < ttl
            || ctx
                .sessions
                .last_first_contact()
                .is_some_and(|t| t.elapsed() < ttl));
    let expired: Vec<String> = ctx.shared.read(|a| {
        let live = a
            .state
            .agents
            .values()
            .filter(|a| a.state != AgentState::Lost)
            .map(|a| a.name.as_str());
        ctx.sessions.overdue(live, ttl, storm)
    });
    // Lost in state but still connected (a registration answered from state raced the loss):
    // end the session so the agent registers again, this time with a write.
    let lost_but_connected: Vec<String> = ctx.shared.read(|a| {
        a.state
            .agents
            .values()
            .filter(|a| a.state == AgentState::Lost && ctx.sessions.is_connected(&a.name))
            .map(|a| a.name.clone())
            .collect()
    });
    for name in lost_but_connected {
        ctx.sessions.close_with(
            &name,
            Status::unavailable("this agent was declared lost; register again"),
        );
    }
    for name in expired {
        tracing::warn!(agent = %name, ttl_ms, "agent lease expired; declaring it lost");
        let result = ctx
            .proposer
            .propose(Command::AgentLost {
                name: name.clone(),
                reason: format!("no heartbeat for {ttl_ms} ms"),
            })
            .await;
        match result {
            Ok(CommandResult::AgentLost { requeued }) => {
                ctx.sessions.forget_lease(&name);
                tracing::info!(agent = %name, requeued = requeued.len(), "agent lost");
            }
            Ok(other) => tracing::warn!(?other, "unexpected result for agent_lost"),
            Err(e) => tracing::warn!(error = %e, "could not commit agent loss"),
        }
    }
}

/// A draining agent whose deadline has passed: its remaining tasks are re-queued as new attempts
/// (committed first), then stopped on the agent. The stopped attempts' reports arrive stale and are
/// refused, so nothing runs twice as the same attempt.
async fn enforce_drain_deadlines(ctx: &Ctx) {
    let now = crate::proposer::now_ms();
    let due: Vec<(String, Vec<HeldTask>)> = ctx.shared.read(|a| {
        a.state
            .agents
            .values()
            .filter(|ag| {
                ag.state == AgentState::Draining
                    && ag.drain_deadline_ms != 0
                    && now >= ag.drain_deadline_ms
            })
            .filter(|ag| !ag.tasks.is_empty())
            .map(|ag| {
                let held = ag
                    .tasks
                    .iter()
                    .filter_map(|t| a.state.tasks.get(t))
                    .map(|t| HeldTask {
                        task_id: t.id.clone(),
                        attempt: t.attempt,
                    })
                    .collect();
                (ag.name.clone(), held)
            })
            .collect()
    });
    for (agent, tasks) in due {
        let reason = format!("drain deadline of agent {agent} passed");
        requeue_and_stop(ctx, agent, tasks, reason).await;
    }
}

/// Re-queues `tasks` of `agent` as new attempts (committed first), then tells the agent to stop
/// the old ones; their reports arrive stale and are refused, so nothing runs twice as one attempt.
async fn requeue_and_stop(ctx: &Ctx, agent: String, tasks: Vec<HeldTask>, reason: String) {
    let result = ctx
        .proposer
        .propose(Command::RequeueTasks {
            agent: agent.clone(),
            tasks: tasks.clone(),
            reason: reason.clone(),
        })
        .await;
    match result {
        Ok(CommandResult::Requeued { requeued }) => {
            tracing::info!(%agent, requeued = requeued.len(), %reason, "tasks re-queued");
            for h in tasks.iter().filter(|h| requeued.contains(&h.task_id)) {
                let _ = ctx.sessions.send(
                    &agent,
                    pb::CoordinatorMessage {
                        msg: Some(Msg::Cancel(pb::Cancel {
                            task_id: h.task_id.clone(),
                            attempt: h.attempt,
                            reason: reason.clone(),
                        })),
                    },
                );
            }
        }
        Ok(other) => tracing::warn!(?other, "unexpected result for requeue_tasks"),
        Err(e) => tracing::warn!(error = %e, %reason, "could not commit a re-queue"),
    }
}

/// The leader's memory for `retention`: where the expiry walk is, and since when it has seen
/// each agent lost.
#[derive(Default)]
struct Retention {
    cursor: Option<crate::model::PendingKey>,
    lost_since: std::collections::HashMap<String, std::time::Instant>,
    last: Option<tokio::time::Instant>,
}

/// Time for these is counted in seconds and hours: once a second is plenty.
const RETENTION_EVERY: Duration = Duration::from_secs(1);

impl Retention {
    async fn sweep(&mut self, ctx: &Ctx) {
        if self.last.is_some_and(|t| t.elapsed() < RETENTION_EVERY) {
            return;
        }
        self.last = Some(tokio::time::Instant::now());
        let now_us = crate::proposer::now_ms() * 1000;
        let timing = &ctx.timing;
        let (expired, forget) = ctx.shared.read(|a| {
            let expired = match timing.unplaced_timeout {
                Some(timeout) if !a.state.pending.is_empty() => {
                    let (found, next) = crate::retention::unplaced_expired(
                        &a.state,
                        now_us,
                        timeout,
                        self.cursor.as_ref(),
                        crate::retention::EXPIRY_SCAN_MAX,
                    );
                    self.cursor = next;
                    found
                }
                _ => Vec::new(),
            };
            let forget = crate::retention::lost_too_long(
                &a.state,
                &mut self.lost_since,
                std::time::Instant::now(),
                timing.lost_agent_retention,
            );
            (expired, forget)
        });
        if !expired.is_empty() {
            let n = expired.len();
            match ctx
                .proposer
                .propose(Command::ExpireTasks { tasks: expired })
                .await
            {
                Ok(CommandResult::Expired { expired }) => {
                    ctx.metrics.tasks_expired.inc_by(expired.len() as u64);
                    tracing::warn!(
                        tasks = expired.len(),
                        "tasks never placed within the unplaced timeout failed"
                    );
                }
                Ok(other) => tracing::warn!(?other, "unexpected result for expire_tasks"),
                Err(e) => tracing::warn!(error = %e, tasks = n, "could not commit task expiry"),
            }
        }
        if !forget.is_empty() {
            match ctx
                .proposer
                .propose(Command::ForgetAgents { names: forget })
                .await
            {
                Ok(CommandResult::Forgotten { names }) => {
                    for n in &names {
                        self.lost_since.remove(n);
                        ctx.sessions.forget_lease(n);
                    }
                    tracing::info!(agents = ?names, "lost agents forgotten after the retention");
                }
                Ok(other) => tracing::warn!(?other, "unexpected result for forget_agents"),
                Err(e) => tracing::warn!(error = %e, "could not commit forgetting lost agents"),
            }
        }
    }
}

/// Queues the next attempt of every task whose retry deadline has passed. The deadline is in
/// replicated state, so a new leader fires what the old one did not; firing twice is harmless
/// (apply requires the task still waiting on that attempt).
async fn fire_retries(ctx: &Ctx) {
    let now_us = crate::proposer::now_ms() * 1000;
    let due: Vec<HeldTask> = ctx.shared.read(|a| {
        let s = &a.state;
        s.retry_due
            .range(..(now_us, u64::MAX))
            .take(crate::limits::RETRY_DUE_BATCH_MAX)
            .filter_map(|(_, tid)| s.tasks.get(tid))
            .map(|t| HeldTask {
                task_id: t.id.clone(),
                attempt: t.attempt,
            })
            .collect()
    });
    if due.is_empty() {
        return;
    }
    match ctx.proposer.propose(Command::RetryDue { tasks: due }).await {
        Ok(CommandResult::Retried { tasks }) => {
            ctx.metrics.tasks_retried.inc_by(tasks.len() as u64);
            tracing::info!(tasks = tasks.len(), "retries queued");
        }
        Ok(other) => tracing::warn!(?other, "unexpected result for retry_due"),
        Err(e) => tracing::warn!(error = %e, "could not commit retries"),
    }
}

/// How often the leader repeats a stop an agent has not confirmed.
const STOP_EVERY: Duration = Duration::from_secs(2);

/// The leader's memory for stopping attempts the coordinator ended (`State::stopping`): when it
/// last told each agent, and when it last looked for timeouts agents did not enforce.
#[derive(Default)]
struct Stops {
    sent: std::collections::HashMap<(String, u64), tokio::time::Instant>,
    last_timeout_look: Option<tokio::time::Instant>,
}

impl Stops {
    /// Tells each agent to stop what it should no longer run, again every `STOP_EVERY` until
    /// it reports the attempt ended (or registers again without it).
    fn send(&mut self, ctx: &Ctx) {
        let sent = &mut self.sent;
        // One read: the attempts to stop, with the reason each ended for, skipping those told
        // within STOP_EVERY; and what was sent for attempts no longer stopping is forgotten.
        let due: Vec<(String, String, u64, String)> = ctx.shared.read(|a| {
            let s = &a.state;
            sent.retain(|(t, n), _| s.stopping.get(t).is_some_and(|(_, m)| m == n));
            s.stopping
                .iter()
                .filter(|(t, (_, n))| {
                    sent.get(&((*t).clone(), *n))
                        .is_none_or(|at| at.elapsed() >= STOP_EVERY)
                })
                .map(|(t, (agent, n))| {
                    let reason = s
                        .tasks
                        .get(t)
                        .and_then(|t| t.outcome.as_ref())
                        .map(|o| o.reason.clone())
                        .unwrap_or_default();
                    (t.clone(), agent.clone(), *n, reason)
                })
                .collect()
        });
        for (task_id, agent, attempt, reason) in due {
            let key = (task_id.clone(), attempt);
            let msg = pb::CoordinatorMessage {
                msg: Some(Msg::Cancel(pb::Cancel {
                    task_id,
                    attempt,
                    reason,
                })),
            };
            if ctx.sessions.send(&agent, msg).is_ok() {
                ctx.metrics.tasks_stopped.inc();
                sent.insert(key, tokio::time::Instant::now());
            }
        }
    }

    /// Fails running attempts past their timeout by more than the agent's grace: the agent
    /// enforces timeouts, and this catches one that did not (hung, or lost its clock).
    async fn overdue(&mut self, ctx: &Ctx) {
        if self
            .last_timeout_look
            .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
        {
            return;
        }
        self.last_timeout_look = Some(tokio::time::Instant::now());
        let now_us = crate::proposer::now_ms() * 1000;
        let grace_us = (ctx.timing.lease_ttl + TIMEOUT_GRACE).as_micros() as u64;
        let overdue: Vec<(HeldTask, String)> = ctx.shared.read(|a| {
            let s = &a.state;
            s.agents
                .values()
                .flat_map(|ag| ag.tasks.iter())
                .filter_map(|t| s.tasks.get(t))
                .filter(|t| {
                    t.spec.timeout_ms > 0
                        && t.state == TaskState::Running
                        && t.started_at_us + t.spec.timeout_ms * 1000 + grace_us < now_us
                })
                .take(crate::limits::RETRY_DUE_BATCH_MAX)
                .map(|t| {
                    (
                        HeldTask {
                            task_id: t.id.clone(),
                            attempt: t.attempt,
                        },
                        format!(
                            "timeout after {} ms (its agent did not end it; failed by the \
                             coordinator)",
                            t.spec.timeout_ms
                        ),
                    )
                })
                .collect()
        });
        if overdue.is_empty() {
            return;
        }
        match ctx
            .proposer
            .propose(Command::FailTasks { tasks: overdue })
            .await
        {
            Ok(CommandResult::Failed { tasks }) => {
                tracing::warn!(tasks = ?tasks, "timed-out tasks failed by the leader");
            }
            Ok(other) => tracing::warn!(?other, "unexpected result for fail_tasks"),
            Err(e) => tracing::warn!(error = %e, "could not commit timed-out tasks"),
        }
    }
}

/// How long past its timeout (plus a lease) a running task may go unreported before the leader
/// fails it: the agent's own kill takes up to its kill grace, and its report a round trip.
const TIMEOUT_GRACE: Duration = Duration::from_secs(10);

/// Re-sends assignments no agent has received and re-queues those never started in time; see
/// `stranded`.
async fn sweep_stranded(ctx: &Ctx) {
    let now_us = crate::proposer::now_ms() * 1000;
    let policy = ctx.timing.stranded;
    let found = ctx.shared.read(|a| {
        let s = &a.state;
        // Amortised: only once what was handed over outgrows what still waits to start.
        if ctx.sessions.sent_len() > s.assigned.len() + crate::stranded::SWEEP_MAX {
            ctx.sessions.retain_sent(|t| {
                s.tasks
                    .get(t)
                    .is_some_and(|t| t.state == crate::model::TaskState::Assigned)
            });
        }
        if s.assigned.is_empty() {
            return Default::default();
        }
        crate::stranded::stranded(
            s,
            now_us,
            &policy,
            |agent| ctx.sessions.is_connected(agent),
            |task, attempt| ctx.sessions.sent_ago(task, attempt),
        )
    });
    if !found.resend.is_empty() {
        tracing::info!(
            tasks = found.resend.len(),
            "re-sending assignments not yet started"
        );
        ctx.metrics
            .assignments_resent
            .inc_by(found.resend.len() as u64);
        dispatch(&ctx.shared, &ctx.sessions, &found.resend);
    }
    for (agent, tasks) in found.requeue {
        ctx.metrics.assignments_expired.inc_by(tasks.len() as u64);
        let reason = format!(
            "assigned to agent {agent} and not started within {} ms",
            policy.start_timeout.as_millis()
        );
        requeue_and_stop(ctx, agent, tasks, reason).await;
    }
}

async fn schedule_round(ctx: &Ctx, term: u64) {
    // The loop wakes on every Raft metrics change; with nothing queued, skip building a view of
    // every agent.
    if ctx.shared.read(|a| a.state.pending.is_empty()) {
        return;
    }
    let (assignments, unplaced) = ctx.placement.plan_round();
    ctx.metrics.schedule_rounds.inc();
    if assignments.is_empty() && unplaced.is_empty() {
        return;
    }
    let span = tracing::debug_span!("schedule_round", assignments = assignments.len());
    let result = ctx
        .proposer
        .propose(Command::ApplyPlan {
            term,
            assignments,
            unplaced,
        })
        .instrument(span)
        .await;
    match result {
        Ok(CommandResult::PlanApplied { accepted, dropped }) => {
            if dropped > 0 {
                tracing::debug!(dropped, "stale assignments dropped at apply");
            }
            // The placer has dispatched them already, as the entry's results came in.
            ctx.metrics.tasks_placed.inc_by(accepted.len() as u64);
        }
        Ok(other) => tracing::debug!(?other, "plan not applied"),
        Err(e) => tracing::warn!(error = %e, "could not commit plan"),
    }
}

/// Sends committed assignments to their agents. An agent that is not connected gets them when it
/// registers again (`resend`), or loses them to a lease expiry.
pub fn dispatch(shared: &Shared, sessions: &Sessions, assignments: &[Assignment]) {
    for a in assignments {
        let msg = shared.read(|s| {
            s.state
                .tasks
                .get(&a.task_id)
                .filter(|t| t.attempt == a.attempt && t.state == TaskState::Assigned)
                .map(|t| pb::CoordinatorMessage {
                    msg: Some(Msg::Assign(pb::Assign {
                        task_id: t.id.clone(),
                        attempt: t.attempt,
                        spec: Some(convert::task_spec_to_proto(&t.spec)),
                        run_id: t.run_id.clone(),
                    })),
                })
        });
        if let Some(msg) = msg
            && let Err(e) = sessions.send_assignment(&a.agent, msg, &a.task_id, a.attempt)
        {
            tracing::debug!(agent = %a.agent, task = %a.task_id, ?e, "assignment not delivered now; will resend on reconnect");
        }
    }
}
