//! Follower-side election trigger. openraft lets a follower campaign only after the leader's
//! lease plus its own random election timeout, plus a back-off of twice the maximum timeout when
//! another node's log is longer: after a leader died, writes stopped for 0.47 s or, when the
//! follower that was behind campaigned first, for 0.8-1 s (measured with openraft 0.9). The watchdog campaigns as soon as
//! the lease has run out without an append from the leader, the voters going in node order a
//! step apart, so the second can still win the next term when the first had the shorter log.
//! Voters still refuse any candidate while they hear from a live leader (the lease), so a slow
//! follower cannot depose a healthy leader this way.
//!
//! Before campaigning, the follower asks the silent leader whether it still leads (`LeaderProbe`,
//! answered outside Raft's core). openraft 0.9's leader sent nothing, heartbeats included, while
//! its own log write was under way, and on a loaded host such writes took 130-460 ms: elections
//! under load came from followers campaigning 260-420 ms into one of them. openraft 0.10 goes on
//! while an append is being synced, but still waits for votes, truncations and purges, and a
//! starved host delays its heartbeats past their timeout all the same. While the leader
//! answers, the follower holds off, probing again every `PROBE_EVERY`, for at most
//! `HOLD_OFF_MAX`: a leader that answers yet sends nothing for that long (a wedged core, or a
//! one-way partition) is deposed anyway. A dead leader refuses the connection at once, so a crash
//! costs the probe nothing; an unreachable one costs at most `PROBE_TIMEOUT`. The connection to
//! each new leader is opened in the background as soon as it is known, so a probe is one RPC: on
//! a host starved by a burst of task processes, probes that also had to do a TLS handshake missed
//! their deadline and followers campaigned against a live leader.
//!
//! openraft's own election timer is off while this node is a follower that has heard from a
//! leader: the watchdog alone decides then. That timer counts from the last append Raft's core
//! has processed, not from the last one that arrived, so when this node's own log write stalled
//! (for a second and more while the kernel wrote back a burst of task files) it fired as the
//! write returned, with the leader's appends queued behind it. Candidates, leaders and nodes that
//! never heard from a leader keep it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use drover_proto::pb::raft_service_client::RaftServiceClient;
use drover_proto::pb::{LeaderProbeReply, LeaderProbeRequest};
use drover_proto::tls::TlsMaterial;
use openraft::ServerState;
use openraft::async_runtime::WatchReceiver;
use tonic::transport::Channel;

use super::Raft;
use crate::metrics::{Metrics, ResultLabels};
use crate::model::NodeId;

/// When this follower last heard from a leader, and whether it ever has since it started.
pub struct LeaderContact {
    epoch: Instant,
    last_ms: AtomicU64,
    heard: AtomicBool,
}

impl Default for LeaderContact {
    fn default() -> Self {
        Self {
            epoch: Instant::now(),
            last_ms: AtomicU64::new(0),
            heard: AtomicBool::new(false),
        }
    }
}

impl LeaderContact {
    /// An append or snapshot chunk arrived from a leader.
    pub fn heard_from_leader(&self) {
        self.heard.store(true, Ordering::Relaxed);
        self.touch();
    }

    /// A node that has not heard from any leader since it started leaves elections to openraft:
    /// a restarted follower campaigning before the leader reaches it would only raise its term
    /// and, once heard, depose a healthy leader.
    pub fn has_heard(&self) -> bool {
        self.heard.load(Ordering::Relaxed)
    }

    pub fn touch(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    pub fn silent_for(&self) -> Duration {
        let now = self.epoch.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }
}

/// How long follower `me` waits without an append before campaigning: the lease, a margin, and
/// a step per voter ahead of it (voters other than the silent leader, by id), and its rank in
/// that order. None: not a voter.
///
/// The margin covers the other voter having heard from the leader later than this one (a
/// follower catching up gets appends more often than heartbeats): campaigning before its lease
/// ends only earns a refusal and a longer wait.
pub fn patience(
    me: NodeId,
    voters: &[NodeId],
    silent_leader: Option<NodeId>,
    lease: Duration,
    margin: Duration,
    step: Duration,
) -> Option<(Duration, usize)> {
    let mut others: Vec<NodeId> = voters
        .iter()
        .copied()
        .filter(|v| Some(*v) != silent_leader)
        .collect();
    others.sort_unstable();
    let rank = others.iter().position(|v| *v == me)?;
    Some((lease + margin + step * rank as u32, rank))
}

/// How often the watchdog looks.
const POLL: Duration = Duration::from_millis(10);

/// How long a silent leader has to answer a probe. A busy leader answers within milliseconds
/// (the reply reads published state), but on a host whose CPUs are taken by task processes its
/// runtime threads can wait 100 ms and more to run. This bounds what a partitioned leader adds to
/// failover; a crashed one refuses at once.
const PROBE_TIMEOUT: Duration = Duration::from_millis(250);

/// How long opening the connection to a new leader may take in the background, and the least
/// time between two attempts.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const CONNECT_EVERY: Duration = Duration::from_millis(500);

/// While holding off, how often the leader is asked again (so its death is still noticed fast).
const PROBE_EVERY: Duration = Duration::from_millis(50);

/// The longest a follower holds off for a leader that answers probes but sends nothing.
pub const HOLD_OFF_MAX: Duration = Duration::from_secs(2);

/// What the watchdog does on one look at a follower's silence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Look {
    /// Heard from the leader within its patience.
    Quiet,
    /// Silent too long: ask the leader.
    Probe,
    /// Holding off for a leader that answered; not yet time to ask again.
    Hold,
    /// Silent too long and the hold-off is over.
    Campaign,
}

/// `silent`: since the last append; `held`: since the leader first answered in this silence;
/// `since_probe`: since the last probe.
pub fn look(
    silent: Duration,
    patience: Duration,
    held: Option<Duration>,
    since_probe: Option<Duration>,
) -> Look {
    if silent <= patience {
        Look::Quiet
    } else if held.is_some_and(|h| h >= HOLD_OFF_MAX) {
        Look::Campaign
    } else if held.is_none() || since_probe.is_none_or(|p| p >= PROBE_EVERY) {
        Look::Probe
    } else {
        Look::Hold
    }
}

/// What a probe of a silent leader found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// It leads in this follower's term: alive, only not sending.
    Leading,
    /// It answered, but no longer leads in this term.
    NotLeading,
    /// No answer in time.
    Unreachable,
}

impl Probe {
    pub fn of(reply: &LeaderProbeReply, term: u64) -> Probe {
        if reply.leading && reply.term == term {
            Probe::Leading
        } else {
            Probe::NotLeading
        }
    }

    fn label(self) -> &'static str {
        match self {
            Probe::Leading => "leading",
            Probe::NotLeading => "not_leading",
            Probe::Unreachable => "unreachable",
        }
    }
}

type ProbeClient = RaftServiceClient<Channel>;

/// Asks a silent leader, over the coordinators' mTLS port, whether it still leads. Keeps one
/// connection, to the current leader, opened before it is needed (`warm`).
pub struct LeaderProber {
    peers: Arc<Vec<(NodeId, String)>>,
    tls: TlsMaterial,
    client: Option<(NodeId, ProbeClient)>,
    /// A connection being opened in the background, and to whom.
    opening: Option<(NodeId, tokio::task::JoinHandle<Result<ProbeClient, String>>)>,
    /// The last background attempt: to whom and when.
    tried: Option<(NodeId, Instant)>,
}

impl LeaderProber {
    pub fn new(peers: Arc<Vec<(NodeId, String)>>, tls: TlsMaterial) -> Self {
        Self {
            peers,
            tls,
            client: None,
            opening: None,
            tried: None,
        }
    }

    /// Makes sure a connection to `leader` is open or being opened, without waiting for it.
    pub async fn warm(&mut self, leader: NodeId) {
        self.collect().await;
        if matches!(&self.client, Some((id, _)) if *id == leader)
            || matches!(&self.opening, Some((id, _)) if *id == leader)
        {
            return;
        }
        if matches!(self.tried, Some((id, at)) if id == leader && at.elapsed() < CONNECT_EVERY) {
            return;
        }
        self.tried = Some((leader, Instant::now()));
        if let Some((_, old)) = self.opening.take() {
            old.abort();
        }
        let Some(addr) = self.address(leader) else {
            return;
        };
        let tls = self.tls.clone();
        self.opening = Some((
            leader,
            tokio::spawn(async move {
                let channel = tokio::time::timeout(
                    CONNECT_TIMEOUT,
                    drover_proto::client::connect(&addr, &tls),
                )
                .await
                .map_err(|_| "timed out connecting".to_owned())??;
                Ok(RaftServiceClient::new(channel))
            }),
        ));
    }

    /// Takes a finished background connection (never waits for one still opening).
    async fn collect(&mut self) {
        if !self.opening.as_ref().is_some_and(|(_, h)| h.is_finished()) {
            return;
        }
        if let Some((id, handle)) = self.opening.take()
            && let Ok(Ok(client)) = handle.await
        {
            self.client = Some((id, client));
        }
    }

    /// Whether a connection to `leader` is open, so a probe is one call.
    pub async fn connected_to(&mut self, leader: NodeId) -> bool {
        self.collect().await;
        matches!(&self.client, Some((id, _)) if *id == leader)
    }

    fn address(&self, leader: NodeId) -> Option<String> {
        self.peers
            .iter()
            .find(|(id, _)| *id == leader)
            .map(|(_, addr)| addr.clone())
    }

    pub async fn probe(&mut self, leader: NodeId, term: u64) -> Probe {
        match tokio::time::timeout(PROBE_TIMEOUT, self.ask(leader)).await {
            Ok(Ok(reply)) => Probe::of(&reply, term),
            // A failed call drops the connection, so the next probe connects afresh (a dead
            // leader refuses at once); a late answer says nothing against it, so it is kept.
            Ok(Err(_)) => {
                self.client = None;
                Probe::Unreachable
            }
            Err(_) => Probe::Unreachable,
        }
    }

    async fn ask(&mut self, leader: NodeId) -> Result<LeaderProbeReply, String> {
        self.collect().await;
        if !matches!(&self.client, Some((id, _)) if *id == leader) {
            let addr = self
                .address(leader)
                .ok_or("the leader is not among the configured peers")?;
            let channel = drover_proto::client::connect(&addr, &self.tls).await?;
            self.client = Some((leader, RaftServiceClient::new(channel)));
        }
        let (_, client) = self.client.as_mut().expect("set above");
        client
            .leader_probe(LeaderProbeRequest {})
            .await
            .map(tonic::Response::into_inner)
            .map_err(|s| drover_proto::client::describe_status(&s))
    }
}

/// What the watchdog needs besides Raft.
pub struct Watch {
    pub me: NodeId,
    pub contact: Arc<LeaderContact>,
    pub lease: Duration,
    pub margin: Duration,
    pub step: Duration,
    pub prober: LeaderProber,
    pub metrics: Arc<Metrics>,
}

/// Whether the watchdog alone decides when this node campaigns, openraft's own election timer
/// off (see the module's comment): a follower that has heard from a leader.
fn watches(state: ServerState, heard_from_a_leader: bool) -> bool {
    state == ServerState::Follower && heard_from_a_leader
}

pub async fn run(raft: Raft, watch: Watch, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let Watch {
        me,
        contact,
        lease,
        margin,
        step,
        mut prober,
        metrics,
    } = watch;
    contact.touch();
    // While holding off: when it began, and when the leader was last asked.
    let mut held: Option<Instant> = None;
    let mut probed: Option<Instant> = None;
    let mut openraft_timer = true;
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            _ = tokio::time::sleep(POLL) => {}
        }
        let (state, leader, voters, term) = {
            let m = raft.metrics();
            let m = m.borrow_watched();
            let voters: Vec<NodeId> = m.membership_config.membership().voter_ids().collect();
            (m.state, m.current_leader, voters, m.current_term)
        };
        let watched = watches(state, contact.has_heard());
        if watched == openraft_timer {
            openraft_timer = !watched;
            raft.runtime_config().elect(openraft_timer);
        }
        if !watched {
            // Leaders and candidates have their own timers; count silence from when this ends.
            held = None;
            contact.touch();
            continue;
        }
        let Some((wait, rank)) = patience(me, &voters, leader, lease, margin, step) else {
            continue;
        };
        if let Some(l) = leader {
            prober.warm(l).await;
        }
        let silent = contact.silent_for();
        let since = |at: Option<Instant>| at.map(|t| t.elapsed());
        let mut action = look(silent, wait, since(held), since(probed));
        let mut found = None;
        if action == Look::Probe {
            let answer = match leader {
                Some(l) => prober.probe(l, term).await,
                None => Probe::NotLeading,
            };
            found = Some(answer);
            probed = Some(Instant::now());
            metrics
                .raft_leader_probes
                .get_or_create(&ResultLabels {
                    result: answer.label(),
                })
                .inc();
            action = if contact.silent_for() <= wait {
                Look::Quiet // An append arrived while the probe was out.
            } else if answer == Probe::Leading {
                if held.is_none() {
                    tracing::info!(
                        silent_ms = silent.as_millis() as u64,
                        ?leader,
                        "the silent leader answers probes; holding off elections"
                    );
                    held = Some(Instant::now());
                }
                Look::Hold
            } else {
                Look::Campaign
            };
        }
        match action {
            Look::Hold => continue,
            Look::Quiet => {
                held = None;
                continue;
            }
            Look::Probe | Look::Campaign => {}
        }
        if let Some(since) = held {
            tracing::warn!(
                held_ms = since.elapsed().as_millis() as u64,
                ?leader,
                "the leader stopped answering, or answered without sending for too long"
            );
        }
        held = None;
        tracing::info!(
            silent_ms = contact.silent_for().as_millis() as u64,
            ?leader,
            probe = found.map_or("none", Probe::label),
            "no append from the leader for longer than its lease; campaigning"
        );
        // Wait as long again before another attempt; openraft retries a lost election itself.
        contact.touch();
        if raft.trigger().elect(false).await.is_err() {
            break;
        }
        // A later voter campaigns only because the first may have lost on a shorter log; that
        // candidate holds its own vote for the next term, so go one term further at once instead
        // of waiting out openraft's retry. (The first voter never does this, so the two do not
        // leapfrog each other.)
        if rank > 0 && raft.trigger().elect(false).await.is_err() {
            break;
        }
    }
    raft.runtime_config().elect(true);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn followers_go_in_id_order_skipping_the_silent_leader() {
        let lease = Duration::from_millis(200);
        let margin = Duration::from_millis(60);
        let step = Duration::from_millis(50);
        let p = |me, leader| patience(me, &[1, 2, 3], leader, lease, margin, step);
        assert_eq!(p(1, Some(2)), Some((Duration::from_millis(260), 0)));
        assert_eq!(p(3, Some(2)), Some((Duration::from_millis(310), 1)));
        assert_eq!(p(2, Some(1)), Some((Duration::from_millis(260), 0)));
        assert_eq!(p(3, None), Some((Duration::from_millis(360), 2)));
        assert_eq!(p(4, Some(1)), None, "a learner does not campaign");
    }

    #[test]
    fn only_a_leader_in_the_followers_own_term_holds_off_a_campaign() {
        let reply = |leading, term| LeaderProbeReply { leading, term };
        assert_eq!(Probe::of(&reply(true, 7), 7), Probe::Leading);
        assert_eq!(
            Probe::of(&reply(true, 6), 7),
            Probe::NotLeading,
            "deposed since"
        );
        assert_eq!(
            Probe::of(&reply(true, 8), 7),
            Probe::NotLeading,
            "leads a term this follower has not seen: let Raft sort it out"
        );
        assert_eq!(Probe::of(&reply(false, 7), 7), Probe::NotLeading);
    }

    #[test]
    fn a_follower_holds_off_for_an_answering_leader_but_not_for_ever() {
        let ms = Duration::from_millis;
        let patience = ms(260);
        assert_eq!(look(ms(100), patience, None, None), Look::Quiet);
        assert_eq!(look(ms(100), patience, Some(ms(500)), None), Look::Quiet);
        assert_eq!(look(ms(300), patience, None, None), Look::Probe);
        assert_eq!(
            look(ms(300), patience, None, Some(ms(1))),
            Look::Probe,
            "a probe from an earlier silence does not count"
        );
        assert_eq!(
            look(ms(400), patience, Some(ms(100)), Some(ms(10))),
            Look::Hold
        );
        assert_eq!(
            look(ms(400), patience, Some(ms(100)), Some(PROBE_EVERY)),
            Look::Probe
        );
        assert_eq!(
            look(ms(3_000), patience, Some(HOLD_OFF_MAX), Some(ms(1))),
            Look::Campaign
        );
    }

    #[test]
    fn only_a_follower_that_heard_a_leader_turns_openraft_s_timer_off() {
        use openraft::ServerState::*;
        assert!(super::watches(Follower, true));
        // A fresh node must still be able to elect a first leader on openraft's timer, and a
        // candidate or leader keeps it for its own campaign and step-down.
        for (state, heard) in [
            (Follower, false),
            (Candidate, true),
            (Leader, true),
            (Learner, true),
        ] {
            assert!(!super::watches(state, heard), "{state:?} heard={heard}");
        }
    }

    #[test]
    fn silence_counts_from_the_last_touch() {
        let c = LeaderContact::default();
        c.touch();
        assert!(c.silent_for() < Duration::from_millis(50));
    }
}
