//! drover-bench: end-to-end measurements against a real cluster.
//!
//! `drover-bench load --spawn-cluster --runs 5000 --concurrency 64 --kind noop` starts 3
//! coordinators (fsync and mTLS on: the real configuration) and an agent as processes, submits
//! runs, waits for all of them, and reports throughput, latencies, errors and correctness.
//! `drover-bench fleet --spawn-cluster --agents 2000` connects simulated agents and measures the
//! leader's CPU, failure detection and false losses across a leader failover.
//! Without `--spawn-cluster`, `--addr` and `--tls-dir` point at an existing cluster.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use drover_benches::fleet::Fleet;
use drover_benches::load::{self, Kind, LoadOptions};
use drover_benches::scrape::Histogram;
use drover_proto::client::ClusterClient;
use drover_proto::pb;
use drover_proto::tls::TlsFiles;
use drover_tests::{Cluster, ClusterOptions};

#[derive(Parser)]
#[command(name = "drover-bench", about = "End-to-end measurements for Drover")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Clone)]
struct Target {
    /// Start a 3-node cluster as processes for the measurement.
    #[arg(long)]
    spawn_cluster: bool,
    #[arg(long, env = "DROVER_ADDR", value_delimiter = ',')]
    addr: Vec<String>,
    #[arg(long, env = "DROVER_TLS_DIR")]
    tls_dir: Option<std::path::PathBuf>,
    #[command(flatten)]
    files: AgentFiles,
}

/// Where the agents of a spawned cluster keep their files, and whether they outlive the run.
#[derive(Args, Clone)]
struct AgentFiles {
    /// With a spawned cluster: where the agents keep task logs and working directories (default:
    /// beside the coordinators' data). A tmpfs such as /dev/shm stands in for agent hosts'
    /// own disks; on the coordinators' filesystem their file creations slow every Raft log sync.
    #[arg(long)]
    agent_work_dir: Option<std::path::PathBuf>,
    /// Leave the agents' task logs and working directories under --agent-work-dir when the run
    /// ends. Deleting a large run's files on ext4 without a journal slows the next minutes' file
    /// creations (see docs/BENCHMARKS.md); keep them to compare process runs back to back.
    #[arg(long, requires = "agent_work_dir")]
    keep_agent_files: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// Submit runs and measure accepted/s, completed/s, latency percentiles and correctness.
    Load {
        #[command(flatten)]
        target: Target,
        #[arg(long, default_value_t = 1000)]
        runs: usize,
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        /// Submissions per second (default: as fast as they are accepted).
        #[arg(long)]
        rate: Option<f64>,
        /// noop (completed inside the agent) or process.
        #[arg(long, default_value = "process")]
        kind: String,
        /// Command for process tasks.
        #[arg(long, default_value = "true")]
        command: String,
        /// Agents to start with --spawn-cluster.
        #[arg(long, default_value_t = 1)]
        agents: usize,
    },
    /// SIGKILL the leader repeatedly under a steady submitter: time until writes are accepted again,
    /// and a check that no acknowledged submission was lost.
    Failover {
        #[arg(long, default_value_t = 20)]
        kills: usize,
    },
    /// A large queue: state size, snapshot and restore, in process and (with --spawn-cluster) in a
    /// real cluster with no agents.
    Backlog {
        #[arg(long, default_value_t = 1_000_000)]
        tasks: usize,
        #[arg(long, default_value_t = 1000)]
        tasks_per_run: usize,
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        /// Also fill a real 3-node cluster (started by the tool) and restart a follower.
        #[arg(long)]
        spawn_cluster: bool,
    },
    /// Tasks submitted in large runs (few calls, many tasks) through to completion on the agents
    /// of a cluster the tool starts: the fabric's task rate when submission is batched (no-op
    /// tasks), or the agents' process rate without a Raft round per task (process tasks).
    Wide {
        #[arg(long, default_value_t = 200_000)]
        tasks: usize,
        #[arg(long, default_value_t = 1000)]
        tasks_per_run: usize,
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        /// Hold submitters back while this many accepted tasks have not completed (0: no
        /// limit, submit as fast as accepted and let the queue grow).
        #[arg(long, default_value_t = 0)]
        outstanding: u64,
        /// SIGKILL the leader this many seconds in (once), to see the rate across a failover.
        #[arg(long)]
        kill_leader_after: Option<u64>,
        /// noop (completed inside the agent) or process.
        #[arg(long, default_value = "noop")]
        kind: String,
        /// Command for process tasks.
        #[arg(long, default_value = "true")]
        command: String,
        /// Agents to start.
        #[arg(long, default_value_t = 1)]
        agents: usize,
        #[command(flatten)]
        files: AgentFiles,
    },
    /// A fan-out/fan-in DAG (one step, N-2 steps that need it, one step that needs them all)
    /// through a 3-node cluster the tool starts, submit to completion, beside a run of the same
    /// steps with no dependencies, alternating.
    Dag {
        #[arg(long, default_value_t = 1000)]
        steps: usize,
        /// Times each shape is run.
        #[arg(long, default_value_t = 3)]
        repeat: usize,
        #[arg(long, default_value_t = 2)]
        agents: usize,
        /// noop (completed inside the agent) or process.
        #[arg(long, default_value = "process")]
        kind: String,
        /// Command for process steps.
        #[arg(long, default_value = "true")]
        command: String,
        #[command(flatten)]
        files: AgentFiles,
    },
    /// Connect simulated agents; measure leader CPU, loss detection and failover behaviour.
    Fleet {
        #[command(flatten)]
        target: Target,
        #[arg(long, default_value_t = 1000)]
        agents: usize,
        /// noop runs to push through the fleet (0 = none).
        #[arg(long, default_value_t = 2000)]
        runs: usize,
        /// Seconds of steady heartbeats over which the leader's CPU is measured.
        #[arg(long, default_value_t = 10)]
        steady_secs: u64,
    },
}

async fn connect(
    target: &Target,
    agents: usize,
) -> anyhow::Result<(
    Option<Cluster>,
    ClusterClient,
    Vec<String>,
    std::path::PathBuf,
)> {
    if target.spawn_cluster {
        if let Some(dir) = &target.files.agent_work_dir {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("--agent-work-dir {}", dir.display()))?;
        }
        let mut cluster = Cluster::start(ClusterOptions {
            agent_work_root: target.files.agent_work_dir.clone(),
            keep_agent_files: target.files.keep_agent_files,
            ..ClusterOptions::default()
        })
        .await;
        for i in 0..agents {
            let name = format!("bench-agent-{i}");
            cluster.start_agent(&name, &[]);
            cluster
                .wait_agent_connected(&name, Duration::from_secs(30))
                .await;
        }
        let client = cluster.client();
        let addrs = cluster.addrs();
        let tls_dir = cluster.tls_dir.clone();
        return Ok((Some(cluster), client, addrs, tls_dir));
    }
    let dir = target
        .tls_dir
        .clone()
        .context("--tls-dir (or DROVER_TLS_DIR) is needed without --spawn-cluster")?;
    if target.addr.is_empty() {
        bail!("--addr (or DROVER_ADDR) is needed without --spawn-cluster");
    }
    let client = ClusterClient::new(target.addr.clone(), TlsFiles::in_dir(&dir, "admin").load()?);
    Ok((None, client, target.addr.clone(), dir))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    drover_proto::tls::install_crypto_provider();
    match Cli::parse().cmd {
        Cmd::Load {
            target,
            runs,
            concurrency,
            rate,
            kind,
            command,
            agents,
        } => {
            let (cluster, client, _, _) = connect(&target, agents).await?;
            let kind = match kind.as_str() {
                "noop" => Kind::Noop,
                "process" => Kind::Process(command.split_whitespace().map(str::to_owned).collect()),
                other => bail!("--kind {other}: expected noop or process"),
            };
            let opts = LoadOptions {
                runs,
                concurrency,
                rate,
                kind,
                finish_timeout: Duration::from_secs(600),
            };
            let before = cluster.as_ref().map(inside_readings);
            let report = load::run(Arc::new(client), &opts).await?;
            print!("{report}");
            if let (Some(c), Some(before)) = (&cluster, &before) {
                print_inside(c, before);
            }
            if !report.is_clean() {
                bail!("correctness check failed: runs lost, failed or re-run");
            }
        }
        Cmd::Failover { kills } => failover(kills).await?,
        Cmd::Wide {
            tasks,
            tasks_per_run,
            concurrency,
            outstanding,
            kill_leader_after,
            kind,
            command,
            agents,
            files,
        } => {
            let task = match kind.as_str() {
                "noop" => drover_benches::backlog::noop_task(),
                "process" => pb::TaskSpec {
                    argv: command.split_whitespace().map(str::to_owned).collect(),
                    ..Default::default()
                },
                other => bail!("--kind {other}: expected noop or process"),
            };
            let shape = WideShape {
                tasks,
                per_run: tasks_per_run,
                concurrency,
                task,
                agents,
                files,
            };
            wide(shape, outstanding, kill_leader_after).await?
        }
        Cmd::Backlog {
            tasks,
            tasks_per_run,
            concurrency,
            spawn_cluster,
        } => backlog(tasks, tasks_per_run, concurrency, spawn_cluster).await?,
        Cmd::Dag {
            steps,
            repeat,
            agents,
            kind,
            command,
            files,
        } => dag(steps, repeat, agents, kind, command, files).await?,
        Cmd::Fleet {
            target,
            agents,
            runs,
            steady_secs,
        } => {
            let (cluster, client, addrs, tls_dir) = connect(&target, 0).await?;
            let started = Instant::now();
            let fleet = Fleet::start(addrs, &tls_dir, agents, "sim", 0).await?;
            let deadline = Instant::now() + Duration::from_secs(300);
            while fleet
                .stats
                .registered
                .load(std::sync::atomic::Ordering::Relaxed)
                < agents as u64
            {
                if Instant::now() > deadline {
                    bail!(
                        "only {} of {agents} agents registered",
                        fleet
                            .stats
                            .registered
                            .load(std::sync::atomic::Ordering::Relaxed)
                    );
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            println!(
                "{agents} simulated agents registered in {:.1}s",
                started.elapsed().as_secs_f64()
            );
            let client = Arc::new(client);
            if let Some(cluster) = &cluster {
                let leader = cluster.wait_leader(Duration::from_secs(10)).await;
                let pid = cluster.coordinator_pid(leader).context("leader pid")?;
                let before = drover_benches::cpu_seconds(pid).unwrap_or(0.0);
                tokio::time::sleep(Duration::from_secs(steady_secs)).await;
                let used = drover_benches::cpu_seconds(pid).unwrap_or(0.0) - before;
                println!(
                    "leader CPU with {agents} agents heartbeating: {:.2} cores (RSS {} MiB)",
                    used / steady_secs as f64,
                    drover_benches::rss_bytes(pid).unwrap_or(0) >> 20
                );
            }
            if runs > 0 {
                let opts = LoadOptions {
                    runs,
                    concurrency: 64,
                    rate: None,
                    kind: Kind::Noop,
                    finish_timeout: Duration::from_secs(600),
                };
                let report = load::run(client.clone(), &opts).await?;
                println!("noop runs through the fleet:");
                print!("{report}");
            }
            // A killed agent: how long until it is declared lost.
            let victim = format!("sim-{}", agents / 2);
            fleet.kill(agents / 2);
            let killed_at = Instant::now();
            loop {
                let state = drover_tests::get_agent(&client, &victim)
                    .await
                    .and_then(|r| r.agent)
                    .map(|a| a.state);
                if state == Some(pb::AgentState::Lost as i32) {
                    println!(
                        "killed agent detected as lost after {:.2}s",
                        killed_at.elapsed().as_secs_f64()
                    );
                    break;
                }
                if killed_at.elapsed() > Duration::from_secs(60) {
                    println!("killed agent NOT detected within 60s");
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            if let Some(mut cluster) = cluster {
                let leader = cluster.wait_leader(Duration::from_secs(10)).await;
                cluster.kill(leader);
                let killed = Instant::now();
                cluster.wait_leader(Duration::from_secs(30)).await;
                println!(
                    "leader SIGKILL -> new leader in {:.2}s",
                    killed.elapsed().as_secs_f64()
                );
                // A whole lease past the failover.
                tokio::time::sleep(Duration::from_secs(7)).await;
                let list = client
                    .call(|mut c| async move { c.list_agents(pb::ListAgentsRequest {}).await })
                    .await
                    .map_err(|e| anyhow::anyhow!(e.to_string()))?;
                let falsely_lost = list
                    .agents
                    .iter()
                    .filter(|a| a.state == pb::AgentState::Lost as i32 && a.name != victim)
                    .count();
                println!("agents falsely declared lost across the failover: {falsely_lost}");
                // Also any declared lost and back since: the replicated count of declarations.
                let declared = highest_metric(&cluster, "drover_agents_lost");
                println!(
                    "agents declared lost during the whole run, the killed one included: {declared}"
                );
                fleet.stop().await;
                drop(cluster);
            } else {
                fleet.stop().await;
            }
        }
    }
    Ok(())
}

/// Each node's histograms of log syncs and of proposals (proposed -> applied), in that order.
fn inside_readings(c: &Cluster) -> Vec<[Option<Histogram>; 2]> {
    (0..c.nodes.len())
        .map(|i| {
            let text = c.metrics_of(i);
            [
                Histogram::parse(&text, "drover_raft_log_sync_seconds"),
                Histogram::parse(&text, "drover_raft_proposal_seconds"),
            ]
        })
        .collect()
}

/// What the nodes spent inside the run: where submit -> start goes, from the nodes' own metrics
/// (bucket bounds, so a p50 here is an upper bound).
fn print_inside(c: &Cluster, before: &[[Option<Histogram>; 2]]) {
    let after = inside_readings(c);
    println!("inside the cluster during the run (count, bucket bounds of p50 and p99, mean):");
    for (i, (now, then)) in after.iter().zip(before).enumerate() {
        let since = |k: usize| match (&now[k], &then[k]) {
            (Some(n), Some(t)) => n.since(t),
            (Some(n), None) => n.clone(),
            _ => Histogram::default(),
        };
        let node = c.nodes[i].id;
        println!(
            "  node {node} Raft log syncs: {}",
            since(0).describe_seconds()
        );
        let proposals = since(1);
        if proposals.count > 0.0 {
            println!(
                "  node {node} proposals, proposed -> applied: {}",
                proposals.describe_seconds()
            );
        }
    }
}

/// The highest value of a metric among the nodes that answer (a killed one does not).
fn highest_metric(c: &Cluster, name: &str) -> f64 {
    (0..3).filter_map(|i| c.metric(i, name)).fold(0.0, f64::max)
}

/// No-op tasks submitted in runs of `per_run`, through to completion.
/// What `wide` submits, and to how many agents.
struct WideShape {
    tasks: usize,
    per_run: usize,
    concurrency: usize,
    task: pb::TaskSpec,
    agents: usize,
    files: AgentFiles,
}

async fn wide(
    shape: WideShape,
    outstanding: u64,
    kill_leader_after: Option<u64>,
) -> anyhow::Result<()> {
    let WideShape {
        tasks,
        per_run,
        concurrency,
        task,
        agents,
        files,
    } = shape;
    let what = if task.kind == "noop" {
        "no-op tasks".to_string()
    } else {
        format!("`{}` process tasks", task.argv.join(" "))
    };
    let target = Target {
        spawn_cluster: true,
        addr: vec![],
        tls_dir: None,
        files,
    };
    let (cluster, client, _, _) = connect(&target, agents.max(1)).await?;
    let mut cluster = cluster.context("spawned cluster")?;
    let term = |c: &Cluster| highest_metric(c, "drover_raft_term") as u64;
    let first_term = term(&cluster);
    let succeeded = |c: &Cluster| highest_metric(c, "drover_tasks_succeeded") as u64;
    let already = succeeded(&cluster);
    let inside_before = inside_readings(&cluster);
    let reports_before = agent_reports(&cluster);
    let host_before = drover_benches::HostCpu::read();
    let started = Instant::now();
    let completed = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let gate = (outstanding > 0).then(|| drover_benches::backlog::Gate {
        completed: completed.clone(),
        max: outstanding,
    });
    let mut fill = tokio::spawn(drover_benches::backlog::fill_gated(
        Arc::new(client),
        tasks,
        per_run,
        concurrency,
        task,
        gate,
    ));
    // Completions sampled often, to tell what the run sustained from its average (and to keep
    // the gate current).
    let mut samples = vec![(0.0, 0)];
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut filled = None;
    let mut submit_secs = 0.0;
    let mut killed: Option<f64> = None;
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        tokio::select! {
            r = &mut fill, if filled.is_none() => {
                filled = Some(r?);
                submit_secs = started.elapsed().as_secs_f64();
            }
            _ = tick.tick() => {}
        }
        if let Some(after) = kill_leader_after
            && started.elapsed() >= Duration::from_secs(after)
            && killed.is_none()
        {
            let leader = cluster.wait_leader(Duration::from_secs(10)).await;
            cluster.kill(leader);
            killed = Some(started.elapsed().as_secs_f64());
        }
        let done = succeeded(&cluster).saturating_sub(already);
        completed.store(done, std::sync::atomic::Ordering::Relaxed);
        samples.push((started.elapsed().as_secs_f64(), done));
        if let Some((accepted, _)) = &filled
            && done >= *accepted as u64
        {
            break;
        }
        if Instant::now() > deadline {
            bail!("only {done} tasks succeeded in time");
        }
    }
    let (accepted, errors) = filled.expect("filled before the loop ends");
    let secs = started.elapsed().as_secs_f64();
    // A leader change under load costs a pause and a reconnect of every agent: show it.
    let elections = term(&cluster).saturating_sub(first_term);
    println!(
        "{accepted} {what} in runs of {per_run} on {agents} agent(s): accepted in {submit_secs:.1}s, all succeeded after {secs:.1}s: {:.0} tasks/s submit to completion (errors {errors:?}; elections during the run: {elections})",
        accepted as f64 / secs
    );
    let lowest = |w: f64| {
        drover_benches::lowest_window_rate(&samples, w)
            .map_or_else(|| "(run too short)".to_string(), |r| format!("{r:.0}/s"))
    };
    println!(
        "completions, lowest over any 60 s: {}; over any 10 s: {}",
        lowest(60.0),
        lowest(10.0)
    );
    let slices: Vec<String> = drover_benches::slice_rates(&samples, 10.0)
        .iter()
        .map(|r| format!("{r:.0}"))
        .collect();
    println!("completions/s in each 10 s: {}", slices.join(" "));
    // Tasks a second moves with whatever else this (shared, virtual) host runs; CPU spent per
    // task moves less, and steal says how much the hypervisor took away.
    if let (Some(before), Some(after)) = (host_before, drover_benches::HostCpu::read()) {
        let (busy, steal) = after.since(&before);
        println!(
            "host CPU during the run: {:.0} us busy per task (everything on the host), {steal:.1}s stolen by the hypervisor",
            busy * 1e6 / accepted.max(1) as f64
        );
    }
    if let Some(at) = killed {
        println!("the leader was SIGKILLed {at:.1}s in");
    }
    let reports = agent_reports(&cluster);
    println!(
        "reports from the agents per task: {:.2} started, {:.2} finished",
        (reports[0] - reports_before[0]) / accepted.max(1) as f64,
        (reports[1] - reports_before[1]) / accepted.max(1) as f64
    );
    print_inside(&cluster, &inside_before);
    Ok(())
}

/// Task reports the nodes have received from agents: started, finished (summed over the nodes,
/// since agents follow the leader). A node killed during the run (`--kill-leader-after`) no
/// longer answers, so its share is missing and the figures read low.
fn agent_reports(c: &Cluster) -> [f64; 2] {
    ["task_started", "task_finished"].map(|kind| {
        let name = format!("drover_agent_reports_total{{kind=\"{kind}\"}}");
        (0..3).filter_map(|i| c.metric(i, &name)).sum()
    })
}

async fn backlog(
    tasks: usize,
    per_run: usize,
    concurrency: usize,
    spawn_cluster: bool,
) -> anyhow::Result<()> {
    use drover_benches::backlog;
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let p = tokio::task::spawn_blocking(move || backlog::in_process(tasks, per_run)).await??;
    println!(
        "in process: {} pending tasks applied in {:.2}s; state RSS {:.0} MiB; snapshot {:.0} MiB encoded in {:.2}s, decoded in {:.2}s (round trip {:.2}s)",
        p.tasks,
        p.apply_secs,
        mib(p.state_rss_bytes),
        mib(p.snapshot_bytes as u64),
        p.encode_secs,
        p.decode_secs,
        p.encode_secs + p.decode_secs
    );
    if !spawn_cluster {
        return Ok(());
    }
    // Snapshots every few entries, so the follower restarts from a snapshot holding the backlog.
    let mut cluster = Cluster::start(ClusterOptions {
        snapshot_logs: 20,
        ..ClusterOptions::default()
    })
    .await;
    let client = Arc::new(cluster.client());
    let started = Instant::now();
    let (accepted, errors) = backlog::fill(client, tasks, per_run, concurrency).await;
    let fill_secs = started.elapsed().as_secs_f64();
    let leader = cluster.wait_leader(Duration::from_secs(30)).await;
    let pid = cluster.coordinator_pid(leader).context("leader pid")?;
    println!(
        "cluster: {accepted} tasks accepted in {fill_secs:.1}s ({:.0} tasks/s; errors {errors:?}); leader RSS {:.0} MiB",
        accepted as f64 / fill_secs,
        mib(drover_benches::rss_bytes(pid).unwrap_or(0))
    );
    let applied = |c: &Cluster, i: usize| c.metric(i, "drover_raft_applied_index").unwrap_or(0.0);
    let target = applied(&cluster, leader);
    let follower = (0..3).find(|&i| i != leader).expect("a follower");
    let restarted = Instant::now();
    cluster.restart(follower);
    let deadline = Instant::now() + Duration::from_secs(120);
    while applied(&cluster, follower) < target {
        if Instant::now() > deadline {
            bail!("follower not caught up within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let sum = |i: usize, m: &str| cluster.metric(i, m).unwrap_or(0.0);
    let builds = sum(leader, "drover_snapshot_build_seconds_count");
    println!(
        "snapshots built by the leader: {builds} (mean {:.2}s, newest {:.0} MiB); follower restarted and applied everything again in {:.2}s",
        sum(leader, "drover_snapshot_build_seconds_sum") / builds.max(1.0),
        sum(leader, "drover_snapshot_bytes") / (1024.0 * 1024.0),
        restarted.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Kills the leader `kills` times while a client submits continuously.
/// The steps of a fan-out/fan-in DAG of `n` steps, or (`flat`) the same steps without
/// dependencies.
fn dag_spec(n: usize, flat: bool, kind: &str, command: &str) -> pb::RunSpec {
    let step = |name: String, deps: Vec<String>| pb::TaskSpec {
        name,
        depends_on: if flat { vec![] } else { deps },
        argv: if kind == "noop" {
            vec![]
        } else {
            vec![command.to_owned()]
        },
        kind: kind.to_owned(),
        ..Default::default()
    };
    let middle: Vec<String> = (0..n.saturating_sub(2)).map(|i| format!("m{i}")).collect();
    let mut tasks = vec![step("fan-out".into(), vec![])];
    tasks.extend(
        middle
            .iter()
            .map(|m| step(m.clone(), vec!["fan-out".into()])),
    );
    tasks.push(step("fan-in".into(), middle));
    pb::RunSpec {
        name: if flat { "flat" } else { "dag" }.into(),
        tasks,
        ..Default::default()
    }
}

async fn dag(
    steps: usize,
    repeat: usize,
    agents: usize,
    kind: String,
    command: String,
    files: AgentFiles,
) -> anyhow::Result<()> {
    let target = Target {
        spawn_cluster: true,
        addr: vec![],
        tls_dir: None,
        files,
    };
    let (_cluster, client, _, _) = connect(&target, agents.max(1)).await?;
    let mut times: [Vec<u64>; 2] = [Vec::new(), Vec::new()];
    for round in 0..repeat {
        for (i, flat) in [false, true].into_iter().enumerate() {
            let spec = dag_spec(steps, flat, &kind, &command);
            let sent = Instant::now();
            let id = droverctl::cli::submit(&client, spec).await?.run_id;
            let run = droverctl::cli::wait_run(&client, &id, Duration::from_secs(600)).await?;
            let wall = sent.elapsed().as_millis() as u64;
            if droverctl::output::run_state(run.state) != "succeeded" {
                bail!("{id} ended {}", droverctl::output::run_state(run.state));
            }
            // The leader's own clock, submission to the last step's end.
            let took = run.finished_at_ms.saturating_sub(run.created_at_ms);
            println!(
                "round {}: {} of {steps} steps: {took} ms in the cluster ({wall} ms at the client)",
                round + 1,
                if flat {
                    "flat run"
                } else {
                    "fan-out/fan-in DAG"
                },
            );
            times[i].push(took);
        }
    }
    let median = |v: &mut Vec<u64>| {
        v.sort_unstable();
        drover_benches::percentile(v, 0.5)
    };
    let (d, f) = (median(&mut times[0]), median(&mut times[1]));
    println!(
        "median over {repeat} rounds, {agents} agents, {kind} steps: DAG {d} ms, flat {f} ms, DAG/flat {:.2}",
        d as f64 / f.max(1) as f64
    );
    Ok(())
}

async fn failover(kills: usize) -> anyhow::Result<()> {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, Ordering};
    let mut cluster = Cluster::start(ClusterOptions::default()).await;
    let client = Arc::new(cluster.client_as("admin", cluster.addrs()));
    // Every acknowledged submission, with the time it was acknowledged.
    let acked: Arc<Mutex<Vec<(String, Instant, Instant)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let submitter = {
        let (client, acked, stop) = (client.clone(), acked.clone(), stop.clone());
        tokio::spawn(async move {
            let spec = pb::RunSpec {
                name: "failover".into(),
                tasks: vec![pb::TaskSpec {
                    name: "main".into(),
                    kind: "noop".into(),
                    ..Default::default()
                }],
                ..Default::default()
            };
            while !stop.load(Ordering::Relaxed) {
                let sent = Instant::now();
                if let Ok(r) = droverctl::cli::submit(&client, spec.clone()).await {
                    acked.lock().unwrap().push((r.run_id, sent, Instant::now()));
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let mut recoveries = Vec::new();
    for k in 0..kills {
        // Let every node catch up before the next kill, so any two nodes form a quorum with all data.
        tokio::time::sleep(Duration::from_millis(500)).await;
        // The node that says it leads right now (a status read a moment ago may be stale).
        let leader = loop {
            let l = cluster.wait_leader(Duration::from_secs(30)).await;
            if cluster.metric(l, "drover_raft_is_leader") == Some(1.0) {
                break l;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let killed_at = Instant::now();
        cluster.kill(leader);
        // The first submission sent after the kill and acknowledged: one sent before and
        // acknowledged just after committed before the leader died.
        let recovered = loop {
            if let Some((_, sent, t)) = acked.lock().unwrap().last()
                && *sent > killed_at
            {
                break *t;
            }
            if killed_at.elapsed() > Duration::from_secs(30) {
                bail!("writes not accepted within 30 s after kill {k}");
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        let ms = recovered.duration_since(killed_at).as_millis() as u64;
        println!(
            "kill {:>2}: node {} killed, writes accepted again after {ms} ms",
            k + 1,
            leader + 1
        );
        recoveries.push(ms);
        cluster.restart(leader);
    }
    stop.store(true, Ordering::Relaxed);
    submitter.await?;
    recoveries.sort_unstable();
    println!(
        "leader SIGKILL -> writes accepted again over {kills} kills: median {} ms, p99 {} ms, max {} ms",
        drover_benches::percentile(&recoveries, 0.5),
        drover_benches::percentile(&recoveries, 0.99),
        recoveries.last().copied().unwrap_or(0)
    );
    // No acknowledged submission lost.
    cluster.wait_leader(Duration::from_secs(30)).await;
    let acked: Vec<String> = acked
        .lock()
        .unwrap()
        .iter()
        .map(|(id, _, _)| id.clone())
        .collect();
    let mut missing = 0;
    for id in &acked {
        if droverctl::cli::get_run(&client, id).await.is_err() {
            missing += 1;
        }
    }
    println!(
        "acknowledged submissions: {}, missing afterwards: {missing}",
        acked.len()
    );
    if missing > 0 {
        bail!("{missing} acknowledged submissions were lost");
    }
    Ok(())
}
