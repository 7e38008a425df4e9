//! Agent sessions held by the leader, and the leases that decide liveness. Both live in the
//! leader's memory only: a heartbeat is not a Raft write. Only a lease expiry is committed.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use drover_proto::pb::CoordinatorMessage;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::Status;

use crate::limits;
use crate::model::{AgentName, TaskId};

pub type Outbox = mpsc::Sender<Result<CoordinatorMessage, Status>>;

/// How a session is ended by the leader: its stream to the agent yields the reason and ends at
/// once, however many messages wait unread in its outbox (a full outbox is how an agent that
/// stopped reading shows), and the reader of the agent's side stops. Dropping the outbox's
/// sender was not enough: reports in flight hold clones of it, so the stream stayed open, and
/// the agent, never seeing an end, never registered again.
#[derive(Default)]
pub struct SessionEnd {
    token: CancellationToken,
    reason: Mutex<Option<Status>>,
}

impl SessionEnd {
    pub fn end(&self, status: Status) {
        self.reason.lock().unwrap().get_or_insert(status);
        self.token.cancel();
    }

    pub fn is_ended(&self) -> bool {
        self.token.is_cancelled()
    }

    pub async fn ended(&self) {
        self.token.cancelled().await
    }

    fn reason(&self) -> Status {
        self.reason
            .lock()
            .unwrap()
            .clone()
            .unwrap_or_else(|| Status::unavailable("session closed by the leader; register again"))
    }
}

/// The stream of messages to one agent: the outbox until the session is ended, then the reason.
pub struct SessionOut {
    rx: mpsc::Receiver<Result<CoordinatorMessage, Status>>,
    end: Arc<SessionEnd>,
    ended: Pin<Box<WaitForCancellationFutureOwned>>,
    done: bool,
}

impl SessionOut {
    pub fn new(
        rx: mpsc::Receiver<Result<CoordinatorMessage, Status>>,
        end: Arc<SessionEnd>,
    ) -> Self {
        let ended = Box::pin(end.token.clone().cancelled_owned());
        Self {
            rx,
            end,
            ended,
            done: false,
        }
    }
}

impl tokio_stream::Stream for SessionOut {
    type Item = Result<CoordinatorMessage, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        // The end goes first: queued messages are re-sent on the next registration anyway.
        if self.ended.as_mut().poll(cx).is_ready() {
            self.done = true;
            return Poll::Ready(Some(Err(self.end.reason())));
        }
        self.rx.poll_recv(cx)
    }
}

struct Session {
    id: u64,
    tx: Outbox,
    end: Arc<SessionEnd>,
}

#[derive(Default)]
struct Inner {
    sessions: HashMap<AgentName, Session>,
    /// When the leader last heard from each agent (or granted it a fresh lease).
    last_seen: HashMap<AgentName, Instant>,
    /// Agents heard from since this node took office (as opposed to only granted a lease).
    heard: std::collections::HashSet<AgentName>,
    /// Agents whose registration is being committed: their heartbeats wait unread in the stream
    /// until it is, so their lease must not run out meanwhile. Under a reconnect storm of 10,000
    /// agents a registration could take longer than a lease, and hundreds were declared lost.
    registering: HashMap<AgentName, u32>,
    /// When an agent was last heard from for the first time since this node took office: a
    /// reconnect storm is still going while this is recent. (The latest session opened was used
    /// before; an agent reconnecting over and over kept that fresh without anyone new arriving.)
    last_first_contact: Option<Instant>,
    /// Assignments this leader has handed to a session: (attempt, when). Only tasks still
    /// assigned and not started are kept (`retain_sent`), so it is bounded by those.
    sent: HashMap<TaskId, (u64, Instant)>,
}

impl Inner {
    /// Records contact with `name` now. Every heartbeat lands here (10,000 a second for a large
    /// fleet): no allocation when the agent is already tracked and heard from.
    fn heard_from(&mut self, name: &str) {
        let now = Instant::now();
        match self.last_seen.get_mut(name) {
            Some(seen) => *seen = now,
            None => {
                self.last_seen.insert(name.to_owned(), now);
            }
        }
        if !self.heard.contains(name) {
            self.heard.insert(name.to_owned());
            self.last_first_contact = Some(now);
        }
    }
}

#[derive(Default)]
pub struct Sessions {
    inner: Mutex<Inner>,
    next_id: AtomicU64,
}

#[derive(Debug, PartialEq, Eq)]
pub enum SendError {
    NotConnected,
    /// The session's outbox is full: the agent is not reading. The session is closed.
    Stuck,
}

impl Sessions {
    /// Adds a session, replacing (and so ending) an older one for the same agent.
    pub fn open(&self, name: &str, tx: Outbox) -> Result<(u64, Arc<SessionEnd>), Status> {
        let mut inner = self.inner.lock().unwrap();
        if !inner.sessions.contains_key(name) && inner.sessions.len() >= limits::AGENT_SESSIONS_MAX
        {
            return Err(Status::resource_exhausted(format!(
                "agent_sessions_max ({}) reached on this leader",
                limits::AGENT_SESSIONS_MAX
            )));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let end = Arc::new(SessionEnd::default());
        let session = Session {
            id,
            tx,
            end: end.clone(),
        };
        if let Some(old) = inner.sessions.insert(name.to_owned(), session) {
            old.end.end(Status::unavailable(
                "replaced by a newer session of this agent",
            ));
        }
        inner.heard_from(name);
        Ok((id, end))
    }

    /// Removes the session if it is still the one identified by `id`, and ends it.
    pub fn close(&self, name: &str, id: u64) {
        let mut inner = self.inner.lock().unwrap();
        if inner.sessions.get(name).is_some_and(|s| s.id == id)
            && let Some(s) = inner.sessions.remove(name)
        {
            s.end.end(Status::unavailable("session ended"));
        }
    }

    /// Ends every session with `status` (used when this node stops being the leader).
    pub fn close_all(&self, status: &Status) {
        let mut inner = self.inner.lock().unwrap();
        for (_, s) in inner.sessions.drain() {
            s.end.end(status.clone());
        }
        inner.last_seen.clear();
        inner.sent.clear();
    }

    /// Ends one agent's session with `status` (it reconnects and registers again).
    pub fn close_with(&self, name: &str, status: Status) {
        if let Some(s) = self.inner.lock().unwrap().sessions.remove(name) {
            s.end.end(status);
        }
    }

    /// How long ago this leader handed `attempt` of `task_id` to a session, if it did.
    pub fn sent_ago(&self, task_id: &str, attempt: u64) -> Option<std::time::Duration> {
        let inner = self.inner.lock().unwrap();
        let (a, at) = inner.sent.get(task_id)?;
        (*a == attempt).then(|| at.elapsed())
    }

    pub fn sent_len(&self) -> usize {
        self.inner.lock().unwrap().sent.len()
    }

    /// Forgets deliveries of tasks for which `keep` is false (no longer waiting to start).
    pub fn retain_sent(&self, keep: impl Fn(&str) -> bool) {
        self.inner.lock().unwrap().sent.retain(|t, _| keep(t));
    }

    /// Marks a registration of `name` in flight until the guard is dropped (which counts as
    /// hearing from it).
    pub fn registering<'a>(&'a self, name: &str) -> Registering<'a> {
        *self
            .inner
            .lock()
            .unwrap()
            .registering
            .entry(name.to_owned())
            .or_default() += 1;
        Registering {
            sessions: self,
            name: name.to_owned(),
        }
    }

    /// Whether a registration of `name` is being committed.
    #[cfg(test)]
    fn is_registering(&self, name: &str) -> bool {
        self.inner.lock().unwrap().registering.contains_key(name)
    }

    pub fn touch(&self, name: &str) {
        self.inner.lock().unwrap().heard_from(name);
    }

    /// When an agent was last heard from for the first time since this leader took office.
    pub fn last_first_contact(&self) -> Option<Instant> {
        self.inner.lock().unwrap().last_first_contact
    }

    /// A new leader gives every known agent one full lease before judging anyone.
    pub fn grant_leases<'a>(&self, names: impl Iterator<Item = &'a str>) {
        let now = Instant::now();
        let mut inner = self.inner.lock().unwrap();
        inner.heard.clear();
        inner.last_first_contact = None;
        for n in names {
            inner.last_seen.insert(n.to_owned(), now);
        }
    }

    /// The agents among `names` whose lease has run out: not heard from for longer than `ttl`,
    /// no registration in flight, and, while a reconnect `storm` lasts, heard from since this
    /// leader took office. An agent this leader has never tracked (it just registered, or the
    /// leader just took over) is granted a full lease now. One lock for the whole fleet: this
    /// runs ten times a second over every agent.
    pub fn overdue<'a>(
        &self,
        names: impl Iterator<Item = &'a str>,
        ttl: std::time::Duration,
        storm: bool,
    ) -> Vec<String> {
        let now = Instant::now();
        let mut inner = self.inner.lock().unwrap();
        let mut overdue = Vec::new();
        for name in names {
            let seen = match inner.last_seen.get(name) {
                Some(seen) => *seen,
                None => {
                    inner.last_seen.insert(name.to_owned(), now);
                    continue;
                }
            };
            if now.duration_since(seen) > ttl
                && !inner.registering.contains_key(name)
                && (!storm || inner.heard.contains(name))
            {
                overdue.push(name.to_owned());
            }
        }
        overdue
    }

    pub fn forget_lease(&self, name: &str) {
        self.inner.lock().unwrap().last_seen.remove(name);
    }

    pub fn heard_ago_ms(&self, name: &str) -> Option<u64> {
        self.inner
            .lock()
            .unwrap()
            .last_seen
            .get(name)
            .map(|t| t.elapsed().as_millis() as u64)
    }

    pub fn is_connected(&self, name: &str) -> bool {
        self.inner.lock().unwrap().sessions.contains_key(name)
    }

    pub fn connected_count(&self) -> usize {
        self.inner.lock().unwrap().sessions.len()
    }

    pub fn send(&self, name: &str, msg: CoordinatorMessage) -> Result<(), SendError> {
        self.send_noting(name, msg, None)
    }

    /// Sends an assignment and notes it was handed over (`sent_ago`), under one lock: this
    /// runs for every task placed.
    pub fn send_assignment(
        &self,
        name: &str,
        msg: CoordinatorMessage,
        task_id: &str,
        attempt: u64,
    ) -> Result<(), SendError> {
        self.send_noting(name, msg, Some((task_id, attempt)))
    }

    fn send_noting(
        &self,
        name: &str,
        msg: CoordinatorMessage,
        assignment: Option<(&str, u64)>,
    ) -> Result<(), SendError> {
        let mut inner = self.inner.lock().unwrap();
        let Some(s) = inner.sessions.get(name) else {
            return Err(SendError::NotConnected);
        };
        match s.tx.try_send(Ok(msg)) {
            Ok(()) => {
                if let Some((task_id, attempt)) = assignment {
                    let now = Instant::now();
                    match inner.sent.get_mut(task_id) {
                        Some(e) => *e = (attempt, now),
                        None => {
                            inner.sent.insert(task_id.to_owned(), (attempt, now));
                        }
                    }
                }
                Ok(())
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                if let Some(s) = inner.sessions.remove(name) {
                    s.end.end(Status::unavailable("session ended"));
                }
                Err(SendError::NotConnected)
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                // Ending the session ends its stream; the agent reconnects and re-syncs.
                tracing::warn!(
                    agent = name,
                    limit = limits::SESSION_OUTBOX_MAX,
                    "session outbox full; closing session"
                );
                if let Some(s) = inner.sessions.remove(name) {
                    s.end.end(Status::resource_exhausted(format!(
                        "session_outbox_max ({}) messages waited unread; register again",
                        limits::SESSION_OUTBOX_MAX
                    )));
                }
                Err(SendError::Stuck)
            }
        }
    }
}

/// A registration in flight; see [`Sessions::registering`].
pub struct Registering<'a> {
    sessions: &'a Sessions,
    name: String,
}

impl Drop for Registering<'_> {
    fn drop(&mut self) {
        let mut inner = self.sessions.inner.lock().unwrap();
        if let Some(n) = inner.registering.get_mut(&self.name) {
            *n -= 1;
            if *n == 0 {
                inner.registering.remove(&self.name);
            }
        }
        inner.heard_from(&self.name);
    }
}

/// Log reads in flight to agents, matched to their answers by request id.
#[derive(Default)]
pub struct LogRequests {
    next_id: AtomicU64,
    pending: Mutex<HashMap<u64, oneshot::Sender<drover_proto::pb::LogData>>>,
}

impl LogRequests {
    pub fn begin(&self) -> Result<(u64, oneshot::Receiver<drover_proto::pb::LogData>), Status> {
        let mut pending = self.pending.lock().unwrap();
        if pending.len() >= limits::LOG_REQUESTS_IN_FLIGHT_MAX {
            return Err(Status::resource_exhausted(format!(
                "log_requests_in_flight_max ({}) reached; retry shortly",
                limits::LOG_REQUESTS_IN_FLIGHT_MAX
            )));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let (tx, rx) = oneshot::channel();
        pending.insert(id, tx);
        Ok((id, rx))
    }

    pub fn cancel(&self, id: u64) {
        self.pending.lock().unwrap().remove(&id);
    }

    pub fn complete(&self, data: drover_proto::pb::LogData) {
        if let Some(tx) = self.pending.lock().unwrap().remove(&data.request_id) {
            let _ = tx.send(data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_ended_session_ends_its_stream_even_with_a_full_outbox_and_senders_alive() {
        // Guards: closing a session used to drop the leader's sender and try to queue an error;
        // with the outbox full (the agent had stopped reading) and reports in flight holding
        // senders, the stream never ended and the agent never registered again.
        use tokio_stream::StreamExt;
        let s = Sessions::default();
        let (tx, rx) = mpsc::channel(2);
        let (_, end) = s.open("a", tx.clone()).unwrap();
        let mut out = SessionOut::new(rx, end.clone());
        for _ in 0..2 {
            tx.try_send(Ok(CoordinatorMessage::default())).unwrap();
        }
        assert!(tx.try_send(Ok(CoordinatorMessage::default())).is_err());
        s.close_with("a", Status::unavailable("declared lost"));
        assert!(end.is_ended());
        let first = out.next().await.unwrap().unwrap_err();
        assert_eq!(first.message(), "declared lost");
        assert!(out.next().await.is_none());
        assert!(!s.is_connected("a"));
        // A newer session of the same agent ends the older one.
        let (tx1, rx1) = mpsc::channel(2);
        let (_, end1) = s.open("b", tx1).unwrap();
        let (tx2, _rx2) = mpsc::channel(2);
        let (_, end2) = s.open("b", tx2).unwrap();
        assert!(end1.is_ended() && !end2.is_ended());
        let mut out1 = SessionOut::new(rx1, end1);
        assert!(out1.next().await.unwrap().is_err());
        assert!(s.is_connected("b"));
    }

    #[test]
    fn deliveries_are_remembered_per_attempt_and_forgotten_with_their_task() {
        let s = Sessions::default();
        assert_eq!(s.sent_ago("t", 1), None);
        let (tx, _rx) = mpsc::channel(2);
        s.open("a", tx).unwrap();
        s.send_assignment("a", CoordinatorMessage::default(), "t", 1)
            .unwrap();
        assert!(s.sent_ago("t", 1).is_some());
        assert_eq!(s.sent_ago("t", 2), None, "another attempt was never sent");
        s.retain_sent(|t| t != "t");
        assert_eq!(s.sent_ago("t", 1), None);
    }

    #[tokio::test]
    async fn overdue_spares_new_registering_and_unheard_storm_agents() {
        let s = Sessions::default();
        let zero = std::time::Duration::ZERO;
        s.grant_leases(["granted"].into_iter());
        s.touch("heard");
        let _guard = s.registering("registering");
        s.touch("registering");
        // Any time at all past a zero lease is overdue.
        let t0 = Instant::now();
        while Instant::now() == t0 {
            std::hint::spin_loop();
        }
        let all = ["granted", "heard", "registering", "new"];
        let mut storm = s.overdue(all.into_iter(), zero, true);
        storm.sort();
        assert_eq!(
            storm,
            ["heard"],
            "in a storm only agents heard from since taking office are judged"
        );
        assert!(
            s.heard_ago_ms("new").is_some(),
            "an agent never tracked is granted a lease, not judged"
        );
        let mut calm = s.overdue(all[..3].iter().copied(), zero, false);
        calm.sort();
        assert_eq!(
            calm,
            ["granted", "heard"],
            "a registration in flight is spared"
        );
        assert!(
            s.overdue(all.into_iter(), std::time::Duration::from_secs(60), false)
                .is_empty()
        );
    }

    #[test]
    fn a_registration_in_flight_is_marked_until_its_last_guard_ends() {
        // Guards: an agent whose registration waits behind thousands of others is not judged
        // (the leader skips agents marked registering), and the end counts as contact.
        let s = Sessions::default();
        let first = s.registering("a");
        let second = s.registering("a");
        assert!(s.is_registering("a"));
        assert!(!s.is_registering("b"));
        assert_eq!(s.heard_ago_ms("a"), None, "marking is not contact");
        drop(first);
        assert!(
            s.is_registering("a"),
            "another registration is still in flight"
        );
        drop(second);
        assert!(!s.is_registering("a"));
        assert!(s.heard_ago_ms("a").is_some_and(|ms| ms < 1_000));
    }
}
