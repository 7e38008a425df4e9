//! The agent's table of tasks it holds: running, or finished with a result the coordinator has
//! not acknowledged yet. The table is what survives a reconnect: it is reported at registration
//! and its unacknowledged results are sent again.

use std::collections::BTreeMap;
use std::sync::Mutex;

use drover_proto::pb;
use tokio::sync::{Notify, oneshot};

use crate::limits;

pub struct Held {
    pub attempt: u64,
    pub run_id: String,
    pub started: Option<pb::TaskStarted>,
    pub finished: Option<pb::TaskFinished>,
    /// Sending on it stops the process group (with the reason).
    pub stop: Option<oneshot::Sender<String>>,
    /// Whether `started` / `finished` went out on the current session.
    pub started_sent: bool,
    pub finished_sent: bool,
}

#[derive(Default)]
pub struct TaskTable {
    inner: Mutex<BTreeMap<String, Held>>,
    /// Woken when there is something new to send.
    pub changed: Notify,
}

impl TaskTable {
    /// Claims a task for an attempt. Returns false if that attempt (or a newer one) is already held.
    pub fn claim(&self, task_id: &str, attempt: u64, run_id: &str) -> Result<bool, String> {
        let mut inner = self.inner.lock().unwrap();
        if let Some(h) = inner.get(task_id) {
            if h.attempt >= attempt {
                return Ok(false);
            }
            // A newer attempt of a task we still hold: the old one is stale; stop it.
            if let Some(h) = inner.remove(task_id)
                && let Some(stop) = h.stop
            {
                let _ = stop.send("superseded by a newer attempt".into());
            }
        }
        if inner.len() >= limits::HELD_TASKS_MAX {
            return Err(format!(
                "agent holds held_tasks_max ({}) tasks",
                limits::HELD_TASKS_MAX
            ));
        }
        inner.insert(
            task_id.to_owned(),
            Held {
                attempt,
                run_id: run_id.to_owned(),
                started: None,
                finished: None,
                stop: None,
                started_sent: false,
                finished_sent: false,
            },
        );
        Ok(true)
    }

    pub fn set_stop(&self, task_id: &str, attempt: u64, stop: oneshot::Sender<String>) {
        if let Some(h) = self
            .inner
            .lock()
            .unwrap()
            .get_mut(task_id)
            .filter(|h| h.attempt == attempt)
        {
            h.stop = Some(stop);
        }
    }

    pub fn started(&self, msg: pb::TaskStarted) {
        if let Some(h) = self
            .inner
            .lock()
            .unwrap()
            .get_mut(&msg.task_id)
            .filter(|h| h.attempt == msg.attempt)
        {
            h.started = Some(msg);
            h.started_sent = false;
        }
        self.changed.notify_one();
    }

    pub fn finished(&self, msg: pb::TaskFinished) {
        if let Some(h) = self
            .inner
            .lock()
            .unwrap()
            .get_mut(&msg.task_id)
            .filter(|h| h.attempt == msg.attempt)
        {
            h.finished = Some(msg);
            h.finished_sent = false;
            h.stop = None;
        }
        self.changed.notify_one();
    }

    /// Everything held, for registration.
    pub fn held(&self) -> Vec<pb::RunningTask> {
        self.inner
            .lock()
            .unwrap()
            .iter()
            .map(|(id, h)| pb::RunningTask {
                task_id: id.clone(),
                attempt: h.attempt,
            })
            .collect()
    }

    /// Marks everything unsent (a new session starts).
    pub fn reset_sent(&self) {
        for h in self.inner.lock().unwrap().values_mut() {
            h.started_sent = false;
            h.finished_sent = false;
        }
    }

    /// Reports not yet sent on this session, marked sent.
    pub fn take_unsent(&self) -> Vec<pb::agent_message::Msg> {
        use pb::agent_message::Msg;
        let mut out = Vec::new();
        for h in self.inner.lock().unwrap().values_mut() {
            if let Some(f) = &h.finished {
                if !h.finished_sent {
                    h.finished_sent = true;
                    h.started_sent = true;
                    out.push(Msg::Finished(f.clone()));
                }
            } else if let Some(s) = &h.started
                && !h.started_sent
            {
                h.started_sent = true;
                out.push(Msg::Started(s.clone()));
            }
        }
        out
    }

    /// The coordinator committed the result: forget the task.
    pub fn ack(&self, task_id: &str, attempt: u64) {
        let mut inner = self.inner.lock().unwrap();
        if inner
            .get(task_id)
            .is_some_and(|h| h.attempt == attempt && h.finished.is_some())
        {
            inner.remove(task_id);
        }
    }

    /// Stops (if running) and forgets an attempt the coordinator says is no longer current.
    pub fn drop_stale(&self, task_id: &str, attempt: u64, reason: &str) {
        let mut inner = self.inner.lock().unwrap();
        if inner.get(task_id).is_some_and(|h| h.attempt == attempt)
            && let Some(h) = inner.remove(task_id)
            && let Some(stop) = h.stop
        {
            let _ = stop.send(reason.to_owned());
        }
    }

    /// Stops a running attempt, keeping it so its (cancelled) result is reported.
    pub fn stop(&self, task_id: &str, attempt: u64, reason: &str) {
        if let Some(h) = self
            .inner
            .lock()
            .unwrap()
            .get_mut(task_id)
            .filter(|h| h.attempt == attempt)
            && let Some(stop) = h.stop.take()
        {
            let _ = stop.send(reason.to_owned());
        }
    }

    /// When the attempt's process began (agent clock, microseconds); 0 if it never did.
    pub fn started_at_us(&self, task_id: &str, attempt: u64) -> u64 {
        self.inner
            .lock()
            .unwrap()
            .get(task_id)
            .filter(|h| h.attempt == attempt)
            .and_then(|h| h.started.as_ref())
            .map_or(0, |s| s.started_at_us)
    }

    pub fn is_finished(&self, task_id: &str, attempt: u64) -> Option<bool> {
        self.inner
            .lock()
            .unwrap()
            .get(task_id)
            .filter(|h| h.attempt == attempt)
            .map(|h| h.finished.is_some())
    }

    /// Attempts whose process has not ended yet.
    pub fn running(&self) -> usize {
        self.inner
            .lock()
            .unwrap()
            .values()
            .filter(|h| h.finished.is_none())
            .count()
    }

    /// Stops every running task (agent shutdown).
    pub fn stop_all(&self, reason: &str) {
        for h in self.inner.lock().unwrap().values_mut() {
            if let Some(stop) = h.stop.take() {
                let _ = stop.send(reason.to_owned());
            }
        }
    }
}
