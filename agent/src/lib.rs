//! drover-agent: runs on worker hosts, holds one session with the coordinator leader and runs the
//! tasks it is given as child processes. See docs/ARCHITECTURE.md.

use std::sync::Arc;
use std::time::Duration;

use drover_proto::tls::TlsFiles;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub mod cgroup;
pub mod config;
pub mod entry;
pub mod executor;
pub mod limits;
pub mod memory;
pub mod program;
pub mod session;
pub mod spawn;
pub mod task_user;
pub mod tasks;

pub use config::Config;
use session::{Identity, SessionConfig};
use tasks::TaskTable;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error(transparent)]
    Tls(#[from] drover_proto::tls::TlsError),
    #[error(transparent)]
    TaskUser(#[from] task_user::TaskUserError),
    #[error("reading the agent's certificate: {0}")]
    Certificate(String),
    #[error("creating the work dir {path}: {source}")]
    WorkDir {
        path: String,
        source: std::io::Error,
    },
}

/// A running agent.
pub struct AgentHandle {
    pub name: String,
    pub table: Arc<TaskTable>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl AgentHandle {
    /// Stops the session, stops running tasks (their process groups), and waits a bounded time.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        self.table.stop_all("agent shutting down");
        // Executors are detached tasks; wait for them to take their process groups down (SIGTERM,
        // then SIGKILL after the grace) before the runtime, and with it the executors, goes away.
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(limits::KILL_GRACE_MS + 3_000);
        while self.table.running() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
    }
}

pub async fn start(config: Config) -> Result<AgentHandle, StartError> {
    let tls = TlsFiles::in_dir(&config.tls_dir, &config.cert_name()).load()?;
    let cert = tls.own_identity().map_err(StartError::Certificate)?;
    let name = config.name_from_certificate(&cert)?;
    let task_user = match &config.task_user {
        None => None,
        Some(spec) => {
            let user = task_user::resolve(spec)?;
            // SAFETY: geteuid(2) has no preconditions.
            let uid = unsafe { libc::geteuid() };
            let key = TlsFiles::in_dir(&config.tls_dir, &config.cert_name()).key;
            task_user::check(&user, uid, &key)?;
            tracing::info!(user = %user.name, uid = user.uid, gid = user.gid, "tasks run as another user");
            Some(user)
        }
    };
    let cgroups = match cgroup::detect(config.cgroup_root.as_deref()) {
        Ok(c) => {
            tracing::info!(
                ?c,
                "cgroup v2 available: each task runs in its own cgroup with cpu.max and memory.max"
            );
            Some(c)
        }
        Err(why) => {
            tracing::warn!(
                "cgroup limits unavailable ({why}); tasks run without cpu or memory limits"
            );
            None
        }
    };
    let identity = Identity {
        name,
        labels: config.parsed_labels()?.into_iter().collect(),
        resources: config.parsed_resources()?,
        class: config.class.clone(),
        pool: config.pool.clone(),
        instance_id: config::instance_id(config.instance_id.as_deref()),
        isolation: if cgroups.is_some() {
            "cgroup-v2".into()
        } else {
            String::new()
        },
    };
    std::fs::create_dir_all(&config.work_dir).map_err(|source| StartError::WorkDir {
        path: config.work_dir.display().to_string(),
        source,
    })?;
    let work_dir =
        std::fs::canonicalize(&config.work_dir).unwrap_or_else(|_| config.work_dir.clone());
    let name = identity.name.clone();
    let table = Arc::new(TaskTable::default());
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let cfg = Arc::new(SessionConfig {
        addrs: config.coordinator.clone(),
        tls,
        identity,
        work_dir: work_dir.clone(),
        sandbox: Arc::new(executor::Sandbox {
            cgroups,
            user: task_user,
        }),
    });
    tracing::info!(agent = %name, work_dir = %work_dir.display(), "agent starting");
    let session = tokio::spawn(session::run(cfg, table.clone(), shutdown_rx.clone()));
    let retention = Duration::from_secs(config.log_retention_hours * 3600);
    let mut prune_shutdown = shutdown_rx;
    let pruner = tokio::spawn(async move {
        loop {
            let dir = work_dir.clone();
            let _ =
                tokio::task::spawn_blocking(move || executor::prune_logs(&dir, retention)).await;
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(3600)) => {}
                _ = prune_shutdown.changed() => return,
            }
        }
    });
    Ok(AgentHandle {
        name,
        table,
        shutdown: shutdown_tx,
        tasks: vec![session, pruner],
    })
}
