//! The pools API: apply, list, get. Specs are checked here (and by `droverctl pool apply`
//! before sending); decisions and demand are read from this node's applied state.

use drover_proto::identity::require_role;
use drover_proto::pb;
use tonic::{Request, Status};

use crate::autoscale;
use crate::client_service::{ClientRpc, OPERATORS, READERS};
use crate::command::{Command, CommandResult};
use crate::error::CoordinatorError;
use crate::model::{Hook, HookState, PoolSpec};
use crate::state::State;

/// Checks a pool spec; the error names the pool and field.
pub fn check(spec: &PoolSpec) -> Result<(), CoordinatorError> {
    let at = |f: &str| format!("pools.{}.{f}", spec.name);
    if !crate::convert::valid_name(&spec.name) {
        return Err(CoordinatorError::invalid(
            "pools.name",
            format!(
                "'{}' must be 1-63 characters of a-z, 0-9, '-', '_'",
                spec.name
            ),
        ));
    }
    if spec.max == 0 || spec.min > spec.max {
        return Err(CoordinatorError::invalid(
            at("max"),
            format!(
                "min {} and max {}: need 0 <= min <= max and max >= 1",
                spec.min, spec.max
            ),
        ));
    }
    if spec.max > 10_000 {
        return Err(CoordinatorError::invalid(at("max"), "at most 10000 agents"));
    }
    if spec.scale_up.pending_per_agent == 0 && spec.scale_up.wait_p90_over_ms == 0 {
        return Err(CoordinatorError::invalid(
            at("scale_up"),
            "give pending_per_agent or wait_p90_over (or both): what makes the pool grow",
        ));
    }
    if spec.scale_down.idle_for_ms == 0 {
        return Err(CoordinatorError::invalid(
            at("scale_down.idle_for"),
            "how long an agent must be idle before it is removed (e.g. 5m)",
        ));
    }
    match &spec.hook {
        Hook::Exec {
            command,
            timeout_ms,
        } => {
            if command.is_empty() || command[0].is_empty() {
                return Err(CoordinatorError::invalid(at("hook.exec.command"), "empty"));
            }
            if *timeout_ms == 0 {
                return Err(CoordinatorError::invalid(
                    at("hook.exec.timeout"),
                    "needed, e.g. 30s",
                ));
            }
        }
        Hook::Webhook {
            url,
            secret_env,
            timeout_ms,
        } => {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(CoordinatorError::invalid(
                    at("hook.webhook.url"),
                    format!("'{url}' is not an http:// or https:// URL"),
                ));
            }
            if secret_env.is_empty() {
                return Err(CoordinatorError::invalid(
                    at("hook.webhook.secret_env"),
                    "the environment variable (on the coordinators) holding the signing secret",
                ));
            }
            if *timeout_ms == 0 {
                return Err(CoordinatorError::invalid(
                    at("hook.webhook.timeout"),
                    "needed, e.g. 10s",
                ));
            }
        }
        Hook::Local { .. } => {}
    }
    Ok(())
}

fn hook_name(h: &Hook) -> &'static str {
    match h {
        Hook::Exec { .. } => "exec",
        Hook::Webhook { .. } => "webhook",
        Hook::Local { .. } => "local",
    }
}

/// A pool as `pool get` shows it.
pub fn status(s: &State, name: &str, now_us: u64) -> Option<pb::PoolStatus> {
    let pool = s.pools.get(name)?;
    let members = autoscale::members(s, name);
    let launching = autoscale::launching(pool, now_us);
    let demand = autoscale::demand(s, &pool.spec, now_us);
    let current = members.len() as u32;
    let health = pool
        .decisions
        .iter()
        .rev()
        .find(|d| !d.last_error.is_empty() || d.hook == HookState::Failed)
        .filter(|d| d.hook != HookState::Done)
        .map_or_else(
            || "ok".to_owned(),
            |d| {
                format!(
                    "decision {} {}: {} attempts, last error: {}",
                    d.id,
                    if d.hook == HookState::Failed {
                        "failed"
                    } else {
                        "retrying"
                    },
                    d.attempts,
                    d.last_error
                )
            },
        );
    Some(pb::PoolStatus {
        name: name.to_owned(),
        min: pool.spec.min,
        max: pool.spec.max,
        current,
        launching,
        desired: pool.decisions.last().map_or(current + launching, |d| d.to),
        demand_pending: demand.pending,
        demand_wait_p90_ms: demand.wait_p90_ms,
        decisions: pool
            .decisions
            .iter()
            .map(|d| pb::ScaleDecision {
                id: d.id,
                from: d.from,
                to: d.to,
                reason: d.reason.clone(),
                at_ms: d.at_us / 1000,
                remove: d.remove.iter().map(|(a, i)| format!("{a} ({i})")).collect(),
                hook: match d.hook {
                    HookState::Pending => "pending",
                    HookState::Done => "done",
                    HookState::Failed => "failed",
                }
                .into(),
                attempts: d.attempts,
                last_error: d.last_error.clone(),
            })
            .collect(),
        hook: hook_name(&pool.spec.hook).into(),
        hook_health: health,
        launches_failed: pool.launches_failed,
        spec_json: serde_json::to_string(&pool.spec).unwrap_or_default(),
    })
}

impl ClientRpc {
    pub(crate) async fn apply_pools_rpc(
        &self,
        req: Request<pb::ApplyPoolsRequest>,
    ) -> Result<pb::ListPoolsResponse, Status> {
        require_role(&req, "applying pools", OPERATORS)?;
        let mut specs = Vec::new();
        for (i, text) in req.get_ref().pools_json.iter().enumerate() {
            let spec: PoolSpec = serde_json::from_str(text).map_err(|e| {
                CoordinatorError::invalid(format!("pools[{i}]"), format!("not a pool spec: {e}"))
            })?;
            check(&spec)?;
            if specs.iter().any(|s: &PoolSpec| s.name == spec.name) {
                return Err(CoordinatorError::invalid(
                    format!("pools[{i}].name"),
                    format!("pool '{}' is given twice", spec.name),
                )
                .into());
            }
            specs.push(spec);
        }
        self.ctx.require_leader()?;
        match self
            .ctx
            .proposer
            .propose(Command::ApplyPools { pools: specs })
            .await?
        {
            CommandResult::Done => Ok(self.list_pools_now()),
            CommandResult::Rejected {
                limit: Some(limit),
                message,
            } => Err(CoordinatorError::LimitReached { limit, message }.into()),
            other => Err(Status::internal(format!("unexpected result: {other:?}"))),
        }
    }

    fn list_pools_now(&self) -> pb::ListPoolsResponse {
        let now_us = crate::proposer::now_ms() * 1000;
        self.ctx.shared.read(|a| pb::ListPoolsResponse {
            pools: a
                .state
                .pools
                .keys()
                .filter_map(|n| status(&a.state, n, now_us))
                .collect(),
        })
    }

    pub(crate) fn list_pools_rpc(
        &self,
        req: Request<pb::ListPoolsRequest>,
    ) -> Result<pb::ListPoolsResponse, Status> {
        require_role(&req, "listing pools", READERS)?;
        Ok(self.list_pools_now())
    }

    pub(crate) fn get_pool_rpc(
        &self,
        req: Request<pb::GetPoolRequest>,
    ) -> Result<pb::PoolStatus, Status> {
        require_role(&req, "reading pools", READERS)?;
        let name = &req.get_ref().name;
        let now_us = crate::proposer::now_ms() * 1000;
        self.ctx
            .shared
            .read(|a| status(&a.state, name, now_us))
            .ok_or_else(|| self.not_found(format!("pool {name} not found")))
    }
}
