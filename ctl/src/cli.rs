//! The droverctl command line.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use clap::{Args, Parser, Subcommand};
use drover_proto::client::{CallError, ClusterClient};
use drover_proto::pb;
use drover_proto::tls::{TlsFiles, TlsMaterial};

use crate::output::{self, Format};

#[derive(Debug, Parser)]
#[command(
    name = "droverctl",
    version,
    about = "Submit and inspect Drover runs, administer the cluster, run a local dev cluster"
)]
pub struct Cli {
    #[command(flatten)]
    pub conn: Conn,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Args)]
pub struct Conn {
    /// Coordinator addresses, comma-separated; any member will do.
    #[arg(
        long,
        global = true,
        env = "DROVER_ADDR",
        value_delimiter = ',',
        default_value = "127.0.0.1:7101"
    )]
    pub addr: Vec<String>,
    /// Directory with ca.pem, NAME.pem, NAME-key.pem.
    #[arg(
        long,
        global = true,
        env = "DROVER_TLS_DIR",
        default_value = ".drover-dev/tls"
    )]
    pub tls_dir: PathBuf,
    /// Certificate name inside --tls-dir.
    #[arg(long, global = true, env = "DROVER_TLS_NAME", default_value = "admin")]
    pub tls_name: String,
    /// CA certificate file (overrides --tls-dir).
    #[arg(long, global = true, env = "DROVER_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate file (overrides --tls-dir).
    #[arg(long, global = true, env = "DROVER_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// Client key file (overrides --tls-dir).
    #[arg(long, global = true, env = "DROVER_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// How long to keep retrying while the cluster elects a leader or a node is down.
    #[arg(long, global = true, env = "DROVER_TIMEOUT", default_value = "20s", value_parser = parse_duration)]
    pub timeout: Duration,
}

/// One call through the leader-following client; a retry sends the same request again.
macro_rules! rpc {
    ($client:expr, $method:ident, $req:expr) => {{
        let req = $req;
        $client
            .call(|mut c| {
                let req = req.clone();
                async move { c.$method(req).await }
            })
            .await
            .map_err(call_err)
    }};
}

fn parse_expr(s: &str) -> Result<pb::LabelExpression, String> {
    drover_proto::selector::parse(s)
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    drover_proto::quantity::parse_duration(s)
}

impl Conn {
    pub fn tls(&self) -> anyhow::Result<TlsMaterial> {
        let mut files = TlsFiles::in_dir(&self.tls_dir, &self.tls_name);
        if let Some(p) = &self.tls_ca {
            files.ca = p.clone();
        }
        if let Some(p) = &self.tls_cert {
            files.cert = p.clone();
        }
        if let Some(p) = &self.tls_key {
            files.key = p.clone();
        }
        Ok(files.load()?)
    }

    pub fn client(&self) -> anyhow::Result<ClusterClient> {
        let mut c = ClusterClient::new(self.addr.clone(), self.tls()?);
        c.retry_deadline = self.timeout;
        Ok(c)
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create and issue certificates.
    #[command(subcommand)]
    Certs(CertsCmd),
    /// Submit and inspect runs.
    #[command(subcommand)]
    Run(RunCmd),
    /// Inspect agents.
    #[command(subcommand)]
    Agent(AgentCmd),
    /// Inspect the coordinator cluster.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Steps that failed for good: list, retry (the run resumes), drop.
    #[command(subcommand)]
    Dlq(DlqCmd),
    /// Queue limits: concurrency, start rate, pending tasks.
    #[command(subcommand)]
    Queue(QueueCmd),
    /// Agent pools and their autoscaling: apply, list, get.
    #[command(subcommand)]
    Pool(PoolCmd),
    /// Start a local 3-node coordinator cluster and 2 agents with mTLS, submit a demo run, and
    /// keep running until Ctrl-C.
    Dev(crate::dev::DevArgs),
}

#[derive(Debug, Subcommand)]
pub enum CertsCmd {
    /// Create a CA and certificates for the coordinators and each client role (agents get theirs
    /// with `issue --role agent --name NAME`). The CA key goes to DIR/private/.
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// How many coordinator certificates (coordinator-1..N).
        #[arg(long, default_value_t = 3)]
        coordinators: u32,
        /// Extra DNS names or IPs for the coordinators' certificates (e.g. container host names).
        #[arg(long, value_delimiter = ',')]
        san: Vec<String>,
        /// Replace an existing CA in --dir.
        #[arg(long)]
        force: bool,
        /// How long the certificates are valid (the CA: 10 years).
        #[arg(long, value_parser = parse_duration, default_value = "365d")]
        valid_for: Duration,
    },
    /// Issue one more certificate from the CA in --dir. An agent's name is its certificate's.
    Issue {
        #[arg(long)]
        dir: PathBuf,
        /// coordinator, agent, admin, operator, submitter or viewer.
        #[arg(long)]
        role: String,
        /// Certificate name (files NAME.pem, NAME-key.pem; also its CommonName).
        #[arg(long)]
        name: String,
        /// Extra DNS names or IPs (coordinators only: only they serve).
        #[arg(long, value_delimiter = ',')]
        san: Vec<String>,
        #[arg(long, value_parser = parse_duration, default_value = "365d")]
        valid_for: Duration,
    },
    /// Issue certificates again with a new key and expiry, keeping role, name and host names.
    Renew {
        #[arg(long)]
        dir: PathBuf,
        /// Certificate names to renew.
        names: Vec<String>,
        /// Renew every certificate in --dir (not the CA).
        #[arg(long, conflicts_with = "names")]
        all: bool,
        #[arg(long, value_parser = parse_duration, default_value = "365d")]
        valid_for: Duration,
    },
    /// List the certificates in --dir with their roles and expiry.
    List {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Copy what one member needs (ca.pem, NAME.pem, NAME-key.pem) into --out: no CA key, no
    /// other member's key.
    Bundle {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum RunCmd {
    /// Submit a run from a spec file (-f) or a command after `--`.
    Submit {
        /// YAML run spec.
        #[arg(short = 'f', long = "file", conflicts_with = "shell")]
        file: Option<PathBuf>,
        /// Run this string with `sh -c` instead of an argv after `--`.
        #[arg(long)]
        shell: Option<String>,
        /// Run name (for command submissions).
        #[arg(long)]
        name: Option<String>,
        /// Timeout for a command submission, e.g. 30s.
        #[arg(long, value_parser = parse_duration)]
        task_timeout: Option<Duration>,
        /// Resource class for a command submission.
        #[arg(long)]
        class: Option<String>,
        /// Required label expression (repeatable), e.g. --require 'zone = a'.
        #[arg(long = "require", value_parser = parse_expr)]
        require: Vec<pb::LabelExpression>,
        /// cpu request, e.g. 500m or 2.
        #[arg(long, value_parser = drover_proto::quantity::parse_cpu_millis)]
        cpu: Option<u64>,
        /// memory request, e.g. 512Mi.
        #[arg(long, value_parser = drover_proto::quantity::parse_bytes)]
        memory: Option<u64>,
        /// Priority (higher runs first).
        #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
        priority: i32,
        /// Wait for the run to finish, print it, and exit non-zero unless it succeeded.
        #[arg(long)]
        wait: bool,
        /// Override a parameter of the spec (repeatable): --param DATE=2026-11-02.
        #[arg(long = "param", value_parser = parse_param)]
        params: Vec<(String, String)>,
        /// Submitting again with the same key returns the run the first submission created
        /// (kept as long as that run is). Default: a fresh key per invocation.
        #[arg(long)]
        idempotency_key: Option<String>,
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Format,
        /// The command and its arguments.
        #[arg(last = true)]
        argv: Vec<String>,
    },
    /// Check a spec file as the coordinator would, without submitting it.
    Validate {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        #[arg(long = "param", value_parser = parse_param)]
        params: Vec<(String, String)>,
    },
    /// Cancel a run (every unfinished step), or one step and what depends on it.
    Cancel {
        id: String,
        #[arg(long)]
        step: Option<String>,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Follow a run live until it finishes; exit 0 if it succeeded, 1 if it failed, 3 if it was
    /// cancelled.
    Watch {
        id: String,
        /// Print each change as a JSON run instead of step lines.
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Format,
    },
    /// Show one run, its tasks, results and why pending tasks are pending.
    Get {
        id: String,
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Format,
    },
    /// List runs, newest first.
    List {
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Only runs in this state: pending, running, succeeded, failed, cancelled.
        #[arg(long)]
        state: Option<String>,
        /// Only runs with a step in this queue.
        #[arg(long)]
        queue: Option<String>,
        /// Only runs with this name (or a prefix ending in '*').
        #[arg(long)]
        name: Option<String>,
        /// Only runs submitted within this long, e.g. 2h.
        #[arg(long, value_parser = parse_duration)]
        since: Option<Duration>,
        /// Only runs older than this run id: the next page (printed at the end of a page).
        #[arg(long, default_value = "")]
        before: String,
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Format,
    },
    /// Print a task's output (the agent's full log when reachable, else the replicated tail).
    Logs {
        id: String,
        /// Step name; may be omitted for single-step runs.
        #[arg(long, visible_alias = "task")]
        step: Option<String>,
        /// Show stderr instead of stdout.
        #[arg(long)]
        stderr: bool,
        /// Keep printing output as the step writes it, until it finishes.
        #[arg(short = 'f', long)]
        follow: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum DlqCmd {
    /// Dead letters, newest first.
    List {
        #[arg(long)]
        queue: Option<String>,
        #[arg(long)]
        run: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[arg(long, default_value = "")]
        before: String,
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Format,
    },
    /// Start a new attempt of the letter's step; its run resumes.
    Retry { id: String },
    /// Forget a dead letter (its run stays failed).
    Drop { id: String },
}

#[derive(Debug, Subcommand)]
pub enum PoolCmd {
    /// Replace the pools with those in a file (see docs/autoscaling.md).
    Apply {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    List {
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Format,
    },
    /// A pool's size, demand, recent decisions with their reasons, and hook health.
    Get {
        name: String,
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Format,
    },
}

#[derive(Debug, Subcommand)]
pub enum QueueCmd {
    /// Queues with limits or tasks.
    List {
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Format,
    },
    Get {
        name: String,
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Format,
    },
    /// Set a queue's limits (each 0 = none); limits not given keep their value.
    Set {
        name: String,
        /// Tasks of the queue assigned or running at once.
        #[arg(long)]
        max_concurrency: Option<u32>,
        /// Tasks started per second (may be fractional, e.g. 0.5).
        #[arg(long)]
        rate: Option<f64>,
        /// Starts allowed at once after a quiet spell (token bucket size).
        #[arg(long)]
        burst: Option<u32>,
        /// Tasks waiting for an agent; submissions beyond it are refused.
        #[arg(long)]
        max_pending: Option<u64>,
    },
}

fn parse_param(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("'{s}' is not NAME=VALUE"))?;
    if !drover_coordinator::params::valid_name(k) {
        return Err(format!(
            "'{k}' is not a parameter name (letters, digits, '_')"
        ));
    }
    Ok((k.to_owned(), v.to_owned()))
}

#[derive(Debug, Subcommand)]
pub enum AgentCmd {
    /// List agents with capacity, state and heartbeat age.
    List {
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Format,
    },
    /// Show one agent and the tasks placed on it.
    Get {
        name: String,
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Format,
    },
    /// Stop placing tasks on an agent; running tasks finish (or, after --deadline, are stopped and re-queued).
    Drain {
        name: String,
        /// e.g. 10m; without it, running tasks may take as long as they need.
        #[arg(long, value_parser = parse_duration)]
        deadline: Option<Duration>,
    },
    /// Let a drained agent take tasks again.
    Undrain { name: String },
}

#[derive(Debug, Subcommand)]
pub enum ClusterCmd {
    /// Leader, term, commit and applied index, members and their health.
    Status {
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Format,
    },
}

fn call_err(e: CallError) -> anyhow::Error {
    anyhow!(e.to_string())
}

/// A key no other submission has: 128 random bits from the kernel. Without them (a sandbox
/// refusing getrandom), the time, the process and a counter, which still differ per submission;
/// never a fixed value, which would make every such submission a "retry" of the first.
pub fn random_key() -> String {
    let mut buf = [0u8; 16];
    // SAFETY: getrandom(2) writes at most `buf.len()` bytes into `buf`.
    let got = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    if got == buf.len() as isize {
        return buf.iter().map(|b| format!("{b:02x}")).collect();
    }
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "t{nanos:x}-p{:x}-n{:x}",
        std::process::id(),
        COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    )
}

pub async fn submit(
    client: &ClusterClient,
    spec: pb::RunSpec,
) -> Result<pb::SubmitRunResponse, CallError> {
    // One key for every retry of this submission, so a retried write cannot create a second run.
    submit_keyed(client, spec, random_key()).await
}

pub async fn submit_keyed(
    client: &ClusterClient,
    spec: pb::RunSpec,
    key: String,
) -> Result<pb::SubmitRunResponse, CallError> {
    client
        .call(|mut c| {
            let req = pb::SubmitRunRequest {
                spec: Some(spec.clone()),
                idempotency_key: key.clone(),
            };
            async move { c.submit_run(req).await }
        })
        .await
}

pub async fn get_run(client: &ClusterClient, id: &str) -> Result<pb::Run, CallError> {
    client
        .call(|mut c| {
            let req = pb::GetRunRequest {
                run_id: id.to_owned(),
            };
            async move { c.get_run(req).await }
        })
        .await
}

/// Polls until the run is terminal or `timeout` passes.
pub async fn wait_run(
    client: &ClusterClient,
    id: &str,
    timeout: Duration,
) -> anyhow::Result<pb::Run> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut pause = Duration::from_millis(20);
    loop {
        let run = get_run(client, id).await.map_err(call_err)?;
        if output::is_terminal_run(run.state) {
            return Ok(run);
        }
        if tokio::time::Instant::now() + pause > deadline {
            bail!(
                "run {id} is still {} after {:?}",
                output::run_state(run.state),
                timeout
            );
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(500));
    }
}

/// Runs the parsed command. Returns the process exit code.
pub async fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Certs(CertsCmd::Init {
            dir,
            coordinators,
            san,
            force,
            valid_for,
        }) => {
            let made = crate::certs::init(&dir, coordinators, &san, force, valid_for)?;
            eprintln!(
                "created {} certificates in {}: {}",
                made.len(),
                dir.display(),
                made.join(", ")
            );
            Ok(0)
        }
        Command::Certs(CertsCmd::Issue {
            dir,
            role,
            name,
            san,
            valid_for,
        }) => {
            crate::certs::issue(&dir, &role, &name, &san, valid_for)?;
            eprintln!("issued {name}.pem ({role}) in {}", dir.display());
            Ok(0)
        }
        Command::Certs(CertsCmd::Renew {
            dir,
            names,
            all,
            valid_for,
        }) => {
            let names = if all {
                crate::certs::list(&dir)?
                    .into_iter()
                    .map(|c| c.name)
                    .collect()
            } else if names.is_empty() {
                anyhow::bail!("name the certificates to renew, or pass --all");
            } else {
                names
            };
            for c in crate::certs::renew(&dir, &names, valid_for)? {
                println!("{}", output::cert_line(&c));
            }
            Ok(0)
        }
        Command::Certs(CertsCmd::List { dir }) => {
            for c in crate::certs::list(&dir)? {
                println!("{}", output::cert_line(&c));
            }
            Ok(0)
        }
        Command::Certs(CertsCmd::Bundle { dir, name, out }) => {
            let out = crate::certs::bundle(&dir, &name, &out)?;
            eprintln!(
                "wrote ca.pem, {name}.pem and {name}-key.pem to {}",
                out.display()
            );
            Ok(0)
        }
        Command::Dev(args) => crate::dev::run(args).await,
        Command::Run(cmd) => run_cmd(&cli.conn, cmd).await,
        Command::Dlq(cmd) => dlq_cmd(&cli.conn, cmd).await,
        Command::Queue(cmd) => queue_cmd(&cli.conn, cmd).await,
        Command::Pool(cmd) => pool_cmd(&cli.conn, cmd).await,
        Command::Agent(AgentCmd::List { output }) => {
            let client = cli.conn.client()?;
            let resp = client
                .call(|mut c| async move { c.list_agents(pb::ListAgentsRequest {}).await })
                .await
                .map_err(call_err)?;
            output::print_list(
                output,
                &resp.agents,
                output::agents_table,
                output::agent_json,
            );
            Ok(0)
        }
        Command::Agent(AgentCmd::Get { name, output }) => {
            let client = cli.conn.client()?;
            let resp = client
                .call(|mut c| {
                    let name = name.clone();
                    async move { c.get_agent(pb::GetAgentRequest { name }).await }
                })
                .await
                .map_err(call_err)?;
            match output {
                Format::Table => print!("{}", output::agent_detail(&resp)),
                Format::Json => {
                    let mut v = resp
                        .agent
                        .as_ref()
                        .map(output::agent_json)
                        .unwrap_or_default();
                    v["tasks"] = serde_json::Value::Array(
                        resp.tasks.iter().map(output::task_json).collect(),
                    );
                    output::print_json(&v)
                }
            }
            Ok(0)
        }
        Command::Agent(AgentCmd::Drain { name, deadline }) => {
            let client = cli.conn.client()?;
            let deadline_ms = deadline.map_or(0, |d| d.as_millis() as u64);
            let resp = client
                .call(|mut c| {
                    let name = name.clone();
                    async move {
                        c.drain_agent(pb::DrainAgentRequest { name, deadline_ms })
                            .await
                    }
                })
                .await
                .map_err(call_err)?;
            let running = resp.agent.as_ref().map_or(0, |a| a.running_tasks);
            match deadline {
                Some(d) => eprintln!(
                    "draining {name}: no new tasks; {running} running task(s) get {d:?} before they are stopped and re-queued"
                ),
                None => {
                    eprintln!("draining {name}: no new tasks; {running} running task(s) may finish")
                }
            }
            Ok(0)
        }
        Command::Agent(AgentCmd::Undrain { name }) => {
            let client = cli.conn.client()?;
            client
                .call(|mut c| {
                    let name = name.clone();
                    async move { c.undrain_agent(pb::UndrainAgentRequest { name }).await }
                })
                .await
                .map_err(call_err)?;
            eprintln!("{name} takes tasks again");
            Ok(0)
        }
        Command::Cluster(ClusterCmd::Status { output }) => {
            let client = cli.conn.client()?;
            let resp = client
                .call(|mut c| async move { c.cluster_status(pb::ClusterStatusRequest {}).await })
                .await
                .map_err(call_err)?;
            match output {
                Format::Table => print!("{}", output::cluster_table(&resp)),
                Format::Json => output::print_json(&output::cluster_json(&resp)),
            }
            Ok(0)
        }
    }
}

async fn run_cmd(conn: &Conn, cmd: RunCmd) -> anyhow::Result<i32> {
    let client = conn.client()?;
    match cmd {
        RunCmd::Submit {
            file,
            shell,
            name,
            task_timeout,
            class,
            require,
            cpu,
            memory,
            priority,
            wait,
            params,
            idempotency_key,
            output,
            argv,
        } => {
            let placement = Placement {
                class,
                require,
                cpu,
                memory,
                priority,
            };
            let spec = match (file, shell, argv.is_empty()) {
                (Some(path), None, true) => load_spec(&path, &params)?,
                (Some(_), _, false) => bail!("give either -f FILE or a command after --, not both"),
                (None, Some(sh), true) => {
                    command_spec(name, Vec::new(), sh, task_timeout, placement)
                }
                (None, None, false) => {
                    command_spec(name, argv, String::new(), task_timeout, placement)
                }
                (None, Some(_), false) => {
                    bail!("give either --shell or a command after --, not both")
                }
                (None, None, true) => {
                    bail!("nothing to run: give -f FILE, --shell 'CMD', or -- CMD ARGS...")
                }
                (Some(_), Some(_), _) => unreachable!("clap rejects -f with --shell"),
            };
            let mut spec = spec;
            crate::spec::override_params(&mut spec, &params);
            crate::spec::check("command", None, &spec)?;
            let key = idempotency_key.unwrap_or_else(random_key);
            let resp = submit_keyed(&client, spec, key).await.map_err(call_err)?;
            if resp.deduplicated {
                eprintln!(
                    "{} was submitted before with this idempotency key; not submitted again",
                    resp.run_id
                );
            }
            if !wait {
                match output {
                    Format::Table => println!("{}", resp.run_id),
                    Format::Json => output::print_json(
                        &serde_json::json!({"run_id": resp.run_id, "deduplicated": resp.deduplicated}),
                    ),
                }
                return Ok(0);
            }
            eprintln!("submitted {}; waiting for it to finish", resp.run_id);
            let run = wait_run(&client, &resp.run_id, Duration::from_secs(24 * 3600)).await?;
            match output {
                Format::Table => print!("{}", output::run_table(&run)),
                Format::Json => output::print_json(&output::run_json(&run)),
            }
            Ok(if output::run_state(run.state) == "succeeded" {
                0
            } else {
                1
            })
        }
        RunCmd::Get { id, output } => {
            let run = get_run(&client, &id).await.map_err(call_err)?;
            match output {
                Format::Table => print!("{}", output::run_table(&run)),
                Format::Json => output::print_json(&output::run_json(&run)),
            }
            Ok(0)
        }
        RunCmd::List {
            limit,
            state,
            queue,
            name,
            since,
            before,
            output,
        } => {
            let since_ms = since.map_or(0, |d| {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default();
                now.saturating_sub(d).as_millis() as u64
            });
            let req = pb::ListRunsRequest {
                limit,
                before: before.clone(),
                state: state.clone().unwrap_or_default(),
                queue: queue.clone().unwrap_or_default(),
                name: name.clone().unwrap_or_default(),
                since_ms,
            };
            let resp = rpc!(client, list_runs, req)?;
            output::print_list(output, &resp.runs, output::runs_table, output::run_json);
            if !resp.next_before.is_empty() {
                let mut more = format!(
                    "more: droverctl run list --before {} --limit {limit}",
                    resp.next_before
                );
                for (flag, v) in [("state", &state), ("queue", &queue), ("name", &name)] {
                    if let Some(v) = v {
                        more.push_str(&format!(" --{flag} '{v}'"));
                    }
                }
                if let Some(d) = since {
                    more.push_str(&format!(" --since {}s", d.as_secs()));
                }
                eprintln!("{more}");
            }
            Ok(0)
        }
        RunCmd::Validate { file, params } => {
            let spec = load_spec(&file, &params)?;
            println!(
                "{}: valid ({} steps{})",
                file.display(),
                spec.tasks.len(),
                if spec.params.is_empty() {
                    String::new()
                } else {
                    let mut p: Vec<String> = spec
                        .params
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect();
                    p.sort();
                    format!("; params {}", p.join(" "))
                }
            );
            Ok(0)
        }
        RunCmd::Cancel { id, step, reason } => {
            let req = pb::CancelRunRequest {
                run_id: id.clone(),
                step: step.clone().unwrap_or_default(),
                reason,
            };
            let resp = rpc!(client, cancel_run, req.clone())?;
            let what = step.map_or(id, |s| format!("step {s} of {}", req.run_id));
            eprintln!(
                "cancelled {what}: {} steps ended; running ones are being stopped on their agents",
                resp.tasks.len()
            );
            Ok(0)
        }
        RunCmd::Watch { id, output } => watch(&client, &id, output).await,
        RunCmd::Logs {
            id,
            step,
            stderr,
            follow,
        } if follow => follow_logs(&client, &id, step.unwrap_or_default(), stderr).await,
        RunCmd::Logs {
            id,
            step: task,
            stderr,
            ..
        } => {
            use std::io::Write;
            let stream = if stderr {
                pb::LogStream::Stderr
            } else {
                pb::LogStream::Stdout
            } as i32;
            let mut offset = 0;
            let mut stdout = std::io::stdout().lock();
            loop {
                let req = pb::GetTaskLogsRequest {
                    run_id: id.clone(),
                    task: task.clone().unwrap_or_default(),
                    stream,
                    offset,
                    max_bytes: 0,
                };
                let resp = rpc!(client, get_task_logs, req)?;
                stdout.write_all(&resp.data)?;
                if !resp.note.is_empty() {
                    eprintln!("note: {}", resp.note);
                }
                if resp.source != "agent" || resp.eof || resp.data.is_empty() {
                    break;
                }
                offset = resp.next_offset;
            }
            stdout.flush()?;
            Ok(0)
        }
    }
}

async fn dlq_cmd(conn: &Conn, cmd: DlqCmd) -> anyhow::Result<i32> {
    let client = conn.client()?;
    match cmd {
        DlqCmd::List {
            queue,
            run,
            limit,
            before,
            output,
        } => {
            let req = pb::ListDeadLettersRequest {
                limit,
                before,
                queue: queue.unwrap_or_default(),
                run_id: run.unwrap_or_default(),
            };
            let resp = rpc!(client, list_dead_letters, req)?;
            output::print_list(
                output,
                &resp.letters,
                output::dead_letters_table,
                output::dead_letter_json,
            );
            if !resp.next_before.is_empty() {
                eprintln!(
                    "more: droverctl dlq list --before {} --limit {limit}",
                    resp.next_before
                );
            }
            Ok(0)
        }
        DlqCmd::Retry { id } => {
            let req = pb::DeadLetterRequest { id: id.clone() };
            let resp = rpc!(client, retry_dead_letter, req)?;
            eprintln!("{id}: {} queued again; its run resumes", resp.task_id);
            Ok(0)
        }
        DlqCmd::Drop { id } => {
            let req = pb::DeadLetterRequest { id: id.clone() };
            rpc!(client, drop_dead_letter, req)?;
            eprintln!("{id} dropped");
            Ok(0)
        }
    }
}

async fn pool_cmd(conn: &Conn, cmd: PoolCmd) -> anyhow::Result<i32> {
    let client = conn.client()?;
    match cmd {
        PoolCmd::Apply { file } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let pools = crate::pools::parse(&file.display().to_string(), &text)?;
            let req = pb::ApplyPoolsRequest {
                pools_json: pools
                    .iter()
                    .map(serde_json::to_string)
                    .collect::<Result<_, _>>()?,
            };
            let resp = rpc!(client, apply_pools, req)?;
            print!("{}", output::pools_table(&resp.pools));
            Ok(0)
        }
        PoolCmd::List { output } => {
            let resp = rpc!(client, list_pools, pb::ListPoolsRequest {})?;
            output::print_list(output, &resp.pools, output::pools_table, output::pool_json);
            Ok(0)
        }
        PoolCmd::Get { name, output } => {
            let p = rpc!(client, get_pool, pb::GetPoolRequest { name })?;
            match output {
                Format::Table => print!("{}", output::pool_detail(&p)),
                Format::Json => output::print_json(&output::pool_json(&p)),
            }
            Ok(0)
        }
    }
}

async fn get_queue(client: &ClusterClient, name: &str) -> anyhow::Result<pb::Queue> {
    let req = pb::GetQueueRequest {
        name: name.to_owned(),
    };
    rpc!(client, get_queue, req)
}

async fn queue_cmd(conn: &Conn, cmd: QueueCmd) -> anyhow::Result<i32> {
    let client = conn.client()?;
    match cmd {
        QueueCmd::List { output } => {
            let resp = client
                .call(|mut c| async move { c.list_queues(pb::ListQueuesRequest {}).await })
                .await
                .map_err(call_err)?;
            output::print_list(
                output,
                &resp.queues,
                output::queues_table,
                output::queue_json,
            );
            Ok(0)
        }
        QueueCmd::Get { name, output } => {
            let q = get_queue(&client, &name).await?;
            match output {
                Format::Table => print!("{}", output::queues_table(std::slice::from_ref(&q))),
                Format::Json => output::print_json(&output::queue_json(&q)),
            }
            Ok(0)
        }
        QueueCmd::Set {
            name,
            max_concurrency,
            rate,
            burst,
            max_pending,
        } => {
            // Limits not given keep their value: read, change, write.
            let mut q = get_queue(&client, &name).await?;
            if let Some(v) = max_concurrency {
                q.max_concurrency = v;
            }
            if let Some(v) = rate {
                q.rate = v;
            }
            if let Some(v) = burst {
                q.burst = v;
            }
            if let Some(v) = max_pending {
                q.max_pending = v;
            }
            let req = pb::SetQueueRequest { queue: Some(q) };
            let q = rpc!(client, set_queue, req)?;
            print!("{}", output::queues_table(std::slice::from_ref(&q)));
            Ok(0)
        }
    }
}

/// Reads, parses and checks a spec file with `--param` overrides: errors name the field and
/// line.
fn load_spec(path: &std::path::Path, params: &[(String, String)]) -> anyhow::Result<pb::RunSpec> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let name = path.display().to_string();
    let mut spec = crate::spec::parse(&name, &text)?;
    crate::spec::override_params(&mut spec, params);
    crate::spec::check(&name, Some(&text), &spec)?;
    Ok(spec)
}

/// `run watch`: prints each step change until the run finishes; the exit code is its outcome.
/// A broken stream (the node went away) is opened again on any member.
async fn watch(client: &ClusterClient, id: &str, format: Format) -> anyhow::Result<i32> {
    let mut last: Option<pb::Run> = None;
    loop {
        let req = pb::GetRunRequest {
            run_id: id.to_owned(),
        };
        let mut stream = rpc!(client, watch_run, req)?;
        loop {
            match stream.message().await {
                Ok(Some(run)) => {
                    match format {
                        Format::Table => {
                            for line in output::watch_lines(last.as_ref(), &run) {
                                println!("{line}");
                            }
                        }
                        Format::Json => output::print_json(&output::run_json(&run)),
                    }
                    let done = output::is_terminal_run(run.state);
                    let state = output::run_state(run.state);
                    last = Some(run);
                    if done {
                        return Ok(match state {
                            "succeeded" => 0,
                            "cancelled" => 3,
                            _ => 1,
                        });
                    }
                }
                Ok(None) => break,
                Err(status) if status.code() == tonic::Code::NotFound => {
                    bail!("{}", status.message())
                }
                Err(status) => {
                    eprintln!("watch interrupted ({}); following again", status.message());
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `run logs -f`: what the step has written so far, then more as it comes, until the step
/// has finished and everything it wrote is printed. Before the step starts it waits; after its
/// agent is gone, the replicated tail is all there is.
async fn follow_logs(
    client: &ClusterClient,
    id: &str,
    step: String,
    stderr: bool,
) -> anyhow::Result<i32> {
    use std::io::Write;
    let stream = if stderr {
        pb::LogStream::Stderr
    } else {
        pb::LogStream::Stdout
    } as i32;
    let mut offset = 0;
    let mut attempt = 0;
    let mut stdout = std::io::stdout();
    loop {
        let run = get_run(client, id).await.map_err(call_err)?;
        let task = if step.is_empty() && run.tasks.len() == 1 {
            run.tasks.first()
        } else {
            run.tasks
                .iter()
                .find(|t| t.spec.as_ref().is_some_and(|s| s.name == step))
        };
        let Some(task) = task else {
            let names: Vec<&str> = run
                .tasks
                .iter()
                .filter_map(|t| t.spec.as_ref().map(|s| s.name.as_str()))
                .collect();
            bail!(
                "run {id} has no step '{step}' (steps: {})",
                names.join(", ")
            );
        };
        let state = output::task_state(task.state);
        let finished = matches!(state, "succeeded" | "failed" | "cancelled" | "skipped");
        if matches!(state, "pending" | "blocked" | "waiting-retry") {
            tokio::time::sleep(Duration::from_millis(300)).await;
            continue;
        }
        if task.attempt != attempt {
            if attempt != 0 {
                eprintln!("--- attempt {} ---", task.attempt);
            }
            attempt = task.attempt;
            offset = 0;
        }
        let req = pb::GetTaskLogsRequest {
            run_id: id.to_owned(),
            task: task
                .spec
                .as_ref()
                .map(|s| s.name.clone())
                .unwrap_or_default(),
            stream,
            offset,
            max_bytes: 0,
        };
        let resp = rpc!(client, get_task_logs, req)?;
        stdout.write_all(&resp.data)?;
        stdout.flush()?;
        if resp.source != "agent" {
            // The agent's full log is out of reach: the stored tail is the last word.
            if !resp.note.is_empty() {
                eprintln!("note: {}", resp.note);
            }
            if finished {
                return Ok(0);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        }
        offset = resp.next_offset;
        if resp.data.is_empty() {
            if finished {
                return Ok(0);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// Scheduling flags of a command submission.
struct Placement {
    class: Option<String>,
    require: Vec<pb::LabelExpression>,
    cpu: Option<u64>,
    memory: Option<u64>,
    priority: i32,
}

fn command_spec(
    name: Option<String>,
    argv: Vec<String>,
    shell: String,
    timeout: Option<Duration>,
    p: Placement,
) -> pb::RunSpec {
    pb::RunSpec {
        name: name.unwrap_or_else(|| "cmd".into()),
        tasks: vec![pb::TaskSpec {
            name: "main".into(),
            argv,
            shell,
            timeout_ms: timeout.map_or(0, |t| t.as_millis() as u64),
            class: p.class.unwrap_or_default(),
            required: p.require,
            resources: Some(pb::Resources {
                cpu_millis: p.cpu.unwrap_or(0),
                memory_bytes: p.memory.unwrap_or(0),
                ..Default::default()
            }),
            priority: p.priority,
            ..Default::default()
        }],
        labels: Default::default(),
        strategy: String::new(),
        ..Default::default()
    }
}

#[cfg(test)]
mod key_tests {
    #[test]
    fn every_submission_gets_a_key_of_its_own() {
        let keys: std::collections::HashSet<String> =
            (0..1000).map(|_| super::random_key()).collect();
        assert_eq!(keys.len(), 1000);
        assert!(keys.iter().all(|k| k.len() == 32), "{keys:?}");
    }
}
