//! The agent's hot path for process tasks: one whole attempt of `true` (working directory, log
//! files, spawn, wait, tails), one at a time, by how the program is named.
//! Run: cargo bench -p drover-benches --bench agent

use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use drover_agent::executor;
use drover_agent::tasks::TaskTable;
use drover_proto::pb;

/// Nine directories without the program before the one with it, like this machine's PATH.
fn long_path() -> String {
    let misses: Vec<String> = (0..9).map(|i| format!("/nonexistent/bin{i}")).collect();
    format!("{}:/usr/bin:/bin", misses.join(":"))
}

/// One work directory and task table for every case, with task ids that never repeat.
struct Agent {
    rt: tokio::runtime::Runtime,
    dir: tempfile::TempDir,
    table: Arc<TaskTable>,
    n: u64,
}

impl Agent {
    fn new() -> Self {
        // tmpfs where there is one: deleting a case's files on this host's ext4 (no journal)
        // slows the next case's file creations for a minute (docs/BENCHMARKS.md), and the
        // cases compare how the program is found, not the file system.
        let shm = std::path::Path::new("/dev/shm");
        let dir = if shm.is_dir() {
            tempfile::tempdir_in(shm)
        } else {
            tempfile::tempdir()
        };
        Agent {
            rt: tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap(),
            dir: dir.unwrap(),
            table: Arc::new(TaskTable::default()),
            n: 0,
        }
    }

    fn bench(&mut self, c: &mut Criterion, name: &str, argv: &[&str], path_var: &str) {
        let Agent { rt, dir, table, n } = self;
        c.bench_function(name, |b| {
            b.iter(|| {
                *n += 1;
                let task_id = format!("r/t{n}");
                let assign = pb::Assign {
                    task_id: task_id.clone(),
                    attempt: 1,
                    run_id: "r".into(),
                    spec: Some(pb::TaskSpec {
                        argv: argv.iter().map(|s| s.to_string()).collect(),
                        env: [("PATH".to_string(), path_var.to_string())].into(),
                        ..Default::default()
                    }),
                };
                rt.block_on(executor::execute(
                    dir.path().to_owned(),
                    table.clone(),
                    Default::default(),
                    assign,
                ));
                assert_eq!(table.is_finished(&task_id, 1), Some(true));
                table.ack(&task_id, 1);
            })
        });
    }
}

fn benches(c: &mut Criterion) {
    let path = long_path();
    let mut agent = Agent::new();
    // The floor: no search at all.
    agent.bench(
        c,
        "attempt_true_by_absolute_path",
        &["/usr/bin/true"],
        &path,
    );
    // A bare name on a long PATH: found by the agent once, then run from the kept path.
    agent.bench(c, "attempt_true_found_on_a_long_path", &["true"], &path);
    // The same name when the agent cannot search for the child (a relative PATH entry comes
    // first): the child searches, trying `execve` in each directory; and since the task sets
    // PATH, the standard library forks the agent instead of `posix_spawn`. Before the agent
    // searched PATH itself, every task that set PATH ran this way; one that did not paid the
    // same misses without the fork (`posix_spawnp`).
    let relative_first = format!("relative/bin:{path}");
    agent.bench(
        c,
        "attempt_true_searched_by_the_child",
        &["true"],
        &relative_first,
    );
}

criterion_group! {
    name = agent;
    config = Criterion::default().sample_size(20).measurement_time(std::time::Duration::from_secs(5));
    targets = benches
}
criterion_main!(agent);
