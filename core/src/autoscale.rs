//! Autoscaling, the pure part: a pool's demand, the policy (pool, demand, clock -> a decision and
//! its reason), and how committed decisions change the state. The leader evaluates, commits
//! the decision (`Command::Scale`), and only then calls the pool's hook.
//!
//! Capacity is the pool's registered agents (not lost, not draining) plus the instances launched
//! for it and not registered yet, until their boot timeout. Hysteresis: a pool grows only while
//! its demand is over a threshold, shrinks only when nothing waits for it and agents have been
//! idle for `idle_for`, and never shrinks within a scale-up's cooldown.

use std::collections::BTreeMap;

use crate::command::CommandResult;
use crate::limits;
use crate::model::{Agent, AgentState, Decision, HookState, Launch, Pool, PoolSpec, Task};
use crate::state::State;

/// What waits for a pool.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Demand {
    /// Pending tasks the pool's agents could take (class and required labels).
    pub pending: u64,
    /// The 90th percentile of how long they have waited (ms).
    pub wait_p90_ms: u64,
}

/// A decision the policy proposes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proposal {
    pub from: u32,
    pub to: u32,
    pub reason: String,
    /// Idle agents to remove (scale-in), longest idle first.
    pub remove: Vec<String>,
}

/// Whether `task` is demand for a pool with this spec.
fn wants(spec: &PoolSpec, task: &Task) -> bool {
    let class = if spec.class.is_empty() {
        spec.name.as_str()
    } else {
        spec.class.as_str()
    };
    task.spec.class == class && task.spec.required.iter().all(|e| e.matches(&spec.labels))
}

/// The pool's demand: pending tasks it could take, and the p90 of their waits. Looks at the head
/// of the queue only (`DEMAND_SCAN_MAX` tasks).
pub fn demand(s: &State, spec: &PoolSpec, now_us: u64) -> Demand {
    let mut waits: Vec<u64> = s
        .pending
        .iter()
        .take(limits::DEMAND_SCAN_MAX)
        .filter_map(|(_, _, t)| s.tasks.get(t))
        .filter(|t| wants(spec, t))
        .map(|t| now_us.saturating_sub(t.created_at_us) / 1000)
        .collect();
    waits.sort_unstable();
    let p90 = if waits.is_empty() {
        0
    } else {
        waits[(waits.len() * 9).div_ceil(10).saturating_sub(1)]
    };
    Demand {
        pending: waits.len() as u64,
        wait_p90_ms: p90,
    }
}

/// The pool's agents that count as capacity (registered, not lost or draining).
pub fn members<'a>(s: &'a State, pool: &str) -> Vec<&'a Agent> {
    s.agents
        .values()
        .filter(|a| a.pool == pool && a.state == AgentState::Active)
        .collect()
}

/// Instances launched and not registered yet, still within their boot timeout.
pub fn launching(pool: &Pool, now_us: u64) -> u32 {
    pool.launching
        .iter()
        .filter(|l| l.deadline_us > now_us)
        .map(|l| l.remaining)
        .sum()
}

/// The policy: what the pool should become, and why; None to leave it.
pub fn decide(pool: &Pool, agents: &[&Agent], demand: Demand, now_us: u64) -> Option<Proposal> {
    let spec = &pool.spec;
    let registered = agents.len() as u32;
    let current = registered + launching(pool, now_us);
    let since = |t: u64| now_us.saturating_sub(t) / 1000;
    let up_cooling = pool.last_up_us != 0 && since(pool.last_up_us) < spec.scale_up.cooldown_ms;
    let down_cooling =
        pool.last_down_us != 0 && since(pool.last_down_us) < spec.scale_down.cooldown_ms;
    let up_step = spec.scale_up.step.max(1);
    if current < spec.min {
        return Some(Proposal {
            from: current,
            to: spec.min.min(spec.max),
            reason: format!("below min {}", spec.min),
            remove: vec![],
        });
    }
    if current > spec.max {
        // Over max (lowered by `pool apply`): shed idle agents only.
        let remove = idle_agents(agents, now_us, 0, (current - spec.max) as usize);
        return (!remove.is_empty()).then(|| Proposal {
            from: current,
            to: current - remove.len() as u32,
            reason: format!("above max {}", spec.max),
            remove,
        });
    }
    let per_agent = spec.scale_up.pending_per_agent;
    let crowded = per_agent > 0 && demand.pending > u64::from(per_agent) * u64::from(current);
    let slow = spec.scale_up.wait_p90_over_ms > 0
        && demand.pending > 0
        && demand.wait_p90_ms > spec.scale_up.wait_p90_over_ms;
    if (crowded || slow) && current < spec.max && !up_cooling {
        let to = (current + up_step).min(spec.max);
        let reason = if crowded {
            format!(
                "{} tasks pending for {current} agents (over {per_agent} per agent)",
                demand.pending
            )
        } else {
            format!(
                "p90 wait {} ms over {} ms",
                demand.wait_p90_ms, spec.scale_up.wait_p90_over_ms
            )
        };
        return Some(Proposal {
            from: current,
            to,
            reason,
            remove: vec![],
        });
    }
    // Shrink only when nothing waits, no instance is still booting, and no scale-up is cooling.
    if demand.pending > 0 || current > registered || up_cooling || down_cooling {
        return None;
    }
    let room = current.saturating_sub(spec.min) as usize;
    let n = room.min(spec.scale_down.step.max(1) as usize);
    let remove = idle_agents(agents, now_us, spec.scale_down.idle_for_ms, n);
    (!remove.is_empty()).then(|| Proposal {
        from: current,
        to: current - remove.len() as u32,
        reason: format!(
            "{} agents idle for {} ms or more, nothing pending",
            remove.len(),
            spec.scale_down.idle_for_ms
        ),
        remove,
    })
}

/// Up to `n` agents holding no task for at least `idle_ms`, longest idle first.
fn idle_agents(agents: &[&Agent], now_us: u64, idle_ms: u64, n: usize) -> Vec<String> {
    let mut idle: Vec<&&Agent> = agents
        .iter()
        .filter(|a| {
            a.tasks.is_empty()
                && a.idle_since_us != 0
                && now_us.saturating_sub(a.idle_since_us) / 1000 >= idle_ms
        })
        .collect();
    idle.sort_by_key(|a| (a.idle_since_us, a.name.clone()));
    idle.into_iter().take(n).map(|a| a.name.clone()).collect()
}

impl State {
    /// Replaces the pools; history is kept for pools that stay.
    pub(crate) fn apply_pools(&mut self, specs: &[PoolSpec]) -> CommandResult {
        if specs.len() > limits::POOLS_MAX {
            return CommandResult::Rejected {
                limit: Some("pools_max".into()),
                message: format!("{} pools; pools_max is {}", specs.len(), limits::POOLS_MAX),
            };
        }
        let mut next: BTreeMap<String, Pool> = BTreeMap::new();
        for spec in specs {
            let mut pool = self.pools.remove(&spec.name).unwrap_or_default();
            pool.spec = spec.clone();
            next.insert(spec.name.clone(), pool);
        }
        self.pools = next;
        CommandResult::Done
    }

    /// Commits a decision: removed agents are drained (only idle ones: a busy agent is never
    /// removed), launches are counted as capacity until their boot timeout.
    pub(crate) fn scale(
        &mut self,
        now_us: u64,
        name: &str,
        from: u32,
        to: u32,
        reason: &str,
        remove: &[String],
    ) -> CommandResult {
        if !self.pools.contains_key(name) {
            return CommandResult::NotFound {
                message: format!("pool {name} not found"),
            };
        }
        self.expire_launches(now_us, name);
        // Re-checked against the state it commits into: a decision made on an older view (two
        // evaluations in flight, or a deposed leader's) must not launch a second time.
        let pool = &self.pools[name];
        let current = members(self, name).len() as u32 + launching(pool, now_us);
        if from != current {
            return CommandResult::Rejected {
                limit: None,
                message: format!(
                    "pool {name} has {current} agents now, not {from}: stale decision"
                ),
            };
        }
        let cooldown_us = pool.spec.scale_up.cooldown_ms.saturating_mul(1000);
        if to > from && pool.last_up_us != 0 && now_us < pool.last_up_us.saturating_add(cooldown_us)
        {
            return CommandResult::Rejected {
                limit: None,
                message: format!("pool {name} scaled up within its cooldown"),
            };
        }
        let mut removed = Vec::new();
        for agent in remove {
            if let Some(a) = self.agents.get_mut(agent)
                && a.pool == name
                && a.state == AgentState::Active
                && a.tasks.is_empty()
            {
                a.state = AgentState::Draining;
                a.drain_deadline_ms = 0;
                removed.push((a.name.clone(), a.instance_id.clone()));
            }
        }
        let to = if remove.is_empty() {
            to
        } else {
            from.saturating_sub(removed.len() as u32)
        };
        if to == from {
            return CommandResult::Rejected {
                limit: None,
                message: format!("pool {name}: nothing to do (the agents to remove are busy)"),
            };
        }
        self.last_decision += 1;
        let id = self.last_decision;
        let pool = self.pools.get_mut(name).expect("checked above");
        if to > from {
            pool.last_up_us = now_us;
            pool.launching.push(Launch {
                decision: id,
                remaining: to - from,
                deadline_us: now_us.saturating_add(pool.spec.boot_timeout_ms.saturating_mul(1000)),
            });
        } else {
            pool.last_down_us = now_us;
        }
        pool.decisions.push(Decision {
            id,
            pool: name.to_owned(),
            from,
            to,
            reason: reason.to_owned(),
            at_us: now_us,
            remove: removed,
            hook: HookState::Pending,
            attempts: 0,
            last_error: String::new(),
        });
        if pool.decisions.len() > limits::POOL_DECISIONS_KEPT {
            pool.decisions.remove(0);
        }
        CommandResult::Scaled { decision: id }
    }

    /// A new agent of `pool` registered: one launch fewer outstanding (the oldest).
    pub(crate) fn pool_member_arrived(&mut self, now_us: u64, pool: &str) {
        self.expire_launches(now_us, pool);
        if let Some(p) = self.pools.get_mut(pool)
            && let Some(l) = p.launching.first_mut()
        {
            l.remaining -= 1;
            if l.remaining == 0 {
                p.launching.remove(0);
            }
        }
    }

    /// Drops launches past their boot timeout, counting what never registered as failed.
    fn expire_launches(&mut self, now_us: u64, pool: &str) {
        if let Some(p) = self.pools.get_mut(pool) {
            let failed: u32 = p
                .launching
                .iter()
                .filter(|l| l.deadline_us <= now_us)
                .map(|l| l.remaining)
                .sum();
            p.launches_failed += u64::from(failed);
            p.launching
                .retain(|l| l.deadline_us > now_us && l.remaining > 0);
        }
    }

    pub(crate) fn hook_outcome(&mut self, id: u64, ok: bool, error: &str) -> CommandResult {
        let found = self
            .pools
            .values_mut()
            .flat_map(|p| p.decisions.iter_mut())
            .find(|d| d.id == id);
        let Some(d) = found else {
            return CommandResult::NotFound {
                message: format!("decision {id} not found"),
            };
        };
        if d.hook != HookState::Pending {
            return CommandResult::Done;
        }
        d.attempts += 1;
        if ok {
            d.hook = HookState::Done;
            d.last_error.clear();
        } else {
            d.last_error = error.chars().take(1024).collect();
            if d.attempts >= limits::HOOK_ATTEMPTS_MAX {
                d.hook = HookState::Failed;
            }
        }
        CommandResult::Done
    }
}

#[cfg(test)]
#[path = "autoscale_tests.rs"]
mod tests;
