//! Per-task cgroup v2 limits, written with plain file operations.
//!
//! Layout under the agent's own cgroup (or `--cgroup-root`, e.g. a systemd `Delegate=yes` unit):
//! `ROOT/agent` holds the agent process itself (cgroup v2 allows processes only in leaves once
//! controllers are enabled), `ROOT/tasks/TASK-aN` holds one attempt with `memory.max` and
//! `cpu.max` from its request. Where the memory and cpu controllers are not available or not
//! writable, `detect` says why and the agent runs tasks without limits.

use std::fs;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use drover_proto::pb;

const CGROUP_FS: &str = "/sys/fs/cgroup";
/// cpu.max period: 100 ms, the kernel default.
const CPU_PERIOD_US: u64 = 100_000;

#[derive(Debug)]
pub struct Cgroups {
    tasks: PathBuf,
}

/// Why limits are unavailable, or the root they live under.
pub fn detect(root: Option<&Path>) -> Result<Cgroups, String> {
    let fs_root = Path::new(CGROUP_FS);
    let controllers = fs::read_to_string(fs_root.join("cgroup.controllers"))
        .map_err(|_| format!("{CGROUP_FS} is not a cgroup v2 (unified) hierarchy"))?;
    for c in ["memory", "cpu"] {
        if !controllers.split_whitespace().any(|x| x == c) {
            return Err(format!(
                "the cgroup v2 {c} controller is not available (have: {})",
                controllers.trim()
            ));
        }
    }
    let root = match root {
        Some(r) => r.to_owned(),
        None => {
            let own = fs::read_to_string("/proc/self/cgroup")
                .map_err(|e| format!("reading /proc/self/cgroup: {e}"))?;
            let rel = own
                .lines()
                .find_map(|l| l.strip_prefix("0::"))
                .ok_or("no cgroup v2 entry in /proc/self/cgroup")?;
            fs_root.join(rel.trim_start_matches('/'))
        }
    };
    let write = |path: PathBuf, value: &str| {
        fs::write(&path, value).map_err(|e| format!("writing {}: {e}", path.display()))
    };
    let agent = root.join("agent");
    fs::create_dir_all(&agent).map_err(|e| {
        format!(
            "creating {}: {e} (is the cgroup delegated to this user?)",
            agent.display()
        )
    })?;
    write(agent.join("cgroup.procs"), &std::process::id().to_string())?;
    write(root.join("cgroup.subtree_control"), "+memory +cpu")?;
    let tasks = root.join("tasks");
    fs::create_dir_all(&tasks).map_err(|e| format!("creating {}: {e}", tasks.display()))?;
    write(tasks.join("cgroup.subtree_control"), "+memory +cpu")?;
    Ok(Cgroups { tasks })
}

/// One attempt's cgroup; removed on drop.
#[derive(Debug)]
pub struct TaskCgroup {
    path: PathBuf,
    procs: fs::File,
}

/// What the kernel measured for an attempt.
#[derive(Debug, Default)]
pub struct Usage {
    pub oom_killed: bool,
    pub peak_memory_bytes: Option<u64>,
    pub cpu_time_ms: Option<u64>,
}

impl Cgroups {
    pub fn create(
        &self,
        task_id: &str,
        attempt: u64,
        resources: Option<&pb::Resources>,
    ) -> Result<TaskCgroup, String> {
        let name: String = task_id
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let path = self.tasks.join(format!("{name}-a{attempt}"));
        fs::create_dir_all(&path).map_err(|e| format!("creating {}: {e}", path.display()))?;
        let r = resources.cloned().unwrap_or_default();
        let memory = if r.memory_bytes == 0 {
            "max".to_owned()
        } else {
            r.memory_bytes.to_string()
        };
        fs::write(path.join("memory.max"), memory).map_err(|e| format!("memory.max: {e}"))?;
        // No swap, so exceeding memory.max ends in the OOM killer rather than thrashing.
        let _ = fs::write(path.join("memory.swap.max"), "0");
        let cpu = if r.cpu_millis == 0 {
            format!("max {CPU_PERIOD_US}")
        } else {
            format!("{} {CPU_PERIOD_US}", r.cpu_millis * CPU_PERIOD_US / 1000)
        };
        fs::write(path.join("cpu.max"), cpu).map_err(|e| format!("cpu.max: {e}"))?;
        let procs = fs::OpenOptions::new()
            .write(true)
            .open(path.join("cgroup.procs"))
            .map_err(|e| format!("opening cgroup.procs: {e}"))?;
        Ok(TaskCgroup { path, procs })
    }
}

impl TaskCgroup {
    /// Runs in the child between fork and exec: moves the child into the cgroup before the
    /// program starts, so nothing it forks escapes the limits.
    pub fn join_in_child(&self) -> impl Fn() -> std::io::Result<()> + Send + Sync + 'static {
        let fd = self.procs.as_raw_fd();
        move || {
            // SAFETY: write(2) on an fd opened by the parent is async-signal-safe; "0" means
            // "the writing process".
            let n = unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) };
            if n == 1 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        }
    }

    pub fn usage(&self) -> Usage {
        let read = |f: &str| fs::read_to_string(self.path.join(f)).unwrap_or_default();
        let field = |text: &str, key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key).map(|v| v.trim().parse::<u64>().ok()))
                .flatten()
        };
        Usage {
            oom_killed: field(&read("memory.events"), "oom_kill ").is_some_and(|n| n > 0),
            peak_memory_bytes: read("memory.peak").trim().parse().ok(),
            cpu_time_ms: field(&read("cpu.stat"), "usage_usec ").map(|us| us / 1000),
        }
    }
}

impl Drop for TaskCgroup {
    fn drop(&mut self) {
        // Empty by now (the whole process group was killed); rmdir fails harmlessly otherwise.
        let _ = fs::remove_dir(&self.path);
    }
}
