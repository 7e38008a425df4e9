//! `drover-bench backlog`: a million pending tasks. In process, the state is built by the
//! state machine's own `apply` and its snapshot encoded and decoded by the store's own codec,
//! timed without the network. Against a real cluster with no agents (everything stays queued):
//! the leader's RSS, the snapshots it builds, and a follower restarted from its stored snapshot
//! plus log until it has applied everything again.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use drover_coordinator::command::{Command, Request};
use drover_coordinator::model::{Program, RunSpec, TaskSpec};
use drover_coordinator::raft::state_machine::{Applied, decode_snapshot, encode_snapshot};
use drover_proto::client::ClusterClient;
use drover_proto::pb;

#[derive(Debug)]
pub struct InProcess {
    pub tasks: usize,
    pub apply_secs: f64,
    pub state_rss_bytes: u64,
    pub snapshot_bytes: usize,
    pub encode_secs: f64,
    pub decode_secs: f64,
}

fn run_spec(tasks: usize) -> RunSpec {
    RunSpec {
        name: "backlog".into(),
        tasks: (0..tasks)
            .map(|i| TaskSpec::new(format!("t{i}"), Program::Noop { duration_ms: 0 }))
            .collect(),
        labels: BTreeMap::new(),
        ..Default::default()
    }
}

/// Builds `tasks` pending tasks (runs of `per_run`) through `State::apply`, then snapshots and
/// restores the state.
pub fn in_process(tasks: usize, per_run: usize) -> anyhow::Result<InProcess> {
    let rss_before = crate::rss_bytes(std::process::id()).unwrap_or(0);
    let mut applied = Applied::default();
    let spec = run_spec(per_run);
    let started = Instant::now();
    let runs = tasks.div_ceil(per_run);
    // Two runs per entry, as the proposer would batch them.
    for first in (0..runs).step_by(2) {
        let req = Request {
            now_us: 1,
            commands: (first..runs.min(first + 2))
                .map(|_| Command::SubmitRun {
                    idempotency_key: String::new(),
                    spec: spec.clone(),
                    submitted_by: "bench".into(),
                    placement: None,
                })
                .collect(),
        };
        applied.state.apply(1, &req);
    }
    let apply_secs = started.elapsed().as_secs_f64();
    let state_rss_bytes = crate::rss_bytes(std::process::id())
        .unwrap_or(0)
        .saturating_sub(rss_before);
    let started = Instant::now();
    let bytes = encode_snapshot(&applied)?;
    let encode_secs = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let restored = decode_snapshot(&bytes)?;
    let decode_secs = started.elapsed().as_secs_f64();
    anyhow::ensure!(
        restored.state.pending.len() == applied.state.pending.len(),
        "restored state lost tasks"
    );
    Ok(InProcess {
        tasks: applied.state.pending.len(),
        apply_secs,
        state_rss_bytes,
        snapshot_bytes: bytes.len(),
        encode_secs,
        decode_secs,
    })
}

/// Submits runs of `per_run` no-op tasks until `tasks` are accepted; returns (accepted, errors).
pub async fn fill(
    client: Arc<ClusterClient>,
    tasks: usize,
    per_run: usize,
    concurrency: usize,
) -> (usize, BTreeMap<String, u64>) {
    fill_gated(client, tasks, per_run, concurrency, noop_task(), None).await
}

/// A task the agent completes at once, without a process.
pub fn noop_task() -> pb::TaskSpec {
    pb::TaskSpec {
        kind: "noop".into(),
        ..Default::default()
    }
}

/// Holds submitters back while more than `max` accepted tasks have not completed yet, so a run
/// measures the rate the fabric sustains rather than how deep a queue it accepts.
#[derive(Debug, Clone)]
pub struct Gate {
    /// Tasks completed so far, kept current by the caller.
    pub completed: Arc<AtomicU64>,
    pub max: u64,
}

/// `fill` with runs of `task`, optionally gated on the tasks still outstanding.
pub async fn fill_gated(
    client: Arc<ClusterClient>,
    tasks: usize,
    per_run: usize,
    concurrency: usize,
    task: pb::TaskSpec,
    gate: Option<Gate>,
) -> (usize, BTreeMap<String, u64>) {
    let spec = pb::RunSpec {
        name: "backlog".into(),
        tasks: (0..per_run)
            .map(|i| pb::TaskSpec {
                name: format!("t{i}"),
                ..task.clone()
            })
            .collect(),
        ..Default::default()
    };
    let runs = tasks.div_ceil(per_run);
    let next = Arc::new(AtomicUsize::new(0));
    // Tasks accepted or being submitted, for the gate.
    let taken = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (client, spec, next, taken, gate) = (
            client.clone(),
            spec.clone(),
            next.clone(),
            taken.clone(),
            gate.clone(),
        );
        workers.push(tokio::spawn(async move {
            let (mut ok, mut errors) = (0usize, BTreeMap::<String, u64>::new());
            while next.fetch_add(1, Ordering::Relaxed) < runs {
                let n = spec.tasks.len() as u64;
                if let Some(g) = &gate {
                    while taken.load(Ordering::Relaxed) + n
                        > g.completed.load(Ordering::Relaxed) + g.max
                    {
                        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                    }
                }
                taken.fetch_add(n, Ordering::Relaxed);
                match droverctl::cli::submit(&client, spec.clone()).await {
                    Ok(_) => ok += spec.tasks.len(),
                    Err(e) => {
                        taken.fetch_sub(n, Ordering::Relaxed);
                        *errors.entry(format!("{:?}", e.code())).or_default() += 1;
                    }
                }
            }
            (ok, errors)
        }));
    }
    let (mut accepted, mut errors) = (0, BTreeMap::new());
    for w in workers {
        if let Ok((ok, e)) = w.await {
            accepted += ok;
            for (k, v) in e {
                *errors.entry(k).or_default() += v;
            }
        }
    }
    (accepted, errors)
}
