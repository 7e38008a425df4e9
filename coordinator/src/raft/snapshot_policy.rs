//! When a node builds a snapshot: once the log written since the last one is at least as large as
//! that snapshot, and at least `--snapshot-logs` entries long.
//!
//! A fixed count of entries made the work grow with the state: at a million retained tasks every
//! 5,000 entries meant a snapshot of ~145 MiB on each node every ~18 s under sustained load, and
//! the 10 s windows holding one ran at 18-20k tasks/s against 25-26k without. Sizing the interval by
//! the snapshot itself keeps snapshot writing at most about equal to log writing, whatever the
//! state's size, and keeps replay after a restart no longer than reading the snapshot. The count
//! stays a floor, so a small state is not snapshotted at every handful of entries.
//!
//! Every node sees the same log, so by that rule alone all of them snapshot within a second of
//! each other: three encodes and ~440 MiB of writes at once on a shared host, the one 10 s dip
//! left in sustained runs. Each node waits for a quarter of a snapshot's bytes more per member
//! ahead of it in id order, which spreads them several seconds apart under load.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use openraft::async_runtime::WatchReceiver;

use super::Raft;

/// How often the shell looks at the log.
const CHECK_EVERY: Duration = Duration::from_millis(200);

/// A trigger that produced no snapshot in this long (openraft ignores one while it is building
/// or installing another) may be sent again.
const TRIGGER_PATIENCE: Duration = Duration::from_secs(30);

/// Whether a snapshot is due, `entries` and `log_bytes` having been written since the last one,
/// which encoded to `last_snapshot_bytes`, on the node `rank`-th in id order.
pub fn due(
    entries: u64,
    log_bytes: u64,
    last_snapshot_bytes: u64,
    min_entries: u64,
    rank: u64,
) -> bool {
    let stagger = last_snapshot_bytes / 4 * rank;
    entries >= min_entries.max(1) && log_bytes >= last_snapshot_bytes + stagger
}

/// This node's place among the members, in id order (0 when not among them).
pub fn rank(me: crate::model::NodeId, members: &[crate::model::NodeId]) -> u64 {
    members.iter().filter(|&&m| m < me).count() as u64
}

/// What the shell needs from storage: bytes appended to the log since start (cumulative) and the
/// size of the latest snapshot, both kept up to date by the stores.
pub struct Sizes {
    pub log_appended: Arc<AtomicU64>,
    /// The `drover_snapshot_bytes` gauge: the newest snapshot loaded, built or installed.
    pub last_snapshot: prometheus_client::metrics::gauge::Gauge,
    /// This node's [`rank`].
    pub rank: u64,
}

/// Triggers snapshots by [`due`] until shutdown. openraft's own policy is off (`Never`).
pub async fn run(
    raft: Raft,
    sizes: Sizes,
    min_entries: u64,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let metrics = raft.metrics();
    let snapshot_index = |m: &openraft::RaftMetrics<_>| m.snapshot.map(|l| l.index);
    let mut seen = snapshot_index(&metrics.borrow_watched());
    // Log bytes counted at the last snapshot. Bytes already in the log at start are not known;
    // counting from zero only delays the first snapshot after a restart.
    let mut baseline = 0u64;
    let mut triggered: Option<(Instant, u64)> = None;
    let mut tick = tokio::time::interval(CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let (snapshot, applied) = {
            let m = metrics.borrow_watched();
            (snapshot_index(&m), m.last_applied.map(|l| l.index))
        };
        let appended = sizes.log_appended.load(Ordering::Relaxed);
        if snapshot != seen {
            // Built here (what was appended up to the trigger is what it covers, near enough)
            // or installed from the leader (everything so far).
            seen = snapshot;
            baseline = triggered.take().map_or(appended, |(_, at)| at);
        }
        if triggered.is_some_and(|(at, _)| at.elapsed() < TRIGGER_PATIENCE) {
            continue;
        }
        let entries = applied.unwrap_or(0).saturating_sub(snapshot.unwrap_or(0));
        let log_bytes = appended.saturating_sub(baseline);
        let last = sizes.last_snapshot.get().max(0) as u64;
        if !due(entries, log_bytes, last, min_entries, sizes.rank) {
            continue;
        }
        tracing::debug!(entries, log_bytes, last, "snapshot due");
        if raft.trigger().snapshot().await.is_err() {
            return; // Raft has stopped; the node is shutting down or failed.
        }
        triggered = Some((Instant::now(), appended));
    }
}

#[cfg(test)]
mod tests {
    use super::due;

    #[test]
    fn a_snapshot_waits_for_as_much_log_as_it_holds() {
        // Guards: the interval grows with the state, so a large state is not rewritten every few
        // thousand entries.
        let mib = 1 << 20;
        assert!(!due(5_000, 80 * mib, 145 * mib, 5_000, 0));
        assert!(due(9_000, 145 * mib, 145 * mib, 5_000, 0));
    }

    #[test]
    fn members_later_in_id_order_wait_a_quarter_snapshot_more_each() {
        // Guards: the nodes of a cluster do not all snapshot at the same moment.
        let mib = 1 << 20;
        assert!(due(9_000, 100 * mib, 100 * mib, 5_000, 0));
        assert!(!due(9_000, 100 * mib, 100 * mib, 5_000, 1));
        assert!(due(9_000, 125 * mib, 100 * mib, 5_000, 1));
        assert!(!due(9_000, 125 * mib, 100 * mib, 5_000, 2));
        assert!(due(9_000, 150 * mib, 100 * mib, 5_000, 2));
        assert_eq!(super::rank(3, &[1, 2, 3]), 2);
        assert_eq!(super::rank(1, &[3, 2, 1]), 0);
        assert_eq!(super::rank(7, &[]), 0);
    }

    #[test]
    fn the_entry_count_is_a_floor() {
        // Guards: a tiny state (or none yet) is not snapshotted every few entries.
        assert!(!due(4_999, 1 << 30, 0, 5_000, 0));
        assert!(due(5_000, 0, 0, 5_000, 2));
        assert!(due(5, 10, 10, 5, 0));
        assert!(!due(0, 0, 0, 0, 0), "nothing applied since: nothing to do");
    }
}
