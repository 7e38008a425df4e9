//! The replicated state and its deterministic `apply`. No I/O, no clock, no randomness: time
//! arrives in the command, stamped by the leader. Ordered maps keep snapshots byte-identical
//! across replicas.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::command::{Command, CommandResult, Request, Response};
use crate::limits;
use crate::model::{
    Agent, AgentName, AgentState, Assignment, DeadLetter, HeldTask, Outcome, PendingKey,
    QueueConfig, Resources, Run, RunSpec, RunState, Task, TaskId, TaskSpec, TaskState,
};

/// Pending tasks and the bytes of their specs, for one submitter, one queue, or everyone.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    pub tasks: u64,
    pub bytes: u64,
}

impl Tally {
    fn add(&mut self, d: Tally) {
        self.tasks += d.tasks;
        self.bytes += d.bytes;
    }

    fn sub(&mut self, d: Tally) {
        self.tasks = self.tasks.saturating_sub(d.tasks);
        self.bytes = self.bytes.saturating_sub(d.bytes);
    }
}

/// Counters an operator graphs; part of replicated state so every node reports the same totals.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub runs_submitted: u64,
    pub tasks_succeeded: u64,
    pub tasks_failed: u64,
    pub stale_reports: u64,
    pub agents_lost: u64,
    pub assignments_dropped: u64,
    pub tasks_retried: u64,
    pub tasks_skipped: u64,
    pub tasks_cancelled: u64,
    pub dead_letters: u64,
    pub dead_letters_dropped: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// Keyed by the run's sequence number, so iteration is submission order.
    pub runs: BTreeMap<u64, Run>,
    pub tasks: BTreeMap<TaskId, Task>,
    pub agents: BTreeMap<AgentName, Agent>,
    /// Pending tasks in queue order: higher priority first, then submission order.
    pub pending: BTreeSet<PendingKey>,
    /// Idempotency key -> run sequence number.
    pub idempotency: BTreeMap<String, u64>,
    /// Sequence number of the newest run (0 before the first).
    pub last_run_seq: u64,
    pub next_task_seq: u64,
    pub counters: Counters,
    /// Steps that failed for good, by id (oldest first).
    pub dead_letters: BTreeMap<u64, DeadLetter>,
    pub last_dead_letter: u64,
    /// Queues with limits, by name.
    pub queues: BTreeMap<String, QueueConfig>,
    /// Attempts the coordinator ended (cancelled, skipped, failed by timeout) while an agent
    /// still ran them: the leader tells the agent to stop them until it reports them ended.
    pub stopping: BTreeMap<TaskId, (AgentName, u64)>,
    /// Tasks waiting to be retried, by (deadline us, task seq). Derived.
    #[serde(skip)]
    pub retry_due: BTreeMap<(u64, u64), TaskId>,
    /// Tasks assigned or running per queue, for `max_concurrency`. Derived.
    #[serde(skip)]
    pub active_by_queue: BTreeMap<String, u64>,
    /// Agent pools and their scaling history, by name.
    pub pools: BTreeMap<String, crate::model::Pool>,
    pub last_decision: u64,
    /// Tasks assigned and not yet reported started, oldest assignment first, keyed by (when
    /// assigned, task seq): what the leader re-sends, or re-queues once they have waited too long
    /// (`stranded`), looking only at the old end. Derived, so not stored; `rebuild_derived`.
    #[serde(skip)]
    pub assigned: BTreeMap<(u64, u64), TaskId>,
    /// Pending tasks per submitter, per queue and in all, with their spec bytes: what admission
    /// budgets and `pending_bytes_max` are checked against. Derived.
    #[serde(skip)]
    pub pending_by_submitter: BTreeMap<String, Tally>,
    #[serde(skip)]
    pub pending_by_queue: BTreeMap<String, Tally>,
    #[serde(skip)]
    pub pending_total: Tally,
    /// Spec bytes of every task kept (pending, placed or finished): finished runs are forgotten
    /// while it is over `task_bytes_retained_max`. Derived.
    #[serde(skip)]
    pub task_bytes: u64,
}

/// Whether the queue (`queued`, all submitters) has room for `adding`; the refusal names the
/// limit.
pub fn room_for(
    queued: Tally,
    adding: Tally,
    tasks_max: u64,
    bytes_max: u64,
) -> Result<(), CommandResult> {
    if queued.tasks + adding.tasks > tasks_max {
        return Err(CommandResult::Rejected {
            limit: Some("pending_tasks_max".into()),
            message: format!(
                "{} tasks are pending; pending_tasks_max is {tasks_max}",
                queued.tasks
            ),
        });
    }
    if queued.bytes + adding.bytes > bytes_max {
        return Err(CommandResult::Rejected {
            limit: Some("pending_bytes_max".into()),
            message: format!(
                "pending tasks hold {} bytes of specs and this run adds {}; pending_bytes_max \
                 is {bytes_max}",
                queued.bytes, adding.bytes
            ),
        });
    }
    Ok(())
}

/// Who submitted the run `run_id` ("" if it is gone).
fn submitter_of<'a>(runs: &'a BTreeMap<u64, Run>, run_id: &str) -> &'a str {
    run_seq(run_id)
        .and_then(|s| runs.get(&s))
        .map_or("", |r| r.submitted_by.as_str())
}

/// The pending tallies (all, per submitter, per queue) as separate borrows, so callers can
/// count while they read tasks and runs.
type Tallies<'a> = (
    &'a mut Tally,
    &'a mut BTreeMap<String, Tally>,
    &'a mut BTreeMap<String, Tally>,
);

fn count_pending(
    (total, by_submitter, by_queue): Tallies<'_>,
    submitter: &str,
    queue: &str,
    delta: Tally,
    entering: bool,
) {
    let change = |tally: &mut Tally| {
        if entering {
            tally.add(delta)
        } else {
            tally.sub(delta)
        }
    };
    change(total);
    for (map, key) in [(by_submitter, submitter), (by_queue, queue)] {
        match map.get_mut(key) {
            Some(tally) => {
                change(tally);
                if tally.tasks == 0 {
                    map.remove(key);
                }
            }
            None if entering => {
                let mut tally = Tally::default();
                change(&mut tally);
                map.insert(key.to_owned(), tally);
            }
            None => {}
        }
    }
}

pub fn run_id(seq: u64) -> String {
    format!("run-{seq}")
}

/// Parses `run-N`; anything else is not a run id.
pub fn run_seq(id: &str) -> Option<u64> {
    id.strip_prefix("run-")?.parse().ok()
}

/// When a task started: the agent's report (it knows best when the process began), kept between
/// the assignment and the leader's clock so a skewed agent clock cannot reorder a task's history.
fn start_time(task: &Task, reported_us: u64, now_us: u64) -> u64 {
    if reported_us == 0 {
        return now_us;
    }
    let earliest = task.assigned_at_us.max(task.created_at_us).min(now_us);
    reported_us.clamp(earliest, now_us)
}

pub fn task_id(run_id: &str, task_name: &str) -> TaskId {
    format!("{run_id}/{task_name}")
}

impl State {
    /// Counts task `tid` into (`entering`) or out of the pending tallies.
    pub(crate) fn tally_pending(&mut self, tid: &str, entering: bool) {
        let Some(t) = self.tasks.get(tid) else {
            return;
        };
        let delta = Tally {
            tasks: 1,
            bytes: t.spec.approx_bytes(),
        };
        let submitter = submitter_of(&self.runs, &t.run_id);
        count_pending(
            (
                &mut self.pending_total,
                &mut self.pending_by_submitter,
                &mut self.pending_by_queue,
            ),
            submitter,
            &t.spec.queue,
            delta,
            entering,
        );
    }

    /// Counts `delta` (tasks of one submitter and queue) into (`entering`) or out of the pending
    /// tallies. Applies change it a run or a plan at a time, not a task at a time: it is on the
    /// path of every submission and assignment, on every replica.
    fn tally(&mut self, submitter: &str, queue: &str, delta: Tally, entering: bool) {
        count_pending(
            (
                &mut self.pending_total,
                &mut self.pending_by_submitter,
                &mut self.pending_by_queue,
            ),
            submitter,
            queue,
            delta,
            entering,
        );
    }

    /// Applies one entry. `term` is the term of the entry's log id.
    pub fn apply(&mut self, term: u64, req: &Request) -> Response {
        let results = req
            .commands
            .iter()
            .map(|c| self.apply_one(term, req.now_us, c))
            .collect();
        Response { results }
    }

    fn apply_one(&mut self, term: u64, now_us: u64, cmd: &Command) -> CommandResult {
        match cmd {
            Command::SubmitRun {
                idempotency_key,
                spec,
                submitted_by,
                placement,
            } => {
                let mut result = self.submit_run(now_us, idempotency_key, spec, submitted_by);
                if let CommandResult::Submitted {
                    run_id,
                    deduplicated: false,
                    assigned,
                } = &mut result
                    && let Some(p) = placement.as_ref().filter(|p| p.term == term)
                {
                    let wanted = crate::placement::assignments(run_id, spec, p);
                    if let CommandResult::PlanApplied { accepted, .. } =
                        self.apply_plan(now_us, &wanted, &[])
                    {
                        *assigned = accepted;
                    }
                }
                result
            }
            Command::RegisterAgent { .. } => self.register_agent(now_us, cmd),
            Command::ApplyPlan {
                term: plan_term,
                assignments,
                unplaced,
            } => {
                if *plan_term != term {
                    return CommandResult::Rejected {
                        limit: None,
                        message: format!("plan from term {plan_term} refused in term {term}"),
                    };
                }
                self.apply_plan(now_us, assignments, unplaced)
            }
            Command::TaskStarted {
                agent,
                task_id,
                attempt,
                started_at_us,
            } => self.task_started(now_us, agent, task_id, *attempt, *started_at_us),
            Command::TaskFinished {
                agent,
                task_id,
                attempt,
                outcome,
                started_at_us,
            } => self.task_finished(now_us, agent, task_id, *attempt, outcome, *started_at_us),
            Command::AgentLost { name, reason } => self.agent_lost(now_us, name, reason),
            Command::SetDrain {
                name,
                draining,
                deadline_ms,
            } => self.set_drain(name, *draining, *deadline_ms),
            Command::RequeueTasks {
                agent,
                tasks,
                reason,
            } => {
                let mut requeued = Vec::new();
                for h in tasks {
                    let current = self.tasks.get(&h.task_id).is_some_and(|t| {
                        t.attempt == h.attempt
                            && t.agent.as_deref() == Some(agent.as_str())
                            && !t.state.is_terminal()
                    });
                    if current {
                        self.requeue(now_us, &h.task_id, reason);
                        requeued.push(h.task_id.clone());
                    }
                }
                CommandResult::Requeued { requeued }
            }
            Command::ExpireTasks { tasks } => {
                let mut expired = Vec::new();
                for (h, reason) in tasks {
                    if self.expire(now_us, h, reason) {
                        expired.push(h.task_id.clone());
                    }
                }
                CommandResult::Expired { expired }
            }
            Command::CancelRun {
                run_id,
                step,
                reason,
            } => self.cancel_run(now_us, run_id, step, reason),
            Command::RetryDue { tasks } => self.retry_due_tasks(tasks),
            Command::FailTasks { tasks } => {
                let mut failed = Vec::new();
                for (h, reason) in tasks {
                    let current = self.tasks.get(&h.task_id).is_some_and(|t| {
                        t.attempt == h.attempt
                            && matches!(t.state, TaskState::Assigned | TaskState::Running)
                    });
                    if current {
                        let outcome = Outcome {
                            reason: reason.clone(),
                            ..Default::default()
                        };
                        self.fail_attempt(now_us, &h.task_id, outcome, true);
                        failed.push(h.task_id.clone());
                    }
                }
                CommandResult::Failed { tasks: failed }
            }
            Command::RetryDeadLetter { id } => self.retry_dead_letter(*id),
            Command::DropDeadLetter { id } => match self.dead_letters.remove(id) {
                Some(_) => CommandResult::Done,
                None => CommandResult::NotFound {
                    message: format!("dead letter dl-{id} not found"),
                },
            },
            Command::SetQueue { name, config } => {
                if !self.queues.contains_key(name) && self.queues.len() >= limits::QUEUES_MAX {
                    return CommandResult::Rejected {
                        limit: Some("queues_max".into()),
                        message: format!(
                            "{} queues are configured; queues_max is {}",
                            self.queues.len(),
                            limits::QUEUES_MAX
                        ),
                    };
                }
                if *config == QueueConfig::default() {
                    self.queues.remove(name);
                } else {
                    self.queues.insert(name.clone(), config.clone());
                }
                CommandResult::Done
            }
            Command::ApplyPools { pools } => self.apply_pools(pools),
            Command::Scale {
                pool,
                from,
                to,
                reason,
                remove,
            } => self.scale(now_us, pool, *from, *to, reason, remove),
            Command::HookOutcome {
                decision,
                ok,
                error,
            } => self.hook_outcome(*decision, *ok, error),
            Command::ForgetAgents { names } => {
                let forgotten: Vec<AgentName> = names
                    .iter()
                    .filter(|n| {
                        self.agents
                            .get(n.as_str())
                            .is_some_and(|a| a.state == AgentState::Lost && a.tasks.is_empty())
                    })
                    .cloned()
                    .collect();
                for n in &forgotten {
                    self.agents.remove(n);
                }
                CommandResult::Forgotten { names: forgotten }
            }
        }
    }

    /// Fails a pending, never-placed attempt with `reason`. False if it is no longer that.
    fn expire(&mut self, now_us: u64, h: &HeldTask, reason: &str) -> bool {
        let Some(task) = self.tasks.get(&h.task_id) else {
            return false;
        };
        if task.state != TaskState::Pending || task.attempt != h.attempt {
            return false;
        }
        self.settle(now_us, &h.task_id, TaskState::Failed, Some(reason), false);
        self.after_final_failure(now_us, &h.task_id);
        true
    }

    fn submit_run(
        &mut self,
        now_us: u64,
        key: &str,
        spec: &RunSpec,
        submitted_by: &str,
    ) -> CommandResult {
        // A key whose run was forgotten may linger until the next sweep; it no longer deduplicates.
        if !key.is_empty()
            && let Some(seq) = self.idempotency.get(key)
            && self.runs.contains_key(seq)
        {
            return CommandResult::Submitted {
                run_id: run_id(*seq),
                deduplicated: true,
                assigned: Vec::new(),
            };
        }
        let adding: u64 = spec.tasks.iter().map(TaskSpec::approx_bytes).sum();
        let adding_tally = Tally {
            tasks: spec.tasks.len() as u64,
            bytes: adding,
        };
        let queued = Tally {
            tasks: self.pending.len() as u64,
            ..self.pending_total
        };
        if let Err(refusal) = room_for(
            queued,
            adding_tally,
            limits::PENDING_TASKS_MAX as u64,
            limits::PENDING_BYTES_MAX,
        ) {
            return refusal;
        }
        if let Err(refusal) = self.queue_room(spec) {
            return refusal;
        }
        // Run ids start at run-1.
        self.last_run_seq += 1;
        let seq = self.last_run_seq;
        let id = run_id(seq);
        let mut task_ids = Vec::with_capacity(spec.tasks.len());
        let mut dependents: BTreeMap<&str, Vec<TaskId>> = BTreeMap::new();
        for t in &spec.tasks {
            for d in &t.depends_on {
                dependents
                    .entry(d.as_str())
                    .or_default()
                    .push(task_id(&id, &t.name));
            }
        }
        for t in &spec.tasks {
            let tid = task_id(&id, &t.name);
            let tseq = self.next_task_seq;
            self.next_task_seq += 1;
            let blocked = !t.depends_on.is_empty();
            if !blocked {
                self.pending
                    .insert((-i64::from(t.priority), tseq, tid.clone()));
            }
            self.tasks.insert(
                tid.clone(),
                Task {
                    id: tid.clone(),
                    run_id: id.clone(),
                    spec: t.clone(),
                    state: if blocked {
                        TaskState::Blocked
                    } else {
                        TaskState::Pending
                    },
                    attempt: 1,
                    agent: None,
                    pending_reason: if blocked {
                        format!("waiting for {}", t.depends_on.join(", ")).into()
                    } else {
                        "waiting for the scheduler".into()
                    },
                    created_at_us: now_us,
                    assigned_at_us: 0,
                    started_at_us: 0,
                    finished_at_us: 0,
                    outcome: None,
                    seq: tseq,
                    failures: 0,
                    retry_at_us: 0,
                    history: Vec::new(),
                    waiting_on: t.depends_on.len() as u32,
                    dependents: dependents.remove(t.name.as_str()).unwrap_or_default(),
                },
            );
            task_ids.push(tid);
        }
        self.task_bytes += adding;
        self.runs.insert(
            seq,
            Run {
                id: id.clone(),
                name: spec.name.clone(),
                labels: spec.labels.clone(),
                task_ids,
                created_at_us: now_us,
                finished_at_us: 0,
                submitted_by: submitted_by.to_owned(),
                seq,
                on_failure: spec.on_failure,
                params: spec.params.clone(),
                cancelled: String::new(),
                unfinished: spec.tasks.len() as u32,
            },
        );
        let mut by_queue: Vec<(&str, Tally)> = Vec::new();
        for t in spec.tasks.iter().filter(|t| t.depends_on.is_empty()) {
            let d = Tally {
                tasks: 1,
                bytes: t.approx_bytes(),
            };
            match by_queue.iter_mut().find(|(q, _)| *q == t.queue) {
                Some((_, tally)) => tally.add(d),
                None => by_queue.push((&t.queue, d)),
            }
        }
        for (queue, d) in by_queue {
            self.tally(submitted_by, queue, d, true);
        }
        if !key.is_empty() {
            self.idempotency.insert(key.to_owned(), seq);
        }
        self.counters.runs_submitted += 1;
        self.evict_old_runs(limits::RUNS_RETAINED_MAX, limits::TASKS_RETAINED_MAX);
        CommandResult::Submitted {
            run_id: id,
            deduplicated: false,
            assigned: Vec::new(),
        }
    }

    /// Forgets the oldest finished runs while more than `RUNS_RETAINED_MAX` runs or
    /// `TASKS_RETAINED_MAX` tasks are kept. Unfinished runs are never forgotten; the scan is
    /// bounded so one apply stays cheap.
    fn evict_old_runs(&mut self, runs_max: usize, tasks_max: usize) {
        const SCAN_MAX: usize = 64;
        let over = |s: &Self| {
            s.runs.len() > runs_max
                || s.tasks.len() > tasks_max
                || s.task_bytes > limits::TASK_BYTES_RETAINED_MAX
        };
        if !over(self) {
            return;
        }
        let finished: Vec<u64> = self
            .runs
            .iter()
            .take(SCAN_MAX)
            .filter(|(_, r)| r.finished_at_us != 0)
            .map(|(s, _)| *s)
            .collect();
        for seq in finished {
            if !over(self) {
                break;
            }
            if let Some(run) = self.runs.remove(&seq) {
                for tid in &run.task_ids {
                    if let Some(t) = self.tasks.remove(tid) {
                        self.task_bytes = self.task_bytes.saturating_sub(t.spec.approx_bytes());
                    }
                    self.stopping.remove(tid);
                }
                if !self.dead_letters.is_empty() {
                    self.dead_letters.retain(|_, d| d.run_id != run.id);
                }
            }
        }
        // Keys of forgotten runs stop deduplicating; retries are expected within minutes. The
        // sweep walks every key, so it waits until a batch of them is stale: once per eviction,
        // it made each submission past the retention limit cost a walk over 100,000 keys.
        const STALE_KEYS_SWEEP: usize = 1_024;
        if self.idempotency.len() > self.runs.len() + STALE_KEYS_SWEEP {
            let runs = &self.runs;
            self.idempotency.retain(|_, seq| runs.contains_key(seq));
        }
    }

    /// What a registration holding `held` means against the current state: attempts the agent must
    /// stop (stale), assignments it never received (resend), and running tasks it no longer has
    /// (vanished). Read-only; shared by `apply` and the leader's no-write fast path.
    pub fn registration_check(
        &self,
        name: &str,
        held: &[HeldTask],
    ) -> (Vec<HeldTask>, Vec<TaskId>, Vec<TaskId>) {
        let stale = held
            .iter()
            .filter(|h| {
                // A task the coordinator ended (cancelled, skipped) is stale too: stop it.
                !self.tasks.get(&h.task_id).is_some_and(|t| {
                    t.attempt == h.attempt
                        && t.agent.as_deref() == Some(name)
                        && !matches!(t.state, TaskState::Cancelled | TaskState::Skipped)
                        && !self.stopping.contains_key(&h.task_id)
                })
            })
            .cloned()
            .collect();
        let held_ids: BTreeSet<&str> = held.iter().map(|h| h.task_id.as_str()).collect();
        let mut resend = Vec::new();
        let mut vanished = Vec::new();
        if let Some(agent) = self.agents.get(name) {
            for tid in agent
                .tasks
                .iter()
                .filter(|t| !held_ids.contains(t.as_str()))
            {
                match self.tasks.get(tid).map(|t| t.state) {
                    Some(TaskState::Assigned) => resend.push(tid.clone()),
                    Some(TaskState::Running) => vanished.push(tid.clone()),
                    _ => {}
                }
            }
        }
        (stale, resend, vanished)
    }

    /// The answer to a registration that would change nothing (known, not lost, same attributes,
    /// no vanished tasks), so the leader can skip the Raft write. None when a write is needed.
    pub fn unchanged_registration(&self, cmd: &Command) -> Option<CommandResult> {
        let Command::RegisterAgent {
            name,
            labels,
            total,
            class,
            version,
            held,
            pool,
            isolation,
            instance_id,
        } = cmd
        else {
            return None;
        };
        let a = self.agents.get(name)?;
        let same = a.state != AgentState::Lost
            && &a.labels == labels
            && &a.total == total
            && &a.class == class
            && &a.version == version
            && &a.pool == pool
            && &a.isolation == isolation
            && &a.instance_id == instance_id;
        if !same || self.stopping.values().any(|(a, _)| a == name) {
            return None;
        }
        let (stale, resend, vanished) = self.registration_check(name, held);
        vanished.is_empty().then_some(CommandResult::Registered {
            stale,
            resend,
            requeued: vec![],
        })
    }

    fn register_agent(&mut self, now_us: u64, cmd: &Command) -> CommandResult {
        let Command::RegisterAgent {
            name,
            labels,
            total,
            class,
            version,
            held,
            pool,
            isolation,
            instance_id,
        } = cmd
        else {
            unreachable!("apply_one routes only RegisterAgent here");
        };
        let (name, held) = (name.as_str(), held.as_slice());
        let first_time = !self.agents.contains_key(name);
        if first_time && !pool.is_empty() {
            self.pool_member_arrived(now_us, pool);
        }
        let agent = self.agents.entry(name.to_owned()).or_insert_with(|| Agent {
            name: name.to_owned(),
            labels: BTreeMap::new(),
            total: Resources::default(),
            class: String::new(),
            version: String::new(),
            pool: String::new(),
            isolation: String::new(),
            state: AgentState::Active,
            drain_deadline_ms: 0,
            registered_at_ms: now_us / 1000,
            used: Resources::default(),
            tasks: BTreeSet::new(),
            instance_id: String::new(),
            idle_since_us: now_us,
        });
        agent.instance_id.clone_from(instance_id);
        agent.labels = labels.clone();
        agent.total = total.clone();
        agent.class = class.to_owned();
        agent.version = version.to_owned();
        agent.pool.clone_from(pool);
        agent.isolation.clone_from(isolation);
        agent.registered_at_ms = now_us / 1000;
        if agent.state == AgentState::Lost {
            agent.state = AgentState::Active;
        }

        let (stale, resend, vanished) = self.registration_check(name, held);
        // Whatever it should stop is in `stale` now, or it no longer runs it.
        self.stopping.retain(|_, (a, _)| a != name);
        let mut requeued = Vec::new();
        for tid in vanished {
            self.requeue(now_us, &tid, &format!("agent {name} restarted without it"));
            requeued.push(tid);
        }
        CommandResult::Registered {
            stale,
            resend,
            requeued,
        }
    }

    /// Takes a non-terminal task off its agent and puts it back in the queue as a new attempt.
    fn requeue(&mut self, now_us: u64, tid: &str, reason: &str) {
        let Some(task) = self.tasks.get_mut(tid) else {
            return;
        };
        if !matches!(task.state, TaskState::Assigned | TaskState::Running) {
            return;
        }
        let note = Outcome {
            reason: format!("re-queued: {reason}"),
            ..Default::default()
        };
        crate::lifecycle::record_attempt(task, now_us, &note);
        self.leave_active(now_us, tid);
        let Some(task) = self.tasks.get_mut(tid) else {
            return;
        };
        task.agent = None;
        task.attempt += 1;
        task.state = TaskState::Pending;
        task.pending_reason = format!("re-queued: {reason}").into();
        task.assigned_at_us = 0;
        task.started_at_us = 0;
        self.pending.insert(task.pending_key());
        self.tally_pending(tid, true);
    }

    fn apply_plan(
        &mut self,
        now_us: u64,
        assignments: &[Assignment],
        unplaced: &[(TaskId, String)],
    ) -> CommandResult {
        let mut accepted = Vec::new();
        let mut dropped = 0;
        // What leaves the queue, by run and queue: consecutive assignments are mostly of one.
        let mut leaving: Vec<(u64, String, Tally)> = Vec::new();
        for a in assignments {
            let Some(task) = self.tasks.get_mut(&a.task_id) else {
                dropped += 1;
                continue;
            };
            let Some(agent) = self.agents.get_mut(&a.agent) else {
                dropped += 1;
                continue;
            };
            // Checked against the total, not `free()`: an agent that re-registered with less than
            // it holds has a free capacity that saturates at zero, which a zero request would fit.
            let fits =
                agent.can_take(&task.spec.resources) && agent.tasks.len() < limits::AGENT_TASKS_MAX;
            let queue_full = self.queues.get(&task.spec.queue).is_some_and(|q| {
                q.max_concurrency > 0
                    && self
                        .active_by_queue
                        .get(&task.spec.queue)
                        .is_some_and(|n| *n >= u64::from(q.max_concurrency))
            });
            if task.state != TaskState::Pending
                || queue_full
                || task.attempt != a.attempt
                || agent.state != AgentState::Active
                || !fits
            {
                dropped += 1;
                continue;
            }
            agent.used = agent.used.plus(&task.spec.resources);
            agent.tasks.insert(task.id.clone());
            agent.idle_since_us = 0;
            self.assigned.insert((now_us, task.seq), task.id.clone());
            match self.active_by_queue.get_mut(&task.spec.queue) {
                Some(n) => *n += 1,
                None => {
                    self.active_by_queue.insert(task.spec.queue.clone(), 1);
                }
            }
            task.state = TaskState::Assigned;
            task.agent = Some(a.agent.clone());
            task.assigned_at_us = now_us;
            task.pending_reason = std::borrow::Cow::Borrowed("");
            self.pending.remove(&task.pending_key());
            accepted.push(a.clone());
            let d = Tally {
                tasks: 1,
                bytes: task.spec.approx_bytes(),
            };
            let seq = run_seq(&task.run_id).unwrap_or(0);
            match leaving.last_mut() {
                Some((s, q, tally)) if *s == seq && *q == task.spec.queue => tally.add(d),
                _ => leaving.push((seq, task.spec.queue.clone(), d)),
            }
        }
        for (tid, reason) in unplaced {
            if let Some(task) = self.tasks.get_mut(tid)
                && task.state == TaskState::Pending
            {
                task.pending_reason = reason.clone().into();
            }
        }
        for (seq, queue, d) in leaving {
            let submitter = self.runs.get(&seq).map_or("", |r| r.submitted_by.as_str());
            count_pending(
                (
                    &mut self.pending_total,
                    &mut self.pending_by_submitter,
                    &mut self.pending_by_queue,
                ),
                submitter,
                &queue,
                d,
                false,
            );
        }
        self.counters.assignments_dropped += dropped as u64;
        CommandResult::PlanApplied { accepted, dropped }
    }

    /// The current attempt of `tid` if `agent` holds it; otherwise the report is stale.
    fn check_current(&mut self, agent: &str, tid: &str, attempt: u64) -> Result<(), CommandResult> {
        match self.tasks.get(tid) {
            Some(t) if t.attempt == attempt && t.agent.as_deref() == Some(agent) => Ok(()),
            Some(t) => {
                self.counters.stale_reports += 1;
                Err(CommandResult::StaleReport {
                    current_attempt: t.attempt,
                })
            }
            None => {
                self.counters.stale_reports += 1;
                Err(CommandResult::StaleReport { current_attempt: 0 })
            }
        }
    }

    fn task_started(
        &mut self,
        now_us: u64,
        agent: &str,
        tid: &str,
        attempt: u64,
        reported_us: u64,
    ) -> CommandResult {
        if let Err(stale) = self.check_current(agent, tid, attempt) {
            return stale;
        }
        let task = self.tasks.get_mut(tid).expect("checked above");
        if task.state == TaskState::Assigned {
            task.state = TaskState::Running;
            task.started_at_us = start_time(task, reported_us, now_us);
            self.assigned.remove(&(task.assigned_at_us, task.seq));
        }
        CommandResult::Reported
    }

    fn task_finished(
        &mut self,
        now_us: u64,
        agent: &str,
        tid: &str,
        attempt: u64,
        outcome: &Outcome,
        reported_us: u64,
    ) -> CommandResult {
        if let Err(stale) = self.check_current(agent, tid, attempt) {
            return stale;
        }
        let task = self.tasks.get_mut(tid).expect("checked above");
        if !matches!(task.state, TaskState::Assigned | TaskState::Running) {
            // A duplicate delivery of a result already recorded, or the end of an attempt the
            // coordinator had already ended (cancelled, skipped, failed by its timeout and
            // waiting to be retried): it is stopped now.
            self.stopping.remove(tid);
            return CommandResult::Reported;
        }
        if task.started_at_us == 0 {
            task.started_at_us = start_time(task, reported_us, now_us);
        }
        if outcome.succeeded {
            crate::lifecycle::record_attempt(task, now_us, outcome);
            task.outcome = Some(Box::new(outcome.clone()));
            self.settle(now_us, tid, TaskState::Succeeded, None, false);
            self.after_success(tid);
        } else {
            self.fail_attempt(now_us, tid, outcome.clone(), false);
        }
        CommandResult::Reported
    }

    fn set_drain(&mut self, name: &str, draining: bool, deadline_ms: u64) -> CommandResult {
        let Some(agent) = self.agents.get_mut(name) else {
            return CommandResult::Rejected {
                limit: None,
                message: format!("agent {name} not found"),
            };
        };
        match (draining, agent.state) {
            (_, AgentState::Lost) => CommandResult::Rejected {
                limit: None,
                message: format!("agent {name} is lost; it can be drained once it reconnects"),
            },
            (true, _) => {
                agent.state = AgentState::Draining;
                agent.drain_deadline_ms = deadline_ms;
                CommandResult::DrainSet
            }
            (false, _) => {
                agent.state = AgentState::Active;
                agent.drain_deadline_ms = 0;
                CommandResult::DrainSet
            }
        }
    }

    fn agent_lost(&mut self, now_us: u64, name: &str, reason: &str) -> CommandResult {
        let Some(agent) = self.agents.get_mut(name) else {
            return CommandResult::AgentLost { requeued: vec![] };
        };
        if agent.state == AgentState::Lost {
            return CommandResult::AgentLost { requeued: vec![] };
        }
        agent.state = AgentState::Lost;
        self.counters.agents_lost += 1;
        self.stopping.retain(|_, (a, _)| a != name);
        let tasks: Vec<TaskId> = agent.tasks.iter().cloned().collect();
        for tid in &tasks {
            self.requeue(now_us, tid, &format!("agent {name} lost ({reason})"));
        }
        CommandResult::AgentLost { requeued: tasks }
    }

    /// Recomputes what is kept in memory only (see `Run::unfinished`) after a snapshot load.
    pub fn rebuild_derived(&mut self) {
        self.pending_by_submitter.clear();
        self.pending_by_queue.clear();
        self.pending_total = Tally::default();
        let pending: Vec<TaskId> = self.pending.iter().map(|(_, _, t)| t.clone()).collect();
        for tid in pending {
            self.tally_pending(&tid, true);
        }
        self.task_bytes = self.tasks.values().map(|t| t.spec.approx_bytes()).sum();
        self.assigned = self
            .tasks
            .values()
            .filter(|t| t.state == TaskState::Assigned)
            .map(|t| ((t.assigned_at_us, t.seq), t.id.clone()))
            .collect();
        self.retry_due = self
            .tasks
            .values()
            .filter(|t| t.state == TaskState::Waiting)
            .map(|t| ((t.retry_at_us, t.seq), t.id.clone()))
            .collect();
        self.active_by_queue.clear();
        for t in self.tasks.values() {
            if matches!(t.state, TaskState::Assigned | TaskState::Running) {
                *self
                    .active_by_queue
                    .entry(t.spec.queue.clone())
                    .or_default() += 1;
            }
        }
        let tasks = &self.tasks;
        for run in self.runs.values_mut() {
            run.unfinished = run
                .task_ids
                .iter()
                .filter(|t| tasks.get(*t).is_some_and(|t| !t.state.is_terminal()))
                .count() as u32;
        }
    }

    // ------------------------------------------------------------------ reads

    pub fn run_by_id(&self, id: &str) -> Option<&Run> {
        self.runs.get(&run_seq(id)?)
    }

    /// A run is finished when every step is; then it is cancelled if someone cancelled it, failed
    /// if a step failed, cancelled if a step was cancelled, and succeeded otherwise (skipped steps
    /// only follow a failure or a cancel). Until then it is pending while no step has left the
    /// queue, and running after.
    pub fn run_state(&self, run: &Run) -> RunState {
        let states: Vec<TaskState> = run
            .task_ids
            .iter()
            .filter_map(|t| self.tasks.get(t).map(|t| t.state))
            .collect();
        if states.iter().all(|s| s.is_terminal()) {
            if !run.cancelled.is_empty() {
                RunState::Cancelled
            } else if states.contains(&TaskState::Failed) {
                RunState::Failed
            } else if states.contains(&TaskState::Cancelled) {
                RunState::Cancelled
            } else {
                RunState::Succeeded
            }
        } else if states
            .iter()
            .any(|s| !matches!(s, TaskState::Pending | TaskState::Blocked))
        {
            RunState::Running
        } else {
            RunState::Pending
        }
    }

    /// Tasks placed on agents and in `state` (Assigned or Running); pending ones are in `pending`.
    pub fn tasks_in(&self, state: TaskState) -> usize {
        self.agents
            .values()
            .flat_map(|a| a.tasks.iter())
            .filter(|t| self.tasks.get(*t).is_some_and(|t| t.state == state))
            .count()
    }

    pub fn running_tasks(&self) -> usize {
        self.agents.values().map(|a| a.tasks.len()).sum()
    }
}

#[cfg(test)]
impl State {
    /// Applies one command at `now_us`, in term 1.
    pub(crate) fn apply_at(&mut self, now_us: u64, cmd: Command) -> CommandResult {
        let req = Request {
            now_us,
            commands: vec![cmd].into(),
        };
        self.apply(1, &req)
            .results
            .pop()
            .expect("one result per command")
    }
}

#[cfg(test)]
#[path = "state_tests.rs"]
mod tests;
