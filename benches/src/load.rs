//! `drover-bench load`: submit N single-task runs from C concurrent submitters (as fast as they
//! are accepted, or at a fixed rate), wait for every run to finish, and report throughput,
//! latency percentiles and errors by code. It also checks correctness: every accepted run ends
//! succeeded, exactly once (attempt 1), and none is missing.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use drover_proto::client::ClusterClient;
use drover_proto::pb;

use crate::percentile;

#[derive(Debug, Clone)]
pub enum Kind {
    /// Completed inside the agent, no process.
    Noop,
    /// A real child process.
    Process(Vec<String>),
}

#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub runs: usize,
    pub concurrency: usize,
    /// Submissions per second; None = as fast as they are accepted.
    pub rate: Option<f64>,
    pub kind: Kind,
    /// How long to wait for all runs to finish after the last submission.
    pub finish_timeout: Duration,
}

#[derive(Debug, Default)]
pub struct Report {
    pub submitted: usize,
    pub errors: BTreeMap<String, u64>,
    pub succeeded: usize,
    pub failed: usize,
    /// Runs whose task needed more than one attempt.
    pub rerun: usize,
    /// Accepted runs not found afterwards (must be 0).
    pub missing: usize,
    pub submit_secs: f64,
    pub accepted_per_sec: f64,
    pub completed_per_sec: f64,
    /// Microseconds from the client sending `SubmitRun` (its clock) to the leader's started /
    /// finished stamps: the tool and the cluster must share a clock (same host, or synchronised).
    pub start_us: Vec<u64>,
    pub finish_us: Vec<u64>,
    /// The leader's own stamps only: entry proposed to started.
    pub created_start_us: Vec<u64>,
}

impl Report {
    /// Every accepted run finished successfully, once, and none was lost.
    pub fn is_clean(&self) -> bool {
        self.missing == 0 && self.failed == 0 && self.rerun == 0 && self.succeeded == self.submitted
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "runs accepted: {} (errors by code: {:?})",
            self.submitted, self.errors
        )?;
        writeln!(
            f,
            "succeeded: {}, failed: {}, re-run: {}, missing: {}",
            self.succeeded, self.failed, self.rerun, self.missing
        )?;
        writeln!(f, "accepted/s:  {:.0}", self.accepted_per_sec)?;
        writeln!(f, "completed/s: {:.0}", self.completed_per_sec)?;
        for (name, v) in [
            ("submit->start ", &self.start_us),
            ("submit->finish", &self.finish_us),
            ("leader created->start", &self.created_start_us),
        ] {
            let ms = |us: u64| us as f64 / 1000.0;
            writeln!(
                f,
                "{name} ms: p50 {:.2} p90 {:.2} p99 {:.2} max {:.2}",
                ms(percentile(v, 0.5)),
                ms(percentile(v, 0.9)),
                ms(percentile(v, 0.99)),
                ms(v.last().copied().unwrap_or(0))
            )?;
        }
        Ok(())
    }
}

fn spec(kind: &Kind) -> pb::RunSpec {
    let task = match kind {
        Kind::Noop => pb::TaskSpec {
            name: "main".into(),
            kind: "noop".into(),
            ..Default::default()
        },
        Kind::Process(argv) => pb::TaskSpec {
            name: "main".into(),
            argv: argv.clone(),
            ..Default::default()
        },
    };
    pb::RunSpec {
        name: "bench".into(),
        tasks: vec![task],
        ..Default::default()
    }
}

pub async fn run(client: Arc<ClusterClient>, opts: &LoadOptions) -> anyhow::Result<Report> {
    let spec = spec(&opts.kind);
    let started = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..opts.concurrency.max(1) {
        let (client, spec, next, runs, rate) = (
            client.clone(),
            spec.clone(),
            next.clone(),
            opts.runs,
            opts.rate,
        );
        workers.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            let mut errors = BTreeMap::<String, u64>::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= runs {
                    break;
                }
                if let Some(rate) = rate {
                    let at = started + Duration::from_secs_f64(i as f64 / rate);
                    tokio::time::sleep_until(at.into()).await;
                }
                let sent_us = crate::unix_us();
                match droverctl::cli::submit(&client, spec.clone()).await {
                    Ok(r) => ids.push((r.run_id, sent_us)),
                    Err(e) => *errors.entry(format!("{:?}", e.code())).or_default() += 1,
                }
            }
            (ids, errors)
        }));
    }
    let mut report = Report::default();
    let mut ids = BTreeSet::new();
    let mut sent = BTreeMap::new();
    for w in workers {
        let (i, e) = w.await?;
        for (id, at) in i {
            ids.insert(id.clone());
            sent.insert(id, at);
        }
        for (k, v) in e {
            *report.errors.entry(k).or_default() += v;
        }
    }
    report.submit_secs = started.elapsed().as_secs_f64();
    report.submitted = ids.len();
    report.accepted_per_sec = ids.len() as f64 / report.submit_secs.max(0.001);

    // Wait for every accepted run, reading them back in pages of the newest runs.
    let deadline = Instant::now() + opts.finish_timeout;
    let runs = loop {
        let runs = fetch(&client, &ids).await?;
        let done = runs
            .values()
            .filter(|r| droverctl::output::is_terminal_run(r.state))
            .count();
        if done == ids.len() || Instant::now() > deadline {
            break runs;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (mut first_created, mut last_finished) = (u64::MAX, 0u64);
    for id in &ids {
        let Some(run) = runs.get(id) else {
            report.missing += 1;
            continue;
        };
        let t = &run.tasks[0];
        if run.state == pb::RunState::Succeeded as i32 {
            report.succeeded += 1;
        } else {
            report.failed += 1;
        }
        if t.attempt != 1 {
            report.rerun += 1;
        }
        first_created = first_created.min(t.created_at_us);
        last_finished = last_finished.max(t.finished_at_us);
        let sent_us = sent.get(id).copied().unwrap_or(t.created_at_us);
        report
            .start_us
            .push(t.started_at_us.saturating_sub(sent_us));
        report
            .finish_us
            .push(t.finished_at_us.saturating_sub(sent_us));
        report
            .created_start_us
            .push(t.started_at_us.saturating_sub(t.created_at_us));
    }
    report.start_us.sort_unstable();
    report.finish_us.sort_unstable();
    report.created_start_us.sort_unstable();
    // The leader's own stamps: first run created to last run finished.
    let secs = last_finished.saturating_sub(first_created) as f64 / 1e6;
    report.completed_per_sec = report.succeeded as f64 / secs.max(0.001);
    Ok(report)
}

/// Reads the given runs back through ListRuns pages (newest first).
async fn fetch(
    client: &ClusterClient,
    ids: &BTreeSet<String>,
) -> anyhow::Result<BTreeMap<String, pb::Run>> {
    let mut out = BTreeMap::new();
    let Some(newest) = ids.iter().filter_map(|i| drover_run_seq(i)).max() else {
        return Ok(out);
    };
    let oldest = ids
        .iter()
        .filter_map(|i| drover_run_seq(i))
        .min()
        .unwrap_or(0);
    let mut before = format!("run-{}", newest + 1);
    loop {
        let req = pb::ListRunsRequest {
            limit: 1000,
            before: before.clone(),
            ..Default::default()
        };
        let page = client
            .call(|mut c| {
                let req = req.clone();
                async move { c.list_runs(req).await }
            })
            .await
            .map_err(|e| anyhow::anyhow!(e.to_string()))?;
        let Some(last) = page.runs.last() else { break };
        before.clone_from(&last.id);
        let reached_oldest = drover_run_seq(&last.id).is_none_or(|s| s <= oldest);
        for r in page.runs {
            if ids.contains(&r.id) {
                out.insert(r.id.clone(), r);
            }
        }
        if reached_oldest {
            break;
        }
    }
    Ok(out)
}

fn drover_run_seq(id: &str) -> Option<u64> {
    id.strip_prefix("run-")?.parse().ok()
}
