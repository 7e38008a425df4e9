//! Follower-side election trigger. openraft 0.9 lets a follower campaign only after the leader's
//! lease plus its own random election timeout, plus a back-off of twice the maximum timeout when
//! another node's log is longer: after a leader dies, writes stopped for 0.47 s or, when the
//! follower that was behind campaigned first, for 0.8-1 s. The watchdog campaigns as soon as
//! the lease has run out without an append from the leader, the voters going in node order a
//! step apart, so the second can still win the next term when the first had the shorter log.
//! Voters still refuse any candidate while they hear from a live leader (the lease), so a slow
//! follower cannot depose a healthy leader this way.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use openraft::ServerState;

use super::Raft;
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

pub async fn run(
    raft: Raft,
    me: NodeId,
    contact: std::sync::Arc<LeaderContact>,
    lease: Duration,
    margin: Duration,
    step: Duration,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    contact.touch();
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = tokio::time::sleep(POLL) => {}
        }
        let (state, leader, voters) = {
            let m = raft.metrics();
            let m = m.borrow();
            let voters: Vec<NodeId> = m.membership_config.membership().voter_ids().collect();
            (m.state, m.current_leader, voters)
        };
        if state != ServerState::Follower || !contact.has_heard() {
            // Leaders and candidates have their own timers; count silence from when this ends.
            contact.touch();
            continue;
        }
        let Some((wait, rank)) = patience(me, &voters, leader, lease, margin, step) else {
            continue;
        };
        if contact.silent_for() > wait {
            tracing::info!(
                silent_ms = contact.silent_for().as_millis() as u64,
                ?leader,
                "no append from the leader for longer than its lease; campaigning"
            );
            // Wait as long again before another attempt; openraft retries a lost election itself.
            contact.touch();
            if raft.trigger().elect().await.is_err() {
                return;
            }
            // A later voter campaigns only because the first may have lost on a shorter log;
            // that candidate holds its own vote for the next term, so go one term further at
            // once instead of waiting out openraft's retry. (The first voter never does this, so
            // the two do not leapfrog each other.)
            if rank > 0 && raft.trigger().elect().await.is_err() {
                return;
            }
        }
    }
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
    fn silence_counts_from_the_last_touch() {
        let c = LeaderContact::default();
        c.touch();
        assert!(c.silent_for() < Duration::from_millis(50));
    }
}
