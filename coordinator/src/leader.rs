//! The leader's loop: keeps leases, runs scheduling rounds, and hands committed assignments to
//! agent sessions. Every node runs it; it acts only while its node leads. Timers are absolute
//! deadlines checked each tick, so a failover neither loses nor doubles them.

use std::sync::Arc;
use std::time::Duration;

use drover_proto::pb::{self, coordinator_message::Msg};
use openraft::ServerState;
use tonic::Status;
use tracing::Instrument;

use crate::command::{Command, CommandResult};
use crate::convert;
use crate::limits;
use crate::model::{AgentState, Assignment, TaskState};
use crate::node::Ctx;
use crate::scheduler::{self, AgentSlot, PendingTask, View};

/// How often the loop wakes when nothing else wakes it.
const TICK: Duration = Duration::from_millis(100);

pub async fn run(ctx: Arc<Ctx>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let mut metrics_rx = ctx.raft.metrics();
    let mut led_term: Option<u64> = None;
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = ctx.shared.applied.notified() => {}
            r = metrics_rx.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(TICK) => {}
        }
        let m = metrics_rx.borrow_and_update().clone();
        ctx.refresh_gauges(&m);
        let leading = m.state == ServerState::Leader && m.current_leader == Some(ctx.node_id);
        if !leading {
            if led_term.take().is_some() {
                tracing::info!(
                    term = m.current_term,
                    "stepped down; closing agent sessions"
                );
                let status: Status = ctx.not_leader_error().into();
                ctx.sessions.close_all(&status);
            }
            continue;
        }
        if led_term != Some(m.current_term) {
            led_term = Some(m.current_term);
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
        expire_leases(&ctx).await;
        schedule_round(&ctx, m.current_term).await;
    }
}

async fn expire_leases(ctx: &Ctx) {
    let ttl_ms = ctx.timing.lease_ttl.as_millis() as u64;
    let expired: Vec<String> = ctx.shared.read(|a| {
        a.state
            .agents
            .values()
            .filter(|a| a.state != AgentState::Lost)
            .filter(|a| {
                ctx.sessions
                    .heard_ago_ms(&a.name)
                    .is_none_or(|ago| ago > ttl_ms)
            })
            .map(|a| a.name.clone())
            .collect()
    });
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

fn build_view(ctx: &Ctx) -> (View, Vec<(String, String)>) {
    ctx.shared.read(|a| {
        let s = &a.state;
        let mut previous_reasons = Vec::new();
        let pending = s
            .pending
            .iter()
            .take(limits::SCHEDULE_ROUND_TASKS_MAX)
            .filter_map(|(_, tid)| s.tasks.get(tid))
            .map(|t| {
                previous_reasons.push((t.id.clone(), t.pending_reason.clone()));
                PendingTask {
                    id: t.id.clone(),
                    attempt: t.attempt,
                    class: t.spec.class.clone(),
                    resources: t.spec.resources.clone(),
                }
            })
            .collect();
        let agents = s
            .agents
            .values()
            .filter(|a| a.state == AgentState::Active && ctx.sessions.is_connected(&a.name))
            .map(|a| AgentSlot {
                name: a.name.clone(),
                class: a.class.clone(),
                free: a.free(),
            })
            .collect();
        (View { pending, agents }, previous_reasons)
    })
}

async fn schedule_round(ctx: &Ctx, term: u64) {
    let (view, previous) = build_view(ctx);
    if view.pending.is_empty() {
        return;
    }
    let plan = scheduler::plan(&view);
    ctx.metrics.schedule_rounds.inc();
    let previous: std::collections::HashMap<String, String> = previous.into_iter().collect();
    let unplaced: Vec<(String, String)> = plan
        .unplaced
        .into_iter()
        .filter(|(tid, reason)| previous.get(tid) != Some(reason))
        .collect();
    if plan.assignments.is_empty() && unplaced.is_empty() {
        return;
    }
    let span = tracing::debug_span!("schedule_round", assignments = plan.assignments.len());
    let result = ctx
        .proposer
        .propose(Command::ApplyPlan {
            term,
            assignments: plan.assignments,
            unplaced,
        })
        .instrument(span)
        .await;
    match result {
        Ok(CommandResult::PlanApplied { accepted, dropped }) => {
            if dropped > 0 {
                tracing::debug!(dropped, "stale assignments dropped at apply");
            }
            ctx.metrics.tasks_placed.inc_by(accepted.len() as u64);
            dispatch(ctx, &accepted);
        }
        Ok(other) => tracing::debug!(?other, "plan not applied"),
        Err(e) => tracing::warn!(error = %e, "could not commit plan"),
    }
}

/// Sends committed assignments to their agents. An agent that is not connected gets them when it
/// registers again (`resend`), or loses them to a lease expiry.
pub fn dispatch(ctx: &Ctx, assignments: &[Assignment]) {
    for a in assignments {
        let msg = ctx.shared.read(|s| {
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
            && let Err(e) = ctx.sessions.send(&a.agent, msg)
        {
            tracing::debug!(agent = %a.agent, task = %a.task_id, ?e, "assignment not delivered now; will resend on reconnect");
        }
    }
}
