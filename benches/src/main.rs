//! drover-bench: end-to-end load against a real cluster.
//!
//! `drover-bench load --spawn-cluster --runs 2000 --concurrency 64` starts 3 coordinators (fsync and
//! mTLS on: the real configuration) and an agent as processes, submits N single-task `true` runs
//! from C concurrent submitters, waits for all to finish, and reports throughput and latencies.
//! `--addr` and `--tls-dir` point it at an existing cluster instead.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use drover_proto::client::ClusterClient;
use drover_proto::pb;
use drover_proto::tls::TlsFiles;

#[derive(Parser)]
#[command(name = "drover-bench", about = "End-to-end load generator for Drover")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Submit runs and measure accepted/s, completed/s and latency percentiles.
    Load {
        #[arg(long, default_value_t = 1000)]
        runs: usize,
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        /// Start a 3-node cluster and one agent as processes for the measurement.
        #[arg(long)]
        spawn_cluster: bool,
        #[arg(long, env = "DROVER_ADDR", value_delimiter = ',')]
        addr: Vec<String>,
        #[arg(long, env = "DROVER_TLS_DIR")]
        tls_dir: Option<std::path::PathBuf>,
        /// Command each task runs.
        #[arg(long, default_value = "true")]
        command: String,
    },
}

fn pct(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    drover_proto::tls::install_crypto_provider();
    let Cmd::Load {
        runs,
        concurrency,
        spawn_cluster,
        addr,
        tls_dir,
        command,
    } = Cli::parse().cmd;
    let (_cluster, client) = if spawn_cluster {
        let mut cluster =
            drover_tests::Cluster::start(drover_tests::ClusterOptions::default()).await;
        cluster.start_agent("bench-agent", &[]);
        cluster
            .wait_agent_connected("bench-agent", Duration::from_secs(30))
            .await;
        let client = cluster.client();
        (Some(cluster), client)
    } else {
        let dir =
            tls_dir.context("--tls-dir (or DROVER_TLS_DIR) is needed without --spawn-cluster")?;
        if addr.is_empty() {
            bail!("--addr (or DROVER_ADDR) is needed without --spawn-cluster");
        }
        (
            None,
            ClusterClient::new(addr, TlsFiles::in_dir(&dir, "admin").load()?),
        )
    };
    let client = Arc::new(client);
    let spec = pb::RunSpec {
        name: "bench".into(),
        tasks: vec![pb::TaskSpec {
            name: "main".into(),
            argv: vec![command],
            ..Default::default()
        }],
        labels: Default::default(),
        strategy: String::new(),
    };
    let started = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (client, spec, next) = (client.clone(), spec.clone(), next.clone());
        workers.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            let mut errors = std::collections::BTreeMap::<String, u64>::new();
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < runs {
                match droverctl::cli::submit(&client, spec.clone()).await {
                    Ok(r) => ids.push(r.run_id),
                    Err(e) => *errors.entry(format!("{:?}", e.code())).or_default() += 1,
                }
            }
            (ids, errors)
        }));
    }
    let mut ids = Vec::new();
    let mut errors = std::collections::BTreeMap::<String, u64>::new();
    for w in workers {
        let (i, e) = w.await?;
        ids.extend(i);
        for (k, v) in e {
            *errors.entry(k).or_default() += v;
        }
    }
    let accepted_secs = started.elapsed().as_secs_f64();
    let mut start_lat = Vec::new();
    let mut finish_lat = Vec::new();
    let mut failed = 0;
    let (mut first_created, mut last_finished) = (u64::MAX, 0u64);
    for id in &ids {
        let run = droverctl::cli::wait_run(&client, id, Duration::from_secs(600)).await?;
        let t = &run.tasks[0];
        if run.state != pb::RunState::Succeeded as i32 {
            failed += 1;
        }
        first_created = first_created.min(t.created_at_ms);
        last_finished = last_finished.max(t.finished_at_ms);
        start_lat.push(t.started_at_ms.saturating_sub(t.created_at_ms));
        finish_lat.push(t.finished_at_ms.saturating_sub(t.created_at_ms));
    }
    // The leader's own stamps: first run created to last run finished.
    let completed_secs = (last_finished.saturating_sub(first_created) as f64 / 1000.0).max(0.001);
    start_lat.sort_unstable();
    finish_lat.sort_unstable();
    println!(
        "runs submitted: {} (errors by code: {errors:?}), failed runs: {failed}",
        ids.len()
    );
    println!("accepted/s:  {:.0}", ids.len() as f64 / accepted_secs);
    println!("completed/s: {:.0}", ids.len() as f64 / completed_secs);
    for (name, v) in [
        ("submit->start ", &start_lat),
        ("submit->finish", &finish_lat),
    ] {
        println!(
            "{name} ms: p50 {} p90 {} p99 {} max {}",
            pct(v, 0.5),
            pct(v, 0.9),
            pct(v, 0.99),
            v.last().copied().unwrap_or(0)
        );
    }
    Ok(())
}
