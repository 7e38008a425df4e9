//! Runs one task attempt as a child process in its own process group: output to files on local
//! disk (the full log) and to a bounded tail (replicated with the result), a timeout, and a stop
//! that takes down the whole group.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use drover_proto::pb;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;
use tokio::sync::oneshot;

use crate::limits;
use crate::tasks::TaskTable;

/// `WORK/logs/RUN/TASK/attempt-N.{stdout,stderr}`.
pub fn log_path(work_dir: &Path, task_id: &str, attempt: u64, stream: pb::LogStream) -> PathBuf {
    let ext = if stream == pb::LogStream::Stderr {
        "stderr"
    } else {
        "stdout"
    };
    let mut p = work_dir.join("logs");
    for part in task_id.split('/') {
        p.push(sanitize(part));
    }
    p.join(format!("attempt-{attempt}.{ext}"))
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
pub async fn execute(
    work_dir: PathBuf,
    table: Arc<TaskTable>,
    cgroups: Option<Arc<crate::cgroup::Cgroups>>,
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
            let outcome = run_process(&work_dir, &table, cgroups.as_deref(), &assign).await;
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

async fn run_process(
    work_dir: &Path,
    table: &TaskTable,
    cgroups: Option<&crate::cgroup::Cgroups>,
    assign: &pb::Assign,
) -> pb::TaskOutcome {
    let started = Instant::now();
    let Some(spec) = assign.spec.as_ref() else {
        return failed("assignment carried no task spec".into());
    };
    let stdout_path = log_path(
        work_dir,
        &assign.task_id,
        assign.attempt,
        pb::LogStream::Stdout,
    );
    let stderr_path = log_path(
        work_dir,
        &assign.task_id,
        assign.attempt,
        pb::LogStream::Stderr,
    );
    if let Some(dir) = stdout_path.parent()
        && let Err(e) = tokio::fs::create_dir_all(dir).await
    {
        return failed(format!("creating log dir {}: {e}", dir.display()));
    }
    let cwd = if spec.workdir.is_empty() {
        let dir = stdout_path.with_extension("work");
        if let Err(e) = tokio::fs::create_dir_all(&dir).await {
            return failed(format!("creating working dir {}: {e}", dir.display()));
        }
        dir
    } else {
        PathBuf::from(&spec.workdir)
    };
    let mut cmd = if spec.shell.is_empty() {
        let Some((program, args)) = spec.argv.split_first() else {
            return failed("task has neither command nor shell".into());
        };
        let mut c = Command::new(program);
        c.args(args);
        c
    } else {
        let mut c = Command::new("sh");
        c.arg("-c").arg(&spec.shell);
        c
    };
    cmd.current_dir(&cwd)
        .envs(&spec.env)
        .env("DROVER_RUN_ID", &assign.run_id)
        .env("DROVER_TASK_ID", &assign.task_id)
        .env("DROVER_ATTEMPT", assign.attempt.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let cgroup =
        match cgroups.map(|c| c.create(&assign.task_id, assign.attempt, spec.resources.as_ref())) {
            None => None,
            Some(Ok(cg)) => Some(cg),
            Some(Err(e)) => return failed(format!("cgroup: {e}")),
        };
    if let Some(cg) = &cgroup {
        let join = cg.join_in_child();
        // SAFETY: the closure only calls write(2), which is async-signal-safe.
        unsafe {
            cmd.pre_exec(join);
        }
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let what = spec.argv.first().map_or("sh", String::as_str);
            let mut o = failed(format!("spawn: {what}: {e} (cwd {})", cwd.display()));
            o.duration_ms = started.elapsed().as_millis() as u64;
            return o;
        }
    };
    let pid = child.id().unwrap_or(0);
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
    let out = tokio::spawn(pump(child.stdout.take(), stdout_path));
    let err = tokio::spawn(pump(child.stderr.take(), stderr_path));

    let timeout = if spec.timeout_ms == 0 {
        None
    } else {
        Some(Duration::from_millis(spec.timeout_ms))
    };
    let deadline = async {
        match timeout {
            Some(t) => tokio::time::sleep(t).await,
            None => std::future::pending().await,
        }
    };
    let mut reason = String::new();
    let status = tokio::select! {
        s = child.wait() => s,
        _ = deadline => {
            reason = format!("timeout after {} ms", spec.timeout_ms);
            stop_group(pid, &mut child).await
        }
        r = stop_rx => {
            reason = r.unwrap_or_else(|_| "stopped".into());
            stop_group(pid, &mut child).await
        }
    };
    // Whatever the leader process left behind in its group goes with it, so the pipes close.
    kill_group(pid, libc::SIGKILL);
    let stdout_tail = out.await.unwrap_or_default();
    let stderr_tail = err.await.unwrap_or_default();
    let usage = cgroup.as_ref().map(|c| c.usage()).unwrap_or_default();
    drop(cgroup);
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
async fn stop_group(
    pid: u32,
    child: &mut tokio::process::Child,
) -> std::io::Result<std::process::ExitStatus> {
    kill_group(pid, libc::SIGTERM);
    match tokio::time::timeout(Duration::from_millis(limits::KILL_GRACE_MS), child.wait()).await {
        Ok(s) => s,
        Err(_) => {
            kill_group(pid, libc::SIGKILL);
            child.wait().await
        }
    }
}

/// Copies a pipe to its log file and returns the last bytes.
async fn pump(pipe: Option<impl AsyncRead + Unpin>, path: PathBuf) -> Vec<u8> {
    let Some(mut pipe) = pipe else {
        return Vec::new();
    };
    let mut file = match tokio::fs::File::create(&path).await {
        Ok(f) => Some(f),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot create log file; keeping only the tail");
            None
        }
    };
    let mut tail: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(f) = file.as_mut()
            && f.write_all(&buf[..n]).await.is_err()
        {
            file = None;
        }
        tail.extend_from_slice(&buf[..n]);
        if tail.len() > limits::OUTPUT_TAIL_BYTES_MAX {
            tail.drain(..tail.len() - limits::OUTPUT_TAIL_BYTES_MAX);
        }
    }
    if let Some(mut f) = file {
        let _ = f.flush().await;
    }
    tail
}

/// Reads part of a task's full log.
pub async fn read_log(work_dir: &Path, req: &pb::LogRequest, finished: bool) -> pb::LogData {
    let stream = pb::LogStream::try_from(req.stream).unwrap_or(pb::LogStream::Stdout);
    let path = log_path(work_dir, &req.task_id, req.attempt, stream);
    let max = req.max_bytes.clamp(1, limits::LOG_READ_BYTES_MAX);
    let result = async {
        let mut f = tokio::fs::File::open(&path).await?;
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
