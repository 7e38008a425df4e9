//! Budgets per submitter and per queue: how many tasks and how many bytes of specs may wait for
//! placement. Checked by the leader before a run is proposed, against applied state plus the
//! submissions it has in flight, so a submitter (or a runaway pipeline) that floods the queue
//! gets RESOURCE_EXHAUSTED naming its budget instead of filling every replica's memory. The
//! all-submitters caps (`pending_tasks_max`, `pending_bytes_max`) are checked in apply.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::error::CoordinatorError;
use crate::model::RunSpec;
use crate::state::{State, Tally};

#[derive(Debug, Clone, Copy)]
pub struct Budgets {
    pub submitter_tasks: u64,
    pub submitter_bytes: u64,
    pub queue_tasks: u64,
    pub queue_bytes: u64,
}

/// Whose budget: a submitter (certificate name) or a queue ("" is the default queue).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Owner {
    Submitter(String),
    Queue(String),
}

/// What one run adds to each budget it draws on.
fn demand(submitter: &str, spec: &RunSpec) -> Vec<(Owner, Tally)> {
    let mut by_queue: HashMap<&str, Tally> = HashMap::new();
    let mut all = Tally::default();
    for t in &spec.tasks {
        let b = t.approx_bytes();
        let q = by_queue.entry(t.queue.as_str()).or_default();
        q.tasks += 1;
        q.bytes += b;
        all.tasks += 1;
        all.bytes += b;
    }
    let mut out = vec![(Owner::Submitter(submitter.to_owned()), all)];
    out.extend(
        by_queue
            .into_iter()
            .map(|(q, t)| (Owner::Queue(q.to_owned()), t)),
    );
    out
}

/// The first budget `adding` would break, given what is pending (`have`). Pure.
fn over(owner: &Owner, have: Tally, adding: Tally, b: &Budgets) -> Option<CoordinatorError> {
    let (what, name, max_tasks, max_bytes, flag) = match owner {
        Owner::Submitter(n) => (
            "submitter",
            n.as_str(),
            b.submitter_tasks,
            b.submitter_bytes,
            "submitter",
        ),
        Owner::Queue(q) => (
            "queue",
            if q.is_empty() { "default" } else { q.as_str() },
            b.queue_tasks,
            b.queue_bytes,
            "queue",
        ),
    };
    if have.tasks + adding.tasks > max_tasks {
        return Some(CoordinatorError::LimitReached {
            limit: format!("{flag}_pending_tasks_max"),
            message: format!(
                "{what} '{name}' has {} tasks pending and this run adds {}; \
                 {flag}_pending_tasks_max is {max_tasks}: wait for some to run",
                have.tasks, adding.tasks
            ),
        });
    }
    if have.bytes + adding.bytes > max_bytes {
        return Some(CoordinatorError::LimitReached {
            limit: format!("{flag}_pending_bytes_max"),
            message: format!(
                "{what} '{name}' has {} bytes of task specs pending and this run adds {}; \
                 {flag}_pending_bytes_max is {max_bytes}: wait for some to run, or submit \
                 smaller specs",
                have.bytes, adding.bytes
            ),
        });
    }
    None
}

/// The leader's admission: budgets plus what it has proposed and not yet seen applied.
pub struct Admission {
    budgets: Budgets,
    in_flight: Mutex<HashMap<Owner, Tally>>,
}

/// Held while a submission is being proposed; its demand stops counting as in flight when
/// dropped (by then it is applied, or it failed).
pub struct Admitted {
    admission: Arc<Admission>,
    demand: Vec<(Owner, Tally)>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut in_flight = self.admission.in_flight.lock().unwrap();
        for (owner, t) in &self.demand {
            if let Some(f) = in_flight.get_mut(owner) {
                f.tasks = f.tasks.saturating_sub(t.tasks);
                f.bytes = f.bytes.saturating_sub(t.bytes);
                if f.tasks == 0 {
                    in_flight.remove(owner);
                }
            }
        }
    }
}

impl Admission {
    pub fn new(budgets: Budgets) -> Arc<Self> {
        Arc::new(Self {
            budgets,
            in_flight: Mutex::new(HashMap::new()),
        })
    }

    /// Admits `spec` from `submitter`, or names the budget it would break.
    pub fn admit(
        self: &Arc<Self>,
        state: &State,
        submitter: &str,
        spec: &RunSpec,
    ) -> Result<Admitted, CoordinatorError> {
        let demand = demand(submitter, spec);
        let mut in_flight = self.in_flight.lock().unwrap();
        for (owner, adding) in &demand {
            let pending = match owner {
                Owner::Submitter(n) => state.pending_by_submitter.get(n),
                Owner::Queue(q) => state.pending_by_queue.get(q),
            }
            .copied()
            .unwrap_or_default();
            let flying = in_flight.get(owner).copied().unwrap_or_default();
            let have = Tally {
                tasks: pending.tasks + flying.tasks,
                bytes: pending.bytes + flying.bytes,
            };
            if let Some(e) = over(owner, have, *adding, &self.budgets) {
                return Err(e);
            }
        }
        for (owner, adding) in &demand {
            let f = in_flight.entry(owner.clone()).or_default();
            f.tasks += adding.tasks;
            f.bytes += adding.bytes;
        }
        Ok(Admitted {
            admission: self.clone(),
            demand,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Program, TaskSpec};

    fn spec(tasks: usize, arg_bytes: usize, queue: &str) -> RunSpec {
        RunSpec {
            name: "r".into(),
            tasks: (0..tasks)
                .map(|i| TaskSpec {
                    queue: queue.into(),
                    ..TaskSpec::new(format!("t{i}"), Program::Argv(vec!["x".repeat(arg_bytes)]))
                })
                .collect(),
            labels: Default::default(),
            ..Default::default()
        }
    }

    fn budgets() -> Budgets {
        Budgets {
            submitter_tasks: 10,
            submitter_bytes: 100_000,
            queue_tasks: 15,
            queue_bytes: 1_000_000,
        }
    }

    #[test]
    fn each_budget_names_itself_and_in_flight_submissions_count_until_done() {
        let a = Admission::new(budgets());
        let state = State::default();
        let held = a.admit(&state, "ci", &spec(8, 10, "")).unwrap();
        // 8 in flight + 3 > 10 for the submitter.
        let e = a.admit(&state, "ci", &spec(3, 10, "")).err().unwrap();
        assert!(
            matches!(&e, CoordinatorError::LimitReached { limit, .. } if limit == "submitter_pending_tasks_max"),
            "{e}"
        );
        assert!(
            e.to_string().contains("submitter 'ci' has 8 tasks pending"),
            "{e}"
        );
        // Another submitter has its own budget, but the default queue is shared: 8 + 8 > 15.
        let e = a.admit(&state, "other", &spec(8, 10, "")).err().unwrap();
        assert!(
            matches!(&e, CoordinatorError::LimitReached { limit, .. } if limit == "queue_pending_tasks_max"),
            "{e}"
        );
        assert!(e.to_string().contains("queue 'default'"), "{e}");
        assert!(a.admit(&state, "other", &spec(8, 10, "etl")).is_ok());
        // Bytes: one large task breaks the submitter's byte budget.
        let e = a
            .admit(&state, "big", &spec(1, 200_000, "etl"))
            .err()
            .unwrap();
        assert!(
            matches!(&e, CoordinatorError::LimitReached { limit, .. } if limit == "submitter_pending_bytes_max"),
            "{e}"
        );
        // Done (applied or failed): no longer in flight.
        drop(held);
        assert!(a.admit(&state, "ci", &spec(10, 10, "")).is_ok());
    }
}
