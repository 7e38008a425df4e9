//! The agent's table of tasks it holds: running, or finished with a result the coordinator has
//! not acknowledged yet. The table is what survives a reconnect: it is reported at registration
//! and its unacknowledged results are sent again.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

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
    /// A stop that came before the process could take one: given to it as it does.
    stop_early: Option<String>,
    /// Whether `started` / `finished` went out on the current session.
    pub started_sent: bool,
    pub finished_sent: bool,
    /// Whether the task is in `Inner::unsent`.
    queued: bool,
    /// When `started` was recorded here: its report waits until `hold` has passed since.
    started_seen: Option<Instant>,
}

/// The held tasks, and which of them have a report to send: sending looks at those only, not at
/// every held task (an agent holds up to `HELD_TASKS_MAX`, and sends after every change).
#[derive(Default)]
struct Inner {
    held: BTreeMap<String, Held>,
    /// Each held task at most once (`Held::queued`), plus ids forgotten since the last send
    /// (skipped then): every send empties it but for starts still held back.
    unsent: Vec<String>,
}

impl Held {
    /// Puts the task in `unsent` unless it is there already.
    fn queue(&mut self, task_id: &str, unsent: &mut Vec<String>) {
        if !self.queued {
            self.queued = true;
            unsent.push(task_id.to_owned());
        }
    }
}

#[derive(Default)]
pub struct TaskTable {
    inner: Mutex<Inner>,
    /// Woken when there is something new to send.
    pub changed: Notify,
}

impl TaskTable {
    /// Claims a task for an attempt. Returns false if that attempt (or a newer one) is already held.
    pub fn claim(&self, task_id: &str, attempt: u64, run_id: &str) -> Result<bool, String> {
        let mut inner = self.inner.lock().unwrap();
        if let Some(h) = inner.held.get(task_id) {
            if h.attempt >= attempt {
                return Ok(false);
            }
            // A newer attempt of a task we still hold: the old one is stale; stop it.
            if let Some(h) = inner.held.remove(task_id)
                && let Some(stop) = h.stop
            {
                let _ = stop.send("superseded by a newer attempt".into());
            }
        }
        if inner.held.len() >= limits::HELD_TASKS_MAX {
            return Err(format!(
                "agent holds held_tasks_max ({}) tasks",
                limits::HELD_TASKS_MAX
            ));
        }
        inner.held.insert(
            task_id.to_owned(),
            Held {
                attempt,
                run_id: run_id.to_owned(),
                started: None,
                finished: None,
                stop: None,
                stop_early: None,
                started_sent: false,
                finished_sent: false,
                queued: false,
                started_seen: None,
            },
        );
        Ok(true)
    }

    pub fn set_stop(&self, task_id: &str, attempt: u64, stop: oneshot::Sender<String>) {
        if let Some(h) = self
            .inner
            .lock()
            .unwrap()
            .held
            .get_mut(task_id)
            .filter(|h| h.attempt == attempt)
        {
            match h.stop_early.take() {
                Some(reason) => {
                    let _ = stop.send(reason);
                }
                None => h.stop = Some(stop),
            }
        }
    }

    pub fn started(&self, msg: pb::TaskStarted) {
        let mut inner = self.inner.lock().unwrap();
        let Inner { held, unsent } = &mut *inner;
        if let Some(h) = held
            .get_mut(&msg.task_id)
            .filter(|h| h.attempt == msg.attempt)
        {
            h.queue(&msg.task_id, unsent);
            h.started = Some(msg);
            h.started_sent = false;
            h.started_seen = Some(Instant::now());
        }
        drop(inner);
        self.changed.notify_one();
    }

    pub fn finished(&self, msg: pb::TaskFinished) {
        let mut inner = self.inner.lock().unwrap();
        let Inner { held, unsent } = &mut *inner;
        if let Some(h) = held
            .get_mut(&msg.task_id)
            .filter(|h| h.attempt == msg.attempt)
        {
            h.queue(&msg.task_id, unsent);
            h.finished = Some(msg);
            h.finished_sent = false;
            h.stop = None;
        }
        drop(inner);
        self.changed.notify_one();
    }

    /// Everything held, for registration.
    pub fn held(&self) -> Vec<pb::RunningTask> {
        self.inner
            .lock()
            .unwrap()
            .held
            .iter()
            .map(|(id, h)| pb::RunningTask {
                task_id: id.clone(),
                attempt: h.attempt,
            })
            .collect()
    }

    /// Marks everything unsent (a new session starts).
    pub fn reset_sent(&self) {
        let mut inner = self.inner.lock().unwrap();
        let Inner { held, unsent } = &mut *inner;
        for (id, h) in held.iter_mut() {
            h.started_sent = false;
            h.finished_sent = false;
            h.queue(id, unsent);
        }
    }

    /// Reports not yet sent on this session, marked sent, and when the next held one is due.
    ///
    /// A start is reported only once it is `hold` old: a task that ends within that time sends
    /// one report (its finish, which carries the start time) instead of two, so the coordinators
    /// replicate and apply one command instead of two. Finishes go at once.
    pub fn take_unsent(
        &self,
        now: Instant,
        hold: Duration,
    ) -> (Vec<pb::agent_message::Msg>, Option<Instant>) {
        use pb::agent_message::Msg;
        let mut out = Vec::new();
        let mut next_due: Option<Instant> = None;
        let mut inner = self.inner.lock().unwrap();
        let Inner { held, unsent } = &mut *inner;
        unsent.retain(|id| {
            // Forgotten since it was queued (acknowledged, or superseded and then stale).
            let Some(h) = held.get_mut(id) else {
                return false;
            };
            if let Some(f) = &h.finished {
                if !h.finished_sent {
                    h.finished_sent = true;
                    h.started_sent = true;
                    out.push(Msg::Finished(f.clone()));
                }
            } else if let Some(s) = &h.started
                && !h.started_sent
            {
                let due = h.started_seen.map_or(now, |seen| seen + hold);
                if due > now {
                    next_due = Some(next_due.map_or(due, |d| d.min(due)));
                    return true;
                }
                h.started_sent = true;
                out.push(Msg::Started(s.clone()));
            }
            h.queued = false;
            false
        });
        (out, next_due)
    }

    /// The coordinator committed the result: forget the task.
    pub fn ack(&self, task_id: &str, attempt: u64) {
        let mut inner = self.inner.lock().unwrap();
        if inner
            .held
            .get(task_id)
            .is_some_and(|h| h.attempt == attempt && h.finished.is_some())
        {
            inner.held.remove(task_id);
        }
    }

    /// Stops (if running) and forgets an attempt the coordinator says is no longer current.
    pub fn drop_stale(&self, task_id: &str, attempt: u64, reason: &str) {
        let mut inner = self.inner.lock().unwrap();
        if inner
            .held
            .get(task_id)
            .is_some_and(|h| h.attempt == attempt)
            && let Some(h) = inner.held.remove(task_id)
            && let Some(stop) = h.stop
        {
            let _ = stop.send(reason.to_owned());
        }
    }

    /// Stops a running attempt, keeping it so its (cancelled) result is reported.
    /// Stops the attempt. One not started yet never starts; one this agent has never seen is
    /// reported ended at once (the coordinator keeps asking until it hears so), and a late
    /// assignment of it is refused as already held.
    pub fn stop(&self, task_id: &str, attempt: u64, reason: &str) {
        let mut inner = self.inner.lock().unwrap();
        let Inner { held, unsent } = &mut *inner;
        let full = held.len() >= limits::HELD_TASKS_MAX;
        match held.get_mut(task_id) {
            Some(h) if h.attempt == attempt => {
                if let Some(stop) = h.stop.take() {
                    let _ = stop.send(reason.to_owned());
                } else if h.finished.is_none() {
                    h.stop_early = Some(reason.to_owned());
                }
                return;
            }
            Some(_) => return,
            None if full => return,
            None => {}
        }
        let mut h = Held {
            attempt,
            run_id: String::new(),
            started: None,
            finished: Some(pb::TaskFinished {
                task_id: task_id.to_owned(),
                attempt,
                outcome: Some(pb::TaskOutcome {
                    reason: format!("{reason} (before it started here)"),
                    ..Default::default()
                }),
                started_at_us: 0,
            }),
            stop: None,
            stop_early: None,
            started_sent: false,
            finished_sent: false,
            queued: false,
            started_seen: None,
        };
        h.queue(task_id, unsent);
        held.insert(task_id.to_owned(), h);
        drop(inner);
        self.changed.notify_one();
    }

    /// When the attempt's process began (agent clock, microseconds); 0 if it never did.
    pub fn started_at_us(&self, task_id: &str, attempt: u64) -> u64 {
        self.inner
            .lock()
            .unwrap()
            .held
            .get(task_id)
            .filter(|h| h.attempt == attempt)
            .and_then(|h| h.started.as_ref())
            .map_or(0, |s| s.started_at_us)
    }

    pub fn is_finished(&self, task_id: &str, attempt: u64) -> Option<bool> {
        self.inner
            .lock()
            .unwrap()
            .held
            .get(task_id)
            .filter(|h| h.attempt == attempt)
            .map(|h| h.finished.is_some())
    }

    /// Attempts whose process has not ended yet.
    pub fn running(&self) -> usize {
        self.inner
            .lock()
            .unwrap()
            .held
            .values()
            .filter(|h| h.finished.is_none())
            .count()
    }

    /// Stops every running task (agent shutdown).
    pub fn stop_all(&self, reason: &str) {
        for h in self.inner.lock().unwrap().held.values_mut() {
            if let Some(stop) = h.stop.take() {
                let _ = stop.send(reason.to_owned());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::agent_message::Msg;

    fn started(id: &str, attempt: u64) -> pb::TaskStarted {
        pb::TaskStarted {
            task_id: id.into(),
            attempt,
            ..Default::default()
        }
    }

    fn finished(id: &str, attempt: u64) -> pb::TaskFinished {
        pb::TaskFinished {
            task_id: id.into(),
            attempt,
            ..Default::default()
        }
    }

    /// Everything due, with no start held back.
    fn now(t: &TaskTable) -> Vec<Msg> {
        t.take_unsent(Instant::now(), Duration::ZERO).0
    }

    fn kinds(msgs: &[Msg]) -> Vec<String> {
        msgs.iter()
            .map(|m| match m {
                Msg::Started(s) => format!("started {}", s.task_id),
                Msg::Finished(f) => format!("finished {}", f.task_id),
                _ => "other".into(),
            })
            .collect()
    }

    #[test]
    fn each_report_goes_once_per_session_and_again_after_a_reset() {
        let t = TaskTable::default();
        assert!(t.claim("r/a", 1, "r").unwrap());
        assert!(t.claim("r/b", 1, "r").unwrap());
        t.started(started("r/a", 1));
        t.started(started("r/a", 1));
        t.started(started("r/b", 1));
        assert_eq!(kinds(&now(&t)), ["started r/a", "started r/b"]);
        assert!(now(&t).is_empty(), "nothing new");

        // Finishing replaces the unsent start; a report for another attempt is ignored.
        t.finished(finished("r/a", 1));
        t.finished(finished("r/b", 7));
        assert_eq!(kinds(&now(&t)), ["finished r/a"]);

        // A new session: every held task reports its latest state again.
        t.reset_sent();
        assert_eq!(kinds(&now(&t)), ["finished r/a", "started r/b"]);

        // Acknowledged results are forgotten, even when queued meanwhile.
        t.reset_sent();
        t.ack("r/a", 1);
        assert_eq!(kinds(&now(&t)), ["started r/b"]);
    }

    #[test]
    fn a_superseded_attempt_reports_nothing_and_the_new_one_reports_once() {
        let t = TaskTable::default();
        assert!(t.claim("r/a", 1, "r").unwrap());
        t.started(started("r/a", 1));
        assert!(t.claim("r/a", 2, "r").unwrap());
        t.started(started("r/a", 1));
        t.started(started("r/a", 2));
        let sent = now(&t);
        assert_eq!(kinds(&sent), ["started r/a"]);
        assert!(matches!(&sent[0], Msg::Started(s) if s.attempt == 2));
        assert!(now(&t).is_empty());
    }

    #[test]
    fn a_start_waits_for_its_hold_and_a_finish_within_it_replaces_it() {
        // Long enough that no pause of this test's thread lets a start come due by itself.
        let hold = Duration::from_secs(3600);
        let t = TaskTable::default();
        assert!(t.claim("r/a", 1, "r").unwrap());
        assert!(t.claim("r/b", 1, "r").unwrap());
        t.started(started("r/a", 1));
        t.started(started("r/b", 1));
        let t0 = Instant::now();
        let (sent, due) = t.take_unsent(t0, hold);
        assert!(sent.is_empty(), "starts younger than the hold wait");
        let due = due.expect("a held start names when it is due");
        assert!(due > t0 && due <= t0 + hold);

        // r/a ends within the hold: one report, its finish; r/b's start stays held.
        t.finished(finished("r/a", 1));
        let (sent, due_again) = t.take_unsent(t0, hold);
        assert_eq!(kinds(&sent), ["finished r/a"]);
        let due = due_again.expect("r/b's start is still held");
        assert!(due <= t0 + hold);

        // Once due, the start goes, once.
        let (sent, due) = t.take_unsent(due, hold);
        assert_eq!(kinds(&sent), ["started r/b"]);
        assert_eq!(due, None);
        assert!(now(&t).is_empty());

        // A new session reports every held task again, each start once it is due.
        assert!(t.claim("r/c", 1, "r").unwrap());
        t.started(started("r/c", 1));
        t.reset_sent();
        let (sent, due) = t.take_unsent(Instant::now(), hold);
        assert_eq!(kinds(&sent), ["finished r/a"]);
        let (sent, due) = t.take_unsent(due.unwrap() + hold, hold);
        let mut sent = kinds(&sent);
        sent.sort();
        assert_eq!(sent, ["started r/b", "started r/c"]);
        assert_eq!(due, None);
    }

    #[test]
    fn a_stop_before_the_start_keeps_the_attempt_from_running_and_is_reported() {
        let t = TaskTable::default();
        // Never seen here: reported ended at once, and a late assignment is refused.
        t.stop("r/a", 1, "cancelled: by t");
        assert_eq!(kinds(&now(&t)), ["finished r/a"]);
        assert!(!t.claim("r/a", 1, "r").unwrap());
        // Claimed but not started: the process gets the stop as soon as it can take one.
        assert!(t.claim("r/b", 1, "r").unwrap());
        t.stop("r/b", 1, "cancelled: by t");
        let (tx, rx) = oneshot::channel();
        t.set_stop("r/b", 1, tx);
        assert_eq!(rx.blocking_recv().unwrap(), "cancelled: by t");
    }
}
