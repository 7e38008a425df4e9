//! The leader's autoscaler: evaluates each pool's policy on an interval, commits the decision,
//! then calls the pool's hook with it. A hook call that fails is retried with backoff (and
//! reported in `pool get` and metrics) without holding up other pools or the next evaluation.
//! After a failover the new leader finds committed decisions whose hook has not succeeded and
//! calls the hook again with the same decision id: hooks set the group to `desired`, so a
//! repeated call launches nothing twice.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::autoscale;
use crate::command::{Command, CommandResult};
use crate::model::{Decision, Hook, HookState, PoolSpec};
use crate::node::Ctx;

/// What the local hook needs: where certificates are and where agents keep their files.
#[derive(Debug, Clone)]
pub struct LocalEnv {
    pub tls_dir: PathBuf,
    pub data_dir: PathBuf,
}

/// The leader-side memory of the autoscaler (lost on failover, rebuilt from the state).
#[derive(Default)]
pub struct Autoscaler {
    last_eval: Option<tokio::time::Instant>,
    /// Decisions whose hook call is running now.
    inflight: Arc<Mutex<HashSet<u64>>>,
    /// Earliest next attempt per decision after a failure.
    next_try: Arc<Mutex<HashMap<u64, tokio::time::Instant>>>,
}

/// The hook's input, as JSON on stdin or in the POST body.
pub fn payload(d: &Decision, current: u32) -> serde_json::Value {
    serde_json::json!({
        "decision_id": d.id,
        "pool": d.pool,
        "current": current,
        "from": d.from,
        "desired": d.to,
        "reason": d.reason,
        "remove": d.remove.iter().map(|(a, i)| serde_json::json!({"agent": a, "instance_id": i})).collect::<Vec<_>>(),
    })
}

impl Autoscaler {
    pub async fn tick(&mut self, ctx: &Arc<Ctx>) {
        let every = ctx.timing.autoscale_interval;
        if self.last_eval.is_none_or(|t| t.elapsed() >= every) {
            self.last_eval = Some(tokio::time::Instant::now());
            self.evaluate(ctx).await;
        }
        self.run_hooks(ctx);
    }

    async fn evaluate(&self, ctx: &Ctx) {
        let now_us = crate::proposer::now_ms() * 1000;
        let proposals: Vec<(String, autoscale::Proposal)> = ctx.shared.read(|a| {
            let s = &a.state;
            s.pools
                .iter()
                .filter_map(|(name, pool)| {
                    let members = autoscale::members(s, name);
                    let demand = autoscale::demand(s, &pool.spec, now_us);
                    autoscale::decide(pool, &members, demand, now_us).map(|p| (name.clone(), p))
                })
                .collect()
        });
        for (pool, p) in proposals {
            let span = tracing::info_span!("scale", %pool, from = p.from, to = p.to);
            let _e = span.enter();
            match ctx
                .proposer
                .propose(Command::Scale {
                    pool: pool.clone(),
                    from: p.from,
                    to: p.to,
                    reason: p.reason.clone(),
                    remove: p.remove.clone(),
                })
                .await
            {
                Ok(CommandResult::Scaled { decision }) => {
                    ctx.metrics.scale_decisions.inc();
                    tracing::info!(decision, reason = %p.reason, remove = ?p.remove, "scaling decision committed");
                }
                Ok(other) => tracing::debug!(?other, "scaling decision not committed"),
                Err(e) => tracing::warn!(error = %e, "could not commit a scaling decision"),
            }
        }
    }

    /// Starts the hook of every committed decision still pending (oldest first per pool) that
    /// is not running and not backing off.
    fn run_hooks(&self, ctx: &Arc<Ctx>) {
        let now_us = crate::proposer::now_ms() * 1000;
        let pending: Vec<(Decision, PoolSpec, u32)> = ctx.shared.read(|a| {
            let s = &a.state;
            s.pools
                .iter()
                .filter_map(|(name, pool)| {
                    // One call at a time per pool, in decision order.
                    let d = pool
                        .decisions
                        .iter()
                        .find(|d| d.hook == HookState::Pending)?;
                    let current = autoscale::members(s, name).len() as u32
                        + autoscale::launching(pool, now_us);
                    Some((d.clone(), pool.spec.clone(), current))
                })
                .collect()
        });
        for (d, spec, current) in pending {
            if self
                .next_try
                .lock()
                .unwrap()
                .get(&d.id)
                .is_some_and(|t| tokio::time::Instant::now() < *t)
            {
                continue;
            }
            if !self.inflight.lock().unwrap().insert(d.id) {
                continue;
            }
            let (ctx, inflight, next_try) =
                (ctx.clone(), self.inflight.clone(), self.next_try.clone());
            tokio::spawn(async move {
                let started = std::time::Instant::now();
                let result = call_hook(&ctx, &spec, &d, current).await;
                ctx.metrics
                    .hook_calls
                    .get_or_create(&crate::metrics::ResultLabels {
                        result: if result.is_ok() { "ok" } else { "error" },
                    })
                    .inc();
                let (ok, error) = match &result {
                    Ok(()) => (true, String::new()),
                    Err(e) => (false, e.clone()),
                };
                tracing::info!(decision = d.id, pool = %d.pool, ok, %error, ms = started.elapsed().as_millis() as u64, "hook called");
                if !ok {
                    // 1 s, 2 s, 4 s ... up to a minute between attempts.
                    let wait = Duration::from_secs(1 << d.attempts.min(6));
                    next_try
                        .lock()
                        .unwrap()
                        .insert(d.id, tokio::time::Instant::now() + wait);
                }
                let _ = ctx
                    .proposer
                    .propose(Command::HookOutcome {
                        decision: d.id,
                        ok,
                        error,
                    })
                    .await;
                inflight.lock().unwrap().remove(&d.id);
            });
        }
    }
}

async fn call_hook(ctx: &Ctx, spec: &PoolSpec, d: &Decision, current: u32) -> Result<(), String> {
    let body = payload(d, current).to_string();
    match &spec.hook {
        Hook::Exec {
            command,
            timeout_ms,
        } => exec_hook(command, *timeout_ms, d, &body).await,
        Hook::Webhook {
            url,
            secret_env,
            timeout_ms,
        } => {
            let secret = std::env::var(secret_env).map_err(|_| {
                format!("the secret variable {secret_env} is not set on this coordinator")
            })?;
            crate::webhook::post(
                url,
                &secret,
                d.id,
                &body,
                Duration::from_millis(*timeout_ms),
            )
            .await
        }
        Hook::Local { agent_args } => crate::local_agents::apply(ctx, spec, d, agent_args).await,
    }
}

/// Runs `command` with the decision as JSON on stdin and in `DROVER_*` variables; it must exit 0
/// within the timeout. Its stderr tail is the error otherwise.
async fn exec_hook(
    command: &[String],
    timeout_ms: u64,
    d: &Decision,
    body: &str,
) -> Result<(), String> {
    let remove_ids: Vec<&str> = d.remove.iter().map(|(_, i)| i.as_str()).collect();
    let remove_agents: Vec<&str> = d.remove.iter().map(|(a, _)| a.as_str()).collect();
    let mut child = tokio::process::Command::new(&command[0])
        .args(&command[1..])
        .env("DROVER_DECISION_ID", d.id.to_string())
        .env("DROVER_POOL", &d.pool)
        .env("DROVER_CURRENT", d.from.to_string())
        .env("DROVER_DESIRED", d.to.to_string())
        .env("DROVER_REMOVE_INSTANCES", remove_ids.join(" "))
        .env("DROVER_REMOVE_AGENTS", remove_agents.join(" "))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("starting {}: {e}", command[0]))?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(body.as_bytes()).await;
    }
    let mut stderr = child.stderr.take();
    let run = async {
        let mut err = Vec::new();
        if let Some(s) = stderr.as_mut() {
            let _ = s.take(64 * 1024).read_to_end(&mut err).await;
        }
        (child.wait().await, err)
    };
    match tokio::time::timeout(Duration::from_millis(timeout_ms), run).await {
        Err(_) => Err(format!("{} timed out after {timeout_ms} ms", command[0])),
        Ok((Err(e), _)) => Err(format!("{}: {e}", command[0])),
        Ok((Ok(status), err)) if !status.success() => {
            let text = String::from_utf8_lossy(&err);
            let tail: String = text
                .trim()
                .chars()
                .rev()
                .take(400)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            Err(format!("{} exited with {status}: {tail}", command[0]))
        }
        Ok(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn exec_hooks_get_the_decision_and_fail_with_their_stderr() {
        let d = Decision {
            id: 7,
            pool: "p".into(),
            from: 1,
            to: 0,
            remove: vec![("a1".into(), "i-1".into())],
            ..Default::default()
        };
        let body = payload(&d, 1).to_string();
        let ok = ["sh".to_owned(), "-c".into(), "read j; case \"$j\" in *'\"decision_id\":7'*) [ \"$DROVER_REMOVE_INSTANCES\" = i-1 ];; *) exit 1;; esac".into()];
        exec_hook(&ok, 5_000, &d, &body).await.unwrap();
        let bad = [
            "sh".to_owned(),
            "-c".into(),
            "echo quota exceeded >&2; exit 3".into(),
        ];
        let e = exec_hook(&bad, 5_000, &d, &body).await.unwrap_err();
        assert!(e.contains("quota exceeded"), "{e}");
        let slow = ["sleep".to_owned(), "5".into()];
        let e = exec_hook(&slow, 100, &d, &body).await.unwrap_err();
        assert!(e.contains("timed out"), "{e}");
    }
}
