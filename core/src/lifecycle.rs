//! How a step moves through its run: dependencies that release it, failures that retry it or
//! send it to the dead letters, what a failure skips, cancellation, and queue limits. Part of
//! `State::apply`: deterministic, no I/O or clock.
//!
//! States of a step: `Blocked` (waiting for its dependencies) -> `Pending` (queued) ->
//! `Assigned` -> `Running` -> `Succeeded` | `Failed` | (failed with retries left) `Waiting` ->
//! `Pending` again once its deadline passes. `Skipped` and `Cancelled` end any step that has
//! not finished.

use std::borrow::Cow;
use std::collections::BTreeSet;

use crate::command::CommandResult;
use crate::limits;
use crate::model::{
    AttemptRecord, DeadLetter, HeldTask, OnFailure, Outcome, RunSpec, Task, TaskId, TaskState,
};
use crate::state::{State, Tally, run_seq, task_id};

/// Appends the attempt that just ended to the task's history (keeping the newest).
pub fn record_attempt(task: &mut Task, now_us: u64, outcome: &Outcome) {
    if task.history.len() >= limits::ATTEMPTS_KEPT_MAX {
        task.history.remove(0);
    }
    task.history.push(AttemptRecord {
        attempt: task.attempt,
        agent: task.agent.clone().unwrap_or_default(),
        started_at_us: task.started_at_us,
        finished_at_us: now_us,
        exit_code: outcome.exit_code,
        signal: outcome.signal,
        reason: outcome.reason.clone(),
        succeeded: outcome.succeeded,
    });
}

impl State {
    /// Takes an assigned or running task off its agent (its capacity, the assigned index, its
    /// queue's active count). Returns the agent, which the task still names; None if no agent
    /// holds it (any more): a second call changes nothing.
    pub(crate) fn leave_active(&mut self, now_us: u64, tid: &str) -> Option<String> {
        let task = self.tasks.get(tid)?;
        if !matches!(task.state, TaskState::Assigned | TaskState::Running) {
            return None;
        }
        let name = task.agent.clone()?;
        // An agent is forgotten only once it holds nothing, so a held task's agent is here.
        let agent = self.agents.get_mut(&name)?;
        if !agent.tasks.remove(tid) {
            return None;
        }
        agent.used = agent.used.minus(&task.spec.resources);
        if agent.tasks.is_empty() {
            agent.idle_since_us = now_us;
        }
        self.assigned.remove(&(task.assigned_at_us, task.seq));
        if let Some(n) = self.active_by_queue.get_mut(&task.spec.queue) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.active_by_queue.remove(&task.spec.queue);
            }
        }
        Some(name)
    }

    /// Takes a queued or waiting task out of the queue or the retry index.
    fn leave_queue(&mut self, tid: &str) {
        let Some(task) = self.tasks.get(tid) else {
            return;
        };
        match task.state {
            TaskState::Pending => {
                let key = task.pending_key();
                self.tally_pending(tid, false);
                self.pending.remove(&key);
            }
            TaskState::Waiting => {
                self.retry_due.remove(&(task.retry_at_us, task.seq));
            }
            _ => {}
        }
    }

    /// Puts a task that is not in the queue (blocked, waiting, finished) into it.
    fn enter_queue(&mut self, tid: &str, reason: String) {
        let Some(task) = self.tasks.get_mut(tid) else {
            return;
        };
        task.state = TaskState::Pending;
        task.agent = None;
        task.assigned_at_us = 0;
        task.started_at_us = 0;
        task.finished_at_us = 0;
        task.pending_reason = Cow::Owned(reason);
        self.pending.insert(task.pending_key());
        self.tally_pending(tid, true);
    }

    /// Ends a task that has not finished in the terminal `state`. A task still on an agent is
    /// taken off it and, when `stop`, remembered so the leader stops it there.
    pub(crate) fn settle(
        &mut self,
        now_us: u64,
        tid: &str,
        state: TaskState,
        reason: Option<&str>,
        stop: bool,
    ) {
        let Some(task) = self.tasks.get(tid) else {
            return;
        };
        if task.state.is_terminal() {
            return;
        }
        let attempt = task.attempt;
        self.leave_queue(tid);
        if let Some(agent) = self.leave_active(now_us, tid)
            && stop
        {
            if let Some(task) = self.tasks.get_mut(tid) {
                let note = Outcome {
                    reason: reason.unwrap_or("stopped").to_owned(),
                    ..Default::default()
                };
                record_attempt(task, now_us, &note);
            }
            self.stopping.insert(tid.to_owned(), (agent, attempt));
        }
        let Some(task) = self.tasks.get_mut(tid) else {
            return;
        };
        task.state = state;
        task.finished_at_us = now_us;
        task.pending_reason = Cow::Borrowed("");
        if let Some(reason) = reason {
            let o = task.outcome.get_or_insert_default();
            o.reason = reason.to_owned();
            o.succeeded = false;
        }
        match state {
            TaskState::Succeeded => self.counters.tasks_succeeded += 1,
            TaskState::Failed => self.counters.tasks_failed += 1,
            TaskState::Cancelled => self.counters.tasks_cancelled += 1,
            _ => self.counters.tasks_skipped += 1,
        }
        let run_id = task.run_id.clone();
        if let Some(seq) = run_seq(&run_id)
            && let Some(run) = self.runs.get_mut(&seq)
        {
            run.unfinished = run.unfinished.saturating_sub(1);
            if run.unfinished == 0 {
                run.finished_at_us = now_us;
            }
        }
    }

    /// A failed attempt: retried after its backoff while retries remain, else the step fails
    /// for good. `stop`: the agent may still run it (the leader failed it).
    pub(crate) fn fail_attempt(&mut self, now_us: u64, tid: &str, outcome: Outcome, stop: bool) {
        let Some(task) = self.tasks.get_mut(tid) else {
            return;
        };
        record_attempt(task, now_us, &outcome);
        task.failures = task.failures.saturating_add(1);
        task.outcome = Some(Box::new(outcome));
        let (attempt, failures, max) = (task.attempt, task.failures, task.spec.retry.max);
        let delay_us = task
            .spec
            .retry
            .delay_ms(failures, task.seq)
            .min(limits::RETRY_DELAY_MAX_MS)
            * 1000;
        // Off its agent either way; `settle` then finds it inactive and records no second stop.
        if let Some(agent) = self.leave_active(now_us, tid)
            && stop
        {
            self.stopping.insert(tid.to_owned(), (agent, attempt));
        }
        if failures > max {
            self.settle(now_us, tid, TaskState::Failed, None, false);
            self.after_final_failure(now_us, tid);
            return;
        }
        let Some(task) = self.tasks.get_mut(tid) else {
            return;
        };
        task.state = TaskState::Waiting;
        task.retry_at_us = now_us.saturating_add(delay_us);
        task.pending_reason = Cow::Owned(format!(
            "attempt {attempt} failed; retry {failures} of {max} in {} ms",
            delay_us / 1000
        ));
        self.retry_due
            .insert((task.retry_at_us, task.seq), task.id.clone());
        self.counters.tasks_retried += 1;
    }

    /// Queues the next attempt of each task still waiting on the retry named.
    pub(crate) fn retry_due_tasks(&mut self, tasks: &[HeldTask]) -> CommandResult {
        let mut retried = Vec::new();
        for h in tasks {
            let Some(task) = self.tasks.get_mut(&h.task_id) else {
                continue;
            };
            if task.state != TaskState::Waiting || task.attempt != h.attempt {
                continue;
            }
            self.retry_due.remove(&(task.retry_at_us, task.seq));
            task.attempt += 1;
            let reason = format!(
                "retry {} of {}: waiting for the scheduler",
                task.failures, task.spec.retry.max
            );
            self.enter_queue(&h.task_id, reason);
            retried.push(h.task_id.clone());
        }
        CommandResult::Retried { tasks: retried }
    }

    /// A step failed for good: it becomes a dead letter, its dependents are skipped, and under
    /// `fail_fast` every other unfinished step of the run is skipped (running ones stopped).
    pub(crate) fn after_final_failure(&mut self, now_us: u64, tid: &str) {
        let Some(task) = self.tasks.get(tid) else {
            return;
        };
        let outcome = task.outcome.as_deref().cloned().unwrap_or_default();
        self.last_dead_letter += 1;
        let id = self.last_dead_letter;
        self.dead_letters.insert(
            id,
            DeadLetter {
                id,
                task_id: tid.to_owned(),
                run_id: task.run_id.clone(),
                step: task.spec.name.clone(),
                queue: task.spec.queue.clone(),
                attempt: task.attempt,
                failures: task.failures,
                agent: task.agent.clone().unwrap_or_default(),
                failed_at_us: now_us,
                reason: outcome.reason,
                exit_code: outcome.exit_code,
                signal: outcome.signal,
                stdout_tail: outcome.stdout_tail,
                stderr_tail: outcome.stderr_tail,
            },
        );
        self.counters.dead_letters += 1;
        while self.dead_letters.len() > limits::DEAD_LETTERS_MAX {
            self.dead_letters.pop_first();
            self.counters.dead_letters_dropped += 1;
        }
        let step = task.spec.name.clone();
        let run_id = task.run_id.clone();
        self.skip_dependents(now_us, tid, &format!("skipped: step {step} failed"));
        let fail_fast = run_seq(&run_id)
            .and_then(|s| self.runs.get(&s))
            .is_some_and(|r| r.on_failure == OnFailure::FailFast);
        if fail_fast && let Some(run) = run_seq(&run_id).and_then(|s| self.runs.get(&s)) {
            let others: Vec<TaskId> = run.task_ids.clone();
            let reason = format!("skipped: step {step} failed and the run fails fast");
            for other in others {
                self.settle(now_us, &other, TaskState::Skipped, Some(&reason), true);
            }
        }
    }

    /// Skips every unfinished task downstream of `tid`.
    fn skip_dependents(&mut self, now_us: u64, tid: &str, reason: &str) -> Vec<TaskId> {
        let mut skipped = Vec::new();
        let mut todo: Vec<TaskId> = self
            .tasks
            .get(tid)
            .map(|t| t.dependents.clone())
            .unwrap_or_default();
        while let Some(next) = todo.pop() {
            let Some(t) = self.tasks.get(&next) else {
                continue;
            };
            if t.state.is_terminal() {
                continue;
            }
            todo.extend(t.dependents.iter().cloned());
            self.settle(now_us, &next, TaskState::Skipped, Some(reason), true);
            skipped.push(next);
        }
        skipped
    }

    /// A step succeeded: dependents whose dependencies have all succeeded are queued.
    pub(crate) fn after_success(&mut self, tid: &str) {
        let dependents = self
            .tasks
            .get(tid)
            .map(|t| t.dependents.clone())
            .unwrap_or_default();
        for d in dependents {
            let Some(t) = self.tasks.get_mut(&d) else {
                continue;
            };
            if t.state != TaskState::Blocked {
                continue;
            }
            t.waiting_on = t.waiting_on.saturating_sub(1);
            if t.waiting_on == 0 {
                self.enter_queue(&d, "waiting for the scheduler".into());
            }
        }
    }

    /// Cancels run `run_id`, or its step `step` (whose dependents are skipped).
    pub(crate) fn cancel_run(
        &mut self,
        now_us: u64,
        run_id: &str,
        step: &str,
        reason: &str,
    ) -> CommandResult {
        let Some(run) = run_seq(run_id).and_then(|s| self.runs.get_mut(&s)) else {
            return CommandResult::NotFound {
                message: format!("run {run_id} not found"),
            };
        };
        if step.is_empty() {
            // A repeated cancel (a client retrying across a failover) is answered as done.
            if !run.cancelled.is_empty() {
                return CommandResult::Cancelled { tasks: Vec::new() };
            }
            if run.finished_at_us != 0 {
                return CommandResult::Rejected {
                    limit: None,
                    message: format!("run {run_id} has already finished"),
                };
            }
            run.cancelled = reason.to_owned();
            let tasks = run.task_ids.clone();
            let text = format!("cancelled: {reason}");
            let mut cancelled = Vec::new();
            for t in tasks {
                if self.tasks.get(&t).is_some_and(|t| !t.state.is_terminal()) {
                    self.settle(now_us, &t, TaskState::Cancelled, Some(&text), true);
                    cancelled.push(t);
                }
            }
            return CommandResult::Cancelled { tasks: cancelled };
        }
        let tid = task_id(run_id, step);
        let Some(task) = self.tasks.get(&tid) else {
            return CommandResult::NotFound {
                message: format!("run {run_id} has no step '{step}'"),
            };
        };
        if task.state == TaskState::Cancelled {
            return CommandResult::Cancelled { tasks: Vec::new() };
        }
        if task.state.is_terminal() {
            return CommandResult::Rejected {
                limit: None,
                message: format!("step {step} of {run_id} has already finished"),
            };
        }
        let text = format!("cancelled: {reason}");
        self.settle(now_us, &tid, TaskState::Cancelled, Some(&text), true);
        let mut cancelled = vec![tid.clone()];
        cancelled.extend(self.skip_dependents(
            now_us,
            &tid,
            &format!("skipped: step {step} was cancelled"),
        ));
        CommandResult::Cancelled { tasks: cancelled }
    }

    /// A new attempt of the step behind dead letter `id`; the steps its failure skipped are
    /// restored (blocked or queued) unless something else they need failed or was cancelled.
    pub(crate) fn retry_dead_letter(&mut self, id: u64) -> CommandResult {
        let Some(letter) = self.dead_letters.get(&id) else {
            return CommandResult::NotFound {
                message: format!("dead letter dl-{id} not found"),
            };
        };
        let tid = letter.task_id.clone();
        let current = self
            .tasks
            .get(&tid)
            .is_some_and(|t| t.state == TaskState::Failed && t.attempt == letter.attempt);
        let Some(run) = run_seq(&letter.run_id).and_then(|s| self.runs.get(&s)) else {
            self.dead_letters.remove(&id);
            return CommandResult::NotFound {
                message: format!("the run of dead letter dl-{id} is no longer kept"),
            };
        };
        if !current {
            self.dead_letters.remove(&id);
            return CommandResult::Rejected {
                limit: None,
                message: format!("step {tid} has moved on since dl-{id}; nothing to retry"),
            };
        }
        if !run.cancelled.is_empty() {
            return CommandResult::Rejected {
                limit: None,
                message: format!("run {} was cancelled; submit it again", run.id),
            };
        }
        let seq = run.seq;
        let task_ids = run.task_ids.clone();
        self.dead_letters.remove(&id);
        let task = self.tasks.get_mut(&tid).expect("checked above");
        task.failures = 0;
        task.attempt += 1;
        self.enter_queue(&tid, format!("retried from dead letter dl-{id}"));
        let mut reopened = 1u32;
        // Steps that cannot run: failed or cancelled, or below one that cannot.
        let mut doomed: BTreeSet<&str> = BTreeSet::new();
        for t in task_ids.iter().filter_map(|t| self.tasks.get(t)) {
            if matches!(t.state, TaskState::Failed | TaskState::Cancelled) {
                doomed.insert(t.spec.name.as_str());
            }
        }
        loop {
            let before = doomed.len();
            for t in task_ids.iter().filter_map(|t| self.tasks.get(t)) {
                if t.state == TaskState::Skipped
                    && t.spec
                        .depends_on
                        .iter()
                        .any(|d| doomed.contains(d.as_str()))
                {
                    doomed.insert(t.spec.name.as_str());
                }
            }
            if doomed.len() == before {
                break;
            }
        }
        let revive: Vec<(TaskId, u32)> = task_ids
            .iter()
            .filter_map(|t| self.tasks.get(t))
            .filter(|t| t.state == TaskState::Skipped && !doomed.contains(t.spec.name.as_str()))
            .map(|t| {
                let run_id = &t.run_id;
                let waiting = t
                    .spec
                    .depends_on
                    .iter()
                    .filter(|d| {
                        self.tasks
                            .get(&task_id(run_id, d))
                            .is_none_or(|d| d.state != TaskState::Succeeded)
                    })
                    .count() as u32;
                (t.id.clone(), waiting)
            })
            .collect();
        for (t, waiting) in revive {
            reopened += 1;
            let Some(task) = self.tasks.get_mut(&t) else {
                continue;
            };
            task.attempt += 1;
            task.waiting_on = waiting;
            task.finished_at_us = 0;
            task.outcome = None;
            if waiting == 0 {
                self.enter_queue(&t, format!("resumed with dead letter dl-{id}"));
            } else {
                task.state = TaskState::Blocked;
                task.pending_reason =
                    Cow::Owned(format!("waiting for {}", task.spec.depends_on.join(", ")));
            }
        }
        if let Some(run) = self.runs.get_mut(&seq) {
            run.unfinished += reopened;
            run.finished_at_us = 0;
        }
        CommandResult::Retried { tasks: vec![tid] }
    }

    /// Whether the queues of `spec` take its pending steps under their `max_pending`.
    pub(crate) fn queue_room(&self, spec: &RunSpec) -> Result<(), CommandResult> {
        if self.queues.is_empty() {
            return Ok(());
        }
        let mut adding: Vec<(&str, u64)> = Vec::new();
        for t in spec.tasks.iter().filter(|t| t.depends_on.is_empty()) {
            match adding.iter_mut().find(|(q, _)| *q == t.queue) {
                Some((_, n)) => *n += 1,
                None => adding.push((&t.queue, 1)),
            }
        }
        for (queue, n) in adding {
            let Some(q) = self.queues.get(queue).filter(|q| q.max_pending > 0) else {
                continue;
            };
            let queued = self
                .pending_by_queue
                .get(queue)
                .copied()
                .unwrap_or(Tally::default())
                .tasks;
            if queued + n > q.max_pending {
                return Err(CommandResult::Rejected {
                    limit: Some(format!("queue {queue} max_pending")),
                    message: format!(
                        "queue {queue} has {queued} tasks pending and max_pending is {}; this run \
                         adds {n}: retry later or raise it (droverctl queue set {queue} \
                         --max-pending N)",
                        q.max_pending
                    ),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "lifecycle_tests.rs"]
mod tests;
