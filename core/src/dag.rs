//! The shape of a run's steps: dependencies name steps of the same run, and form no cycle.
//! Checked on the client (`droverctl run validate`) and again on the coordinator.

use std::collections::{BTreeMap, BTreeSet};

/// A problem with the dependencies, at a field path such as `steps[2].depends_on[0]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DagError {
    pub field: String,
    pub message: String,
}

/// `steps`: (name, depends_on) in spec order; `prefix` names the list in field paths.
pub fn check(prefix: &str, steps: &[(&str, &[String])]) -> Result<(), DagError> {
    let index: BTreeMap<&str, usize> = steps.iter().enumerate().map(|(i, s)| (s.0, i)).collect();
    for (i, (name, deps)) in steps.iter().enumerate() {
        let mut seen = BTreeSet::new();
        for (j, d) in deps.iter().enumerate() {
            let field = format!("{prefix}[{i}].depends_on[{j}]");
            if d == name {
                return Err(DagError {
                    field,
                    message: format!("step '{name}' depends on itself"),
                });
            }
            if !index.contains_key(d.as_str()) {
                let known: Vec<&str> = steps.iter().map(|s| s.0).collect();
                return Err(DagError {
                    field,
                    message: format!(
                        "step '{name}' depends on '{d}', which is not a step of this run (steps: {})",
                        known.join(", ")
                    ),
                });
            }
            if !seen.insert(d.as_str()) {
                return Err(DagError {
                    field,
                    message: format!("step '{name}' lists '{d}' twice"),
                });
            }
        }
    }
    if let Some(cycle) = find_cycle(steps, &index) {
        let first = index[cycle[0]];
        return Err(DagError {
            field: format!("{prefix}[{first}].depends_on"),
            message: format!("dependency cycle: {}", cycle.join(" -> ")),
        });
    }
    Ok(())
}

/// A cycle as the step names along it, the first repeated at the end; None if there is none.
/// Iterative depth-first search (a run has up to `TASKS_PER_RUN_MAX` steps: no deep recursion).
fn find_cycle<'a>(
    steps: &[(&'a str, &'a [String])],
    index: &BTreeMap<&'a str, usize>,
) -> Option<Vec<&'a str>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        OnPath,
        Done,
    }
    let mut mark = vec![Mark::New; steps.len()];
    for root in 0..steps.len() {
        if mark[root] != Mark::New {
            continue;
        }
        // (step, next dependency to look at)
        let mut path: Vec<(usize, usize)> = vec![(root, 0)];
        mark[root] = Mark::OnPath;
        while let Some(&mut (node, ref mut next)) = path.last_mut() {
            let deps = steps[node].1;
            if *next == deps.len() {
                mark[node] = Mark::Done;
                path.pop();
                continue;
            }
            let dep = index[deps[*next].as_str()];
            *next += 1;
            match mark[dep] {
                Mark::New => {
                    mark[dep] = Mark::OnPath;
                    path.push((dep, 0));
                }
                Mark::OnPath => {
                    // The path from `dep` to here, then back to `dep`, reads as "needs": turn it
                    // into the order the steps would run in.
                    let start = path.iter().position(|(n, _)| *n == dep).unwrap_or(0);
                    let mut names: Vec<&str> =
                        path[start..].iter().map(|(n, _)| steps[*n].0).collect();
                    names.reverse();
                    // Start at the step written first, so the message reads like the file.
                    let first = (0..names.len())
                        .min_by_key(|i| index[names[*i]])
                        .unwrap_or(0);
                    names.rotate_left(first);
                    names.push(names[0]);
                    return Some(names);
                }
                Mark::Done => {}
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(steps: &[(&str, &[&str])]) -> Result<(), DagError> {
        let owned: Vec<(&str, Vec<String>)> = steps
            .iter()
            .map(|(n, d)| (*n, d.iter().map(|s| s.to_string()).collect()))
            .collect();
        let view: Vec<(&str, &[String])> = owned.iter().map(|(n, d)| (*n, d.as_slice())).collect();
        check("steps", &view)
    }

    #[test]
    fn a_diamond_is_fine() {
        run(&[("a", &[]), ("b", &["a"]), ("c", &["a"]), ("d", &["b", "c"])]).unwrap();
    }

    #[test]
    fn a_cycle_is_named_step_by_step() {
        let e = run(&[("a", &["c"]), ("b", &["a"]), ("c", &["b"]), ("d", &[])]).unwrap_err();
        assert_eq!(e.message, "dependency cycle: a -> b -> c -> a");
        assert_eq!(e.field, "steps[0].depends_on");
    }

    #[test]
    fn unknown_self_and_repeated_dependencies_are_refused_with_their_path() {
        let e = run(&[("a", &[]), ("b", &["x"])]).unwrap_err();
        assert_eq!(e.field, "steps[1].depends_on[0]");
        assert!(e.message.contains("'x', which is not a step"), "{e:?}");
        let e = run(&[("a", &["a"])]).unwrap_err();
        assert!(e.message.contains("depends on itself"), "{e:?}");
        let e = run(&[("a", &[]), ("b", &["a", "a"])]).unwrap_err();
        assert_eq!(e.field, "steps[1].depends_on[1]");
    }

    #[test]
    fn a_long_chain_needs_no_deep_recursion() {
        let names: Vec<String> = (0..1000).map(|i| format!("s{i}")).collect();
        let deps: Vec<Vec<String>> = (0..1000)
            .map(|i| {
                if i == 0 {
                    vec![]
                } else {
                    vec![names[i - 1].clone()]
                }
            })
            .collect();
        let view: Vec<(&str, &[String])> = names
            .iter()
            .zip(&deps)
            .map(|(n, d)| (n.as_str(), d.as_slice()))
            .collect();
        check("steps", &view).unwrap();
    }
}
