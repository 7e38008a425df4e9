//! Assignments that never became a started task. An assignment is committed, then handed to the
//! agent's session; between the two a leader can fail over, a proposal can be confirmed after
//! its caller gave up (so nobody dispatches it), or a session can end with the message unread.
//! Each leaves a task assigned that no agent knows about. The leader re-sends what it has not
//! handed over (or handed over a while ago), and re-queues what still has not started long after.
//! Pure: the leader's loop supplies the clock, the sessions and what it has sent.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::model::{AgentName, Assignment, HeldTask, TaskState};
use crate::state::State;

/// At most this many tasks are re-sent or re-queued per sweep, so one sweep stays short.
pub const SWEEP_MAX: usize = 4_096;

#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// An assignment handed over this long ago and still not started is handed over again.
    pub resend_after: Duration,
    /// An assignment this old, handed over and still not started, is re-queued as a new attempt.
    pub start_timeout: Duration,
}

impl Policy {
    pub fn new(start_timeout: Duration) -> Self {
        Self {
            resend_after: (start_timeout / 6)
                .clamp(Duration::from_millis(200), Duration::from_secs(5)),
            start_timeout,
        }
    }

    /// Younger assignments are being dispatched by whoever committed them.
    fn settle(&self) -> Duration {
        self.resend_after.min(Duration::from_secs(1))
    }
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Stranded {
    pub resend: Vec<Assignment>,
    pub requeue: BTreeMap<AgentName, Vec<HeldTask>>,
}

/// What to do about the tasks assigned and not started. Only agents with a session here count:
/// for an absent agent the lease decides (lost, and its tasks re-queued), and a returning one
/// is re-sent its assignments when it registers.
pub fn stranded(
    state: &State,
    now_us: u64,
    policy: &Policy,
    connected: impl Fn(&str) -> bool,
    sent_ago: impl Fn(&str, u64) -> Option<Duration>,
) -> Stranded {
    let mut out = Stranded::default();
    let mut n = 0;
    // Oldest first: everything past the first assignment younger than the settling time is
    // younger still, and left alone. In steady state that is nearly all of them.
    let settled_before = now_us.saturating_sub(policy.settle().as_micros() as u64);
    for (&(assigned_at, _), tid) in &state.assigned {
        if n >= SWEEP_MAX || assigned_at > settled_before {
            break;
        }
        let Some(t) = state.tasks.get(tid) else {
            continue;
        };
        let Some(agent) = t.agent.as_deref().filter(|a| connected(a)) else {
            continue;
        };
        if t.state != TaskState::Assigned {
            continue;
        }
        let age = Duration::from_micros(now_us.saturating_sub(t.assigned_at_us));
        let resend = match sent_ago(tid, t.attempt) {
            None => age >= policy.settle(),
            Some(ago) if ago < policy.resend_after => false,
            Some(_) if age >= policy.start_timeout => {
                out.requeue
                    .entry(agent.to_owned())
                    .or_default()
                    .push(HeldTask {
                        task_id: tid.clone(),
                        attempt: t.attempt,
                    });
                n += 1;
                continue;
            }
            Some(_) => true,
        };
        if resend {
            out.resend.push(Assignment {
                task_id: tid.clone(),
                attempt: t.attempt,
                agent: agent.to_owned(),
            });
            n += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::command::{Command, Request};
    use crate::model::{Program, Resources, RunSpec, TaskSpec};

    const S: u64 = 1_000_000;

    fn state_with_assigned(tasks: &[&str], at_us: u64) -> State {
        let mut s = State::default();
        let req = |now_us, cmd| Request {
            now_us,
            commands: vec![cmd].into(),
        };
        s.apply(
            1,
            &req(
                at_us,
                Command::RegisterAgent {
                    name: "a".into(),
                    labels: Default::default(),
                    total: Resources {
                        cpu_millis: 10_000,
                        ..Default::default()
                    },
                    class: "default".into(),
                    version: String::new(),
                    held: vec![],
                    pool: String::new(),
                    isolation: String::new(),
                    instance_id: String::new(),
                },
            ),
        );
        let spec = RunSpec {
            name: "r".into(),
            tasks: tasks
                .iter()
                .map(|n| TaskSpec::new(*n, Program::Argv(vec!["true".into()])))
                .collect(),
            labels: Default::default(),
            ..Default::default()
        };
        s.apply(
            1,
            &req(
                at_us,
                Command::SubmitRun {
                    idempotency_key: String::new(),
                    spec,
                    submitted_by: "t".into(),
                    placement: None,
                },
            ),
        );
        let assignments = tasks
            .iter()
            .map(|n| Assignment {
                task_id: format!("run-1/{n}"),
                attempt: 1,
                agent: "a".into(),
            })
            .collect();
        s.apply(
            1,
            &req(
                at_us,
                Command::ApplyPlan {
                    term: 1,
                    assignments,
                    unplaced: vec![],
                },
            ),
        );
        s
    }

    #[test]
    fn unsent_assignments_are_resent_once_settled_and_sent_ones_after_a_pause() {
        let s = state_with_assigned(&["x", "y"], 100 * S);
        let p = Policy::new(Duration::from_secs(30));
        assert_eq!(p.resend_after, Duration::from_secs(5));
        let on = |_: &str| true;
        // Just committed: whoever committed it is dispatching it.
        let r = stranded(&s, 100 * S + 1_000, &p, on, |_, _| None);
        assert!(r.resend.is_empty());
        // Never handed over by this leader, a second later: resent.
        let r = stranded(&s, 101 * S, &p, on, |_, _| None);
        assert_eq!(r.resend.len(), 2);
        // Handed over recently: left alone; long ago: resent.
        let r = stranded(&s, 110 * S, &p, on, |t, _| {
            Some(Duration::from_secs(if t.ends_with('x') { 1 } else { 6 }))
        });
        assert_eq!(r.resend.len(), 1);
        assert_eq!(r.resend[0].task_id, "run-1/y");
        assert!(r.requeue.is_empty());
    }

    #[test]
    fn assignments_never_started_within_the_bound_are_requeued_and_absent_agents_left_to_the_lease()
    {
        let s = state_with_assigned(&["x"], 100 * S);
        let p = Policy::new(Duration::from_secs(30));
        let sent_long_ago = |_: &str, _| Some(Duration::from_secs(10));
        let r = stranded(&s, 131 * S, &p, |_| true, sent_long_ago);
        assert!(r.resend.is_empty());
        assert_eq!(
            r.requeue["a"],
            [HeldTask {
                task_id: "run-1/x".into(),
                attempt: 1
            }]
        );
        // Never handed over yet: first it is sent, whatever its age.
        let r = stranded(&s, 131 * S, &p, |_| true, |_, _| None);
        assert_eq!(r.resend.len(), 1);
        assert!(r.requeue.is_empty());
        // The agent has no session here: nothing; its lease decides.
        let r = stranded(&s, 131 * S, &p, |_| false, sent_long_ago);
        assert_eq!(r, Stranded::default());
        // A started task is not stranded.
        let mut s = s;
        s.apply(
            1,
            &Request {
                now_us: 102 * S,
                commands: vec![Command::TaskStarted {
                    agent: "a".into(),
                    task_id: "run-1/x".into(),
                    attempt: 1,
                    started_at_us: 0,
                }]
                .into(),
            },
        );
        assert!(s.assigned.is_empty());
        assert_eq!(
            stranded(&s, 131 * S, &p, |_| true, sent_long_ago),
            Stranded::default()
        );
    }
}
