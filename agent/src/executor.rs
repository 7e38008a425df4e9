//! Runs one task attempt as a child process in its own process group: stdout and stderr go
//! straight to files on local disk (the full log), whose last bytes become the tail replicated
//! with the result; a timeout, and a stop that takes down the whole group.

use std::ffi::{OsStr, OsString};
use std::os::unix::fs::FileExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use drover_proto::pb;
use tokio::io::AsyncReadExt;
use tokio::process::Command;
use tokio::sync::oneshot;

use crate::cgroup::{Cgroups, TaskCgroup};
use crate::limits;
use crate::program::{self, ProgramPaths};
use crate::spawn::{self, Launch, Spawned};
use crate::task_user::TaskUser;
use crate::tasks::TaskTable;

/// Programs found on PATH, shared by every task (see `program`).
static PROGRAM_PATHS: LazyLock<ProgramPaths> = LazyLock::new(ProgramPaths::default);

/// The agent's own PATH, which a task that sets none inherits.
static AGENT_PATH: LazyLock<Option<OsString>> = LazyLock::new(|| std::env::var_os("PATH"));

fn stream_ext(stream: pb::LogStream) -> &'static str {
    if stream == pb::LogStream::Stderr {
        "stderr"
    } else {
        "stdout"
    }
}

/// `WORK/logs/RUN/TASK.attempt-N.{stdout,stderr}`.
pub fn log_path(work_dir: &Path, task_id: &str, attempt: u64, stream: pb::LogStream) -> PathBuf {
    attempt_path(work_dir, task_id, attempt, stream_ext(stream))
}

/// `WORK/logs/RUN/TASK.attempt-N.WHAT`: an attempt's files sit in its run's directory, so an
/// attempt adds one directory (its working directory) and two files. Each new inode is a visible
/// part of a short task's cost: a second directory per attempt cost ~7% of the `/bin/true`
/// throughput here, and creations get far slower after mass deletions (docs/BENCHMARKS.md).
fn attempt_path(work_dir: &Path, task_id: &str, attempt: u64, what: &str) -> PathBuf {
    let mut p = work_dir.join("logs");
    let (dirs, name) = task_id.rsplit_once('/').unwrap_or(("", task_id));
    for part in dirs.split('/').filter(|p| !p.is_empty()) {
        p.push(sanitize(part));
    }
    p.push(format!("{}.attempt-{attempt}.{what}", sanitize(name)));
    p
}

/// Where agents before the flat layout kept a log (`WORK/logs/RUN/TASK/attempt-N.EXT`): still
/// read, so an upgraded agent serves the logs it kept before the upgrade until they are pruned.
fn legacy_log_path(work_dir: &Path, task_id: &str, attempt: u64, stream: pb::LogStream) -> PathBuf {
    let mut p = work_dir.join("logs");
    for part in task_id.split('/') {
        p.push(sanitize(part));
    }
    p.join(format!("attempt-{attempt}.{}", stream_ext(stream)))
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect::<String>()
        .trim_start_matches('.')
        .to_owned()
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn failed(reason: String) -> pb::TaskOutcome {
    pb::TaskOutcome {
        reason,
        ..Default::default()
    }
}

/// Runs the assignment to completion and records the result in the table.
/// How tasks are confined: each in a cgroup of its own with its limits where cgroup v2 allows,
/// and as another user than the agent's where `--task-user` says.
#[derive(Debug, Default)]
pub struct Sandbox {
    pub cgroups: Option<Cgroups>,
    pub user: Option<TaskUser>,
}

pub async fn execute(
    work_dir: PathBuf,
    table: Arc<TaskTable>,
    sandbox: Arc<Sandbox>,
    assign: pb::Assign,
) {
    let task_id = assign.task_id.clone();
    let attempt = assign.attempt;
    match table.claim(&task_id, attempt, &assign.run_id) {
        Ok(true) => {}
        Ok(false) => return,
        Err(e) => {
            tracing::warn!(task = %task_id, error = %e, "refusing assignment");
            return;
        }
    }
    let noop = assign
        .spec
        .as_ref()
        .filter(|s| s.kind == "noop")
        .map(|s| s.noop_duration_ms);
    let (outcome, started_at_us) = match noop {
        Some(ms) => run_noop(&table, &assign, ms).await,
        None => {
            let outcome = run_process(&work_dir, &table, sandbox, assign).await;
            (outcome, table.started_at_us(&task_id, attempt))
        }
    };
    tracing::debug!(task = %task_id, attempt, exit_code = ?outcome.exit_code, signal = ?outcome.signal, reason = %outcome.reason, "task finished");
    table.finished(pb::TaskFinished {
        task_id,
        attempt,
        outcome: Some(outcome),
        started_at_us,
    });
}

/// A task the agent completes itself: no process, no log files. Measures the fabric alone.
/// Returns the outcome and when the attempt began (agent clock, microseconds; 0 = never began).
async fn run_noop(
    table: &TaskTable,
    assign: &pb::Assign,
    duration_ms: u64,
) -> (pb::TaskOutcome, u64) {
    let started_at_us = now_us();
    if duration_ms > 0 {
        table.started(pb::TaskStarted {
            task_id: assign.task_id.clone(),
            attempt: assign.attempt,
            started_at_ms: started_at_us / 1000,
            pid: 0,
            started_at_us,
        });
        tokio::time::sleep(Duration::from_millis(duration_ms)).await;
    }
    let outcome = pb::TaskOutcome {
        succeeded: true,
        exit_code: Some(0),
        duration_ms,
        ..Default::default()
    };
    (outcome, started_at_us)
}

/// A started process: by the lean start (`spawn`), or by the standard library's.
enum Child {
    Lean(Spawned),
    /// With a pidfd where the kernel gives one, to see the exit before collecting it.
    Std(
        tokio::process::Child,
        Option<tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>>,
    ),
}

impl Child {
    fn id(&self) -> u32 {
        match self {
            Child::Lean(c) => c.id(),
            Child::Std(c, _) => c.id().unwrap_or(0),
        }
    }

    async fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
        match self {
            Child::Lean(c) => c.wait().await,
            Child::Std(c, _) => c.wait().await,
        }
    }

    /// Resolves once the process has ended, not yet collected where the kernel allows (see
    /// `spawn::exited`); else once collected.
    async fn exited(&mut self) -> std::io::Result<()> {
        match self {
            Child::Lean(c) => c.exited().await,
            Child::Std(_, Some(fd)) => spawn::exited(fd).await,
            Child::Std(c, None) => c.wait().await.map(|_| ()),
        }
    }

    /// Waits for the leader process to end, kills what it left in its group while the group's
    /// id is still its own, then collects it.
    async fn end(&mut self, pid: u32) -> std::io::Result<std::process::ExitStatus> {
        self.exited().await?;
        kill_group(pid, libc::SIGKILL);
        self.wait().await
    }
}

/// Variables the agent sets for every task, over the task's own of the same name.
fn drover_vars(assign: &pb::Assign) -> [(&'static str, String); 3] {
    [
        ("DROVER_RUN_ID", assign.run_id.clone()),
        ("DROVER_TASK_ID", assign.task_id.clone()),
        ("DROVER_ATTEMPT", assign.attempt.to_string()),
    ]
}

/// Starts a found program with no cgroup to join, the common case, by `spawn`.
fn start_lean(
    exe: &Path,
    program: &str,
    args: &[&str],
    cwd: &Path,
    stdio: [std::fs::File; 3],
    task_env: &std::collections::HashMap<String, String>,
    ours: &[(&str, String)],
) -> std::io::Result<Spawned> {
    let env: Vec<(&OsStr, &OsStr)> = task_env
        .iter()
        .filter(|(k, _)| !ours.iter().any(|(name, _)| name == k))
        .map(|(k, v)| (OsStr::new(k), OsStr::new(v)))
        .chain(ours.iter().map(|(k, v)| (OsStr::new(k), OsStr::new(v))))
        .collect();
    let launch = Launch::new(
        exe.as_os_str(),
        std::iter::once(program)
            .chain(args.iter().copied())
            .map(OsStr::new),
        &env,
        cwd.as_os_str(),
        stdio.map(std::os::fd::OwnedFd::from),
    )?;
    spawn::spawn(&launch)
}

/// A started attempt and what is collected from it once it ends.
struct Running {
    child: Child,
    /// The log files the child writes to directly; read back for the replicated tails. The agent
    /// keeps no descriptor of its own open on them while the task runs: at a thousand running
    /// tasks those were two thousand descriptors that every later spawn copied into its child
    /// and closed again at exec (`dup_fd` and close-on-exec were ~5% of a host's CPU spawning
    /// 2,000 `/bin/true` a second).
    stdout: PathBuf,
    stderr: PathBuf,
    cgroup: Option<TaskCgroup>,
}

/// Creates the attempt's log files and working directory and starts its process. All of it is
/// blocking file work, done in one blocking-pool hop per task rather than one per file operation.
/// The child writes straight to its log files: no pipes, no copying tasks in the agent.
fn start(work_dir: &Path, sandbox: &Sandbox, assign: &pb::Assign) -> Result<Running, String> {
    let spec = assign
        .spec
        .as_ref()
        .ok_or("assignment carried no task spec")?;
    let log = |stream| log_path(work_dir, &assign.task_id, assign.attempt, stream);
    let (stdout_path, stderr_path) = (log(pb::LogStream::Stdout), log(pb::LogStream::Stderr));
    // The run's directory exists after its first task: one mkdir per attempt, not two.
    let cwd = if spec.workdir.is_empty() {
        let dir = attempt_path(work_dir, &assign.task_id, assign.attempt, "work");
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("creating log dir and working dir {}: {e}", dir.display()))?;
        if let Some(u) = &sandbox.user {
            std::os::unix::fs::chown(&dir, Some(u.uid), Some(u.gid))
                .map_err(|e| format!("handing working dir {} to {}: {e}", dir.display(), u.name))?;
        }
        dir
    } else {
        if let Some(dir) = stdout_path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("creating log dir {}: {e}", dir.display()))?;
        }
        PathBuf::from(&spec.workdir)
    };
    let open_log = |path: &Path| {
        use std::os::unix::fs::OpenOptionsExt;
        // Not through a symbolic link: a task (as the agent's user) could plant one where a
        // later attempt's log goes, and the agent would truncate and write whatever it names.
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(|e| format!("creating log file {}: {e}", path.display()))
    };
    let for_child = |path: &Path| open_log(path).map(Stdio::from);
    let (program, args): (&str, Vec<&str>) = if spec.shell.is_empty() {
        let (program, args) = spec
            .argv
            .split_first()
            .ok_or("task has neither command nor shell")?;
        (program, args.iter().map(String::as_str).collect())
    } else {
        ("sh", vec!["-c", &spec.shell])
    };
    let cgroup = sandbox
        .cgroups
        .as_ref()
        .map(|c| c.create(&assign.task_id, assign.attempt, spec.resources.as_ref()))
        .transpose()
        .map_err(|e| format!("cgroup: {e}"))?;
    // The child's PATH: its own if the task sets one, else the agent's.
    let path_var = spec
        .env
        .get("PATH")
        .map(OsStr::new)
        .or(AGENT_PATH.as_deref());
    let found = path_var.and_then(|p| {
        PROGRAM_PATHS.resolve(
            OsStr::new(program),
            p,
            Instant::now(),
            program::is_executable_file,
        )
    });
    let ours = drover_vars(assign);
    let command = |exe: &OsStr| -> Result<Command, String> {
        let mut cmd = Command::new(exe);
        // argv[0] as the task wrote it, whatever path runs it (multi-call binaries look at it).
        cmd.arg0(program)
            .args(&args)
            .current_dir(&cwd)
            .envs(&spec.env)
            .envs(ours.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(for_child(&stdout_path)?)
            .stderr(for_child(&stderr_path)?)
            .process_group(0)
            .kill_on_drop(true);
        if let Some(u) = &sandbox.user {
            // The standard library also drops supplementary groups when root switches users.
            cmd.uid(u.uid).gid(u.gid);
        }
        if let Some(cg) = &cgroup {
            let join = cg.join_in_child();
            // SAFETY: the closure only calls write(2), which is async-signal-safe.
            unsafe {
                cmd.pre_exec(join);
            }
        }
        Ok(cmd)
    };
    let failed = |e: std::io::Error| format!("spawn: {program}: {e} (cwd {})", cwd.display());
    let lean = cgroup.is_none() && sandbox.user.is_none() && spawn::pidfd_wait_supported();
    if let Some(exe) = found.as_deref().filter(|_| lean) {
        // A copy of one descriptor kept open: no path to look up per task.
        static DEV_NULL: LazyLock<std::io::Result<std::fs::File>> =
            LazyLock::new(|| std::fs::File::open("/dev/null"));
        let null = match &*DEV_NULL {
            Ok(f) => f.try_clone(),
            Err(_) => std::fs::File::open("/dev/null"),
        }
        .map_err(|e| format!("/dev/null: {e}"))?;
        let stdio = [null, open_log(&stdout_path)?, open_log(&stderr_path)?];
        // Registering the pidfd needs the runtime's context, which blocking-pool threads have.
        match start_lean(exe, program, &args, &cwd, stdio, &spec.env, &ours) {
            Ok(child) => {
                return Ok(Running {
                    child: Child::Lean(child),
                    stdout: stdout_path,
                    stderr: stderr_path,
                    cgroup,
                });
            }
            // Whatever went wrong, the standard library's start below tries again and, if it
            // fails too, gives the usual error.
            Err(e) => tracing::debug!(program, error = %e, "lean start failed"),
        }
    }
    // Spawning registers the child with the runtime's reaper; blocking-pool threads are inside
    // the runtime's context, so this works here.
    let child = match &found {
        None => command(OsStr::new(program))?.spawn().map_err(failed)?,
        Some(exe) => match command(exe.as_os_str())?.spawn() {
            Ok(child) => child,
            // The kept path went stale (removed, or not executable after all): the spawn
            // searches PATH itself this time, so the error, if any, is the usual one.
            Err(_) => {
                if let Some(p) = path_var {
                    PROGRAM_PATHS.forget(OsStr::new(program), p);
                }
                command(OsStr::new(program))?.spawn().map_err(failed)?
            }
        },
    };
    // Opened before anything can collect the child (only its `wait` does), so it names it.
    let pidfd = child.id().and_then(spawn::pidfd_of);
    // The `Command` is gone by here, and with it this process's descriptors of the log files.
    Ok(Running {
        child: Child::Std(child, pidfd),
        stdout: stdout_path,
        stderr: stderr_path,
        cgroup,
    })
}

/// The last `OUTPUT_TAIL_BYTES_MAX` bytes of a log file (empty if it cannot be read).
fn tail_of(path: &Path) -> Vec<u8> {
    let Ok(file) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let len = file.metadata().map_or(0, |m| m.len());
    let n = len.min(limits::OUTPUT_TAIL_BYTES_MAX as u64);
    let mut buf = vec![0u8; n as usize];
    match file.read_exact_at(&mut buf, len - n) {
        Ok(()) => buf,
        Err(_) => Vec::new(),
    }
}

async fn run_process(
    work_dir: &Path,
    table: &TaskTable,
    sandbox: Arc<Sandbox>,
    assign: pb::Assign,
) -> pb::TaskOutcome {
    let started = Instant::now();
    let work = work_dir.to_owned();
    let (assign, running) = match tokio::task::spawn_blocking(move || {
        let running = start(&work, &sandbox, &assign);
        (assign, running)
    })
    .await
    {
        Ok((assign, Ok(running))) => (assign, running),
        Ok((_, Err(reason))) => {
            let mut o = failed(reason);
            o.duration_ms = started.elapsed().as_millis() as u64;
            return o;
        }
        Err(e) => return failed(format!("starting the task: {e}")),
    };
    let Running {
        mut child,
        stdout,
        stderr,
        cgroup,
    } = running;
    let pid = child.id();
    let (stop_tx, stop_rx) = oneshot::channel();
    table.set_stop(&assign.task_id, assign.attempt, stop_tx);
    let started_at_us = now_us();
    table.started(pb::TaskStarted {
        task_id: assign.task_id.clone(),
        attempt: assign.attempt,
        started_at_ms: started_at_us / 1000,
        pid,
        started_at_us,
    });
    let spec = assign.spec.as_ref();
    let timeout_ms = spec.map_or(0, |s| s.timeout_ms);
    let deadline = async {
        match timeout_ms {
            0 => std::future::pending().await,
            ms => tokio::time::sleep(Duration::from_millis(ms)).await,
        }
    };
    let mut reason = String::new();
    let status = tokio::select! {
        s = child.exited() => match s {
            Ok(()) => {
                // Whatever the leader process left behind in its group goes with it.
                kill_group(pid, libc::SIGKILL);
                child.wait().await
            }
            Err(e) => Err(e),
        },
        _ = deadline => {
            reason = format!("timeout after {timeout_ms} ms");
            stop_group(pid, &mut child).await
        }
        r = stop_rx => {
            reason = r.unwrap_or_else(|_| "stopped".into());
            stop_group(pid, &mut child).await
        }
    };
    // Read here, not in the blocking pool: it is a few small reads of local files, and in the
    // pool it queued behind every start waiting there (an agent given a thousand short tasks
    // has that many), so a task's finish went out hundreds of ms after it ended and its start,
    // held back to ride with the finish, had gone out alone by then: twice the reports.
    let usage = cgroup.as_ref().map(|c| c.usage()).unwrap_or_default();
    drop(cgroup);
    let (stdout_tail, stderr_tail) = (tail_of(&stdout), tail_of(&stderr));
    if usage.oom_killed && reason.is_empty() {
        reason = "oom".into();
    }
    let (exit_code, signal) = match &status {
        Ok(s) => (s.code(), s.signal()),
        Err(e) => {
            if reason.is_empty() {
                reason = format!("waiting for the process: {e}");
            }
            (None, None)
        }
    };
    pb::TaskOutcome {
        succeeded: reason.is_empty() && exit_code == Some(0),
        exit_code,
        signal,
        reason,
        duration_ms: started.elapsed().as_millis() as u64,
        stdout_tail,
        stderr_tail,
        peak_memory_bytes: usage.peak_memory_bytes,
        cpu_time_ms: usage.cpu_time_ms,
    }
}

fn kill_group(pid: u32, sig: i32) {
    if pid > 0 {
        // SAFETY: kill(2) with a negative pid signals the process group we created with
        // process_group(0); it touches no memory of ours.
        unsafe {
            libc::kill(-(pid as i32), sig);
        }
    }
}

/// SIGTERM to the group, then SIGKILL after a grace period.
async fn stop_group(pid: u32, child: &mut Child) -> std::io::Result<std::process::ExitStatus> {
    kill_group(pid, libc::SIGTERM);
    match tokio::time::timeout(Duration::from_millis(limits::KILL_GRACE_MS), child.exited()).await {
        Ok(Ok(())) => child.end(pid).await,
        Ok(Err(e)) => Err(e),
        Err(_) => {
            kill_group(pid, libc::SIGKILL);
            child.end(pid).await
        }
    }
}

/// Reads part of a task's full log.
pub async fn read_log(work_dir: &Path, req: &pb::LogRequest, finished: bool) -> pb::LogData {
    let stream = pb::LogStream::try_from(req.stream).unwrap_or(pb::LogStream::Stdout);
    let path = log_path(work_dir, &req.task_id, req.attempt, stream);
    let max = req.max_bytes.clamp(1, limits::LOG_READ_BYTES_MAX);
    let result = async {
        let mut f = match tokio::fs::File::open(&path).await {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let legacy = legacy_log_path(work_dir, &req.task_id, req.attempt, stream);
                tokio::fs::File::open(legacy).await.map_err(|_| e)?
            }
            opened => opened?,
        };
        let len = f.metadata().await?.len();
        let start = req.offset.min(len);
        tokio::io::AsyncSeekExt::seek(&mut f, std::io::SeekFrom::Start(start)).await?;
        let want = (len - start).min(max) as usize;
        let mut data = vec![0u8; want];
        f.read_exact(&mut data).await?;
        Ok::<_, std::io::Error>((data, start, len))
    }
    .await;
    match result {
        Ok((data, start, len)) => {
            let next = start + data.len() as u64;
            pb::LogData {
                request_id: req.request_id,
                eof: finished && next >= len,
                next_offset: next,
                data,
                error: String::new(),
            }
        }
        Err(e) => pb::LogData {
            request_id: req.request_id,
            error: format!("{}: {e}", path.display()),
            ..Default::default()
        },
    }
}

/// Deletes task log directories not modified within `retention`.
pub fn prune_logs(work_dir: &Path, retention: Duration) {
    let root = work_dir.join("logs");
    let Ok(runs) = std::fs::read_dir(&root) else {
        return;
    };
    let now = SystemTime::now();
    for run in runs.flatten() {
        let old = run
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|m| now.duration_since(m).ok())
            .is_some_and(|age| age > retention);
        if old {
            let _ = std::fs::remove_dir_all(run.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assign(argv: &[&str]) -> pb::Assign {
        pb::Assign {
            task_id: "r1/main".into(),
            attempt: 1,
            run_id: "r1".into(),
            spec: Some(pb::TaskSpec {
                argv: argv.iter().map(|s| s.to_string()).collect(),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn the_tail_is_the_end_of_the_log_and_leaves_the_offset_alone() {
        // Guards: the replicated tail is the last OUTPUT_TAIL_BYTES_MAX bytes, read without
        // moving the offset a still-running grandchild writes at; a missing log reads empty.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        assert!(tail_of(&path).is_empty());
        assert!(tail_of(&dir.path().join("absent")).is_empty());
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        std::io::Write::write_all(&mut f, &data).unwrap();
        let tail = tail_of(&path);
        assert_eq!(tail, &data[data.len() - limits::OUTPUT_TAIL_BYTES_MAX..]);
        std::io::Write::write_all(&mut f, b"next").unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 10_004);
    }

    #[tokio::test]
    async fn output_goes_to_the_log_files_and_its_end_to_the_tails() {
        // Guards: the child writes its streams straight to the attempt's log files.
        let dir = tempfile::tempdir().unwrap();
        let table = TaskTable::default();
        let a = assign(&["sh", "-c", "echo out; echo err >&2; exit 3"]);
        table.claim(&a.task_id, 1, &a.run_id).unwrap();
        let outcome = run_process(dir.path(), &table, Default::default(), a).await;
        assert_eq!(outcome.exit_code, Some(3));
        assert_eq!(outcome.stdout_tail, b"out\n");
        assert_eq!(outcome.stderr_tail, b"err\n");
        let log = log_path(dir.path(), "r1/main", 1, pb::LogStream::Stderr);
        assert_eq!(std::fs::read(log).unwrap(), b"err\n");
    }

    #[tokio::test]
    async fn a_log_path_holding_a_symbolic_link_is_not_followed() {
        // Guards: a task could plant a link where a later attempt's log goes, and the agent
        // would truncate and fill the file it names.
        let dir = tempfile::tempdir().unwrap();
        let precious = dir.path().join("precious");
        std::fs::write(&precious, "keep me").unwrap();
        let log = log_path(dir.path(), "r1/main", 1, pb::LogStream::Stdout);
        std::fs::create_dir_all(log.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(&precious, &log).unwrap();
        let table = TaskTable::default();
        let a = assign(&["sh", "-c", "echo overwritten"]);
        table.claim(&a.task_id, 1, &a.run_id).unwrap();
        let outcome = run_process(dir.path(), &table, Default::default(), a).await;
        assert!(!outcome.succeeded);
        assert!(
            outcome.reason.contains("creating log file"),
            "{}",
            outcome.reason
        );
        assert_eq!(std::fs::read_to_string(&precious).unwrap(), "keep me");
    }

    #[tokio::test]
    async fn what_a_task_leaves_running_in_its_group_is_killed_when_it_ends() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("bg");
        let table = TaskTable::default();
        let script = format!("sleep 600 & echo $! > {}; exit 0", pid_file.display());
        let a = assign(&["sh", "-c", &script]);
        table.claim(&a.task_id, 1, &a.run_id).unwrap();
        let outcome = run_process(dir.path(), &table, Default::default(), a).await;
        assert_eq!(outcome.exit_code, Some(0));
        let pid: i32 = std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // The orphan is re-parented to init (or a subreaper) and collected there; wait until
        // it is gone.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // Gone, or a zombie awaiting its new parent: no longer running either way.
            if stat.is_empty() || stat.split(") ").nth(1).is_some_and(|s| s.starts_with('Z')) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{pid} still running: {stat}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn both_starts_give_the_task_its_variables_under_the_agents_own() {
        // Guards: `sh` is found on PATH (the lean start), `/bin/sh` is not searched for (the
        // standard library's); each passes the task's variables, and the DROVER_* ones win.
        let dir = tempfile::tempdir().unwrap();
        let table = TaskTable::default();
        for (i, sh) in ["sh", "/bin/sh"].into_iter().enumerate() {
            let script = "echo $DROVER_RUN_ID $DROVER_TASK_ID $DROVER_ATTEMPT $X";
            let mut a = assign(&[sh, "-c", script]);
            a.attempt = i as u64 + 1;
            let spec = a.spec.as_mut().unwrap();
            spec.env.insert("X".into(), "x".into());
            spec.env.insert("DROVER_ATTEMPT".into(), "99".into());
            table.claim(&a.task_id, a.attempt, &a.run_id).unwrap();
            let outcome = run_process(dir.path(), &table, Default::default(), a).await;
            let want = format!("r1 r1/main {} x\n", i + 1);
            assert_eq!(String::from_utf8_lossy(&outcome.stdout_tail), want, "{sh}");
        }
    }

    #[tokio::test]
    async fn a_work_dir_that_cannot_hold_logs_fails_the_task_with_the_reason() {
        // Guards: a broken work dir is a clear failed result, not a silent run without logs.
        let dir = tempfile::tempdir().unwrap();
        let not_a_dir = dir.path().join("file");
        std::fs::write(&not_a_dir, b"").unwrap();
        let table = TaskTable::default();
        let a = assign(&["true"]);
        table.claim(&a.task_id, 1, &a.run_id).unwrap();
        let outcome = run_process(&not_a_dir, &table, Default::default(), a).await;
        assert!(!outcome.succeeded);
        assert!(
            outcome.reason.starts_with("creating log dir"),
            "{}",
            outcome.reason
        );
    }

    #[tokio::test]
    async fn an_attempt_adds_one_directory_and_its_two_logs_to_its_runs_directory() {
        // Guards: the flat layout (every new inode costs a short task dearly) and that the
        // child runs in its fresh working directory.
        let dir = tempfile::tempdir().unwrap();
        let table = TaskTable::default();
        let a = assign(&["sh", "-c", "pwd; touch made-here"]);
        table.claim(&a.task_id, 1, &a.run_id).unwrap();
        let outcome = run_process(dir.path(), &table, Default::default(), a).await;
        assert!(outcome.succeeded, "{}", outcome.reason);
        let run_dir = dir.path().join("logs").join("r1");
        let mut entries: Vec<String> = std::fs::read_dir(&run_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        entries.sort();
        assert_eq!(
            entries,
            [
                "main.attempt-1.stderr",
                "main.attempt-1.stdout",
                "main.attempt-1.work"
            ]
        );
        let work = std::fs::canonicalize(run_dir.join("main.attempt-1.work")).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&outcome.stdout_tail).trim_end(),
            work.display().to_string()
        );
        assert!(work.join("made-here").exists());
    }

    fn assign_with_path(argv: &[&str], path_var: &str) -> pb::Assign {
        let mut a = assign(argv);
        let spec = a.spec.as_mut().unwrap();
        spec.env.insert("PATH".into(), path_var.into());
        a
    }

    #[tokio::test]
    async fn a_program_found_on_path_keeps_the_name_it_was_given_as_argv0() {
        // Guards: the agent runs the program from the path it found, but the child sees the
        // argv[0] the task wrote (multi-call binaries dispatch on it).
        let dir = tempfile::tempdir().unwrap();
        let table = TaskTable::default();
        let a = assign(&["sh", "-c", "tr '\\0' ' ' < /proc/$$/cmdline"]);
        table.claim(&a.task_id, 1, &a.run_id).unwrap();
        let outcome = run_process(dir.path(), &table, Default::default(), a).await;
        assert!(outcome.succeeded, "{}", outcome.reason);
        let cmdline = String::from_utf8_lossy(&outcome.stdout_tail).into_owned();
        assert!(cmdline.starts_with("sh -c "), "{cmdline:?}");
    }

    #[tokio::test]
    async fn the_tasks_own_path_is_searched_and_a_stale_found_path_falls_back_to_the_search() {
        // Guards: a task's PATH wins over the agent's, the first directory on it wins, and a
        // program removed from where it was found is looked for again rather than failing.
        let dir = tempfile::tempdir().unwrap();
        let (first, second) = (dir.path().join("first"), dir.path().join("second"));
        for (d, target) in [(&first, "echo"), (&second, "printf")] {
            std::fs::create_dir(d).unwrap();
            let real = ["/usr/bin", "/bin"]
                .iter()
                .map(|b| Path::new(b).join(target))
                .find(|p| p.exists())
                .unwrap();
            std::os::unix::fs::symlink(real, d.join("drover-test-tool")).unwrap();
        }
        let path_var = format!("{}:{}", first.display(), second.display());
        let table = TaskTable::default();
        let run = |attempt: u64| {
            let mut a = assign_with_path(&["drover-test-tool", "x"], &path_var);
            a.attempt = attempt;
            table.claim(&a.task_id, attempt, &a.run_id).unwrap();
            run_process(dir.path(), &table, Default::default(), a)
        };
        let outcome = run(1).await;
        assert!(outcome.succeeded, "{}", outcome.reason);
        assert_eq!(
            outcome.stdout_tail, b"x\n",
            "echo, from the first directory"
        );
        let kept = PROGRAM_PATHS.resolve(
            OsStr::new("drover-test-tool"),
            OsStr::new(&path_var),
            Instant::now(),
            |_| false,
        );
        assert_eq!(kept, Some(first.join("drover-test-tool")));

        std::fs::remove_file(first.join("drover-test-tool")).unwrap();
        let outcome = run(2).await;
        assert!(outcome.succeeded, "{}", outcome.reason);
        assert_eq!(
            outcome.stdout_tail, b"x",
            "printf, from the second directory"
        );

        std::fs::remove_file(second.join("drover-test-tool")).unwrap();
        let outcome = run(3).await;
        assert!(!outcome.succeeded);
        assert!(
            outcome.reason.starts_with("spawn: drover-test-tool: "),
            "{}",
            outcome.reason
        );
    }

    #[tokio::test]
    async fn logs_kept_in_the_layout_before_the_flat_one_are_still_served() {
        // Guards: an upgraded agent still serves the logs it kept before the upgrade.
        let dir = tempfile::tempdir().unwrap();
        let old = legacy_log_path(dir.path(), "r1/main", 2, pb::LogStream::Stderr);
        std::fs::create_dir_all(old.parent().unwrap()).unwrap();
        std::fs::write(&old, b"from before").unwrap();
        let req = pb::LogRequest {
            task_id: "r1/main".into(),
            attempt: 2,
            stream: pb::LogStream::Stderr as i32,
            max_bytes: 100,
            ..Default::default()
        };
        let data = read_log(dir.path(), &req, true).await;
        assert_eq!(data.error, "");
        assert_eq!(data.data, b"from before");
        assert!(data.eof);
        let missing = read_log(dir.path(), &pb::LogRequest { attempt: 3, ..req }, true).await;
        assert!(
            missing.error.contains("r1/main.attempt-3.stderr"),
            "{}",
            missing.error
        );
    }
}
