//! `droverctl dev`: a whole fabric on this machine in one command. Three coordinators (real Raft,
//! sled, mTLS) and two agents run in this process; logs go to DIR/dev.log.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use drover_proto::client::ClusterClient;
use drover_proto::tls::TlsFiles;

use crate::output;

const HELLO: &str = include_str!("../../examples/hello.yaml");

#[derive(Debug, Clone, Args)]
pub struct DevArgs {
    /// Where certificates, data and logs go.
    #[arg(long, default_value = ".drover-dev")]
    pub dir: PathBuf,
    /// First gRPC port; coordinators use PORT, PORT+1, PORT+2 and their HTTP ports PORT+100...
    #[arg(long, default_value_t = 7101)]
    pub base_port: u16,
    /// Number of agents.
    #[arg(long, default_value_t = 2)]
    pub agents: u32,
    /// Start everything and submit the demo, then exit instead of waiting for Ctrl-C.
    #[arg(long)]
    pub exit_after_demo: bool,
}

fn init_logging(dir: &Path) -> anyhow::Result<()> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("dev.log"))
        .context("opening dev.log")?;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DROVER_LOG").unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new("info,openraft=warn,sled=warn")
            }),
        )
        .with_ansi(false)
        .with_writer(std::sync::Mutex::new(file))
        .init();
    Ok(())
}

pub async fn run(args: DevArgs) -> anyhow::Result<i32> {
    let dir = &args.dir;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    init_logging(dir)?;
    let tls_dir = dir.join("tls");
    if !tls_dir.join("ca.pem").exists() {
        crate::certs::init(&tls_dir, 3, &[], false, crate::certs::VALID_FOR_DEFAULT)?;
        eprintln!("created a dev CA and certificates in {}", tls_dir.display());
    }
    let ports: Vec<u16> = (0..3).map(|i| args.base_port + i).collect();
    for p in &ports {
        if std::net::TcpListener::bind(("127.0.0.1", *p)).is_err() {
            bail!(
                "port {p} is in use (is another `droverctl dev` running?); pick others with --base-port"
            );
        }
    }
    let peers: Vec<String> = ports
        .iter()
        .enumerate()
        .map(|(i, p)| format!("{}=127.0.0.1:{p}", i + 1))
        .collect();
    let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let mut nodes = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let id = i as u64 + 1;
        let config = drover_coordinator::Config {
            config: None,
            node_id: id,
            listen: format!("127.0.0.1:{port}").parse()?,
            http_listen: format!("127.0.0.1:{}", port + 100).parse()?,
            data_dir: dir.join(format!("node-{id}")),
            peers: peers.clone(),
            tls_dir: tls_dir.clone(),
            tls_name: None,
            heartbeat_interval_ms: 1000,
            lease_ttl_ms: 4000,
            raft_heartbeat_ms: 50,
            election_timeout_ms: 150,
            election_timeout_max_ms: None,
            snapshot_logs: 5000,
            start_timeout_ms: 30_000,
            submitter_pending_tasks_max: 250_000,
            submitter_pending_bytes_max: 128 << 20,
            queue_pending_tasks_max: 500_000,
            queue_pending_bytes_max: 256 << 20,
            unplaced_timeout: std::time::Duration::from_secs(24 * 3600),
            lost_agent_retention: std::time::Duration::from_secs(24 * 3600),
            autoscale_interval: Duration::from_secs(2),
        };
        nodes.push(
            drover_coordinator::start(config)
                .await
                .with_context(|| format!("starting coordinator {id}"))?,
        );
    }
    eprintln!("started 3 coordinators on {}", addrs.join(", "));
    let mut agents = Vec::new();
    for n in 1..=args.agents {
        let name = format!("dev-agent-{n}");
        if !tls_dir.join(format!("{name}.pem")).exists() {
            crate::certs::issue(
                &tls_dir,
                "agent",
                &name,
                &[],
                crate::certs::VALID_FOR_DEFAULT,
            )?;
        }
        let config = drover_agent::Config {
            config: None,
            coordinator: addrs.clone(),
            tls_dir: tls_dir.clone(),
            tls_name: None,
            name: Some(name),
            labels: vec![format!("zone={}", if n % 2 == 1 { "a" } else { "b" })],
            resources: vec![],
            class: "default".into(),
            pool: "default".into(),
            cgroup_root: None,
            work_dir: dir.join(format!("agent-{n}")),
            log_retention_hours: 72,
            task_user: None,
            instance_id: None,
        };
        agents.push(
            drover_agent::start(config)
                .await
                .with_context(|| format!("starting agent {n}"))?,
        );
    }
    eprintln!("started {} agents", args.agents);

    let demo = demo(&addrs, &tls_dir).await;
    if let Err(e) = &demo {
        eprintln!("error: the demo run did not complete: {e:#}");
    }
    let tls_abs = std::fs::canonicalize(&tls_dir).unwrap_or(tls_dir.clone());
    eprintln!(
        "\nThe cluster is up. In another terminal:\n\n  export DROVER_ADDR={} DROVER_TLS_DIR={}\n  droverctl cluster status\n  droverctl agent list\n  droverctl run submit --wait -- echo hello\n  droverctl run watch $(droverctl run submit -f examples/etl.yaml)\n  droverctl run list\n\nHTTP: http://127.0.0.1:{}/metrics  /healthz  /readyz   Logs: {}\n",
        addrs.join(","),
        tls_abs.display(),
        args.base_port + 100,
        dir.join("dev.log").display()
    );
    if !args.exit_after_demo {
        eprintln!("Press Ctrl-C to stop everything.");
        tokio::signal::ctrl_c()
            .await
            .context("waiting for Ctrl-C")?;
    }
    eprintln!("stopping agents and coordinators");
    for a in agents {
        a.shutdown().await;
    }
    for n in nodes {
        n.shutdown().await;
    }
    Ok(if demo.is_ok() { 0 } else { 1 })
}

async fn demo(addrs: &[String], tls_dir: &Path) -> anyhow::Result<()> {
    let tls = TlsFiles::in_dir(tls_dir, "admin").load()?;
    let mut client = ClusterClient::new(addrs.to_vec(), tls);
    client.retry_deadline = Duration::from_secs(30);
    let spec = crate::spec::parse("examples/hello.yaml", HELLO)?;
    let resp = crate::cli::submit(&client, spec)
        .await
        .map_err(|e| anyhow::anyhow!(e.to_string()))?;
    eprintln!("submitted examples/hello.yaml as {}", resp.run_id);
    let run = crate::cli::wait_run(&client, &resp.run_id, Duration::from_secs(60)).await?;
    print!("\n{}", output::run_table(&run));
    if output::run_state(run.state) != "succeeded" {
        bail!("run {} ended {}", run.id, output::run_state(run.state));
    }
    Ok(())
}
