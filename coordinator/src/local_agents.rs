//! The `local` hook: agents started as processes on the leader's own host, for development and
//! tests. A scale-up decision from `from` to `to` launches `to - from` agents, each named for
//! the decision, so calling it again for a decision launches nothing twice. Each agent gets a
//! certificate of its own, issued with `droverctl certs issue` from the CA in the coordinator's
//! `--tls-dir` (which a production cluster does not hold: use the `exec` or `webhook` hooks
//! there). The agents die with the coordinator that started them.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::model::{Decision, PoolSpec};
use crate::node::Ctx;

struct Started {
    name: String,
    child: tokio::process::Child,
}

/// Agents this process started (for every node it hosts), so a scale-in can stop them.
static STARTED: Mutex<Vec<Started>> = Mutex::new(Vec::new());

/// A program beside this executable (the coordinator's, or droverctl's in `droverctl dev`).
fn sibling(program: &str) -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| format!("finding this executable: {e}"))?;
    let dir = exe.parent().unwrap_or(Path::new("."));
    // Test builds name their binaries test-*: prefer the real names, then those.
    for name in [
        program.to_owned(),
        program
            .replace("drover-", "test-")
            .replace("droverctl", "test-ctl"),
    ] {
        let p = dir.join(&name);
        if p.exists() {
            return Ok(p);
        }
    }
    Err(format!(
        "the local hook needs {program} next to {}",
        exe.display()
    ))
}

pub async fn apply(
    ctx: &Ctx,
    spec: &PoolSpec,
    d: &Decision,
    agent_args: &[String],
) -> Result<(), String> {
    // Removals: stop those this node started (others belong to a node that is gone).
    {
        let mut started = STARTED.lock().unwrap();
        for (name, _) in &d.remove {
            if let Some(i) = started.iter().position(|s| &s.name == name) {
                let mut s = started.remove(i);
                let _ = s.child.start_kill();
            }
        }
        // Forget the ones that exited.
        started.retain_mut(|s| s.child.try_wait().ok().flatten().is_none());
    }
    // Launch k of decision d is the agent `{pool}-{d}-{k}`, and issuing its certificate in the
    // shared --tls-dir is the record that it was launched: a repeated call for the decision (a
    // retry, or a new leader after the one that launched died before reporting) starts only the
    // launches no node has started. One that started and then died is not started again; the
    // policy sees it missing after its boot timeout and decides anew.
    let launches = d.to.saturating_sub(d.from);
    if launches == 0 {
        return Ok(());
    }
    let env = &ctx.local;
    let agent_bin = sibling("drover-agent")?;
    let ctl_bin = sibling("droverctl")?;
    let coordinators: Vec<String> = ctx.peers.iter().map(|(_, a)| a.clone()).collect();
    let class = if spec.class.is_empty() {
        &spec.name
    } else {
        &spec.class
    };
    let labels: Vec<String> = spec
        .labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    for k in 1..=launches {
        let name = format!("{}-{}-{k}", spec.name, d.id);
        if env.tls_dir.join(format!("{name}.pem")).exists() {
            continue;
        }
        let out = tokio::process::Command::new(&ctl_bin)
            .args([
                "certs", "issue", "--role", "agent", "--name", &name, "--dir",
            ])
            .arg(&env.tls_dir)
            .output()
            .await
            .map_err(|e| format!("issuing a certificate for {name}: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "issuing a certificate for {name}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let dir = env.data_dir.join("local-agents");
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let log = std::fs::File::create(dir.join(format!("{name}.log")))
            .map_err(|e| format!("{name}.log: {e}"))?;
        let mut cmd = tokio::process::Command::new(&agent_bin);
        cmd.arg("--coordinator")
            .arg(coordinators.join(","))
            .arg("--tls-dir")
            .arg(&env.tls_dir)
            .args(["--name", &name, "--pool", &spec.name, "--class", class])
            .args(["--instance-id", &format!("local-{name}")])
            .arg("--work-dir")
            .arg(dir.join(&name))
            .args(if labels.is_empty() {
                vec![]
            } else {
                vec!["--labels".to_owned(), labels.join(",")]
            })
            .args(agent_args)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .kill_on_drop(true);
        // SAFETY: prctl(PR_SET_PDEATHSIG) in the child before exec touches no memory of ours;
        // the agent then dies with this coordinator, as an instance would with its group.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("starting {}: {e}", agent_bin.display()))?;
        tracing::info!(agent = %name, pool = %spec.name, decision = d.id, pid = child.id(), "local agent started");
        STARTED.lock().unwrap().push(Started { name, child });
    }
    Ok(())
}
