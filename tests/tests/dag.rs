//! Runs as DAGs on real coordinators and agents (issue 23): dependency order and parallelism,
//! retries with backoff, dead letters, timeouts, cancel, idempotency across a leader kill, and
//! queue limits.

use std::path::Path;
use std::time::Duration;

use drover_proto::pb;
use drover_tests::{
    Cluster, ClusterOptions, KillOnDrop, ctl_output, pid_alive, wait_done, wait_for,
};

const TEST_DEADLINE: Duration = Duration::from_secs(150);

fn step(name: &str, deps: &[&str], script: &str) -> pb::TaskSpec {
    pb::TaskSpec {
        name: name.into(),
        shell: script.into(),
        depends_on: deps.iter().map(|d| d.to_string()).collect(),
        ..Default::default()
    }
}

async fn submit(
    client: &drover_proto::client::ClusterClient,
    name: &str,
    steps: Vec<pb::TaskSpec>,
) -> String {
    let spec = pb::RunSpec {
        name: name.into(),
        tasks: steps,
        ..Default::default()
    };
    droverctl::cli::submit(client, spec)
        .await
        .expect("submit")
        .run_id
}

/// Nanoseconds since the epoch written by `date +%s%N` into `dir/name`.
fn stamp(dir: &Path, name: &str) -> u128 {
    std::fs::read_to_string(dir.join(name))
        .unwrap_or_else(|e| panic!("{name}: {e}"))
        .trim()
        .parse()
        .unwrap()
}

fn task<'a>(run: &'a pb::Run, name: &str) -> &'a pb::Task {
    run.tasks
        .iter()
        .find(|t| t.spec.as_ref().is_some_and(|s| s.name == name))
        .unwrap()
}

fn state(t: &pb::Task) -> &'static str {
    droverctl::output::task_state(t.state)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steps_run_in_dependency_order_retry_with_backoff_and_resume_from_the_dead_letters() {
    tokio::time::timeout(TEST_DEADLINE, async {
        let mut cluster = Cluster::start(ClusterOptions::default()).await;
        cluster.add_agent("w1", &[]).await;
        cluster.add_agent("w2", &[]).await;
        let client = cluster.client();
        let dir = cluster.path().join("marks");
        std::fs::create_dir_all(&dir).unwrap();
        let d = dir.display();
        // A diamond: b and c wait for a, d for both; b and c take a second each.
        let mark = |n: &str, work: &str| {
            format!("date +%s%N > {d}/{n}.start; {work} date +%s%N > {d}/{n}.end")
        };
        let diamond = submit(
            &client,
            "diamond",
            vec![
                step("a", &[], &mark("a", "")),
                step("b", &["a"], &mark("b", "sleep 1;")),
                step("c", &["a"], &mark("c", "sleep 1;")),
                step("d", &["b", "c"], &mark("d", "")),
            ],
        )
        .await;
        // Fails twice, then succeeds: three attempts, a second or more apart.
        let mut flaky = step(
            "flaky",
            &[],
            &format!(
                "n=$(cat {d}/count 2>/dev/null || echo 0); n=$((n+1)); echo $n > {d}/count; \
                 date +%s%N > {d}/flaky.$n; echo attempt $n; [ $n -ge 3 ]"
            ),
        );
        flaky.retry = Some(pb::RetryPolicy {
            max: 3,
            backoff: "fixed".into(),
            initial_ms: 1000,
            max_delay_ms: 0,
        });
        let retried = submit(&client, "flaky", vec![flaky]).await;
        // Always fails until its input exists: a dead letter, then a retry completes the run.
        let mut needs = step(
            "needs-input",
            &[],
            &format!("test -f {d}/input || {{ echo missing {d}/input >&2; exit 4; }}"),
        );
        needs.retry = Some(pb::RetryPolicy {
            max: 1,
            backoff: "exponential".into(),
            initial_ms: 200,
            max_delay_ms: 0,
        });
        let lettered = submit(
            &client,
            "lettered",
            vec![
                needs,
                step("after", &["needs-input"], "echo after"),
                step("other", &[], "sleep 3"),
            ],
        )
        .await;

        let run = wait_done(&client, &diamond, Duration::from_secs(60)).await;
        assert_eq!(droverctl::output::run_state(run.state), "succeeded");
        let (a_end, d_start) = (stamp(&dir, "a.end"), stamp(&dir, "d.start"));
        let (b, c) = (
            (stamp(&dir, "b.start"), stamp(&dir, "b.end")),
            (stamp(&dir, "c.start"), stamp(&dir, "c.end")),
        );
        assert!(a_end <= b.0 && a_end <= c.0, "b and c start after a ends");
        assert!(b.0 < c.1 && c.0 < b.1, "b and c overlap: {b:?} {c:?}");
        assert!(
            d_start >= b.1 && d_start >= c.1,
            "d starts after b and c end"
        );

        let run = wait_done(&client, &retried, Duration::from_secs(60)).await;
        assert_eq!(droverctl::output::run_state(run.state), "succeeded");
        let t = &run.tasks[0];
        assert_eq!(t.attempt, 3);
        let codes: Vec<Option<i32>> = t.attempts.iter().map(|a| a.exit_code).collect();
        assert_eq!(codes, [Some(1), Some(1), Some(0)]);
        for n in 1..3 {
            let gap = stamp(&dir, &format!("flaky.{}", n + 1)) - stamp(&dir, &format!("flaky.{n}"));
            // The backoff is 1 s less up to a fifth of jitter.
            assert!(
                gap >= 800_000_000,
                "attempt {} came {gap} ns after {n}",
                n + 1
            );
        }

        let run = wait_done(&client, &lettered, Duration::from_secs(60)).await;
        assert_eq!(droverctl::output::run_state(run.state), "failed");
        assert_eq!(state(task(&run, "after")), "skipped");
        assert_eq!(
            state(task(&run, "other")),
            "skipped",
            "fail_fast stops what still runs"
        );
        let out = ctl_output(
            cluster.ctl().args(["dlq", "list", "-o", "json"]),
            Duration::from_secs(30),
        )
        .await;
        assert!(out.status.success(), "{out:?}");
        let letters: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let letter = letters
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["run_id"] == lettered.as_str())
            .expect("the failed step is a dead letter");
        assert_eq!(letter["failures"], 2);
        assert_eq!(letter["exit_code"], 4);
        assert!(letter["stderr_tail"].as_str().unwrap().contains("missing"));
        // Fix the input, retry the letter: the run resumes and completes.
        std::fs::write(dir.join("input"), "ok").unwrap();
        let id = letter["id"].as_str().unwrap().to_owned();
        let out = ctl_output(
            cluster.ctl().args(["dlq", "retry", &id]),
            Duration::from_secs(30),
        )
        .await;
        assert!(out.status.success(), "{out:?}");
        let run = wait_done(&client, &lettered, Duration::from_secs(60)).await;
        assert_eq!(droverctl::output::run_state(run.state), "succeeded");
        assert_eq!(state(task(&run, "after")), "succeeded");
        assert_eq!(
            state(task(&run, "other")),
            "succeeded",
            "restored by the retry"
        );
        let out = ctl_output(
            cluster.ctl().args(["dlq", "retry", &id]),
            Duration::from_secs(30),
        )
        .await;
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("not found"),
            "{out:?}"
        );

        // Listing by state and name.
        let out = ctl_output(
            cluster.ctl().args([
                "run",
                "list",
                "--state",
                "succeeded",
                "--name",
                "fla*",
                "-o",
                "json",
            ]),
            Duration::from_secs(30),
        )
        .await;
        let runs: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let ids: Vec<&str> = runs
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, [retried.as_str()]);
    })
    .await
    .expect("test deadline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_and_cancel_kill_the_process_tree_and_watch_exits_with_the_outcome() {
    tokio::time::timeout(TEST_DEADLINE, async {
        let mut cluster = Cluster::start(ClusterOptions::default()).await;
        cluster.add_agent("w1", &[]).await;
        let client = cluster.client();
        let dir = cluster.path().join("pids");
        std::fs::create_dir_all(&dir).unwrap();
        let d = dir.display();

        // A timeout kills `sleep 600` within its limit.
        let mut slow = step("slow", &[], &format!("echo $$ > {d}/slow; exec sleep 600"));
        slow.timeout_ms = 1_500;
        let started = std::time::Instant::now();
        let timed = submit(&client, "timed", vec![slow]).await;
        let run = wait_done(&client, &timed, Duration::from_secs(30)).await;
        assert_eq!(droverctl::output::run_state(run.state), "failed");
        let outcome = run.tasks[0].outcome.clone().unwrap();
        assert!(outcome.reason.contains("timeout"), "{outcome:?}");
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "{:?}",
            started.elapsed()
        );
        let pid: u32 = std::fs::read_to_string(dir.join("slow"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(!pid_alive(pid), "the timed-out sleep {pid} is gone");

        // Cancel a running run: the shell and its child are killed; watch exits 3.
        let tree = step(
            "tree",
            &[],
            &format!("sleep 600 & echo $! > {d}/child; echo $$ > {d}/parent; echo started; wait"),
        );
        let cancelled = submit(
            &client,
            "cancelled",
            vec![tree, step("later", &["tree"], "echo never")],
        )
        .await;
        let watch = cluster
            .ctl()
            .args(["run", "watch", &cancelled])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut watch = KillOnDrop(Some(watch));
        // Follow the step's output live, from before it ends.
        let follow = cluster
            .ctl()
            .args(["run", "logs", &cancelled, "--step", "tree", "-f"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut follow = KillOnDrop(Some(follow));
        let (parent, child) = wait_for("the tree to start", Duration::from_secs(30), || async {
            let p = std::fs::read_to_string(dir.join("parent")).ok()?;
            let c = std::fs::read_to_string(dir.join("child")).ok()?;
            Some((p.trim().parse::<u32>().ok()?, c.trim().parse::<u32>().ok()?))
        })
        .await;
        assert!(pid_alive(parent) && pid_alive(child));
        let out = ctl_output(
            cluster
                .ctl()
                .args(["run", "cancel", &cancelled, "--reason", "test"]),
            Duration::from_secs(30),
        )
        .await;
        assert!(out.status.success(), "{out:?}");
        wait_for(
            "the process tree to be gone",
            Duration::from_secs(20),
            || async { (!pid_alive(parent) && !pid_alive(child)).then_some(()) },
        )
        .await;
        let run = wait_done(&client, &cancelled, Duration::from_secs(30)).await;
        assert_eq!(droverctl::output::run_state(run.state), "cancelled");
        assert_eq!(state(task(&run, "later")), "cancelled");
        assert!(run.cancelled.contains("test"), "{}", run.cancelled);
        let out = watch
            .output_within("run watch", Duration::from_secs(20))
            .await;
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(3), "{text}");
        assert!(text.contains("tree") && text.contains("running"), "{text}");
        assert!(
            text.contains(&format!("run {cancelled} is cancelled")),
            "{text}"
        );
        let out = follow
            .output_within("run logs -f", Duration::from_secs(20))
            .await;
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("started"),
            "{out:?}"
        );

        // Unknown ids and finished runs get clear errors.
        let out = ctl_output(
            cluster.ctl().args(["run", "cancel", "run-999"]),
            Duration::from_secs(30),
        )
        .await;
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("run-999 not found"),
            "{out:?}"
        );
        let out = ctl_output(
            cluster.ctl().args(["run", "cancel", &timed]),
            Duration::from_secs(30),
        )
        .await;
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("already finished"),
            "{out:?}"
        );
        // Cancelling again (a retry) is answered as done.
        let out = ctl_output(
            cluster.ctl().args(["run", "cancel", &cancelled]),
            Duration::from_secs(30),
        )
        .await;
        assert!(out.status.success(), "{out:?}");
        // A submitter cancels only its own runs; a viewer none.
        let held = submit(&client, "admins", vec![step("wait", &[], "sleep 30")]).await;
        for (cert, expect) in [
            ("submitter", "may act only on its own runs"),
            ("viewer", "needs role"),
        ] {
            let other = cluster.client_as(cert, cluster.addrs());
            let req = pb::CancelRunRequest {
                run_id: held.clone(),
                ..Default::default()
            };
            let e = other
                .call(|mut c| {
                    let req = req.clone();
                    async move { c.cancel_run(req).await }
                })
                .await
                .expect_err("refused");
            assert!(e.to_string().contains(expect), "{cert}: {e}");
        }
        let out = ctl_output(
            cluster.ctl().args(["run", "cancel", &held]),
            Duration::from_secs(30),
        )
        .await;
        assert!(out.status.success(), "an admin may: {out:?}");
        // Bad input through the API: each gets its code and names the problem.
        let cycle = droverctl::cli::submit(
            &client,
            pb::RunSpec {
                name: "cycle".into(),
                tasks: vec![step("x", &["y"], "true"), step("y", &["x"], "true")],
                ..Default::default()
            },
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(cycle.contains("dependency cycle: x -> y -> x"), "{cycle}");
        let e = client
            .call(|mut c| async move {
                c.watch_run(pb::GetRunRequest {
                    run_id: "run-999".into(),
                })
                .await
            })
            .await
            .expect_err("unknown run");
        assert!(e.to_string().contains("run-999 not found"), "{e}");
        let e = client
            .call(|mut c| async move {
                c.retry_dead_letter(pb::DeadLetterRequest { id: "seven".into() })
                    .await
            })
            .await
            .expect_err("bad id");
        assert!(e.to_string().contains("not a dead letter id"), "{e}");
        let e = client
            .call(|mut c| async move {
                c.list_runs(pb::ListRunsRequest {
                    state: "done".into(),
                    ..Default::default()
                })
                .await
            })
            .await
            .expect_err("bad state");
        assert!(e.to_string().contains("'done' is not pending"), "{e}");
        let e = client
            .call(|mut c| async move {
                c.set_queue(pb::SetQueueRequest {
                    queue: Some(pb::Queue {
                        name: "q".into(),
                        rate: -1.0,
                        ..Default::default()
                    }),
                })
                .await
            })
            .await
            .expect_err("bad rate");
        assert!(e.to_string().contains("queue.rate"), "{e}");
    })
    .await
    .expect("test deadline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_limits_hold_concurrency_and_refuse_past_max_pending() {
    tokio::time::timeout(TEST_DEADLINE, async {
        let mut cluster = Cluster::start(ClusterOptions::default()).await;
        cluster.add_agent("w1", &[]).await;
        cluster.add_agent("w2", &[]).await;
        let client = cluster.client();
        let out = ctl_output(
            cluster
                .ctl()
                .args(["queue", "set", "etl", "--max-concurrency", "2"]),
            Duration::from_secs(30),
        )
        .await;
        assert!(out.status.success(), "{out:?}");
        let dir = cluster.path().join("spans");
        std::fs::create_dir_all(&dir).unwrap();
        let d = dir.display();
        let steps: Vec<pb::TaskSpec> = (0..10)
            .map(|i| pb::TaskSpec {
                queue: "etl".into(),
                ..step(
                    &format!("s{i}"),
                    &[],
                    &format!("date +%s%N > {d}/{i}.start; sleep 0.3; date +%s%N > {d}/{i}.end"),
                )
            })
            .collect();
        let run = submit(&client, "limited", steps).await;
        let run = wait_done(&client, &run, Duration::from_secs(60)).await;
        assert_eq!(droverctl::output::run_state(run.state), "succeeded");
        let mut edges: Vec<(u128, i32)> = Vec::new();
        for i in 0..10 {
            edges.push((stamp(&dir, &format!("{i}.start")), 1));
            edges.push((stamp(&dir, &format!("{i}.end")), -1));
        }
        edges.sort();
        let (mut now, mut most) = (0, 0);
        for (_, e) in edges {
            now += e;
            most = most.max(now);
        }
        eprintln!("most steps of queue etl running at once: {most}");
        assert!(most <= 2, "max_concurrency 2, observed {most}");
        assert_eq!(most, 2, "two agents, ten steps: the limit is reached");

        // rate: 2 starts a second, one at a time after a quiet spell.
        let out = ctl_output(
            cluster
                .ctl()
                .args(["queue", "set", "paced", "--rate", "2", "--burst", "1"]),
            Duration::from_secs(30),
        )
        .await;
        assert!(out.status.success(), "{out:?}");
        let steps: Vec<pb::TaskSpec> = (0..4)
            .map(|i| pb::TaskSpec {
                queue: "paced".into(),
                ..step(&format!("p{i}"), &[], &format!("date +%s%N > {d}/p{i}"))
            })
            .collect();
        let run = submit(&client, "paced", steps).await;
        let run = wait_done(&client, &run, Duration::from_secs(60)).await;
        assert_eq!(droverctl::output::run_state(run.state), "succeeded");
        let mut starts: Vec<u128> = (0..4).map(|i| stamp(&dir, &format!("p{i}"))).collect();
        starts.sort();
        let span = starts[3] - starts[0];
        eprintln!("4 steps at 2/s started over {span} ns");
        // Three waits of half a second each, less scheduling slack.
        assert!(span >= 1_200_000_000, "started over {span} ns");

        // max_pending: tasks no agent can take wait; past the limit, submissions are refused.
        let out = ctl_output(
            cluster
                .ctl()
                .args(["queue", "set", "held", "--max-pending", "3"]),
            Duration::from_secs(30),
        )
        .await;
        assert!(out.status.success(), "{out:?}");
        let held = |i: usize| pb::TaskSpec {
            queue: "held".into(),
            class: "nowhere".into(),
            ..step(&format!("h{i}"), &[], "true")
        };
        submit(&client, "held", (0..3).map(held).collect()).await;
        let e = droverctl::cli::submit(
            &client,
            pb::RunSpec {
                name: "over".into(),
                tasks: vec![held(9)],
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("queue held max_pending") || text.contains("max_pending is 3"),
            "{text}"
        );
        assert!(text.contains("queue held"), "{text}");
        let out = ctl_output(
            cluster.ctl().args(["queue", "get", "held", "-o", "json"]),
            Duration::from_secs(30),
        )
        .await;
        let q: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            (q["pending"].as_u64(), q["max_pending"].as_u64()),
            (Some(3), Some(3))
        );
        let status = cluster.metrics_of(0);
        assert!(status.contains("queue_tasks"), "queue metrics exported");
    })
    .await
    .expect("test deadline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_gives_one_run_also_after_a_leader_kill() {
    tokio::time::timeout(TEST_DEADLINE, async {
        let mut cluster = Cluster::start(ClusterOptions::default()).await;
        let spec_file = cluster.path().join("once.yaml");
        std::fs::write(
            &spec_file,
            "name: once\nsteps:\n  - name: only\n    shell: 'true'\n",
        )
        .unwrap();
        let submit = |cluster: &Cluster| {
            let mut cmd = cluster.ctl();
            cmd.args(["run", "submit", "-f"])
                .arg(&spec_file)
                .args(["--idempotency-key", "nightly-2026-11-01"]);
            cmd
        };
        let first = ctl_output(&mut submit(&cluster), Duration::from_secs(30)).await;
        assert!(first.status.success(), "{first:?}");
        let again = ctl_output(&mut submit(&cluster), Duration::from_secs(30)).await;
        assert_eq!(first.stdout, again.stdout);
        assert!(String::from_utf8_lossy(&again.stderr).contains("not submitted again"));
        let leader = cluster.wait_leader(Duration::from_secs(30)).await;
        cluster.kill(leader);
        let after = ctl_output(&mut submit(&cluster), Duration::from_secs(60)).await;
        assert!(after.status.success(), "{after:?}");
        assert_eq!(first.stdout, after.stdout, "the same run after a failover");
        let out = ctl_output(
            cluster
                .ctl()
                .args(["run", "list", "--name", "once", "-o", "json"]),
            Duration::from_secs(30),
        )
        .await;
        let runs: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(runs.as_array().unwrap().len(), 1, "one run for the key");
    })
    .await
    .expect("test deadline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_its_agent_does_not_enforce_is_failed_by_the_leader_and_stopped() {
    // The agent here is the test: it starts the task and then says nothing more about it.
    tokio::time::timeout(TEST_DEADLINE, async {
        let cluster = Cluster::start(ClusterOptions {
            lease_ttl_ms: 2_000,
            heartbeat_interval_ms: 300,
            ..Default::default()
        })
        .await;
        let leader = cluster.wait_leader(Duration::from_secs(30)).await;
        cluster.agent_cert("hung");
        let (mut hung, _) = drover_tests::RawAgent::connect(
            &cluster.tls_dir,
            "hung",
            &cluster.addr(leader),
            pb::Register {
                name: "hung".into(),
                resources: Some(pb::Resources {
                    cpu_millis: 1000,
                    memory_bytes: 1 << 30,
                    ..Default::default()
                }),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let _beats = hung.keep_alive(Duration::from_millis(200));
        let client = cluster.client();
        let mut t = step("stuck", &[], "sleep 600");
        t.timeout_ms = 500;
        let run = submit(&client, "stuck", vec![t]).await;
        let a = hung.next_assign(Duration::from_secs(10)).await;
        hung.send(pb::agent_message::Msg::Started(pb::TaskStarted {
            task_id: a.task_id.clone(),
            attempt: a.attempt,
            ..Default::default()
        }))
        .await;
        let run = wait_done(&client, &run, Duration::from_secs(40)).await;
        let outcome = run.tasks[0].outcome.clone().unwrap();
        assert!(
            outcome.reason.contains("failed by the coordinator"),
            "{outcome:?}"
        );
        // And the agent is told to stop it.
        let stop = loop {
            match hung.next(Duration::from_secs(10)).await {
                Some(pb::coordinator_message::Msg::Cancel(c)) => break c,
                Some(_) => continue,
                None => panic!("session ended before a cancel"),
            }
        };
        assert_eq!((stop.task_id, stop.attempt), (a.task_id, a.attempt));
    })
    .await
    .expect("test deadline");
}
