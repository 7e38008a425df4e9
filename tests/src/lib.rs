//! Test harness: real coordinator and agent processes on 127.0.0.1 with ephemeral ports,
//! certificates generated per test, and every process stopped (by PID) when the harness drops.

use std::future::Future;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use drover_proto::client::ClusterClient;
use drover_proto::pb;
use drover_proto::tls::TlsFiles;
use tempfile::TempDir;

/// Path of one of the programs, built by cargo for this package's integration tests.
/// `CARGO_BIN_EXE_*` is only set while compiling integration tests, so they pass it in.
pub fn bin(name: &str) -> PathBuf {
    let dir = std::env::var_os("DROVER_TEST_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let exe = std::env::current_exe().expect("current exe");
            let dir = exe.parent().expect("exe dir").to_owned();
            if dir.ends_with("deps") {
                dir.parent().expect("target dir").to_owned()
            } else {
                dir
            }
        });
    let file = match name {
        "drover-coordinator" => "test-coordinator",
        "drover-agent" => "test-agent",
        "droverctl" => "test-ctl",
        other => other,
    };
    let path = dir.join(file);
    assert!(
        path.exists(),
        "{} is missing; run the tests through cargo (cargo nextest run --workspace)",
        path.display()
    );
    path
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `f` until it returns Some or `deadline` passes.
pub async fn wait_for<T, F, Fut>(what: &str, deadline: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let end = tokio::time::Instant::now() + deadline;
    let mut pause = Duration::from_millis(20);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if tokio::time::Instant::now() >= end {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(250));
    }
}

pub struct NodeSpec {
    pub id: u64,
    pub grpc_port: u16,
    pub http_port: u16,
}

/// Options for a test cluster.
#[derive(Clone)]
pub struct ClusterOptions {
    pub nodes: u64,
    pub snapshot_logs: u64,
    pub lease_ttl_ms: u64,
    pub heartbeat_interval_ms: u64,
    /// A member (index) not started with the others; `restart` starts it later.
    pub absent: Option<usize>,
    /// Where agents keep task logs and working directories (a directory of their own is made
    /// in it, and removed with the cluster unless `keep_agent_files`); default: the cluster's own
    /// directory. On one host, another filesystem stands in for the agents' own disks: on the
    /// coordinators' filesystem, the agents' file creations slowed the Raft log syncs (syncs of
    /// 100-460 ms, and elections, at 2,000 process tasks a second).
    pub agent_work_root: Option<PathBuf>,
    /// Leave the agents' directory under `agent_work_root` in place when the cluster is dropped.
    /// On ext4 without a journal, inodes deleted within the last minute or more are skipped
    /// (each one looked at) when new ones are allocated, so deleting a large run's files makes
    /// the next run's file creations many times slower.
    pub keep_agent_files: bool,
    /// `--start-timeout-ms` of the coordinators.
    pub start_timeout_ms: u64,
    /// More flags for every coordinator.
    pub coordinator_args: Vec<String>,
    /// More environment for every coordinator.
    pub coordinator_env: Vec<(String, String)>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            nodes: 3,
            snapshot_logs: 5000,
            lease_ttl_ms: 4000,
            heartbeat_interval_ms: 500,
            absent: None,
            agent_work_root: None,
            keep_agent_files: false,
            start_timeout_ms: 30_000,
            coordinator_args: Vec::new(),
            coordinator_env: Vec::new(),
        }
    }
}

pub struct Cluster {
    pub dir: TempDir,
    pub tls_dir: PathBuf,
    pub nodes: Vec<NodeSpec>,
    pub opts: ClusterOptions,
    coordinators: Vec<Option<Child>>,
    agents: Vec<(String, Child)>,
    /// The agents' directory under `opts.agent_work_root`, if one was given.
    agent_dir: Option<TempDir>,
}

impl Cluster {
    /// Creates certificates and starts every coordinator; returns once a leader is known.
    pub async fn start(opts: ClusterOptions) -> Cluster {
        drover_proto::tls::install_crypto_provider();
        let dir = tempfile::Builder::new()
            .prefix("drover-test-")
            .tempdir()
            .unwrap();
        let tls_dir = dir.path().join("tls");
        droverctl::certs::init(
            &tls_dir,
            opts.nodes as u32,
            &[],
            false,
            droverctl::certs::VALID_FOR_DEFAULT,
        )
        .unwrap();
        let nodes = (1..=opts.nodes)
            .map(|id| NodeSpec {
                id,
                grpc_port: free_port(),
                http_port: free_port(),
            })
            .collect();
        let agent_dir = opts.agent_work_root.as_ref().map(|root| {
            tempfile::Builder::new()
                .prefix("drover-agents-")
                .tempdir_in(root)
                .unwrap_or_else(|e| panic!("agent work root {}: {e}", root.display()))
        });
        let mut c = Cluster {
            dir,
            tls_dir,
            nodes,
            opts,
            coordinators: Vec::new(),
            agents: Vec::new(),
            agent_dir,
        };
        for i in 0..c.nodes.len() {
            let child = (c.opts.absent != Some(i)).then(|| c.spawn_coordinator(i));
            c.coordinators.push(child);
        }
        c.wait_leader(Duration::from_secs(30)).await;
        c
    }

    pub fn addr(&self, i: usize) -> String {
        format!("127.0.0.1:{}", self.nodes[i].grpc_port)
    }

    pub fn addrs(&self) -> Vec<String> {
        (0..self.nodes.len()).map(|i| self.addr(i)).collect()
    }

    fn peers(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("{}=127.0.0.1:{}", n.id, n.grpc_port))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn spawn_coordinator(&self, i: usize) -> Child {
        let n = &self.nodes[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join(format!("coordinator-{}.log", n.id)))
            .unwrap();
        Command::new(bin("drover-coordinator"))
            .arg("--node-id")
            .arg(n.id.to_string())
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", n.grpc_port))
            .arg("--http-listen")
            .arg(format!("127.0.0.1:{}", n.http_port))
            .arg("--data-dir")
            .arg(self.dir.path().join(format!("data-{}", n.id)))
            .arg("--peer")
            .arg(self.peers())
            .arg("--tls-dir")
            .arg(&self.tls_dir)
            .arg("--snapshot-logs")
            .arg(self.opts.snapshot_logs.to_string())
            .arg("--lease-ttl-ms")
            .arg(self.opts.lease_ttl_ms.to_string())
            .arg("--heartbeat-interval-ms")
            .arg(self.opts.heartbeat_interval_ms.to_string())
            .arg("--start-timeout-ms")
            .arg(self.opts.start_timeout_ms.to_string())
            .args(&self.opts.coordinator_args)
            .envs(self.opts.coordinator_env.iter().map(|(k, v)| (k, v)))
            .env("DROVER_LOG", "info,openraft=warn,sled=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawning drover-coordinator")
    }

    /// SIGKILLs coordinator `i` (index, not node id).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.coordinators[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        let child = self.spawn_coordinator(i);
        self.coordinators[i] = Some(child);
    }

    /// Stops coordinator `i` in place (SIGSTOP): alive, connections open, answering nothing, like
    /// a host frozen by its hypervisor. `resume` undoes it; a stopped process is still killed
    /// (SIGKILL) when the cluster is dropped.
    pub fn pause(&self, i: usize) {
        self.signal(i, libc::SIGSTOP);
    }

    pub fn resume(&self, i: usize) {
        self.signal(i, libc::SIGCONT);
    }

    fn signal(&self, i: usize, sig: libc::c_int) {
        let pid = self.coordinator_pid(i).expect("coordinator running") as libc::pid_t;
        // SAFETY: kill(2) with a PID of a child this cluster started and has not reaped.
        let r = unsafe { libc::kill(pid, sig) };
        assert_eq!(
            r,
            0,
            "signal {sig} to coordinator {i}: {}",
            std::io::Error::last_os_error()
        );
    }

    /// PID of coordinator `i`, if running.
    pub fn coordinator_pid(&self, i: usize) -> Option<u32> {
        self.coordinators[i].as_ref().map(|c| c.id())
    }

    pub fn is_running(&self, i: usize) -> bool {
        self.coordinators[i].is_some()
    }

    /// Coordinator `i`'s exit status if its process has ended (collected here), else None.
    pub fn exited(&mut self, i: usize) -> Option<std::process::ExitStatus> {
        let status = self.coordinators[i].as_mut()?.try_wait().ok()??;
        self.coordinators[i] = None;
        Some(status)
    }

    /// The text coordinator `i` has logged so far.
    pub fn log_of(&self, i: usize) -> String {
        let id = self.nodes[i].id;
        std::fs::read_to_string(self.dir.path().join(format!("coordinator-{id}.log")))
            .unwrap_or_default()
    }

    /// A leader-following client with the admin certificate.
    pub fn client(&self) -> ClusterClient {
        self.client_as("admin", self.addrs())
    }

    pub fn client_as(&self, cert: &str, addrs: Vec<String>) -> ClusterClient {
        let tls = TlsFiles::in_dir(&self.tls_dir, cert).load().unwrap();
        let mut c = ClusterClient::new(addrs, tls);
        c.retry_deadline = Duration::from_secs(30);
        c
    }

    /// Cluster status as node `i` sees it.
    pub async fn status_of(&self, i: usize) -> Option<pb::ClusterStatusResponse> {
        let mut client = self.client_as("admin", vec![self.addr(i)]);
        client.retry_deadline = Duration::from_millis(200);
        client
            .call(|mut c| async move { c.cluster_status(pb::ClusterStatusRequest {}).await })
            .await
            .ok()
    }

    /// Waits until a running node reports a leader that is itself running; returns its index.
    pub async fn wait_leader(&self, deadline: Duration) -> usize {
        wait_for("a leader", deadline, || async {
            for i in 0..self.nodes.len() {
                if !self.is_running(i) {
                    continue;
                }
                if let Some(s) = self.status_of(i).await
                    && s.state == "leader"
                {
                    return Some(i);
                }
            }
            None
        })
        .await
    }

    /// Prometheus text from node `i`'s HTTP port.
    pub fn metrics_of(&self, i: usize) -> String {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.nodes[i].http_port)) else {
            return String::new();
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let _ =
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    }

    /// The value of a metric line (`name value`) on node `i`.
    pub fn metric(&self, i: usize, name: &str) -> Option<f64> {
        self.metrics_of(i).lines().find_map(|l| {
            l.strip_prefix(name)
                .and_then(|rest| rest.strip_prefix(' '))
                .and_then(|v| v.trim().parse().ok())
        })
    }

    /// SIGKILLs the agent started under `name`.
    pub fn kill_agent(&mut self, name: &str) {
        if let Some(pos) = self.agents.iter().position(|(n, _)| n == name) {
            let (_, mut child) = self.agents.remove(pos);
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts an agent process; returns its PID.
    pub fn start_agent(&mut self, name: &str, extra: &[&str]) -> u32 {
        let work = self
            .agent_dir
            .as_ref()
            .unwrap_or(&self.dir)
            .path()
            .join(format!("agent-{name}"));
        let log = std::fs::File::create(self.dir.path().join(format!("agent-{name}.log"))).unwrap();
        self.agent_cert(name);
        let child = Command::new(bin("drover-agent"))
            .arg("--coordinator")
            .arg(self.addrs().join(","))
            .arg("--tls-dir")
            .arg(&self.tls_dir)
            .arg("--name")
            .arg(name)
            .arg("--work-dir")
            .arg(&work)
            .args(extra)
            .env("DROVER_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawning drover-agent");
        let pid = child.id();
        self.agents.push((name.to_owned(), child));
        pid
    }

    /// Issues the certificate an agent called `name` registers with, unless it exists.
    pub fn agent_cert(&self, name: &str) {
        if !self.tls_dir.join(format!("{name}.pem")).exists() {
            droverctl::certs::issue(
                &self.tls_dir,
                "agent",
                name,
                &[],
                droverctl::certs::VALID_FOR_DEFAULT,
            )
            .unwrap();
        }
    }

    pub async fn agent(&self, name: &str) -> Option<pb::GetAgentResponse> {
        get_agent(&self.client(), name).await
    }

    /// Starts an agent and waits until it holds a session with the leader.
    pub async fn add_agent(&mut self, name: &str, extra: &[&str]) {
        self.start_agent(name, extra);
        self.wait_agent_connected(name, Duration::from_secs(20))
            .await;
    }

    pub async fn wait_agent_connected(&self, name: &str, deadline: Duration) {
        let client = self.client();
        wait_for(&format!("agent {name} to connect"), deadline, || async {
            let resp = client
                .call(|mut c| async move { c.list_agents(pb::ListAgentsRequest {}).await })
                .await
                .ok()?;
            resp.agents
                .iter()
                .any(|a| a.name == name && a.connected && a.state == pb::AgentState::Active as i32)
                .then_some(())
        })
        .await
    }

    /// Runs `droverctl` with this cluster's address and admin certificate.
    pub fn ctl(&self) -> Command {
        let mut cmd = Command::new(bin("droverctl"));
        cmd.env("DROVER_ADDR", self.addrs().join(","))
            .env("DROVER_TLS_DIR", &self.tls_dir)
            .env("DROVER_TLS_NAME", "admin")
            .stdin(Stdio::null());
        cmd
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (_, a) in &mut self.agents {
            let _ = a.kill();
            let _ = a.wait();
        }
        if self.opts.keep_agent_files
            && let Some(dir) = self.agent_dir.take()
        {
            eprintln!("agents' files kept in {}", dir.keep().display());
        }
        for c in self.coordinators.iter_mut().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            // Keep the evidence: print where the logs are and their last lines.
            for entry in std::fs::read_dir(self.dir.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                let p = entry.path();
                if p.extension().is_some_and(|e| e == "log") {
                    let text = std::fs::read_to_string(&p).unwrap_or_default();
                    let tail: Vec<&str> = text.lines().rev().take(30).collect();
                    eprintln!("==== {} (last 30 lines) ====", p.display());
                    for l in tail.into_iter().rev() {
                        eprintln!("{l}");
                    }
                }
            }
        }
    }
}

/// Submits a one-task command run through the leader-following client.
pub async fn submit_cmd(client: &ClusterClient, argv: &[&str]) -> String {
    let spec = pb::RunSpec {
        name: "test".into(),
        tasks: vec![pb::TaskSpec {
            name: "main".into(),
            argv: argv.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }],
        labels: Default::default(),
        strategy: String::new(),
        ..Default::default()
    };
    droverctl::cli::submit(client, spec)
        .await
        .expect("submit")
        .run_id
}

/// One agent and its tasks, or None if the call failed.
pub async fn get_agent(client: &ClusterClient, name: &str) -> Option<pb::GetAgentResponse> {
    client
        .call(|mut c| {
            let name = name.to_owned();
            async move { c.get_agent(pb::GetAgentRequest { name }).await }
        })
        .await
        .ok()
}

/// Submits a run made of one task spec.
pub async fn submit_task(client: &ClusterClient, task: pb::TaskSpec) -> String {
    let spec = pb::RunSpec {
        name: "test".into(),
        tasks: vec![task],
        ..Default::default()
    };
    droverctl::cli::submit(client, spec)
        .await
        .expect("submit")
        .run_id
}

/// A task running `sh -c SCRIPT`.
pub fn shell_task(script: &str) -> pb::TaskSpec {
    pb::TaskSpec {
        name: "main".into(),
        shell: script.into(),
        ..Default::default()
    }
}

/// Waits until the run is terminal and returns it.
pub async fn wait_done(client: &ClusterClient, run_id: &str, deadline: Duration) -> pb::Run {
    droverctl::cli::wait_run(client, run_id, deadline)
        .await
        .expect("run finished")
}

/// An agent played by the test itself over the real protocol: it says exactly what the test
/// wants, including what no real agent would (a smaller capacity while holding tasks, another
/// agent's name).
pub struct RawAgent {
    pub tx: tokio::sync::mpsc::Sender<pb::AgentMessage>,
    pub inbound: tonic::Streaming<pb::CoordinatorMessage>,
}

impl RawAgent {
    /// Opens a session to `addr` with certificate `cert` (a name in the cluster's TLS dir) and
    /// sends `register`; returns the session and the coordinator's first answer.
    pub async fn connect(
        tls_dir: &Path,
        cert: &str,
        addr: &str,
        register: pb::Register,
    ) -> Result<(RawAgent, pb::Registered), tonic::Status> {
        use pb::agent_message::Msg as In;
        use pb::coordinator_message::Msg as Out;
        let tls = TlsFiles::in_dir(tls_dir, cert).load().unwrap();
        let channel = drover_proto::client::connect(addr, &tls)
            .await
            .map_err(tonic::Status::unavailable)?;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tx.send(pb::AgentMessage {
            msg: Some(In::Register(register)),
        })
        .await
        .unwrap();
        let mut inbound = pb::agent_service_client::AgentServiceClient::new(channel)
            .session(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        match inbound.message().await? {
            Some(pb::CoordinatorMessage {
                msg: Some(Out::Registered(reg)),
            }) => Ok((RawAgent { tx, inbound }, reg)),
            other => panic!("expected Registered first, got {other:?}"),
        }
    }

    /// The next assignment sent to this agent (other messages are skipped).
    pub async fn next_assign(&mut self, deadline: Duration) -> pb::Assign {
        use pb::coordinator_message::Msg as Out;
        tokio::time::timeout(deadline, async {
            loop {
                match self.inbound.message().await {
                    Ok(Some(pb::CoordinatorMessage {
                        msg: Some(Out::Assign(a)),
                    })) => return a,
                    Ok(Some(_)) => continue,
                    other => panic!("session ended before an assignment: {other:?}"),
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no assignment within {deadline:?}"))
    }

    pub async fn send(&self, msg: pb::agent_message::Msg) {
        self.tx
            .send(pb::AgentMessage { msg: Some(msg) })
            .await
            .expect("session open");
    }

    /// Sends a heartbeat every `every` until the session's channel closes (the test holds `tx`).
    pub fn keep_alive(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        let tx = self.tx.clone();
        tokio::spawn(async move {
            loop {
                let beat = pb::AgentMessage {
                    msg: Some(pb::agent_message::Msg::Heartbeat(pb::Heartbeat {})),
                };
                if tx.send(beat).await.is_err() {
                    return;
                }
                tokio::time::sleep(every).await;
            }
        })
    }

    /// The next message of the session, or None when it ends (with an error or not).
    pub async fn next(&mut self, deadline: Duration) -> Option<pb::coordinator_message::Msg> {
        match tokio::time::timeout(deadline, self.inbound.message()).await {
            Ok(Ok(Some(m))) => m.msg,
            Ok(_) => None,
            Err(_) => panic!("no message within {deadline:?}"),
        }
    }

    /// Reports `task`'s `attempt` finished with exit code 0.
    pub async fn finish(&self, task_id: &str, attempt: u64) {
        self.send(pb::agent_message::Msg::Finished(pb::TaskFinished {
            task_id: task_id.to_owned(),
            attempt,
            outcome: Some(pb::TaskOutcome {
                succeeded: true,
                exit_code: Some(0),
                ..Default::default()
            }),
            started_at_us: 0,
        }))
        .await;
    }
}

/// Runs a prepared command (`Cluster::ctl()` and its arguments) to completion within
/// `deadline`; a command still running then is killed and the test fails.
pub async fn ctl_output(cmd: &mut Command, deadline: Duration) -> std::process::Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning droverctl");
    let what = format!("droverctl {:?}", cmd.get_args().collect::<Vec<_>>());
    KillOnDrop(Some(child)).output_within(&what, deadline).await
}

/// A child process killed (by PID) and reaped when the test lets go of it, passing or failing.
pub struct KillOnDrop(pub Option<std::process::Child>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(c) = &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Whether a process with this PID exists (and is not a zombie).
pub fn pid_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(") ")
            .next()
            .is_some_and(|rest| !rest.starts_with('Z'))
    })
}

impl KillOnDrop {
    /// Waits for the process (`what`) to exit within `deadline` and returns its output; still
    /// running then, it is killed and the test fails.
    pub async fn output_within(&mut self, what: &str, deadline: Duration) -> std::process::Output {
        let until = tokio::time::Instant::now() + deadline;
        loop {
            let c = self.0.as_mut().expect("child");
            if c.try_wait().expect("try_wait").is_some() {
                return self.0.take().unwrap().wait_with_output().unwrap();
            }
            assert!(
                tokio::time::Instant::now() < until,
                "{what} still running after {deadline:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
